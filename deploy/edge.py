"""The stack's edge on engines without IPVS: a TCP spreader in front of the proxy replicas.

Swarm's routing mesh (published ports in ingress mode) and service VIPs need the kernel's IPVS; on a
kernel without it (e.g. a microVM's) nothing answers on the published port. Then the stack publishes
this one task's port in host mode instead, and it hands each new connection to the next proxy replica
in turn, found by their task addresses (DNS tasks.<service>, asked again per connection so replicas
that come and go are followed). Bytes are relayed untouched: TLS, HTTP and WebSockets alike.

    python3 edge.py LISTEN_PORT SERVICE TARGET_PORT
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sys

log = logging.getLogger("edge")
CONNECT_TIMEOUT = 5.0
turn = itertools.count()


async def replicas(service: str, port: int) -> list[str]:
    """The replicas' addresses now, in a stable order (round robin needs one)."""
    infos = await asyncio.get_running_loop().getaddrinfo(f"tasks.{service}", port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies one direction until its end, then half-closes the other side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def connect(service: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the next replica in turn; the others are tried when it refuses."""
    addresses = await replicas(service, port)
    start = next(turn)
    for i in range(len(addresses)):
        address = addresses[(start + i) % len(addresses)]
        try:
            return await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.warning("edge: replica %s:%d refused (%s); trying the next", address, port, e)
    raise ConnectionError(f"no replica of {service} answers on port {port}")


async def serve(service: str, port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        upstream_r, upstream_w = await connect(service, port)
    except (OSError, ConnectionError) as e:
        log.warning("edge: %s", e)
        client_w.close()
        return
    # The replica bounds a connection (its idle timeout) and its end is the connection's end: the
    # client's side is then cut too, not waited on (a silent or vanished client would hold both
    # sockets forever). A client's end only half-closes: the replica's answer still comes back.
    inbound = asyncio.create_task(pipe(client_r, upstream_w))
    try:
        await pipe(upstream_r, client_w)
    finally:
        inbound.cancel()
        upstream_w.close()
        client_w.close()


async def main(listen_port: int, service: str, port: int) -> None:
    server = await asyncio.start_server(lambda r, w: serve(service, port, r, w), port=listen_port)
    log.warning("edge: listening on port %d, spreading connections over tasks.%s:%d", listen_port, service, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
