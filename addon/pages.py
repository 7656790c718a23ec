"""What the proxy's own HTML pages (waiting.py, ended.py) share: their document, look and headers.

Each page is self-contained and fixed: its style (and script, if any) are constants allowed by
their hashes in a strict Content-Security-Policy, so nothing a page carries as data can run or load
anything. Building that policy in one place keeps every page as strict as the others.
Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; color: #222; background: #fafafa; margin: 0; }
main { max-width: 36em; margin: 15vh auto; padding: 0 1em; }
h1 { font-size: 1.4em; font-weight: 600; }
"""

DOCUMENT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
{head}<style>{style}</style>
</head>
<body{attributes}>
{body}</body>
</html>
"""


def document(title: str, style: str, body: str, head: str = "", attributes: str = "") -> bytes:
    """A page: `body` (and `head`'s extra elements, the body element's `attributes`) as the caller
    made them, every variable part in them already escaped; `title` is a constant."""
    return DOCUMENT.format(title=title, head=head, style=style, attributes=attributes, body=body).encode()


def source_hash(source: str) -> str:
    """The CSP source expression that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def content_security_policy(
    framing_origins: frozenset[str], style: str, script: str | None = None, connect: str | None = None
) -> str:
    """Only the page's own style (and script) apply, it loads nothing else and submits nothing, and
    it is framed only where the instance's pages may be (the frontend's origins: see router.py)."""
    directives = ["default-src 'none'"]
    if script is not None:
        directives.append(f"script-src {source_hash(script)}")
    directives.append(f"style-src {source_hash(style)}")
    if connect is not None:
        directives.append(f"connect-src {connect}")
    ancestors = " ".join(["'self'", *sorted(framing_origins)])
    directives += ["base-uri 'none'", "form-action 'none'", f"frame-ancestors {ancestors}"]
    return "; ".join(directives)


def headers(policy: str) -> dict[str, str]:
    """Never cached (a page says how things stand now, and may carry a fresh session), and its
    links do not carry the URL that led to it along."""
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": policy,
    }
