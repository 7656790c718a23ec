"""The backend contract (backends/__init__.py), once for every backend against its real engine: docker,
process (Jupyter processes on this host) and swarm (single-node swarm mode, scripts/setup.sh
ensure_swarm). What one backend alone does (its confinement, what its engine holds, its own refusals)
is tested in its own file: test_backend_docker.py, test_backend_process.py, test_backend_swarm.py.
Nothing here is skipped: without an engine, an image or Jupyter, these fail with the reason."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass

import docker
import pytest

from backend_steps import exercise
from backend_steps import files
from backend_steps import in_overlay
from backends import Backend
from backends import BackendError
from backends import ImageMissing
from backends import Instance
from backends import InventoryEntry
from backends import StartTimeout
from backends.docker_engine import LABEL_PREFIX
from backends.docker_engine import DockerBackend
from backends.memory_budget import size_bytes
from backends.swarm import SwarmBackend
from e2e.conftest import IMAGE
from helpers import backend_of
from helpers import process_backend

pytestmark = pytest.mark.engine


@dataclass
class Contract:
    """One backend as the contract tests use it."""

    name: str
    make: Callable[..., Backend]  # a backend of a prefix of its own; Limits's fields or its options as changes
    missing: dict[str, str]  # the option that makes what its instances run (image, Jupyter) missing
    hint: str  # what the refusal tells the operator to do
    exercise: Callable[[Backend, str], Awaitable[tuple[Instance, dict]]]  # backend_steps.exercise, where reachable


async def on_the_overlay(backend: SwarmBackend, instance_id: str) -> tuple[Instance, dict]:
    await backend.network()  # the helper joins it: it must exist first
    return await asyncio.to_thread(in_overlay, backend, instance_id)


def engine_in(mode: str) -> None:
    client = docker.from_env()  # no engine: this fails, it is not skipped
    try:
        swarm = client.info()["Swarm"]
        if mode == "swarm":
            assert swarm["LocalNodeState"] == "active", "the engine is not in swarm mode: run scripts/test.sh"
    finally:
        client.close()


@pytest.fixture(params=["docker", "process", "swarm"])
async def backend(request, places):
    """Each backend in turn; whatever a test's backends still run afterwards is stopped."""
    made: list[Backend] = []

    def tracked(make: Callable[..., Backend]) -> Callable[..., Backend]:
        def making(**changes) -> Backend:
            made.append(make(**changes))
            return made[-1]

        return making

    if request.param == "process":
        contract = Contract(
            "process", tracked(lambda **c: process_backend(places, **c)), {"jupyter_env": "/nonexistent/env"},
            "ensure_jupyter_env", exercise,
        )  # fmt: skip
    else:
        engine_in(request.param)
        cls = DockerBackend if request.param == "docker" else SwarmBackend
        contract = Contract(
            request.param, tracked(lambda **c: backend_of(cls, **{"image": IMAGE, **c})),
            {"image": "datalab-no-such-image:never"}, "scripts/build-image.sh",
            exercise if request.param == "docker" else on_the_overlay,
        )  # fmt: skip
    yield contract
    for backend in made:
        for found in await backend.inventory():
            await backend.stop(found.handle)
    if request.param == "swarm":
        await swept([b for b in made if isinstance(b, SwarmBackend)])


async def swept(backends: list[SwarmBackend]) -> None:
    """Swarm's in-memory volumes outlive their service a moment (its task's container goes after it):
    a later stop removes them. Wait for that, bounded (cleaning up, not a check)."""
    client = docker.from_env()
    try:
        for backend in backends:
            ours = {"label": f"{LABEL_PREFIX}={backend.limits.label_prefix}"}
            for _ in range(150):
                await backend.stop("gone-" + secrets.token_hex(4))
                if not client.volumes.list(filters=ours):
                    break
                await asyncio.sleep(0.2)
    finally:
        client.close()


def new_id() -> str:
    return secrets.token_hex(16)


async def test_start_put_file_unpack_poll_inventory_stop(backend):
    made = backend.make()
    instance, report = await backend.exercise(made, new_id())
    try:
        assert (instance.filename, instance.token, instance.backend) == ("", "t0ken", backend.name)
        assert report["read_back"] == {name: True for name, _ in files()}  # through Jupyter's contents API
        assert report["no_token"] == 403 and report["wrong_token"] == 403  # nobody but the proxy is served
        assert report["lsp"] == 404 and report["terminals"] == 200  # cut for cheaper boots, kept
        assert report["unpacked"] is True and report["refused"] == "BAD_ARCHIVE"
        assert await made.poll(instance) is True
        assert await made.inventory() == [InventoryEntry(instance.id, instance.handle, True)]
        assert await made.could_have_given(instance.host, instance.port)
        elsewhere = [("127.0.0.1", 6379), ("169.254.169.254", 80), (instance.host, 22), ("evil.example", 8888)]
        for forged in elsewhere + [("::1", 8888), ("::1", instance.port)]:
            assert not await made.could_have_given(*forged), forged
    finally:
        await made.stop(instance.handle)
    assert await made.poll(instance) is False
    assert await made.inventory() == []
    await made.stop(instance.handle)  # idempotent


async def test_what_instances_run_missing_is_refused_and_leaves_nothing(backend):
    made = backend.make(**backend.missing)
    with pytest.raises(ImageMissing, match=backend.hint):
        await made.check()
    with pytest.raises(BackendError):  # (Docker and Swarm say ImageMissing: their own files check it)
        await made.start(new_id(), "t0ken")
    assert await made.inventory() == []


async def test_a_readiness_timeout_leaves_nothing(backend):
    made = backend.make(start_timeout=0.2)
    with pytest.raises(StartTimeout):
        await made.start(new_id(), "t0ken")
    assert await made.inventory() == []


async def test_check_and_capacity_where_it_can_run(backend):
    made = backend.make()
    await made.check()
    assert await made.capacity() >= 1


async def test_its_memory_holds_its_capacity_at_the_default_limits(backend):
    """Capacity across profiles is counted in memory (Backend.memory): at the default's limits it
    holds as many instances as capacity() says (the one an engine too small still runs aside)."""
    made = backend.make()
    capacity = await made.capacity()
    assert capacity == 1 or await made.memory() >= capacity * size_bytes(made.limits.mem_limit)


async def test_a_handle_it_never_gave_stops_nothing(backend):
    made = backend.make()
    await made.stop("never-" + secrets.token_hex(8))  # no error: already gone counts as stopped
    assert await made.inventory() == []
