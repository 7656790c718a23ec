"""Bounded clients, end to end on real mitmdump processes with Redis and Docker: request heads and
upload bodies have deadlines (datalab_header_timeout, datalab_upload_timeout), the bodies arriving
at once are bounded (datalab_uploads_at_once), and 1,000 aborted, refused and stalled uploads leave the
proxy with the file descriptors it had. The clients are raw sockets (rawhttp.py), as no HTTP
library stalls on purpose.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from dataclasses import dataclass

import signing
from e2e.rawhttp import Reply
from e2e.rawhttp import exchange
from e2e.rawhttp import hold_upload
from e2e.rawhttp import parse
from e2e.rawhttp import read_reply
from e2e.rawhttp import start_head
from store import REDIS_CONNECTIONS

TIMEOUT = 2  # seconds: datalab_upload_timeout and datalab_header_timeout of the descriptor test's proxy
WAIT = 30.0  # seconds a client waits for an answer before it counts as none
SLACK = 8  # descriptors the proxy may hold beyond its baseline
ROUNDS = 4
UPLOADS = {"aborted": 85, "refused": 80, "stalled": 85}  # per round: 250 uploads, so 1,000 in all
SLOW_HEADS = 30  # per round, besides: connections whose request head never ends
CONNECTING = 64  # connections opened at once (the proxy's listen backlog is 100)
CSV = b"x,y\n1,2\n"
HEAD_CUT_SHORT = b"POST /datalab/start?ts=1&filename=a.csv HTTP/1.1\r\nHost: 127.0.0.1\r\nX-SIGN: "


@dataclass(frozen=True)
class Descriptors:
    redis: int  # connections to Redis: a pool of at most REDIS_CONNECTIONS, however many clients came
    others: int  # everything else: what clients may cost


def descriptors(pid: int, redis_port: int) -> Descriptors:
    """The proxy process's open descriptors (/proc/<pid>/fd), its Redis connections told apart."""
    to_redis = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == redis_port:
                to_redis.add(fields[9])  # the socket's inode
    redis, others = 0, 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while listing
        if target.startswith("socket:[") and target[8:-1] in to_redis:
            redis += 1
        else:
            others += 1
    return Descriptors(redis, others)


def settled(pid: int, redis_port: int, at_most: int | None = None, within: float = 15.0) -> Descriptors:
    """The descriptors once the count of `others` stops changing (or, given `at_most`, once it is no
    more than that): closing takes the event loop a moment."""
    deadline = time.monotonic() + within
    last = descriptors(pid, redis_port)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = descriptors(pid, redis_port)
        if now.others <= (last.others if at_most is None else at_most):
            return now
        last = now
    return last


async def misbehave(port: int, sign_key: str, kind: str, i: int, connecting: asyncio.Semaphore, held: list):
    """One client of the given kind; returns (kind, the answer it got or None)."""
    async with connecting:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    name = f"{kind}-{i}.csv"
    if kind == "aborted":  # a signed start that hangs up mid-body, half with a FIN, half with a reset
        writer.write(start_head(sign_key, name, 1_000_000) + b"x" * 65536)
        await writer.drain()
        if i % 2:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        return kind, None
    if kind == "refused":  # a whole body with a bad signature: drained, answered; the client leaves
        writer.write(start_head(sign_key, name, 16384, bad_signature=True) + b"x" * 16384)
        reply = await read_reply(reader, until_closed=False, timeout=WAIT)
        writer.close()
        return kind, reply
    if kind == "stalled":  # a start (half signed, half refused) whose body stops coming
        writer.write(start_head(sign_key, name, 1_000_000, bad_signature=bool(i % 2)) + b"x" * 1024)
        kind += "_refused" if i % 2 else ""
    else:  # a request head that never ends
        writer.write(HEAD_CUT_SHORT)
    reply = await read_reply(reader, until_closed=True, timeout=WAIT)
    held.append(writer)  # the client stays: what the proxy still holds then is its own doing
    return kind, reply


async def one_round(port: int, sign_key: str, held: list) -> list[tuple[str, Reply | None]]:
    connecting = asyncio.Semaphore(CONNECTING)
    kinds = [(kind, i) for kind, n in {**UPLOADS, "slow_head": SLOW_HEADS}.items() for i in range(n)]
    return await asyncio.gather(*(misbehave(port, sign_key, k, i, connecting, held) for k, i in kinds))


def test_descriptors_do_not_grow_over_1000_aborted_refused_and_stalled_uploads(make_proxy, world, redis_server):
    prefix = world.sub("bounds")
    p = make_proxy(
        prefix=prefix,
        datalab_upload_timeout=TIMEOUT,
        datalab_header_timeout=TIMEOUT,
        datalab_uploads_at_once=1000,  # every upload takes its own path here; the bound is the next test's
    )
    pid = p.proc.pid
    held: list[asyncio.StreamWriter] = []

    def count(at_most: int | None = None) -> Descriptors:
        return settled(pid, redis_server.port, at_most)

    async def rounds(n: int, at_most: int | None = None) -> tuple[list, Descriptors]:
        outcomes = []
        for _ in range(n):
            outcomes += await one_round(p.port, p.sign_key, held)
        # every stalled client still holds its socket: the proxy must have let go of its own
        holding = await asyncio.to_thread(count, at_most)
        for writer in held:
            writer.close()
        held.clear()
        return outcomes, holding

    before = count()
    asyncio.run(rounds(1))  # one round first, so whatever grows once (a log buffer, a pool) has grown
    baseline = count()
    outcomes, holding = asyncio.run(rounds(ROUNDS, at_most=baseline.others + SLACK))
    after = count(at_most=baseline.others + SLACK)
    print(f"\nproxy descriptors: at start {before}, after a first round {baseline},")
    print(f"after {ROUNDS} more, clients still connected {holding}, clients gone {after}")

    seen: dict[str, list] = {}
    for kind, reply in outcomes:
        got = None if reply is None else (reply.status, reply.code, reply.closed)
        seen.setdefault(kind, []).append(got)
    assert sum(len(seen[k]) for k in ("aborted", "refused", "stalled", "stalled_refused")) == 1000
    assert set(seen["refused"]) == {(403, "BAD_SIGNATURE", False)}, "its body came whole: the connection goes on"
    assert set(seen["stalled"]) == {(408, "UPLOAD_TIMEOUT", True)}, "a stalled body is cut, answered and closed"
    assert set(seen["stalled_refused"]) == {(403, "BAD_SIGNATURE", True)}, "refused at once, then closed"
    assert set(seen["slow_head"]) == {(408, "HEADER_TIMEOUT", True)}, "a head cut short is answered and closed"
    assert holding.others <= baseline.others + SLACK, f"{holding} with the clients still there; before: {baseline}"
    assert after.others <= baseline.others + SLACK, f"{after} once the clients left; before: {baseline}"
    assert max(baseline.redis, holding.redis, after.redis) <= REDIS_CONNECTIONS

    assert world.containers(prefix) == [], "nothing was started"
    left = {k.decode().removeprefix(prefix).partition(":")[0] for k in world.keys(prefix)}
    assert left <= {"signed"}, left  # only the used signatures of the signed starts
    nonce = p.start_instance("after.csv", CSV)  # and the proxy still serves
    assert p.stop_instance(nonce).status_code == 200


def reply_of(s: socket.socket) -> Reply:
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    s.close()
    reply = parse(raw, closed=True)
    assert reply is not None, raw
    return reply


def test_uploads_arriving_at_once_are_bounded(make_proxy, world):
    """Beyond datalab_uploads_at_once, a start is refused at once (before its signature is spent) and a
    refusal is given at once, neither body read nor kept, and the connection closes. A body in
    flight is not cut by the head's deadline, only by its own."""
    prefix = world.sub("narrow")
    p = make_proxy(prefix=prefix, datalab_uploads_at_once=3, datalab_header_timeout=1, datalab_upload_timeout=5)
    held = [hold_upload(p.port, p.sign_key, f"held-{i}.csv", timeout=WAIT) for i in range(3)]

    ts = str(int(time.time() * 1000))
    sign = signing.signature(p.sign_key, ts, "over.csv")
    head = start_head(p.sign_key, "over.csv", 10_000_000, ts=ts)
    over = exchange(p.port, head + b"x" * 65536)  # 64 KiB of 10 MB: the answer comes without the rest
    assert (over.status, over.code, over.closed) == (503, "CAPACITY", True), over
    assert over.headers["retry-after"] == "5" and over.headers["connection"] == "close"
    assert not world.redis.exists(f"{prefix}signed:{sign}"), "the signature is not spent: it may come again"

    refused = exchange(p.port, start_head(p.sign_key, "bad.csv", 10_000_000, bad_signature=True) + b"x" * 65536)
    assert (refused.status, refused.code, refused.closed) == (403, "BAD_SIGNATURE", True), refused

    for s in held:
        reply = reply_of(s)
        assert (reply.status, reply.code) == (408, "UPLOAD_TIMEOUT"), reply  # not cut as a slow head
    assert world.containers(prefix) == []

    deadline = time.monotonic() + WAIT  # the cut bodies gave their places back
    while (r := p.upload("after.csv", CSV)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert p.stop_instance(r.json()["result"]["nonce"]).status_code == 200


def test_a_request_head_must_come_in_time(make_proxy):
    """A head cut short is answered 408 and closed; a kept-alive connection with nothing more to ask
    is closed without a word; neither is left to mitmproxy's idle timeout (600 s)."""
    p = make_proxy(datalab_header_timeout=1)
    cut = exchange(p.port, HEAD_CUT_SHORT)
    assert (cut.status, cut.code, cut.closed) == (408, "HEADER_TIMEOUT", True), cut
    assert "1 s" in cut.body.decode()

    with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
        s.sendall(b"GET /datalab/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw = b""
        while (reply := parse(raw, False)) is None:
            raw += s.recv(65536)
        assert reply.code == "NOT_FOUND"
        rest = raw[raw.index(b"\r\n\r\n") + 4 + len(reply.body) :]
        while chunk := s.recv(65536):
            rest += chunk
        assert rest == b"", "an idle kept-alive connection is closed without an answer"


def test_a_client_that_queues_requests_without_reading_is_held_back(make_proxy):
    """HTTP/1 pipelining: requests sent back to back, answers never read. The proxy reads the next
    request only once it has answered the last, so the client's own TCP window fills and its
    sending stalls, instead of the proxy buffering whatever the client sends. (Before: 240 MB in
    5 s went into the proxy's memory, and it worked through the backlog long after the client left.)"""
    p = make_proxy()
    queued = b"GET /datalab/nothing HTTP/1.1\r\nHost: proxy\r\n\r\n" * 1000
    sent = 0
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.settimeout(5)
        try:
            while sent < 256 << 20:
                s.sendall(queued)
                sent += len(queued)
        except TimeoutError:
            pass
    assert sent < 64 << 20  # what socket buffers hold, not what the client wanted to send
    two = b"GET /datalab/nothing HTTP/1.1\r\nHost: proxy\r\n\r\n" + (
        b"GET /datalab/nothing HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:  # others are served,
        s.sendall(two)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.count(b"HTTP/1.1 404 ") == 2  # and pipelining itself still works, one at a time
