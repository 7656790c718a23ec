"""Swarm backend: one Swarm service per instance, on an internal overlay network of the proxy's own.

Chosen only by name (datalab_backend=swarm; auto never picks it): it needs a swarm manager, and the
proxy must itself sit on the overlay (a process on the host has no route to tasks there), so it is a
deployment decision, not a fallback. Each service runs one task with restart policy `none` (a
crashed instance stays gone, as with Docker), the Docker backend's labels, limits and hardening,
an optional placement constraint, and no published port (publishing would attach the task to
ingress and docker_gwbridge, i.e. give it a way out). The image is referenced by its ID, so no node
ever pulls it: a node without it rejects the task ("No such image"), which fails the start at once.
What an engine of API 1.41 (Docker 20.10) cannot set on a service: no-new-privileges (so the image
holds no set-uid or set-gid program: scripts/build-image.sh clears those bits; an operator's own image
must too, or set it daemon-wide), and a tmpfs mount's uid (so the in-memory mounts are named
volumes of the local driver, see in_memory). The in-memory mounts and the DNS settings are the
Docker backend's own (docker_engine.in_memory_mounts, no_resolver, NAMESERVERS).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import docker.utils
from docker.types import DNSConfig
from docker.types import DriverConfig
from docker.types import EndpointSpec
from docker.types import Mount
from docker.types import Resources
from docker.types import RestartPolicy

from backends import AUTH_ENV
from backends import BackendError
from backends import ImageMissing
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends import StartTimeout
from backends import option
from backends import option_error
from backends.docker_engine import JUPYTER_PORT
from backends.docker_engine import LABEL_INSTANCE
from backends.docker_engine import LABEL_PREFIX
from backends.docker_engine import NAMESERVERS
from backends.docker_engine import PROBE_TIMEOUT
from backends.docker_engine import WORK_DIR
from backends.docker_engine import DockerBackend
from backends.docker_engine import DockerOptions
from backends.docker_engine import in_memory_mounts
from backends.docker_engine import no_resolver
from backends.docker_network import LABEL_MANAGED
from backends.docker_network import MANAGED_BY
from backends.docker_network import InstanceNetwork
from backends.docker_network import refuse_unconfined
from backends.docker_network import subnet_and_gateway
from backends.jupyter import wait_ready

log = logging.getLogger(__name__)

# Task states after which the task never runs (https://docs.docker.com/engine/swarm/how-swarm-mode-works/swarm-task-states/)
ENDED = ("complete", "failed", "shutdown", "rejected", "orphaned", "remove")
UNSCHEDULABLE = "no suitable node"  # a pending task's Err when no node matches (constraint, resources)
VOLUME_SUFFIXES = {WORK_DIR: "work", "/tmp": "tmp", "/dev/shm": "shm"}  # of each in-memory mount's volume


@dataclass(frozen=True)
class SwarmOptions(DockerOptions):
    swarm_network: str = option(
        "datalab-swarm",
        "Swarm backend: the internal, attachable overlay network of instances (created when missing); "
        "the proxy's own container must join it.",
        "DATALAB_SWARM_NETWORK",
    )
    swarm_constraint: str = option(
        "", "Swarm backend: a placement constraint for instances, e.g. node.role==worker; empty: any node."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.swarm_network:
            raise option_error("swarm_network", "must name an overlay network")


def in_memory(target: str, name: str, options: str, labels: dict[str, str]) -> Mount:
    """A tmpfs at `target` with mount(2)'s own options, as a task's volume of the local driver
    (unmounted when its container ends; the engine keeps the empty volume until removed). It is
    named: without a name, Swarm's executor and the engine would each make one. A service's
    tmpfs mount cannot do it on API 1.41: it has no uid option, and the runtime resets its mode to
    the image directory's (root's 0755 for the working directory)."""
    driver = DriverConfig("local", {"type": "tmpfs", "device": "tmpfs", "o": options})
    return Mount(target, name, type="volume", no_copy=True, driver_config=driver, labels=labels)


def volume_names(service_name: str) -> dict[str, str]:
    """A service's in-memory volumes, target -> name: found from the service's name alone."""
    return {target: f"{service_name}-{suffix}" for target, suffix in VOLUME_SUFFIXES.items()}


def task_failure(task: dict[str, Any], image: str) -> BackendError | None:
    """Why a task will never serve (a BackendError to raise), or None while it may still run."""
    status = task.get("Status") or {}
    state, err = status.get("State", ""), status.get("Err", "") or status.get("Message", "")
    if "No such image" in err:
        return ImageMissing(
            "the instance image is missing on the node chosen for it; the operator must load it there",
            f"task {task.get('ID', '')[:12]}: {err} (image {image}; docker save | docker load it on every node)",
        )
    if state in ENDED:
        return BackendError("the instance's task did not start", f"task {task.get('ID', '')[:12]} {state}: {err}")
    if state == "pending" and UNSCHEDULABLE in err:
        return BackendError("no node of the swarm can run the instance", f"{err} (see datalab_swarm_constraint)")
    return None


def task_address(task: dict[str, Any], network_id: str) -> str | None:
    """The task's address on the instance overlay ("10.0.1.5/24" in the task's attachments)."""
    for attachment in task.get("NetworksAttachments") or []:
        if (attachment.get("Network") or {}).get("ID") == network_id:
            for address in attachment.get("Addresses") or []:
                return address.split("/")[0]
    return None


def ensure_overlay(client: docker.DockerClient, name: str) -> tuple[str, InstanceNetwork]:
    """The overlay's id and addresses, created (labelled, internal, attachable) when missing; one of
    that name that is not ours, not internal or not attachable is refused. Blocking: call it in a thread."""
    try:
        net = client.networks.get(name)
    except docker.errors.NotFound:
        try:
            client.networks.create(
                name, driver="overlay", internal=True, attachable=True, labels={LABEL_MANAGED: MANAGED_BY}
            )
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: another proxy created it meanwhile
                raise
        net = client.networks.get(name)
    attrs = net.attrs
    problems = [
        why
        for why, bad in (
            ("it was not made by the proxy", (attrs.get("Labels") or {}).get(LABEL_MANAGED) != MANAGED_BY),
            ("it is not an overlay", attrs.get("Driver") != "overlay"),
            ("it is not internal", attrs.get("Internal") is not True),
            ("the proxy cannot join it (not attachable)", attrs.get("Attachable") is not True),
        )
        if bad
    ]
    refuse_unconfined(name, problems)
    return net.id, InstanceNetwork(name, "", *subnet_and_gateway(name, attrs), False)


class SwarmBackend(DockerBackend):
    """The Docker backend's engine access, image check and capacity, with services instead of containers."""

    name = "swarm"
    Options = SwarmOptions

    def __init__(self, limits: Limits, opts: SwarmOptions):
        super().__init__(limits, opts)
        self._network_id = ""
        self._leftover: set[str] = set()  # volumes of removed services, in use when last tried
        self._swept = False

    @classmethod
    def probe(cls, options: SwarmOptions) -> tuple[bool, str]:
        """Whether the engine is a swarm manager; auto does not ask (choice.py leaves swarm out)."""
        try:
            client = docker.DockerClient(base_url=options.docker_url or None, timeout=PROBE_TIMEOUT)
            try:
                swarm = client.info().get("Swarm") or {}
            finally:
                client.close()
        except (docker.errors.DockerException, OSError) as e:
            return False, f"no Docker engine answers ({e})"
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            return False, "the Docker engine is not a swarm manager (docker swarm init)"
        return True, "the Docker engine is a swarm manager"

    async def check(self) -> None:
        await self._manager()
        await self._image_id()
        await self.network()
        if not self._swept:  # once per process: check() also answers health probes
            await self._sweep_volumes()
            self._swept = True

    async def _manager(self) -> None:
        client = await self.client()
        swarm = (await self._call(client.info)).get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise BackendError(
                "the container engine cannot run instances as services",
                "datalab_backend=swarm needs a swarm manager's engine (docker swarm init, or a manager's docker_url)",
            )

    async def _image_id(self) -> str:
        """The image as its ID: an ID is never pulled by any node (a name would make each node try
        the registry first). A name is resolved on this engine; an ID is taken as given (a manager
        that runs no instances need not hold the image)."""
        if self.opts.image.startswith("sha256:"):
            return self.opts.image
        client = await self.client()
        try:
            return (await self._call(client.images.get, self.opts.image)).id
        except docker.errors.NotFound as e:
            raise self._image_missing() from e

    async def network(self) -> InstanceNetwork:
        if self.opts.instance_egress:  # refused here, not in SwarmOptions: every backend's options are parsed
            raise BackendError(
                "instances cannot be confined as configured", "datalab_instance_egress is not available on swarm"
            )
        async with self._network_lock:
            if self._network is None:
                client = await self.client()
                self._network_id, self._network = await self._call(ensure_overlay, client, self.opts.swarm_network)
            return self._network

    async def capacity(self) -> int:
        """Memory of the swarm's active, ready nodes over the limit (the constraint is not weighed)."""
        client = await self.client()
        nodes = await self._call(client.nodes.list)
        memory = sum(
            n.attrs["Description"]["Resources"]["MemoryBytes"]
            for n in nodes
            if n.attrs["Status"]["State"] == "ready" and n.attrs["Spec"]["Availability"] == "active"
        )
        return max(1, memory // docker.utils.parse_bytes(self.limits.mem_limit))

    async def start(self, instance_id: str, token: str) -> Instance:
        client = await self.client()
        net = await self.network()
        image = await self._image_id()
        service = await self._call(client.services.create, **self._service_args(instance_id, token, image, net))
        try:
            host = await self._running_address(service, image)
            instance = Instance(instance_id, self.name, service.id, host, JUPYTER_PORT, "", time.time(), token)
            await wait_ready(instance, self.limits.start_timeout, lambda: self._still_starting(service, image))
            return instance
        except BaseException:
            await asyncio.shield(self._remove_quietly(service.id))
            raise

    async def _still_starting(self, service: Any, image: str) -> bool:
        """While Jupyter is not answering yet: True if the task runs, its own reason if it ended."""
        tasks = await self._call(service.tasks)
        for task in tasks:
            if failure := task_failure(task, image):
                raise failure
        return any((t.get("Status") or {}).get("State") == "running" for t in tasks)

    async def _running_address(self, service: Any, image: str) -> str:
        """Wait for the service's task to run and return its overlay address; a task that will
        never run fails at once with its reason, not at the start timeout."""
        deadline = time.monotonic() + self.limits.start_timeout
        delay = 0.05
        while True:
            for task in await self._call(service.tasks):
                if failure := task_failure(task, image):
                    raise failure
                if (task.get("Status") or {}).get("State") == "running":
                    host = task_address(task, self._network_id)
                    if not host or not self._network.holds_instance(host):
                        raise BackendError("the instance got no address on its network", f"service {service.id}")
                    return host
            if time.monotonic() + delay > deadline:
                raise StartTimeout(f"the instance's task was not running within {self.limits.start_timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _service_args(self, instance_id: str, token: str, image: str, net: InstanceNetwork) -> dict[str, Any]:
        resources = Resources(
            cpu_limit=int(self.limits.cpus * 1e9), mem_limit=docker.utils.parse_bytes(self.limits.mem_limit)
        )
        resources["Limits"]["Pids"] = self.limits.pids_limit  # API 1.41; the SDK has no argument for it
        labels = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: self.limits.label_prefix, LABEL_INSTANCE: instance_id}
        owner = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: self.limits.label_prefix}
        name = f"datalab-{secrets.token_hex(8)}"  # says nothing of the instance id (DNS answers with it)
        volumes = volume_names(name)
        return dict(
            image=image,
            name=name,
            env=[f"{AUTH_ENV}={token}"],
            labels=labels,
            container_labels=labels,
            networks=[net.name],
            endpoint_spec=EndpointSpec(mode="dnsrr", ports={}),  # no port published, no virtual IP
            restart_policy=RestartPolicy(condition="none"),
            constraints=[self.opts.swarm_constraint] if self.opts.swarm_constraint else None,
            read_only=True,
            dns_config=DNSConfig(nameservers=NAMESERVERS),
            mounts=[
                no_resolver(),
                *(
                    in_memory(target, volumes[target], options, owner)
                    for target, options in in_memory_mounts(self.limits.disk_limit).items()
                ),
            ],
            resources=resources,
            cap_drop=["ALL"],
            stop_grace_period=10**9,  # 1 s, in ns: a stopped instance is discarded (Docker's is killed at once)
        )

    async def could_have_given(self, host: str, port: int) -> bool:
        net = await self.network()
        return port == JUPYTER_PORT and net.holds_instance(host)

    async def poll(self, instance: Instance) -> bool:
        client = await self.client()
        try:
            service = await self._call(client.services.get, instance.handle)
            tasks = await self._call(service.tasks)
        except docker.errors.NotFound:
            return False
        return any((t.get("Status") or {}).get("State") == "running" for t in tasks)

    async def inventory(self) -> list[InventoryEntry]:
        client = await self.client()
        self._leftover = await self._remove_volumes(self._leftover)  # each reconciliation round, too
        found = await self._call(client.services.list, filters={"label": self._ours}, status=True)
        return [
            InventoryEntry(
                s.attrs["Spec"].get("Labels", {}).get(LABEL_INSTANCE, ""),
                s.id,
                (s.attrs.get("ServiceStatus") or {}).get("RunningTasks", 0) > 0,
            )
            for s in found
        ]

    async def exits(self):  # type: ignore[override]
        """Not followed: Swarm's service events say nothing of a task's exit; reconciliation finds it."""
        await asyncio.Event().wait()
        yield ""  # pragma: no cover

    async def _remove(self, service_id: str) -> None:
        client = await self.client()
        try:
            service = await self._call(client.services.get, service_id)
            if (service.attrs["Spec"].get("Labels") or {}).get(LABEL_PREFIX) != self.limits.label_prefix:
                log.error("datalab: refusing to remove service %s: not one of ours", service_id[:12])
                return
            await self._call(service.remove)
            self._leftover |= set(volume_names(service.name).values())
        except docker.errors.NotFound:
            pass  # already gone: that is what stop wants
        self._leftover = await self._remove_volumes(self._leftover)

    async def _remove_volumes(self, names: set[str] | list[str]) -> set[str]:
        """Remove these volumes; those still in use (a task's container goes a moment after its
        service) are returned, for the next stop to remove."""
        client = await self.client()
        kept = set()
        for name in names:
            try:
                volume = await self._call(client.volumes.get, name)
                await self._call(volume.remove)
            except docker.errors.NotFound:
                pass
            except BackendError:  # in use (409): its container is on its way out
                kept.add(name)
        return kept

    async def _sweep_volumes(self) -> None:
        """What a crashed proxy's instances left (volume prune leaves these volumes alone on 20.10)."""
        client = await self.client()
        volumes = await self._call(client.volumes.list, filters={"label": self._ours})
        await self._remove_volumes([v.name for v in volumes])
