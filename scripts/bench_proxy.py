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
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from benchlib import AUTH_HEADER
from benchlib import REDIS_URL
from benchlib import ROOT
from benchlib import Settings
from benchlib import Store
from benchlib import build_instances
from benchlib import connect
from benchlib import free_port
from benchlib import group_pids
from benchlib import new_token
from benchlib import remove_all
from benchlib import rss_bytes
from benchlib import run_sh_offers
from benchlib import session_cookie
from benchlib import start_proxy_group
from benchlib import stop_group
from benchlib import upload
from benchlib import wait_port

from backends import Instance  # noqa: E402  (the addon's modules are on the path through benchlib)
from backends.container_spec import JUPYTER_PORT  # noqa: E402
from backends.container_spec import LABEL_INSTANCE  # noqa: E402
from backends.container_spec import LABEL_MANAGED  # noqa: E402
from backends.container_spec import LABEL_PREFIX  # noqa: E402
from backends.container_spec import MANAGED_BY  # noqa: E402

IMAGE = os.environ.get("DATALAB_IMAGE", "datalab-notebook:latest")
CHP_DIR = Path.home() / ".cache" / "datalab" / "chp"
CHP_BIN = CHP_DIR / "node_modules" / ".bin" / "configurable-http-proxy"
MIB = 1 << 20
SMALL_BODY = "datalab bench: a small answer of about one hundred bytes, served by nginx for the request rows.\n"
FLAT = 10_000_000  # bytes: "flat" over 100k requests or messages
TRANSFER_GROWTH = 50 * MIB  # bytes: most a 1 GiB transfer may add
PROXY_OPTIONS = {"pool_size": 0, "idle_timeout": 86400, "cull_interval": 3600, "max_age": 86400}

# The product's entries: name, run.sh flags, the run.sh option each needs.
DEFAULT = "proxy (run.sh)"
STREAMING = "plain mitmdump, streaming > 256k"
LEAN1 = "proxy --lean --workers 1"
WORKERS2 = "proxy --workers 2"
LEAN2 = "proxy --lean --workers 2"
ENTRIES = {
    DEFAULT: ((), ()),
    LEAN1: (("--lean", "--workers", "1"), ("--lean", "--workers")),
    WORKERS2: (("--workers", "2"), ("--workers",)),
    LEAN2: (("--lean", "--workers", "2"), ("--lean", "--workers")),
}


# What each section measures through: its holders (nginx, the echo backend) and load tools.
HOLDERS = {"http": ("nginx",), "jupyter": (), "ws": ("echo",), "memory": ("nginx", "echo")}
TOOLS = {"http": ("wrk", "nginx"), "jupyter": ("wrk",), "ws": (), "memory": ("wrk", "nginx", "curl")}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


STOP = threading.Event()  # set on Ctrl-C / SIGTERM: load loops in worker threads end early


class Skip(Exception):
    """A row that cannot be measured here, and why."""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    section: str
    row: str
    metric: str
    value: float | None = None
    unit: str = ""
    baseline_row: str = ""
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    skipped: str = ""
    shown: dict = field(default_factory=dict)  # how the table prints value, baseline and ratio


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print("  " + " | ".join(format_row(row)), flush=True)
        return row

    def skip(self, section: str, row: str, metric: str, reason: str) -> None:
        self.add(Row(section, row, metric, skipped=reason))

    def ratio(
        self,
        section: str,
        row: str,
        metric: str,
        value: float | None,
        unit: str,
        base_row: str,
        base: float | None,
        minimum: float | None = None,
        note: str = "",
    ) -> Row:
        ratio = value / base if value is not None and base else None
        met = None if minimum is None or ratio is None else ratio >= minimum
        target = f">= {minimum:g}x" if minimum is not None else ""
        return self.add(Row(section, row, metric, value, unit, base_row, base, ratio, target, met, note))

    def memory(self, section: str, row: str, metric: str, before: int, after: int, limit: int, label: str) -> Row:
        delta = after - before
        shown = {"ratio": f"Δ {delta / MIB:+.1f} MiB"}
        target = f"Δ <= {limit / 1e6:g} MB" if limit == FLAT else f"Δ < {limit / MIB:g} MiB"
        return self.add(
            Row(
                section,
                row,
                metric,
                after / MIB,
                "MiB",
                label,
                before / MIB,
                after / before if before else None,
                target,
                delta <= limit if limit == FLAT else delta < limit,
                "",
                shown=shown,
            )
        )


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def format_row(r: Row) -> list[str]:
    if r.skipped:
        return [r.row, r.metric, r.skipped, "", "", r.target, ""]
    base = fmt(r.baseline, r.unit) + (f" ({r.baseline_row})" if r.baseline_row else "") if r.baseline_row else ""
    ratio = r.shown.get("ratio") or (f"{r.ratio:.3g}x" if r.ratio is not None else "")
    met = "" if r.met is None else ("yes" if r.met else "NO")
    return [r.row, r.metric, fmt(r.value, r.unit), base, ratio, r.target, met]


def print_table(results: Results) -> None:
    head = ["row", "metric", "value", "baseline", "ratio", "target", "met?"]
    by_section: dict[str, list[list[str]]] = {}
    for r in results.rows:
        by_section.setdefault(r.section, []).append(format_row(r))
    cells = [head] + [c for rows in by_section.values() for c in rows]
    widths = [min(60, max(len(c[i]) for c in cells)) for i in range(len(head))]

    def line(c: list[str]) -> str:
        return "  ".join(s[:60].ljust(w) for s, w in zip(c, widths, strict=True)).rstrip()

    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for section, rows in by_section.items():
        print(f"[{section}]")
        for c in rows:
            print(line(c))
    print("ratio = value / baseline (for latencies lower is better; for memory the growth is shown)")
    notes = [r for r in results.rows if r.note and not r.skipped]
    if notes:
        print("\nnotes:")
        for r in notes:
            print(f"  {r.row} / {r.metric}: {r.note}")


# ---------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Everything started here, each in a process group of its own, stopped in reverse order."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def spawn(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child holds it)
        try:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
            )
        finally:
            log.close()
        self.started.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop_group(proc)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def proxy_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds the proxy's processes have used (shows the processes measured are the ones working)."""
    total = 0
    for pid in group_pids(proc.pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def proxy_rss(proc: subprocess.Popen) -> int:
    """The proxy's own memory: every process of its group but run.sh's shells."""
    return sum(rss_bytes(pid) for pid in group_pids(proc.pid))


class RssSampler:
    """The highest RSS of a process group, sampled every 50 ms while the block runs."""

    def __init__(self, proc: subprocess.Popen, every: float = 0.05):
        self.proc, self.every, self.peak, self.low, self.samples = proc, every, 0, 1 << 62, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proxy_rss(self.proc)
            self.peak, self.low, self.samples = max(self.peak, rss), min(self.low, rss), self.samples + 1
            self._stop.wait(self.every)

    @property
    def spread(self) -> str:
        return f"{self.samples} samples, {self.low / MIB:.1f}-{self.peak / MIB:.1f} MiB; proxy CPU {self.cpu:.0f} s"

    def __enter__(self) -> RssSampler:
        self.cpu = proxy_cpu(self.proc)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proxy_rss(self.proc))
        self.cpu = proxy_cpu(self.proc) - self.cpu


# ---------------------------------------------------------------------------------------------
# Load generators


def tool_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Wrk:
    rps: float
    p50: float  # ms
    p99: float
    requests: int
    bad: int  # non-2xx/3xx answers
    errors: str
    cpu_ms: float | None = None  # the proxy's CPU per request (steadier than req/s on a shared machine)


def wrk(url: str, seconds: float, headers: dict[str, str], conns: int = 16, threads: int = 2) -> Wrk:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
        p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
        requests = int(re.search(r"(\d+) requests in", out).group(1))
    except (AttributeError, ValueError) as e:
        raise RuntimeError(f"wrk gave no numbers ({e}): {out.strip()[-300:]} {done.stderr.strip()[-300:]}") from e
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return Wrk(rps, p50, p99, requests, int(bad.group(1)) if bad else 0, errors.group(1) if errors else "")


async def ws_echo(
    url: str,
    headers: dict[str, str],
    conns: int,
    size: int,
    seconds: float | None = None,
    messages: int | None = None,
    while_open: Callable[[], None] | None = None,
) -> tuple[int, float]:
    """`conns` connections each sending `size`-byte binary messages and waiting for each echo, for
    `seconds` or until `messages` round trips in all; (round trips, elapsed). `while_open` runs
    (in a thread) once all are done but before any connection closes."""
    from websockets.asyncio.client import connect as ws_connect

    payload = secrets.token_bytes(size)
    count, done = 0, 0
    all_done, release = asyncio.Event(), asyncio.Event()
    opened = []
    for _ in range(conns):
        opened.append(
            await ws_connect(
                url, additional_headers=headers, compression=None, max_size=None, ping_interval=None, open_timeout=20
            )
        )
    start = time.perf_counter()
    deadline = start + seconds if seconds else float("inf")

    async def one(ws) -> None:
        nonlocal count, done
        try:
            while time.perf_counter() < deadline and (messages is None or count < messages) and not STOP.is_set():
                await ws.send(payload)
                echoed = await ws.recv()
                if len(echoed) != size:
                    raise RuntimeError(f"echo of {len(echoed)} bytes, not {size}")
                count += 1
        finally:
            done += 1
            if done == conns:
                all_done.set()
        await release.wait()

    tasks = [asyncio.create_task(one(ws)) for ws in opened]
    try:
        await all_done.wait()
        elapsed = time.perf_counter() - start
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
        if while_open is not None:
            await asyncio.to_thread(while_open)
        release.set()
        await asyncio.gather(*tasks)
    finally:
        release.set()
        for t in tasks:
            t.cancel()
        for ws in opened:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
    return count, elapsed


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 20) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def upload_stream(port: int, headers: dict[str, str], total: int, chunk: int = MIB) -> tuple[int, bytes, float]:
    """POST `total` generated bytes to /upload with Content-Length; (status, body, seconds)."""
    block = secrets.token_bytes(chunk)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        head = f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {total}\r\n"
        head += "Content-Type: application/octet-stream\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        s.sendall(head.encode())
        left = total
        view = memoryview(block)
        while left:
            n = min(left, chunk)
            s.sendall(view[:n])
            left -= n
        raw = b""
        while b"\r\n\r\n" not in raw:
            piece = s.recv(65536)
            if not piece:
                break
            raw += piece
        head_raw, _, body = raw.partition(b"\r\n\r\n")
        status = int(head_raw.split(b" ")[1]) if head_raw.startswith(b"HTTP/") else 0
        length = re.search(rb"(?i)content-length:\s*(\d+)", head_raw)
        while length and len(body) < int(length.group(1)):
            piece = s.recv(65536)
            if not piece:
                break
            body += piece
    return status, body, time.perf_counter() - start


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# The bench


@dataclass
class Holder:
    instance_id: str
    container: str
    pid: int
    ip: str
    cookie: str = ""
    role: str = ""


@dataclass
class Target:
    """Somewhere a load generator can be pointed: host:port plus the headers a client there sends."""

    name: str
    port: int
    headers: dict[str, str]
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None  # a process started for this target alone (stopped after its section)
    cpu_of: subprocess.Popen | None = None  # the process (group) doing the proxying, for CPU per request

    @property
    def worker(self) -> subprocess.Popen | None:
        return self.cpu_of or self.proc

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="datalab-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx's workers run as nobody
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.procs = Processes(self.logs)
        self.results = Results()
        self.key = secrets.token_hex(16)
        self.prefix = f"bench-{secrets.token_hex(3)}:"
        self.containers: list[str] = []
        self.proxies: dict[str, subprocess.Popen | Skip] = {}
        self.proxy_ports: dict[str, int] = {}
        self.meta: dict[str, object] = {}
        self.nginx: Holder | None = None
        self.echo: Holder | None = None
        self.path_labels: dict[str, str] = {}  # long paths shown by a short name in the table

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def sections(self) -> list[str]:
        return [name.strip() for name in self.args.only.split(",") if name.strip()]

    def needed(self, table: dict[str, tuple[str, ...]]) -> set[str]:
        """What the sections asked for need (an unknown section needs nothing: it fails by itself)."""
        return {what for name in self.sections for what in table.get(name, ())}

    def prepare_tools(self) -> None:
        missing = sorted(tool for tool in self.needed(TOOLS) if not shutil.which(tool, path=PATH))  # package = tool
        if missing:
            print(f"installing {' '.join(missing)} with apt-get", flush=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, stdout=subprocess.DEVNULL)
        if not shutil.which("nsenter", path=PATH):
            sys.exit("nsenter (util-linux) is missing")
        if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
            sys.exit(
                f"the image {IMAGE} is not in the local engine (never pulled: build it with scripts/build-image.sh)"
            )
        import mitmproxy.version
        import websockets

        nginx = shutil.which("nginx", path=PATH)
        self.meta.update(
            machine=f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}",
            wrk=tool_version(["wrk", "-v"]),
            wrk_flags="-t2 -c16 --latency --timeout 10s -d<seconds>",
            nginx=tool_version([nginx, "-v"]) + " (worker_processes 1, access_log off)" if nginx else "missing",
            mitmproxy=mitmproxy.version.VERSION,
            websockets_client=f"websockets {websockets.__version__} (Python {sys.version.split()[0]})",
            node=tool_version(["node", "--version"]) if shutil.which("node") else "missing",
            seconds=self.args.seconds,
            rounds=self.args.rounds,
            jupyter_rounds=self.args.jupyter_rounds,
            quick=self.args.quick,
        )

    def start_default_proxy(self) -> None:
        """The default entry first: its Docker backend makes sure the instance network exists."""
        self.start_entry(DEFAULT)
        if isinstance(self.proxies[DEFAULT], Skip):
            raise RuntimeError(f"the default proxy did not start: {self.proxies[DEFAULT]}")

    def start_entry(self, name: str) -> None:
        flags, needs = ENTRIES[name]
        absent = [f for f in needs if not run_sh_offers(f)]
        if absent:
            self.proxies[name] = Skip(f"run.sh has no {' / '.join(absent)} yet")
            return
        port = free_port()
        log = self.logs / f"proxy-{slug(name)}.log"
        print(f"starting {name} on 127.0.0.1:{port}: ./run.sh {' '.join(flags)} -q ...", flush=True)
        try:
            proc = start_proxy_group(port, self.key, self.prefix, PROXY_OPTIONS, flags, log)
        except (RuntimeError, SystemExit) as e:
            self.proxies[name] = Skip(f"failed to start: {e}; {log_tail(log, 3)}")
            print(f"  {self.proxies[name]}", flush=True)
            return
        self.procs.adopt(proc)
        self.proxies[name] = proc
        self.proxy_ports[name] = port

    def network(self) -> str:
        async def make() -> str:
            instances = build_instances(Settings(sign_key="unused", redis_url=REDIS_URL, key_prefix=self.prefix))
            try:
                return (await instances.backend.network()).name
            finally:
                await instances.store.close()

        return asyncio.run(make())

    def start_holder(self, role: str, network: str) -> Holder:
        """A container on the instance network, recorded in Redis as one of the proxy's instances."""
        instance_id, nonce, now = new_token(), new_token(), time.time()

        async def reserve() -> None:
            store = Store(connect(REDIS_URL), self.prefix)
            try:
                granted = await store.reserve(instance_id, now, 300, 10_000)
                if int(granted) != 1:
                    raise RuntimeError(f"no capacity slot for the {role} holder: {granted!r}")
            finally:
                await store.close()

        asyncio.run(reserve())  # before the container exists: culling never takes it for an orphan
        labels = {LABEL_MANAGED: MANAGED_BY, LABEL_PREFIX: self.prefix, LABEL_INSTANCE: instance_id}
        cmd = ["docker", "run", "-d", "--pull", "never", "--network", network, "--name", f"datalab-bench-{role}-"]
        cmd[-1] += secrets.token_hex(4)
        for k, v in labels.items():
            cmd += ["--label", f"{k}={v}"]
        cmd += ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--memory", "256m"]
        cmd += ["--entrypoint", "sleep", IMAGE, "infinity"]
        container = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        self.containers.append(container)
        info = json.loads(subprocess.run(["docker", "inspect", container], check=True, capture_output=True).stdout)[0]
        pid = info["State"]["Pid"]
        ip = info["NetworkSettings"]["Networks"][network]["IPAddress"]
        instance = Instance(
            id=instance_id,
            backend="docker",
            handle=container,
            host=ip,
            port=JUPYTER_PORT,
            filename="bench",
            created=now,
            token=secrets.token_urlsafe(24),
            claimed=now,
        )

        async def bind() -> None:
            store = Store(connect(REDIS_URL), self.prefix)
            try:
                if not await store.bind(instance, nonce, 600, time.time()):
                    raise RuntimeError(f"the {role} holder's record was not bound")
            finally:
                await store.close()

        asyncio.run(bind())
        holder = Holder(instance_id, container, pid, ip, role=role)
        holder.cookie = nonce  # replaced by the session cookie once a proxy runs
        print(f"holder {role}: container {container[:12]} at {ip}:8888 (instance {instance_id[:8]}...)", flush=True)
        return holder

    def nsenter(self, holder: Holder, name: str, cmd: list[str]) -> subprocess.Popen:
        return self.procs.spawn(name, ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--", *cmd])

    def start_nginx(self, holder: Holder) -> None:
        www = self.tmp / "www"
        www.mkdir(mode=0o755)
        (www / "1m").write_bytes(secrets.token_bytes(MIB))
        with open(www / "1g", "wb") as f:
            f.truncate(1 << 30)  # sparse: no disk used
        for p in (www / "1m", www / "1g"):
            p.chmod(0o644)
        conf = self.tmp / "nginx.conf"
        t = self.tmp
        conf.write_text(
            f"""worker_processes 1;
pid {t}/nginx.pid;
error_log {t}/logs/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {t}/nginx-client;
    proxy_temp_path {t}/nginx-proxy;
    fastcgi_temp_path {t}/nginx-fastcgi;
    uwsgi_temp_path {t}/nginx-uwsgi;
    scgi_temp_path {t}/nginx-scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    server {{
        listen 0.0.0.0:8888 backlog=4096;
        root {www};
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
        location / {{ }}
    }}
}}
"""
        )
        nginx = shutil.which("nginx", path=PATH)
        self.nsenter(holder, "nginx", [nginx, "-e", f"{t}/logs/nginx-error.log", "-c", str(conf), "-g", "daemon off;"])
        self.wait_direct(holder, "/small")

    def start_echo(self, holder: Holder) -> None:
        script = ROOT / "scripts" / "bench_backend.py"
        self.nsenter(holder, "bench_backend", [sys.executable, str(script), "--port", "8888"])
        wait_port(8888, None, timeout=30, host=holder.ip)

    def wait_direct(self, holder: Holder, path: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = http_get(f"http://{holder.ip}:8888{path}", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered at {holder.ip}:8888{path}; see {self.logs}")
            time.sleep(0.2)

    def open_session(self, holder: Holder) -> None:
        base = f"http://127.0.0.1:{self.proxy_ports[DEFAULT]}"
        holder.cookie = session_cookie(base, holder.cookie)

    def setup(self) -> None:
        """The default entry, the holders the sections need with a session open on each through
        it (checked to route), then the other entries (not with --setup-only)."""
        self.prepare_tools()
        print(f"key prefix {self.prefix}  logs in {self.logs}", flush=True)
        self.start_default_proxy()
        network = self.network()
        holders = self.needed(HOLDERS)
        if "nginx" in holders:
            self.nginx = self.start_holder("nginx", network)
            self.start_nginx(self.nginx)
        if "echo" in holders:
            self.echo = self.start_holder("echo", network)
            self.start_echo(self.echo)
        for holder in self.holders():
            self.open_session(holder)
            answer = self.through(DEFAULT, holder)
            if answer is not None:
                raise RuntimeError(f"the proxy did not route the session to the {holder.role} holder: {answer}")
            print(f"the default entry routes the {holder.role} holder's session", flush=True)
        if self.args.setup_only:
            return
        for name in (LEAN1, WORKERS2, LEAN2):
            self.start_entry(name)
            self.check_routes(name)

    def holders(self) -> list[Holder]:
        return [h for h in (self.nginx, self.echo) if h is not None]

    def through(self, name: str, holder: Holder) -> str | None:
        """None if the proxy `name` routes the holder's session to it (nginx's /small, or the echo
        backend's own 404), else what it answered."""
        path, want = ("/small", (200, SMALL_BODY.encode())) if holder is self.nginx else ("/none", (404, b"not here\n"))
        status, body = http_get(f"http://127.0.0.1:{self.proxy_ports[name]}{path}", {"Cookie": holder.cookie})
        return None if (status, body) == want else f"{status} {body[:120]!r}"

    def check_routes(self, name: str) -> None:
        """A proxy row counts only if that proxy routes the sessions (every worker: 10 connections)."""
        proc = self.proxies.get(name)
        if not isinstance(proc, subprocess.Popen):
            return
        for holder in self.holders():
            for _ in range(10):
                answer = self.through(name, holder)
                if answer is not None:
                    self.proxies[name] = Skip(f"failed: it answered {answer} for the live session")
                    print(f"  {name}: {self.proxies[name]}", flush=True)
                    self.procs.stop(proc)
                    return

    def start_plain_mitmdump(self, upstream: str, name: str = "plain mitmdump", *extra: str) -> Target:
        port = free_port()
        mitmdump = Path(sys.executable).parent / "mitmdump"
        cmd = [str(mitmdump), "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1"]
        cmd += ["--listen-port", str(port), "--set", "keep_host_header=true", *extra]
        log = open(os.devnull, "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.adopt(proc)
        wait_port(port, proc, timeout=60)
        self.meta[slug(name)] = " ".join(["mitmdump", *cmd[1:]]) + " >/dev/null"
        return Target(name, port, {}, proc=proc)

    def chp(self) -> Path | Skip:
        """configurable-http-proxy@5, installed once into ~/.cache/datalab/chp."""
        if hasattr(self, "_chp"):
            return self._chp
        if not CHP_BIN.exists():
            if not shutil.which("npm"):
                self._chp = Skip("npm is missing")
                return self._chp
            print(f"installing configurable-http-proxy@5 into {CHP_DIR}", flush=True)
            CHP_DIR.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                ["npm", "install", "--prefix", str(CHP_DIR), "configurable-http-proxy@5"],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0 or not CHP_BIN.exists():
                self._chp = Skip(f"npm install configurable-http-proxy@5 failed: {done.stderr.strip()[-200:]}")
                return self._chp
        self._chp = CHP_BIN
        self.meta["chp"] = "configurable-http-proxy " + tool_version([str(CHP_BIN), "--version"])
        return self._chp

    def start_chp(self, upstream: str) -> Target | Skip:
        binary = self.chp()
        if isinstance(binary, Skip):
            return binary
        port, api = free_port(), free_port()
        cmd = [str(binary), "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1"]
        cmd += ["--api-port", str(api), "--default-target", upstream]
        proc = self.procs.spawn(f"chp-{port}", cmd, env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16)})
        try:
            wait_port(port, proc, timeout=30)
            deadline = time.monotonic() + 30
            while True:  # listening is not answering: wait for an answer from upstream through it
                try:
                    status, _ = http_get(f"http://127.0.0.1:{port}/small", timeout=2)
                    if status in (200, 404):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("it never answered")
                time.sleep(0.2)
        except RuntimeError as e:
            self.procs.stop(proc)
            return Skip(f"CHP did not start: {e}; {log_tail(self.logs / f'chp-{port}.log', 3)}")
        return Target("CHP", port, {}, proc=proc)

    def proxy_target(self, name: str, holder: Holder) -> Target | Skip:
        proc = self.proxies.get(name)
        if proc is None:
            return Skip("not started")
        if isinstance(proc, Skip):
            return proc
        if proc.poll() is not None or not group_pids(proc.pid):
            log = self.logs / f"proxy-{slug(name)}.log"
            self.proxies[name] = Skip(f"failed: the proxy died (exit {proc.returncode}); {log_tail(log, 3)}")
            print(f"  {name}: {self.proxies[name]}", flush=True)
            return self.proxies[name]
        return Target(name, self.proxy_ports[name], {"Cookie": holder.cookie}, cpu_of=proc)

    # -- HTTP -----------------------------------------------------------------------------------

    def measure_http(
        self,
        section: str,
        targets: list[Target | tuple[str, Skip]],
        paths: list[str],
        seconds: float,
        rounds: int | None = None,
    ) -> dict[tuple[str, str], Wrk | Skip]:
        """wrk on every target and path, --rounds times interleaved; the median of each number."""
        runs: dict[tuple[str, str], list[Wrk]] = {}
        failed: dict[tuple[str, str], Skip] = {}
        live = [t for t in targets if isinstance(t, Target)]
        for rnd in range(rounds or self.args.rounds):
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
                    ws = runs[(name, path)]
                    out[(name, path)] = Wrk(
                        statistics.median(w.rps for w in ws),
                        statistics.median(w.p50 for w in ws),
                        statistics.median(w.p99 for w in ws),
                        sum(w.requests for w in ws),
                        0,
                        "; ".join(sorted({w.errors for w in ws if w.errors})),
                        statistics.median(w.cpu_ms for w in ws) if all(w.cpu_ms for w in ws) else None,
                    )
        return out

    def report_http(
        self,
        section: str,
        got: dict[tuple[str, str], Wrk | Skip],
        path: str,
        name: str,
        base: str | None,
        minimum: float | None = None,
        label: str | None = None,
    ) -> None:
        label = label or name
        shown = self.path_labels.get(path, path)
        metric = f"GET {shown} req/s"
        w = got.get((name, path))
        if isinstance(w, Skip) or w is None:
            self.results.skip(section, label, metric, str(w or "not measured"))
            return
        b = got.get((base, path)) if base else None
        note = f"wrk socket errors: {w.errors}" if w.errors else ""
        if base and isinstance(b, Wrk):
            self.results.ratio(section, label, metric, w.rps, "req/s", base, b.rps, minimum, note)
            self.results.ratio(section, label, f"GET {shown} p50 ms", w.p50, "ms", base, b.p50)
            self.results.ratio(section, label, f"GET {shown} p99 ms", w.p99, "ms", base, b.p99)
            if w.cpu_ms and b.cpu_ms:  # (lower is better: the inverse of what one core can serve)
                self.results.ratio(section, label, f"GET {shown} CPU ms/req", w.cpu_ms, "ms", base, b.cpu_ms)
        else:
            why = f"baseline {base}: {b}" if base else ""
            self.results.ratio(
                section, label, metric, w.rps, "req/s", "", None, None, "; ".join(filter(None, [note, why]))
            )
            self.results.ratio(section, label, f"GET {shown} p50 ms", w.p50, "ms", "", None)
            self.results.ratio(section, label, f"GET {shown} p99 ms", w.p99, "ms", "", None)

    def bench_http(self) -> None:
        section = "HTTP via nginx"
        print(f"\n== {section} ==", flush=True)
        nginx = self.nginx
        direct = Target("direct", 8888, {}, host=nginx.ip)
        plain = self.start_plain_mitmdump(f"http://{nginx.ip}:8888")
        # The proxy streams answers over 256 KiB (memory stays flat); plain mitmdump holds them whole,
        # which costs less CPU per byte. This row shows the addon's own cost at equal streaming.
        streaming = self.start_plain_mitmdump(f"http://{nginx.ip}:8888", STREAMING, "--set", "stream_large_bodies=256k")
        chp = self.start_chp(f"http://{nginx.ip}:8888")
        targets: list[Target | tuple[str, Skip]] = [direct, plain, streaming]
        for name in ENTRIES:
            t = self.proxy_target(name, nginx)
            targets.append(t if isinstance(t, Target) else (name, t))
        targets.append(chp if isinstance(chp, Target) else ("CHP", chp))
        got = self.measure_http(section, targets, ["/small", "/1m"], self.args.seconds)
        for path in ("/small", "/1m"):
            self.report_http(section, got, path, "direct", None)
            self.report_http(section, got, path, "plain mitmdump", "direct")
            self.report_http(section, got, path, STREAMING, "plain mitmdump")
            self.report_http(section, got, path, DEFAULT, "plain mitmdump", 0.9)
            self.report_http(section, got, path, DEFAULT, STREAMING, label=f"{DEFAULT} vs streaming mitmdump")
            self.report_http(section, got, path, LEAN1, "plain mitmdump", 2.0)
            self.report_http(section, got, path, WORKERS2, DEFAULT, 1.5)
            self.report_http(section, got, path, LEAN2, LEAN1, 1.5)
            self.report_http(section, got, path, "CHP", "direct")
            best = self.best_proxy(got, path)
            label = "best proxy vs CHP (to chase)"
            if isinstance(got.get(("CHP", path)), Wrk) and best:
                self.results.ratio(
                    section,
                    label,
                    f"GET {path} req/s",
                    got[(best, path)].rps,
                    "req/s",
                    "CHP",
                    got[("CHP", path)].rps,
                    1.0,
                    f"best: {best}",
                )
            else:
                self.results.skip(section, label, f"GET {path} req/s", f"{got.get(('CHP', path))}")
        for t in (plain, streaming, chp):
            self.stop_target(t)

    def stop_target(self, t: Target | Skip) -> None:
        if isinstance(t, Target) and t.proc is not None:
            self.procs.stop(t.proc)

    def best_proxy(self, got: dict, path: str) -> str | None:
        """The best measured configuration, preferring the production one (lean, several workers)."""
        for name in (LEAN2, WORKERS2, LEAN1, DEFAULT):
            if isinstance(got.get((name, path)), Wrk):
                return name
        return None

    # -- Jupyter --------------------------------------------------------------------------------

    def bench_jupyter(self) -> None:
        section = "Jupyter end to end"
        print(f"\n== {section} ==", flush=True)
        base = f"http://127.0.0.1:{self.proxy_ports[DEFAULT]}"
        t0 = time.perf_counter()
        nonce = upload(base, self.key, "bench.csv")
        cookie = session_cookie(base, nonce)

        async def record() -> Instance:
            store = Store(connect(REDIS_URL), self.prefix)
            try:
                return await store.instance(await store.nonce_target(nonce))
            finally:
                await store.close()

        inst = asyncio.run(record())
        print(f"  instance {inst.id[:8]}... at {inst.host}:{inst.port}, up in {time.perf_counter() - t0:.1f} s")
        auth = {AUTH_HEADER: inst.token}
        asset, size = self.find_asset(inst, auth)
        self.meta["jupyter_asset"] = f"{asset} ({size} bytes)"
        self.path_labels[asset] = f"JS asset ({size / 1024:.0f} KiB)"
        print(f"  static asset: {asset} ({size / 1024:.0f} KiB)", flush=True)
        direct = Target("direct", inst.port, auth, host=inst.host)
        plain = self.start_plain_mitmdump(f"http://{inst.host}:{inst.port}")
        plain.headers = auth
        holder = Holder(inst.id, inst.handle, 0, inst.host, cookie)
        targets: list[Target | tuple[str, Skip]] = [direct, plain]
        for name in (DEFAULT, LEAN2):
            t = self.proxy_target(name, holder)
            targets.append(t if isinstance(t, Target) else (name, t))
        paths = ["/api/status", asset]
        got = self.measure_http(section, targets, paths, self.args.seconds, rounds=self.args.jupyter_rounds)
        for path in paths:
            self.report_http(section, got, path, "direct", None)
            self.report_http(section, got, path, "plain mitmdump", "direct")
            self.report_http(section, got, path, DEFAULT, "plain mitmdump", 0.9)
            self.report_http(section, got, path, LEAN2, "plain mitmdump")
        self.stop_target(plain)

    def find_asset(self, inst: Instance, auth: dict[str, str]) -> tuple[str, int]:
        """One of Jupyter's own static scripts of 100 KB or more, found in the pages it serves."""
        seen: list[tuple[int, str]] = []
        for page in ("/tree", "/lab", "/notebooks/bench.ipynb"):
            status, html = http_get(f"http://{inst.host}:{inst.port}{page}", auth)
            if status != 200:
                continue
            for src in re.findall(rb'<script[^>]+src="([^"]+\.js[^"]*)"', html):
                path = src.decode()
                if path.startswith("http"):
                    continue
                s, body = http_get(f"http://{inst.host}:{inst.port}{path}", auth)
                if s == 200:
                    seen.append((len(body), path))
                    if len(body) >= 100_000:
                        return path, len(body)
                    # webpack's entry names the chunks it loads: look there too
                    for chunk in re.findall(rb'"(static/[\w/.-]+\.js)"', body)[:50]:
                        p = "/" + chunk.decode()
                        s2, b2 = http_get(f"http://{inst.host}:{inst.port}{p}", auth)
                        if s2 == 200:
                            seen.append((len(b2), p))
                            if len(b2) >= 100_000:
                                return p, len(b2)
        if not seen:
            raise RuntimeError("found no static script in Jupyter's pages")
        size, path = max(seen)
        return path, size

    # -- WebSocket ------------------------------------------------------------------------------

    def bench_ws(self) -> None:
        section = "WebSocket echo"
        print(f"\n== {section} ==", flush=True)
        echo = self.echo
        direct = Target("direct", 8888, {}, host=echo.ip)
        chp = self.start_chp(f"http://{echo.ip}:8888")
        targets: list[Target | tuple[str, Skip]] = [direct]
        for name in (DEFAULT, LEAN2):  # the production lean entry (one worker per CPU here)
            t = self.proxy_target(name, echo)
            targets.append(t if isinstance(t, Target) else (name, t))
        targets.append(chp if isinstance(chp, Target) else ("CHP", chp))
        kinds = {"round trips/s (64 B, 8 conns)": (8, 64), "MB/s (1 MiB msgs, 1 conn)": (1, MIB)}
        runs: dict[tuple[str, str], list[float]] = {}
        failed: dict[tuple[str, str], str] = {}
        for rnd in range(self.args.rounds):
            for metric, (conns, size) in kinds.items():
                for t in targets:
                    if not isinstance(t, Target) or (t.name, metric) in failed:
                        continue
                    print(f"  ws {t.name} {metric} (round {rnd + 1})", flush=True)
                    try:
                        n, secs = asyncio.run(ws_echo(t.url("/ws", "ws"), t.headers, conns, size, self.args.seconds))
                    except Exception as e:
                        failed[(t.name, metric)] = f"failed: {type(e).__name__}: {e}"
                        continue
                    rate = n / secs if size == 64 else n * size / secs / 1e6
                    runs.setdefault((t.name, metric), []).append(rate)
        for metric in kinds:
            unit = "rt/s" if "round" in metric else "MB/s"
            values = {}
            for t in targets:
                name = t.name if isinstance(t, Target) else t[0]
                if not isinstance(t, Target):
                    self.results.skip(section, name, metric, str(t[1]))
                elif (name, metric) in failed:
                    self.results.skip(section, name, metric, failed[(name, metric)])
                else:
                    values[name] = statistics.median(runs[(name, metric)])
                    base = "direct" if name != "direct" else ""
                    self.results.ratio(section, name, metric, values[name], unit, base, values.get(base))
            best = next((n for n in (LEAN2, LEAN1, DEFAULT) if n in values), None)
            label = "best proxy vs CHP (to chase)"
            if best and "CHP" in values:
                self.results.ratio(
                    section, label, metric, values[best], unit, "CHP", values["CHP"], 1.0, f"best: {best}"
                )
            else:
                self.results.skip(section, label, metric, "CHP or every proxy row missing")
        self.stop_target(chp)

    # -- Memory ---------------------------------------------------------------------------------

    def bench_memory(self) -> None:
        """The proxies' RSS over many requests, WebSocket messages and big transfers. The request and
        message phases run on both entries at once (each proxy's RSS is its own; this halves the
        time), the transfers one after the other (their MB/s are printed too)."""
        section = "Memory (proxy RSS)"
        print(f"\n== {section} ==", flush=True)
        entries = []
        for name in (DEFAULT, LEAN1):
            t = self.proxy_target(name, self.nginx)
            if isinstance(t, Skip):
                self.results.skip(section, name, "memory", str(t))
            else:
                entries.append((name, self.proxies[name]))
        phases = [
            (self.mem_requests, True),
            (self.mem_websocket, True),
            (self.mem_download, False),
            (self.mem_upload, False),
        ]
        idle = {name: proxy_rss(proc) for name, proc in entries}
        out: dict[str, list] = {name: [] for name, _ in entries}
        for phase, together in phases:
            if together:
                with ThreadPoolExecutor(len(entries) or 1) as pool:
                    got = list(pool.map(lambda e, f=phase: self.guarded(f, *e), entries))
            else:
                got = [self.guarded(phase, *e) for e in entries]
            for (name, _), rows in zip(entries, got, strict=True):
                out[name].append(rows)
        time.sleep(1)
        for name, proc in entries:
            for rows in out[name]:
                for row in rows:
                    if isinstance(row, str):
                        self.results.skip(section, name, "memory", row)
                    else:
                        metric, before, after, limit, note = row
                        r = self.results.memory(section, name, metric, before, after, limit, "before")
                        r.note = note
            end = self.results.memory(section, name, "RSS at the end", idle[name], proxy_rss(proc), FLAT, "idle")
            end.target, end.met, end.note = "", None, "after all of the above"

    def guarded(self, phase: Callable, name: str, proc: subprocess.Popen) -> list:
        try:
            return phase(name, proc)
        except Exception as e:
            traceback.print_exc()
            return [f"{phase.__name__} failed: {type(e).__name__}: {e}"]

    def mem_requests(self, name: str, proc: subprocess.Popen) -> list:
        port, n = self.proxy_ports[name], self.args.requests
        time.sleep(1)
        before, done = proxy_rss(proc), 0
        print(f"  {name}: {n:,} requests to /small", flush=True)
        with RssSampler(proc, 0.25) as during:
            while done < n and not STOP.is_set():
                w = wrk(f"http://127.0.0.1:{port}/small", 10, {"Cookie": self.nginx.cookie})
                if w.bad:
                    raise RuntimeError(f"{w.bad} bad answers to /small")
                done += w.requests
        time.sleep(1)
        note = f"during: {during.spread}"
        return [(f"RSS after {done:,} requests", before, proxy_rss(proc), FLAT, note)]

    def mem_websocket(self, name: str, proc: subprocess.Popen) -> list:
        """n messages echoed over 8 connections, RSS taken while they are still open (the
        flows, and any message history they keep, live as long as the connections)."""
        port, n = self.proxy_ports[name], self.args.requests
        time.sleep(1)
        before, held = proxy_rss(proc), {}
        print(f"  {name}: {n:,} WebSocket messages", flush=True)

        def measure_open() -> None:
            time.sleep(1)
            held["open"] = proxy_rss(proc)

        url = f"ws://127.0.0.1:{port}/ws"
        cpu = proxy_cpu(proc)
        count, _ = asyncio.run(ws_echo(url, {"Cookie": self.echo.cookie}, 8, 64, messages=n, while_open=measure_open))
        cpu = proxy_cpu(proc) - cpu
        time.sleep(1)
        note = f"after closing {proxy_rss(proc) / MIB:.1f} MiB; proxy CPU {cpu:.0f} s"
        return [(f"RSS after {count:,} WS msgs (open)", before, held["open"], FLAT, note)]

    def mem_download(self, name: str, proc: subprocess.Popen) -> list:
        """A download from nginx's sparse 1 GiB file (a range of it with --transfer)."""
        port, size = self.proxy_ports[name], self.args.transfer
        time.sleep(1)
        before = proxy_rss(proc)
        print(f"  {name}: {size / MIB:,.0f} MiB download", flush=True)
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}"]
        cmd += ["-H", f"Cookie: {self.nginx.cookie}"] + ([f"-r0-{size - 1}"] if size < (1 << 30) else [])
        with RssSampler(proc) as peak:
            got = subprocess.run([*cmd, f"http://127.0.0.1:{port}/1g"], capture_output=True, text=True, timeout=900)
        code, got_bytes, speed = (got.stdout.split() + ["0", "0", "0"])[:3]
        if code not in ("200", "206") or int(got_bytes) != size:
            raise RuntimeError(f"download: {got.stdout} {got.stderr.strip()}")
        note = f"{float(speed) / 1e6:.0f} MB/s (curl); {peak.spread}"
        return [(f"peak RSS, {size / MIB:,.0f} MiB download", before, peak.peak, TRANSFER_GROWTH, note)]

    def mem_upload(self, name: str, proc: subprocess.Popen) -> list:
        """An upload of generated bytes with Content-Length to the sink, which counts them."""
        port, size = self.proxy_ports[name], self.args.transfer
        time.sleep(1)
        before = proxy_rss(proc)
        print(f"  {name}: {size / MIB:,.0f} MiB upload", flush=True)
        with RssSampler(proc) as peak:
            status, body, secs = upload_stream(port, {"Cookie": self.echo.cookie}, size)
        if status != 200 or body.strip() != str(size).encode():
            raise RuntimeError(f"upload: {status} {body[:200]!r}")
        note = f"{size / secs / 1e6:.0f} MB/s (Python client); {peak.spread}"
        return [(f"peak RSS, {size / MIB:,.0f} MiB upload", before, peak.peak, TRANSFER_GROWTH, note)]

    # -- clean-up -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        print("\ncleaning up", flush=True)
        self.procs.stop_all()
        try:
            print(f"removed {asyncio.run(remove_all(self.prefix))} recorded instances", flush=True)
        except Exception as e:
            print(f"could not remove the instances under {self.prefix}: {e}", flush=True)
        listed = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={LABEL_PREFIX}={self.prefix}"], capture_output=True, text=True
        ).stdout.split()
        leftovers = sorted(set(listed) | set(self.containers))
        if leftovers:
            subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True)
        with contextlib.suppress(Exception):
            redis_keys_gone(self.prefix)
        if self.args.keep_logs:
            print(f"logs kept in {self.logs}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_json(self, path: Path, elapsed: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for r in self.results.rows:
            d = dict(r.__dict__)
            rows.append(d)
        data = {"meta": {**self.meta, "elapsed_s": round(elapsed, 1), "when": time.strftime("%F %T %z")}, "rows": rows}
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwritten to {path}")


def redis_keys_gone(prefix: str) -> None:
    """The bench's own Redis keys (sessions outlive their instances by design): deleted."""

    async def scrub() -> None:
        client = connect(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(scrub())


PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def main() -> None:
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
    if os.geteuid() != 0:
        sys.exit("run it as root (nsenter into the holder containers, the proxy's firewall rule)")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench = Bench(args)
    sections = {"http": bench.bench_http, "jupyter": bench.bench_jupyter, "ws": bench.bench_ws}
    sections["memory"] = bench.bench_memory
    start = time.monotonic()
    interrupted = set_up = False
    try:
        bench.setup()
        set_up = True
        for name in [] if args.setup_only else bench.sections:
            t0 = time.monotonic()
            try:
                sections[name.strip()]()
            except (Exception, SystemExit) as e:
                traceback.print_exc()
                bench.results.skip(name, f"section {name}", "-", f"failed: {type(e).__name__}: {e}")
            bench.meta[f"{name.strip()}_section_s"] = round(time.monotonic() - t0)
            print(f"  ({name.strip()}: {time.monotonic() - t0:.0f} s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        STOP.set()
        print("\ninterrupted", flush=True)
    except Exception as e:
        traceback.print_exc()
        bench.results.skip("setup", "setup", "-", f"failed: {type(e).__name__}: {e}")
    finally:
        STOP.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave things behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    elapsed = time.monotonic() - start
    meta = bench.meta
    print(f"\nload: {meta.get('wrk')} {meta.get('wrk_flags')}; WebSocket: {meta.get('websockets_client')}")
    for k in ("nginx", "plain_mitmdump", "chp", "jupyter_asset", "mitmproxy", "machine"):
        if k in bench.meta:
            print(f"{k}: {bench.meta[k]}")
    print_table(bench.results)
    bench.write_json(args.json, elapsed)
    print(f"took {elapsed / 60:.1f} min")
    if interrupted:
        sys.exit(130)
    if not set_up:
        sys.exit("set-up failed: no row was measured (see above)")
    if args.setup_only:
        print("set-up done: every session routes")


if __name__ == "__main__":
    main()
