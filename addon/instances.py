"""Instance life: hand out an instance for an upload (from the warm pool, else a cold boot admitted
by capacity and the boot queue), bind its nonce, open sessions, and end instances.

The one place that touches both the backend and the store, so a start either leaves an instance
recorded in Redis with its nonce, or leaves nothing at all: a failed or abandoned start ends what
it took, and a proxy killed mid-start leaves a container whose capacity lease runs out, which
reconciliation (culler.py) then removes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable

import counters
import inputs
from admission import Admission
from admission import QueueTimeout
from backends import Backend
from backends import BackendError
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends import StartTimeout
from backends import UnpackLimits
from backends import UntrustedRecord
from backends.instance_http import http_status
from backends.memory_budget import size_bytes
from config import Settings
from owners import Owners
from owners import Started
from paths import family_name
from profiles import DEFAULT
from store import EndNote
from store import Reservation
from store import Store
from store import WorkRecord
from work import CAUSE_GONE
from work import WorkStore
from work import work_max_bytes

log = logging.getLogger(__name__)

LEASE_MARGIN = 10.0  # seconds a capacity lease outlives the longest a start may take (upload copy, binding)
DRAIN = 0.5  # seconds between forgetting a user's instance (new requests: 410) and stopping it
RETRY_AT_CAPACITY = 30  # Retry-After when every slot is taken: instances end by culling or stop
RETRY_QUEUE_FULL = 5  # Retry-After when the boot queue did not move in time
RETRY_OWNER_LIMIT = 30  # Retry-After when an owner holds its cap: its instances end by culling or stop
CONTAINER_GONE = "its container is gone or stopped"  # the end reason when the backend lost it
HANDOUT_TRIES = 2  # instances a start may take if the one it took was ended while being handed out


DEFAULT_PROFILE = DEFAULT  # the profile of a start that names none: the proxy's own settings

# Told each phase a start enters (progress.py's names: queued with its position, booting, uploading).
Progress = Callable[..., None]


def _unwatched(phase: str, **data: object) -> None:
    """The progress of a start nobody follows (its answer is the JSON one)."""


@dataclasses.dataclass(frozen=True)
class Order:
    """What a start asks for, every field covered by its signature (api.py, signing.start_subject)."""

    filename: str
    unpack: str = ""  # the archive's kind to unpack ('' = the file goes in as it is)
    profile: str = DEFAULT_PROFILE
    owner: str = ""  # the frontend's id of its user ('' = none given)


@dataclasses.dataclass(frozen=True)
class Handout:
    """What a start answers: the nonce (views, for nonce_ttl) and the work's id (outlives the instance)."""

    nonce: str
    work: str


class NoCapacity(BackendError, status=503, code="CAPACITY"):
    """No instance can start now: every slot is taken (a retry after `retry_after` seconds may find one)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class OwnerLimit(BackendError, status=429, code="OWNER_LIMIT"):
    """The start's owner holds datalab_max_instances_per_owner instances already (one may end)."""

    def __init__(self, cap: int):
        super().__init__(
            f"this owner holds its limit of instances ({cap}, datalab_max_instances_per_owner); stop one or retry later"
        )
        self.retry_after = RETRY_OWNER_LIMIT


class Instances:
    def __init__(self, store: Store, backend: Backend, settings: Settings):
        self.store = store
        self.owners = Owners(store)
        self.backend = backend
        self.settings = settings
        self.admission = Admission(settings.boot_slots)
        self.pool_changed = asyncio.Event()  # set when the pool may need refilling
        self._capacity: int | None = None
        self._memory: int | None = None
        # The biggest working directory any profile's instance has: the work store takes it.
        disk = max((each.disk_limit for each in (backend.limits, *backend.profiles.values())), key=size_bytes)
        directory = os.path.join(settings.work_dir, family_name(settings.key_prefix))
        self.work = WorkStore(
            store, directory, work_max_bytes(settings.work_max, disk), settings.work_ttl, settings.work_timeout
        )
        self.unpack_limits = UnpackLimits(settings.unpack_max_entries, size_bytes(backend.limits.disk_limit))

    def limits_of(self, profile: str) -> Limits:
        """What the backend starts the profile's instances with (the default's for a name not declared)."""
        return self.backend.profiles.get(profile) or self.backend.limits

    async def max_instances(self) -> int:
        """The option, or what the engine holds at the memory limit (asked once)."""
        if self.settings.max_instances:
            return self.settings.max_instances
        if self._capacity is None:
            self._capacity = await self.backend.capacity()
        return self._capacity

    async def allowance(self, profile: str) -> tuple[int, int]:
        """What a slot for the profile's instance is reserved against, and what it weighs there
        (store.reserve): datalab_max_instances slots, each weighing one (0: store.reserve's count);
        else the engine's memory (asked once), each its memory limit: capacity counts memory across
        profiles."""
        if self.settings.max_instances:
            return self.settings.max_instances, 0
        if self._memory is None:
            self._memory = await self.backend.memory()
        return self._memory, size_bytes(self.limits_of(profile).mem_limit)

    async def reserve(self, instance_id: str, profile: str, lease: float, pool_size: int = -1) -> Reservation:
        """A capacity slot for the profile's instance about to boot (for its pool, with pool_size)."""
        cap, weight = await self.allowance(profile)
        return await self.store.reserve(instance_id, time.time(), lease, cap, pool_size, weight, profile)

    # Starting

    @counters.timed_start
    async def start(self, order: Order, data: bytes | bytearray, progress: Progress = _unwatched) -> Handout:
        """Hand out an instance holding the upload (or, with the order's `unpack`, the archive's
        contents: zip, tar or tar.gz); return the nonce bound to it and its work's id. `progress`
        is told each phase the start enters."""
        work_id = inputs.new_token()
        await self._reserve_owner(order, work_id)
        try:
            return await self._start(order, data, work_id, progress)
        except BaseException:
            if order.owner:
                await asyncio.shield(self.owners.release(order.owner, work_id))
            raise

    async def _start(self, order: Order, data: bytes | bytearray, work_id: str, progress: Progress) -> Handout:
        for _ in range(HANDOUT_TRIES):
            instance = await self.claim_pooled(order.profile) or await self._cold_start(order.profile, progress)
            self.pool_changed.set()
            progress("uploading")
            try:
                nonce = await self._hand_out(instance, order, data, work_id)
            except BaseException:
                # Unbound, nobody could ever reach it: take it down now (also when the client left).
                await asyncio.shield(self.discard(instance))
                raise
            if nonce is not None:
                log.info("instance %s holds %s (%s:%d)", instance.id, order.filename, instance.host, instance.port)
                return Handout(nonce, work_id)
            log.info("instance %s was ended while being handed out; taking another", instance.id)
            await self.discard(instance)
        raise BackendError("every instance taken for this start was ended meanwhile; retry")

    async def _reserve_owner(self, order: Order, work_id: str) -> None:
        """An owner's start takes its place before anything else (a slot, a pooled instance): 429 at the cap."""
        if not order.owner:
            return
        s, now = self.settings, time.time()
        started = Started(order.filename, order.profile, now)
        lease_until = now + s.queue_timeout + s.start_timeout + LEASE_MARGIN
        cap = s.max_instances_per_owner
        if not await self.owners.reserve(order.owner, work_id, started, lease_until, cap, self._work_lifetime()):
            raise OwnerLimit(cap)

    def _work_lifetime(self) -> int:
        """The longest a work's record lives: its instance's longest life (the longest-lived
        profile's: a live work's record must outlive any instance), then the saved work's."""
        s = self.settings
        longest = max(profile.max_age for profile in s.profile_table.values())
        return longest + 2 * s.cull_interval + s.work_timeout + s.work_ttl

    async def owner_at_cap(self, owner: str) -> bool:
        """Whether a start of this owner would be refused now (the api asks before spending a signature)."""
        return await self.owners.at_cap(owner, time.time(), self.settings.max_instances_per_owner)

    async def _hand_out(self, instance: Instance, order: Order, data: bytes | bytearray, work_id: str) -> str | None:
        """Put the upload in and bind a nonce and the work; None if the instance was ended meanwhile."""
        if order.unpack:
            disk = size_bytes(self.limits_of(order.profile).disk_limit)  # the profile's working directory
            limits = dataclasses.replace(self.unpack_limits, max_bytes=disk)
            await self.backend.unpack(instance, order.unpack, data, limits)
        else:
            await self.backend.put_file(instance, order.filename, data)
        now = time.time()
        instance = dataclasses.replace(
            instance, filename=order.filename, claimed=now, work=work_id, profile=order.profile, owner=order.owner
        )
        work = WorkRecord(
            work_id, instance.id, "live", now, filename=order.filename, profile=order.profile, owner=order.owner
        )
        live_ttl = self._work_lifetime()  # the end sets its own
        nonce = inputs.new_token()
        return nonce if await self.store.bind(instance, nonce, self.settings.nonce_ttl, now, work, live_ttl) else None

    async def claim_pooled(self, profile: str = DEFAULT) -> Instance | None:
        """A ready instance of the profile's pool, checked alive; a dead one is ended, never handed out."""
        while (instance := await self.store.claim_pooled(time.time(), profile)) is not None:
            if not await self.trusted(instance):
                await self.end(instance, "its record names an address its backend never gives")
                continue
            if await http_status(instance.host, instance.port, "/api/status", 2.0, instance.token) == 200:
                return instance
            await self.end(instance, "found dead in the pool")
        return None

    async def _cold_start(self, profile: str, progress: Progress = _unwatched) -> Instance:
        """Boot one for this start: a capacity slot at once or 503, then a boot slot within the queue timeout."""
        s = self.settings
        instance_id = inputs.new_instance_id()
        lease = s.queue_timeout + s.start_timeout + LEASE_MARGIN
        if await self.reserve(instance_id, profile, lease) != Reservation.GRANTED:
            raise NoCapacity("every instance slot is taken; retry later", RETRY_AT_CAPACITY)
        try:
            async with self.admission.slot(s.queue_timeout, lambda place: progress("queued", position=place)):
                pooled = await self.claim_pooled(profile)  # one may have come ready while we waited
                if pooled is not None:
                    await self.store.release(instance_id)
                    return pooled
                progress("booting")
                return await self.boot(instance_id, profile)
        except QueueTimeout as e:
            await self.store.release(instance_id)
            raise NoCapacity(f"too many starts at once: {e}", RETRY_QUEUE_FULL) from e
        except BaseException:
            await asyncio.shield(self.store.release(instance_id))
            raise

    @counters.cold_boot
    async def boot(self, instance_id: str, profile: str = DEFAULT) -> Instance:
        """Boot an empty instance of the profile with a fresh token; the start timeout counts from here."""
        timeout = self.settings.start_timeout
        try:
            async with asyncio.timeout(timeout):
                instance = await self.backend.start(instance_id, inputs.new_token(), self.limits_of(profile))
                return dataclasses.replace(instance, profile=profile)
        except TimeoutError as e:
            raise StartTimeout(f"the instance did not become ready within {timeout} s") from e

    # Using and ending

    async def by_nonce(self, nonce: str) -> Instance | None:
        """The live instance a nonce names; None when the nonce is unknown, expired or its instance gone."""
        if not inputs.is_token(nonce):
            return None
        instance_id = await self.store.nonce_target(nonce)
        return await self.record(instance_id) if instance_id else None

    async def record(self, instance_id: str) -> Instance | None:
        """The instance's record, only if it names an address its backend could have given: whoever
        can write to Redis must not be able to point the proxy (and the instance secret) anywhere."""
        instance = await self.store.instance(instance_id)
        if instance is not None and not await self.trusted(instance):
            raise UntrustedRecord("the instance's record was refused; see the proxy's log")
        return instance

    async def trusted(self, instance: Instance) -> bool:
        if await self.backend.could_have_given(instance.host, instance.port):
            return True
        log.error(
            "instance %s: record names %s:%s, not an address of its backend; refused",
            instance.id,
            instance.host,
            instance.port,
        )
        return False

    async def open_session(self, instance: Instance) -> str | None:
        """A new browser session bound to the instance (its id goes into the cookie); None if it ended."""
        session_id = inputs.new_token()
        return session_id if await self.store.add_session(session_id, instance.id, self.settings.session_ttl) else None

    async def end(
        self,
        instance: Instance,
        reason: str,
        cause: str = "removed",
        decided_on: Instance | None = None,
        idle_since: float = 0.0,
    ) -> bool:
        """Forget the instance, save its user's work, then stop it. Forgetting first decides, once
        across all proxies, who ends it (and saves it), and its sessions answer 410 from then on
        (every proxy drops its routes to it); its slot stays leased while the work is saved, so a
        proxy that dies mid-save leaves a container that reconciliation saves and removes. A stop
        that fails leaves a container without a record, which reconciliation removes. Culling passes
        what it decided on (the record it read, the last activity it saw), so nothing ends for a
        reason that stopped holding. `cause` says how it ended (the ended page, the work's record).
        True if this call ended it."""
        now = time.time()
        s = self.settings
        note = EndNote(cause, s.session_ttl, self.work.lease_until(now), s.work_ttl, now) if instance.claimed else None
        if not await self.store.remove_instance(instance.id, decided_on, idle_since, note, instance.profile):
            return False
        log.info("instance %s ended: %s", instance.id, reason)
        if instance.claimed:
            await asyncio.sleep(DRAIN)  # requests routed a moment ago still get their answer
        await self._save(instance, cause)
        try:
            await self.backend.stop(instance.handle)
        except BackendError as e:
            log.warning("instance %s: container not removed yet (%s); reconciliation will", instance.id, e)
            return True
        finally:
            self.pool_changed.set()
        await self.store.release(instance.id)  # the slot leased while its work was saved
        return True

    async def _save(self, instance: Instance, cause: str) -> None:
        try:
            await self.work.save(instance, cause)
        except Exception as e:  # Redis or the store's disk: the end goes on, the record stays "saving"
            log.warning("instance %s: saving its work failed: %s", instance.id, e)

    async def end_orphan(self, found: InventoryEntry) -> bool:
        """Remove a container no record names and no lease holds (its proxy died mid-start or
        mid-save, or its record was lost); if its end was recorded and its work is still to be
        saved, save it first."""
        ended = await self.store.ended(found.instance_id)
        if ended is not None and ended.instance is not None and found.running and await self.trusted(ended.instance):
            await self._save(ended.instance, ended.cause)
        log.info("removing container %s: no instance record and no start in flight", found.handle[:12])
        await self.backend.stop(found.handle)
        return True

    async def wait_stopped(self, instance: Instance, timeout: float = 15.0) -> None:
        """For a caller that lost the race to end an instance: return once its container is going."""
        async with asyncio.timeout(timeout):
            while await self.backend.poll(instance):
                await asyncio.sleep(0.1)

    async def discard(self, instance: Instance) -> None:
        """Take down an instance no user holds (a failed or abandoned start): its container goes even
        when Redis cannot be reached."""
        try:
            await self.store.remove_instance(instance.id, profile=instance.profile)
        finally:
            await self.backend.stop(instance.handle)
            self.pool_changed.set()

    async def end_if_gone(self, instance_id: str) -> bool:
        """The instance did not answer or exited: if the backend says it is gone, end it for everyone.
        True if it is over (whoever ended it)."""
        instance = await self.store.instance(instance_id)  # (poll and end use the handle, not the address)
        if instance is None:
            return True
        if await self.backend.poll(instance):
            return False
        if await self.end(instance, CONTAINER_GONE, CAUSE_GONE):
            counters.culled("gone")  # by the proxy whose end won (every proxy may notice it)
        return True

    async def all(self) -> list[Instance]:
        """Every instance recorded under this prefix (a record may outlive a container that died),
        with addresses its backend could have given (culling probes them)."""
        return [i for i in await self.store.all_instances() if await self.trusted(i)]

    async def end_all(self, reason: str) -> int:
        for instance in (all_ := await self.all()):
            await self.end(instance, reason, "removed")
        return len(all_)
