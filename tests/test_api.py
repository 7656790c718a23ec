import asyncio
import json
import time

import pytest

import signing
from api import session_cookie
from backends import Instance
from helpers import answering_jupyter
from helpers import recorded
from helpers import request_flow
from helpers import run_headers
from helpers import runtime_for
from helpers import start_flow
from helpers import through_api
from marks import DEFERRED
from marks import SINK
from marks import START
from upload import UNREAD
from upload import BodyCollector


def body(flow) -> dict:
    return json.loads(flow.response.content)


@pytest.fixture
def rt(redis_url):
    """A runtime on a real Redis: a start spends its signature there."""
    return runtime_for(redis_url=redis_url)


async def test_valid_start_streams_its_body_to_the_sink(sink, rt):
    flow = await run_headers(start_flow(), sink, rt)
    assert flow.response is None
    assert flow.metadata[START]["filename"] == "data.csv" and flow.metadata[SINK]
    assert isinstance(flow.request.stream, BodyCollector) and flow.request.stream.limit == 100 * 1024 * 1024
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", sink.port)
    assert flow.request.headers["Host"] == "proxy.example:8080"


async def test_a_start_signs_and_carries_its_owner_profile_and_unpack(sink, rt):
    flow = await run_headers(start_flow("a.tgz", owner="u-1@x", profile="default", unpack="1"), sink, rt)
    assert flow.response is None
    assert flow.metadata[START] == {"filename": "a.tgz", "unpack": "tar.gz", "profile": "default", "owner": "u-1@x"}


async def test_a_start_may_name_a_declared_profile_and_no_other(sink, redis_url):
    rt = runtime_for(redis_url=redis_url, profile_tables={"big": {"mem_limit": "4g"}})
    flow = await run_headers(start_flow("a.csv", profile="big"), sink, rt)
    assert flow.response is None and flow.metadata[START]["profile"] == "big"
    flow = await through_api(start_flow("a.csv", profile="huge"), sink, rt)
    assert (flow.response.status_code, body(flow)["code"]) == (400, "PROFILE_UNKNOWN") and START not in flow.metadata


async def test_millisecond_timestamp_is_accepted(sink, rt):
    flow = await run_headers(start_flow(ts=str(int(time.time() * 1000))), sink, rt)
    assert flow.response is None and flow.metadata[START]


@pytest.mark.parametrize(
    "make, status, code",
    [
        (lambda: start_flow(sign="0" * 64), 403, "BAD_SIGNATURE"),
        (
            lambda: start_flow(sign=signing.signature("other-key", str(int(time.time())), "data.csv")),
            403,
            "BAD_SIGNATURE",
        ),
        (lambda: start_flow(ts=str(int(time.time()) - 301)), 403, "STALE_TIMESTAMP"),
        (lambda: start_flow(ts=str(int(time.time()) + 400)), 403, "STALE_TIMESTAMP"),
        (lambda: start_flow(ts="soon"), 400, "BAD_REQUEST"),
        (lambda: start_flow(filename="../etc/passwd"), 400, "BAD_REQUEST"),
        (lambda: start_flow(filename="a/b.csv"), 400, "BAD_REQUEST"),
        (lambda: start_flow(filename="a\\b.csv"), 400, "BAD_REQUEST"),
        (lambda: start_flow(filename=""), 400, "BAD_REQUEST"),
        (lambda: start_flow(headers={"Content-Length": str(100 * 1024 * 1024 + 1)}), 413, "UPLOAD_TOO_LARGE"),
        (lambda: start_flow(owner="alice", signed={}), 403, "BAD_SIGNATURE"),
        (lambda: start_flow(profile="default", signed={}), 403, "BAD_SIGNATURE"),
        (lambda: start_flow("a.zip", unpack="1", signed={}), 403, "BAD_SIGNATURE"),
        (lambda: start_flow(owner="alice", signed={"owner": "bob"}), 403, "BAD_SIGNATURE"),
        (lambda: start_flow(owner="alice", unpack="0", signed={"owner": "alice"}), 403, "BAD_SIGNATURE"),
        (lambda: start_flow(owner="al ice"), 400, "BAD_REQUEST"),
        (lambda: start_flow(owner="x" * 129), 400, "BAD_REQUEST"),
        (lambda: start_flow(profile="Big"), 400, "BAD_REQUEST"),
        (lambda: start_flow(profile="no-such-profile"), 400, "PROFILE_UNKNOWN"),
        (lambda: start_flow(unpack="yes"), 400, "BAD_REQUEST"),
        (lambda: start_flow("a.csv", unpack="1"), 400, "BAD_REQUEST"),
        (lambda: request_flow("POST", "/datalab/start?filename=a.csv", {"X-SIGN": "x"}), 400, "BAD_REQUEST"),
        (lambda: request_flow("POST", "/datalab/start?ts=1&ts=2&filename=a.csv"), 400, "BAD_REQUEST"),
        (lambda: request_flow("GET", "/datalab/start?ts=1&filename=a.csv"), 405, "METHOD_NOT_ALLOWED"),
        (lambda: request_flow("POST", "/datalab/view/abc/tree"), 405, "METHOD_NOT_ALLOWED"),
        (lambda: request_flow("GET", "/datalab/view/not-a-nonce/tree"), 404, "NONCE_UNKNOWN"),
        (lambda: request_flow("GET", "/datalab/static/x/files/a.csv"), 404, "NONCE_UNKNOWN"),
        (lambda: request_flow("GET", "/datalab/other"), 404, "NOT_FOUND"),
        (lambda: request_flow("GET", "/datalab"), 404, "NOT_FOUND"),
    ],
)
async def test_refusals_are_json_and_start_nothing(make, status, code, sink, rt):
    flow = await through_api(make(), sink, rt)
    assert flow.response.status_code == status
    assert flow.response.headers["Content-Type"] == "application/json"
    assert body(flow)["code"] == code and body(flow)["message"]
    assert START not in flow.metadata


async def test_method_not_allowed_names_the_method(sink):
    flow = await run_headers(request_flow("PUT", "/datalab/start"), sink)
    assert flow.response.headers["Allow"] == "POST"


async def test_a_refusal_with_a_body_sends_it_unread_to_the_sink(sink):
    flow = await run_headers(start_flow(sign="0" * 64, content=b"x" * 100), sink)
    assert flow.response is None and flow.metadata[DEFERRED]
    assert flow.request.stream.limit == 0 and flow.request.headers[UNREAD] == "1"  # nothing kept, answered at once
    flow = await run_headers(start_flow(sign="0" * 64, content=b""), sink)
    assert flow.response.status_code == 403 and SINK not in flow.metadata  # no body: answered at once


async def test_other_paths_are_left_to_the_router(sink):
    flow = await run_headers(request_flow("GET", "/tree/datalab/x"), sink)
    assert flow.response is None and not flow.metadata


async def test_body_over_the_limit_is_refused_while_streaming(sink, redis_url):
    rt = runtime_for(redis_url=redis_url, max_upload=4)
    flow = await through_api(start_flow(content=b"12345", headers={"Content-Length": "4"}), sink, rt)
    assert flow.response.status_code == 413 and body(flow)["code"] == "UPLOAD_TOO_LARGE"


async def test_a_body_the_sink_did_not_receive_whole_starts_nothing(sink, rt):
    flow = await through_api(start_flow(content=b"a,b\n1,2\n"), sink, rt, received=4)
    assert flow.response.status_code == 400 and "whole" in body(flow)["message"]


async def test_a_start_without_a_length_is_sent_chunked_to_the_sink(sink, rt):
    flow = start_flow()
    del flow.request.headers["Content-Length"]  # as an HTTP/2 request may come
    flow.request.http_version = "HTTP/2.0"
    flow = await run_headers(flow, sink, rt)
    assert flow.request.headers["Transfer-Encoding"] == "chunked"


@pytest.mark.parametrize(
    "chunks, limit, kept, too_large",
    [([b"ab", b"cd", b""], 4, b"abcd", False), ([b"ab", b"cde", b""], 4, b"", True), ([b""], 0, b"", False)],
)
def test_body_collector_keeps_at_most_the_limit(chunks, limit, kept, too_large):
    collector = BodyCollector(limit)
    # every chunk passes on to the sink; an empty one (an empty HTTP/2 DATA frame) is not sent at
    # all, since an empty chunk would end the chunked body
    assert [collector(c) for c in chunks] == [c or [] for c in chunks]
    assert collector.body() == kept and collector.too_large is too_large


async def test_redis_down_is_a_503(redis_server, sink):
    rt = runtime_for(redis_url="redis://127.0.0.1:1/0")
    flow = await run_headers(request_flow("GET", "/datalab/view/" + "n" * 32 + "/tree"), sink, rt)
    assert flow.response.status_code == 503 and body(flow)["code"] == "REDIS_UNAVAILABLE"


async def test_view_sets_the_cookie_and_redirects_on_this_origin(redis_url, sink):
    rt = runtime_for(redis_url=redis_url)
    jupyter = await asyncio.start_server(answering_jupyter, "127.0.0.1", 0)
    port = jupyter.sockets[0].getsockname()[1]
    instance = Instance("i" * 32, "docker", "c1", "127.0.0.1", port, "a.csv", time.time())
    nonce = "N" * 32
    await recorded(rt.store, instance, nonce)
    flow = await run_headers(request_flow("GET", f"/datalab/view/{nonce}/%2F%2Fevil.example/tree?x=1"), sink, rt)
    assert flow.response.status_code == 302
    assert flow.response.headers["Location"] == "/evil.example/tree?x=1"
    cookie = flow.response.headers["Set-Cookie"]
    assert cookie.startswith("datalab_session=") and "; Path=/; HttpOnly; SameSite=Lax" in cookie
    session_id = cookie.split(";")[0].split("=", 1)[1]
    assert await rt.store.session_target(session_id) == instance.id
    await rt.done()
    jupyter.close()


@pytest.mark.parametrize(
    "samesite, secure, expected",
    [
        ("Lax", False, "s=v; Path=/; HttpOnly; SameSite=Lax"),
        ("Strict", True, "s=v; Path=/; HttpOnly; SameSite=Strict; Secure"),
        ("None", True, "s=v; Path=/; HttpOnly; SameSite=None; Secure"),
    ],
)
def test_session_cookie(samesite, secure, expected):
    assert session_cookie("s", "v", samesite, secure) == expected
