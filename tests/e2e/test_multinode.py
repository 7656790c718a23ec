"""The stack on a three-node swarm on this machine (scripts/multinode.sh): nodes are containers with engines of
their own, joined into a swarm that is not the host's; the stack is deployed there by `multinode.sh deploy`
(deploy/datalab-stack.yml with deploy/multinode.yml), reached only through its published port on the first
node's address.

The seed's contract (start, view, a Jupyter request, a kernel's WebSocket round trip, static) with the instance
on another node than the replica that answered, over the instances' overlay across engines. Which node runs
the instance and which replica answered are found from the swarm's own task placement (the first node's
engine), and from the answering replica's log (a marker in each request: its URL is logged).
Then, on that swarm: capacity counted from the nodes the constraint admits; a stopped instance's volumes
removed on the worker that ran it; a worker node killed (`docker kill`) with an instance and an open kernel
WebSocket on it (410, the WebSocket closed, capacity one node's, the work unsaved or whole, nothing left on it
once `multinode.sh up` brings it back); a replica's node killed (the other replica serves every session);
start-time medians against the host's single-node swarm and the machine's memory, printed for the note.
Needs the notebook and proxy images on the host; builds the node image when missing (scripts/build-node-image.sh).
The proxy image must hold this tree's addon (the stack runs it): DATALAB_PROXY_IMAGE names another than
datalab-proxy:latest (scripts/build-proxy-image.sh IMAGE). About 5-6 minutes on the 2-core machine (an `up`
~70 s, the node kill ~110 s, `down` ~25-40 s); it removes the multi-node swarm at the end, one that was up
before it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests
import websockets

from backends.container_spec import ContainerSpec
from backends.swarm import SwarmBackend
from backends.swarm import volume_names
from backends.volume_cleanup import LABEL_CLEANUP
from e2e.conftest import IMAGE
from e2e.proxy import Browser
from e2e.proxy import Proxy
from e2e.proxy import run_code
from helpers import backend_of

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "multinode.sh"
SOCKETS = Path("/run/datalab-mn")
NODES = ("datalab-mn-1", "datalab-mn-2", "datalab-mn-3")
INSTANCE_NODES = {"datalab-mn-2", "datalab-mn-3"}  # datalab.instances (multinode.sh)
PORT = 8080
CSV = b"city,population\nReykjavik,139875\nNuuk,19872\n"
UP_TIMEOUT = 900  # a first up may build the node image (debootstrap) and load the images into three engines
CONSTRAINT = "node.labels.datalab.instances==true"  # what multinode.sh deploy gives the replicas
ATTEMPTS = 8  # fresh connections per step until a replica on another node than the instance answered one
RECONCILE_S = 3600  # the stack's datalab_cull_interval: no reconciliation round within a test


def engine(node: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{SOCKETS / node / 'docker.sock'}", timeout=30)


def node_address(node: str) -> str:
    out = subprocess.run(
        ["docker", "inspect", "-f", '{{(index .NetworkSettings.Networks "datalab-mn-net").IPAddress}}', node],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


class NodeProxy(Proxy):
    """The tests' client helpers (signing, uploads) pointed at a port published on a node's address."""

    def __init__(self, address: str, port: int, prefix: str, sign_key: str, workdir: Path):
        super().__init__("redis://unused", prefix, sign_key, workdir)
        self.address = address
        self.port = port

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"


class MultiNodeStack:
    """A stack deployed on the multi-node swarm, seen through the first node's engine (a manager's)."""

    def __init__(self, workdir: Path):
        self.name = f"dlmn{secrets.token_hex(3)}"
        self.prefix = f"{self.name}:"
        self.manager = engine(NODES[0])
        self.proxy = NodeProxy(node_address(NODES[0]), PORT, self.prefix, secrets.token_hex(32), workdir)

    def deploy(self) -> None:
        env = os.environ | {
            "DATALAB_STACK": self.name,
            "DATALAB_KEY_PREFIX": self.prefix,
            "DATALAB_SIGN_KEY": self.proxy.sign_key,
            "DATALAB_PORT": str(PORT),
        }
        out = subprocess.run(
            # Reconciliation an hour apart: a lost node's instances must be ended by its node event.
            [str(SCRIPT), "deploy", "--set", "datalab_pool_size=0", "--set", f"datalab_cull_interval={RECONCILE_S}"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]

    def node_of(self, task: dict) -> str:
        return self.manager.nodes.get(task["NodeID"]).attrs["Description"]["Hostname"]

    def instance_node(self) -> str:
        """The node whose engine runs this stack's one instance."""
        services = self.manager.services.list(filters={"label": f"datalab.prefix={self.prefix}"})
        assert len(services) == 1
        running = [t for t in services[0].tasks() if t["Status"]["State"] == "running"]
        assert len(running) == 1
        return self.node_of(running[0])

    def replica_logs(self) -> dict[str, str]:
        """Each running proxy replica's log, by the node it runs on."""
        logs = {}
        for task in self.manager.services.get(f"{self.name}_proxy").tasks(filters={"desired-state": "running"}):
            node = self.node_of(task)
            container = engine(node).containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
            logs[node] = container.logs().decode(errors="replace")
        return logs


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=UP_TIMEOUT)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        s = MultiNodeStack(tmp_path_factory.mktemp("multinode"))
        s.deploy()
        yield s
    finally:
        down = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]


def answered_across(stack: MultiNodeStack, away_from: str, step: Callable[[str], str]) -> str:
    """Runs `step` (on fresh connections; it returns the marker its request carried) until a replica on
    another node than `away_from` answered one: that replica's node."""
    for _ in range(ATTEMPTS):
        marker = step(uuid.uuid4().hex[:8])
        served = [node for node, log in stack.replica_logs().items() if marker in log]
        assert served, f"no replica logged {marker}"
        if away_from not in served:
            return served[0]
    pytest.fail(f"no replica on another node than {away_from} answered in {ATTEMPTS} attempts")


def test_the_contract_with_the_instance_on_another_node(stack):
    started = time.monotonic()
    nonce = stack.proxy.start_instance("cities.csv", CSV)
    start_s = time.monotonic() - started
    where = stack.instance_node()
    assert where in INSTANCE_NODES
    cookies = None

    def view(marker: str) -> str:
        nonlocal cookies
        browser = Browser(stack.proxy)
        r = browser.view(nonce, f"tree?m={marker}")
        assert r.headers["Set-Cookie"].startswith("datalab_session=")
        cookies = browser.http.cookies
        page = browser.get(f"/tree?m={marker}")
        assert page.status_code == 200 and "Jupyter" in page.text
        return marker

    def fresh() -> Browser:
        return Browser(stack.proxy, http=requests.Session())

    def jupyter_request(marker: str) -> str:
        browser = fresh()
        browser.http.cookies.update(cookies)
        r = browser.get(f"/api/status?m={marker}")
        assert r.status_code == 200 and "started" in r.json()
        return marker

    def kernel_round_trip(_: str) -> str:
        browser = fresh()
        browser.http.cookies.update(cookies)
        kernel = browser.start_kernel()
        assert browser.execute(kernel, "print(open('cities.csv').read(), end='')") == CSV.decode()
        return f"/api/kernels/{kernel}/channels"  # in every WebSocket message's log line

    def static(marker: str) -> str:
        r = requests.get(stack.proxy.url(f"/datalab/static/{nonce}/files/cities.csv?m={marker}"), timeout=30)
        assert r.status_code == 200 and r.content == CSV
        return marker

    answered = {
        name: answered_across(stack, where, step)
        for name, step in [
            ("view", view),
            ("jupyter", jupyter_request),
            ("websocket", kernel_round_trip),
            ("static", static),
        ]
    }
    assert all(node != where for node in answered.values())
    print(f"start {start_s:.1f} s; instance on {where}; answered from {answered}")
    assert stack.proxy.stop_instance(nonce).status_code == 200


def rig_backend(**changes) -> SwarmBackend:
    """A Swarm backend of a prefix of its own on the first node's engine (a manager), from the host."""
    url = f"unix://{SOCKETS / NODES[0] / 'docker.sock'}"
    return backend_of(SwarmBackend, **{"image": IMAGE, "docker_url": url, "swarm_constraint": CONSTRAINT, **changes})


async def test_capacity_counts_only_the_nodes_the_constraint_admits(stack):
    """Every node here reports the host's memory, so the count of nodes is what tells: 2 of 3 admit instances."""
    one = stack.manager.nodes.list()[0].attrs["Description"]["Resources"]["MemoryBytes"]
    assert all(n.attrs["Description"]["Resources"]["MemoryBytes"] == one for n in stack.manager.nodes.list())
    assert await rig_backend().memory() == 2 * one
    assert await rig_backend(swarm_constraint="").memory() == 3 * one
    assert await rig_backend(swarm_constraint="node.role==manager").memory() == 3 * one  # all three are managers


async def until(check: Callable[[], object], timeout: float, what: str) -> object:
    """`check()` until it is true (bounded; no timing asserted beyond the bound)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.5)
    return found


async def test_a_stopped_instances_volumes_are_removed_on_the_node_that_ran_it(stack):
    backend = rig_backend()
    net = await backend.network()
    image = await backend._image(IMAGE)
    spec = ContainerSpec.from_limits(backend.resolved(backend.limits), image, "i" * 32, "t0ken", net.name)
    service = await backend._create(spec)
    try:

        def running() -> str | None:
            tasks = [t for t in service.tasks() if t["Status"]["State"] == "running"]
            return stack.node_of(tasks[0]) if tasks else None

        node = await until(running, 60, "the instance's task never ran")
        assert node in INSTANCE_NODES and node != NODES[0]  # another engine than the one asked
        names = set(volume_names(spec.name).values())
        there = engine(node)
        assert {v.name for v in there.volumes.list()} >= names  # made there, not on the manager
    finally:
        await backend.stop(service.id)

    await until(lambda: not names & {v.name for v in there.volumes.list()}, 150, "the volumes stayed on their node")

    ours = {"label": f"datalab.prefix={backend.limits.label_prefix}"}
    for _ in range(60):  # each reconciliation round (inventory) removes the clean-up jobs that ended
        await backend.inventory()
        if not stack.manager.services.list(filters=ours):
            break
        await asyncio.sleep(1)
    assert stack.manager.services.list(filters=ours) == []  # neither the instance nor its job is left


GONE_BOUND = 120  # seconds from a node's death to its sessions' 410 (reported; the bound only ends a hung test)


def one_node_memory(stack: MultiNodeStack) -> int:
    return stack.manager.nodes.list()[0].attrs["Description"]["Resources"]["MemoryBytes"]


@contextlib.contextmanager
def placing_only_on(stack: MultiNodeStack, node: str) -> Iterator[None]:
    """New tasks go to `node` alone: the other instance nodes paused (their tasks run on). Swarm spreads by
    tasks per node, and breaks a tie its own way: left to it, a test may never see an instance on `node`."""
    others = [stack.manager.nodes.get(each) for each in sorted(INSTANCE_NODES - {node})]
    for other in others:
        other.update({**other.attrs["Spec"], "Availability": "pause"})
    try:
        yield
    finally:
        for other in others:
            other.reload()
            other.update({**other.attrs["Spec"], "Availability": "active"})


def session_on(stack: MultiNodeStack, node: str) -> tuple[Browser, str, str]:
    """A viewed session (its browser, its instance's nonce and work) whose instance runs on `node`."""
    with placing_only_on(stack, node):
        nonce, work = stack.proxy.start_with_work("cities.csv", CSV)
    services = stack.manager.services.list(filters={"label": f"datalab.prefix={stack.prefix}"})
    newest = max(services, key=lambda s: s.attrs["CreatedAt"])
    assert [stack.node_of(t) for t in newest.tasks() if t["Status"]["State"] == "running"] == [node]
    browser = Browser(stack.proxy)
    browser.view(nonce)
    return browser, nonce, work


def stack_services(stack: MultiNodeStack) -> list:
    """The stack's instance services: not its proxies' (no prefix label), nor a volume clean-up job, which
    waits for its node (volume_cleanup.py)."""
    listed = stack.manager.services.list(filters={"label": f"datalab.prefix={stack.prefix}"})
    return [s for s in listed if LABEL_CLEANUP not in (s.attrs["Spec"].get("Labels") or {})]


def kill(node: str) -> float:
    subprocess.run(["docker", "kill", node], check=True, capture_output=True)
    return time.monotonic()


def bring_back() -> None:
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=UP_TIMEOUT)
    assert up.returncode == 0, up.stderr[-3000:]


def ours_on(node: str, prefix: str) -> list[str]:
    """What the stack's instances left on a node's engine: containers and volumes of its prefix."""
    there = engine(node)
    label = {"label": f"datalab.prefix={prefix}"}
    return [c.name for c in there.containers.list(all=True, filters=label)] + [
        v.name for v in there.volumes.list(filters=label)
    ]


async def test_a_worker_node_killed_ends_its_sessions_and_leaves_nothing_when_it_comes_back(stack):
    node = "datalab-mn-3"  # instances only: no replica, no Redis
    browser, nonce, work = session_on(stack, node)
    kernel = browser.start_kernel()
    with browser.kernel_channels(kernel) as ws:
        assert run_code(ws, "print(6 * 7)") == "42\n"
        died = kill(node)
        # No request meanwhile (a request's connection given up would check the instance: connect_deadline.py),
        # and no reconciliation round for an hour: only the node's event can end the instance (its service
        # removed), as Swarm marks the node down.
        node_state = lambda: stack.manager.nodes.get(node).attrs["Status"]["State"]  # noqa: E731
        await until(lambda: node_state() == "down", GONE_BOUND, f"{node} was never marked down")
        down_s = time.monotonic() - died
        await until(lambda: not stack_services(stack), GONE_BOUND, "the lost node's instance was not ended")
        ended_s = time.monotonic() - died
        r = browser.http.get(browser.url("/api/status"), timeout=30)
        assert (r.status_code, r.json()["code"]) == (410, "INSTANCE_GONE"), r.text[:300]
        with pytest.raises(websockets.exceptions.ConnectionClosed):  # its open WebSocket has ended too
            while True:
                ws.recv(timeout=GONE_BOUND)

    one = one_node_memory(stack)
    for _ in range(120):  # Swarm marks the node down after missed heartbeats
        if await rig_backend().memory() == one:
            break
        await asyncio.sleep(0.5)
    assert await rig_backend().memory() == one  # capacity: one instance node left, not two
    capacity_s = time.monotonic() - died

    for _ in range(120):  # its work: unsaved (the node is gone) or saved whole, never half
        saved = stack.proxy.work(work)
        if saved.status_code != 503:
            break
        await asyncio.sleep(1)
    if saved.status_code == 200:
        with tarfile.open(fileobj=io.BytesIO(saved.content), mode="r:gz") as archive:
            assert archive.getmembers()  # a whole archive: read to its end
    else:
        assert (saved.status_code, saved.json()["code"]) == (410, "WORK_UNSAVED"), saved.text

    back = time.monotonic()
    bring_back()
    await until(lambda: not ours_on(node, stack.prefix), 180, f"left on {node}: {ours_on(node, stack.prefix)}")
    clean_s = time.monotonic() - back
    assert await rig_backend().memory() == 2 * one
    print(
        f"node killed: marked down after {down_s:.1f} s, its instance ended by {ended_s:.1f} s, by {capacity_s:.1f} s "
        f"capacity was one node's; work {saved.status_code}; back: nothing of ours on {node} {clean_s:.1f} s after up"
    )


async def test_a_replicas_node_killed_the_other_replica_serves_every_session(stack):
    node = "datalab-mn-2"  # a proxy replica (and instances); the other replica is on datalab-mn-1
    browser, nonce, _ = session_on(stack, "datalab-mn-3")
    assert browser.get("/api/status").status_code == 200
    died = kill(node)
    try:
        served = 0
        while served < 20:  # 20 requests in a row answered, each on a fresh connection
            try:
                r = Browser(stack.proxy, http=requests.Session())
                r.http.cookies.update(browser.http.cookies)
                ok = r.get("/api/status").status_code == 200
            except requests.RequestException:
                ok = False
            served = served + 1 if ok else 0
            assert time.monotonic() - died < GONE_BOUND, f"not served in a row {GONE_BOUND} s after the kill"
            if not ok:
                await asyncio.sleep(0.5)
        print(f"replica's node killed: every request served again after {time.monotonic() - died:.1f} s")
        kernel = Browser(stack.proxy, http=requests.Session())
        kernel.http.cookies.update(browser.http.cookies)
        assert kernel.execute(kernel.start_kernel(), "print(6 * 7)") == "42\n"
    finally:
        bring_back()
    assert stack.proxy.stop_instance(nonce).status_code == 200


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def task_start_s(backend: SwarmBackend, client: docker.DockerClient) -> float:
    """Seconds from a service's creation to its task running (placement, the node's container), then removed."""
    net = await backend.network()
    image = await backend._image(IMAGE)
    spec = ContainerSpec.from_limits(backend.resolved(backend.limits), image, "i" * 32, "t0ken", net.name)
    began = time.monotonic()
    service = await backend._create(spec)
    try:
        await until(lambda: any(t["Status"]["State"] == "running" for t in service.tasks()), 60, "never ran")
        return time.monotonic() - began
    finally:
        await backend.stop(service.id)
        task = {"label": f"com.docker.swarm.service.id={service.id}"}
        await until(lambda: not client.containers.list(all=True, filters=task), 60, "its container stayed")
        await backend.stop(service.id)  # again, once its container is gone: this engine's volumes go too


async def test_start_times_multi_node_against_single_node_and_memory(stack):
    """For the note (printed, nothing timed is asserted): in one run, alternating, a task's start on the
    host's single-node swarm and on this swarm's instance nodes; starts through the stack's port; memory."""
    single, multi = backend_of(SwarmBackend, image=IMAGE), rig_backend()
    host = docker.from_env()
    times: dict[str, list[float]] = {"single-node task": [], "multi-node task": [], "multi-node stack start": []}
    for _ in range(5):
        times["single-node task"].append(await task_start_s(single, host))
        times["multi-node task"].append(await task_start_s(multi, stack.manager))
        began = time.monotonic()
        nonce = stack.proxy.start_instance("cities.csv", CSV)
        times["multi-node stack start"].append(time.monotonic() - began)
        assert stack.proxy.stop_instance(nonce).status_code == 200
    medians = {what: round(median(each), 2) for what, each in times.items()}
    ratio = medians["multi-node task"] / medians["single-node task"]
    free = subprocess.run(["free", "-m"], capture_output=True, text=True).stdout
    stats = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *NODES],
        capture_output=True,
        text=True,
    ).stdout
    print(f"start medians (s) {medians}; multi/single task {ratio:.2f}x\n{free}{stats}")
    host.close()
