"""Bounded clients, the parts that need no proxy: the upload sink's deadline and its count of bodies
arriving (a real sink on loopback), the api's refusal at that bound, and the request-head deadline's
bookkeeping (with a recording `close`). End to end: tests/e2e/test_bounds.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from config import Settings
from deadlines import HeaderDeadline
from helpers import runtime_for
from helpers import start_flow
from helpers import through_api
from marks import CUT
from marks import DEFERRED
from marks import SINK
from marks import START
from runtime import Runtime
from upload import DEADLINE
from upload import RECEIVED
from upload import UNREAD
from upload import VERDICT
from upload import UploadSink


def holding(s: Settings) -> Runtime:
    """A runtime (not ready: no parts) holding these settings, as the addons read them."""
    rt = Runtime()
    rt.settings = s
    return rt


def settings(**changes) -> Settings:
    return Settings(sign_key="k", **changes)


async def to_sink(sink: UploadSink, head: bytes, body: bytes = b"") -> tuple[bytes, float]:
    """What the sink answers a request (as mitmproxy would send it), read to the sink's close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
    began = time.monotonic()
    writer.write(head + body)
    answer = await asyncio.wait_for(reader.read(), 10)  # to EOF: the sink closes after answering
    writer.close()
    return answer, time.monotonic() - began


def sink_head(length: int, deadline: float | None = None, unread: bool = False) -> bytes:
    extra = f"{DEADLINE}: {deadline:.3f}\r\n" if deadline is not None else ""
    extra += f"{UNREAD}: 1\r\n" if unread else ""
    return f"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


async def test_the_sink_cuts_a_body_that_does_not_arrive_by_its_deadline(sink):
    answer, _ = await to_sink(sink, sink_head(100, deadline=time.time() + 0.2), b"x" * 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert f"{VERDICT.lower()}: timeout".encode() in head.lower() and f"{RECEIVED.lower()}: 10".encode() in head.lower()
    assert json.loads(body)["code"] == "UPLOAD_TIMEOUT"  # its own answer is already the right one


async def test_no_deadline_is_later_than_the_sinks_own():
    sink = UploadSink(holding(settings(upload_timeout=1)))
    await sink.running()
    try:
        answer, _ = await to_sink(sink, sink_head(100, deadline=time.time() + 3600), b"x")
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        await sink.done()


async def test_the_sink_drains_a_whole_body_and_says_how_much(sink):
    answer, _ = await to_sink(sink, sink_head(5, deadline=time.time() + 30), b"12345")
    assert answer.startswith(b"HTTP/1.1 500 ") and b"drained" in answer and f"{RECEIVED}: 5".encode() in answer


async def test_told_so_the_sink_answers_without_reading_the_body(sink):
    answer, _ = await to_sink(sink, sink_head(10_000_000, deadline=time.time() + 30, unread=True), b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 500 ") and b"unread" in answer


def refused_flow(content: bytes = b"x" * 100):
    flow = start_flow(sign="0" * 64, content=content)
    flow.response = tutils.tresp(status_code=403)
    return flow


async def test_bodies_arriving_are_counted_until_their_answer_error_or_client_leaves(sink):
    sink.runtime.settings = settings(uploads_at_once=2)
    first, second = start_flow(), start_flow()
    sink.take(first, limit=10)
    sink.take(second, limit=10)
    assert sink.arriving == 2 and sink.full
    first.response = tutils.tresp(status_code=500)
    sink.response(first)
    assert sink.arriving == 1 and not sink.full
    sink.error(second)
    assert sink.arriving == 0
    third = start_flow()
    sink.take(third, limit=10)
    sink.client_disconnected(third.client_conn)
    assert sink.arriving == 0


async def test_the_client_cannot_give_the_sink_its_instructions(sink):
    flow = start_flow(headers={DEADLINE: str(time.time() + 10**9), UNREAD: "1"})
    sink.take(flow, limit=10)
    assert flow.request.headers.get_all(UNREAD) == ["0"]
    assert float(flow.request.headers[DEADLINE]) <= time.time() + sink.settings.upload_timeout + 1


def sink_answered(sink: UploadSink, flow, body_ended: bool) -> None:
    """The sink's answer to an unread body, given before or after the body ended."""
    if not body_ended:
        flow.request.timestamp_end = None
    flow.response = tutils.tresp(status_code=500)
    flow.response.headers[VERDICT] = "unread"
    sink.response(flow)


async def test_a_refusal_is_given_at_once_and_holds_no_place(sink):
    """However few bodies are arriving, a refused one goes to the sink unread: refused (unsigned)
    clients hold none of the places signed starts need."""
    sink.runtime.settings = settings(uploads_at_once=1)
    flows = [refused_flow() for _ in range(3)]
    for flow in flows:
        sink.refuse(flow)
        assert flow.response is None and flow.metadata[SINK] and flow.request.headers[UNREAD] == "1"
    assert sink.arriving == 0 and not sink.full
    sink_answered(sink, flows[0], body_ended=False)
    assert flows[0].response.status_code == 403 and flows[0].response.headers["Connection"] == "close"
    sink_answered(sink, flows[1], body_ended=True)  # it came whole: its connection may go on
    assert flows[1].response.status_code == 403 and "Connection" not in flows[1].response.headers


@pytest.mark.parametrize("content", [b"x" * 100, b""])
async def test_a_refusal_goes_out_with_no_100_continue_first(sink, content):
    """mitmproxy answers Expect: 100-continue after the requestheaders hook: a refusal takes it away."""
    flow = refused_flow(content)
    flow.request.headers["Expect"] = "100-continue"
    sink.refuse(flow)
    assert "Expect" not in flow.request.headers


async def test_beyond_the_bound_a_start_is_refused_before_its_signature_is_spent(sink):
    sink.runtime.settings = settings(uploads_at_once=1)
    sink.take(start_flow(), limit=10)
    # Redis is not there (runtime_for's default URL): spending the signature would be a 503 REDIS_UNAVAILABLE
    flow = await through_api(start_flow(content=b"a,b\n"), sink, runtime_for(uploads_at_once=1))
    body = json.loads(flow.response.content)
    assert (flow.response.status_code, body["code"]) == (503, "CAPACITY")
    assert flow.response.headers["Retry-After"] == "5"
    assert START not in flow.metadata


@pytest.mark.parametrize("deferred", [False, True])
async def test_a_cut_body_is_answered_408_and_starts_nothing(sink, deferred):
    flow = refused_flow() if deferred else start_flow()
    if deferred:
        sink.refuse(flow)
    else:
        flow.metadata[START] = "data.csv"
        sink.take(flow, limit=10)
    flow.response = tutils.tresp(status_code=408)
    flow.response.headers[VERDICT] = "timeout"
    sink.response(flow)
    assert flow.metadata[CUT] and DEFERRED not in flow.metadata and sink.arriving == 0
    assert flow.response.status_code == 408 and json.loads(flow.response.content)["code"] == "UPLOAD_TIMEOUT"
    assert flow.response.headers["Connection"] == "close"


async def test_the_api_starts_nothing_for_a_cut_body(sink):
    from api import Api

    flow = start_flow()
    flow.metadata.update({START: "data.csv", SINK: True, CUT: True})
    flow.response = tutils.tresp(status_code=408)
    api = Api(runtime_for(), sink)  # Redis is not there: a start would answer 503
    with taddons.context(api):
        await api.response(flow)
    assert flow.response.status_code == 408


class Closes:
    def __init__(self):
        self.calls: list[tuple[str, bytes | None]] = []

    def __call__(self, client, answer):
        self.calls.append((client.id, answer))


def plain_client():
    client = tflow.tclient_conn()
    client.tls, client.alpn = False, None
    return client


def deadline_for(timeout: float = 0.05) -> tuple[HeaderDeadline, Closes]:
    closes = Closes()
    return HeaderDeadline(holding(settings(header_timeout=timeout)), closes), closes


async def test_a_connection_without_a_request_head_is_answered_and_closed():
    deadline, closes = deadline_for()
    client = plain_client()
    deadline.client_connected(client)
    await asyncio.sleep(0.15)
    assert len(closes.calls) == 1 and closes.calls[0][0] == client.id
    assert closes.calls[0][1].startswith(b"HTTP/1.1 408 ") and b"HEADER_TIMEOUT" in closes.calls[0][1]


async def test_over_tls_the_connection_is_closed_without_a_word():
    deadline, closes = deadline_for()
    client = plain_client()
    client.tls = True
    deadline.client_connected(client)
    await asyncio.sleep(0.15)
    assert closes.calls == [(client.id, None)]


async def test_a_request_in_flight_is_not_cut_and_an_idle_kept_alive_connection_is():
    deadline, closes = deadline_for()
    flow = tflow.tflow()
    flow.client_conn = plain_client()
    deadline.client_connected(flow.client_conn)
    deadline.requestheaders(flow)
    await asyncio.sleep(0.15)
    assert closes.calls == [], "a request in flight"
    deadline.after.response(flow)
    await asyncio.sleep(0.15)
    assert closes.calls == [(flow.client_conn.id, None)], "idle after an answer: closed without one"


async def test_a_websocket_is_in_flight_until_it_ends():
    deadline, closes = deadline_for()
    flow = tflow.twebsocketflow()
    deadline.client_connected(flow.client_conn)
    deadline.requestheaders(flow)
    deadline.after.response(flow)  # the 101
    await asyncio.sleep(0.15)
    assert closes.calls == []
    deadline.after.websocket_end(flow)
    await asyncio.sleep(0.15)
    assert len(closes.calls) == 1


async def test_a_connection_that_left_is_forgotten():
    deadline, closes = deadline_for()
    client = plain_client()
    deadline.client_connected(client)
    deadline.client_disconnected(client)
    await asyncio.sleep(0.15)
    assert closes.calls == [] and not deadline._watched
