"""The Docker backend against the real engine and image: failures leave nothing behind."""

import asyncio
import base64
import dataclasses
import ipaddress
import os
import secrets

import docker
import pytest
import requests

from backends import AUTH_HEADER
from backends import Common
from backends import EngineUnavailable
from backends import Found
from backends import ImageMissing
from backends import StartTimeout
from backends.docker_engine import LABEL_PREFIX
from backends.docker_engine import DockerBackend
from backends.docker_engine import DockerOptions
from e2e.conftest import IMAGE


@pytest.fixture
def engine():
    client = docker.from_env()  # no engine: this fails, it is not skipped
    yield client
    client.close()


def make(**changes) -> DockerBackend:
    """A backend of a prefix of its own; `changes` may be Common's fields or DockerOptions'."""
    own = {k: changes.pop(k) for k in list(changes) if k in {f.name for f in dataclasses.fields(DockerOptions)}}
    common = Common(**{"label_prefix": f"unit-{secrets.token_hex(4)}:", **changes})
    return DockerBackend(common, DockerOptions(**{"image": IMAGE, **own}))


def managed(engine, backend: DockerBackend) -> list:
    return engine.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}={backend.common.label_prefix}"})


async def test_missing_image_is_never_pulled(engine):
    backend = make(image="datalab-no-such-image:never")
    with pytest.raises(ImageMissing, match="scripts/build-image.sh"):
        await backend.start("i" * 32, "t0ken")
    assert managed(engine, backend) == []
    assert not engine.images.list(name="datalab-no-such-image")


async def test_engine_down_is_engine_unavailable():
    backend = make(docker_url="unix:///nonexistent/docker.sock")
    with pytest.raises(EngineUnavailable, match="cannot be reached"):
        await backend.start("i" * 32, "t0ken")


async def test_readiness_timeout_removes_the_container(engine):
    backend = make(start_timeout=0.2)
    with pytest.raises(StartTimeout):
        await backend.start(secrets.token_urlsafe(16), "t0ken")
    assert managed(engine, backend) == []


async def test_start_put_file_poll_inventory_stop(engine):
    backend = make()
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    try:
        assert instance.filename == "" and instance.token == "t0ken"
        big = os.urandom(9 * 1024 * 1024 + 5)  # three contents-API chunks
        for name, data in (("a.csv", b"1,2\n"), ("empty", b""), ("blob ü.bin", big)):
            await backend.put_file(instance, name, data)
            path = "/api/contents/" + name.replace(" ", "%20").replace("ü", "%C3%BC") + "?content=1&format=base64"
            url = f"http://{instance.host}:{instance.port}{path}"
            answer = await asyncio.to_thread(requests.get, url, headers={AUTH_HEADER: "t0ken"}, timeout=30)
            assert answer.status_code == 200, answer.text[:200]
            assert base64.b64decode(answer.json()["content"]) == data
        assert await backend.inventory() == [Found(instance.id, instance.handle, True)]
        (container,) = managed(engine, backend)
        host_config = container.attrs["HostConfig"]
        assert host_config["Memory"] == 1024**3 and host_config["PidsLimit"] == 256
        assert host_config["CapDrop"] == ["ALL"] and "no-new-privileges" in host_config["SecurityOpt"]
        assert host_config["ReadonlyRootfs"] is True and not host_config.get("Binds")
        assert set(host_config["Tmpfs"]) == {"/home/datalab/work", "/tmp"}
        assert all("size=1g" in o for o in host_config["Tmpfs"].values())
        assert not host_config.get("PortBindings") and container.attrs["Config"]["User"] == "datalab"
        network = engine.networks.get(host_config["NetworkMode"])
        assert network.attrs["Internal"] is True and list(container.attrs["NetworkSettings"]["Networks"]) == [
            network.name
        ]
        assert ipaddress.ip_address(instance.host) in ipaddress.ip_network(network.attrs["IPAM"]["Config"][0]["Subnet"])
        assert await backend.could_have_given(instance.host, instance.port)
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]  # the host's own end of the network
        elsewhere = [("127.0.0.1", 6379), ("169.254.169.254", 80), (instance.host, 22), ("evil.example", 8888)]
        for forged in elsewhere + [(gateway, 8888), ("::1", 8888)]:
            assert not await backend.could_have_given(*forged)
        assert await backend.poll(instance) is True
    finally:
        await backend.stop(instance.handle)
    assert await backend.poll(instance) is False
    assert managed(engine, backend) == [] and await backend.inventory() == []
    await backend.stop(instance.handle)  # idempotent


async def test_capacity_is_engine_memory_over_the_limit(engine):
    total = engine.info()["MemTotal"]
    assert await make(mem_limit="512m").capacity() == total // (512 * 1024**2)
