"""Signatures over a signed request's `ts` and subject (the filename of a start, the nonce of a stop).

Two schemes, chosen by datalab_sign_scheme:
- `sha256` (the seed API's, the default): hex(sha256(sign_key + ts + subject)). A plain hash of
  key || message is open to length extension, and `ts + subject` has no separator, so ("17", "00a")
  and ("1700", "a") sign the same bytes.
- `hmac-sha256`: hex(HMAC-SHA256(sign_key, ts + "\n" + subject)): a keyed MAC with an unambiguous
  message. Prefer it when the frontend can be changed.

A start signs its filename and, after it, every other parameter that changes what is started
(`start_subject`): with none of them, the subject is the filename alone, as in the seed API. A read
of the instance API signs its method and path (and the owner it asks about): no start, stop or work
request can sign such a subject, since a filename, nonce or work id holds no '/' nor space.

Pure functions, no I/O, so the rules are tested with tables. Replay protection (a signature is
used once) lives in the store, since several proxies share it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

MILLIS_DIGITS = 13
SCHEMES = ("sha256", "hmac-sha256")
START_EXTRAS = ("owner", "profile", "unpack")  # a start's signed parameters after its filename, in this order


def start_subject(filename: str, extras: Mapping[str, str]) -> str:
    """What a start's X-SIGN covers: its filename, then a `name=value` line for each of START_EXTRAS
    it carries, in that order. No value may hold a newline (inputs refuses control characters), so
    the lines cannot be shifted into one another; with no extra, it is the seed's filename alone."""
    return "\n".join([filename, *(f"{name}={extras[name]}" for name in START_EXTRAS if name in extras)])


def describe_start(extras: Mapping[str, str]) -> str:
    """The subject a start must sign, spelled for error messages and docs."""
    return " + ".join(["filename", *(f'"\\n{name}=" + {name}' for name in START_EXTRAS if name in extras)])


INSTANCES_PATH = "/datalab/instances"


def owner_listing_subject(owner: str) -> str:
    """What `GET /datalab/instances?owner=` signs: the method and path, then the owner."""
    return f"GET {INSTANCES_PATH}\nowner={owner}"


def instance_subject(work: str) -> str:
    """What `GET /datalab/instances/<work>` signs: the method and the path."""
    return f"GET {INSTANCES_PATH}/{work}"


def signature(sign_key: str, ts: str, subject: str, scheme: str = "sha256") -> str:
    """The lowercase hex signature a frontend must send for this request."""
    if scheme == "hmac-sha256":
        return hmac.new(sign_key.encode(), f"{ts}\n{subject}".encode(), hashlib.sha256).hexdigest()
    if scheme == "sha256":
        return hashlib.sha256((sign_key + ts + subject).encode("utf-8")).hexdigest()
    raise ValueError(f"unknown signature scheme {scheme!r}")


def describe(scheme: str, subject: str) -> str:
    """How X-SIGN is made, for error messages."""
    if scheme == "hmac-sha256":
        return f'hex(HMAC-SHA256(sign_key, ts + "\\n" + {subject}))'
    return f"hex(sha256(sign_key + ts + {subject}))"


def signature_ok(sign_key: str, ts: str, subject: str, given: str, scheme: str = "sha256") -> bool:
    """Constant-time comparison, so a timing side channel reveals nothing of the expected value."""
    expected = signature(sign_key, ts, subject, scheme).encode("ascii")
    return hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace"))


def parse_timestamp(ts: str) -> float:
    """Unix seconds from `ts`: up to 10 digits are seconds, exactly 13 are milliseconds."""
    if not ts.isascii() or not ts.isdigit():
        raise ValueError("ts must be a unix timestamp in whole seconds (or 13-digit milliseconds)")
    if len(ts) == MILLIS_DIGITS:
        return int(ts) / 1000
    if len(ts) > 10:
        raise ValueError("ts has too many digits for unix seconds or milliseconds")
    return float(int(ts))


def timestamp_fresh(ts_seconds: float, now: float, max_skew: float) -> bool:
    """A signature is only valid near the time it was made: this bounds how long it can be replayed."""
    return abs(now - ts_seconds) <= max_skew


def replay_window(max_skew: float) -> int:
    """How long to remember a used signature: longer than any ts stays acceptable (2 x skew), even
    to another proxy on the same Redis whose clock differs from the one that saw it first."""
    return int(2 * max_skew) + 2
