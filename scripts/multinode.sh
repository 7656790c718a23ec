#!/usr/bin/env bash
# A three-node swarm on this machine, for multi-node tests: each node a container running its own Docker
# engine (the image of scripts/build-node-image.sh), on a bridge network of its own, joined into one swarm
# that is not the host's (the host's engine and its swarm are left alone).
#
#   scripts/multinode.sh up        build the node image if needed, start the nodes, make the swarm, load the images
#   scripts/multinode.sh down      remove every node, their engines' data, the network: nothing is left
#   scripts/multinode.sh status    the nodes, their engines and their swarm
#   scripts/multinode.sh deploy [mitmproxy arguments ...]
#                                  deploy/datalab-stack.yml on that swarm (docs/operations.md: "A multi-node
#                                  swarm on one machine")
#
# Nodes datalab-mn-1..3 (containers, hostnames and swarm nodes alike), their roles as node labels:
#   datalab-mn-1  datalab.state (Redis, the edge), datalab.proxy   the stack's state: never an instance here
#   datalab-mn-2  datalab.proxy, datalab.instances
#   datalab-mn-3  datalab.instances
# All three are managers by default (DATALAB_MN_MANAGERS=3): a proxy replica creates its instances' services
# through its own node's engine, which must be a manager's, and three managers keep the swarm's quorum when one
# node is lost. DATALAB_MN_MANAGERS=1 makes datalab-mn-1 the only manager (then no replica may run elsewhere).
#
# Each engine's data is on a volume (datalab-mn-N-engine; or in memory: DATALAB_MN_ENGINE_DATA=tmpfs, see
# engine_data): `up` again is quick (a running swarm is kept, an image a node holds already is not loaded again).
# `up` also brings back a node that was stopped (`docker kill datalab-mn-3`: a node lost): restarted, it rejoins
# by itself with its engine's data on a volume (~5 s), or joins anew (its old entry removed) and gets the images.
# Each engine's socket is also in /run/datalab-mn/datalab-mn-N/docker.sock, for `docker -H unix://...` from the
# host; every address of the bridge network is reachable from the host.
# The images (DATALAB_IMAGE, DATALAB_PROXY_IMAGE: the host's, never rebuilt here) are loaded into every node by
# `docker save | docker load` (saved once per image ID under $DATALAB_CACHE/multinode); the nodes never pull
# anything (their network is internal: no way out, and their engines never ask a registry).
#
# deploy: the stack DATALAB_STACK (default datalab) with DATALAB_REPLICAS=2 proxy replicas, one on each
# datalab.proxy node, instances only on datalab.instances nodes (--set datalab_swarm_constraint), Redis and its
# append-only file on a volume of datalab-mn-1, DATALAB_PORT (default 8080) published on datalab-mn-1's address
# (the edge: this kernel has no IPVS for Swarm's routing mesh; the mesh where it has). DATALAB_SIGN_KEY is
# required (fixed at a stack's first deployment: a secret cannot change); DATALAB_KEY_PREFIX, DATALAB_IMAGE,
# DATALAB_PROXY_IMAGE as for ./run.sh --swarm. Deploying again updates the stack. It ends once the addon
# answers on the published port, and prints the URL.
# Needs root, a running Docker engine on the host, and the notebook and proxy images built.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '[multinode] %s\n' "$*" >&2; }
die() { printf '[multinode] error: %s\n' "$*" >&2; exit 1; }

NODES=(datalab-mn-1 datalab-mn-2 datalab-mn-3)
declare -A ROLES=([datalab-mn-1]="state proxy" [datalab-mn-2]="proxy instances" [datalab-mn-3]="instances")
NETWORK=datalab-mn-net
LABEL=datalab.multinode=1  # on every container, volume and network this script makes
SOCKETS=/run/datalab-mn
NODE_IMAGE=${DATALAB_NODE_IMAGE:-datalab-node:latest}
IMAGES=("${DATALAB_IMAGE:-datalab-notebook:latest}" "${DATALAB_PROXY_IMAGE:-datalab-proxy:latest}")
MANAGERS=${DATALAB_MN_MANAGERS:-3}
cache=${DATALAB_CACHE:-$HOME/.cache/datalab}/multinode
[[ "$MANAGERS" =~ ^[13]$ ]] || die "DATALAB_MN_MANAGERS=$MANAGERS: 1 or 3"

# The docker CLI on node $1's engine.
on() { local node=$1; shift; docker -H "unix://$SOCKETS/$node/docker.sock" "$@"; }
address() { docker inspect -f "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "$1"; }

ensure_network() {
  docker network inspect "$NETWORK" >/dev/null 2>&1 && return 0
  say "creating the bridge network $NETWORK (internal: the nodes have no way out)"
  docker network create --driver bridge --internal --label "$LABEL" "$NETWORK" >/dev/null
}

# Node $1 running (started, or created: every capability the host has but no --privileged, which asks for
# CAP_SYS_RESOURCE that this host's bounding set may lack; deploy/node-entrypoint.sh says what else it needs).
ensure_node() {
  local node=$1 state
  state=$(docker inspect -f '{{.State.Status}}' "$node" 2>/dev/null || true)
  case "$state" in
    running) return 0 ;;
    "") say "starting node $node"
      mkdir -p "$SOCKETS/$node"
      docker run --detach --name "$node" --hostname "$node" --label "$LABEL" \
        --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \
        --security-opt systempaths=unconfined --cgroupns private --network "$NETWORK" \
        --mount "$(engine_data "$node")" \
        --mount "type=bind,src=$SOCKETS/$node,dst=/run/datalab-node" \
        "$NODE_IMAGE" >/dev/null ;;
    *) say "restarting node $node (it was $state)"
      mkdir -p "$SOCKETS/$node"
      docker start "$node" >/dev/null ;;
  esac
}

# Where node $1's engine keeps its data (a --mount): a volume (kept while the node is), or memory (quicker to
# fill and to remove, gone with the node: DATALAB_MN_ENGINE_DATA=tmpfs; ~1.3 GB of each node's images in RAM).
engine_data() {
  case "${DATALAB_MN_ENGINE_DATA:-volume}" in
    volume) echo "type=volume,src=$1-engine,dst=/var/lib/docker,volume-label=$LABEL" ;;
    tmpfs) echo "type=tmpfs,dst=/var/lib/docker" ;;
    *) die "DATALAB_MN_ENGINE_DATA=$DATALAB_MN_ENGINE_DATA: volume or tmpfs" ;;
  esac
}

wait_engine() {
  local node=$1 i
  for i in $(seq 1 120); do
    on "$node" info >/dev/null 2>&1 && return 0
    docker inspect -f '{{.State.Running}}' "$node" 2>/dev/null | grep -qx true \
      || die "node $node stopped: $(docker logs --tail 20 "$node" 2>&1)"
    sleep 0.5
  done
  die "the engine of node $node did not answer in 60 s: $(docker logs --tail 20 "$node" 2>&1)"
}

# The swarm: initialised on the first node, the others joined (as managers or workers); a node in another
# swarm (a stale one) leaves it first. Each node gets its role labels.
ensure_swarm() {
  local first=${NODES[0]} node i ready token kind state
  if [ "$(on "$first" info -f '{{.Swarm.LocalNodeState}}')" != active ]; then
    say "initialising the swarm on $first"
    on "$first" swarm init --advertise-addr "$(address "$first")" >/dev/null
  fi
  ready=$(on "$first" node ls --format '{{.Hostname}} {{.Status}}')
  for i in "${!NODES[@]}"; do
    node=${NODES[$i]}
    [ "$i" = 0 ] && continue
    grep -qx "$node Ready" <<<"$ready" && continue
    state=$(on "$node" info -f '{{.Swarm.LocalNodeState}}')
    # A node restarted with its engine's data rejoins by itself within seconds.
    [ "$state" = active ] && ready_within "$first" "$node" 30 && continue
    [ "$state" = inactive ] || on "$node" swarm leave --force >/dev/null
    # Entries a node left behind (it joins anew with another ID) go first: a manager's is demoted, then removed.
    local stale
    for stale in $(on "$first" node ls --format '{{.ID}} {{.Hostname}} {{.Status}}' \
                   | awk -v n="$node" '$2 == n && $3 != "Ready" { print $1 }'); do
      on "$first" node demote "$stale" >/dev/null 2>&1 || true
      on "$first" node rm --force "$stale" >/dev/null
    done
    if [ "$i" -lt "$MANAGERS" ]; then kind=manager; else kind=worker; fi
    say "joining $node to the swarm as a $kind"
    token=$(on "$first" swarm join-token -q "$kind")
    on "$node" swarm join --token "$token" --advertise-addr "$(address "$node")" "$(address "$first"):2377" >/dev/null
  done
  for node in "${NODES[@]}"; do
    local args=() role
    for role in ${ROLES[$node]}; do args+=(--label-add "datalab.$role=true"); done
    on "$first" node update "${args[@]}" "$node" >/dev/null
  done
}

# Whether manager $1 sees node $2 ready within $3 seconds.
ready_within() {
  local i
  for i in $(seq 1 $(($3 * 2))); do
    on "$1" node ls --format '{{.Hostname}} {{.Status}}' | grep -qx "$2 Ready" && return 0
    sleep 0.5
  done
  return 1
}

# Image $1 in every node, as the host has it (the same ID): saved once per ID, loaded where it differs.
ensure_image_everywhere() {
  local image=$1 id tar node missing=()
  id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null) \
    || die "image $image is missing on the host: build it (scripts/build-image.sh, scripts/build-proxy-image.sh)"
  for node in "${NODES[@]}"; do
    [ "$(on "$node" image inspect -f '{{.Id}}' "$image" 2>/dev/null)" = "$id" ] || missing+=("$node")
  done
  [ ${#missing[@]} = 0 ] && return 0
  tar="$cache/${id#sha256:}.tar"
  if [ ! -f "$tar" ]; then
    say "saving $image (${id:7:12}) to $tar"
    mkdir -p "$cache"
    rm -f "$cache"/*.tar.part
    docker save "$image" -o "$tar.part" && mv "$tar.part" "$tar"
  fi
  say "loading $image into ${missing[*]}"
  local pids=()
  for node in "${missing[@]}"; do
    { on "$node" load -q -i "$tar" >/dev/null && on "$node" image prune -f >/dev/null; } &
    pids+=($!)
  done
  for node in "${pids[@]}"; do wait "$node" || die "loading $image into a node failed"; done
}

# The saved images no image of the host has any more (an image rebuilt since) are removed.
prune_saved() {
  local tar keep
  keep=$(for image in "${IMAGES[@]}"; do docker image inspect -f '{{.Id}}' "$image" 2>/dev/null; done)
  for tar in "$cache"/*.tar; do
    [ -e "$tar" ] || continue
    grep -q "sha256:$(basename "$tar" .tar)" <<<"$keep" || rm -f "$tar"
  done
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  docker info >/dev/null 2>&1 || die "no Docker engine answers on the host"
  "$here/scripts/build-node-image.sh" "$NODE_IMAGE" || die "building the node image failed (see above)"
  ensure_network
  local node image
  for node in "${NODES[@]}"; do ensure_node "$node"; done
  for node in "${NODES[@]}"; do wait_engine "$node"; done
  ensure_swarm
  for image in "${IMAGES[@]}"; do ensure_image_everywhere "$image"; done
  prune_saved
  say "up: ${NODES[*]} (docker -H unix://$SOCKETS/${NODES[0]}/docker.sock node ls)"
}

down() {
  local containers
  containers=$(docker ps -aq --filter "label=$LABEL")
  if [ -n "$containers" ]; then
    say "removing the nodes"
    # shellcheck disable=SC2086
    docker rm --force --volumes $containers >/dev/null
  fi
  local volume pids=()
  for volume in $(docker volume ls -q --filter "label=$LABEL"); do  # in parallel: each is an engine's files
    docker volume rm "$volume" >/dev/null &
    pids+=($!)
  done
  for volume in "${pids[@]}"; do wait "$volume" || die "a volume was not removed (see above)"; done
  docker network ls -q --filter "label=$LABEL" | xargs -r docker network rm >/dev/null
  rm -rf "$SOCKETS"
  say "down: nothing of the multi-node swarm is left (the node image and saved images stay in their caches)"
}

status() {
  local node
  docker ps -a --filter "label=$LABEL" --format 'table {{.Names}}\t{{.Status}}'
  for node in "${NODES[@]}"; do
    if on "$node" info >/dev/null 2>&1; then
      printf '%s (%s): swarm %s, images: %s\n' "$node" "$(address "$node")" \
        "$(on "$node" info -f '{{.Swarm.LocalNodeState}}')" \
        "$(on "$node" image ls --format '{{.Repository}}:{{.Tag}}' | grep -v '<none>' | tr '\n' ' ')"
    else
      printf '%s: no engine answers\n' "$node"
    fi
  done
  if on "${NODES[0]}" node ls >/dev/null 2>&1; then
    on "${NODES[0]}" node ls --format 'table {{.Hostname}}\t{{.Status}}\t{{.Availability}}\t{{.ManagerStatus}}'
  fi
}

deploy() {
  local first=${NODES[0]} stack=${DATALAB_STACK:-datalab} network=${DATALAB_SWARM_NETWORK:-datalab-swarm} dir
  [ -n "${DATALAB_SIGN_KEY:-}" ] || die "set DATALAB_SIGN_KEY (the key the stack signs and checks with)"
  on "$first" node ls >/dev/null 2>&1 || die "no multi-node swarm is up: scripts/multinode.sh up"
  export DATALAB_PORT=${DATALAB_PORT:-8080} DATALAB_REPLICAS=${DATALAB_REPLICAS:-2} DATALAB_SWARM_NETWORK=$network
  if ! on "$first" network inspect "$network" >/dev/null 2>&1; then
    # encrypted where the nodes' kernel (this host's) has ESP, as the addon makes it (overlay_crypto.py)
    local encrypted=()
    grep -qE ' esp_(output|input)$' /proc/kallsyms 2>/dev/null && encrypted=(--opt encrypted)
    on "$first" network create --driver overlay --internal --attachable "${encrypted[@]}" \
      --label datalab.managed-by=datalab-proxy "$network" >/dev/null
  fi
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' RETURN
  (umask 077; printf '%s' "$DATALAB_SIGN_KEY" > "$dir/sign_key")
  export DATALAB_SIGN_KEY_FILE="$dir/sign_key"
  local publish=edge
  [ -e /proc/net/ip_vs ] && publish=mesh
  python3 -c 'import json, sys; print(json.dumps({"version": "3.8", "services": {"proxy": {"command": sys.argv[1:]}}}))' \
    --set "datalab_swarm_constraint=node.labels.datalab.instances==true" \
    --set "datalab_swarm_network=$network" "$@" > "$dir/args.yml"
  say "deploying the stack $stack ($publish publishes port $DATALAB_PORT on $(address "$first"))"
  on "$first" stack deploy --resolve-image never -c "$here/deploy/datalab-stack.yml" -c "$here/deploy/publish-$publish.yml" \
    -c "$here/deploy/multinode.yml" -c "$dir/args.yml" "$stack" >&2
  local service want
  for service in proxy:"$DATALAB_REPLICAS" redis:1 $([ "$publish" = edge ] && echo edge:1); do
    want=${service#*:}
    service="${stack}_${service%%:*}"
    wait_running "$first" "$service" "$want"
  done
  wait_answering "http://$(address "$first"):$DATALAB_PORT"
  say "the stack $stack answers on http://$(address "$first"):$DATALAB_PORT/"
}

# Until the addon answers at $1 (its 404 for /datalab/: a replica's task runs before mitmdump listens).
wait_answering() {
  python3 - "$1" <<'PY' || die "nothing answered at $1/datalab/ within 60 s"
import json, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(sys.argv[1] + "/datalab/", timeout=5)
    except urllib.error.HTTPError as e:
        if e.code == 404 and json.load(e).get("code") == "NOT_FOUND":
            sys.exit(0)
    except (OSError, ValueError):
        pass
    time.sleep(0.5)
sys.exit(1)
PY
}

# Until $3 tasks of service $2 run, as manager $1 sees them (2 minutes at most); a task that failed or was
# rejected ends it, saying why.
wait_running() {
  local manager=$1 service=$2 want=$3 states i
  for i in $(seq 1 240); do
    states=$(on "$manager" service ps --no-trunc --filter desired-state=running --format '{{.CurrentState}}|{{.Error}}' "$service")
    [ "$(grep -c '^Running' <<<"$states" || true)" -ge "$want" ] && return 0
    if grep -qE '^(Rejected|Failed)' <<<"$states"; then
      die "a task of $service did not start: $(grep -E '^(Rejected|Failed)' <<<"$states" | head -1)"
    fi
    sleep 0.5
  done
  die "$service: fewer than $want task(s) running after 2 minutes: $(on "$manager" service ps --no-trunc "$service" 2>&1 | tail -3)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  deploy) shift; deploy "$@" ;;
  *) die "usage: $0 up|down|status|deploy [mitmproxy arguments ...] (see the top of $0)" ;;
esac
