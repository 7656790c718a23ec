"""Which forwarded requests are a person's doing: only those keep an instance from being idle.

An open JupyterLab or Notebook 7 tab polls its server on timers for as long as it is open, so
counting every request would keep an abandoned tab's instance for ever. What a tab does by itself
is reads of lists and states; what a person does is load a page, open, save, create, rename or
delete something, start or stop a kernel, export, download, or open a kernel's or a terminal's
WebSocket. Running code and typing in a terminal pass as WebSocket frames, not requests: Jupyter
records those itself, per kernel and terminal (the culler reads that record: backends.jupyter.jupyter_activity).

This is no defence: a user who wants to keep an instance can run code, and datalab_max_age bounds
that. A wrong guess only moves when an instance ends.

What told us: the packages the image installs (jupyterlab 4.4.10, notebook 7.4.7, jupyter_server
2.21.1, jupyter_server_terminals 0.5.4). JS paths are in node_modules/@jupyterlab/ (S/ = services/lib/),
as the source maps of notebook's static/notebook_core.*.js give them; lab's jlab_core.*.js has the
same polls. A tab polls only while it is visible (standby "when-hidden").

| request | whose | source |
|---|---|---|
| GET /api/kernels, every 10 s | tab | S/kernel/manager.js:38-47 (Poll, interval 10 * 1000) |
| GET /api/sessions, every 10 s | tab | S/session/manager.js:37-46 |
| GET /api/terminals, every 10 s | tab | S/terminal/manager.js:37-46 |
| GET /api/kernelspecs, every 61 s | tab | S/kernelspec/manager.js:39-48 |
| GET /api/me, every 61 s | tab | S/user/index.js:15, 49-58 |
| GET /api/contents/<dir>?content=1, every 10 s | tab | filebrowser/lib/model.js:14, 79-89 (cd), 224 |
| GET /api/contents/<file>/checkpoints, every 2 s | tab | notebook-extension/lib/index.js:73-99 (Notebook 7) |
| GET /lab/api/workspaces, every 10 s | tab | workspaces/lib/model.js:10, 25-35 |
| WebSocket /api/events/subscribe, again if closed | tab | S/event/index.js:27-30, 87-101 |
| ?<milliseconds> on every GET | - | S/serverconnection.js:192-197 (a cache buster) |
| GET /api/contents/<file>?content=0 | tab | docregistry/lib/context.js:617-622 (a save's check) |
| GET /api/contents/<file>?type=notebook|file | person | docregistry/lib/context.js:558-572 (open, revert) |
| PUT, PATCH, POST, DELETE | person | none on a timer in the files above: saves, new, rename... |
| POST /api/security/csp-report | browser | jupyter_server services/security/handlers.py:19 |
| a page (Sec-Fetch-Mode: navigate) | person | loaded only when a person opens or reloads it |
| GET /files/..., /nbconvert/... | person | downloads, exports, a document's images |
| WebSocket /api/kernels/<id>/channels | person | a notebook or console opened; S/kernel/default.js:1446-1458 |
| WebSocket /terminals/websocket/<name> | person | a terminal opened; S/terminal/default.js:224-233 |
| a kernel's record | person | jupyter_server services/kernels/kernelmanager.py:572-605, 607-657 |
| a terminal's record | person | jupyter_server_terminals handlers.py:62-76, terminalmanager.py:170-172 |

The WebSockets reconnect only after a drop (the lines given). The proxy's idle timeout does not
drop them, which would make reconnections that count: Jupyter pings them every 30 s
(jupyter_server base/websocket.py:13-14, 126-137). A kernel's record moves on its output to any
request but the frontend's own (kernel_info, comm_info, debug...: the untracked types), and while
it is busy; a terminal's on its input and output. Listing kernels or terminals moves neither
(services/kernels/handlers.py:38-42, kernelmanager.py:533-549; jupyter_server_terminals
api_handlers.py:28-31, terminalmanager.py:67-73, 90-99). Jupyter's server-wide record does not
help: every API request but /api/status moves it (base/handlers.py:801-812), polls included.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import NamedTuple

DOCUMENT_TYPES = frozenset({"notebook", "file"})  # what a contents request names when it opens a document


class Rule(NamedTuple):
    kind: str  # "websocket", "read" (GET, HEAD), "preflight" (OPTIONS) or "write" (every other method)
    path: re.Pattern[str]  # matched from the start of the path, without its query
    when: Callable[[Mapping[str, str], Mapping[str, str]], bool]  # (query, headers) -> applies
    counts: bool


def always(query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    return True


def navigation(query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """A page the browser loads as a document (top level or a frame), not a script's fetch."""
    return headers.get("Sec-Fetch-Mode", "").lower() == "navigate"


def opens_document(query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    return query.get("type", "") in DOCUMENT_TYPES


ANY = re.compile(r"")

# First match wins; anything no rule matches is a tab's own.
RULES = (
    Rule("websocket", re.compile(r"/api/kernels/[^/]+/channels$"), always, True),
    Rule("websocket", re.compile(r"/terminals/websocket/[^/]+$"), always, True),
    Rule("websocket", ANY, always, False),  # events, language servers: the page's own
    Rule("read", ANY, navigation, True),
    Rule("read", re.compile(r"/files/"), always, True),
    Rule("read", re.compile(r"/nbconvert/"), always, True),
    Rule("read", re.compile(r"/api/contents/"), opens_document, True),
    Rule("read", ANY, always, False),
    Rule("preflight", ANY, always, False),
    Rule("write", re.compile(r"/api/security/csp-report$"), always, False),
    Rule("write", ANY, always, True),
)


def kind_of(method: str, headers: Mapping[str, str]) -> str:
    if headers.get("Upgrade", "").lower() == "websocket":
        return "websocket"
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "read"
    return "preflight" if method == "OPTIONS" else "write"


def counts(method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """Whether a request forwarded to an instance is a person's activity. `path` is without its
    query; `headers` is case-insensitive (mitmproxy's Headers)."""
    kind = kind_of(method, headers)
    for rule in RULES:
        if rule.kind == kind and rule.path.match(path) and rule.when(query, headers):
            return rule.counts
    return False
