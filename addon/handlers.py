"""Where datalab reaches into mitmproxy's connection handling, which gives addons no public way:
a client connection's handler and streams (to close it, or pace its reading), and answers written
as raw HTTP/1.1 past the hooks. Written against mitmproxy 12.3.1; one place to look when it changes.
"""

from __future__ import annotations

import asyncio

from mitmproxy import connection
from mitmproxy import ctx
from mitmproxy.net.http import http1

from errors import ApiError


def handler_of(client: connection.Client):
    """mitmproxy's handler of a client connection (proxyserver's), or None once it is gone."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(client.id) if proxyserver is not None else None


def client_io(client: connection.Client):
    """(handler, the client's streams), or (handler or None, None) where they are not asyncio's."""
    handler = handler_of(client)
    io = handler.transports.get(handler.client) if handler is not None else None
    if io is None or not isinstance(io.writer, asyncio.StreamWriter):
        return handler, None
    return handler, io


def closing_answer(refusal: ApiError) -> bytes:
    """A refusal as raw HTTP/1.1 bytes that close the connection after them."""
    response = refusal.response()
    response.headers["Connection"] = "close"
    return http1.assemble_response(response)
