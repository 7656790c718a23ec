"""Upload bodies that never pile up in memory beyond datalab_max_upload.

mitmproxy reads a whole request body before it sends any reply an addon makes, so refusing a
10 GB upload in `requestheaders` would still buffer 10 GB. Instead, a /datalab/start request (and
any request refused with a body on its way, by any addon: `UploadSink.refuse`) is streamed:
`BodyCollector` keeps at most `limit` bytes of it, and the bytes themselves flow on to
`UploadSink`, a loopback HTTP server that reads and drops them. The real answer replaces the
sink's in the `response` hook (a refusal: here; a start: api.py). Should that hook ever fail, the
sink's own answer is a JSON 500: the request still fails closed.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from mitmproxy import http

from marks import DEFERRED
from marks import SINK
from upstream import reroute

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


def has_body(request: http.Request) -> bool:
    """Whether a body may follow the headers (HTTP/2 may send one without a Content-Length)."""
    length = request.headers.get("Content-Length")
    if length is not None:
        return length != "0"
    return "Transfer-Encoding" in request.headers or request.is_http2 or request.is_http3


class UploadSink:
    """A loopback HTTP/1.1 server that reads request bodies to the end, keeps nothing, answers 500.

    Also an addon: `take` streams a flow's body here; `refuse` turns an answer given in
    `requestheaders` into one given after the body is drained; `response` gives it.
    """

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

    def take(self, flow: http.HTTPFlow, limit: int) -> BodyCollector:
        """Stream the flow's body here, keeping at most `limit` bytes of it."""
        if self.port is None:
            raise RuntimeError("the upload sink is not listening yet")
        collector = BodyCollector(limit)
        flow.request.stream = collector
        if "Content-Length" not in flow.request.headers and "Transfer-Encoding" not in flow.request.headers:
            # HTTP/2 and /3 may send a body with no length at all; towards this HTTP/1.1 server such a
            # request would have no body. Chunked, mitmproxy frames each piece for it.
            flow.request.headers["Transfer-Encoding"] = "chunked"
        reroute(flow, SINK_HOST, self.port)
        flow.metadata[SINK] = True
        return collector

    def refuse(self, flow: http.HTTPFlow) -> None:
        """Give the answer already set on the flow only once its body (if any) is drained here:
        answered now, mitmproxy would first read the whole body into memory."""
        if flow.response is None or not has_body(flow.request) or self.port is None:
            return
        flow.metadata[DEFERRED] = flow.response.get_state()
        flow.response = None
        self.take(flow, limit=0)

    def response(self, flow: http.HTTPFlow) -> None:
        if DEFERRED in flow.metadata:
            flow.response = http.Response.from_state(flow.metadata.pop(DEFERRED))

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
