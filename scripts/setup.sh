# Sourced by run.sh and scripts/test.sh: brings a fresh machine to the point where the proxy runs.
# Each step is idempotent and says what it does; a step that cannot be done says why and how to fix it.
# Expects $ROOT (the repository) to be set.

say() { printf '[datalab] %s\n' "$*" >&2; }
die() { printf '[datalab] error: %s\n' "$*" >&2; exit 1; }

# Absolute (as the proxy's paths.STATE), and fit for a unix:// URL (which ends at ? or #, and decodes %).
STATE=$(realpath -m -s -- "${DATALAB_STATE:-$ROOT/.state}")
case "$STATE" in *[?#%]*) die "DATALAB_STATE=$STATE: a path without ?, # or % please (it goes into a URL)";; esac
VENV=${DATALAB_VENV:-$ROOT/.venv}
mkdir -p "$STATE"
is_root() { [ "$(id -u)" = 0 ]; }

# The options run.sh and deploy/swarm.sh prepare for (the backend's parts, the image, Redis, the sign key, ...)
# come as environment variables (the options' defaults) or as mitmproxy arguments, --set datalab_NAME=VALUE
# or --set=datalab_NAME=VALUE, which win over them (the last one given, as in mitmproxy). take_sets exports
# each one given so, as its variable, before anything is prepared: what is prepared is what the proxy uses.
SET_VARIABLES=(backend:DATALAB_BACKEND image:DATALAB_IMAGE jupyter_env:DATALAB_JUPYTER_ENV
  redis_url:DATALAB_REDIS_URL sign_key:DATALAB_SIGN_KEY key_prefix:DATALAB_KEY_PREFIX
  swarm_network:DATALAB_SWARM_NETWORK)
take_sets() {
  local set name pair
  while [ $# -gt 0 ]; do
    case "$1" in
      --set) set=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
      --set=*) set=${1#--set=}; shift ;;
      *) shift; continue ;;
    esac
    [[ "$set" == datalab_*=* ]] || continue
    name=${set%%=*}; name=${name#datalab_}
    for pair in "${SET_VARIABLES[@]}"; do
      if [ "${pair%%:*}" = "$name" ]; then export "${pair#*:}=${set#*=}"; fi
    done
  done
}

# A Python >= 3.12 (mitmproxy 12 needs it): $DATALAB_PYTHON, then PATH, then pyenv's versions.
find_python() {
  local c
  for c in ${DATALAB_PYTHON:-} python3.14 python3.13 python3.12 python3 \
           "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /root/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

ensure_venv() {
  local py stamp want
  if [ ! -x "$VENV/bin/python" ]; then
    py=$(find_python) || die "no Python >= 3.12 found (mitmproxy 12 needs it). Install one (e.g. apt-get install python3.12, or pyenv install 3.12) or set DATALAB_PYTHON=/path/to/python3.12"
    say "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  stamp="$VENV/.requirements.sha256"
  want=$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing requirements.txt into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt" || die "pip install failed"
    echo "$want" > "$stamp"
  fi
}

# Debian packages: redis-server, the Docker engine, debootstrap (for the image).
ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v setpriv >/dev/null || missing+=(util-linux)  # run.sh --workers: workers end with run.sh; prlimit
  if [ "${DATALAB_BACKEND:-auto}" != process ]; then  # the Docker backend's engine, image and confinement
    command -v dockerd >/dev/null || docker info >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v iptables >/dev/null || missing+=(iptables)  # the host firewall rule that confines instances
  fi
  apt_install "${missing[@]}"
}

# What only the tests use.
ensure_test_packages() {
  local missing=()
  command -v curl >/dev/null || missing+=(curl)  # the tests' HTTP/2 client
  command -v ss >/dev/null || missing+=(iproute2)  # the tests see which workers listen and serve
  command -v chromium >/dev/null || missing+=(chromium)  # the browser tests (headless, driven by Selenium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)  # the Sentinel failover test
  apt_install "${missing[@]}"
}

apt_install() {
  [ $# = 0 ] && return 0
  if is_root && command -v apt-get >/dev/null; then
    say "installing $* with apt-get (once)"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
    # Debian starts redis-server as a service on install where it can; ours are started on demand.
  else
    die "missing $*: install them (Debian: apt-get install $*) or run as root"
  fi
}

ensure_docker() {
  docker info >/dev/null 2>&1 && return 0
  if is_root && command -v dockerd >/dev/null; then
    say "starting dockerd (log: $STATE/dockerd.log)"
    # A session of its own: the engine must outlive whatever started it (a run.sh whose group is stopped).
    setsid nohup dockerd >"$STATE/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "dockerd did not come up in 30 s; see $STATE/dockerd.log"
  fi
  die "no Docker engine answers. Install one (Debian: apt-get install docker.io) and start dockerd, or run as root so this script can"
}

# Build the image when it is missing or was built from other inputs (build-image.sh decides; quick when current).
ensure_image() {
  local image=${DATALAB_IMAGE:-datalab-notebook:latest}
  image_as_is "$image" || "$ROOT/scripts/build-image.sh" "$image" || die "building $image failed (see above)"
}

# The proxy image (./run.sh --swarm runs it as a stack; build-proxy-image.sh decides; quick when current).
ensure_proxy_image() {
  local image=${DATALAB_PROXY_IMAGE:-datalab-proxy:latest}
  image_as_is "$image" || "$ROOT/scripts/build-proxy-image.sh" "$image" || die "building $image failed (see above)"
}

# DATALAB_NO_BUILD=1: an image is used as it is, never (re)built, and its absence is an error. For
# whoever shares one engine's images between checkouts (benchmarks, a worktree's run.sh): a build from
# one checkout's inputs would replace the image under the others. False (build as usual) when unset.
image_as_is() {
  [ "${DATALAB_NO_BUILD:-}" = 1 ] || return 1
  docker image inspect "$1" >/dev/null 2>&1 \
    || die "DATALAB_NO_BUILD=1, and there is no image $1: build it (scripts/build-image.sh, scripts/build-proxy-image.sh) or unset DATALAB_NO_BUILD"
}

# A swarm for the Swarm backend: a single-node one on loopback when the engine is in none.
ensure_swarm() {
  local state
  state=$(docker info -f '{{.Swarm.LocalNodeState}}' 2>/dev/null) || die "no Docker engine answers"
  case "$state" in
    active) return 0 ;;
    inactive) say "initialising a single-node swarm (docker swarm init --advertise-addr 127.0.0.1)"
      docker swarm init --advertise-addr 127.0.0.1 >/dev/null || die "docker swarm init failed (see above)" ;;
    *) die "this engine's swarm state is '$state': wait for it, or leave it (docker swarm leave --force)" ;;
  esac
}

# The Redis run.sh starts by default: on a Unix socket in a directory that is root's alone (with the
# data), not on a TCP port. Process-backend instances share the host's loopback: a port they could
# reach (and read every session's secret and route from), or take while Redis is down (and pose as
# it); a socket there they can do neither with.
LOCAL_REDIS_URL="unix://$STATE/redis/local/redis.sock"

# A directory of $STATE for Redis's data (every instance's secret, written there by redis-server as
# root), made 0700 and checked before anything is done in it: $STATE and below ours alone, no symlink;
# each directory above writable only by its owner, or sticky (as /tmp: no one can rename what is ours
# there). Else another user (an instance's) could read the data, replace the socket, or aim root's
# writes at files of root's.
redis_dir() {
  local dir=$1 d="" part me
  me=$(id -u)
  local -a parts
  IFS=/ read -ra parts <<< "${dir#/}"
  for part in "${parts[@]}"; do
    d=$d/$part
    [ -e "$d" ] || [ -L "$d" ] || mkdir -m 700 "$d" || die "cannot make $d"
    case "$d/" in
      "$STATE/"*)
        [ ! -L "$d" ] && [ -d "$d" ] && [ "$(stat -c %u "$d")" = "$me" ] \
          && [ -z "$(find "$d" -maxdepth 0 -perm /022)" ] ;;
      *) [ -k "$d" ] || [ -z "$(find -L "$d" -maxdepth 0 -perm /022)" ] ;;
    esac || die "$d: Redis keeps every instance's secret under $dir, so $STATE and what is in it must be this user's alone, and no directory above it writable by others (unless sticky, as /tmp)"
  done
  chmod 700 "$STATE/redis" "$dir"
}

# Start a redis-server for $1 unless one answers there already: a unix:// URL of a socket in $STATE,
# or a redis:// URL on this machine (a port: docs/operations.md "Backends" says what process instances can do to it).
ensure_redis() {
  local url=$1 dir where
  local -a at listen
  case "$url" in
    unix://*)
      local socket=${url#unix://}; socket=${socket%%\?*}
      at=(-s "$socket"); where=$socket
      if [ "$(dirname "$socket")" != "$STATE/redis/local" ]; then  # an operator's own: used, never started
        redis-cli "${at[@]}" ping >/dev/null 2>&1 && return 0
        die "Redis at $url does not answer (and it is not run.sh's own socket, so it is not started here)"
      fi
      [ "$(printf %s "$socket" | LC_ALL=C wc -c)" -le 107 ] \
        || die "the Redis socket path $socket is too long for a Unix socket (107 bytes): set DATALAB_STATE to a shorter directory"
      dir=$STATE/redis/local
      redis_dir "$dir"  # (checked before anything answering there is believed)
      if redis-cli "${at[@]}" ping >/dev/null 2>&1; then return 0; fi
      listen=(--port 0 --unixsocket "$socket" --unixsocketperm 700) ;;
    *)
      local hostport host port
      hostport=${url#redis://}; hostport=${hostport%%/*}; hostport=${hostport##*@}
      host=${hostport%%:*}; port=${hostport##*:}; [ "$port" = "$hostport" ] && port=6379
      at=(-h "$host" -p "$port"); where=$host:$port
      if redis-cli "${at[@]}" ping >/dev/null 2>&1; then return 0; fi
      case "$host" in 127.0.0.1|localhost) ;; *) die "Redis at $url does not answer (and it is not local, so it is not started here)";; esac
      dir=$STATE/redis/$port  # each port its own: two servers sharing one would overwrite each other's files
      redis_dir "$dir"
      listen=(--bind "$host" --port "$port") ;;
  esac
  say "starting redis-server on $where (data: $dir, append-only file synced every second)"
  # The append-only file keeps every write but the last second's across a crash (snapshots alone lost
  # minutes of sessions, whose containers were then orphaned).
  redis-server "${listen[@]}" --dir "$dir" --daemonize yes \
    --appendonly yes --appendfsync everysec \
    --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >/dev/null || die "redis-server did not start"
  for _ in $(seq 1 40); do redis-cli "${at[@]}" ping >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "redis-server did not answer on $where; see $dir/redis.log"
}

# DATALAB_SIGN_KEY, unless given: generated once, kept in $STATE/sign_key (root's alone).
ensure_sign_key() {
  if [ -z "${DATALAB_SIGN_KEY:-}" ]; then
    if [ ! -s "$STATE/sign_key" ]; then
      (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/sign_key")
      say "generated a sign key in $STATE/sign_key"
    fi
    DATALAB_SIGN_KEY=$(cat "$STATE/sign_key")
  fi
}

# Runs a command as an unprivileged uid when we are root (as the local-process backend runs Jupyter).
as_unprivileged() {
  if is_root; then (cd / && setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"); else "$@"; fi
}

# A Python >= 3.11 with venv for the host Jupyter env, which an unprivileged uid can run: pyenv's
# under /root (mode 0700) cannot be, so each candidate is tried as that uid. $DATALAB_JUPYTER_PYTHON first.
find_jupyter_python() {
  local c
  for c in ${DATALAB_JUPYTER_PYTHON:-} python3.14 python3.13 python3.12 python3.11 python3 \
           /usr/local/bin/python3.1[1-9] /usr/bin/python3.1[1-9]; do
    c=$(command -v "$c" 2>/dev/null) || continue
    if as_unprivileged "$c" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

# The extra pip requirements file operators add to the image and the host env ($DATALAB_EXTRA_REQUIREMENTS),
# as an absolute path; nothing when unset.
extra_requirements() {
  local file=${DATALAB_EXTRA_REQUIREMENTS:-}
  [ -n "$file" ] || return 0
  [ -f "$file" ] && [ -r "$file" ] || die "DATALAB_EXTRA_REQUIREMENTS=$file: no readable file there"
  realpath "$file"
}

# The host Jupyter env the local-process backend runs (<env>/bin/python -m jupyter notebook): a venv with
# image/requirements.txt (+ the extra file), like the image's. The backend runs it as an unprivileged uid
# when the proxy runs as root, so everything in it is readable and executable by any user. Stamped by a
# hash of its inputs: quick when current.
ensure_jupyter_env() {
  local env=${DATALAB_JUPYTER_ENV:-$STATE/jupyter-env} extra py stamp want out
  extra=$(extra_requirements) || exit 1
  if [ ! -x "$env/bin/python" ]; then
    if ! py=$(find_jupyter_python); then
      if is_root && command -v apt-get >/dev/null; then
        say "installing python3-venv with apt-get (once), for the Jupyter env"
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2 || die "apt-get install python3-venv failed"
      fi
      py=$(find_jupyter_python) || die "no Python >= 3.11 with venv that an unprivileged user can run (pyenv's under /root is not): install one (Debian: apt-get install python3-venv) or set DATALAB_JUPYTER_PYTHON"
    fi
    say "creating the Jupyter env $env with $py"
    [ -n "${DATALAB_JUPYTER_ENV:-}" ] || chmod a+x "$STATE"  # others may pass through, not list
    (umask 022; "$py" -m venv "$env") || die "creating $env failed"
  fi
  stamp="$env/.requirements.sha256"
  want=$({ cat "$ROOT/image/requirements.txt"; [ -z "$extra" ] || { echo "# extra"; cat "$extra"; }; } | sha256sum | cut -d' ' -f1)
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  say "installing image/requirements.txt${extra:+ and $extra} into $env (a minute or two the first time)"
  (
    umask 022
    pip=("$env/bin/pip" install --quiet --disable-pip-version-check)
    "${pip[@]}" -r "$ROOT/image/requirements.txt" || die "pip install into $env failed"
    [ -z "$extra" ] || "${pip[@]}" -r "$extra" || die "pip install -r $extra into $env failed"
    "$env/bin/pip" uninstall --quiet --yes rfc3987-syntax  # (see image/requirements.txt)
  ) || exit 1
  chmod -R a+rX "$env"
  out=$(as_unprivileged "$env/bin/python" -c 'import matplotlib, notebook, pandas' 2>&1) \
    || die "an unprivileged user cannot use $env (is every directory above it searchable by others?): $out"
  as_unprivileged test -r "$ROOT/image/jupyter_server_config.py" \
    || die "an unprivileged user cannot read $ROOT/image/jupyter_server_config.py: make the repository readable by others"
  echo "$want" > "$stamp"
}

# The backend's own parts (DATALAB_BACKEND, or --set datalab_backend: take_sets): Docker's engine and
# image, or the Jupyter env that local instance processes run; auto: Docker when an engine can be
# had here, else the Jupyter env (the proxy then makes the same choice).
# Sets BACKEND_LIKELY: what auto will choose (docker or process), as far as this can tell.
ensure_backend() {
  BACKEND_LIKELY=${DATALAB_BACKEND:-auto}
  case ${DATALAB_BACKEND:-auto} in
    docker) ensure_docker; ensure_image ;;
    process) ensure_jupyter_env ;;
    auto)
      if (ensure_docker); then
        ensure_image
        BACKEND_LIKELY=docker
      else
        say "no Docker engine can run here: instances will be local Jupyter processes (set DATALAB_BACKEND to choose)"
        ensure_jupyter_env
        BACKEND_LIKELY=process
      fi ;;
    *) die "datalab_backend=$DATALAB_BACKEND (DATALAB_BACKEND or --set): choose docker, process or auto (the Swarm backend: ./run.sh --swarm)" ;;
  esac
}

ensure_all() {
  ensure_packages
  ensure_test_packages
  ensure_venv
  ensure_jupyter_env
  ensure_docker
  ensure_image
}
