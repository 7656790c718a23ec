"""Start progress (progress.py): a start's phases told as they happen, the sink's event-stream answer,
and a reader that goes away stopping the start behind it."""

import asyncio
import json

import pytest
from mitmproxy.test import taddons
from mitmproxy.test import tutils

import progress
from api import Api
from fake_backend import SlowBackend
from helpers import run_headers
from helpers import runtime_for
from helpers import start_flow
from instances import Order
from marks import PROGRESS
from marks import STREAMED
from upload import RECEIVED

DATA = b"a,b\n1,2\n"


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        ("text/event-stream", True),
        ("application/json, text/event-stream;q=0.5", True),
        ("TEXT/Event-Stream", True),
        ("*/*", False),
        ("", False),
        ("text/event-streams", False),
    ],
)
def test_who_wants_progress(accept, wanted):
    assert progress.wants_progress(accept) is wanted


def test_an_event_is_one_named_json_line():
    assert progress.frame("queued", {"position": 2}) == b'event: queued\ndata: {"position": 2}\n\n'
    assert b"\n" not in progress.frame("error", {"message": "two\nlines"})[:-2].split(b"data: ")[1]


async def test_a_start_tells_its_phases_and_its_place_in_line(make_instances):
    gate = asyncio.Event()
    inst = make_instances(SlowBackend(gate=gate), boots_at_once=1, pool_size=0)
    told: list[list] = [[], []]
    first = asyncio.create_task(inst.start(Order("a.csv"), DATA, lambda phase, **d: told[0].append((phase, d))))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(inst.start(Order("b.csv"), DATA, lambda phase, **d: told[1].append((phase, d))))
    await asyncio.sleep(0.1)
    assert told == [[("booting", {})], [("queued", {"position": 1})]]  # one boot slot: the second waits
    gate.set()
    await asyncio.gather(first, second)
    assert told[0] == [("booting", {}), ("uploading", {})]
    assert told[1] == [("queued", {"position": 1}), ("booting", {}), ("uploading", {})]


async def sink_stream(sink, token: str, body: bytes = DATA) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
    head = f"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n{progress.PROGRESS_HEADER}: {token}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def test_the_sink_answers_a_progress_channel_as_an_event_stream(sink):
    token = sink.progress.open()
    channel = sink.progress.get(token)
    reader, writer = await sink_stream(sink, token)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head and b"chunked" in head
    assert f"{RECEIVED}: {len(DATA)}".encode() in head
    channel.put("booting")
    channel.put("ready", nonce="n", work="w")
    channel.close()
    rest = await asyncio.wait_for(reader.read(), 5)
    assert b"event: booting\ndata: {}\n\n" in rest and b'data: {"nonce": "n", "work": "w"}' in rest
    assert rest.endswith(b"0\r\n\r\n")  # the stream's end
    writer.close()


async def test_a_reader_that_goes_away_stops_the_start_behind_the_stream(sink):
    token = sink.progress.open()
    channel = sink.progress.get(token)
    channel.task = asyncio.create_task(asyncio.sleep(60))  # a start in progress
    reader, writer = await sink_stream(sink, token)
    await reader.readuntil(b"\r\n\r\n")
    writer.close()  # the proxy hangs up: its client went away
    await asyncio.sleep(0.1)
    channel.put("booting")  # the next event finds nobody reading
    await asyncio.wait_for(asyncio.gather(channel.task, return_exceptions=True), 5)
    assert channel.task.cancelled()


async def test_a_start_streamed_through_the_api_ends_ready_with_its_nonce(sink, redis_url):
    rt = runtime_for(redis_url=redis_url, pool_size=0)
    flow = await run_headers(start_flow(headers={"Accept": "text/event-stream"}, content=DATA), sink, rt)
    token = flow.metadata[PROGRESS]
    assert flow.request.headers[progress.PROGRESS_HEADER] == token  # the sink is told which channel
    channel = sink.progress.get(token)
    flow.request.stream(DATA)  # the body, as mitmproxy passes it on
    flow.response = tutils.tresp(status_code=200, content=b"")
    flow.response.headers.update({"Content-Type": progress.EVENT_STREAM, RECEIVED: str(len(DATA))})
    api = Api(rt, sink)
    with taddons.context(api):
        api.responseheaders(flow)
        assert flow.metadata[STREAMED] and flow.response.stream and RECEIVED not in flow.response.headers
        events = [chunk async for chunk in channel.frames()]
    names = [e.split(b"\n")[0].removeprefix(b"event: ").decode() for e in events]
    assert names == ["booting", "uploading", "ready"]
    ready = json.loads(events[-1].split(b"data: ")[1])
    assert await rt.instances.by_nonce(ready["nonce"]) is not None
    await api.response(flow)  # the stream's end: nothing is started again
    assert len(rt.instances.backend.starts) == 1
    await rt.instances.backend.close()
    await rt.done()


async def test_a_start_whose_body_came_cut_tells_the_error(sink, redis_url):
    rt = runtime_for(redis_url=redis_url, pool_size=0)
    flow = await run_headers(start_flow(headers={"Accept": "text/event-stream"}, content=DATA), sink, rt)
    channel = sink.progress.get(flow.metadata[PROGRESS])
    flow.request.stream(DATA)
    flow.response = tutils.tresp(status_code=200, content=b"")
    flow.response.headers.update({"Content-Type": progress.EVENT_STREAM, RECEIVED: "3"})  # the sink read less
    api = Api(rt, sink)
    with taddons.context(api):
        api.responseheaders(flow)
        events = [chunk async for chunk in channel.frames()]
    assert len(events) == 1 and events[0].startswith(b"event: error\n")
    assert json.loads(events[0].split(b"data: ")[1])["code"] == "BAD_REQUEST"
    assert rt.instances.backend.starts == []
    await rt.done()
