"""scripts/demo.py as a hostile client meets it: a real demo server process, raw requests on a socket.

Its proxy is a closed loopback port: every request here is refused before the demo would sign
anything, or reaches the proxy and gets PROXY_UNREACHABLE (502), which proves the demo signed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port
from helpers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo on a free loopback port, as run.sh --demo starts it; its proxy answers nothing."""
    port = free_port()
    log = (tmp_path_factory.mktemp("demo") / "demo.log").open("w")
    args = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), "--proxy", "http://127.0.0.1:1"]
    proc = subprocess.Popen(args, env={**os.environ, "DATALAB_SIGN_KEY": "demo-test-key"}, stdout=log, stderr=log)
    wait_for_port(port, proc=proc)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


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
