"""Last-line guards that hold whatever the other addons do.

TransportSecurity tells browsers that reached the proxy over HTTPS to come back only over HTTPS
(HSTS), when datalab_cookie_secure says the proxy is meant to be served so.

mitmproxy only logs an exception raised in a hook and then sends the flow to the reverse-mode
default target. FailClosed answers 500 for any flow that no datalab addon claimed, and has the last
word on every upstream connection: it opens only towards the upload sink or an address the backend
vouches for, so a bug (in any addon, or one that skipped the other hooks) can never forward a
request somewhere it was not routed. TrimWebSockets bounds the message history mitmproxy keeps
per WebSocket (and per raw TCP flow: a WebSocket in passthrough), which otherwise grows for as long
as a kernel is connected, in number and bytes (a message's own size is websocket_bound.py's).
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy import tcp
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

import answers
from errors import ApiError
from marks import HANDLED
from marks import ROUTED
from marks import SINK
from marks import STATIC
from marks import WORK
from runtime import Runtime
from upload import SINK_HOST
from upload import UploadSink
from work_files import WorkFiles

log = logging.getLogger(__name__)

WEBSOCKET_MESSAGES_KEPT = 10
WEBSOCKET_BYTES_KEPT = 1024 * 1024  # of the messages before the newest
HSTS_SECONDS = 31_536_000  # a year


def _not_routed(flow: http.HTTPFlow, phase: str) -> ApiError:
    log.error("datalab: %s %s was not routed in %s; refusing it", flow.request.method, flow.request.path, phase)
    return ApiError(500, "NOT_ROUTED", "the proxy could not route this request; see its log")


class FailClosed:
    def __init__(self, runtime: Runtime, sink: UploadSink, files: WorkFiles | None = None):
        self.runtime = runtime
        self.sink = sink
        self.files = files

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        """Open a connection only to the upload sink, the work file server or an instance's address;
        never fail open."""
        address = data.server.address
        ours = {(SINK_HOST, self.sink.port)} | ({(self.files.HOST, self.files.port)} if self.files else set())
        try:
            allowed = address is not None and (
                (address[0], address[1]) in ours or await self._instance_address(*address)
            )
        except Exception as e:  # whatever went wrong, the answer is no
            log.error("datalab: could not check the upstream %s: %s", address, e)
            allowed = False
        if not allowed:
            log.error("datalab: refused to connect to %s, which is neither an instance nor the upload sink", address)
            data.server.error = "datalab: this request was not routed (see the proxy's log)"

    async def _instance_address(self, host: str, port: int) -> bool:
        instances = self.runtime.instances
        return instances is not None and await instances.backend.could_have_given(host, port)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not (flow.metadata.get(HANDLED) or flow.metadata.get(ROUTED) or flow.metadata.get(SINK)):
            answers.refuse(flow, self.sink, _not_routed(flow, "requestheaders"))

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not any(flow.metadata.get(mark) for mark in (ROUTED, STATIC, SINK, WORK)):
            flow.response = _not_routed(flow, "request").response()  # the body was read: nothing to drain


class TrimWebSockets:
    """mitmproxy keeps every message of a WebSocket in its flow (for mitmweb), and every read of a
    raw TCP flow (a WebSocket in passthrough: passthrough.py). Kept here: the newest (being
    relayed), and before it up to WEBSOCKET_MESSAGES_KEPT in all within WEBSOCKET_BYTES_KEPT bytes,
    so an open WebSocket holds one message (up to datalab_max_ws_message; a passthrough's: one read)
    plus 1 MiB, not ten of the biggest size."""

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        trim(flow.websocket.messages if flow.websocket else [])

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        trim(flow.messages)


def trim(messages: list) -> None:
    """Keep the newest message, and before it up to WEBSOCKET_MESSAGES_KEPT in all within
    WEBSOCKET_BYTES_KEPT bytes (WebSocket or TCP messages: each has `content`)."""
    kept, size = 1, 0
    while kept < min(len(messages), WEBSOCKET_MESSAGES_KEPT):
        size += len(messages[-kept - 1].content)
        if size > WEBSOCKET_BYTES_KEPT:
            break
        kept += 1
    del messages[:-kept]


class TransportSecurity:
    """Strict-Transport-Security on every answer given over TLS with datalab_cookie_secure: a
    network attacker then cannot lead the browser to a plain-HTTP page of the proxy's hosts (which
    would be a same-host origin for Jupyter, and could plant cookies)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._mark(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._mark(flow)  # answers the addons gave themselves pass only through this hook

    def _mark(self, flow: http.HTTPFlow) -> None:
        s = self.runtime.settings
        if not s.cookie_secure or not flow.response or not flow.client_conn.tls_established:
            return
        value = f"max-age={HSTS_SECONDS}"
        if s.routing == "subdomain":
            value += "; includeSubDomains"  # every instance host under the public host
        flow.response.headers["Strict-Transport-Security"] = value
