"""The metrics addon: its options, who gets GET /datalab/metrics, how starts, refusals and
instances are counted, and its own port (a real server, a real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types

import pytest
import requests
from mitmproxy import exceptions
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import counters
import metrics
import store
from backends import ImageMissing
from backends import Instance
from config import Config
from config import Settings
from errors import ApiError
from helpers import free_port
from instances import NoCapacity
from marks import HANDLED
from metrics import Metrics

TOKEN = "t0ken-for-the-metrics-endpoint"


def samples(text: str | bytes) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the text format Prometheus reads."""
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def counted(name: str, **labels: str) -> float:
    return samples(generate_latest(counters.COUNTERS)).get((name, tuple(sorted(labels.items()))), 0.0)


class Parts:
    """Stands where the Runtime is: the Settings that Config hands over, and a store."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.store = None

    def apply(self, settings: Settings) -> None:
        self.settings = settings


@contextlib.contextmanager
def exporter(**options):
    """The Metrics addon, its options set through Config (where they are declared and checked)."""
    parts = Parts()
    addon = Metrics(parts)
    with taddons.context(Config(parts.apply), addon) as tctx:
        tctx.configure(addon, datalab_sign_key="k", **options)
        yield addon, tctx


def get_flow(path: str = metrics.PATH, method: str = "GET", authorization: str | None = None):
    req = tutils.treq(method=method.encode(), path=path.encode(), content=b"")
    req.headers.clear()
    if authorization is not None:
        req.headers["Authorization"] = authorization
    return tflow.tflow(req=req, resp=False)


@pytest.mark.parametrize(
    "option, value",
    [
        ("datalab_metrics_port", -1),
        ("datalab_metrics_port", 65536),
        ("datalab_metrics_host", "localhost"),  # an address, not a name to resolve
        ("datalab_metrics_host", ""),
        ("datalab_metrics_token", "short"),
        ("datalab_metrics_token", "has a space in the middle of it"),
        ("datalab_metrics_token", "non-ascii-tökén-of-enough-length"),
    ],
)
def test_bad_options_fail_at_start_up(option, value):
    with exporter() as (addon, tctx):
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, **{option: value})


@pytest.mark.parametrize(
    "changes",
    [{}, {"datalab_metrics_port": 9464, "datalab_metrics_host": "::1"}, {"datalab_metrics_token": TOKEN}],
)
def test_good_options_are_taken(changes):
    with exporter(**changes) as (addon, tctx):
        assert addon.token == changes.get("datalab_metrics_token", "")


@pytest.mark.parametrize(
    "authorization, ok",
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"Bearer  {TOKEN} ", True),
        (f"Basic {TOKEN}", False),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        ("Bearer", False),
        ("", False),
        (f"Bearer {TOKEN}\udcff", False),  # undecodable bytes as mitmproxy hands them over
    ],
)
def test_bearer_check(authorization, ok):
    assert metrics.bearer_ok(authorization, TOKEN) is ok


async def test_the_token_holder_gets_the_metrics_and_the_flow_is_never_routed():
    with exporter(datalab_metrics_token=TOKEN) as (addon, tctx):
        flow = get_flow(path=metrics.PATH + "?x=1", authorization=f"Bearer {TOKEN}")
        await addon.requestheaders(flow)
    assert flow.response.status_code == 200
    assert flow.response.headers["Content-Type"].startswith("text/plain; version=")
    assert flow.metadata[HANDLED] is True
    assert ("datalab_proxied_requests_total", ()) in samples(flow.response.content)


@pytest.mark.parametrize(
    "token, flow",
    [
        ("", get_flow(authorization="Bearer ")),  # not served on the proxy's port at all
        ("", get_flow(authorization=f"Bearer {TOKEN}")),
        (TOKEN, get_flow()),
        (TOKEN, get_flow(authorization=f"Bearer {TOKEN}-not")),
        (TOKEN, get_flow(method="POST", authorization=f"Bearer {TOKEN}")),
        (TOKEN, get_flow(path="/datalab/metrics/", authorization=f"Bearer {TOKEN}")),
    ],
)
async def test_anyone_else_goes_on_to_the_api_untouched(token, flow):
    """The api then answers its 404 NOT_FOUND, the same as for any unknown /datalab/ path: nothing
    tells whether metrics are served here."""
    with exporter(datalab_metrics_token=token) as (addon, tctx):
        await addon.requestheaders(flow)
    assert flow.response is None and HANDLED not in flow.metadata


def test_every_refusal_answered_is_counted_once():
    before = counted("datalab_refusals_total", code="NO_SESSION", status="403")
    error = ApiError(403, "NO_SESSION", "no session")
    assert counted("datalab_refusals_total", code="NO_SESSION", status="403") == before  # made, not answered
    assert error.response().status_code == 403
    assert counted("datalab_refusals_total", code="NO_SESSION", status="403") == before + 1


class Starts:
    """Stands where Instances is: `start` hands out what `found` says, booting when it is cold."""

    def __init__(self, cold: bool, fault: BaseException | None = None):
        self.cold = cold
        self.fault = fault

    @counters.timed_start
    async def start(self) -> str:
        if self.cold:
            await self.boot()
        if self.fault is not None:
            raise self.fault
        return "nonce"

    @counters.cold_boot
    async def boot(self) -> None:
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    "starts, outcome",
    [
        (Starts(cold=False), "ok"),
        (Starts(cold=True), "ok"),
        (Starts(cold=True, fault=NoCapacity("full", 30)), "CAPACITY"),
        (Starts(cold=True, fault=ImageMissing("no image")), "IMAGE_MISSING"),
        (Starts(cold=False, fault=asyncio.CancelledError()), "CLIENT_GONE"),
        (Starts(cold=False, fault=RuntimeError("bug")), "INTERNAL"),
    ],
)
async def test_starts_are_counted_by_outcome_and_timed_by_source(starts, outcome):
    source = "cold" if starts.cold else "pooled"
    before = counted("datalab_starts_total", outcome=outcome)
    timed = counted("datalab_start_seconds_count", source=source)
    if starts.fault is None:
        assert await starts.start() == "nonce"
    else:
        with pytest.raises(type(starts.fault)):
            await starts.start()
    assert counted("datalab_starts_total", outcome=outcome) == before + 1
    assert counted("datalab_start_seconds_count", source=source) == timed + (starts.fault is None)


async def test_a_pool_boot_outside_any_start_marks_nothing():
    await Starts(cold=True).boot()  # as the pool filler's task does; no start to mark
    assert counters._current_start.get() is None


def instance(n: int) -> Instance:
    return Instance(f"i{n}", "docker", f"h{n}", "127.0.0.1", 8000 + n, "", time.time())


async def test_the_instance_gauges_say_what_redis_holds(redis_url):
    """Two pooled, one of them then claimed: 1 live, 1 pooled, read at scrape time in the scraping
    thread (the Redis client belongs to the event loop)."""
    s = store.Store(store.connect(redis_url), "unit:")
    try:
        for n in (1, 2):
            await s.add_to_pool(instance(n))
        assert await s.claim_pooled(time.time()) is not None
        gauges = metrics.InstanceGauges(types.SimpleNamespace(store=s, settings=Settings()))
        gauges.loop = asyncio.get_running_loop()
        registry = CollectorRegistry()
        registry.register(gauges)
        found = samples(await asyncio.to_thread(generate_latest, registry))
        assert found[("datalab_instances", (("state", "live"),))] == 1
        assert found[("datalab_instances", (("state", "pooled"),))] == 1
    finally:
        await s.close()


async def test_without_redis_the_gauges_are_absent_not_wrong():
    s = store.Store(store.connect("redis://127.0.0.1:1/0"), "unit:")
    try:
        gauges = metrics.InstanceGauges(types.SimpleNamespace(store=s, settings=Settings()))
        gauges.loop = asyncio.get_running_loop()
        registry = CollectorRegistry()
        registry.register(gauges)
        assert b"datalab_instances" not in await asyncio.to_thread(generate_latest, registry)
    finally:
        await s.close()


async def test_the_metrics_port_serves_on_loopback_until_done():
    port = free_port()
    with exporter(datalab_metrics_port=port) as (addon, tctx):
        addon.running()
        try:
            r = await asyncio.to_thread(requests.get, f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert r.status_code == 200
            assert ("datalab_starts_total", (("outcome", "ok"),)) in samples(r.text)
            assert "process_resident_memory_bytes" in r.text
        finally:
            await addon.done()
    with pytest.raises(requests.ConnectionError):
        await asyncio.to_thread(requests.get, f"http://127.0.0.1:{port}/metrics", timeout=10)
