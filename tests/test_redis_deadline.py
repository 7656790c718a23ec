"""Every Redis call the proxy makes ends within its deadline when Redis stops answering (a real
redis-server, SIGSTOPped), whatever kind of call, and the client is sound once Redis answers again."""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import Awaitable

import pytest
from redis.exceptions import RedisError

import store
from helpers import RedisServer
from helpers import SentinelGroup
from helpers import wait_until
from redis_deadline import DeadlinePool
from redis_deadline import DeadlineRedis

DEADLINE = 0.5  # the client's, short for the test
BOUND = 10  # where the test stops waiting: redis-py's own timeouts and retries alone took far longer


@pytest.fixture
def frozen_redis(tmp_path):
    """A Redis of this test's own (frozen, it would hold up every other test's)."""
    server = RedisServer(tmp_path).start()
    yield server
    server.thaw()
    server.stop()


async def refused(call: Awaitable) -> RedisError:
    """The RedisError `call` ends with; fails the test if it answers or is still waiting at BOUND."""
    try:
        async with asyncio.timeout(BOUND):
            await call
    except RedisError as e:
        return e
    except TimeoutError:
        pytest.fail(f"a Redis call still waited after {BOUND} s with Redis frozen")
    pytest.fail("a frozen Redis answered")


async def test_commands_pipelines_scripts_and_subscribes_end_within_the_deadline(frozen_redis):
    client = store.connect(frozen_redis.url, DEADLINE)
    s = store.Store(client, "deadline:")
    try:
        await client.ping()  # a connection in the pool, as a running proxy has
        frozen_redis.freeze()
        assert "within 0.5 s" in str(await refused(client.get("k")))
        # more at once than the pool has connections: the wait for one is bounded too
        burst = await asyncio.gather(*(refused(client.get(f"k{i}")) for i in range(store.REDIS_CONNECTIONS + 8)))
        assert all(isinstance(e, RedisError) for e in burst)
        await refused(s.release("i"))  # a MULTI/EXEC pipeline
        await refused(s.renew_lock("cull", "token", 10))  # a Lua script
        await refused(s.gone_events().__anext__())  # SUBSCRIBE
    finally:
        frozen_redis.thaw()
        await client.aclose()


async def test_a_call_cut_mid_reply_leaves_no_reply_behind(frozen_redis):
    """The cut call's reply arrives once Redis runs again: it must never be read as another call's."""
    client = store.connect(frozen_redis.url, DEADLINE)
    try:
        await client.set("first", b"1")
        await client.set("second", b"2")
        frozen_redis.freeze()
        await refused(client.get("first"))
        frozen_redis.thaw()
        assert [await client.get("second") for _ in range(3)] == [b"2"] * 3
    finally:
        await client.aclose()


async def test_a_connection_comes_back_whenever_the_deadline_passes(redis_url):
    """A call whose deadline passes while it gives its connection back (the pool's lock busy, as in
    a burst) still gives it back: else the pool is one smaller for good, and a pool of one spent."""
    client = DeadlineRedis.from_pool(DeadlinePool.from_url(redis_url, max_connections=1, timeout=DEADLINE))
    client.deadline = 1.0
    try:
        call = asyncio.create_task(client.blpop(["nothing"], timeout=0.2))  # answered after 0.2 s
        await asyncio.sleep(0.1)
        async with client.connection_pool._condition:  # held until past the call's deadline
            await asyncio.sleep(1.5)
        await refused(call)  # its deadline passed, giving back
        assert await client.ping()  # with the one connection
    finally:
        await client.aclose()


async def test_a_sentinel_client_ends_within_the_deadline_too(tmp_path):
    if shutil.which("redis-sentinel") is None:
        pytest.fail("redis-sentinel is not installed (scripts/test.sh installs it)")
    group = SentinelGroup(tmp_path)
    client = store.connect(group.url, DEADLINE)
    servers = [group.procs[group.primary], group.procs[group.replica]]  # both: no failover answers instead
    try:
        wait_until(group.watching, "the sentinels to know the replica and each other", 30)
        await client.set("k", b"v")
        for proc in servers:
            proc.send_signal(signal.SIGSTOP)
        await refused(client.get("k"))
        for proc in servers:
            proc.send_signal(signal.SIGCONT)
        assert await client.get("k") == b"v"
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGCONT)
        await client.aclose()
        group.stop()
