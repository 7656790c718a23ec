"""Upload bodies that never pile up in memory beyond datalab_max_upload.

mitmproxy reads a whole request body before it sends any reply an addon makes, so refusing a
10 GB upload in `requestheaders` would still buffer 10 GB. Instead, a /datalab/start request (and
any refused /datalab request with a body) is streamed: `BodyCollector` keeps at most `limit` bytes
of it, and the bytes themselves flow on to `UploadSink`, a loopback HTTP server that reads and
drops them. The real answer replaces the sink's in the `response` hook (api.py). Should that hook
ever fail, the sink's own answer is a JSON 500: the request still fails closed.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11

log = logging.getLogger(__name__)

SINK_HOST = "127.0.0.1"
RECEIVED = "X-Datalab-Received"  # the sink's count of body bytes it read, so a body cut short is noticed
_NOT_ANSWERED = json.dumps({"code": "INTERNAL", "message": "the proxy did not answer this upload; see its log"})


class BodyCollector:
    """The `flow.request.stream` callable: keeps up to `limit` bytes, passes every chunk on."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self._kept = bytearray()

    @property
    def too_large(self) -> bool:
        return self.size > self.limit

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if not chunk:
            # An empty HTTP/2 DATA frame: passed on as b"" it would be the last chunk of the chunked
            # body towards the sink, which would then answer before the rest arrived.
            return []
        self.size += len(chunk)
        if self.too_large:
            self._kept = bytearray()  # over the limit: keep nothing, just count
        else:
            self._kept += chunk  # grows in place: one copy of the body, never two
        return chunk

    def body(self) -> bytearray:
        return self._kept


class UploadSink:
    """A loopback HTTP/1.1 server that reads request bodies to the end, keeps nothing, answers 500."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def running(self) -> None:
        self._server = await asyncio.start_server(self._serve, SINK_HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def done(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        received = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(256 * 1024))
                elif isinstance(event, h11.Data):
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            body = _NOT_ANSWERED.encode()
            headers = [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                (RECEIVED, str(received)),
            ]
            writer.write(conn.send(h11.Response(status_code=500, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (h11.ProtocolError, ConnectionError) as e:
            log.debug("upload sink: %s", e)
        finally:
            writer.close()
