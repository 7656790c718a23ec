"""datalab_websocket=passthrough (passthrough.py), end to end: the lean entry's default, and
mitmdump's when asked. A kernel's channel works through it; the handshake's Origin check stays; an
open passthrough outlives the header deadline and closes when its instance ends; the proxy's memory
stays flat over a long transfer (its TCP history is trimmed). Messages are not parsed: a message
over datalab_max_ws_message passes, which the parse mode would close with 1009
(test_websocket_bound.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import websockets.exceptions

from e2e.helpers import ws_refusal
from e2e.proxy import Browser
from e2e.proxy import Proxy
from e2e.proxy import run_code

MIB = 1024 * 1024
LIMIT = 64 * 1024  # datalab_max_ws_message here: every big message below passes it
HEADER_TIMEOUT = 2  # seconds: an open passthrough must outlive it
SENT = 96 * MIB  # what the memory test sends through one passthrough
CLOSE_WAIT = 30.0  # seconds a client waits for an ended instance's WebSocket to close


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
