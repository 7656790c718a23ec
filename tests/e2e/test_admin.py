"""scripts/datalab-admin.py as an operator runs it: a real process, the real Redis, a container of
the real image recorded as an instance through the product's own store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import inputs
from backends import Instance
from backends.container_spec import JUPYTER_PORT
from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import LABEL_MANAGED
from backends.container_spec import LABEL_PREFIX
from backends.container_spec import MANAGED_BY
from config import Settings
from e2e.conftest import IMAGE
from e2e.proxy import ROOT
from runtime import build_instances
from store import Store
from store import connect

ADMIN = ROOT / "scripts" / "datalab-admin.py"


def instance_network(redis_url: str, prefix: str) -> str:
    """The network the Docker backend gives instances addresses on (made if missing, as a proxy would)."""

    async def ask() -> str:
        settings = Settings(sign_key="unused", redis_url=redis_url, key_prefix=prefix, backend="docker")
        instances = build_instances(settings)
        try:
            return (await instances.backend.network()).name
        finally:
            await instances.store.close()

    return asyncio.run(ask())


def record(redis_url: str, prefix: str, instance: Instance, nonce: str) -> None:
    """Recorded as a start records it: a capacity slot, then the instance and its nonce."""

    async def write() -> None:
        store = Store(connect(redis_url), prefix)
        try:
            assert await store.reserve(instance.id, time.time(), 300, 100) == 1
            assert await store.bind(instance, nonce, 600, time.time())
        finally:
            await store.close()

    asyncio.run(write())


def admin(redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATALAB_REDIS_URL": redis_url, "DATALAB_KEY_PREFIX": prefix, "DATALAB_BACKEND": "docker"}
    return subprocess.run([sys.executable, str(ADMIN), *args], env=env, capture_output=True, text=True, timeout=60)


def test_remove_takes_an_id_that_starts_with_a_dash(redis_server, docker_client, world):
    """One id in 64 made before new_instance_id starts with '-'; argparse took it for an option.
    Its record also keeps a name accepted before the filename rule: listed, it stays on one line."""
    prefix = world.sub("admin")
    world.prefixes.add(prefix)
    instance_id = "-" + inputs.new_token()[1:]
    labels = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: prefix, LABEL_INSTANCE: instance_id}
    network = instance_network(redis_server.url, prefix)
    container = docker_client.containers.run(
        IMAGE, ["infinity"], entrypoint="sleep", detach=True, labels=labels, network=network, read_only=True
    )
    container.reload()
    host = container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
    now, nonce = time.time(), inputs.new_token()
    old_name = "a.csv\u2028forged line"  # accepted before the filename rule
    instance = Instance(instance_id, "docker", container.id, host, JUPYTER_PORT, old_name, now, inputs.new_token(), now)
    record(redis_server.url, prefix, instance, nonce)

    listed = admin(redis_server.url, prefix, "list")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 1, listed.stdout  # one instance, one line
    assert listed.stdout.startswith(f"{instance_id}  running") and "'a.csv\\u2028forged line'" in listed.stdout

    removed = admin(redis_server.url, prefix, "remove", instance_id)
    assert (removed.returncode, removed.stdout.strip()) == (0, f"removed {instance_id}"), removed.stderr
    assert world.containers(prefix) == []
    left = [k.decode() for k in world.keys(prefix)]
    assert [k for k in left if instance_id in k or nonce in k] == [f"{prefix}ended:{instance_id}"], left
    assert json.loads(world.redis.get(f"{prefix}ended:{instance_id}"))["cause"] == "removed"  # the ended page's
    assert admin(redis_server.url, prefix, "list").stdout == ""
