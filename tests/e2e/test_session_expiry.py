"""An open WebSocket ends with its session (session_expiry.py): once datalab_session_ttl runs out,
the kernel channel opened under the session is closed, spliced (the lean entry's passthrough) or
parsed (mitmdump's default), while its instance still runs; the session's HTTP is refused too."""

from __future__ import annotations

import time

import pytest
import websockets.exceptions

from e2e.proxy import Browser
from e2e.proxy import run_code

SESSION_TTL = 12  # seconds: long enough to open a kernel's channel and run a cell through it
CLOSE_WAIT = 30.0  # seconds past the session's expiry a client waits for its WebSocket to close


@pytest.mark.parametrize("tool", ["lean", "mitmdump"])
def test_an_open_websocket_closes_when_its_session_expires(make_proxy, world, tool):
    proxy = make_proxy(prefix=world.sub(f"session-expiry-{tool}"), tool=tool, datalab_session_ttl=SESSION_TTL)
    nonce = proxy.start_instance("data.csv", b"x,y\n1,2\n")
    try:
        browser = Browser(proxy)
        browser.view(nonce)
        expires = time.monotonic() + SESSION_TTL
        kernel = browser.start_kernel()
        with browser.kernel_channels(kernel) as ws:
            assert run_code(ws, "print(6 * 7)").strip() == "42"
            assert time.monotonic() < expires, "the channel opened too late to see its session expire"
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                while time.monotonic() < expires + CLOSE_WAIT:
                    try:
                        ws.recv(timeout=1)
                    except TimeoutError:
                        continue
                raise AssertionError(f"the WebSocket was still open {CLOSE_WAIT} s after its session expired")
            assert time.monotonic() >= expires - 1, "closed before its session expired"
        refused = browser.get("/api/status")
        assert refused.status_code == 403 and refused.json()["code"] == "NO_SESSION"
    finally:
        proxy.stop_instance(nonce)
