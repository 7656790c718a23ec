"""Culling and reconciliation (culler.py) with a real Redis. An idle verdict rests on the later of the
proxy's record (a person's requests) and what the instance's Jupyter records of its kernels and
terminals (code run, a terminal used), with a stand-in Jupyter; what the instance says is a number at
most, never a failed round. On the fake backend: idle, too old and gone instances end (their work
saved, or said unsaved), and a container Redis does not know goes unless its start is in flight."""

import asyncio
import json
import time
from dataclasses import replace
from datetime import UTC
from datetime import datetime

import pytest

import counters
import culler
from backends import EngineUnavailable
from backends import Instance
from backends import InventoryEntry
from culler import Activity
from culler import Culler
from fake_backend import FailingBackend
from fake_backend import FakeBackend
from helpers import answering
from helpers import runtime_for
from instances import Order

IDLE = 60  # datalab_idle_timeout of these tests
NONCE = "N" * 32


def iso(epoch: float, zone: str = "Z") -> str:
    """A time as Jupyter writes it (jupyter_server/_tz.py isoformat: +00:00 written as Z)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", zone)


@pytest.fixture
async def jupyter():
    """A stand-in Jupyter: /api/kernels and /api/terminals answer what a test sets; it logs what it is asked."""
    state = {"kernels": [], "terminals": [], "asked": [], "answer": None}

    def answer(path: str) -> bytes:
        state["asked"].append(path)
        body = json.dumps(state.get(path.partition("?")[0].removeprefix("/api/"), [])).encode()
        return state["answer"] or b"HTTP/1.0 200 OK\r\n\r\n" + body

    async with answering(answer) as port:
        state["port"] = port
        yield state


@pytest.fixture
async def world(redis_url, jupyter):
    """A runtime on a real Redis whose one instance (claimed, bound to a nonce) is the stand-in,
    last used by the proxy's record two idle timeouts ago; the engine runs it and stops it on demand."""
    rt = runtime_for(redis_url=redis_url, idle_timeout=IDLE)
    store = rt.store
    now = time.time()
    instance = Instance(
        "i" * 32, "docker", "c1", "127.0.0.1", jupyter["port"], "a.csv", now - 3 * IDLE, "t", now - 3 * IDLE
    )
    await store.reserve(instance.id, now, 60, max_instances=10)
    assert await store.bind(instance, NONCE, 600, now - 2 * IDLE)
    stopped: list[str] = []

    async def inventory():
        return [] if stopped else [InventoryEntry(instance.id, instance.handle, True)]

    async def stop(handle: str) -> None:
        stopped.append(handle)

    rt.instances.backend.inventory = inventory
    rt.instances.backend.stop = stop
    yield rt, instance, stopped
    await store.close()


async def cull(rt) -> int:
    return await Culler(rt.instances, rt.activity).round()


async def test_an_instance_no_one_used_ends(world, jupyter):
    rt, instance, stopped = world
    jupyter["kernels"] = [{"id": "k", "last_activity": iso(time.time() - 2 * IDLE), "execution_state": "idle"}]
    jupyter["terminals"] = [{"name": "1", "last_activity": iso(time.time() - 3 * IDLE, "+00:00")}]
    assert await cull(rt) == 1
    assert stopped == [instance.handle] and await rt.store.instance(instance.id) is None
    assert [p.partition("?")[0] for p in sorted(jupyter["asked"])] == ["/api/kernels", "/api/terminals"]
    assert all("no_track_activity=1" in p for p in jupyter["asked"])  # Jupyter's own idleness is left alone


@pytest.mark.parametrize(
    "kernels, terminals",
    [  # times as ages in seconds, made into Jupyter's times when the test runs (not when it is collected)
        ([{"last_activity": 5, "execution_state": "idle"}], []),  # code ran 5 s ago
        ([{"last_activity": 9 * IDLE, "execution_state": "busy"}], []),  # running long
        ([], [{"name": "1", "last_activity": 5, "zone": "+00:00"}]),  # a terminal in use
        ([], [{"name": "1", "last_activity": -86400}]),  # ahead: taken as now
    ],
)
async def test_an_instance_whose_kernel_or_terminal_is_in_use_stays(world, jupyter, kernels, terminals):
    rt, instance, stopped = world

    def dated(entries: list[dict]) -> list[dict]:
        now = time.time()
        return [
            {k: v for k, v in e.items() if k != "zone"}
            | {"last_activity": iso(now - e["last_activity"], e.get("zone", "Z"))}
            for e in entries
        ]

    jupyter["kernels"], jupyter["terminals"] = dated(kernels), dated(terminals)
    assert await cull(rt) == 0
    assert stopped == [] and await rt.store.instance(instance.id) == instance


@pytest.mark.parametrize("answer", [b"HTTP/1.0 500 Oops\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n" + b"[" * 100_000, b"\0"])
async def test_an_instance_that_says_nothing_useful_is_judged_on_the_proxys_record(world, jupyter, answer):
    rt, instance, stopped = world
    jupyter["answer"] = answer
    assert await cull(rt) == 1
    assert stopped == [instance.handle]


async def test_recent_requests_of_a_person_spare_asking_jupyter(world, jupyter):
    rt, instance, stopped = world
    rt.activity.touch(instance.id)  # as the router does for a person's request
    assert await cull(rt) == 0
    assert jupyter["asked"] == [] and stopped == []


# Lifecycle on the fake backend: what a round ends, and what it leaves alone.


async def fake_round(inst) -> int:
    return await Culler(inst, Activity()).round()


async def claimed(inst) -> tuple[Instance, str]:
    handout = await inst.start(Order("a.csv"), b"1,2\n")
    return await inst.by_nonce(handout.nonce), handout.work


async def test_an_idle_instance_is_ended_and_its_work_saved(make_instances):
    inst = make_instances(FakeBackend(), idle_timeout=IDLE)
    idle, work = await claimed(inst)
    busy, _ = await claimed(inst)
    await inst.store.redis.zadd("unit:activity", {idle.id: time.time() - 2 * IDLE})  # a person's last request
    inst.backend.jupyter(idle).kernels = [{"last_activity": iso(time.time() - 3 * IDLE), "execution_state": "idle"}]
    culls = counters.CULLS.labels("idle")._value.get()
    assert await fake_round(inst) == 1
    assert inst.backend.ids() == {busy.id} and await inst.store.instance(idle.id) is None
    assert (await inst.store.ended(idle.id)).cause == "idle"
    assert ((await inst.store.work(work)).state, (await inst.store.work(work)).ended) == ("saved", "idle")
    assert counters.CULLS.labels("idle")._value.get() == culls + 1


async def test_a_round_asks_a_bounded_number_of_jupyters_at_once(make_instances, monkeypatch):
    """Each probe opens connections: thousands at once would run the proxy out of descriptors (and a
    probe that cannot connect says nothing, so a busy instance would look idle). All are still asked."""
    monkeypatch.setattr(culler, "PROBES_AT_ONCE", 2)
    inst = make_instances(FakeBackend(), idle_timeout=IDLE)
    records = [(await claimed(inst))[0] for _ in range(5)]
    await inst.store.redis.zadd("unit:activity", {r.id: time.time() - 2 * IDLE for r in records})
    asked, now_in_flight, most = [], [0], [0]

    async def probe(record: Instance, timeout: float = 2.0) -> tuple[bool, float | None]:
        asked.append(record.id)
        now_in_flight[0] += 1
        most[0] = max(most[0], now_in_flight[0])
        await asyncio.sleep(0.02)
        now_in_flight[0] -= 1
        return True, None  # a kernel is busy: nothing ends

    monkeypatch.setattr(culler, "jupyter_activity", probe)
    assert await fake_round(inst) == 0
    assert sorted(asked) == sorted(r.id for r in records) and most[0] == 2


async def test_a_round_ends_a_bounded_number_of_instances_at_once(make_instances, monkeypatch):
    """Each end may stream a work archive: a round that ends many (a burst reaching its max age
    together) ends them a few at a time, and ends them all."""
    monkeypatch.setattr(culler, "ENDS_AT_ONCE", 3)
    inst = make_instances(FakeBackend(), max_age=IDLE)
    records = [(await claimed(inst))[0] for _ in range(8)]
    for r in records:
        await inst.store.redis.set(f"unit:instance:{r.id}", replace(r, claimed=time.time() - 2 * IDLE).to_json())
    now_in_flight, most, stop = [0], [0], inst.backend.stop

    async def slow_stop(handle: str) -> None:
        now_in_flight[0] += 1
        most[0] = max(most[0], now_in_flight[0])
        await asyncio.sleep(0.02)
        now_in_flight[0] -= 1
        await stop(handle)

    monkeypatch.setattr(inst.backend, "stop", slow_stop)
    assert await fake_round(inst) == 8
    assert inst.backend.ids() == set() and most[0] == 3


async def test_an_instance_past_its_max_age_is_ended_pooled_or_not(make_instances):
    inst = make_instances(FakeBackend(), max_age=IDLE)
    old, work = await claimed(inst)
    young, _ = await claimed(inst)
    await inst.store.redis.set(f"unit:instance:{old.id}", replace(old, claimed=time.time() - 2 * IDLE).to_json())
    stale = await inst.backend.start("p" * 32, "t")  # a pool instance booted long ago
    await inst.store.reserve(stale.id, time.time(), 60, 8, pool_size=1)
    await inst.store.add_to_pool(replace(stale, created=time.time() - 2 * IDLE))
    assert await fake_round(inst) == 2
    assert inst.backend.ids() == {young.id} and await inst.store.pool_ids() == []
    assert (await inst.store.ended(old.id)).cause == "max_age" and (await inst.store.work(work)).state == "saved"


@pytest.mark.parametrize("how", ["vanished", "exited"])
async def test_an_instance_whose_container_is_gone_is_ended_as_gone(make_instances, how):
    """The engine lost it (removed behind the proxy's back) or its process exited: the record goes,
    its sessions answer 410, its work is said to be unsaved, and an exited container is removed."""
    inst = make_instances(FakeBackend())
    lost, work = await claimed(inst)
    kept, _ = await claimed(inst)
    session = await inst.open_session(lost)
    await (inst.backend.vanish(lost) if how == "vanished" else inst.backend.exit(lost))
    gone = counters.CULLS.labels("gone")._value.get()
    assert await fake_round(inst) == 1
    assert await inst.store.instance(lost.id) is None and (await inst.store.ended(lost.id)).cause == "gone"
    assert await inst.store.session_target(session) == lost.id  # kept to answer 410
    assert (await inst.store.work(work)).state == "unsaved"
    assert inst.backend.ids() == {kept.id} and lost.handle not in inst.backend.running
    assert counters.CULLS.labels("gone")._value.get() == gone + 1


async def test_a_container_redis_does_not_know_is_removed_unless_its_start_is_in_flight(make_instances):
    inst = make_instances(FakeBackend())
    kept, _ = await claimed(inst)
    orphan = await inst.backend.start("o" * 32, "t")  # its proxy died mid-start, long ago: no record, no lease
    booting = await inst.backend.start("b" * 32, "t")  # a start in flight: its lease holds it
    await inst.store.reserve(booting.id, time.time(), 60, 8)
    orphans = counters.CULLS.labels("orphan")._value.get()
    assert await fake_round(inst) == 1
    assert inst.backend.ids() == {kept.id, booting.id} and orphan.handle in inst.backend.stops
    assert counters.CULLS.labels("orphan")._value.get() == orphans + 1


async def test_a_round_whose_stop_fails_ends_the_others(make_instances):
    inst = make_instances(FailingBackend(stop=EngineUnavailable("the engine went away")), idle_timeout=IDLE)
    first, _ = await claimed(inst)
    second, _ = await claimed(inst)
    for instance in (first, second):
        await inst.store.redis.zadd("unit:activity", {instance.id: time.time() - 2 * IDLE})
    assert await fake_round(inst) == 2  # both forgotten; their containers are left to a later round
    assert await inst.all() == [] and sorted(inst.backend.stops) == sorted([first.handle, second.handle])


async def test_an_exits_feed_that_held_is_retried_at_once_and_one_that_breaks_backs_off(world, monkeypatch):
    """A swarm's node events are rare: a feed that held a while, then broke (its engine restarted), is
    retried after 1 s, however long the waits before it grew; feeds that break at once wait longer each time."""
    rt, _, _ = world
    clock = [0.0]
    held = iter([0.0, 0.0, 0.0, 0.0, culler.FEED_HELD + 1, 0.0])  # how long each feed lasts before it breaks
    waits: list[float] = []

    async def exits():
        clock[0] += next(held)
        raise EngineUnavailable("the Docker engine stopped sending events")
        yield ""  # an async generator

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 6:
            raise asyncio.CancelledError

    rt.instances.backend.exits = exits
    monkeypatch.setattr(culler.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(culler.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        await Culler(rt.instances, rt.activity).follow_exits()
    assert waits == [1.0, 2.0, 4.0, 8.0, 1.0, 2.0]
