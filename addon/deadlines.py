"""Client connections cannot hold the proxy for as long as they like.

mitmproxy's own limit, `tcp_timeout`, counts idle time only: a client that sends a byte of its
request head every few seconds (slowloris) keeps its connection, and its descriptor, for ever.
`HeaderDeadline` closes a client connection that has no request in flight and has not completed a
request head within datalab_header_timeout: counted from its opening, or on a kept-alive connection
from its last answer. A fresh plain HTTP/1 connection is told why first (408 HEADER_TIMEOUT); a
kept-alive one is closed without a word, as idle connections are (a 408 there could be taken for
the answer to a request crossing it); over TLS nothing can be written from here.

A request in flight is watched elsewhere: an upload body by the upload sink (upload.py,
datalab_upload_timeout); a routed request or a WebSocket by the instance and mitmproxy's
`tcp_timeout`.

mitmproxy has no hook to close a client connection, so `close_client` does what mitmproxy's own
inactivity timeout does: it cancels the connection's handler, found through the proxyserver addon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

from mitmproxy import connection
from mitmproxy import http
from mitmproxy import tcp

import errors
import heads
from handlers import client_io
from handlers import closing_answer
from marks import PASSTHROUGH
from marks import SINK
from runtime import Runtime
from upload import has_body

log = logging.getLogger(__name__)

ABORT_AFTER = 5.0  # seconds a closed connection may take to flush its last bytes before it is reset


@dataclass
class Watch:
    client: connection.Client
    flows: set[str] = field(default_factory=set)  # requests of this connection in flight
    served: bool = False  # a request head of this connection arrived
    timer: asyncio.TimerHandle | None = None


class HeaderDeadline:
    """Goes first among the addons (a request head that came is seen at once); its `after` goes
    last, so a request is over only when every addon's `response` hook is (a start's may take a
    while)."""

    def __init__(
        self,
        runtime: Runtime,
        close: Callable[[connection.Client, bytes | None], None] | None = None,
    ):
        self.runtime = runtime
        self.close = close or close_client
        self._watched: dict[str, Watch] = {}
        self.after = _RequestsEnd(self)

    @property
    def timeout(self) -> int:
        return self.runtime.settings.header_timeout

    def client_connected(self, client: connection.Client) -> None:
        watch = self._watched[client.id] = Watch(client)
        self._arm(watch)

    def client_disconnected(self, client: connection.Client) -> None:
        watch = self._watched.pop(client.id, None)
        if watch is not None and watch.timer is not None:
            watch.timer.cancel()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        watch = self._watched.get(flow.client_conn.id)
        if watch is None:
            return
        watch.flows.add(flow.id)
        watch.served = True
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None

    def finished(self, flow: http.HTTPFlow) -> None:
        """The flow's answer is given (or it failed): its connection is watched again when idle."""
        self.finished_id(flow.client_conn.id, flow.id)

    def finished_id(self, client_id: str, flow_id: str) -> None:
        """finished(), by the client connection's and the flow's ids."""
        watch = self._watched.get(client_id)
        if watch is None or flow_id not in watch.flows:
            return
        watch.flows.discard(flow_id)
        if not watch.flows:
            self._arm(watch)

    def _arm(self, watch: Watch) -> None:
        if watch.timer is not None:
            watch.timer.cancel()
        watch.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, watch)

    def _expire(self, watch: Watch) -> None:
        watch.timer = None
        if watch.flows or self._watched.get(watch.client.id) is not watch:
            return
        client = watch.client
        fresh = not watch.served
        log.info(
            "datalab: closing %s: %s within %d s",
            client.peername,
            "no request head" if fresh else "no further request",
            self.timeout,
        )
        plain_http1 = client.transport_protocol == "tcp" and not client.tls and client.alpn in (None, b"")
        self.close(client, closing_answer(errors.header_timeout(self.timeout)) if fresh and plain_http1 else None)


class _RequestsEnd:
    """HeaderDeadline's hooks at the end of a request."""

    def __init__(self, deadline: HeaderDeadline):
        self.deadline = deadline

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None and not flow.metadata.get(PASSTHROUGH):  # a WebSocket is in flight until it ends
            self.deadline.finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.deadline.finished(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.deadline.finished(flow)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        """A WebSocket in passthrough ended (its TCP flow carries the upgrade's id: passthrough.py)."""
        if upgrade := flow.metadata.get(PASSTHROUGH):
            self.deadline.finished_id(flow.client_conn.id, upgrade)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        self.tcp_end(flow)


def close_client(client: connection.Client, answer: bytes | None) -> None:
    """Close a client connection as mitmproxy's inactivity timeout does (cancel its handler), after
    writing `answer` to it; reset it if its last bytes cannot leave within ABORT_AFTER."""
    handler, io = client_io(client)
    if io is None:
        return
    transport = io.writer.transport
    if answer and not transport.is_closing():
        io.writer.write(answer)
    if io.handler is not None:
        handler.close_connection(handler.client)
    else:
        transport.close()
    asyncio.get_running_loop().call_later(ABORT_AFTER, transport.abort)


class OneRequestAtATime:
    """An HTTP/1 client may not queue requests faster than it reads the answers (pipelining).

    mitmproxy goes on reading a connection while a request on it is being handled, and keeps the
    unparsed bytes in memory: a client that sends requests back to back without reading answers
    fills the proxy's memory, and its backlog keeps a core busy after it has gone. So once a
    request has arrived whole, reading from its client pauses until the answer is given, as a
    server that handles one request at a time would; the client's own TCP window then holds the
    rest. Reading resumes at an answer only while the connection's HTTP/1 layer holds less than
    datalab_max_head of requests not yet parsed (heads.backlog), and never against asyncio's own
    pause: mitmproxy goes on reading while a hook runs, so a resume at each answer let a pipelining
    client put ever more into the proxy than each answer took out. Uploads are left alone (their
    client is watched for hanging up while the start runs, and their number is bounded by
    datalab_uploads_at_once), and so is HTTP/2, whose streams share the connection.
    """

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.request.stream and not has_body(flow.request):
            self._pause(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._pause(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        switched = flow.response is not None and flow.response.status_code == 101
        _reading(flow.client_conn, resume=True, switched=switched)

    def error(self, flow: http.HTTPFlow) -> None:
        _reading(flow.client_conn, resume=True)

    @staticmethod
    def _pause(flow: http.HTTPFlow) -> None:
        if flow.request.http_version.startswith("HTTP/1") and not flow.metadata.get(SINK):
            _reading(flow.client_conn, resume=False)


def _reading(client: connection.Client, resume: bool, switched: bool = False) -> None:
    """Pause or resume reading from a client connection (its asyncio transport). `switched`: its
    answer was a 101, after which no answer comes to look again, and what the HTTP/1 layer holds
    is no request but the new protocol's first bytes (a WebSocket's frames sent before the 101):
    reading resumes whatever their size, or that direction would stall for good."""
    _, io = client_io(client)
    if io is None:
        return
    transport = io.writer.transport
    if transport.is_closing():
        return
    if resume and not transport.is_reading():
        if (heads.backlog(client) > heads.limits()[0] and not switched) or getattr(io.reader, "_paused", False):
            # Requests enough are queued already: the next answer looks again. Or asyncio's own flow
            # control paused it, and resumes it once its buffer drains (resumed here, the reader
            # would never pause it again, and its buffer would grow without bound).
            return
        transport.resume_reading()
    elif not resume:
        heads.hold_reading(transport, io.reader)
