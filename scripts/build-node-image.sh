#!/usr/bin/env bash
# Builds the image of a multi-node test swarm's node (scripts/multinode.sh) with no container registry, as
# build-image.sh builds the notebook image: debootstrap a Debian rootfs holding Debian's Docker engine
# (docker.io, with iptables and iproute2) and `docker import` it. A node is a container with nearly every
# privilege whose entrypoint (deploy/node-entrypoint.sh) starts that engine; images reach it by `docker save |
# docker load`.
#
#   scripts/build-node-image.sh [--force] [IMAGE]     IMAGE defaults to $DATALAB_NODE_IMAGE or datalab-node:latest
#
# Bookworm: the engine the host runs (20.10, API 1.41), so a node is what a swarm's machine would be.
# Idempotent: exits at once when the image exists and was built from these inputs (unless --force). The
# rootfs tarball and the .debs are cached under $DATALAB_CACHE (default ~/.cache/datalab), keyed by this
# script's rootfs recipe (with the steps it takes from rootfs.sh); the entrypoint is added on top.
# Needs root (debootstrap, chroot), debootstrap and a running Docker engine.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
build=build-node-image
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
image=${1:-${DATALAB_NODE_IMAGE:-datalab-node:latest}}
suite=bookworm
mirror=${DATALAB_MIRROR:-http://deb.debian.org/debian}
cache=${DATALAB_CACHE:-$HOME/.cache/datalab}

docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first)"
rootfs_key=$(sed '/^# --- import ---$/,$d' "$0" | cat - "$here/scripts/rootfs.sh" \
      | { cat; echo "$suite $mirror"; } | sha256sum | cut -c1-16)
tarball="$cache/node-rootfs-$rootfs_key.tar"
key=$(cat "$0" "$here/deploy/node-entrypoint.sh" | { cat; echo "$rootfs_key"; } | sha256sum | cut -c1-16)
comment="datalab node image ($key)"
exit_if_current "$image" "$comment" "$key"

# (bootstrap, in_chroot and pack_root: rootfs.sh)
if [ ! -f "$tarball" ]; then
  bootstrap datalab-node-rootfs "$suite" "$mirror" "$cache/debs" \
    docker.io,iptables,iproute2,tini,ca-certificates,procps
  in_chroot '
    apt-get clean
    rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man
  '
  pack_root "$tarball"
fi

# --- import ---
layer=$(mktemp -d /var/tmp/datalab-node-config.XXXXXX)
trap 'rm -rf "$layer"' EXIT
install -D -m 0755 "$here/deploy/node-entrypoint.sh" "$layer/tree/usr/local/sbin/datalab-node"
cp "$tarball" "$layer/rootfs.tar"
tar -C "$layer/tree" --owner=0 --group=0 --numeric-owner -rf "$layer/rootfs.tar" ./usr/local/sbin/datalab-node

previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
step "docker import $tarball (+ entrypoint) as $image ..."
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'VOLUME /var/lib/docker' \
  --change 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/sbin/datalab-node"]' \
  --message "$comment" \
  "$layer/rootfs.tar" "$image" >&2
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
step "done: $image"
