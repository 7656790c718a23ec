"""Admission control: at most N instances boot at once in this process; the rest wait in line.

Booting Jupyter is CPU-bound: 40 boots at once take so long that every one times out (measured:
0 of 40 succeeded), while N at a time finish in turn. Users wait first-in first-out for at most
the queue timeout; the warm pool only boots when no user is waiting (`try_acquire`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from collections.abc import Callable


class QueueTimeout(Exception):
    """No boot slot came free within the queue timeout."""


class Admission:
    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.free = concurrency
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def try_acquire(self) -> bool:
        """A slot now, only if one is free and nobody is waiting for it (background work yields)."""
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return True
        return False

    async def acquire(self, timeout: float, queued: Callable[[int], None] | None = None) -> None:
        """Wait in line for a slot; QueueTimeout after `timeout` seconds. `queued` is told the place
        in line (1: next) when the wait begins."""
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if queued is not None:
            queued(self.waiting)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted in the same instant we gave up: pass it on
            else:
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise QueueTimeout(f"no boot slot came free within {timeout:g} s") from None
            raise

    def release(self) -> None:
        """Hand the slot to the first one still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float, queued: Callable[[int], None] | None = None) -> AsyncIterator[None]:
        await self.acquire(timeout, queued)
        try:
            yield
        finally:
            self.release()
