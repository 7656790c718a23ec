"""The Docker backend against the real engine and image: failures leave nothing behind."""

import ipaddress
import secrets
from dataclasses import replace

import docker
import pytest

from backends import EngineUnavailable
from backends import ImageMissing
from backends import StartTimeout
from backends.container_spec import LABEL_PREFIX
from backends.docker_engine import DockerBackend
from backends.docker_engine import DockerOptions
from backends.docker_network import InstanceNetwork
from backends.docker_network import subnet_and_gateway
from backends.local_process import ProcessBackend
from backends.swarm import SwarmBackend
from config import Settings
from config import parse_settings
from e2e.conftest import IMAGE
from helpers import backend_of
from helpers import host_address


@pytest.fixture
def engine():
    client = docker.from_env()  # no engine: this fails, it is not skipped
    yield client
    client.close()


def make(**changes) -> DockerBackend:
    """A backend of a prefix of its own; `changes` may be Limits's fields or DockerOptions'."""
    return backend_of(DockerBackend, **{"image": IMAGE, **changes})


def managed(engine, backend: DockerBackend) -> list:
    return engine.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}={backend.limits.label_prefix}"})


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


async def test_an_instance_is_confined_as_configured_and_removed(engine):
    """What the engine runs for a started instance (the contract itself: test_backend_contract.py)."""
    backend = make()
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    try:
        (container,) = managed(engine, backend)
        host_config = container.attrs["HostConfig"]
        assert host_config["Memory"] == 1024**3 and host_config["PidsLimit"] == 256
        assert host_config["CapDrop"] == ["ALL"] and "no-new-privileges" in host_config["SecurityOpt"]
        assert host_config["ReadonlyRootfs"] is True and not host_config.get("Binds")
        sizes = {place: options.split(",")[0] for place, options in host_config["Tmpfs"].items()}
        # datalab_disk_limit=auto at 1g: (1024m - 64m of /dev/shm - 384m for Jupyter) / 2
        assert sizes == {"/home/datalab/work": "size=288m", "/tmp": "size=288m", "/dev/shm": "size=64m"}
        assert all("nr_inodes=16384" in o for o in host_config["Tmpfs"].values())
        assert host_config["Dns"] == ["127.0.0.1"]
        assert [(m["Type"], m["Source"], m["Target"], m["ReadOnly"]) for m in host_config["Mounts"]] == [
            ("bind", "/dev/null", "/etc/resolv.conf", True)
        ]
        assert not host_config.get("PortBindings") and container.attrs["Config"]["User"] == "datalab"
        network = engine.networks.get(host_config["NetworkMode"])
        assert network.attrs["Internal"] is True and list(container.attrs["NetworkSettings"]["Networks"]) == [
            network.name
        ]
        assert ipaddress.ip_address(instance.host) in ipaddress.ip_network(network.attrs["IPAM"]["Config"][0]["Subnet"])
        gateway = host_address(network.attrs["Options"]["com.docker.network.bridge.name"])  # the host's own end
        assert not await backend.could_have_given(gateway, 8888)  # (addresses of no backend: the contract)
    finally:
        await backend.stop(instance.handle)
    assert managed(engine, backend) == []


async def test_capacity_is_engine_memory_over_the_limit(engine):
    total = engine.info()["MemTotal"]
    assert await make(mem_limit="512m").capacity() == total // (512 * 1024**2)


@pytest.mark.parametrize(
    ("backend", "mem", "disk", "refused"),
    [
        ("docker", "1g", "1g", "datalab_disk_limit=1g does not fit in datalab_mem_limit=1g"),
        ("swarm", "1g", "1g", "datalab_mem_limit must be at least 2496m, or datalab_disk_limit at most 288m"),
        ("auto", "512m", "33m", "datalab_disk_limit at most 32m"),
        ("docker", "300m", "auto", "datalab_mem_limit=300m is too small for datalab_disk_limit=auto"),
        ("docker", "300m", "1m", "datalab_mem_limit must be at least 450m$"),
        ("docker", "1g", "auto", None),
        ("docker", "512m", "32m", None),
        ("docker", "3g", "1g", None),
        ("process", "1g", "4g", None),  # its disk limit is the largest file, not memory
    ],
)
def test_limits_whose_in_memory_mounts_crowd_out_jupyter_are_refused_at_start_up(backend, mem, disk, refused):
    """Filled, the working directory, /tmp and /dev/shm (memory counted against the limit) must leave
    384m for Jupyter and a kernel: a proxy whose limits do not is refused with both options named."""
    values = {**Settings(sign_key="k").__dict__, "backend": backend, "mem_limit": mem, "disk_limit": disk}
    if refused is None:
        parse_settings(values)
    else:
        with pytest.raises(ValueError, match=refused):
            parse_settings(values)


def test_disk_limit_auto_is_what_fits():
    def disk(cls, **changes):
        return cls(Settings(sign_key="k", **changes).limits, cls.Options()).limits.disk_limit

    assert disk(DockerBackend) == disk(SwarmBackend) == "288m"
    assert disk(DockerBackend, mem_limit="512m") == "32m"
    assert disk(DockerBackend, mem_limit="512m", disk_limit="8m") == "8m"
    assert disk(ProcessBackend) == "1g"  # a largest file, as before


def test_the_hosts_address_on_a_network_is_known_when_the_engine_leaves_the_gateway_out(engine):
    """Docker 20.10 leaves the gateway out of its default bridge's inspect data on a fresh engine
    ({"Subnet": "172.17.0.0/16"}): the host's address there is still never taken for an instance's."""
    bridge = engine.networks.get("bridge").attrs
    subnet, gateway = subnet_and_gateway("bridge", bridge)
    assert str(gateway) == host_address(bridge["Options"]["com.docker.network.bridge.name"])
    net = InstanceNetwork("bridge", "docker0", subnet, gateway, False)
    assert not net.holds_instance(str(gateway)) and net.holds_instance(str(gateway + 1))


async def test_a_profiles_limits_image_and_environment_are_what_its_container_gets(engine):
    backend = make()
    changes = {"mem_limit": "2g", "cpus": 0.5, "pids_limit": 128, "disk_limit": "auto", "image": IMAGE}
    limits = replace(backend.limits, **changes, env={"COURSE": "ml"})
    instance = await backend.start(secrets.token_hex(16), "t0ken", limits)
    try:
        (container,) = managed(engine, backend)
        host_config = container.attrs["HostConfig"]
        assert (host_config["Memory"], host_config["NanoCpus"], host_config["PidsLimit"]) == (2 << 30, 5 * 10**8, 128)
        assert host_config["Tmpfs"]["/home/datalab/work"].startswith("size=800m,")  # auto: what fits in 2g
        env = container.attrs["Config"]["Env"]
        assert "COURSE=ml" in env and "DATALAB_AUTH=t0ken" in env
    finally:
        await backend.stop(instance.handle)


async def test_a_profiles_missing_image_fails_the_check_by_its_name(engine):
    profiles = {"gpu": replace(make().limits, image="datalab-no-such-image:never")}
    backend = DockerBackend(make().limits, DockerOptions(image=IMAGE), profiles)
    with pytest.raises(ImageMissing) as missing:
        await backend.check()
    assert "datalab-no-such-image:never" in str(missing.value)
