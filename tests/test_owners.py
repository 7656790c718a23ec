"""Owners' caps (owners.py, instances.py) on a real Redis and the fake backend: several proxies'
instance services grant an owner exactly datalab_max_instances_per_owner places, a pooled claim
counts as a boot does, an end or a failed start frees the place, a dead proxy's lease runs out, and
reconciliation tidies what is left; and what the instance API reads of them (instance_info.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_instances import pooled

import owners
from backends import BackendError
from fake_backend import FailingBackend
from fake_backend import FakeBackend
from fake_backend import SlowBackend
from fake_backend import keys_of
from instance_info import InstanceInfo
from instances import Order
from instances import OwnerLimit
from owners import Started

DATA = b"a,b\n1,2\n"


def info_of(inst) -> InstanceInfo:
    return InstanceInfo(inst.store, inst.owners, inst.settings)


async def test_forty_starts_of_one_owner_on_two_proxies_get_exactly_the_cap(make_instances):
    gate = asyncio.Event()  # boots wait here, so every granted start holds its lease while the others ask
    services = [make_instances(SlowBackend(gate=gate), max_instances_per_owner=3, max_instances=50) for _ in "ab"]
    starts = [asyncio.create_task(services[i % 2].start(Order(f"f{i}.csv", owner="alice"), DATA)) for i in range(40)]
    while sum(t.done() for t in starts) < 37:  # the refused ones answer at once
        await asyncio.sleep(0.01)
    refused = [t for t in starts if t.done()]
    assert all(isinstance(t.exception(), OwnerLimit) for t in refused)
    assert refused[0].exception().retry_after == 30
    gate.set()
    handed = await asyncio.gather(*(t for t in starts if t not in refused))
    assert len(handed) == 3
    assert await services[0].owners.held("alice", time.time()) == 3
    assert await services[1].start(Order("other.csv", owner="bob"), DATA)  # another owner starts


async def test_a_pooled_claim_counts_for_its_owner(make_instances):
    inst = make_instances(FakeBackend(), max_instances_per_owner=1)
    await pooled(inst)
    await inst.start(Order("a.csv", owner="alice"), DATA)  # claims the pooled one
    with pytest.raises(OwnerLimit):
        await inst.start(Order("b.csv", owner="alice"), DATA)
    assert inst.backend.starts == ["p" * 32]  # refused before booting anything


async def test_an_end_frees_the_owners_place_at_once(make_instances):
    inst = make_instances(FakeBackend(), max_instances_per_owner=1)
    handout = await inst.start(Order("a.csv", owner="alice"), DATA)
    assert await inst.owner_at_cap("alice")
    with pytest.raises(OwnerLimit):
        await inst.start(Order("b.csv", owner="alice"), DATA)
    instance = await inst.by_nonce(handout.nonce)
    assert instance.owner == "alice"
    assert await inst.end(instance, "stopped by the frontend", "stopped")
    assert not await inst.owner_at_cap("alice")
    await inst.start(Order("b.csv", owner="alice"), DATA)


async def test_an_end_stops_counting_in_the_same_step(make_instances):
    inst = make_instances(FakeBackend(), max_instances_per_owner=1)
    handout = await inst.start(Order("a.csv", owner="alice"), DATA)  # its lease still runs
    assert await inst.end(await inst.by_nonce(handout.nonce), "stopped", "stopped")
    assert not await inst.owner_at_cap("alice")  # a peek: nothing was tidied in between


async def test_a_failed_start_gives_its_place_back(make_instances):
    inst = make_instances(FailingBackend(start=BackendError("no")), max_instances_per_owner=1)
    with pytest.raises(BackendError):
        await inst.start(Order("a.csv", owner="alice"), DATA)
    assert await inst.owners.held("alice", time.time()) == 0
    assert not await inst.owner_at_cap("alice")


async def test_a_dead_proxys_lease_runs_out(make_instances):
    inst = make_instances(FakeBackend())
    now = time.time()
    assert await inst.owners.reserve("alice", "w" * 32, Started("a.csv", "default", now), now + 60, 1, 600)
    assert await inst.owners.at_cap("alice", now, 1)
    assert not await inst.owners.reserve("alice", "v" * 32, Started("b.csv", "default", now), now + 60, 1, 600)
    assert not await inst.owners.at_cap("alice", now + 61, 1)  # nobody bound it: it counts no more
    assert await inst.owners.held("alice", now + 61) == 0


async def test_a_peek_writes_nothing_and_no_cap_grants_all(make_instances, redis_url):
    inst = make_instances(FakeBackend())
    assert not await inst.owner_at_cap("alice")  # 0: no cap
    assert keys_of(redis_url) == set()
    for name in ("a.csv", "b.csv", "c.csv"):
        await inst.start(Order(name, owner="alice"), DATA)
    assert await inst.owners.held("alice", time.time()) == 3


async def test_starts_without_an_owner_are_not_capped_and_write_no_owner_keys(make_instances, redis_url):
    inst = make_instances(FakeBackend(), max_instances_per_owner=1)
    await inst.start(Order("a.csv"), DATA)
    await inst.start(Order("b.csv"), DATA)
    assert not [k for k in keys_of(redis_url) if k.startswith("owne")]


async def test_reconciliation_forgets_ended_instances_then_the_owner(make_instances, redis_url):
    inst = make_instances(FakeBackend(), max_instances_per_owner=2)
    handout = await inst.start(Order("a.csv", owner="alice"), DATA)
    assert {"owner:alice", "owned:alice", "owners"} <= keys_of(redis_url)
    await inst.end(await inst.by_nonce(handout.nonce), "stopped", "stopped")
    await inst.owners.tidy(time.time())
    assert "owner:alice" not in keys_of(redis_url)  # nothing counts
    assert {"owned:alice", "owners"} <= keys_of(redis_url)  # its work lives: the listing keeps it
    await inst.store.redis.delete(inst.store.key("work", handout.work))  # (its record expired)
    await inst.owners.tidy(time.time())
    assert not {"owned:alice", "owners"} & keys_of(redis_url)


async def test_reconciliation_tidies_owners_by_the_pipelineful(make_instances, redis_url):
    """Review of issue 20: every owner of the last week is tidied each culling round, once a round
    trip each (5,000 owners: 1 s of Redis calls a round); now TIDY_AT_ONCE to a round trip. Owners in
    several batches, each with a lease run out, are all forgotten; one still starting is kept."""
    inst = make_instances(FakeBackend())
    gone = [f"user{i}" for i in range(2 * owners.TIDY_AT_ONCE + 7)]
    for owner in gone:
        assert await inst.owners.reserve(owner, "W" * 32, Started("a.csv", "default", 1.0), 2.0, 0, 60)
    assert await inst.owners.reserve("alice", "A" * 32, Started("a.csv", "default", 1.0), time.time() + 60, 0, 60)
    await inst.owners.tidy(time.time())
    assert await inst.store.redis.smembers(inst.store.key("owners")) == {b"alice"}
    assert await inst.owners.held("alice", time.time()) == 1


async def test_a_bound_instance_counts_after_its_lease_even_if_its_proxy_died_before_anything_else(make_instances):
    inst = make_instances(FakeBackend(), max_instances_per_owner=1, queue_timeout=1, start_timeout=1)
    await inst.start(Order("a.csv", owner="alice"), DATA)
    assert await inst.owners.at_cap("alice", time.time() + 3600, 1)  # live: counted whatever its lease said


# What the instance API reads (instance_info.py)


async def test_an_owners_listing_shows_booting_ready_and_ended(make_instances):
    gate = asyncio.Event()
    inst = make_instances(SlowBackend(gate=gate), idle_timeout=100, max_age=1000)
    info = info_of(inst)
    first = await (gate.set() or inst.start(Order("a.csv", owner="alice"), DATA))
    gate.clear()
    second = asyncio.create_task(inst.start(Order("b.zip", owner="alice", unpack="zip", profile="default"), DATA))
    while len(await info.of_owner("alice")) < 2:
        await asyncio.sleep(0.01)
    ready, booting = await info.of_owner("alice")
    assert (ready.work, ready.state, ready.filename, ready.owner, ready.work_state) == (
        first.work,
        "ready",
        "a.csv",
        "alice",
        "live",
    )
    instance = await inst.by_nonce(first.nonce)
    assert (ready.created, ready.last_activity) == (instance.claimed, instance.claimed)
    assert (ready.idle_deadline, ready.max_age_deadline) == (instance.claimed + 100, instance.claimed + 1000)
    assert (booting.state, booting.filename, booting.profile, booting.work_state) == (
        "booting",
        "b.zip",
        "default",
        None,
    )
    gate.set()
    await second
    await inst.store.record_activity({instance.id: instance.claimed + 50})
    ready = await info.of_work(first.work)
    assert (ready.last_activity, ready.idle_deadline) == (instance.claimed + 50, instance.claimed + 150)
    assert await inst.end(instance, "idle", "idle")
    ended = await info.of_work(first.work)
    assert (ended.state, ended.ended, ended.filename, ended.owner) == ("ended", "idle", "a.csv", "alice")
    assert ended.ended_at >= instance.claimed and ended.work_state in ("saving", "saved")
    assert ended.idle_deadline is None and ended.max_age_deadline is None
    assert [e.state for e in await info.of_owner("alice")] == ["ended", "ready"]
    assert await info.of_owner("bob") == []
    assert await info.of_work("u" * 32) is None


async def test_a_listing_is_bounded_and_keeps_what_still_runs(make_instances):
    """Review of issue 20: an owner's index keeps every start while its work's record lives (a week),
    and a listing answered all of them: thousands of ended ones, megabytes. Now the oldest ended ones
    are left out past MAX_LISTED, and counted; what still runs is always listed."""
    inst = make_instances(FakeBackend(), idle_timeout=100, max_age=1000)
    info = info_of(inst)
    handed = [await inst.start(Order(f"{i}.csv", owner="alice"), DATA) for i in range(5)]
    for h in handed[1:4]:
        assert await inst.end(await inst.by_nonce(h.nonce), "stopped", "stopped")
    listed, omitted = await info.listing("alice", most=3)
    assert [e.filename for e in listed] == ["0.csv", "3.csv", "4.csv"] and omitted == 2
    assert [e.state for e in listed] == ["ready", "ended", "ready"]
    assert len(await info.of_owner("alice")) == 5
