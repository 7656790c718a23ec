"""Memory (VmRSS of the proxy's own processes, not run.sh's bash), for the default entry and the lean
one: before and after many requests to /small and many WebSocket messages (measured while their
connections are still open), both within 10 MB, and the peak over the idle value while a big file is
downloaded from nginx (curl) and uploaded with Content-Length to the sink (growth < 50 MiB)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from benchproxy import MIB
from benchproxy import STOP
from benchproxy import Skip
from benchproxy.entries import DEFAULT
from benchproxy.entries import LEAN1
from benchproxy.entries import proxy_target
from benchproxy.load import upload_stream
from benchproxy.load import wrk
from benchproxy.load import ws_echo
from benchproxy.processes import RssSampler
from benchproxy.processes import proxy_cpu
from benchproxy.processes import proxy_rss
from benchproxy.results import FLAT
from benchproxy.results import TRANSFER_GROWTH
from benchproxy.rig import Rig


def bench_memory(rig: Rig) -> None:
    """The proxies' RSS over many requests, WebSocket messages and big transfers. The request and
    message phases run on both entries at once (each proxy's RSS is its own; this halves the
    time), the transfers one after the other (their MB/s are printed too)."""
    section = "Memory (proxy RSS)"
    print(f"\n== {section} ==", flush=True)
    entries = []
    for name in (DEFAULT, LEAN1):
        t = proxy_target(rig, name, rig.nginx)
        if isinstance(t, Skip):
            rig.results.skip(section, name, "memory", str(t))
        else:
            entries.append((name, rig.proxies[name]))
    phases = [(mem_requests, True), (mem_websocket, True), (mem_download, False), (mem_upload, False)]
    idle = {name: proxy_rss(proc) for name, proc in entries}
    out: dict[str, list] = {name: [] for name, _ in entries}
    for phase, together in phases:
        if together:
            with ThreadPoolExecutor(len(entries) or 1) as pool:
                got = list(pool.map(lambda e, f=phase: guarded(rig, f, *e), entries))
        else:
            got = [guarded(rig, phase, *e) for e in entries]
        for (name, _), rows in zip(entries, got, strict=True):
            out[name].append(rows)
    time.sleep(1)
    for name, proc in entries:
        for rows in out[name]:
            for row in rows:
                if isinstance(row, str):
                    rig.results.skip(section, name, "memory", row)
                else:
                    metric, before, after, limit, note = row
                    r = rig.results.memory(section, name, metric, before, after, limit, "before")
                    r.note = note
        end = rig.results.memory(section, name, "RSS at the end", idle[name], proxy_rss(proc), FLAT, "idle")
        end.target, end.met, end.note = "", None, "after all of the above"


def guarded(rig: Rig, phase: Callable, name: str, proc: subprocess.Popen) -> list:
    try:
        return phase(rig, name, proc)
    except Exception as e:
        traceback.print_exc()
        return [f"{phase.__name__} failed: {type(e).__name__}: {e}"]


def mem_requests(rig: Rig, name: str, proc: subprocess.Popen) -> list:
    port, n = rig.proxy_ports[name], rig.args.requests
    time.sleep(1)
    before, done = proxy_rss(proc), 0
    print(f"  {name}: {n:,} requests to /small", flush=True)
    with RssSampler(proc, 0.25) as during:
        while done < n and not STOP.is_set():
            w = wrk(f"http://127.0.0.1:{port}/small", 10, {"Cookie": rig.nginx.cookie})
            if w.bad:
                raise RuntimeError(f"{w.bad} bad answers to /small")
            done += w.requests
    time.sleep(1)
    note = f"during: {during.spread}"
    return [(f"RSS after {done:,} requests", before, proxy_rss(proc), FLAT, note)]


def mem_websocket(rig: Rig, name: str, proc: subprocess.Popen) -> list:
    """n messages echoed over 8 connections, RSS taken while they are still open (the
    flows, and any message history they keep, live as long as the connections)."""
    port, n = rig.proxy_ports[name], rig.args.requests
    time.sleep(1)
    before, held = proxy_rss(proc), {}
    print(f"  {name}: {n:,} WebSocket messages", flush=True)

    def measure_open() -> None:
        time.sleep(1)
        held["open"] = proxy_rss(proc)

    url = f"ws://127.0.0.1:{port}/ws"
    cpu = proxy_cpu(proc)
    count, _ = asyncio.run(ws_echo(url, {"Cookie": rig.echo.cookie}, 8, 64, messages=n, while_open=measure_open))
    cpu = proxy_cpu(proc) - cpu
    time.sleep(1)
    note = f"after closing {proxy_rss(proc) / MIB:.1f} MiB; proxy CPU {cpu:.0f} s"
    return [(f"RSS after {count:,} WS msgs (open)", before, held["open"], FLAT, note)]


def mem_download(rig: Rig, name: str, proc: subprocess.Popen) -> list:
    """A download from nginx's sparse 1 GiB file (a range of it with --transfer)."""
    port, size = rig.proxy_ports[name], rig.args.transfer
    time.sleep(1)
    before = proxy_rss(proc)
    print(f"  {name}: {size / MIB:,.0f} MiB download", flush=True)
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}"]
    cmd += ["-H", f"Cookie: {rig.nginx.cookie}"] + ([f"-r0-{size - 1}"] if size < (1 << 30) else [])
    with RssSampler(proc) as peak:
        got = subprocess.run([*cmd, f"http://127.0.0.1:{port}/1g"], capture_output=True, text=True, timeout=900)
    code, got_bytes, speed = (got.stdout.split() + ["0", "0", "0"])[:3]
    if code not in ("200", "206") or int(got_bytes) != size:
        raise RuntimeError(f"download: {got.stdout} {got.stderr.strip()}")
    note = f"{float(speed) / 1e6:.0f} MB/s (curl); {peak.spread}"
    return [(f"peak RSS, {size / MIB:,.0f} MiB download", before, peak.peak, TRANSFER_GROWTH, note)]


def mem_upload(rig: Rig, name: str, proc: subprocess.Popen) -> list:
    """An upload of generated bytes with Content-Length to the sink, which counts them."""
    port, size = rig.proxy_ports[name], rig.args.transfer
    time.sleep(1)
    before = proxy_rss(proc)
    print(f"  {name}: {size / MIB:,.0f} MiB upload", flush=True)
    with RssSampler(proc) as peak:
        status, body, secs = upload_stream(port, {"Cookie": rig.echo.cookie}, size)
    if status != 200 or body.strip() != str(size).encode():
        raise RuntimeError(f"upload: {status} {body[:200]!r}")
    note = f"{size / secs / 1e6:.0f} MB/s (Python client); {peak.spread}"
    return [(f"peak RSS, {size / MIB:,.0f} MiB upload", before, peak.peak, TRANSFER_GROWTH, note)]
