"""What a hostile web page, a replaying eavesdropper or a neighbour can do, end to end: real
mitmdump, Redis, Docker and Jupyter. Each test is written as the attacker would try it."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

import hosts
import inputs
import signing
from backends import AUTH_HEADER
from backends import Instance
from e2e.conftest import IMAGE
from e2e.conftest import LABEL_PREFIX
from e2e.helpers import ws_refusal
from e2e.proxy import Browser
from e2e.proxy import Proxy
from helpers import free_port

CSV = b"x,y\n1,2\n"
EVIL = "http://evil.example"
TERMINAL_CODE = {"Content-Type": "text/plain"}  # a "simple" request: a cross-site page sends it without preflight


@pytest.fixture(scope="module", autouse=True)
def localhost_names():
    """What browsers do for *.localhost (RFC 6761): loopback, without asking DNS. The proxy's
    subdomain routing is tested on such names; nothing here may send a DNS query."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and (host == "localhost" or host.endswith(".localhost")):
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    yield
    socket.getaddrinfo = real


@pytest.fixture(scope="module")
def nonce(proxy):
    return proxy.start_instance("sec.csv", CSV)


def instance_of(world, nonce: str, prefix: str | None = None) -> Instance:
    prefix = prefix or world.prefix
    instance_id = world.redis.get(f"{prefix}nonce:{nonce}").decode()
    return Instance.from_json(world.redis.get(f"{prefix}instance:{instance_id}"))


def error_code(r) -> str:
    assert r.headers["Content-Type"] == "application/json", r.text[:200]
    return r.json()["code"]


def test_a_cross_site_page_cannot_drive_the_notebook(proxy, nonce):
    """The victim's cookie rides along (SameSite=None, or a same-site page under Lax); the page's
    own origin is evil. Nothing it sends may change the instance or be readable by it."""
    victim = Browser(proxy)
    victim.view(nonce)
    r = victim.post("/api/terminals", data="{}", headers={"Origin": EVIL, **TERMINAL_CODE})
    assert r.status_code in (403, 404)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = victim.post("/api/sessions", data="{}", headers={"Origin": EVIL, **TERMINAL_CODE})
    assert r.status_code in (403, 404)
    # a form post carries no Origin in old browsers: the XSRF token is then what is missing
    r = victim.post("/api/sessions", json={"path": "a.ipynb", "type": "notebook", "kernel": {"name": "python3"}})
    assert r.status_code == 403
    r = victim.get("/api/contents", headers={"Origin": EVIL})
    assert r.status_code in (403, 404) and "Access-Control-Allow-Origin" not in r.headers
    assert victim.get("/api/terminals").json() == [] and victim.get("/api/sessions").json() == []

    # the notebook's own page does all of it: its _xsrf cookie and header, its own Origin
    victim.get("/tree")
    same_site = {"X-XSRFToken": victim.http.cookies.get("_xsrf", ""), "Origin": proxy.base}
    r = victim.post("/api/terminals", headers=same_site)
    assert r.status_code == 200, r.text
    assert [t["name"] for t in victim.get("/api/terminals").json()] == [r.json()["name"]]
    assert victim.http.delete(proxy.url(f"/api/terminals/{r.json()['name']}"), headers=same_site).status_code == 204


def test_a_cross_site_websocket_is_refused_by_the_proxy(proxy, nonce):
    victim = Browser(proxy)
    victim.view(nonce)
    kernel = victim.start_kernel()
    url = f"ws://127.0.0.1:{proxy.port}/api/kernels/{kernel}/channels"
    for origin in (EVIL, "null", f"http://127.0.0.1:{proxy.port}.evil.example", "http://127.0.0.1:1"):
        status, body = ws_refusal(url, victim.cookie_header(), origin)
        assert status == 403 and b'"BAD_ORIGIN"' in body  # the proxy's JSON, not Jupyter's page
    assert victim.execute(kernel, "print(6 * 7)").strip() == "42"  # its own origin still works


def test_the_instance_secret_reaches_no_browser_and_opens_nothing_else(proxy, world, nonce):
    secret = instance_of(world, nonce).token
    assert secret
    browser = Browser(proxy)
    browser.view(nonce)
    seen = [browser.get(p).text for p in ("/tree", "/notebooks/sec.csv", "/edit/sec.csv", "/api/me")]
    seen += [requests.get(proxy.url(f"/datalab/static/{nonce}{p}"), timeout=30).text for p in ("/tree", "/api/me")]
    assert all(secret not in page for page in seen)
    assert '"token": ""' in seen[0]  # Jupyter has no token to put in its pages

    target = instance_of(world, nonce)
    direct = f"http://{target.host}:{target.port}/api/contents"
    assert requests.get(direct, timeout=30).status_code == 403
    assert requests.get(direct, headers={"Authorization": f"token {secret}"}, timeout=30).status_code == 403
    assert requests.get(direct, params={"token": secret}, timeout=30).status_code == 403
    assert requests.get(direct, headers={AUTH_HEADER: secret}, timeout=30).status_code == 200
    # kernels and terminals do not inherit it
    code = "import os; print(sorted(k for k in os.environ if 'DATALAB' in k or 'TOKEN' in k))"
    assert browser.execute(browser.start_kernel(), code).strip() == "[]"


def test_a_signature_starts_once(make_proxy, world):
    prefix = world.sub("once")  # a proxy of its own, no pool: nothing boots behind the test's back
    p = make_proxy(prefix=prefix)
    ts = str(int(time.time()))
    sign = signing.signature(p.sign_key, ts, "once.csv")
    assert p.upload("once.csv", CSV, ts=ts, sign=sign).status_code == 200
    before = {c.id for c in world.containers(prefix)}, set(world.keys(prefix))
    for replay in (sign, sign.upper()):
        r = p.upload("once.csv", CSV, ts=ts, sign=replay)
        assert r.status_code == 403 and error_code(r) == "REPLAYED"
    assert ({c.id for c in world.containers(prefix)}, set(world.keys(prefix))) == before
    key = f"{prefix}signed:{sign}".encode()
    assert key in before[1] and 0 < world.redis.ttl(key) <= 2 * 300 + 2  # forgotten once any ts is stale


def test_a_burst_of_one_signature_starts_one_instance(proxy, world):
    ts = str(int(time.time() * 1000))
    sign = signing.signature(proxy.sign_key, ts, "burst-once.csv")
    containers = len(world.containers())
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: proxy.upload("burst-once.csv", CSV, ts=ts, sign=sign), range(10)))
    assert sorted(r.status_code for r in answers) == [200] + [403] * 9
    assert {error_code(r) for r in answers if r.status_code == 403} == {"REPLAYED"}
    time.sleep(1)  # the pool refills behind the one start: at most one more container
    assert len(world.containers()) <= containers + 1


def test_a_stop_signature_stops_once(proxy):
    nonce = proxy.start_instance("stop-once.csv", CSV)
    ts = str(int(time.time() * 1000))
    sign = signing.signature(proxy.sign_key, ts, nonce)
    assert proxy.stop_instance(nonce, ts=ts, sign=sign).status_code == 200
    r = proxy.stop_instance(nonce, ts=ts, sign=sign)
    assert r.status_code == 403 and error_code(r) == "REPLAYED"


def test_another_site_cannot_re_point_a_browsers_session(proxy, nonce):
    """In cookie routing a view replaces the browser's one session: a page of another site that
    navigates the browser to a view of its own instance would have the user's open tabs save into
    it. Browsers say where a navigation started; the proxy refuses cross-site ones."""
    other_site = {"Sec-Fetch-Site": "cross-site", "Referer": "https://evil.example/page"}
    r = requests.get(proxy.url(f"/datalab/view/{nonce}/tree"), headers=other_site, allow_redirects=False, timeout=30)
    assert r.status_code == 403 and error_code(r) == "BAD_ORIGIN" and "Set-Cookie" not in r.headers
    for same in ({"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "none"}, {}):  # typed URL, old browser
        r = requests.get(proxy.url(f"/datalab/view/{nonce}/tree"), headers=same, allow_redirects=False, timeout=30)
        assert r.status_code == 302 and r.headers["Referrer-Policy"] == "no-referrer"


def test_a_refused_request_answers_without_keeping_its_body(proxy):
    """A body sent to a path the router refuses is not kept: the refusal comes at once, and what
    of the body comes meanwhile is dropped."""
    body = (b"x" * (1 << 20) for _ in range(64))  # 64 MiB, chunked: no length known up front
    r = requests.post(proxy.url("/api/contents/big"), data=body, timeout=120)
    assert r.status_code == 403 and error_code(r) == "NO_SESSION"


def test_hmac_signatures_and_allowed_origins(make_proxy):
    p = make_proxy(datalab_sign_scheme="hmac-sha256", datalab_allowed_origins="https://app.example")
    ts = str(int(time.time()))
    r = p.upload("h.csv", CSV, ts=ts, sign=signing.signature(p.sign_key, ts, "h.csv"))  # the seed's sha256
    assert r.status_code == 403 and error_code(r) == "BAD_SIGNATURE" and "HMAC" in r.json()["message"]
    nonce = p.start_instance("h.csv", CSV)  # Proxy.upload signs with the proxy's scheme

    browser = Browser(p)
    from_the_app = {"Sec-Fetch-Site": "cross-site", "Referer": "https://app.example/reports/7"}
    assert (
        browser.http.get(
            p.url(f"/datalab/view/{nonce}/tree"), headers=from_the_app, allow_redirects=False, timeout=30
        ).status_code
        == 302
    )  # the listed frontend may lead browsers here
    csp = browser.get("/tree").headers["Content-Security-Policy"]
    assert "frame-ancestors 'self' https://app.example" in csp  # the app may show the view in an iframe
    kernel = browser.start_kernel()
    assert browser.execute(kernel, "print('from the app')", origin="https://app.example").strip() == "from the app"
    status, body = ws_refusal(f"ws://127.0.0.1:{p.port}/api/kernels/{kernel}/channels", browser.cookie_header(), EVIL)
    assert status == 403 and b"BAD_ORIGIN" in body


def test_static_answers_are_passive(proxy, nonce):
    """A static answer is the instance's content on the proxy's origin: sandboxed, never sniffed,
    never setting a cookie; and static opens no WebSocket."""
    answers = [requests.get(proxy.url(f"/datalab/static/{nonce}{p}"), timeout=30) for p in ("/tree", "/files/sec.csv")]
    answers.append(requests.get(proxy.url("/datalab/static/" + "Q" * 32 + "/tree"), timeout=30))
    assert [r.status_code for r in answers] == [200, 200, 404]
    for r in answers:
        csp = r.headers["Content-Security-Policy"]  # requests joins repeated headers with ", "
        assert "sandbox" in csp and "allow-same-origin" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "Set-Cookie" not in r.headers
    r = requests.get(
        proxy.url(f"/datalab/static/{nonce}/api/kernels/x/channels"),
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
        timeout=30,
    )
    assert r.status_code == 400 and error_code(r) == "BAD_REQUEST"


def test_non_utf8_values_are_a_400(proxy):
    """(That such refusals create nothing, test_errors.py checks on a quiet proxy.)"""
    for query in ("ts=1&filename=%80", "ts=%FF&filename=a.csv", "ts=1&filename=a%C3%28.csv"):
        r = requests.post(proxy.url(f"/datalab/start?{query}"), data=CSV, headers={"X-SIGN": "0" * 64}, timeout=30)
        assert r.status_code == 400 and error_code(r) == "BAD_REQUEST" and "UTF-8" in r.json()["message"]
    r = requests.post(proxy.url("/datalab/stop?ts=1&nonce=%80"), headers={"X-SIGN": "0" * 64}, timeout=30)
    assert r.status_code == 400 and error_code(r) == "BAD_REQUEST"


# Signed filenames that would split the proxy's log or `datalab-admin list` into a forged line, or
# show a name other than the file's (U+202E turns "report\u202evsc.exe" into "reportexe.csv").
FORGING_NAMES = {
    "line_separator": "a.csv\u2028instance x holds secret.csv",
    "paragraph_separator": "a\u2029b.csv",
    "right_to_left_override": "report\u202evsc.exe",
    "right_to_left_isolate": "a\u2067b\u2069.csv",
    "right_to_left_mark": "a\u200fb.csv",
    "arabic_letter_mark": "a\u061cb.csv",
    "zero_width_space": "a\u200bb.csv",
    "byte_order_mark": "\ufeffa.csv",
}


def test_names_that_forge_log_lines_or_disguise_themselves_are_refused(make_proxy, world):
    """Each is signed correctly: only the name rule stands between it and a running instance."""
    quiet = world.sub("names")
    p = make_proxy(prefix=quiet)
    for label, name in FORGING_NAMES.items():
        r = p.upload(name, CSV)
        assert (r.status_code, error_code(r)) == (400, "BAD_REQUEST"), (label, r.text[:200])
        assert "filename" in r.json()["message"], label
    assert world.keys(quiet) == [], "a refused name spends no signature and records nothing"
    assert world.containers(quiet) == [], "a refused name starts no instance"
    assert "holds secret.csv" not in p.log_text()


def test_error_bodies_carry_no_engine_text(make_proxy, tmp_path):
    sock = tmp_path / "no-engine.sock"
    p = make_proxy(datalab_backend="docker", datalab_docker_url=f"unix://{sock}")
    r = p.upload("e.csv", CSV)
    assert r.status_code == 503 and error_code(r) == "ENGINE_UNAVAILABLE"
    assert str(sock) not in r.text and "Error" not in r.text
    assert str(sock) in p.log_text()  # the operator still learns why

    dead = make_proxy(redis_url="redis://127.0.0.1:1/0")
    r = dead.upload("e.csv", CSV)
    assert r.status_code == 503 and error_code(r) == "REDIS_UNAVAILABLE"
    assert "127.0.0.1:1" not in r.text and "Connect" not in r.text


@pytest.fixture
def subdomain_proxy(make_proxy):
    """A proxy routing by host under localhost:<its port>, as datalab.example.com would be."""
    return make_proxy(datalab_routing="subdomain", datalab_public_host="localhost:{port}")


def test_subdomain_routing_gives_each_instance_its_own_origin(subdomain_proxy, world):
    p = subdomain_proxy
    main = f"http://localhost:{p.port}"
    a, b = p.start_instance("a.csv", CSV), p.start_instance("b.csv", b"b\n")
    host_of = {n: hosts.instance_host(instance_of(world, n).id, f"localhost:{p.port}") for n in (a, b)}

    browser = requests.Session()  # one browser, both instances open at once
    for n in (a, b):
        r = browser.get(f"{main}/datalab/view/{n}/tree?x=1", allow_redirects=False, timeout=30)
        assert r.status_code == 302 and "Set-Cookie" not in r.headers  # no cookie on the main host
        assert r.headers["Location"] == f"//{host_of[n]}/datalab/view/{n}/tree?x=1"
        r = browser.get(urljoin(main, r.headers["Location"]), allow_redirects=False, timeout=30)
        assert r.status_code == 302 and r.headers["Location"] == "/tree?x=1"
        assert "Domain" not in r.headers["Set-Cookie"]  # host-only
    listing = {
        n: {i["name"] for i in browser.get(f"http://{host_of[n]}/api/contents", timeout=30).json()["content"]}
        for n in (a, b)
    }
    assert listing == {a: {"a.csv"}, b: {"b.csv"}}

    cookie_a, cookie_b = (
        next(c.value for c in browser.cookies if c.domain.startswith(host_of[n].split(":")[0])) for n in (a, b)
    )
    r = requests.get(f"http://{host_of[b]}/api/contents", headers={"Cookie": f"datalab_session={cookie_a}"}, timeout=30)
    assert r.status_code == 403 and error_code(r) == "NO_SESSION"  # A's cookie opens no other instance
    # a cookie tossed by a page of A's host (Domain=the public host) comes first; B's own still counts
    tossed = {"Cookie": f"datalab_session={cookie_a}; datalab_session={cookie_b}"}
    r = requests.get(f"http://{host_of[b]}/api/contents", headers=tossed, timeout=30)
    assert r.status_code == 200 and {i["name"] for i in r.json()["content"]} == {"b.csv"}
    r = browser.get(f"http://{host_of[b]}/datalab/view/{a}/tree", allow_redirects=False, timeout=30)
    assert r.status_code == 404 and error_code(r) == "NONCE_UNKNOWN"  # nor does A's nonce on B's host
    r = browser.get(f"{main}/api/contents", timeout=30)
    assert r.status_code == 404 and error_code(r) == "UNKNOWN_HOST"  # the main host serves no instance

    page_a = Browser(p, base=f"http://{host_of[a]}", http=browser)
    kernel = page_a.start_kernel()
    assert page_a.execute(kernel, "print(open('a.csv').read())") == "x,y\n1,2\n\n"
    status, body = ws_refusal(
        f"ws://{host_of[a]}/api/kernels/{kernel}/channels", page_a.cookie_header(), f"http://{host_of[b]}"
    )
    assert status == 403 and b"BAD_ORIGIN" in body  # B's pages cannot reach A's kernel


def test_static_keeps_the_host_rule_of_view(subdomain_proxy, world):
    """A's nonce on another instance's host is unknown to static as it is to view: that host is
    B's origin, and A's files are not served there (sandboxed or not)."""
    p = subdomain_proxy
    a = p.start_instance("a.csv", CSV)
    public = f"localhost:{p.port}"
    host_a = hosts.instance_host(instance_of(world, a).id, public)
    host_b = hosts.instance_host(inputs.new_instance_id(), public)  # the rule reads the host alone
    for endpoint in ("view", "static"):
        r = requests.get(f"http://{host_b}/datalab/{endpoint}/{a}/files/a.csv", allow_redirects=False, timeout=30)
        assert (r.status_code, error_code(r)) == (404, "NONCE_UNKNOWN"), endpoint
    for host in (host_a, public):  # its own host, and the main one the frontend fetches through
        r = requests.get(f"http://{host}/datalab/static/{a}/files/a.csv", timeout=30)
        assert (r.status_code, r.content) == (200, CSV), host


@pytest.fixture
def public_network(docker_client, world):
    """A Docker network of this test whose addresses are public (11.0.0.0/8 is global to Python's
    ipaddress and so to mitmproxy's block_global). It is internal: it has no route off this machine,
    so the only place its containers reach is the host's end of the bridge."""
    from docker.types import IPAMConfig
    from docker.types import IPAMPool

    octet = int.from_bytes(os.urandom(1)) % 200 + 20
    subnet, gateway = f"11.254.{octet}.0/24", f"11.254.{octet}.1"
    net = docker_client.networks.create(
        f"{world.prefix[:-1]}-public",
        driver="bridge",
        internal=True,
        ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=subnet, gateway=gateway)]),
        labels={LABEL_PREFIX: world.prefix},
    )
    yield net, gateway
    net.remove()


def net_subnet(net) -> str:
    return net.attrs["IPAM"]["Config"][0]["Subnet"]


def test_a_client_with_a_public_address_is_served(
    public_network, docker_client, redis_server, world, sign_key, tmp_path
):
    net, gateway = public_network
    net.reload()
    assert net.attrs["Internal"] is True  # no egress: Docker gives the network no way out
    port = free_port()
    # A second listener on the bridge's host address: the proxy's usual one stays on loopback.
    listen = ["--mode", f"reverse:http://127.0.0.1:1@{gateway}:{port}"]
    p = Proxy(redis_server.url, world.prefix, sign_key, tmp_path, {"datalab_pool_size": 0}, args=listen).start()
    try:
        code = (
            "import json, urllib.request, urllib.error\n"
            "try:\n"
            f"    urllib.request.urlopen('http://{gateway}:{port}/datalab/nothing', timeout=20)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, json.load(e)['code'])\n"
            "except Exception as e:\n"
            "    print('refused:', repr(e))\n"
        )
        # Labelled for the run's scrub, under a prefix of its own: under world.prefix the session proxy's
        # reconciliation took it for an orphaned instance and removed it mid-test.
        own = world.sub("public-client")
        world.prefixes.add(own)
        client = docker_client.containers.run(
            IMAGE, ["python3", "-c", code], network=net.name, labels={LABEL_PREFIX: own}, detach=True
        )
        try:
            client.wait(timeout=60)
            assert client.logs().decode().strip() == "404 NOT_FOUND"
        finally:
            client.remove(force=True)
        # mitmdump logs each client's address: it was the container's public one
        seen = re.findall(r"^(\d+\.\d+\.\d+\.\d+):\d+: GET ", p.log_text(), re.MULTILINE)
        assert any(
            ipaddress.ip_address(a).is_global and ipaddress.ip_address(a) in ipaddress.ip_network(net_subnet(net))
            for a in seen
        )
    finally:
        p.stop()


def test_a_flow_moved_by_a_buggy_addon_goes_nowhere(redis_server, world, sign_key, tmp_path):
    """The last word on every upstream connection: it opens to an instance or the upload sink only,
    whatever the hooks did (here another addon moves routed flows to a local listener)."""
    bait = socket.create_server(("127.0.0.1", free_port()))
    bait.settimeout(0.5)
    script = ["-s", str(Path(__file__).with_name("misroute.py"))]
    p = Proxy(redis_server.url, world.prefix, sign_key, tmp_path, {"datalab_pool_size": 0}, args=script).start()
    try:
        browser = Browser(p)
        browser.view(p.start_instance("r.csv", b"a\n1\n"))
        assert browser.get("/api/status").status_code == 200  # routed as usual
        for body in (None, b"x" * (1 << 20)):  # a big body streams before the hooks are over
            r = browser.http.put(
                p.url("/api/contents/r.csv"),
                data=body,
                headers={"X-Test-Misroute": f"127.0.0.1:{bait.getsockname()[1]}"},
                timeout=30,
            )
            assert r.status_code == 502 and "not routed" in r.text
        with pytest.raises(TimeoutError):
            bait.accept()  # nothing ever connected to it
        assert "refused to connect to" in p.log_text()
    finally:
        p.stop()
        bait.close()
