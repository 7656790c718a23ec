"""scripts/bench_proxy.py's parts, one concern each (the entry's docstring says what the bench measures):

    results.py       the rows, their ratios and targets, the printed table
    processes.py     what the bench starts (process groups, logs) and the proxy's CPU and memory
    load.py          the load generators and clients: wrk, a WebSocket echo client, an upload stream
    rig.py           one run's state (where each row points, what to clean up), its JSON
    entries.py       the product's entries started with ./run.sh, and the targets they make
    peers.py         the peers they are measured against: plain mitmdump and configurable-http-proxy
    holders.py       the fast backends in containers of the instance network (nginx, the echo backend)
    prepare.py       the set-up: tools, the entries, the holders and a checked session on each
    http_section.py, jupyter_section.py, websocket_section.py, memory_section.py   the sections

Below, what every part shares."""

from __future__ import annotations

import threading

import benchlib  # noqa: F401  (puts the addon's modules on the path, for `backends` below)

MIB = 1 << 20
STOP = threading.Event()  # set on Ctrl-C / SIGTERM: load loops in worker threads end early


class Skip(Exception):
    """A row that cannot be measured here, and why."""
