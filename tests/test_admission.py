"""The boot queue: N at a time, first come first served, bounded waits, background work yields."""

import asyncio

import pytest

from admission import Admission
from admission import QueueTimeout


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
