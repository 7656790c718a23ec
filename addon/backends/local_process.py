"""Local-process backend: each instance is a Jupyter server process on a loopback port, for machines
without a Docker engine (as JupyterHub's LocalProcessSpawner).

An instance lives in a directory of its own, `<datalab_process_dir>/<family>/<instance id>/`: its
`work/` is the notebook's working directory, the rest is Jupyter's and IPython's state. Beside it,
`<instance id>.pid` names its server process (pid, start time and boot: a pid is reused once its
process is gone, a start time is not, and none changes when the process execs): in the family directory,
which only the proxy writes (the instance's user owns its directory and may put anything there, a
FIFO named `pid` included).
The directory is the record the engine would keep, so a restarted proxy finds (and reconciliation
removes) what an earlier one left.

What confines an instance here is what the OS offers without containers:
- as root, each instance runs under a user id of its own (in no passwd file), so instances cannot
  read each other's files, signal each other's processes, or read each other's secret from /proc;
  its directory is 0700 and its own. The id holds the port (unique while the server runs) and a
  random part: a later instance on the same port is another user, so what an earlier one left
  behind (files in /tmp or /dev/shm, a process that outlived its stop) is not its own. (A user id
  that only followed the port could be steered: an instance holding every other free port of the
  range makes the next start take its own port, and user, and read the newcomer's files.);
- resource limits (prlimit): data memory per process (datalab_mem_limit), processes and threads of
  its user (datalab_pids_limit, as root only: the count is per user), the largest file it writes
  (datalab_disk_limit), open files;
- no new privileges (setpriv --no-new-privs, inherited by every process of the instance): a set-uid
  file does not change who runs it. (Otherwise an instance could run a set-uid copy of a program
  another of its user's instances left in /tmp, and so have a process of a user whose instance has
  stopped: one that no stop ends, or, with privileges, one that reads another instance's files;)
- Jupyter listens on 127.0.0.1 only, and requires the instance's secret (the image's identity
  provider, image/jupyter_server_config.py, the same configuration as in the image).
It is not the Docker backend's confinement: instances share the host's network (they reach the
host's services and the internet) and file system (as far as file modes let them), and datalab_cpus
is not enforced. Without root all instances share the proxy's user. docs/operations.md "Backends" says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backends import AUTH_ENV
from backends import Backend
from backends import BackendError
from backends import ImageMissing
from backends import Instance
from backends import InventoryEntry
from backends import Limits
from backends import StartTimeout
from backends import UnpackLimits
from backends.jupyter import put_via_contents
from backends.jupyter import unpack_via_jupyter
from backends.jupyter import wait_ready
from options import absolute_path
from options import check_options
from options import option
from paths import ROOT
from paths import STATE
from paths import family_name

JUPYTER_CONFIG = ROOT / "image" / "jupyter_server_config.py"  # the image's own settings
HOST = "127.0.0.1"
UID_BASE = 200_000  # as root, an instance's user id is UID_BASE + GENERATION * random + its port
GENERATION = 1 << 16  # (the port: unique while it runs)
GENERATIONS = 32_000  # random parts: every id stays below 2**31
PORT_TRIES = 3  # ports tried when the one picked was taken meanwhile (another proxy's start)
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
OPEN_FILES = 4096
START_TIME = 19  # /proc/<pid>/stat's field 22 (start time), in _stat's list
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def port_range_problem(text: str) -> str | None:
    """What is wrong with datalab_process_ports, or None."""
    if not re.fullmatch(r"[0-9]{1,5}-[0-9]{1,5}", text):
        return "must look like 7100-7999"
    first, _, last = text.partition("-")
    if not 1024 <= int(first) <= int(last) <= 65535:
        return "must be a range within 1024-65535, first <= last"
    return None


@dataclass(frozen=True)
class ProcessOptions:
    jupyter_env: str = option(
        str(STATE / "jupyter-env"),
        "Process backend: the Python environment with Jupyter (and the data stack) that instances run "
        "(scripts/setup.sh ensure_jupyter_env makes it).",
        "DATALAB_JUPYTER_ENV",
        check=absolute_path,
    )
    process_dir: str = option(
        str(STATE / "instances"),
        "Process backend: where instances' directories live.",
        "DATALAB_PROCESS_DIR",
        check=absolute_path,
    )
    process_ports: str = option(
        "7100-7999",
        "Process backend: the loopback ports instances listen on, FIRST-LAST (the proxy routes to no other).",
        check=port_range_problem,
    )

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def ports(self) -> tuple[int, int]:
        first, _, last = self.process_ports.partition("-")
        return int(first), int(last)


def size_bytes(text: str) -> int:
    """512m -> bytes (the limits' syntax, which config.py has checked)."""
    number, unit = re.fullmatch(r"([0-9]+)([bkmgBKMG]?)", text).groups()
    return int(number) * _UNITS[unit.lower()]


class ProcessBackend(Backend):
    name = "process"
    Options = ProcessOptions

    def __init__(self, limits: Limits, opts: ProcessOptions, profiles: Mapping[str, Limits] | None = None):
        super().__init__(limits, opts, profiles)
        # This proxy family's instances (a directory per key prefix, named so any prefix is a safe name).
        self.family = Path(opts.process_dir) / family_name(limits.label_prefix)
        self._children: dict[str, asyncio.subprocess.Process] = {}  # started here: reaped here
        self._exited: asyncio.Queue[str] = asyncio.Queue()
        self._reapers: set[asyncio.Task] = set()

    @classmethod
    def probe(cls, options: ProcessOptions) -> tuple[bool, str]:
        missing = cls._missing(options)
        return (False, missing) if missing else (True, f"Jupyter found in {options.jupyter_env}")

    @staticmethod
    def _missing(options: ProcessOptions) -> str:
        server = Path(options.jupyter_env) / "bin" / "jupyter-notebook"
        if not os.access(server, os.X_OK):
            return f"no Jupyter at {server} (make it: scripts/setup.sh ensure_jupyter_env)"
        if not JUPYTER_CONFIG.is_file():
            return f"{JUPYTER_CONFIG} is missing"
        return ""

    async def check(self) -> None:
        missing = self._missing(self.opts)
        if missing:
            raise ImageMissing("Jupyter for instances is missing; the operator must install it", missing)
        for tool in ("prlimit", "setpriv"):
            if os.geteuid() == 0 and shutil.which(tool) is None:
                raise BackendError("instances cannot be limited", f"{tool} is missing (apt-get install util-linux)")

    def refusal(self, limits: Limits) -> str | None:
        if limits.image:
            return f"it names the image {limits.image!r}, and this backend runs no images (only datalab_jupyter_env)"
        return None

    async def capacity(self) -> int:
        first, last = self.opts.ports
        memory = await asyncio.to_thread(_mem_total)
        return max(1, min(last - first + 1, memory // size_bytes(self.limits.mem_limit)))

    async def memory(self) -> int:
        return await asyncio.to_thread(_mem_total)

    async def start(self, instance_id: str, token: str, limits: Limits | None = None) -> Instance:
        if not _ID.match(instance_id):
            raise BackendError("the instance id is not valid", repr(instance_id))
        limits = self.resolved(limits) if limits else self.limits
        for attempt in range(1, PORT_TRIES + 1):
            port = await asyncio.to_thread(self._free_port)
            try:
                return await self._start_on(instance_id, token, port, limits)
            except StartTimeout:
                raise
            except BackendError:  # it exited at once: the port may have been taken meanwhile
                if attempt == PORT_TRIES:
                    raise
        raise AssertionError("unreachable")

    async def _start_on(self, instance_id: str, token: str, port: int, limits: Limits) -> Instance:
        home = self.family / instance_id
        uid = instance_uid(port) if os.geteuid() == 0 else None
        try:
            await asyncio.to_thread(self._prepare, home, uid)
            log_file = (home / "jupyter.log").open("ab")
            with log_file:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(home, port, limits),
                    env=self._environment(home, token, limits),
                    cwd=home / "work",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,  # its own process group: stop ends the kernels with it
                    user=uid,
                    group=uid,
                    extra_groups=[] if uid is not None else None,
                )
            try:
                identity = _identity(proc.pid)
            except FileNotFoundError:  # it exited, and was reaped, before it could be named
                raise BackendError("the instance's server exited at once", _tail(home / "jupyter.log")) from None
            self._pid_file(instance_id).write_text(identity)
            self._children[instance_id] = proc
            reaper = asyncio.get_running_loop().create_task(self._reap(instance_id, proc))
            self._reapers.add(reaper)
            reaper.add_done_callback(self._reapers.discard)
            instance = Instance(instance_id, self.name, instance_id, HOST, port, "", time.time(), token)
            try:
                await wait_ready(instance, self.limits.start_timeout, lambda: self.poll(instance))
            except BackendError as e:
                e.detail = f"{e.detail} jupyter.log ends: {_tail(home / 'jupyter.log')!r}".lstrip()
                raise
            if uid is not None and await asyncio.to_thread(_listeners, port) != {uid}:
                raise BackendError("another process answered on the instance's port", f"port {port}")
            return instance
        except BaseException:
            await asyncio.shield(self.stop(instance_id))
            raise

    def _prepare(self, home: Path, uid: int | None) -> None:
        """The instance's directory, its alone (0700); the family directory only lets owners pass."""
        self.family.mkdir(parents=True, exist_ok=True)
        os.chmod(self.family, 0o711)
        home.mkdir(mode=0o700)
        for sub in ("work", "tmp", "runtime"):
            (home / sub).mkdir(mode=0o700)
        if uid is not None:
            for path in (home, home / "work", home / "tmp", home / "runtime"):
                os.chown(path, uid, uid)

    def _command(self, home: Path, port: int, limits: Limits) -> list[str]:
        server = [
            str(Path(self.opts.jupyter_env) / "bin" / "jupyter-notebook"),
            f"--config={JUPYTER_CONFIG}",
            f"--ServerApp.ip={HOST}",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={home / 'work'}",
            "--no-browser",
        ]
        if os.geteuid() != 0:
            return server  # limits on the user would be on the proxy's own user: none
        data = size_bytes(limits.mem_limit)
        rlimits = [
            f"--data={data}:{data}",
            f"--nproc={limits.pids_limit}:{limits.pids_limit}",
            f"--fsize={size_bytes(limits.disk_limit)}:{size_bytes(limits.disk_limit)}",
            f"--nofile={OPEN_FILES}:{OPEN_FILES}",
            "--core=0:0",
        ]
        confined = [shutil.which("setpriv") or "setpriv", "--no-new-privs"]
        return [*confined, shutil.which("prlimit") or "prlimit", *rlimits, "--", *server]

    def _environment(self, home: Path, token: str, limits: Limits) -> dict[str, str]:
        """A clean environment: nothing of the proxy's (its sign key, Redis URL) reaches an instance;
        the profile's variables do (none of RESERVED_ENV, so none overrides what is set here)."""
        env_bin = Path(self.opts.jupyter_env) / "bin"
        return {
            **limits.env,
            "PATH": f"{env_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "USER": "datalab",
            "LOGNAME": "datalab",
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "TMPDIR": str(home / "tmp"),
            "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
            "JUPYTER_DATA_DIR": str(home / ".local" / "share" / "jupyter"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "IPYTHONDIR": str(home / ".ipython"),
            "MPLCONFIGDIR": str(home / ".matplotlib"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            AUTH_ENV: token,
        }

    def _free_port(self) -> int:
        """A port of the range nothing listens on now (a random one: proxies starting at once differ).
        Probed as Jupyter binds (SO_REUSEADDR): a port stopped instances left in TIME_WAIT is free."""
        first, last = self.opts.ports
        ports = list(range(first, last + 1))
        random.shuffle(ports)
        for port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                except OSError:
                    continue
                return port
        raise BackendError("no free port for an instance", f"every port of {self.opts.process_ports} is taken")

    async def _reap(self, instance_id: str, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        if self._children.get(instance_id) is proc:
            del self._children[instance_id]
        self._exited.put_nowait(instance_id)

    async def put_file(self, instance: Instance, filename: str, data: bytes | bytearray) -> None:
        await put_via_contents(instance, filename, data, timeout=max(30.0, self.limits.start_timeout))

    async def unpack(self, instance: Instance, kind: str, data: bytes | bytearray, limits: UnpackLimits) -> None:
        await unpack_via_jupyter(instance, kind, data, limits, timeout=max(30.0, self.limits.start_timeout))

    async def poll(self, instance: Instance) -> bool:
        return await asyncio.to_thread(self._running, instance.handle)

    def _home(self, handle: str) -> Path | None:
        """The instance's directory, if the handle can name one of ours (Redis is not trusted blindly)."""
        return self.family / handle if _ID.match(handle) else None

    def _pid_file(self, handle: str) -> Path:
        """Where the server's pid is kept: out of the instance user's reach (see the module's docstring)."""
        return self.family / f"{handle}.pid"

    def _pid(self, handle: str) -> int | None:
        """The instance's server process, if it still runs: the pid file's process, checked by its start
        time to be the one started (a pid is reused once its process is gone). Not by its command line:
        that reads empty while the process execs (setpriv, prlimit, then Python), a live server then."""
        if self._home(handle) is None:
            return None
        try:
            noted = self._pid_file(handle).read_text()
            pid = int(noted.split()[0])
            fields = _stat(pid)
            if _identity(pid, fields) != noted or fields[0] in ("Z", "X"):
                return None
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def _running(self, handle: str) -> bool:
        return self._pid(handle) is not None

    async def inventory(self) -> list[InventoryEntry]:
        def scan() -> list[InventoryEntry]:
            if not self.family.is_dir():
                return []
            found = []
            for home in self.family.iterdir():
                if _ID.match(home.name):
                    found.append(InventoryEntry(home.name, home.name, self._running(home.name)))
            return found

        return await asyncio.to_thread(scan)

    async def exits(self) -> AsyncIterator[str]:
        """The instances started by this proxy whose server exits (others: by reconciliation)."""
        while True:
            yield await self._exited.get()

    async def stop(self, handle: str) -> None:
        home = self._home(handle)
        if home is None:
            return
        pid = await asyncio.to_thread(self._pid, handle)
        if pid is not None:
            await self._end_group(pid)
        child = self._children.pop(handle, None)
        if child is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), STOP_GRACE)
        if os.geteuid() == 0:
            with contextlib.suppress(OSError):
                uid = (await asyncio.to_thread(home.stat)).st_uid
                if uid >= UID_BASE:  # whatever its user left running, detached or not
                    await asyncio.to_thread(_kill_user, uid)
        await asyncio.to_thread(shutil.rmtree, home, True)
        await asyncio.to_thread(self._pid_file(handle).unlink, True)

    async def _end_group(self, pid: int) -> None:
        """TERM the server's process group (its kernels, terminals), KILL what is left after a grace."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline:
                if not await asyncio.to_thread(_group_alive, pid):
                    return
                await asyncio.sleep(0.05)

    async def could_have_given(self, host: str, port: int) -> bool:
        first, last = self.opts.ports
        return host == HOST and first <= port <= last


def instance_uid(port: int) -> int:
    """The user id of a new instance on `port` (as root): see the module's docstring."""
    return UID_BASE + GENERATION * secrets.randbelow(GENERATIONS) + port


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields from the state on (the command name before it may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _identity(pid: int, fields: list[str] | None = None) -> str:
    """What names a process for good: its pid, start time (clock ticks since boot) and the boot's id.
    A pid is reused once its process is gone; pid and start time may recur after a reboot, which
    instance directories survive (a stop must never signal a stranger). `fields`: its _stat, if read."""
    return f"{pid} {(fields or _stat(pid))[START_TIME]} {_boot_id()}"


@functools.cache
def _boot_id() -> str:
    """This boot's id (the same for as long as the proxy runs)."""
    return BOOT_ID.read_text().strip()


def _tail(log: Path, size: int = 600) -> str:
    """The end of an instance's log: why its server exited, for the proxy's log (not the client)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _listeners(port: int) -> set[int]:
    """The user ids of the sockets listening on `port`, at any address. What answered a start must be
    the instance's own user: the port was free when picked, and anyone on the host may take it
    before Jupyter binds it (Jupyter's command line, which names it, is public in /proc)."""
    uids = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                    uids.add(int(fields[7]))
    return uids


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _group_alive(pgid: int) -> bool:
    """Whether any live process (not a zombie) is in the process group."""
    for stat in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat(int(stat.name))
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def _user_processes(uid: int) -> list[int]:
    """The live processes (not zombies) whose real user id is `uid`."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
                pids.append(int(status.parent.name))
    return pids


def _kill_user(uid: int) -> None:
    """SIGKILL every process of an instance's own user id (root only), until none is left."""
    deadline = time.monotonic() + STOP_GRACE
    while (pids := _user_processes(uid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
