"""Docker backend: one container per instance, from a local image that is never pulled.

Every Docker SDK call is blocking, so each goes through `_call` (a worker thread). A container is
confined: on the proxy's own network (docker_network.py), a read-only root with size-limited
in-memory mounts for the working directory, /tmp and /dev/shm only (that fit in its memory limit:
memory_budget.py), no name server, no capabilities, no new privileges, memory/CPU/process limits,
nothing of the host mounted but /dev/null (as an empty resolv.conf). An upload goes in through Jupyter's
contents API (the root is read-only, so the engine's archive copy cannot write it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import docker.utils
from docker.models.containers import Container
from docker.types import Mount

from backends import AUTH_ENV
from backends import AUTO
from backends import Backend
from backends import BackendError
from backends import EngineUnavailable
from backends import ImageMissing
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends import UnpackLimits
from backends import option
from backends import option_error
from backends.docker_network import LABEL_MANAGED
from backends.docker_network import MANAGED_BY
from backends.docker_network import InstanceNetwork
from backends.docker_network import close_host_to
from backends.docker_network import ensure_network
from backends.docker_network import network_name
from backends.jupyter import put_via_contents
from backends.jupyter import unpack_via_jupyter
from backends.jupyter import wait_ready
from backends.memory_budget import INODES
from backends.memory_budget import SHM_SIZE
from backends.memory_budget import disk_limit_for
from backends.memory_budget import mib

log = logging.getLogger(__name__)

JUPYTER_PORT = 8888
WORK_DIR = "/home/datalab/work"
USER_UID = 1000
LABEL_PREFIX = "datalab.prefix"
LABEL_INSTANCE = "datalab.instance"
PROBE_TIMEOUT = 10  # seconds datalab_backend=auto waits for the engine (a busy engine is slow, not absent)
# A paused container is frozen, not gone: its views wait (api.py's waiting page), culling by idle time ends it.
ALIVE = ("running", "paused")
# DNS: an instance needs none (the proxy reaches it by address, localhost is in /etc/hosts), and
# Docker's embedded server (127.0.0.11) forwards to the host's name servers, from the host's own
# namespace when they are loopback ones (CVE-2024-29018, Docker < 26): a way out of an internal
# network. So the embedded server's only upstream is the container's own loopback, where nothing
# answers (`--dns 127.0.0.1` is dialled inside the container), and /etc/resolv.conf is empty
# (/dev/null, read-only: present on every node, unlike a file of the proxy's), so no resolver in the
# instance asks anyone.
NAMESERVERS = ["127.0.0.1"]
RESOLV_CONF = "/etc/resolv.conf"


def no_resolver() -> Mount:
    """The mount that shadows the engine's resolv.conf (the engine writes none where one is mounted)."""
    return Mount(RESOLV_CONF, "/dev/null", type="bind", read_only=True)


def in_memory_mounts(disk_limit: str) -> dict[str, str]:
    """Every writable place of an instance (Docker and Swarm alike), target -> tmpfs options: the
    sizes and file counts memory_budget.py fits in the memory limit (a file costs kernel memory
    whatever its size, so their number is bounded too)."""
    bounded = f"nr_inodes={INODES},nosuid,nodev"
    return {
        WORK_DIR: f"size={disk_limit},{bounded},uid={USER_UID},gid={USER_UID},mode=0700",
        "/tmp": f"size={disk_limit},{bounded},mode=1777",
        "/dev/shm": f"size={mib(SHM_SIZE)},{bounded},noexec,mode=1777",
    }


@dataclass(frozen=True)
class DockerOptions:
    image: str = option(
        "datalab-notebook:latest",
        "Local Docker image of the Jupyter instance; never pulled (scripts/build-image.sh).",
        "DATALAB_IMAGE",
    )
    docker_url: str = option("", "Docker engine URL; empty means the local default socket.", "DOCKER_HOST")
    instance_egress: bool = option(
        False, "Let instances reach addresses off this machine (never this host's own services)."
    )

    def __post_init__(self) -> None:
        if not self.image:
            raise option_error("image", "must name a local image")


class DockerBackend(Backend):
    name = "docker"
    Options = DockerOptions

    def __init__(self, limits: Limits, opts: DockerOptions):
        super().__init__(limits, opts)
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
                client.ping()
            finally:
                client.close()
        except (docker.errors.DockerException, OSError) as e:
            return False, f"no Docker engine answers at {where} ({e})"
        return True, f"the Docker engine at {where} answers"

    async def client(self) -> docker.DockerClient:
        if self._client is None:
            url = self.opts.docker_url or None
            self._client = await self._call(lambda: docker.DockerClient(base_url=url) if url else docker.from_env())
        return self._client

    async def check(self) -> None:
        client = await self.client()
        try:
            await self._call(client.images.get, self.opts.image)
        except docker.errors.NotFound as e:
            raise self._image_missing() from e
        await self._confined()

    async def network(self) -> InstanceNetwork:
        """The instance network, made ready once per process."""
        async with self._network_lock:
            if self._network is None:
                client = await self.client()
                self._network = await self._call(
                    ensure_network, client, network_name(self.opts.instance_egress), self.opts.instance_egress
                )
            return self._network

    async def _confined(self) -> InstanceNetwork:
        """The network with the host closed to it, checked before every start (a firewall reload
        would drop the rule, and no instance starts unconfined)."""
        net = await self.network()
        await asyncio.to_thread(close_host_to, net)
        return net

    def _image_missing(self) -> ImageMissing:
        return ImageMissing(
            "the instance image is missing; the operator must build it",
            f"the image {self.opts.image} is not in the local engine and is never pulled; "
            f"build it with scripts/build-image.sh",
        )

    async def capacity(self) -> int:
        client = await self.client()
        info = await self._call(client.info)
        return max(1, int(info.get("MemTotal", 0)) // docker.utils.parse_bytes(self.limits.mem_limit))

    async def start(self, instance_id: str, token: str) -> Instance:
        client = await self.client()
        net = await self._confined()
        args = self._create_args(instance_id, token, net)
        try:  # create never pulls (run() would): a missing image is a 404 here, no separate look-up needed
            container: Container = await self._call(client.containers.create, **args)
        except docker.errors.ImageNotFound as e:
            raise self._image_missing() from e
        try:
            await self._call(container.start)
            host = await self._address(container, net)
            instance = Instance(instance_id, self.name, container.id, host, JUPYTER_PORT, "", time.time(), token)
            await wait_ready(instance, self.limits.start_timeout, lambda: self.poll(instance))
            return instance
        except BaseException:
            await asyncio.shield(self._remove_quietly(container.id))
            raise

    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        await put_via_contents(instance, filename, data, timeout=max(30.0, self.limits.start_timeout))

    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        await unpack_via_jupyter(instance, kind, data, limits, timeout=max(30.0, self.limits.start_timeout))

    async def could_have_given(self, host: str, port: int) -> bool:
        """Jupyter's port at a container's address on the instance network, nothing else (not the
        host's own address there)."""
        net = await self.network()
        return port == JUPYTER_PORT and net.holds_instance(host)

    def _create_args(self, instance_id: str, token: str, net: InstanceNetwork) -> dict[str, Any]:
        return dict(
            image=self.opts.image,
            # A name that says nothing of the instance id: the network's DNS answers reverse
            # look-ups with it, and the id leads to the instance's host name.
            name=f"datalab-{secrets.token_hex(8)}",
            detach=True,
            environment={AUTH_ENV: token},
            labels={LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: self.limits.label_prefix, LABEL_INSTANCE: instance_id},
            network=net.name,
            dns=NAMESERVERS,
            mounts=[no_resolver()],
            read_only=True,
            # The only writable places, in memory (so the host's disk is never touched): their pages
            # count against the memory limit, which they fit in with room for Jupyter to spare.
            tmpfs=in_memory_mounts(self.limits.disk_limit),
            mem_limit=self.limits.mem_limit,
            memswap_limit=self.limits.mem_limit,  # no swap: tmpfs pages never reach the host's disk
            nano_cpus=int(self.limits.cpus * 1e9),
            pids_limit=self.limits.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )

    async def _address(self, container: Container, net: InstanceNetwork) -> str:
        """The instance's address on the instance network: how the proxy reaches it."""
        await self._call(container.reload)
        address = ((container.attrs["NetworkSettings"].get("Networks") or {}).get(net.name) or {}).get("IPAddress")
        if not address or not net.holds_instance(address):
            raise BackendError("the instance got no address on its network", f"container {container.id[:12]}")
        return address

    async def poll(self, instance: Instance) -> bool:
        client = await self.client()
        try:
            container = await self._call(client.containers.get, instance.handle)
        except docker.errors.NotFound:
            return False
        return container.status in ALIVE

    @property
    def _ours(self) -> str:
        """The label filter for this proxy family's containers."""
        return f"{LABEL_PREFIX}={self.limits.label_prefix}"

    async def inventory(self) -> list[InventoryEntry]:
        client = await self.client()
        found = await self._call(client.containers.list, all=True, sparse=True, filters={"label": self._ours})
        return [
            InventoryEntry(c.attrs["Labels"].get(LABEL_INSTANCE, ""), c.id, c.attrs.get("State") in ALIVE)
            for c in found
        ]

    async def exits(self) -> AsyncIterator[str]:
        client = await self.client()
        filters = {"type": "container", "event": ["die", "destroy"], "label": [self._ours]}
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
                instance_id = event.get("Actor", {}).get("Attributes", {}).get(LABEL_INSTANCE)
                if instance_id:
                    yield instance_id
        finally:
            await asyncio.to_thread(stream.close)
        raise EngineUnavailable("the Docker engine stopped sending events")

    async def stop(self, handle: str) -> None:
        await self._remove(handle)

    async def _remove_quietly(self, container_id: str) -> None:
        """Clean-up after a failed start must not hide the failure that caused it."""
        try:
            await self._remove(container_id)
        except BackendError as e:
            log.error("could not remove container %s after a failed start: %s", container_id[:12], e)

    async def _remove(self, container_id: str) -> None:
        client = await self.client()
        try:
            container = await self._call(client.containers.get, container_id)
            if container.labels.get(LABEL_PREFIX) != self.limits.label_prefix:
                # a handle from a record not ours (Redis is not trusted blindly): never remove it
                log.error("datalab: refusing to remove container %s: not one of ours", container_id[:12])
                return
            await self._call(container.remove, force=True)
        except docker.errors.NotFound:
            pass  # already gone: that is what stop wants
