"""Instance life (instances.py) on a real Redis and the fake backend: a start leaves an instance
recorded with its nonce and its upload, or nothing at all; an end saves the user's work, then stops
the instance, once, whoever asks; reconciliation's ends (end_orphan, end_if_gone)."""

from __future__ import annotations

import asyncio
import math
import tarfile
import time

import pytest

from backends import ArchiveRefused
from backends import BackendError
from backends import EngineUnavailable
from backends import ImageMissing
from backends import Instance
from backends import StartTimeout
from fake_backend import FailingBackend
from fake_backend import FakeBackend
from fake_backend import SlowBackend
from fake_backend import keys_of
from instances import Order
from store import EndNote
from store import Reservation

DATA = b"a,b\n1,2\n"


async def started(inst, filename: str = "a.csv", data: bytes = DATA) -> tuple[Instance, str, str]:
    """Start one; the instance record it left, its nonce and its work's id."""
    handout = await inst.start(Order(filename), data)
    instance_id = await inst.store.nonce_target(handout.nonce)
    return await inst.store.instance(instance_id), handout.nonce, handout.work


async def pooled(inst) -> Instance:
    """A ready pool instance, as the pool filler leaves one."""
    now = time.time()
    assert await inst.store.reserve("p" * 32, now, 60, 8, pool_size=1) == Reservation.GRANTED
    instance = await inst.backend.start("p" * 32, "pool-token")
    await inst.store.add_to_pool(instance)
    return instance


def archived(path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


async def test_a_cold_start_leaves_a_recorded_instance_holding_the_upload(make_instances, redis_url):
    inst = make_instances(FakeBackend())
    instance, nonce, work = await started(inst)
    assert inst.backend.starts == [instance.id] and inst.backend.ids() == {instance.id}
    assert inst.backend.files(instance) == {"a.csv": DATA}
    assert (instance.filename, instance.work) == ("a.csv", work) and instance.claimed > 0
    assert await inst.by_nonce(nonce) == instance
    assert (await inst.store.work(work)).state == "live"
    assert await inst.store.slot_holders(time.time()) == {instance.id}
    assert math.isinf(await inst.store.redis.zscore("unit:slots", instance.id))  # held for good, not leased
    assert keys_of(redis_url) == {
        f"instance:{instance.id}",
        f"nonce:{nonce}",
        f"refs:{instance.id}",
        f"work:{work}",
        "instances",
        "slots",
        "activity",
        "lifecycle",  # its start event (store.py)
        "expiring",  # when its work's record expires, and whose it is: work_expired is told from them
        "workwho",
    }


async def test_a_pooled_start_takes_the_ready_instance_and_boots_none(make_instances):
    inst = make_instances(FakeBackend())
    ready = await pooled(inst)
    instance, _, _ = await started(inst)
    assert instance.id == ready.id and instance.token == "pool-token"
    assert inst.backend.starts == [ready.id]  # only the pool's boot
    assert inst.backend.files(instance) == {"a.csv": DATA}
    assert await inst.store.pool_ids() == []


async def test_a_dead_pool_instance_is_ended_and_a_cold_one_booted(make_instances, redis_url):
    inst = make_instances(FakeBackend())
    dead = await pooled(inst)
    await inst.backend.jupyter(dead).done(wait=False)  # its Jupyter died; the engine still lists it running
    instance, _, _ = await started(inst)
    assert instance.id != dead.id and inst.backend.ids() == {instance.id}
    assert dead.handle in inst.backend.stops and await inst.store.instance(dead.id) is None


async def test_an_archive_start_unpacks_it_in_the_instance(make_instances):
    inst = make_instances(FakeBackend())
    handout = await inst.start(Order("data.zip", unpack="zip"), b"PK...")
    instance = await inst.by_nonce(handout.nonce)
    assert instance.filename == "data.zip"
    assert inst.backend.running[instance.handle].unpacked == [("zip", b"PK...")]
    assert inst.backend.files(instance) == {}


@pytest.mark.parametrize("path", ["cold", "pooled"])
@pytest.mark.parametrize(
    "failing",
    [
        {"put": BackendError("the instance did not take the upload")},
        {"unpack": ArchiveRefused("the archive was refused: ../escape")},
    ],
    ids=["upload", "unpack"],
)
async def test_a_start_whose_upload_fails_leaves_nothing(make_instances, redis_url, path, failing):
    inst = make_instances(FailingBackend(**failing))
    if path == "pooled":
        await pooled(inst)
    error = next(iter(failing.values()))
    with pytest.raises(type(error)) as raised:
        await inst.start(Order("a.zip", unpack="zip" if "unpack" in failing else ""), DATA)
    assert raised.value is error
    assert inst.backend.running == {} and len(inst.backend.stops) == 1
    assert keys_of(redis_url) == set()


@pytest.mark.parametrize(
    "error",
    [
        StartTimeout("the instance did not answer /api/status within 60 s"),
        EngineUnavailable("the Docker engine cannot be reached"),
        ImageMissing("build it with scripts/build-image.sh"),
    ],
    ids=lambda e: e.code,
)
async def test_a_start_whose_boot_fails_answers_why_and_leaves_nothing(make_instances, redis_url, error):
    inst = make_instances(FailingBackend(start=error))
    with pytest.raises(type(error)) as raised:
        await inst.start(Order("a.csv"), DATA)
    assert raised.value is error and raised.value.status in (503, 504)
    assert len(inst.backend.starts) == 1 and inst.backend.running == {}
    assert keys_of(redis_url) == set()


async def test_a_boot_past_the_start_timeout_is_a_start_timeout_and_leaves_nothing(make_instances, redis_url):
    inst = make_instances(SlowBackend(seconds=30), start_timeout=1)
    with pytest.raises(StartTimeout, match="within 1 s"):
        await inst.start(Order("a.csv"), DATA)
    assert inst.backend.running == {} and keys_of(redis_url) == set()


async def test_an_abandoned_start_leaves_nothing(make_instances, redis_url):
    """The client hung up mid-boot: the start is cancelled, its container and slot go."""
    inst = make_instances(SlowBackend(gate=asyncio.Event()))
    start = asyncio.create_task(inst.start(Order("a.csv"), DATA))
    while inst.backend.booting == 0:
        await asyncio.sleep(0.01)
    assert await inst.store.slot_holders(time.time()) == set(inst.backend.starts)  # its lease
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert inst.backend.running == {} and keys_of(redis_url) == set()


async def test_an_end_saves_the_work_then_stops_the_instance(make_instances, redis_url, tmp_path):
    inst = make_instances(FakeBackend())
    instance, nonce, work = await started(inst)
    session = await inst.open_session(instance)
    jupyter = inst.backend.jupyter(instance)
    assert await inst.end(instance, "stopped by its user", "stopped") is True
    assert jupyter.asked == ["/api/datalab/work"]  # the archive, asked of the running instance
    saved = await inst.store.work(work)
    assert (saved.state, saved.ended) == ("saved", "stopped")  # its Jupyter still answered: saved before the stop
    assert archived(inst.work.path(work)) == {"a.csv": DATA}
    assert saved.size == inst.work.path(work).stat().st_size
    assert inst.backend.stops == [instance.handle] and inst.backend.running == {}
    ended = await inst.store.ended(instance.id)
    assert (ended.cause, ended.work, ended.instance) == ("stopped", work, instance)
    assert await inst.by_nonce(nonce) is None and await inst.store.session_target(session) == instance.id  # 410
    assert await inst.store.slot_holders(time.time()) == set()
    assert keys_of(redis_url) == {
        f"ended:{instance.id}",
        f"work:{work}",
        f"session:{session}",
        *("lifecycle", "expiring", "workwho"),  # its events, and its work's expiry to tell
    }


async def test_an_instance_is_ended_once_whoever_asks(make_instances):
    backend = FakeBackend()
    first, second = make_instances(backend), make_instances(backend)  # two proxies of one family
    instance, _, work = await started(first)
    ends = await asyncio.gather(first.end(instance, "a"), second.end(instance, "b"), first.end(instance, "c"))
    assert sorted(ends) == [False, False, True]
    assert backend.stops == [instance.handle] and (await first.store.work(work)).state == "saved"
    assert await first.end(instance, "again") is False and backend.stops == [instance.handle]


async def test_an_end_whose_stop_fails_keeps_its_slot_leased_for_reconciliation(make_instances):
    inst = make_instances(FailingBackend(stop=EngineUnavailable("the Docker engine cannot be reached")))
    instance, _, work = await started(inst)
    assert await inst.end(instance, "stopped by its user", "stopped") is True
    assert await inst.store.instance(instance.id) is None and (await inst.store.work(work)).state == "saved"
    assert inst.backend.ids() == {instance.id}  # still running, with no record
    score = await inst.store.redis.zscore("unit:slots", instance.id)
    assert time.time() < score <= inst.work.lease_until(time.time())  # a lease, not held for good


async def test_an_orphan_is_removed(make_instances):
    """A container no record names (its proxy died mid-start)."""
    inst = make_instances(FakeBackend())
    stray = await inst.backend.start("s" * 32, "t")
    (found,) = await inst.backend.inventory()
    assert await inst.end_orphan(found) is True
    assert inst.backend.running == {} and inst.backend.stops == [stray.handle]


async def test_an_orphan_whose_proxy_died_mid_save_is_saved_then_removed(make_instances):
    """Its end was recorded (the work marked saving), then its proxy died: reconciliation saves the work."""
    inst = make_instances(FakeBackend())
    instance, _, work = await started(inst)
    note = EndNote("idle", 600, time.time() + 60, 600, time.time())
    assert await inst.store.remove_instance(instance.id, end=note)
    assert (await inst.store.work(work)).state == "saving"
    (found,) = await inst.backend.inventory()
    assert await inst.end_orphan(found) is True
    saved = await inst.store.work(work)
    assert (saved.state, saved.ended) == ("saved", "idle") and archived(inst.work.path(work)) == {"a.csv": DATA}
    assert inst.backend.running == {}


async def test_an_instance_that_exited_is_ended_as_gone_and_its_work_unsaved(make_instances):
    inst = make_instances(FakeBackend())
    instance, nonce, work = await started(inst)
    assert await inst.end_if_gone(instance.id) is False  # still running: nothing happens
    await inst.backend.exit(instance)
    assert await inst.end_if_gone(instance.id) is True
    assert await inst.by_nonce(nonce) is None and (await inst.store.ended(instance.id)).cause == "gone"
    unsaved = await inst.store.work(work)
    assert (unsaved.state, unsaved.why) == ("unsaved", "its container was gone before its work could be saved")
    assert inst.backend.running == {}
    assert await inst.end_if_gone(instance.id) is True  # over, whoever ended it


async def test_end_all_ends_every_recorded_instance(make_instances, redis_url):
    inst = make_instances(FakeBackend())
    for name in ("a.csv", "b.csv"):
        await started(inst, name)
    await pooled(inst)
    assert await inst.end_all("removed by an operator") == 3
    assert inst.backend.running == {} and await inst.all() == []
    assert all(not k.startswith(("instance:", "slots", "pool")) for k in keys_of(redis_url))
