"""Metrics end to end: a real mitmdump with the metrics port and token, a real instance (pooled,
then its container killed), routed requests and a kernel WebSocket; every scrape is compared with
what the test did and with what Redis holds. And run.sh gives each worker its own metrics port."""

from __future__ import annotations

import socket

import requests
from prometheus_client.parser import text_string_to_metric_families

from counters import CULL_REASONS
from e2e.helpers import Workers
from e2e.helpers import instance_of
from e2e.proxy import Browser
from e2e.proxy import Proxy
from helpers import free_port
from helpers import wait_until

TOKEN = "e2e-metrics-token-0123456789"

Samples = dict[tuple[str, tuple], float]


def scrape(url: str, **kw) -> Samples:
    r = requests.get(url, timeout=30, **kw)
    assert r.status_code == 200, r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (from the kernel's tables, so no
    traffic goes to any address but loopback)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(bytes.fromhex(address)[::-1].hex() if width == 8 else address)
    return found


LOOPBACK_V4 = "7f000001"  # 127.0.0.1 as /proc/net/tcp spells it, once its bytes are put in order


def redis_counts(world, prefix: str) -> dict[str, float]:
    pooled = world.redis.llen(prefix + "pool")
    return {"live": world.redis.scard(prefix + "instances") - pooled, "pooled": pooled}


def gauges(samples: Samples) -> dict[str, float]:
    return {state: samples[("datalab_instances", (("state", state),))] for state in ("live", "pooled")}


def settled(world, prefix: str, pooled: int) -> bool:
    """The pool holds `pooled` and nothing boots: Redis keeps still while the test compares."""
    return world.redis.llen(prefix + "pool") == pooled and world.redis.zcard(prefix + "poolboot") == 0


def test_metrics_follow_starts_traffic_refusals_and_culls(make_proxy, world):
    prefix = world.sub("metrics")
    port = free_port()
    proxy = make_proxy(prefix=prefix, datalab_pool_size=1, datalab_metrics_port=port, datalab_metrics_token=TOKEN)
    url = f"http://127.0.0.1:{port}/metrics"
    assert listening_addresses(port) == {LOOPBACK_V4}

    # Instances: one pooled and ready, nobody's yet.
    wait_until(lambda: settled(world, prefix, pooled=1), "the pool to fill", timeout=120)
    first = scrape(url)
    assert gauges(first) == redis_counts(world, prefix) == {"live": 0, "pooled": 1}

    # A start takes the pooled one; the pool refills.
    nonce = proxy.start_instance("data.csv", b"x,y\n1,2\n")
    wait_until(lambda: settled(world, prefix, pooled=1), "the pool to refill", timeout=120)
    started = scrape(url)
    assert moved(first, started, "datalab_starts_total", outcome="ok") == 1
    assert moved(first, started, "datalab_start_seconds_count", source="pooled") == 1
    assert moved(first, started, "datalab_start_seconds_bucket", source="pooled", le="90.0") == 1
    assert moved(first, started, "datalab_start_seconds_count", source="cold") == 0
    assert 0 < moved(first, started, "datalab_start_seconds_sum", source="pooled") < 90
    assert gauges(started) == redis_counts(world, prefix) == {"live": 1, "pooled": 1}

    # Routed requests: three, counted as three (the view is the api's, not routed).
    browser = Browser(proxy)
    browser.view(nonce)
    for _ in range(3):
        assert browser.get("/api/status").status_code == 200
    routed = scrape(url)
    assert moved(started, routed, "datalab_proxied_requests_total") == 3

    # A kernel WebSocket: the client sends one message; the instance's answers pass too.
    kernel = browser.start_kernel()
    before_ws = scrape(url)
    assert browser.execute(kernel, "print(6 * 7)") == "42\n"
    after_ws = scrape(url)
    assert moved(before_ws, after_ws, "datalab_proxied_requests_total") == 1  # the handshake
    assert moved(before_ws, after_ws, "datalab_websocket_messages_total", sender="client") == 1
    assert moved(before_ws, after_ws, "datalab_websocket_messages_total", sender="instance") >= 3  # busy, out, idle

    # Refusals: no session, then the metrics path on the public port without and with a wrong
    # token (answered as any unknown path), then with the token (the metrics, nothing refused).
    assert requests.get(proxy.url("/api/status"), timeout=30).status_code == 403
    for authorization in ("", "Bearer wrong-token-of-some-length"):
        r = requests.get(proxy.url("/datalab/metrics"), headers={"Authorization": authorization}, timeout=30)
        assert (r.status_code, r.json()["code"]) == (404, "NOT_FOUND")
    public = scrape(proxy.url("/datalab/metrics"), headers={"Authorization": f"Bearer {TOKEN}"})
    assert moved(after_ws, public, "datalab_refusals_total", code="NO_SESSION", status="403") == 1
    assert moved(after_ws, public, "datalab_refusals_total", code="NOT_FOUND", status="404") == 2
    assert moved(after_ws, public, "datalab_proxied_requests_total") == 0

    # A cull: the user's container dies; the proxy ends its instance, once, as gone.
    instance = instance_of(world, prefix, nonce)
    world.docker.containers.get(instance.handle).remove(force=True)
    # (counted once its end is done: the record goes first, then the container)
    wait_until(lambda: moved(public, scrape(url), "datalab_culls_total", reason="gone"), "the end to be counted")
    culled = scrape(url)
    assert moved(public, culled, "datalab_culls_total", reason="gone") == 1
    assert sum(moved(public, culled, "datalab_culls_total", reason=r) for r in CULL_REASONS) == 1
    assert gauges(culled) == redis_counts(world, prefix) == {"live": 0, "pooled": 1}
    r = browser.get("/api/status")
    assert (r.status_code, r.json()["code"]) == (410, "INSTANCE_GONE")
    assert moved(culled, scrape(url), "datalab_refusals_total", code="INSTANCE_GONE", status="410") == 1


def two_free_ports() -> int:
    """A free port whose next one is free too: worker 2 takes that one."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")


def test_run_sh_gives_each_worker_its_own_metrics_port(redis_server, world, sign_key, tmp_path, monkeypatch):
    prefix = world.sub("metrics-workers")
    world.prefixes.add(prefix)
    port = two_free_ports()
    monkeypatch.setenv("DATALAB_METRICS_PORT", str(port))
    workers = Workers(Proxy(redis_server.url, prefix, sign_key, tmp_path, {"datalab_pool_size": 0}))
    try:
        for worker_port in (port, port + 1):
            assert wait_until(lambda: listening_addresses(worker_port), "the metrics port") == {LOOPBACK_V4}  # noqa: B023
            assert ("datalab_proxied_requests_total", ()) in scrape(f"http://127.0.0.1:{worker_port}/metrics")
    finally:
        workers.stop()
