"""The proxy's own HTTP client towards instances: its status probes, Jupyter's API calls, the work
archive's stream. No HTTP library: an instance runs its user's code and may answer anything, so
what is read is bounded (MAX_ANSWER, HEAD_MAX), a body must be framed, and nothing answering is
None or OSError, never a hang (every call has its timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from backends import AUTH_HEADER
from backends import Instance

MAX_ANSWER = 1 << 20  # bytes of an instance's answer to the proxy's own requests (status, kernels, contents)
HEAD_MAX = 64 * 1024  # bytes of an answer's head the proxy reads from an instance


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


async def http_status(host: str, port: int, path: str, timeout: float, token: str = "") -> int | None:
    answer = await http_get(host, port, path, timeout, token)
    return answer[0] if answer else None


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
                async for piece in self._exactly(length, size):
                    yield piece
                await self.reader.readexactly(2)
            return
        if "content-length" not in self.headers:
            raise ValueError("an answer with no framing: its end cannot be told from a cut")
        async for piece in self._exactly(int(self.headers["content-length"]), size):
            yield piece

    async def _exactly(self, length: int, size: int) -> AsyncIterator[bytes]:
        """`length` bytes, in pieces of at most `size`; IncompleteReadError when they stop short."""
        while length > 0:
            piece = await self.reader.read(min(length, size))
            if not piece:
                raise asyncio.IncompleteReadError(b"", length)
            length -= len(piece)
            yield piece
