"""scripts/bench_proxy.py's set-up, as docs/benchmarks.md runs it, against real processes: ./run.sh, a
holder container of the real image running the bench's echo backend, a session opened through
/datalab/view. (The measurements themselves are the bench's business, not the suite's.)"""

from __future__ import annotations

import os
import subprocess
import sys

from e2e.proxy import ROOT


def test_the_bench_opens_a_session_on_a_backend_without_jupyter(redis_server, docker_client, tmp_path):
    """The echo backend answers no /api/status, so its view answers the waiting page, which sets
    the session cookie as a redirect would: the bench must take it from there."""
    bench = [sys.executable, str(ROOT / "scripts" / "bench_proxy.py"), "--only", "ws", "--setup-only"]
    bench += ["--json", str(tmp_path / "bench.json")]
    env = {**os.environ, "DATALAB_REDIS_URL": redis_server.url}  # not run.sh's own Redis
    done = subprocess.run(bench, env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "the default entry routes the echo holder's session" in out and "set-up done" in out, out[-3000:]
    assert "removed 1 recorded instances" in out  # it cleans up after itself
