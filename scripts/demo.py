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

Environment: DATALAB_SIGN_KEY (else .state/sign_key, as run.sh keeps it), DATALAB_SIGN_SCHEME
(sha256 or hmac-sha256, as the proxy's), DATALAB_DEMO_PORT, DATALAB_URL (the proxy as the browser
reaches it). Standard library only, plus the proxy's own addon/signing.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))
import signing  # noqa: E402  (the proxy's own signature rules, so both sides agree by construction)

MAX_BODY = 1 << 30  # what this demo accepts from a browser; the proxy enforces its datalab_max_upload


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


def start(proxy: str, key: str, scheme: str, filename: str, data: bytes) -> tuple[int, dict]:
    """Sign and call POST /datalab/start: (HTTP status, the proxy's JSON answer)."""
    ts = str(int(time.time() * 1000))  # milliseconds: each signature is used once (403 REPLAYED)
    query = urllib.parse.urlencode({"ts": ts, "filename": filename})
    request = urllib.request.Request(
        f"{proxy}/datalab/start?{query}",
        data=data,
        headers={"X-SIGN": signing.signature(key, ts, filename, scheme), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    try:
        try:
            with urllib.request.urlopen(request, timeout=180) as r:
                return proxy_answer(r.status, r.read())
        except urllib.error.HTTPError as e:  # a refusal: the proxy's {"code", "message"}, passed on as is
            with e:
                return proxy_answer(e.code, e.read())
    except OSError as e:
        return 502, {"code": "PROXY_UNREACHABLE", "message": f"the proxy at {proxy} does not answer: {e}"}


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


class Demo(BaseHTTPRequestHandler):
    """GET / is the page; POST /upload?filename=NAME (body: the file) signs, starts and answers
    {"code": "OK", "result": {"nonce", "view", "steps"}} or the proxy's error JSON. It signs for its
    own page only (403 BAD_ORIGIN otherwise: see foreign())."""

    server_version = "datalab-demo"
    proxy = key = scheme = ""  # set by main()
    hosts: frozenset[str] = frozenset()

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/":
            return self._json(404, {"code": "NOT_FOUND", "message": "the demo page is /"})
        self._send(200, "text/html; charset=utf-8", PAGE.encode())

    def do_POST(self) -> None:
        refusal = foreign(self.headers.get("Host", ""), self.headers.get("Origin"), self.hosts)
        if refusal:
            return self._json(403, {"code": "BAD_ORIGIN", "message": refusal})
        url = urllib.parse.urlsplit(self.path)
        names = urllib.parse.parse_qs(url.query).get("filename", [])
        length = body_length(self.headers.get("Content-Length", ""))
        if url.path != "/upload" or len(names) != 1 or length is None:
            return self._json(400, {"code": "BAD_REQUEST", "message": "POST /upload?filename=NAME with the file"})
        if length > MAX_BODY:
            return self._json(413, {"code": "UPLOAD_TOO_LARGE", "message": f"the demo takes at most {MAX_BODY} bytes"})
        # A demo reads the file whole; a real frontend would stream it on (the proxy takes chunked bodies).
        data = self.rfile.read(length)
        began = time.monotonic()
        status, body = start(self.proxy, self.key, self.scheme, names[0], data)
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
        self._json(status, body | {"steps": steps})

    def _json(self, status: int, body: dict) -> None:
        self._send(status, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)


# The page: a file picker, the steps as they happen, the proxy's error if any, and the iframe.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datalab demo</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { padding: 10px 16px; background: #f4f4f6; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 17px; margin: 0 12px 0 0; display: inline; }
  #steps { margin: 6px 0 0; padding-left: 20px; font-size: 13px; color: #444; }
  #error { display: none; margin: 6px 0 0; padding: 6px 10px; background: #fde8e8; color: #8a1c1c; }
  iframe { flex: 1; border: 0; width: 100%; }
</style></head>
<body>
<header>
  <h1>datalab demo</h1>
  <form id="form"><input type="file" id="file" accept=".csv,.ipynb,text/csv">
    <button type="submit" id="open">Open in Jupyter</button></form>
  <ol id="steps"></ol>
  <p id="error"><b id="error-code"></b>: <span id="error-message"></span></p>
</header>
<iframe id="lab" title="Jupyter"></iframe>
<script>
const $ = (id) => document.getElementById(id);
function step(text) { const li = document.createElement("li"); li.textContent = text; $("steps").append(li); }
function fail(body) {
  $("error-code").textContent = body.code || "ERROR";
  $("error-message").textContent = body.message || "";
  $("error").style.display = "block";
}
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  $("steps").replaceChildren(); $("error").style.display = "none"; $("lab").removeAttribute("src");
  step(`uploading ${file.name} (${file.size} bytes) to the demo server`);
  let response, body;
  try {
    response = await fetch("/upload?filename=" + encodeURIComponent(file.name), { method: "POST", body: file });
    body = await response.json();
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
    if not Demo.key:
        sys.exit("demo: no sign key: set DATALAB_SIGN_KEY, or run ./run.sh once to generate .state/sign_key")
    server = ThreadingHTTPServer((args.host, args.port), Demo)
    print(f"demo: http://{args.host}:{args.port}/ -> proxy {Demo.proxy}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
