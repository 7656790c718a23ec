"""Fewer bytes per page (issue 19): a real instance gzips the text a Lab page is made of for a
browser that accepts it, the proxy passes those bytes as they are, and the user's own files (and
clients that do not accept gzip) get what they always got."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import requests

from e2e.proxy import Browser

pytestmark = pytest.mark.e2e

CSV = b"".join(b"%d,%d,row %d of a text file the user downloads\n" % (i, i * i, i) for i in range(8000))


def wire(browser: Browser, path: str, accept: str = "gzip, deflate, br", **headers: str) -> requests.Response:
    """The answer as it came over the wire (not decoded by requests): `.wire` holds its bytes."""
    r = browser.get(path, headers={"Accept-Encoding": accept, **headers}, stream=True)
    r.wire = r.raw.read(decode_content=False)
    return r


@pytest.fixture(scope="module")
def page(proxy) -> Browser:
    browser = Browser(proxy)
    browser.view(proxy.start_instance("data.csv", CSV), "lab")
    return browser


def largest_script(browser: Browser) -> str:
    """The path of a script Lab's page loads (its versioned bundle)."""
    html = browser.get("/lab").text
    scripts = re.findall(r'src="([^"]+\.js[^"]*)"', html)
    assert scripts, html[:500]
    return scripts[-1]


def test_the_pages_script_and_html_arrive_gzipped_and_decode_to_the_same_bytes(page):
    script = largest_script(page)
    plain = wire(page, script, accept="identity")
    packed = wire(page, script)
    assert plain.status_code == packed.status_code == 200
    assert "Content-Encoding" not in plain.headers
    assert packed.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in packed.headers["Vary"]
    assert gzip.decompress(packed.wire) == plain.wire
    assert len(packed.wire) <= 0.4 * len(plain.wire), (len(packed.wire), len(plain.wire))
    html = wire(page, "/lab")
    assert html.headers["Content-Encoding"] == "gzip" and b"<html" in gzip.decompress(html.wire).lower()


def test_a_client_refusing_gzip_gets_it_plain(page):
    script = largest_script(page)
    for accept in ("identity", "gzip;q=0", "br"):
        r = wire(page, script, accept=accept)
        assert r.status_code == 200 and "Content-Encoding" not in r.headers, accept


@pytest.mark.parametrize("query", ["", "?download=1"])
def test_the_users_file_downloads_as_it_is_with_its_length(page, query):
    r = wire(page, f"/files/data.csv{query}", Referer=page.url("/lab"))
    assert r.status_code == 200, r.wire[:200]
    assert "Content-Encoding" not in r.headers
    assert r.wire == CSV and r.headers["Content-Length"] == str(len(CSV))


CANARY = "reflectedQ7Z"  # what a cross-site page could put in a URL the victim's browser opens
SESSION_COOKIE = "datalab_session"  # (the default datalab_session_cookie)


@pytest.mark.parametrize("path", [f"/lab/tree/{CANARY}", f"/lab/workspaces/{CANARY}", f"/{CANARY}"])
def test_a_gzipped_page_that_reflects_a_url_holds_no_secret(page, path):
    """BREACH needs a secret and attacker-chosen text in one compressed answer. Lab's page reflects
    its URL (treePath, workspace) and is gzipped, but holds no secret: no Jupyter token (the proxy's
    header is the credential, never echoed), neither the _xsrf cookie (a header, checked against
    X-XSRFToken) nor the proxy's session cookie (taken off before the instance)."""
    page.get("/lab")
    secrets = [c.value.encode() for c in page.http.cookies if c.name in ("_xsrf", SESSION_COOKIE)]
    r = wire(page, path)
    assert r.headers.get("Content-Encoding") == "gzip", r.headers
    body = gzip.decompress(r.wire)
    assert len(secrets) == 2 and not [s for s in secrets if s in body]
    assert b"xsrf" not in body.lower()
    if r.status_code == 200:
        assert CANARY.encode() in body  # (the reflection is there)
        config = json.loads(re.search(rb'id="jupyter-config-data"[^>]*>(.*?)</script>', body, re.S).group(1))
        assert config["token"] == ""


def test_a_range_of_a_script_comes_as_it_is(make_proxy, world):
    """A part of a file (206) is not gzipped: its Content-Range counts the file's own bytes. On the
    process backend, which runs this tree's image/ (the built image has it once rebuilt)."""
    proxy = make_proxy(prefix=world.sub("range"), datalab_backend="process")
    browser = Browser(proxy)
    nonce = proxy.start_instance("data.csv", CSV)
    browser.view(nonce, "lab")
    script = largest_script(browser)
    whole = wire(browser, script, accept="identity").wire
    r = wire(browser, script, Range="bytes=100-5099")
    assert r.status_code == 206 and "Content-Encoding" not in r.headers, r.headers
    assert r.headers["Content-Range"] == f"bytes 100-5099/{len(whole)}" and r.wire == whole[100:5100]
    assert wire(browser, script).headers["Content-Encoding"] == "gzip"  # (the whole script still is)
    assert proxy.stop_instance(nonce).status_code == 200
