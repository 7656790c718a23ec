"""End-to-end fixtures: real mitmdump processes with the addon, a real Redis, real containers.

Nothing here is skipped: without a Docker engine or the image, these fixtures fail with the reason.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import docker
import docker.errors
import pytest
import redis as redis_sync

from backends import Limits
from backends.local_process import ProcessBackend
from backends.local_process import ProcessOptions
from e2e import browser
from e2e.proxy import Proxy

IMAGE = os.environ.get("DATALAB_IMAGE", "datalab-notebook:latest")
LABEL_PREFIX = "datalab.prefix"


@pytest.fixture(scope="session")
def docker_client():
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(f"no Docker engine answers ({e}); scripts/test.sh starts one")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing; build it with scripts/build-image.sh")
    return client


@pytest.fixture(scope="session")
def prefix():
    return f"e2e-{secrets.token_hex(4)}:"


@pytest.fixture(scope="session")
def world(redis_server, docker_client, prefix):
    """What a test may inspect: the containers and Redis keys made under this run's prefix."""
    world = World(docker_client, redis_sync.Redis.from_url(redis_server.url), prefix)
    yield world
    world.scrub()


class World:
    def __init__(self, docker_client, redis_client, prefix: str):
        self.docker = docker_client
        self.redis = redis_client
        self.prefix = prefix
        self.prefixes = {prefix}

    def sub(self, name: str) -> str:
        """Another prefix of this run that no key pattern of the main prefix matches."""
        return f"{self.prefix[:-1]}-{name}:"

    def containers(self, prefix: str | None = None) -> list:
        label = f"{LABEL_PREFIX}={prefix or self.prefix}"
        # sparse: no inspect per container, which fails for one removed while listing
        return self.docker.containers.list(all=True, sparse=True, filters={"label": label})

    def keys(self, prefix: str | None = None) -> list[bytes]:
        return self.redis.keys((prefix or self.prefix) + "*")

    def snapshot(self) -> tuple[set[str], set[bytes]]:
        """The containers and keys a request could leave behind; not a lock (a culling round's, held for
        the round whenever it runs: store.py's `lock:<name>`)."""
        held = (self.prefix + "lock:").encode()
        return {c.id for c in self.containers()}, {k for k in self.keys() if not k.startswith(held)}

    def processes(self, prefix: str | None = None) -> ProcessBackend:
        """The process backend's view of a prefix's instances (its default directory, as the tests' proxies use)."""
        return ProcessBackend(Limits(label_prefix=prefix or self.prefix), ProcessOptions())

    def scrub(self) -> None:
        """Safety net after the run: whatever a failed test left behind goes."""
        for p in self.prefixes:
            for c in self.containers(p):
                c.remove(force=True)
            backend = self.processes(p)
            for found in asyncio.run(backend.inventory()):
                asyncio.run(backend.stop(found.handle))
            for k in self.keys(p):
                self.redis.delete(k)


@pytest.fixture(scope="session")
def sign_key():
    return secrets.token_hex(16)


@pytest.fixture(scope="session")
def proxy(redis_server, world, sign_key, tmp_path_factory):
    """The shared proxy: a pool of one, so tests take pooled and cold-started instances alike."""
    options = {"datalab_pool_size": 1}
    p = Proxy(redis_server.url, world.prefix, sign_key, tmp_path_factory.mktemp("proxy"), options).start()
    yield p
    p.stop()


@pytest.fixture
def make_proxy(redis_server, world, sign_key, tmp_path_factory):
    """Start extra proxies (other options, or a 'restart'); each is stopped after the test.
    Without a pool unless asked (datalab_pool_size), so they boot no instances by themselves."""
    started: list[Proxy] = []

    def make(prefix: str | None = None, redis_url: str | None = None, tool: str = "mitmdump", **options) -> Proxy:
        prefix = prefix or world.prefix
        world.prefixes.add(prefix)
        workdir = tmp_path_factory.mktemp("proxy")
        options = {"datalab_pool_size": 0, **options}
        p = Proxy(redis_url or redis_server.url, prefix, sign_key, workdir, options, tool).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A real headless Chromium (e2e/browser.py), one per test module; fails, with what is missing,
    when Chromium or its driver is not installed."""
    try:
        driver = browser.start_chromium(tmp_path_factory.mktemp("chromium"))
    except Exception as e:  # RuntimeError (not installed) or Selenium's WebDriverException
        pytest.fail(f"no headless Chromium: {e}")
    yield driver
    driver.quit()
