"""Admission: the boot queue (N at a time, first come first served, bounded waits, background work
yields), and capacity under races between proxies of one family sharing Redis (on the fake backend):
exactly the capacity is granted, the rest refused with why, and no slot outlives a failed or
abandoned start."""

import asyncio
import time

import pytest

from admission import Admission
from admission import QueueTimeout
from backends import EngineUnavailable
from fake_backend import FailingBackend
from fake_backend import SlowBackend
from fake_backend import keys_of
from instances import Handout
from instances import NoCapacity
from instances import Order


async def test_waiters_are_served_first_in_first_out():
    admission = Admission(1)
    await admission.acquire(1)
    order: list[int] = []

    async def start(i: int) -> None:
        async with admission.slot(5):
            order.append(i)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(start(i)) for i in range(5)]
    await asyncio.sleep(0.05)
    assert admission.waiting == 5 and order == []
    admission.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert admission.free == 1 and admission.waiting == 0


async def test_a_wait_is_bounded_and_leaves_the_line():
    admission = Admission(1)
    await admission.acquire(1)
    with pytest.raises(QueueTimeout):
        await admission.acquire(0.05)
    assert admission.waiting == 0
    admission.release()
    assert admission.free == 1  # nobody left in line to hand the slot to


async def test_a_cancelled_waiter_gives_its_turn_away():
    admission = Admission(1)
    await admission.acquire(1)
    gone = asyncio.create_task(admission.acquire(5))
    later = asyncio.create_task(admission.acquire(5))
    await asyncio.sleep(0.01)
    gone.cancel()  # the client hung up while queued
    await asyncio.gather(gone, return_exceptions=True)
    admission.release()
    await asyncio.wait_for(later, 1)
    assert admission.free == 0 and admission.waiting == 0


async def test_background_work_only_takes_a_slot_nobody_waits_for():
    admission = Admission(2)
    assert admission.try_acquire()
    assert admission.try_acquire()
    assert not admission.try_acquire()  # none free
    waiter = asyncio.create_task(admission.acquire(5))
    await asyncio.sleep(0.01)
    admission.release()  # goes to the waiter, not to the pool
    await waiter
    assert not admission.try_acquire()
    admission.release()
    assert admission.try_acquire()


# Races between proxies of one family: capacity is counted in Redis, boot slots in each process.


async def settled(tasks: list[asyncio.Task], count: int, backend: SlowBackend, booting: int) -> None:
    """Wait until `count` of the tasks are done and `booting` boots wait at the backend's gate (bounded)."""
    async with asyncio.timeout(10):
        while sum(t.done() for t in tasks) < count or backend.booting < booting:
            await asyncio.sleep(0.01)


def outcomes(results: list) -> tuple[list[Handout], list[BaseException]]:
    return [r for r in results if isinstance(r, Handout)], [r for r in results if isinstance(r, BaseException)]


async def test_forty_starts_on_two_proxies_get_exactly_the_capacity(make_instances, redis_url):
    capacity = 5
    gate = asyncio.Event()
    backend = SlowBackend(gate=gate)
    proxies = [make_instances(backend, max_instances=capacity, boots_at_once=40) for _ in range(2)]
    tasks = [asyncio.create_task(proxies[i % 2].start(Order(f"{i}.csv"), b"1\n")) for i in range(40)]
    await settled(tasks, 40 - capacity, backend, capacity)  # the refused answer at once, the granted boot
    assert backend.booting == capacity and sum(t.done() for t in tasks) == 40 - capacity
    gate.set()
    granted, refused = outcomes(await asyncio.gather(*tasks, return_exceptions=True))
    assert len(granted) == capacity and len(refused) == 40 - capacity
    assert all(isinstance(e, NoCapacity) for e in refused)
    assert {(e.status, e.code, e.retry_after) for e in refused} == {(503, "CAPACITY", 30)}
    store = proxies[0].store
    recorded = {await store.nonce_target(h.nonce) for h in granted}
    assert recorded == backend.ids() == await store.instance_ids() == await store.slot_holders(time.time())
    assert len(recorded) == capacity


async def test_starts_past_the_boot_slots_wait_their_turn_then_give_up(make_instances):
    gate = asyncio.Event()
    backend = SlowBackend(gate=gate)
    proxies = [make_instances(backend, boots_at_once=1, queue_timeout=1) for _ in range(2)]
    tasks = [asyncio.create_task(proxies[i % 2].start(Order(f"{i}.csv"), b"1\n")) for i in range(6)]
    await settled(tasks, 4, backend, 2)  # one boot per proxy; the other four waited their queue timeout
    assert backend.booting == 2 and sum(t.done() for t in tasks) == 4
    assert len(await proxies[0].store.slot_holders(time.time())) == 2  # the waiters' slots went back
    gate.set()
    granted, refused = outcomes(await asyncio.gather(*tasks, return_exceptions=True))
    assert len(granted) == 2 and len(refused) == 4
    assert {(type(e), e.code, e.retry_after) for e in refused} == {(NoCapacity, "CAPACITY", 5)}
    assert all("too many starts at once" in str(e) for e in refused)


async def test_no_slot_is_leaked_by_failed_or_abandoned_starts(make_instances, redis_url):
    capacity = 4
    failing = FailingBackend(start=EngineUnavailable("the Docker engine cannot be reached"))
    proxies = [make_instances(failing, max_instances=capacity) for _ in range(2)]
    results = await asyncio.gather(
        *(proxies[i % 2].start(Order("a.csv"), b"1\n") for i in range(40)), return_exceptions=True
    )
    assert {type(e) for e in results} <= {EngineUnavailable, NoCapacity} and EngineUnavailable in map(type, results)
    assert keys_of(redis_url) == set() and failing.running == {}

    gate = asyncio.Event()
    slow = SlowBackend(gate=gate)
    proxies = [make_instances(slow, max_instances=capacity) for _ in range(2)]
    abandoned = [asyncio.create_task(proxies[i % 2].start(Order("a.csv"), b"1\n")) for i in range(capacity)]
    async with asyncio.timeout(10):
        while slow.booting < capacity:
            await asyncio.sleep(0.01)
    for task in abandoned:
        task.cancel()  # every client hung up mid-boot
    await asyncio.gather(*abandoned, return_exceptions=True)
    assert keys_of(redis_url) == set() and slow.running == {}

    gate.set()
    granted, refused = outcomes(
        await asyncio.gather(
            *(proxies[i % 2].start(Order("a.csv"), b"1\n") for i in range(capacity)), return_exceptions=True
        )
    )
    assert len(granted) == capacity and refused == []  # every slot came back
    for proxy in proxies:
        assert proxy.admission.free == proxy.admission.concurrency and proxy.admission.waiting == 0
