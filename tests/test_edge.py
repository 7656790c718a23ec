"""deploy/edge.py: a connection the proxy replica has ended is ended towards the client too."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

EDGE = Path(__file__).resolve().parent.parent / "deploy" / "edge.py"


def load_edge():
    spec = importlib.util.spec_from_file_location("edge", EDGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_silent_client_is_let_go_once_the_replica_closes(monkeypatch):
    """A client that connects and goes silent (or vanished without a FIN) must not hold the edge's sockets
    forever once the replica has closed its side (mitmproxy's idle timeout): else a flood of such
    connections exhausts the edge's descriptors, which no replica ever bounds."""
    edge = load_edge()

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # the replica ends the connection (as mitmproxy does after its idle timeout)

    upstream = await asyncio.start_server(replica, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]

    async def loopback_replicas(service: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    monkeypatch.setattr(edge, "replicas", loopback_replicas)
    served: list[asyncio.Task] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        served.append(asyncio.current_task())
        await edge.serve("proxy", port, r, w)

    front = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the replica's end reached the client
    await asyncio.sleep(0.5)
    done = [t.done() for t in served]
    writer.close()
    front.close()
    upstream.close()
    assert done == [True], "the edge still holds the connection of a client that never closes"
