"""An open WebSocket ends with its session.

Once a session expires, its HTTP requests are refused (403 NO_SESSION); a kernel WebSocket opened
under it must not go on running code past that (an operator may set datalab_session_ttl below
datalab_max_age; with the defaults the instance ends first). A session expires by its Redis TTL,
which tells no one, so each routed upgrade is watched: when its session's TTL runs out, the client
connection is closed as the header deadline closes one (deadlines.close_client), spliced or not.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection
from mitmproxy import http
from redis.exceptions import RedisError

from deadlines import close_client
from marks import SESSION
from runtime import Runtime

log = logging.getLogger(__name__)

AFTER_FAULT = 5.0  # seconds until a session Redis could not be asked about is asked again
SOONEST = 0.05  # seconds: the least wait between two looks (a TTL read as it runs out)


class SessionExpiry:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._watches: dict[str, asyncio.Task] = {}  # client connection id -> its watch

    def response(self, flow: http.HTTPFlow) -> None:
        session_id = flow.metadata.get(SESSION)
        if flow.response is None or flow.response.status_code != 101 or not session_id:
            return
        client = flow.client_conn
        if client.id not in self._watches:
            self._watches[client.id] = asyncio.create_task(self._watch(client, session_id))

    def client_disconnected(self, client: connection.Client) -> None:
        watch = self._watches.pop(client.id, None)
        if watch is not None:
            watch.cancel()

    async def done(self) -> None:
        for watch in self._watches.values():
            watch.cancel()
        await asyncio.gather(*self._watches.values(), return_exceptions=True)

    async def _watch(self, client: connection.Client, session_id: str) -> None:
        """Sleep until the session's TTL runs out, then close the client unless it was renewed. A Redis
        fault is no expiry: it asks again later (the route's own requests fail closed meanwhile)."""
        while True:
            try:
                left = await self.runtime.store.session_left(session_id)
            except (RedisError, OSError) as e:
                log.warning("datalab: could not read session expiry: %r", e)
                left = AFTER_FAULT
            if left is None:
                log.info("datalab: a WebSocket's session expired; closing its connection")
                self._watches.pop(client.id, None)
                close_client(client, None)
                return
            await asyncio.sleep(max(min(left, 3600.0), SOONEST))
