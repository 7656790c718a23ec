"""WebSocket echo (the venv's websockets client, compression off, no Origin header): round trips/s of
64-byte messages over 8 connections, and MB/s of 1 MiB messages echoed over one connection (payload
counted once), direct, through the proxy, the proxy --lean --workers 2 and CHP."""

from __future__ import annotations

import asyncio
import statistics

from benchproxy import MIB
from benchproxy.entries import DEFAULT
from benchproxy.entries import LEAN1
from benchproxy.entries import LEAN2
from benchproxy.entries import proxy_entries
from benchproxy.load import ws_echo
from benchproxy.peers import start_chp
from benchproxy.rig import Rig
from benchproxy.rig import Target
from benchproxy.rig import entry

KINDS = {"round trips/s (64 B, 8 conns)": (8, 64), "MB/s (1 MiB msgs, 1 conn)": (1, MIB)}  # metric: conns, size


def bench_ws(rig: Rig) -> None:
    section = "WebSocket echo"
    print(f"\n== {section} ==", flush=True)
    echo = rig.echo
    direct = Target("direct", 8888, {}, host=echo.ip)
    chp = start_chp(rig, f"http://{echo.ip}:8888")
    # (--lean --workers 2: the production lean entry, one worker per CPU here)
    targets = [direct, *proxy_entries(rig, (DEFAULT, LEAN2), echo), entry("CHP", chp)]
    runs: dict[tuple[str, str], list[float]] = {}
    failed: dict[tuple[str, str], str] = {}
    for rnd in range(rig.args.rounds):
        for metric, (conns, size) in KINDS.items():
            for t in targets:
                if not isinstance(t, Target) or (t.name, metric) in failed:
                    continue
                print(f"  ws {t.name} {metric} (round {rnd + 1})", flush=True)
                try:
                    n, secs = asyncio.run(ws_echo(t.url("/ws", "ws"), t.headers, conns, size, rig.args.seconds))
                except Exception as e:
                    failed[(t.name, metric)] = f"failed: {type(e).__name__}: {e}"
                    continue
                rate = n / secs if size == 64 else n * size / secs / 1e6
                runs.setdefault((t.name, metric), []).append(rate)
    for metric in KINDS:
        unit = "rt/s" if "round" in metric else "MB/s"
        values = {}
        for t in targets:
            name = t.name if isinstance(t, Target) else t[0]
            if not isinstance(t, Target):
                rig.results.skip(section, name, metric, str(t[1]))
            elif (name, metric) in failed:
                rig.results.skip(section, name, metric, failed[(name, metric)])
            else:
                values[name] = statistics.median(runs[(name, metric)])
                base = "direct" if name != "direct" else ""
                rig.results.ratio(section, name, metric, values[name], unit, base, values.get(base))
        best = next((n for n in (LEAN2, LEAN1, DEFAULT) if n in values), None)
        rig.results.chase(section, metric, unit, best, values, "CHP or every proxy row missing")
    rig.stop_target(chp)
