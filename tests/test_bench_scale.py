"""scripts/bench_scale.py at a tiny scale, so it cannot rot (its shape, never its times), and the
fake backend it runs on: many instances answered on one loopback port, each by its own secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from backends.instance_http import http_get
from fake_backend import OnePortBackend

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "instances",
    "sessions",
    "round",
    "round_per_instance",
    "start",
    "routed_cold",
    "routed_warm",
    "route_drop",
    "rss",
    "redis_per_instance",
    "redis_per_session",
}


def test_the_bench_measures_every_row_at_each_scale(tmp_path):
    out = tmp_path / "scale.json"
    args = ["--scales", "10,20", "--sessions-per-instance", "2", "--samples", "5", "--rounds", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["baseline"] == 10
    assert [(r["instances"], r["sessions"]) for r in report["rows"]] == [(10, 20), (20, 40)]
    assert all(set(r) == FIELDS for r in report["rows"])
    table = run.stdout.splitlines()
    assert table[0].startswith("| metric | 10 inst / 20 sess | 20 inst / 40 sess |")
    for label in ("cull-and-reconcile round", "start, median", "routed request, cold", "Redis per session"):
        assert any(line.startswith(f"| {label}") for line in table), label


async def test_one_port_answers_each_instance_by_its_own_secret():
    backend = OnePortBackend()
    try:
        a = await backend.start("a" * 32, "secret-a")
        b = await backend.start("b" * 32, "secret-b")
        assert a.port == b.port and await backend.could_have_given(a.host, a.port)
        backend.jupyter(a).kernels = [{"id": "k"}]
        assert await http_get(a.host, a.port, "/api/kernels", 2, a.token) == (200, b'[{"id": "k"}]')
        assert await http_get(b.host, b.port, "/api/kernels", 2, b.token) == (200, b"[]")
        assert (await http_get(a.host, a.port, "/api/status", 2, "forged"))[0] == 403
        assert backend.jupyter(a).asked == ["/api/kernels"] and backend.jupyter(b).asked == ["/api/kernels"]
        await backend.stop(a.handle)
        assert (await http_get(a.host, a.port, "/api/status", 2, a.token))[0] == 403  # ended: no longer answered
        assert (await http_get(b.host, b.port, "/api/status", 2, b.token))[0] == 200
    finally:
        await backend.close()
