"""datalab_websocket=passthrough (passthrough.py), end to end: the lean entry's default, and
mitmdump's when asked. A kernel's channel works through it; the handshake's Origin check stays; an
open passthrough outlives the header deadline and closes when its instance ends; the proxy's memory
stays flat over a long transfer (its TCP history is trimmed). Messages are not parsed: a message
over datalab_max_ws_message passes, which the parse mode would close with 1009
(test_websocket_bound.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import websockets.exceptions
import websockets.sync.client

from e2e.helpers import ws_refusal
from e2e.proxy import Browser
from e2e.proxy import Proxy
from e2e.proxy import execute_request
from e2e.proxy import run_code

MIB = 1024 * 1024
LIMIT = 64 * 1024  # datalab_max_ws_message here: every big message below passes it
HEADER_TIMEOUT = 2  # seconds: an open passthrough must outlive it
SENT = 96 * MIB  # what the memory test sends through one passthrough
CLOSE_WAIT = 30.0  # seconds a client waits for an ended instance's WebSocket to close
CONNECTIONS = 200  # spliced at once, then dropped mid-transfer
FLOODED = 256 * MIB  # what a terminal prints to a client that reads nothing
EARLY = 256 * 1024  # bytes of a frame a client sends before its 101 (more than datalab_max_head)


@dataclass
class Kernel:
    proxy: Proxy
    browser: Browser
    nonce: str
    id: str


# The lean entry with its defaults (passthrough unasked); mitmdump told to pass through.
ENTRIES = {"lean": {}, "mitmdump": {"datalab_websocket": "passthrough"}}


@pytest.fixture(scope="module", params=list(ENTRIES))
def kernel(request, redis_server, world, sign_key, tmp_path_factory) -> Iterator[Kernel]:
    options = {
        "datalab_pool_size": 0,
        "datalab_max_ws_message": LIMIT,
        "datalab_header_timeout": HEADER_TIMEOUT,
        **ENTRIES[request.param],
    }
    workdir = tmp_path_factory.mktemp("proxy")
    proxy = Proxy(redis_server.url, world.prefix, sign_key, workdir, options, tool=request.param).start()
    try:
        nonce = proxy.start_instance("data.csv", b"x,y\n1,2\n")
        browser = Browser(proxy)
        browser.view(nonce)
        yield Kernel(proxy, browser, nonce, browser.start_kernel())
        proxy.stop_instance(nonce)
    finally:
        proxy.stop()


def rss(proxy: Proxy) -> int:
    for line in open(f"/proc/{proxy.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_kernel_channel_works_unparsed(kernel):
    """Code runs, both ways past datalab_max_ws_message: the messages were not parsed."""
    big = "x" * (4 * LIMIT)
    with kernel.browser.kernel_channels(kernel.id) as ws:
        ws.protocol.max_size = None  # as a browser
        assert run_code(ws, "print(6 * 7)").strip() == "42"
        assert run_code(ws, f"s = '{big}'; print(len(s))").strip() == str(len(big))
        assert run_code(ws, f"print('y' * {4 * LIMIT})").strip() == "y" * (4 * LIMIT)


def test_a_bad_origin_is_still_refused_at_the_handshake(kernel):
    url = f"ws://127.0.0.1:{kernel.proxy.port}/api/kernels/{kernel.id}/channels"
    for origin in ("http://evil.example", "null"):
        status, body = ws_refusal(url, kernel.browser.cookie_header(), origin)
        assert status == 403 and b'"BAD_ORIGIN"' in body


def test_an_open_passthrough_outlives_the_header_deadline(kernel):
    with kernel.browser.kernel_channels(kernel.id) as ws:
        time.sleep(2.5 * HEADER_TIMEOUT)  # no byte either way
        assert run_code(ws, "print('still here')").strip() == "still here"


def test_memory_stays_flat_over_a_long_transfer(kernel):
    """SENT bytes to the kernel over one passthrough (1 MiB code cells, which the kernel sends
    back): the proxy keeps only the newest reads of the TCP flow."""
    cell = "pass  # " + "x" * MIB
    with kernel.browser.kernel_channels(kernel.id) as ws:
        ws.protocol.max_size = None  # the kernel sends each cell back (execute_input)
        run_code(ws, cell)
        before = rss(kernel.proxy)
        for _ in range(SENT // MIB):
            run_code(ws, cell)
        grown = rss(kernel.proxy) - before
    assert grown < SENT // 4, f"the proxy grew by {grown} bytes over {SENT} bytes passed through"


def descriptors(proxy: Proxy) -> int:
    return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


def upgrade_request(kernel: Kernel, path: str) -> bytes:
    """A WebSocket upgrade request of the kernel's page, as raw bytes."""
    host = f"127.0.0.1:{kernel.proxy.port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}\r\n"
        f"Cookie: {kernel.browser.cookie_header()}\r\n\r\n"
    ).encode()


async def spliced_then_dropped(kernel: Kernel, abort: bool) -> bool:
    """A WebSocket (Jupyter's event bus) upgraded through the proxy; a frame of 16 MiB begun and
    left mid-way; the socket then closed, or reset (SO_LINGER 0). Whether the upgrade was answered 101."""
    reader, writer = await asyncio.open_connection("127.0.0.1", kernel.proxy.port)
    writer.write(upgrade_request(kernel, "/api/events/subscribe"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    writer.write(b"\x82\xff" + (16 * MIB).to_bytes(8, "big") + b"mask" + b"\0" * (256 * 1024))
    await writer.drain()
    if abort:
        reset = struct.pack("ii", 1, 0)
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    writer.close()
    return head.startswith(b"HTTP/1.1 101")


def test_hundreds_of_spliced_connections_dropped_mid_transfer_leave_no_descriptor(kernel):
    """CONNECTIONS upgrades at once, each left mid-frame (half closed, half reset): every one was
    passed through, and the proxy's descriptors come back to what they were."""

    async def all_at_once() -> list[bool]:
        return await asyncio.gather(*(spliced_then_dropped(kernel, abort=i % 2 == 0) for i in range(CONNECTIONS)))

    asyncio.run(spliced_then_dropped(kernel, abort=False))  # (the proxy's first upgrade opens what it keeps)
    time.sleep(1)
    before = descriptors(kernel.proxy)
    assert all(asyncio.run(all_at_once()))
    deadline = time.monotonic() + CLOSE_WAIT
    while descriptors(kernel.proxy) > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert descriptors(kernel.proxy) <= before, f"{descriptors(kernel.proxy) - before} descriptors left open"


def test_a_client_that_does_not_read_while_its_instance_floods_holds_no_memory_in_the_proxy(kernel):
    """A terminal prints FLOODED bytes (a kernel's output would be rate-limited by Jupyter) while
    the browser reads nothing: the proxy stops reading the instance once its write buffer to the
    browser is full, instead of holding the flood."""
    browser = kernel.browser
    same_site = {"X-XSRFToken": browser.http.cookies.get("_xsrf", ""), "Origin": kernel.proxy.base}
    name = browser.post("/api/terminals", headers=same_site).json()["name"]
    url = f"ws://127.0.0.1:{kernel.proxy.port}/terminals/websocket/{name}"
    try:
        with websockets.sync.client.connect(
            url, additional_headers={"Cookie": browser.cookie_header()}, origin=kernel.proxy.base, max_size=None
        ) as ws:
            before = rss(kernel.proxy)
            ws.send(json.dumps(["stdin", f"head -c {FLOODED} /dev/zero | tr '\\0' x; echo\r"]))
            grown = 0
            for _ in range(10):  # nothing read for 10 s
                time.sleep(1)
                grown = max(grown, rss(kernel.proxy) - before)
            read = 0
            while read < 32 * MIB:  # (the flood was under way)
                read += len(ws.recv(timeout=30))
    finally:
        browser.http.delete(kernel.proxy.url(f"/api/terminals/{name}"), headers=same_site)
    assert grown < FLOODED // 8, f"the proxy grew by {grown} bytes while its client read nothing"


def masked(message: dict) -> bytes:
    """A client's WebSocket text frame (a zero mask: the payload as it is)."""
    payload = json.dumps(message).encode()
    length = (
        bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
    )
    return b"\x81" + length + b"\0\0\0\0" + payload


def stdout_of(stream, msg_id: str) -> str:
    """Read the instance's frames (unmasked) until the request `msg_id` is idle; its stdout."""
    out = []
    while True:
        first, second = stream.read(2)
        length = second & 0x7F
        if length >= 126:
            length = int.from_bytes(stream.read(2 if length == 126 else 8), "big")
        payload = stream.read(length)
        if first & 0x0F != 1:
            continue  # (pings)
        msg = json.loads(payload)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["header"]["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def test_frames_sent_before_the_101_reach_the_kernel_and_the_channel_goes_on(kernel):
    """A client that does not wait for the 101 (EARLY bytes of frames behind its upgrade request,
    more than datalab_max_head): they reach the instance in order after the 101, and what the
    client sends later still does."""
    first = execute_request("print('first')  # " + "x" * EARLY)
    second = execute_request("print('second')")
    with socket.create_connection(("127.0.0.1", kernel.proxy.port), timeout=60) as sock:
        path = f"/api/kernels/{kernel.id}/channels?session_id={uuid.uuid4().hex}"
        sock.sendall(upgrade_request(kernel, path) + masked(first))
        stream = sock.makefile("rb")
        head = b"".join(iter(stream.readline, b"\r\n"))
        assert head.startswith(b"HTTP/1.1 101"), head
        assert stdout_of(stream, first["header"]["msg_id"]).strip() == "first"
        sock.sendall(masked(second))
        assert stdout_of(stream, second["header"]["msg_id"]).strip() == "second"


def test_an_ended_instances_passthrough_is_closed(kernel):
    """Last (the instance ends): its WebSocket closes, as a parsed one does."""
    with kernel.browser.kernel_channels(kernel.id) as ws:
        assert run_code(ws, "print(1)").strip() == "1"
        r = kernel.proxy.stop_instance(kernel.nonce)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + CLOSE_WAIT
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            while time.monotonic() < deadline:
                try:
                    ws.recv(timeout=1)
                except TimeoutError:
                    continue
            raise AssertionError(f"the WebSocket was still open {CLOSE_WAIT} s after its instance ended")
