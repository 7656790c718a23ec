"""What a person sees: the demo frontend (scripts/demo.py) in a real headless Chromium, through a
real proxy, on each backend. A notebook runs a cell and saves it; a CSV is plotted with pandas and
matplotlib; a refused upload shows the proxy's error in the page; a start's progress shows as a line, and
the end of the person's instance as a notice with its work's link. Screenshots:
browser-notebook-<backend>.png and browser-plot-<backend>.png in the artifacts directory (e2e/browser.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from e2e.browser import click
from e2e.browser import screenshot
from e2e.browser import showing
from e2e.browser import type_and_run
from e2e.browser import visible
from e2e.browser import wait
from e2e.proxy import ROOT
from e2e.proxy import Proxy
from helpers import free_port
from helpers import wait_for_port

BACKENDS = ["docker", "process"]
SMALL_LIMIT = 4096  # datalab_max_upload of the proxy that refuses
NOTEBOOK = {
    "cells": [{"cell_type": "markdown", "id": "title", "metadata": {}, "source": ["# Uploaded through the demo"]}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}
CSV = "x,y\n" + "".join(f"{x},{x * x}\n" for x in range(11))
PLOT = ["import pandas as pd", 'df = pd.read_csv("squares.csv")', 'ax = df.plot(x="x", y="y", title="squares.csv")']


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


class DemoServer:
    """scripts/demo.py as `run.sh --demo` runs it, pointed at one proxy, signing with `sign_key`."""

    def __init__(self, proxy: Proxy, sign_key: str, port: int, workdir: Path):
        self.proxy = proxy
        self.port = port
        env = {**os.environ, "DATALAB_SIGN_KEY": sign_key}
        args = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), "--proxy", proxy.base]
        self.proc = subprocess.Popen(
            args, env=env, stdout=(workdir / f"demo-{port}.log").open("w"), stderr=subprocess.STDOUT
        )
        wait_for_port(port, proc=self.proc)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class DemoPage:
    """The demo page in the browser: pick a file, follow the steps, look into the iframe."""

    def __init__(self, driver: WebDriver, server: DemoServer, backend: str):
        self.driver = driver
        self.server = server
        self.backend = backend

    def upload(self, path: Path) -> None:
        self.driver.switch_to.default_content()
        self.driver.find_element(By.ID, "file").send_keys(str(path))
        self.driver.find_element(By.ID, "open").click()

    def opened(self) -> str:
        """Wait for the iframe to load the view; the nonce the page got."""
        steps = self.driver.find_element(By.ID, "steps")
        error = self.driver.find_element(By.ID, "error")
        wait(self.driver).until(lambda _: "opened" in steps.text or error.is_displayed())
        assert not error.is_displayed(), f"the demo page shows an error: {error.text}\nsteps:\n{steps.text}"
        return self.driver.find_element(By.TAG_NAME, "body").get_attribute("data-nonce")

    def error(self) -> tuple[str, str]:
        """Wait for the page to show an error: its code and message as the page shows them."""
        error = self.driver.find_element(By.ID, "error")
        wait(self.driver).until(lambda _: error.is_displayed())
        return self.driver.find_element(By.ID, "error-code").text, self.driver.find_element(By.ID, "error-message").text

    def enter_lab(self) -> str:
        """Look into the iframe (as the user does); the URL it shows."""
        self.driver.switch_to.frame(self.driver.find_element(By.ID, "lab"))
        return self.driver.execute_script("return location.href")

    def shoot(self, name: str) -> Path:
        self.driver.switch_to.default_content()
        return screenshot(self.driver, f"{name}-{self.backend}")


@pytest.fixture
def open_demo(make_proxy, backend, sign_key, chromium, tmp_path, request):
    """A proxy on `backend` that lets the demo's origin frame it, a demo server, and the demo page
    open in a browser with no cookies left from an earlier test. A failed test leaves a screenshot."""
    servers: list[DemoServer] = []
    failed = request.session.testsfailed

    def open_(key: str = sign_key, events: bool = False, **options) -> DemoPage:
        """`events`: the proxy posts its lifecycle events to the demo (as run.sh --demo has it)."""
        port = free_port()
        if events:
            options |= {"datalab_events_url": f"http://127.0.0.1:{port}/events", "datalab_events_retry_max": 2}
        proxy = make_proxy(datalab_backend=backend, datalab_allowed_origins=f"http://127.0.0.1:{port}", **options)
        servers.append(DemoServer(proxy, key, port, tmp_path))
        chromium.switch_to.default_content()
        chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
        chromium.get(servers[-1].origin + "/")
        return DemoPage(chromium, servers[-1], backend)

    yield open_
    chromium.switch_to.default_content()
    if request.session.testsfailed > failed:
        screenshot(chromium, f"failed-{request.node.name}")
    for server in servers:
        server.stop()


def test_notebook_cell_runs_and_is_saved(open_demo, tmp_path):
    upload = tmp_path / "analysis.ipynb"
    upload.write_text(json.dumps(NOTEBOOK))
    page = open_demo()
    page.upload(upload)
    nonce = page.opened()
    proxy = page.server.proxy

    url = urlsplit(page.enter_lab())
    assert (url.netloc, url.path) == (urlsplit(proxy.base).netloc, "/notebooks/analysis.ipynb")
    driver = page.driver
    showing(driver, ".jp-MarkdownOutput", "Uploaded through the demo")  # the uploaded notebook, rendered
    click(driver, ".jp-Notebook-footer")  # "Click to add a cell": a code cell
    type_and_run(driver, ["print(6 * 7)"])
    showing(driver, ".jp-OutputArea-output", "42")
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()

    def saved_cell() -> dict | None:
        r = requests.get(proxy.url(f"/datalab/static/{nonce}/files/analysis.ipynb"), timeout=30)
        assert r.status_code == 200, r.text
        try:
            notebook = r.json()
        except ValueError:  # caught mid-write
            return None
        cells = [c for c in notebook["cells"] if "".join(c["source"]) == "print(6 * 7)"]
        return cells[0] if cells and cells[0].get("outputs") else None

    cell = wait(driver).until(lambda _: saved_cell())
    assert [o.get("text") for o in cell["outputs"]] in (["42\n"], [["42\n"]])
    page.shoot("notebook")


def test_csv_is_plotted_in_a_new_notebook(open_demo, tmp_path):
    upload = tmp_path / "squares.csv"
    upload.write_text(CSV)
    page = open_demo()
    page.upload(upload)
    page.opened()

    assert urlsplit(page.enter_lab()).path == "/lab/tree/squares.csv"
    driver = page.driver
    visible(driver, ".jp-CSVViewer")  # JupyterLab shows the upload as a table
    click(driver, 'jp-button[data-command="launcher:create"]')
    click(driver, '.jp-LauncherCard[data-category="Notebook"]')
    type_and_run(driver, PLOT)
    plot = visible(driver, '.jp-OutputArea-output img[src^="data:image/png"]')
    assert plot.size["width"] > 100 and plot.size["height"] > 100
    page.shoot("plot")


def test_proxy_refusals_show_in_the_page(open_demo, tmp_path):
    big = tmp_path / "big.csv"
    big.write_text("x\n" + "1\n" * SMALL_LIMIT)
    page = open_demo(datalab_max_upload=SMALL_LIMIT)
    page.upload(big)
    assert page.error() == ("UPLOAD_TOO_LARGE", f"the upload is over {SMALL_LIMIT} bytes")
    assert not page.driver.find_element(By.ID, "lab").get_attribute("src")

    small = tmp_path / "small.csv"
    small.write_text(CSV)
    page = open_demo(key="not-the-proxy-key")
    page.upload(small)
    code, message = page.error()
    assert code == "BAD_SIGNATURE" and "X-SIGN must be" in message


def test_the_page_shows_progress_and_offers_the_work_when_the_session_ends(open_demo, tmp_path):
    upload = tmp_path / "ends.csv"
    upload.write_text(CSV)
    page = open_demo(events=True)
    page.upload(upload)
    nonce = page.opened()
    driver = page.driver
    driver.switch_to.default_content()
    assert driver.find_element(By.ID, "progress").text == "ready"  # the start's last phase, as a line
    work = driver.find_element(By.TAG_NAME, "body").get_attribute("data-work")
    assert page.server.proxy.stop_instance(nonce).status_code == 200  # the frontend's server ends it
    ended = driver.find_element(By.ID, "ended")
    wait(driver).until(lambda _: ended.is_displayed())
    assert driver.find_element(By.ID, "ended-cause").text == "stopped"
    link = driver.find_element(By.ID, "ended-link").get_attribute("href")
    assert urlsplit(link).path == f"/work/{work}"
    page.shoot("ended")
