"""The waiting page: what a view answers while its instance does not answer yet (starting, busy).

Without it the browser would follow the view's redirect into mitmproxy's own 502 page. The page
sets the session cookie like the redirect would, then asks the instance through the proxy
(`/api/status`, routed by that cookie) until it answers, and only then goes to the destination.

The page is self-contained and fixed: its script and style are constants allowed by their hashes
in a strict Content-Security-Policy, and the one variable part, the destination, is an HTML
attribute value read by the script (never JavaScript source), escaped here whatever it holds.
Its document, look and headers are those of every page of the proxy's own (pages.py). Pure functions, no I/O.
"""

from __future__ import annotations

import html

import pages

SCRIPT = """
"use strict";
(() => {
  const destination = document.body.dataset.destination;
  const status = document.getElementById("status");
  const deadline = Date.now() + 3 * 60 * 1000;  // then a person had better look
  const ATTEMPT_MS = 8000;  // a frozen Jupyter accepts the connection and says nothing: stop waiting for it
  const MAX_DELAY_MS = 5000;
  let delay = 500;

  function stop(text) {
    status.textContent = text;
    document.title = "Notebook not available";
  }

  async function ask() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), ATTEMPT_MS);
    try {
      return await fetch("/api/status", {cache: "no-store", credentials: "same-origin", signal: abort.signal});
    } catch (e) {
      return null;  // no answer (yet): keep waiting
    } finally {
      clearTimeout(timer);
    }
  }

  async function refusal(answer) {
    try {
      const body = await answer.json();
      if (body && typeof body.message === "string") {
        return body.message + (typeof body.code === "string" ? " (" + body.code + ")" : "");
      }
    } catch (e) {}
    return "The proxy refused to continue (HTTP " + answer.status + ").";
  }

  async function poll() {
    const answer = await ask();
    if (answer && answer.ok) {
      location.replace(destination);
      return;
    }
    if (answer && answer.status >= 400 && answer.status < 500) {
      stop(await refusal(answer));  // 410 INSTANCE_GONE, 403 NO_SESSION...: waiting will not help
      return;
    }
    if (Date.now() >= deadline) {
      stop("Your notebook has not answered for 3 minutes. Reload this page to try again.");
      return;
    }
    setTimeout(poll, delay);
    delay = Math.min(delay * 1.5, MAX_DELAY_MS);
  }

  poll();
})();
"""

STYLE = pages.STYLE

HEAD = '<noscript><meta http-equiv="refresh" content="5"></noscript>\n'
BODY = """<main>
<h1>Waiting for your notebook</h1>
<p id="status" role="status" aria-live="polite">It is starting or busy. This page continues by itself as soon as it
answers.</p>
<p><a href="{destination}">Open it now</a></p>
</main>
<script>{script}</script>
"""


def content_security_policy(framing_origins: frozenset[str] = frozenset()) -> str:
    """Its own script and style, and fetches (of /api/status) from its own origin only."""
    return pages.content_security_policy(framing_origins, STYLE, script=SCRIPT, connect="'self'")


def check_destination(destination: str) -> str:
    """A path on this origin, as inputs.safe_destination makes it; anything else is a bug above."""
    if not destination.startswith("/") or destination[1:2] in ("/", "\\"):
        raise ValueError("the destination must be a path on this origin")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in destination):
        raise ValueError("the destination must not contain control characters")
    return destination


def page(destination: str) -> bytes:
    """The page for `destination`; it goes there once the instance answers."""
    attribute = html.escape(check_destination(destination), quote=True)
    body = BODY.format(script=SCRIPT, destination=attribute)
    return pages.document("Waiting for your notebook", STYLE, body, HEAD, f' data-destination="{attribute}"')


def headers(framing_origins: frozenset[str] = frozenset()) -> dict[str, str]:
    """Never cached (it carries a fresh session), and its links do not carry the view URL along."""
    return pages.headers(content_security_policy(framing_origins))
