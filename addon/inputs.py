"""Rules for untrusted path pieces: filenames, nonces, session ids and redirect destinations.

Pure functions that raise ValueError with a sentence a person can act on.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from urllib.parse import quote
from urllib.parse import unquote

MAX_FILENAME_BYTES = 255
TOKEN_BYTES = 24  # 192 random bits, well over the 128 the contract asks
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
# Characters left as they are in a redirect path; everything else is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
# Format characters (Cf) a name may keep: the zero-width (non-)joiners are part of correct spelling
# in Persian and Indic scripts and of emoji sequences; they neither reorder text nor break a line.
_JOINERS = frozenset("\u200c\u200d")


def check_utf8(value: str) -> str:
    """A value decoded from bytes that were not UTF-8 (mitmproxy keeps them as surrogates) is refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 once percent-decoded") from None
    return value


def new_token() -> str:
    """A URL-safe random token for nonces and session ids."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_instance_id() -> str:
    """A token that never starts with '-': an operator gives instance ids on command lines
    (`datalab-admin remove`, `docker ps --filter`, `ls`), where one would read as an option.
    (Older ids may start with one: everything still takes them.)"""
    while (token := new_token()).startswith("-"):
        pass
    return token


def is_token(value: str) -> bool:
    """Cheap shape check, so junk never costs a Redis round trip."""
    return bool(_TOKEN_RE.fullmatch(value))  # not match: its '$' also matches before a final newline


def check_token(value: str) -> str:
    if not is_token(value):
        raise ValueError("a nonce is 22 to 128 URL-safe characters")
    return value


def check_filename(name: str) -> str:
    """A filename must be one plain path component, or the upload could land outside the work dir."""
    if not name:
        raise ValueError("filename is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise ValueError(f"filename is longer than {MAX_FILENAME_BYTES} bytes")
    if name in (".", "..") or ".." in name:
        raise ValueError("filename must not contain '..'")
    if "/" in name or "\\" in name:
        raise ValueError("filename must be a single name, without '/' or '\\'")
    if any(unicodedata.category(c) == "Cc" for c in name):  # C0, DEL and C1
        raise ValueError("filename must not contain NUL or control characters")
    if any(is_disguise(c) for c in name):
        raise ValueError(
            "filename must not contain line or paragraph separators, bidirectional controls "
            "or other invisible format characters"
        )
    return name


_OWNER_RE = re.compile(r"^[A-Za-z0-9._@+:-]{1,128}$")
_PROFILE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_owner(value: str) -> str:
    """An owner is the frontend's opaque id of its user: it names Redis keys and log lines, so it is
    short and of a few plain characters (a frontend with other ids sends a hash of them)."""
    if not _OWNER_RE.fullmatch(value):  # not match: its `$` also matches before a final newline
        raise ValueError("owner is 1 to 128 characters of A-Z a-z 0-9 . _ @ + : -")
    return value


def check_profile_name(value: str) -> str:
    """A profile's name, as the operator's profiles file and a start spell it."""
    if not _PROFILE_RE.fullmatch(value):
        raise ValueError("profile is 1 to 64 characters of a-z 0-9 _ -, starting with a letter or digit")
    return value


ARCHIVE_KINDS = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz"}


def archive_kind(filename: str) -> str:
    """What a start with unpack=1 unpacks, told by the filename's ending (zip, tar or tar.gz)."""
    lower = filename.lower()
    for ending, kind in sorted(ARCHIVE_KINDS.items(), key=lambda e: -len(e[0])):
        if lower.endswith(ending) and len(lower) > len(ending):
            return kind
    raise ValueError(f"unpack=1 takes a filename ending in {', '.join(ARCHIVE_KINDS)}")


def is_disguise(char: str) -> bool:
    """A character that forges a line in a log or a listing (U+2028, U+2029), makes a name read
    otherwise than it is (U+202E shows 'report\u202evsc.exe' as 'reportexe.csv'; U+061C, U+200E/F,
    U+202A-202E, U+2066-2069), or hides in it (U+200B, U+2060, U+FEFF, soft hyphen, tag
    characters): line and paragraph separators (Zl, Zp) and every format character (Cf) but the
    joiners (U+200C, U+200D)."""
    category = unicodedata.category(char)
    return category in ("Zl", "Zp") or (category == "Cf" and char not in _JOINERS)


def shown(text: str) -> str:
    """`text` as one printable line for a log or a listing: itself when every character is
    printable, else a quoted Python literal with the others escaped (names kept before the rule
    above, or any client text)."""
    return text if text.isprintable() else repr(text)


def safe_destination(raw_path: str, raw_query: str = "") -> str:
    """A same-origin path for a redirect, whatever the client put after /datalab/view/<nonce>/.

    The path is decoded once (so encoded slashes count), every leading slash, backslash and blank is
    dropped (so '//host', '/\\host' and 'http://host' all stay on this origin), and the result is
    re-encoded, so no control character or CR/LF reaches the Location header.
    """
    decoded = unquote(raw_path)
    while True:  # repeat: "/%2F%5C/evil" decodes to several kinds of leading separator
        stripped = decoded.lstrip("/\\ \t\r\n")
        if stripped == decoded:
            break
        decoded = stripped
    location = "/" + quote(_wire(decoded), safe=_PATH_SAFE)
    if raw_query:
        location += "?" + quote(_wire(raw_query), safe=_QUERY_SAFE + "%")
    return location


def _wire(text: str) -> bytes:
    """The bytes to percent-encode: UTF-8, with the non-UTF-8 bytes mitmproxy keeps as surrogates
    given back as they came (any other lone surrogate in its own, invalid, UTF-8 form)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def cookie_name_of(set_cookie: str) -> str:
    """The name a browser reads from a Set-Cookie value (it trims blanks around it)."""
    return set_cookie.split(";", 1)[0].split("=", 1)[0].strip()


def secure_cookie(set_cookie: str) -> str:
    """The Set-Cookie value with the Secure attribute, so the cookie never travels over plain HTTP."""
    attributes = [a.strip().lower() for a in set_cookie.split(";")[1:]]
    return set_cookie if "secure" in attributes else set_cookie.rstrip("; ") + "; Secure"
