"""The fast backends: "holder" containers on the instance network (the local image running `sleep
infinity`, labelled as the backend labels its instances, recorded in Redis with the product's own
store), with host processes run in their network namespaces (nginx in one, the echo backend in the
other), and a session opened on each through the default entry."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

from benchlib import REDIS_URL
from benchlib import ROOT
from benchlib import Settings
from benchlib import Store
from benchlib import build_instances
from benchlib import connect
from benchlib import new_token
from benchlib import session_cookie
from benchlib import wait_port

from backends import Instance
from backends.container_spec import JUPYTER_PORT
from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import LABEL_MANAGED
from backends.container_spec import LABEL_PREFIX
from backends.container_spec import MANAGED_BY
from benchproxy import MIB
from benchproxy.entries import DEFAULT
from benchproxy.load import http_get
from benchproxy.load import wait_answer
from benchproxy.processes import PATH
from benchproxy.rig import Holder
from benchproxy.rig import Rig

IMAGE = os.environ.get("DATALAB_IMAGE", "datalab-notebook:latest")
SMALL_BODY = "datalab bench: a small answer of about one hundred bytes, served by nginx for the request rows.\n"
HOLDERS = {"http": ("nginx",), "jupyter": (), "ws": ("echo",), "memory": ("nginx", "echo")}  # what each section needs


def network(rig: Rig) -> str:
    async def make() -> str:
        instances = build_instances(Settings(sign_key="unused", redis_url=REDIS_URL, key_prefix=rig.prefix))
        try:
            return (await instances.backend.network()).name
        finally:
            await instances.store.close()

    return asyncio.run(make())


def start_holder(rig: Rig, role: str, network: str) -> Holder:
    """A container on the instance network, recorded in Redis as one of the proxy's instances."""
    instance_id, nonce, now = new_token(), new_token(), time.time()

    async def reserve() -> None:
        store = Store(connect(REDIS_URL), rig.prefix)
        try:
            granted = await store.reserve(instance_id, now, 300, 10_000)
            if int(granted) != 1:
                raise RuntimeError(f"no capacity slot for the {role} holder: {granted!r}")
        finally:
            await store.close()

    asyncio.run(reserve())  # before the container exists: culling never takes it for an orphan
    labels = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: rig.prefix, LABEL_INSTANCE: instance_id}
    cmd = ["docker", "run", "-d", "--pull", "never", "--network", network, "--name", f"datalab-bench-{role}-"]
    cmd[-1] += secrets.token_hex(4)
    for k, v in labels.items():
        cmd += ["--label", f"{k}={v}"]
    cmd += ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--memory", "256m"]
    cmd += ["--entrypoint", "sleep", IMAGE, "infinity"]
    container = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    rig.containers.append(container)
    info = json.loads(subprocess.run(["docker", "inspect", container], check=True, capture_output=True).stdout)[0]
    pid = info["State"]["Pid"]
    ip = info["NetworkSettings"]["Networks"][network]["IPAddress"]
    instance = Instance(
        id=instance_id,
        backend="docker",
        handle=container,
        host=ip,
        port=JUPYTER_PORT,
        filename="bench",
        created=now,
        token=secrets.token_urlsafe(24),
        claimed=now,
    )

    async def bind() -> None:
        store = Store(connect(REDIS_URL), rig.prefix)
        try:
            if not await store.bind(instance, nonce, 600, time.time()):
                raise RuntimeError(f"the {role} holder's record was not bound")
        finally:
            await store.close()

    asyncio.run(bind())
    holder = Holder(instance_id, container, pid, ip, role=role)
    holder.cookie = nonce  # replaced by the session cookie once a proxy runs
    print(f"holder {role}: container {container[:12]} at {ip}:8888 (instance {instance_id[:8]}...)", flush=True)
    return holder


def nsenter(rig: Rig, holder: Holder, name: str, cmd: list[str]) -> subprocess.Popen:
    return rig.procs.spawn(name, ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--", *cmd])


def start_nginx(rig: Rig, holder: Holder) -> None:
    www = rig.tmp / "www"
    www.mkdir(mode=0o755)
    (www / "1m").write_bytes(secrets.token_bytes(MIB))
    with open(www / "1g", "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    for p in (www / "1m", www / "1g"):
        p.chmod(0o644)
    conf = rig.tmp / "nginx.conf"
    t = rig.tmp
    conf.write_text(
        f"""worker_processes 1;
pid {t}/nginx.pid;
error_log {t}/logs/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {t}/nginx-client;
    proxy_temp_path {t}/nginx-proxy;
    fastcgi_temp_path {t}/nginx-fastcgi;
    uwsgi_temp_path {t}/nginx-uwsgi;
    scgi_temp_path {t}/nginx-scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    server {{
        listen 0.0.0.0:8888 backlog=4096;
        root {www};
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
        location / {{ }}
    }}
}}
"""
    )
    nginx = shutil.which("nginx", path=PATH)
    nsenter(rig, holder, "nginx", [nginx, "-e", f"{t}/logs/nginx-error.log", "-c", str(conf), "-g", "daemon off;"])
    if not wait_answer(f"http://{holder.ip}:8888/small", (200,)):
        raise RuntimeError(f"nothing answered at {holder.ip}:8888/small; see {rig.logs}")


def start_echo(rig: Rig, holder: Holder) -> None:
    script = ROOT / "scripts" / "bench_backend.py"
    nsenter(rig, holder, "bench_backend", [sys.executable, str(script), "--port", "8888"])
    wait_port(8888, None, timeout=30, host=holder.ip)


def open_session(rig: Rig, holder: Holder) -> None:
    base = f"http://127.0.0.1:{rig.proxy_ports[DEFAULT]}"
    holder.cookie = session_cookie(base, holder.cookie)


def through(rig: Rig, name: str, holder: Holder) -> str | None:
    """None if the proxy `name` routes the holder's session to it (nginx's /small, or the echo
    backend's own 404), else what it answered."""
    path, want = ("/small", (200, SMALL_BODY.encode())) if holder is rig.nginx else ("/none", (404, b"not here\n"))
    status, body = http_get(f"http://127.0.0.1:{rig.proxy_ports[name]}{path}", {"Cookie": holder.cookie})
    return None if (status, body) == want else f"{status} {body[:120]!r}"
