import pytest
import redis

from helpers import RedisServer
from runtime import Runtime
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
    s = UploadSink(Runtime())
    await s.running()
    yield s
    await s.done()
