"""The peers the proxy is measured against, each started for one section and stopped after it: plain
mitmdump (default options, no addon) and configurable-http-proxy 5 (node), installed once."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from benchlib import free_port
from benchlib import wait_port

from benchproxy import Skip
from benchproxy.load import wait_answer
from benchproxy.processes import log_tail
from benchproxy.processes import slug
from benchproxy.processes import tool_version
from benchproxy.rig import Rig
from benchproxy.rig import Target

CHP_DIR = Path.home() / ".cache" / "datalab" / "chp"
CHP_BIN = CHP_DIR / "node_modules" / ".bin" / "configurable-http-proxy"


def start_plain_mitmdump(rig: Rig, upstream: str, name: str = "plain mitmdump", *extra: str) -> Target:
    port = free_port()
    mitmdump = Path(sys.executable).parent / "mitmdump"
    cmd = [str(mitmdump), "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1"]
    cmd += ["--listen-port", str(port), "--set", "keep_host_header=true", *extra]
    log = open(os.devnull, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    rig.procs.adopt(proc)
    wait_port(port, proc, timeout=60)
    rig.meta[slug(name)] = " ".join(["mitmdump", *cmd[1:]]) + " >/dev/null"
    return Target(name, port, {}, proc=proc)


def chp(rig: Rig) -> Path | Skip:
    """configurable-http-proxy@5, installed once into ~/.cache/datalab/chp."""
    if rig.chp is None:
        rig.chp = install_chp()
        if not isinstance(rig.chp, Skip):
            rig.meta["chp"] = "configurable-http-proxy " + tool_version([str(CHP_BIN), "--version"])
    return rig.chp


def install_chp() -> Path | Skip:
    if CHP_BIN.exists():
        return CHP_BIN
    if not shutil.which("npm"):
        return Skip("npm is missing")
    print(f"installing configurable-http-proxy@5 into {CHP_DIR}", flush=True)
    CHP_DIR.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["npm", "install", "--prefix", str(CHP_DIR), "configurable-http-proxy@5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not CHP_BIN.exists():
        return Skip(f"npm install configurable-http-proxy@5 failed: {done.stderr.strip()[-200:]}")
    return CHP_BIN


def start_chp(rig: Rig, upstream: str) -> Target | Skip:
    binary = chp(rig)
    if isinstance(binary, Skip):
        return binary
    port, api = free_port(), free_port()
    cmd = [str(binary), "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1"]
    cmd += ["--api-port", str(api), "--default-target", upstream]
    proc = rig.procs.spawn(f"chp-{port}", cmd, env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16)})
    try:
        wait_port(port, proc, timeout=30)
        if not wait_answer(f"http://127.0.0.1:{port}/small", (200, 404)):  # an answer from upstream through it
            raise RuntimeError("it never answered")
    except RuntimeError as e:
        rig.procs.stop(proc)
        return Skip(f"CHP did not start: {e}; {log_tail(rig.logs / f'chp-{port}.log', 3)}")
    return Target("CHP", port, {}, proc=proc)
