"""datalab_websocket=passthrough (passthrough.py): a routed WebSocket's 101 goes to mitmproxy's TCP
layer, whose flow carries the upgrade's marks; its history is trimmed and its connection's request
stays in flight until it ends. End to end: tests/e2e/test_passthrough.py."""

from __future__ import annotations

import asyncio
import types

import pytest
from mitmproxy import http
from mitmproxy import tcp
from mitmproxy.options import Options
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tcp as tcp_layers
from mitmproxy.test import taddons
from mitmproxy.test import tflow

import deadlines
import heads
import passthrough
from config import Settings
from deadlines import HeaderDeadline
from guards import WEBSOCKET_MESSAGES_KEPT
from guards import TrimWebSockets
from marks import PASSTHROUGH
from marks import ROUTED
from passthrough import WebSocketPassthrough
from runtime import Runtime


def holding(**changes) -> Runtime:
    rt = Runtime()
    rt.settings = Settings(sign_key="k", **changes)
    return rt


def upgrade(routed: bool = True):
    """A WebSocket flow at its 101's response hook (mitmproxy has set its `websocket`)."""
    flow = tflow.twebsocketflow()
    if routed:
        flow.metadata[ROUTED] = "i1"
    return flow


def tcp_flow_of(flow) -> tcp.TCPFlow:
    """The flow mitmproxy's TCP layer makes on the upgraded connection."""
    return tcp.TCPFlow(flow.client_conn, flow.server_conn, True)


def test_a_routed_websocket_passes_through_a_flowless_tcp_layer():
    """No TCP flow: no hook per read, no history."""
    addon = WebSocketPassthrough(holding(websocket="passthrough"))
    flow = upgrade()
    with taddons.context(addon):
        addon.response(flow)
    assert flow.websocket is None and flow.metadata[PASSTHROUGH] is True
    assert http_layers.tcp.TCPLayer(Context(flow.client_conn, Options())).flow is None
    other = tflow.tclient_conn()
    assert http_layers.tcp.TCPLayer(Context(other, Options())).flow is not None  # another raw TCP connection
    addon.client_disconnected(flow.client_conn)
    assert http_layers.tcp.TCPLayer(Context(flow.client_conn, Options())).flow is not None


@pytest.fixture
def unknown_http_layer(monkeypatch):
    """A mitmproxy whose HTTP layer passthrough.py does not know: its own TCP layer, with a flow."""
    monkeypatch.setattr(http_layers, "tcp", tcp_layers)
    monkeypatch.setattr(passthrough, "install", lambda: False)


def test_elsewhere_the_tcp_flow_carries_the_upgrades_marks(unknown_http_layer):
    addon = WebSocketPassthrough(holding(websocket="passthrough"))
    flow = upgrade()
    with taddons.context(addon):
        addon.response(flow)
        assert flow.websocket is None and flow.metadata[PASSTHROUGH] is True
        raw = tcp_flow_of(flow)
        addon.tcp_start(raw)
    assert raw.metadata == {ROUTED: "i1", PASSTHROUGH: flow.id}
    other = tcp.TCPFlow(flow.client_conn, flow.server_conn, True)
    addon.tcp_start(other)  # (only the upgrade's own TCP flow gets its marks)
    assert other.metadata == {}


def test_parse_mode_and_unrouted_websockets_are_left_to_the_websocket_layer():
    for settings, routed in (({"websocket": "parse"}, True), ({"websocket": "passthrough"}, False)):
        addon = WebSocketPassthrough(holding(**settings))
        flow = upgrade(routed)
        with taddons.context(addon):
            addon.response(flow)
        assert flow.websocket is not None and PASSTHROUGH not in flow.metadata


def test_passthrough_needs_rawtcp():
    addon = WebSocketPassthrough(holding(websocket="passthrough"))
    flow = upgrade()
    with taddons.context(addon) as tctx:
        tctx.options.rawtcp = False
        addon.response(flow)
    assert flow.websocket is not None


def test_parse_is_the_default():
    assert Settings(sign_key="k").websocket == "parse"


def test_a_passthroughs_tcp_history_stays_bounded():
    """100k reads of a long transfer: the flow keeps the newest and a few before it."""
    trim = TrimWebSockets()
    flow = tcp.TCPFlow(tflow.tclient_conn(), tflow.tserver_conn(), True)
    chunk = b"\0" * 65536
    with taddons.context(trim):
        for i in range(100_000):
            flow.messages.append(tcp.TCPMessage(i % 2 == 0, chunk))
            trim.tcp_message(flow)
            assert len(flow.messages) <= WEBSOCKET_MESSAGES_KEPT
    assert flow.messages[-1].content is chunk


class Closes:
    def __init__(self):
        self.calls: list = []

    def __call__(self, client, answer) -> None:
        self.calls.append(client.id)


async def test_a_passthrough_is_in_flight_until_its_tcp_flow_ends(unknown_http_layer):
    """The header deadline leaves an open passthrough alone (it is no idle kept-alive connection)."""
    deadline, closes, flow, addon = await passed_through()
    raw = tcp_flow_of(flow)
    addon.tcp_start(raw)
    deadline.after.tcp_end(raw)
    await asyncio.sleep(1.3)
    assert closes.calls == [flow.client_conn.id]


async def test_a_flowless_passthrough_is_in_flight_until_its_client_leaves():
    deadline, closes, flow, _ = await passed_through()
    deadline.client_disconnected(flow.client_conn)
    await asyncio.sleep(1.3)
    assert closes.calls == []


async def passed_through() -> tuple[HeaderDeadline, Closes, http.HTTPFlow, WebSocketPassthrough]:
    """A header deadline (1 s) and an upgraded flow, left open for longer: never closed."""
    closes = Closes()
    rt = holding(header_timeout=1, websocket="passthrough")
    deadline = HeaderDeadline(rt, closes)
    flow = upgrade()
    deadline.client_connected(flow.client_conn)
    deadline.requestheaders(flow)
    addon = WebSocketPassthrough(rt)
    with taddons.context(addon):
        addon.response(flow)
    deadline.after.response(flow)
    await asyncio.sleep(1.3)
    assert closes.calls == []
    return deadline, closes, flow, addon


class PausedSocket:
    """A client's transport that OneRequestAtATime paused at its request."""

    def __init__(self):
        self.reading = False

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return self.reading

    def resume_reading(self) -> None:
        self.reading = True


@pytest.mark.parametrize("status, resumed", [(101, True), (200, False)])
def test_a_101_resumes_reading_whatever_the_http1_layer_holds(monkeypatch, status, resumed):
    """Frames a client sent before its 101 (more than datalab_max_head) are no pipelined requests:
    no further answer would resume reading, and the client's side would stall for good."""
    socket = PausedSocket()
    io = types.SimpleNamespace(writer=types.SimpleNamespace(transport=socket), reader=types.SimpleNamespace())
    monkeypatch.setattr(deadlines, "client_io", lambda client: (None, io))
    monkeypatch.setattr(deadlines.heads, "backlog", lambda client: 10 * heads.limits()[0])
    flow = upgrade()
    flow.response.status_code = status
    deadlines.OneRequestAtATime().response(flow)
    assert socket.reading is resumed


def test_a_101_to_another_upgrade_is_not_passed_through():
    """Only a WebSocket's 101 (mitmproxy set the flow's `websocket`) goes flowless and spliced; a
    101 to any other upgrade (Jupyter gives none: a hostile instance) keeps mitmproxy's TCP flow,
    traced and trimmed, and its connection is no request in flight for the header deadline."""
    addon = WebSocketPassthrough(holding(websocket="passthrough"))
    flow = tflow.tflow(resp=True)
    flow.metadata[ROUTED] = "i1"
    flow.request.headers["Upgrade"] = "h2c"
    flow.response.status_code = 101
    with taddons.context(addon):
        addon.response(flow)
    assert PASSTHROUGH not in flow.metadata and flow.client_conn.id not in passthrough._BARE
    assert http_layers.tcp.TCPLayer(Context(flow.client_conn, Options())).flow is not None
