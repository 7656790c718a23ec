"""Culling and reconciliation: instances end when idle, too old, unreachable or gone, and nothing
runs that Redis does not know.

`Activity` is fed by the router on every forwarded request that is a person's doing (activity.py;
a dict write) and written to Redis in one batch every few seconds, never once per request. Code
run and terminals typed in pass as WebSocket frames, which the proxy does not read: an instance
that looks idle from here is asked what its Jupyter recorded of its kernels and terminals
(backends.jupyter.jupyter_activity), and the later of the two times is its last activity. `Culler.round` runs
at start-up and every datalab_cull_interval seconds under a Redis lock, so with several proxies
on one Redis each instance is ended by one of them, once (and counted once: datalab_culls_total).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass

import counters
from backends import Instance
from backends import InventoryEntry
from backends.jupyter import jupyter_activity
from instances import CONTAINER_GONE
from instances import Instances
from lifetime import lifetime_of
from options import option_name
from profiles import DEFAULT

log = logging.getLogger(__name__)

LOCK = "cull"
LOCK_TTL = 15.0  # seconds; renewed every third of it while a round runs
# Instances whose Jupyter a round asks at once (two connections each): thousands at once would
# run the proxy out of file descriptors, and a probe that cannot connect is no information, so an
# instance busy with a long computation would look idle.
PROBES_AT_ONCE = 100
# Instances a round ends at once: each end may stream its work archive to the work store, and a
# round that ends hundreds (a burst reaching its max age together) would run them all side by side.
ENDS_AT_ONCE = 16
FEED_HELD = 60.0  # seconds an exits feed must have lasted for its loss to be retried after 1 s again


@dataclass(frozen=True)
class Verdict:
    cause: str  # the metric's label: idle, max_age, gone or unreachable
    reason: str
    idle_since: float = 0.0  # for idleness: the end is off if newer activity was recorded meanwhile


class Activity:
    """Last traffic time per instance, kept in memory between flushes."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def touch(self, instance_id: str) -> None:
        self._seen[instance_id] = time.time()

    def take(self) -> dict[str, float]:
        seen, self._seen = self._seen, {}
        return seen

    def put_back(self, batch: dict[str, float]) -> None:
        """A batch that could not be written goes into the next one (newer times win)."""
        for instance_id, seen in batch.items():
            self._seen[instance_id] = max(seen, self._seen.get(instance_id, 0.0))


def limit_name(profile: str, field: str) -> str:
    """How an end's reason names the limit it passed: the option for the default profile, else the profile's field."""
    return option_name(field) if profile == DEFAULT else f"profile {profile!r}'s {field}"


class Culler:
    def __init__(self, instances: Instances, activity: Activity):
        self.instances = instances
        self.activity = activity
        self._probes = asyncio.Semaphore(PROBES_AT_ONCE)
        self._ends = asyncio.Semaphore(ENDS_AT_ONCE)

    @property
    def interval(self) -> float:
        return float(self.instances.settings.cull_interval)

    async def run_activity(self) -> None:
        """Write the batch of activity every few seconds (sooner with a short cull interval)."""
        every = min(5.0, self.interval / 2)
        while True:
            await asyncio.sleep(every)
            await self.flush()

    async def flush(self) -> None:
        batch = self.activity.take()
        try:
            await self.instances.store.record_activity(batch)
        except Exception as e:  # keep the batch for the next try
            self.activity.put_back(batch)
            log.warning("datalab: could not record activity: %s", e)

    async def follow_exits(self) -> None:
        """End instances the moment the backend reports them exited, so their sessions get 410 at once."""
        delay = 1.0
        while True:
            followed_since = time.monotonic()
            try:
                async for instance_id in self.instances.backend.exits():
                    await self.instances.end_if_gone(instance_id)
            except Exception as e:  # the engine or Redis went away: reconciliation covers the gap
                log.warning("datalab: not following instance exits (%s); retrying in %.0f s", e, delay)
            # A feed that held a while was a good one (a swarm's node events are rare: counting ids would not
            # tell): the next loss is retried at once again.
            delay = 1.0 if time.monotonic() - followed_since > FEED_HELD else delay
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as e:  # Redis or the engine away: the next round tries again
                log.warning("datalab: culling round failed: %s", e)
            await asyncio.sleep(self.interval)

    async def round(self) -> int:
        """One round if no other proxy is doing one; returns how many instances it ended.

        The lock lives LOCK_TTL seconds and is renewed while the round runs, so a proxy that dies
        mid-round holds up the others' rounds for LOCK_TTL at most."""
        store = self.instances.store
        token = await store.try_lock(LOCK, LOCK_TTL)
        if token is None:
            return 0
        keeper = asyncio.create_task(self._keep_lock(token))
        try:
            return await self._round()
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await store.unlock(LOCK, token)

    async def _keep_lock(self, token: str) -> None:
        while await self.instances.store.renew_lock(LOCK, token, LOCK_TTL):
            await asyncio.sleep(LOCK_TTL / 3)

    async def _round(self) -> int:
        inst, store = self.instances, self.instances.store
        await self.flush()
        # Records are read before the engine is asked, and slots after: a record always predates
        # its container's listing, and a container's lease always predates the container.
        records = await inst.all()
        found = {f.instance_id: f for f in await inst.backend.inventory()}
        profiles = list(inst.settings.profile_table)
        await store.drop_expired_leases(time.time(), profiles)
        holders = await store.slot_holders(time.time())
        pooled = set(await store.pool_ids(profiles))
        activity = await store.activity()
        now = time.time()
        # Probes and ends run side by side: one silent instance must not hold up the round.
        # An instance runs its user's code and may answer anything: a verdict that fails is no
        # verdict for that one instance, never a failed round for all the others.
        verdicts = await asyncio.gather(
            *(self._verdict(r, found, pooled, activity, now) for r in records), return_exceptions=True
        )
        for record, failure in zip(records, verdicts, strict=True):
            if isinstance(failure, Exception):
                log.warning("datalab: no culling verdict for instance %s: %r", record.id, failure)
        ending = [(r, v) for r, v in zip(records, verdicts, strict=True) if isinstance(v, Verdict)]
        ends = [inst.end(r, v.reason, v.cause, decided_on=r, idle_since=v.idle_since) for r, v in ending]
        recorded = {r.id for r in records}
        orphans = [f for i, f in found.items() if i not in recorded and i not in holders]
        done = await asyncio.gather(
            *map(self._one_end, [*ends, *(inst.end_orphan(f) for f in orphans)]), return_exceptions=True
        )
        for failure in (d for d in done if isinstance(d, Exception)):
            log.warning("datalab: culling could not end an instance: %s", failure)
        for cause, ended in zip([v.cause for _, v in ending] + ["orphan"] * len(orphans), done, strict=True):
            if ended is True:
                counters.culled(cause)
        await self._sweep_work(now)
        await inst.owners.tidy(time.time())
        return sum(1 for d in done if d is True)

    async def _one_end[T](self, end: Coroutine[None, None, T]) -> T:
        async with self._ends:
            return await end

    async def _sweep_work(self, now: float) -> None:
        """Saved works past datalab_work_ttl (or deleted) go, and so do abandoned partial saves; works
        whose records expired are told (work_expired events)."""
        try:
            await self.instances.work.sweep(now)
        except OSError as e:
            log.warning("datalab: could not sweep the work store: %s", e)
        await self.instances.store.expire_works(now)

    async def _verdict(
        self,
        record: Instance,
        found: dict[str, InventoryEntry],
        pooled: set[str],
        activity: dict[str, float],
        now: float,
    ) -> Verdict | None:
        """Why the instance should end, if it should, and on which last activity an idleness verdict rests."""
        s = self.instances.settings
        life = lifetime_of(s, record.profile)
        f = found.get(record.id)
        if f is None or not f.running:
            return Verdict("gone", CONTAINER_GONE)
        if record.age(now) > life.max_age:
            return Verdict("max_age", f"older than {limit_name(record.profile, 'max_age')} ({life.max_age} s)")
        if record.id in pooled:
            return None
        last = activity.get(record.id, record.claimed or record.created)
        if now - last <= min(life.idle_timeout, s.start_timeout):
            return None  # in use by the proxy's own record: Jupyter need not be asked
        async with self._probes:
            return await self._probed_verdict(record, last, now)

    async def _probed_verdict(self, record: Instance, last: float, now: float) -> Verdict | None:
        """The verdict on an instance the proxy saw no recent use of: its Jupyter says what it recorded."""
        s = self.instances.settings
        idle_timeout = lifetime_of(s, record.profile).idle_timeout
        busy, reported = await jupyter_activity(record)
        last = max(last, min(reported or 0.0, now))  # (the instance's clock, or its user, may run ahead)
        if now - last > idle_timeout and not busy:
            why = f"idle for more than {limit_name(record.profile, 'idle_timeout')} ({idle_timeout} s)"
            return Verdict("idle", why, idle_since=last)
        if now - last > s.start_timeout and not await self.instances.store.reachable(record.id):
            return Verdict("unreachable", "no nonce or session can reach it any more", idle_since=last)
        return None
