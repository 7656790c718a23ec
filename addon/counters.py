"""What the proxy counts, for operators: starts (by outcome, timed by source), routed traffic,
WebSocket messages, culls, saved work and refusals; recorded by whoever does the thing, served by
the exporter (metrics.py).

Module-level, so the hot paths count with one `inc()` on a child bound once (no label lookup per
request); series that exist from the start are at 0, so rate() sees their first rise.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from redis.exceptions import RedisError

from backends import BackendError

# From a pooled hand-out (copy the upload in, bind: ~0.05 s) to a cold boot at the start and queue timeouts.
START_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90)
CULL_REASONS = ("idle", "max_age", "gone", "unreachable", "orphan")
START_OUTCOMES = ("ok", "CAPACITY", "START_TIMEOUT", "IMAGE_MISSING", "CLIENT_GONE")
WORK_OUTCOMES = ("saved", "too_large", "timeout", "failed", "gone", "store")

COUNTERS = CollectorRegistry()  # this process's counts; each Metrics addon serves them with its gauges


def _counter(name: str, help: str, *labels: str) -> Counter:
    return Counter(name, help, labels, registry=COUNTERS)


STARTS = _counter("datalab_starts", "Starts (/datalab/start) by outcome: ok or the error code.", "outcome")
START_SECONDS = Histogram(
    "datalab_start_seconds",
    "Seconds from a start being taken on to its nonce, by where its instance came from (pooled, cold).",
    ["source"],
    buckets=START_BUCKETS,
    registry=COUNTERS,
)
PROXIED = _counter("datalab_proxied_requests", "Requests routed to an instance (WebSocket handshakes too).")
WEBSOCKET_MESSAGES = _counter(
    "datalab_websocket_messages", "WebSocket messages through routed flows, by sender.", "sender"
)
WEBSOCKET_TOO_BIG = _counter(
    "datalab_websocket_too_big",
    "WebSockets closed with 1009 for a message over datalab_max_ws_message, by sender.",
    "sender",
)
CULLS = _counter("datalab_culls", "Instances ended by culling and reconciliation, by reason.", "reason")
WORK_SAVES = _counter(
    "datalab_work_saves",
    "Ended instances' work: saved, or not saved by why (too_large, timeout, failed, gone, store).",
    "outcome",
)
WORK_SAVED_BYTES = _counter("datalab_work_saved_bytes", "Bytes of work saved into the work store.")
REFUSALS = _counter("datalab_refusals", "JSON errors the proxy answered, by code and status.", "code", "status")

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
