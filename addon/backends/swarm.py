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
volumes of the local driver, see in_memory). What an instance is (its labels, limits, mounts and
hardening) is the Docker backend's own ContainerSpec (container_spec.py), in a service's words here;
the flow of a start, a poll, an inventory and a stop is DockerBackend's, whose steps this class
overrides with services for containers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import docker.utils
from docker.models.services import Service
from docker.types import DNSConfig
from docker.types import DriverConfig
from docker.types import EndpointSpec
from docker.types import Mount
from docker.types import Resources
from docker.types import RestartPolicy

from backends import BackendError
from backends import ImageMissing
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends.backoff import until_ready
from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import WORK_DIR
from backends.container_spec import ContainerSpec
from backends.docker_engine import DockerBackend
from backends.docker_engine import DockerOptions
from backends.docker_network import InstanceNetwork
from backends.docker_network import made_or_found
from backends.docker_network import refuse_unconfined
from backends.docker_network import subnet_and_gateway
from backends.node_loss import instances_of
from backends.node_loss import node_lost
from backends.overlay_crypto import ENCRYPTED
from backends.overlay_crypto import encryption_note
from backends.overlay_crypto import kernel_has_esp
from backends.placement import admits
from backends.placement import parse_constraint
from backends.placement import schedulable
from backends.volume_cleanup import LABEL_CLEANUP
from backends.volume_cleanup import cleanup_job
from backends.volume_cleanup import ended
from backends.volume_cleanup import node_ids
from options import holds
from options import option

log = logging.getLogger(__name__)

# Task states after which the task never runs (https://docs.docker.com/engine/swarm/how-swarm-mode-works/swarm-task-states/)
ENDED = ("complete", "failed", "shutdown", "rejected", "orphaned", "remove")
UNSCHEDULABLE = "no suitable node"  # a pending task's Err when no node matches (constraint, resources)
LABEL_STACK = "datalab.stack"  # the proxy's stack: two stacks of one key prefix never take each other's instances
VOLUME_SUFFIXES = {WORK_DIR: "work", "/tmp": "tmp", "/dev/shm": "shm"}  # of each in-memory mount's volume


@dataclass(frozen=True)
class SwarmOptions(DockerOptions):
    swarm_network: str = option(
        "datalab-swarm",
        "Swarm backend: the internal, attachable overlay network of instances (created when missing); "
        "the proxy's own container must join it.",
        "DATALAB_SWARM_NETWORK",
        check=holds(bool, "must name an overlay network"),
    )
    swarm_constraint: str = option(
        "",
        "Swarm backend: a placement constraint for instances, e.g. node.role==worker; empty: any node. "
        "Capacity counts the memory of the nodes it admits.",
        check=lambda text: None if not text else constraint_problem(text),
    )
    swarm_stack: str = option(
        "",
        "Swarm backend: the proxy's stack, in its instances' labels: a proxy lists, stops and sweeps only its "
        "own stack's (stacks sharing datalab_key_prefix on one swarm never remove each other's instances); "
        "deploy/datalab-stack.yml sets it to the stack's name. Empty: instances of any stack of the prefix.",
        "DATALAB_SWARM_STACK",
        check=r"[A-Za-z0-9_.\-]*",
    )


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


def task_state(task: dict[str, Any]) -> str | None:
    """The task's observed state (what its node last reported)."""
    return (task.get("Status") or {}).get("State")


def task_running(task: dict[str, Any]) -> bool:
    return task_state(task) == "running"


def task_address(task: dict[str, Any], network_id: str) -> str | None:
    """The task's address on the instance overlay ("10.0.1.5/24" in the task's attachments)."""
    for attachment in task.get("NetworksAttachments") or []:
        if (attachment.get("Network") or {}).get("ID") == network_id:
            for address in attachment.get("Addresses") or []:
                return address.split("/")[0]
    return None


def ensure_overlay(client: docker.DockerClient, name: str, esp: bool | None = None) -> tuple[str, InstanceNetwork]:
    """The overlay's id and addresses, created (labelled, internal, attachable, and encrypted where
    this kernel has ESP: `esp`, see overlay_crypto.py) when missing; one of that name that is not
    ours, not internal or not attachable is refused. Says whether it is encrypted. Blocking: call it in a thread."""
    encrypted = {"options": {ENCRYPTED: ""}} if esp else {}
    net = made_or_found(client, name, driver="overlay", internal=True, attachable=True, **encrypted)
    attrs = net.attrs
    refuse_unconfined(
        name,
        attrs,
        {
            "it is not an overlay": attrs.get("Driver") != "overlay",
            "it is not internal": attrs.get("Internal") is not True,
            "the proxy cannot join it (not attachable)": attrs.get("Attachable") is not True,
        },
    )
    note = encryption_note(name, attrs.get("Options") or {}, esp)
    (log.info if ENCRYPTED in (attrs.get("Options") or {}) else log.warning)(note)
    return net.id, InstanceNetwork(name, "", *subnet_and_gateway(name, attrs), False)


def constraint_problem(text: str) -> str | None:
    """Why datalab_swarm_constraint is not a constraint the capacity can weigh, or None."""
    try:
        parse_constraint(text)
    except ValueError as e:
        return f"must be a placement constraint: {e}"
    return None


def instance_memory(nodes: list[dict[str, Any]], constraint: str) -> int:
    """Bytes of memory on the nodes (their inspect data) where an instance may run."""
    admitted = parse_constraint(constraint) if constraint else None
    return sum(n["Description"]["Resources"]["MemoryBytes"] for n in nodes if schedulable(n) and admits(admitted, n))


def is_manager(info: dict[str, Any]) -> bool:
    """Whether the engine whose `docker info` this is can create services (a swarm manager)."""
    swarm = info.get("Swarm") or {}
    return swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))


class SwarmBackend(DockerBackend):
    """The Docker backend with services instead of containers: its steps, overridden."""

    name = "swarm"
    Options = SwarmOptions
    kind = "service"

    def __init__(self, limits: Limits, opts: SwarmOptions, profiles: Mapping[str, Limits] | None = None):
        super().__init__(limits, opts, profiles)
        self._network_id = ""
        self._leftover: set[str] = set()  # volumes of removed services, in use when last tried
        self._swept = False
        self._own_node = ""

    async def exits(self) -> AsyncIterator[str]:
        """The instances on each node the swarm marks down, as it does (node_loss.py). An instance
        whose task exits on a live node is found by reconciliation: Swarm's events do not say."""
        async for event in self._events({"type": "node"}):
            node = node_lost(event)
            if node:
                # Not filtered by desired state: Swarm's orchestrator sets a down node's tasks' desired
                # state to `shutdown` in the commit that marks the node down (restart condition none:
                # no new task), before this asks; their observed state stays `running`.
                client = await self.client()
                tasks = await self._call(client.api.tasks, filters={"node": node})
                unended = [t for t in tasks if task_state(t) not in ENDED]
                for instance_id in instances_of(unended, self._family):
                    yield instance_id

    @classmethod
    def _judge(cls, client: docker.DockerClient, where: str) -> tuple[bool, str]:
        """Whether the engine is a swarm manager; auto does not ask (choice.py leaves swarm out)."""
        if not is_manager(client.info()):
            return False, "the Docker engine is not a swarm manager (docker swarm init)"
        return True, "the Docker engine is a swarm manager"

    async def _check_engine(self) -> None:
        client = await self.client()
        if not is_manager(await self._call(client.info)):
            raise BackendError(
                "the container engine cannot run instances as services",
                "datalab_backend=swarm needs a swarm manager's engine (docker swarm init, or a manager's docker_url)",
            )
        for image in self.images():
            await self._image(image)
        if not self._swept:  # once per process: check() also answers health probes
            await self._sweep_volumes()
            self._swept = True

    async def _image(self, image: str) -> str:
        """The image as its ID: an ID is never pulled by any node (a name would make each node try
        the registry first). A name is resolved on this engine; an ID is taken as given (a manager
        that runs no instances need not hold the image)."""
        if image.startswith("sha256:"):
            return image
        client = await self.client()
        try:
            return (await self._call(client.images.get, image)).id
        except docker.errors.NotFound as e:
            raise self._image_missing(image) from e

    async def _ensure_network(self, client: docker.DockerClient) -> InstanceNetwork:
        if self.opts.instance_egress:  # refused here, not in SwarmOptions: every backend's options are parsed
            raise BackendError(
                "instances cannot be confined as configured", "datalab_instance_egress is not available on swarm"
            )
        esp = await asyncio.to_thread(kernel_has_esp)
        self._network_id, net = await self._call(ensure_overlay, client, self.opts.swarm_network, esp)
        return net

    async def _confined(self) -> InstanceNetwork:
        """The overlay as it is: internal, and the host has no route into it (no firewall rule needed)."""
        return await self.network()

    async def _memory(self) -> int:
        """Memory of the swarm's active, ready nodes that the placement constraint admits: those
        that can run an instance."""
        client = await self.client()
        nodes = await self._call(client.nodes.list)
        return instance_memory([n.attrs for n in nodes], self.opts.swarm_constraint)

    async def _create(self, spec: ContainerSpec) -> Service:
        client = await self.client()
        return await self._call(client.services.create, **self._service_args(spec))

    @property
    def _family(self) -> dict[str, str]:
        """The prefix's labels, and the stack's where the proxy knows its stack."""
        stack = {LABEL_STACK: self.opts.swarm_stack} if self.opts.swarm_stack else {}
        return {**super()._family, **stack}

    def _service_args(self, spec: ContainerSpec) -> dict[str, Any]:
        labels, family = {**spec.labels, **self._family}, {**spec.family_labels, **self._family}
        resources = Resources(cpu_limit=spec.nano_cpus, mem_limit=docker.utils.parse_bytes(spec.mem_limit))
        resources["Limits"]["Pids"] = spec.pids_limit  # API 1.41; the SDK has no argument for it
        volumes = volume_names(spec.name)
        return dict(
            image=spec.image,
            name=spec.name,
            env=[f"{name}={value}" for name, value in spec.environment.items()],
            labels=labels,
            container_labels=labels,
            networks=[spec.network],
            endpoint_spec=EndpointSpec(mode="dnsrr", ports={}),  # no port published, no virtual IP
            restart_policy=RestartPolicy(condition="none"),
            constraints=[self.opts.swarm_constraint] if self.opts.swarm_constraint else None,
            read_only=spec.read_only,
            dns_config=DNSConfig(nameservers=spec.nameservers),
            mounts=[
                *spec.mounts,
                *(in_memory(target, volumes[target], options, family) for target, options in spec.in_memory.items()),
            ],
            resources=resources,
            cap_drop=spec.cap_drop,
            stop_grace_period=10**9,  # 1 s, in ns: a stopped instance is discarded (Docker's is killed at once)
        )

    async def _run(self, service: Service, spec: ContainerSpec, net: InstanceNetwork) -> str:
        """Wait for the service's task to run and return its overlay address; a task that will
        never run fails at once with its reason, not at the start timeout."""

        async def address() -> str | None:
            for task in await self._call(service.tasks):
                if failure := task_failure(task, spec.image):
                    raise failure
                if task_running(task):
                    host = task_address(task, self._network_id)
                    if not host or not net.holds_instance(host):
                        raise BackendError("the instance got no address on its network", f"service {service.id}")
                    return host
            return None

        timeout = self.limits.start_timeout
        return await until_ready(address, timeout, f"the instance's task was not running within {timeout:g} s")

    async def _starting(self, service: Service, spec: ContainerSpec, instance: Instance) -> bool:
        """While Jupyter is not answering yet: True if the task runs, its own reason if it ended."""
        tasks = await self._call(service.tasks)
        for task in tasks:
            if failure := task_failure(task, spec.image):
                raise failure
        return any(task_running(t) for t in tasks)

    async def _get(self, handle: str) -> Service:
        client = await self.client()
        return await self._call(client.services.get, handle)

    async def _alive(self, service: Service) -> bool:
        """A task that runs on a node that is not down: a node lost with its instances keeps their
        tasks `running` in the manager's record (nothing reports otherwise), as the service's
        RunningTasks, which counts only tasks on nodes that are up, does not."""
        client = await self.client()
        for task in await self._call(service.tasks):
            if task_running(task):
                try:
                    node = await self._call(client.nodes.get, task.get("NodeID", ""))
                except docker.errors.NotFound:
                    continue  # the node was removed from the swarm
                if (node.attrs.get("Status") or {}).get("State") != "down":
                    return True
        return False

    def _labels(self, service: Service) -> dict[str, str]:
        return service.attrs["Spec"].get("Labels") or {}

    async def _list(self) -> list[Service]:
        client = await self.client()
        self._leftover = await self._remove_volumes(self._leftover)  # each reconciliation round, too
        listed = await self._call(client.services.list, filters={"label": self._ours}, status=True)
        jobs = [each for each in listed if LABEL_CLEANUP in self._labels(each)]
        await self._reap(jobs)
        return [each for each in listed if LABEL_CLEANUP not in self._labels(each)]

    async def _reap(self, jobs: list[Service]) -> None:
        """Remove the volume clean-up jobs that ended (volume_cleanup.py); a failed one is logged."""
        for job in jobs:
            tasks = await self._call(job.tasks)
            if ended(tasks, ENDED):
                if any(task_state(t) != "complete" for t in tasks):
                    log.error("datalab: the volume clean-up job %s failed on its node: %s", job.name, tasks[-1])
                try:
                    await self._call(job.remove)
                except docker.errors.NotFound:
                    pass

    def _entry(self, service: Service) -> InventoryEntry:
        running = (service.attrs.get("ServiceStatus") or {}).get("RunningTasks", 0) > 0
        return InventoryEntry(self._labels(service).get(LABEL_INSTANCE, ""), service.id, running)

    async def _delete(self, service: Service) -> None:
        """Remove the service, then its volumes: this engine's own at once (or at the next round),
        another node's by a clean-up job there (volume_cleanup.py)."""
        nodes = node_ids(await self._call(service.tasks))
        image = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        await self._call(service.remove)
        volumes = sorted(volume_names(service.name).values())
        self._leftover |= set(volumes)
        client = await self.client()
        for node in nodes - {await self._node_id()}:
            job = cleanup_job(image, node, volumes, self._family)
            try:
                await self._call(client.services.create, name=f"{service.name}-cleanup", **job)
            except BackendError as e:  # the instance is gone; only its volumes are left there
                log.error("datalab: could not leave a volume clean-up job on node %s: %s", node[:12], e)

    async def _node_id(self) -> str:
        """This engine's node in the swarm (its own volumes it removes itself)."""
        if not self._own_node:
            client = await self.client()
            self._own_node = ((await self._call(client.info)).get("Swarm") or {}).get("NodeID", "")
        return self._own_node

    async def _remove(self, handle: str) -> None:
        await super()._remove(handle)
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
