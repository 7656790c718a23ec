"""Saved works, streamed to the frontend: a loopback HTTP server that the proxy sends a
`GET /datalab/work/<id>` flow to, as if it were the flow's upstream.

mitmproxy streams only what comes from an upstream (an answer an addon makes is held whole), so a
saved archive of hundreds of MiB is served by this small server, one chunk at a time, with
backpressure, and the proxy passes it on (`flow.response.stream`): never whole in memory. It serves
only the proxy itself: each request must carry this process's secret (process instances share the
host's loopback), names a work by its id alone, and opens no link.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
from pathlib import Path

from mitmproxy import http

import inputs
from upstream import reroute

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
KEY_HEADER = "X-Datalab-Work-Key"
CHUNK = 256 * 1024
HEAD_MAX = 8192
HEAD_WAIT = 10.0  # seconds for the proxy's own request head


class WorkFiles:
    """Also an addon: listens from `running` to `done`."""

    HOST = HOST

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._key = secrets.token_urlsafe(32)
        self.port: int | None = None

    async def running(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def done(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def send(self, flow: http.HTTPFlow, path: Path) -> None:
        """Make the flow fetch the saved archive at `path` from here (answered as its upstream's)."""
        if self.port is None:
            raise RuntimeError("the work file server is not listening yet")
        reroute(flow, HOST, self.port)
        flow.request.method = "GET"
        flow.request.path = "/" + path.name
        flow.request.headers.clear()
        flow.request.headers["Host"] = f"{HOST}:{self.port}"
        flow.request.headers[KEY_HEADER] = self._key
        flow.request.headers["X-Datalab-Directory"] = str(path.parent)
        flow.request.content = b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_WAIT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, path = self._resolve(head)
            if path is None:
                writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                return
            await _stream(path, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            log.debug("work file server: %s", e)
        finally:
            writer.close()

    def _resolve(self, head: bytes) -> tuple[int, Path | None]:
        """The file a request of the proxy's names, or a status saying why not."""
        if len(head) > HEAD_MAX:
            return 431, None
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.partition(" ")[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if not hmac.compare_digest(headers.get(KEY_HEADER.lower(), "").encode(), self._key.encode()):
            return 403, None
        name = target.removeprefix("/")
        if method != "GET" or not name.endswith(".tar.gz") or not inputs.is_token(name.removesuffix(".tar.gz")):
            return 400, None
        return 200, Path(headers.get("x-datalab-directory", "")) / name


async def _stream(path: Path, writer: asyncio.StreamWriter) -> None:
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(fd).st_size
        writer.write(
            (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {size}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
        )
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            writer.write(chunk)
            await writer.drain()
