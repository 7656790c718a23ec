"""Request heads are bounded in bytes and lines (heads.py), end to end on real proxy processes: a
header value that never ends, or a head of a million short lines, is refused with 431
HEAD_TOO_LARGE after about datalab_max_head bytes or datalab_max_head_lines lines, the proxy's
memory stays flat and other clients are served; big but legitimate heads still reach Jupyter. The
hostile clients are raw sockets, plain and over TLS; HTTP/2 over the h2 library.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import requests

from e2e.proxy import Browser
from e2e.proxy import Proxy
from e2e.rawhttp import Reply
from e2e.rawhttp import exchange
from e2e.rawhttp import parse
from e2e.rawhttp import start_head
from e2e.tls import TestCA

MIB = 1024 * 1024
FLOOD = 64 * MIB  # what a hostile client tries to send
MEMORY_SLACK = 32 * MIB  # the proxy's resident memory may grow this much while it is flooded, not FLOOD
WAIT = 15.0  # seconds a client waits for an answer before it counts as none
ENDLESS = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: "  # a header value follows, and never ends
ASK = b"GET /datalab/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # the addon's own 404 NOT_FOUND: cheap, no instance


@dataclass
class Flooded:
    reply: Reply | None  # what the proxy answered
    sent: int  # bytes the client got to send before the proxy stopped taking them
    growth: int  # the proxy's largest resident memory while flooded, less its memory before


def rss(pid: int) -> int:
    """The process's resident memory (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _available(sock: socket.socket) -> tuple[bytes, bool]:
    """What the proxy has sent so far, without waiting; and whether it closed the connection."""
    data = b""
    sock.settimeout(0)
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return data, True
    except (BlockingIOError, ssl.SSLWantReadError):
        return data, False
    except (ConnectionError, ssl.SSLError):
        return data, True
    finally:
        sock.settimeout(WAIT)


def _rest(sock: socket.socket, raw: bytes, closed: bool) -> Reply | None:
    """Read until a whole answer (or the close, or WAIT seconds without one)."""
    sock.settimeout(WAIT)
    while not closed and parse(raw, False) is None:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            break
        closed = not chunk
        raw += chunk
    return parse(raw, closed)


def flood(sock: socket.socket, start: bytes, filler: bytes, pid: int, total: int = FLOOD) -> Flooded:
    """Send `start`, then `filler` over and over up to `total` bytes, reading what comes meanwhile
    and sampling the proxy's memory every 4 MiB."""
    before = rss(pid)
    peak, sent, raw, closed = before, 0, b"", False
    sock.settimeout(WAIT)
    data = start
    while sent < total and not closed:
        try:
            sock.sendall(data)
        except (OSError, ssl.SSLError):  # reset, broken pipe, or no longer read at all
            break
        sent += len(data)
        data = filler
        more, closed = _available(sock)
        raw += more
        if sent % (4 * MIB) < len(filler):
            peak = max(peak, rss(pid))
    reply = _rest(sock, raw, closed)
    return Flooded(reply, sent, max(peak, rss(pid)) - before)


def ask(sock: socket.socket) -> Reply:
    """One cheap request on an open connection, and its whole answer (the connection stays open)."""
    sock.sendall(ASK)
    reply = _rest(sock, b"", False)
    assert reply is not None and (reply.status, reply.code) == (404, "NOT_FOUND"), reply
    return reply


def assert_refused(flooded: Flooded, what: str) -> None:
    reply = flooded.reply
    assert reply is not None, f"{what}: no answer after {flooded.sent} bytes"
    assert (reply.status, reply.code) == (431, "HEAD_TOO_LARGE"), f"{what}: {reply}"
    assert reply.headers.get("connection") == "close", reply.headers
    assert flooded.sent < FLOOD, f"{what}: the proxy took all {FLOOD} bytes"
    assert flooded.growth < MEMORY_SLACK, f"{what}: the proxy grew by {flooded.growth / MIB:.0f} MiB"


@pytest.mark.parametrize("tool", ["mitmdump", "lean", "mitmweb"])
def test_an_endless_header_value_is_refused_and_costs_no_memory(make_proxy, tool):
    p = make_proxy(tool=tool)
    for kept_alive in (False, True):
        with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
            if kept_alive:
                ask(s)  # the head that never ends begins once a request was answered on this connection
            flooded = flood(s, ENDLESS, b"a" * 65536, p.proc.pid)
        assert_refused(flooded, f"{tool}, {'kept alive' if kept_alive else 'fresh'} connection")
    assert exchange(p.port, ASK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")).status == 404


def test_a_head_of_a_million_lines_is_refused_while_others_are_served(make_proxy):
    p = make_proxy()
    lines = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"a: b\r\n" * 1_000_000 + b"\r\n"
    outcome: dict = {}

    def hostile() -> None:
        try:
            hostile_sock.sendall(lines)
        except OSError:
            pass  # refused: the proxy stopped reading
        outcome["sent"] = True

    with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as hostile_sock:
        sender = threading.Thread(target=hostile)
        sender.start()
        # While the hostile connection is open (its answer unread), another client gets its answer.
        other = requests.get(p.url("/datalab/"), timeout=WAIT)
        assert (other.status_code, other.json()["code"]) == (404, "NOT_FOUND")
        sender.join(WAIT)
        assert outcome.get("sent"), "the hostile client is still sending"
        reply = _rest(hostile_sock, b"", False)
    assert reply is not None and (reply.status, reply.code) == (431, "HEAD_TOO_LARGE"), reply
    assert "100 lines" in reply.body.decode(), reply.body


@pytest.fixture(scope="module")
def session(proxy) -> Browser:
    """A browser with a session on an instance of the shared proxy."""
    nonce = proxy.start_instance("heads.csv", b"a,b\n1,2\n")
    browser = Browser(proxy)
    browser.view(nonce)
    return browser


def test_big_but_legitimate_heads_reach_jupyter(session):
    """8 KiB of cookies and 40 more headers (a browser sends about 20): JupyterLab's API answers."""
    cookies = {f"tracker{i}": "v" * 200 for i in range(40)}  # 40 cookies of 200 bytes: 8 KiB
    headers = {f"X-Extra-{i}": "x" * 20 for i in range(40)}
    r = session.get("/api/status", cookies=cookies, headers=headers)
    assert r.status_code == 200, r.text
    assert "started" in r.json()


def test_a_chunk_size_line_that_never_ends_is_cut(make_proxy):
    """A chunked body whose size line never ends (its extension goes on and on)."""
    p = make_proxy()
    head = b"POST /datalab/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n1;x="
    with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
        flooded = flood(s, head, b"e" * 65536, p.proc.pid)
    assert flooded.sent < FLOOD, "the proxy took every byte"
    assert flooded.growth < MEMORY_SLACK, f"the proxy grew by {flooded.growth / MIB:.0f} MiB"


def test_a_routed_bodys_chunk_size_line_that_never_ends_is_cut(session, proxy):
    """The same on its way to an instance (PUT /api/contents), its connection to it opening."""
    head = (
        "PUT /api/contents/x.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: application/json\r\nCookie: {session.cookie_header()}\r\n\r\n1;x="
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as s:
        flooded = flood(s, head, b"e" * 65536, proxy.proc.pid)
    assert flooded.sent < FLOOD, "the proxy took every byte"
    assert flooded.growth < MEMORY_SLACK, f"the proxy grew by {flooded.growth / MIB:.0f} MiB"


def test_a_head_sent_while_a_start_runs_is_bounded(make_proxy):
    """An upload's client that, its body sent, floods the connection while its instance boots (an
    upload's connection is read on meanwhile, to see it hang up)."""
    p = make_proxy()
    body = b"a,b\n1,2\n"
    with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
        flooded = flood(s, start_head(p.sign_key, "flood.csv", len(body)) + body + ENDLESS, b"a" * 65536, p.proc.pid)
    assert flooded.sent < FLOOD, "the proxy took every byte"
    assert flooded.growth < MEMORY_SLACK, f"the proxy grew by {flooded.growth / MIB:.0f} MiB"


def test_the_bounds_are_exact_and_count_heads_not_bodies(make_proxy):
    p = make_proxy(datalab_max_head=2048, datalab_max_head_lines=20)

    def head(size: int = 0, lines: int = 2) -> bytes:
        """A GET /datalab/ head of `lines` lines (request line included) of exactly `size` bytes."""
        fields = [f"X-{i}: y".encode() for i in range(lines - 2)]
        first = b"GET /datalab/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(f + b"\r\n" for f in fields)
        pad = max(0, size - len(first) - len(b"Connection: close\r\n\r\n") - len(b"X-Pad: \r\n"))
        pad_field = b"X-Pad: " + b"p" * pad + b"\r\n" if size else b""
        if size:
            first = first.replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\n" + pad_field)
        data = first + b"Connection: close\r\n\r\n"
        assert not size or len(data) == size, (len(data), size)
        return data

    def answer(data: bytes) -> tuple[int, str | None]:
        reply = exchange(p.port, data)
        return reply.status, reply.code

    assert answer(head(size=2048)) == (404, "NOT_FOUND")
    assert answer(head(size=2049)) == (431, "HEAD_TOO_LARGE")
    assert answer(head(lines=19)) == (404, "NOT_FOUND")  # 19 lines and Connection: close: 20
    assert answer(head(lines=20)) == (431, "HEAD_TOO_LARGE")
    # A small head whose body, read with it, is big and of many lines: the body is not the head.
    body = b"x\n" * 50_000
    post = b"POST /datalab/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    assert answer(post + b"Content-Length: %d\r\n\r\n" % len(body) + body) == (404, "NOT_FOUND")
    # Two heads sent at once: the second is counted from where the first ended.
    small = b"GET /datalab/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
        s.sendall(small + b"GET /datalab/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"z" * 4096 + b"\r\n\r\n")
        raw, closed = b"", False
        while not closed and raw.count(b"HTTP/1.1 ") < 2:
            chunk = s.recv(65536)
            closed, raw = not chunk, raw + chunk
    first, _, second = raw.partition(b"HTTP/1.1 431")
    assert first.startswith(b"HTTP/1.1 404") and b"HEAD_TOO_LARGE" in second, raw[:500]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[TestCA, Path]:
    """A CA, and the key-and-chain file mitmproxy's --certs takes for a leaf it signed."""
    where = tmp_path_factory.mktemp("heads-tls")
    ca = TestCA(where)
    combined = where / "combined.pem"
    combined.write_bytes(ca.key.read_bytes() + ca.fullchain.read_bytes())
    return ca, combined


def tls_proxy(redis_server, world, sign_key, tmp_path, certs) -> Proxy:
    ca, combined = certs
    p = Proxy(
        redis_server.url,
        world.prefix,
        sign_key,
        tmp_path,
        {"datalab_pool_size": 0},
        args=["--certs", f"*={combined}"],
        url_scheme="https",
        verify=str(ca.ca),
    )
    return p.start()


def tls_socket(port: int, ca: TestCA, alpn: list[str]) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca.ca))
    context.set_alpn_protocols(alpn)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT), server_hostname="localhost")


def test_an_endless_header_value_over_tls_is_refused(redis_server, world, sign_key, tmp_path, certs):
    p = tls_proxy(redis_server, world, sign_key, tmp_path, certs)
    try:
        with tls_socket(p.port, certs[0], ["http/1.1"]) as s:
            flooded = flood(s, ENDLESS, b"a" * 65536, p.proc.pid)
        assert_refused(flooded, "over TLS")
    finally:
        p.stop()


def h2_headers(sock: ssl.SSLSocket, port: int, fields: list[tuple[str, str]]) -> int | str:
    """One GET over HTTP/2 with these header fields (h2 splits the block into CONTINUATION frames);
    the answer's status, or how the stream or connection ended without one."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.max_outbound_frame_size = 16384
    request = [(":method", "GET"), (":scheme", "https"), (":authority", f"localhost:{port}"), (":path", "/datalab/")]
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, request + fields, end_stream=True)
    try:
        sock.sendall(conn.data_to_send())
    except OSError as e:
        return f"closed while sending ({e})"
    sock.settimeout(WAIT)
    while True:
        try:
            data = sock.recv(65536)
        except (TimeoutError, OSError) as e:
            return f"no answer ({e})"
        if not data:
            return "closed"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                return int(dict(event.headers)[b":status"])
            if isinstance(event, h2.events.StreamReset):
                return f"reset {event.error_code!r}"
            if isinstance(event, h2.events.ConnectionTerminated):
                return f"terminated {event.error_code!r}"
        try:
            sock.sendall(conn.data_to_send())
        except OSError as e:  # the proxy cut the block and closed (sooner, on a loaded machine)
            return f"closed while sending ({e})"


def test_http2_heads_are_bounded_too(redis_server, world, sign_key, tmp_path, certs):
    """Over HTTP/2, too many header fields are refused (431); a header block of megabytes (HEADERS
    and CONTINUATION frames) is cut by h2 itself, and costs the proxy no memory."""
    p = tls_proxy(redis_server, world, sign_key, tmp_path, certs)
    try:
        with tls_socket(p.port, certs[0], ["h2"]) as s:
            assert h2_headers(s, p.port, [(f"x-{i}", "y" * 20) for i in range(40)]) == 404
        with tls_socket(p.port, certs[0], ["h2"]) as s:
            assert h2_headers(s, p.port, [(f"x-{i}", "y") for i in range(200)]) == 431
        before = rss(p.proc.pid)
        with tls_socket(p.port, certs[0], ["h2"]) as s:
            huge = [(f"x-{i}", "z" * 8000) for i in range(200)]  # 1.6 MB: HEADERS and 100 CONTINUATION frames
            outcome = h2_headers(s, p.port, huge)
        assert outcome == 431 or isinstance(outcome, str), outcome
        assert rss(p.proc.pid) - before < MEMORY_SLACK
    finally:
        p.stop()
