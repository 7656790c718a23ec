"""datalab_websocket=passthrough: a routed WebSocket, once its instance has answered 101, is relayed
as raw TCP, its frames never parsed.

Why: mitmproxy's WebSocket layer decodes every frame (wsproto) and joins a message's fragments
before it forwards them, which held the proxy to ~0.3x configurable-http-proxy in WebSocket round
trips and MB/s (issue 19). The handshake stays an ordinary routed request: the router checks its
Origin, routes it by the session and counts the opening of a kernel's or a terminal's channel as
activity (activity.py); the frames after it are the browser's and the instance's (Jupyter records
a kernel's and a terminal's activity itself). mitmproxy hands a 101 to its TCP layer when the
flow's `websocket` is cleared in the `response` hook (proxy/layers/http/__init__.py,
HttpStream.flow_done, with the `rawtcp` option on, its default).

That TCP layer would make a flow, call the tcp_message hook for every read (a task and a trip
through every addon that has it) and keep every read in the flow's history: half the throughput
again. So flow_done's TCP layer is made here (install), flowless for a passthrough's connection:
no hook, no history, bytes relayed as they are read; and once it has started, its two sockets are
spliced (splice.py): bytes go from one to the other outside mitmproxy's layers. Where this
mitmproxy's HTTP layer is not the one this was written for, a passthrough keeps its TCP flow,
which gets the upgrade's marks (tcp_start): guards.TrimWebSockets trims its history, deadlines.py
ends the request at its end.
Either way the connection's request is in flight for the header deadline until it closes.

What a passthrough gives up: datalab_max_ws_message (websocket_bound.py bounds parsed messages
only) and mitmweb's view of each message; parse (the default of mitmdump -s and mitmweb) keeps both.
An ended instance's WebSockets close as parsed ones do: its container or process goes, so does
the upstream connection, and the TCP layer then closes the browser's side.
"""

from __future__ import annotations

import logging
import types

from mitmproxy import connection
from mitmproxy import ctx
from mitmproxy import http
from mitmproxy import tcp
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tcp as tcp_layers

import splice
from marks import PASSTHROUGH
from marks import ROUTED
from runtime import Runtime

log = logging.getLogger(__name__)

PASSTHROUGH_MODE = "passthrough"
_BARE: set[str] = set()  # client connection ids whose coming TCP layer relays without a flow


SPLICING = splice.supported()  # a passthrough's sockets are spliced (splice.py), else relayed by the TCP layer


def _tcp_layer(context: Context) -> tcp_layers.TCPLayer:
    """mitmproxy's TCP layer, flowless (no hook per read, no history) for a passthrough's connection,
    which splices its sockets where this mitmproxy allows (splice.py)."""
    if context.client.id not in _BARE:
        return tcp_layers.TCPLayer(context)
    return splice.SplicingTCPLayer(context) if SPLICING else tcp_layers.TCPLayer(context, ignore=True)


def install() -> bool:
    """Have the HTTP layer's upgrades (its one use of the tcp module: HttpStream.flow_done) make
    their TCP layer through _tcp_layer; False when this mitmproxy's HTTP layer is not the one this
    was written for (then a passthrough keeps its TCP flow, trimmed by guards.TrimWebSockets)."""
    if _tcp_layer_is_ours():
        return True
    if getattr(http_layers, "tcp", None) is not tcp_layers:
        return False
    http_layers.tcp = types.SimpleNamespace(TCPLayer=_tcp_layer)
    return True


class WebSocketPassthrough:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._upgraded: dict[str, http.HTTPFlow] = {}  # client connection id -> its upgrade, until tcp_start
        if not install():
            log.warning("datalab: mitmproxy's HTTP layer is not the one passthrough.py knows: TCP flows are kept")
        elif not SPLICING:
            log.warning("datalab: mitmproxy's connection handling is not the one splice.py knows: not spliced")

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
        if _tcp_layer_is_ours():
            _BARE.add(flow.client_conn.id)  # the connection ends with it: no other upgrade follows
        else:
            self._upgraded[flow.client_conn.id] = flow

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """The TCP layer's flow of an upgrade (when it has one): it carries the upgrade's instance and flow id."""
        upgrade = self._upgraded.pop(flow.client_conn.id, None)
        if upgrade is None:
            return
        flow.metadata[ROUTED] = upgrade.metadata[ROUTED]
        flow.metadata[PASSTHROUGH] = upgrade.id

    def client_disconnected(self, client: connection.Client) -> None:
        self._upgraded.pop(client.id, None)  # (an upgrade whose TCP layer never started)
        _BARE.discard(client.id)


def _tcp_layer_is_ours() -> bool:
    current = getattr(http_layers, "tcp", None)
    return isinstance(current, types.SimpleNamespace) and current.TCPLayer is _tcp_layer
