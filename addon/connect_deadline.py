"""A connection to an instance is accepted within datalab_connect_timeout, or given up.

An instance's address is on the proxy's own network: a connection that is not accepted within
seconds never will be. The address has gone without a word, as a lost swarm node's instances'
have: nothing answers, and the kernel would retry the connect for two minutes. mitmproxy sets no
bound of its own, and a routed request (its body streamed) reaches its `request` hook only once
its connection is open, so upstream_deadline.py's deadline never starts for it.

So from `requestheaders` on, a routed request (or a static fetch) is looked at until its
connection is open: once the attempt to open it (counted from its start, not from a wait for one
of mitmproxy's five connections per client and address) is older than the bound, it is cancelled.
mitmproxy then answers its own 502 page (an answer an addon cannot make JSON: api.md, "Errors"),
and its `error` hook runs, where router.py asks the backend whether the instance is gone (then
its sessions get 410).
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http
from mitmproxy.connection import Connection
from mitmproxy.connection import Server

from flow_timers import FlowTimers
from handlers import handler_of
from marks import ROUTED
from marks import STATIC
from runtime import Runtime

log = logging.getLogger(__name__)

RECHECK = 1.0  # seconds until a request whose connection is not open is looked at again


class ConnectDeadline:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._timers = FlowTimers(self._check)

    @property
    def timeout(self) -> int:
        return self.runtime.settings.connect_timeout

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if ROUTED in flow.metadata or flow.metadata.get(STATIC):
            self._arm(flow, min(RECHECK, self.timeout))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    async def done(self) -> None:
        self._timers.clear()

    def _arm(self, flow: http.HTTPFlow, delay: float) -> None:
        self._timers.arm(flow, delay)

    def _forget(self, flow: http.HTTPFlow) -> None:
        self._timers.disarm(flow)

    def _check(self, flow: http.HTTPFlow) -> None:
        """Give up an attempt older than the bound; look again at one younger, or still waiting."""
        if flow.response or flow.error or not flow.live:
            return
        handler = handler_of(flow.client_conn)
        if handler is None:
            return  # the client is gone: mitmproxy ends the flow itself
        if flow.server_conn.connected or flow.server_conn.timestamp_tcp_setup:
            return  # open: upstream_deadline.py bounds the answer from here
        address = (flow.request.host, flow.request.port)
        opening = [(conn, io.handler) for conn, io in handler.transports.items() if _opening(conn, address)]
        if not opening:  # not asked for yet, or waiting for a slot
            self._arm(flow, RECHECK)
            return
        left = min(conn.timestamp_start for conn, _ in opening) + self.timeout - time.time()
        if left > 0:
            self._arm(flow, min(RECHECK, left))
            return
        instance = flow.metadata.get(ROUTED) or "of a static fetch"
        log.warning("datalab: instance %s did not accept a connection within %d s; giving up", instance, self.timeout)
        for conn, task in opening:
            if time.time() - conn.timestamp_start >= self.timeout:
                task.cancel(f"datalab: the instance did not accept a connection within {self.timeout} s")


def _opening(conn: Connection, address: tuple[str, int]) -> bool:
    """A connection (of the flow's client) to `address` whose attempt to open has begun and not ended."""
    return (
        isinstance(conn, Server)
        and conn.address is not None
        and tuple(conn.address[:2]) == address
        and conn.timestamp_start is not None
        and conn.timestamp_tcp_setup is None
        and not conn.connected
        and conn.error is None
    )
