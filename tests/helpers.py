"""What the tests share (nothing is imported from a test_*.py file): real processes (a redis-server
per test session, a Sentinel group), free ports, waits, the host's address on an interface; and for
the addon's unit tests, a runtime on the fake backend and flows as mitmproxy builds them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
import warnings
import zipfile
from collections.abc import AsyncIterator
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis as redis_sync
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

import signing
from api import Api
from backends import Backend
from backends import Instance
from backends import Limits
from backends.local_process import ProcessBackend
from backends.local_process import ProcessOptions
from config import Settings
from fake_backend import FakeBackend
from instances import Instances
from loopback import LoopbackServer
from marks import SINK
from runtime import Runtime
from upload import RECEIVED


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port from that range, once released,
    can be taken by any outgoing connection (a Redis client's, a load generator's) before the
    server meant for it binds."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class RedisServer:
    """A throwaway redis-server on loopback; `persist` keeps data across stop/start (AOF in `workdir`);
    `unix_socket` also listens on that socket (as run.sh's Redis does; keep its path short)."""

    def __init__(self, workdir: Path, persist: bool = False, unix_socket: Path | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs it)")
        self.binary = binary
        self.workdir = workdir
        self.persist = persist
        self.unix_socket = unix_socket
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        assert self.unix_socket is not None, "started without a socket"
        return f"unix://{self.unix_socket}"

    def start(self) -> RedisServer:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir), "--save", ""]
        args += ["--appendonly", "yes" if self.persist else "no"]
        args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"] if self.unix_socket else []
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.thaw()  # a frozen one would not act on it
            self.proc.wait(timeout=10)
            self.proc = None

    def freeze(self) -> None:
        """As a paused VM or a partition looks: connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


# Archives for the archive API's tests (tests/test_archive.py, tests/e2e/test_instance_archive.py).


def zip_of(*entries: tuple[str | zipfile.ZipInfo, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of these entries, as given (duplicate names too)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a duplicate name, made on purpose)
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()


def zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    """A zip entry whose Unix mode (type and permissions) is `mode`."""
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


def wait_until(check, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


SENTINEL_SERVICE = "datalab"


class SentinelGroup:
    """A primary, its replica and three sentinels that fail over within seconds (short down-after
    and failover timeouts), each a real process on a loopback port of its own."""

    def __init__(self, workdir: Path):
        for tool in ("redis-server", "redis-sentinel"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (scripts/test.sh installs it: apt-get install {tool})")
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen] = {}
        self.primary = self._server("primary")
        self.replica = self._server("replica", "--replicaof", "127.0.0.1", str(self.primary))
        self.sentinels = [self._sentinel(i) for i in range(3)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{SENTINEL_SERVICE}"

    def _start(self, port: int, args: list[str]) -> int:
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, proc=self.procs[port])
        return port

    def _server(self, name: str, *more: str) -> int:
        port = free_port()
        (self.workdir / name).mkdir()
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.workdir / name)]
        return self._start(port, [*args, "--save", "", "--appendonly", "yes", *more])

    def _sentinel(self, index: int) -> int:
        port = free_port()
        conf = self.workdir / f"sentinel-{index}.conf"  # sentinels rewrite their file: one each
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {self.workdir}\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.primary} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
        )
        return self._start(port, ["redis-sentinel", str(conf)])

    def client(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def primary_named(self) -> int:
        """The primary's port as the sentinels agree on it (each asked)."""
        ports = {int(self.client(s).sentinel_get_master_addr_by_name(SENTINEL_SERVICE)[1]) for s in self.sentinels}
        return ports.pop() if len(ports) == 1 else -1

    def watching(self) -> bool:
        """Every sentinel knows the replica and the two other sentinels: a failover can be agreed."""
        for port in self.sentinels:
            state = self.client(port).sentinel_master(SENTINEL_SERVICE)
            if state["num-other-sentinels"] != 2 or state["num-slaves"] != 1:
                return False
        return True

    def crash_primary(self) -> None:
        proc = self.procs.pop(self.primary)
        proc.kill()  # SIGKILL: no shutdown, no last write
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=10)


def host_address(interface: str) -> str:
    """The host's own IPv4 address on one of its interfaces, as its kernel has it (an engine's inspect
    data may leave a network's gateway out: Docker 20.10's default bridge on a fresh engine)."""
    shown = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", interface], capture_output=True, check=True)
    (address,) = [a["local"] for a in json.loads(shown.stdout)[0]["addr_info"]]
    return address


def backend_of[B: Backend](cls: type[B], **changes) -> B:
    """A backend of a label prefix of its own (its instances are its alone); `changes` may be Limits's
    fields or the backend's Options'."""
    own = {k: changes.pop(k) for k in list(changes) if k in cls.Options.__dataclass_fields__}
    limits = Limits(**{"label_prefix": f"unit-{secrets.token_hex(4)}:", **changes})
    return cls(limits, cls.Options(**own))


def process_backend(places: Path, **changes) -> ProcessBackend:
    """A process backend of a prefix of its own keeping its instances in `places`; fails the test when
    the Jupyter environment is missing (scripts/test.sh makes it)."""
    env = ProcessOptions().jupyter_env
    if not (Path(env) / "bin" / "jupyter-notebook").exists() and "jupyter_env" not in changes:
        pytest.fail(f"no Jupyter environment at {env}; scripts/test.sh makes it (ensure_jupyter_env)")
    return backend_of(ProcessBackend, **{"process_dir": str(places), **changes})


# The addon's unit tests: a runtime, instances as a start leaves them, flows through the api.

KEY = "unit-key"


def runtime_for(redis_url="redis://127.0.0.1:1/0", backend: FakeBackend | None = None, **changes) -> Runtime:
    """The addon's runtime on the fake backend (whatever engine this machine has or lacks), which
    vouches for any loopback address: these unit tests record instances (or a stand-in Jupyter) on
    127.0.0.1, where the Docker backend never puts one (the real rule is tested in
    test_backend_contract.py and test_confinement.py). A `backend` given is used as it is."""
    rt = Runtime()
    rt.apply(Settings(sign_key=KEY, redis_url=redis_url, key_prefix="unit:", **changes))
    if backend is None:
        backend = FakeBackend(rt.settings.limits)

        async def loopback(host: str, port: int) -> bool:
            return host == "127.0.0.1"

        backend.could_have_given = loopback
    rt.instances = Instances(rt.instances.store, backend, rt.settings)
    return rt


async def recorded(store, instance: Instance, nonce: str) -> None:
    """An instance as a start leaves it: its slot taken, then bound to its first nonce."""
    await store.reserve(instance.id, time.time(), 60, max_instances=100)
    assert await store.bind(instance, nonce, 60, time.time())


def request_flow(method: str, path: str, headers: dict | None = None, content: bytes = b""):
    req = tutils.treq(method=method.encode(), path=path.encode(), content=content)
    req.headers.clear()
    req.headers["Host"] = "proxy.example:8080"
    for k, v in (headers or {}).items():
        req.headers[k] = v
    return tflow.tflow(req=req, resp=False)


def start_flow(filename="data.csv", ts=None, sign=None, headers=None, content=b"a,b\n", signed=None, **extras):
    """A start; `extras` (owner=, profile=, unpack=) go in its query and, unless `signed` says
    which extras to sign instead, in its signature."""
    ts = str(int(time.time())) if ts is None else ts
    subject = signing.start_subject(filename, extras if signed is None else signed)
    sig = signing.signature(KEY, ts, subject) if sign is None else sign
    return request_flow(
        "POST",
        "/datalab/start?" + urlencode({"ts": ts, "filename": filename, **extras}),
        {"X-SIGN": sig, "Content-Length": str(len(content)), **(headers or {})},
        content,
    )


async def run_headers(flow, sink, rt=None):
    api = Api(rt or runtime_for(), sink)
    with taddons.context(api):
        await api.requestheaders(flow)
    return flow


async def through_api(flow, sink, rt=None, received=None):
    """requestheaders, then what mitmproxy does with a streamed body: chunks, the sink's answer
    (saying it read `received` bytes: the whole body unless told), `response`."""
    api = Api(rt or runtime_for(), sink)
    with taddons.context(api):
        await api.requestheaders(flow)
        if flow.metadata.get(SINK):
            assert (flow.request.host, flow.request.port) == ("127.0.0.1", sink.port)
            for i in range(0, len(flow.request.content), 3):
                flow.request.stream(flow.request.content[i : i + 3])
            flow.request.stream(b"")
            flow.response = tutils.tresp(status_code=500)
            whole = len(flow.request.content)
            flow.response.headers[RECEIVED] = str(whole if received is None else received)
            sink.response(flow)  # in the addons' order: the sink gives a deferred refusal, the api a start
            await api.response(flow)
    return flow


async def answering_jupyter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stand-in Jupyter that answers its status (a view of a silent one answers the waiting page)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def answering(answer: Callable[[str], bytes]) -> AsyncIterator[int]:
    """A loopback server that reads one request head per connection and writes `answer(path)` as
    it is (any bytes, however wrong: a stand-in for a Jupyter that its user rewrote); yields the port."""

    class Answering(LoopbackServer):
        async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(head.split(b" ", 2)[1].decode()))
            await writer.drain()
            writer.close()

    server = Answering()
    await server.running()
    try:
        yield server.port
    finally:
        await server.done()
