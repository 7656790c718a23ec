"""The backend interface: how an instance is started, polled and stopped, whatever runs it.

A backend writes one class with `check`, `start`, `poll` and `stop`. What a started instance is
(its address and the backend's own handle) is an `Instance`, a small JSON record kept in Redis, so
a restarted proxy, or another proxy process, reaches the same instance.
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    id: str
    backend: str
    handle: str  # the backend's own id: a container id for Docker
    host: str
    port: int
    filename: str
    created: float
    token: str = ""  # the instance's Jupyter token; the proxy adds it to every request it forwards

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Instance:
        return cls(**json.loads(raw))


class BackendError(Exception):
    """A backend fault, carried to the client as JSON {code, message} with this status."""

    status = 502
    code = "START_FAILED"


class EngineUnavailable(BackendError):
    status = 503
    code = "ENGINE_UNAVAILABLE"


class ImageMissing(BackendError):
    status = 503
    code = "IMAGE_MISSING"


class StartTimeout(BackendError):
    status = 504
    code = "START_TIMEOUT"


class Backend(abc.ABC):
    """Runs Jupyter instances. Every method may block only in threads, never on the event loop."""

    name: str

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise BackendError when no start can succeed (engine down, image missing)."""

    @abc.abstractmethod
    async def start(self, instance_id: str, filename: str, data: bytes | bytearray) -> Instance:
        """Start an instance holding `data` as `filename` in its working directory.

        Returns only once Jupyter answers /api/status. On any failure nothing is left behind.
        """

    @abc.abstractmethod
    async def poll(self, instance: Instance) -> bool:
        """True while the instance runs; False once it has exited or is gone."""

    @abc.abstractmethod
    async def stop(self, instance: Instance) -> None:
        """Stop and remove the instance. Idempotent: an instance already gone counts as stopped."""


async def http_status(host: str, port: int, path: str, timeout: float, token: str = "") -> int | None:
    """The status code of one plain GET, or None when nothing answers. No HTTP library needed."""
    writer = None
    auth = f"Authorization: token {token}\r\n" if token else ""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n{auth}\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
        parts = status_line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def wait_ready(
    instance: Instance, timeout: float, alive: Callable[[], Awaitable[bool]], path: str = "/api/status"
) -> None:
    """Wait until Jupyter answers 200 at `path`; fail fast when the instance dies, StartTimeout after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if await http_status(instance.host, instance.port, path, timeout=2.0, token=instance.token) == 200:
            return
        if not await alive():
            raise BackendError("the instance exited while starting; see the engine's logs for it")
        if time.monotonic() + delay > deadline:
            raise StartTimeout(f"the instance did not answer {path} within {timeout:g} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
