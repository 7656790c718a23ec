#!/usr/bin/env python3
"""Benchmark: what the proxy costs against fast backends, a real Jupyter and other proxies (issue 8).

    .venv/bin/python scripts/bench_proxy.py [--seconds 4] [--rounds 2] [--quick] [--json .state/bench_proxy.json]
    .venv/bin/python scripts/bench_proxy.py --only ws --setup-only   # set up, check the sessions route, clean up

One command, one machine, one run: every number is a ratio against a baseline measured in the same
run, printed as a table (row, metric, value, baseline, ratio, target, met?) and written to --json.
It needs root (nsenter, Docker), the local image datalab-notebook:latest (never pulled), Redis,
nginx and wrk (apt-get installs them when missing), and for the CHP rows node + npm
(configurable-http-proxy@5 is installed once into ~/.cache/datalab/chp). About 11 minutes, half of
it the memory rows' 100k requests and messages at the default entry's few hundred requests/s;
--quick (2 s per measurement, one round, 10k requests/messages, 256 MiB transfers) about 3.

How the proxy reaches a fast backend: the proxy routes only to addresses its Docker backend
vouches for (a container on the network datalab-isolated, port 8888). So the bench starts
"holder" containers there (the local image running `sleep infinity`, labelled as the backend
labels its instances, under the bench's own key prefix), runs host processes inside their network
namespaces with nsenter (the host's nginx, worker_processes 1, in one; scripts/bench_backend.py,
a WebSocket echo and upload sink, in the other), writes their instance records into Redis with
the product's own store (reserve + bind) and opens a real session through /datalab/view/<nonce>/
(the echo backend answers no Jupyter /api/status, so its view answers the waiting page, which sets
the same session cookie as the redirect). Only the holders and tools the --only sections need are
set up; a set-up that fails exits non-zero.
The proxies run with pool_size=0 and long idle/cull intervals, so nothing touches the holders.

Rows (each a real process; load from wrk -t2 -c16 --latency unless said otherwise; every
measurement is repeated --rounds times (--jupyter-rounds for Jupyter's), interleaved across rows,
and the median is reported):

HTTP, GET /small (~100 B) and /1m (1 MiB) from nginx:
  direct                        wrk straight to the nginx holder: the baseline of everything below
  plain mitmdump                `mitmdump --mode reverse:http://IP:8888 --set keep_host_header=true`
                                (default options, stdout to /dev/null, no addon): the proxy rows' baseline
  proxy (run.sh)                the product's default entry, with a live session cookie; >= 0.9x plain
  proxy --lean --workers 1      the lean master, one process; >= 2x plain mitmdump
  proxy --workers 2             two mitmdump processes on one port; >= 1.5x one
  proxy --lean --workers 2      two lean processes; >= 1.5x one lean process
  CHP                           configurable-http-proxy 5 (node), for comparison; the best proxy
                                configuration against it is printed "for the team to chase" (>= 1.0x)
Jupyter end to end (a real instance started by an upload through the proxy), GET /api/status and
  one >= 100 KB static JS asset of Jupyter's (named in the output): direct (with the X-Datalab-Auth
  header the proxy adds), plain mitmdump (same header), the proxy, the proxy --lean --workers 2.
WebSocket (load: the venv's Python websockets client, compression off, no Origin header): round
  trips/s of 64-byte messages over 8 connections, and MB/s of 1 MiB messages echoed over one
  connection (payload counted once): direct, the proxy, the proxy --lean --workers 2, CHP.
Memory (VmRSS of the proxy's own processes, not run.sh's bash), for the default entry and the lean
  one: before and after 100k requests to /small (target: within 10 MB), before and after 100k
  WebSocket messages echoed over 8 connections, measured while they are still open (within
  10 MB), and the peak over the idle value while 1 GiB is downloaded from nginx (curl) and while
  1 GiB is uploaded with Content-Length to the sink (Python client; data generated, not read from
  disk), sampled every 50 ms (growth < 50 MiB).

Rows whose entry run.sh does not offer yet (--lean, --workers) or whose tool is missing print
"skipped: <reason>"; a row that fails prints "failed: <reason>" and the run goes on. Everything
it started (processes, holder containers, the Jupyter instance, Redis keys) is removed at the end,
on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from benchlib import ROOT

from benchproxy import MIB
from benchproxy import STOP
from benchproxy.http_section import bench_http
from benchproxy.jupyter_section import bench_jupyter
from benchproxy.memory_section import bench_memory
from benchproxy.prepare import set_up
from benchproxy.results import print_table
from benchproxy.rig import Rig
from benchproxy.websocket_section import bench_ws

SECTIONS = {"http": bench_http, "jupyter": bench_jupyter, "ws": bench_ws, "memory": bench_memory}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4, help="seconds per wrk or WebSocket measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the median is reported")
    parser.add_argument("--jupyter-rounds", type=int, default=1, help="the same for the Jupyter rows")
    parser.add_argument("--requests", type=int, default=100_000, help="requests and WS messages for the memory rows")
    parser.add_argument("--transfer", type=int, default=1 << 30, help="bytes of the memory rows' download and upload")
    parser.add_argument("--quick", action="store_true", help="2 s, one round, 10k requests/messages, 256 MiB")
    parser.add_argument("--json", type=Path, default=ROOT / ".state" / "bench_proxy.json")
    parser.add_argument("--only", default="http,jupyter,ws,memory", help="sections to run (comma-separated)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="set up for the --only sections (the default entry, their holders, a session on each), check it, clean up",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.jupyter_rounds, args.requests, args.transfer = 2, 1, 1, 10_000, 256 * MIB
    return args


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("run it as root (nsenter into the holder containers, the proxy's firewall rule)")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rig = Rig(args)
    start = time.monotonic()
    interrupted = set_up_done = False
    try:
        set_up(rig)
        set_up_done = True
        for name in [] if args.setup_only else rig.sections:
            t0 = time.monotonic()
            try:
                SECTIONS[name.strip()](rig)
            except (Exception, SystemExit) as e:
                traceback.print_exc()
                rig.results.skip(name, f"section {name}", "-", f"failed: {type(e).__name__}: {e}")
            rig.meta[f"{name.strip()}_section_s"] = round(time.monotonic() - t0)
            print(f"  ({name.strip()}: {time.monotonic() - t0:.0f} s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        STOP.set()
        print("\ninterrupted", flush=True)
    except Exception as e:
        traceback.print_exc()
        rig.results.skip("setup", "setup", "-", f"failed: {type(e).__name__}: {e}")
    finally:
        STOP.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave things behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rig.cleanup()
    elapsed = time.monotonic() - start
    summary(rig)
    rig.write_json(args.json, elapsed)
    print(f"took {elapsed / 60:.1f} min")
    if interrupted:
        sys.exit(130)
    if not set_up_done:
        sys.exit("set-up failed: no row was measured (see above)")
    if args.setup_only:
        print("set-up done: every session routes")


def summary(rig: Rig) -> None:
    """What the load was measured with, then the table."""
    meta = rig.meta
    print(f"\nload: {meta.get('wrk')} {meta.get('wrk_flags')}; WebSocket: {meta.get('websockets_client')}")
    for k in ("nginx", "plain_mitmdump", "chp", "jupyter_asset", "mitmproxy", "machine"):
        if k in meta:
            print(f"{k}: {meta[k]}")
    print_table(rig.results)


if __name__ == "__main__":
    main()
