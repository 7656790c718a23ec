"""A Redis that survives its primary's crash: Debian's redis-server and redis-sentinel (a primary, a
replica, three sentinels on loopback), proxies with a redis+sentinel:// URL, and a kill -9 of the
primary. Sessions, starts, stops and route invalidation work on the promoted replica."""

from __future__ import annotations

import pytest
import redis as redis_sync

from e2e.helpers import opened
from helpers import SentinelGroup
from helpers import wait_until

CSV = b"x,y\n1,2\n"


def error_of(r) -> str:
    assert r.headers["Content-Type"] == "application/json", r.text
    return r.json()["code"]


@pytest.fixture
def sentinels(tmp_path_factory):
    try:
        group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield group
    group.stop()


def events_subscribers(client: redis_sync.Redis, prefix: str) -> int:
    return client.pubsub_numsub(prefix + "events")[0][1]


def test_sessions_starts_stops_and_invalidation_survive_a_primary_crash(sentinels, make_proxy, world):
    wait_until(sentinels.watching, "the sentinels to know the replica and each other")
    prefix = world.sub("sentinel")
    # Two proxies: a stop through one must reach the other's route cache (kept long) over pub/sub.
    a = make_proxy(prefix=prefix, redis_url=sentinels.url, datalab_route_cache_ttl=600)
    b = make_proxy(prefix=prefix, redis_url=sentinels.url, datalab_route_cache_ttl=600)
    first, on_a = opened(a, "a.csv")
    second, on_b = opened(b, "b.csv")
    assert on_a.get("/api/status").status_code == 200 and on_b.get("/api/status").status_code == 200

    old = sentinels.client(sentinels.primary)
    assert old.wait(1, 10_000) == 1  # what the proxies wrote is on the replica (replication is asynchronous)
    sentinels.crash_primary()
    wait_until(lambda: sentinels.primary_named() == sentinels.replica, "the sentinels to promote the replica")
    new = sentinels.client(sentinels.replica)
    # Both proxies follow removals again, now on the new primary.
    wait_until(lambda: events_subscribers(new, prefix) == 2, "both proxies to subscribe on the new primary")

    for browser in (on_a, on_b):  # every session still routes
        assert browser.get("/api/status").status_code == 200
    third, on_third = opened(a, "c.csv")  # a start works (its scripts loaded again on the new primary)
    assert on_third.get("/api/status").status_code == 200
    assert on_third.get("/api/contents/c.csv?content=1").json()["content"] == CSV.decode()

    r = a.stop_instance(second)  # a stop works
    assert r.status_code == 200, r.text
    gone = on_b.get("/api/status")  # b had the route cached: a's stop reached it at once
    assert gone.status_code == 410 and error_of(gone) == "INSTANCE_GONE"
    assert on_a.get("/api/status").status_code == 200
    assert {m.decode() for m in new.smembers(prefix + "instances")} == {
        new.get(f"{prefix}nonce:{first}").decode(),
        new.get(f"{prefix}nonce:{third}").decode(),
    }
