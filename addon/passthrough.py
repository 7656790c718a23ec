"""datalab_websocket=passthrough: a routed WebSocket, once its instance has answered 101, is relayed
as raw TCP, its frames never parsed.

Why: mitmproxy's WebSocket layer decodes every frame (wsproto) and joins a message's fragments
before it forwards them, which held the proxy to ~0.3x configurable-http-proxy in WebSocket round
trips and MB/s (issue 19). The handshake stays an ordinary routed request: the router checks its
Origin, routes it by the session and counts the opening of a kernel's or a terminal's channel as
activity (activity.py); the frames after it are the browser's and the instance's (Jupyter records
a kernel's and a terminal's activity itself). mitmproxy hands a 101 to its TCP layer when the
flow's `websocket` is cleared in the `response` hook (proxy/layers/http/__init__.py,
HttpStream.flow_done, with the `rawtcp` option on, its default). That layer makes a flow of its
own (tcp_start), which gets the upgrade's marks here: guards.TrimWebSockets trims its history,
deadlines.py keeps the connection's request in flight until it ends.

What a passthrough gives up: datalab_max_ws_message (websocket_bound.py bounds parsed messages
only) and mitmweb's view of each message; parse (the default of mitmdump -s and mitmweb) keeps both.
An ended instance's WebSockets close as parsed ones do: its container or process goes, so does
the upstream connection, and the TCP layer then closes the browser's side.
"""

from __future__ import annotations

import logging

from mitmproxy import connection
from mitmproxy import ctx
from mitmproxy import http
from mitmproxy import tcp

from marks import PASSTHROUGH
from marks import ROUTED
from runtime import Runtime

log = logging.getLogger(__name__)

PASSTHROUGH_MODE = "passthrough"


class WebSocketPassthrough:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._upgraded: dict[str, http.HTTPFlow] = {}  # client connection id -> its upgrade, until tcp_start

    def configure(self, updated: set[str]) -> None:
        if self._on() and not ctx.options.rawtcp:
            log.warning("datalab: datalab_websocket=passthrough needs rawtcp; WebSockets are parsed instead")

    def _on(self) -> bool:
        return self.runtime.settings.websocket == PASSTHROUGH_MODE

    def response(self, flow: http.HTTPFlow) -> None:
        """A routed WebSocket's 101: the connection goes to mitmproxy's TCP layer once it is sent."""
        if flow.websocket is None or ROUTED not in flow.metadata or flow.error or not self._on():
            return
        if flow.response is None or flow.response.status_code != 101 or not ctx.options.rawtcp:
            return
        flow.websocket = None
        flow.metadata[PASSTHROUGH] = True
        self._upgraded[flow.client_conn.id] = flow

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """The TCP layer's flow of an upgrade: it carries the upgrade's instance and flow id."""
        upgrade = self._upgraded.pop(flow.client_conn.id, None)
        if upgrade is None:
            return
        flow.metadata[ROUTED] = upgrade.metadata[ROUTED]
        flow.metadata[PASSTHROUGH] = upgrade.id

    def client_disconnected(self, client: connection.Client) -> None:
        self._upgraded.pop(client.id, None)  # (an upgrade whose TCP layer never started)
