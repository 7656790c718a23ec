"""Signatures: X-SIGN = hex(sha256(sign_key + ts + subject)), the seed API's scheme; the subject is
the filename of a start and the nonce of a stop.

Pure functions, no I/O, so the rules are tested with tables.
"""

from __future__ import annotations

import hashlib
import hmac

MILLIS_DIGITS = 13


def signature(sign_key: str, ts: str, subject: str) -> str:
    """The lowercase hex signature a frontend must send for this request."""
    return hashlib.sha256((sign_key + ts + subject).encode("utf-8")).hexdigest()


def signature_ok(sign_key: str, ts: str, subject: str, given: str) -> bool:
    """Constant-time comparison, so a timing side channel reveals nothing of the expected value."""
    expected = signature(sign_key, ts, subject).encode("ascii")
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
