#!/usr/bin/env python3
"""Benchmark: what the user's work costs (issue 17).

    .venv/bin/python scripts/bench_work.py [--stop-mib 100] [--stream-mib 500] [--rounds 3]

Starts its own proxy with ./run.sh (instances of 2g, so the working directory holds 800 MiB) and:
  stop:   the time POST /datalab/stop takes with --stop-mib MiB of (incompressible) work in the
          instance, which it saves before removing the container, against a stop with an empty
          working directory in the same run (medians of --rounds, interleaved);
  stream: the proxy's peak resident memory while a --stream-mib MiB work streams to the frontend, as
          a live snapshot (from the instance, through the proxy), into the work store (the stop that
          saves it) and as the saved archive (from the work store, through the proxy), against its
          resident memory just before each.
Work is written into the instance through Jupyter's contents API, through the proxy, in 4 MiB chunks.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import statistics
import threading
import time
import urllib.request

from benchlib import bench_proxy
from benchlib import group_pids
from benchlib import rss_bytes
from benchlib import session_cookie
from benchlib import stop
from benchlib import try_upload

MIB = 1 << 20
CHUNK = 4 * MIB


def start(base: str, key: str) -> tuple[str, str]:
    status, body, _ = try_upload(base, key, "seed.csv", b"a\n")
    if status != 200:
        raise RuntimeError(f"start refused: {status} {body}")
    return body["result"]["nonce"], body["result"]["work"]


def fill(base: str, nonce: str, mib: int) -> None:
    """Write `mib` MiB of random bytes as big.bin through the proxy (Jupyter's chunked contents PUT)."""
    xsrf = secrets.token_hex(16)
    headers = {
        "Cookie": f"{session_cookie(base, nonce)}; _xsrf={xsrf}",
        "X-XSRFToken": xsrf,
        "Content-Type": "application/json",
    }
    pieces = mib * MIB // CHUNK
    for number in range(1, pieces + 1):
        model = {"type": "file", "format": "base64", "content": base64.b64encode(os.urandom(CHUNK)).decode()}
        model["chunk"] = -1 if number == pieces else number
        req = urllib.request.Request(
            f"{base}/api/contents/big.bin", data=json.dumps(model).encode(), headers=headers, method="PUT"
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()


def timed_stop(base: str, key: str, nonce: str) -> float:
    t0 = time.perf_counter()
    stop(base, key, nonce)
    return time.perf_counter() - t0


def fetch_work(base: str, key: str, work: str) -> tuple[int, str]:
    """GET the work, reading it in 1 MiB pieces: its size and sha256."""
    ts = str(int(time.time() * 1000))
    sign = hashlib.sha256((key + ts + work).encode()).hexdigest()
    req = urllib.request.Request(f"{base}/datalab/work/{work}?ts={ts}", headers={"X-SIGN": sign})
    digest, size = hashlib.sha256(), 0
    with urllib.request.urlopen(req, timeout=600) as r:
        while piece := r.read(MIB):
            size += len(piece)
            digest.update(piece)
    return size, digest.hexdigest()


def peak_rss_while(pids: list[int], work) -> tuple[float, float, object]:
    """Resident memory (MiB, all proxy processes) before `work` runs and at its peak while it runs."""
    before = sum(rss_bytes(p) for p in pids) / MIB
    peak, done = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(rss_bytes(p) for p in pids) / MIB)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return before, peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-mib", type=int, default=100)
    parser.add_argument("--stream-mib", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    options = {"mem_limit": "2g", "work_timeout": 300, "pool_size": 0, "max_upload": 1 << 20}
    with bench_proxy(**options) as proxy:
        base, key = proxy.base, proxy.key
        empty, full = [], []
        for _ in range(args.rounds):
            nonce, _ = start(base, key)
            empty.append(timed_stop(base, key, nonce))
            nonce, _ = start(base, key)
            fill(base, nonce, args.stop_mib)
            full.append(timed_stop(base, key, nonce))
        e, f = statistics.median(empty), statistics.median(full)
        print(f"stop, empty working directory      median {e:6.2f} s over {args.rounds}")
        print(f"stop, {args.stop_mib:4d} MiB of work saved       median {f:6.2f} s | ratio to empty {f / e:5.2f}")

        pids = [p for p in group_pids(proxy.proc.pid) if b"mitmdump" in open(f"/proc/{p}/cmdline", "rb").read()]
        nonce, work = start(base, key)
        fill(base, nonce, args.stream_mib)
        before, peak, (size, _) = peak_rss_while(pids, lambda: fetch_work(base, key, work))
        print(
            f"live snapshot of {args.stream_mib} MiB ({size / MIB:6.1f} MiB gz) streamed: proxy RSS {before:6.1f} MiB "
            f"-> peak {peak:6.1f} MiB (+{peak - before:5.1f} MiB; target <= +50)"
        )
        before, peak, took = peak_rss_while(pids, lambda: timed_stop(base, key, nonce))
        print(
            f"stop saving {args.stream_mib} MiB of work took {took:6.2f} s: proxy RSS {before:6.1f} MiB "
            f"-> peak {peak:6.1f} MiB (+{peak - before:5.1f} MiB)"
        )
        before, peak, (size, _) = peak_rss_while(pids, lambda: fetch_work(base, key, work))
        print(
            f"saved archive of {args.stream_mib} MiB ({size / MIB:6.1f} MiB gz) streamed: proxy RSS {before:6.1f} MiB "
            f"-> peak {peak:6.1f} MiB (+{peak - before:5.1f} MiB; target <= +50)"
        )


if __name__ == "__main__":
    main()
