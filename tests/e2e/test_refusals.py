"""Refusals the request head decides, end to end on real mitmdump processes: they are answered at
once, before any body (no 100 Continue first), and they hold none of the places among the arriving
bodies (datalab_uploads_at_once) that signed starts need. The clients are raw sockets (rawhttp.py), as
no HTTP library holds a body back on purpose.
"""

from __future__ import annotations

import asyncio
import json
import socket

import requests

from e2e.rawhttp import Reply
from e2e.rawhttp import parse
from e2e.rawhttp import read_reply
from e2e.rawhttp import start_head

PLACES = 8  # datalab_uploads_at_once of these tests' proxy
WAIT = 10.0  # seconds a client waits for its answer before it counts as none
CSV = b"x,y\n1,2\n"
ROUTED_POST = (
    b"POST /api/contents/notebook.ipynb HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
)


async def hold(port: int, head: bytes, held: list) -> Reply | None:
    """Send a head and one byte of a 100,000-byte body, then nothing more; the answer, read until the
    proxy closes (None if none came within WAIT). The socket stays open: the proxy must let go."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    held.append(writer)
    writer.write(head + b"x")
    await writer.drain()
    return await read_reply(reader, until_closed=True, timeout=WAIT)


async def hostile_then_signed(p) -> tuple[list[Reply | None], requests.Response]:
    """PLACES starts with a bad X-SIGN and PLACES routed POSTs without a session, all at once; then,
    with all of them still connected, a signed start. Their answers, and the start's."""
    starts = [start_head(p.sign_key, f"hostile-{i}.csv", 100_000, bad_signature=True) for i in range(PLACES)]
    held: list[asyncio.StreamWriter] = []
    try:
        replies = await asyncio.gather(*(hold(p.port, head, held) for head in starts + [ROUTED_POST] * PLACES))
        return replies, await asyncio.to_thread(p.upload, "signed.csv", CSV)
    finally:
        for writer in held:
            writer.close()


def test_refused_bodies_hold_no_place_a_signed_start_needs(make_proxy, world):
    """Before: each refused body took a place among datalab_uploads_at_once until it ended or
    datalab_upload_timeout (300 s) passed, so anyone, unsigned, made every start answer 503 CAPACITY."""
    p = make_proxy(prefix=world.sub("refusals"), datalab_uploads_at_once=PLACES)
    replies, r = asyncio.run(hostile_then_signed(p))
    assert r.status_code == 200 and r.json()["code"] == "OK", r.text
    assert p.stop_instance(r.json()["result"]["nonce"]).status_code == 200
    got = [None if reply is None else (reply.status, reply.code, reply.closed) for reply in replies]
    assert got[:PLACES] == [(403, "BAD_SIGNATURE", True)] * PLACES, "answered at once, then closed"
    assert got[PLACES:] == [(403, "NO_SESSION", True)] * PLACES, "answered at once, then closed"


def read_head(s: socket.socket, raw: bytes = b"") -> bytes:
    """Read until a whole answer head is in `raw` (the first one, if several came)."""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        assert chunk, f"closed before an answer head: {raw!r}"
        raw += chunk
    return raw


def read_answer(s: socket.socket, raw: bytes) -> Reply:
    while (reply := parse(raw, False)) is None:
        chunk = s.recv(65536)
        assert chunk, f"closed before a whole answer: {raw!r}"
        raw += chunk
    return reply


def first_answer(port: int, head: bytes) -> Reply:
    """Send a head (with Expect: 100-continue) and no body: the first answer, which must be final."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(head)
        raw = read_head(s)
        assert not raw.startswith(b"HTTP/1.1 100 "), "100 Continue, though the head decides the refusal"
        return read_answer(s, raw)


def test_a_refusal_the_head_decides_comes_before_any_100_continue(make_proxy):
    """RFC 9110 §10.1.1: a server that refuses on the headers answers with the final status, not 100
    Continue (after which curl sends the whole body, 110 MB, before it learns it was refused)."""
    p = make_proxy(datalab_max_upload=1_000_000)
    expect = "Expect: 100-continue\r\n"
    bad = start_head(p.sign_key, "bad.csv", 110_000_000, bad_signature=True, headers=expect)
    large = start_head(p.sign_key, "large.csv", 110_000_000, headers=expect)
    routed = ROUTED_POST.replace(b"\r\n\r\n", f"\r\n{expect}\r\n".encode())
    refusals = ((bad, 403, "BAD_SIGNATURE"), (large, 413, "UPLOAD_TOO_LARGE"), (routed, 403, "NO_SESSION"))
    for head, status, code in refusals:
        reply = first_answer(p.port, head)
        assert (reply.status, reply.code, reply.headers["content-type"]) == (status, code, "application/json")

    # A start the head does not refuse still gets its 100 Continue, and then starts.
    with socket.create_connection(("127.0.0.1", p.port), timeout=60) as s:
        s.sendall(start_head(p.sign_key, "ok.csv", len(CSV), headers=expect))
        raw = read_head(s)
        assert raw.startswith(b"HTTP/1.1 100 "), raw
        s.sendall(CSV)
        reply = read_answer(s, raw)
    assert (reply.status, reply.code) == (200, "OK"), reply
    assert p.stop_instance(json_nonce(reply)).status_code == 200


def json_nonce(reply: Reply) -> str:
    return json.loads(reply.body)["result"]["nonce"]
