"""The user's work, streamed to the frontend: a loopback HTTP server that the proxy sends a
`GET /datalab/work/<id>` flow to, as if it were the flow's upstream.

mitmproxy streams only what comes from an upstream (an answer an addon makes is held whole), so the
archive is served by this small server, one chunk at a time, with backpressure, and the proxy passes
it on (`flow.response.stream`): never whole in memory. It serves
- a saved archive from the work store, with its length;
- a live snapshot, relayed from the running instance under the save's own rules: only a 200 with a
  framed body is passed on, chunked, with this server's headers alone (never the instance's: it runs
  its user's code, who can answer anything: a redirect, an encoding, a forged error), bounded by
  datalab_work_max (past it the answer is cut, so the frontend sees it unfinished) and by a deadline
  for its first bytes; anything else is a JSON 502.
It serves only the proxy itself: each request carries this process's secret (process instances share
the host's loopback), names a work by its id alone, and opens no link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path

from mitmproxy import http

import inputs
import loopback
from backends import BackendError
from backends import Instance
from loopback import LoopbackServer
from upstream import reroute
from work import FIRST_BYTES
from work import WorkTooLarge
from work import archive_chunks

log = logging.getLogger(__name__)

HOST = loopback.HOST
KEY_HEADER = "X-Datalab-Work-Key"
CHUNK = 256 * 1024
HEAD_MAX = 8192
HEAD_WAIT = 10.0  # seconds for the proxy's own request head
LIVE = "/live"  # the target of a relayed snapshot; a saved archive's is /<id>.tar.gz
UNREACHABLE = json.dumps(
    {"code": "INSTANCE_UNREACHABLE", "message": "the instance did not hand over its working directory"}
).encode()


class WorkFiles(LoopbackServer):
    """Also an addon: listens from `running` to `done`."""

    head_limit = HEAD_MAX

    HOST = HOST

    def __init__(self) -> None:
        super().__init__()
        self._key = secrets.token_urlsafe(32)

    def send_saved(self, flow: http.HTTPFlow, path: Path) -> None:
        """Make the flow fetch the saved archive at `path` from here (answered as its upstream's)."""
        self._take(flow, "/" + path.name, {"X-Datalab-Directory": str(path.parent)})

    def send_live(self, flow: http.HTTPFlow, instance: Instance, max_bytes: int) -> None:
        """Make the flow fetch a snapshot of the running instance's work, relayed by this server."""
        where = {"X-Datalab-Host": instance.host, "X-Datalab-Port": str(instance.port)}
        self._take(flow, LIVE, {**where, "X-Datalab-Token": instance.token, "X-Datalab-Max": str(max_bytes)})

    def _take(self, flow: http.HTTPFlow, target: str, headers: dict[str, str]) -> None:
        if self.port is None:
            raise RuntimeError("the work file server is not listening yet")
        reroute(flow, HOST, self.port)
        flow.request.method = "GET"
        flow.request.path = target
        flow.request.headers.clear()
        flow.request.headers["Host"] = f"{HOST}:{self.port}"
        flow.request.headers[KEY_HEADER] = self._key
        flow.request.headers.update(headers)
        flow.request.content = b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_WAIT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, target, headers = self._resolve(head)
            if status != 200:
                writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
            elif target == LIVE:
                await _relay(headers, writer)
            else:
                await _stream(Path(headers.get("x-datalab-directory", "")) / target.removeprefix("/"), writer)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            log.debug("work file server: %s", e)
        finally:
            writer.close()

    def _resolve(self, head: bytes) -> tuple[int, str, dict[str, str]]:
        """What a request of the proxy's asks for, or a status saying why not."""
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.partition(" ")[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if not hmac.compare_digest(headers.get(KEY_HEADER.lower(), "").encode(), self._key.encode()):
            return 403, "", {}
        name = target.removeprefix("/")
        saved = name.endswith(".tar.gz") and inputs.is_token(name.removesuffix(".tar.gz"))
        if method != "GET" or not (saved or target == LIVE):
            return 400, "", {}
        return 200, target, headers


def _head(status: int, fields: str) -> bytes:
    reason = "OK" if status == 200 else "Bad Gateway"
    return f"HTTP/1.1 {status} {reason}\r\n{fields}Connection: close\r\n\r\n".encode()


async def _stream(path: Path, writer: asyncio.StreamWriter) -> None:
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(fd).st_size
        writer.write(_head(200, f"Content-Type: application/gzip\r\nContent-Length: {size}\r\n"))
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            writer.write(chunk)
            await writer.drain()


async def _relay(headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
    """The instance's archive, passed on chunked within its bounds; a refusal if it does not begin one."""
    host, port, token = headers["x-datalab-host"], int(headers["x-datalab-port"]), headers.get("x-datalab-token", "")
    instance = Instance("", "", "", host, port, "", 0.0, token)
    begun = False
    try:
        async with contextlib.aclosing(archive_chunks(instance, int(headers["x-datalab-max"]), FIRST_BYTES)) as chunks:
            async for chunk in chunks:
                if not begun:
                    writer.write(_head(200, "Content-Type: application/gzip\r\nTransfer-Encoding: chunked\r\n"))
                    begun = True
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        if not begun:
            writer.write(_head(200, "Content-Type: application/gzip\r\nTransfer-Encoding: chunked\r\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (OSError, TimeoutError, BackendError, WorkTooLarge) as e:
        # Begun: closed without the last chunk, so the frontend sees it unfinished; else a refusal.
        log.info("datalab: a live snapshot failed: %s", e if not isinstance(e, WorkTooLarge) else "over work_max")
        if not begun:
            writer.write(_head(502, f"Content-Type: application/json\r\nContent-Length: {len(UNREACHABLE)}\r\n"))
            writer.write(UNREACHABLE)
            await writer.drain()
