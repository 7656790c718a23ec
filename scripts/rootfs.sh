# Sourced by build-image.sh and build-proxy-image.sh: the steps of an image build with no container
# registry that both take. Expects $build (the name every message starts with) and $force (1: --force).
# Both scripts key their rootfs on this file too: changing it rebuilds their rootfs tarballs.

step() { printf '[%s] %s\n' "$build" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$build" "$*" >&2; exit 1; }

# Exits when the image $1 was built from these inputs (its comment is $2, which names their key $3),
# unless --force; else checks that a build can run here.
exit_if_current() {
  if [ "$force" = 0 ] && [ "$(docker image inspect -f '{{.Comment}}' "$1" 2>/dev/null)" = "$2" ]; then
    step "image $1 is up to date ($3); nothing to do (--force rebuilds)"
    exit 0
  fi
  [ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
}

# A rootfs tree under construction in $root (a directory /var/tmp/$1.XXXXXX): removed on exit, never
# while anything is mounted in it.
new_root() {
  root=$(mktemp -d "/var/tmp/$1.XXXXXX")
  trap cleanup EXIT
}
cleanup() {
  for m in dev/pts dev proc; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done
  if ! grep -q " $root/" /proc/mounts; then rm -rf "$root"; fi
}

# A new $root (named after $1) holding Debian $2 (minbase) from the mirror $3 with the packages $5
# (comma-separated), the .debs cached in $4.
bootstrap() {
  new_root "$1"
  mkdir -p "$4"
  step "debootstrap $2 (minbase) into $root ... (a few minutes)"
  debootstrap --variant=minbase --cache-dir="$4" --include="$5" "$2" "$root" "$3" >&2
}

# Runs shell code in the chroot with what pip needs: /proc, /dev, the host's resolver, and the host's
# CA bundle (it may hold a local proxy's CA). Leaves none of them behind in the tree.
in_chroot() {
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca-certificates.crt"
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 PIP_NO_CACHE_DIR=1 \
    sh -ec "$1" >&2
  rm -f "$root/etc/ssl/certs/host-ca-certificates.crt"
  : > "$root/etc/resolv.conf"
  for m in dev/pts dev proc; do umount -l "$root/$m"; done
}

# Packs the tree into $1 (atomically: a tarball in the cache is always whole), then removes the tree.
pack_root() {
  step "packing the rootfs ..."
  tar -C "$root" --numeric-owner -cf "$1.part" .
  mv "$1.part" "$1"
  cleanup
  trap - EXIT
}
