"""The Redis state that several proxies share, against a real Redis: capacity slots, the pool, ends."""

from dataclasses import replace

from backends import Instance
from store import Reservation
from store import Store
from store import connect

NOW = 1_000_000.0


def instance(ident: str, **changes) -> Instance:
    return Instance(ident * 32, "docker", "c-" + ident, "127.0.0.1", 1, "", NOW, token="t", **changes)


async def fresh_store(redis_url: str) -> Store:
    return Store(connect(redis_url), "unit:")


async def test_capacity_counts_leases_and_records_and_expired_leases_free_slots(redis_url):
    store = await fresh_store(redis_url)
    assert await store.reserve("a", NOW, 10, max_instances=2) == Reservation.GRANTED
    assert await store.reserve("b" * 32, NOW, 10, max_instances=2) == Reservation.GRANTED
    assert await store.bind(instance("b"), "N" * 32, 60, NOW)  # a recorded instance holds its slot for good
    assert await store.reserve("c", NOW, 10, max_instances=2) == Reservation.AT_CAPACITY
    assert await store.reserve("c", NOW + 11, 10, max_instances=2) == Reservation.GRANTED  # a's lease ran out
    await store.release("c")
    assert await store.slot_holders(NOW + 11) == {"b" * 32}
    await store.close()


async def test_one_pool_of_its_size_whoever_fills_it(redis_url):
    store = await fresh_store(redis_url)
    granted = [await store.reserve(f"p{i}", NOW, 10, max_instances=10, pool_size=2) for i in range(4)]
    assert granted == [Reservation.GRANTED, Reservation.GRANTED, Reservation.POOL_FULL, Reservation.POOL_FULL]
    await store.add_to_pool(instance("x"))
    await store.release("p0")
    await store.release("p1")
    assert await store.reserve("p5", NOW, 10, max_instances=10, pool_size=2) == Reservation.GRANTED
    assert await store.reserve("p6", NOW, 10, max_instances=10, pool_size=2) == Reservation.POOL_FULL

    claimed = await store.claim_pooled(NOW + 1)
    assert claimed == instance("x") and await store.claim_pooled(NOW + 1) is None  # each claimed once
    assert (await store.activity())["x" * 32] == NOW + 1  # stamped as it left the pool
    await store.close()


async def test_an_instance_ended_while_being_handed_out_is_never_written_back(redis_url):
    store = await fresh_store(redis_url)
    await store.add_to_pool(instance("p"))
    claimed = await store.claim_pooled(NOW)
    assert await store.remove_instance(claimed.id)  # another proxy's culling ends it meanwhile
    assert await store.bind(claimed, "N" * 32, 60, NOW) is False
    assert await store.instance(claimed.id) is None and await store.nonce_target("N" * 32) is None
    assert await store.slot_holders(NOW) == set()
    assert await store.bind(instance("q"), "M" * 32, 60, NOW) is False  # no slot: a lease that ran out
    await store.close()


async def test_an_end_keeps_sessions_drops_nonces_and_happens_once(redis_url):
    store = await fresh_store(redis_url)
    live = instance("l", claimed=NOW)
    await store.reserve(live.id, NOW, 10, max_instances=2)
    await store.bind(live, "N" * 32, 60, NOW)
    await store.add_session("S" * 32, live.id, 60)
    assert await store.reachable(live.id)
    assert await store.remove_instance(live.id) is True
    assert await store.remove_instance(live.id) is False
    assert await store.nonce_target("N" * 32) is None
    assert await store.session_target("S" * 32) == live.id  # answers 410 until it expires
    assert await store.instance(live.id) is None and await store.slot_holders(NOW) == set()
    await store.close()


async def test_activity_moves_forward_only_and_never_revives_an_ended_instance(redis_url):
    store = await fresh_store(redis_url)
    await store.reserve("a" * 32, NOW, 10, max_instances=2)
    await store.bind(instance("a"), "N" * 32, 60, NOW)
    await store.record_activity({"a" * 32: NOW + 5, "z" * 32: NOW + 5})
    await store.record_activity({"a" * 32: NOW + 1})
    assert await store.activity() == {"a" * 32: NOW + 5}
    await store.close()


async def test_a_lock_has_one_holder(redis_url):
    store = await fresh_store(redis_url)
    token = await store.try_lock("cull", ttl=5)
    assert token and await store.try_lock("cull", ttl=5) is None
    await store.unlock("cull", "not-the-holder")
    assert await store.try_lock("cull", ttl=5) is None
    await store.unlock("cull", token)
    assert await store.try_lock("cull", ttl=5)
    await store.close()


async def test_culling_ends_nothing_on_a_verdict_that_stopped_holding(redis_url):
    store = await fresh_store(redis_url)
    await store.add_to_pool(instance("p"))
    pooled = await store.instance("p" * 32)  # what a culling round read: a pooled instance
    claimed = await store.claim_pooled(NOW + 1)
    assert await store.bind(replace(claimed, filename="a.csv", claimed=NOW + 1), "N" * 32, 60, NOW + 1)
    assert await store.remove_instance(pooled.id, expect=pooled) is False  # claimed and bound since
    assert await store.nonce_target("N" * 32) == pooled.id

    bound = await store.instance(pooled.id)
    await store.record_activity({pooled.id: NOW + 50})
    assert await store.remove_instance(pooled.id, expect=bound, idle_since=NOW + 1) is False  # used since
    assert await store.remove_instance(pooled.id, expect=bound, idle_since=NOW + 50) is True
    await store.close()


async def test_no_session_for_an_ended_instance(redis_url):
    store = await fresh_store(redis_url)
    assert await store.add_session("S" * 32, "gone" * 8, 60) is False
    assert await store.redis.keys("unit:*") == []  # no refs set without a TTL left behind
    await store.close()


async def test_sessions_time_left_is_their_ttl_and_none_once_gone(redis_url):
    store = await fresh_store(redis_url)
    await store.redis.set("unit:session:" + "S" * 32, "i", ex=60)
    await store.redis.set("unit:session:" + "P" * 32, "i")
    left, gone, forever = await store.sessions_left(["S" * 32, "T" * 32, "P" * 32])
    assert 59 < left <= 60 and gone is None and forever == float("inf")
    assert await store.sessions_left([]) == []
    await store.close()


async def test_weighed_capacity_sums_each_slots_weight_and_forgets_the_weights_of_slots_gone(redis_url):
    store = await fresh_store(redis_url)
    gib = 1 << 30
    assert await store.reserve("big", NOW, 10, 4 * gib, weight=3 * gib) == Reservation.GRANTED
    assert await store.reserve("a", NOW, 10, 4 * gib, weight=gib) == Reservation.GRANTED
    assert await store.reserve("b", NOW, 10, 4 * gib, weight=gib) == Reservation.AT_CAPACITY
    await store.release("big")
    assert await store.reserve("b", NOW, 10, 4 * gib, weight=2 * gib) == Reservation.GRANTED
    assert await store.reserve("c", NOW + 11, 10, 4 * gib, weight=4 * gib) == Reservation.GRANTED  # a, b ran out
    assert await store.reserve("d", NOW + 11, 10, 4 * gib, weight=1) == Reservation.AT_CAPACITY
    await store.drop_expired_leases(NOW + 11)
    assert set(await store.redis.hkeys("unit:units")) == {b"c"}
    await store.close()


async def test_each_profile_has_its_own_pool(redis_url):
    store = await fresh_store(redis_url)
    assert await store.reserve("p1", NOW, 10, 10, pool_size=1) == Reservation.GRANTED
    assert await store.reserve("b1", NOW, 10, 10, pool_size=1, profile="big") == Reservation.GRANTED
    assert await store.reserve("b2", NOW, 10, 10, pool_size=1, profile="big") == Reservation.POOL_FULL
    await store.add_to_pool(replace(instance("b"), profile="big"))
    assert await store.pool_ids() == [] and await store.pool_ids(["default", "big"]) == ["b" * 32]
    assert await store.claim_pooled(NOW) is None
    assert (await store.claim_pooled(NOW, "big")).id == "b" * 32
    await store.add_to_pool(replace(instance("c"), profile="big"))
    assert await store.remove_instance("c" * 32, profile="big")  # culled while pooled: out of its pool
    assert await store.pool_ids(["big"]) == []
    await store.close()
