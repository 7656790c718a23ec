#!/usr/bin/env bash
# Runs the datalab proxy: installs what is missing, starts Redis and the Docker engine if needed,
# builds the Jupyter image if missing, then execs mitmdump with the addon.
#
#   ./run.sh [--web | --lean] [--workers N] [--demo] [mitmproxy arguments ...]   (run.sh's own flags first)
#   ./run.sh --tls-check
#   ./run.sh --swarm [mitmproxy arguments ...]
#
#   --swarm                 the proxy (DATALAB_REPLICAS replicas, default 2, datalab_backend=swarm) and Redis
#                           as a stack on this machine's swarm (initialised when none), port DATALAB_PORT
#                           published; follows the proxy's logs, removes the stack on SIGINT/SIGTERM
#                           (deploy/swarm.sh says more; docs/operations.md "Swarm")
#   --web                   run mitmweb (flow inspector on http://127.0.0.1:8081) instead of mitmdump
#   --lean                  production: the same addons in a lean mitmproxy master (addon/lean.py: no
#                           flow printing, no scripts; takes --mode, --listen-*, --certs, --set, -q, -v),
#                           as many processes as CPUs unless --workers says otherwise
#   --workers N             N proxy processes sharing the port (SO_REUSEPORT; the kernel spreads new
#                           connections); a worker that dies is restarted, the others keep serving.
#                           Default 1, or the number of CPUs with --lean. Not with --web.
#   --demo                  also run the demo frontend (scripts/demo.py) on http://127.0.0.1:$DATALAB_DEMO_PORT/,
#                           allowed to frame the proxy's instances (datalab_allowed_origins); it ends with run.sh
#   --tls-check             only check DATALAB_TLS_CERT and DATALAB_TLS_KEY and write .state/tls.pem, then
#                           exit (installs and starts nothing; e.g. to try a renewed certificate)
#   DATALAB_LISTEN_HOST     address to listen on (default 127.0.0.1)
#   DATALAB_PORT            port to listen on (default 8080)
#   DATALAB_SIGN_KEY        shared signing key (default: generated once, kept in .state/sign_key)
#   DATALAB_REDIS_URL       Redis URL (default unix://$STATE/redis/local/redis.sock; started here when local and silent)
#   DATALAB_BACKEND         what runs instances: docker, process (local Jupyter processes, for machines
#                           without a Docker engine) or auto (default: docker when an engine can be had)
#   DATALAB_IMAGE           Jupyter image (default datalab-notebook:latest; built here when missing)
#   DATALAB_NO_BUILD        1: use the images as they are, never build them, fail if one is missing
#                           (benchmarks and other checkouts that share this engine's images)
#   DATALAB_METRICS_PORT    serve Prometheus metrics on 127.0.0.1 at this port; worker i of --workers N
#                           at this port + i - 1 (each process counts its own). Unset: no metrics port
#                           (docs/operations.md "Metrics"). When set, it decides over --set datalab_metrics_port.
#   DATALAB_DEMO_PORT       --demo: the demo page's port (default 8090)
#   DATALAB_URL             --demo: the proxy's URL as the browser reaches it (default http://127.0.0.1:$DATALAB_PORT)
#   DATALAB_TLS_CERT        TLS: PEM certificate chain, the server's own certificate first, then its
#                           intermediates (as a CA issues a "fullchain.pem")
#   DATALAB_TLS_KEY         TLS: the PEM private key of that certificate, unencrypted
# Any other datalab_* option: pass --set datalab_NAME=VALUE (docs/operations.md "Options"). Those above with an option
# (datalab_backend, datalab_image, datalab_jupyter_env, datalab_redis_url, datalab_sign_key) may come as
# --set as well: --set wins, and what run.sh prepares (the Jupyter env, the image, Redis) follows it.
#
# TLS: with DATALAB_TLS_CERT and DATALAB_TLS_KEY both set, the proxy serves HTTPS (and wss://, and
# HTTP/2 to clients that offer it) with that certificate, whatever name a client asks for, on
# DATALAB_PORT. Both files are checked first (present, readable, PEM; the key unencrypted and the one
# of the first certificate; that certificate valid now), then written, key first, into .state/tls.pem
# (mode 0600, rewritten at each start), which mitmproxy is given as --certs '*=.state/tls.pem'.
# Plain HTTP keeps working on the same port: mitmproxy tells TLS from HTTP by a client's first bytes.
# When browsers come over HTTPS only, also pass --set datalab_cookie_secure=true: the session cookie
# becomes __Host-datalab_session, marked Secure, which browsers never send over plain HTTP.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"

# TLS: check DATALAB_TLS_CERT and DATALAB_TLS_KEY, and write them as the one file mitmproxy reads
# (see above). Sets tls_file, tls_names (what the certificate covers) and tls_args (for mitmproxy).
prepare_tls() {
  local var file
  [ -n "${DATALAB_TLS_CERT:-}" ] || die "DATALAB_TLS_KEY is set but DATALAB_TLS_CERT is not: set both (a PEM certificate chain, leaf first, and its PEM key), or neither for plain HTTP"
  [ -n "${DATALAB_TLS_KEY:-}" ] || die "DATALAB_TLS_CERT is set but DATALAB_TLS_KEY is not: set both (a PEM certificate chain, leaf first, and its PEM key), or neither for plain HTTP"
  for var in DATALAB_TLS_CERT DATALAB_TLS_KEY; do
    file=${!var}
    [ -e "$file" ] || die "$var=$file: no such file"
    [ -f "$file" ] || die "$var=$file: not a regular file"
    [ -r "$file" ] || die "$var=$file: not readable by $(id -un) (check its mode and owner)"
  done
  tls_file="$STATE/tls.pem"
  # Checked and written by Python (cryptography comes with mitmproxy): the key, then the chain as given.
  tls_names=$("$VENV/bin/python" - "$DATALAB_TLS_CERT" "$DATALAB_TLS_KEY" "$tls_file" <<'PY'
import datetime
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization

cert_path, key_path, out = sys.argv[1:]


def fail(message):
    sys.exit(f"[datalab] error: {message}")


try:
    chain = x509.load_pem_x509_certificates(open(cert_path, "rb").read())
except ValueError as e:
    fail(f"DATALAB_TLS_CERT={cert_path}: no PEM certificate in it ({e})")
try:
    key = serialization.load_pem_private_key(open(key_path, "rb").read(), password=None)
except TypeError:
    fail(f"DATALAB_TLS_KEY={key_path}: the key is encrypted; decrypt it (openssl pkey -in KEY -out PLAIN.pem)")
except ValueError as e:
    fail(f"DATALAB_TLS_KEY={key_path}: no PEM private key in it ({e})")
leaf = chain[0]
if leaf.public_key() != key.public_key():
    fail(
        f"DATALAB_TLS_KEY={key_path} is not the key of the first certificate in DATALAB_TLS_CERT={cert_path}"
        " (the server's own certificate comes first, then its intermediates)"
    )
now = datetime.datetime.now(datetime.UTC)
if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
    fail(f"DATALAB_TLS_CERT={cert_path} is valid from {leaf.not_valid_before_utc} to {leaf.not_valid_after_utc}, not now")
for child, parent in zip(chain, chain[1:]):
    if child.issuer != parent.subject:
        print(f"[datalab] warning: in {cert_path}, {parent.subject.rfc4514_string()} did not issue"
              f" {child.subject.rfc4514_string()}: is the chain in order, leaf first?", file=sys.stderr)
pem = serialization.Encoding.PEM
body = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
body += b"".join(c.public_bytes(pem) for c in chain)
tmp = out + ".tmp"
if os.path.lexists(tmp):
    os.unlink(tmp)
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(body)
os.replace(tmp, out)
try:
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(n) for kind in (x509.DNSName, x509.IPAddress) for n in sans.get_values_for_type(kind)]
except x509.ExtensionNotFound:
    names = []
print(", ".join(names) or "(no subjectAltName: browsers will refuse it)")
PY
) || exit 1
  tls_args=(--certs "*=$tls_file")
}

if [ "${1:-}" = --swarm ]; then shift; exec "$ROOT/deploy/swarm.sh" "$@"; fi
tool=mitmdump
workers=
demo=
while [ $# -gt 0 ]; do
  case "$1" in
    --web) tool=mitmweb; shift ;;
    --lean) tool=lean; shift ;;
    --demo) demo=1; shift ;;
    --workers)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--workers needs a number of processes, e.g. --workers 2"
      workers=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ -z "$workers" ]; then
  if [ "$tool" = lean ]; then workers=$(nproc); else workers=1; fi
fi
[ "$tool" != mitmweb ] || [ "$workers" = 1 ] || die "--web shows one process's flows: run it without --workers"
tls_args=()

if [ "${1:-}" = "--tls-check" ]; then
  [ -n "${DATALAB_TLS_CERT:-}${DATALAB_TLS_KEY:-}" ] || die "--tls-check: set DATALAB_TLS_CERT and DATALAB_TLS_KEY"
  [ -x "$VENV/bin/python" ] || ensure_venv
  prepare_tls
  say "TLS: ready to serve the certificate for $tls_names (from $DATALAB_TLS_CERT) with $tls_file"
  exit 0
fi

take_sets "$@"  # --set datalab_backend=process and the like: prepared as their variables are
host=${DATALAB_LISTEN_HOST:-127.0.0.1}
port=${DATALAB_PORT:-8080}
# (Lock files stay, empty, in $STATE/locks: removing one another run.sh may hold would split the lock.)
mkdir -p "$STATE/locks"
rm -f "$STATE"/port-*.lock  # (where they piled up before)
lock=$STATE/locks/port-$host-$port.lock
(flock -n 9) 9>"$lock" || die "another run.sh already serves $host:$port (lock $lock)"

ensure_packages
ensure_venv
ensure_backend
[ -z "${DATALAB_TLS_CERT:-}${DATALAB_TLS_KEY:-}" ] || prepare_tls  # before anything is started: fail fast
export DATALAB_REDIS_URL=${DATALAB_REDIS_URL:-$LOCAL_REDIS_URL}
ensure_redis "$DATALAB_REDIS_URL"
case "$BACKEND_LIKELY $DATALAB_REDIS_URL" in
  docker*|*" unix://"*) ;;
  *) say "warning: process-backend instances share this machine's network: they reach this Redis as the proxy does (and pose as it from a port of this machine while it is down). Use the default, a Unix socket, or a Redis elsewhere that requires a password (docs/operations.md \"Backends\")" ;;
esac

ensure_sign_key
export DATALAB_SIGN_KEY

# One run.sh per address: workers share their port with any process that asks (SO_REUSEPORT), so a
# second run.sh on it would silently serve beside the first. The lock is held for as long as the
# proxy's processes live (they inherit it), so it is taken once Redis and dockerd, which must not
# inherit it, are started; a second run.sh is told at once, before it starts anything.
exec 9>"$lock"
flock -n 9 || die "another run.sh already serves $host:$port (lock $lock)"
if [ ${#tls_args[@]} -gt 0 ]; then
  say "proxy listening on https://$host:$port/ and, on the same port, http://$host:$port/  (Redis: $DATALAB_REDIS_URL)"
  say "TLS certificate for: $tls_names  (from $DATALAB_TLS_CERT; combined into $tls_file)"
else
  say "proxy listening on http://$host:$port/  (Redis: $DATALAB_REDIS_URL)"
fi
say "sign key: $DATALAB_SIGN_KEY"
[ "$tool" = mitmweb ] && say "flow inspector: http://127.0.0.1:8081/"

# The demo frontend: a child that gets SIGTERM when run.sh (or the mitmdump it becomes) ends; its
# page's origin may frame instances (later --set arguments, yours, override this one).
demo_pid=
if [ -n "$demo" ]; then
  demo_port=${DATALAB_DEMO_PORT:-8090}
  ! (exec 3<>"/dev/tcp/127.0.0.1/$demo_port") 2>/dev/null || die "port $demo_port is taken: set DATALAB_DEMO_PORT"
  case "$host" in 0.0.0.0|::) proxy_host=127.0.0.1 ;; *) proxy_host=$host ;; esac
  DATALAB_URL=${DATALAB_URL:-http://$proxy_host:$port} setpriv --pdeathsig TERM -- \
    "$VENV/bin/python" "$ROOT/scripts/demo.py" --port "$demo_port" &
  demo_pid=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/$demo_port") 2>/dev/null; do
    kill -0 "$demo_pid" 2>/dev/null || die "the demo did not start (see above)"
    sleep 0.1
  done
  # ...and it hears of ends (its "download your work" notice): the proxy POSTs lifecycle events to it.
  set -- --set "datalab_allowed_origins=http://127.0.0.1:$demo_port" \
    --set "datalab_events_url=http://127.0.0.1:$demo_port/events" "$@"
  say "demo: open http://127.0.0.1:$demo_port/"
fi

if [ "$tool" = lean ]; then
  cmd=("$VENV/bin/python" "$ROOT/addon/lean.py")
else
  cmd=("$VENV/bin/$tool" -s "$ROOT/addon/datalab.py")
fi
cmd+=(--mode reverse:http://127.0.0.1:1 --listen-host "$host" --listen-port "$port"
  --set connection_strategy=lazy --set keep_host_header=true "${tls_args[@]}")
# Metrics: worker $1's port, as `metrics` (--set arguments; none without DATALAB_METRICS_PORT).
[[ "${DATALAB_METRICS_PORT:-1}" =~ ^[1-9][0-9]*$ ]] || die "DATALAB_METRICS_PORT must be a port number"
metrics_port() {
  metrics=()
  [ -z "${DATALAB_METRICS_PORT:-}" ] || metrics=(--set "datalab_metrics_port=$((DATALAB_METRICS_PORT + $1 - 1))")
}
metrics_port 1
[ "$workers" = 1 ] && exec "${cmd[@]}" "$@" "${metrics[@]}"

# Several workers: each listens on the port with SO_REUSEPORT (addon/listener.py) and boots its
# share of the CPUs' instances at once; later --set arguments (yours) override these.
cmd+=(--set server=false --set datalab_reuse_port=true
  --set "datalab_boots_at_once=$(( ($(nproc) + workers - 1) / workers ))" "$@")
# Connections waiting in an exiting worker's accept queue go to the others (Linux >= 5.14), not reset.
if [ -w /proc/sys/net/ipv4/tcp_migrate_req ] && [ "$(cat /proc/sys/net/ipv4/tcp_migrate_req)" = 0 ]; then
  echo 1 > /proc/sys/net/ipv4/tcp_migrate_req && say "set net.ipv4.tcp_migrate_req=1"
fi
say "$workers workers on port $port"

# The supervisor: run.sh itself is every worker's parent. A worker that dies is restarted (after
# 1 s, doubling up to 30 s while restarts keep failing fast); a worker that dies in its very first
# start within 5 s is a configuration error: every worker stops and run.sh exits 1. Workers get
# SIGTERM when run.sh dies, however it dies (setpriv --pdeathsig), so none outlives it.
declare -A slot_of=() started_at=() restarts=() backoff=()
start_worker() {
  metrics_port "$1"
  setpriv --pdeathsig TERM -- "${cmd[@]}" "${metrics[@]}" &
  slot_of[$!]=$1
  started_at[$1]=$SECONDS
}
stop_workers() {
  trap - TERM INT HUP
  [ ${#slot_of[@]} -eq 0 ] || kill -TERM "${!slot_of[@]}" 2>/dev/null
  [ -z "$demo_pid" ] || kill -TERM "$demo_pid" 2>/dev/null
  wait
  exit "$1"
}
trap 'stop_workers 0' TERM INT HUP
for i in $(seq 1 "$workers"); do
  restarts[$i]=0 backoff[$i]=1
  start_worker "$i"
done
while true; do
  pid= rc=0
  wait -n -p pid || rc=$?
  [ -n "$pid" ] || continue
  [ -n "${slot_of[$pid]:-}" ] || continue  # a restart's pause (sleep) ending
  i=${slot_of[$pid]}
  unset "slot_of[$pid]"
  lived=$((SECONDS - started_at[$i]))
  # An exit of its own within 5 s of the first start is a start-up failure (bad options, port):
  # every worker would fail alike. A death by a signal (status > 128: killed, OOM) is a crash.
  if [ "${restarts[$i]}" = 0 ] && [ "$lived" -lt 5 ] && [ "$rc" -lt 128 ]; then
    say "worker $i exited with status $rc at start-up; stopping every worker"
    stop_workers 1
  fi
  if [ "$lived" -ge 60 ]; then backoff[$i]=1; fi
  say "worker $i exited with status $rc after ${lived} s; restarting it in ${backoff[$i]} s"
  sleep "${backoff[$i]}" & wait $! || true  # (a signal still stops run.sh at once)
  b=$((backoff[$i] * 2))
  backoff[$i]=$((b > 30 ? 30 : b))
  restarts[$i]=$((restarts[$i] + 1))
  start_worker "$i"
done
