"""What one container instance is, whichever engine runs it: the image, its secret, the labels that
say whose it is, its network, its limits and its confinement. Built once (`ContainerSpec.from_limits`)
and handed to the engine in its own words: a container's create arguments (docker_engine.py) or a
Swarm service's (swarm.py), so the two backends cannot drift apart in what confines an instance.

The confinement: a read-only root, the only writable places in memory and size-limited (the working
directory, /tmp and /dev/shm, fitted in the memory limit by memory_budget.py), no name server, every
capability dropped, no new privileges (Docker only: a Swarm service of API 1.41 cannot ask for it,
see swarm.py), memory, CPU and process limits, nothing of the host mounted but /dev/null.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from dataclasses import field

from docker.types import Mount

from backends import AUTH_ENV
from backends import Limits
from backends.memory_budget import INODES
from backends.memory_budget import SHM_SIZE
from backends.memory_budget import mib

JUPYTER_PORT = 8888  # the image's
WORK_DIR = "/home/datalab/work"
USER_UID = 1000  # the image's user (datalab), who owns the working directory
# Labels on what the proxy makes on an engine: networks (managed-by), instances (all three).
LABEL_MANAGED = "datalab.managed-by"
MANAGED_BY = "datalab-proxy"
LABEL_PREFIX = "datalab.prefix"
LABEL_INSTANCE = "datalab.instance"
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
    """Every writable place of an instance, target -> tmpfs options: the sizes and file counts
    memory_budget.py fits in the memory limit (a file costs kernel memory whatever its size, so
    their number is bounded too)."""
    bounded = f"nr_inodes={INODES},nosuid,nodev"
    return {
        WORK_DIR: f"size={disk_limit},{bounded},uid={USER_UID},gid={USER_UID},mode=0700",
        "/tmp": f"size={disk_limit},{bounded},mode=1777",
        "/dev/shm": f"size={mib(SHM_SIZE)},{bounded},noexec,mode=1777",
    }


def carries(labels: dict[str, str], family: dict[str, str]) -> bool:
    """Whether something labelled `labels` is the family's: every one of the family's labels, as is."""
    return all(labels.get(key) == value for key, value in family.items())


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    # A name that says nothing of the instance id: the network's DNS answers reverse look-ups with
    # it, and the id leads to the instance's host name.
    name: str
    environment: dict[str, str]  # the profile's variables and the instance's secret (AUTH_ENV)
    labels: dict[str, str]  # whose it is: managed by the proxy, this family's prefix, the instance id
    family_labels: dict[str, str]  # the same without the instance: for what goes with it (Swarm's volumes)
    network: str
    in_memory: dict[str, str]  # target -> tmpfs options: the only writable places
    mem_limit: str
    nano_cpus: int
    pids_limit: int
    read_only: bool = True  # the root file system
    mounts: list[Mount] = field(default_factory=lambda: [no_resolver()])
    nameservers: list[str] = field(default_factory=lambda: NAMESERVERS)
    cap_drop: list[str] = field(default_factory=lambda: ["ALL"])
    security_opt: list[str] = field(default_factory=lambda: ["no-new-privileges"])

    @classmethod
    def from_limits(cls, limits: Limits, image: str, instance_id: str, token: str, network: str) -> ContainerSpec:
        family = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: limits.label_prefix}
        return cls(
            image=image,
            name=f"datalab-{secrets.token_hex(8)}",
            environment={**limits.env, AUTH_ENV: token},
            labels={**family, LABEL_INSTANCE: instance_id},
            family_labels=family,
            network=network,
            in_memory=in_memory_mounts(limits.disk_limit),
            mem_limit=limits.mem_limit,
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids_limit,
        )
