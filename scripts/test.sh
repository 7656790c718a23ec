#!/usr/bin/env bash
# The test command (README "Test it", .ci/run): installs and starts everything the tests need, then runs pytest.
# The tests start their own redis-server and mitmdump processes and real containers.
#
#   scripts/test.sh [pytest arguments ...]          every tier (set-up: packages, venv, engine, images)
#   scripts/test.sh --quick [pytest arguments ...]  the unit tier alone (-m unit), in under a minute:
#                                                   no Docker engine, no image, no Jupyter; only the
#                                                   venv and redis-server (and redis-sentinel)
#
# Tiers are pytest markers (pytest.ini), set by tests/conftest.py from where a test is and what it
# uses: unit (only Redis), engine (real Docker, Swarm or Jupyter processes outside e2e), e2e
# (tests/e2e: proxies, containers, images) and browser (Chromium). Any one by itself:
#   scripts/test.sh -m engine        scripts/test.sh -m "e2e or browser"
#
# pytest runs on DATALAB_TEST_WORKERS pytest-xdist workers (default 2), a test file per worker at a time
# (--dist loadfile: a module's fixtures, a Chromium or a swarm stack, are made once; files in the order
# collected, the slow e2e files first). Each worker is a session of its own: its own redis-server,
# key prefix, ports and directories. Much of the suite waits (timers, boots, a browser): on 2 cores,
# shared, -n 2 took 8m24s, -n 3 7m47s-8m05s, -n 4 8m56s (more load, more timing flakes), serially 14-24
# min. Serially, as before: `scripts/test.sh -p no:xdist` (or -n 0); a caller's own -n or --dist wins.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=setup.sh
. "$ROOT/scripts/setup.sh"

# The xdist arguments, unless the caller chose (-n, --numprocesses, --dist, -p no:xdist).
parallel() {
  local arg
  for arg in "$@"; do
    case "$arg" in -n|-n*|--numprocesses*|--dist*|no:xdist|-pno:xdist) return ;; esac
  done
  echo "-n ${DATALAB_TEST_WORKERS:-2} --dist loadfile --no-loadscope-reorder"
}

if [ "${1:-}" = --quick ]; then
  shift
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)  # the Sentinel client's deadline test
  apt_install "${missing[@]}"
  ensure_venv
  cd "$ROOT"
  read -ra xdist <<< "$(parallel "$@")"
  exec "$VENV/bin/python" -m pytest -m unit "${xdist[@]}" "$@"
fi

t0=$(date +%s)
ensure_packages; ensure_test_packages; t1=$(date +%s)
ensure_venv;     t2=$(date +%s)
ensure_docker; ensure_swarm; t3=$(date +%s)
ensure_image; ensure_proxy_image; t4=$(date +%s)
ensure_jupyter_env; t5=$(date +%s)
say "set-up: packages $((t1-t0)) s, venv $((t2-t1)) s, docker engine $((t3-t2)) s, images $((t4-t3)) s, jupyter env $((t5-t4)) s"

cd "$ROOT"
read -ra xdist <<< "$(parallel "$@")"
exec "$VENV/bin/python" -m pytest "${xdist[@]}" "$@"
