"""A connection to an instance is accepted within datalab_connect_timeout, or given up.

An instance's address is on the proxy's own network: a connection that is not accepted within
seconds never will be. The address has gone without a word, as a lost swarm node's instances'
have: nothing answers, and the kernel would retry the connect for two minutes, holding every
request that waits for it. mitmproxy sets no bound of its own, and a routed request (its body
streamed) reaches its `request` hook only once its connection is open, so upstream_deadline.py's
deadline never starts for it.

So each upstream connection mitmproxy is about to open (the `server_connect` hook: once per
connection, not per request, as kept-alive connections serve many) is looked at after the bound:
once its attempt to open (counted from its start, not from a wait for one of mitmproxy's five
connections per client and address) is older than that, it is cancelled. mitmproxy then answers
its own 502 page to the requests that waited for it (an answer an addon cannot make JSON: api.md,
"Errors"), and their `error` hook runs, where router.py asks the backend whether the instance is
gone (then its sessions get 410).
"""

from __future__ import annotations

import logging
import time

from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from flow_timers import FlowTimers
from handlers import handler_of
from runtime import Runtime

log = logging.getLogger(__name__)

RECHECK = 1.0  # seconds until a connection still waiting for its slot is looked at again


class ConnectDeadline:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._timers = FlowTimers(self._check, key=lambda data: data.server.id)

    @property
    def timeout(self) -> int:
        return self.runtime.settings.connect_timeout

    def server_connect(self, data: ServerConnectionHookData) -> None:
        if data.server.error is None:  # not refused (guards.py)
            self._timers.arm(data, self.timeout)

    def server_connected(self, data: ServerConnectionHookData) -> None:
        self._timers.disarm(data)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._timers.disarm(data)

    async def done(self) -> None:
        self._timers.clear()

    def _check(self, data: ServerConnectionHookData) -> None:
        """Give up an attempt older than the bound; look again at one younger, or still waiting."""
        server = data.server
        if server.connected or server.timestamp_tcp_setup is not None or server.error is not None:
            return
        handler = handler_of(data.client)
        io = handler.transports.get(server) if handler is not None else None
        if io is None or io.handler is None:
            return  # the client is gone, and its connections with it
        if server.timestamp_start is None:  # waiting for one of mitmproxy's connections per address
            self._timers.arm(data, RECHECK)
            return
        if (left := server.timestamp_start + self.timeout - time.time()) > 0:
            self._timers.arm(data, left)
            return
        where = f"{server.address[0]}:{server.address[1]}" if server.address else "an instance"
        log.warning("datalab: %s did not accept a connection within %d s; giving up", where, self.timeout)
        io.handler.cancel(f"datalab: the instance did not accept a connection within {self.timeout} s")
