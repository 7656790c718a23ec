"""At most one pending call per flow (or per whatever `key` names: connect_deadline.py keys its calls by
their server connection), for the deadlines that look at it later (connect_deadline.py,
upstream_deadline.py): armed again, the earlier call is cancelled; fired or disarmed, it is forgotten,
so a flow that ends leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def _flow_id(flow: Any) -> str:
    return flow.id


class FlowTimers:
    def __init__(self, fire: Callable[[Any], None], key: Callable[[Any], str] = _flow_id):
        self._fire = fire
        self._key = key
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def arm(self, flow: Any, delay: float) -> None:
        self.disarm(flow)
        self._timers[self._key(flow)] = asyncio.get_running_loop().call_later(delay, self._fired, flow)

    def disarm(self, flow: Any) -> None:
        timer = self._timers.pop(self._key(flow), None)
        if timer is not None:
            timer.cancel()

    def clear(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def __len__(self) -> int:
        return len(self._timers)

    def _fired(self, flow: Any) -> None:
        self._timers.pop(self._key(flow), None)
        self._fire(flow)
