"""Request heads are bounded in bytes and in lines (datalab_max_head, datalab_max_head_lines).

mitmproxy (written against 12.3.1) buffers an HTTP/1 request head until its blank line comes, with
no limit ("FIXME: protect against header size DoS" in proxy/layers/http/_http1.py): a connection
whose header value never ends holds as much of the proxy's memory as it sends, and a head of a
million short lines holds the event loop for seconds while it is parsed (and again in each addon
that looks a header up). datalab_header_timeout bounds the time a head takes, not its bytes.

HTTP/1, plain or inside TLS (the layer sees the decrypted bytes): `BoundedHttp1Server`, mitmproxy's
HTTP/1 server layer with three states bounded, counts the bytes and line ends buffered before a head
completes as each chunk arrives (the line ends of the new chunk only), and refuses a head over
either limit before it is parsed: `431 HEAD_TOO_LARGE` with `Connection: close`; then what the
client goes on sending is read and dropped for a moment (so it reads the answer, not a reset) and
the connection closes. A head that begins on a kept-alive connection is counted from where the last
request ended. Also bounded by datalab_max_head: what a client sends while its request is in flight
(the next head: reading pauses until the answer) and a chunked body's size line or trailers (the
connection closes).

HTTP/2: h2 bounds a header block itself (at most 64 CONTINUATION frames, a decoded list of 64 KiB;
past it the connection is closed); `HeadBounds.requestheaders` applies the two limits to the fields
it decoded (431).

mitmproxy has no hook before a head is parsed, so `install` puts the subclass in the place of
mitmproxy's own class in the module whose HTTP layer creates it, once, from `HeadBounds.load`: under
`mitmdump -s`, mitmweb and lean.py alike. It fails the start-up if mitmproxy's class no longer has
what the subclass builds on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref

from mitmproxy import connection
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.utils import human

import errors
from handlers import client_io
from handlers import closing_answer
from runtime import Runtime

log = logging.getLogger(__name__)

LINGER_BYTES = 1024 * 1024  # after a 431: bytes read and dropped at most before the connection closes
LINGER_SECONDS = 2.0  # ... and seconds
_LEADING_BLANK_LINES = re.compile(rb"(?:\r?\n)*")  # skipped before a request line (mitmproxy: one per chunk)
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head, as h11's buffer finds it
_BUILT_ON = ("read_headers", "read_body", "wait", "done", "mark_done")  # methods; and its buf, stream_id, state
_MITMPROXY_HTTP1 = http_layers.Http1Server

_runtime = Runtime()  # the proxy's once install() is given it (until then: the default settings)
# Each client's HTTP/1 layer, by client id: how much it holds unparsed (backlog) paces reading.
_layers: weakref.WeakValueDictionary[str, BoundedHttp1Server] = weakref.WeakValueDictionary()


def limits() -> tuple[int, int]:
    """(bytes, lines) a request head may have."""
    s = _runtime.settings
    return s.max_head, s.max_head_lines


def over_limits(data: bytes) -> str | None:
    """Why the head at the start of `data` (after any blank lines) is refused, or None if it is
    complete within the limits, or still within them."""
    start = _LEADING_BLANK_LINES.match(data).end()
    end = _HEAD_END.search(data, start)
    head_end = end.end() if end else len(data)
    return refusal_of(head_end, data.count(b"\n", start, head_end) - (1 if end else 0))


def refusal_of(size: int, lines: int) -> str | None:
    """Why a head of `size` bytes and `lines` lines (request line included) is refused, or None."""
    max_bytes, max_lines = limits()
    if size > max_bytes:
        return f"a request head may have at most {max_bytes} bytes"
    if lines > max_lines:
        return f"a request head may have at most {max_lines} lines"
    return None


def head_prefix(buf) -> bytes:
    """The first datalab_max_head + 1 bytes of a connection's buffer: all a head within the limit
    can take, and enough to refuse one that is not. Read from h11's buffer without copying the rest
    (its bytearray: a pipelining client's backlog can be far bigger, and this runs once per head)."""
    size = limits()[0] + 1
    data = getattr(buf, "_data", None)
    if isinstance(data, bytearray):
        return bytes(memoryview(data)[:size])
    return bytes(buf)[:size]


class BoundedHttp1Server(_MITMPROXY_HTTP1):
    """mitmproxy's HTTP/1 server layer; the bytes it buffers are bounded in every state."""

    def __init__(self, context):
        super().__init__(context)
        self._counted_head = 0  # the stream id of the head whose line ends are counted
        self._line_ends = 0  # line ends buffered since that head began
        self._dropped = 0  # bytes dropped after a refusal
        self._error: str | None = None  # why the request in flight ends, once the connection closes
        _layers[context.client.id] = self

    def read_headers(self, event: events.ConnectionEvent) -> commands.CommandGenerator:
        if isinstance(event, events.DataReceived):
            refusal = self._check(event.data)
            if refusal is not None:
                yield from self._refuse(refusal)
                return
        yield from super().read_headers(event)

    def _check(self, chunk: bytes) -> str | None:
        """Cheap per chunk: the new chunk's line ends are counted; the buffer is looked at whole
        only once it is over a limit (a head then ends in it, or is refused)."""
        max_bytes, max_lines = limits()
        data = None
        if self._counted_head != self.stream_id:  # a new head: what a kept-alive connection left, once
            self._counted_head = self.stream_id
            data = head_prefix(self.buf)
            self._line_ends = data.count(b"\n")
        else:
            self._line_ends += chunk.count(b"\n")
        if len(self.buf) <= max_bytes and self._line_ends <= max_lines + 1:
            return None
        data = head_prefix(self.buf) if data is None else data
        refusal = over_limits(data)
        if refusal is None:
            # Within the limits: mitmproxy then takes the head in this chunk, after any blank lines
            # before it, which it would otherwise skip one per chunk while the rest piles up.
            blank = _LEADING_BLANK_LINES.match(data).end()
            if blank:
                self.buf.maybe_extract_at_most(blank)
            self._line_ends = data.count(b"\n", blank)
        return refusal

    def _refuse(self, message: str) -> commands.CommandGenerator:
        log.info("datalab: %s: %s: refused (431)", human.format_address(self.conn.peername), message)
        self._drop()
        yield commands.SendData(self.conn, closing_answer(errors.head_too_large(message)))
        self.state = self._linger
        yield commands.RequestWakeup(LINGER_SECONDS)

    def _linger(self, event: events.Event) -> commands.CommandGenerator:
        """After a 431: drop what comes, then close (at the client's own close, or after
        LINGER_BYTES or LINGER_SECONDS)."""
        if isinstance(event, events.DataReceived):
            self._dropped += self._drop()
            if self._dropped > LINGER_BYTES:
                yield from self._close_soon(None)
        elif isinstance(event, events.Wakeup):
            yield from self._close_soon(None)
        elif isinstance(event, events.ConnectionClosed):
            yield from self._close()

    def wait(self, event: events.Event) -> commands.CommandGenerator:
        """A request in flight: what the client sends meanwhile is the next head (or heads,
        pipelined), kept until the answer is given. Past datalab_max_head, reading pauses until
        then (OneRequestAtATime resumes it at the answer), as it does for most requests at once."""
        if isinstance(event, events.DataReceived) and len(self.buf) > limits()[0]:
            pause_socket(self.conn)
        yield from super().wait(event)

    def read_body(self, event: events.Event) -> commands.CommandGenerator:
        """A body leaves nothing in the buffer but a chunked body's size line or trailers not yet
        ended."""
        yield from super().read_body(event)
        if self.state == self.read_body and len(self.buf) > limits()[0]:
            yield from self._cut("a chunk size line or trailers over datalab_max_head")

    def _cut(self, why: str) -> commands.CommandGenerator:
        log.info("datalab: %s: %s: closed", human.format_address(self.conn.peername), why)
        yield from self._close_soon(why)

    def _close_soon(self, error: str | None) -> commands.CommandGenerator:
        """Close the socket itself; mitmproxy then sees the connection end as if the client had
        closed it, and cleans up as it does then. (Its own CloseConnection cancels the connection's
        reader task, and in 12.3.1 a cancellation that lands while that task waits to hand over a
        chunk skips the clean-up: the socket stays open and is read on into memory.) Until then what
        comes is dropped; `error` ends the request in flight."""
        self._drop()
        self._error = error
        self.state = self._closing
        if not close_socket(self.conn):
            yield from self._close()

    def _closing(self, event: events.Event) -> commands.CommandGenerator:
        if isinstance(event, events.DataReceived):
            self._drop()
        elif isinstance(event, events.ConnectionClosed):
            yield from self._close()

    def _close(self) -> commands.CommandGenerator:
        self.state = self.done
        yield commands.CloseConnection(self.conn)
        if self._error is not None:
            code = http_layers.ErrorCode.CLIENT_DISCONNECTED
            yield http_layers.ReceiveHttp(http_layers.RequestProtocolError(self.stream_id, self._error, code=code))

    def _drop(self) -> int:
        """Empty the buffer; how many bytes it held."""
        size = len(self.buf)
        self.buf.maybe_extract_at_most(size)
        return size


def backlog(client: connection.Client) -> int:
    """Bytes a client has sent that its HTTP/1 layer holds unparsed (pipelined requests)."""
    layer = _layers.get(client.id)
    return len(layer.buf) if layer is not None else 0


def close_socket(conn: connection.Client) -> bool:
    """Close a client's socket (after what was written to it); False if it is not found."""
    _, io = client_io(conn)
    if io is None:
        return False
    io.writer.transport.close()
    return True


def pause_socket(conn: connection.Client) -> None:
    _, io = client_io(conn)
    if io is not None:
        hold_reading(io.writer.transport, io.reader)


def hold_reading(transport: asyncio.Transport, reader: asyncio.StreamReader) -> None:
    """Stop reading a client's socket until it is resumed on purpose. asyncio's StreamReader pauses
    and resumes the same socket for its own flow control: once it had paused it, mitmproxy's next
    read resumed it whatever else had paused it, and a pipelining client was read at full speed.
    So the pause becomes this one alone (the reader no longer counts it as its own)."""
    if transport.is_closing():
        return
    if transport.is_reading():
        transport.pause_reading()
    if getattr(reader, "_paused", False):
        reader._paused = False


def install(runtime: Runtime) -> None:
    """Make mitmproxy's HTTP layer create BoundedHttp1Server for clients (idempotent)."""
    global _runtime
    _runtime = runtime
    missing = [name for name in _BUILT_ON if not hasattr(_MITMPROXY_HTTP1, name)]
    if missing:
        raise RuntimeError(f"mitmproxy's Http1Server has no {', '.join(missing)}: heads.py needs updating")
    if http_layers.Http1Server is not BoundedHttp1Server:
        http_layers.Http1Server = BoundedHttp1Server


class HeadBounds:
    """Installs the HTTP/1 bound at load; bounds HTTP/2 (and HTTP/3) heads once decoded."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def load(self, loader) -> None:
        install(self.runtime)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.request.http_version.startswith("HTTP/1"):
            return  # HTTP/1: bounded before it was parsed
        data = flow.request.data
        size = len(data.method) + len(data.path) + len(data.http_version) + 4  # the request line, in HTTP/1
        size += sum(len(name) + len(value) + 4 for name, value in data.headers.fields) + 2
        refusal = refusal_of(size, 1 + len(data.headers.fields))
        if refusal is not None:
            log.info("datalab: %s: %s: refused (431)", human.format_address(flow.client_conn.peername), refusal)
            flow.response = errors.head_too_large(refusal).response()
