import pytest
import redis

from fake_backend import FakeBackend
from fake_backend import instances_on
from helpers import RedisServer
from instances import Instances
from upload import UploadSink


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


@pytest.fixture
async def sink():
    """A listening upload sink (the loopback server refused and uploaded bodies drain into)."""
    s = UploadSink()
    await s.running()
    yield s
    await s.done()


@pytest.fixture
async def make_instances(redis_url, tmp_path):
    """Instance services (instances.py) on the real Redis over a given fake backend, as proxies of one
    family; their clients and the backends' stand-in Jupyters are closed after the test."""
    made: list[Instances] = []

    def make(backend: FakeBackend, **changes) -> Instances:
        made.append(instances_on(redis_url, backend, str(tmp_path / "work"), **changes))
        return made[-1]

    yield make
    for instances in made:
        await instances.store.close()
        await instances.backend.close()
