"""The local-process backend against real Jupyter processes: the backend contract, confinement as far
as the OS offers it, and nothing left behind."""

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from backends import BackendError
from backends import Instance
from backends import InventoryEntry
from backends import StartTimeout
from backends.local_process import GENERATION
from backends.local_process import UID_BASE
from backends.local_process import ProcessBackend
from helpers import process_backend


def make(places: Path, **changes) -> ProcessBackend:
    return process_backend(places, **changes)


def as_user(uid: int, *command: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command as the instance's user would (its notebook's code)."""
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # (a daemon it starts holds no pipe)
    return subprocess.run([*setpriv, *command], cwd=cwd, check=check, **quiet)


def server_pid(backend: ProcessBackend, instance: Instance) -> int:
    """The instance's server process, as its pid file names it ("<pid> <start time>")."""
    return int((backend.family / f"{instance.handle}.pid").read_text().split()[0])


def processes_of(uid: int) -> list[str]:
    """The user's live processes (a killed one may stay a zombie until its parent reaps it)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-u", str(uid)], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if not line.split()[1].startswith("Z")]


async def test_missing_jupyter_is_seen_by_auto(places):
    """(That check() refuses it, saying how to make it: test_backend_contract.py.)"""
    backend = make(places, jupyter_env="/nonexistent/env")
    assert backend.probe(backend.opts)[0] is False


async def test_readiness_timeout_leaves_nothing(places):
    backend = make(places, start_timeout=0.2)
    with pytest.raises(StartTimeout):
        await backend.start(secrets.token_urlsafe(16), "t0ken")
    assert not backend.family.exists() or list(backend.family.iterdir()) == []  # (its inventory: the contract)


async def test_an_instance_is_confined_as_configured_and_removed(places):
    """What runs for a started instance, and what is left once it stops (the contract itself:
    test_backend_contract.py)."""
    backend = make(places)
    await backend.check()
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    home = backend.family / instance.handle
    try:
        assert instance.host == "127.0.0.1"
        assert 7100 <= instance.port <= 7999
        for name, data in (("a.csv", b"1,2\n"), ("blob \u00fc.bin", os.urandom(5 * 1024 * 1024 + 3))):
            await backend.put_file(instance, name, data)
            assert (home / "work" / name).read_bytes() == data

        pid = server_pid(backend, instance)
        uid = home.stat().st_uid
        assert uid >= UID_BASE and (uid - UID_BASE - instance.port) % GENERATION == 0
        assert os.stat(f"/proc/{pid}").st_uid == uid and (home / "work").stat().st_uid == uid
        assert oct(home.stat().st_mode & 0o777) == "0o700"
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max data size             1073741824" in limits and "Max processes             256" in limits
        assert "Max file size             1073741824" in limits
        assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()  # set-uid files do not apply
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith((b"DATALAB_SIGN_KEY", b"DATALAB_REDIS")) for e in environment)

        for forged in [("127.0.0.1", 8000), ("10.0.0.1", instance.port)]:  # (addresses of no backend: the contract)
            assert not await backend.could_have_given(*forged)
    finally:
        await backend.stop(instance.handle)
    assert not home.exists() and processes_of(uid) == []


async def test_a_profiles_limits_and_environment_are_what_its_process_gets(places):
    """A start given a profile's limits (instances.py passes them) is held to them, not to the backend's own."""
    backend = make(places)
    limits = replace(backend.limits, mem_limit="2g", pids_limit=128, disk_limit="512m", env={"COURSE": "ml"})
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken", limits)
    try:
        pid = server_pid(backend, instance)
        held = Path(f"/proc/{pid}/limits").read_text()
        assert "Max data size             2147483648" in held and "Max processes             128" in held
        assert "Max file size             536870912" in held
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"COURSE=ml" in environment and b"DATALAB_AUTH=t0ken" in environment
    finally:
        await backend.stop(instance.handle)


async def test_stop_ends_what_the_user_left_running(places):
    """A notebook user's detached process (new session, double fork) goes with the instance."""
    backend = make(places)
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    home = backend.family / instance.handle
    uid = home.stat().st_uid
    try:
        daemon = ["setsid", "-f", "sleep", "1000"]
        as_user(uid, *daemon, cwd=home)
        assert len(processes_of(uid)) >= 2
    finally:
        await backend.stop(instance.handle)
    assert processes_of(uid) == []


async def test_what_the_user_puts_in_its_directory_misleads_nothing(places):
    """The instance's user owns its directory: a FIFO (or any file) named like the proxy's own notes
    there neither hangs nor fools the proxy's poll and stop."""
    backend = make(places)
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    home = backend.family / instance.handle
    uid = home.stat().st_uid
    trap = "rm -f pid && mkfifo pid && ln -s /proc/1/cmdline cmdline && mkfifo jupyter.pid"
    as_user(uid, "sh", "-c", trap, cwd=home)
    try:
        assert await asyncio.wait_for(backend.poll(instance), 30) is True  # (a hang guard, not a timing check)
    finally:
        await asyncio.wait_for(backend.stop(instance.handle), 60)
    assert await backend.poll(instance) is False and not home.exists() and processes_of(uid) == []


async def test_a_later_instance_on_the_same_port_is_another_user(places):
    """What an instance leaves outside its directory (a private file in /tmp) stays out of reach of
    the next instance given the same port: the user id is not the port's alone (an instance that
    held every other port of the range could otherwise pick its successor's user)."""
    probe = make(places)
    port = probe._free_port()
    backend = make(places, process_ports=f"{port}-{port}")
    first = await backend.start(secrets.token_urlsafe(16), "t0ken")
    uid = (backend.family / first.handle).stat().st_uid
    leftover = Path(tempfile.gettempdir()) / f"datalab-leftover-{first.id}"
    try:
        as_user(uid, "sh", "-c", f"umask 077; echo private > {leftover}", cwd=backend.family / first.handle)
        await backend.stop(first.handle)
        second = await backend.start(secrets.token_urlsafe(16), "t0ken")
        try:
            later = (backend.family / second.handle).stat().st_uid
            assert second.port == first.port and later != uid
            assert as_user(later, "cat", str(leftover), cwd=places, check=False).returncode != 0
        finally:
            await backend.stop(second.handle)
    finally:
        leftover.unlink(missing_ok=True)


def command_lines() -> list[bytes]:
    """Every process's command line, as any local user reads them."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(path.read_bytes())
    return lines


def squat(port: int, stop: threading.Event) -> None:
    """Another local user's trap: a socket bound to the port (SO_REUSEADDR, not listening, so the
    port still looks free) that listens once a Jupyter for that port is seen starting, so it is
    there before Jupyter binds, and answers 200 to everything."""
    with socket.socket() as trap:
        trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        trap.bind(("127.0.0.1", port))
        flag = f"--ServerApp.port={port}".encode()
        while not stop.is_set() and not any(flag in command for command in command_lines()):
            stop.wait(0.005)
        trap.listen()
        trap.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = trap.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")


async def test_a_start_is_not_answered_by_whoever_took_its_port(places):
    """Anyone on the host may listen on the instance's port before its Jupyter does (its command
    line, with the port, is public in /proc): such a listener answering is no instance."""
    port = make(places)._free_port()
    backend = make(places, process_ports=f"{port}-{port}")
    stop = threading.Event()
    trap = threading.Thread(target=squat, args=(port, stop))
    trap.start()
    try:
        with pytest.raises(BackendError):
            instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
            await backend.stop(instance.handle)
    finally:
        stop.set()
        trap.join()
    assert await backend.inventory() == []


async def test_an_exited_instance_is_reported(places):
    backend = make(places)
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    exits = backend.exits()
    try:
        os.kill(server_pid(backend, instance), 9)
        assert await asyncio.wait_for(anext(exits), 10) == instance.id
        assert await backend.poll(instance) is False
        assert await backend.inventory() == [InventoryEntry(instance.id, instance.handle, False)]
    finally:
        await backend.stop(instance.handle)
    assert await backend.inventory() == []


async def test_a_starting_instance_is_never_taken_for_gone(places):
    """From the moment its server is spawned, poll says it runs: while the server execs (setpriv,
    prlimit, Python) its command line reads empty, and a poll that went by it failed starts at random
    ("the instance exited while starting") and would have had reconciliation end a live instance.
    Each start is watched through its first half second (the window is a few milliseconds), then
    abandoned, as by a client gone mid-start: that leaves nothing either."""
    backend = make(places)
    for _ in range(8):
        handle = secrets.token_urlsafe(16)
        starting = asyncio.create_task(backend.start(handle, "t0ken"))
        seen: list[bool] = []
        watched = None
        while not starting.done() and (watched is None or time.monotonic() < watched + 0.5):
            if (backend.family / f"{handle}.pid").exists():
                watched = watched or time.monotonic()
                seen.append(await backend.poll(Instance(handle, "process", handle, "127.0.0.1", 0, "", 0.0, "")))
            await asyncio.sleep(0)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        assert seen and all(seen), f"{seen.count(False)} of {len(seen)} polls said a starting instance was gone"
    assert await backend.inventory() == []


async def test_a_server_is_known_by_its_pid_start_time_and_boot(places):
    """A pid file that names another process (a pid reused, or pid and start time recurring after a
    reboot, which instance directories survive) names no running instance: stop signals no stranger."""
    backend = make(places)
    instance = await backend.start(secrets.token_urlsafe(16), "t0ken")
    noted = backend.family / f"{instance.handle}.pid"
    pid, started, boot = noted.read_text().split()
    try:
        for other in (f"{pid} {int(started) + 1} {boot}", f"{pid} {started} {uuid.uuid4()}", f"1 {started} {boot}"):
            noted.write_text(other)
            assert await backend.poll(instance) is False, other
        noted.write_text(f"{pid} {started} {boot}")
        assert await backend.poll(instance) is True
    finally:
        await backend.stop(instance.handle)


async def test_handles_from_elsewhere_are_refused(places):
    """A handle comes from a record in Redis: one that is not an instance id names nothing."""
    backend = make(places)
    victim = places / "victim"
    victim.mkdir()
    for handle in ("../victim", str(victim), "a b", ""):
        await backend.stop(handle)  # nothing to stop, nothing removed, no error
        assert victim.exists()
    with pytest.raises(BackendError):
        await backend.start("../escape-attempt", "t0ken")
    assert not (places / "escape-attempt").exists()


def redis_of_run_sh(state: Path) -> tuple[str, Path, dict[str, str]]:
    """Where run.sh's default Redis lives under `state`: its URL, its directory, and the environment
    scripts/setup.sh and the proxy's scripts read it from."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATALAB_")} | {"DATALAB_STATE": str(state)}
    return f"unix://{state}/redis/local/redis.sock", state / "redis" / "local", env | {"ROOT": str(root)}


def test_the_redis_of_run_sh_is_out_of_every_instances_reach(places):
    """Redis holds every instance's secret and route. The Redis run.sh starts by default (ensure_redis)
    listens on no port, only on a Unix socket in a directory that is root's alone, with its snapshot and
    append-only file: an instance's user (any uid but root's) can neither reach it, nor read its data,
    nor take its place while it is down (a loopback port, it could). The proxy's scripts find it by
    default."""
    state = places / f"state-{secrets.token_hex(3)}"
    url, data, env = redis_of_run_sh(state)
    socket_path = data / "redis.sock"
    uid = UID_BASE + 4242
    root = Path(env["ROOT"])
    try:
        subprocess.run(["bash", "-c", f". scripts/setup.sh && ensure_redis {url}"], cwd=root, env=env, check=True)
        redis_cli = ["redis-cli", "-s", str(socket_path)]
        assert subprocess.run([*redis_cli, "save"], capture_output=True).stdout == b"OK\n"
        assert subprocess.run([*redis_cli, "config", "get", "port"], capture_output=True).stdout == b"port\n0\n"
        for name in ("dump.rdb", "appendonlydir/appendonly.aof.manifest"):
            assert (data / name).exists()
            assert as_user(uid, "cat", str(data / name), cwd=root, check=False).returncode
        instance_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        as_instance = subprocess.run([*instance_user, *redis_cli, "ping"], capture_output=True, text=True)
        assert "PONG" not in as_instance.stdout and "Permission denied" in as_instance.stdout + as_instance.stderr
        for squat in ("s.bind(sys.argv[1])", "open(sys.argv[1] + '.new', 'w')"):  # its place, its directory
            code = f"import socket, sys; s = socket.socket(socket.AF_UNIX); {squat}"
            squatter = [*instance_user, "/usr/bin/python3", "-c", code, str(socket_path)]  # (pyenv's: root's alone)
            as_instance = subprocess.run(squatter, capture_output=True)
            assert as_instance.returncode and b"Permission denied" in as_instance.stderr

        admin = [sys.executable, str(root / "scripts" / "datalab-admin.py"), "list"]  # no --redis-url: the default
        listed = subprocess.run(admin, env={**env, "DATALAB_BACKEND": "process"}, capture_output=True, text=True)
        assert listed.returncode == 0, listed.stderr
    finally:
        subprocess.run(["redis-cli", "-s", str(socket_path), "shutdown", "nosave"], capture_output=True)


@pytest.mark.parametrize("trap", ["owned by another", "a symlink to root's", "in a directory all may write"])
def test_redis_is_not_started_where_another_user_could_reach_it(places, trap):
    """Redis writes its data (every instance's secret) as root: in a state directory another user owns
    or can swap (a symlink, a parent anyone may write without the sticky bit), that user could read
    it, replace the socket, or aim root's writes at root's own files. ensure_redis refuses, and does
    nothing there first (the symlink's target keeps its mode)."""
    other = UID_BASE + 4343
    parent = places / f"parent-{secrets.token_hex(3)}"
    parent.mkdir()
    state = parent / "state"
    victim = places / f"victim-{secrets.token_hex(3)}"
    victim.mkdir(mode=0o755)
    (state / "redis").parent.mkdir()
    if trap == "owned by another":
        (state / "redis").mkdir()
        os.chown(state / "redis", other, other)
    elif trap == "a symlink to root's":
        (state / "redis").symlink_to(victim)
    else:
        parent.chmod(0o777)
    url, data, env = redis_of_run_sh(state)
    ensure = ["bash", "-c", f". scripts/setup.sh && ensure_redis {url}"]
    refused = subprocess.run(ensure, cwd=env["ROOT"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "this user's alone" in refused.stderr, refused.stderr
    assert not (data / "redis.sock").exists()
    assert oct(victim.stat().st_mode & 0o777) == "0o755" and list(victim.iterdir()) == []
