"""Instance life: start one for an upload and issue its nonce, open sessions, remove instances.

The one place that touches both the backend and the store, so a start either leaves an instance
recorded in Redis with its nonce, or leaves nothing at all.
"""

from __future__ import annotations

import asyncio
import logging

import inputs
from backends import Backend
from backends import Instance
from store import Store

log = logging.getLogger(__name__)


class Instances:
    def __init__(self, store: Store, backend: Backend, nonce_ttl: int, session_ttl: int):
        self.store = store
        self.backend = backend
        self.nonce_ttl = nonce_ttl
        self.session_ttl = session_ttl

    async def start(self, filename: str, data: bytes | bytearray) -> str:
        """Start an instance holding the upload; return the nonce bound to it."""
        instance = await self.backend.start(inputs.new_token(), filename, data)
        nonce = inputs.new_token()
        try:
            await self.store.add_instance(instance, nonce, self.nonce_ttl)
        except BaseException:
            # Unrecorded, nobody could ever reach or remove it: take it down now.
            await asyncio.shield(self.backend.stop(instance))
            raise
        log.info("started instance %s (%s) on %s:%d", instance.id, filename, instance.host, instance.port)
        return nonce

    async def by_nonce(self, nonce: str) -> Instance | None:
        """The live instance a nonce names; None when the nonce is unknown, expired or its instance gone."""
        if not inputs.is_token(nonce):
            return None
        instance_id = await self.store.nonce_target(nonce)
        return await self.store.instance(instance_id) if instance_id else None

    async def open_session(self, instance: Instance) -> str:
        """A new browser session bound to the instance; its id goes into the cookie."""
        session_id = inputs.new_token()
        await self.store.add_session(session_id, instance.id, self.session_ttl)
        return session_id

    async def remove(self, instance: Instance) -> None:
        """Stop the instance, then forget it (in that order, so a failed stop can be retried)."""
        await self.backend.stop(instance)
        await self.store.remove_instance(instance.id)

    async def all(self) -> list[Instance]:
        """Every instance recorded under this prefix (a record may outlive a container that died)."""
        found = [await self.store.instance(i) for i in sorted(await self.store.instance_ids())]
        return [i for i in found if i is not None]

    async def remove_all(self) -> int:
        for instance in (all_ := await self.all()):
            await self.remove(instance)
        return len(all_)
