"""How a container instance's memory limit is shared between Jupyter and its in-memory mounts.

A Docker or Swarm instance's writable places (the working directory and /tmp, datalab_disk_limit
each) and /dev/shm are tmpfs: their pages, and the kernel's record of every file in them, are
charged to the instance's memory limit and cannot be reclaimed (there is no swap). Were they
allowed to outgrow what the limit leaves beside Jupyter, filling them would get the whole instance
OOM-killed (every file lost, the next request a 502 then a 410) instead of failing the write with
ENOSPC. So all of them together fit in the limit with RESERVE to spare: datalab_disk_limit=auto
takes what fits, and a size that does not fit is refused at start-up (config.py).

Plain functions of the option strings (config.py validates with them, the Docker backend sizes
with them; nothing here imports the backends).
"""

from __future__ import annotations

import docker.utils

MIB = 1 << 20
AUTO = "auto"  # datalab_disk_limit's default: what fits in datalab_mem_limit
PLACES = 2  # writable places of datalab_disk_limit each: the working directory and /tmp
SHM_SIZE = 64 * MIB  # /dev/shm, Docker's default size (both backends mount it themselves, at this size)
INODES = 16384  # files (and directories, links) per in-memory mount: about 1 KiB of kernel memory each
# What Jupyter and a kernel need beside the mounts. Measured in the image (cgroup memory.stat):
# an idle Jupyter server 65 MiB resident; with a kernel that imported pandas, numpy and matplotlib,
# 164 MiB resident plus 33 MiB of mapped library pages. Also held: the three mounts' file records
# (INODES each, at most about 60 MiB), and room for the kernel to work.
RESERVE = 384 * MIB


def size_bytes(text: str) -> int:
    """512m -> bytes (the limits' syntax, as Docker reads it)."""
    return docker.utils.parse_bytes(text)


def mib(n: int) -> str:
    return f"{n // MIB}m" if n % MIB == 0 else str(n)


def room(mem_limit: str) -> int:
    """Bytes each writable place may take at this memory limit (0 or less: none fits)."""
    return (size_bytes(mem_limit) - SHM_SIZE - RESERVE) // PLACES // MIB * MIB


def disk_limit_for(mem_limit: str, disk_limit: str) -> str:
    """The size each writable place gets: the option, or with auto what fits in the memory limit."""
    return mib(max(room(mem_limit), MIB)) if disk_limit == AUTO else disk_limit


def misfit(mem_limit: str, disk_limit: str) -> str | None:
    """Why these limits let the in-memory mounts crowd Jupyter out of the memory limit, or None."""
    disk = size_bytes(disk_limit_for(mem_limit, disk_limit))
    need = PLACES * disk + SHM_SIZE + RESERVE
    if need <= size_bytes(mem_limit):
        return None
    what = (
        f"an instance's working directory and /tmp ({mib(disk)} each) and /dev/shm ({mib(SHM_SIZE)}) are memory "
        f"counted against its limit, beside the {mib(RESERVE)} Jupyter and a kernel need (filled, they would get "
        f"the instance killed)"
    )
    if disk_limit == AUTO:
        too_small = f"datalab_mem_limit={mem_limit} is too small for datalab_disk_limit=auto"
        return f"{too_small}: {what}; it must be at least {mib(need)}"
    fix = f"datalab_mem_limit must be at least {mib(need)}"
    if room(mem_limit) >= MIB:
        fix += f", or datalab_disk_limit at most {mib(room(mem_limit))} (or auto)"
    return f"datalab_disk_limit={disk_limit} does not fit in datalab_mem_limit={mem_limit}: {what}; {fix}"
