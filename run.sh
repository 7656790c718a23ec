#!/usr/bin/env bash
# Runs the datalab proxy: installs what is missing, starts Redis and the Docker engine if needed,
# builds the Jupyter image if missing, then execs mitmdump with the addon.
#
#   ./run.sh [--web] [mitmproxy arguments ...]
#
#   --web                   run mitmweb (flow inspector on http://127.0.0.1:8081) instead of mitmdump
#   DATALAB_LISTEN_HOST     address to listen on (default 127.0.0.1)
#   DATALAB_PORT            port to listen on (default 8080)
#   DATALAB_SIGN_KEY        shared signing key (default: generated once, kept in .state/sign_key)
#   DATALAB_REDIS_URL       Redis URL (default redis://127.0.0.1:6379/0; started here when local and silent)
#   DATALAB_IMAGE           Jupyter image (default datalab-notebook:latest; built here when missing)
# Any other datalab_* option: pass --set datalab_NAME=VALUE (see README).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"

tool=mitmdump
if [ "${1:-}" = "--web" ]; then tool=mitmweb; shift; fi

ensure_all
export DATALAB_REDIS_URL=${DATALAB_REDIS_URL:-redis://127.0.0.1:6379/0}
ensure_redis "$DATALAB_REDIS_URL"

if [ -z "${DATALAB_SIGN_KEY:-}" ]; then
  if [ ! -s "$STATE/sign_key" ]; then
    (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/sign_key")
    say "generated a sign key in $STATE/sign_key"
  fi
  DATALAB_SIGN_KEY=$(cat "$STATE/sign_key")
fi
export DATALAB_SIGN_KEY

host=${DATALAB_LISTEN_HOST:-127.0.0.1}
port=${DATALAB_PORT:-8080}
say "proxy listening on http://$host:$port/  (Redis: $DATALAB_REDIS_URL)"
say "sign key: $DATALAB_SIGN_KEY"
[ "$tool" = mitmweb ] && say "flow inspector: http://127.0.0.1:8081/"

exec "$VENV/bin/$tool" -s "$ROOT/addon/datalab.py" \
  --mode reverse:http://127.0.0.1:1 --listen-host "$host" --listen-port "$port" \
  --set connection_strategy=lazy --set keep_host_header=true \
  "$@"
