"""The waiting page: hostile destinations stay inert data, and a view answers with the page only
while its instance says nothing (the real browser flow is in tests/e2e/test_waiting.py)."""

import asyncio
import base64
import hashlib
import time
from html.parser import HTMLParser

import pytest

import inputs
import waiting
from backends import Instance
from helpers import answering_jupyter
from helpers import recorded
from helpers import request_flow
from helpers import run_headers
from helpers import runtime_for

HOSTILE = [
    ("tree", ""),
    ("</script><script>alert(1)</script>", ""),
    ('"><img src=x onerror=alert(1)>', "a=\"'><svg onload=alert(1)>"),
    ("javascript:alert(1)", ""),
    ("%2F%2Fevil.example/tree", "next=//evil.example"),
    ("/\\evil.example", ""),
    ("%5C%5Cevil.example", ""),
    ("%0d%0aSet-Cookie:%20x=1", ""),
    ("notebooks/a\u2028b\u2029c.ipynb", "x=\u2028"),
    ("notebooks/%26quot%3B&amp;'.ipynb", "q=%22%3C%3E&r=&#x27;"),
    ("{{7*7}}${x}`", "`${alert(1)}`"),
]


class Parsed(HTMLParser):
    """Every element with its attributes, and the text of each script."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


EXPECTED_TAGS = ["html", "head", "meta", "meta", "meta", "title", "noscript", "meta", "style"]
EXPECTED_TAGS += ["body", "main", "h1", "p", "p", "a", "script"]


# Handed to the page as they are (not through inputs.safe_destination): its own escaping holds alone.
UNENCODED = [
    '/"><script>alert(1)</script>',
    "/'><img src=x onerror=alert(1)>",
    "/a?b=\"&c='&d=<>&e=&quot;&amp;",
    "/</body></html><script>alert(1)</script>",
    "/\u2028\u2029</script>",
]


@pytest.mark.parametrize(
    "destination",
    [inputs.safe_destination(path, query) for path, query in HOSTILE] + UNENCODED,
)
def test_a_hostile_destination_stays_one_attribute_value(destination):
    parsed = Parsed(waiting.page(destination).decode())
    assert [tag for tag, _ in parsed.elements] == EXPECTED_TAGS  # nothing injected, nothing closed early
    attributes = {name for _, attrs in parsed.elements for name in attrs}
    assert not {a for a in attributes if a.startswith("on")}
    (body,) = [attrs for tag, attrs in parsed.elements if tag == "body"]
    (link,) = [attrs for tag, attrs in parsed.elements if tag == "a"]
    assert body == {"data-destination": destination} and link == {"href": destination}
    assert destination.startswith("/") and destination[1] not in "/\\"  # where location.replace goes: this origin
    assert parsed.scripts == [waiting.SCRIPT]  # the one script is the fixed one, which the CSP allows


@pytest.mark.parametrize("destination", ["tree", "//evil.example", "/\\evil.example", "http://evil.example/", "/a\nb"])
def test_a_destination_off_this_origin_is_refused(destination):
    with pytest.raises(ValueError):
        waiting.page(destination)


def test_the_csp_allows_exactly_the_pages_own_script_and_style():
    csp = waiting.content_security_policy(frozenset({"https://app.example"}))
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == sha256_source(waiting.SCRIPT)
    assert directives["style-src"] == sha256_source(waiting.STYLE)
    assert directives["connect-src"] == "'self'" and directives["base-uri"] == "'none'"
    assert directives["frame-ancestors"] == "'self' https://app.example"
    headers = waiting.headers()
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert headers["Content-Type"] == "text/html; charset=utf-8"


async def silent_jupyter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Takes the request and says nothing: a Jupyter that is frozen or busy."""
    await reader.read()


async def view_of(redis_url, sink, jupyter, alive: bool):
    """A view of an instance served by `jupyter`; the backend says the instance runs if `alive`."""
    server = await asyncio.start_server(jupyter, "127.0.0.1", 0)
    rt = runtime_for(redis_url=redis_url)

    async def poll(instance) -> bool:
        return alive

    async def stop(handle: str) -> None:
        pass

    rt.instances.backend.poll, rt.instances.backend.stop = poll, stop
    port = server.sockets[0].getsockname()[1]
    instance = Instance("i" * 32, "docker", "c1", "127.0.0.1", port, "a.csv", time.time(), token="t0ken")
    await recorded(rt.store, instance, "N" * 32)
    try:
        return await run_headers(request_flow("GET", "/datalab/view/" + "N" * 32 + "/tree?a=1"), sink, rt)
    finally:
        await rt.done()
        server.close()


async def test_a_view_of_a_silent_instance_answers_the_waiting_page(redis_url, sink):
    flow = await view_of(redis_url, sink, silent_jupyter, alive=True)
    assert flow.response.status_code == 200
    assert flow.response.headers["Set-Cookie"].startswith("datalab_session=")
    assert flow.response.headers["Content-Security-Policy"] == waiting.content_security_policy()
    assert 'data-destination="/tree?a=1"' in flow.response.text


async def test_a_view_of_an_answering_instance_redirects(redis_url, sink):
    flow = await view_of(redis_url, sink, answering_jupyter, alive=True)
    assert flow.response.status_code == 302 and flow.response.headers["Location"] == "/tree?a=1"


async def test_a_view_of_a_gone_instance_is_410(redis_url, sink):
    flow = await view_of(redis_url, sink, silent_jupyter, alive=False)
    assert flow.response.status_code == 410 and b"INSTANCE_GONE" in flow.response.content
    assert "Set-Cookie" not in flow.response.headers
