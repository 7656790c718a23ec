"""A WebSocket message is held up to datalab_max_ws_message, either way: past it the proxy closes
the WebSocket with 1009 and lets go of what it held, with datalab_websocket=parse (a passthrough
parses no message: passthrough.py). End to end on a real proxy (mitmdump, the lean entry and
mitmweb, each told to parse: a parse mode that bypassed the bound would fail here), a real instance
and kernel, and the websockets client; memory is the proxy's VmRSS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import websockets.exceptions
from websockets.protocol import State

from e2e.proxy import Browser
from e2e.proxy import Proxy
from e2e.proxy import run_code

MIB = 1024 * 1024
LIMIT = 1 * MIB  # the proxies' datalab_max_ws_message here
SENT = 8 * MIB  # what a client sends of one message that passes it
CHUNK = 64 * 1024
CLOSE_WAIT = 15.0  # seconds a client waits for the proxy's close


@dataclass
class Kernel:
    proxy: Proxy
    browser: Browser
    id: str


def open_kernel(tool: str, limit: int, redis_server, world, sign_key, tmp_path_factory) -> Iterator[Kernel]:
    """A proxy (`tool`) with datalab_max_ws_message=`limit`, an instance behind it and a kernel."""
    # The bound holds where messages are parsed (the lean entry's default passthrough reads none).
    options = {"datalab_pool_size": 0, "datalab_max_ws_message": limit, "datalab_websocket": "parse"}
    workdir = tmp_path_factory.mktemp("proxy")
    proxy = Proxy(redis_server.url, world.prefix, sign_key, workdir, options, tool=tool).start()
    try:
        nonce = proxy.start_instance("data.csv", b"x,y\n1,2\n")
        browser = Browser(proxy)
        browser.view(nonce)
        yield Kernel(proxy, browser, browser.start_kernel())
        proxy.stop_instance(nonce)
    finally:
        proxy.stop()


@pytest.fixture(scope="module", params=["mitmdump", "lean", "mitmweb"])
def kernel(request, redis_server, world, sign_key, tmp_path_factory) -> Iterator[Kernel]:
    yield from open_kernel(request.param, LIMIT, redis_server, world, sign_key, tmp_path_factory)


def rss(proxy: Proxy) -> int:
    """The proxy process's resident memory, in bytes."""
    for line in open(f"/proc/{proxy.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def close_code(closed: websockets.exceptions.ConnectionClosed) -> int | None:
    """The code of the close frame the client received (None: the connection just ended)."""
    return closed.rcvd.code if closed.rcvd is not None else None


def read_until_closed(ws) -> None:
    """Read what the kernel sends (its status messages, say) until the connection closes; fail if
    it is still open after CLOSE_WAIT."""
    deadline = time.monotonic() + CLOSE_WAIT
    while time.monotonic() < deadline:
        try:
            ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
    raise AssertionError(f"the WebSocket was still open {CLOSE_WAIT} s after the message passed the bound")


def fragments_without_end(ws) -> Iterator[bytes]:
    """SENT bytes of continuation frames; the final frame never comes: once they are out, wait
    for the proxy's close, and fail if it does not come."""
    for _ in range(SENT // CHUNK):
        yield b"\0" * CHUNK
    deadline = time.monotonic() + CLOSE_WAIT
    while ws.protocol.state is State.OPEN and time.monotonic() < deadline:
        time.sleep(0.05)
    if ws.protocol.state is State.OPEN:
        raise AssertionError(f"the proxy held {SENT} bytes of one message without closing the WebSocket")


def test_a_message_whose_final_frame_never_comes_is_closed_with_1009(kernel):
    with kernel.browser.kernel_channels(kernel.id) as ws:
        before = rss(kernel.proxy)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            ws.send(fragments_without_end(ws))
    assert close_code(closed.value) == 1009
    assert f"a message from the client passed {LIMIT} bytes" in closed.value.rcvd.reason
    grown = rss(kernel.proxy) - before
    assert grown < SENT // 2, f"the proxy grew by {grown} bytes for one message cut at {LIMIT}"
    assert "(1009): a message from the client" in kernel.proxy.log_text()


def test_one_frame_over_the_bound_is_closed_with_1009(kernel):
    with kernel.browser.kernel_channels(kernel.id) as ws:
        before = rss(kernel.proxy)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            ws.send(b"\0" * SENT)  # one binary frame
            read_until_closed(ws)
    assert close_code(closed.value) == 1009
    grown = rss(kernel.proxy) - before
    assert grown < SENT // 2, f"the proxy grew by {grown} bytes for one frame cut at {LIMIT}"


def test_a_kernel_output_over_the_bound_closes_the_browsers_websocket(kernel):
    """The other way: a kernel's message (its stdout here) past the bound never reaches the browser."""
    with kernel.browser.kernel_channels(kernel.id) as ws:
        ws.protocol.max_size = None  # as a browser: websockets' own 1 MiB limit would close it first
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            run_code(ws, f"print('x' * {2 * LIMIT})", timeout=CLOSE_WAIT)
    assert close_code(closed.value) == 1009
    assert f"a message from the instance passed {LIMIT} bytes" in closed.value.rcvd.reason
    assert "(1009): a message from the instance" in kernel.proxy.log_text()


def test_a_message_under_the_bound_reaches_the_kernel(kernel):
    """A message just under the bound still goes through, and the kernel answers (after the closes
    above, on the same kernel)."""
    text = "x" * (LIMIT - 4096)
    assert kernel.browser.execute(kernel.id, f"print(len('{text}'))") == f"{len(text)}\n"
