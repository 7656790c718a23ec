"""Redis state: nonces, sessions, instances, the pool and capacity, under one key prefix, key names
built only here. Whatever several proxies might race on is one transaction or one Lua script.

<prefix>nonce:<nonce>      -> instance id        (expires after nonce_ttl)
<prefix>session:<id>       -> instance id        (expires after session_ttl; outlives its instance: 410)
<prefix>instance:<id>      -> Instance JSON      (lives until the instance ends)
<prefix>instances          -> set of recorded instance ids
<prefix>refs:<id>          -> set of the nonce and session keys naming instance <id>
<prefix>slots              -> zset id -> lease expiry: capacity. A start in flight holds a lease; a
                              recorded instance holds +inf; an expired lease frees itself.
<prefix>units              -> hash id -> what its slot weighs (its memory limit in bytes) when capacity
                              is the engine's memory; a weight whose id holds no slot is pruned
<prefix>poolboot           -> zset id -> lease expiry: the default profile's pool instances booting
<prefix>pool               -> list of the default profile's ready pooled instance ids (claimed with LPOP)
<prefix>poolboot:<profile> -> the same for each other profile (profiles.py): each its own pool
<prefix>pool:<profile>
<prefix>activity           -> zset id -> last time a person's request reached the instance
<prefix>signed:<sig>       -> a used X-SIGN      (expires when its ts is no longer acceptable: replays refused)
<prefix>work:<work>        -> WorkRecord JSON    (the user's work: live while its instance runs, then saving,
                              saved, unsaved or deleted; expires datalab_work_ttl after the end)
<prefix>ended:<id>         -> JSON {cause, work, instance: its last record} (how instance <id> ended: the
                              ended page; reconciliation saves the work of a proxy that died mid-save)
<prefix>owner:<owner>      -> zset work id -> lease expiry (+inf once bound): an owner's starts in flight and
                              live instances, capped by datalab_max_instances_per_owner (owners.py's script)
<prefix>owned:<owner>      -> hash work id -> JSON {filename, profile, created}: an owner's starts, listed by
                              the instance API while their works live (expires work_ttl after the last start)
<prefix>owners             -> set of owners with either key above (reconciliation tidies them)
<prefix>lock:<name>        -> token of the proxy doing <name> (culling) now
<prefix>events             -> pub/sub channel: "gone <id>" when an instance ends
<prefix>lifecycle          -> stream of lifecycle events (start, view, end, work_saved, work_unsaved,
                              work_expired), each written by the script that makes the change it reports;
                              capped near datalab_events_max (XADD MAXLEN ~); delivered by events.py
<prefix>expiring           -> zset work -> when its record's TTL runs out (work_expired is told from it)
<prefix>workwho            -> hash work -> JSON {instance, owner, profile} (what its events name)
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from collections.abc import Iterable
from dataclasses import asdict
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import redis_deadline
import sentinel
from backends import Instance
from profiles import DEFAULT

log = logging.getLogger(__name__)

ENDED_EVENT = "gone"  # the event kind for an ended instance (also spelled in the _REMOVE script)
FOREVER = "+inf"
EVENTS_MAX = 100_000  # events the lifecycle stream keeps, about (datalab_events_max)
VIEWS_TOLD = 16  # sessions of one instance told as view events; more are opened untold
EXPIRED_PER_CALL = 500  # work expiries told by one call of Store.expire_works (the rest: next round)

# Lua, put before the scripts that tell events: the text fields of a JSON object (an instance's record,
# a work's who), '' where one is absent or not text.
_TEXT_OF = """
local function text_of(raw)
  local ok, decoded = pcall(cjson.decode, raw or '{}')
  if not ok or type(decoded) ~= 'table' then
    decoded = {}
  end
  return function(name)
    local value = decoded[name]
    return type(value) == 'string' and value or ''
  end
end
"""

# KEYS: slots, pool, poolboot (the profile's), units. ARGV: id, now, lease expiry, capacity, pool size
# (-1: not a pool boot), weight ('' = every slot weighs one: capacity is a count).
# Drops expired leases, then takes a slot if capacity (and, for a pool boot, the pool's size) allows.
# Weighed, the slots' weights are summed (one without a weight weighs as much as this one), and the
# first slot is always granted (an engine smaller than one instance still runs one).
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[2])
local pool_size = tonumber(ARGV[5])
if pool_size >= 0 and redis.call('LLEN', KEYS[2]) + redis.call('ZCARD', KEYS[3]) >= pool_size then
  return 0
end
if ARGV[6] == '' then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
    return -1
  end
else
  local weight = tonumber(ARGV[6])
  local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
  local used = 0
  for first = 1, #ids, 1000 do
    local batch = {unpack(ids, first, math.min(first + 999, #ids))}
    for _, w in ipairs(redis.call('HMGET', KEYS[4], unpack(batch))) do
      used = used + (tonumber(w) or weight)
    end
  end
  if used > 0 and used + weight > tonumber(ARGV[4]) then
    return -1
  end
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[6])
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
if pool_size >= 0 then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
return 1
"""

# KEYS: units, slots. Forgets the weights of ids that hold no slot any more.
_PRUNE_UNITS = """
local gone = 0
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('HDEL', KEYS[1], id)
    gone = gone + 1
  end
end
return gone
"""

# KEYS: pool, activity. ARGV: now. Takes the oldest pool instance and stamps its activity in one
# step, so culling never sees a claimed instance as neither pooled nor in use.
_CLAIM = """
local id = redis.call('LPOP', KEYS[1])
if id then
  redis.call('ZADD', KEYS[2], ARGV[1], id)
end
return id
"""

# KEYS: slots, instance record, instances, activity, nonce, refs, work, lifecycle, expiring, workwho.
# ARGV: id, record, now, nonce TTL, work record ('' = none), work TTL, events max, work id, work's who
# (JSON), then the start event's fields and values.
# Records a claimed instance with its first nonce and its work, unless it lost its slot (it was ended
# meanwhile), and its start event with it.
_BIND = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[1], '+inf', ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[4])
redis.call('SADD', KEYS[6], KEYS[5])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[7], ARGV[5], 'EX', ARGV[6])
  redis.call('ZADD', KEYS[9], tonumber(ARGV[3]) + tonumber(ARGV[6]), ARGV[8])
  redis.call('HSET', KEYS[10], ARGV[8], ARGV[9])
end
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[7], '*', unpack(ARGV, 10))
return 1
"""

# KEYS: instance record, refs, instances, slots, poolboot, activity, pool, events, ended, lifecycle, expiring.
# ARGV: id, nonce key prefix, expected record ('' = any), idle since ('' = no check), cause ('' = none:
# an instance no user held), ended TTL, slot lease while its work is saved ('' = none), work key prefix,
# work TTL, now, events max.
# Nonce keys are found in refs inside the script, so a bind or view cannot slip in between. The end is
# recorded (how, the work's state: saving, and its end event) in the same step, so no reader sees one
# without the others.
_REMOVE = (
    _TEXT_OF
    + """
local record = redis.call('GET', KEYS[1])
if ARGV[3] ~= '' and record ~= ARGV[3] then
  return 0
end
if ARGV[4] ~= '' then
  local seen = redis.call('ZSCORE', KEYS[6], ARGV[1])
  if seen and tonumber(seen) > tonumber(ARGV[4]) then
    return 0
  end
end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if string.sub(key, 1, #ARGV[2]) == ARGV[2] then
    redis.call('DEL', key)
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
if record and ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1])
else
  redis.call('ZREM', KEYS[4], ARGV[1])
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('LREM', KEYS[7], 0, ARGV[1])
redis.call('PUBLISH', KEYS[8], 'gone ' .. ARGV[1])
if not record then
  return 0
end
if ARGV[5] ~= '' then
  local text = text_of(record)
  local work = text('work')
  redis.call('SET', KEYS[9], cjson.encode({cause = ARGV[5], work = work, instance = record}), 'EX', ARGV[6])
  local raw = work ~= '' and redis.call('GET', ARGV[8] .. work)
  if raw then
    local w = cjson.decode(raw)
    w['state'] = 'saving'
    w['ended'] = ARGV[5]
    w['ended_at'] = tonumber(ARGV[10])
    redis.call('SET', ARGV[8] .. work, cjson.encode(w), 'EX', ARGV[9])
    redis.call('ZADD', KEYS[11], 'XX', tonumber(ARGV[10]) + tonumber(ARGV[9]), work)
  end
  redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[11], '*', 'type', 'end', 'time', ARGV[10], 'instance', ARGV[1],
    'work', work, 'owner', text('owner'), 'profile', text('profile'), 'cause', ARGV[5])
end
return 1
"""
)

# KEYS: work record, lifecycle, expiring, workwho. ARGV: expected state, new record, TTL, work id, now,
# events max, the event this move is ('' = none). A work's state moves only from the one its writer read
# (a save never overwrites a delete, nor a delete a save in progress); its event goes with the move.
_MOVE_WORK = (
    _TEXT_OF
    + """
local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
local ok, decoded = pcall(cjson.decode, raw)
if not ok or type(decoded) ~= 'table' or decoded['state'] ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], 'XX', tonumber(ARGV[5]) + tonumber(ARGV[3]), ARGV[4])
if ARGV[7] ~= '' then
  local who = text_of(redis.call('HGET', KEYS[4], ARGV[4]))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', ARGV[7], 'time', ARGV[5],
    'instance', who('instance'), 'work', ARGV[4], 'owner', who('owner'), 'profile', who('profile'))
end
return 1
"""
)

# KEYS: expiring, workwho, lifecycle. ARGV: now, events max, work key prefix, most to tell.
# Work records expire by their TTL; the index of when each does tells their expiry as an event, once
# across all proxies (the index entry goes with the event). A TTL moved later is put back in the index.
_EXPIRE_WORKS = (
    _TEXT_OF
    + """
local told = 0
for _, work in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))) do
  local ttl = redis.call('PTTL', ARGV[3] .. work)
  if ttl > 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + ttl / 1000, work)
  else
    if ttl == -2 then
      local who = text_of(redis.call('HGET', KEYS[2], work))
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'type', 'work_expired', 'time', ARGV[1],
        'instance', who('instance'), 'work', work, 'owner', who('owner'), 'profile', who('profile'))
      told = told + 1
    end
    redis.call('ZREM', KEYS[1], work)
    redis.call('HDEL', KEYS[2], work)
  end
end
return told
"""
)

# KEYS: instance record, session, refs, lifecycle. ARGV: id, session TTL, now, events max, views told. A
# session only for a live instance; its view event goes with it (while refs holds at most `views told`).
_ADD_SESSION = (
    _TEXT_OF
    + """
local record = redis.call('GET', KEYS[1])
if not record then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[3], KEYS[2])
if redis.call('SCARD', KEYS[3]) > tonumber(ARGV[5]) then
  return 1
end
local text = text_of(record)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'type', 'view', 'time', ARGV[3], 'instance', ARGV[1],
  'work', text('work'), 'owner', text('owner'), 'profile', text('profile'))
return 1
"""
)

# KEYS: the lock. ARGV: the holder's token, TTL in ms. Extends the lock only if this holder still has it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: the lock. ARGV: the holder's token. Deletes the lock only if this holder still has it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _fields(kind: str, now: float, instance: Instance, **more: str) -> list[str | float]:
    """An event's fields and values as XADD takes them (what docs/api.md "Events" lists)."""
    fields: dict[str, str | float] = {"type": kind, "time": now, "instance": instance.id, "work": instance.work}
    fields |= {"owner": instance.owner, "profile": instance.profile, **more}
    return [part for pair in fields.items() for part in pair]


def _stream_event(ident: bytes | str, fields: dict) -> StreamEvent:
    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    return StreamEvent(text(ident), {text(k): text(v) for k, v in (fields or {}).items()})


@dataclass(frozen=True)
class WorkRecord:
    """What the proxy knows of a user's work: the instance's working directory, live while it runs,
    then saved as one tar.gz in the work store (work.py) or said to be unsaved, and why."""

    id: str
    instance: str
    state: str  # live, saving, saved, unsaved or deleted
    created: float
    ended: str = ""  # how the instance ended (a cause: stopped, idle, max_age, gone, unreachable, removed)
    ended_at: float = 0.0
    size: int = 0
    sha256: str = ""
    saved_at: float = 0.0
    why: str = ""  # unsaved: why not
    filename: str = ""  # the start's (instances.Order), so the instance API tells them after the end
    profile: str = ""
    owner: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkRecord:
        known = {k: v for k, v in json.loads(raw).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Ended:
    """How an instance ended, kept as long as its sessions may ask (the ended page says it)."""

    cause: str
    work: str  # its work's id ('' if it had none)
    instance: Instance | None = None  # its record when it ended


@dataclass(frozen=True)
class EndNote:
    """How a user's instance ends, recorded with the end itself (Store.remove_instance)."""

    cause: str
    ended_ttl: int  # seconds the end is remembered (as long as its sessions live)
    lease_until: float  # its slot is held until then while its work is saved
    work_ttl: int
    now: float


class Reservation(enum.IntEnum):
    AT_CAPACITY = -1
    POOL_FULL = 0
    GRANTED = 1


REDIS_CONNECTIONS = 32  # per client: a burst of requests shares them instead of opening one each


def connect(url: str, deadline: float = redis_deadline.DEFAULT) -> redis_deadline.DeadlineRedis:
    """One client per process. Each call ends within `deadline` seconds, retries included
    (redis_deadline.py), so a Redis outage or freeze is a quick 503; the retries within it ride out
    a dropped connection. Its connections are bounded: an unbounded pool keeps as many as requests
    ever came at once, and a call waits for one within its deadline.
    A redis+sentinel:// URL gives a client that follows the primary across failovers (sentinel.py)."""
    options = {
        "max_connections": REDIS_CONNECTIONS,
        "timeout": deadline,  # the wait for a pooled connection (the deadline cuts it anyway)
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if sentinel.is_sentinel_url(url):
        client = sentinel.connect_sentinel(url, **options)
    else:
        pool = redis_deadline.DeadlinePool.from_url(url, **options)
        client = redis_deadline.DeadlineRedis.from_pool(pool)  # the client owns the pool: closing it closes them
    client.deadline = deadline
    return client


@dataclass(frozen=True)
class StreamEvent:
    """One lifecycle event as the stream holds it: its stream id and its fields (all text)."""

    id: str
    fields: dict[str, str]


class Store:
    def __init__(self, client: redis.Redis, prefix: str, events_max: int = EVENTS_MAX):
        self.redis = client
        self.prefix = prefix
        self.events_max = events_max
        self._reserve = client.register_script(_RESERVE)
        self._unlock = client.register_script(_UNLOCK)
        self._claim = client.register_script(_CLAIM)
        self._bind_script = client.register_script(_BIND)
        self._renew = client.register_script(_RENEW)
        self._remove = client.register_script(_REMOVE)
        self._add_session = client.register_script(_ADD_SESSION)
        self._move_work = client.register_script(_MOVE_WORK)
        self._expire_works = client.register_script(_EXPIRE_WORKS)
        self._prune_units = client.register_script(_PRUNE_UNITS)

    def key(self, kind: str, ident: str = "") -> str:
        return f"{self.prefix}{kind}:{ident}" if ident else f"{self.prefix}{kind}"

    def pool_key(self, kind: str, profile: str) -> str:
        """A profile's pool (kind "pool") or its booting pool instances ("poolboot"): the default
        profile's are the keys of before there were profiles."""
        return self.key(kind) if profile == DEFAULT else self.key(kind, profile)

    # Capacity and the pool

    async def reserve(
        self,
        instance_id: str,
        now: float,
        lease: float,
        max_instances: int,
        pool_size: int = -1,
        weight: int = 0,
        profile: str = DEFAULT,
    ):
        """Take a capacity slot for an instance about to boot, held until `now + lease` unless recorded.

        Capacity is `max_instances` slots; with a `weight`, it is a sum of weights instead (the
        engine's memory in bytes, each slot its instance's memory limit), so a 4g instance takes
        as much as four 1g ones. With pool_size >= 0 this is a boot for the profile's pool: refused
        (POOL_FULL) once its ready and booting instances reach that size, whichever proxy booted them."""
        keys = [self.key("slots"), self.pool_key("pool", profile), self.pool_key("poolboot", profile)]
        args = [instance_id, now, now + lease, max_instances, pool_size, weight or ""]
        return Reservation(int(await self._reserve(keys=[*keys, self.key("units")], args=args)))

    async def release(self, instance_id: str, profile: str = DEFAULT) -> None:
        """Give back the slot of a boot that failed before the instance was recorded."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.key("slots"), instance_id)
            pipe.zrem(self.pool_key("poolboot", profile), instance_id)
            pipe.hdel(self.key("units"), instance_id)
            await pipe.execute()

    async def add_to_pool(self, instance: Instance) -> None:
        """Record a booted pool instance and make it claimable in its profile's pool, in one transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._record(pipe, instance)
            pipe.zrem(self.pool_key("poolboot", instance.profile), instance.id)
            pipe.rpush(self.pool_key("pool", instance.profile), instance.id)
            await pipe.execute()

    async def claim_pooled(self, now: float, profile: str = DEFAULT) -> Instance | None:
        """Take the profile's oldest ready pool instance: LPOP hands each one to exactly one proxy."""
        keys = [self.pool_key("pool", profile), self.key("activity")]
        while (raw_id := await self._claim(keys=keys, args=[now])) is not None:
            instance = await self.instance(raw_id.decode())
            if instance is not None:
                return instance
        return None

    async def pool_ids(self, profiles: Iterable[str] = (DEFAULT,)) -> list[str]:
        """The ready pool instances of these profiles."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for profile in profiles:
                pipe.lrange(self.pool_key("pool", profile), 0, -1)
            return [m.decode() for ids in await pipe.execute() for m in ids]

    async def drop_expired_leases(self, now: float, profiles: Iterable[str] = (DEFAULT,)) -> None:
        """Leases of starts that never finished (their proxy died): the slots are free again (and
        the weights of slots gone are forgotten)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self.key("slots"), "-inf", f"({now}")
            for profile in profiles:
                pipe.zremrangebyscore(self.pool_key("poolboot", profile), "-inf", f"({now}")
            await pipe.execute()
        await self._prune_units(keys=[self.key("units"), self.key("slots")])

    async def slot_holders(self, now: float) -> set[str]:
        """Ids holding a slot now: recorded instances and starts in flight whose lease runs."""
        return {m.decode() for m in await self.redis.zrangebyscore(self.key("slots"), now, FOREVER)}

    # Instances, nonces and sessions

    def _record(self, pipe, instance: Instance) -> None:
        pipe.set(self.key("instance", instance.id), instance.to_json())
        pipe.sadd(self.key("instances"), instance.id)
        pipe.zadd(self.key("slots"), {instance.id: FOREVER})

    async def bind(
        self, instance: Instance, nonce: str, nonce_ttl: int, now: float, work: WorkRecord | None = None, work_ttl=0
    ) -> bool:
        """Record the claimed instance (with its upload), its first nonce and its work, in one step,
        only if it still holds its slot: False when it was ended meanwhile (culled, found gone, lease
        run out), so an ended instance is never written back. The live work record lives `work_ttl`
        at most (the instance's longest life and the saved work's): an end sets its own."""
        keys = [self.key("slots"), self.key("instance", instance.id), self.key("instances"), self.key("activity")]
        keys += [self.key("nonce", nonce), self.key("refs", instance.id), self.key("work", work.id if work else "-")]
        keys += [self.key("lifecycle"), self.key("expiring"), self.key("workwho")]
        args = [instance.id, instance.to_json(), now, nonce_ttl, work.to_json() if work else "", work_ttl]
        who = {"instance": instance.id, "owner": instance.owner, "profile": instance.profile}
        args += [self.events_max, work.id if work else "", json.dumps(who)]
        args += _fields("start", now, instance, filename=instance.filename)
        return bool(await self._bind_script(keys=keys, args=args))

    async def instance(self, instance_id: str) -> Instance | None:
        raw = await self.redis.get(self.key("instance", instance_id))
        return Instance.from_json(raw) if raw is not None else None

    async def nonce_target(self, nonce: str) -> str | None:
        raw = await self.redis.get(self.key("nonce", nonce))
        return raw.decode() if raw is not None else None

    async def add_session(self, session_id: str, instance_id: str, ttl: int, now: float = 0.0) -> bool:
        """Bind a session to the instance, and tell it (a view event: the instance's first VIEWS_TOLD
        sessions only, so a nonce opened again and again does not push undelivered events out of
        the capped stream); False (and nothing written) if the instance has ended."""
        keys = [self.key("instance", instance_id), self.key("session", session_id), self.key("refs", instance_id)]
        keys += [self.key("lifecycle")]
        args = [instance_id, ttl, now or time.time(), self.events_max, VIEWS_TOLD + 1]  # refs: its nonce, too
        return bool(await self._add_session(keys=keys, args=args))

    async def spend_signature(self, signature: str, ttl: int) -> bool:
        """Mark a signature used for `ttl` seconds; False if it already was (a replay). One SET NX, so
        of any number of concurrent requests with one signature, across proxies, exactly one wins."""
        return bool(await self.redis.set(self.key("signed", signature), b"1", nx=True, ex=ttl))

    async def session_target(self, session_id: str) -> str | None:
        raw = await self.redis.get(self.key("session", session_id))
        return raw.decode() if raw is not None else None

    async def sessions_left(self, session_ids: list[str]) -> list[float | None]:
        """Seconds until each session expires (inf: never); None for one that has (or never existed).
        One round trip for all of them."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.pttl(self.key("session", session_id))
            lefts = await pipe.execute()
        return [None if left == -2 else float("inf") if left == -1 else left / 1000 for left in lefts]

    async def all_instances(self) -> list[Instance]:
        """Every recorded instance, in one round trip for the records (culling reads them each round)."""
        return list((await self.records(sorted(await self.instance_ids()))).values())

    async def records(self, ids: list[str]) -> dict[str, Instance]:
        """The records of these instances that exist (one round trip), in their order."""
        raws = await self.redis.mget([self.key("instance", i) for i in ids]) if ids else []
        found = {}
        for instance_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            try:
                found[instance_id] = Instance.from_json(raw)
            except (ValueError, TypeError) as e:  # one bad record must not hide all the others
                log.error("datalab: instance record %s is malformed (%s); ignored", instance_id, e)
        return found

    async def instance_ids(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(self.key("instances"))}

    async def instance_counts(self, profiles: Iterable[str] = (DEFAULT,)) -> tuple[int, int]:
        """(recorded, of which pooled in these profiles' pools), without reading every id: a metrics
        scrape stays O(pool)."""
        pooled = await self.pool_ids(profiles)
        recorded = await self.redis.scard(self.key("instances"))
        if not pooled:
            return recorded, 0
        return recorded, sum(await self.redis.smismember(self.key("instances"), pooled))

    async def reachable(self, instance_id: str) -> bool:
        """Whether any nonce or session still names the instance (else nobody can ever reach it)."""
        refs = await self.redis.smembers(self.key("refs", instance_id))
        return bool(refs) and await self.redis.exists(*refs) > 0

    async def remove_instance(
        self,
        instance_id: str,
        expect: Instance | None = None,
        idle_since: float = 0.0,
        end: EndNote | None = None,
        profile: str = DEFAULT,
    ) -> bool:
        """End the instance in Redis, in one step: its record and nonces go; its sessions stay
        until they expire (they then answer 410 INSTANCE_GONE). Every proxy is told to drop routes.

        With `expect`, only if the record is still that one (culling decided on it: a pooled
        instance claimed and bound since is left alone); with `idle_since`, only if no activity
        newer than that was recorded since. With `end` (a user's instance), how it ended is recorded
        and its work is marked saving, and its slot stays taken as a lease until `end.lease_until`
        (its container lives on while its work is saved; reconciliation leaves it alone until then);
        without, the slot goes. `profile`: whose pool it may be in. True if this call removed the
        record, so several proxies never both report (nor save) one end."""
        keys = [self.key(k, instance_id) for k in ("instance", "refs")]
        keys += [self.key("instances"), self.key("slots"), self.pool_key("poolboot", profile), self.key("activity")]
        keys += [self.pool_key("pool", profile), self.key("events")]
        keys += [self.key("ended", instance_id), self.key("lifecycle"), self.key("expiring")]
        guard = [expect.to_json() if expect else "", idle_since or ""]
        how = [end.cause, end.ended_ttl, end.lease_until, end.work_ttl, end.now] if end else ["", 0, "", 0, 0]
        args = [instance_id, self.key("nonce") + ":", *guard, *how[:3], self.key("work") + ":", *how[3:]]
        args += [self.events_max]
        return bool(await self._remove(keys=keys, args=args))

    async def ended(self, instance_id: str) -> Ended | None:
        raw = await self.redis.get(self.key("ended", instance_id))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            record = Instance.from_json(value["instance"]) if value.get("instance") else None
            return Ended(str(value["cause"]), str(value.get("work") or ""), record)
        except (ValueError, KeyError, TypeError):
            return None

    # The user's work

    async def work(self, work_id: str) -> WorkRecord | None:
        raw = await self.redis.get(self.key("work", work_id))
        return WorkRecord.from_json(raw) if raw is not None else None

    async def move_work(self, state: str, record: WorkRecord, ttl: int, event: str = "") -> bool:
        """Write the work's new record only if its state is still `state` (one script: a save that
        was abandoned never overwrites a delete, a delete never one in progress), with its `event`
        (work_saved, work_unsaved; '' for none) in the same step."""
        keys = [self.key("work", record.id), self.key("lifecycle"), self.key("expiring"), self.key("workwho")]
        args = [state, record.to_json(), ttl, record.id, time.time(), self.events_max, event]
        return bool(await self._move_work(keys=keys, args=args))

    async def expire_works(self, now: float) -> int:
        """Tell, as work_expired events, the works whose records expired by now (once across proxies)."""
        keys = [self.key("expiring"), self.key("workwho"), self.key("lifecycle")]
        args = [now, self.events_max, self.key("work") + ":", EXPIRED_PER_CALL]
        return int(await self._expire_works(keys=keys, args=args))

    async def works(self, work_ids: list[str]) -> dict[str, WorkRecord]:
        """The records of these works that still live (one round trip: the sweep reads them each round)."""
        raws = await self.redis.mget([self.key("work", w) for w in work_ids]) if work_ids else []
        found = {}
        for work_id, raw in zip(work_ids, raws, strict=True):
            try:
                if raw is not None:
                    found[work_id] = WorkRecord.from_json(raw)
            except (ValueError, TypeError):
                continue
        return found

    # Activity

    async def record_activity(self, last_seen: dict[str, float]) -> None:
        """One write for a batch: only moves times forward, and never revives an ended instance."""
        if last_seen:
            await self.redis.zadd(self.key("activity"), last_seen, xx=True, gt=True)

    async def last_activity(self, ids: list[str]) -> dict[str, float]:
        """The last activity recorded of these instances (those with none are left out)."""
        scores = await self.redis.zmscore(self.key("activity"), ids) if ids else []
        return {i: s for i, s in zip(ids, scores, strict=True) if s is not None}

    async def activity(self) -> dict[str, float]:
        return {m.decode(): s for m, s in await self.redis.zrange(self.key("activity"), 0, -1, withscores=True)}

    # Locks

    async def try_lock(self, name: str, ttl: float) -> str | None:
        """A token if this proxy now holds the lock (for `ttl` at most, should it die holding it)."""
        token = secrets.token_hex(8)
        return token if await self.redis.set(self.key("lock", name), token, nx=True, px=int(ttl * 1000)) else None

    async def renew_lock(self, name: str, token: str, ttl: float) -> bool:
        return bool(await self._renew(keys=[self.key("lock", name)], args=[token, int(ttl * 1000)]))

    async def unlock(self, name: str, token: str) -> None:
        await self._unlock(keys=[self.key("lock", name)], args=[token])

    # Events

    async def gone_events(self) -> AsyncIterator[str]:
        """Yield the id of each instance removed from now on; ends (raises) when Redis is lost."""
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.key("events"))
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                kind, _, ident = message["data"].decode().partition(" ")
                if kind == ENDED_EVENT and ident:
                    yield ident

    # Lifecycle events (the stream; events.py delivers them)

    async def join_event_group(self, group: str) -> None:
        """The consumer group every proxy reads the stream in (made once, from the stream's start, so
        events recorded before any proxy delivered are delivered too)."""
        try:
            await self.redis.xgroup_create(self.key("lifecycle"), group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read_events(self, group: str, consumer: str, count: int, block_ms: int, own: bool) -> list[StreamEvent]:
        """Events for this consumer: with `own`, those it was given and did not acknowledge yet (after
        a claim: in stream order; one trimmed from the stream meanwhile has no fields); else new ones,
        waiting up to `block_ms` for one."""
        answer = await self.redis.xreadgroup(
            group, consumer, {self.key("lifecycle"): "0" if own else ">"}, count=count, block=None if own else block_ms
        )
        return [_stream_event(ident, fields) for _, entries in answer or [] for ident, fields in entries]

    async def claim_events(self, group: str, consumer: str, idle_ms: int, count: int) -> int:
        """Take over the events another consumer was given and left unacknowledged for `idle_ms`
        (its proxy died or hangs); read_events(own=True) then gives them. How many were taken."""
        taken, start = 0, "0-0"
        while True:
            answer = await self.redis.xautoclaim(
                self.key("lifecycle"), group, consumer, idle_ms, start_id=start, count=count
            )
            start, claimed = answer[0], answer[1]
            taken += len(claimed)
            if start in (b"0-0", "0-0") or not claimed:
                return taken

    async def keep_events(self, group: str, consumer: str, event_ids: list[str]) -> None:
        """Reset the idle time of events this consumer still works on (so none is taken over)."""
        await self.redis.xclaim(self.key("lifecycle"), group, consumer, 0, event_ids, justid=True)

    async def ack_event(self, group: str, event_id: str) -> None:
        await self.redis.xack(self.key("lifecycle"), group, event_id)

    async def close(self) -> None:
        await self.redis.aclose()
