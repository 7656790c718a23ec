"""splice.py through mitmproxy's own connection handler (a reverse proxy in this process, a stand-in
instance that answers 101 and echoes): a passthrough's sockets are spliced after the 101, bytes pass
both ways in order and in bounded memory, and its ends and closes are still mitmproxy's. These fail
when mitmproxy's internals move from what splice.py was written for (12.3.1)."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mitmproxy.addons import proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import layers
from mitmproxy.proxy import mode_specs
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.proxy.server import SimpleConnectionHandler
from mitmproxy.test import taddons
from mitmproxy.test import tflow

import passthrough
import splice

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: a\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
GREETING = b"hello"  # what the instance sends right behind its 101 (mitmproxy's HTTP layer holds it)
MIB = 1024 * 1024


@dataclass
class Rig:
    handler: SimpleConnectionHandler
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream_eof: asyncio.Event
    upstream_reads: asyncio.Event  # cleared: the instance stops reading


def test_this_mitmproxy_has_what_splice_relies_on():
    assert splice.supported()
    assert passthrough.SPLICING


@asynccontextmanager
async def instance(eof: asyncio.Event, reads: asyncio.Event) -> AsyncIterator[int]:
    """A stand-in instance: answers the upgrade with 101 and a greeting, then echoes until EOF."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCHED + GREETING)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                await reads.wait()
        except ConnectionError:
            pass
        eof.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@asynccontextmanager
async def proxied() -> AsyncIterator[Rig]:
    """A client connected through mitmproxy's handler, its WebSocket upgraded and passed through."""
    eof, reads = asyncio.Event(), asyncio.Event()
    reads.set()
    ps = proxyserver.Proxyserver()
    with taddons.context(ps) as tctx:
        assert passthrough.install()
        async with instance(eof, reads) as port:
            handlers: list[SimpleConnectionHandler] = []
            stack = [layers.modes.ReverseProxy, lambda ctx: layers.HttpLayer(ctx, HTTPMode.transparent)]

            def next_layer(nl) -> None:
                nl.layer = stack.pop(0)(nl.context)

            def response(flow) -> None:  # what passthrough.WebSocketPassthrough does at a routed 101
                flow.websocket = None
                passthrough._BARE.add(flow.client_conn.id)

            async def accept(reader, writer) -> None:
                mode = mode_specs.ProxyMode.parse(f"reverse:http://127.0.0.1:{port}")
                hooks = {"next_layer": next_layer, "response": response}
                handler = SimpleConnectionHandler(reader, writer, tctx.options, mode, hooks)
                ps.connections[handler.client.id] = handler
                handlers.append(handler)
                await handler.handle_client()

            server = await asyncio.start_server(accept, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            try:
                writer.write(UPGRADE)
                assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == SWITCHED
                assert await asyncio.wait_for(reader.readexactly(len(GREETING)), 5) == GREETING
                yield Rig(handlers[0], reader, writer, eof, reads)
            finally:
                writer.close()
                server.close()
                await ended(handlers[0])
                passthrough._BARE.discard(handlers[0].client.id)


async def ended(handler: SimpleConnectionHandler) -> None:
    """The client gone, mitmproxy's handler closes both sockets and ends its tasks (none is left)."""
    for _ in range(50):
        if not handler.transports:
            await asyncio.sleep(0.05)  # (handle_client returns after its last hook)
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still open: {handler.transports}")


def protocols(rig: Rig) -> list:
    return [io.writer.transport.get_protocol() for io in rig.handler.transports.values()]


async def echoed(rig: Rig, size: int) -> bytes:
    data = bytes(range(256)) * (size // 256)
    rig.writer.write(data)
    back = await asyncio.wait_for(rig.reader.readexactly(len(data)), 10)
    assert back == data
    return back


async def test_after_the_101_the_sockets_are_spliced_and_bytes_pass_in_order():
    async with proxied() as rig:
        await echoed(rig, 256)
        assert [type(p) for p in protocols(rig)] == [splice.Splice, splice.Splice]
        before = rig.handler.timeout_watchdog.last_activity
        await echoed(rig, 4 * MIB)
        assert rig.handler.timeout_watchdog.last_activity > before  # reads are activity, as mitmproxy's were


async def test_a_clients_end_goes_through_mitmproxy_and_everything_ends():
    """mitmproxy closes an upgraded connection's upstream at its client's end of stream (it makes no
    half-close of an HTTP upgrade), and then the client's side."""
    async with proxied() as rig:
        await echoed(rig, 1024)
        rig.writer.write_eof()
        await asyncio.wait_for(rig.upstream_eof.wait(), 5)
        assert await asyncio.wait_for(rig.reader.read(), 5) == b""
        await asyncio.sleep(0.2)
        assert rig.handler.transports == {}  # both read tasks ended, both sockets closed


async def test_mitmproxy_closing_the_client_closes_both_sides():
    """As deadlines.close_client and mitmproxy's idle timeout do: cancel the client's handler task."""
    async with proxied() as rig:
        await echoed(rig, 1024)
        rig.handler.close_connection(rig.handler.client)
        await asyncio.wait_for(rig.upstream_eof.wait(), 5)
        assert await asyncio.wait_for(rig.reader.read(), 5) == b""
        await asyncio.sleep(0.2)
        assert rig.handler.transports == {}


async def test_a_peer_that_does_not_read_pauses_the_other_instead_of_filling_memory():
    async with proxied() as rig:
        await echoed(rig, 1024)
        rig.upstream_reads.clear()
        chunk = b"\0" * MIB
        for _ in range(64):  # far more than the sockets' and transports' buffers hold
            rig.writer.write(chunk)
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        held = sum(p.transport.get_write_buffer_size() for p in protocols(rig))
        assert held < 4 * MIB
        assert any(p.held for p in protocols(rig))
        rig.upstream_reads.set()
        for _ in range(64):
            assert await asyncio.wait_for(rig.reader.readexactly(MIB), 10) == chunk


async def test_a_client_that_does_not_read_pauses_the_instance_instead_of_filling_memory():
    """The instance echoes everything into a client that reads nothing: the proxy holds at most its
    write buffers, and everything arrives once the client reads."""
    async with proxied() as rig:
        await echoed(rig, 1024)
        chunk = b"\1" * MIB
        for _ in range(64):
            rig.writer.write(chunk)
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        held = sum(p.transport.get_write_buffer_size() for p in protocols(rig))
        held += sum(len(io.reader._buffer) for io in rig.handler.transports.values())
        assert held < 4 * MIB
        for _ in range(64):
            assert await asyncio.wait_for(rig.reader.readexactly(MIB), 10) == chunk


async def test_bytes_sent_before_the_101_reach_the_instance_first(monkeypatch):
    """A client that does not wait for the 101: what it sent behind its upgrade goes to the
    instance after the 101, before what it sends later (the rig's instance echoes both back)."""
    monkeypatch.setattr(sys.modules[__name__], "UPGRADE", UPGRADE + b"early ")
    async with proxied() as rig:
        rig.writer.write(b"late")
        assert await asyncio.wait_for(rig.reader.readexactly(10), 5) == b"early late"


class FakeTransport:
    """What a Splice asks of its socket's transport."""

    def __init__(self, protocol=None):
        self.protocol = protocol
        self.reading, self.closing = True, False
        self.sent: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None  # (held, as mitmproxy holds its streams)

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def get_protocol(self):
        return self.protocol

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol


def spliced_pair(paused: tuple[bool, bool] = (False, False)) -> tuple[splice.Splice, splice.Splice]:
    """A client's and an upstream's sockets (fake transports, real streams) spliced by splice.splice."""
    client, upstream = tflow.tclient_conn(), tflow.tserver_conn()
    upstream.state = ConnectionState.OPEN
    transports = {}
    for conn, full in zip((client, upstream), paused, strict=True):
        reader = asyncio.StreamReader()
        own = asyncio.StreamReaderProtocol(reader)
        own._paused = full  # its write buffer over asyncio's high-water mark
        transport = FakeTransport(own)
        writer = transport.writer = asyncio.StreamWriter(transport, own, reader, asyncio.get_running_loop())
        transports[conn] = ConnectionIO(handler=None, reader=reader, writer=writer)
    watchdog = types.SimpleNamespace(register_activity=list)
    handler = types.SimpleNamespace(transports=transports, timeout_watchdog=watchdog)
    assert splice.splice(handler, client, upstream)
    ends = [io.writer.transport.protocol for io in transports.values()]
    return ends[0], ends[1]


async def test_a_full_write_buffer_pauses_reading_the_other_side_until_it_drains():
    client, upstream = spliced_pair()
    upstream.pause_writing()  # the instance does not read: the browser's socket is not read either
    assert not client.transport.reading and upstream.transport.reading
    upstream.resume_writing()
    assert client.transport.reading
    upstream.pause_writing()
    upstream.connection_lost(None)  # the instance is gone: the browser's side is read to its end
    assert client.transport.reading


async def test_a_side_paused_by_another_is_not_resumed_by_the_splice():
    client, upstream = spliced_pair()
    client.transport.pause_reading()  # (as heads.pause_socket does)
    upstream.pause_writing()
    upstream.resume_writing()
    assert not client.transport.reading


async def test_a_write_buffer_full_before_the_splice_pauses_the_other_side_at_once():
    client, upstream = spliced_pair(paused=(True, False))
    assert not upstream.transport.reading and client.transport.reading


async def test_bytes_mitmproxy_has_not_read_yet_go_first():
    client, upstream = spliced_pair()
    client.reader.feed_data(b"unread ")  # came before the splice: mitmproxy's read task has it next
    client.data_received(b"new")
    assert upstream.transport.sent == [] and await client.reader.read(100) == b"unread new"
    client.data_received(b"direct")
    assert upstream.transport.sent == [b"direct"]
    upstream.transport.closing = True
    client.data_received(b"dropped")  # (as mitmproxy drops what a closing connection would get)
    assert upstream.transport.sent == [b"direct"]
