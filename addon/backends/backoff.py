"""Growing delays between tries: `growing_delays` is the one schedule (doubling up to a longest), and
`until_ready` waits with it for what a start waits for (Jupyter's first answer, a Swarm task's
address): try, sleep 50 ms doubling up to 250 ms, try again, until the start's time is up. Event
delivery (events.py) retries a receiver on the same schedule, with its own first and longest delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from typing import TypeVar

from backends import StartTimeout

T = TypeVar("T")
FIRST_DELAY = 0.05  # seconds
LONGEST_DELAY = 0.25


def growing_delays(first: float = FIRST_DELAY, longest: float = LONGEST_DELAY) -> Iterator[float]:
    """`first`, then each twice the one before, never more than `longest`: endless."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, longest)


# (a TypeVar, not def f[T]: tests run the backends in the image's Python 3.11 too)
async def until_ready(attempt: Callable[[], Awaitable[T | None]], timeout: float, late: str) -> T:  # noqa: UP047
    """What `attempt` returns once it returns something (it raises to give up early); StartTimeout
    with the words `late` when the next try would come after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for delay in growing_delays():
        if (result := await attempt()) is not None:
            return result
        if time.monotonic() + delay > deadline:
            raise StartTimeout(late)
        await asyncio.sleep(delay)
    raise AssertionError("growing_delays never ends")
