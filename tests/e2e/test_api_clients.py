"""Scripts and API clients (docs/api.md "Scripts and API clients"): a program that holds an instance's session
cookie talks to its Jupyter through the proxy as a browser page does, with the XSRF pair Jupyter asks
for (an `_xsrf` cookie and the same value in X-XSRFToken), made up by the client. With the cookie alone
Jupyter refuses every POST (403 '_xsrf' argument missing) and /files/ without a same-origin Referer.

Real parts: the shared proxy (Docker backend) and an instance holding an upload; requests as the
script; jupyter_server's gateway client (a local Jupyter server from the host Jupyter env,
--gateway-url at the proxy, the cookie and the pair in GatewayClient.headers) running a notebook's
cells in the instance's kernel, which reads the upload that only the instance holds.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
import requests

from e2e.proxy import Browser
from helpers import free_port
from helpers import wait_for_port

CSV = b"city,population\nReykjavik,139875\nNuuk,19872\n"
FILENAME = "cities.csv"
ROOT = Path(__file__).resolve().parents[2]
JUPYTER_ENV = Path(os.environ.get("DATALAB_JUPYTER_ENV") or ROOT / ".state" / "jupyter-env")  # scripts/setup.sh's


@pytest.fixture
def instance(proxy):
    """A live instance holding FILENAME, and the session cookie a script gets from its view."""
    nonce = proxy.start_instance(FILENAME, CSV)
    http = requests.Session()
    r = http.get(proxy.url(f"/datalab/view/{nonce}/tree"), allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    session = http.cookies.get("datalab_session")
    assert session
    yield session
    assert proxy.stop_instance(nonce).status_code == 200


def test_a_script_writes_with_a_made_up_xsrf_pair(proxy, instance):
    xsrf = secrets.token_hex(16)  # any value: Jupyter only compares the cookie with the header
    cookie = {"Cookie": f"datalab_session={instance}"}
    paired = {"Cookie": f"datalab_session={instance}; _xsrf={xsrf}", "X-XSRFToken": xsrf}
    model = {"type": "notebook"}

    r = requests.post(proxy.url("/api/contents"), json=model, headers=cookie, timeout=30)
    assert r.status_code == 403 and "_xsrf" in r.text  # the cookie alone: Jupyter's refusal
    r = requests.post(proxy.url("/api/contents"), json=model, headers=paired, timeout=30)
    assert r.status_code == 201, r.text
    r = requests.delete(proxy.url(f"/api/contents/{r.json()['path']}"), headers=paired, timeout=30)
    assert r.status_code == 204, r.text

    # docs/api.md's snippet, as written there: a session that keeps the cookies, the header on every request
    http = requests.Session()
    http.cookies.set("datalab_session", instance)  # (the snippet opens the view; `instance` did)
    http.cookies.set("_xsrf", xsrf)
    http.headers["X-XSRFToken"] = xsrf
    assert http.post(proxy.url("/api/contents"), json=model, timeout=30).status_code == 201
    r = http.get(proxy.url(f"/files/{FILENAME}"), params={"_xsrf": xsrf}, timeout=30)
    assert r.status_code == 200 and r.content == CSV

    files = proxy.url(f"/files/{FILENAME}")
    assert requests.get(files, headers=cookie, timeout=30).status_code == 403  # no same-origin Referer
    r = requests.get(f"{files}?_xsrf={xsrf}", headers={"Cookie": paired["Cookie"]}, timeout=30)
    assert r.status_code == 200 and r.content == CSV
    r = requests.get(files, headers={**cookie, "Referer": proxy.url("/")}, timeout=30)
    assert r.status_code == 200 and r.content == CSV


@pytest.fixture
def gateway(proxy, instance, tmp_path):
    """A local Jupyter server whose kernels are the instance's: --gateway-url at the proxy, with the
    session cookie and the XSRF pair in GatewayClient.headers (as docs/api.md says); its own token for us."""
    xsrf = secrets.token_hex(16)
    headers = {"Cookie": f"datalab_session={instance}; _xsrf={xsrf}", "X-XSRFToken": xsrf}
    token, port = secrets.token_hex(16), free_port()
    home = tmp_path / "local"
    home.mkdir()
    jupyter_dirs = {f"JUPYTER_{name}_DIR": str(tmp_path / name.lower()) for name in ("CONFIG", "DATA", "RUNTIME")}
    log = tmp_path / "gateway-server.log"
    server = subprocess.Popen(
        [
            str(JUPYTER_ENV / "bin" / "jupyter-server"),
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--ServerApp.root_dir={home}",
            f"--IdentityProvider.token={token}",
            f"--gateway-url={proxy.base}",
            f"--GatewayClient.headers={json.dumps(headers)}",
        ],
        env=os.environ | jupyter_dirs,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=60, proc=server)
        local = Browser(proxy, base=f"http://127.0.0.1:{port}")
        assert local.get(f"/tree?token={token}").status_code == 200  # logged in: its login and _xsrf cookies
        yield local, home
    finally:
        server.terminate()
        server.wait(timeout=30)


def code_cell(source: str) -> dict:
    return {"cell_type": "code", "source": source, "metadata": {}, "outputs": [], "execution_count": None}


NOTEBOOK = {  # nbformat 4, kept with the local server (its contents are its own; its kernels the gateway's)
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "cells": [
        code_cell("import pandas\nframe = pandas.read_csv('cities.csv')"),
        code_cell("print(frame.population.sum())"),
    ],
}


def test_jupyter_servers_gateway_client_runs_a_notebook_in_the_instance(gateway, proxy, instance):
    local, home = gateway
    (home / "analysis.ipynb").write_text(json.dumps(NOTEBOOK))
    assert not (home / FILENAME).exists()  # the upload is only in the instance
    r = local.get("/api/contents/analysis.ipynb?content=1")
    assert r.status_code == 200, r.text
    cells = [cell["source"] for cell in r.json()["content"]["cells"] if cell["cell_type"] == "code"]

    kernel = local.start_kernel()  # the local server asks the gateway (the proxy) for it
    cookie = {"Cookie": f"datalab_session={instance}"}
    on_instance = requests.get(proxy.url("/api/kernels"), headers=cookie, timeout=30)
    assert kernel in {k["id"] for k in on_instance.json()}  # the kernel is the instance's
    outputs = [local.execute(kernel, source) for source in cells]
    assert outputs == ["", f"{139875 + 19872}\n"]
    xsrf = {"X-XSRFToken": local.http.cookies.get("_xsrf") or ""}
    assert local.http.delete(local.url(f"/api/kernels/{kernel}"), headers=xsrf, timeout=30).status_code == 204
