"""Docker backend: one container per instance, from a local image that is never pulled.

Every Docker SDK call is blocking, so each goes through `_call` (a worker thread). A container is
what container_spec.py describes (a read-only root, in-memory writable places, no name server, no
capabilities, no new privileges, memory/CPU/process limits), on the proxy's own network
(docker_network.py). An upload goes in through Jupyter's contents API (the root is read-only, so the
engine's archive copy cannot write it).

The Swarm backend (swarm.py) is this class with services for containers: what differs is in the
steps at the end of the class (`_create`, `_run`, `_starting`, `_get`, `_alive`, `_list`...),
which it overrides; the flow of a start, a poll, an inventory and a stop is written here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import docker.utils
from docker.models.containers import Container

from backends import AUTO
from backends import Backend
from backends import BackendError
from backends import EngineUnavailable
from backends import ImageMissing
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends import UnpackLimits
from backends.container_spec import JUPYTER_PORT
from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import LABEL_PREFIX
from backends.container_spec import ContainerSpec
from backends.container_spec import carries
from backends.docker_network import InstanceNetwork
from backends.docker_network import close_host_to
from backends.docker_network import ensure_network
from backends.docker_network import network_name
from backends.jupyter import put_via_contents
from backends.jupyter import unpack_via_jupyter
from backends.jupyter import wait_ready
from backends.memory_budget import disk_limit_for
from options import check_options
from options import holds
from options import option

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10  # seconds datalab_backend=auto waits for the engine (a busy engine is slow, not absent)
# A paused container is frozen, not gone: its views wait (api.py's waiting page), culling by idle time ends it.
ALIVE = ("running", "paused")


@dataclass(frozen=True)
class DockerOptions:
    image: str = option(
        "datalab-notebook:latest",
        "Local Docker image of the Jupyter instance; never pulled (scripts/build-image.sh).",
        "DATALAB_IMAGE",
        check=holds(bool, "must name a local image"),
    )
    docker_url: str = option("", "Docker engine URL; empty means the local default socket.", "DOCKER_HOST")
    instance_egress: bool = option(
        False, "Let instances reach addresses off this machine (never this host's own services)."
    )

    def __post_init__(self) -> None:
        check_options(self)


class DockerBackend(Backend):
    name = "docker"
    Options = DockerOptions
    kind = "container"  # what one instance is on this engine (log lines)

    def __init__(self, limits: Limits, opts: DockerOptions, profiles: Mapping[str, Limits] | None = None):
        super().__init__(limits, opts, profiles)
        self._client: docker.DockerClient | None = None
        self._network: InstanceNetwork | None = None
        self._network_lock = asyncio.Lock()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one blocking SDK call in a thread; an engine that cannot be reached is a 503."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as e:
            if e.status_code == 409 and "removal" in str(e.explanation):  # being removed: as good as gone
                raise docker.errors.NotFound(str(e.explanation)) from e
            raise BackendError("the container engine refused the request", str(e.explanation or e)) from e
        except (docker.errors.DockerException, OSError) as e:
            where = self.opts.docker_url or "the default Docker socket"
            raise EngineUnavailable("the container engine cannot be reached; retry shortly", f"{where}: {e}") from e

    @classmethod
    def auto_disk_limit(cls, mem_limit: str) -> str:
        """What fits in the memory limit beside Jupyter (memory_budget.py); Swarm's too."""
        return disk_limit_for(mem_limit, AUTO)

    @classmethod
    def probe(cls, options: DockerOptions) -> tuple[bool, str]:
        where = options.docker_url or "the default Docker socket"
        try:
            client = docker.DockerClient(base_url=options.docker_url or None, timeout=PROBE_TIMEOUT)
            try:
                return cls._judge(client, where)
            finally:
                client.close()
        except (docker.errors.DockerException, OSError) as e:
            return False, f"no Docker engine answers at {where} ({e})"

    async def client(self) -> docker.DockerClient:
        if self._client is None:
            url = self.opts.docker_url or None
            self._client = await self._call(lambda: docker.DockerClient(base_url=url) if url else docker.from_env())
        return self._client

    async def check(self) -> None:
        await self._check_engine()
        await self._confined()

    async def network(self) -> InstanceNetwork:
        """The instance network, made ready once per process."""
        async with self._network_lock:
            if self._network is None:
                self._network = await self._ensure_network(await self.client())
            return self._network

    def _image_missing(self, image: str) -> ImageMissing:
        return ImageMissing(
            "the instance image is missing; the operator must build it",
            f"the image {image} is not in the local engine and is never pulled; build it with scripts/build-image.sh",
        )

    def images(self) -> list[str]:
        """Every image a start may run: datalab_image and the profiles' own."""
        return sorted({each.image or self.opts.image for each in (self.limits, *self.profiles.values())})

    async def capacity(self) -> int:
        return max(1, await self._memory() // docker.utils.parse_bytes(self.limits.mem_limit))

    async def memory(self) -> int:
        return await self._memory()

    async def start(self, instance_id: str, token: str, limits: Limits | None = None) -> Instance:
        limits = self.resolved(limits) if limits else self.limits
        net = await self._confined()
        image = await self._image(limits.image or self.opts.image)
        spec = ContainerSpec.from_limits(limits, image, instance_id, token, net.name)
        made = await self._create(spec)
        try:
            host = await self._run(made, spec, net)
            instance = Instance(instance_id, self.name, made.id, host, JUPYTER_PORT, "", time.time(), token)
            await wait_ready(instance, self.limits.start_timeout, lambda: self._starting(made, spec, instance))
            return instance
        except BaseException:
            await asyncio.shield(self._remove_quietly(made.id))
            raise

    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        await put_via_contents(instance, filename, data, timeout=max(30.0, self.limits.start_timeout))

    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        await unpack_via_jupyter(instance, kind, data, limits, timeout=max(30.0, self.limits.start_timeout))

    async def could_have_given(self, host: str, port: int) -> bool:
        """Jupyter's port at an instance's address on the instance network, nothing else (not the
        host's own address there)."""
        net = await self.network()
        return port == JUPYTER_PORT and net.holds_instance(host)

    async def poll(self, instance: Instance) -> bool:
        try:
            return await self._alive(await self._get(instance.handle))
        except docker.errors.NotFound:
            return False

    @property
    def _family(self) -> dict[str, str]:
        """The labels that mark this proxy family's instances (all of them must match)."""
        return {LABEL_PREFIX: self.limits.label_prefix}

    @property
    def _ours(self) -> list[str]:
        """The label filter for this proxy family's instances."""
        return [f"{key}={value}" for key, value in self._family.items()]

    async def inventory(self) -> list[InventoryEntry]:
        return [self._entry(listed) for listed in await self._list()]

    async def exits(self) -> AsyncIterator[str]:
        filters = {"type": "container", "event": ["die", "destroy"], "label": self._ours}
        async for event in self._events(filters):
            instance_id = event.get("Actor", {}).get("Attributes", {}).get(LABEL_INSTANCE)
            if instance_id:
                yield instance_id

    async def _events(self, filters: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The engine's events that match `filters`, as they happen; raises once the feed ends."""
        client = await self.client()
        stream = await self._call(client.events, decode=True, filters=filters)
        queue: asyncio.Queue[dict | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:  # its own thread: it blocks for as long as the engine is followed
            try:
                for event in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name="docker-events", daemon=True).start()
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            await asyncio.to_thread(stream.close)
        raise EngineUnavailable("the Docker engine stopped sending events")

    async def stop(self, handle: str) -> None:
        await self._remove(handle)

    async def _remove_quietly(self, handle: str) -> None:
        """Clean-up after a failed start must not hide the failure that caused it."""
        try:
            await self._remove(handle)
        except BackendError as e:
            log.error("could not remove %s %s after a failed start: %s", self.kind, handle[:12], e)

    async def _remove(self, handle: str) -> None:
        try:
            made = await self._get(handle)
            if not carries(self._labels(made), self._family):
                # a handle from a record not ours (Redis is not trusted blindly): never remove it
                log.error("datalab: refusing to remove %s %s: not one of ours", self.kind, handle[:12])
                return
            await self._delete(made)
        except docker.errors.NotFound:
            pass  # already gone: that is what stop wants

    # The steps that differ on Swarm (swarm.py overrides each): a container here.

    @classmethod
    def _judge(cls, client: docker.DockerClient, where: str) -> tuple[bool, str]:
        """probe's verdict on an engine that answers."""
        client.ping()
        return True, f"the Docker engine at {where} answers"

    async def _check_engine(self) -> None:
        """What check asks of the engine before the network: the images are there."""
        client = await self.client()
        for image in self.images():
            try:
                await self._call(client.images.get, image)
            except docker.errors.NotFound as e:
                raise self._image_missing(image) from e

    async def _ensure_network(self, client: docker.DockerClient) -> InstanceNetwork:
        egress = self.opts.instance_egress
        return await self._call(ensure_network, client, network_name(egress), egress)

    async def _confined(self) -> InstanceNetwork:
        """The network with the host closed to it, checked before every start (a firewall reload
        would drop the rule, and no instance starts unconfined)."""
        net = await self.network()
        await asyncio.to_thread(close_host_to, net)
        return net

    async def _memory(self) -> int:
        """Bytes of memory the engine has for instances."""
        client = await self.client()
        info = await self._call(client.info)
        return int(info.get("MemTotal", 0))

    async def _image(self, image: str) -> str:
        """The image as a start names it: by name (create never pulls, and a missing image is its 404)."""
        return image

    async def _create(self, spec: ContainerSpec) -> Container:
        """The instance, made but not yet running."""
        client = await self.client()
        try:  # create never pulls (run() would): a missing image is a 404 here, no separate look-up needed
            return await self._call(client.containers.create, **self._create_args(spec))
        except docker.errors.ImageNotFound as e:
            raise self._image_missing(spec.image) from e

    def _create_args(self, spec: ContainerSpec) -> dict[str, Any]:
        return dict(
            image=spec.image,
            name=spec.name,
            detach=True,
            environment=spec.environment,
            labels=spec.labels,
            network=spec.network,
            dns=spec.nameservers,
            mounts=spec.mounts,
            read_only=spec.read_only,
            # The only writable places, in memory (so the host's disk is never touched): their pages
            # count against the memory limit, which they fit in with room for Jupyter to spare.
            tmpfs=spec.in_memory,
            mem_limit=spec.mem_limit,
            memswap_limit=spec.mem_limit,  # no swap: tmpfs pages never reach the host's disk
            nano_cpus=spec.nano_cpus,
            pids_limit=spec.pids_limit,
            cap_drop=spec.cap_drop,
            security_opt=spec.security_opt,
        )

    async def _run(self, container: Container, spec: ContainerSpec, net: InstanceNetwork) -> str:
        """Set the instance running; its address on the instance network (how the proxy reaches it)."""
        await self._call(container.start)
        await self._call(container.reload)
        address = ((container.attrs["NetworkSettings"].get("Networks") or {}).get(net.name) or {}).get("IPAddress")
        if not address or not net.holds_instance(address):
            raise BackendError("the instance got no address on its network", f"container {container.id[:12]}")
        return address

    async def _starting(self, container: Container, spec: ContainerSpec, instance: Instance) -> bool:
        """While Jupyter does not answer yet: whether the instance still runs (or raise why it never will)."""
        return await self.poll(instance)

    async def _get(self, handle: str) -> Container:
        """The instance by its handle; docker.errors.NotFound when it is gone."""
        client = await self.client()
        return await self._call(client.containers.get, handle)

    async def _alive(self, container: Container) -> bool:
        return container.status in ALIVE

    def _labels(self, container: Container) -> dict[str, str]:
        return container.labels

    async def _list(self) -> list[Container]:
        """This family's instances, running or not."""
        client = await self.client()
        return await self._call(client.containers.list, all=True, sparse=True, filters={"label": self._ours})

    def _entry(self, container: Container) -> InventoryEntry:
        """An instance as `_list` gives it (a sparse container: its labels and state at the top)."""
        running = container.attrs.get("State") in ALIVE
        return InventoryEntry(container.attrs["Labels"].get(LABEL_INSTANCE, ""), container.id, running)

    async def _delete(self, container: Container) -> None:
        await self._call(container.remove, force=True)
