"""The lean master's hook dispatch: only addons that have a hook get it, the index follows addons
that come and go, and an addon's failure or AddonHalt behaves as in mitmproxy's own manager."""

from __future__ import annotations

from mitmproxy import exceptions
from mitmproxy import options
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from lean import LeanMaster


class Recorder:
    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def request(self, flow) -> None:
        self.calls.append(self.name)


class AsyncRecorder(Recorder):
    async def request(self, flow) -> None:
        self.calls.append(self.name)


class Broken:
    def request(self, flow) -> None:
        raise RuntimeError("a bug in an addon")


class Halt:
    def request(self, flow) -> None:
        raise exceptions.AddonHalt()


async def test_hooks_follow_the_addons_that_come_and_go(caplog):
    master = LeanMaster(options.Options(), with_termlog=False)
    calls: list[str] = []
    first, second = Recorder("first", calls), AsyncRecorder("second", calls)
    master.addons.add(first)

    async def request() -> list[str]:
        calls.clear()
        await master.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        return list(calls)

    assert await request() == ["first"]  # the chain's mitmproxy addons have no request hook that records
    master.addons.add(Broken(), second)
    assert await request() == ["first", "second"]  # after a failing addon, the others still run
    assert "a bug in an addon" in caplog.text
    master.addons.remove(first)
    assert await request() == ["second"]
    master.addons.remove(second)
    master.addons.add(Halt(), Recorder("third", calls))
    assert await request() == []  # AddonHalt stops the chain
