"""The backend contract: how an instance is started, filled, polled and stopped, whatever runs it.

A backend writes one class, a `Backend` (check, capacity, start, put_file, unpack, poll, inventory,
stop, could_have_given), and lists it in backends/choice.py. Its own settings are a frozen
dataclass (`Options`) whose fields become `datalab_<field>` options (help, environment variable
and rule in options.py's `option()`); what every backend gets is `Limits`: whose instances they are, and the limits each
gets, honoured as far as the platform allows. A started instance holds no upload yet, so the same
instance can wait in the warm pool or serve a cold start; the upload goes in with `put_file` once a
user claims it. What a started instance is (its address and the backend's own handle) is an
`Instance`, a small JSON record kept in Redis, so a restarted proxy, or another proxy process,
reaches the same instance; what the engine itself holds is what `inventory()` lists
(`InventoryEntry`). Faults are `BackendError`s, each kind with its HTTP status and code.

Beside the contract: every instance is a Jupyter server, reached through backends/jupyter.py
(readiness, uploads, unpacking, activity, the work archive) over backends/instance_http.py (the
proxy's bounded HTTP client); what a container instance is (labels, limits, mounts, hardening) is
backends/container_spec.py, which the Docker and Swarm backends both hand to their engine.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import AsyncIterator
from collections.abc import Mapping
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Any
from typing import ClassVar

from backends.memory_budget import AUTO
from backends.memory_budget import size_bytes


@dataclass(frozen=True)
class Instance:
    id: str
    backend: str
    handle: str  # the backend's own id: a container id for Docker
    host: str
    port: int
    filename: str  # empty while the instance waits in the pool
    created: float  # when it booted
    token: str = ""  # the instance's secret; the proxy adds it (AUTH_HEADER) to every request it forwards
    claimed: float = 0.0  # when it was handed to a user (0 while pooled): its age counts from here
    work: str = ""  # the id of its user's work (store.WorkRecord), from the start that claimed it
    profile: str = "default"  # the operator's profile it was started with (instances.Order)
    owner: str = ""  # the frontend's id of the user whose start claimed it ('' = none given)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Instance:
        return cls(**json.loads(raw))

    def age(self, now: float) -> float:
        return now - (self.claimed or self.created)


@dataclass(frozen=True)
class InventoryEntry:
    """One line of `Backend.inventory()`: an instance the engine holds for this proxy family, as
    the engine sees it (reconciliation holds it against the records in Redis)."""

    instance_id: str
    handle: str
    running: bool


@dataclass(frozen=True)
class Limits:
    """Whose instances a backend runs (`label_prefix`: the proxy family's key prefix, which marks
    them), and the limits each instance gets, as far as the backend's platform can enforce them
    (its row in docs/operations.md "Backends" says which). A disk limit of auto is made a size by the backend
    (Backend.auto_disk_limit). A profile (profiles.py) is such limits with its own image and environment."""

    label_prefix: str
    mem_limit: str = "1g"
    cpus: float = 1.0
    pids_limit: int = 256
    disk_limit: str = AUTO
    start_timeout: float = 60.0
    image: str = ""  # what instances run; '' = the backend's own option (datalab_image)
    env: Mapping[str, str] = field(default_factory=dict)  # the operator's variables (none of RESERVED_ENV)


class BackendError(Exception):
    """A backend fault, carried to the client as JSON {code, message} with this status.

    The message is ours and goes to the client; `detail` (the engine's own words, which may name
    hosts, paths or versions) goes only to the proxy's log.
    """

    status = 502
    code = "START_FAILED"
    retry_after: int | None = None  # seconds, sent as Retry-After where a retry may succeed

    def __init_subclass__(cls, status: int | None = None, code: str | None = None, **kwargs: Any):
        """A kind of fault says its status and code in its class line (class X(BackendError, status=..., code=...))."""
        super().__init_subclass__(**kwargs)
        cls.status = status or cls.status
        cls.code = code or cls.code

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.args[0]} ({self.detail})" if self.detail else str(self.args[0])

    @property
    def public(self) -> str:
        return str(self.args[0])


class EngineUnavailable(BackendError, status=503, code="ENGINE_UNAVAILABLE"):
    """The engine cannot be reached now; a retry may find it."""


class ImageMissing(BackendError, status=503, code="IMAGE_MISSING"):
    """The instance image is not where the engine looks, and is never pulled: the operator builds it."""


class UntrustedRecord(BackendError, status=502, code="BAD_ROUTE"):
    """A record in Redis names an address this backend gives no instance: it is not followed."""


class StartTimeout(BackendError, status=504, code="START_TIMEOUT"):
    """The instance did not answer within datalab_start_timeout."""


class ArchiveRefused(BackendError, status=400, code="BAD_ARCHIVE"):
    """An upload to unpack that the instance refused (its extension checks archives: hostile input)."""


class ArchiveTooLarge(ArchiveRefused, status=413, code="ARCHIVE_TOO_LARGE"):
    """An archive that unpacks to more entries or bytes than the working directory may hold."""


@dataclass(frozen=True)
class UnpackLimits:
    """What one archive may hold once unpacked: entries, and bytes (the working directory's size)."""

    max_entries: int
    max_bytes: int


class Backend(abc.ABC):
    """Runs Jupyter instances. Every method may block only in threads, never on the event loop."""

    name: ClassVar[str]
    Options: ClassVar[type]  # a frozen dataclass of option() fields, validated in its __post_init__

    @classmethod
    @abc.abstractmethod
    def probe(cls, options: Any) -> tuple[bool, str]:
        """Whether this backend can run here, and the reason in words (datalab_backend=auto says it).
        Called once when options are applied, before serving: quick, and bounded in time."""

    def __init__(self, limits: Limits, options: Any, profiles: Mapping[str, Limits] | None = None):
        """`limits`: what a start given none gets (the default profile); `profiles`: every profile's,
        by name, each refused here (ValueError naming it) when this backend cannot honour it."""
        self.limits = self.resolved(limits)
        self.opts = options
        self.profiles = {name: self.resolved(each) for name, each in (profiles or {}).items()}
        for name, each in self.profiles.items():
            if (why := self.refusal(each)) is not None:
                raise ValueError(f"datalab_profiles: profile {name!r} cannot run on the {self.name} backend: {why}")

    def resolved(self, limits: Limits) -> Limits:
        """The limits with a disk limit of auto made a size (auto_disk_limit)."""
        if limits.disk_limit == AUTO:
            return replace(limits, disk_limit=self.auto_disk_limit(limits.mem_limit))
        return limits

    def refusal(self, limits: Limits) -> str | None:
        """Why this backend cannot honour these limits (a profile's), or None: the proxy then refuses
        to start. Here: none is refused."""
        return None

    @classmethod
    def auto_disk_limit(cls, mem_limit: str) -> str:
        """What datalab_disk_limit=auto is on this backend: here a largest file of 1g; a backend whose
        writable places are memory gives what fits in the memory limit."""
        return "1g"

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise BackendError when no start can succeed (engine down, image missing)."""

    @abc.abstractmethod
    async def capacity(self) -> int:
        """How many instances the engine can hold at the configured limits (the default of max_instances)."""

    async def memory(self) -> int:
        """Bytes of memory the engine has for instances: what the capacity of several profiles is
        counted in (each instance weighs its memory limit). Here: capacity() at the default limits."""
        return await self.capacity() * size_bytes(self.limits.mem_limit)

    @abc.abstractmethod
    async def start(self, instance_id: str, token: str, limits: Limits | None = None) -> Instance:
        """Start an instance with an empty working directory, its Jupyter requiring `token`, with
        `limits` (a profile's; None: the backend's own `limits`) as far as the platform enforces them.

        Returns only once Jupyter answers /api/status. On any failure (or cancellation) nothing is
        left behind.
        """

    @abc.abstractmethod
    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        """Place `data` as `filename` in the running instance's working directory."""

    @abc.abstractmethod
    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        """Unpack an archive (`kind`: zip, tar or tar.gz) into the working directory; ArchiveRefused
        when it holds what no working directory may (the image's extension checks it, inside the
        instance: hostile input is handled where it can harm nothing but a fresh instance)."""

    @abc.abstractmethod
    async def poll(self, instance: Instance) -> bool:
        """True while the instance runs; False once it has exited or is gone."""

    @abc.abstractmethod
    async def inventory(self) -> list[InventoryEntry]:
        """Every instance the engine holds under this proxy family's prefix, running or not."""

    async def exits(self) -> AsyncIterator[str]:
        """Yield the id of each instance whose process exits, as it happens; raise when the feed is lost.

        Optional: without it, an instance that dies behind the proxy's back is found by the next
        failed request or the next reconciliation round."""
        await asyncio.Event().wait()
        yield ""  # pragma: no cover

    @abc.abstractmethod
    async def stop(self, handle: str) -> None:
        """Stop and remove the instance. Idempotent: an instance already gone counts as stopped."""

    @abc.abstractmethod
    async def could_have_given(self, host: str, port: int) -> bool:
        """Whether host:port is an address this backend gives instances. Records in Redis are not
        trusted blindly: the proxy routes only to such addresses (whoever can write to Redis
        must not be able to point it anywhere)."""


# The header that carries an instance's secret from the proxy to its Jupyter. The image's identity
# provider (image/jupyter_server_config.py) trusts it without making the request "token-
# authenticated", so Jupyter's XSRF, Origin, Referer and CORS checks still apply to what browsers
# send; and unlike Jupyter's token, it appears in no page the instance serves.
AUTH_HEADER = "X-Datalab-Auth"
AUTH_ENV = "DATALAB_AUTH"  # the variable a backend passes the secret to the image in
# What the proxy, its backends and the image set in an instance's environment (its secret, its
# paths): a profile's env may not override them (profiles.py refuses such a profile at start-up).
RESERVED_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "IPYTHONDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"}
)
RESERVED_ENV_PREFIXES = ("DATALAB_", "JUPYTER_")  # AUTH_ENV among them
