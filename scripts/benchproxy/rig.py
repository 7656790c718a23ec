"""One run of the bench: its options, what it started (processes, holder containers, proxies, Redis
keys under its own prefix) so that all of it is removed at the end, where each row's load is pointed,
and the results with what they were measured with (written to --json)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import REDIS_URL
from benchlib import connect
from benchlib import remove_all

from backends.container_spec import LABEL_PREFIX
from benchproxy import Skip
from benchproxy.processes import Processes
from benchproxy.results import Results


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


Entry = Target | tuple[str, Skip]  # a row's target, or its name and why it cannot be measured


def entry(name: str, got: Target | Skip) -> Entry:
    return got if isinstance(got, Target) else (name, got)


class Rig:
    """The run's state, shared by the set-up and the sections."""

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
        self.chp: Path | Skip | None = None  # configurable-http-proxy's binary once looked for

    @property
    def sections(self) -> list[str]:
        return [name.strip() for name in self.args.only.split(",") if name.strip()]

    def needed(self, table: dict[str, tuple[str, ...]]) -> set[str]:
        """What the sections asked for need (an unknown section needs nothing: it fails by itself)."""
        return {what for name in self.sections for what in table.get(name, ())}

    def holders(self) -> list[Holder]:
        return [h for h in (self.nginx, self.echo) if h is not None]

    def stop_target(self, t: Target | Skip) -> None:
        if isinstance(t, Target) and t.proc is not None:
            self.procs.stop(t.proc)

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
