"""Redis state: nonces, sessions and instances under one key prefix, key names built only here.

<prefix>nonce:<nonce>      -> instance id        (expires after nonce_ttl)
<prefix>session:<id>       -> instance id        (expires after session_ttl)
<prefix>instance:<id>      -> Instance JSON      (lives until the instance is removed)
<prefix>instances          -> set of instance ids (what this proxy family owns)
<prefix>refs:<id>          -> set of the nonce and session keys naming instance <id>
<prefix>events             -> pub/sub channel: "gone <id>" when an instance is removed
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backends import Instance

log = logging.getLogger(__name__)

GONE = "gone"


def connect(url: str) -> redis.Redis:
    """One client per process: short timeouts and a few retries, so a Redis outage is a quick 503."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


class Store:
    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.prefix = prefix

    def key(self, kind: str, ident: str = "") -> str:
        return f"{self.prefix}{kind}:{ident}" if ident else f"{self.prefix}{kind}"

    async def add_instance(self, instance: Instance, nonce: str, nonce_ttl: int) -> None:
        """Record the instance and its first nonce in one transaction: both exist, or neither."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key("instance", instance.id), instance.to_json())
            pipe.sadd(self.key("instances"), instance.id)
            self._bind(pipe, self.key("nonce", nonce), instance.id, nonce_ttl)
            await pipe.execute()

    def _bind(self, pipe, key: str, instance_id: str, ttl: int) -> None:
        """Point `key` at the instance and remember it, so removing the instance removes the key too."""
        pipe.set(key, instance_id, ex=ttl)
        pipe.sadd(self.key("refs", instance_id), key)

    async def instance(self, instance_id: str) -> Instance | None:
        raw = await self.redis.get(self.key("instance", instance_id))
        return Instance.from_json(raw) if raw is not None else None

    async def nonce_target(self, nonce: str) -> str | None:
        raw = await self.redis.get(self.key("nonce", nonce))
        return raw.decode() if raw is not None else None

    async def add_session(self, session_id: str, instance_id: str, ttl: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self._bind(pipe, self.key("session", session_id), instance_id, ttl)
            await pipe.execute()

    async def session_target(self, session_id: str) -> str | None:
        raw = await self.redis.get(self.key("session", session_id))
        return raw.decode() if raw is not None else None

    async def instance_ids(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(self.key("instances"))}

    async def remove_instance(self, instance_id: str) -> None:
        """Forget the instance, its nonces and sessions, and tell every proxy to drop routes to it."""
        refs = self.key("refs", instance_id)
        bound = await self.redis.smembers(refs)
        async with self.redis.pipeline(transaction=True) as pipe:
            if bound:
                pipe.delete(*bound)
            pipe.delete(self.key("instance", instance_id), refs)
            pipe.srem(self.key("instances"), instance_id)
            pipe.publish(self.key("events"), f"{GONE} {instance_id}")
            await pipe.execute()

    async def gone_events(self) -> AsyncIterator[str]:
        """Yield the id of each instance removed from now on; ends (raises) when Redis is lost."""
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.key("events"))
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                kind, _, ident = message["data"].decode().partition(" ")
                if kind == GONE and ident:
                    yield ident

    async def close(self) -> None:
        await self.redis.aclose()
