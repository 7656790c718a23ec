"""Clients that misbehave on purpose: a request head cut short, a body that stalls or is abandoned.

HTTP libraries send whole requests; these write raw bytes to a socket and read whatever answer
comes, noting whether the proxy then closed the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import signing


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    closed: bool  # the proxy closed the connection after the answer

    @property
    def code(self) -> str | None:
        try:
            return json.loads(self.body).get("code")
        except ValueError:
            return None


def start_head(
    sign_key: str, filename: str, length: int, bad_signature: bool = False, headers: str = "", ts: str | None = None
) -> bytes:
    """The head of a start with a body of `length` bytes (signed with `ts`, or a fresh millisecond one)."""
    ts = ts or str(int(time.time() * 1000))
    sign = "0" * 64 if bad_signature else signing.signature(sign_key, ts, filename)
    query = urlencode({"ts": ts, "filename": filename})
    return (
        f"POST /datalab/start?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-SIGN: {sign}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n{headers}\r\n"
    ).encode()


def hold_upload(port: int, sign_key: str, name: str, timeout: float = 30.0):
    """A signed start (with a body of 1 MB) whose head the proxy has taken, as its 100 Continue says,
    and whose body stalls after 1 KiB; the open socket. (A refused start gets no 100 Continue.)"""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(start_head(sign_key, name, 1_000_000, headers="Expect: 100-continue\r\n"))
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(4096)
        assert chunk, raw
        raw += chunk
    assert raw.startswith(b"HTTP/1.1 100"), raw
    s.sendall(b"x" * 1024)
    return s


def parse(raw: bytes, closed: bool) -> Reply | None:
    """The first answer in `raw` (skipping 100 Continue), or None while it is incomplete."""
    while True:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            raw = rest
            continue
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return None
        return Reply(status, headers, rest[:length], closed)


def exchange(port: int, data: bytes, timeout: float = 30.0) -> Reply:
    """Send `data` and read until the proxy closes the connection (or `timeout`); the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        raw, closed = b"", False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            raw += chunk
    reply = parse(raw, closed)
    if reply is None:
        raise AssertionError(f"no whole answer within {timeout} s: {raw[:300]!r} (closed: {closed})")
    return reply


async def read_reply(reader: asyncio.StreamReader, until_closed: bool, timeout: float) -> Reply | None:
    """Read one answer; with `until_closed`, go on until the proxy closes (None if nothing whole came)."""
    raw, closed = b"", False
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                raw += chunk
                if not until_closed and parse(raw, False) is not None:
                    break
    except (TimeoutError, ConnectionError):
        pass
    return parse(raw, closed)
