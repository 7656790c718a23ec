"""The parts built from Settings, shared by the addons: one Redis client, one backend, the service.

Rebuilt when options change (mitmweb lets you change them live); old clients are closed at exit.
"""

from __future__ import annotations

import asyncio
import logging

import store
from backends import Backend
from backends import BackendError
from backends.docker_engine import DockerBackend
from backends.docker_engine import DockerOptions
from config import Settings
from instances import Instances

log = logging.getLogger(__name__)


def docker_backend(s: Settings) -> Backend:
    return DockerBackend(
        DockerOptions(
            image=s.image,
            label_prefix=s.key_prefix,
            mem_limit=s.mem_limit,
            cpus=float(s.cpus),
            pids_limit=s.pids_limit,
            start_timeout=float(s.start_timeout),
            docker_url=s.docker_url,
        )
    )


def build_instances(s: Settings) -> Instances:
    """The instance service for these settings: also what scripts and tests use to act as the proxy would."""
    client = store.Store(store.connect(s.redis_url), s.key_prefix)
    return Instances(client, docker_backend(s), s.nonce_ttl, s.session_ttl)


async def remove_all_instances(redis_url: str, prefix: str) -> int:
    """Stop and forget every instance under the prefix (operators, benchmarks and tests clean up so)."""
    instances = build_instances(Settings(sign_key="unused", redis_url=redis_url, key_prefix=prefix))
    try:
        return await instances.remove_all()
    finally:
        await instances.store.close()


class Runtime:
    """Holds what the hooks need; `ready` is False until valid options arrived."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.instances: Instances | None = None
        self._retired: list[store.Store] = []
        self._check: asyncio.Task | None = None

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
        self.instances = build_instances(settings)

    def running(self) -> None:
        """Check the backend in the background: mitmproxy starts serving before every addon's running()
        has returned, and a slow one here delays core addons (tlsconfig) that requests need."""
        self._check = asyncio.create_task(self._check_backend())

    async def _check_backend(self) -> None:
        """Say at start-up, not on the first upload, when instances cannot start (each start says it too)."""
        if self.instances is None:
            return
        try:
            await self.instances.backend.check()
        except BackendError as e:
            log.error("datalab: instances cannot start: %s", e)

    async def done(self) -> None:
        if self._check is not None:
            self._check.cancel()
            await asyncio.gather(self._check, return_exceptions=True)
        for s in [*self._retired, *([self.store] if self.store else [])]:
            await s.close()
