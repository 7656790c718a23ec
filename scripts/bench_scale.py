#!/usr/bin/env python3
"""Benchmark: how the proxy's and Redis's costs grow with instances and sessions (issue 19, step 5).

    .venv/bin/python scripts/bench_scale.py [--scales 100,1000,10000] [--sessions-per-instance 10]
                                            [--quick] [--samples 200] [--rounds 3] [--probed 0.1] [--json FILE]

No containers and no proxy process: a redis-server of its own (on a temporary unix socket, as
run.sh's), and in this process the proxy's own code on the fake backend (tests/fake_backend.py's
OnePortBackend: every instance is answered by one stand-in Jupyter on one loopback port, told
apart by its secret). Instances are made by Instances.start (a cold start: capacity slot, boot,
upload, bind), sessions as a view opens them (by_nonce, open_session). At each scale (instances;
sessions-per-instance times as many sessions) it measures:
  round:     a cull-and-reconcile round (Culler.round), median of --rounds; the bench sets every
             instance's last activity first: --probed of them two minutes ago (their Jupyter is
             asked for its kernels and terminals, then whether a session still reaches them), the
             rest now; no round ends anything
  start:     --samples starts one after the other at that scale (median)
  routed:    the router's requestheaders (median), in process (the fake backend is no
             datalab_backend a mitmdump could run): cookie -> session -> instance -> upstream. Cold:
             the route cache cleared, then as many random sessions as it holds (it ends up full, as
             under that many sessions' traffic); warm: --samples of them again
  dropped:   the router dropping an ended instance's routes from that full cache, as on each
             instance's "gone" event (median over --samples instances)
  RSS:       this process's resident memory (the proxy's code and caches, plus the fake engine's
             records and the bench's list of nonces and session ids)
  Redis:     INFO memory's used_memory growth per instance made (its record, slot, nonce, work
             record, activity, refs) and per session made
Prints one column per scale with ratios against the first (the baseline in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

from benchlib import ROOT
from benchlib import rss_bytes

sys.path.insert(0, str(ROOT / "tests"))

from mitmproxy.test import taddons  # noqa: E402

from backends import Limits  # noqa: E402
from culler import Culler  # noqa: E402
from fake_backend import OnePortBackend  # noqa: E402
from helpers import RedisServer  # noqa: E402
from helpers import request_flow  # noqa: E402
from helpers import runtime_for  # noqa: E402
from instances import Order
from marks import ROUTED  # noqa: E402
from router import CACHE_MAX  # noqa: E402
from router import Router  # noqa: E402
from runtime import Runtime  # noqa: E402
from upload import UploadSink  # noqa: E402

CSV = b"a,b\n1,2\n"
BATCH = 256  # starts or sessions in flight at once while filling
IDLE_AGO = 120.0  # seconds since the last activity of a probed instance (past start_timeout, not idle)


@dataclass
class Row:
    """What one scale measured (times in seconds, memory in bytes)."""

    instances: int
    sessions: int
    round: float
    round_per_instance: float
    start: float
    routed_cold: float
    routed_warm: float
    route_drop: float
    rss: int
    redis_per_instance: float
    redis_per_session: float


class Fleet:
    """The instances and sessions made so far, through the proxy's own code."""

    def __init__(self, rt: Runtime, per_instance: int):
        self.rt = rt
        self.per_instance = per_instance
        self.nonces: list[str] = []
        self.sessions: list[str] = []

    async def start(self) -> float:
        t0 = time.perf_counter()
        handed = await self.rt.instances.start(Order("data.csv"), CSV)
        took = time.perf_counter() - t0
        self.nonces.append(handed.nonce)
        return took

    async def open_sessions(self, nonce: str) -> None:
        """As a view does: the instance by its nonce, then a session bound to it."""
        instances = self.rt.instances
        for _ in range(self.per_instance):
            instance = await instances.by_nonce(nonce)
            session = await instances.open_session(instance) if instance else None
            if session is None:
                raise RuntimeError(f"no session for nonce {nonce[:8]}")
            self.sessions.append(session)

    async def grow(self, count: int) -> None:
        for first in range(0, count, BATCH):
            await asyncio.gather(*(self.start() for _ in range(min(BATCH, count - first))))

    async def add_sessions(self, nonces: list[str]) -> None:
        for first in range(0, len(nonces), BATCH):
            await asyncio.gather(*(self.open_sessions(n) for n in nonces[first : first + BATCH]))


async def redis_memory(rt: Runtime) -> int:
    return int((await rt.store.redis.info("memory"))["used_memory"])


async def set_activity(rt: Runtime, probed: float) -> None:
    """Every instance's last activity: `probed` of them IDLE_AGO seconds ago, the rest now."""
    store = rt.store
    ids = sorted(await store.instance_ids())
    now = time.time()
    every = round(1 / probed) if probed > 0 else 0
    stamps = {i: now - IDLE_AGO if every and n % every == 0 else now for n, i in enumerate(ids)}
    await store.redis.zadd(store.key("activity"), stamps, xx=True)


async def timed_rounds(rt: Runtime, rounds: int, probed: float) -> float:
    await set_activity(rt, probed)
    culler = Culler(rt.instances, rt.activity)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ended = await culler.round()
        times.append(time.perf_counter() - t0)
        if ended:
            raise RuntimeError(f"a round ended {ended} instances: the bench's state is not what it measures")
    return statistics.median(times)


async def timed_routes(rt: Runtime, router: Router, sessions: list[str]) -> tuple[float, set[str]]:
    """The median time of the router's requestheaders for these sessions (each must be routed), and
    the instances they reached."""
    cookie = rt.settings.session_cookie
    times, reached = [], set()
    for session in sessions:
        flow = request_flow("GET", "/api/contents/data.csv", {"Cookie": f"{cookie}={session}"})
        t0 = time.perf_counter()
        await router.requestheaders(flow)
        times.append(time.perf_counter() - t0)
        if flow.response is not None or ROUTED not in flow.metadata:
            raise RuntimeError(f"a session was not routed: {flow.response and flow.response.content[:200]!r}")
        reached.add(flow.metadata[ROUTED])
    return statistics.median(times), reached


def timed_drops(router: Router, instance_ids: list[str]) -> float:
    """The median time the router takes to drop an ended instance's routes (on its "gone" event)."""
    times = []
    for instance_id in instance_ids:
        t0 = time.perf_counter()
        router.cache.drop_instance(instance_id)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def measure(rt: Runtime, router: Router, fleet: Fleet, scale: int, args: argparse.Namespace) -> Row:
    before_instances = len(fleet.nonces)
    new_from = before_instances
    timed_starts = min(args.samples, scale - before_instances)
    memory0 = await redis_memory(rt)
    await fleet.grow(scale - before_instances - timed_starts)
    start_times = [await fleet.start() for _ in range(timed_starts)]
    memory1 = await redis_memory(rt)
    sessions_before = len(fleet.sessions)
    await fleet.add_sessions(fleet.nonces[new_from:])
    memory2 = await redis_memory(rt)
    round_time = await timed_rounds(rt, args.rounds, args.probed)
    # Cold: as many sessions as the route cache holds, in random order, so it ends up full as under
    # traffic from that many sessions; warm: some of them again; then some instances end.
    cached = random.sample(fleet.sessions, min(CACHE_MAX, len(fleet.sessions)))
    router.cache.clear()
    cold, reached = await timed_routes(rt, router, cached)
    warm, _ = await timed_routes(rt, router, cached[: args.samples])
    drop = timed_drops(router, sorted(reached)[: args.samples])
    gc.collect()
    made_sessions = len(fleet.sessions) - sessions_before
    return Row(
        instances=len(fleet.nonces),
        sessions=len(fleet.sessions),
        round=round_time,
        round_per_instance=round_time / len(fleet.nonces),
        start=statistics.median(start_times) if start_times else float("nan"),
        routed_cold=cold,
        routed_warm=warm,
        route_drop=drop,
        rss=rss_bytes(os.getpid()),
        redis_per_instance=(memory1 - memory0) / (len(fleet.nonces) - before_instances),
        redis_per_session=(memory2 - memory1) / made_sessions if made_sessions else float("nan"),
    )


# (label, Row field, shown as): what the table prints, one line each
LINES = [
    ("cull-and-reconcile round (ms)", "round", 1e3),
    ("round per instance (µs)", "round_per_instance", 1e6),
    ("start, median (ms)", "start", 1e3),
    ("routed request, cold cache (µs)", "routed_cold", 1e6),
    ("routed request, warm cache (µs)", "routed_warm", 1e6),
    ("an ended instance's routes dropped (µs)", "route_drop", 1e6),
    ("proxy process RSS (MiB)", "rss", 1 / (1 << 20)),
    ("Redis per instance (bytes)", "redis_per_instance", 1),
    ("Redis per session (bytes)", "redis_per_session", 1),
]


def table(rows: list[Row]) -> str:
    """One column per scale; each value with its ratio to the first column's."""
    head = ["metric"] + [f"{r.instances:,} inst / {r.sessions:,} sess" for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for label, name, unit in LINES:
        cells = [label]
        for row in rows:
            value, first = getattr(row, name), getattr(base, name)
            shown = f"{value * unit:,.1f}"
            cells.append(shown if row is base or not first else f"{shown} ({value / first:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace, workdir: Path) -> list[Row]:
    biggest = max(args.scales)
    backend = OnePortBackend(Limits(label_prefix="bench-scale:"), slots=biggest)
    server = RedisServer(workdir, unix_socket=workdir / "redis.sock").start()
    changes = {
        "work_dir": str(workdir / "work"),
        "pool_size": 0,
        "max_instances": biggest + 1,
        "boots_at_once": BATCH,
        "route_cache_ttl": 600,  # warm stays warm between the passes
    }
    rt = runtime_for(server.socket_url, backend=backend, **changes)
    router = Router(rt, UploadSink(rt))
    rows = []
    try:
        with taddons.context(router) as tctx:
            tctx.configure(router)
            fleet = Fleet(rt, args.sessions_per_instance)
            # One instance and its sessions first: Redis's one-time costs (the scripts, the clients'
            # buffers) are not counted as the first scale's per instance or per session.
            await fleet.grow(1)
            await fleet.add_sessions(fleet.nonces)
            for scale in args.scales:
                rows.append(await measure(rt, router, fleet, scale, args))
                print(f"{scale} instances measured", file=sys.stderr)
    finally:
        await rt.done()
        await backend.close()
        server.stop()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="100,1000,10000", help="instance counts, ascending (comma-separated)")
    parser.add_argument("--sessions-per-instance", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="scales 100,1000")
    parser.add_argument("--samples", type=int, default=200, help="starts and routed requests timed per scale")
    parser.add_argument("--rounds", type=int, default=3, help="cull rounds per scale; the median is reported")
    parser.add_argument("--probed", type=float, default=0.1, help="share of instances whose Jupyter a round asks")
    parser.add_argument("--json", type=Path, help="also write the rows there as JSON")
    args = parser.parse_args(argv)
    args.scales = [100, 1000] if args.quick else [int(s) for s in args.scales.split(",")]
    if args.scales != sorted(set(args.scales)) or args.scales[0] < 1:
        parser.error("--scales: positive instance counts, ascending")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as workdir:
        rows = asyncio.run(run(args, Path(workdir)))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"baseline": rows[0].instances, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
