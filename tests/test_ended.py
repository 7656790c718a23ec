"""The ended page: people's navigations get it and programs keep their JSON, it says why the
notebook ended and what became of the work for every cause and state, and whatever a cause holds
stays text on a page that runs nothing."""

from __future__ import annotations

import base64
import hashlib
from html.parser import HTMLParser

import pytest
from mitmproxy.http import Headers

import ended

# What browsers send, as recorded from Chromium 120+ and Firefox 120+ (fetch metadata) and as older
# Safari sends (Accept alone).
CHROME_PAGE = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
    "Sec-Fetch-Site": "none",
    "Sec-Fetch-User": "?1",
}
IFRAME = CHROME_PAGE | {"Sec-Fetch-Dest": "iframe", "Sec-Fetch-Site": "cross-site"}
FETCH = {"Accept": "*/*", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Sec-Fetch-Site": "same-origin"}
OLD_SAFARI = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.mark.parametrize(
    ("method", "headers", "path", "navigation"),
    [
        ("GET", CHROME_PAGE, "/lab/tree/a.csv", True),
        ("HEAD", CHROME_PAGE, "/tree", True),
        ("GET", IFRAME, "/notebooks/a.ipynb?x=1", True),  # the frontend's iframe
        ("GET", IFRAME, "/datalab/view/" + "N" * 32 + "/tree", True),  # a view is opened by people
        ("GET", OLD_SAFARI, "/tree", True),  # no fetch metadata: Accept decides
        ("GET", {"Sec-Fetch-Dest": "document"}, "/tree", True),  # a Dest without a Mode
        ("GET", {"sec-fetch-mode": "NAVIGATE"}, "/tree", True),  # names and values in any case
        ("GET", {"Accept": "text/html"}, "/", True),
        ("GET", {"Accept": "application/json;q=0.5, text/html"}, "/", True),
        ("POST", CHROME_PAGE, "/tree", False),  # a form's submission: not a page to show here
        ("get", CHROME_PAGE, "/tree", False),  # methods are case-sensitive
        ("GET", FETCH, "/lab/tree/a.csv", False),  # Jupyter's frontend asking
        ("GET", FETCH | {"Sec-Fetch-Mode": "same-origin"}, "/tree", False),
        ("GET", CHROME_PAGE | {"Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}, "/favicon.ico", False),
        ("GET", CHROME_PAGE | {"Sec-Fetch-Mode": "navigate, cors"}, "/tree", False),  # a repeated header
        ("GET", {"Sec-Fetch-Mode": "websocket", "Sec-Fetch-Dest": "websocket"}, "/api/kernels/k/channels", False),
        ("GET", OLD_SAFARI | {"Upgrade": "websocket", "Connection": "Upgrade"}, "/terminals/websocket/1", False),
        ("GET", CHROME_PAGE | {"Upgrade": "websocket"}, "/tree", False),
        ("GET", OLD_SAFARI | {"X-Requested-With": "XMLHttpRequest"}, "/tree", False),
        ("GET", OLD_SAFARI | {"x-requested-with": ""}, "/tree", False),
        ("GET", CHROME_PAGE, "/api/contents/a.csv", False),  # an API path, even opened in a tab
        ("GET", CHROME_PAGE, "/api", False),
        ("GET", CHROME_PAGE, "/api?x=1", False),
        ("GET", CHROME_PAGE, "/lab/api/settings", False),
        ("GET", CHROME_PAGE, "/datalab/work/" + "W" * 32, False),  # the proxy's own API
        ("GET", CHROME_PAGE, "/apis/a.ipynb", True),  # only the segment "api" is an API
        ("GET", {"Sec-Fetch-Dest": "script"}, "/static/a.js", False),
        ("GET", {"Accept": "*/*"}, "/tree", False),  # fetch() and curl
        ("GET", {"Accept": "image/avif,image/webp,*/*;q=0.8"}, "/tree", False),
        ("GET", {"Accept": "application/json, text/html;q=0.9"}, "/tree", False),  # prefers JSON
        ("GET", {"Accept": "text/html;q=0"}, "/tree", False),  # "not HTML"
        ("GET", {"Accept": "text/html;q=x"}, "/tree", False),  # an unreadable quality counts as none
        ("GET", {"Accept": ""}, "/tree", False),
        ("GET", {}, "/tree", False),  # a program that says nothing
    ],
)
def test_navigations_are_told_from_programs(method, headers, path, navigation):
    assert ended.is_navigation(method, headers, path) is navigation
    as_in_the_proxy = Headers([(k.encode(), v.encode()) for k, v in headers.items()])
    assert ended.is_navigation(method, as_in_the_proxy, path) is navigation


def test_a_repeated_accept_is_read_whole_as_mitmproxy_joins_it():
    assert ended.is_navigation("GET", Headers([(b"Accept", b"text/html"), (b"accept", b"*/*;q=0.8")]), "/tree")
    assert not ended.is_navigation("GET", Headers([(b"Accept", b"*/*"), (b"X-Requested-With", b"x")]), "/tree")


class Parsed(HTMLParser):
    """Every element, the text of each element with an id (and of the style, title and code)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.attributes: set[str] = set()
        self.text: dict[str, str] = {}
        self._open: list[tuple[str, str]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}
        if tag != "meta":  # the one void element here
            key = dict(attrs).get("id") or tag
            self.text.setdefault(key, "")
            self._open.append((tag, key))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, key in self._open:
            if key in ("style", "title", "why", "work", "code", "h1"):
                self.text[key] += data


def parsed(cause: str, work_state: str) -> Parsed:
    return Parsed(ended.page(cause, work_state).decode())


CAUSES = [
    ("stopped", "The site that opened it stopped it."),
    ("idle", "It was stopped after a while without any activity."),
    ("max_age", "It reached its time limit and was stopped."),
    ("gone", "Its container stopped unexpectedly."),
    ("unreachable", "It was stopped after its link and sessions had expired."),
    ("removed", "An operator removed it."),
    ("orphan", "It is no longer running."),  # a cause this page does not know: the generic sentence
    ("", "It is no longer running."),
    ("IDLE", "It is no longer running."),
]


@pytest.mark.parametrize(("cause", "why"), CAUSES)
def test_every_cause_says_why(cause, why):
    page = parsed(cause, "")
    assert page.text["h1"] == "This notebook has ended" and page.text["title"] == "Notebook ended"
    assert page.text["why"] == why
    assert page.text.get("code", "") == cause  # the reason code, for the person to tell support


@pytest.mark.parametrize(
    ("work_state", "says"),
    [
        ("saved", "Your work was saved; the site that opened this notebook can offer it to you."),
        (
            "saving",
            "Your work is being saved; the site that opened this notebook can offer it to you once that is done.",
        ),
        ("unsaved", "Your work could not be saved."),
        ("", None),  # unknown: nothing said about the work
        ("lost", None),
        ("SAVED", None),
    ],
)
def test_every_work_state_says_what_became_of_the_work(work_state, says):
    assert parsed("idle", work_state).text.get("work") == says


EXPECTED_TAGS = ["html", "head", "meta", "meta", "meta", "title", "style", "body", "main", "h1", "p", "p", "p", "code"]

HOSTILE = [
    "</p><script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</style><style>body{display:none}</style>",
    "</title></head><body onload=alert(1)>",
    "&lt;b&gt;&amp;",
    "{why}{style}{0}",
    "<!--",
    "a\r\n\u2028\u2029\x00\x1b[31mb",
]


@pytest.mark.parametrize("cause", HOSTILE)
def test_a_hostile_cause_stays_text(cause):
    page = parsed(cause, cause)
    assert page.tags == EXPECTED_TAGS  # nothing injected, nothing closed early, no work line
    assert not {a for a in page.attributes if a.startswith("on")} and "script" not in page.tags
    assert page.text["why"] == ended.WHY_UNKNOWN
    assert page.text["code"] == ended.shown_cause(cause)
    assert page.text["style"] == ended.STYLE  # the one style is the fixed one, which the CSP allows


def test_the_reason_code_is_printable_and_short():
    assert ended.shown_cause("a\r\nb\x00c\u2028d") == "abcd"
    assert ended.shown_cause("x" * 1000) == "x" * ended.MAX_SHOWN_CAUSE
    assert "Reason" not in ended.page("\n\x00", "saved").decode()  # nothing printable: no line


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_csp_allows_exactly_the_pages_own_style_and_nothing_else():
    headers = ended.headers(frozenset({"https://b.example", "https://a.example"}))
    directives = dict(d.split(" ", 1) for d in headers["Content-Security-Policy"].split("; "))
    assert directives == {
        "default-src": "'none'",  # no script, no fetch, no image, no font
        "style-src": sha256_source(parsed("idle", "saved").text["style"]),
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'self' https://a.example https://b.example",
    }
    assert ended.headers()["Content-Security-Policy"].endswith("frame-ancestors 'self'")


def test_the_headers_keep_the_page_out_of_caches_and_referrers():
    headers = ended.headers(frozenset())
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "Set-Cookie" not in headers and "Status" not in headers
