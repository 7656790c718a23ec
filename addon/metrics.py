"""Prometheus metrics for operators: what the proxy did (starts, routed traffic, culls, refusals) and
how many instances there are, served where the public cannot reach them.

The counters are module-level, so the hot paths count with one `inc()` on a child bound once (no
label lookup per request). The instance gauges are read from Redis at scrape time: several proxies
share one Redis, so every proxy reports the same numbers (aggregate them with max(), not sum()).
`Metrics` serves them on datalab_metrics_host:datalab_metrics_port (prometheus_client's server, in
a thread) and, with datalab_metrics_token, at GET /datalab/metrics with that bearer token on the
proxy's own port; anyone else is answered as for any unknown /datalab/ path.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from mitmproxy import http
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import ProcessCollector
from prometheus_client import generate_latest
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import RedisError

import config
from backends import BackendError
from marks import HANDLED
from store import Store

if TYPE_CHECKING:
    from runtime import Runtime

log = logging.getLogger(__name__)

PATH = config.METRICS_PATH
SCRAPE_WAIT = 5.0  # seconds a scrape waits for the instance counts from Redis
# From a pooled hand-out (copy the upload in, bind: ~0.05 s) to a cold boot at the start and queue timeouts.
START_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90)
CULL_REASONS = ("idle", "max_age", "gone", "unreachable", "orphan")
START_OUTCOMES = ("ok", "CAPACITY", "START_TIMEOUT", "IMAGE_MISSING", "CLIENT_GONE")
WORK_OUTCOMES = ("saved", "too_large", "timeout", "failed", "gone", "store")

COUNTERS = CollectorRegistry()  # this process's counts; each Metrics addon serves them with its gauges
STARTS = Counter(
    "datalab_starts", "Starts (/datalab/start) by outcome: ok or the error code.", ["outcome"], registry=COUNTERS
)
START_SECONDS = Histogram(
    "datalab_start_seconds",
    "Seconds from a start being taken on to its nonce, by where its instance came from (pooled, cold).",
    ["source"],
    buckets=START_BUCKETS,
    registry=COUNTERS,
)
PROXIED = Counter(
    "datalab_proxied_requests", "Requests routed to an instance (WebSocket handshakes too).", registry=COUNTERS
)
WEBSOCKET_MESSAGES = Counter(
    "datalab_websocket_messages", "WebSocket messages through routed flows, by sender.", ["sender"], registry=COUNTERS
)
WEBSOCKET_TOO_BIG = Counter(
    "datalab_websocket_too_big",
    "WebSockets closed with 1009 for a message over datalab_max_ws_message, by sender.",
    ["sender"],
    registry=COUNTERS,
)
CULLS = Counter(
    "datalab_culls", "Instances ended by culling and reconciliation, by reason.", ["reason"], registry=COUNTERS
)
WORK_SAVES = Counter(
    "datalab_work_saves",
    "Ended instances' work: saved, or not saved by why (too_large, timeout, failed, gone, store).",
    ["outcome"],
    registry=COUNTERS,
)
WORK_SAVED_BYTES = Counter("datalab_work_saved_bytes", "Bytes of work saved into the work store.", registry=COUNTERS)
REFUSALS = Counter(
    "datalab_refusals", "JSON errors the proxy answered, by code and status.", ["code", "status"], registry=COUNTERS
)

for _outcome in START_OUTCOMES:  # series that exist from the start, at 0, so rate() sees their first rise
    STARTS.labels(_outcome)
for _reason in CULL_REASONS:
    CULLS.labels(_reason)
for _outcome in WORK_OUTCOMES:
    WORK_SAVES.labels(_outcome)
START_OK = STARTS.labels("ok")
START_LATENCY = {source: START_SECONDS.labels(source) for source in ("pooled", "cold")}
WEBSOCKET_FROM_CLIENT = WEBSOCKET_MESSAGES.labels("client")
WEBSOCKET_FROM_INSTANCE = WEBSOCKET_MESSAGES.labels("instance")
TOO_BIG_FROM = {True: WEBSOCKET_TOO_BIG.labels("client"), False: WEBSOCKET_TOO_BIG.labels("instance")}


def refused(code: str, status: int) -> None:
    REFUSALS.labels(code, str(status)).inc()


def culled(reason: str) -> None:
    CULLS.labels(reason).inc()


def work_saved(size: int) -> None:
    WORK_SAVES.labels("saved").inc()
    WORK_SAVED_BYTES.inc(size)


def work_unsaved(outcome: str) -> None:
    WORK_SAVES.labels(outcome).inc()


def websocket_message(flow: http.HTTPFlow) -> None:
    """Count the message a routed WebSocket just carried, by who sent it."""
    if flow.websocket and flow.websocket.messages and flow.websocket.messages[-1].from_client:
        WEBSOCKET_FROM_CLIENT.inc()
    else:
        WEBSOCKET_FROM_INSTANCE.inc()


def websocket_too_big(from_client: bool) -> None:
    TOO_BIG_FROM[from_client].inc()


# Starts: Instances.start is wrapped in timed_start, Instances.boot in cold_boot; a boot inside a
# start marks that start cold (a pool boot runs in its own task, outside any start).


@dataclass
class _Start:
    source: str = "pooled"


_current_start: contextvars.ContextVar[_Start | None] = contextvars.ContextVar("datalab_start", default=None)


def start_outcome(exc: BaseException) -> str:
    """The outcome label of a failed start: the code its client is answered with."""
    if isinstance(exc, asyncio.CancelledError):
        return "CLIENT_GONE"  # the api cancels a start whose client hung up
    if isinstance(exc, BackendError):
        return exc.code
    if isinstance(exc, RedisError):
        return "REDIS_UNAVAILABLE"
    return "INTERNAL"


def timed_start[**P, T](func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Count a start by outcome; time a successful one, labelled pooled or cold."""

    @functools.wraps(func)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> T:
        start, began = _Start(), time.monotonic()
        token = _current_start.set(start)
        try:
            handed = await func(*args, **kwargs)
        except BaseException as e:
            STARTS.labels(start_outcome(e)).inc()
            raise
        finally:
            _current_start.reset(token)
        START_OK.inc()
        START_LATENCY[start.source].observe(time.monotonic() - began)
        return handed

    return counted


def cold_boot[**P, T](func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Mark the start this boot serves (if any) as cold."""

    @functools.wraps(func)
    async def booting(*args: P.args, **kwargs: P.kwargs) -> T:
        start = _current_start.get()
        if start is not None:
            start.source = "cold"
        return await func(*args, **kwargs)

    return booting


# Serving


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
        future = asyncio.run_coroutine_threadsafe(count_instances(store), loop)
        try:
            return future.result(SCRAPE_WAIT)
        except Exception as e:  # Redis away or slow: this scrape goes without the gauges
            future.cancel()
            log.warning("datalab: metrics: no instance counts from Redis: %r", e)
            return None


async def count_instances(store: Store) -> dict[str, int]:
    recorded = await store.instance_ids()
    pooled = recorded.intersection(await store.pool_ids())
    return {"live": len(recorded) - len(pooled), "pooled": len(pooled)}


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
        for collector in (COUNTERS, self.gauges, ProcessCollector(registry=None)):
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
