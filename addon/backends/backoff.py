"""Waiting for what a start waits for (Jupyter's first answer, a Swarm task's address): try, then
sleep a delay that doubles from 50 ms up to 250 ms, and try again, until the start's time is up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from collections.abc import Callable
from typing import TypeVar

from backends import StartTimeout

T = TypeVar("T")
FIRST_DELAY = 0.05  # seconds
LONGEST_DELAY = 0.25


# (a TypeVar, not def f[T]: tests run the backends in the image's Python 3.11 too)
async def until_ready(attempt: Callable[[], Awaitable[T | None]], timeout: float, late: str) -> T:  # noqa: UP047
    """What `attempt` returns once it returns something (it raises to give up early); StartTimeout
    with the words `late` when the next try would come after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    while True:
        if (result := await attempt()) is not None:
            return result
        if time.monotonic() + delay > deadline:
            raise StartTimeout(late)
        await asyncio.sleep(delay)
        delay = min(delay * 2, LONGEST_DELAY)
