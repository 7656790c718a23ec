"""HTTP via nginx: GET /small (~100 B) and /1m (1 MiB) with wrk, direct, through plain mitmdump (with
and without streaming), through each of the product's entries and through CHP; and the HTTP rows'
measuring and reporting, which the Jupyter section shares."""

from __future__ import annotations

import statistics
import subprocess

from benchproxy import Skip
from benchproxy.entries import DEFAULT
from benchproxy.entries import ENTRIES
from benchproxy.entries import LEAN1
from benchproxy.entries import LEAN2
from benchproxy.entries import WORKERS2
from benchproxy.entries import proxy_entries
from benchproxy.load import Wrk
from benchproxy.load import wrk
from benchproxy.peers import start_chp
from benchproxy.peers import start_plain_mitmdump
from benchproxy.processes import proxy_cpu
from benchproxy.rig import Entry
from benchproxy.rig import Rig
from benchproxy.rig import Target
from benchproxy.rig import entry

STREAMING = "plain mitmdump, streaming > 256k"


def bench_http(rig: Rig) -> None:
    section = "HTTP via nginx"
    print(f"\n== {section} ==", flush=True)
    upstream = f"http://{rig.nginx.ip}:8888"
    direct = Target("direct", 8888, {}, host=rig.nginx.ip)
    plain = start_plain_mitmdump(rig, upstream)
    # The proxy streams answers over 256 KiB (memory stays flat); plain mitmdump holds them whole,
    # which costs less CPU per byte. This row shows the addon's own cost at equal streaming.
    streaming = start_plain_mitmdump(rig, upstream, STREAMING, "--set", "stream_large_bodies=256k")
    chp = start_chp(rig, upstream)
    targets = [direct, plain, streaming, *proxy_entries(rig, tuple(ENTRIES), rig.nginx), entry("CHP", chp)]
    got = measure_http(rig, section, targets, ["/small", "/1m"], rig.args.seconds)
    for path in ("/small", "/1m"):
        report_http(rig, section, got, path, "direct", None)
        report_http(rig, section, got, path, "plain mitmdump", "direct")
        report_http(rig, section, got, path, STREAMING, "plain mitmdump")
        report_http(rig, section, got, path, DEFAULT, "plain mitmdump", 0.9)
        report_http(rig, section, got, path, DEFAULT, STREAMING, label=f"{DEFAULT} vs streaming mitmdump")
        report_http(rig, section, got, path, LEAN1, "plain mitmdump", 2.0)
        report_http(rig, section, got, path, WORKERS2, DEFAULT, 1.5)
        report_http(rig, section, got, path, LEAN2, LEAN1, 1.5)
        report_http(rig, section, got, path, "CHP", "direct")
        rps = {name: w.rps for (name, p), w in got.items() if p == path and isinstance(w, Wrk)}
        missing = f"{got.get(('CHP', path))}"
        rig.results.chase(section, f"GET {path} req/s", "req/s", best_proxy(got, path), rps, missing)
    for t in (plain, streaming, chp):
        rig.stop_target(t)


def best_proxy(got: dict, path: str) -> str | None:
    """The best measured configuration, preferring the production one (lean, several workers)."""
    for name in (LEAN2, WORKERS2, LEAN1, DEFAULT):
        if isinstance(got.get((name, path)), Wrk):
            return name
    return None


def measure_http(
    rig: Rig,
    section: str,
    targets: list[Entry],
    paths: list[str],
    seconds: float,
    rounds: int | None = None,
) -> dict[tuple[str, str], Wrk | Skip]:
    """wrk on every target and path, --rounds times interleaved; the median of each number."""
    runs: dict[tuple[str, str], list[Wrk]] = {}
    failed: dict[tuple[str, str], Skip] = {}
    live = [t for t in targets if isinstance(t, Target)]
    for rnd in range(rounds or rig.args.rounds):
        for path in paths:
            for t in live:
                if (t.name, path) in failed:
                    continue
                print(f"  wrk {section}: {t.name} {path} (round {rnd + 1})", flush=True)
                try:
                    cpu0 = proxy_cpu(t.worker) if t.worker else 0.0
                    w = wrk(t.url(path), seconds, t.headers)
                    if t.worker and w.requests:
                        w.cpu_ms = (proxy_cpu(t.worker) - cpu0) * 1000 / w.requests
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    failed[(t.name, path)] = Skip(f"failed: {e}")
                    continue
                if w.bad or w.requests == 0:
                    failed[(t.name, path)] = Skip(
                        f"failed: {w.bad} of {w.requests} answers were not 2xx/3xx ({w.errors})"
                    )
                    continue
                runs.setdefault((t.name, path), []).append(w)
    out: dict[tuple[str, str], Wrk | Skip] = {}
    for t in targets:
        name, skip = (t.name, None) if isinstance(t, Target) else t
        for path in paths:
            if skip is not None:
                out[(name, path)] = skip
            elif (name, path) in failed:
                out[(name, path)] = failed[(name, path)]
            else:
                out[(name, path)] = median_wrk(runs[(name, path)])
    return out


def median_wrk(ws: list[Wrk]) -> Wrk:
    """The median of each number over the rounds (their requests summed, their errors listed once)."""
    return Wrk(
        statistics.median(w.rps for w in ws),
        statistics.median(w.p50 for w in ws),
        statistics.median(w.p99 for w in ws),
        sum(w.requests for w in ws),
        0,
        "; ".join(sorted({w.errors for w in ws if w.errors})),
        statistics.median(w.cpu_ms for w in ws) if all(w.cpu_ms for w in ws) else None,
    )


def report_http(
    rig: Rig,
    section: str,
    got: dict[tuple[str, str], Wrk | Skip],
    path: str,
    name: str,
    base: str | None,
    minimum: float | None = None,
    label: str | None = None,
) -> None:
    label = label or name
    shown = rig.path_labels.get(path, path)
    metric = f"GET {shown} req/s"
    w = got.get((name, path))
    if isinstance(w, Skip) or w is None:
        rig.results.skip(section, label, metric, str(w or "not measured"))
        return
    b = got.get((base, path)) if base else None
    note = f"wrk socket errors: {w.errors}" if w.errors else ""
    results = rig.results
    if base and isinstance(b, Wrk):
        results.ratio(section, label, metric, w.rps, "req/s", base, b.rps, minimum, note)
        results.ratio(section, label, f"GET {shown} p50 ms", w.p50, "ms", base, b.p50)
        results.ratio(section, label, f"GET {shown} p99 ms", w.p99, "ms", base, b.p99)
        if w.cpu_ms and b.cpu_ms:  # (lower is better: the inverse of what one core can serve)
            results.ratio(section, label, f"GET {shown} CPU ms/req", w.cpu_ms, "ms", base, b.cpu_ms)
    else:
        why = f"baseline {base}: {b}" if base else ""
        results.ratio(section, label, metric, w.rps, "req/s", "", None, None, "; ".join(filter(None, [note, why])))
        results.ratio(section, label, f"GET {shown} p50 ms", w.p50, "ms", "", None)
        results.ratio(section, label, f"GET {shown} p99 ms", w.p99, "ms", "", None)
