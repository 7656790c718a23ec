"""Last-line guards that hold whatever the other addons do.

mitmproxy only logs an exception raised in a hook and then sends the flow to the reverse-mode
default target. FailClosed answers 500 for any flow that no datalab addon claimed, so a bug can
never forward a request somewhere it was not routed. TrimWebSockets bounds the message history
mitmproxy keeps per WebSocket, which otherwise grows for as long as a kernel is connected.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from errors import ApiError
from marks import HANDLED
from marks import ROUTED
from marks import SINK
from marks import STATIC

log = logging.getLogger(__name__)

WEBSOCKET_MESSAGES_KEPT = 10


def _refuse(flow: http.HTTPFlow, phase: str) -> None:
    log.error("datalab: %s %s was not routed in %s; refusing it", flow.request.method, flow.request.path, phase)
    flow.response = ApiError(500, "NOT_ROUTED", "the proxy could not route this request; see its log").response()


class FailClosed:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not (flow.metadata.get(HANDLED) or flow.metadata.get(ROUTED)):
            _refuse(flow, "requestheaders")

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not (flow.metadata.get(ROUTED) or flow.metadata.get(STATIC) or flow.metadata.get(SINK)):
            _refuse(flow, "request")


class TrimWebSockets:
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        messages = flow.websocket.messages if flow.websocket else []
        if len(messages) > WEBSOCKET_MESSAGES_KEPT:
            del messages[:-WEBSOCKET_MESSAGES_KEPT]
