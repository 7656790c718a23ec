"""A passthrough WebSocket's bytes moved from socket to socket, outside mitmproxy's layers.

Why: the flowless TCP layer (passthrough.py) still costs every read a wake-up of the connection's
read task, an event through the connection's five layers, a command, and a drain of every writer:
it held the lean entry to ~0.45x configurable-http-proxy in WebSocket round trips (issue 19). Once
that layer has started (the 101, and whatever mitmproxy's HTTP layers held after it, are written by
the next turn of the loop), each socket's asyncio transport is given a `Splice` protocol that writes
what it reads straight to the other socket's transport; a full write buffer pauses reading the other
socket (asyncio's own flow control), so memory stays flat.

What stays mitmproxy's: everything but the bytes. An end of stream, a lost connection and the
write-buffer signals are handed to the stream's own protocol, so mitmproxy's read task sees the end as
it would have (its TCP layer half-closes or closes the other side, the hooks run), and whatever closes
a connection today (deadlines.close_client, heads.close_socket, an ended instance's socket going away)
closes a spliced one the same way. Bytes a stream held unread when the splice began are read by
mitmproxy first; what comes meanwhile joins them, in order. Each read is activity for mitmproxy's idle
`tcp_timeout`, as its read task's were. A connection with TLS is never spliced (mitmproxy does TLS in
its layers: its sockets carry ciphertext), nor one that is no asyncio stream or is half-closed.

Written against mitmproxy 12.3.1 and CPython 3.12: ConnectionHandler.transports (ConnectionIO with
asyncio streams), timeout_watchdog.register_activity, TCPLayer.relay_messages, StreamReader's _buffer
and _eof, StreamReaderProtocol's _paused; `supported()` checks them (tests/test_splice.py fails
loudly when they move; passthrough then relays through its TCP layer, unspliced).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy import connection
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events
from mitmproxy.proxy import server
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import tcp as tcp_layers
from mitmproxy.proxy.utils import expect

from handlers import handler_of

log = logging.getLogger(__name__)


class Splice(asyncio.Protocol):
    """One socket's protocol once spliced: what it reads goes to its peer's transport; the rest of what
    asyncio tells it goes to the stream's own protocol as well (mitmproxy's ends, drains, closes)."""

    def __init__(
        self,
        own: asyncio.StreamReaderProtocol,
        reader: asyncio.StreamReader,
        transport: asyncio.Transport,
        activity: Callable[[], None],
    ):
        self.own = own
        self.reader = reader
        self.transport = transport
        self.activity = activity
        self.peer: Splice = self
        self.held = False  # reading paused by us: the peer's write buffer is full

    def data_received(self, data: bytes) -> None:
        self.activity()
        if self.reader._buffer or self.reader._eof:  # mitmproxy reads what came before: this goes after it
            self.own.data_received(data)
        elif not self.peer.transport.is_closing():  # (mitmproxy drops what a closing peer would get, too)
            self.peer.transport.write(data)
            if self.held:  # (the stream's reader resumed reading once it had read its rest)
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return self.own.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.release()  # mitmproxy waits for the peer's end now: it must be read
        self.own.connection_lost(exc)

    def pause_writing(self) -> None:
        self.peer.hold()
        self.own.pause_writing()

    def resume_writing(self) -> None:
        self.peer.release()
        self.own.resume_writing()

    def hold(self) -> None:
        if not self.transport.is_closing() and self.transport.is_reading():
            self.transport.pause_reading()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            if not self.transport.is_closing():
                self.transport.resume_reading()


def splice(handler: server.ConnectionHandler, client: connection.Client, upstream: connection.Server) -> bool:
    """Splice a client's socket to its upstream's; False (nothing changed) where either cannot be."""
    ends = [_end(handler, conn) for conn in (client, upstream)]
    if ends[0] is None or ends[1] is None:
        return False
    ends[0].peer, ends[1].peer = ends[1], ends[0]
    for end in ends:
        end.transport.set_protocol(end)
        if end.own._paused:  # its write buffer is full already: asyncio will not say so again
            end.peer.hold()
    return True


def _end(handler: server.ConnectionHandler, conn: connection.Connection) -> Splice | None:
    """A Splice for a plain, open asyncio socket of the handler's; None for any other."""
    io = handler.transports.get(conn)
    if io is None or conn.tls or conn.state is not ConnectionState.OPEN:
        return None
    if not isinstance(io.reader, asyncio.StreamReader) or not isinstance(io.writer, asyncio.StreamWriter):
        return None
    transport = io.writer.transport
    own = transport.get_protocol()
    if transport.is_closing() or not isinstance(own, asyncio.StreamReaderProtocol):
        return None
    return Splice(own, io.reader, transport, handler.timeout_watchdog.register_activity)


def _splice_connection(client: connection.Client, upstream: connection.Server) -> None:
    handler = handler_of(client)
    if handler is not None and not splice(handler, client, upstream):
        log.debug("datalab: %s not spliced (TLS, closing or no asyncio stream): relayed by mitmproxy", client.peername)


class SplicingTCPLayer(tcp_layers.TCPLayer):
    """mitmproxy's TCP layer, flowless, whose sockets are spliced on the next turn of the loop once it
    relays (the commands of the event that started it, the 101 among them, are written by then)."""

    def __init__(self, context: Context):
        super().__init__(context, ignore=True)

    @expect(events.Start)
    def start(self, event: events.Event):
        yield from super().start(event)
        if self._handle_event == self.relay_messages:
            asyncio.get_running_loop().call_soon(_splice_connection, self.context.client, self.context.server)

    _handle_event = start


def supported() -> bool:
    """Whether this mitmproxy and asyncio have what splicing relies on (see the module's docstring)."""
    loop = asyncio.new_event_loop()  # (a stream's parts need one; nothing runs on it)
    try:
        reader = asyncio.StreamReader(loop=loop)
        own = asyncio.StreamReaderProtocol(reader, loop=loop)
    finally:
        loop.close()
    return (
        {"reader", "writer", "handler"} <= set(getattr(server.ConnectionIO, "__dataclass_fields__", {}))
        and callable(getattr(server.TimeoutWatchdog, "register_activity", None))
        and callable(getattr(tcp_layers.TCPLayer, "relay_messages", None))
        and isinstance(getattr(reader, "_buffer", None), bytearray)
        and getattr(reader, "_eof", None) is False
        and getattr(own, "_paused", None) is False
    )
