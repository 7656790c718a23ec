"""A request sent to an instance gets its answer's head within datalab_upstream_timeout, or a JSON
504 UPSTREAM_TIMEOUT, and its upstream connection is dropped.

A frozen or wedged Jupyter (a stopped process, a container whose server hangs) accepts the
connection and says nothing; mitmproxy waits for it as long as its idle `tcp_timeout`, so the
browser got no answer at all. The deadline counts from the moment the request has arrived whole
(the `request` hook: the end of a streamed body, or the head of a bodiless request) and ends when
the answer's head arrives (`responseheaders`): a long download that has begun is never cut, and a
WebSocket upgrade is bounded only until its 101, never once open.

mitmproxy lets an addon answer a request only before it is sent upstream, and it answers a failed
upstream itself (an HTML 502 from its HTTP/1 and HTTP/2 layers, after the `error` hook, which
cannot replace it). So the 504 is handed to mitmproxy as the instance's own answer would be: its
bytes go into the upstream connection's HTTP/1 reader, as if the instance had sent them, with
`Connection: close`, which makes mitmproxy drop that connection. The flow then ends as any
answered flow does (every addon's response hooks run; HTTP/1 and HTTP/2 clients alike get the
JSON), and whatever the instance sends later goes nowhere. This is only done when the connection
carries this request and not a byte of an answer has come (else the answer could be spliced):
otherwise the connection is closed and mitmproxy answers its own 502 page. A request still
waiting for its connection to open (connecting, or queued behind mitmproxy's five connections per
client and address, as an HTTP/2 client's many streams may be) is looked at every second, and
once it is sent the instance gets the whole deadline from then.

A paused or frozen instance is alive to its backend: nothing here asks it whether the instance
is gone (router.py does that after a connection fails).
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.layers.http._http1 import Http1Client

import errors
from flow_timers import FlowTimers
from handlers import closing_answer
from handlers import handler_of
from marks import ROUTED
from marks import STATIC
from marks import UPSTREAM_TIMEOUT
from runtime import Runtime

log = logging.getLogger(__name__)

RECHECK = 1.0  # seconds until a request still waiting for its upstream connection is looked at again
MAX_LAYERS = 16  # a layer stack is a handful deep; the walk to the HTTP layer stops after this many


class UpstreamDeadline:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._timers = FlowTimers(self._expire)
        self._unsent: set[str] = set()  # flows whose deadline came before their connection opened
        self._answering: set[asyncio.Task] = set()

    @property
    def timeout(self) -> int:
        return self.runtime.settings.upstream_timeout

    def request(self, flow: http.HTTPFlow) -> None:
        """The request has arrived whole and goes to its instance now: the deadline starts."""
        if flow.response or flow.error or not flow.live:
            return
        if ROUTED in flow.metadata or flow.metadata.get(STATIC):
            self._arm(flow, self.timeout)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)
        if flow.metadata.get(UPSTREAM_TIMEOUT) and flow.response is not None:
            # The `close` was for the upstream connection, which mitmproxy has closed by now (not
            # yet at `responseheaders`: hooks run as they are called, before the reader reaches
            # the end of the answer); the client's own connection stays open.
            flow.response.headers.pop("Connection", None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    async def done(self) -> None:
        self._timers.clear()
        self._unsent.clear()
        await asyncio.gather(*self._answering, return_exceptions=True)

    def _arm(self, flow: http.HTTPFlow, delay: float) -> None:
        self._timers.arm(flow, delay)

    def _forget(self, flow: http.HTTPFlow) -> None:
        self._timers.disarm(flow)
        self._unsent.discard(flow.id)

    def _expire(self, flow: http.HTTPFlow) -> None:
        task = asyncio.create_task(self._answer(flow))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, flow: http.HTTPFlow) -> None:
        """From its checks to the injection nothing pauses, and the handler's event lock is free (it
        is held only while events are handled, and timers do not run then), so no byte of the
        instance's can come in between."""
        if flow.response or flow.error or not flow.live:
            return
        handler = handler_of(flow.client_conn)
        if handler is None:
            return  # the client is gone: mitmproxy ends the flow itself
        server = flow.server_conn
        io = handler.transports.get(server)
        if io is None or io.writer is None or not server.connected:
            self._unsent.add(flow.id)  # still connecting, or waiting for a connection slot
            self._arm(flow, RECHECK)
            return
        if handler._server_event_lock.locked():  # (not seen: then the handler's events could cut in)
            self._arm(flow, RECHECK)
            return
        if flow.id in self._unsent:  # sent within the last RECHECK seconds: the instance's time starts
            self._unsent.discard(flow.id)
            self._arm(flow, self.timeout)
            return
        seconds = self.timeout
        instance = flow.metadata.get(ROUTED) or "of a static fetch"
        where = f"{flow.request.method} {flow.request.path.partition('?')[0]} (instance {instance})"
        if not _nothing_received(handler, flow):
            log.warning("datalab: %s: no whole answer head within %d s; closing its connection", where, seconds)
            handler.close_connection(server)  # mitmproxy answers its own 502 page
            return
        log.warning("datalab: %s: no answer within %d s; answering 504", where, seconds)
        flow.metadata[UPSTREAM_TIMEOUT] = True
        await handler.server_event(events.DataReceived(server, closing_answer(errors.upstream_timeout(seconds))))
        if server.state is not ConnectionState.CLOSED:  # never reused: the instance may answer late
            handler.close_connection(server)


def _nothing_received(handler, flow: http.HTTPFlow) -> bool:
    """The flow's upstream HTTP/1 reader holds this flow's request and no byte of an answer."""
    reader = _upstream_reader(handler, flow)
    return reader is not None and reader.request is flow.request and reader.response is None and not reader.buf


def _upstream_reader(handler, flow: http.HTTPFlow) -> Http1Client | None:
    """The HTTP/1 layer reading the flow's upstream connection: below the client's layers (the
    reverse mode, TLS), the HTTP layer keeps one per upstream connection."""
    current: layer.Layer | None = handler.layer
    for _ in range(MAX_LAYERS):
        if current is None or isinstance(current, HttpLayer):
            break
        current = current.layer if isinstance(current, layer.NextLayer) else getattr(current, "child_layer", None)
    if not isinstance(current, HttpLayer):
        return None
    client = getattr(current.connections.get(flow.server_conn), "child_layer", None)
    return client if isinstance(client, Http1Client) else None
