"""At most one pending call per flow, for the deadlines that look at a flow later (connect_deadline.py,
upstream_deadline.py): armed again, the earlier call is cancelled; fired or disarmed, it is forgotten,
so a flow that ends leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mitmproxy import http


class FlowTimers:
    def __init__(self, fire: Callable[[http.HTTPFlow], None]):
        self._fire = fire
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def arm(self, flow: http.HTTPFlow, delay: float) -> None:
        self.disarm(flow)
        self._timers[flow.id] = asyncio.get_running_loop().call_later(delay, self._fired, flow)

    def disarm(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def clear(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def __len__(self) -> int:
        return len(self._timers)

    def _fired(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow.id, None)
        self._fire(flow)
