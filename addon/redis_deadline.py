"""Every Redis call is bounded in total time, so a Redis that stops answering is a quick 503.

redis-py's own timeouts bound one step each (a connect, a read), and its retries and health-check
PINGs repeat them: against a frozen Redis (SIGSTOP, a paused VM, a partition) one command waited
far longer than any client would. Here each call, retries, reconnects, the Sentinel lookup and the
wait for a pooled connection included, gets one deadline; past it the call raises Redis's
TimeoutError (a RedisError), which the proxy answers 503 REDIS_UNAVAILABLE.

Cancelling a call mid-reply is safe in redis-py (7.1): a connection whose read or write is
interrupted is disconnected (`except BaseException: disconnect`), never handed out again with half
a reply unread, and the pool takes it back. Only the giving back itself must not be cut: a release
that waits for the pool's lock when the deadline passes would leave its connection counted in use
for good (DeadlinePool).

Covered: commands (`execute_command`: scripts are EVALSHA/SCRIPT LOAD through it), pipelines and
transactions (`execute`), pub/sub commands (SUBSCRIBE...). Not bounded: waiting for pub/sub
messages, which may rightly take for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.connection import BlockingConnectionPool
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT = 3.0  # seconds a Redis call may take, all in


async def within[T](seconds: float, call: Awaitable[T]) -> T:
    """`call`'s result, or Redis's TimeoutError once `seconds` have passed (the call is cancelled)."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await call
    except TimeoutError as e:
        if not deadline.expired():
            raise
        raise RedisTimeoutError(f"no answer from Redis within {seconds:g} s") from e


class DeadlinePool(BlockingConnectionPool):
    """A bounded pool whose connections always come back, whenever their call's deadline passes."""

    async def release(self, connection: AbstractConnection) -> None:
        await asyncio.shield(super().release(connection))


class DeadlineRedis(redis.Redis):
    """A client whose every call ends within `deadline` seconds (set after construction: redis-py
    builds clients itself, as Sentinel's master_for does)."""

    deadline: float = DEFAULT

    async def execute_command(self, *args, **options):
        return await within(self.deadline, super().execute_command(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _DeadlinePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.deadline = self.deadline
        return pipe

    def pubsub(self, **kwargs) -> PubSub:
        pubsub = _DeadlinePubSub(self.connection_pool, event_dispatcher=self._event_dispatcher, **kwargs)
        pubsub.deadline = self.deadline
        return pubsub


class _DeadlinePipeline(Pipeline):
    """Queued commands are sent by `execute`: that is the call bounded (a command run at once, while
    WATCHing, too)."""

    deadline: float = DEFAULT

    async def execute(self, raise_on_error: bool = True):
        return await within(self.deadline, super().execute(raise_on_error))

    async def immediate_execute_command(self, *args, **options):
        return await within(self.deadline, super().immediate_execute_command(*args, **options))


class _DeadlinePubSub(PubSub):
    """SUBSCRIBE and the like are bounded; listening for messages is not."""

    deadline: float = DEFAULT

    async def execute_command(self, *args):
        return await within(self.deadline, super().execute_command(*args))
