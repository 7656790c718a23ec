"""A backend that runs its instances in memory, for unit tests of what sits above the backends
(instances.py, pool.py, culler.py, admission): no engine, no image, no Jupyter.

An instance is a record and a stand-in Jupyter on a loopback port (`FakeJupyter`): the proxy's own
requests to an instance (its readiness, its kernels and terminals, its work's archive) reach it as
they would a real one, and a test sets what it answers. What the fake engine holds is `running`;
`starts`, `stops` and `booting` say what was asked of it. Variants, as JupyterHub's mocking.py has
spawners that are slow, never start or fail: `SlowBackend` (a boot takes seconds, or waits for an
event the test sets) and `FailingBackend` (start, put_file, unpack or stop raise); `vanish` and
`exit` take an instance away behind the proxy's back. `OnePortBackend` answers all its instances
from one loopback server, so thousands of them cost one socket (scripts/bench_scale.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import tarfile
import time
from dataclasses import dataclass
from dataclasses import field
from typing import ClassVar

import redis

from backends import AUTH_HEADER
from backends import Backend
from backends import BackendError
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends import UnpackLimits
from config import Settings
from instances import Instances
from loopback import LoopbackServer
from store import Store
from store import connect

LOOPBACK = "127.0.0.1"
PREFIX = "unit:"
# What the unit tests' proxies run with unless told: no pool, a boot slot per start, short waits.
UNIT_SETTINGS = {
    "sign_key": "unit-key",
    "key_prefix": PREFIX,
    "pool_size": 0,
    "boots_at_once": 8,
    "max_instances": 8,
    "start_timeout": 10,
    "queue_timeout": 5,
    "work_timeout": 5,
}


class FakeJupyter(LoopbackServer):
    """What the proxy asks of an instance's Jupyter, answered from memory: /api/status (200 with the
    instance's secret, 403 without), /api/kernels and /api/terminals (the lists in `kernels` and
    `terminals`), and /api/datalab/work (a tar.gz of `files`, or `archive_status` when set). With
    `answering` off it takes connections and says nothing, as a frozen instance."""

    def __init__(self, token: str, files: dict[str, bytes]):
        self.token = token
        self.files = files
        self.kernels: list[dict] = []
        self.terminals: list[dict] = []
        self.archive_status = 200
        self.answering = True
        self.asked: list[str] = []
        super().__init__()

    def archive(self) -> bytes:
        """The working directory as the image's extension hands it over: one tar.gz."""
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, data in sorted(self.files.items()):
                entry = tarfile.TarInfo(name)
                entry.size = len(data)
                tar.addfile(entry, io.BytesIO(data))
        return out.getvalue()

    def _answer(self, path: str, token: str) -> tuple[int, bytes]:
        route = path.partition("?")[0]
        if token != self.token:
            return 403, b'{"message": "Forbidden"}'
        if route == "/api/status":
            return 200, b"{}"
        if route in ("/api/kernels", "/api/terminals"):
            return 200, json.dumps(self.kernels if route.endswith("kernels") else self.terminals).encode()
        if route == "/api/datalab/work":
            return (200, self.archive()) if self.archive_status == 200 else (self.archive_status, b"{}")
        return 404, b"{}"

    def answerer(self, token: str) -> FakeJupyter:
        """The stand-in that answers a request carrying this secret: this one (see SharedJupyter)."""
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split(" ", 2)[1]
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n"))}
            token = fields.get(AUTH_HEADER.lower(), "")
            jupyter = self.answerer(token)
            jupyter.asked.append(path)
            if not jupyter.answering:
                await reader.read()  # until the proxy gives up
                return
            status, body = jupyter._answer(path, token)
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            writer.write(body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, IndexError):
            pass
        finally:
            writer.close()


@dataclass
class Running:
    """One instance as the fake engine holds it."""

    instance: Instance
    jupyter: FakeJupyter
    files: dict[str, bytes] = field(default_factory=dict)
    unpacked: list[tuple[str, bytes]] = field(default_factory=list)
    running: bool = True


@dataclass(frozen=True)
class FakeOptions:
    """The fake backend has no options of its own."""


class FakeBackend(Backend):
    """Instances in memory, each with a stand-in Jupyter on loopback; `slots` is its capacity."""

    name: ClassVar[str] = "fake"
    Options: ClassVar[type] = FakeOptions

    def __init__(self, limits: Limits | None = None, slots: int = 8, profiles: dict[str, Limits] | None = None):
        super().__init__(limits or Limits(label_prefix="unit:"), FakeOptions(), profiles)
        self.slots = slots
        self.running: dict[str, Running] = {}  # by handle
        self.starts: list[str] = []  # instance ids, in the order starts were asked
        self.limits_given: dict[str, Limits] = {}  # instance id -> the limits its start was given
        self.stops: list[str] = []  # handles, in the order stops were asked
        self.booting = 0  # starts in flight
        self.check_error: BackendError | None = None
        self._given: set[int] = set()  # every port this backend gave an instance

    @classmethod
    def probe(cls, options: FakeOptions) -> tuple[bool, str]:
        return True, "instances in memory"

    async def check(self) -> None:
        if self.check_error is not None:
            raise self.check_error

    async def capacity(self) -> int:
        return self.slots

    async def start(self, instance_id: str, token: str, limits: Limits | None = None) -> Instance:
        """Record the instance, boot it (`_boot`: the variants' waits and failures), and on any
        failure or cancellation leave nothing, as the contract asks."""
        self.starts.append(instance_id)
        self.limits_given[instance_id] = self.resolved(limits) if limits else self.limits
        handle = "fake-" + secrets.token_hex(6)
        files: dict[str, bytes] = {}
        jupyter = FakeJupyter(token, files)
        port = await self._listen(jupyter)
        instance = Instance(instance_id, self.name, handle, LOOPBACK, port, "", time.time(), token)
        self._given.add(port)
        self.running[handle] = Running(instance, jupyter, files)
        self.booting += 1
        try:
            await self._boot(instance)
        except BaseException:
            await asyncio.shield(self._remove(handle))
            raise
        finally:
            self.booting -= 1
        return instance

    async def _boot(self, instance: Instance) -> None:
        """What a boot does between the container's creation and Jupyter's first answer: nothing here."""

    async def _listen(self, jupyter: FakeJupyter) -> int:
        """Have the instance's stand-in Jupyter answer; the port it answers on."""
        await jupyter.running()
        return jupyter.port

    async def _silence(self, jupyter: FakeJupyter) -> None:
        await jupyter.done(wait=False)  # a frozen one's connections stay open

    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        self._held(instance).files[filename] = bytes(data)

    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        self._held(instance).unpacked.append((kind, bytes(data)))

    async def poll(self, instance: Instance) -> bool:
        held = self.running.get(instance.handle)
        return held is not None and held.running

    async def inventory(self) -> list[InventoryEntry]:
        return [InventoryEntry(r.instance.id, handle, r.running) for handle, r in self.running.items()]

    async def stop(self, handle: str) -> None:
        self.stops.append(handle)
        await self._remove(handle)

    async def could_have_given(self, host: str, port: int) -> bool:
        return host == LOOPBACK and port in self._given

    # What a test does behind the proxy's back

    async def vanish(self, instance: Instance) -> None:
        """The instance is removed from the engine (by an operator, a crash of its node): gone from the
        inventory, its Jupyter silent."""
        await self._remove(instance.handle)

    async def exit(self, instance: Instance) -> None:
        """The instance's process exits: the engine still lists it, as not running."""
        held = self.running[instance.handle]
        held.running = False
        await self._silence(held.jupyter)

    def jupyter(self, instance: Instance) -> FakeJupyter:
        return self.running[instance.handle].jupyter

    def files(self, instance: Instance) -> dict[str, bytes]:
        return self.running[instance.handle].files

    def ids(self) -> set[str]:
        """The ids of the instances the engine runs."""
        return {r.instance.id for r in self.running.values() if r.running}

    async def close(self) -> None:
        """Stop every stand-in Jupyter (test teardown)."""
        for handle in list(self.running):
            await self._remove(handle)

    def _held(self, instance: Instance) -> Running:
        held = self.running.get(instance.handle)
        if held is None or not held.running:
            raise BackendError("the instance is not running", instance.handle)
        return held

    async def _remove(self, handle: str) -> None:
        held = self.running.pop(handle, None)
        if held is not None:
            await self._silence(held.jupyter)


class SharedJupyter(FakeJupyter):
    """One loopback server that answers for many instances' stand-ins (`members`, by secret), told
    apart by the secret the proxy sends each instance; an unknown secret gets a 403."""

    backlog = 4096  # as many connections at once as the proxy opens to thousands of instances

    def __init__(self) -> None:
        super().__init__(secrets.token_hex(16), {})  # its own secret: nobody's
        self.members: dict[str, FakeJupyter] = {}

    def answerer(self, token: str) -> FakeJupyter:
        return self.members.get(token, self)


class OnePortBackend(FakeBackend):
    """Every instance is answered on one loopback port (a SharedJupyter), so thousands of them cost
    one socket, not one each. An instance that exits or vanishes answers 403 from then on, not
    silence (the port still listens for the others)."""

    def __init__(self, limits: Limits | None = None, slots: int = 8, profiles: dict[str, Limits] | None = None):
        super().__init__(limits, slots, profiles)
        self.shared = SharedJupyter()
        self._opening = asyncio.Lock()

    async def _listen(self, jupyter: FakeJupyter) -> int:
        async with self._opening:
            if self.shared.port is None:
                await self.shared.running()
        self.shared.members[jupyter.token] = jupyter
        return self.shared.port

    async def _silence(self, jupyter: FakeJupyter) -> None:
        self.shared.members.pop(jupyter.token, None)

    async def close(self) -> None:
        await super().close()
        await self.shared.done(wait=False)


class SlowBackend(FakeBackend):
    """A boot takes `seconds`, then waits for `gate` (when given) until the test sets it."""

    def __init__(self, limits: Limits | None = None, seconds: float = 0.0, gate: asyncio.Event | None = None, **kw):
        super().__init__(limits, **kw)
        self.seconds = seconds
        self.gate = gate

    async def _boot(self, instance: Instance) -> None:
        await asyncio.sleep(self.seconds)
        if self.gate is not None:
            await self.gate.wait()


class FailingBackend(FakeBackend):
    """Each set error is raised by its step: a start (after its container was made, which it removes),
    an upload, an archive's unpacking, a stop (which then leaves the instance running)."""

    def __init__(
        self,
        limits: Limits | None = None,
        start: BackendError | None = None,
        put: BackendError | None = None,
        unpack: BackendError | None = None,
        stop: BackendError | None = None,
        **kw,
    ):
        super().__init__(limits, **kw)
        self.start_error, self.put_error, self.unpack_error, self.stop_error = start, put, unpack, stop

    async def _boot(self, instance: Instance) -> None:
        if self.start_error is not None:
            raise self.start_error

    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        if self.put_error is not None:
            raise self.put_error
        await super().put_file(instance, filename, data)

    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        if self.unpack_error is not None:
            raise self.unpack_error
        await super().unpack(instance, kind, data, limits)

    async def stop(self, handle: str) -> None:
        if self.stop_error is not None:
            self.stops.append(handle)
            raise self.stop_error
        await super().stop(handle)


def instances_on(redis_url: str, backend: FakeBackend, work_dir: str, **changes) -> Instances:
    """The proxy's instance service (instances.py) on a real Redis and this backend, with the unit
    tests' settings and `changes` (Settings' fields)."""
    settings = Settings(**{**UNIT_SETTINGS, "redis_url": redis_url, "work_dir": work_dir, **changes})
    return Instances(Store(connect(redis_url), settings.key_prefix), backend, settings)


def keys_of(redis_url: str) -> set[str]:
    """What Redis holds under the unit tests' prefix, without it (instance:<id>, slots, ...)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {k.decode().removeprefix(PREFIX) for k in client.keys(PREFIX + "*")}
    finally:
        client.close()
