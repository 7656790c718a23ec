"""Lifecycle events: each written by the script that makes its change (store.py), and delivered to a
receiver through one consumer group (events.py): signed, retried, taken over from a dead consumer."""

import asyncio
import dataclasses
import json
import time

from backends import Instance
from events import GROUP
from events import EventDelivery
from events import event_body
from events import http_poster
from events import signature
from receiver import EventReceiver
from store import VIEWS_TOLD
from store import EndNote
from store import Store
from store import StreamEvent
from store import WorkRecord
from store import connect

NOW = 1_000_000.0
KEY = "k" * 32


def instance(ident: str, **changes) -> Instance:
    fields = {"claimed": NOW, "work": "W" * 32, "owner": "alice", "profile": "default", **changes}
    return Instance(ident * 32, "docker", "c-" + ident, "127.0.0.1", 1, "a.csv", NOW, token="t", **fields)


async def started(store: Store, live: Instance) -> None:
    await store.reserve(live.id, NOW, 60, max_instances=4)
    work = WorkRecord(live.work, live.id, "live", NOW)
    assert await store.bind(live, "N" * 32, 60, NOW, work, 600)


async def recorded(store: Store) -> list[dict]:
    return [dict(fields, id=ident) for ident, fields in await _stream(store)]


async def _stream(store: Store):
    entries = await store.redis.xrange(store.key("lifecycle"))
    return [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in entries]


def end_note(cause: str) -> EndNote:
    return EndNote(cause, ended_ttl=60, lease_until=NOW + 60, work_ttl=600, now=NOW + 5)


async def test_a_start_a_view_and_an_end_are_each_told_once_with_their_change(redis_url):
    store = Store(connect(redis_url), "unit:")
    live = instance("a")
    await started(store, live)
    assert await store.add_session("S" * 32, live.id, 60, NOW + 1)
    assert await store.remove_instance(live.id, end=end_note("idle"))
    assert not await store.remove_instance(live.id, end=end_note("stopped"))  # ended once: told once
    assert not await store.add_session("T" * 32, live.id, 60, NOW + 6)  # no session, no view told
    events = await recorded(store)
    assert [e["type"] for e in events] == ["start", "view", "end"]
    common = {"instance": live.id, "work": live.work, "owner": "alice", "profile": "default"}
    assert all(e.items() >= common.items() for e in events)
    assert events[0]["filename"] == "a.csv" and float(events[0]["time"]) == NOW
    assert events[2]["cause"] == "idle" and float(events[2]["time"]) == NOW + 5
    await store.close()


async def test_views_without_end_do_not_flood_the_stream(redis_url):
    """Review of issue 20: a nonce's holder may open views as fast as it asks (security.md), and each
    was a view event: 100,000 of them trimmed every event still to be delivered out of the capped
    stream while a receiver was down. Only an instance's first VIEWS_TOLD sessions are told."""
    store = Store(connect(redis_url), "unit:")
    live = instance("v")
    await started(store, live)
    for i in range(VIEWS_TOLD + 50):
        assert await store.add_session(f"S{i:031d}", live.id, 60, NOW + 1)
    assert [e["type"] for e in await recorded(store)] == ["start"] + ["view"] * VIEWS_TOLD
    await store.close()


async def test_an_end_that_does_not_happen_tells_nothing(redis_url):
    store = Store(connect(redis_url), "unit:")
    live = instance("b")
    await started(store, live)
    other = dataclasses.replace(live, filename="other.csv")
    assert not await store.remove_instance(live.id, expect=other, end=end_note("idle"))  # culling's record moved
    await store.redis.zadd(store.key("activity"), {live.id: NOW + 10})
    assert not await store.remove_instance(live.id, idle_since=NOW + 1, end=end_note("idle"))  # used since
    assert [e["type"] for e in await recorded(store)] == ["start"]
    await store.close()


async def test_an_unbound_start_tells_nothing_and_a_pool_instance_ends_untold(redis_url):
    store = Store(connect(redis_url), "unit:")
    late = instance("c")
    assert not await store.bind(late, "N" * 32, 60, NOW)  # it holds no slot (ended meanwhile)
    await store.add_to_pool(dataclasses.replace(late, claimed=0.0, work="", owner=""))
    assert await store.remove_instance(late.id)  # nobody's: no end to tell
    assert await recorded(store) == []
    await store.close()


async def test_work_saved_and_expired_are_told_once_with_their_owner(redis_url):
    store = Store(connect(redis_url), "unit:")
    live = instance("d")
    await started(store, live)
    await store.remove_instance(live.id, end=end_note("stopped"))
    saving = await store.work(live.work)
    saved = dataclasses.replace(saving, state="saved", size=3)
    assert await store.move_work("saving", saved, 600, "work_saved")
    assert not await store.move_work("saving", saved, 600, "work_saved")  # not saving any more: nothing told
    assert await store.expire_works(time.time()) == 0  # not due yet
    await store.redis.zadd(store.key("expiring"), {live.work: 0})  # due by the index, but its TTL runs on:
    assert await store.expire_works(time.time()) == 0  # not told, and put back at its TTL's end
    assert time.time() + 500 < await store.redis.zscore(store.key("expiring"), live.work) <= time.time() + 600
    await store.redis.pexpire(store.key("work", live.work), 1)
    await asyncio.sleep(0.05)
    assert await store.expire_works(time.time() + 3600) == 1
    assert await store.expire_works(time.time() + 3600) == 0  # told once, whichever proxy asks
    events = await recorded(store)
    assert [e["type"] for e in events] == ["start", "end", "work_saved", "work_expired"]
    assert all((e["owner"], e["work"], e["instance"]) == ("alice", live.work, live.id) for e in events)
    assert await store.redis.exists(store.key("expiring"), store.key("workwho")) == 0
    await store.close()


async def test_the_stream_is_capped(redis_url):
    store = Store(connect(redis_url), "unit:", events_max=10)
    for i in range(300):
        await store.add_to_pool(dataclasses.replace(instance("e"), id=f"{i:032d}"))
        await store.add_session(f"{i:032d}", f"{i:032d}", 60)
    assert 10 <= await store.redis.xlen(store.key("lifecycle")) < 300  # MAXLEN ~: about, never unbounded
    await store.close()


class FakeReceiver:
    """Takes what `answers` says (a status, or an OSError: nothing listening), in order, then 204."""

    def __init__(self, *answers: int | OSError):
        self.answers = list(answers)
        self.tries: list[tuple[bytes, dict]] = []

    async def __call__(self, body: bytes, headers: dict[str, str]) -> int:
        self.tries.append((body, headers))
        answer = self.answers.pop(0) if self.answers else 204
        if isinstance(answer, OSError):
            raise answer
        return answer


def delivery(store: Store, post, consumer: str, claim_after: float = 60.0) -> EventDelivery:
    return EventDelivery(store, post, KEY, retry_max=0.05, consumer=consumer, claim_after=claim_after)


async def pending(store: Store) -> int:
    return (await store.redis.xpending(store.key("lifecycle"), GROUP))["pending"]


async def test_delivery_signs_retries_until_taken_and_acknowledges(redis_url, monkeypatch):
    monkeypatch.setattr("events.FIRST_RETRY", 0.01)
    store = Store(connect(redis_url), "unit:")
    live = instance("f")
    await started(store, live)
    await store.add_session("S" * 32, live.id, 60, NOW + 1)
    receiver = FakeReceiver(503, ConnectionRefusedError("down"), 500)
    assert await delivery(store, receiver, "one").round() == 2
    bodies = [json.loads(b) for b, _ in receiver.tries]
    assert [b["type"] for b in bodies] == ["start", "start", "start", "start", "view"]  # retried, then in order
    for body, headers in receiver.tries:
        assert headers["X-Datalab-Signature"] == signature(KEY, body) and body.startswith(b"{")
    assert bodies[0]["id"] == (await _stream(store))[0][0] and bodies[0]["time"] == NOW
    assert await pending(store) == 0  # all acknowledged
    await store.close()


async def test_a_second_consumer_takes_over_what_a_dead_one_left(redis_url):
    store = Store(connect(redis_url), "unit:")
    await started(store, instance("g"))

    async def dies(body, headers):
        raise asyncio.CancelledError  # its proxy is killed mid-POST

    try:
        await delivery(store, dies, "dead").round()
    except asyncio.CancelledError:
        pass
    assert await pending(store) == 1
    receiver = FakeReceiver()
    survivor = delivery(store, receiver, "survivor", claim_after=0.05)
    await asyncio.sleep(0.1)
    assert await survivor.round() == 1
    assert [json.loads(b)["type"] for b, _ in receiver.tries] == ["start"] and await pending(store) == 0
    await store.close()


async def test_a_consumer_working_on_an_event_keeps_it(redis_url, monkeypatch):
    """While one proxy retries an event, another does not take it over and send it too."""
    monkeypatch.setattr("events.FIRST_RETRY", 0.05)
    store = Store(connect(redis_url), "unit:")
    await started(store, instance("h"))
    slow = FakeReceiver(*([503] * 6))
    other = FakeReceiver()
    retrying = asyncio.create_task(delivery(store, slow, "retrying", claim_after=0.2).round())
    await asyncio.sleep(0.3)
    assert await delivery(store, other, "other", claim_after=0.2).round() == 0 and other.tries == []
    await retrying
    await store.close()


async def test_a_real_receiver_gets_every_event_after_it_was_down(redis_url, monkeypatch):
    monkeypatch.setattr("events.FIRST_RETRY", 0.01)
    store = Store(connect(redis_url), "unit:")
    receiver = EventReceiver(KEY)  # down: nothing listens on its port yet
    await started(store, instance("i"))
    await store.remove_instance(instance("i").id, end=end_note("stopped"))
    task = asyncio.create_task(delivery(store, http_poster(receiver.url, timeout=2), "one").run())
    try:
        await asyncio.sleep(0.3)
        receiver.start()
        for _ in range(200):
            if len(receiver.events) == 2:
                break
            await asyncio.sleep(0.05)
        assert [e["type"] for e in receiver.events] == ["start", "end"] and receiver.bad_signatures == 0
        assert receiver.events[1]["cause"] == "stopped"
    finally:
        task.cancel()
        receiver.stop()
        await store.close()


def test_an_event_body_names_every_field():
    from store import StreamEvent

    body = json.loads(event_body(StreamEvent("1-0", {"type": "end", "time": "5.5", "instance": "i", "cause": "idle"})))
    assert body == {
        "id": "1-0",
        "type": "end",
        "time": 5.5,
        "instance": "i",
        "work": "",
        "owner": "",
        "profile": "",
        "cause": "idle",
    }


# Hostile receivers (review of issue 20): what one answers never holds the delivery past its timeout,
# is never followed elsewhere, and the body it gets is exactly the one signed.


async def hostile_receiver(answer) -> tuple[asyncio.Server, str, list[bytes]]:
    """A loopback server that reads a request's head and body, keeps them, then runs `answer(writer)`."""
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
            length = int(length.split(b":")[1])
            got.append(head + await reader.readexactly(length))
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook", got


async def trickle(writer: asyncio.StreamWriter) -> None:
    """A head that never ends, one byte at a time, each well within the poster's per-read timeout."""
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(200):
        writer.write(b"X")
        await writer.drain()
        await asyncio.sleep(0.1)


async def redirect(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:1/\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


async def test_a_receiver_that_trickles_its_answer_is_given_up_at_the_timeout():
    server, url, _ = await hostile_receiver(trickle)
    post = http_poster(url, timeout=0.5)
    try:
        # Each read gets a byte within the timeout: only a deadline on the whole POST ends it.
        posting = asyncio.ensure_future(post(b"{}", {}))
        done, _ = await asyncio.wait([posting], timeout=10 * 0.5)  # the trickle would go on for 20 s
        assert done, "the POST was still reading the receiver's trickle"
        assert isinstance(posting.exception(), (OSError, TimeoutError))
    finally:
        server.close()


async def test_a_redirect_is_not_followed_and_is_not_taken_and_the_signature_is_over_the_bytes_sent():
    server, url, got = await hostile_receiver(redirect)
    try:
        body = event_body(StreamEvent("1-0", {"type": "start", "time": "1", "owner": "ä"}))
        headers = {"Content-Type": "application/json", "X-Datalab-Signature": signature(KEY, body)}
        assert await http_poster(url, timeout=2)(body, headers) == 307  # not 2xx: retried, never followed
        assert len(got) == 1 and got[0].endswith(b"\r\n\r\n" + body)
        sent = got[0].split(b"\r\n\r\n", 1)[1]
        assert f"X-Datalab-Signature: {signature(KEY, sent)}".encode() in got[0]
    finally:
        server.close()
