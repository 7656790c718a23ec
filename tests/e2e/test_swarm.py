"""`./run.sh --swarm` end to end: the proxy deployed inside this machine's single-node swarm (two
replicas, the Swarm backend, Redis as a service), reached only through the published port.

The seed's contract (start, view, static, a kernel over WebSocket, refusals, stop) through that port,
a session served by both replicas, and SIGTERM to run.sh removing the stack and every instance service.
Needs the proxy image (scripts/build-proxy-image.sh; scripts/test.sh builds it).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest
import requests

from e2e.proxy import Browser
from e2e.proxy import Proxy
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
PROXY_IMAGE = os.environ.get("DATALAB_PROXY_IMAGE", "datalab-proxy:latest")
CSV = b"city,population\nReykjavik,139875\nNuuk,19872\n"
READY_TIMEOUT = 300  # the first run may build images (quick when they are current)
STOP_TIMEOUT = 120
REFUSED_WITHIN = 60  # seconds: run.sh's set-up when its venv is current, then the refusal


class Stack:
    """A `./run.sh --swarm` in its own process group, and what it deploys (named by `stack`)."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = ("--set", "datalab_pool_size=0")):
        """`args`: run.sh's after --swarm ("{port}" in one: a free port other than the published one)."""
        self.name = f"dltest{secrets.token_hex(3)}"
        self.prefix = f"{self.name}:"
        self.port = free_port()
        self.sign_key = secrets.token_hex(32)
        self.log = workdir / "run-swarm.log"
        self.other_port = free_port()
        env = os.environ | {
            "DATALAB_STACK": self.name,
            "DATALAB_PORT": str(self.port),
            "DATALAB_KEY_PREFIX": self.prefix,
            "DATALAB_SIGN_KEY": self.sign_key,
            "DATALAB_REPLICAS": "2",
        }
        self.proc = subprocess.Popen(
            [str(ROOT / "run.sh"), "--swarm", *(a.replace("{port}", str(self.other_port)) for a in args)],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # The proxy's client helpers (signing, uploads) pointed at the published port.
        self.proxy = Proxy("redis://unused", self.prefix, self.sign_key, workdir)
        self.proxy.port = self.port

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_answering(self) -> None:
        """Until the addon answers on the published port (run.sh still running)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"run.sh --swarm exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}"
            )
            try:
                r = requests.get(self.proxy.url("/datalab/"), timeout=5)
                if r.status_code == 404 and r.json()["code"] == "NOT_FOUND":
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        pytest.fail(f"the stack did not answer on port {self.port} in {READY_TIMEOUT} s:\n{self.log_text()[-3000:]}")

    def terminate(self) -> int:
        """SIGTERM to run.sh, as an operator's Ctrl-C or service manager; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"run.sh --swarm did not end within {STOP_TIMEOUT} s of SIGTERM")

    def services(self, client: docker.DockerClient) -> list:
        """The stack's services and the instance services of its key prefix."""
        stack = client.services.list(filters={"label": f"com.docker.stack.namespace={self.name}"})
        instances = client.services.list(filters={"label": f"datalab.prefix={self.prefix}"})
        return stack + instances

    def remove_volume(self, client: docker.DockerClient) -> None:
        """The stack's Redis volume (a stack's removal keeps it), once its container is gone."""
        deadline = time.monotonic() + 30
        while True:
            try:
                client.volumes.get(f"{self.name}_redis-data").remove()
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:  # still in use by a container being removed
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def proxy_containers(self, client: docker.DockerClient) -> list:
        return client.containers.list(filters={"label": f"com.docker.swarm.service.name={self.name}_proxy"})


@pytest.fixture(scope="module")
def stack(docker_client, tmp_path_factory):
    try:
        docker_client.images.get(PROXY_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {PROXY_IMAGE} is missing; build it with scripts/build-proxy-image.sh")
    s = Stack(tmp_path_factory.mktemp("swarm"))
    try:
        s.wait_answering()
        yield s
    finally:
        s.terminate()
        s.remove_volume(docker_client)


@pytest.fixture(scope="module")
def csv_nonce(stack):
    return stack.proxy.start_instance("cities.csv", CSV)


def error_of(r: requests.Response) -> str:
    assert r.headers["Content-Type"] == "application/json"
    return r.json()["code"]


@pytest.mark.parametrize(
    "args",
    [
        ("-p", "{port}"),
        ("--listen-port={port}",),
        ("--set", "listen_port={port}"),
        ("--set=listen_port={port}",),
        ("--listen-host", "127.0.0.1"),
        ("--mode", "regular@{port}"),
    ],
    ids=lambda args: " ".join(args),
)
def test_where_replicas_listen_is_refused_at_once_naming_datalab_port(args, docker_client, tmp_path):
    """mitmproxy's -p (which plain ./run.sh takes) and the like would have the replicas listen where the
    published port (DATALAB_PORT) does not lead: every request would hang. They are refused at once,
    saying to set DATALAB_PORT, and nothing is deployed."""
    s = Stack(tmp_path, args)
    try:
        returncode = s.proc.wait(timeout=REFUSED_WITHIN)
    except subprocess.TimeoutExpired:
        s.terminate()
        s.remove_volume(docker_client)
        pytest.fail(f"run.sh --swarm {' '.join(args)} was not refused; it went on:\n{s.log_text()[-3000:]}")
    out = s.log_text()
    assert returncode != 0 and "DATALAB_PORT" in out and "is not for --swarm" in out, out
    assert (
        s.name
        not in subprocess.run(
            ["docker", "stack", "ls", "--format", "{{.Name}}"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert s.services(docker_client) == []


def test_two_replicas_run_the_swarm_backend(stack, docker_client):
    assert len(stack.proxy_containers(docker_client)) == 2
    assert "instances run on the swarm backend" in stack.log_text()


def test_start_view_and_static_through_the_published_port(stack, csv_nonce, docker_client):
    instances = docker_client.services.list(filters={"label": f"datalab.prefix={stack.prefix}"})
    assert len(instances) == 1  # the instance is a Swarm service
    browser = Browser(stack.proxy)
    r = browser.view(csv_nonce, "tree")
    assert r.headers["Location"] == "/tree" and r.headers["Set-Cookie"].startswith("datalab_session=")
    page = browser.get("/tree")
    assert page.status_code == 200 and "Jupyter" in page.text
    r = requests.get(stack.proxy.url(f"/datalab/static/{csv_nonce}/files/cities.csv"), timeout=30)
    assert r.status_code == 200 and r.content == CSV


def test_kernel_over_websocket_reads_the_upload(stack, csv_nonce):
    browser = Browser(stack.proxy)
    browser.view(csv_nonce)
    kernel = browser.start_kernel()
    assert browser.execute(kernel, "print(open('cities.csv').read(), end='')") == CSV.decode()


def test_a_session_is_served_by_both_replicas(stack, csv_nonce, docker_client):
    """Fresh connections spread over the replicas; each routes the session (Redis is shared)."""
    browser = Browser(stack.proxy)
    browser.view(csv_nonce)
    marker = uuid.uuid4().hex[:8]  # short: mitmdump's log line cuts a long URL
    for _ in range(16):
        with requests.Session() as fresh:  # a new connection each time
            fresh.cookies.update(browser.http.cookies)
            r = fresh.get(stack.proxy.url(f"/api/status?m={marker}"), timeout=30)
            assert r.status_code == 200 and "started" in r.json()
    served = [c for c in stack.proxy_containers(docker_client) if marker in c.logs().decode(errors="replace")]
    assert len(served) == 2


def test_refusals(stack):
    r = stack.proxy.upload("x.csv", CSV, sign="0" * 64)
    assert r.status_code == 403 and error_of(r) == "BAD_SIGNATURE"
    r = requests.get(stack.proxy.url("/api/status"), timeout=30)
    assert r.status_code == 403 and error_of(r) == "NO_SESSION"


def test_stop_ends_the_session(stack, docker_client):
    nonce = stack.proxy.start_instance("stop.csv", CSV)
    browser = Browser(stack.proxy)
    browser.view(nonce)
    assert browser.get("/api/status").status_code == 200
    assert stack.proxy.stop_instance(nonce).status_code == 200
    r = browser.get("/api/status")
    assert r.status_code == 410 and error_of(r) == "INSTANCE_GONE"


def test_sigterm_removes_the_stack_and_every_instance(stack, csv_nonce, docker_client):
    assert stack.services(docker_client)
    assert stack.terminate() == 0
    assert stack.services(docker_client) == []
    assert docker_client.networks.list(names=[f"{stack.name}_state", f"{stack.name}_front"]) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(stack.proxy.url("/datalab/"), timeout=5)
