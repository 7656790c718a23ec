#!/usr/bin/env python3
"""Benchmark: a JupyterLab notebook page loaded in a real browser (headless Chromium), through the
proxy and directly at the instance's own address (as the proxy reaches it), over HTTP/1.1 and over
TLS with HTTP/2.

    .venv/bin/python scripts/bench_page.py [--rounds 3] [--max-conns 100] [--json out.json]

Starts its own redis-server and mitmdump (`mitmdump -q -s addon/datalab.py`, as tests/e2e/proxy.py
does: no run.sh, no image build), one Docker instance with a small notebook, and for each round and
target a fresh Chromium (empty cache, no open connection) that loads /lab/tree/bench.ipynb (first
load), then reloads it (warm reload, the browser's cache kept). Targets:
  direct        the instance's address over HTTP/1.1, with the header the proxy adds (CDP)
  proxy h1      the proxy over plain HTTP/1.1, the session cookie set as a view sets it
  proxy h1 plain  the same, the browser accepting no compression: every byte as before the instance
                gzipped its text (image/datalab_compression.py); the baseline of the bytes and warm
                reload targets
  proxy h2      the proxy over TLS (a throwaway CA, the browser told to ignore it) with HTTP/2
  proxy h2 wide the same through a second mitmdump whose per-address upstream limit (mitmproxy's
                `max_conns`, 5 per client connection) is raised to --max-conns by a scratch addon
                loaded only here: does an HTTP/2 page load queue on the 5?
Ready: the notebook panel shown, a cell rendered and the status bar's kernel status "Idle" (connected:
before the kernel's WebSocket is up it says Connecting or Unknown). Time: the page's own clock
(performance.now() at ready, from its navigation start). Requests and bytes: Chromium's network log
(CDP Network events up to ready; bytes are encodedDataLength, what came over the wire with headers),
of which compressible text (JS, CSS, HTML, JSON, SVG, other text/*). Upstream connections: the most
TCP connections open to the instance's address at once during the load (`ss`, every 20 ms).
Prints medians and ratios to direct measured in the same run (compare ratios, not seconds), and the
Cache-Control of Lab's versioned static assets. Removes its instance, Redis and proxies at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from benchlib import AUTH_HEADER
from benchlib import ROOT
from benchlib import Store
from benchlib import connect
from benchlib import session_cookie
from benchlib import upload

sys.path.insert(0, str(ROOT / "tests"))

from e2e.browser import start_chromium  # noqa: E402
from e2e.proxy import Proxy  # noqa: E402
from e2e.tls import TestCA  # noqa: E402
from helpers import RedisServer  # noqa: E402
from runtime import remove_all_instances  # noqa: E402

NOTEBOOK = "bench.ipynb"
PLAIN = "proxy h1 plain"  # a browser that sends Accept-Encoding: identity (the instance then compresses nothing)
READY_WAIT = 60  # seconds: a load not ready by then is counted as stalled (a first load takes ~5 s here)
TEXT_TYPES = ("javascript", "css", "html", "json", "svg", "xml", "text/")
# Ready: performance.now() once the notebook shows a cell and its kernel is connected and idle.
READY_JS = """
const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => p.offsetParent !== null);
if (!panel || !panel.querySelector('.jp-Cell')) return null;
const bar = document.querySelector('#jp-main-statusbar');
return bar && /\\|\\s*Idle/.test(bar.innerText) ? performance.now() : null;
"""
WIDEN = """\"\"\"Scratch, for scripts/bench_page.py only: mitmproxy's per-address upstream limit raised.\"\"\"
import asyncio, collections
from mitmproxy.proxy import server
_init = server.ConnectionHandler.__init__
def _wide(self, context):
    _init(self, context)
    self.max_conns = collections.defaultdict(lambda: asyncio.Semaphore({n}))
server.ConnectionHandler.__init__ = _wide
"""


@dataclass
class Load:
    """One page load: its time to ready, and what the network log says about it."""

    seconds: float
    requests: int
    wire: int  # bytes over the wire, headers included
    text: int  # of which compressible text answers
    encoded: int  # bodies as sent (compressed or not)
    decoded: int  # bodies once decoded
    cached: int  # requests the browser's cache answered
    protocols: set[str] = field(default_factory=set)
    connections: int = 0  # browser connections used
    upstream: int = 0  # most connections open to the instance's address at once
    cache_control: dict[str, dict[str, str]] = field(default_factory=dict)  # kind: {value: a path}
    disturbed: bool = False  # requests aborted by net::ERR_NETWORK_CHANGED (see load_round)


@dataclass(frozen=True)
class Target:
    name: str
    base: str  # scheme://host:port
    headers: dict[str, str]  # sent on every request (CDP)
    cookie: str | None  # name=value, set for the base before the first load


def notebook() -> bytes:
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": "6 * 7"}
    kernel = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    metadata = {"kernelspec": kernel}  # else Lab asks which kernel to start
    return json.dumps({"cells": [cell], "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}).encode()


class UpstreamCounter:
    """The most TCP connections established to one address at once (of those opened meanwhile), sampled
    every 20 ms."""

    def __init__(self, host: str, port: int):
        self.filter = f"dst {host}:{port}"
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> set[str]:
        out = subprocess.run(["ss", "-Htn", "state", "established", self.filter], capture_output=True, text=True)
        return set(out.stdout.splitlines())

    def _run(self) -> None:
        before = self._open()  # a quit browser's WebSockets may linger upstream a while: not this load's
        while not self._stop.is_set():
            self.most = max(self.most, len(self._open() - before))
            time.sleep(0.02)

    def __enter__(self) -> UpstreamCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_ready(driver) -> float:
    deadline = time.monotonic() + READY_WAIT
    while time.monotonic() < deadline:
        at = driver.execute_script(READY_JS)
        if at is not None:
            return at / 1000
        time.sleep(0.02)
    raise TimeoutError(f"the notebook was not ready in {READY_WAIT} s at {driver.current_url}")


def network_summary(entries: list[dict]) -> dict:
    """Requests, bytes, protocols and Cache-Control from Chromium's performance log (CDP events)."""
    events = [json.loads(e["message"])["message"] for e in entries]
    sent, answers, done, cached, failed = {}, {}, {}, set(), {}
    for event in events:
        kind, params = event["method"], event.get("params", {})
        if kind == "Network.requestWillBeSent" and not params["request"]["url"].startswith("data:"):
            sent[params["requestId"]] = params["request"]["url"]
        elif kind == "Network.responseReceived":
            answers[params["requestId"]] = params["response"]
        elif kind == "Network.loadingFinished":
            done[params["requestId"]] = params["encodedDataLength"]
        elif kind == "Network.loadingFailed":
            done.setdefault(params["requestId"], 0)
            failed[params["requestId"]] = params.get("errorText", "failed")
        elif kind == "Network.requestServedFromCache":
            cached.add(params["requestId"])
    summary = {"requests": len(sent), "wire": 0, "text": 0, "cached": 0, "protocols": set(), "connections": set()}
    summary["cache_control"] = {}
    summary["pending"] = [url for rid, url in sent.items() if rid not in done]  # no answer (yet)
    summary["errors"] = [f"{failed[rid]} {url}" for rid, url in sent.items() if rid in failed]
    summary["errors"] += [f"{a['status']} {a['url']}" for a in answers.values() if a.get("status", 0) >= 400]
    for rid in sent:
        response, wire = answers.get(rid, {}), done.get(rid, 0)
        from_cache = rid in cached or response.get("fromDiskCache") or response.get("fromMemoryCache")
        summary["cached"] += bool(from_cache)
        summary["wire"] += 0 if from_cache else wire
        if not from_cache and any(t in response.get("mimeType", "") for t in TEXT_TYPES):
            summary["text"] += wire
        if response.get("protocol") and not from_cache:
            summary["protocols"].add(response["protocol"])
            summary["connections"].add(response.get("connectionId"))
        url = response.get("url", "")
        if "/static/" in url or "?v=" in url:
            headers = {k.lower(): v for k, v in response.get("headers", {}).items()}
            kind = "versioned (?v=)" if "?v=" in url else "static, unversioned"
            examples = summary["cache_control"].setdefault(kind, {})
            examples.setdefault(headers.get("cache-control", "(none)"), url.split("://", 1)[-1].split("/", 1)[-1])
    return summary


def body_sizes(driver) -> tuple[int, int]:
    """Encoded and decoded body bytes of the page's resources (Resource Timing; no WebSockets)."""
    sizes = driver.execute_script(
        "const e = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')];"
        "return [e.reduce((s, x) => s + x.encodedBodySize, 0), e.reduce((s, x) => s + x.decodedBodySize, 0)];"
    )
    return int(sizes[0]), int(sizes[1])


def measured(driver, go, upstream: tuple[str, int]) -> Load:
    driver.get_log("performance")  # drop what came before
    with UpstreamCounter(*upstream) as counter:
        go()
        try:
            seconds = wait_ready(driver)
        except TimeoutError as e:
            seconds = math.inf  # stalled: counted, and its median shows it when most stall
            status = driver.execute_script("return document.querySelector('#jp-main-statusbar')?.innerText")
            print(f"{e}; status bar: {status!r}", flush=True)
    net = network_summary(driver.get_log("performance"))
    if math.isinf(seconds):
        print("  no answer to: " + ", ".join(url.split("/", 3)[-1][:60] for url in net["pending"]), flush=True)
        print("  errors: " + ", ".join(net["errors"]) + f" ({net['requests']} requests)", flush=True)
    encoded, decoded = body_sizes(driver)
    return Load(
        seconds,
        net["requests"],
        net["wire"],
        net["text"],
        encoded,
        decoded,
        net["cached"],
        net["protocols"],
        len(net["connections"]),
        counter.most,
        net["cache_control"],
        any("ERR_NETWORK_CHANGED" in e for e in net["errors"]),
    )


def load_twice(target: Target, workdir: Path, upstream: tuple[str, int]) -> tuple[Load, Load]:
    """A fresh browser: a first load, then a reload (F5) with its cache."""
    capabilities = {"goog:loggingPrefs": {"performance": "ALL"}}
    # The instance's address besides loopback (the last --host-resolver-rules given is the one used).
    flags = (
        "--ignore-certificate-errors",
        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE {upstream[0]}",
    )
    driver = start_chromium(workdir, flags, capabilities)
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": target.headers})
        if target.cookie:
            name, value = target.cookie.split("=", 1)
            driver.execute_cdp_cmd("Network.setCookie", {"name": name, "value": value, "url": target.base})
        url = f"{target.base}/lab/tree/{NOTEBOOK}"
        first = measured(driver, lambda: driver.get(url), upstream)
        warm = measured(driver, driver.refresh, upstream)
        return first, warm
    finally:
        driver.quit()


def load_round(target: Target, workdir: Path, upstream: tuple[str, int], tries: int = 3) -> tuple[Load, Load]:
    """load_twice, again in a fresh browser when Chromium aborted requests with ERR_NETWORK_CHANGED:
    it does when an interface comes or goes (any container starting or ending on this machine), and
    over HTTP/2 that fails every request in flight on the one connection, so Lab never boots. Not the
    proxy's doing: such a round would measure the machine's churn."""
    for attempt in range(1, tries + 1):
        first, warm = load_twice(target, workdir / str(attempt), upstream)
        if not (first.disturbed or warm.disturbed) or attempt == tries:
            return first, warm
        print(f"  {target.name}: requests aborted by a network change (an interface came or went); again")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def proxies(workdir: Path, max_conns: int) -> Iterator[tuple[RedisServer, Proxy, Proxy, str]]:
    """Redis, the proxy (plain and TLS on one port, as run.sh with DATALAB_TLS_CERT serves) and a wide
    twin on the same Redis and prefix; the key prefix."""
    (workdir / "redis").mkdir()
    redis = RedisServer(workdir / "redis").start()
    prefix, key = f"bench-page-{secrets.token_hex(3)}:", secrets.token_hex(16)
    ca = TestCA(workdir)
    combined = workdir / "tls.pem"
    combined.write_bytes(ca.key_pem + ca.leaf_pem + ca.ca_pem)  # key first, as run.sh writes it
    widen = workdir / "widen.py"
    widen.write_text(WIDEN.format(n=max_conns))
    (workdir / "work").mkdir(mode=0o700)  # the users' saved work: none here, but the option needs a place
    options = {"datalab_pool_size": 0, "datalab_work_dir": workdir / "work"}
    started: list[Proxy] = []
    try:
        for name, extra in (("proxy", []), ("wide", ["-s", str(widen)])):
            (workdir / name).mkdir()
            args = ["-q", "--certs", f"*={combined}", *extra]
            started.append(Proxy(redis.url, prefix, key, workdir / name, options, args=args).start())
        yield redis, started[0], started[1], prefix
    finally:
        for p in started:
            p.stop()
        print(f"removed {asyncio.run(remove_all_instances(redis.url, prefix))} instances")
        redis.stop()


def instance_address(redis_url: str, prefix: str, nonce: str) -> tuple[str, int, str]:
    async def read() -> tuple[str, int, str]:
        store = Store(connect(redis_url), prefix)
        try:
            instance = await store.instance(await store.nonce_target(nonce))
            return instance.host, instance.port, instance.token
        finally:
            await store.close()

    return asyncio.run(read())


def median_load(loads: list[Load]) -> dict:
    def med(name: str) -> float:
        return statistics.median(getattr(x, name) for x in loads)

    done = [x for x in loads if not math.isinf(x.seconds)] or loads
    out = {n: med(n) for n in ("requests", "wire", "text", "encoded", "decoded", "cached", "upstream")}
    out["seconds"] = statistics.median(x.seconds for x in done)  # of the loads that got ready
    out["stalled"] = len(loads) - len(done) if done is not loads else len(loads)
    out |= {"connections": med("connections"), "protocols": sorted(set().union(*(x.protocols for x in loads)))}
    return out


def report(results: dict[str, dict[str, list[Load]]], rounds: int) -> dict:
    table = {}
    print(f"\nmedians of {rounds} rounds; ratio: against direct (HTTP/1.1) in the same run")
    header = f"{'target':<14} {'load':<6} {'ready s':>8} {'ratio':>6} {'reqs':>5} {'cached':>6} {'wire MB':>8}"
    print(header + f" {'text MB':>8} {'decoded MB':>10} {'conns':>5} {'upstream':>8} {'stalled':>7}  protocols")
    for kind in ("first", "warm"):
        base = median_load(results["direct"][kind])["seconds"]
        for name, loads in results.items():
            m = median_load(loads[kind])
            m["ratio"] = m["seconds"] / base
            table[f"{name} {kind}"] = m
            print(
                f"{name:<14} {kind:<6} {m['seconds']:8.2f} {m['ratio']:5.2f}× {m['requests']:5.0f} {m['cached']:6.0f}"
                f" {m['wire'] / 1e6:8.2f} {m['text'] / 1e6:8.2f} {m['decoded'] / 1e6:10.2f} {m['connections']:5.0f}"
                f" {m['upstream']:8.0f} {m['stalled']:7d}  {','.join(m['protocols'])}"
            )
    controls: dict[str, dict[str, str]] = {}
    for loads in results["proxy h1"].values():
        for load in loads:
            for kind, examples in load.cache_control.items():
                controls[kind] = examples | controls.get(kind, {})
    for kind, examples in controls.items():
        for value, path in examples.items():
            print(f"Cache-Control of Lab's {kind} assets: {value} (e.g. /{path[:80]})")
    compressed = {kind: table[f"proxy h1 {kind}"] for kind in ("first", "warm")}
    plain = {kind: table[f"{PLAIN} {kind}"] for kind in ("first", "warm")}
    savings = {
        "first load wire bytes": (compressed["first"]["wire"] / plain["first"]["wire"], 0.4),
        "warm reload time": (compressed["warm"]["seconds"] / plain["warm"]["seconds"], 0.5),
    }
    for name, (ratio, target) in savings.items():
        met = "met" if ratio <= target else "NOT met"
        print(f"proxy h1, gzip vs uncompressed: {name} {ratio:.2f}× (target <= {target}×: {met})")
    return {"rows": table, "cache_control": controls, "gzip_vs_plain": {k: v[0] for k, v in savings.items()}}


def measure(args, tmp: Path, redis: RedisServer, proxy: Proxy, wide: Proxy, prefix: str, nonce: str) -> dict:
    host, port, token = instance_address(redis.url, prefix, nonce)
    cookie = session_cookie(proxy.base, nonce)
    targets = [
        Target("direct", f"http://{host}:{port}", {AUTH_HEADER: token}, None),
        Target("proxy h1", proxy.base, {}, cookie),
        # The same page as before the instance compressed its text: a browser that accepts no gzip.
        Target(PLAIN, proxy.base, {"Accept-Encoding": "identity"}, cookie),
        Target("proxy h2", f"https://127.0.0.1:{proxy.port}", {}, cookie),
        Target("proxy h2 wide", f"https://127.0.0.1:{wide.port}", {}, cookie),
    ]
    load_twice(targets[1], Path(tmp) / "warmup", (host, port))  # the kernel's first boot, not measured
    results: dict[str, dict[str, list[Load]]] = {t.name: {"first": [], "warm": []} for t in targets}
    for r in range(args.rounds):  # interleaved, so drift hits every target alike
        for t in targets:
            first, warm = load_round(t, Path(tmp) / f"{r}-{t.name.replace(' ', '-')}", (host, port))
            results[t.name]["first"].append(first)
            results[t.name]["warm"].append(warm)
            print(f"round {r + 1} {t.name}: first {first.seconds:.2f} s, warm {warm.seconds:.2f} s", flush=True)
    return report(results, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-conns", type=int, default=100, help="the wide twin's per-address upstream limit")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp, proxies(Path(tmp), args.max_conns) as running:
        redis, proxy, wide, prefix = running
        nonce = upload(proxy.base, proxy.sign_key, NOTEBOOK, notebook())
        try:
            table = measure(args, Path(tmp), redis, proxy, wide, prefix, nonce)
        finally:
            proxy.stop_instance(nonce)  # by the proxy, whose options say where its (unused) work store is
        if args.json:
            args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
