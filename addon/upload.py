"""Upload bodies that never pile up in memory beyond datalab_max_upload.

mitmproxy reads a whole request body before it sends any reply an addon makes, so refusing a
10 GB upload in `requestheaders` would still buffer 10 GB. Instead, a /datalab/start request (and
any request refused with a body on its way, by any addon: `UploadSink.refuse`) is streamed:
`BodyCollector` keeps at most `limit` bytes of it, and the bytes themselves flow on to
`UploadSink`, a loopback HTTP server that reads and drops them. The real answer replaces the
sink's in the `response` hook (a refusal: here; a start: api.py). Should that hook ever fail, the
sink's own answer is a JSON 500: the request still fails closed.

A refusal is decided from the request head, so it is the first answer (no 100 Continue before
it) and is given at once: the sink answers without reading, and reads on (dropping) for LINGER
only, so a client that ends its body by then ends cleanly, and any other is closed (HTTP/2: its
stream reset). A refused body never counts among the bodies arriving: unsigned clients, however
many and however slow, never hold the places that signed starts need.

Bounded: a start's body must arrive within datalab_upload_timeout of its headers, or the sink stops
reading, answers 408 UPLOAD_TIMEOUT and closes; mitmproxy passes that answer on and then closes the
client connection, so a stalled or slow client holds none of its three descriptors (client, proxy
-> sink, sink) beyond the deadline. At most datalab_uploads_at_once starts' bodies arrive at once:
beyond that a start is refused 503 CAPACITY (at once, as any refusal) before its signature is spent.

A start that asked for its progress as events (progress.py) is answered by the sink, once its body has
arrived, with the stream of its channel: the start's answer itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import h11
from mitmproxy import connection
from mitmproxy import http

import errors
import loopback
import progress
from config import Settings
from loopback import LoopbackServer
from marks import CUT
from marks import DEFERRED
from marks import PROGRESS
from marks import SINK
from progress import Channel
from progress import Channels
from runtime import Runtime
from upstream import frame_for_http1
from upstream import reroute

log = logging.getLogger(__name__)

SINK_HOST = loopback.HOST
RECEIVED = "X-Datalab-Received"  # the sink's count of body bytes it read, so a body cut short is noticed
VERDICT = "X-Datalab-Verdict"  # the sink's: "drained" (read to its end), "timeout", "unread" (told so)
DEADLINE = "X-Datalab-Deadline"  # to the sink: the wall-clock time by which the body must have arrived
UNREAD = "X-Datalab-Unread"  # to the sink: "1" answer at once without reading the body
CHUNK = 256 * 1024
LINGER = 2.0  # seconds the sink goes on reading after an early answer, so a reset does not destroy it
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


class UploadSink(LoopbackServer):
    """A loopback HTTP/1.1 server that reads request bodies to the end, keeps nothing, answers 500
    (or 408 when a body does not arrive in time; at once, told the body is a refusal's).

    Also an addon: `take` streams a flow's body here; `refuse` turns an answer given in
    `requestheaders` into one given as the sink's (so the body is never buffered); `response`
    gives it. It counts the starts' bodies on their way here (`full`), from `take` to the flow's
    answer or error.
    """

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self._arriving: dict[str, str] = {}  # flow id -> its client connection's id
        self.progress = Channels()  # starts answered as event streams (progress.py)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def arriving(self) -> int:
        """Bodies on their way to the sink now."""
        return len(self._arriving)

    @property
    def full(self) -> bool:
        return len(self._arriving) >= self.settings.uploads_at_once

    def take(self, flow: http.HTTPFlow, limit: int, unread: bool = False, channel: str = "") -> BodyCollector:
        """Stream the flow's body here, keeping at most `limit` bytes of it. `unread`: the sink
        answers at once without reading it (a refusal: it holds no place among the bodies arriving).
        `channel`: once the body has arrived, the answer is that progress channel's event stream."""
        if self.port is None:
            raise RuntimeError("the upload sink is not listening yet")
        collector = BodyCollector(limit)
        flow.request.stream = collector
        frame_for_http1(flow.request)
        # Set, never passed on from the client: the sink trusts these.
        deadline = time.time() + self.settings.upload_timeout  # from the moment its headers were taken
        flow.request.headers[DEADLINE] = f"{deadline:.3f}"
        flow.request.headers[UNREAD] = "1" if unread else "0"
        flow.request.headers[progress.PROGRESS_HEADER] = channel
        reroute(flow, SINK_HOST, self.port)
        flow.metadata[SINK] = True
        if not unread:
            self._arriving[flow.id] = flow.client_conn.id
        return collector

    def refuse(self, flow: http.HTTPFlow) -> None:
        """The answer already set on the flow in `requestheaders` is final: no 100 Continue goes
        before it (RFC 9110 §10.1.1), and a body on its way is never read into memory (set now,
        mitmproxy would first read the whole body). The body goes to the sink unread: the sink
        answers at once, so the refusal holds no place among the bodies `arriving` (an unsigned
        client never holds what signed starts need); what of the body comes within LINGER is
        dropped, and a connection whose body has not ended by then is closed."""
        if flow.response is None:
            return
        flow.request.headers.pop("Expect", None)  # else mitmproxy sends 100 Continue after the hook
        if not has_body(flow.request) or self.port is None:
            return
        flow.metadata[DEFERRED] = flow.response.get_state()
        flow.response = None
        self.take(flow, limit=0, unread=True)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(SINK):
            self._arriving.pop(flow.id, None)
            self.progress.discard(flow.metadata.get(PROGRESS, ""))
            if flow.response is not None and flow.response.headers.get(VERDICT) == "timeout":
                # The body did not arrive in time: that is the answer, whatever was deferred; nothing starts.
                flow.metadata.pop(DEFERRED, None)
                flow.metadata[CUT] = True
                flow.response = closing(flow, errors.upload_timeout(self.settings.upload_timeout).response())
                return
        if DEFERRED in flow.metadata:
            answer = http.Response.from_state(flow.metadata.pop(DEFERRED))
            if flow.request.timestamp_end is None:
                # Answered before the body ended: whatever of it is still to come is not read.
                closing(flow, answer)
            flow.response = answer

    def error(self, flow: http.HTTPFlow) -> None:
        self._arriving.pop(flow.id, None)
        self.progress.discard(flow.metadata.get(PROGRESS, ""))  # its start, if running, stops

    def client_disconnected(self, client: connection.Client) -> None:
        """Whatever happened to its flows, none of this client's bodies is arriving any more."""
        for flow_id in [f for f, c in self._arriving.items() if c == client.id]:
            del self._arriving[flow_id]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        received = 0
        verdict = "drained"
        channel: Channel | None = None
        loop = asyncio.get_running_loop()
        try:
            try:
                # The proxy's own deadline comes with the request; none may be later than this.
                async with asyncio.timeout(self.settings.upload_timeout) as limit:
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await reader.read(CHUNK))
                        elif isinstance(event, h11.Request):
                            headers = {k.lower(): v for k, v in event.headers}
                            deadline = _deadline(headers.get(DEADLINE.lower().encode()))
                            if deadline is not None:
                                limit.reschedule(min(limit.when(), loop.time() + deadline - time.time()))
                            if headers.get(UNREAD.lower().encode()) == b"1":
                                verdict = "unread"
                                break
                            named = headers.get(progress.PROGRESS_HEADER.lower().encode(), b"")
                            channel = self.progress.get(named.decode(errors="replace"))
                        elif isinstance(event, h11.Data):
                            received += len(event.data)
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        elif isinstance(event, h11.ConnectionClosed):
                            return
            except TimeoutError:
                verdict = "timeout"
                log.info("datalab: an upload body did not arrive in time (%d bytes read); cutting it", received)
            if conn.our_state is not h11.SEND_RESPONSE:
                return  # not even a request head came (no proxy sends that): nothing to answer
            if channel is not None and verdict == "drained":
                await _answer_progress(conn, reader, writer, channel, received)
                return
            if verdict == "timeout":
                # the sink's word to the proxy (which then answers the client): not a refusal counted
                status, body = 408, json.dumps(errors.upload_timeout(self.settings.upload_timeout).body()).encode()
            else:
                status, body = 500, _NOT_ANSWERED.encode()
            headers = [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                (RECEIVED, str(received)),
                (VERDICT, verdict),
            ]
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            async with asyncio.timeout(LINGER):
                await writer.drain()
            if conn.their_state is not h11.DONE:
                # Cut (timeout): say so, and the proxy closes the client at once. Unread: the proxy
                # goes on passing the body here, so a client that ends it soon ends cleanly.
                await _linger(reader, writer, half_close=verdict == "timeout")
        except (h11.ProtocolError, ConnectionError, TimeoutError) as e:
            log.debug("upload sink: %s", e)
        finally:
            writer.close()


async def _answer_progress(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: Channel, received: int
) -> None:
    """The start's answer as its progress channel's event stream (chunked), until the channel closes;
    if the proxy closes the connection first (its client went away), the channel's start stops."""
    headers = [
        ("Content-Type", progress.EVENT_STREAM),
        ("Cache-Control", "no-store"),
        ("Transfer-Encoding", "chunked"),
        (RECEIVED, str(received)),
        (VERDICT, "drained"),
    ]
    writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
    gone = asyncio.ensure_future(reader.read(1))  # the proxy sends nothing more: any end is its hang-up
    finished = False
    try:
        async for chunk in channel.frames():
            if gone.done():
                return
            writer.write(conn.send(h11.Data(data=chunk)))
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        finished = True
    except TimeoutError:
        log.error("datalab: a start's progress stream got no event; closing it")
    finally:
        gone.cancel()
        if not finished:
            channel.abandon()


def closing(flow: http.HTTPFlow, response: http.Response) -> http.Response:
    """The answer, telling an HTTP/1 client that the connection closes after it (HTTP/2 has no
    such header: mitmproxy resets the request's stream instead)."""
    if flow.request.http_version.startswith("HTTP/1"):
        response.headers["Connection"] = "close"
    return response


def _deadline(value: bytes | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, half_close: bool) -> None:
    """Answered before the body ended: read on for a moment (after a half-close, if told). Closed
    with unread bytes, a socket sends a reset, and the answer on its way could be lost: here the
    sink's to the proxy; while the proxy passes the body on, the proxy's to its client."""
    try:
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(LINGER):
            while await reader.read(CHUNK):
                pass
    except (OSError, TimeoutError):
        pass
