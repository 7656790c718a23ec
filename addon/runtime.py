"""The parts built from Settings, shared by the addons: one Redis client, one backend, the instance
service, and the background work that keeps instances in order (pool, culling, activity) and
delivers lifecycle events (events.py).

Rebuilt when options change (mitmweb lets you change them live); old clients are closed at exit.
Stopping the proxy stops the background work and leaves instances running: they belong to Redis
and the engine, and the next proxy carries on with them.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import exceptions

import store
from backends import BackendError
from backends import choice
from config import Settings
from config import settings_from_environment
from culler import Activity
from culler import Culler
from events import EventDelivery
from events import http_poster
from instances import Instances
from pool import PoolFiller

log = logging.getLogger(__name__)


def build_instances(s: Settings) -> Instances:
    """The instance service for these settings: also what scripts and tests use to act as the proxy would."""
    profiles = {name: profile.limits for name, profile in s.profile_table.items()}
    backend = choice.build(s.backend, s.backend_options, s.limits, profiles)
    client = store.Store(store.connect(s.redis_url, s.redis_timeout), s.key_prefix, s.events_max)
    return Instances(client, backend, s)


async def remove_all_instances(redis_url: str, prefix: str) -> int:
    """End every instance under the prefix (operators, benchmarks and tests clean up so)."""
    instances = build_instances(settings_from_environment(sign_key="unused", redis_url=redis_url, key_prefix=prefix))
    try:
        return await instances.end_all("removed by an operator")
    finally:
        await instances.store.close()


class Runtime:
    """Holds what the hooks need. `settings` is always a Settings (the defaults until valid options
    arrive); `ready` says whether valid options were applied (the parts then exist)."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.instances: Instances | None = None
        self.activity = Activity()
        self._retired: list[store.Store] = []
        self._tasks: list[asyncio.Task] = []
        self._pool: PoolFiller | None = None
        self._culler: Culler | None = None
        self._restarting: asyncio.Task | None = None
        self._running = False

    @property
    def ready(self) -> bool:
        return self.instances is not None

    @property
    def store(self) -> store.Store | None:
        return self.instances.store if self.instances else None

    def apply(self, settings: Settings) -> None:
        if self.store is not None:
            self._retired.append(self.store)
        self.settings = settings
        try:
            self.instances = build_instances(settings)
        except ValueError as e:  # a profile its backend cannot honour: at start-up, not at its first start
            raise exceptions.OptionsError(str(e)) from e
        try:
            self.instances.work.ensure_directory()
        except OSError as e:  # at start-up, not at the first end
            raise exceptions.OptionsError(f"datalab_work_dir: {e}") from e
        if self._running:  # options changed live (mitmweb): the background work follows the new parts
            self._restarting = asyncio.get_running_loop().create_task(self._restart())

    def running(self) -> None:
        """Start the background work. It runs in tasks: mitmproxy starts serving before every addon's
        running() has returned, and a slow one here delays core addons (tlsconfig) that requests need."""
        self._running = True
        self._start_tasks()

    def _start_tasks(self) -> None:
        if self.instances is None:
            return
        self._pool = PoolFiller(self.instances)
        self._culler = culler = Culler(self.instances, self.activity)
        self._tasks = [
            asyncio.create_task(self._check_backend(self.instances)),
            asyncio.create_task(self._pool.run()),
            asyncio.create_task(culler.run()),
            asyncio.create_task(culler.run_activity()),
            asyncio.create_task(culler.follow_exits()),
        ]
        if (s := self.instances.settings).events_url:  # events.py: to the frontend, never blocking a request
            delivery = EventDelivery(self.store, http_poster(s.events_url), s.events_signing_key, s.events_retry_max)
            self._tasks.append(asyncio.create_task(delivery.run()))

    async def _restart(self) -> None:
        await self._stop_tasks()
        self._start_tasks()

    async def _check_backend(self, instances: Instances) -> None:
        """Say at start-up, not on the first upload, when instances cannot start, and how many fit."""
        try:
            await instances.backend.check()
            s = instances.settings
            source = "datalab_max_instances" if s.max_instances else f"the machine's memory at {s.mem_limit} each"
            log.info(
                "datalab: up to %d instances (%s), pool of %d, %d booting at once",
                await instances.max_instances(),
                source,
                s.pool_size,
                s.boot_slots,
            )
        except BackendError as e:
            # A warning, not an error: mitmdump exits on an error logged at start-up, and the proxy
            # should rather stay up, answer 503 and recover when the engine (or image) comes.
            log.warning("datalab: instances cannot start yet: %s", e)

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._pool is not None:
            await self._pool.stop()
        if self._culler is not None:
            await self._culler.flush()  # the last few seconds of activity

    async def done(self) -> None:
        self._running = False
        await self._stop_tasks()
        for s in [*self._retired, *([self.store] if self.store else [])]:
            await s.close()
