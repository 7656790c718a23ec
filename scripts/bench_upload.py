#!/usr/bin/env python3
"""Benchmark: what an upload costs the proxy in memory and time.

    .venv/bin/python scripts/bench_upload.py [--mib 400]

Starts its own proxy with ./run.sh and sends, chunked (so nothing is known up front):
  refused:  a --mib MiB upload with a bad signature (drained through the upload sink, nothing kept)
  accepted: a 50 MiB upload (kept once, up to datalab_max_upload, then copied into the container)
  no session: a --mib MiB body to a proxied path without a cookie (refused by the router, drained)
  routed:   a --mib MiB body to the instance with a session cookie (streamed through, not held)
Prints the proxy's resident memory after each, as a ratio of its idle size measured in the same run,
and the refused upload's throughput against the accepted one's.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.parse
import urllib.request

from benchlib import bench_proxy
from benchlib import rss_bytes
from benchlib import session_cookie
from benchlib import upload

MIB = 1 << 20


def chunks(total_mib: int):
    block = b"x" * MIB
    for _ in range(total_mib):
        yield block


def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / MIB


def post_chunks(url: str, mib: int, headers: dict[str, str]) -> int:
    """POST --mib MiB chunked; the answer's status (the body is read and dropped)."""
    req = urllib.request.Request(url, data=chunks(mib), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def refused(base: str, mib: int) -> float:
    query = urllib.parse.urlencode({"ts": str(int(time.time())), "filename": "big.bin"})
    req = urllib.request.Request(
        f"{base}/datalab/start?{query}", data=chunks(mib), headers={"X-SIGN": "0" * 64}, method="POST"
    )
    t0 = time.perf_counter()
    try:
        urllib.request.urlopen(req, timeout=600)
        raise SystemExit("a bad signature was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=400)
    args = parser.parse_args()
    with bench_proxy() as proxy:
        time.sleep(1)
        idle = rss_mib(proxy.proc.pid)
        t_refused = refused(proxy.base, args.mib)
        after_refused = rss_mib(proxy.proc.pid)
        t0 = time.perf_counter()
        upload(proxy.base, proxy.key, "accepted.bin", chunks(50))
        t_accepted = time.perf_counter() - t0
        after_accepted = rss_mib(proxy.proc.pid)
        print(f"idle proxy                  {idle:7.1f} MiB")
        ratio = after_refused / idle
        print(f"after refused {args.mib:4d} MiB upload {after_refused:7.1f} MiB | ratio to idle {ratio:5.2f}")
        print(f"after accepted  50 MiB upload {after_accepted:7.1f} MiB | ratio to idle {after_accepted / idle:5.2f}")
        nonce = upload(proxy.base, proxy.key, "routed.csv")
        status = post_chunks(f"{proxy.base}/api/contents/nothing", args.mib, {})
        after_no_session = rss_mib(proxy.proc.pid)
        assert status == 403, status
        cookie = session_cookie(proxy.base, nonce)
        status = post_chunks(f"{proxy.base}/api/nothing", args.mib, {"Cookie": cookie})
        after_routed = rss_mib(proxy.proc.pid)
        print(
            f"after {args.mib} MiB without a session (403)  {after_no_session:7.1f} MiB | ratio to idle "
            f"{after_no_session / idle:5.2f}"
        )
        print(
            f"after {args.mib} MiB routed (instance: {status})  {after_routed:7.1f} MiB | ratio to idle "
            f"{after_routed / idle:5.2f}"
        )
        print(f"refused upload drained at {args.mib / t_refused:7.1f} MiB/s")
        print(f"accepted upload (incl. container start) {t_accepted:5.2f} s")


if __name__ == "__main__":
    main()
