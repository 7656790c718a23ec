"""Which public host a request came to, and which origins may open WebSockets there.

In `cookie` routing every instance is served on the proxy's own host. In `subdomain` routing each
instance has its own host, `<label>.<public_host>`, so each is its own origin: its cookie, its
`_xsrf` cookie and its pages' scripts reach no other instance. The label is derived from the
instance id (no look-up needed) and is case-insensitive, as DNS names are.

Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

LABEL_CHARS = 26  # base32 characters: 130 bits of the id's hash
DEFAULT_PORTS = {"http": 80, "https": 443}


def instance_label(instance_id: str) -> str:
    """The DNS label of an instance's host: lowercase letters and digits, stable for its life."""
    digest = hashlib.sha256(instance_id.encode()).digest()
    return base64.b32encode(digest).decode()[:LABEL_CHARS].lower()


def instance_host(instance_id: str, public_host: str) -> str:
    return f"{instance_label(instance_id)}.{public_host}"


@dataclass(frozen=True)
class HostKind:
    """What a Host header names: the proxy's main host, one instance's host, or neither."""

    main: bool = False
    label: str = ""  # the instance label, for an instance host

    @property
    def known(self) -> bool:
        return self.main or bool(self.label)


def classify(host_header: str, public_host: str) -> HostKind:
    if not host_header.isascii():
        return HostKind()  # browsers send IDNs as punycode; anything else names no host of ours
    host = host_header.strip().lower().rstrip(".")
    public = public_host.lower()
    if host == public:
        return HostKind(main=True)
    label, dot, rest = host.partition(".")
    if dot and rest == public and len(label) == LABEL_CHARS and label.isalnum() and label.isascii():
        return HostKind(label=label)
    return HostKind()


# Where a request about an instance (its nonce's view or static) came, in subdomain routing.
OWN = "own"  # the instance's own host
OTHER = "other"  # another instance's host: the nonce does not work there (A's content on B's origin)
NEUTRAL = "neutral"  # the main host, or a host that is none of ours


def place(host_header: str, public_host: str, instance_id: str) -> str:
    """OWN, OTHER or NEUTRAL: the one host rule of a nonce's endpoints (api.py applies it)."""
    label = classify(host_header, public_host).label
    if not label:
        return NEUTRAL
    return OWN if label == instance_label(instance_id) else OTHER


def _netloc(host: str, default_ports: tuple[int, ...]) -> str:
    """host[:port] lowercase with a default port dropped: how two hosts are compared."""
    host = host.strip().lower()
    name, colon, port = host.rpartition(":")
    if colon and port.isascii() and port.isdigit() and int(port) in default_ports:  # not '²': int() fails
        return name
    return host


def normalize_origin(origin: str) -> str:
    """scheme://host[:port] lowercase without a default port; '' for anything that is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        parts.port  # noqa: B018 -- raises for a port that is no number in 0-65535 (':80:80', ':²')
    except ValueError:
        return ""
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return ""
    netloc = _netloc(parts.netloc, (DEFAULT_PORTS[parts.scheme],))
    # A browser sends the host in ASCII (punycode); anything else could normalize differently twice.
    if "@" in netloc or not (netloc.isascii() and netloc.isprintable()) or " " in netloc:
        return ""
    return f"{parts.scheme}://{netloc}"


def origin_of(url: str) -> str:
    """The normalized origin of a URL (a Referer), '' if it has none."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return ""
    return normalize_origin(f"{parts.scheme}://{parts.netloc}") if parts.netloc else ""


def origin_allowed(origin: str | None, host_header: str, allowed: frozenset[str]) -> bool:
    """A browser names the page that opens a WebSocket in Origin: it must be on the very host the
    request asked for (as Jupyter's own check; the scheme is not compared, so a TLS terminator in
    front changes nothing) or be one the operator listed. No Origin at all is a non-browser client,
    which no cross-site page can drive."""
    if origin is None:
        return True
    given = normalize_origin(origin)
    if not given:
        return False
    if given.partition("://")[2] == _netloc(host_header, tuple(DEFAULT_PORTS.values())):
        return True
    return given in {normalize_origin(o) for o in allowed}


def allow_framing(csp: str, origins: frozenset[str]) -> str:
    """A Content-Security-Policy whose frame-ancestors also name `origins`: Jupyter allows only
    'self', which keeps a frontend of another origin from showing the view in an iframe."""
    directives = [d.strip() for d in csp.split(";") if d.strip()]
    extended = [
        f"{d} {' '.join(sorted(origins))}" if d.lower().startswith("frame-ancestors") else d for d in directives
    ]
    return "; ".join(extended)
