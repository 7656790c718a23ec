"""scripts/demo.py as a hostile client meets it: a real demo server process, raw requests on a socket.

Its proxy is a closed loopback port: every request here is refused before the demo would sign
anything, or reaches the proxy and gets PROXY_UNREACHABLE (502), which proves the demo signed.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import free_port
from helpers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def run_demo(proxy: str, workdir: Path) -> tuple[subprocess.Popen, int]:
    """The demo on a free loopback port, as run.sh --demo starts it, pointed at `proxy`."""
    port = free_port()
    log = (workdir / f"demo-{port}.log").open("w")
    args = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), "--proxy", proxy]
    proc = subprocess.Popen(args, env={**os.environ, "DATALAB_SIGN_KEY": "demo-test-key"}, stdout=log, stderr=log)
    try:
        wait_for_port(port, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo whose proxy answers nothing."""
    proc, port = run_demo("http://127.0.0.1:1", tmp_path_factory.mktemp("demo"))
    yield port
    stop(proc)


def ask(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send one raw request; the status and JSON answer (status 0: the connection closed unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b"\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    if not answer:
        return 0, {}
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"{}")


def upload_head(port: int, length: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /upload?filename=a.csv HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %s\r\n%sConnection: close\r\n"
        % (port, length, extra)
    )


@pytest.mark.parametrize(
    ("length", "status", "code"),
    [
        (b"\xb2", 400, "BAD_REQUEST"),  # superscript two: str.isdigit() says yes, int() says no
        (b"-1", 400, "BAD_REQUEST"),
        (b"1e3", 400, "BAD_REQUEST"),
        (b"9" * 5000, 413, "UPLOAD_TOO_LARGE"),  # past int()'s 4300 digits
        (b"0" * 5000 + b"2", 502, "PROXY_UNREACHABLE"),  # leading zeros: the number 2, signed and sent on
    ],
)
def test_a_malformed_content_length_is_answered(demo, length, status, code):
    got, body = ask(demo, upload_head(demo, length), b"ab")
    assert (got, body.get("code")) == (status, code)


@pytest.mark.parametrize(
    ("host", "origin", "status", "code"),
    [
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}", 502, "PROXY_UNREACHABLE"),  # its own page: signed
        ("localhost:{port}", "http://localhost:{port}", 502, "PROXY_UNREACHABLE"),
        ("127.0.0.1:{port}", None, 502, "PROXY_UNREACHABLE"),  # not a browser (curl, a script)
        ("127.0.0.1:{port}", "http://evil.example", 403, "BAD_ORIGIN"),  # a page of another site
        ("127.0.0.1:{port}", "http://127.0.0.1:8080", 403, "BAD_ORIGIN"),  # same site (the proxy's), another origin
        ("127.0.0.1:{port}", "null", 403, "BAD_ORIGIN"),  # a sandboxed page
        ("rebound.example:{port}", "http://rebound.example:{port}", 403, "BAD_ORIGIN"),  # DNS rebinding
        ("rebound.example:{port}", None, 403, "BAD_ORIGIN"),
    ],
)
def test_only_its_own_page_gets_uploads_signed(demo, host, origin, status, code):
    """Any page the user opens could otherwise POST here and have this server sign and start instances
    (and, through DNS rebinding to 127.0.0.1, read their nonces)."""
    extra = b"Host: %s\r\n" % host.format(port=demo).encode()
    if origin is not None:
        extra += b"Origin: %s\r\n" % origin.format(port=demo).encode()
    head = b"POST /upload?filename=a.csv HTTP/1.1\r\n%sContent-Length: 2\r\nConnection: close\r\n" % extra
    got, body = ask(demo, head, b"ab")
    assert (got, body.get("code")) == (status, code)


class NotTheProxy(http.server.BaseHTTPRequestHandler):
    """What DATALAB_URL may name by mistake: a real web server that answers in its own way."""

    answers = {
        "/html/datalab/start": (200, b"<html>a web server</html>"),
        "/list/datalab/start": (200, b"[1, 2]"),
        "/oddresult/datalab/start": (200, b'{"code": "OK", "result": "no nonce"}'),
        "/odd/datalab/start": (499, b'{"code": "CLIENT_GONE", "message": "a status no standard lists"}'),
    }

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.answers[self.path.partition("?")[0]]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def not_the_proxy():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotTheProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("where", "status", "code"),
    [("html", 502, "PROXY_ERROR"), ("list", 502, "PROXY_ERROR"), ("odd", 499, "CLIENT_GONE"), ("oddresult", 200, "OK")],
)
def test_an_answer_that_is_not_the_proxys_is_reported(not_the_proxy, tmp_path, where, status, code):
    """The page shows what went wrong instead of a connection closed without an answer."""
    proc, port = run_demo(f"{not_the_proxy}/{where}", tmp_path)
    try:
        got, body = ask(port, upload_head(port, b"2"), b"ab")
    finally:
        stop(proc)
    assert (got, body.get("code")) == (status, code)
