"""GET /datalab/health through a real proxy: 200 while Redis and the engine answer, 503 naming the
part that does not (with the proxy's own words only), and back to 200 when it returns."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import requests

from helpers import RedisServer
from helpers import wait_until

RECOVERY = 20  # seconds: Redis is back, so is health (a verdict lives 2 s, a check takes well under 2 s more)


def health(proxy) -> requests.Response:
    return requests.get(proxy.url("/datalab/health"), timeout=30)


def status_is(proxy, status: int, within: float = 30) -> requests.Response:
    """The answer once health says `status` (a verdict is reused for 2 s, so a change shows soon after)."""
    answers = wait_until(lambda: [r for r in [health(proxy)] if r.status_code == status], f"health {status}", within)
    return answers[0]  # (a list: a Response with an error status is falsy)


def test_healthy_with_redis_and_docker_up(proxy):
    r = health(proxy)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json" and r.headers["Cache-Control"] == "no-store"
    assert r.json() == {"code": "OK", "result": {"redis": "ok", "backend": "ok", "backend_name": "docker"}}
    head = requests.head(proxy.url("/datalab/health"), timeout=30)
    assert head.status_code == 200 and head.content == b""
    post = requests.post(proxy.url("/datalab/health"), timeout=30)
    assert post.status_code == 405 and post.json()["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_unhealthy_while_its_redis_is_down_then_healthy_again(make_proxy, world, tmp_path, transport):
    """Over a Unix socket (run.sh's Redis) a refused connection fails at once, without the check ever
    waiting: health must still come back when Redis does."""
    socket_dir = Path(tempfile.mkdtemp(prefix="dl-"))  # short: a socket path has a bound
    redis = RedisServer(tmp_path, unix_socket=socket_dir / "redis.sock").start()
    url = redis.url if transport == "tcp" else redis.socket_url
    try:
        p = make_proxy(prefix=world.sub("health"), redis_url=url)
        assert health(p).status_code == 200
        redis.stop()
        body = status_is(p, 503).json()
        assert body["code"] == "UNHEALTHY"
        assert body["message"] == "redis: the proxy cannot reach Redis"
        assert body["result"] == {"redis": "the proxy cannot reach Redis", "backend": "ok", "backend_name": "docker"}
        assert str(redis.port) not in body["message"] and "sock" not in body["message"]  # Redis's words: the log
        redis.start()
        assert status_is(p, 200, RECOVERY).json()["result"]["redis"] == "ok"
    finally:
        redis.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_unhealthy_when_its_docker_engine_is_unreachable(make_proxy, world):
    p = make_proxy(
        prefix=world.sub("noengine"), datalab_backend="docker", datalab_docker_url="unix:///nonexistent.sock"
    )
    r = health(p)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["code"] == "UNHEALTHY" and body["message"].startswith("backend: ")
    assert body["result"]["redis"] == "ok" and body["result"]["backend_name"] == "docker"
    assert body["result"]["backend"] != "ok"
    assert "nonexistent" not in r.text and "sock" not in r.text  # the engine's address stays in the log
