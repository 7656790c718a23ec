"""TLS on the proxy's own port, end to end: a certificate made here (by a CA made here), turned by
`run.sh --tls-check` (DATALAB_TLS_CERT, DATALAB_TLS_KEY) into the file that run.sh gives mitmproxy,
served by a real mitmdump given `--certs *=<that file>` as run.sh does; clients that verify it;
HTTP/1.1, WebSocket and HTTP/2 through it to real Jupyter containers.

All traffic stays on 127.0.0.1: requests and websockets connect to the address itself (the
certificate names it), curl reaches `localhost` only through `--resolve localhost:PORT:127.0.0.1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlencode

import h2.config
import h2.connection
import h2.events
import pytest
import requests
import websockets.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import signing
from e2e.proxy import Proxy
from e2e.tls import COOKIE
from e2e.tls import TestCA
from e2e.tls import curl_h2
from e2e.tls import run_sh_tls_check
from e2e.tls import tls_browser
from runtime import remove_all_instances as remove_all

CSV = b"planet,moons\nMars,2\nJupiter,95\n"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def combined(tls, tmp_path_factory) -> Path:
    """The file run.sh makes for mitmproxy from DATALAB_TLS_CERT and DATALAB_TLS_KEY."""
    state = tmp_path_factory.mktemp("state")
    done = run_sh_tls_check(state, tls.fullchain, tls.key)
    assert done.returncode == 0, done.stderr
    assert "localhost, 127.0.0.1" in done.stderr
    return state / "tls.pem"


@pytest.fixture(scope="module")
def tls_proxy(redis_server, world, sign_key, tmp_path_factory, tls, combined):
    """One proxy for the module, under its own key prefix: TLS with the test's certificate, a Secure
    (so `__Host-`) session cookie, no pool (each upload boots its instance; nothing boots unasked)."""
    prefix = world.sub("tls")
    world.prefixes.add(prefix)
    options = {"datalab_pool_size": 0, "datalab_cookie_secure": "true"}
    p = Proxy(
        redis_server.url,
        prefix,
        sign_key,
        tmp_path_factory.mktemp("proxy"),
        options,
        args=["--certs", f"*={combined}"],  # as run.sh passes it
        url_scheme="https",
        verify=str(tls.ca),
    )
    p.start()
    yield p
    p.stop()
    asyncio.run(remove_all(redis_server.url, prefix))
    assert world.containers(prefix) == []


@pytest.fixture(scope="module")
def csv_nonce(tls_proxy):
    return tls_proxy.start_instance("planets.csv", CSV)  # over https, verified against the test's CA


@contextlib.contextmanager
def h2_post_headers(port: int, ca: Path, path: str, headers: list[tuple[str, str]], timeout: float):
    """An HTTP/2 connection to 127.0.0.1 (the certificate verified as `localhost`) that has sent a
    POST's headers: (the TLS socket, the h2 connection, the stream id)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        request = [(":method", "POST"), (":scheme", "https"), (":authority", f"localhost:{port}"), (":path", path)]
        conn.send_headers(stream, request + headers)
        sock.sendall(conn.data_to_send())
        yield sock, conn, stream


def h2_post(port: int, ca: Path, path: str, headers: list[tuple[str, str]], body: bytes, empty_at: int):
    """POST over HTTP/2 with the h2 library (mitmproxy's own HTTP/2 stack): no content-length, DATA
    frames of 16 KiB as flow control allows, and one empty DATA frame (legal) after `empty_at` bytes.
    Connects to 127.0.0.1, verifying the certificate as `localhost`. Returns (status, body)."""
    with h2_post_headers(port, ca, path, headers, timeout=60) as (sock, conn, stream):
        answer: dict = {"status": None, "body": b"", "ended": None}

        def receive() -> None:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer["status"] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    answer["ended"] = "ended"
                elif isinstance(event, h2.events.StreamReset):
                    answer["ended"] = f"reset ({event.error_code!r})"
            sock.sendall(conn.data_to_send())

        sent, emptied = 0, False
        while sent < len(body) and answer["ended"] is None:
            if sent >= empty_at and not emptied:
                conn.send_data(stream, b"")
                emptied = True
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size, 16384)
            if window <= 0:
                receive()  # WINDOW_UPDATE frames, or an answer that came early
                continue
            conn.send_data(stream, body[sent : sent + window])
            sent += min(window, len(body) - sent)
            sock.sendall(conn.data_to_send())
        assert emptied and sent == len(body), f"the proxy answered mid-upload, after {sent} bytes: {answer}"
        conn.end_stream(stream)
        sock.sendall(conn.data_to_send())
        while answer["ended"] is None:
            receive()
        assert answer["ended"] == "ended", answer
        return answer["status"], answer["body"]


def signed_start(proxy: Proxy, filename: str) -> tuple[str, str]:
    """The path of a /datalab/start for `filename` and its one-time X-SIGN."""
    ts = str(int(time.time() * 1000))
    sign = signing.signature(proxy.sign_key, ts, filename, proxy.scheme)
    return "/datalab/start?" + urlencode({"ts": ts, "filename": filename}), sign


def fetch_sha256(proxy: Proxy, ca: Path, nonce: str, filename: str) -> tuple[int, str]:
    r = requests.get(proxy.url(f"/datalab/static/{nonce}/files/{filename}"), verify=str(ca), timeout=60)
    assert r.status_code == 200, r.text[:200]
    return len(r.content), hashlib.sha256(r.content).hexdigest()


def test_run_sh_combines_the_key_and_chain_and_refuses_bad_files(tls, combined, tmp_path):
    """The file is private and holds the key, then the chain as given (leaf first); wrong input stops
    run.sh with a message naming the variable, before anything is written."""
    assert combined.stat().st_mode & 0o777 == 0o600
    text = combined.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert text.index(tls.leaf_pem) < text.index(tls.ca_pem)
    other = tmp_path / "other-key.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cases = [
        (tls.fullchain, "", "DATALAB_TLS_CERT is set but DATALAB_TLS_KEY is not"),
        (tmp_path / "missing.pem", tls.key, "DATALAB_TLS_CERT=" + str(tmp_path / "missing.pem") + ": no such file"),
        (tls.fullchain, tmp_path, "not a regular file"),
        (tls.key, tls.key, "no PEM certificate"),
        (tls.fullchain, other, "is not the key of the first certificate"),
        (tls.ca, tls.key, "is not the key of the first certificate"),  # the chain's order matters
    ]
    for cert, key, message in cases:
        done = run_sh_tls_check(tmp_path, cert, key)
        assert done.returncode != 0 and message in done.stderr, (cert, key, done.stderr)
        assert not (tmp_path / "tls.pem").exists()


def test_the_served_certificate_is_the_given_one(tls_proxy, tls):
    """The leaf on the wire is the test's (not one mitmproxy minted with its own CA), and only a
    client trusting the test's CA accepts it."""
    served = ssl.get_server_certificate(("127.0.0.1", tls_proxy.port), timeout=10)
    assert x509.load_pem_x509_certificate(served.encode()) == x509.load_pem_x509_certificate(tls.leaf_pem)

    r = requests.get(tls_proxy.url("/datalab/"), verify=str(tls.ca), timeout=10)
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(tls_proxy.url("/datalab/"), timeout=10)  # the system's CAs: not the test's
    mitmproxy_ca = Path.home() / ".mitmproxy" / "mitmproxy-ca-cert.pem"  # the confdir mitmdump used
    assert mitmproxy_ca.is_file()
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(tls_proxy.url("/datalab/"), verify=str(mitmproxy_ca), timeout=10)


def test_plain_http_still_works_on_the_same_port(tls_proxy, csv_nonce):
    r = requests.get(f"http://127.0.0.1:{tls_proxy.port}/datalab/static/{csv_nonce}/files/planets.csv", timeout=30)
    assert r.status_code == 200 and r.content == CSV


def test_upload_view_and_kernel_over_tls(tls_proxy, tls, csv_nonce):
    assert len(csv_nonce) >= 22  # the upload (fixture) answered 200 OK with a nonce, over verified https
    browser = tls_browser(tls_proxy, tls.ca)
    r = browser.view(csv_nonce, "tree?x=1")
    assert r.headers["Location"] == "/tree?x=1"
    assert browser.http.cookies.get(COOKIE)
    kernel = browser.start_kernel()
    out = browser.execute(kernel, "print(open('planets.csv').read().splitlines()[2])")  # wss://, the test's CA
    assert out.strip() == "Jupiter,95"


def test_secure_host_cookie_round_trips_over_https(tls_proxy, tls, csv_nonce):
    browser = tls_browser(tls_proxy, tls.ca)
    r = browser.view(csv_nonce)
    set_cookie = r.headers["Set-Cookie"]
    name, _, rest = set_cookie.partition("=")
    value, _, attributes = rest.partition("; ")
    assert name == COOKIE and len(value) >= 22
    assert attributes == "Path=/; HttpOnly; SameSite=Lax; Secure"  # in particular: no Domain
    assert [c.name for c in browser.http.cookies] == [COOKIE]
    r = browser.get("/api/contents")
    assert r.status_code == 200, r.text
    assert "planets.csv" in [item["name"] for item in r.json()["content"]]


def test_http2_view_and_static(tls_proxy, tls, csv_nonce):
    trace, _ = curl_h2(tls_proxy, tls.ca, f"/datalab/view/{csv_nonce}/tree")
    assert "< HTTP/2 302" in trace and "< location: /tree" in trace, trace
    assert f"< set-cookie: {COOKIE}=" in trace, trace
    trace, body = curl_h2(tls_proxy, tls.ca, f"/datalab/static/{csv_nonce}/files/planets.csv")
    assert "< HTTP/2 200" in trace and body == CSV, trace


def test_http2_upload_of_unknown_length_arrives_whole(tls_proxy, tls, tmp_path):
    data = os.urandom(4 * 1024 * 1024 + 4321)
    upload = tmp_path / "blob.bin"
    upload.write_bytes(data)
    path, sign = signed_start(tls_proxy, "blob.bin")
    headers = ["-H", f"X-SIGN: {sign}", "-H", "Content-Type: application/octet-stream"]
    with upload.open("rb") as stdin:  # -T -: stdin, a body of unknown length
        trace, out = curl_h2(tls_proxy, tls.ca, path, "-X", "POST", "-T", "-", *headers, stdin=stdin)
    request_headers = [line[2:].lower() for line in trace.splitlines() if line.startswith("> ")]
    assert request_headers[0].startswith("post /datalab/start?"), trace
    assert not any(h.startswith(("content-length:", "transfer-encoding:")) for h in request_headers), trace
    assert "< HTTP/2 200" in trace, trace
    body = json.loads(out)
    assert body["code"] == "OK", body
    nonce = body["result"]["nonce"]
    assert fetch_sha256(tls_proxy, tls.ca, nonce, "blob.bin") == (len(data), hashlib.sha256(data).hexdigest())


def test_http2_upload_with_an_empty_data_frame_arrives_whole(tls_proxy, tls):
    """An empty DATA frame mid-body is legal HTTP/2 (it is not the end: END_STREAM is)."""
    data = os.urandom(3 * 1024 * 1024 + 77)
    path, sign = signed_start(tls_proxy, "frames.bin")
    headers = [("x-sign", sign), ("content-type", "application/octet-stream")]
    status, body = h2_post(tls_proxy.port, tls.ca, path, headers, data, empty_at=1024 * 1024)
    assert status == 200, body[:300]
    nonce = json.loads(body)["result"]["nonce"]
    assert fetch_sha256(tls_proxy, tls.ca, nonce, "frames.bin") == (len(data), hashlib.sha256(data).hexdigest())


def h2_first_answer(port: int, ca: Path, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """Send a POST's headers over HTTP/2 and no body: the first status that comes (1xx included),
    and the body that follows a final one (until the stream ends or is reset)."""
    with h2_post_headers(port, ca, path, headers, timeout=30) as (sock, conn, stream):
        status, body, ended = None, b"", False
        while not ended:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.InformationalResponseReceived, h2.events.ResponseReceived)):
                    status = status or int(dict(event.headers)[b":status"])
                    ended = ended or isinstance(event, h2.events.InformationalResponseReceived)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
        return status, body


def test_http2_a_start_refused_on_its_headers_gets_no_100_continue(tls_proxy, tls):
    """As over HTTP/1 (test_refusals.py): the final status comes first, the body is not asked for."""
    path, _ = signed_start(tls_proxy, "bad.csv")
    headers = [("x-sign", "0" * 64), ("content-length", "110000000"), ("expect", "100-continue")]
    status, body = h2_first_answer(tls_proxy.port, tls.ca, path, headers)
    assert status == 403, f"the first status is {status}"
    assert json.loads(body)["code"] == "BAD_SIGNATURE"


def test_behind_https_plain_http_pages_are_another_origin(tls_proxy, tls, csv_nonce):
    """Jupyter compares hosts only, so http://host is "same origin" to it. Behind HTTPS the proxy
    refuses such pages' requests and WebSockets, marks Jupyter's cookies Secure and sends HSTS, so
    a network attacker cannot plant a page (or an _xsrf cookie) on the plain-HTTP side."""
    browser = tls_browser(tls_proxy, tls.ca)
    browser.view(csv_nonce)
    page = browser.get("/tree")
    assert page.headers["Strict-Transport-Security"].startswith("max-age=")
    assert all("secure" in c.lower() for c in page.raw.headers.getlist("Set-Cookie"))  # Jupyter's _xsrf
    kernel = browser.start_kernel()
    plain_page = f"http://127.0.0.1:{tls_proxy.port}"
    r = browser.post("/api/terminals", headers={"Origin": plain_page, "Content-Type": "text/plain"})
    assert r.status_code == 403 and r.json()["code"] == "BAD_ORIGIN"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        browser.execute(kernel, "print(1)", origin=plain_page)
    assert refused.value.response.status_code == 403 and b"BAD_ORIGIN" in refused.value.response.body
    assert browser.execute(kernel, "print(2)").strip() == "2"  # its https:// page still works
    plain = requests.get(f"http://127.0.0.1:{tls_proxy.port}/datalab/nothing", timeout=30)
    assert "Strict-Transport-Security" not in plain.headers  # HSTS means something only over TLS
