"""The warm pools: keep each profile's pool_size instances (the default's: datalab_pool_size)
booted and ready, so a start only copies its upload in. One pool per profile per Redis: every proxy
refills them, and the reservation script in the store lets ready plus booting pool instances reach
the size once, whoever boots them. Pool boots use the boot slots only when no user start is waiting
for one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

import inputs
from backends import BackendError
from instances import LEASE_MARGIN
from instances import Instances
from store import Reservation

log = logging.getLogger(__name__)

CHECK_EVERY = 2.0  # seconds between looks at the pool when nothing wakes the filler
BACKOFF_FIRST = 1.0  # seconds before the pool tries again after a failed boot; doubled per failure
BACKOFF_MAX = 60.0


class PoolFiller:
    def __init__(self, instances: Instances):
        self.instances = instances
        self._boots: set[asyncio.Task] = set()
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST

    async def run(self) -> None:
        """Refill whenever a start took an instance or one ended, and every few seconds anyway."""
        wake = self.instances.pool_changed
        while True:
            try:
                await self.fill()
            except Exception as e:  # Redis or the engine away: look again later
                log.warning("datalab: cannot refill the pool now: %s", e)
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), CHECK_EVERY)
            except TimeoutError:
                pass

    async def fill(self) -> None:
        """Start as many pool boots as each profile's pool lacks, as boot slots allow."""
        for profile in self.instances.settings.profile_table.values():
            if profile.pool_size > 0:
                await self._fill(profile.name, profile.pool_size)

    async def _fill(self, profile: str, size: int) -> None:
        inst, s = self.instances, self.instances.settings
        # A boot of this loop may fail while it awaits Redis: its back-off holds for the rest of the loop.
        while time.monotonic() >= self._retry_at and inst.admission.try_acquire():
            instance_id = inputs.new_instance_id()
            try:
                got = await inst.reserve(instance_id, profile, s.start_timeout + LEASE_MARGIN, size)
            except BaseException:
                inst.admission.release()
                raise
            if got != Reservation.GRANTED:
                inst.admission.release()
                return
            task = asyncio.create_task(self._boot(instance_id, profile))
            self._boots.add(task)
            task.add_done_callback(self._boots.discard)

    async def _boot(self, instance_id: str, profile: str) -> None:
        inst = self.instances
        try:
            instance = await inst.boot(instance_id, profile)
            try:
                await inst.store.add_to_pool(instance)
            except BaseException:
                await asyncio.shield(inst.discard(instance))
                raise
            self._backoff = BACKOFF_FIRST
            log.info("instance %s ready in the pool", instance_id)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(instance_id, profile))
            raise
        except Exception as e:  # engine or Redis trouble: back off, so a missing image is not a busy loop
            self._retry_at = time.monotonic() + self._backoff
            expected = isinstance(e, (BackendError, RedisError))
            log.warning("datalab: a pool boot failed (%s); next try in %.0f s", e, self._backoff, exc_info=not expected)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            await asyncio.shield(self._release(instance_id, profile))
        finally:
            inst.admission.release()
            inst.pool_changed.set()

    async def _release(self, instance_id: str, profile: str) -> None:
        try:
            await self.instances.store.release(instance_id, profile)
        except Exception as e:  # the lease runs out by itself
            log.debug("could not release the slot of %s: %s", instance_id, e)

    async def stop(self) -> None:
        """Cancel boots in flight; each removes its container on the way out."""
        for task in list(self._boots):
            task.cancel()
        await asyncio.gather(*self._boots, return_exceptions=True)
