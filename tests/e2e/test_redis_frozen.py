"""A Redis that stops answering (SIGSTOP: as a paused VM or a network partition looks) is a quick
503 through a real proxy, not a request held for as long as Redis is away; once it answers again
the same session is served again."""

from __future__ import annotations

import requests

from e2e.helpers import opened
from e2e.proxy import Browser
from helpers import RedisServer
from helpers import wait_until

# The clients' own bound, far above the proxy's answer (a few seconds per Redis call): if it fires,
# the proxy held the request. Not a measured limit, only where waiting stops.
CLIENT_WAIT = 15


def answer(http: requests.Session, url: str) -> requests.Response:
    try:
        return http.get(url, allow_redirects=False, timeout=CLIENT_WAIT)
    except requests.Timeout as e:
        raise AssertionError(f"no answer within {CLIENT_WAIT} s to {url} while Redis is frozen") from e


def assert_redis_unavailable(r: requests.Response, what: str) -> None:
    assert r.status_code == 503, f"{what}: {r.status_code} {r.text}"
    assert r.headers["Content-Type"] == "application/json", what
    assert r.json()["code"] == "REDIS_UNAVAILABLE", f"{what}: {r.text}"


def test_a_frozen_redis_is_a_quick_503_then_served_again(make_proxy, world, tmp_path):
    redis = RedisServer(tmp_path).start()
    # No route cache: every routed request asks Redis for its session.
    p = make_proxy(prefix=world.sub("frozen"), redis_url=redis.url, datalab_route_cache_ttl=0)
    nonce, browser = opened(p, "frozen.csv")
    try:
        assert browser.get("/api/status").status_code == 200
        redis.freeze()
        try:
            view = answer(requests.Session(), p.url(f"/datalab/view/{nonce}/tree"))
            assert_redis_unavailable(view, "a view")
            assert_redis_unavailable(answer(browser.http, browser.url("/api/status")), "a routed request")
            bare = answer(requests.Session(), p.url("/api/status"))  # no cookie: refused without Redis
            assert bare.status_code == 403 and bare.json()["code"] == "NO_SESSION", bare.text
            health = answer(requests.Session(), p.url("/datalab/health"))
            assert health.status_code == 503 and health.json()["code"] == "UNHEALTHY", health.text
        finally:
            redis.thaw()
        wait_until(lambda: browser.get("/api/status").status_code == 200, "the session served again", 20)
        wait_until(lambda: requests.get(p.url("/datalab/health"), timeout=CLIENT_WAIT).ok, "health 200 again", 20)
        assert Browser(p).view(nonce).status_code == 302  # and its nonce opens it once more
    finally:
        redis.thaw()
        p.stop_instance(nonce)
        redis.stop()
