"""Lifecycle events delivered to the frontend: every event the Redis stream <prefix>lifecycle holds
(store.py writes each in the script that makes its change) is POSTed as JSON to datalab_events_url,
signed X-Datalab-Signature: sha256=<hex HMAC-SHA256(datalab_events_key, body)>.

Every proxy reads the stream as one consumer of one group, so each event goes to one of them; an
event is acknowledged only once its receiver answered 2xx (at least once: a proxy that dies between
the POST and the acknowledgement leaves it to be sent again), and one another consumer left
unacknowledged for CLAIM_AFTER seconds (its proxy died) is taken over. A consumer sends its events
one at a time in stream order and retries the one its receiver refuses, with a growing delay, before
it sends the next: a receiver that is down for a while gets, once back, everything the stream still
holds, in order per instance as long as one proxy delivers (several share the events between them).
It all runs in a background task: no request waits for a receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Awaitable
from collections.abc import Callable

from backends.backoff import growing_delays
from store import Store
from store import StreamEvent

log = logging.getLogger(__name__)

GROUP = "webhook"
SIGNATURE_HEADER = "X-Datalab-Signature"
CLAIM_AFTER = 60.0  # seconds an event may stay unacknowledged with another proxy before this one takes it
BATCH = 50  # events read at once
WAIT_FOR_NEW = 5.0  # seconds a read waits for a new event (less if Redis calls must end sooner)
POST_TIMEOUT = 10.0  # seconds a receiver has to answer one event
FIRST_RETRY = 0.5  # seconds before the first retry; then doubling up to datalab_events_retry_max
MAX_ANSWER = 64 * 1024  # bytes of a receiver's answer read (it is not used)
TEXT_FIELDS = ("type", "instance", "work", "owner", "profile")

Post = Callable[[bytes, dict[str, str]], Awaitable[int]]  # a body and headers -> the receiver's status


def event_body(event: StreamEvent) -> bytes:
    """The event as its receiver gets it: docs/api.md "Events" lists the fields."""
    body: dict[str, str | float] = {"id": event.id, **{name: event.fields.get(name, "") for name in TEXT_FIELDS}}
    body["time"] = float(event.fields.get("time") or 0)
    body |= {k: v for k, v in event.fields.items() if k not in body}  # cause, filename: where the type has them
    return json.dumps(body, sort_keys=True).encode()


def signature(key: str, body: bytes) -> str:
    """The X-Datalab-Signature value: what a receiver computes again to know the proxy sent it."""
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def http_poster(url: str, timeout: float = POST_TIMEOUT) -> Post:
    """POST to `url` (http or https; redirects are not followed) in a thread: the status it answers.
    `timeout` bounds the whole POST, not only each read: a receiver that trickles its answer a byte
    at a time is cut then (its socket shut down), as one that says nothing is."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def post(body: bytes, headers: dict[str, str]) -> int:
        conn = connection(parts.hostname or "", parts.port, timeout=timeout)
        cut = threading.Event()
        deadline = threading.Timer(timeout, _cut_off, (conn, cut))
        deadline.start()
        try:
            conn.request("POST", target, body, headers)
            answer = conn.getresponse()
            answer.read(MAX_ANSWER)
        except Exception as e:
            if cut.is_set():  # whatever the cut socket raised (TLS: not always an OSError)
                raise TimeoutError(f"the receiver took more than {timeout} s") from e
            raise
        finally:
            deadline.cancel()
            conn.close()
        if cut.is_set():  # a head cut short may still parse: it was not answered in time all the same
            raise TimeoutError(f"the receiver took more than {timeout} s")
        return answer.status

    async def posting(body: bytes, headers: dict[str, str]) -> int:
        return await asyncio.to_thread(post, body, headers)

    return posting


def _cut_off(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """The POST's deadline: a blocked read wakes up to a socket shut down under it."""
    cut.set()
    if conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)


def consumer_name() -> str:
    """This process's name in the group: unique per proxy process, readable in XINFO."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class EventDelivery:
    """One proxy's consumer: `run` delivers until cancelled."""

    def __init__(
        self,
        store: Store,
        post: Post,
        key: str,
        retry_max: float,
        consumer: str | None = None,
        claim_after: float = CLAIM_AFTER,
    ):
        self.store = store
        self.post = post
        self.key = key
        self.retry_max = retry_max
        self.consumer = consumer or consumer_name()
        self.claim_after = claim_after
        self._joined = False

    @property
    def _wait_ms(self) -> int:
        """A blocking read must end before the Redis client's deadline cuts it (redis_deadline.py)."""
        return int(1000 * min(WAIT_FOR_NEW, getattr(self.store.redis, "deadline", WAIT_FOR_NEW) / 2))

    async def run(self) -> None:
        delays = None
        while True:
            try:
                await self.round()
                delays = None
            except Exception as e:  # Redis away: try again, later and later
                delays = delays or growing_delays(FIRST_RETRY, self.retry_max)
                delay = next(delays)
                log.warning("datalab: delivering events: %s; again in %.1f s", e, delay)
                await asyncio.sleep(delay)

    async def round(self) -> int:
        """Take over what dead consumers left, then send what this one holds, else what is new.
        How many events were handled."""
        if not self._joined:
            await self.store.join_event_group(GROUP)
            self._joined = True
        await self.store.claim_events(GROUP, self.consumer, int(self.claim_after * 1000), BATCH)
        events = await self.store.read_events(GROUP, self.consumer, BATCH, 0, own=True)
        if not events:
            events = await self.store.read_events(GROUP, self.consumer, BATCH, self._wait_ms, own=False)
        for event in events:
            await self.deliver(event)
        return len(events)

    async def deliver(self, event: StreamEvent) -> None:
        """POST the event until its receiver takes it (2xx), then acknowledge it. Meanwhile the event
        stays this consumer's (its idle time is reset), so no other proxy takes it over."""
        if not event.fields:  # trimmed from the stream (datalab_events_max) before it was sent
            await self.store.ack_event(GROUP, event.id)
            return
        body = event_body(event)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(self.key, body)}
        delays = growing_delays(FIRST_RETRY, self.retry_max)
        while True:
            try:
                status = await self.post(body, headers)
                if 200 <= status < 300:
                    break
                why = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as e:
                why = str(e) or type(e).__name__
            delay = next(delays)
            log.warning("datalab: event %s not taken (%s); again in %.1f s", event.id, why, delay)
            await asyncio.sleep(delay)
            await self.store.keep_events(GROUP, self.consumer, [event.id])
        await self.store.ack_event(GROUP, event.id)
