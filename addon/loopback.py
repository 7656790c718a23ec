"""A server of the proxy's own on a loopback port the kernel picks (the upload sink, the work file
server): mitmproxy's upstream connections reach it, nothing outside the machine does.

Written once, so that each such server only says how it serves a connection (`_serve`). Its
`running` and `done` are mitmproxy's hook names: an addon that is one listens while the proxy runs.
"""

from __future__ import annotations

import asyncio

HOST = "127.0.0.1"


class LoopbackServer:
    """Listens from `running` to `done`; `port` is None while it does not."""

    head_limit = 2**16  # bytes a StreamReader line (a request head's line) may take
    backlog = 100  # connections the kernel holds until they are accepted (asyncio's default)

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def running(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0, limit=self.head_limit, backlog=self.backlog)
        self.port = self._server.sockets[0].getsockname()[1]

    async def done(self, wait: bool = True) -> None:
        """Stop listening; with `wait`, also until every connection it took has closed."""
        if self._server is not None:
            server, self._server, self.port = self._server, None, None
            server.close()
            if wait:
                await server.wait_closed()
