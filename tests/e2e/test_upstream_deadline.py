"""An instance that does not answer, end to end: a routed request to a frozen Jupyter (its server
process SIGSTOPped inside its running container: the port accepts, nothing answers) gets a JSON
504 UPSTREAM_TIMEOUT within datalab_upstream_timeout, over HTTP/1.1 and HTTP/2; once Jupyter runs
again it is served; and a kernel WebSocket opened before lives through it all. An instance whose
address accepts no connection (its packets dropped, as a lost node's are) is given up after
datalab_connect_timeout, and served again once it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from backends.container_spec import JUPYTER_PORT
from e2e.helpers import record
from e2e.helpers import signal_jupyter
from e2e.proxy import Browser
from e2e.proxy import Proxy
from e2e.proxy import run_code
from e2e.tls import COOKIE
from e2e.tls import TestCA
from e2e.tls import curl_h2
from e2e.tls import run_sh_tls_check
from e2e.tls import tls_browser
from runtime import remove_all_instances as remove_all

CSV = b"x,y\n1,2\n"
DEADLINE = 4  # seconds: datalab_upstream_timeout of these tests' proxies
CLIENT_TIMEOUT = 30  # the clients' own bound: far beyond the deadline, so it is the proxy that answers
STREAMS = 7  # HTTP/2 requests at once on one connection
CONNECT = 2  # seconds: datalab_connect_timeout where a test needs it short


def frozen(world, nonce: str, prefix: str | None = None):
    """The instance's container (for signal_jupyter)."""
    return world.docker.containers.get(record(world, nonce, prefix).handle)


def json_values(body: bytes) -> list:
    """The JSON documents one after another in `body` (curl writes each answer's body in turn)."""
    decoder, text, values = json.JSONDecoder(), body.decode(), []
    while text.strip():
        value, end = decoder.raw_decode(text.strip())
        values.append(value)
        text = text.strip()[end:]
    return values


def assert_upstream_timeout(status: int, body: bytes) -> None:
    assert status == 504, body[:300]
    message = f"the instance did not answer within {DEADLINE} s"
    assert json.loads(body) == {"code": "UPSTREAM_TIMEOUT", "message": message}


def test_a_frozen_instance_answers_504_and_its_open_websocket_lives(make_proxy, world):
    proxy = make_proxy(datalab_upstream_timeout=DEADLINE)
    nonce = proxy.start_instance("frozen.csv", CSV)
    browser = Browser(proxy)
    browser.view(nonce)
    kernel = browser.start_kernel()
    container = frozen(world, nonce)
    with browser.kernel_channels(kernel) as ws, ThreadPoolExecutor(1) as background:
        assert run_code(ws, "print(6 * 7)").strip() == "42"
        idle_since = time.monotonic()
        signal_jupyter(container, "STOP")
        try:
            r = browser.http.get(browser.url("/api/contents/frozen.csv"), timeout=CLIENT_TIMEOUT)
            assert_upstream_timeout(r.status_code, r.content)
            assert r.headers["Content-Type"] == "application/json"
            # On the same client connection, a request that Jupyter gets while still frozen: once it
            # runs again it must be answered with its own answer, not the late one to the first.
            status = background.submit(browser.http.get, browser.url("/api/status"), timeout=CLIENT_TIMEOUT)
            time.sleep(1)
        finally:
            signal_jupyter(container, "CONT")
        r = status.result()
        assert r.status_code == 200 and "started" in r.json(), r.text[:300]
        r = browser.get("/api/contents/frozen.csv")
        assert r.status_code == 200 and r.json()["name"] == "frozen.csv", r.text[:300]
        time.sleep(max(0.0, idle_since + DEADLINE + 1 - time.monotonic()))  # the WebSocket idle past the deadline
        assert run_code(ws, "print(7 * 6)").strip() == "42"  # the WebSocket opened before still works


def test_a_frozen_instance_answers_504_over_http2(redis_server, world, sign_key, tmp_path_factory):
    tls = TestCA(tmp_path_factory.mktemp("tls"))
    state = tmp_path_factory.mktemp("state")
    assert run_sh_tls_check(state, tls.fullchain, tls.key).returncode == 0
    prefix = world.sub("h2-deadline")
    world.prefixes.add(prefix)
    options = {"datalab_pool_size": 0, "datalab_cookie_secure": "true", "datalab_upstream_timeout": DEADLINE}
    proxy = Proxy(
        redis_server.url,
        prefix,
        sign_key,
        tmp_path_factory.mktemp("proxy"),
        options,
        args=["--certs", f"*={state / 'tls.pem'}"],
        url_scheme="https",
        verify=str(tls.ca),
    ).start()
    try:
        nonce = proxy.start_instance("frozen.csv", CSV)
        browser = tls_browser(proxy, tls.ca)
        browser.view(nonce)
        cookie = f"Cookie: {COOKIE}={browser.http.cookies[COOKIE]}"
        container = frozen(world, nonce, prefix)
        signal_jupyter(container, "STOP")
        try:
            # More streams than mitmproxy opens connections to one address for one client (5): the
            # last wait for a connection, and get their whole deadline once sent.
            others = [f"https://localhost:{proxy.port}/api/status?stream={i}" for i in range(STREAMS - 1)]
            extra = ["-H", cookie, "--max-time", str(CLIENT_TIMEOUT), "--parallel", *others]
            trace, body = curl_h2(proxy, tls.ca, "/api/status", *extra)
            assert trace.count("< HTTP/2 504") == STREAMS, trace
            answers = json_values(body)
            assert len(answers) == STREAMS, body
            for answer in answers:
                assert_upstream_timeout(504, json.dumps(answer).encode())
        finally:
            signal_jupyter(container, "CONT")
        trace, body = curl_h2(proxy, tls.ca, "/api/status", "-H", cookie, "--max-time", str(CLIENT_TIMEOUT))
        assert "< HTTP/2 200" in trace and "started" in json.loads(body), trace
    finally:
        proxy.stop()
        asyncio.run(remove_all(redis_server.url, prefix))


@contextlib.contextmanager
def accepting_nothing(container):
    """New connections to the container's Jupyter go unanswered: their SYNs dropped in its own
    network namespace, as a host that is gone drops them (connections open already go on)."""
    container.reload()
    netns = ["nsenter", "--target", str(container.attrs["State"]["Pid"]), "--net", "iptables"]
    rule = ["INPUT", "-p", "tcp", "--dport", str(JUPYTER_PORT), "--syn", "-j", "DROP"]
    subprocess.run([*netns, "-I", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run([*netns, "-D", *rule], check=True)


def test_an_instance_that_accepts_no_connection_is_given_up_then_served_again(make_proxy, world):
    proxy = make_proxy(datalab_connect_timeout=CONNECT)
    nonce = proxy.start_instance("unreachable.csv", CSV)
    browser = Browser(proxy)
    browser.view(nonce)
    with accepting_nothing(frozen(world, nonce)):
        page = Browser(proxy)  # a new client connection: it needs a new connection to the instance
        page.http.cookies.update(browser.http.cookies)
        r = page.http.get(page.url("/api/contents/unreachable.csv"), timeout=CLIENT_TIMEOUT)
        assert r.status_code == 502, r.text[:300]
        assert f"did not accept a connection within {CONNECT} s" in r.text, r.text[:300]
    # The backend still holds the instance: it was not ended for a connection given up.
    r = Browser(proxy, http=page.http).get("/api/contents/unreachable.csv")
    assert r.status_code == 200 and r.json()["name"] == "unreachable.csv", r.text[:300]
