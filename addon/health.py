"""GET /datalab/health: whether this proxy can serve, for load balancers and operators.

Public and polled often, so it costs little and cannot be used to multiply work: each part's
check (Redis PING, the backend's `check()`) runs at most once every CACHE_FOR seconds, one at a
time, and every caller in between shares its verdict. A caller waits at most TIMEOUT for a
check; one that runs over keeps running in the background, and its verdict serves the next callers.
Verdicts are public sentences: what Redis or the engine said goes to the log, once per change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from collections.abc import Callable

from redis.exceptions import RedisError

from backends import BackendError
from instances import Instances

log = logging.getLogger(__name__)

OK = "ok"
CACHE_FOR = 2.0  # seconds a verdict is reused
TIMEOUT = 2.0  # seconds a caller waits for a check


def redis_verdict(e: Exception) -> str:
    return "the proxy cannot reach Redis" if isinstance(e, RedisError) else "the Redis check failed"


def backend_verdict(e: Exception) -> str:
    return e.public if isinstance(e, BackendError) else "the backend check failed"


class SharedCheck:
    """One part's check: at most one in flight, its verdict reused for CACHE_FOR seconds."""

    def __init__(self, name: str, check: Callable[[], Awaitable[object]], verdict_of: Callable[[Exception], str]):
        self.name = name
        self.check = check
        self.verdict_of = verdict_of
        self._task: asyncio.Task[str] | None = None
        self._verdict = OK
        self._error: Exception | None = None  # what the check that gave the verdict raised
        self._at = float("-inf")

    async def verdict(self) -> str:
        """OK, or a sentence for the public saying what is wrong."""
        if time.monotonic() - self._at < CACHE_FOR:
            return self._verdict
        if self._task is None or self._task.done():  # (a done one's verdict is the stale one above)
            self._task = asyncio.create_task(self._run())
        try:
            # shielded: a caller that gives up (or hangs up) does not cancel the others' check
            return await asyncio.wait_for(asyncio.shield(self._task), TIMEOUT)
        except TimeoutError:
            return f"no answer within {TIMEOUT:g} s"

    async def failure(self) -> Exception | None:
        """What the check raised, when the verdict (as callers of `verdict` get it) is its failure;
        None when it is OK or did not answer in time."""
        verdict = await self.verdict()
        return self._error if verdict != OK and verdict == self._verdict else None

    async def _run(self) -> str:
        error = None
        try:
            await self.check()
            verdict = OK
        except Exception as e:
            verdict, error = self.verdict_of(e), e
            if verdict != self._verdict:
                log.warning("datalab: health: %s: %s", self.name, e)
        else:
            if self._verdict != OK:
                log.info("datalab: health: %s is back", self.name)
        # The task is not cleared here: under an eager task factory (mitmproxy's) a check that never
        # waits (a refused Unix socket) ends inside create_task, before the task is even stored.
        self._verdict, self._error, self._at = verdict, error, time.monotonic()
        return verdict

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Health:
    """The health of one set of parts (rebuilt with them when options change)."""

    def __init__(self, instances: Instances):
        self.instances = instances
        self.parts = {
            "redis": SharedCheck("redis", instances.store.redis.ping, redis_verdict),
            "backend": SharedCheck("backend", instances.backend.check, backend_verdict),
        }

    async def report(self) -> tuple[int, dict]:
        """The status and JSON body: 200 OK, or 503 UNHEALTHY naming each part that failed."""
        verdicts = await asyncio.gather(*(part.verdict() for part in self.parts.values()))
        result = {**dict(zip(self.parts, verdicts, strict=True)), "backend_name": self.instances.backend.name}
        failed = [f"{name}: {verdict}" for name, verdict in zip(self.parts, verdicts, strict=True) if verdict != OK]
        if not failed:
            return 200, {"code": "OK", "result": result}
        return 503, {"code": "UNHEALTHY", "message": "; ".join(failed), "result": result}

    async def close(self) -> None:
        await asyncio.gather(*(part.close() for part in self.parts.values()))
