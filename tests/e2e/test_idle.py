"""Idle means a person is idle, in a real headless Chromium: a JupyterLab tab left open on a notebook
polls its server every few seconds by itself, and its instance still ends within
datalab_idle_timeout + 2 x datalab_cull_interval of the person's last act; a tab whose person runs a
cell more often than that keeps its instance, though running code is only WebSocket frames, which
the proxy does not count (Jupyter's own record of the kernel does). Two instances, side by side, one
Chromium each: in cookie routing one browser holds one session.
"""

from __future__ import annotations

import json
import re
import threading
import time

import requests
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from backends.container_spec import LABEL_INSTANCE
from e2e.browser import screenshot
from e2e.browser import start_chromium
from e2e.browser import type_and_run
from e2e.browser import visible
from e2e.browser import wait
from e2e.helpers import error_of
from e2e.helpers import instance_of

IDLE = 20  # datalab_idle_timeout
INTERVAL = 5  # datalab_cull_interval
BOUND = IDLE + 2 * INTERVAL  # the contract: an untouched instance ends this soon after its last use
PERIOD = 10  # seconds between the runs of the busy tab's cell: twice per idle timeout
SPAN = BOUND + PERIOD  # the busy tab is watched at least this long after its first run
QUIET = 6  # seconds without recorded activity after which a page's start-up is over (records: every 2.5 s)
RUN_WAIT = 60  # seconds a run may take to show its output (a bound on a loaded machine, not a claim)
CELL = ["runs = globals().get('runs', 0) + 1", "print('run', runs)"]
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [], "source": []}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


class Tab:
    """A JupyterLab tab on one instance's notebook, and a plain client with its cookies (whose own
    requests, reads without a browser's navigation, are none of a person's activity)."""

    def __init__(self, driver: WebDriver, proxy, nonce: str, filename: str):
        self.driver = driver
        self.proxy = proxy
        driver.get(proxy.url(f"/datalab/view/{nonce}/lab/tree/{filename}"))
        visible(driver, ".jp-Notebook .jp-CodeCell")
        self.cookie = "; ".join(f"{c['name']}={c['value']}" for c in driver.get_cookies())

    def get(self, path: str) -> requests.Response:
        return requests.get(self.proxy.url(path), headers={"Cookie": self.cookie}, timeout=30)

    def kernel_ready(self) -> bool:
        """The notebook's kernel runs, its channel is open, and it is idle."""
        answer = self.get("/api/kernels")
        assert answer.status_code == 200, answer.text
        kernels = answer.json()
        return any(k["connections"] > 0 and k["execution_state"] == "idle" for k in kernels)

    def polls_since_cleared(self) -> list[str]:
        """The Jupyter API reads the page made since clear_timings (the browser's own record)."""
        names = self.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        return [n for n in names if "/api/" in n]

    def clear_timings(self) -> None:
        self.driver.execute_script("performance.setResourceTimingBufferSize(5000); performance.clearResourceTimings()")


def keep_running(driver: WebDriver, stop: threading.Event, runs: list[float], failures: list[BaseException]) -> None:
    """Run the active cell again every PERIOD seconds until `stop`, each time waiting for its output
    to show the next run; the times of the runs go into `runs`, a failure into `failures`."""
    try:
        shown = run_shown(driver)
        while not stop.wait(max(0.0, runs[-1] + PERIOD - time.time())):
            ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
            shown = wait(driver, RUN_WAIT).until(lambda d, before=shown: (n := run_shown(d)) > before and n)
            runs.append(time.time())
    except BaseException as e:  # the main thread reports it
        failures.append(e)


def run_shown(driver: WebDriver) -> int:
    """The run the cell's output shows (its `runs` counter), 0 before any."""
    texts = [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")]
    return max((int(m[1]) for t in texts if (m := re.fullmatch(r"run (\d+)", t))), default=0)


def settled(world, prefix: str, instance_id: str) -> float:
    """When the proxy's record of the instance's activity has stood still for QUIET seconds (it is
    written every few seconds): a page's start-up is over. A tab that keeps writing fails here."""
    last, since = None, time.time()
    deadline = since + 4 * QUIET
    while time.time() < deadline:
        if (score := world.redis.zscore(prefix + "activity", instance_id)) != last:
            last, since = score, time.time()
        elif time.time() - since >= QUIET:
            return time.time()
        time.sleep(0.5)
    raise AssertionError(f"an untouched tab's activity kept being recorded for {4 * QUIET} s")


def statuses(world, prefix: str) -> dict[str, str]:
    """Instance id -> its container's status, for the containers under `prefix`."""
    return {c.attrs["Labels"][LABEL_INSTANCE]: c.status for c in world.containers(prefix)}


def test_an_open_tab_alone_is_idle_and_a_cell_run_is_not(make_proxy, world, chromium, tmp_path):
    prefix = world.sub("idle")
    p = make_proxy(prefix=prefix, datalab_idle_timeout=IDLE, datalab_cull_interval=INTERVAL)
    notebook = json.dumps(NOTEBOOK).encode()
    busy_nonce = p.start_instance("busy.ipynb", notebook)
    busy_id = instance_of(world, prefix, busy_nonce).id

    other = start_chromium(tmp_path / "chromium")
    stop, runs, failures = threading.Event(), [], []
    keeper = threading.Thread(target=keep_running, args=(other, stop, runs, failures))
    try:
        # The busy tab: its cell runs, then again every PERIOD seconds, from a thread of its own.
        # JupyterLab saves its workspace after each run (a PUT: a request that counts); blocked
        # here, so that what keeps this instance is Jupyter's record of its kernel alone.
        busy = Tab(other, p, busy_nonce, "busy.ipynb")
        other.execute_cdp_cmd("Network.enable", {})
        other.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/lab/api/workspaces*"]})
        type_and_run(other, CELL)
        wait(other).until(run_shown)
        runs.append(time.time())
        keeper.start()

        # The idle tab: opened at once (an instance nobody opens idles from its start), then left
        # alone once its kernel is connected and the page's own start-up writes are over (the
        # person's last act).
        idle_nonce = p.start_instance("idle.ipynb", notebook)
        idle_id = instance_of(world, prefix, idle_nonce).id
        idle = Tab(chromium, p, idle_nonce, "idle.ipynb")
        wait(chromium).until(lambda _: idle.kernel_ready())
        left = settled(world, prefix, idle_id)
        idle.clear_timings()
        seen = world.redis.zscore(prefix + "activity", idle_id)
        while (answer := idle.get("/api/status")).status_code == 200 and time.time() < left + BOUND:
            seen = world.redis.zscore(prefix + "activity", idle_id) or seen
            time.sleep(1)
        assert answer.status_code == 410 and error_of(answer) == "INSTANCE_GONE", (
            f"the untouched tab's instance still served {BOUND} s after it was left (idle timeout {IDLE} s, "
            f"culls every {INTERVAL} s); the proxy's last record of its activity: {(seen or 0) - left:+.1f} s from "
            f"then; its kernels now: {idle.get('/api/kernels').text}"
        )
        polls = idle.polls_since_cleared()
        assert any("/api/kernels" in n or "/api/sessions" in n for n in polls), polls  # it did poll meanwhile
        assert f"instance {idle_id} ended: idle for more than datalab_idle_timeout" in p.log_text()

        # The busy tab, meanwhile and on: running its cell keeps its instance, though the proxy's
        # own record of it (its page's requests) is older than the bound by the end.
        while time.time() < runs[0] + SPAN and not failures:
            time.sleep(1)
        stop.set()
        keeper.join(RUN_WAIT + 10)
        assert not failures, (failures, f"runs: {len(runs)}", busy.get("/api/status").text)
        assert runs[-1] - runs[0] >= SPAN - PERIOD and len(runs) >= SPAN // PERIOD
        assert busy.get("/api/status").status_code == 200
        assert f"instance {busy_id} ended" not in p.log_text()
        assert statuses(world, prefix) == {busy_id: "running"}  # the idle one's container is gone
        assert time.time() - world.redis.zscore(prefix + "activity", busy_id) > BOUND
    except BaseException:
        screenshot(other, "idle-busy-tab")
        screenshot(chromium, "idle-idle-tab")
        raise
    finally:
        stop.set()
        if keeper.is_alive():
            keeper.join(RUN_WAIT + 10)
        other.quit()
