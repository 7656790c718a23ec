"""Real processes for the tests: a redis-server per test session, free ports, waiting for sockets."""

from __future__ import annotations

import io
import random
import shutil
import signal
import socket
import subprocess
import time
import warnings
import zipfile
from pathlib import Path


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
