"""The Prometheus exporter for operators: what the proxy did (counters.py: starts, routed traffic,
culls, refusals) and how many instances there are, served where the public cannot reach them.

The instance gauges are read from Redis at scrape time: several proxies
share one Redis, so every proxy reports the same numbers (aggregate them with max(), not sum()).
`Metrics` serves them on datalab_metrics_host:datalab_metrics_port (prometheus_client's server, in
a thread) and, with datalab_metrics_token, at GET /datalab/metrics with that bearer token on the
proxy's own port; anyone else is answered as for any unknown /datalab/ path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import threading
from wsgiref.simple_server import WSGIServer

from mitmproxy import http
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry
from prometheus_client import ProcessCollector
from prometheus_client import generate_latest
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily

import config
import counters
from marks import HANDLED
from runtime import Runtime
from store import Store

log = logging.getLogger(__name__)

PATH = config.METRICS_PATH
SCRAPE_WAIT = 5.0  # seconds a scrape waits for the instance counts from Redis


class InstanceGauges:
    """datalab_instances{state}: live (claimed by users) and pooled (ready, unclaimed), read from
    Redis when scraped. collect() runs in a scraping thread and asks the proxy's event loop."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self):
        counts = self._counts()
        if counts is None:
            return  # absent rather than wrong: alert on absent(datalab_instances)
        family = GaugeMetricFamily("datalab_instances", "Instances on this proxy's Redis, by state.", labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family

    def _counts(self) -> dict[str, int] | None:
        store, loop = self.runtime.store, self.loop
        if store is None or loop is None or loop.is_closed():
            return None
        profiles = list(self.runtime.settings.profile_table)
        future = asyncio.run_coroutine_threadsafe(count_instances(store, profiles), loop)
        try:
            return future.result(SCRAPE_WAIT)
        except Exception as e:  # Redis away or slow: this scrape goes without the gauges
            future.cancel()
            log.warning("datalab: metrics: no instance counts from Redis: %r", e)
            return None


async def count_instances(store: Store, profiles: list[str]) -> dict[str, int]:
    """Live and pooled instances (pooled: in any of these profiles' pools)."""
    recorded, pooled = await store.instance_counts(profiles)
    return {"live": recorded - pooled, "pooled": pooled}


def bearer_ok(authorization: str, token: str) -> bool:
    """Whether the Authorization header carries the token (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    same = hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())
    return same and scheme.lower() == "bearer"


class Metrics:
    """The exporter: its options (datalab_metrics_*) come in the runtime's Settings."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.gauges = InstanceGauges(runtime)
        self.registry = CollectorRegistry()
        for collector in (counters.COUNTERS, self.gauges, ProcessCollector(registry=None)):
            self.registry.register(collector)
        self.token = ""
        self._address: tuple[str, int] = ("127.0.0.1", 0)
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._restarting: asyncio.Task | None = None
        self._running = False

    def configure(self, updated: set[str]) -> None:
        """Follow datalab_metrics_* (declared and checked in config.py, handed over in Settings)."""
        s = self.runtime.settings
        self.token = s.metrics_token
        address = (s.metrics_host, s.metrics_port)
        moved, self._address = address != self._address, address
        if self._running and moved:
            self._restarting = asyncio.get_running_loop().create_task(self._restart())

    def running(self) -> None:
        self._running = True
        self.gauges.loop = asyncio.get_running_loop()
        self._serve()

    async def done(self) -> None:
        self._running = False
        await self._stop()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """The metrics, to the holder of the token only; anyone else goes on to the api's 404."""
        if flow.response or flow.error or not flow.live or not self.token:
            return
        if flow.request.method != "GET" or flow.request.path.partition("?")[0] != PATH:
            return
        if not bearer_ok(flow.request.headers.get("Authorization", ""), self.token):
            return
        flow.metadata[HANDLED] = True  # never routed
        body = await asyncio.to_thread(generate_latest, self.registry)  # (the gauges wait on this loop)
        flow.response = http.Response.make(
            200, body, {"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
        )

    def _serve(self) -> None:
        host, port = self._address
        if not port:
            return
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._server = start_http_server(port, host, registry=self.registry)
        except OSError as e:  # at start-up, an error logged ends mitmdump: the operator asked for this port
            log.error("datalab: cannot serve metrics on %s: %s", shown, e)
            return
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("datalab: metrics are served unauthenticated on %s: keep that address private", host)
        log.info("datalab: metrics on http://%s/metrics", shown)

    async def _restart(self) -> None:
        await self._stop()
        self._serve()

    async def _stop(self) -> None:
        if self._server is not None:
            server, thread = self._server
            self._server = None
            await asyncio.to_thread(server.shutdown)  # (waits for its loop to notice, up to half a second)
            server.server_close()
            await asyncio.to_thread(thread.join)
