#!/usr/bin/env bash
# Builds the datalab proxy image with no container registry, as build-image.sh builds the notebook
# image: debootstrap a Debian rootfs, install the proxy's runtime requirements (the part of
# requirements.txt above "# Tests") from PyPI into a venv in it, then add addon/ and the Jupyter
# configuration at import time and `docker import` the tree. Used by `./run.sh --swarm`, whose stack
# runs this image as the proxy service inside the swarm's overlay network, and as its Redis service
# (Debian's redis-server is in it: nothing is pulled from a registry).
#
#   scripts/build-proxy-image.sh [--force] [IMAGE]     IMAGE defaults to $DATALAB_PROXY_IMAGE or datalab-proxy:latest
#
# Debian trixie, not bookworm: mitmproxy 12 needs Python >= 3.12 (trixie has 3.13). Idempotent: exits at
# once when the image exists and was built from these inputs (unless --force). The rootfs tarball and
# the .debs are cached under $DATALAB_CACHE (default ~/.cache/datalab), keyed by this script's rootfs
# recipe (with the steps it takes from rootfs.sh) and the runtime requirements; the addon is added on
# top, so changing it only re-imports.
# Needs root (debootstrap, chroot), debootstrap and a running Docker engine.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
build=build-proxy-image
force=0
# shellcheck source=rootfs.sh
. "$here/scripts/rootfs.sh"
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1; shift ;;
    -*) die "unknown option $1 (see the top of $0)" ;;
    *) break ;;
  esac
done
image=${1:-${DATALAB_PROXY_IMAGE:-datalab-proxy:latest}}
suite=trixie
mirror=${DATALAB_MIRROR:-http://deb.debian.org/debian}
cache=${DATALAB_CACHE:-$HOME/.cache/datalab}

docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first; run.sh does this for you)"
# The runtime requirements: requirements.txt up to its "# Tests" section.
runtime_requirements() { sed '/^# Tests/,$d' "$here/requirements.txt"; }
rootfs_key=$(sed '/^# --- import ---$/,$d' "$0" | cat - "$here/scripts/rootfs.sh" <(runtime_requirements) \
      | { cat; echo "$suite $mirror"; } | sha256sum | cut -c1-16)
tarball="$cache/proxy-rootfs-$rootfs_key.tar"
key=$( { cat "$0" "$here/image/jupyter_server_config.py" "$here/deploy/proxy-entrypoint.sh" "$here/deploy/edge.py"; \
         find "$here/addon" -name '*.py' -type f | LC_ALL=C sort | xargs cat; echo "$rootfs_key"; } \
       | sha256sum | cut -c1-16)
comment="datalab proxy image ($key)"
exit_if_current "$image" "$comment" "$key"

# (bootstrap, in_chroot and pack_root: rootfs.sh)
if [ ! -f "$tarball" ]; then
  bootstrap datalab-proxy-rootfs "$suite" "$mirror" "$cache/debs-$suite" \
    python3,python3-venv,ca-certificates,tini,redis-server
  step "installing the proxy's runtime requirements (from PyPI) ..."
  runtime_requirements > "$root/tmp/requirements.txt"
  in_chroot '
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --progress-bar off -r /tmp/requirements.txt
    apt-get clean
    rm -rf /var/lib/apt/lists/* /tmp/requirements.txt /usr/share/doc /usr/share/man /root/.cache
  '
  pack_root "$tarball"
fi

# --- import ---
# The addon, its entrypoint (deploy/proxy-entrypoint.sh), the edge (deploy/edge.py) and the Jupyter
# configuration (its backends read it beside addon/, as in the repository) go on top of a copy of the cached rootfs, owned by root. The proxy runs as root in its container:
# it talks to the mounted Docker socket (it manages the instances' services).
layer=$(mktemp -d /var/tmp/datalab-proxy-config.XXXXXX)
trap 'rm -rf "$layer"' EXIT
mkdir -p "$layer/tree/opt/datalab/image"
(cd "$here" && find addon -name '*.py' -type f -print0 | xargs -0 cp --parents -t "$layer/tree/opt/datalab")
install -m 0644 "$here/image/jupyter_server_config.py" "$layer/tree/opt/datalab/image/"
install -m 0755 "$here/deploy/proxy-entrypoint.sh" "$layer/tree/opt/datalab/entrypoint.sh"
install -m 0644 "$here/deploy/edge.py" "$layer/tree/opt/datalab/edge.py"
cp "$tarball" "$layer/rootfs.tar"
tar -C "$layer/tree" --owner=0 --group=0 --numeric-owner -rf "$layer/rootfs.tar" ./opt/datalab

previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
step "docker import $tarball (+ addon) as $image ..."
docker import \
  --change 'WORKDIR /opt/datalab' \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV HOME=/root PYTHONUNBUFFERED=1' \
  --change 'EXPOSE 8080' \
  --change 'ENTRYPOINT ["/usr/bin/tini", "--", "/opt/datalab/entrypoint.sh"]' \
  --message "$comment" \
  "$layer/rootfs.tar" "$image" >&2
# The image it replaces (each import is a new one; the addon changes often): removed unless a container uses it.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
step "done: $image"
