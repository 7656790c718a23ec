"""Property-based tests (hypothesis) of every parser of untrusted input.

The contract: no crash, no redirect off the proxy's origin, non-UTF-8 values are 400, and every
refusal is JSON {"code", "message"} with a 4xx status. The pure rules (inputs, signing, hosts) get
arbitrary text, lone surrogates included (mitmproxy keeps non-UTF-8 bytes as surrogates); the API
and the router get raw request bytes, parsed by mitmproxy as they would be on the wire, and a real
Redis (a 503 REDIS_UNAVAILABLE would be a finding too).

The examples are derandomized, so every run (and CI) tries the same ones. For a longer random
search: DATALAB_FUZZ_EXPLORE=1 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import unicodedata
from urllib.parse import quote
from urllib.parse import urljoin
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

import hosts
import inputs
import signing
from api import Api
from backends import Instance
from helpers import KEY
from helpers import answering_jupyter
from helpers import recorded
from helpers import runtime_for
from marks import DEFERRED
from marks import ROUTED
from marks import SINK
from marks import START
from marks import STATIC
from router import Router
from upload import UploadSink

EXPLORE = os.environ.get("DATALAB_FUZZ_EXPLORE") == "1"


def fuzz_settings(examples: int, **more) -> settings:
    return settings(
        max_examples=examples * (10 if EXPLORE else 1),
        deadline=None,
        derandomize=not EXPLORE,
        database=None,
        **more,
    )


PURE = fuzz_settings(150)
# The fixtures (a Redis, a sink, a recorded instance) are set up once per test and shared by its
# examples on purpose: state left by one example (a spent signature, a session) is fair game.
FLOWS = fuzz_settings(80, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

BASE = "https://proxy.example/"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")
LABEL_RE = re.compile(r"[a-z2-7]{26}")

# ---------------------------------------------------------------------------------------------------
# Strategies


ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
TRICKY = [
    "/", "//", "\\", "/\\", "..", ".", "%", "%%", "%2", "%2F", "%2f", "%5C", "%5c", "%252F", "%25", "%00",
    "%0d%0a", "%0D%0A", "%09", "%80", "%FF", "%C0%AF", "%E2%80%A8", "\t", "\r", "\n", "\r\n", " ", "\x00",
    "\x7f", "\x85", "\x9b", "\u2028", "\ufeff", "\u00b2", "\u0661", "\u212a", "\udc80", "\udcff", "\ud800",
    "é", "?", "#", "@", ":", ";", "&", "=", "+", "http:", "https://", "javascript:", "evil.example", "tree",
]  # fmt: skip


def percent(data: bytes, lower: bool) -> str:
    encoded = "".join(f"%{b:02X}" for b in data)
    return encoded.lower() if lower else encoded


percent_encoded = st.builds(percent, st.binary(max_size=6), st.booleans())
untrusted = st.lists(
    st.one_of(st.sampled_from(TRICKY), percent_encoded, st.text(ANY_CHAR, max_size=6)), max_size=8
).map("".join)

TRICKY_BYTES = [
    b"/", b"//", b"\\", b"%2F", b"%2f", b"%5C", b"%252F", b"%", b"%2", b"%00", b"%0D%0A", b"%80", b"%FF",
    b"%C0%AF", b"\x80", b"\xff", b"\xc3\xa9", b"\xc2\xb2", b"\xed\xa0\x80", b"..", b".", b"\t", b"\r\n", b" ",
    b"\x00", b"#", b"@", b":", b";", b",", b'"', b"=", b"+", b"http:", b"https://evil.example", b"tree",
]  # fmt: skip
raw = st.lists(
    st.one_of(st.sampled_from(TRICKY_BYTES), st.binary(max_size=4), percent_encoded.map(str.encode)), max_size=8
).map(b"".join)
raw_query = st.lists(
    st.tuples(st.sampled_from([b"ts", b"filename", b"nonce", b"x", b""]) | raw, st.sampled_from([b"=", b""]), raw),
    max_size=5,
).map(lambda pairs: b"&".join(k + eq + v for k, eq, v in pairs))

# ---------------------------------------------------------------------------------------------------
# What every answer must be


def assert_on_origin(location: str) -> None:
    """A redirect target (or a forwarded path) that cannot leave https://proxy.example."""
    assert location.startswith("/") and not location.startswith(("//", "/\\")), location
    assert all(c.isascii() and c.isprintable() for c in location), location
    parts = urlsplit(urljoin(BASE, location))
    assert (parts.scheme, parts.netloc) == ("https", "proxy.example"), location
    # A browser (WHATWG URL) treats "\" as "/" and drops tab, CR and LF anywhere.
    browser = location.replace("\\", "/").translate({9: None, 10: None, 13: None})
    assert browser.startswith("/") and not browser.startswith("//"), location


def assert_json_refusal(response: http.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.content)
    assert response.headers.get("Content-Type") == "application/json"
    body = json.loads(response.content)
    assert set(body) == {"code", "message"} and all(isinstance(v, str) and v for v in body.values()), body


def answer(flow: http.HTTPFlow) -> http.Response | None:
    """The flow's response, or the one kept until the request body has been drained."""
    if flow.response is None and DEFERRED in flow.metadata:
        return http.Response.from_state(flow.metadata[DEFERRED])
    return flow.response


# ---------------------------------------------------------------------------------------------------
# inputs.py


@PURE
@given(untrusted, untrusted)
@example("%2F%2Fevil.example", "")
@example("\t/\\/evil.example", "a=\r\nb")
@example("a\udc80b", "x=\udcff")  # non-UTF-8 bytes of a path, as mitmproxy hands them over
@example("\ud800", "\udfff")
def test_safe_destination_stays_on_origin(raw_path, raw_query):
    assert_on_origin(inputs.safe_destination(raw_path, raw_query))


@PURE
@given(
    st.one_of(
        untrusted,
        st.lists(
            st.sampled_from(["a", ".", "é", "\x85", "\u2028", "\u202e", "\u200d", " ", "x" * 100]), max_size=8
        ).map("".join),
    )
)
@example("a\x85b")
def test_check_filename_accepts_only_single_plain_names(name):
    try:
        accepted = inputs.check_filename(name)
    except ValueError:
        return
    assert accepted == name and name
    assert not any(bad in name for bad in ("/", "\\", "..", "\x00"))
    assert not any(unicodedata.category(c) == "Cc" for c in name), repr(name)  # C0, DEL and C1
    assert not any(unicodedata.category(c) in ("Zl", "Zp") for c in name), repr(name)  # no forged lines
    assert all(unicodedata.category(c) != "Cf" or c in "\u200c\u200d" for c in name), repr(name)  # nor bidi tricks
    assert len(name.encode("utf-8", "surrogatepass")) <= inputs.MAX_FILENAME_BYTES


token_like = st.builds(
    lambda body, suffix: body + suffix,
    st.text(st.sampled_from("AZaz09_-N"), min_size=20, max_size=130),
    st.sampled_from(["", "", "", "", "\n", "\r\n", " ", "\x00", "é", "\udc80", "=", "/"]),
)


@PURE
@given(st.one_of(token_like, untrusted))
@example("N" * 32 + "\n")
def test_token_shape(value):
    shaped = inputs.is_token(value)
    assert shaped is bool(TOKEN_RE.fullmatch(value)), repr(value)
    if shaped:
        assert inputs.check_token(value) == value
    else:
        with pytest.raises(ValueError):
            inputs.check_token(value)


@PURE
@given(untrusted)
def test_check_utf8(value):
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(ValueError):
            inputs.check_utf8(value)
    else:
        assert inputs.check_utf8(value) == value


# ---------------------------------------------------------------------------------------------------
# signing.py


@PURE
@given(
    st.one_of(
        st.text(st.sampled_from("0123456789"), max_size=15),
        st.text(st.characters(categories=["Nd", "No"]), max_size=14),
        untrusted,
    )
)
def test_parse_timestamp(ts):
    try:
        seconds = signing.parse_timestamp(ts)
    except ValueError:
        return
    assert ts.isascii() and ts.isdigit() and (len(ts) <= 10 or len(ts) == signing.MILLIS_DIGITS), repr(ts)
    assert isinstance(seconds, float) and seconds >= 0


@PURE
@given(untrusted, st.sampled_from(signing.SCHEMES))
def test_signature_ok_any_given_is_a_bool(given_sign, scheme):
    expected = signing.signature(KEY, "1700000000", "a.csv", scheme)
    ok = signing.signature_ok(KEY, "1700000000", "a.csv", given_sign, scheme)
    assert ok is (given_sign.strip().lower() == expected)


@fuzz_settings(50)
@given(st.sampled_from(signing.SCHEMES), st.integers(0, 2**64 - 1), st.sampled_from(["", " ", "\t", "\n"]))
def test_signature_ok_ignores_case_and_surrounding_blanks(scheme, upper, pad):
    expected = signing.signature(KEY, "1700000000", "a.csv", scheme)
    given_sign = pad + "".join(c.upper() if upper >> i & 1 else c for i, c in enumerate(expected)) + pad
    assert signing.signature_ok(KEY, "1700000000", "a.csv", given_sign, scheme)


# ---------------------------------------------------------------------------------------------------
# hosts.py

label_like = st.text(st.sampled_from("abcz27AZ09\u212a"), min_size=25, max_size=27)
host_like = st.one_of(
    untrusted,
    st.builds(
        lambda a, b, c: a + b + c,
        label_like | untrusted,
        st.sampled_from([".datalab.example", ".DATALAB.example.", "."]),
        st.sampled_from(["", ":80", ":443", ":8080", ":\u00b2", ":", " "]),
    ),
)


@PURE
@given(host_like, st.sampled_from(["datalab.example", "datalab.example:8080", "localhost"]))
def test_classify(host_header, public_host):
    kind = hosts.classify(host_header, public_host)
    assert isinstance(kind, hosts.HostKind)
    assert not (kind.main and kind.label)
    if kind.label:
        assert len(kind.label) == hosts.LABEL_CHARS and kind.label.isascii() and kind.label.isalnum()
        assert kind.label == kind.label.lower()


origin_like = st.one_of(
    untrusted,
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["http", "https", "HTTPS", "ws", "javascript", ""]),
        host_like,
        st.sampled_from(["", ":80", ":443", ":8080", ":0080", ":80:80", ":\u00b2", ":\u0661", ":", ":99999", ":-1"]),
        st.sampled_from(["", "/", "/x", "?", "?a", "#f", "@evil.example"]),
    ),
)


@PURE
@given(origin_like)
@example("http://a:\u00b2")
@example("http://a:80:80")
def test_normalize_origin(origin):
    normal = hosts.normalize_origin(origin)
    assert isinstance(normal, str)
    if normal:
        scheme, sep, netloc = normal.partition("://")
        assert sep and scheme in hosts.DEFAULT_PORTS and netloc and "@" not in netloc and "/" not in netloc
        assert hosts.normalize_origin(normal) == normal, repr(origin)


@PURE
@given(st.one_of(st.none(), origin_like), host_like, st.frozensets(origin_like, max_size=1))
@example("http://a", "a:\u00b2", frozenset())
def test_origin_allowed_is_a_bool(origin, host_header, allowed):
    assert hosts.origin_allowed(origin, host_header, allowed) in (True, False)
    if origin is None:
        assert hosts.origin_allowed(origin, host_header, allowed)


@PURE
@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_instance_label(instance_id):
    assert LABEL_RE.fullmatch(hosts.instance_label(instance_id))


@PURE
@given(st.text(ANY_CHAR))
def test_instance_label_of_any_text_is_a_label_or_a_value_error(instance_id):
    try:
        label = hosts.instance_label(instance_id)
    except ValueError:
        return
    assert LABEL_RE.fullmatch(label)


# ---------------------------------------------------------------------------------------------------
# The API and the router, on raw request bytes

NONCE = "N" * 32
SESSION = "S" * 32
HOST = b"proxy.example:8080"
INSTANCE_ID = "i" * 32
PUBLIC_HOST = "datalab.example"
INSTANCE_HOST = hosts.instance_host(INSTANCE_ID, PUBLIC_HOST)
SUBDOMAIN = {"routing": "subdomain", "public_host": PUBLIC_HOST}
ALLOWED_ORIGIN = "https://app.example"


@pytest.fixture
async def live(redis_url, request):
    """A runtime on a real Redis with one recorded instance (NONCE, SESSION) whose "Jupyter" answers
    /api/status, so view redirects and static fetches are routed. Indirect parametrization gives
    more settings (SUBDOMAIN: each instance on its own host under PUBLIC_HOST)."""
    server = await asyncio.start_server(answering_jupyter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rt = runtime_for(redis_url=redis_url, **getattr(request, "param", {}))
    instance = Instance(INSTANCE_ID, "docker", "c1", "127.0.0.1", port, "a.csv", time.time(), token="t0ken")
    await recorded(rt.store, instance, NONCE)
    await rt.store.add_session(SESSION, instance.id, 600)
    yield rt
    await rt.done()
    server.close()


def raw_flow(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> http.HTTPFlow:
    req = tutils.treq(method=method, path=path, content=b"")
    req.headers = http.Headers([(b"Host", HOST), *headers])
    return tflow.tflow(req=req, resp=False)


async def through_api(flow: http.HTTPFlow, sink: UploadSink, rt) -> http.HTTPFlow:
    api = Api(rt, sink)
    with taddons.context(api):
        await api.requestheaders(flow)
    return flow


def check_api_answer(flow: http.HTTPFlow) -> None:
    response = answer(flow)
    if response is None:  # a valid start streams its body; a static fetch goes to the instance
        assert (flow.metadata.get(SINK) and flow.metadata.get(START)) or flow.metadata.get(STATIC), flow.metadata
        if flow.metadata.get(STATIC):
            assert flow.request.host == "127.0.0.1"
            assert_on_origin(flow.request.path)
        return
    if response.status_code == 302:
        assert flow.request.path.startswith("/datalab/view/")
        assert_on_origin(response.headers["Location"])
        return
    assert_json_refusal(response)


query_part = st.one_of(st.just(b""), raw_query.map(lambda q: b"?" + q))
api_path = st.one_of(
    st.builds(
        lambda endpoint, nonce, dest, query: b"/datalab/" + endpoint + b"/" + nonce + b"/" + dest + query,
        st.sampled_from([b"view", b"static"]),
        st.one_of(st.just(NONCE.encode()), st.just(NONCE.encode() + b"\n"), raw),
        raw,
        query_part,
    ),
    st.builds(
        lambda endpoint, query: b"/datalab/" + endpoint + query,
        st.sampled_from([b"start", b"stop", b"start/", b"view", b"static/", b"", b"START", b"start%2F"]) | raw,
        query_part,
    ),
)
# A body's framing as mitmproxy lets it through (it refuses a malformed Content-Length itself).
framing = st.sampled_from(
    [
        (b"Content-Length", b"0"),
        (b"Content-Length", b"4"),
        (b"Content-Length", b"104857601"),
        (b"Transfer-Encoding", b"chunked"),
    ]
)
headers = st.lists(
    st.tuples(st.sampled_from([b"X-SIGN", b"Cookie", b"x-sign", b"Upgrade", b"Origin"]), raw) | framing, max_size=3
)


@FLOWS
@given(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT"]), api_path, headers)
@example(b"POST", b"/datalab/start?ts=1&filename=%80", [(b"X-SIGN", b"\xff")])
@example(b"POST", b"/datalab/stop?ts=1&ts=&nonce=%00", [(b"X-SIGN", b"")])
async def test_api_requests_are_refused_in_json_or_stay_on_origin(sink, live, method, path, extra):
    """Any request under /datalab/: refused in JSON with a 4xx, or (view) a redirect on this origin."""
    check_api_answer(await through_api(raw_flow(method, path, extra), sink, live))


@FLOWS
@given(st.sampled_from([b"GET", b"HEAD"]), st.sampled_from([b"view", b"static"]), raw, query_part, headers)
@example(b"GET", b"view", b"%2F%2Fevil.example/tree", b"?x=1", [])
@example(b"GET", b"view", b"a\x80b", b"?c=\xff", [])  # non-UTF-8 bytes in the path and the query
@example(b"GET", b"static", b"files/\xff", b"", [])
async def test_view_and_static_of_a_live_nonce_stay_on_origin(sink, live, method, endpoint, dest, query, extra):
    """With a nonce that names a live instance: view redirects, static is forwarded, both on-origin."""
    path = b"/datalab/" + endpoint + b"/" + NONCE.encode() + b"/" + dest + query
    check_api_answer(await through_api(raw_flow(method, path, extra), sink, live))


def wire(text: str) -> bytes:
    """The bytes a client sent for text that mitmproxy decoded (non-UTF-8 bytes kept as surrogates)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoding yields: send its (invalid) UTF-8 form
        return text.encode("utf-8", "surrogatepass")


filenames = st.one_of(
    st.sampled_from(["data.csv", "a b.txt", ".hidden", "x" * 255, "é" * 128, "x" * 256, "a..b", "a\x85"]),
    st.text(st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="/\\"), min_size=1, max_size=30),
    untrusted,
)
nonces = st.one_of(st.text(st.sampled_from("AZaz09_-M"), min_size=22, max_size=128), token_like, untrusted)


@FLOWS
@given(
    st.one_of(st.tuples(st.just("start"), filenames), st.tuples(st.just("stop"), nonces)),
    st.sampled_from([0, 0, 0, -1, 1, -400, 400]),
    st.booleans(),
    st.sampled_from(["exact", "exact", "upper", "padded", "wrong"]),
    st.sampled_from([b"", b"", b"", b"&x=%FF", b"&&", b"&=", b"&x", b"&ts=1", b"&filename=a", b"&nonce=" + b"M" * 32]),
    st.lists(framing, max_size=1),
)
async def test_signed_requests_are_started_or_refused_in_json(
    sink, live, signed, skew, millis, spelling, extra, length
):
    """Correctly signed starts and stops of any subject: a start streams or is refused, never a 500."""
    endpoint, subject = signed
    ts = str(int((time.time() + skew) * (1000 if millis else 1)))
    name = "filename" if endpoint == "start" else "nonce"
    if endpoint == "stop" and subject.startswith(NONCE):
        subject = "M" + subject  # stopping the shared instance would ask the (absent) Docker engine
    try:
        sign = signing.signature(KEY, ts, subject)
    except UnicodeEncodeError:  # not UTF-8: nothing to sign, refused before the signature anyway
        sign = "0" * 64
    sign = {"exact": sign, "upper": sign.upper(), "padded": f" {sign}\t", "wrong": sign[::-1]}[spelling]
    query = f"ts={ts}&{name}=".encode() + quote(wire(subject), safe="").encode() + extra
    flow = raw_flow(b"POST", f"/datalab/{endpoint}?".encode() + query, [(b"X-SIGN", sign.encode()), *length])
    check_api_answer(await through_api(flow, sink, live))


cookie_header = st.lists(
    st.one_of(
        st.sampled_from(
            [b"datalab_session=", SESSION.encode(), b"datalab_session=" + SESSION.encode(), b"; ", b";", b"=", b'"']
        ),
        raw,
    ),
    max_size=6,
).map(b"".join)


async def through_router(flow: http.HTTPFlow, rt) -> http.HTTPFlow:
    router = Router(rt, UploadSink(rt))
    with taddons.context(router) as tctx:
        tctx.configure(router)
        await router.requestheaders(flow)
    return flow


@FLOWS
@given(st.lists(cookie_header, max_size=2), raw)
@example([b"datalab_session=" + SESSION.encode()], b"/tree")
@example([b"datalab_session=" + SESSION.encode() + b"\xff; _xsrf=\x80"], b"/tree")
async def test_router_cookie_parsing(live, cookies, path):
    """Any Cookie header: routed by the session it names, else 403 NO_SESSION; the cookie is not forwarded."""
    flow = await through_router(raw_flow(b"GET", b"/" + path, [(b"Cookie", c) for c in cookies]), live)
    if flow.response is None:
        assert flow.metadata[ROUTED] == INSTANCE_ID
        assert "datalab_session" not in flow.request.cookies
        return
    assert_json_refusal(flow.response)
    assert flow.response.status_code == 403 and json.loads(flow.response.content)["code"] == "NO_SESSION"


ws_hosts = st.one_of(st.just(HOST), host_like.map(wire), raw)
ws_origins = st.one_of(
    st.none(),
    st.sampled_from([ALLOWED_ORIGIN, "HTTPS://App.Example:443/", "https://app.example:8443", "null"]).map(str.encode),
    st.builds(lambda scheme, host: scheme + host, st.sampled_from([b"http://", b"https://", b"ws://"]), ws_hosts),
    origin_like.map(wire),
    raw,
)


@FLOWS
@pytest.mark.parametrize("live", [{"allowed_origins": ALLOWED_ORIGIN}], indirect=True)
@given(ws_origins, ws_hosts)
@example(b"http://a", "a:\u00b2".encode())  # was a ValueError from int('²') (hosts._netloc)
@example(ALLOWED_ORIGIN.encode(), b"\xff")
async def test_router_websocket_origin_check(live, origin, host):
    """A WebSocket reaches the instance only from its own host's origin or a listed one."""
    extra = [(b"Upgrade", b"websocket"), (b"Cookie", b"datalab_session=" + SESSION.encode())]
    flow = raw_flow(b"GET", b"/api/kernels/k/channels", extra + ([(b"Origin", origin)] if origin is not None else []))
    flow.request.headers[b"Host"] = host
    sent_origin, host_header = flow.request.headers.get("Origin"), flow.request.host_header or ""
    flow = await through_router(flow, live)
    if flow.response is None:
        assert flow.metadata[ROUTED] == INSTANCE_ID
        assert hosts.origin_allowed(sent_origin, host_header, live.settings.origins)
        return
    assert_json_refusal(flow.response)
    assert json.loads(flow.response.content)["code"] == "BAD_ORIGIN"


# Subdomain routing: the Host header decides which instance a request is for.
public_hosts = st.one_of(
    st.sampled_from([INSTANCE_HOST, INSTANCE_HOST.upper() + ".", PUBLIC_HOST, "a" * 26 + "." + PUBLIC_HOST]).map(
        str.encode
    ),
    st.builds(
        lambda host, port: host + port,
        st.sampled_from([INSTANCE_HOST.encode(), PUBLIC_HOST.encode()]) | raw,
        st.sampled_from([b"", b":443", b":8080", b":\xc2\xb2", b":"]),
    ),
    host_like.map(wire),
)


@FLOWS
@pytest.mark.parametrize("live", [SUBDOMAIN], indirect=True)
@given(public_hosts, raw, query_part)
@example(b"proxy.example", b"%2F%2Fevil.example/tree", b"?x=1")
@example(INSTANCE_HOST.encode(), b"a\x80b", b"?c=\xff")
async def test_subdomain_view_sends_the_browser_only_to_the_instance_host(sink, live, host, dest, query):
    """View on another host redirects to the nonce's instance host (scheme-relative), never elsewhere."""
    flow = raw_flow(b"GET", b"/datalab/view/" + NONCE.encode() + b"/" + dest + query, [])
    flow.request.headers[b"Host"] = host
    response = answer(await through_api(flow, sink, live))
    assert response is not None
    if response.status_code != 302:
        assert_json_refusal(response)
        return
    location = response.headers["Location"]
    if location.startswith("//"):
        prefix = f"//{INSTANCE_HOST}/datalab/view/{NONCE}"
        assert location.startswith(prefix + "/"), location
        assert_on_origin(location[len(prefix) :])
        assert urlsplit(urljoin("https://" + PUBLIC_HOST, location)).netloc == INSTANCE_HOST
    else:
        assert hosts.classify(flow.request.host_header or "", PUBLIC_HOST).label == hosts.instance_label(INSTANCE_ID)
        assert_on_origin(location)


@FLOWS
@pytest.mark.parametrize("live", [SUBDOMAIN], indirect=True)
@given(public_hosts, st.lists(cookie_header, max_size=2))
@example(INSTANCE_HOST.encode(), [b"datalab_session=" + SESSION.encode()])
async def test_subdomain_router_routes_only_the_instance_host(live, host, cookies):
    """Any Host header: a session is routed only on its instance's own host."""
    flow = raw_flow(b"GET", b"/api/kernels", [(b"Cookie", c) for c in cookies])
    flow.request.headers[b"Host"] = host
    flow = await through_router(flow, live)
    if flow.response is None:
        assert flow.metadata[ROUTED] == INSTANCE_ID
        assert hosts.classify(flow.request.host_header or "", PUBLIC_HOST).label == hosts.instance_label(INSTANCE_ID)
        return
    assert_json_refusal(flow.response)
    assert json.loads(flow.response.content)["code"] in ("UNKNOWN_HOST", "NO_SESSION")
