"""The datalab proxy end to end, through the proxy only: real mitmdump, Redis, Docker and Jupyter."""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import urljoin
from urllib.parse import urlsplit

import pytest
import requests

from backends import Instance
from e2e.proxy import Browser
from runtime import remove_all_instances as remove_all

NOTEBOOK = json.dumps(
    {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "metadata": {},
                "outputs": [],
                "source": ["print('hello from datalab')"],
            }
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
).encode()
CSV = b"city,population\nReykjavik,139875\nNuuk,19872\n"
BIG = os.urandom(3 * 1024 * 1024 + 17)


ANSWERED: dict[str, float] = {}  # nonce -> when its start answered (time.monotonic)


def started(proxy, filename: str, body: bytes) -> str:
    nonce = proxy.start_instance(filename, body)
    ANSWERED[nonce] = time.monotonic()
    return nonce


@pytest.fixture(scope="module")
def notebook_nonce(proxy):
    return started(proxy, "analysis.ipynb", NOTEBOOK)


@pytest.fixture(scope="module")
def csv_nonce(proxy):
    return started(proxy, "cities.csv", CSV)


def error_of(r: requests.Response) -> str:
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["message"]
    return body["code"]


def test_start_returns_a_long_urlsafe_nonce(notebook_nonce, csv_nonce, world):
    for nonce in (notebook_nonce, csv_nonce):
        assert len(nonce) >= 22 and nonce.replace("-", "").replace("_", "").isalnum()
        ttl = world.redis.ttl(f"{world.prefix}nonce:{nonce}")
        lived = time.monotonic() - ANSWERED[nonce]  # (the other start took a while: seconds pass)
        assert 600 - lived - 2 <= ttl <= 600  # ten minutes from its start's answer
    assert len(world.containers()) >= 2


def test_view_sets_the_session_cookie_and_redirects(proxy, notebook_nonce):
    browser = Browser(proxy)
    r = browser.view(notebook_nonce, "tree?x=1")
    assert r.headers["Location"] == "/tree?x=1"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("datalab_session=")
    assert "Path=/" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = browser.get("/tree")
    assert page.status_code == 200 and "Jupyter" in page.text


def test_api_status_reaches_the_container(proxy, notebook_nonce):
    browser = Browser(proxy)
    browser.view(notebook_nonce)
    r = browser.get("/api/status")
    assert r.status_code == 200
    assert "started" in r.json()


def test_kernel_over_websocket_reads_the_uploaded_csv(proxy, csv_nonce):
    browser = Browser(proxy)
    browser.view(csv_nonce)
    kernel = browser.start_kernel()
    out = browser.execute(kernel, "print(open('cities.csv').read(), end='')")
    assert out == CSV.decode()


def test_instances_refuse_anyone_but_the_proxy(proxy, world, notebook_nonce):
    """Jupyter in an instance trusts only the proxy's secret: the host reaching its address directly
    is refused, while the proxy gets in. (Neighbours cannot even connect: test_confinement.py.)"""
    store = world.redis
    target_id = store.get(f"{world.prefix}nonce:{notebook_nonce}").decode()
    target = Instance.from_json(store.get(f"{world.prefix}instance:{target_id}"))
    assert target.token
    r = requests.get(f"http://{target.host}:{target.port}/api/contents", timeout=30)
    assert r.status_code == 403

    mine = Browser(proxy)
    mine.view(notebook_nonce)
    assert mine.get("/api/contents").status_code == 200


def test_static_returns_the_exact_bytes(proxy, notebook_nonce, csv_nonce):
    r = requests.get(proxy.url(f"/datalab/static/{csv_nonce}/files/cities.csv"), timeout=30)
    assert r.status_code == 200 and r.content == CSV
    assert r.headers["Content-Type"].startswith("text/csv")
    r = requests.get(proxy.url(f"/datalab/static/{notebook_nonce}/files/analysis.ipynb"), timeout=30)
    assert r.status_code == 200 and r.content == NOTEBOOK
    r = requests.get(proxy.url(f"/datalab/static/{csv_nonce}/files/missing.csv"), timeout=30)
    assert r.status_code == 404


def test_static_streams_a_large_binary(proxy):
    nonce = proxy.start_instance("blob.bin", BIG)
    r = requests.get(proxy.url(f"/datalab/static/{nonce}/files/blob.bin"), timeout=60)
    assert r.status_code == 200 and r.content == BIG


def test_each_browser_sees_only_its_own_instance(proxy, notebook_nonce, csv_nonce):
    for nonce, own, other in (
        (notebook_nonce, "analysis.ipynb", "cities.csv"),
        (csv_nonce, "cities.csv", "analysis.ipynb"),
    ):
        for _ in range(2):  # two browsers (two cookies) per instance
            browser = Browser(proxy)
            browser.view(nonce)
            names = {item["name"] for item in browser.get("/api/contents").json()["content"]}
            assert own in names and other not in names


def chunked(*parts: bytes):
    """A body requests sends with Transfer-Encoding: chunked."""
    yield from parts


def test_chunked_upload_and_a_refused_large_body(proxy, world):
    r = proxy.upload("chunked.csv", chunked(CSV[:10], CSV[10:]))
    assert r.status_code == 200, r.text
    nonce = r.json()["result"]["nonce"]
    assert requests.get(proxy.url(f"/datalab/static/{nonce}/files/chunked.csv"), timeout=30).content == CSV

    before = pool_settled(world)
    r = proxy.upload("a.csv", BIG * 4, sign="0" * 64)  # read to the end and dropped, then refused
    assert r.status_code == 403 and error_of(r) == "BAD_SIGNATURE"
    assert world.snapshot() == before


def pool_settled(world, timeout: float = 90.0):
    """The shared proxy's snapshot once its pool (of one) is full and nothing boots: a refill that
    lands meanwhile would add a container and keys whatever the request under test did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if world.redis.llen(world.prefix + "pool") >= 1 and world.redis.zcard(world.prefix + "poolboot") == 0:
            return world.snapshot()
        time.sleep(0.2)
    raise AssertionError("the shared proxy's pool did not settle")


@pytest.mark.parametrize(
    "destination",
    [
        "//evil.example/x",
        "/\\evil.example",
        "%2F%2Fevil.example",
        "%5C%5Cevil.example",
        "http://evil.example/",
        "https:%2F%2Fevil.example",
        "%09//evil.example",
        "%0d%0aSet-Cookie:%20x=1",
    ],
)
def test_view_never_redirects_off_origin(proxy, notebook_nonce, destination):
    r = requests.get(proxy.url(f"/datalab/view/{notebook_nonce}/{destination}"), allow_redirects=False, timeout=30)
    assert r.status_code == 302
    location = r.headers["Location"]
    assert location.startswith("/") and not location.startswith(("//", "/\\"))
    assert urlsplit(urljoin(proxy.base + "/", location)).netloc == urlsplit(proxy.base).netloc
    assert "x=1" not in r.headers.get("Set-Cookie", "").split(";")[0]


def test_requests_without_a_session_are_refused(proxy):
    r = requests.get(proxy.url("/api/status"), timeout=30)
    assert r.status_code == 403 and error_of(r) == "NO_SESSION"
    r = requests.get(proxy.url("/api/status"), cookies={"datalab_session": "A" * 32}, timeout=30)
    assert r.status_code == 403 and error_of(r) == "NO_SESSION"
    r = requests.get(proxy.url("/datalab/view/" + "B" * 32 + "/tree"), allow_redirects=False, timeout=30)
    assert r.status_code == 404 and error_of(r) == "NONCE_UNKNOWN"


def test_nonce_expires_and_uploads_are_bounded(make_proxy, world):
    short = make_proxy(prefix=world.sub("short"), datalab_nonce_ttl=2, datalab_max_upload=1024)
    before = world.snapshot()
    r = short.upload("big.csv", b"x" * 2048)
    assert r.status_code == 413 and error_of(r) == "UPLOAD_TOO_LARGE"
    assert world.snapshot() == before

    r = short.upload("big.csv", chunked(b"x" * 700, b"y" * 700))  # no Content-Length: counted while streaming
    assert r.status_code == 413 and error_of(r) == "UPLOAD_TOO_LARGE"
    assert world.snapshot() == before

    nonce = short.start_instance("small.csv", CSV)
    Browser(short).view(nonce)
    time.sleep(3)
    r = requests.get(short.url(f"/datalab/view/{nonce}/tree"), allow_redirects=False, timeout=30)
    assert r.status_code == 404 and error_of(r) == "NONCE_UNKNOWN"
    r = requests.get(short.url(f"/datalab/static/{nonce}/files/small.csv"), timeout=30)
    assert r.status_code == 404 and error_of(r) == "NONCE_UNKNOWN"


def test_a_restarted_proxy_serves_existing_sessions(proxy, make_proxy, csv_nonce):
    browser = Browser(proxy)
    browser.view(csv_nonce)
    restarted = make_proxy()  # a new process: nothing in memory, everything from Redis
    browser.proxy = restarted
    r = browser.get("/api/contents/cities.csv", params={"content": "1"})
    assert r.status_code == 200 and r.json()["content"] == CSV.decode()


def test_a_removed_instance_is_unrouted_at_once(proxy, make_proxy, world, redis_server):
    """Routes are cached; removal is announced over Redis, so no proxy sends a request to the old port."""
    prefix = world.sub("removal")
    # Routes cached for 5 minutes: only the removal message can make these proxies forget them in time.
    p = make_proxy(prefix=prefix, datalab_route_cache_ttl=300)
    other = make_proxy(prefix=prefix, datalab_route_cache_ttl=300)  # a second process sharing the Redis
    nonce = p.start_instance("r.csv", CSV)
    browsers = [Browser(p), Browser(other)]
    for b in browsers:
        b.view(nonce)
        assert b.get("/api/status").status_code == 200  # now cached in both processes

    assert asyncio.run(remove_all(redis_server.url, prefix)) == 1
    time.sleep(0.5)  # the pub/sub message crosses to both processes in milliseconds
    for b in browsers:
        r = b.get("/api/status")  # the first try: a stale route would be a 502 from the dead port
        assert r.status_code == 410 and error_of(r) == "INSTANCE_GONE"
    assert world.containers(prefix) == [] and only_sessions_left(world, prefix)


def test_the_same_addon_runs_under_mitmweb(make_proxy, csv_nonce):
    web = make_proxy(tool="mitmweb")
    browser = Browser(web)
    browser.view(csv_nonce)
    r = browser.get("/api/contents/cities.csv", params={"content": "1"})
    assert r.status_code == 200 and r.json()["content"] == CSV.decode()
    r = requests.get(web.url("/api/status"), timeout=30)
    assert r.status_code == 403 and error_of(r) == "NO_SESSION"


def test_faults_give_5xx_and_the_proxy_recovers(make_proxy, world, tmp_path):
    from helpers import RedisServer

    redis_server = RedisServer(tmp_path, persist=True).start()
    prefix = world.sub("fault")
    try:
        p = make_proxy(prefix=prefix, redis_url=redis_server.url, datalab_route_cache_ttl=0)
        nonce = p.start_instance("f.csv", CSV)
        browser = Browser(p)
        browser.view(nonce)
        assert browser.get("/api/status").status_code == 200

        redis_server.stop()
        r = browser.get("/api/status")
        assert r.status_code == 503 and error_of(r) == "REDIS_UNAVAILABLE"
        r = requests.get(p.url(f"/datalab/view/{nonce}/tree"), allow_redirects=False, timeout=30)
        assert r.status_code == 503 and error_of(r) == "REDIS_UNAVAILABLE"

        redis_server.start()  # same port, same data (append-only file)
        assert browser.get("/api/status").status_code == 200

        for c in world.containers(prefix):
            c.remove(force=True)  # the instance dies under the session: the engine tells the proxy
        time.sleep(1)
        r = browser.get("/api/status")
        assert r.status_code == 410 and error_of(r) == "INSTANCE_GONE"  # never a 502 page
        r = requests.get(p.url(f"/datalab/static/{nonce}/files/f.csv"), timeout=30)
        assert r.status_code == 404 and error_of(r) == "NONCE_UNKNOWN"
    finally:
        redis_server.stop()


def only_sessions_left(world, prefix: str) -> bool:
    """After every instance ended, only sessions remain (answering 410 until they expire), the
    used signatures (refusing replays until their ts is stale), and how each instance ended with
    its user's work (the ended page, GET /datalab/work: until datalab_session_ttl and _work_ttl)."""
    keys = [k.decode() for k in world.keys(prefix)]
    expiring = (prefix + "session:", prefix + "signed:", prefix + "ended:", prefix + "work:")
    # And what tells the frontend: the lifecycle stream (capped by datalab_events_max) and the index of
    # works whose expiry is still to be told, which names only works whose records still live.
    told = {prefix + "lifecycle", prefix + "expiring", prefix + "workwho"}
    to_tell = [w.decode() for w in world.redis.zrange(prefix + "expiring", 0, -1)]
    if not all(world.redis.exists(prefix + "work:" + w) for w in to_tell):
        return False
    return all((k.startswith(expiring) and world.redis.ttl(k) > 0) or k in told for k in keys)


def test_removing_instances_leaves_no_container_or_key(world, redis_server):
    """Removes every instance a stopped proxy's prefix holds, through the product's own code."""
    prefix = world.sub("short")
    assert world.containers(prefix), "test_nonce_expires_and_uploads_are_bounded made an instance here"
    assert asyncio.run(remove_all(redis_server.url, prefix)) >= 1
    assert world.containers(prefix) == []
    assert only_sessions_left(world, prefix)
