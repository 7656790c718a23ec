#!/usr/bin/env python3
"""A demo frontend for the datalab proxy, and the reference for integrating a real one.

    scripts/demo.py [--host 127.0.0.1] [--port 8090] [--proxy http://127.0.0.1:8080]

(`./run.sh --demo` starts it beside the proxy.) A person picks a CSV or .ipynb file on its page;
the page posts it here; this server signs the start with the sign key (which never reaches the
browser), calls the proxy's `POST /datalab/start`, and answers the nonce and the view URL, which
the page then shows in an iframe. The four steps of any frontend:

1. Sign on the server: X-SIGN over (ts, filename) with the key shared with the proxy.
2. Start: POST the file to `<proxy>/datalab/start?ts=&filename=`; the answer holds a nonce.
3. Embed `<proxy>/datalab/view/<nonce>/<destination>` (an iframe or a link): the view sets the
   browser's session cookie on the proxy's host and redirects into the instance.
4. Run the proxy with `--set datalab_allowed_origins=<this page's origin>`: browsers show an
   instance in an iframe of another origin only when the proxy's answers list it (frame-ancestors).
5. Offer the work: the start's answer also holds a work id; `GET <proxy>/datalab/work/<id>?ts=`,
   signed over (ts, id) on the server, answers the working directory as a .tar.gz (a snapshot
   while the instance runs, the saved archive after it ended). This server streams it on to the
   browser at `GET /work/<id>`, never holding it whole.
6. Follow the start: sent with `Accept: text/event-stream`, the start answers its progress as
   Server-Sent Events (queued, booting, uploading, ready or error); this server relays them to the
   page, which shows them as one line. The person's name goes as the start's `owner`, and the
   profile they pick as its `profile` (both signed with the filename).
7. Hear of ends: run the proxy with `--set datalab_events_url=<this server>/events` (run.sh --demo
   does): the proxy POSTs every lifecycle event there, signed (X-Datalab-Signature); this server
   checks the signature and keeps the recent ones, and the page asks for its owner's: when its
   instance ends it says so and offers the work.

Environment: DATALAB_SIGN_KEY (else .state/sign_key, as run.sh keeps it), DATALAB_SIGN_SCHEME
(sha256 or hmac-sha256, as the proxy's), DATALAB_EVENTS_KEY (the events' key, as the proxy's;
default: the sign key), DATALAB_DEMO_PROFILES (the profiles the page offers, comma-separated;
default: default), DATALAB_DEMO_PORT, DATALAB_URL (the proxy as the browser reaches it). Standard
library only, plus the proxy's own addon/signing.py.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import html
import http.client
import ipaddress
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))
import inputs  # noqa: E402  (the proxy's own shape of an id)
import signing  # noqa: E402  (the proxy's own signature rules, so both sides agree by construction)

MAX_BODY = 1 << 30  # what this demo accepts from a browser; the proxy enforces its datalab_max_upload
CHUNK = 1 << 16  # a download passes through this server in pieces this size, however large it is
WORK_HEADERS = ("Content-Type", "Content-Length", "Content-Disposition", "Retry-After")  # passed on as they are
# A download is data, never a page of this origin (the origin that may have starts signed): even
# if something rendered it, it runs nothing and loads nothing. allow-same-origin lets this page
# read a refusal shown in its download frame.
WORK_POLICY = "default-src 'none'; frame-ancestors 'self'; sandbox allow-same-origin"
EVENT_STREAM = "text/event-stream"
MAX_EVENT = 64 * 1024  # bytes of one event the proxy POSTs (they are a few hundred)
EVENTS_KEPT = 1000  # the most recent events this demo remembers (a real frontend stores what it needs)
NOTICES = ("end", "work_saved", "work_unsaved")  # the events the page is told of its owner


def destination_for(filename: str) -> str:
    """Where the iframe lands: a notebook in Notebook 7's notebook view; any other file (a CSV) in
    JupyterLab (served by the same Jupyter), which shows it as a table and opens a new notebook
    (the launcher's "+") in the same page. Notebook 7's own file browser (`tree`) would open every
    new notebook in a new browser tab, out of the frontend's iframe."""
    path = urllib.parse.quote(filename)
    return f"notebooks/{path}" if filename.endswith(".ipynb") else f"lab/tree/{path}"


def body_length(header: str) -> int | None:
    """The Content-Length as a number, or None when it is not one: ASCII digits only ('²' and '١'
    pass isdigit() but not int(), or mean another number). A number too long for int() to take
    (over 4300 digits) is only known to be over MAX_BODY."""
    if not (header.isascii() and header.isdigit()):
        return None
    digits = header.lstrip("0") or "0"
    return MAX_BODY + 1 if len(digits) > len(str(MAX_BODY)) else int(digits)


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    """The Host values a demo bound to loopback answers uploads for (empty: any, for a demo bound
    elsewhere on purpose). A page on a name of the attacker's that resolves to 127.0.0.1 (DNS
    rebinding) would otherwise read the answers of this signing server as its own origin's."""
    try:
        if not ipaddress.ip_address(host).is_loopback:
            return frozenset()
    except ValueError:
        if host != "localhost":
            return frozenset()
    return frozenset(f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", host))


def foreign(host: str, origin: str | None, hosts: frozenset[str]) -> str | None:
    """Why an upload comes from another site than this page, if it does. A browser sends Origin with
    every POST a page makes; a page of another site (or a sandboxed one: 'null') must not make this
    server sign and start instances behind its user's back. Clients that are not browsers send none."""
    if hosts and host not in hosts:
        return f"this demo answers as http://{sorted(hosts)[0]}, not as http://{host}"
    if origin is not None and origin != f"http://{host}":
        return f"only this demo's own page may upload here, not a page of {origin}"
    return None


def foreign_download(host: str, origin: str | None, fetch_site: str | None, hosts: frozenset[str]) -> str | None:
    """Why a download is not this page's (or a person's who typed its URL), if it is not. Another
    site's page could not read the file (no CORS here), but could still make this server sign
    requests to the proxy and push files into its user's downloads; browsers say who asks in
    Sec-Fetch-Site (and in Origin for a script's request); clients that are not browsers send neither."""
    refusal = foreign(host, origin, hosts)
    if refusal is None and fetch_site is not None and fetch_site not in ("same-origin", "none"):
        refusal = f"only this demo's own page may download here, not a {fetch_site} page"
    return refusal


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is passed on as the proxy's answer, never followed: urllib would send the
    signature along to wherever it points."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


def open_work(proxy: str, key: str, scheme: str, work_id: str) -> http.client.HTTPResponse | urllib.error.HTTPError:
    """Sign and call GET /datalab/work/<id>: the proxy's answer, its body not read yet. A refusal
    (an HTTPError) is an answer like the archive: its status, headers and JSON body are passed on."""
    ts = str(int(time.time() * 1000))  # milliseconds, as for a start: each signature is used once
    request = urllib.request.Request(
        f"{proxy}/datalab/work/{work_id}?{urllib.parse.urlencode({'ts': ts})}",
        headers={"X-SIGN": signing.signature(key, ts, work_id, scheme)},
    )
    try:
        return urllib.request.build_opener(NoRedirect).open(request, timeout=180)
    except urllib.error.HTTPError as e:
        return e


def passed_on(status: int, content_type: str) -> bool:
    """Whether a work answer is one the demo passes on: the archive, or the proxy's JSON refusal.
    Anything else (a page, a redirect) is not the proxy's, and never becomes an answer of this origin."""
    media_type = content_type.partition(";")[0].strip().lower()
    return (200 <= status < 300 and media_type == "application/gzip") or (
        status >= 400 and media_type == "application/json"
    )


def relay(read: Callable[[int], bytes], write: Callable[[bytes], object], chunked: bool) -> int:
    """Copy a body piece by piece, each written before the next is read, so no more than CHUNK of
    it is ever held here; framed as HTTP/1.1 chunks if `chunked`. The bytes copied. An error
    stops the copy before the final chunk, so a cut download never looks complete."""
    total = 0
    while piece := read(CHUNK):
        write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        total += len(piece)
    if chunked:
        write(b"0\r\n\r\n")
    return total


def start_request(
    proxy: str, key: str, scheme: str, filename: str, data: bytes, extras: dict[str, str], accept: str = ""
) -> urllib.request.Request:
    """A signed POST /datalab/start: X-SIGN over ts, the filename and the extras (owner, profile),
    as signing.start_subject spells them."""
    ts = str(int(time.time() * 1000))  # milliseconds: each signature is used once (403 REPLAYED)
    query = urllib.parse.urlencode({"ts": ts, "filename": filename, **extras})
    subject = signing.start_subject(filename, extras)
    headers = {"X-SIGN": signing.signature(key, ts, subject, scheme), "Content-Type": "application/octet-stream"}
    return urllib.request.Request(
        f"{proxy}/datalab/start?{query}",
        data=data,
        headers=headers | ({"Accept": accept} if accept else {}),
        method="POST",
    )


def start(
    proxy: str, key: str, scheme: str, filename: str, data: bytes, extras: dict | None = None
) -> tuple[int, dict]:
    """Sign and call POST /datalab/start: (HTTP status, the proxy's JSON answer)."""
    request = start_request(proxy, key, scheme, filename, data, extras or {})
    try:
        try:
            with urllib.request.urlopen(request, timeout=180) as r:
                return proxy_answer(r.status, r.read())
        except urllib.error.HTTPError as e:  # a refusal: the proxy's {"code", "message"}, passed on as is
            with e:
                return proxy_answer(e.code, e.read())
    except OSError as e:
        return 502, {"code": "PROXY_UNREACHABLE", "message": f"the proxy at {proxy} does not answer: {e}"}


def start_progress(
    proxy: str, key: str, scheme: str, filename: str, data: bytes, extras: dict[str, str]
) -> Iterator[tuple[str, dict]]:
    """Sign and call POST /datalab/start for its progress: each event (name, data) as it comes; a
    refusal (the proxy's JSON answer) is one error event."""
    request = start_request(proxy, key, scheme, filename, data, extras, accept=EVENT_STREAM)
    try:
        answer = urllib.request.urlopen(request, timeout=180)
    except urllib.error.HTTPError as e:
        with e:
            status, body = proxy_answer(e.code, e.read())
        yield "error", body | {"status": status}
        return
    except OSError as e:
        yield "error", {"code": "PROXY_UNREACHABLE", "message": f"the proxy at {proxy} does not answer: {e}"}
        return
    with answer:
        if not answer.headers.get("Content-Type", "").startswith(EVENT_STREAM):
            status, body = proxy_answer(answer.status, answer.read())
            yield ("error", body) if status != 200 else ("ready", body.get("result") or {})
            return
        yield from server_sent_events(answer)


def server_sent_events(answer) -> Iterator[tuple[str, dict]]:
    """The events of an event stream, read line by line: `event: <name>` and `data: <json>`, each
    event ended by a blank line."""
    name, data = "", "{}"
    for raw in answer:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and name:
            try:
                yield name, json.loads(data)
            except ValueError:
                yield "error", {"code": "PROXY_ERROR", "message": "the proxy sent an event that is not JSON"}
            name, data = "", "{}"


def event_frame(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def signed_by(key: str, body: bytes, given: str) -> bool:
    """Whether an event POSTed here carries the proxy's X-Datalab-Signature (constant-time compare)."""
    expected = "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.encode())


class Events:
    """The recent lifecycle events the proxy POSTed, for the page's notices (in memory: a demo)."""

    def __init__(self) -> None:
        self._kept: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self._lock = threading.Lock()

    def add(self, event: dict) -> None:
        with self._lock:
            if all(e.get("id") != event.get("id") for e in self._kept):  # at least once: a repeat is dropped
                self._kept.append(event)

    def of(self, owner: str, after: float) -> list[dict]:
        """The owner's notices since `after` (an event's time)."""
        with self._lock:
            kept = [e for e in self._kept if e.get("owner") == owner and e.get("type") in NOTICES]
            return [e for e in kept if isinstance(e.get("time"), (int, float)) and e["time"] > after]


def proxy_answer(status: int, raw: bytes) -> tuple[int, dict]:
    """The proxy's JSON object and status; anything else (DATALAB_URL names another server) is a
    502 that says so, never a failure of this server that leaves the page without an answer."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return 502, {"code": "PROXY_ERROR", "message": f"the proxy answered {status} without a JSON object"}
    return status, body


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a status outside the standard's list (499 CLIENT_GONE...)
        return ""


def profile_options(profiles: list[str]) -> str:
    """The page's profile choices (the operator's names: escaped all the same)."""
    return "".join(f'<option value="{html.escape(p, quote=True)}">{html.escape(p)}</option>' for p in profiles)


class Demo(BaseHTTPRequestHandler):
    """GET / is the page; POST /upload?filename=NAME[&owner=&profile=] (body: the file) signs, starts
    and answers {"code": "OK", "result": {"nonce", "view", "work"}, "steps"} or the proxy's error
    JSON, or, asked with Accept: text/event-stream, the start's progress as events; GET /work/<id> is
    the work of a start, as the proxy answers it; POST /events takes the proxy's signed lifecycle
    events and GET /notices?owner=&after= gives the page its owner's. It signs for its own page only
    (403 BAD_ORIGIN otherwise: see foreign() and foreign_download())."""

    server_version = "datalab-demo"
    proxy = key = scheme = events_key = ""  # set by main()
    hosts: frozenset[str] = frozenset()
    profiles: list[str] = ["default"]
    events = Events()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/work/"):
            return self._download(url.path.removeprefix("/work/"))
        if url.path == "/notices":
            return self._notices(urllib.parse.parse_qs(url.query))
        if url.path != "/":
            return self._json(404, {"code": "NOT_FOUND", "message": "the demo page is /"})
        self._send(200, "text/html; charset=utf-8", PAGE.replace("{profiles}", profile_options(self.profiles)).encode())

    def _notices(self, query: dict[str, list[str]]) -> None:
        """GET /notices?owner=&after=: the owner's ends and saved works since `after` (this page's only)."""
        h = self.headers
        refusal = foreign_download(h.get("Host", ""), h.get("Origin"), h.get("Sec-Fetch-Site"), self.hosts)
        if refusal:
            return self._json(403, {"code": "BAD_ORIGIN", "message": refusal})
        try:
            after = float((query.get("after") or ["0"])[0])
        except ValueError:
            after = 0.0
        self._json(200, {"code": "OK", "result": self.events.of((query.get("owner") or [""])[0], after)})

    def _take_event(self) -> None:
        """POST /events: one lifecycle event from the proxy, taken only with its signature right."""
        length = body_length(self.headers.get("Content-Length", ""))
        if length is None or length > MAX_EVENT:
            return self._json(400, {"code": "BAD_REQUEST", "message": f"an event is at most {MAX_EVENT} bytes"})
        body = self.rfile.read(length)
        if not signed_by(self.events_key, body, self.headers.get("X-Datalab-Signature", "")):
            return self._json(401, {"code": "BAD_SIGNATURE", "message": "X-Datalab-Signature does not match"})
        try:
            event = json.loads(body)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            return self._json(400, {"code": "BAD_REQUEST", "message": "an event is a JSON object"})
        self.events.add(event)
        self._send(204, "application/json", b"")

    def _download(self, work_id: str) -> None:
        """GET /work/<id>: the proxy's answer to a signed GET /datalab/work/<id>, streamed on."""
        h = self.headers
        refusal = foreign_download(h.get("Host", ""), h.get("Origin"), h.get("Sec-Fetch-Site"), self.hosts)
        if refusal:
            return self._json(403, {"code": "BAD_ORIGIN", "message": refusal})
        if not inputs.is_token(work_id):
            return self._json(400, {"code": "BAD_REQUEST", "message": "a work id is 22 to 128 URL-safe characters"})
        try:
            answer = open_work(self.proxy, self.key, self.scheme, work_id)
        except OSError as e:
            return self._json(502, {"code": "PROXY_UNREACHABLE", "message": f"the proxy at {self.proxy}: {e}"})
        with answer:
            if not passed_on(answer.status, answer.headers.get("Content-Type", "")):
                message = f"the proxy answered {answer.status} without an archive or a JSON refusal"
                return self._json(502, {"code": "PROXY_ERROR", "message": message})
            self._pass_on(answer)

    def _pass_on(self, answer: http.client.HTTPResponse | urllib.error.HTTPError) -> None:
        """The answer's status and headers, then its body as it comes. Without a length, the body
        goes in chunks (HTTP/1.1) so that the browser can tell a cut download from a whole one."""
        length = answer.headers.get("Content-Length")
        chunked = not (length and length.isascii() and length.isdigit()) and self.request_version == "HTTP/1.1"
        if chunked:
            self.protocol_version = "HTTP/1.1"  # this answer's framing only: the connection closes after it
        self.send_response(answer.status)
        for name in WORK_HEADERS:
            value = answer.headers.get(name)
            if value is not None and (name != "Content-Length" or not chunked):
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", WORK_POLICY)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            relay(answer.read, self.wfile.write, chunked)
        except (OSError, http.client.HTTPException) as e:  # the proxy or the browser went away
            self.log_message("download of %s cut: %r", self.path, e)

    def do_POST(self) -> None:
        refusal = foreign(self.headers.get("Host", ""), self.headers.get("Origin"), self.hosts)
        if refusal:
            return self._json(403, {"code": "BAD_ORIGIN", "message": refusal})
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/events":
            return self._take_event()
        query = urllib.parse.parse_qs(url.query)
        names = query.get("filename", [])
        length = body_length(self.headers.get("Content-Length", ""))
        if url.path != "/upload" or len(names) != 1 or length is None:
            return self._json(400, {"code": "BAD_REQUEST", "message": "POST /upload?filename=NAME with the file"})
        if length > MAX_BODY:
            return self._json(413, {"code": "UPLOAD_TOO_LARGE", "message": f"the demo takes at most {MAX_BODY} bytes"})
        extras = {name: query[name][0] for name in ("owner", "profile") if query.get(name, [""])[0]}
        # A demo reads the file whole; a real frontend would stream it on (the proxy takes chunked bodies).
        data = self.rfile.read(length)
        if EVENT_STREAM in self.headers.get("Accept", ""):
            return self._relay_progress(names[0], data, extras)
        began = time.monotonic()
        status, body = start(self.proxy, self.key, self.scheme, names[0], data, extras)
        took = time.monotonic() - began
        steps = [
            f"signed on the demo server ({self.scheme}; the key never reaches the browser)",
            f"POST {self.proxy}/datalab/start: {status} {phrase(status)} in {took:.1f} s",
        ]
        result = body.get("result") if status == 200 else None
        nonce = result.get("nonce") if isinstance(result, dict) else None
        if nonce:
            view = f"{self.proxy}/datalab/view/{nonce}/{destination_for(names[0])}"
            body = {"code": "OK", "result": {"nonce": nonce, "view": view}}
            work = result.get("work")
            if isinstance(work, str) and inputs.is_token(work):
                body["result"]["work"] = work
        self._json(status, body | {"steps": steps})

    def _relay_progress(self, filename: str, data: bytes, extras: dict[str, str]) -> None:
        """The start's progress, passed on to the page event by event; `ready` gets the view URL."""
        self.send_response(200)
        self.send_header("Content-Type", EVENT_STREAM)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        signed = f"signed on the demo server ({self.scheme}; the key never reaches the browser)"
        self.wfile.write(event_frame("step", {"text": signed}))
        self.wfile.flush()
        for name, event in start_progress(self.proxy, self.key, self.scheme, filename, data, extras):
            if name == "ready":
                nonce, work = event.get("nonce"), event.get("work")
                if not (isinstance(nonce, str) and inputs.is_token(nonce)):
                    name, event = "error", {"code": "PROXY_ERROR", "message": "the proxy's answer has no nonce"}
                else:
                    view = f"{self.proxy}/datalab/view/{nonce}/{destination_for(filename)}"
                    event = {"nonce": nonce, "view": view}
                    if isinstance(work, str) and inputs.is_token(work):
                        event["work"] = work
            try:
                self.wfile.write(event_frame(name, event))
                self.wfile.flush()
            except OSError:  # the page went away: closing the proxy's answer abandons the start
                return

    def _json(self, status: int, body: dict) -> None:
        self._send(status, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)


# The page: the person's name (the starts' owner), a profile, a file picker, the steps and the start's
# progress line as they happen, the proxy's error if any, the link to the work of the last start, a
# notice when an instance of this owner ended, and the iframe. The link opens in a hidden frame: an
# archive becomes a download there (no load event), a refusal is shown in it and read from it into
# the error line (its JSON, same origin). The page never holds the archive itself.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datalab demo</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { padding: 10px 16px; background: #f4f4f6; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 17px; margin: 0 12px 0 0; display: inline; }
  #steps { margin: 6px 0 0; padding-left: 20px; font-size: 13px; color: #444; }
  #error { display: none; margin: 6px 0 0; padding: 6px 10px; background: #fde8e8; color: #8a1c1c; }
  iframe { flex: 1; border: 0; width: 100%; }
  #download { display: none; margin: 6px 0 0; }
  #progress { margin: 6px 0 0; font-size: 13px; color: #225; }
  #ended { display: none; margin: 6px 0 0; padding: 6px 10px; background: #fff4d6; }
</style></head>
<body>
<header>
  <h1>datalab demo</h1>
  <form id="form"><label>Your name <input id="owner" size="14" maxlength="128"></label>
    <label>Profile <select id="profile">{profiles}</select></label>
    <input type="file" id="file" accept=".csv,.ipynb,text/csv">
    <button type="submit" id="open">Open in Jupyter</button></form>
  <ol id="steps"></ol>
  <p id="progress" role="status" aria-live="polite"></p>
  <p id="ended" role="status">Your session ended (<span id="ended-cause"></span>);
    <a id="ended-link" target="download-frame">download your work</a></p>
  <p id="download"><a id="download-link" target="download-frame">Download my work (.tar.gz)</a></p>
  <p id="error"><b id="error-code"></b>: <span id="error-message"></span></p>
</header>
<iframe id="lab" title="Jupyter"></iframe>
<iframe name="download-frame" id="download-frame" title="download" hidden></iframe>
<script>
const $ = (id) => document.getElementById(id);
function step(text) { const li = document.createElement("li"); li.textContent = text; $("steps").append(li); }
function fail(body) {
  $("error-code").textContent = body.code || "ERROR";
  $("error-message").textContent = body.message || "";
  $("error").style.display = "block";
}
$("download-link").addEventListener("click", () => { $("error").style.display = "none"; });
// The owner: a name this browser keeps (a real frontend sends its own user id, never the browser's word).
$("owner").value = localStorage.getItem("datalab-owner") || "demo-" + Math.random().toString(36).slice(2, 8);
$("owner").addEventListener("change", () => localStorage.setItem("datalab-owner", $("owner").value));
const PHASES = {queued: (d) => `queued: number ${d.position} in line for a boot slot`,
  booting: () => "booting an instance", uploading: () => "putting the file into it", ready: () => "ready"};
let noticesAfter = Date.now() / 1000;
async function notices() {  // the proxy's events for this owner, as this server received them
  try {
    const query = new URLSearchParams({owner: $("owner").value, after: noticesAfter});
    const answer = await (await fetch("/notices?" + query, {cache: "no-store"})).json();
    for (const event of answer.result || []) {
      noticesAfter = Math.max(noticesAfter, event.time);
      if (event.type !== "end" || !event.work) continue;
      $("ended-cause").textContent = event.cause || "ended";
      $("ended-link").href = "/work/" + encodeURIComponent(event.work);
      $("ended").style.display = "block";
      document.body.dataset.ended = event.work;
    }
  } catch (e) {}  // the demo server restarting: ask again later
}
setInterval(notices, 2000);
function events(text, each) {  // Server-Sent Events: "event: <name>" and "data: <json>", a blank line after each
  for (const block of text.split("\\n\\n")) {
    const name = (block.match(/^event: (.*)$/m) || [])[1];
    const data = (block.match(/^data: (.*)$/m) || [])[1];
    if (name) each(name, JSON.parse(data || "{}"));
  }
}
async function follow(response, each) {  // the start's events as they arrive
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const cut = buffer.lastIndexOf("\\n\\n");
    if (cut >= 0) { events(buffer.slice(0, cut), each); buffer = buffer.slice(cut + 2); }
  }
}
$("download-frame").addEventListener("load", () => {
  let body;
  try {  // a refusal: the proxy's {"code", "message"} (Chromium shows JSON in a <pre>)
    const page = $("download-frame").contentDocument;
    body = JSON.parse((page.querySelector("pre") || page.body).textContent);
  } catch (e) {
    return;  // not a refusal (about:blank): nothing to show
  }
  if (body && typeof body === "object") fail(body);
});
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  $("steps").replaceChildren(); $("error").style.display = "none"; $("lab").removeAttribute("src");
  $("download").style.display = "none"; delete document.body.dataset.work;
  $("ended").style.display = "none"; $("progress").textContent = "";
  step(`uploading ${file.name} (${file.size} bytes) to the demo server`);
  const query = new URLSearchParams({filename: file.name, owner: $("owner").value, profile: $("profile").value});
  let response, body;
  try {
    response = await fetch("/upload?" + query, {method: "POST", body: file, headers: {Accept: "text/event-stream"}});
    if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      await follow(response, (name, data) => {
        if (name === "step") step(data.text);
        else if (name in PHASES) $("progress").textContent = PHASES[name](data);
        if (name === "ready") body = {code: "OK", result: data};
        if (name === "error") body = data;
      });
      body = body || {code: "DEMO_ERROR", message: "the start's progress ended without an outcome"};
    } else {
      body = await response.json();  // the demo's own refusal
    }
  } catch (e) {
    return fail({ code: "DEMO_UNREACHABLE", message: String(e) });
  }
  (body.steps || []).forEach(step);
  if (!response.ok || body.code !== "OK") return fail(body);
  step(`started: nonce ${body.result.nonce}`);
  step(`opening ${body.result.view}`);
  $("lab").onload = () => step("opened");
  $("lab").src = body.result.view;
  document.body.dataset.nonce = body.result.nonce;
  if (body.result.work) {  // kept until the next start: the work outlives its instance
    document.body.dataset.work = body.result.work;
    $("download-link").href = "/work/" + encodeURIComponent(body.result.work);
    $("download").style.display = "block";
  }
});
</script>
</body></html>
"""


def sign_key() -> str:
    """The key run.sh uses: DATALAB_SIGN_KEY, else the one it generated into .state/sign_key."""
    key = os.environ.get("DATALAB_SIGN_KEY", "")
    path = Path(os.environ.get("DATALAB_STATE") or ROOT / ".state") / "sign_key"
    if not key and path.exists():
        key = path.read_text().strip()
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DATALAB_DEMO_PORT") or 8090))
    default_proxy = os.environ.get("DATALAB_URL") or f"http://127.0.0.1:{os.environ.get('DATALAB_PORT') or 8080}"
    parser.add_argument("--proxy", default=default_proxy, help="the proxy's URL, as the browser reaches it")
    args = parser.parse_args()
    Demo.proxy = args.proxy.rstrip("/")
    Demo.key = sign_key()
    Demo.scheme = os.environ.get("DATALAB_SIGN_SCHEME") or "sha256"
    Demo.hosts = loopback_hosts(args.host, args.port)
    Demo.events_key = os.environ.get("DATALAB_EVENTS_KEY") or Demo.key
    Demo.profiles = [p.strip() for p in (os.environ.get("DATALAB_DEMO_PROFILES") or "default").split(",") if p.strip()]
    if not Demo.key:
        sys.exit("demo: no sign key: set DATALAB_SIGN_KEY, or run ./run.sh once to generate .state/sign_key")
    server = ThreadingHTTPServer((args.host, args.port), Demo)
    print(f"demo: http://{args.host}:{args.port}/ -> proxy {Demo.proxy}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
