"""The proxy on the local-process backend (datalab_backend=process), end to end: real mitmdump,
Redis and Jupyter server processes; and datalab_backend=auto's choice."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from backends.local_process import UID_BASE
from e2e.helpers import error_of
from e2e.helpers import instance_of
from e2e.helpers import quietly
from e2e.helpers import records
from e2e.proxy import Browser
from helpers import free_port
from helpers import wait_until

CSV = b"city,population\nReykjavik,139875\nNuuk,19872\n"
ROOT = Path(__file__).resolve().parents[2]
RUN_SH_EXITS = 60  # seconds: run.sh's set-up when everything is current (venv, packages), then its refusal


@pytest.fixture
def process_proxy(make_proxy, world):
    def make(name: str, **options):
        return make_proxy(prefix=world.sub(name), datalab_backend="process", **options)

    return make


def running(world, prefix: str) -> list:
    return [f for f in asyncio.run(world.processes(prefix).inventory()) if f.running]


def test_the_whole_contract_on_local_processes(process_proxy, world):
    p = process_proxy("process")
    prefix = p.prefix
    assert "instances run on the process backend (datalab_backend=process)" in p.log_text()
    nonce = p.start_instance("cities.csv", CSV)
    instance = instance_of(world, prefix, nonce)
    assert (instance.backend, instance.host) == ("process", "127.0.0.1")

    browser = Browser(p)
    assert browser.view(nonce, "tree").headers["Location"] == "/tree"
    assert browser.get("/api/status").status_code == 200
    r = browser.get("/api/contents/cities.csv?content=1")
    assert r.status_code == 200 and r.json()["content"] == CSV.decode()
    static = browser.get(f"/datalab/static/{nonce}/files/cities.csv")
    assert static.status_code == 200 and static.content == CSV

    kernel = browser.start_kernel()
    code = "import os, pandas; print(os.getuid(), pandas.read_csv('cities.csv').population.sum(), os.getcwd())"
    code += "; print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])"
    uid, total, cwd, no_new_privileges = browser.execute(kernel, code).split()
    home = world.processes(prefix).family / instance.id
    assert int(uid) == home.stat().st_uid >= UID_BASE  # not root: its instance's own user
    assert no_new_privileges == "1"  # a set-uid file left by another instance's user gives no other user
    assert int(total) == 139875 + 19872 and cwd.endswith(f"/{instance.id}/work")

    r = p.stop_instance(nonce)
    assert r.status_code == 200
    r = browser.get("/api/status")
    assert r.status_code == 410 and error_of(r) == "INSTANCE_GONE"
    assert world.processes(prefix).family.exists() and running(world, prefix) == []
    assert list(world.processes(prefix).family.iterdir()) == [] and records(world, prefix) == set()


def test_a_proxy_killed_mid_start_leaves_no_process(process_proxy, world):
    doomed = process_proxy("process-crash", datalab_queue_timeout=1, datalab_start_timeout=8)
    prefix = doomed.prefix
    upload = threading.Thread(target=quietly(doomed.upload), args=("k.csv", CSV))
    upload.start()
    wait_until(lambda: running(world, prefix), "the start's Jupyter process", 30)
    doomed.kill()
    upload.join()
    assert running(world, prefix)  # orphaned by the crash: it does not die with its parent

    process_proxy("process-crash", datalab_cull_interval=1)
    # Its capacity lease (queue 1 s + start 8 s + margin) runs out, then reconciliation removes it.
    family = world.processes(prefix).family
    wait_until(lambda: not list(family.iterdir()), "the orphan and its directory removed", 60)
    assert running(world, prefix) == [] and records(world, prefix) == set()
    assert world.redis.zcard(prefix + "slots") == 0


def first_datalab_line(log: str) -> str:
    """The addon's first line (mitmdump's own come before it: "Loading script .../datalab.py")."""
    return next(line for line in log.splitlines() if re.search(r"\] datalab[: ]", line))


def test_auto_says_first_which_backend_it_chose_and_why(make_proxy, tmp_path):
    with_docker = make_proxy(datalab_backend="auto")
    line = first_datalab_line(with_docker.log_text())
    assert "instances run on the docker backend" in line and "Docker engine at" in line and "answers" in line

    without = make_proxy(datalab_backend="auto", datalab_docker_url=f"unix://{tmp_path}/no-engine.sock")
    line = first_datalab_line(without.log_text())
    assert re.search(r"instances run on the process backend \(datalab_backend=auto: no Docker engine answers", line)
    assert "Jupyter found in" in line


def test_a_start_without_jupyter_answers_what_health_says(process_proxy, world, tmp_path):
    """datalab_backend=process chosen while its Jupyter env is missing (run.sh built none): health names
    the backend, and a start gets the same sentence at once (503), its signature unspent, nothing
    created, instead of trying to run the missing Jupyter (502 START_FAILED)."""
    p = process_proxy("process-no-env", datalab_jupyter_env=str(tmp_path / "no-such-env"))
    keys_before = set(world.keys(p.prefix))
    health = requests.get(p.url("/datalab/health"), timeout=30)
    assert health.status_code == 503 and health.json()["code"] == "UNHEALTHY"
    sentence = health.json()["result"]["backend"]
    assert "Jupyter" in sentence and health.json()["message"] == f"backend: {sentence}"

    r = p.upload("missing.csv", CSV)
    assert r.status_code == 503 and error_of(r) == "IMAGE_MISSING", r.text
    assert r.json()["message"] == sentence
    assert set(world.keys(p.prefix)) == keys_before  # no instance, lease or spent signature
    assert running(world, p.prefix) == []
    assert not world.processes(p.prefix).family.exists() or not list(world.processes(p.prefix).family.iterdir())


@pytest.mark.parametrize("form", ["--set NAME=VALUE", "--set=NAME=VALUE"])
def test_run_sh_prepares_the_jupyter_env_of_a_backend_chosen_by_set(form, redis_server, sign_key, tmp_path):
    """`./run.sh --set datalab_backend=process` (while DATALAB_BACKEND says docker) prepares the process
    backend's Jupyter env, at the path the proxy will use (DATALAB_JUPYTER_ENV or --set
    datalab_jupyter_env), not Docker's image. Here that path cannot be made (below a file), so run.sh
    stops there, saying so, with nothing started: no proxy on the port, no Redis of its own."""
    (tmp_path / "a-file").write_text("")
    env_dir = tmp_path / "a-file" / "jupyter-env"
    port = free_port()
    environment = os.environ | {
        "DATALAB_BACKEND": "docker",
        "DATALAB_PORT": str(port),
        "DATALAB_REDIS_URL": redis_server.url,
        "DATALAB_SIGN_KEY": sign_key,
    }
    if form == "--set NAME=VALUE":
        args = ["--set", "datalab_backend=process"]
        environment["DATALAB_JUPYTER_ENV"] = str(env_dir)
    else:
        args = ["--set=datalab_backend=process", f"--set=datalab_jupyter_env={env_dir}"]
    run = subprocess.Popen(
        [str(ROOT / "run.sh"), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = run.communicate(timeout=RUN_SH_EXITS)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGTERM)
        out, _ = run.communicate(timeout=30)
        pytest.fail(f"run.sh did not stop at the Jupyter env; it went on:\n{out[-3000:]}")
    assert run.returncode != 0, out
    assert f"creating the Jupyter env {env_dir}" in out and f"creating {env_dir} failed" in out, out
    assert "build-image" not in out and "proxy listening" not in out, out
