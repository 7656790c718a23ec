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
(the next head: the connection closes) and a chunked body's size line or trailers (likewise).

HTTP/2: h2 bounds a header block itself (at most 64 CONTINUATION frames, a decoded list of 64 KiB;
past it the connection is closed); `HeadBounds.requestheaders` applies the two limits to the fields
it decoded (431).

mitmproxy has no hook before a head is parsed, so `install` puts the subclass in the place of
mitmproxy's own class in the module whose HTTP layer creates it, once, from `HeadBounds.load`: under
`mitmdump -s`, mitmweb and lean.py alike. It fails the start-up if mitmproxy's class no longer has
what the subclass builds on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.utils import human

import errors
from config import Settings

log = logging.getLogger(__name__)

LINGER_BYTES = 1024 * 1024  # after a 431: bytes read and dropped at most before the connection closes
LINGER_SECONDS = 2.0  # ... and seconds
_LEADING_BLANK_LINES = re.compile(rb"(?:\r?\n)*")  # skipped before a request line (mitmproxy: one per chunk)
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head, as h11's buffer finds it
_BUILT_ON = ("read_headers", "read_body", "wait", "done", "mark_done")  # methods; and its buf, stream_id, state
_MITMPROXY_HTTP1 = http_layers.Http1Server

_DEFAULTS = Settings()
_settings: Callable[[], Settings | None] = lambda: None


def limits() -> tuple[int, int]:
    """(bytes, lines) a request head may have."""
    s = _settings() or _DEFAULTS
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


def head_too_large_answer(message: str) -> bytes:
    response = errors.head_too_large(message).response()
    response.headers["Connection"] = "close"
    return http1.assemble_response(response)


class BoundedHttp1Server(_MITMPROXY_HTTP1):
    """mitmproxy's HTTP/1 server layer; the bytes it buffers are bounded in every state."""

    def __init__(self, context):
        super().__init__(context)
        self._counted_head = 0  # the stream id of the head whose line ends are counted
        self._line_ends = 0  # line ends buffered since that head began
        self._dropped = 0  # bytes dropped after a refusal

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
        if self._counted_head != self.stream_id:  # a new head: what a kept-alive connection left, once
            self._counted_head = self.stream_id
            self._line_ends = bytes(self.buf).count(b"\n")
        else:
            self._line_ends += chunk.count(b"\n")
        if len(self.buf) <= max_bytes and self._line_ends <= max_lines + 1:
            return None
        data = bytes(self.buf)
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
        yield commands.SendData(self.conn, head_too_large_answer(message))
        self.state = self._linger
        yield commands.RequestWakeup(LINGER_SECONDS)

    def _linger(self, event: events.Event) -> commands.CommandGenerator:
        """After a 431: drop what comes, then close (at the client's own close, or after
        LINGER_BYTES or LINGER_SECONDS)."""
        if isinstance(event, events.DataReceived):
            self._dropped += self._drop()
            if self._dropped <= LINGER_BYTES:
                return
        elif not isinstance(event, (events.ConnectionClosed, events.Wakeup)):
            return
        self.state = self.done
        yield commands.CloseConnection(self.conn)

    def wait(self, event: events.Event) -> commands.CommandGenerator:
        """A request in flight: what the client sends meanwhile is the next head, held until the
        answer is given (OneRequestAtATime stops reading most clients; not uploads)."""
        if isinstance(event, events.DataReceived) and len(self.buf) > limits()[0]:
            yield from self._cut("sent over datalab_max_head while its request was in flight")
            return
        yield from super().wait(event)

    def read_body(self, event: events.Event) -> commands.CommandGenerator:
        """A body leaves nothing in the buffer but a chunked body's size line or trailers not yet
        ended."""
        yield from super().read_body(event)
        if self.state == self.read_body and len(self.buf) > limits()[0]:
            yield from self._cut("a chunk size line or trailers over datalab_max_head")

    def _cut(self, why: str) -> commands.CommandGenerator:
        log.info("datalab: %s: %s: closed", human.format_address(self.conn.peername), why)
        self._drop()
        self.state = self.done
        yield commands.CloseConnection(self.conn)
        yield http_layers.ReceiveHttp(
            http_layers.RequestProtocolError(self.stream_id, why, code=http_layers.ErrorCode.CLIENT_DISCONNECTED)
        )

    def _drop(self) -> int:
        """Empty the buffer; how many bytes it held."""
        size = len(self.buf)
        self.buf.maybe_extract_at_most(size)
        return size


def install(settings: Callable[[], Settings | None]) -> None:
    """Make mitmproxy's HTTP layer create BoundedHttp1Server for clients (idempotent)."""
    global _settings
    _settings = settings
    missing = [name for name in _BUILT_ON if not hasattr(_MITMPROXY_HTTP1, name)]
    if missing:
        raise RuntimeError(f"mitmproxy's Http1Server has no {', '.join(missing)}: heads.py needs updating")
    if http_layers.Http1Server is not BoundedHttp1Server:
        http_layers.Http1Server = BoundedHttp1Server


class HeadBounds:
    """Installs the HTTP/1 bound at load; bounds HTTP/2 (and HTTP/3) heads once decoded."""

    def __init__(self, settings: Callable[[], Settings | None]):
        self.settings = settings

    def load(self, loader) -> None:
        install(self.settings)

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
