"""A WebSocket message may be held up to datalab_max_ws_message bytes, in either direction; past
that the WebSocket is closed with 1009 (message too big), towards the sender and the other side.

Why a patch: mitmproxy (written against 12.3.1) relays a WebSocket message only once its last
frame is in. Its WebSocket layer (proxy/layers/websocket.py, WebsocketLayer.relay_messages)
appends every fragment, and every piece of one big frame, to a per-direction buffer
(WebsocketConnection.frame_buf) and calls the websocket_message hook only when the message ends:
a sender that never sends its final frame grows that buffer without end, and no addon hook runs
meanwhile (nor does the idle timeout, while bytes flow). wsproto itself streams a frame's payload
as it arrives, keeping only the unparsed rest of one read (at most 64 KiB). So the bound sits at
the one place every message passes through on its way in: WebsocketConnection.events(), the
parser's output, which the layer reads once per read. It counts each piece before the layer keeps
it; the piece that would pass the bound is replaced by a close event, which the layer handles as
any peer's close: a close frame with 1009 to both sides, both connections closed, websocket_end.

One change to that close (a wrapper of WebsocketLayer.relay_messages): the sender's connection
stays open until its close answers ours, what it still sends parsed only to find that close and
thrown away (Drain), for up to DRAIN bytes or the bound, whichever is more; then it is closed. A
sender still writing a big frame would otherwise get a TCP reset and never read the 1009.

The patches are applied once per process (idempotent), when the addon is made, so under mitmdump
-s, mitmweb and lean.py alike; they refuse to apply to a mitmproxy whose layer they were not
written for. A raw relay of WebSockets (datalab_websocket=passthrough, passthrough.py: the lean
entry's default) bypasses this parser and so this bound, by choice (issue 19): the bound holds with
datalab_websocket=parse, which tests/e2e/test_websocket_bound.py sets on every entry it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import wsproto
from mitmproxy import connection
from mitmproxy import http
from mitmproxy import version
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.layer import CommandGenerator
from mitmproxy.proxy.layers import websocket as wslayer
from wsproto.events import CloseConnection
from wsproto.events import Event
from wsproto.events import Message

import counters
from marks import ROUTED
from runtime import Runtime

log = logging.getLogger(__name__)

TOO_BIG = 1009  # RFC 6455 7.4.1: a message too big to process
DRAIN = 16 * 1024 * 1024  # bytes at least a cut sender may still send (thrown away) before its close
FRAME_COST = 64  # bytes each held frame but a message's last counts for besides its payload
REASON = "datalab: a message from the {sender} passed {limit} bytes"  # a close reason is at most 123 bytes
WRITTEN_FOR = "12."  # the mitmproxy major version whose WebSocket layer this module reads
_PATCHED = "_datalab_bounded"  # marks the installed events()
_SIZE = "_datalab_message_size"  # a WebsocketConnection's MessageSize
_CUT = "_datalab_cut"  # set on a WebsocketConnection whose sender passed the bound

_runtime = Runtime()  # the proxy's once WebSocketBound is given it (until then: the default settings)


class MessageSize:
    """What one direction of a WebSocket holds of its current message: payload bytes, plus
    FRAME_COST per finished frame (a stream of empty fragments costs the layer a list entry each)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0

    def add(self, message: Message) -> int:
        """The size once this piece is kept; a finished message starts the count again."""
        data = message.data
        size = len(data) if isinstance(data, bytes | bytearray) or data.isascii() else len(data.encode())
        after = self.held + size
        self.held = 0 if message.message_finished else after + (FRAME_COST if message.frame_finished else 0)
        return after


def _limit() -> int:
    return _runtime.settings.max_ws_message


def _bounded_events(ws: wslayer.WebsocketConnection) -> Iterator[Event]:
    """The parser's events, each message piece counted before the layer keeps it; past the bound,
    a close (1009) instead, and nothing more of this read."""
    size = getattr(ws, _SIZE, None)
    if size is None:
        size = MessageSize()
        setattr(ws, _SIZE, size)
    limit = _limit()
    for event in wsproto.Connection.events(ws):
        if isinstance(event, Message) and size.add(event) > limit:
            sender = "instance" if ws.client else "client"  # the side facing the instance is wsproto's client
            ws.frame_buf = [b""]  # what was held of the message goes now, not with the layer
            setattr(ws, _CUT, True)
            yield CloseConnection(code=TOO_BIG, reason=REASON.format(sender=sender, limit=limit))
            return
        yield event


class Drain:
    """The state of a WebSocket layer closed by the bound: the sender's connection stays open until
    its close answers ours (so it has read the 1009), or it hangs up, or `left` bytes more have come;
    what it sends meanwhile is parsed only to find that close, and thrown away."""

    def __init__(self, ws: wslayer.WebsocketConnection, left: int):
        self.ws = ws
        self.left = left
        self.closed = False

    def __call__(self, event: events.Event) -> CommandGenerator[None]:
        if self.closed or not isinstance(event, events.ConnectionEvent) or event.connection is not self.ws.conn:
            return  # (events held while a hook ran may still come after the close)
        if isinstance(event, events.DataReceived):
            self.left -= len(event.data)
            self.ws.receive_data(event.data)
            answered = any(isinstance(e, CloseConnection) for e in wsproto.Connection.events(self.ws))
            if not answered and self.left >= 0:
                return
        self.closed = True
        yield commands.CloseConnection(self.ws.conn)


def _cut(wsl: wslayer.WebsocketLayer) -> wslayer.WebsocketConnection | None:
    for ws in (wsl.client_ws, wsl.server_ws):
        if getattr(ws, _CUT, False):
            return ws
    return None


def _is_cut_sender(wsl: wslayer.WebsocketLayer, conn: connection.Connection) -> bool:
    sender = _cut(wsl)
    return sender is not None and sender.conn is conn


def _relaying(relay_messages):
    """mitmproxy's relay_messages, but the layer's close of a sender cut by the bound leaves that
    sender's connection open, for Drain to close."""

    def relay_bounded(self: wslayer.WebsocketLayer, event: events.Event) -> CommandGenerator[None]:
        inner = relay_messages(self, event)
        reply = None
        while True:
            try:
                command = inner.send(reply)
            except StopIteration:
                break
            if isinstance(command, commands.CloseConnection) and _is_cut_sender(self, command.connection):
                continue
            reply = yield command
        sender = _cut(self)
        if sender is not None and self._handle_event == self.done:
            self._handle_event = Drain(sender, max(DRAIN, _limit()))

    setattr(relay_bounded, _PATCHED, True)
    return relay_bounded


def install() -> None:
    """Route mitmproxy's WebSocket layer through the bound (once; later calls do nothing)."""
    conn, wsl = wslayer.WebsocketConnection, wslayer.WebsocketLayer
    if getattr(conn.events, _PATCHED, False):
        return
    if not version.VERSION.startswith(WRITTEN_FOR) or "events" in vars(conn) or not hasattr(wsl, "done"):
        raise RuntimeError(
            f"addon/websocket_bound.py reads mitmproxy {WRITTEN_FOR}x's WebSocket layer, not "
            f"{version.VERSION}'s: check it against proxy/layers/websocket.py before upgrading"
        )
    wsl.relay_messages = _relaying(wsl.relay_messages)
    setattr(_bounded_events, _PATCHED, True)
    conn.events = _bounded_events


class WebSocketBound:
    """Installs the bound, gives it the runtime (whose settings it reads), and logs and counts the
    WebSockets it closes."""

    def __init__(self, runtime: Runtime):
        global _runtime
        _runtime = runtime
        install()

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        ws = flow.websocket
        if ws is None or ws.close_code != TOO_BIG or not (ws.close_reason or "").startswith("datalab: "):
            return
        log.warning(
            "datalab: closed the WebSocket %s of instance %s (1009): %s (datalab_max_ws_message)",
            flow.request.path.split("?")[0],
            flow.metadata.get(ROUTED),
            ws.close_reason.removeprefix("datalab: "),
        )
        counters.websocket_too_big(ws.closed_by_client)  # the layer counts the close as the sender's
