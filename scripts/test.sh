#!/usr/bin/env bash
# The test command (README "Test it", .ci/run): installs and starts everything the tests need, then runs pytest.
# The tests start their own redis-server and mitmdump processes and real containers.
#
#   scripts/test.sh [pytest arguments ...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=setup.sh
. "$ROOT/scripts/setup.sh"

t0=$(date +%s)
ensure_packages; ensure_test_packages; t1=$(date +%s)
ensure_venv;     t2=$(date +%s)
ensure_docker; ensure_swarm; t3=$(date +%s)
ensure_image; ensure_proxy_image; t4=$(date +%s)
ensure_jupyter_env; t5=$(date +%s)
say "set-up: packages $((t1-t0)) s, venv $((t2-t1)) s, docker engine $((t3-t2)) s, images $((t4-t3)) s, jupyter env $((t5-t4)) s"

cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
