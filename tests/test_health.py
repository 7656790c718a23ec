"""Health checks are shared and bounded: however many callers, one check at a time, its verdict
reused, public words only (the real parts are in tests/e2e/test_health.py)."""

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import health
from backends import BackendError
from health import SharedCheck


class Part:
    """A part whose check the test holds open, fails or passes, counting the checks made."""

    def __init__(self, failure: Exception | None = None):
        self.failure = failure
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def check(self) -> None:
        self.calls += 1
        await self.release.wait()
        if self.failure is not None:
            raise self.failure


@pytest.fixture
async def eager():
    """The loop runs tasks as mitmproxy's does: each task's first steps inside create_task."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)
    yield
    loop.set_task_factory(None)


async def test_concurrent_callers_share_one_check_and_its_verdict():
    part = Part()
    part.release.clear()
    shared = SharedCheck("part", part.check, health.backend_verdict)
    callers = [asyncio.create_task(shared.verdict()) for _ in range(50)]
    await asyncio.sleep(0)
    part.release.set()
    assert await asyncio.gather(*callers) == ["ok"] * 50
    assert await shared.verdict() == "ok"  # within CACHE_FOR: reused
    assert part.calls == 1


async def test_a_stale_verdict_is_checked_again(monkeypatch):
    monkeypatch.setattr(health, "CACHE_FOR", 0.0)
    part = Part()
    shared = SharedCheck("part", part.check, health.backend_verdict)
    assert [await shared.verdict(), await shared.verdict()] == ["ok", "ok"]
    assert part.calls == 2


async def test_a_check_that_runs_over_answers_in_time_and_is_not_repeated(monkeypatch):
    monkeypatch.setattr(health, "TIMEOUT", 0.05)
    part = Part()
    part.release.clear()
    shared = SharedCheck("part", part.check, health.backend_verdict)
    assert await shared.verdict() == "no answer within 0.05 s"
    assert await shared.verdict() == "no answer within 0.05 s"
    assert part.calls == 1  # still the one check, running on
    part.release.set()
    assert await shared.verdict() == "ok" and part.calls == 1  # it ends, and its verdict serves the next callers
    await shared.close()


@pytest.mark.parametrize(
    "failure, verdict_of, verdict",
    [
        (BackendError("the engine is away", "unix:///var/run/docker.sock: refused"), health.backend_verdict, None),
        (RuntimeError("/srv/secret/path exploded"), health.backend_verdict, "the backend check failed"),
        (RedisConnectionError("Error 111 connecting to 10.0.0.5:6379"), health.redis_verdict, None),
        (OSError("10.0.0.5 unreachable"), health.redis_verdict, "the Redis check failed"),
    ],
)
async def test_verdicts_are_public_sentences(failure, verdict_of, verdict):
    shared = SharedCheck("part", Part(failure).check, verdict_of)
    said = await shared.verdict()
    expected = verdict or (failure.public if isinstance(failure, BackendError) else "the proxy cannot reach Redis")
    assert said == expected
    assert "docker.sock" not in said and "10.0.0.5" not in said and "/srv" not in said


async def test_a_check_that_ends_inside_create_task_is_checked_again(eager, monkeypatch):
    """A refused Unix socket fails without the check ever waiting: under an eager task factory the
    check ends before create_task returns, and must not leave its verdict standing for good."""
    monkeypatch.setattr(health, "CACHE_FOR", 0.0)
    part = Part(RedisConnectionError("Error 2 connecting to /run/redis.sock"))  # release is set: never waits
    shared = SharedCheck("redis", part.check, health.redis_verdict)
    assert await shared.verdict() == "the proxy cannot reach Redis"
    part.failure = None  # Redis is back
    assert await shared.verdict() == "ok"
    assert part.calls == 2
