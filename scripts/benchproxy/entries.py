"""The product's entries, each started with ./run.sh on a port, key and prefix of the bench's own
(pool_size=0 and long idle/cull intervals, so nothing touches the holders), and the targets they make
for a holder's session."""

from __future__ import annotations

from benchlib import free_port
from benchlib import group_pids
from benchlib import run_sh_offers
from benchlib import start_proxy_group

from benchproxy import Skip
from benchproxy.processes import log_tail
from benchproxy.processes import slug
from benchproxy.rig import Entry
from benchproxy.rig import Holder
from benchproxy.rig import Rig
from benchproxy.rig import Target
from benchproxy.rig import entry

PROXY_OPTIONS = {"pool_size": 0, "idle_timeout": 86400, "cull_interval": 3600, "max_age": 86400}

# The product's entries: name, run.sh flags, the run.sh option each needs.
DEFAULT = "proxy (run.sh)"
LEAN1 = "proxy --lean --workers 1"
WORKERS2 = "proxy --workers 2"
LEAN2 = "proxy --lean --workers 2"
ENTRIES = {
    DEFAULT: ((), ()),
    LEAN1: (("--lean", "--workers", "1"), ("--lean", "--workers")),
    WORKERS2: (("--workers", "2"), ("--workers",)),
    LEAN2: (("--lean", "--workers", "2"), ("--lean", "--workers")),
}


def start_default_proxy(rig: Rig) -> None:
    """The default entry first: its Docker backend makes sure the instance network exists."""
    start_entry(rig, DEFAULT)
    if isinstance(rig.proxies[DEFAULT], Skip):
        raise RuntimeError(f"the default proxy did not start: {rig.proxies[DEFAULT]}")


def start_entry(rig: Rig, name: str) -> None:
    flags, needs = ENTRIES[name]
    absent = [f for f in needs if not run_sh_offers(f)]
    if absent:
        rig.proxies[name] = Skip(f"run.sh has no {' / '.join(absent)} yet")
        return
    port = free_port()
    log = rig.logs / f"proxy-{slug(name)}.log"
    print(f"starting {name} on 127.0.0.1:{port}: ./run.sh {' '.join(flags)} -q ...", flush=True)
    try:
        proc = start_proxy_group(port, rig.key, rig.prefix, PROXY_OPTIONS, flags, log)
    except (RuntimeError, SystemExit) as e:
        rig.proxies[name] = Skip(f"failed to start: {e}; {log_tail(log, 3)}")
        print(f"  {rig.proxies[name]}", flush=True)
        return
    rig.procs.adopt(proc)
    rig.proxies[name] = proc
    rig.proxy_ports[name] = port


def proxy_target(rig: Rig, name: str, holder: Holder) -> Target | Skip:
    proc = rig.proxies.get(name)
    if proc is None:
        return Skip("not started")
    if isinstance(proc, Skip):
        return proc
    if proc.poll() is not None or not group_pids(proc.pid):
        log = rig.logs / f"proxy-{slug(name)}.log"
        rig.proxies[name] = Skip(f"failed: the proxy died (exit {proc.returncode}); {log_tail(log, 3)}")
        print(f"  {name}: {rig.proxies[name]}", flush=True)
        return rig.proxies[name]
    return Target(name, rig.proxy_ports[name], {"Cookie": holder.cookie}, cpu_of=proc)


def proxy_entries(rig: Rig, names: tuple[str, ...], holder: Holder) -> list[Entry]:
    """The entries `names` as rows pointed at the holder's session (or why each cannot be)."""
    return [entry(name, proxy_target(rig, name, holder)) for name in names]
