import json
import time

from mitmproxy import connection
from mitmproxy import websocket
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils
from wsproto.frame_protocol import Opcode

import router
from backends import Instance
from guards import FailClosed
from guards import TrimWebSockets
from helpers import recorded
from helpers import request_flow
from helpers import runtime_for
from marks import ROUTED
from marks import SINK
from router import RouteCache
from router import Router
from upload import UploadSink

INSTANCE = Instance("i" * 32, "docker", "c1", "127.0.0.1", 4321, "a.csv", 0.0, token="t0ken")
SESSION = "S" * 32


async def routed(flow, rt, sink=None):
    router = Router(rt, sink or UploadSink(rt))
    with taddons.context(router) as tctx:
        tctx.configure(router)
        await router.requestheaders(flow)
    return flow


def code(flow) -> str:
    return json.loads(flow.response.content)["code"]


async def test_no_cookie_is_refused():
    flow = await routed(request_flow("GET", "/api/status"), runtime_for())
    assert flow.response.status_code == 403 and code(flow) == "NO_SESSION"
    assert ROUTED not in flow.metadata


async def test_session_routes_to_its_instance_keeping_host_and_other_cookies(redis_url):
    rt = runtime_for(redis_url=redis_url)
    await recorded(rt.store, INSTANCE, "N" * 32)
    await rt.store.add_session(SESSION, INSTANCE.id, 60)
    flow = request_flow(
        "GET",
        "/api/kernels",
        {
            "Cookie": f"_xsrf=abc; datalab_session={SESSION}",
            "Authorization": "token forged",
            "X-Datalab-Auth": "forged",
        },
    )
    await routed(flow, rt)
    assert flow.response is None
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 4321)
    assert flow.request.headers["Host"] == "proxy.example:8080"
    assert flow.request.headers["X-Datalab-Auth"] == "t0ken"  # the instance's, never the client's
    assert "Authorization" not in flow.request.headers
    assert flow.request.cookies.get("_xsrf") == "abc" and "datalab_session" not in flow.request.cookies
    assert flow.metadata[ROUTED] == INSTANCE.id
    assert flow.request.stream is True  # a client's body is passed on as it comes, never held
    await rt.done()


async def test_http2_bodies_without_a_length_are_framed_for_jupyter(redis_url):
    """HTTP/2 may send a body without Content-Length; towards HTTP/1.1 Jupyter it goes chunked."""
    rt = runtime_for(redis_url=redis_url)
    await recorded(rt.store, INSTANCE, "N" * 32)
    await rt.store.add_session(SESSION, INSTANCE.id, 60)
    flows = {}
    for name, headers in (("h2", {}), ("h2-length", {"Content-Length": "3"}), ("h1", {})):
        flow = request_flow("PUT", "/api/contents/x", {"Cookie": f"datalab_session={SESSION}", **headers})
        flow.request.http_version = "HTTP/1.1" if name == "h1" else "HTTP/2.0"
        flows[name] = await routed(flow, rt)
    assert flows["h2"].request.headers["Transfer-Encoding"] == "chunked"
    assert "Transfer-Encoding" not in flows["h2-length"].request.headers
    assert "Transfer-Encoding" not in flows["h1"].request.headers  # HTTP/1 without a length has no body
    await rt.done()


async def test_only_a_persons_requests_are_activity(redis_url):
    """A tab's own polls are routed but do not keep the instance (activity.py has the whole table);
    nor do WebSocket frames, which are only counted (Jupyter records code run and terminals used)."""
    rt = runtime_for(redis_url=redis_url)
    await recorded(rt.store, INSTANCE, "N" * 32)
    await rt.store.add_session(SESSION, INSTANCE.id, 60)
    cookie = {"Cookie": f"datalab_session={SESSION}"}
    fetch = {**cookie, "Sec-Fetch-Mode": "cors"}
    for method, path, headers in (
        ("GET", "/api/kernels?1733572000000", fetch),
        ("GET", "/api/contents?content=1&hash=0&1733572000000", fetch),
        ("GET", "/api/events/subscribe", {**cookie, "Upgrade": "websocket"}),
    ):
        flow = await routed(request_flow(method, path, headers), rt)
        assert flow.metadata[ROUTED] == INSTANCE.id and rt.activity.take() == {}, path
    ws = tflow.twebsocketflow()
    ws.metadata[ROUTED] = INSTANCE.id
    Router(rt, UploadSink(rt)).websocket_message(ws)
    assert rt.activity.take() == {}
    for method, path, headers in (
        ("GET", "/lab/tree/a.ipynb", {**cookie, "Sec-Fetch-Mode": "navigate"}),
        ("GET", "/api/contents/a.ipynb?type=notebook&content=1&hash=1", fetch),
        ("PUT", "/api/contents/a.ipynb", fetch),
        ("GET", "/api/kernels/k/channels?session_id=s", {**cookie, "Upgrade": "websocket"}),
    ):
        before = time.time()
        await routed(request_flow(method, path, headers), rt)
        assert rt.activity.take()[INSTANCE.id] >= before, path
    await rt.done()


async def test_unknown_session_and_removed_instance(redis_url):
    rt = runtime_for(redis_url=redis_url, route_cache_ttl=0)
    flow = await routed(request_flow("GET", "/", {"Cookie": f"datalab_session={SESSION}"}), rt)
    assert flow.response.status_code == 403 and code(flow) == "NO_SESSION"

    await recorded(rt.store, INSTANCE, "N" * 32)
    await rt.store.add_session(SESSION, INSTANCE.id, 60)
    assert await rt.store.remove_instance(INSTANCE.id) is True
    assert await rt.store.remove_instance(INSTANCE.id) is False  # ended once
    flow = await routed(request_flow("GET", "/", {"Cookie": f"datalab_session={SESSION}"}), rt)
    assert flow.response.status_code == 410 and code(flow) == "INSTANCE_GONE"  # for the session's lifetime
    assert 0 < await rt.store.redis.ttl(f"unit:session:{SESSION}") <= 60
    # only the session stays, and the events told (a view: the stream)
    assert sorted(await rt.store.redis.keys("unit:*")) == [b"unit:lifecycle", f"unit:session:{SESSION}".encode()]
    await rt.done()


def test_route_cache_expires_and_drops_by_instance():
    cache = RouteCache(ttl=60)
    cache.put("a", INSTANCE)
    cache.put("b", INSTANCE)
    assert cache.get("a") is INSTANCE
    cache.drop_instance(INSTANCE.id)
    assert cache.get("a") is None and cache.get("b") is None
    short = RouteCache(ttl=0.01)
    short.put("a", INSTANCE)
    time.sleep(0.02)
    assert short.get("a") is None
    off = RouteCache(ttl=0)
    off.put("a", INSTANCE)
    assert off.get("a") is None


def test_route_cache_drops_only_the_ended_instances_routes_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(router, "CACHE_MAX", 3)
    other = Instance("o" * 32, "docker", "c2", "127.0.0.1", 4322, "b.csv", 0.0, token="other")
    cache = RouteCache(ttl=60)
    for sid, instance in (("a", INSTANCE), ("b", other), ("c", INSTANCE), ("d", other)):
        cache.put(sid, instance)
    assert cache.get("a") is None  # the oldest went when the fourth came
    assert [cache.get(s) for s in "bcd"] == [other, INSTANCE, other]
    cache.drop_instance(INSTANCE.id)
    assert cache.get("c") is None and cache.get("b") is other and cache.get("d") is other
    cache.put("c", INSTANCE)  # an ended instance's session cached again (it answers 410 elsewhere)
    cache.drop_instance(other.id)
    assert [cache.get(s) for s in "bcd"] == [None, INSTANCE, None]
    cache.drop_session("c")
    cache.drop_instance(INSTANCE.id)  # nothing left of it: no error
    assert all(cache.get(s) is None for s in "abcd")


def test_fail_closed_refuses_unclaimed_flows():
    rt = runtime_for()
    guard = FailClosed(rt, UploadSink(rt))
    with taddons.context(guard):
        flow = request_flow("GET", "/anything")
        guard.requestheaders(flow)
        assert flow.response.status_code == 500 and code(flow) == "NOT_ROUTED"
        ok = request_flow("GET", "/anything")
        ok.metadata[ROUTED] = "x"
        guard.requestheaders(ok)
        guard.request(ok)
        assert ok.response is None


async def test_connections_open_only_to_instances_and_the_upload_sink():
    """Whatever an addon did to a flow (a bug, an exception that skipped the other hooks), the
    connection itself goes nowhere else: not to the dead default target, not to another port."""
    rt = runtime_for()  # its backend vouches for 127.0.0.1 (a stand-in for the instance network)
    sink = UploadSink(rt)
    sink.port = 4000
    guard = FailClosed(rt, sink)

    async def refused(host: str, port: int) -> bool:
        server = connection.Server(address=(host, port))
        await guard.server_connect(ServerConnectionHookData(server=server, client=tflow.tclient_conn()))
        return server.error is not None

    with taddons.context(guard):
        assert not await refused("127.0.0.1", 4000)  # the sink
        assert not await refused("127.0.0.1", 8888)  # an instance's address
        assert await refused("10.1.2.3", 8888)  # not one the backend gives
        assert await refused("127.0.0.2", 4000)

        async def broken(host: str, port: int) -> bool:
            raise RuntimeError("the backend could not tell")

        rt.instances.backend.could_have_given = broken
        assert await refused("127.0.0.1", 8888)  # no answer is a no
        assert not await refused("127.0.0.1", 4000)


def test_websocket_history_is_bounded():
    trim = TrimWebSockets()
    flow = tflow.twebsocketflow()
    with taddons.context(trim):
        for _ in range(50):
            flow.websocket.messages.append(flow.websocket.messages[0])
            trim.websocket_message(flow)
    assert len(flow.websocket.messages) == 10


def test_websocket_history_keeps_big_messages_only_while_they_are_the_newest():
    """Ten messages of 4 MiB stay held no longer: the newest (being relayed) and 1 MiB before it."""
    trim = TrimWebSockets()
    flow = tflow.twebsocketflow()
    big = websocket.WebSocketMessage(Opcode.BINARY, True, b"\0" * (4 << 20))
    small = websocket.WebSocketMessage(Opcode.TEXT, False, b"x" * 1000)
    with taddons.context(trim):
        for message in [big, small] * 10:
            flow.websocket.messages.append(message)
            trim.websocket_message(flow)
        assert flow.websocket.messages == [small]
        flow.websocket.messages.append(big)
        trim.websocket_message(flow)
    assert flow.websocket.messages == [small, big]


def test_an_instance_cannot_set_the_session_cookie():
    rt = runtime_for()
    router = Router(rt, UploadSink(rt))
    flow = tflow.tflow(resp=True)
    flow.metadata[ROUTED] = INSTANCE.id
    flow.response.headers.set_all("Set-Cookie", ["_xsrf=1; Path=/", "datalab_session=stolen; Path=/"])
    with taddons.context(router):
        router.responseheaders(flow)
    assert flow.response.headers.get_all("Set-Cookie") == ["_xsrf=1; Path=/"]


async def test_a_refused_request_with_a_body_is_drained_before_its_answer(redis_url, sink):
    """Answered in requestheaders, mitmproxy would read the whole body into memory first: the
    refusal waits in the flow while the body streams to the upload sink, keeping nothing."""
    flow = request_flow("POST", "/api/contents/x", {"Content-Length": "1000000"})
    await routed(flow, runtime_for(redis_url=redis_url), sink)
    assert flow.response is None and flow.metadata[SINK]
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", sink.port)
    assert flow.request.stream(b"x" * 1000) == b"x" * 1000 and flow.request.stream.body() == b""
    flow.response = tutils.tresp(status_code=500)  # the sink's own answer, then ours replaces it
    sink.response(flow)
    assert flow.response.status_code == 403 and code(flow) == "NO_SESSION"


def test_an_instance_cannot_set_the_session_cookie_with_blanks_or_the_host_prefix():
    rt = runtime_for(cookie_secure=True)
    router = Router(rt, UploadSink(rt))
    flow = tflow.tflow(resp=True)
    flow.metadata[ROUTED] = INSTANCE.id
    flow.response.headers.set_all(
        "Set-Cookie", ["datalab_session =x", "__Host-datalab_session=y; Path=/; Secure", "_xsrf=1; Path=/"]
    )
    with taddons.context(router):
        router.responseheaders(flow)
    assert flow.response.headers.get_all("Set-Cookie") == ["_xsrf=1; Path=/; Secure"]  # behind HTTPS: Secure
