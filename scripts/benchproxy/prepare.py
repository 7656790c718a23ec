"""The set-up, for the sections asked for only: their tools (apt-get installs the missing ones), the
default entry, their holders with a session open on each through it (checked to route), then the
other entries (not with --setup-only), each checked to route the sessions too. A set-up that fails
raises: the bench then measures nothing and exits non-zero."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from benchproxy import Skip
from benchproxy.entries import DEFAULT
from benchproxy.entries import LEAN1
from benchproxy.entries import LEAN2
from benchproxy.entries import WORKERS2
from benchproxy.entries import start_default_proxy
from benchproxy.entries import start_entry
from benchproxy.holders import HOLDERS
from benchproxy.holders import IMAGE
from benchproxy.holders import network
from benchproxy.holders import open_session
from benchproxy.holders import start_echo
from benchproxy.holders import start_holder
from benchproxy.holders import start_nginx
from benchproxy.holders import through
from benchproxy.processes import PATH
from benchproxy.processes import tool_version
from benchproxy.rig import Rig

TOOLS = {"http": ("wrk", "nginx"), "jupyter": ("wrk",), "ws": (), "memory": ("wrk", "nginx", "curl")}


def prepare_tools(rig: Rig) -> None:
    missing = sorted(tool for tool in rig.needed(TOOLS) if not shutil.which(tool, path=PATH))  # package = tool
    if missing:
        print(f"installing {' '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, stdout=subprocess.DEVNULL)
    if not shutil.which("nsenter", path=PATH):
        sys.exit("nsenter (util-linux) is missing")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        sys.exit(f"the image {IMAGE} is not in the local engine (never pulled: build it with scripts/build-image.sh)")
    import mitmproxy.version
    import websockets

    nginx = shutil.which("nginx", path=PATH)
    rig.meta.update(
        machine=f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}",
        wrk=tool_version(["wrk", "-v"]),
        wrk_flags="-t2 -c16 --latency --timeout 10s -d<seconds>",
        nginx=tool_version([nginx, "-v"]) + " (worker_processes 1, access_log off)" if nginx else "missing",
        mitmproxy=mitmproxy.version.VERSION,
        websockets_client=f"websockets {websockets.__version__} (Python {sys.version.split()[0]})",
        node=tool_version(["node", "--version"]) if shutil.which("node") else "missing",
        seconds=rig.args.seconds,
        rounds=rig.args.rounds,
        jupyter_rounds=rig.args.jupyter_rounds,
        quick=rig.args.quick,
    )


def set_up(rig: Rig) -> None:
    prepare_tools(rig)
    print(f"key prefix {rig.prefix}  logs in {rig.logs}", flush=True)
    start_default_proxy(rig)
    net = network(rig)
    holders = rig.needed(HOLDERS)
    if "nginx" in holders:
        rig.nginx = start_holder(rig, "nginx", net)
        start_nginx(rig, rig.nginx)
    if "echo" in holders:
        rig.echo = start_holder(rig, "echo", net)
        start_echo(rig, rig.echo)
    for holder in rig.holders():
        open_session(rig, holder)
        answer = through(rig, DEFAULT, holder)
        if answer is not None:
            raise RuntimeError(f"the proxy did not route the session to the {holder.role} holder: {answer}")
        print(f"the default entry routes the {holder.role} holder's session", flush=True)
    if rig.args.setup_only:
        return
    for name in (LEAN1, WORKERS2, LEAN2):
        start_entry(rig, name)
        check_routes(rig, name)


def check_routes(rig: Rig, name: str) -> None:
    """A proxy row counts only if that proxy routes the sessions (every worker: 10 connections)."""
    proc = rig.proxies.get(name)
    if not isinstance(proc, subprocess.Popen):
        return
    for holder in rig.holders():
        for _ in range(10):
            answer = through(rig, name, holder)
            if answer is not None:
                rig.proxies[name] = Skip(f"failed: it answered {answer} for the live session")
                print(f"  {name}: {rig.proxies[name]}", flush=True)
                rig.procs.stop(proc)
                return
