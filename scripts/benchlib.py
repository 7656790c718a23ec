"""Shared by the benchmark scripts: a proxy started with ./run.sh on its own port and prefix, signed
uploads, and removal of what a run made (through the product's own code)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))

from backends import AUTH_HEADER  # noqa: E402
from config import Settings  # noqa: E402
from inputs import new_token  # noqa: E402
from runtime import build_instances  # noqa: E402
from runtime import remove_all_instances  # noqa: E402
from store import Store  # noqa: E402
from store import connect  # noqa: E402

# Re-exported for the benchmark scripts, which reach the addon's modules through this one.
__all__ = ["AUTH_HEADER", "Settings", "Store", "build_instances", "connect", "new_token"]

CSV = b"a,b\n1,2\n"
REDIS_URL = os.environ.get("DATALAB_REDIS_URL", Settings.redis_url)  # run.sh's by default
IMAGE = os.environ.get("DATALAB_IMAGE", "datalab-notebook:latest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signed_request(base: str, key: str, endpoint: str, param: str, subject: str, data=b"") -> urllib.request.Request:
    """A POST to /datalab/<endpoint> signed as the API asks: sha256(key + ts + subject), with a
    millisecond ts (a signature is used once, so two starts of one name in a second need it)."""
    ts = str(int(time.time() * 1000))
    url = f"{base}/datalab/{endpoint}?" + urllib.parse.urlencode({"ts": ts, param: subject})
    sig = hashlib.sha256((key + ts + subject).encode()).hexdigest()
    return urllib.request.Request(url, data=data, headers={"X-SIGN": sig}, method="POST")


def answer(req: urllib.request.Request, timeout: float = 180) -> tuple[int, dict, dict]:
    """Status, JSON body and headers, for refusals too."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e), dict(e.headers)


def try_upload(base: str, key: str, name: str, data=CSV) -> tuple[int, dict, dict]:
    return answer(signed_request(base, key, "start", "filename", name, data))


def upload(base: str, key: str, name: str, data=CSV) -> str:
    """Sign and upload; `data` may be bytes or an iterable of chunks (sent chunked). The nonce."""
    status, body, _ = try_upload(base, key, name, data)
    if status != 200:
        raise RuntimeError(f"start refused: {status} {body}")
    return body["result"]["nonce"]


def stop(base: str, key: str, nonce: str) -> None:
    status, body, _ = answer(signed_request(base, key, "stop", "nonce", nonce))
    if status != 200:
        raise RuntimeError(f"stop refused: {status} {body}")


async def remove_all(prefix: str) -> int:
    return await remove_all_instances(REDIS_URL, prefix)


@dataclass(frozen=True)
class BenchProxy:
    base: str
    port: int
    key: str
    prefix: str
    proc: subprocess.Popen


@contextlib.contextmanager
def bench_proxy(**options: object) -> Iterator[BenchProxy]:
    """A proxy from ./run.sh with its own port, key and prefix, and these datalab_* options;
    stopped and cleaned up afterwards."""
    key, prefix, port = secrets.token_hex(16), f"bench-{secrets.token_hex(3)}:", free_port()
    proc = start_proxy_group(port, key, prefix, options)
    try:
        yield BenchProxy(f"http://127.0.0.1:{port}", port, key, prefix, proc)
    finally:
        stop_group(proc)
        print(f"removed {asyncio.run(remove_all(prefix))} instances")


def session_cookie(base: str, nonce: str) -> str:
    """The session cookie (name=value) a view sets: with its redirect when the instance answers its
    /api/status, or with the waiting page (200) when it does not, as a bench stand-in backend that
    serves no Jupyter (see addon/waiting.py). Either way the session is open."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(f"{base}/datalab/view/{nonce}/tree", timeout=30) as r:
            status, cookie, body = r.status, r.headers.get("Set-Cookie"), b""
    except urllib.error.HTTPError as e:
        status, cookie, body = e.code, e.headers.get("Set-Cookie"), e.read()
    if status not in (200, 302) or not cookie:
        raise RuntimeError(f"view opened no session: {status} {body[:200]!r}")
    return cookie.split(";")[0]


# For bench_proxy.py: proxies in their own process group (with --workers, run.sh has children),
# their memory, and what run.sh offers.


def run_sh_offers(flag: str) -> bool:
    """Whether ./run.sh knows an option such as --lean or --workers (read from the script itself)."""
    return flag in (ROOT / "run.sh").read_text()


def start_proxy_group(
    port: int, key: str, prefix: str, options: dict[str, object], entry: tuple[str, ...] = (), log: Path | None = None
) -> subprocess.Popen:
    """./run.sh [entry ...] -q --set datalab_...: in a process group of its own (stop it with
    stop_group), its output to `log`. Raises RuntimeError when it does not come up. The images are
    used as they are (DATALAB_NO_BUILD=1, unless the caller's environment says otherwise): a bench
    measures the proxy, and the images may be shared with other checkouts."""
    env = {**os.environ, "DATALAB_PORT": str(port), "DATALAB_SIGN_KEY": key, "DATALAB_KEY_PREFIX": prefix}
    env.setdefault("DATALAB_NO_BUILD", "1")
    sets = [arg for name, value in options.items() for arg in ("--set", f"datalab_{name}={value}")]
    out = open(log, "ab") if log else subprocess.DEVNULL  # the child holds it; ours is closed below
    proc = subprocess.Popen(
        [str(ROOT / "run.sh"), *entry, "-q", *sets],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    if log:
        out.close()
    try:
        wait_port(port, proc, timeout=120)
        wait_answering(f"http://127.0.0.1:{port}", proc)
    except BaseException:
        stop_group(proc)
        raise
    return proc


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 60, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                name = Path(proc.args[0]).name
                raise RuntimeError(f"{name} exited ({proc.returncode}) before listening on {port}") from None
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout:g} s")


def wait_answering(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Listening is not ready: wait until 20 fresh connections in a row get the addon's own 404 (with
    several workers on one port, each connection may reach another process), then for its upload sink."""
    deadline, good = time.monotonic() + timeout, 0
    while good < 20:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy at {base} did not answer in time")
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy at {base} exited ({proc.returncode})")
        try:
            status, body, _ = answer(urllib.request.Request(f"{base}/datalab/"), timeout=5)
            ok = status == 404 and body.get("code") == "NOT_FOUND"
        except (OSError, ValueError):
            ok = False
        good = good + 1 if ok else 0
        if not ok:
            time.sleep(0.2)
    time.sleep(0.5)  # the upload sink starts listening just after the addon answers


def group_pids(pgid: int, skip: tuple[str, ...] = ("bash", "sh", "dash", "sleep", "timeout", "tee")) -> list[int]:
    """Processes in a process group, shells left out (run.sh's bash is no proxy)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and comm not in skip:
            pids.append(int(entry))
    return sorted(pids)


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the process group, SIGKILL to what is left after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            proc.poll()
            if not group_pids(proc.pid, skip=()):
                return
            time.sleep(0.1)
