"""The ended page: what a person's browser gets when it navigates into an instance that has ended.

A script or Jupyter's own frontend asking the API gets the JSON 410 INSTANCE_GONE it can act on;
a person gets a page that says, in plain words, that the notebook ended, why, and what became of
the work, instead of raw JSON in a tab or an iframe. is_navigation tells the two apart.

The page has no script at all: its only inline part is the shared style, allowed by its hash
(pages.py), and every variable part is escaped whatever it holds: the cause and the work state
come from Redis and are treated as untrusted. Pure functions, no I/O.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import pages

STYLE = pages.STYLE + ".note { color: #666; font-size: 0.875em; }\n"

WHY = {
    "stopped": "The site that opened it stopped it.",
    "idle": "It was stopped after a while without any activity.",
    "max_age": "It reached its time limit and was stopped.",
    "gone": "Its container stopped unexpectedly.",
    "unreachable": "It was stopped after its link and sessions had expired.",
    "removed": "An operator removed it.",
}
WHY_UNKNOWN = "It is no longer running."

WORK = {
    "saved": "Your work was saved; the site that opened this notebook can offer it to you.",
    "saving": "Your work is being saved; the site that opened this notebook can offer it to you once that is done.",
    "unsaved": "Your work could not be saved.",
}

NEXT = "To go on, open your file again from the site that opened this notebook."
MAX_SHOWN_CAUSE = 64  # a reason code for support, not a place for prose

BODY = """<main>
<h1>This notebook has ended</h1>
<p id="why">{why}</p>
{work}<p>{next}</p>
{code}</main>
"""

NAVIGATION_DESTS = frozenset({"document", "iframe", "frame"})
# API paths: Jupyter's own (a frontend asks them with fetch, which fetch metadata already says, but
# not every client sends it) and the proxy's (api.PREFIX), except views, which people open.
API_PREFIXES = ("/api/", "/lab/api/", "/datalab/")
PEOPLES_PREFIXES = ("/datalab/view/",)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, whatever the case of its name (a plain dict in tests, mitmproxy's Headers
    in the proxy, whose items() joins repeated fields)."""
    for key, value in headers.items():
        if key.lower() == name:
            return value.strip().lower()
    return None


def is_api_path(path: str) -> bool:
    """Whether a path (with or without its query) is an API's, which answers programs, not people."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if path.startswith(PEOPLES_PREFIXES):
        return False
    return path == "/api" or path.startswith(API_PREFIXES)


def accept_prefers_html(accept: str) -> bool:
    """Whether an Accept header names text/html with the highest quality it gives anything: a
    browser's navigation does ("text/html,...,*/*;q=0.8"); fetch() and images do not ("*/*", "image/*")."""
    qualities: dict[str, float] = {}
    for entry in accept.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        if media:
            qualities[media] = max(qualities.get(media, 0.0), _quality(params))
    html_q = qualities.get("text/html", 0.0)
    return html_q > 0 and html_q >= max(qualities.values())


def _quality(params: list[str]) -> float:
    """The q parameter, 1 if absent, 0 if unreadable (an entry nobody can rely on)."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0


def is_navigation(method: str, headers: Mapping[str, str], path: str) -> bool:
    """Whether a request is a person's page navigation (a tab or an iframe loading a page), which
    gets the ended page; anything else keeps the JSON a program can read. Fetch metadata decides
    when the browser sends it; older browsers' navigations are told by the Accept they send."""
    if method not in ("GET", "HEAD") or is_api_path(path):
        return False
    if _header(headers, "upgrade") or _header(headers, "x-requested-with") is not None:
        return False  # a WebSocket, or a script that says it is one (jQuery, many frontends)
    mode = _header(headers, "sec-fetch-mode")
    if mode is not None:
        return mode == "navigate"  # cors, same-origin, no-cors, websocket: a script's or a subresource's
    dest = _header(headers, "sec-fetch-dest")
    if dest is not None:
        return dest in NAVIGATION_DESTS
    return accept_prefers_html(_header(headers, "accept") or "")


def shown_cause(cause: str) -> str:
    """The cause as its reason code line shows it: printable characters only, and short."""
    return "".join(c for c in cause if c.isprintable())[:MAX_SHOWN_CAUSE]


def page(cause: str, work_state: str) -> bytes:
    """The page for an instance that ended for `cause` (the culler's and the API's words: stopped,
    idle, max_age, gone, unreachable, removed), its work in `work_state` (saved, saving, unsaved, or
    "" when unknown, when the page says nothing of it)."""
    work = WORK.get(work_state)
    code = shown_cause(cause)
    body = BODY.format(
        why=html.escape(WHY.get(cause, WHY_UNKNOWN)),
        work=f'<p id="work">{html.escape(work)}</p>\n' if work else "",
        next=html.escape(NEXT),
        code=f'<p class="note">Reason: <code>{html.escape(code)}</code></p>\n' if code else "",
    )
    return pages.document("Notebook ended", STYLE, body)


def content_security_policy(framing_origins: frozenset[str] = frozenset()) -> str:
    """Its own style and nothing else: no script, no fetch, no form."""
    return pages.content_security_policy(framing_origins, STYLE)


def headers(frame_origins: frozenset[str] = frozenset()) -> dict[str, str]:
    """The page's headers (its 410 status is the caller's): never cached, since an instance's end
    is no answer to keep for its URL, and framed only where the instance's pages may be."""
    return pages.headers(content_security_policy(frame_origins))
