"""Scaling, end to end with real processes, Redis, Docker and Jupyter: the lean entry point serves
the whole flow, `run.sh --workers` shares one port between processes that share every decision
through Redis (and survive one of them dying), and big bodies stream through the proxy while small
ones stay visible to whoever debugs with a flow file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests
from mitmproxy import io as flow_io

from e2e.helpers import Workers
from e2e.proxy import ROOT
from e2e.proxy import Browser
from e2e.proxy import Proxy

CSV = b"city,people\nLyon,522000\nNantes,320000\n"
MIB = 1024 * 1024
BIG = 200 * MIB  # each way through the proxy
STREAM_SLACK = 64 * MIB  # the proxy's peak memory may grow this much while 2 x BIG pass


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of a process now (VmRSS) or at its peak so far (VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one whose parent is gone waits for init to reap it)."""
    try:
        return "zombie" not in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False


def test_the_lean_entry_point_serves_the_whole_flow(make_proxy):
    lean = make_proxy(tool="lean")
    nonce = lean.start_instance("cities.csv", CSV)
    browser = Browser(lean)
    browser.view(nonce)
    kernel = browser.start_kernel()
    out = browser.execute(kernel, "print(open('cities.csv').read().splitlines()[1])")
    assert out.strip() == "Lyon,522000"  # the upload reached the instance; HTTP and WebSocket are routed
    assert requests.get(lean.url(f"/datalab/static/{nonce}/files/cities.csv"), timeout=30).content == CSV
    r = requests.get(lean.url("/api/status"), timeout=30)
    assert r.status_code == 403 and r.json()["code"] == "NO_SESSION"
    assert "/api/status" not in lean.log_text()  # no flow printing in production (mitmdump prints each URL)


@pytest.fixture
def workers(redis_server, world, sign_key, tmp_path):
    prefix = world.sub("workers")
    world.prefixes.add(prefix)
    # Routes cached for 5 minutes: only the removal message can make a worker forget one in time.
    options = {"datalab_pool_size": 0, "datalab_route_cache_ttl": 300}
    w = Workers(Proxy(redis_server.url, prefix, sign_key, tmp_path, options))
    yield w
    w.stop()


def statuses(proxy: Proxy, cookie: str, n: int = 20) -> tuple[list[int], set[int]]:
    """n requests, each on its own new connection (so the kernel spreads them between workers):
    their statuses, and the pids of the processes that served them (their connections still open)."""
    sessions = [requests.Session() for _ in range(n)]
    try:
        codes = [s.get(proxy.url("/api/status"), headers={"Cookie": cookie}, timeout=30).status_code for s in sessions]
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"sport = :{proxy.port}"], capture_output=True, text=True
        ).stdout
        return codes, {int(part.split(",")[0]) for part in out.split("pid=")[1:]}
    finally:
        for s in sessions:
            s.close()


def test_workers_share_the_port_and_every_decision(workers):
    proxy = workers.proxy
    pids = workers.listeners()
    assert len(pids) == 2
    nonce = proxy.start_instance("cities.csv", CSV)  # started by one worker
    browser = Browser(proxy)
    browser.view(nonce)  # the session opened by one worker ...
    cookie = browser.cookie_header()
    codes, served_by = statuses(proxy, cookie)
    assert codes == [200] * 20 and served_by == pids  # routed by both: the route comes from Redis

    assert proxy.stop_instance(nonce).status_code == 200  # the stop lands on one worker
    time.sleep(0.5)  # the removal crosses Redis pub/sub in milliseconds
    codes, served_by = statuses(proxy, cookie)
    assert codes == [410] * 20 and served_by == pids  # every worker forgot its cached route at once

    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)  # a worker crashes
    time.sleep(0.2)
    codes, served_by = statuses(proxy, "")
    assert codes == [403] * 20 and served_by == pids - {victim}  # the other one serves every connection
    restarted = workers.wait_for_listeners(2, timeout=90)  # run.sh brings a new one up
    assert victim not in restarted and len(restarted & pids) == 1

    second = subprocess.run(  # a second run.sh on the port would silently serve beside this one
        [str(ROOT / "run.sh"), "--lean", "--workers", "2"],
        env={**os.environ, "DATALAB_PORT": str(proxy.port), "DATALAB_SIGN_KEY": "another key"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1 and "another run.sh already serves" in second.stderr
    assert workers.listeners() == restarted

    workers.stop()  # one signal to run.sh stops every worker
    assert workers.listeners() == set()
    assert not any(running(pid) for pid in restarted)


def test_big_bodies_stream_and_small_ones_are_kept(make_proxy, tmp_path):
    """200 MiB down and 200 MiB up through a notebook move the proxy's peak memory by less than
    STREAM_SLACK; a flow file (what mitmdump -w and mitmweb show) keeps the small bodies."""
    flows = tmp_path / "flows.mitm"
    proxy = make_proxy(save_stream_file=str(flows))
    nonce = proxy.start_instance("cities.csv", CSV)
    browser = Browser(proxy)
    browser.view(nonce)
    kernel = browser.start_kernel()
    browser.execute(kernel, f"open('big.bin', 'wb').truncate({BIG}); print('ok')")
    before = rss(proxy.proc.pid)

    r = browser.get("/files/big.bin", stream=True, headers={"Referer": proxy.url("/tree")})
    assert r.status_code == 200
    got = sum(len(chunk) for chunk in r.iter_content(MIB))
    assert got == BIG

    def chunks():  # chunked: no length announced, so the proxy learns the size as it goes
        for _ in range(BIG // MIB):
            yield bytes(MIB)

    xsrf = browser.http.cookies.get("_xsrf")
    r = browser.http.post(proxy.url("/api/no-such-endpoint"), data=chunks(), headers={"X-XSRFToken": xsrf}, timeout=120)
    assert r.status_code in (403, 404)  # Jupyter read the whole body, then refused it
    peak = rss(proxy.proc.pid, "VmHWM")
    assert peak - before < STREAM_SLACK, f"peak {peak / MIB:.0f} MiB, was {before / MIB:.0f} MiB"

    assert browser.get("/api/contents/cities.csv", params={"content": "1"}).status_code == 200
    proxy.stop()  # the flow file is complete once the proxy stops
    saved = {f.request.path.partition("?")[0]: f for f in flow_io.FlowReader(flows.open("rb")).stream()}
    assert saved["/api/contents/cities.csv"].response.json()["content"] == CSV.decode()  # small: kept
    assert saved["/files/big.bin"].response.raw_content in (b"", None)  # big: streamed, not held


def test_no_worker_outlives_a_killed_run_sh(workers):
    pids = workers.listeners()
    workers.proc.kill()  # SIGKILL: run.sh cannot pass anything on
    workers.proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while (workers.listeners() or any(running(pid) for pid in pids)) and time.monotonic() < deadline:
        time.sleep(0.2)  # (a worker closes its listener first, then shuts down)
    assert workers.listeners() == set()  # the workers heard of it (parent-death signal) and stopped
    assert not any(running(pid) for pid in pids)
