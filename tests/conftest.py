"""Fixtures every tier shares (a Redis, an upload sink, instance services on the fake backend), and
the tiers: each test gets one marker, `unit`, `engine`, `e2e` or `browser` (pytest.ini), from where it
is and what it uses, unless it says its own:

    browser  uses Chromium (the `chromium` fixture)
    e2e      under tests/e2e: real mitmdump processes, containers, images
    engine   runs real instances outside e2e: a Docker engine, Swarm or Jupyter processes (uses
             the `engine`, `docker_client` or `places` fixture), or is marked so itself
    unit     the rest: needs only redis-server (scripts/test.sh --quick runs these alone)
"""

import subprocess
import tempfile
from pathlib import Path

import pytest
import redis

import instances
from fake_backend import FakeBackend
from fake_backend import instances_on
from helpers import RedisServer
from instances import Instances
from runtime import Runtime
from upload import UploadSink

TIERS = ("unit", "engine", "e2e", "browser")
E2E = Path(__file__).parent / "e2e"
# Fixtures that reach a real engine: Docker, Swarm, or the Jupyter processes of the process backend.
ENGINE_FIXTURES = {"engine", "docker_client", "places"}


def tier(item: pytest.Item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    if "chromium" in fixtures:
        return "browser"
    if E2E in item.path.parents:
        return "e2e"
    return "engine" if fixtures & ENGINE_FIXTURES else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in TIERS):
            item.add_marker(tier(item))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A real Redis, emptied after each test that uses it directly."""
    yield redis_server.url
    redis.Redis.from_url(redis_server.url).flushdb()


@pytest.fixture(scope="module")
def places():
    """A directory for process instances that their own users may pass through (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="datalab-process-"))
    root.chmod(0o711)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
async def sink():
    """A listening upload sink (the loopback server refused and uploaded bodies drain into)."""
    s = UploadSink(Runtime())
    await s.running()
    yield s
    await s.done()


@pytest.fixture
async def make_instances(redis_url, tmp_path, monkeypatch):
    """Instance services (instances.py) on the real Redis over a given fake backend, as proxies of one
    family; their clients and the backends' stand-in Jupyters are closed after the test. An end's
    drain (requests routed a moment ago get their answer) is short: nothing is routed here."""
    monkeypatch.setattr(instances, "DRAIN", 0.01)
    made: list[Instances] = []

    def make(backend: FakeBackend, **changes) -> Instances:
        made.append(instances_on(redis_url, backend, str(tmp_path / "work"), **changes))
        return made[-1]

    yield make
    for service in made:
        await service.store.close()
        await service.backend.close()
