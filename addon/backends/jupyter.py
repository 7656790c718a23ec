"""The proxy's client of an instance's Jupyter (the image's configuration, or the process backend's
copy of it): readiness (/api/status), uploads through the contents API, archives unpacked and the
working directory streamed by the image's extension (image/datalab_work.py), and the kernels' and
terminals' activity the culler reads. Every backend's instances are such servers, so every backend
fills and waits for them here; what they answer is read through instance_http.py, bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from typing import Any
from urllib.parse import quote

from backends import ArchiveRefused
from backends import ArchiveTooLarge
from backends import BackendError
from backends import Instance
from backends import UnpackLimits
from backends.backoff import until_ready
from backends.instance_http import Body
from backends.instance_http import http_get
from backends.instance_http import http_request
from backends.instance_http import http_status
from backends.instance_http import http_stream

CONTENTS_CHUNK = 4 << 20  # bytes per contents-API request (Jupyter holds each whole, base64 and all)
# Jupyter's lists of kernels and terminals, read without counting as API activity for Jupyter itself.
JUPYTER_KERNELS = "/api/kernels?no_track_activity=1"
JUPYTER_TERMINALS = "/api/terminals?no_track_activity=1"
MAX_STAMP = 64  # characters of a time in those lists


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

    async def answered() -> bool | None:
        if await http_status(instance.host, instance.port, path, timeout=2.0, token=instance.token) == 200:
            return True
        if not await alive():
            raise BackendError("the instance exited while starting; see the engine's logs for it")
        return None

    await until_ready(answered, timeout, f"the instance did not answer {path} within {timeout:g} s")


# The image's extension (image/datalab_work.py): the working directory as one tar.gz, and archives unpacked.
ARCHIVE_PATH = "/api/datalab/work"
UNPACK_PATH = "/api/datalab/unpack"


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


def work_archive(instance: Instance, timeout: float) -> contextlib.AbstractAsyncContextManager[tuple[int, Body]]:
    """The instance's working directory as one tar.gz, streamed by the image's extension (http_stream's rules)."""
    return http_stream(instance, ARCHIVE_PATH, timeout)
