"""The Swarm backend against the real engine in single-node swarm mode (scripts/setup.sh ensure_swarm).

The host has no route into a Swarm overlay, so the full start (readiness, upload) runs in a helper
container of the project's own image that joins the overlay, with the engine's socket and this
tree mounted, as the proxy runs inside the cluster; the rest runs from the host.
"""

import asyncio
import secrets
from dataclasses import replace

import docker
import pytest

from backend_steps import in_overlay
from backends import BackendError
from backends import ImageMissing
from backends import StartTimeout
from backends.choice import choose
from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import LABEL_PREFIX
from backends.container_spec import ContainerSpec
from backends.swarm import LABEL_STACK
from backends.swarm import SwarmBackend
from backends.swarm import ensure_overlay
from e2e.conftest import IMAGE
from helpers import backend_of


@pytest.fixture(scope="module")
def engine():
    client = docker.from_env()  # no engine: this fails, it is not skipped
    swarm = client.info()["Swarm"]
    assert swarm["LocalNodeState"] == "active", "the engine is not in swarm mode: run scripts/test.sh (ensure_swarm)"
    yield client
    client.close()


def make(**changes) -> SwarmBackend:
    """A backend of a prefix of its own; `changes` may be Limits's fields or SwarmOptions'."""
    return backend_of(SwarmBackend, **{"image": IMAGE, **changes})


def managed(engine, backend: SwarmBackend) -> list:
    return engine.services.list(filters={"label": f"{LABEL_PREFIX}={backend.limits.label_prefix}"})


async def test_a_service_is_confined_as_configured_and_removed_with_its_volumes(engine):
    """What the engine runs for a started instance, and what is left once it stops (the contract
    itself, on the overlay: test_backend_contract.py)."""
    backend = make()
    await backend.network()  # the helper joins it: it must exist first
    try:
        instance, _ = in_overlay(backend, "swarm-" + secrets.token_hex(8))
    except BaseException:
        for service in managed(engine, backend):  # what the helper started before it failed
            service.remove()
        raise
    try:
        (service,) = managed(engine, backend)
        template = service.attrs["Spec"]["TaskTemplate"]
        spec, limits = template["ContainerSpec"], template["Resources"]["Limits"]
        assert template["RestartPolicy"]["Condition"] == "none"
        assert limits == {"NanoCPUs": 10**9, "MemoryBytes": 1024**3, "Pids": 256}
        assert spec["ReadOnly"] is True and spec["CapabilityDrop"] == ["ALL"] and spec["Image"].startswith("sha256:")
        mounts = {m["Target"]: m for m in spec["Mounts"]}
        no_resolver = {"Type": "bind", "Source": "/dev/null", "Target": "/etc/resolv.conf", "ReadOnly": True}
        assert mounts.pop("/etc/resolv.conf") == no_resolver and spec["DNSConfig"] == {"Nameservers": ["127.0.0.1"]}
        options = {target: m["VolumeOptions"]["DriverConfig"]["Options"]["o"] for target, m in mounts.items()}
        sizes = {target: o.split(",")[0] for target, o in options.items()}  # the Docker backend's: auto at 1g
        assert sizes == {"/home/datalab/work": "size=288m", "/tmp": "size=288m", "/dev/shm": "size=64m"}
        assert all("nr_inodes=16384" in o for o in options.values())
        assert not service.attrs["Spec"]["EndpointSpec"].get("Ports") and not service.attrs["Endpoint"].get("Ports")
        (task,) = service.tasks()
        container = engine.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
        host_config = container.attrs["HostConfig"]
        assert host_config["Memory"] == 1024**3 and host_config["PidsLimit"] == 256
        assert host_config["CapDrop"] == ["ALL"] and host_config["ReadonlyRootfs"] is True
        assert not host_config.get("Binds") and container.attrs["Config"]["User"] == "datalab"
        assert host_config["Dns"] == ["127.0.0.1"]
        looked = "cat /etc/resolv.conf; stat -c '%a %U' /dev/shm; grep -c shm /proc/mounts"
        inside = container.exec_run(["sh", "-c", looked])
        assert inside.output.decode().split() == ["1777", "root", "1"]  # resolv.conf empty; one /dev/shm, ours
        network = engine.networks.get(backend.opts.swarm_network)
        assert network.attrs["Internal"] is True and network.attrs["Attachable"] is True
        assert list(container.attrs["NetworkSettings"]["Networks"]) == [network.name]  # no ingress, no gwbridge
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        assert not await backend.could_have_given(gateway, 8888)  # (addresses of no backend: the contract)
    finally:
        await backend.stop(instance.handle)
    assert managed(engine, backend) == []
    assert len(engine.volumes.list(filters={"label": f"{LABEL_PREFIX}={backend.limits.label_prefix}"})) == 3
    for _ in range(150):  # the task's container goes a moment after its service (bounded wait, no timing asserted)
        if not engine.containers.list(all=True, filters={"id": container.id}):
            break
        await asyncio.sleep(0.2)
    await backend.stop(instance.handle)  # idempotent, and removes the in-memory volumes the task held
    assert engine.volumes.list(filters={"label": f"{LABEL_PREFIX}={backend.limits.label_prefix}"}) == []


async def test_missing_image_fails_at_once_and_leaves_no_service(engine):
    by_name = make(image="datalab-no-such-image:never")
    with pytest.raises(ImageMissing, match="scripts/build-image.sh"):
        await by_name.start("i" * 32, "t0ken")
    assert managed(engine, by_name) == []
    # An image ID the node does not hold: the task is rejected, and the start fails on that, not on a timeout.
    on_node = make(image="sha256:" + "0" * 64, start_timeout=300)
    with pytest.raises(ImageMissing, match="missing on the node"):
        await on_node.start("i" * 32, "t0ken")
    assert managed(engine, on_node) == []
    assert not engine.images.list(name="datalab-no-such-image")


async def test_a_task_that_fails_fails_the_start_at_once(engine):
    backend = make(pids_limit=1, start_timeout=300)  # tini cannot fork Jupyter: the task fails
    with pytest.raises(BackendError, match="task did not start") as raised:
        await backend.start("i" * 32, "t0ken")
    assert not isinstance(raised.value, StartTimeout) and "failed" in raised.value.detail
    assert managed(engine, backend) == []
    ours = {"label": f"{LABEL_PREFIX}={backend.limits.label_prefix}"}
    for _ in range(150):  # the task's container goes a moment after its service (bounded wait, no timing asserted)
        if not engine.containers.list(all=True, sparse=True, filters=ours):  # sparse: no inspect of one going
            break
        await asyncio.sleep(0.2)
    await backend.stop("gone-" + secrets.token_hex(4))  # any later stop removes what the failed start's task held
    assert engine.volumes.list(filters=ours) == []


async def test_no_node_matching_the_constraint_fails_at_once(engine):
    backend = make(swarm_constraint="node.labels.datalab-never==1", start_timeout=300)
    with pytest.raises(BackendError, match="no node of the swarm"):
        await backend.start("i" * 32, "t0ken")
    assert managed(engine, backend) == []


def test_an_overlay_not_ours_is_refused(engine):
    name = "datalab-swarm-test-" + secrets.token_hex(4)
    engine.networks.create(name, driver="overlay", internal=True, attachable=True)
    try:
        with pytest.raises(BackendError, match="not made by the proxy"):
            ensure_overlay(engine, name)
    finally:
        engine.networks.get(name).remove()


@pytest.mark.engine  # check() asks the engine
async def test_swarm_is_chosen_by_name_only_and_refuses_egress():
    assert choose("swarm", {})[0] is SwarmBackend
    assert choose("auto", {"instance_egress": True})[0] is not SwarmBackend
    with pytest.raises(BackendError, match="cannot be confined"):
        await make(instance_egress=True).check()


async def test_stop_leaves_services_not_ours(engine):
    backend = make()
    image = engine.images.get(IMAGE).id
    other = engine.services.create(image, ["sleep", "infinity"], labels={LABEL_PREFIX: "someone-else:"})
    try:
        await backend.stop(other.id)
        assert engine.services.get(other.id).id == other.id
    finally:
        other.remove()


def test_a_profiles_limits_and_environment_are_its_services():
    """A start given a profile's limits makes a service of them (what the engine is asked; no engine here)."""
    backend = make()
    changes = {"mem_limit": "2g", "cpus": 0.5, "pids_limit": 128, "disk_limit": "auto", "env": {"COURSE": "ml"}}
    limits = backend.resolved(replace(backend.limits, **changes))
    args = backend._service_args(ContainerSpec.from_limits(limits, "sha256:abc", "i" * 32, "t0ken", "net"))
    assert args["resources"]["Limits"] == {"NanoCPUs": 5 * 10**8, "MemoryBytes": 2 << 30, "Pids": 128}
    assert {"COURSE=ml", "DATALAB_AUTH=t0ken"} <= set(args["env"]) and args["image"] == "sha256:abc"
    assert any(m["Target"] == "/home/datalab/work" and "size=800m" in str(m) for m in args["mounts"])


def test_the_stack_is_in_an_instances_labels_and_its_volumes():
    """What the engine is asked (no engine here): the stack's label beside the prefix's, on the
    service, its container and its in-memory volumes; no stack label where the stack is unknown."""
    backend = make(swarm_stack="course-a")
    spec = ContainerSpec.from_limits(backend.resolved(backend.limits), "sha256:abc", "i" * 32, "t0ken", "net")
    args = backend._service_args(spec)
    assert args["labels"][LABEL_STACK] == "course-a" and args["container_labels"][LABEL_STACK] == "course-a"
    assert args["labels"][LABEL_PREFIX] == backend.limits.label_prefix
    volumes = [m for m in args["mounts"] if m["Type"] == "volume"]
    assert len(volumes) == 3 and all(m["VolumeOptions"]["Labels"][LABEL_STACK] == "course-a" for m in volumes)
    assert LABEL_STACK not in make()._service_args(spec)["labels"]


async def test_stacks_sharing_a_prefix_never_list_or_remove_each_others_instances(engine):
    a = make(swarm_stack="stack-a")
    b = make(swarm_stack="stack-b", label_prefix=a.limits.label_prefix)
    image = engine.images.get(IMAGE).id
    labels = {LABEL_PREFIX: a.limits.label_prefix, LABEL_STACK: "stack-a", LABEL_INSTANCE: "i" * 32}
    service = engine.services.create(image, ["sleep", "infinity"], labels=labels)
    try:
        assert [e.handle for e in await b.inventory()] == []
        await b.stop(service.id)
        assert engine.services.get(service.id).id == service.id  # not b's: left alone
        assert [e.handle for e in await a.inventory()] == [service.id]
        await a.stop(service.id)
        assert [s.id for s in engine.services.list(filters={"id": service.id})] == []
    finally:
        for left in engine.services.list(filters={"id": service.id}):
            left.remove()
