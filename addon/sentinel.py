"""A Redis reached through Sentinel: the URL that names it, and a client that follows its primary.

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<service>[/<db>]

The hosts are the sentinels (port 26379 by default), <service> the name they monitor the primary
under (`sentinel monitor <service> ...`), <db> the database (0 by default). The password is the
primary's (and its replicas'), not the sentinels': sentinels are asked without one.

The client asks the sentinels for the primary before each new connection, so after a failover its
connections go to the promoted replica; commands in the gap fail (the proxy answers 503), and the
next ones succeed by themselves. Lua scripts are loaded again on the new primary (redis-py's
Script reloads on NoScriptError) and pub/sub subscribes again on it (the router reconnects).
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff

from redis_deadline import DeadlinePool
from redis_deadline import DeadlineRedis

SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT = 1  # seconds: a silent sentinel is skipped for the next one, not waited on
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?$")
_SERVICE = re.compile(r"^[A-Za-z0-9._-]+$")


class SentinelUrl(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SCHEME)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The sentinels, service, database and credentials a redis+sentinel:// URL names; ValueError if malformed."""
    if not is_sentinel_url(url):
        raise ValueError(f"a Sentinel URL starts with {SCHEME}")
    rest = url.removeprefix(SCHEME)
    if "?" in rest or "#" in rest:
        raise ValueError("a Sentinel URL takes no query or fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    service, _, db = path.partition("/")
    if not _SERVICE.match(service):
        raise ValueError("a Sentinel URL names its service after the hosts: redis+sentinel://host:26379/mymaster")
    if db and not (db.isascii() and db.isdigit() and len(db) <= 5):
        raise ValueError(f"the database {db!r} is not a number")
    return SentinelUrl([_sentinel(h) for h in hosts.split(",")], service, int(db or 0), username, password)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        raise ValueError("credentials are [user]:password@ (a password without its ':' is ambiguous)")
    return unquote(user) or None, unquote(password) or None


def _sentinel(text: str) -> tuple[str, int]:
    match = _HOST_PORT.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a sentinel's host[:port]")
    port = int(match["port"] or SENTINEL_PORT)
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: the port is out of range")
    return match["host"].strip("[]"), port


class _BlockingSentinelPool(SentinelConnectionPool, DeadlinePool):
    """Sentinel's pool, bounded as the plain client's is: a command waits for a free connection."""


class _PrimaryClient(DeadlineRedis):
    """The primary's client, each call bounded (the sentinels' answers included: they are asked
    within the call that needs a connection); closing it also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.connection_pool.sentinel_manager.sentinels:
            await client.aclose()


def connect_sentinel(url: str, **pool_options) -> DeadlineRedis:
    """A client of the primary the sentinels name now, and after each failover the new one."""
    parsed = parse_sentinel_url(url)
    sentinel_options = {
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_timeout": SENTINEL_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # the next sentinel is the retry
    }
    sentinels = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_options)
    return sentinels.master_for(
        parsed.service,
        redis_class=_PrimaryClient,
        connection_pool_class=_BlockingSentinelPool,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **pool_options,
    )
