"""Owners: how many instances one user of the frontend (a start's owner=) holds, capped at
datalab_max_instances_per_owner across every proxy on the Redis, and the per-owner index the
instance API lists (instance_info.py).

One Lua script decides, so two proxies never both grant an owner's last place. An owner's start
takes a lease keyed by its work id before it takes a capacity slot or a pooled instance, so a pooled
claim counts as a cold boot does. From the bind on, the instance counts while its work is live and
its record exists: the remove path (store._REMOVE) turns the work to saving and deletes the record
in the same step, so an end stops counting at once, with no second write to forget. A failed start
gives its lease back; a proxy killed mid-start leaves one that runs out. Entries that no longer
count are dropped by the script itself, at the owner's next start and by reconciliation (`tidy`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis.asyncio.client import Pipeline

from store import Store

TIDY_AT_ONCE = 200  # owners tidied in one pipeline

# KEYS: the owner's quota zset, the owner's index hash, the set of owners.
# ARGV: owner, key prefix, now, mode (reserve, peek or tidy), lease expiry, cap (0: none), work id,
# index entry JSON, index TTL.
# Counts the owner's works that are live (bound, record present) or leased and not bound yet (a start
# in flight); a work bound and ended, or whose lease ran out unbound, counts no more.
# reserve: adds a lease if under the cap (1) or writes nothing (-1); peek: the same answer, no
# write; tidy: drops what no longer counts, and index entries of works Redis forgot; answers the count.
_OWNER = """
local function bound(work)
  local raw = redis.call('GET', ARGV[2] .. 'work:' .. work)
  if not raw then
    return 'no'
  end
  local ok, w = pcall(cjson.decode, raw)
  if ok and type(w) == 'table' and w['state'] == 'live' and type(w['instance']) == 'string'
      and redis.call('EXISTS', ARGV[2] .. 'instance:' .. w['instance']) == 1 then
    return 'live'
  end
  return 'ended'
end
local now, mode = tonumber(ARGV[3]), ARGV[4]
local held = 0
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local work, score = entries[i], entries[i + 1]
  local forever = score == 'inf' or score == '+inf'
  local status = bound(work)
  if status == 'live' then
    held = held + 1
    if mode ~= 'peek' and not forever then
      redis.call('ZADD', KEYS[1], '+inf', work)
    end
  elseif status == 'no' and not forever and tonumber(score) >= now then
    held = held + 1
  elseif mode ~= 'peek' then
    redis.call('ZREM', KEYS[1], work)
  end
end
local cap = tonumber(ARGV[6])
if mode == 'peek' then
  return (cap > 0 and held >= cap) and -1 or 1
end
if mode == 'reserve' then
  if cap > 0 and held >= cap then
    return -1
  end
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[7])
  redis.call('HSET', KEYS[2], ARGV[7], ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[9])
  redis.call('SADD', KEYS[3], ARGV[1])
  return 1
end
for _, work in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[1], work) and redis.call('EXISTS', ARGV[2] .. 'work:' .. work) == 0 then
    redis.call('HDEL', KEYS[2], work)
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
end
return held
"""


@dataclass(frozen=True)
class Started:
    """An owner's start as its index keeps it: what the instance API can say before the bind."""

    filename: str
    profile: str
    created: float  # when the start took its lease

    def to_json(self) -> str:
        return json.dumps({"filename": self.filename, "profile": self.profile, "created": self.created})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Started:
        value = json.loads(raw)
        return cls(str(value.get("filename", "")), str(value.get("profile", "")), float(value.get("created", 0)))


class Owners:
    def __init__(self, store: Store):
        self.store = store
        self._script = store.redis.register_script(_OWNER)

    def _keys(self, owner: str) -> list[str]:
        return [self.store.key("owner", owner), self.store.key("owned", owner), self.store.key("owners")]

    async def _run(
        self,
        owner: str,
        now: float,
        mode: str,
        lease_until: float = 0,
        cap: int = 0,
        work: str = "",
        entry: str = "",
        ttl: int = 0,
        pipe: Pipeline | None = None,
    ) -> int:
        """The script's answer; with `pipe`, queued there (its answer comes with the pipeline's: 0 here)."""
        args = [owner, self.store.prefix, now, mode, lease_until, cap, work, entry, ttl]
        answer = await self._script(keys=self._keys(owner), args=args, client=pipe)
        return 0 if pipe is not None else int(answer)

    async def reserve(self, owner: str, work_id: str, started: Started, lease_until: float, cap: int, ttl: int) -> bool:
        """Take a place for this start (until `lease_until`, then for as long as its work is live);
        False, and nothing written, when the owner holds `cap` already (0: no cap). The index keeps
        the start for `ttl` seconds after the owner's last start."""
        answer = await self._run(owner, started.created, "reserve", lease_until, cap, work_id, started.to_json(), ttl)
        return answer == 1

    async def at_cap(self, owner: str, now: float, cap: int) -> bool:
        """Whether a start of this owner would be refused now (writes nothing)."""
        return cap > 0 and await self._run(owner, now, "peek", cap=cap) == -1

    async def release(self, owner: str, work_id: str) -> None:
        """A start that failed gives its place back (its index entry goes once the work is forgotten)."""
        await self.store.redis.zrem(self.store.key("owner", owner), work_id)

    async def held(self, owner: str, now: float) -> int:
        """How many the owner holds now, after dropping what no longer counts."""
        return await self._run(owner, now, "tidy")

    async def tidy(self, now: float) -> None:
        """Reconciliation: every owner's leases run out and ended instances dropped, without waiting
        for the owner's next start; an owner with nothing left is forgotten. TIDY_AT_ONCE owners a
        round trip: every owner of the last week is tidied each culling round."""
        owners = [raw.decode() for raw in await self.store.redis.smembers(self.store.key("owners"))]
        for first in range(0, len(owners), TIDY_AT_ONCE):
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for owner in owners[first : first + TIDY_AT_ONCE]:
                    await self._run(owner, now, "tidy", pipe=pipe)
                await pipe.execute()

    async def index(self, owner: str) -> tuple[dict[str, Started], dict[str, float]]:
        """The owner's starts the index still knows (work id -> Started) and the leases of those
        still in flight or live (work id -> lease expiry, inf once bound)."""
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.store.key("owned", owner))
            pipe.zrange(self.store.key("owner", owner), 0, -1, withscores=True)
            owned, leases = await pipe.execute()
        started = {}
        for work, raw in owned.items():
            try:
                started[work.decode()] = Started.from_json(raw)
            except (ValueError, TypeError, AttributeError):
                continue
        return started, {work.decode(): score for work, score in leases}
