"""What the end-to-end tests share (nothing is imported from a test_*.py file): reading a run's
Redis, refusals as the proxy answers them, an opened instance, run.sh --workers, signals to an
instance's Jupyter."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import requests
import websockets.exceptions
import websockets.sync.client

from backends import Instance
from e2e.proxy import ROOT
from e2e.proxy import Browser
from e2e.proxy import Proxy
from helpers import wait_for_port

CSV = b"x,y\n1,2\n"


def error_of(r: requests.Response) -> str:
    assert r.headers["Content-Type"] == "application/json", r.text
    assert r.json()["message"]
    return r.json()["code"]


def records(world, prefix: str) -> set[str]:
    return {m.decode() for m in world.redis.smembers(prefix + "instances")}


def instance_of(world, prefix: str, nonce: str) -> Instance:
    instance_id = world.redis.get(f"{prefix}nonce:{nonce}").decode()
    return Instance.from_json(world.redis.get(f"{prefix}instance:{instance_id}"))


def record(world, nonce: str, prefix: str | None = None) -> Instance:
    """The instance a nonce names, under the run's main prefix unless told."""
    return instance_of(world, prefix or world.prefix, nonce)


def opened(proxy, filename: str) -> tuple[str, Browser]:
    """A started instance and a browser that opened it: its nonce and the browser."""
    nonce = proxy.start_instance(filename, CSV)
    browser = Browser(proxy)
    browser.view(nonce)
    return nonce, browser


def quietly(fn):
    def run(*args):
        with contextlib.suppress(requests.RequestException):
            fn(*args)

    return run


def signal_jupyter(container, signal: str) -> None:
    """Signal the Jupyter server: the one child of the container's init (tini)."""
    code, output = container.exec_run(["sh", "-c", f"kill -{signal} $(cat /proc/1/task/1/children)"])
    assert code == 0, output


class Workers:
    """./run.sh --lean --workers 2, as an operator starts it."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy  # for its settings, URLs and signing; never started itself
        env = {
            **os.environ,
            "DATALAB_PORT": str(proxy.port),
            "DATALAB_SIGN_KEY": proxy.sign_key,
            "DATALAB_REDIS_URL": proxy.redis_url,
            "DATALAB_KEY_PREFIX": proxy.prefix,
        }
        sets = [a for name, value in proxy.options.items() for a in ("--set", f"{name}={value}")]
        self.log = proxy.workdir / "run.log"
        self.proc = subprocess.Popen(
            [str(ROOT / "run.sh"), "--lean", "--workers", "2", *sets],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(proxy.port, timeout=120, proc=self.proc)
        self.proxy.proc = self.proc  # (so the proxy's own readiness check sees a run.sh that died)
        self.proxy._wait_answering()
        self.wait_for_listeners(2)

    def listeners(self) -> set[int]:
        """Pids of the processes listening on the port."""
        out = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{self.proxy.port}"], capture_output=True, text=True, check=True
        ).stdout
        return {int(part.split(",")[0]) for part in out.split("pid=")[1:]}

    def wait_for_listeners(self, n: int, timeout: float = 60.0) -> set[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(pids := self.listeners()) == n:
                return pids
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.2)
        raise AssertionError(f"not {n} processes listening: {self.listeners()}\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def ws_refusal(url: str, cookie: str, origin: str | None) -> tuple[int, bytes]:
    """Open a WebSocket as a page of `origin` would; the status and body of the refusal."""
    try:
        with websockets.sync.client.connect(url, additional_headers={"Cookie": cookie}, origin=origin, open_timeout=30):
            pass
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code, e.response.body
    raise AssertionError(f"the WebSocket from {origin} was accepted")
