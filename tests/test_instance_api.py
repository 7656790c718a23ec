"""The instance API (GET /datalab/instances, api.py) and a start's owner cap as the api answers it:
signed over method and path (never a start's or stop's subject), not spent, refused to browsers;
an owner at its cap is 429 before the signature is spent."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest

import signing
from helpers import KEY
from helpers import request_flow
from helpers import run_headers
from helpers import runtime_for
from helpers import start_flow
from helpers import through_api
from instance_info import InstanceInfo
from instances import Order


def body(flow) -> dict:
    return json.loads(flow.response.content)


def listing(owner: str, ts: str | None = None, sign: str | None = None, headers: dict | None = None):
    ts = ts or str(int(time.time()))
    sign = sign or signing.signature(KEY, ts, signing.owner_listing_subject(owner))
    query = urlencode({"ts": ts, "owner": owner})
    return request_flow("GET", f"/datalab/instances?{query}", {"X-SIGN": sign, **(headers or {})})


def one(work: str, ts: str | None = None, sign: str | None = None):
    ts = ts or str(int(time.time()))
    sign = sign or signing.signature(KEY, ts, signing.instance_subject(work))
    return request_flow("GET", f"/datalab/instances/{work}?ts={ts}", {"X-SIGN": sign})


@pytest.fixture
async def rt(redis_url):
    runtime = runtime_for(redis_url=redis_url, max_instances_per_owner=1)
    yield runtime
    await runtime.instances.store.close()
    await runtime.instances.backend.close()


async def test_an_owners_listing_and_one_instance(sink, rt):
    handed = await rt.instances.start(Order("a.csv", owner="alice"), b"x")
    flow = await run_headers(listing("alice"), sink, rt)
    assert flow.response.status_code == 200, flow.response.content
    [entry] = body(flow)["result"]["instances"]
    assert (entry["work"], entry["state"], entry["owner"], entry["filename"]) == (
        handed.work,
        "ready",
        "alice",
        "a.csv",
    )
    assert entry["idle_deadline"] == entry["last_activity"] + rt.settings.idle_timeout
    assert entry["max_age_deadline"] == entry["created"] + rt.settings.max_age
    flow = await run_headers(one(handed.work), sink, rt)
    assert flow.response.status_code == 200 and body(flow)["result"] == entry
    assert flow.response.headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in flow.response.headers


async def test_a_read_does_not_spend_its_signature(sink, rt):
    ts = str(int(time.time()))
    sign = signing.signature(KEY, ts, signing.owner_listing_subject("bob"))
    for _ in range(2):
        flow = await run_headers(listing("bob", ts, sign), sink, rt)
        assert flow.response.status_code == 200 and body(flow)["result"] == {"instances": [], "omitted": 0}


@pytest.mark.parametrize(
    "make, status, code",
    [
        (lambda: listing("alice", sign="0" * 64), 403, "BAD_SIGNATURE"),
        # Another request's subject signs nothing here: a start's, another owner's, another path's.
        (lambda: listing("alice", sign=signing.signature(KEY, str(int(time.time())), "alice")), 403, "BAD_SIGNATURE"),
        (
            lambda: listing(
                "alice", sign=signing.signature(KEY, str(int(time.time())), signing.owner_listing_subject("bob"))
            ),
            403,
            "BAD_SIGNATURE",
        ),
        (lambda: one("w" * 32, sign=signing.signature(KEY, str(int(time.time())), "w" * 32)), 403, "BAD_SIGNATURE"),
        (lambda: listing("alice", ts=str(int(time.time()) - 3600)), 403, "STALE_TIMESTAMP"),
        (lambda: listing("alice", headers={"Origin": "https://evil.example"}), 403, "BAD_ORIGIN"),
        (lambda: listing("alice", headers={"Sec-Fetch-Site": "same-origin"}), 403, "BAD_ORIGIN"),
        (lambda: listing("al ice"), 400, "BAD_REQUEST"),
        (lambda: request_flow("GET", "/datalab/instances?ts=1"), 400, "BAD_REQUEST"),
        (lambda: one("w" * 32), 404, "WORK_UNKNOWN"),
        (lambda: request_flow("GET", "/datalab/instances/not-a-work"), 404, "NOT_FOUND"),
        (lambda: request_flow("POST", "/datalab/instances?ts=1&owner=a"), 405, "METHOD_NOT_ALLOWED"),
    ],
)
async def test_refusals(make, status, code, sink, rt):
    flow = await run_headers(make(), sink, rt)
    assert (flow.response.status_code, body(flow)["code"]) == (status, code), body(flow)


async def test_an_owner_at_its_cap_is_429_before_the_signature_is_spent(sink, rt):
    await rt.instances.start(Order("a.csv", owner="alice"), b"x")
    flow = start_flow("b.csv", owner="alice")
    sign = flow.request.headers["X-SIGN"]
    flow = await through_api(flow, sink, rt)
    assert (flow.response.status_code, body(flow)["code"]) == (429, "OWNER_LIMIT")
    assert flow.response.headers["Retry-After"] == "30"
    assert not await rt.store.redis.exists(rt.store.key("signed", sign))  # the same request may come again
    flow = await through_api(start_flow("b.csv", owner="bob"), sink, rt)  # another owner starts
    assert flow.response.status_code == 200, flow.response.content


async def test_an_owner_with_a_trailing_newline_is_refused_not_another_owner(sink, rt):
    """Review (issue 20): `$` matched before a final newline, so 'alice\\n' was a valid owner of its
    own (another Redis key): past alice's cap, and a newline in a signed subject and in log lines."""
    await rt.instances.start(Order("a.csv", owner="alice"), b"x")
    value = "alice\n"
    ts = str(int(time.time()))
    sign = signing.signature(KEY, ts, signing.start_subject("b.csv", {"owner": value}))
    query = f"ts={ts}&filename=b.csv&owner=alice%0A"
    flow = request_flow("POST", f"/datalab/start?{query}", {"X-SIGN": sign, "Content-Length": "1"}, b"x")
    flow = await through_api(flow, sink, rt)
    assert (flow.response.status_code, body(flow)["code"]) == (400, "BAD_REQUEST"), body(flow)
    flow = await run_headers(listing(value), sink, rt)
    assert (flow.response.status_code, body(flow)["code"]) == (400, "BAD_REQUEST"), body(flow)


@pytest.mark.parametrize(
    "query, signed, code",
    [
        ("owner=alice&owner=bob", {"owner": "alice"}, "BAD_REQUEST"),  # repeated: never one of the two
        ("owner=alice&owner=alice", {"owner": "alice"}, "BAD_REQUEST"),
        ("owner=", {"owner": ""}, "BAD_REQUEST"),  # empty: not the same as absent
        ("profile=", {"profile": ""}, "BAD_REQUEST"),
        ("unpack=", {"unpack": ""}, "BAD_REQUEST"),
        ("owner=al%C3%AFce", {"owner": "al\u00efce"}, "BAD_REQUEST"),  # unicode: not an owner's characters
        ("owner=alice", {}, "BAD_SIGNATURE"),  # added after signing
        ("owner=al%69ce", {"owner": "alic"}, "BAD_SIGNATURE"),  # percent-encoded: the decoded value is signed
        ("profile=default", {"profile": "default", "owner": "alice"}, "BAD_SIGNATURE"),  # dropped after signing
    ],
)
async def test_a_starts_extras_are_one_each_and_signed_as_decoded(query, signed, code, sink, rt):
    """Review of issue 20: a start's extra parameters cannot be repeated, emptied, or added, changed or
    dropped after signing (403, or 400 before the signature is checked); nothing is spent or started."""
    ts = str(int(time.time()))
    sign = signing.signature(KEY, ts, signing.start_subject("b.csv", signed))
    flow = request_flow(
        "POST", f"/datalab/start?ts={ts}&filename=b.csv&{query}", {"X-SIGN": sign, "Content-Length": "1"}, b"x"
    )
    flow = await through_api(flow, sink, rt)
    assert body(flow)["code"] == code, body(flow)
    assert not await rt.store.redis.exists(rt.store.key("signed", sign))
    assert await rt.store.redis.zcard(rt.store.key("slots")) == 0


async def test_a_percent_encoded_extra_is_its_decoded_value(sink, rt):
    ts = str(int(time.time()))
    sign = signing.signature(KEY, ts, signing.start_subject("b.csv", {"owner": "alice"}))
    flow = request_flow(
        "POST", f"/datalab/start?ts={ts}&filename=b.csv&owner=al%69ce", {"X-SIGN": sign, "Content-Length": "1"}, b"x"
    )
    flow = await through_api(flow, sink, rt)
    assert flow.response.status_code == 200, body(flow)
    assert [e.owner for e in await InstanceInfo(rt.store, rt.instances.owners, rt.settings).of_owner("alice")]
