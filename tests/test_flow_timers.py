"""One pending call per flow: the deadlines' timers (connect_deadline.py, upstream_deadline.py)."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy.test import tflow

from flow_timers import FlowTimers

pytestmark = pytest.mark.unit


async def test_armed_again_only_the_last_call_fires_and_then_nothing_is_held():
    fired = []
    timers = FlowTimers(fired.append)
    flow = tflow.tflow()
    timers.arm(flow, 0.01)
    timers.arm(flow, 0.02)
    await asyncio.sleep(0.1)
    assert fired == [flow]
    assert len(timers) == 0


async def test_disarmed_or_cleared_nothing_fires():
    fired = []
    timers = FlowTimers(fired.append)
    first, second = tflow.tflow(), tflow.tflow()
    timers.arm(first, 0.01)
    timers.arm(second, 0.01)
    timers.disarm(first)
    timers.disarm(first)  # again: nothing to do
    assert len(timers) == 1
    timers.clear()
    await asyncio.sleep(0.05)
    assert fired == [] and len(timers) == 0


async def test_each_flow_has_its_own_call():
    fired = []
    timers = FlowTimers(fired.append)
    flows = [tflow.tflow() for _ in range(3)]
    for each in flows:
        timers.arm(each, 0.01)
    await asyncio.sleep(0.05)
    assert sorted(f.id for f in fired) == sorted(f.id for f in flows)


async def test_calls_may_be_keyed_by_something_else_than_a_flow():
    """connect_deadline.py's: one call per server connection, given its hook's data."""
    fired = []
    timers = FlowTimers(fired.append, key=lambda pair: pair[0])
    timers.arm(("conn-1", "first"), 0.01)
    timers.arm(("conn-1", "again"), 0.01)
    timers.arm(("conn-2", "other"), 0.01)
    await asyncio.sleep(0.05)
    assert sorted(fired) == [("conn-1", "again"), ("conn-2", "other")]
