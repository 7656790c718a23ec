"""The warm pool (pool.py) on a real Redis and the fake backend: it fills to datalab_pool_size, refills
after a claim, is one pool for every proxy of a family, backs off when boots fail, and takes its boots
in flight down when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pool
from backends import ImageMissing
from fake_backend import FailingBackend
from fake_backend import FakeBackend
from fake_backend import SlowBackend
from fake_backend import keys_of
from instances import Order
from pool import PoolFiller


async def until(check, timeout: float = 10.0) -> None:
    """Wait for an async condition (bounded: a failing test fails, it does not hang)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def filling(*instances):
    """Pool fillers running for these instance services, as each proxy runs one; stopped on the way out."""
    fillers = [PoolFiller(inst) for inst in instances]
    tasks = [asyncio.create_task(f.run()) for f in fillers]
    try:
        yield fillers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for filler in fillers:
            await filler.stop()


async def pool_of(inst, size: int) -> bool:
    return len(await inst.store.pool_ids()) == size


async def test_the_pool_fills_to_its_size_and_no_further(make_instances):
    inst = make_instances(FakeBackend(), pool_size=2)
    async with filling(inst) as (filler,):
        await until(lambda: pool_of(inst, 2))
        await filler.fill()  # another look finds it full
        await asyncio.sleep(0.1)
    pooled = set(await inst.store.pool_ids())
    assert inst.backend.ids() == pooled and len(inst.backend.starts) == 2
    assert [(await inst.store.instance(i)).filename for i in pooled] == ["", ""]  # ready, holding no upload


async def test_a_claim_is_refilled(make_instances):
    inst = make_instances(FakeBackend(), pool_size=1)
    async with filling(inst):
        await until(lambda: pool_of(inst, 1))
        (first,) = await inst.store.pool_ids()
        handout = await inst.start(Order("a.csv"), b"1\n")
        assert await inst.store.nonce_target(handout.nonce) == first
        await until(lambda: pool_of(inst, 1))
    (second,) = await inst.store.pool_ids()
    assert second != first and inst.backend.ids() == {first, second}


async def test_proxies_of_one_family_share_one_pool(make_instances):
    backend = FakeBackend()
    proxies = [make_instances(backend, pool_size=2) for _ in range(3)]
    async with filling(*proxies):
        await until(lambda: pool_of(proxies[0], 2))
        await asyncio.sleep(0.2)  # every filler had its look meanwhile
        assert await proxies[1].store.pool_ids() == await proxies[0].store.pool_ids()
    assert len(backend.starts) == 2 and len(backend.ids()) == 2


async def test_the_pool_counts_against_capacity(make_instances):
    inst = make_instances(FakeBackend(), pool_size=5, max_instances=3)
    async with filling(inst):
        await until(lambda: pool_of(inst, 3))
        await asyncio.sleep(0.1)
    assert len(inst.backend.starts) == 3


async def test_a_failing_boot_backs_off_and_gives_its_slot_back(make_instances, redis_url, monkeypatch):
    monkeypatch.setattr(pool, "BACKOFF_FIRST", 60.0)  # the second fill falls within it however loaded the machine
    inst = make_instances(FailingBackend(start=ImageMissing("build it with scripts/build-image.sh")), pool_size=2)
    filler = PoolFiller(inst)
    await filler.fill()
    await until(lambda: asyncio.sleep(0, result=not filler._boots))
    assert len(inst.backend.starts) == 2 and inst.backend.running == {}
    await filler.fill()  # within the back-off: no new boot
    await until(lambda: asyncio.sleep(0, result=not filler._boots))
    assert len(inst.backend.starts) == 2
    assert keys_of(redis_url) == set() and inst.admission.free == inst.admission.concurrency


async def test_stop_takes_the_boots_in_flight_down(make_instances, redis_url):
    inst = make_instances(SlowBackend(gate=asyncio.Event()), pool_size=2)
    async with filling(inst) as (filler,):
        await until(lambda: asyncio.sleep(0, result=inst.backend.booting == 2))
        assert len(await inst.store.slot_holders(time.time())) == 2  # leased while booting
    assert inst.backend.running == {} and inst.backend.booting == 0
    assert keys_of(redis_url) == set() and inst.admission.free == inst.admission.concurrency


async def test_user_starts_go_before_pool_boots(make_instances):
    """With one boot slot taken by a user's start, the pool waits rather than take it."""
    gate = asyncio.Event()
    inst = make_instances(SlowBackend(gate=gate), pool_size=1, boots_at_once=1)
    start = asyncio.create_task(inst.start(Order("a.csv"), b"1\n"))
    await until(lambda: asyncio.sleep(0, result=inst.backend.booting == 1))
    filler = PoolFiller(inst)
    await filler.fill()
    assert len(inst.backend.starts) == 1  # the user's boot only
    gate.set()
    await start
    await filler.fill()
    await until(lambda: pool_of(inst, 1))
    await filler.stop()
