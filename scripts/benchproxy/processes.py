"""What the bench starts, each in a process group of its own with its log, and what the proxy's
processes use of the machine (CPU seconds, resident memory, sampled while a load runs)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from pathlib import Path

from benchlib import group_pids
from benchlib import rss_bytes
from benchlib import stop_group

from benchproxy import MIB

PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # where the tools are looked for (nginx is in sbin)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


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


def tool_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


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
