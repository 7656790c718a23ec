"""A Redis that survives its primary's crash: Debian's redis-server and redis-sentinel (a primary, a
replica, three sentinels on loopback), proxies with a redis+sentinel:// URL, and a kill -9 of the
primary. Sessions, starts, stops and route invalidation work on the promoted replica."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis as redis_sync

from e2e.proxy import Browser
from e2e.test_lifecycle import wait_until
from helpers import free_port
from helpers import wait_for_port

SERVICE = "datalab"
CSV = b"x,y\n1,2\n"


def error_of(r) -> str:
    assert r.headers["Content-Type"] == "application/json", r.text
    return r.json()["code"]


class SentinelGroup:
    """A primary, its replica and three sentinels that fail over within seconds (short down-after
    and failover timeouts), each a real process on a loopback port of its own."""

    def __init__(self, workdir: Path):
        for tool in ("redis-server", "redis-sentinel"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (scripts/test.sh installs it: apt-get install {tool})")
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen] = {}
        self.primary = self._server("primary")
        self.replica = self._server("replica", "--replicaof", "127.0.0.1", str(self.primary))
        self.sentinels = [self._sentinel(i) for i in range(3)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{SERVICE}"

    def _start(self, port: int, args: list[str]) -> int:
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, proc=self.procs[port])
        return port

    def _server(self, name: str, *more: str) -> int:
        port = free_port()
        (self.workdir / name).mkdir()
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.workdir / name)]
        return self._start(port, [*args, "--save", "", "--appendonly", "yes", *more])

    def _sentinel(self, index: int) -> int:
        port = free_port()
        conf = self.workdir / f"sentinel-{index}.conf"  # sentinels rewrite their file: one each
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {self.workdir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        return self._start(port, ["redis-sentinel", str(conf)])

    def client(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def primary_named(self) -> int:
        """The primary's port as the sentinels agree on it (each asked)."""
        ports = {int(self.client(s).sentinel_get_master_addr_by_name(SERVICE)[1]) for s in self.sentinels}
        return ports.pop() if len(ports) == 1 else -1

    def watching(self) -> bool:
        """Every sentinel knows the replica and the two other sentinels: a failover can be agreed."""
        for port in self.sentinels:
            state = self.client(port).sentinel_master(SERVICE)
            if state["num-other-sentinels"] != 2 or state["num-slaves"] != 1:
                return False
        return True

    def crash_primary(self) -> None:
        proc = self.procs.pop(self.primary)
        proc.kill()  # SIGKILL: no shutdown, no last write
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=10)


@pytest.fixture
def sentinels(tmp_path_factory):
    try:
        group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    except RuntimeError as e:
        pytest.fail(str(e))
    yield group
    group.stop()


def opened(proxy, filename: str) -> tuple[str, Browser]:
    nonce = proxy.start_instance(filename, CSV)
    browser = Browser(proxy)
    browser.view(nonce)
    return nonce, browser


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
