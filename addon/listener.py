"""Several proxy processes on one port: the kernel spreads new connections between them (SO_REUSEPORT).

mitmproxy's listener is a plain `asyncio.start_server` with no way to share its port. With
`datalab_reuse_port`, the proxy starts with `--set server=false` (nothing listens yet); once every
addon is loaded, this addon gives each server that is about to start a listen method that sets
SO_REUSEPORT, then turns `server` on. Workers share nothing else: routes, pool, culling and
capacity are in Redis already, and a removed instance reaches every worker's route cache over
Redis pub/sub (router.py). run.sh --workers N starts the processes.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy.proxy.mode_servers import AsyncioServerInstance

from runtime import Runtime

log = logging.getLogger(__name__)

BACKLOG = 1024  # connections the kernel queues per process while its loop is busy (asyncio's default: 100)


class SharedPort:
    """datalab_reuse_port (declared in config.py, handed over in the runtime's Settings)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def configure(self, updated: set[str]) -> None:
        s = self.runtime.settings
        if "datalab_reuse_port" in updated and s.reuse_port and ctx.options.server:
            raise exceptions.OptionsError(
                "datalab_reuse_port needs --set server=false: the proxy must not listen before it can share its port"
            )

    def running(self) -> None:
        if not self.runtime.settings.reuse_port:
            return
        servers = ctx.master.addons.get("proxyserver").servers
        servers.changed.connect(self._share)  # called with new servers created, before they start
        ctx.options.update(server=True)

    async def _share(self) -> None:
        for server in ctx.master.addons.get("proxyserver").servers:
            if isinstance(server, AsyncioServerInstance) and server.mode.transport_protocol == "tcp":
                server.listen = _shared_listen(server)


def _shared_listen(server: AsyncioServerInstance):
    async def listen(host: str, port: int) -> list[asyncio.Server]:
        return [await asyncio.start_server(server.handle_stream, host, port, reuse_port=True, backlog=BACKLOG)]

    return listen
