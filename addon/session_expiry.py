"""An open WebSocket ends with its session.

Once a session expires, its HTTP requests are refused (403 NO_SESSION); a kernel WebSocket opened
under it must not go on running code past that (an operator may set datalab_session_ttl below
datalab_max_age; with the defaults the instance ends first). A session expires by its Redis TTL,
which tells no one, so the routed upgrades are watched: when a session's TTL runs out, the client
connections opened under it are closed as the header deadline closes one (deadlines.close_client),
spliced or not.

One task watches them all, asking Redis in one round trip for the sessions that are new or due, so
hundreds of upgrades at once cost one connection, not one each (each would stay in the pool).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import connection
from mitmproxy import http
from redis.exceptions import RedisError

from deadlines import close_client
from marks import SESSION
from runtime import Runtime

log = logging.getLogger(__name__)

AFTER_FAULT = 5.0  # seconds until sessions Redis could not be asked about are asked again
SOONEST = 0.05  # seconds: the least wait between two looks (a TTL read as it runs out)
LONGEST = 3600.0  # seconds: the most a look waits (a new upgrade wakes it sooner)


class SessionExpiry:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._open: dict[str, tuple[connection.Client, str]] = {}  # client id -> (client, session id)
        self._due: dict[str, float] = {}  # client id -> when its session is looked at again (monotonic)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def response(self, flow: http.HTTPFlow) -> None:
        session_id = flow.metadata.get(SESSION)
        if flow.response is None or flow.response.status_code != 101 or not session_id:
            return
        self._open[flow.client_conn.id] = (flow.client_conn, session_id)
        self._due.pop(flow.client_conn.id, None)  # looked at in the next round
        self._wake.set()

    def client_disconnected(self, client: connection.Client) -> None:
        self._open.pop(client.id, None)
        self._due.pop(client.id, None)

    async def _watch(self) -> None:
        while True:
            await self._look(time.monotonic())
            soonest = min(self._due.values(), default=time.monotonic() + LONGEST)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(soonest - time.monotonic(), SOONEST))
            except TimeoutError:
                pass

    async def _look(self, now: float) -> None:
        """Ask for the sessions of the connections that are new or due; close those whose expired.
        A Redis fault is no expiry: they are asked again later (their HTTP fails closed meanwhile)."""
        asked = [cid for cid in self._open if self._due.get(cid, 0.0) <= now]
        if not asked:
            return
        try:
            lefts = await self.runtime.store.sessions_left([self._open[cid][1] for cid in asked])
        except (RedisError, OSError) as e:
            log.warning("datalab: could not read session expiries: %r", e)
            lefts = [AFTER_FAULT] * len(asked)
        for cid, left in zip(asked, lefts, strict=True):
            if cid not in self._open:  # it went while Redis answered
                continue
            if left is None:
                log.info("datalab: a WebSocket's session expired; closing its connection")
                client, _ = self._open.pop(cid)
                self._due.pop(cid, None)
                close_client(client, None)
            else:
                self._due[cid] = now + min(left, LONGEST)
