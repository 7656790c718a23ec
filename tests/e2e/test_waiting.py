"""The waiting page, end to end: a view of an instance whose Jupyter is silent answers a page that
waits (not mitmproxy's 502), and a real Chromium on it lands on the Jupyter UI once Jupyter answers.

Jupyter is silenced by stopping its server process (SIGSTOP) inside the running container: the
container runs, its port accepts connections, and nothing answers, as with a Jupyter that is busy
or frozen. (`docker pause` would not do: the Docker backend counts a paused container as gone, and
a gone instance is ended and answers 410.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import waiting
from e2e.browser import screenshot
from e2e.helpers import record
from e2e.helpers import signal_jupyter

CSV = b"x,y\n1,2\n"


def test_a_view_waits_for_a_silent_jupyter_then_lands_on_it(proxy, world, chromium):
    nonce = proxy.start_instance("waiting.csv", CSV)
    container = world.docker.containers.get(record(world, nonce).handle)
    view = proxy.url(f"/datalab/view/{nonce}/tree")
    signal_jupyter(container, "STOP")
    try:
        r = requests.get(view, allow_redirects=False, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-store" and r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Content-Security-Policy"] == waiting.content_security_policy()
        assert r.cookies.get("datalab_session")
        assert 'data-destination="/tree"' in r.text and "Waiting for your notebook" in r.text

        chromium.get(view)
        heading = WebDriverWait(chromium, 30).until(lambda d: d.find_element(By.TAG_NAME, "h1"))
        assert heading.text == "Waiting for your notebook"
        assert urlsplit(chromium.current_url).path == f"/datalab/view/{nonce}/tree"  # still waiting
        screenshot(chromium, "waiting")
    finally:
        signal_jupyter(container, "CONT")

    WebDriverWait(chromium, 90).until(lambda d: urlsplit(d.current_url).path == "/tree")
    WebDriverWait(chromium, 90).until(lambda d: "waiting.csv" in d.find_element(By.TAG_NAME, "body").text)
    screenshot(chromium, "waiting-landed")

    container.kill()  # gone, not silent: the proxy's JSON refusal, never the waiting page
    r = requests.get(view, allow_redirects=False, timeout=30)
    assert (r.status_code, r.json()["code"]) in {(410, "INSTANCE_GONE"), (404, "NONCE_UNKNOWN")}, r.text
