"""The backend interface: how an instance is started, filled, polled and stopped, whatever runs it.

A backend writes one class with `check`, `capacity`, `start`, `put_file`, `poll`, `inventory` and
`stop`, and registers it in backends/choice.py. Its own settings are a frozen dataclass (`Options`)
whose fields become `datalab_<field>` options (help and environment variable in `option()`); what
every backend gets is `Common` (the limits, honoured as far as the platform allows). A started
instance holds no upload yet, so the same instance can wait in the warm pool or serve a cold start;
the upload goes in with `put_file` once a user claims it. What a started instance is (its address
and the backend's own handle) is an `Instance`, a small JSON record kept in Redis, so a restarted
proxy, or another proxy process, reaches the same instance.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import ClassVar
from urllib.parse import quote

from backends.memory_budget import AUTO

MAX_ANSWER = 1 << 20  # bytes of an instance's answer to the proxy's own requests (status, kernels, contents)
CONTENTS_CHUNK = 4 << 20  # bytes per contents-API request (Jupyter holds each whole, base64 and all)
# Jupyter's lists of kernels and terminals, read without counting as API activity for Jupyter itself.
JUPYTER_KERNELS = "/api/kernels?no_track_activity=1"
JUPYTER_TERMINALS = "/api/terminals?no_track_activity=1"
MAX_STAMP = 64  # characters of a time in those lists


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

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Instance:
        return cls(**json.loads(raw))

    def age(self, now: float) -> float:
        return now - (self.claimed or self.created)


@dataclass(frozen=True)
class Found:
    """An instance the engine runs for this proxy family, as the engine sees it (reconciliation)."""

    instance_id: str
    handle: str
    running: bool


def option(default: Any, help: str, env: str | None = None) -> Any:
    """A backend option's dataclass field: `datalab_<name>`, its help, the variable for its default."""
    return field(default=default, metadata={"help": help, "env": env})


def option_error(name: str, message: str) -> ValueError:
    """How an Options dataclass refuses a value (in __post_init__): the option's name, then why."""
    return ValueError(f"datalab_{name} {message}")


@dataclass(frozen=True)
class Common:
    """What every backend is given: whose instances they are, and the limits each instance gets
    (as far as the backend's platform can enforce them; its README row says which). A disk limit
    of auto is made a size by the backend (Backend.auto_disk_limit)."""

    label_prefix: str
    mem_limit: str = "1g"
    cpus: float = 1.0
    pids_limit: int = 256
    disk_limit: str = AUTO
    start_timeout: float = 60.0


class BackendError(Exception):
    """A backend fault, carried to the client as JSON {code, message} with this status.

    The message is ours and goes to the client; `detail` (the engine's own words, which may name
    hosts, paths or versions) goes only to the proxy's log.
    """

    status = 502
    code = "START_FAILED"
    retry_after: int | None = None  # seconds, sent as Retry-After where a retry may succeed

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.args[0]} ({self.detail})" if self.detail else str(self.args[0])

    @property
    def public(self) -> str:
        return str(self.args[0])


class EngineUnavailable(BackendError):
    status = 503
    code = "ENGINE_UNAVAILABLE"


class ImageMissing(BackendError):
    status = 503
    code = "IMAGE_MISSING"


class UntrustedRecord(BackendError):
    status = 502
    code = "BAD_ROUTE"


class StartTimeout(BackendError):
    status = 504
    code = "START_TIMEOUT"


class ArchiveRefused(BackendError):
    """An upload to unpack that the instance refused (its extension checks archives: hostile input)."""

    status = 400
    code = "BAD_ARCHIVE"


class ArchiveTooLarge(ArchiveRefused):
    status = 413
    code = "ARCHIVE_TOO_LARGE"


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

    def __init__(self, common: Common, options: Any):
        if common.disk_limit == AUTO:
            common = replace(common, disk_limit=self.auto_disk_limit(common.mem_limit))
        self.common = common
        self.opts = options

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

    @abc.abstractmethod
    async def start(self, instance_id: str, token: str) -> Instance:
        """Start an instance with an empty working directory, its Jupyter requiring `token`.

        Returns only once Jupyter answers /api/status. On any failure (or cancellation) nothing is
        left behind.
        """

    @abc.abstractmethod
    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        """Place `data` as `filename` in the running instance's working directory."""

    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        """Unpack an archive (`kind`: zip, tar or tar.gz) into the working directory; ArchiveRefused
        when it holds what no working directory may (the image's extension checks it, inside the
        instance: hostile input is handled where it can harm nothing but a fresh instance)."""
        await unpack_via_jupyter(instance, kind, data, limits, timeout=max(30.0, self.common.start_timeout))

    @abc.abstractmethod
    async def poll(self, instance: Instance) -> bool:
        """True while the instance runs; False once it has exited or is gone."""

    @abc.abstractmethod
    async def inventory(self) -> list[Found]:
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


async def http_request(
    host: str, port: int, method: str, path: str, timeout: float, token: str = "", headers=(), body: bytes = b""
) -> tuple[int, bytes] | None:
    """Status and body of one plain HTTP/1.0 request, or None when nothing answers. No HTTP library needed."""
    writer = None
    lines = [f"{method} {path} HTTP/1.0", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{AUTH_HEADER}: {token}"] if token else []
    lines += [f"{name}: {value}" for name, value in headers]
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            writer.write(body)
            await writer.drain()
            raw = bytearray()
            while chunk := await reader.read(1 << 16):
                raw += chunk
                if len(raw) > MAX_ANSWER:
                    return None  # an instance runs its user's code: its answers to the proxy are bounded
        head, _, body = raw.partition(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        return (int(parts[1]), bytes(body)) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def http_get(host: str, port: int, path: str, timeout: float, token: str = "") -> tuple[int, bytes] | None:
    return await http_request(host, port, "GET", path, timeout, token)


async def put_via_contents(instance: Instance, filename: str, data: bytes | bytearray, timeout: float) -> None:
    """Place a file in the instance's working directory through Jupyter's contents API, in chunks
    (Jupyter decodes each request whole): works on any engine and any file system the instance
    has, a read-only root and size-limited mounts included. The file is the notebook user's."""
    headers = [("Content-Type", "application/json"), *_xsrf_pair()]
    path = "/api/contents/" + quote(filename, safe="")
    pieces = [data[i : i + CONTENTS_CHUNK] for i in range(0, len(data), CONTENTS_CHUNK)] or [b""]
    for number, piece in enumerate(pieces, start=1):
        model = {"type": "file", "format": "base64", "content": base64.b64encode(piece).decode()}
        if len(pieces) > 1:
            model["chunk"] = -1 if number == len(pieces) else number
        answer = await http_request(
            instance.host, instance.port, "PUT", path, timeout, instance.token, headers, json.dumps(model).encode()
        )
        if answer is None or answer[0] not in (200, 201):
            detail = f"PUT {path} chunk {number}: " + (f"{answer[0]} {answer[1][:200]!r}" if answer else "no answer")
            raise BackendError("the instance did not take the upload", detail)
    try:
        size = json.loads(answer[1]).get("size")
    except ValueError:
        size = None
    if size is not None and size != len(data):
        raise BackendError("the upload arrived incomplete in the instance", f"{size} of {len(data)} bytes")


async def http_status(host: str, port: int, path: str, timeout: float, token: str = "") -> int | None:
    answer = await http_get(host, port, path, timeout, token)
    return answer[0] if answer else None


async def jupyter_activity(instance: Instance, timeout: float = 2.0) -> tuple[bool, float | None]:
    """What the instance's Jupyter records of its user's work: whether a kernel executes code now,
    and when a kernel or terminal was last used (epoch seconds). A kernel's time moves on its
    output to a request that is not the frontend's own (kernel_info, comm_info...), a terminal's
    on input and output; reading the lists moves neither. An instance runs its user's code: a
    failed or odd answer is no information (False, None), never an error."""
    kernels, terminals = await asyncio.gather(
        http_get(instance.host, instance.port, JUPYTER_KERNELS, timeout, instance.token),
        http_get(instance.host, instance.port, JUPYTER_TERMINALS, timeout, instance.token),
    )
    kernel_models, terminal_models = jupyter_models(kernels), jupyter_models(terminals)
    busy = any(m.get("execution_state") == "busy" for m in kernel_models)
    times = [t for m in kernel_models + terminal_models if (t := utc_epoch(m.get("last_activity"))) is not None]
    return busy, max(times, default=None)


def jupyter_models(answer: tuple[int, bytes] | None) -> list[dict]:
    """The objects of a Jupyter list answer (/api/kernels, /api/terminals); none for anything else."""
    if answer is None or answer[0] != 200:
        return []
    try:
        models = json.loads(answer[1])
    except Exception:  # not JSON, or nested too deep (RecursionError)
        return []
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def utc_epoch(stamp: Any) -> float | None:
    """Epoch seconds of Jupyter's ISO 8601 times (UTC, with Z or +00:00; one without a zone is
    taken as UTC, as Jupyter writes them); None for anything else."""
    if not isinstance(stamp, str) or len(stamp) > MAX_STAMP:
        return None
    try:
        moment = datetime.fromisoformat(stamp)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):  # not a time; or one at the calendar's edge
        return None


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
        delay = min(delay * 2, 0.25)


# The image's extension (image/datalab_work.py): the working directory as one tar.gz, and archives unpacked.
ARCHIVE_PATH = "/api/datalab/work"
UNPACK_PATH = "/api/datalab/unpack"
HEAD_MAX = 64 * 1024  # bytes of an answer's head the proxy reads from an instance


def _xsrf_pair() -> list[tuple[str, str]]:
    """Jupyter's XSRF check applies to the proxy's own writes too: a matching cookie and header of
    its own (any value will do; version 2 is Tornado's format)."""
    xsrf = "2|00000000|" + secrets.token_hex(16) + "|" + str(int(time.time()))
    return [("Cookie", f"_xsrf={xsrf}"), ("X-XSRFToken", xsrf)]


async def unpack_via_jupyter(
    instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits, timeout: float
) -> None:
    """Have the instance unpack the archive into its working directory, within `limits`."""
    query = f"?format={quote(kind)}&max_entries={limits.max_entries}&max_bytes={limits.max_bytes}"
    headers = [("Content-Type", "application/octet-stream"), *_xsrf_pair()]
    answer = await http_request(
        instance.host, instance.port, "POST", UNPACK_PATH + query, timeout, instance.token, headers, bytes(data)
    )
    if answer is not None and answer[0] in (200, 201):
        return
    if answer is not None and answer[0] in (400, 413):
        raise (ArchiveTooLarge if answer[0] == 413 else ArchiveRefused)(_refusal_message(answer[1]))
    detail = f"POST {UNPACK_PATH}: " + (f"{answer[0]} {answer[1][:200]!r}" if answer else "no answer")
    raise BackendError("the instance did not take the archive", detail)


def _refusal_message(body: bytes) -> str:
    """The extension's sentence (it names the entry at fault), shortened and printable only."""
    try:
        message = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    message = "".join(c for c in message if c.isprintable())[:300]
    return f"the archive was refused: {message}" if message else "the archive was refused"


@contextlib.asynccontextmanager
async def http_stream(instance: Instance, path: str, timeout: float) -> AsyncIterator[tuple[int, Body]]:
    """One HTTP/1.1 GET to the instance whose answer's body is read as it comes (`Body.chunks`).
    The body must be framed (chunked, or a Content-Length): one cut short raises, so a half archive
    is never taken for a whole one. `timeout` bounds the connection and the head; the caller bounds
    the body. Raises OSError or TimeoutError when nothing (or no HTTP) answers."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(instance.host, instance.port, limit=HEAD_MAX)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {instance.host}:{instance.port}", "Connection: close"]
        lines += [f"{AUTH_HEADER}: {instance.token}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(timeout):
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        parts = status_line.split()
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
        yield status, Body(reader, headers)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        raise OSError(f"the instance's answer is not whole HTTP: {e}") from e
    finally:
        writer.close()


class Body:
    """An answer's body, read as its framing says: chunked, or Content-Length bytes."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str]):
        self.reader = reader
        self.headers = headers

    async def chunks(self, size: int = 1 << 18) -> AsyncIterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while length := int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
                while length > 0:
                    piece = await self.reader.read(min(length, size))
                    if not piece:
                        raise asyncio.IncompleteReadError(b"", length)
                    length -= len(piece)
                    yield piece
                await self.reader.readexactly(2)
            return
        if "content-length" not in self.headers:
            raise ValueError("an answer with no framing: its end cannot be told from a cut")
        left = int(self.headers["content-length"])
        while left > 0:
            piece = await self.reader.read(min(left, size))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            yield piece
