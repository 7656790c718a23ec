#!/usr/bin/env bash
# `./run.sh --swarm [mitmproxy arguments ...]`: the proxy and its Redis as a stack on this machine's swarm
# (a single-node swarm is initialised when the engine is in none), in the foreground.
#
# Builds the notebook and proxy images when missing (locally: nothing is pulled), creates the instances'
# overlay network (internal, attachable) when missing, deploys deploy/datalab-stack.yml with DATALAB_REPLICAS
# proxy replicas (default 2) publishing DATALAB_PORT (default 8080) (publish-mesh.yml or publish-edge.yml), waits for every
# replica to run, then follows the proxy's logs. SIGINT/SIGTERM remove the stack, then every instance
# service of this proxy's key prefix (the proxies are gone first, so none starts another meanwhile).
# Arguments are mitmproxy's, given to every replica (e.g. --set datalab_pool_size=2); run.sh's own flags
# (--web, --lean, --workers, --demo) and TLS are not for --swarm, nor are where a replica listens (-p,
# --listen-port, --listen-host, --mode, their --set forms: the port is DATALAB_PORT; deploy/swarm_args.py)
# or another backend: all refused at once. --set datalab_image, datalab_sign_key, datalab_key_prefix and
# datalab_swarm_network win over their variables below, as in ./run.sh.
#
#   DATALAB_STACK          the stack's name (default datalab)
#   DATALAB_REPLICAS       proxy replicas (default 2)
#   DATALAB_PORT           published port, on every node's addresses (default 8080)
#   DATALAB_SWARM_NETWORK  the instances' overlay network (default datalab-swarm)
#   DATALAB_SWARM_PUBLISH  mesh (Swarm's routing mesh; needs the kernel's IPVS) or edge (deploy/edge.py);
#                          default: mesh when this kernel has IPVS
#   DATALAB_PROXY_IMAGE    the proxy image (default datalab-proxy:latest; scripts/build-proxy-image.sh)
#   DATALAB_SIGN_KEY, DATALAB_IMAGE, DATALAB_KEY_PREFIX, DATALAB_SIGN_SCHEME, DATALAB_ROUTING,
#   DATALAB_PUBLIC_HOST    as for ./run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../scripts/setup.sh
. "$ROOT/scripts/setup.sh"

for arg in "$@"; do
  case "$arg" in
    --web|--lean|--workers|--demo|--tls-check)
      die "$arg is not for --swarm: the stack runs mitmdump replicas (DATALAB_REPLICAS), see docs/operations.md \"Swarm\"" ;;
  esac
done
[ -z "${DATALAB_TLS_CERT:-}${DATALAB_TLS_KEY:-}" ] || die "--swarm does not serve TLS itself: put a TLS-terminating load balancer before the published port"
# Arguments that would leave the published port answering nothing (another port, address or mode for the
# replicas: every request would hang) are refused at once, before anything is prepared or deployed.
[ -x "$VENV/bin/python" ] || ensure_venv
if ! refused=$("$VENV/bin/python" "$ROOT/deploy/swarm_args.py" "$@"); then
  [ -n "$refused" ] || die "mitmdump refuses these arguments (see above), so every replica would"
  die "$refused"
fi
take_sets "$@"  # --set datalab_image=..., datalab_key_prefix=...: prepared (and cleaned up) as the replicas use them
stack=${DATALAB_STACK:-datalab}
[[ "$stack" =~ ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$ ]] || die "DATALAB_STACK=$stack: letters, digits, _ . - only"
replicas=${DATALAB_REPLICAS:-2}
[[ "$replicas" =~ ^[1-9][0-9]*$ ]] || die "DATALAB_REPLICAS must be a number of replicas, e.g. 2"
export DATALAB_REPLICAS=$replicas
export DATALAB_PORT=${DATALAB_PORT:-8080}
[[ "$DATALAB_PORT" =~ ^[1-9][0-9]*$ ]] || die "DATALAB_PORT must be a port number"
export DATALAB_SWARM_NETWORK=${DATALAB_SWARM_NETWORK:-datalab-swarm}
export DATALAB_KEY_PREFIX=${DATALAB_KEY_PREFIX:-datalab:}
network=$DATALAB_SWARM_NETWORK
dir="$STATE/swarm"
mkdir -p "$dir" && chmod 700 "$dir"

# One run.sh per stack: a second would update the first's stack, then remove it when it ends.
exec 9>"$dir/$stack.lock"
flock -n 9 || die "another run.sh --swarm already runs the stack $stack (lock $dir/$stack.lock): set DATALAB_STACK"
# A stack of that name left by a run.sh killed outright is taken over (updated, then removed at the end).
if docker stack ls --format '{{.Name}}' 2>/dev/null | grep -qx "$stack"; then
  say "the stack $stack is deployed already (a run.sh killed outright?): taking it over"
else
  ! (exec 3<>"/dev/tcp/127.0.0.1/$DATALAB_PORT") 2>/dev/null || die "port $DATALAB_PORT is taken: set DATALAB_PORT"
fi

ensure_packages
ensure_venv
ensure_docker
ensure_swarm
ensure_image
ensure_proxy_image

# The sign key, as run.sh keeps it, handed to the stack as a secret file (root's alone).
ensure_sign_key
export DATALAB_SIGN_KEY_FILE="$dir/$stack.sign_key"
(umask 077; printf '%s' "$DATALAB_SIGN_KEY" > "$DATALAB_SIGN_KEY_FILE")

# The instances' network: made by the proxy's side, never by the stack (it outlives a stack's removal while
# instances are still on it), labelled as the backends label what they make.
if ! docker network inspect "$network" >/dev/null 2>&1; then
  say "creating the instances' overlay network $network (internal, attachable)"
  docker network create --driver overlay --internal --attachable \
    --label datalab.managed-by=datalab-proxy "$network" >/dev/null
fi
[ "$(docker network inspect -f '{{.Driver}}' "$network")" = overlay ] \
  || die "network $network exists but is not an overlay network: remove it or set DATALAB_SWARM_NETWORK"

# The published port: Swarm's routing mesh where the kernel has IPVS, else the stack's edge (publish-edge.yml).
publish=${DATALAB_SWARM_PUBLISH:-}
if [ -z "$publish" ]; then
  if [ -e /proc/net/ip_vs ] || modprobe -q ip_vs 2>/dev/null; then publish=mesh; else publish=edge; fi
fi
case "$publish" in mesh|edge) ;; *) die "DATALAB_SWARM_PUBLISH=$publish: choose mesh or edge" ;; esac
[ "$publish" = mesh ] || say "this kernel has no IPVS (Swarm's routing mesh needs it): an edge task publishes port $DATALAB_PORT"

# mitmproxy arguments go to every replica as the service's command (a second compose file: JSON is YAML).
files=(-c "$ROOT/deploy/datalab-stack.yml" -c "$ROOT/deploy/publish-$publish.yml")
args=("$@")
[ "$network" = datalab-swarm ] || args=(--set "datalab_swarm_network=$network" "${args[@]}")
if [ ${#args[@]} -gt 0 ]; then
  "$VENV/bin/python" -c 'import json, sys; print(json.dumps({"version": "3.8", "services": {"proxy": {"command": sys.argv[1:]}}}))' \
    "${args[@]}" > "$dir/$stack.args.yml"
  files+=(-c "$dir/$stack.args.yml")
fi

# Removal: the stack (its proxies first), then the instance services they left, the stack's network and
# secret once nothing uses them. Bounded: every wait gives up after a minute and says so.
remove_stack() {
  trap - TERM INT HUP
  [ -n "${logs_pid:-}" ] && kill "$logs_pid" 2>/dev/null
  say "removing the stack $stack"
  docker stack rm "$stack" >/dev/null 2>&1 || true
  local i
  for i in $(seq 1 120); do
    [ -z "$(docker ps -q --filter "label=com.docker.stack.namespace=$stack")" ] && break
    sleep 0.5
  done
  local services
  services=$(docker service ls -q --filter label=datalab.managed-by=datalab-proxy \
    --filter "label=datalab.prefix=$DATALAB_KEY_PREFIX")
  if [ -n "$services" ]; then
    say "removing $(wc -w <<<"$services") instance service(s)"
    # shellcheck disable=SC2086
    docker service rm $services >/dev/null 2>&1 || true
  fi
  # A stack's network is removed only once its tasks' containers are: the first stack rm may have been early.
  local net
  for net in "${stack}_state" "${stack}_front"; do
    for i in $(seq 1 60); do
      docker network inspect "$net" >/dev/null 2>&1 || break
      docker network rm "$net" >/dev/null 2>&1 || sleep 1
    done
  done
  docker secret rm "${stack}_datalab_sign_key" >/dev/null 2>&1 || true
  rm -f "$DATALAB_SIGN_KEY_FILE"
  say "stack $stack removed"
  exit "${1:-0}"
}
trap 'remove_stack 0' TERM INT HUP

say "deploying the stack $stack: $replicas proxy replica(s) and Redis, port $DATALAB_PORT published"
docker stack deploy --resolve-image never "${files[@]}" "$stack" >&2 || remove_stack 1

# Ready when every task of $1 runs ($2 of them); a task that fails or is rejected ends it at once, saying why.
wait_running() {
  local service=$1 want=$2 states running=0 i
  for i in $(seq 1 240); do
    # Every task so far (a rejected one is replaced, its desired state then "shutdown"): the stack is new.
    states=$(docker service ps --no-trunc --format '{{.CurrentState}}|{{.Error}}' "$service" 2>/dev/null || true)
    running=$(grep -c '^Running' <<<"$states" || true)
    [ "$running" -ge "$want" ] && return 0
    if grep -qE '^(Rejected|Failed)' <<<"$states"; then
      say "a task of $service did not start: $(grep -E '^(Rejected|Failed)' <<<"$states" | head -1)"
      docker service logs --raw "$service" 2>&1 | tail -20 >&2 || true
      remove_stack 1
    fi
    sleep 0.5 & wait $!
  done
  say "$service: $running of $want task(s) running after 2 minutes: $(docker service ps --no-trunc --format '{{.CurrentState}} {{.Error}}' "$service" 2>&1 | head -1)"
  remove_stack 1
}
service="${stack}_proxy"
wait_running "$service" "$replicas"
wait_running "${stack}_redis" 1
[ "$publish" = mesh ] || wait_running "${stack}_edge" 1
say "proxy listening on http://127.0.0.1:$DATALAB_PORT/ (and every node's addresses): $replicas replica(s) of $service"
say "sign key: $DATALAB_SIGN_KEY"

docker service logs --follow --raw "$service" &
logs_pid=$!
wait "$logs_pid" || true
remove_stack 0
