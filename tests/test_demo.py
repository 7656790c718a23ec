"""scripts/demo.py as a hostile client meets it: a real demo server process, raw requests on a socket.

Its proxy is a closed loopback port: every request here is refused before the demo would sign
anything, or reaches the proxy and gets PROXY_UNREACHABLE (502), which proves the demo signed.
Downloads of the work meet a loopback stand-in for the proxy's GET /datalab/work/<id> that checks
signatures and records what reached it (the real proxy's are in the end-to-end tests).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

import signing
from helpers import free_port
from helpers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent


KEY = "demo-test-key"


def run_demo(proxy: str, workdir: Path, scheme: str = "sha256") -> tuple[subprocess.Popen, int]:
    """The demo on a free loopback port, as run.sh --demo starts it, pointed at `proxy`."""
    port = free_port()
    log = (workdir / f"demo-{port}.log").open("w")
    args = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), "--proxy", proxy]
    env = {**os.environ, "DATALAB_SIGN_KEY": KEY, "DATALAB_SIGN_SCHEME": scheme}
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)
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


class Quiet(http.server.BaseHTTPRequestHandler):
    """A stand-in's handler that logs nothing."""

    def log_message(self, *args) -> None:
        pass


def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A loopback server of `handler` in a thread while a fixture yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class NotTheProxy(Quiet):
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


@pytest.fixture(scope="module")
def not_the_proxy():
    yield from serving(NotTheProxy)


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


# The work: GET /work/<id> on the demo, GET /datalab/work/<id> on the proxy.

spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
demo_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_module)

PIECE = os.urandom(1 << 20)
BIG = 50  # MiB
WORK = {  # id -> what the stand-in does
    "small" + "s" * 20: "small",
    "big" + "b" * 20: "big",
    "chunked" + "c" * 20: "chunked",
    "cut" + "x" * 20: "cut",
    "cutlength" + "x" * 20: "cutlength",
    "html" + "h" * 20: "html",
    "moved" + "m" * 20: "moved",
}
REFUSALS = {
    "unknown" + "u" * 20: (404, {"code": "WORK_UNKNOWN", "message": "no such work"}, {}),
    "gone" + "g" * 20: (410, {"code": "WORK_GONE", "message": "the work was not saved"}, {}),
    "saving" + "v" * 20: (503, {"code": "WORK_SAVING", "message": "being saved"}, {"Retry-After": "5"}),
}
DISPOSITION = 'attachment; filename="work.tar.gz"'


class WorkProxy(Quiet):
    """The proxy's /datalab/work/<id> as the demo meets it: 403 BAD_SIGNATURE unless X-SIGN is the
    key's over (ts, id) in either scheme, then what WORK or REFUSALS say. Records every request."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]] = []  # (path with query, X-SIGN)

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("X-SIGN", "")))
        url = urllib.parse.urlsplit(self.path)
        work_id = url.path.removeprefix("/datalab/work/")
        ts = urllib.parse.parse_qs(url.query).get("ts", [""])[0]
        given = self.headers.get("X-SIGN", "")
        if not any(signing.signature_ok(KEY, ts, work_id, given, scheme) for scheme in signing.SCHEMES):
            return self._json(403, {"code": "BAD_SIGNATURE", "message": "X-SIGN is not the key's"}, {})
        if work_id in REFUSALS:
            return self._json(*REFUSALS[work_id])
        getattr(self, "_" + WORK[work_id])()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        work = "w" * 32 if "good" in self.path else "not a token!"
        self._json(200, {"code": "OK", "result": {"nonce": "n" * 32, "work": work}}, {})

    def _json(self, status: int, body: dict, extra: dict) -> None:
        self._head(status, {"Content-Type": "application/json", **extra}, json.dumps(body).encode())

    def _head(self, status: int, headers: dict, body: bytes | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body is not None:
            self.wfile.write(body)

    def _archive(self, pieces: int, length: bool) -> None:
        headers = {"Content-Type": "application/gzip", "Content-Disposition": DISPOSITION}
        self._head(
            200,
            headers | ({"Content-Length": str(pieces * len(PIECE))} if length else {"Transfer-Encoding": "chunked"}),
        )
        for _ in range(pieces):
            self.wfile.write(PIECE if length else b"%x\r\n%s\r\n" % (len(PIECE), PIECE))
        if not length:
            self.wfile.write(b"0\r\n\r\n")

    def _small(self) -> None:
        self._archive(1, length=True)

    def _big(self) -> None:
        self._archive(BIG, length=True)

    def _chunked(self) -> None:
        self._archive(BIG, length=False)

    def _cut(self) -> None:  # a live snapshot whose making failed half way: no final chunk
        self._head(200, {"Content-Type": "application/gzip", "Transfer-Encoding": "chunked"})
        self.wfile.write(b"%x\r\n%s\r\n" % (len(PIECE), PIECE))
        self.close_connection = True

    def _cutlength(self) -> None:
        self._head(200, {"Content-Type": "application/gzip", "Content-Length": str(2 * len(PIECE))})
        self.wfile.write(PIECE)
        self.close_connection = True

    def _html(self) -> None:
        self._head(200, {"Content-Type": "text/html"}, b"<script>alert(1)</script>")

    def _moved(self) -> None:
        self._head(302, {"Location": "/elsewhere", "Content-Type": "application/json"}, b"{}")  # JSON, yet no refusal


@pytest.fixture(scope="module")
def work_proxy():
    yield from serving(WorkProxy)


@pytest.fixture(scope="module")
def work_demo(work_proxy, tmp_path_factory):
    """A demo in front of the stand-in: (its process, its port)."""
    proc, port = run_demo(work_proxy, tmp_path_factory.mktemp("work"))
    yield proc, port
    stop(proc)


def download(port: int, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    """GET `path` on the demo; the answer, its body not read yet."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
    return connection.getresponse()


def drain(answer: http.client.HTTPResponse) -> tuple[int, str]:
    """Read the body in pieces, as a browser saves it: its length and SHA-256, never whole here."""
    digest, total = hashlib.sha256(), 0
    while piece := answer.read(1 << 20):
        digest.update(piece)
        total += len(piece)
    return total, digest.hexdigest()


def peak_memory(proc: subprocess.Popen) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("scheme", ["sha256", "hmac-sha256"])
def test_a_download_is_signed_over_a_fresh_ts_and_the_id(work_proxy, tmp_path, scheme):
    proc, port = run_demo(work_proxy, tmp_path, scheme)
    work_id = "small" + "s" * 20
    try:
        before = len(WorkProxy.seen)
        answer = download(port, f"/work/{work_id}")
        assert answer.status == 200 and answer.read() == PIECE
    finally:
        stop(proc)
    ((path, given),) = WorkProxy.seen[before:]
    url = urllib.parse.urlsplit(path)
    (ts,) = urllib.parse.parse_qs(url.query)["ts"]
    assert url.path == f"/datalab/work/{work_id}" and len(ts) == 13 and abs(int(ts) / 1000 - time.time()) < 60
    assert given == signing.signature(KEY, ts, work_id, scheme)


@pytest.mark.parametrize(
    ("work_id", "framing"), [("big" + "b" * 20, "Content-Length"), ("chunked" + "c" * 20, "chunked")]
)
def test_a_large_archive_streams_through_without_the_demo_holding_it(work_demo, work_id, framing):
    """50 MiB pass with their headers, whole and in order, while the demo's peak memory grows by
    far less than that: it holds one piece at a time."""
    proc, port = work_demo
    download(port, "/work/" + "small" + "s" * 20).read()  # the code paths warmed up
    baseline = peak_memory(proc)
    answer = download(port, f"/work/{work_id}", {"Sec-Fetch-Site": "same-origin"})
    assert answer.status == 200
    assert answer.getheader("Content-Type") == "application/gzip"
    assert answer.getheader("Content-Disposition") == DISPOSITION
    if framing == "Content-Length":
        assert answer.getheader("Content-Length") == str(BIG * len(PIECE))
    else:  # a length the proxy did not know stays unknown, and a cut body would be seen as cut
        assert answer.getheader("Content-Length") is None and answer.getheader("Transfer-Encoding") == "chunked"
    assert answer.getheader("X-Content-Type-Options") == "nosniff" and "sandbox" in answer.getheader(
        "Content-Security-Policy"
    )
    expected = hashlib.sha256()
    for _ in range(BIG):
        expected.update(PIECE)
    assert drain(answer) == (BIG * len(PIECE), expected.hexdigest())
    assert peak_memory(proc) - baseline < 16 << 20


@pytest.mark.parametrize("work_id", ["cut" + "x" * 20, "cutlength" + "x" * 20])
def test_a_download_cut_at_the_proxy_is_cut_at_the_browser(work_demo, work_id):
    """Never a shorter file that looks whole: no final chunk, or fewer bytes than the length."""
    _, port = work_demo
    answer = download(port, f"/work/{work_id}")
    assert answer.status == 200
    length = answer.getheader("Content-Length")
    if length is None:
        with pytest.raises(http.client.IncompleteRead):
            drain(answer)
    else:  # http.client, unlike a browser, does not complain: count
        assert drain(answer)[0] < int(length)


@pytest.mark.parametrize("work_id", sorted(REFUSALS))
def test_a_refusal_of_the_proxy_is_passed_on_as_is(work_demo, work_id):
    _, port = work_demo
    status, body, extra = REFUSALS[work_id]
    answer = download(port, f"/work/{work_id}")
    assert answer.status == status and answer.getheader("Content-Type") == "application/json"
    assert json.loads(answer.read()) == body
    assert answer.getheader("Retry-After") == extra.get("Retry-After")


@pytest.mark.parametrize(
    ("work_id", "reached"),
    [("html" + "h" * 20, "/datalab/work/html"), ("moved" + "m" * 20, "/datalab/work/moved")],
)
def test_an_answer_that_is_neither_archive_nor_refusal_is_a_502(work_demo, work_id, reached):
    """Never a page of the demo's origin (the one that may have starts signed), and a redirect
    is not followed with the signature."""
    _, port = work_demo
    before = len(WorkProxy.seen)
    answer = download(port, f"/work/{work_id}")
    assert (answer.status, json.loads(answer.read())["code"]) == (502, "PROXY_ERROR")
    assert [path.startswith(reached) for path, _ in WorkProxy.seen[before:]] == [True]


def test_a_download_with_an_unreachable_proxy_says_so(demo):
    answer = download(demo, "/work/" + "w" * 32)
    assert (answer.status, json.loads(answer.read())["code"]) == (502, "PROXY_UNREACHABLE")


@pytest.mark.parametrize(
    "path",
    [
        "/work/",
        "/work/short",
        "/work/" + "a" * 21,
        "/work/" + "a" * 129,
        "/work/" + "a" * 30 + "/x",
        "/work/" + "a" * 30 + "%2F..",
        "/work/../../datalab/work/" + "a" * 30,
        "/work/" + "a" * 30 + ".tar.gz",
        "/work/" + "a" * 30 + "%0a",
        "/work/" + "a" * 30 + "%00",
    ],
)
def test_a_bad_id_is_refused_without_asking_the_proxy(work_demo, path):
    _, port = work_demo
    before = len(WorkProxy.seen)
    answer = download(port, path)
    assert (answer.status, json.loads(answer.read())["code"]) == (400, "BAD_REQUEST")
    assert WorkProxy.seen[before:] == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # not a browser
        ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}, 200),  # its link
        ({"Sec-Fetch-Site": "none"}, 200),  # a person typed the URL
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, 403),  # another site's link or frame
        ({"Sec-Fetch-Site": "same-site"}, 403),  # the proxy's origin is another origin too
        ({"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Host": "rebound.example:{port}"}, 403),  # DNS rebinding
    ],
)
def test_only_its_own_page_gets_downloads_signed(work_demo, headers, status):
    """A download is all another site could cause, and not even that: its requests are refused
    before anything is signed."""
    _, port = work_demo
    before = len(WorkProxy.seen)
    answer = download(port, "/work/" + "small" + "s" * 20, {k: v.format(port=port) for k, v in headers.items()})
    answer.read()
    assert answer.status == status
    assert len(WorkProxy.seen) - before == (status == 200)


@pytest.mark.parametrize(("filename", "work"), [("good.csv", "w" * 32), ("bad.csv", None)])
def test_a_start_answers_its_work_id_if_it_is_a_token(work_demo, filename, work):
    _, port = work_demo
    head = b"POST /upload?filename=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\nConnection: close\r\n" % (
        filename.encode(),
        port,
    )
    status, body = ask(port, head, b"ab")
    assert status == 200 and body["result"].get("work") == work and body["result"]["nonce"] == "n" * 32


class Reader:
    """A body of `pieces` pieces that records each read, and the writes between reads."""

    def __init__(self, pieces: int, fail_after: int | None = None):
        self.left, self.fail_after, self.events = pieces, fail_after, []

    def read(self, size: int) -> bytes:
        self.events.append(("read", size))
        if self.fail_after is not None and len([e for e in self.events if e[0] == "read"]) > self.fail_after:
            raise http.client.IncompleteRead(b"")
        if not self.left:
            return b""
        self.left -= 1
        return b"x" * size

    def write(self, data: bytes) -> None:
        self.events.append(("write", data))


def test_relay_writes_each_piece_before_reading_the_next():
    body = Reader(3)
    assert demo_module.relay(body.read, body.write, chunked=False) == 3 * demo_module.CHUNK
    piece = b"x" * demo_module.CHUNK
    assert body.events == [("read", demo_module.CHUNK), ("write", piece)] * 3 + [("read", demo_module.CHUNK)]


def test_relay_frames_chunks_and_ends_them_only_when_the_body_ended():
    body = Reader(2)
    demo_module.relay(body.read, body.write, chunked=True)
    writes = [data for kind, data in body.events if kind == "write"]
    assert writes == [b"%x\r\n" % demo_module.CHUNK + b"x" * demo_module.CHUNK + b"\r\n"] * 2 + [b"0\r\n\r\n"]
    cut = Reader(5, fail_after=2)
    with pytest.raises(http.client.IncompleteRead):
        demo_module.relay(cut.read, cut.write, chunked=True)
    assert [data for kind, data in cut.events if kind == "write"][-1] != b"0\r\n\r\n"


# Progress (the start's Server-Sent Events, relayed) and lifecycle events (the proxy's webhook).


class ProgressProxy(Quiet):
    """A stand-in that answers a start's progress (its last request is kept: path, X-SIGN, Accept)."""

    seen: list[tuple[str, str, str]] = []
    PROGRESS = [("queued", {"position": 2}), ("booting", {}), ("uploading", {})]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        ProgressProxy.seen.append((self.path, self.headers["X-SIGN"], self.headers.get("Accept", "")))
        if self.path.startswith("/refusing/"):
            body = b'{"code": "PROFILE_UNKNOWN", "message": "no profile \'big\'"}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        ready = ("ready", {"nonce": "n" * 32, "work": "w" * 32})
        for name, data in [*self.PROGRESS, ready]:
            self.wfile.write(demo_module.event_frame(name, data))
            self.wfile.flush()


@pytest.fixture(scope="module")
def progress_proxy():
    yield from serving(ProgressProxy)


def progress_of(port: int, query: str) -> list[tuple[str, dict]]:
    """POST a file to the demo asking for its progress; the events it relays."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Host": f"127.0.0.1:{port}", "Accept": "text/event-stream", "Content-Type": "text/csv"}
    connection.request("POST", f"/upload?{query}", body=b"a,b\n", headers=headers)
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type") == "text/event-stream"
    return list(demo_module.server_sent_events(answer))


def test_a_starts_progress_is_relayed_signed_with_its_owner_and_profile(progress_proxy, tmp_path):
    proc, port = run_demo(progress_proxy, tmp_path)
    try:
        events = progress_of(port, "filename=a.csv&owner=alice&profile=default")
    finally:
        stop(proc)
    assert [name for name, _ in events] == ["step", "queued", "booting", "uploading", "ready"]
    assert events[1][1] == {"position": 2}
    assert events[-1][1] == {
        "nonce": "n" * 32,
        "view": f"{progress_proxy}/datalab/view/{'n' * 32}/lab/tree/a.csv",
        "work": "w" * 32,
    }
    path, given, accept = ProgressProxy.seen[-1]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    assert (query["owner"], query["profile"], accept) == (["alice"], ["default"], "text/event-stream")
    subject = signing.start_subject("a.csv", {"owner": "alice", "profile": "default"})
    assert given == signing.signature(KEY, query["ts"][0], subject)


def test_a_refused_start_is_relayed_as_its_error_event(progress_proxy, tmp_path):
    proc, port = run_demo(f"{progress_proxy}/refusing", tmp_path)
    try:
        events = progress_of(port, "filename=a.csv&profile=big")
    finally:
        stop(proc)
    assert events[-1] == ("error", {"code": "PROFILE_UNKNOWN", "message": "no profile 'big'", "status": 400})


def post_event(port: int, event: dict, key: str = KEY) -> int:
    body = json.dumps(event).encode()
    signature = "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "X-Datalab-Signature": signature}
    connection.request("POST", "/events", body=body, headers=headers)
    return connection.getresponse().status


def notices(port: int, owner: str) -> list[dict]:
    answer = download(port, f"/notices?{urllib.parse.urlencode({'owner': owner, 'after': 0})}")
    return json.loads(answer.read())["result"]


def test_the_demo_takes_signed_events_and_tells_each_owner_its_ends(demo):
    end = {"id": "5-0", "type": "end", "time": 5.0, "instance": "i", "work": "w" * 32, "owner": "alice"}
    end |= {"profile": "default", "cause": "idle"}
    assert post_event(demo, end) == 204
    assert post_event(demo, end) == 204  # delivered again (at least once): told once
    assert post_event(demo, end | {"id": "6-0", "owner": "mallory"}, key="not-the-key") == 401
    assert post_event(demo, end | {"id": "7-0", "type": "view"}) == 204  # not a notice
    assert notices(demo, "alice") == [end]
    assert notices(demo, "mallory") == [] and notices(demo, "bob") == []


def test_the_page_offers_the_profiles_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("DATALAB_DEMO_PROFILES", "default, big<one>")
    proc, port = run_demo("http://127.0.0.1:1", tmp_path)
    try:
        page = download(port, "/").read().decode()
    finally:
        stop(proc)
    assert '<option value="default">default</option>' in page
    assert '<option value="big&lt;one&gt;">big&lt;one&gt;</option>' in page
