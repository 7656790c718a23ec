#!/usr/bin/env bash
# Builds the datalab Jupyter image with no container registry: debootstrap a Debian rootfs, install
# Notebook 7 and the data stack (image/requirements.txt) from PyPI into a venv inside it, then an
# operator's extra requirements file if given, and `docker import` the tree.
#
#   scripts/build-image.sh [--force] [--extra-requirements FILE] [IMAGE]
#     IMAGE defaults to $DATALAB_IMAGE or datalab-notebook:latest; FILE to $DATALAB_EXTRA_REQUIREMENTS
#     (a pip requirements file of names and pins, installed in the same venv after the base)
#
# Idempotent: exits at once when the image exists and was built from these inputs (unless --force);
# the rootfs tarballs and the downloaded .debs are cached under $DATALAB_CACHE (default
# ~/.cache/datalab). The base rootfs is keyed by what goes into it (this script's rootfs recipe and the
# steps it takes from rootfs.sh, image/requirements.txt); the extra requirements are a second tarball made from the base one and keyed
# by it and the extra file's content, so changing them only reinstalls them. The Jupyter configuration
# (image/*.py: the settings and datalab's server extension, with the proxy's filename rule,
# addon/inputs.py) is added at import time, so changing it only re-imports (seconds), it does not
# debootstrap again.
# Needs root (debootstrap, chroot), debootstrap and a running Docker engine.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
build=build-image
force=0
# shellcheck source=rootfs.sh
. "$here/scripts/rootfs.sh"
extra=${DATALAB_EXTRA_REQUIREMENTS:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1; shift ;;
    --extra-requirements) [ $# -ge 2 ] || die "--extra-requirements needs a file"; extra=$2; shift 2 ;;
    --extra-requirements=*) extra=${1#*=}; shift ;;
    -*) die "unknown option $1 (see the top of $0)" ;;
    *) break ;;
  esac
done
if [ -n "$extra" ]; then
  [ -f "$extra" ] && [ -r "$extra" ] || die "extra requirements $extra: no readable file there"
  extra=$(realpath "$extra")
fi
image=${1:-${DATALAB_IMAGE:-datalab-notebook:latest}}
suite=${DATALAB_SUITE:-bookworm}
mirror=${DATALAB_MIRROR:-http://deb.debian.org/debian}
cache=${DATALAB_CACHE:-$HOME/.cache/datalab}

docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd first; run.sh does this for you)"
# The build key covers everything that goes into the image: an image built from other inputs is rebuilt.
# The base rootfs recipe is the part of this script between the "rootfs" and "extra" markers below (so
# the lines above, these keys among them, can change without a debootstrap) and the steps it takes from
# rootfs.sh; the extra step's is the part between the "extra" and "import" markers.
rootfs_key=$(sed -n '/^# --- rootfs ---$/,/^# --- extra ---$/p' "$0" \
      | cat - "$here/scripts/rootfs.sh" "$here/image/requirements.txt" \
      | { cat; echo "$suite $mirror"; } | sha256sum | cut -c1-16)
tarball="$cache/rootfs-$rootfs_key.tar"
if [ -n "$extra" ]; then
  extra_key=$(sed -n '/^# --- extra ---$/,/^# --- import ---$/p' "$0" | cat - "$extra" | sha256sum | cut -c1-16)
  extra_tarball="$cache/rootfs-$rootfs_key-extra-$extra_key.tar"
  rootfs_key="$rootfs_key-extra-$extra_key"
fi
key=$(cat "$0" "$here"/image/*.py "$here/addon/inputs.py" | { cat; echo "$rootfs_key"; } | sha256sum | cut -c1-16)
comment="datalab notebook image ($key)"
exit_if_current "$image" "$comment" "$key"

# --- rootfs ---
# (new_root, bootstrap, in_chroot and pack_root: rootfs.sh)
if [ ! -f "$tarball" ]; then
  bootstrap datalab-rootfs "$suite" "$mirror" "$cache/debs" python3,python3-venv,ca-certificates,tini

  step "installing Jupyter and the data stack (second step, from PyPI) ..."
  cp "$here/image/requirements.txt" "$root/tmp/requirements.txt"
  in_chroot '
    python3 -m venv /opt/jupyter
    /opt/jupyter/bin/pip install --progress-bar off -r /tmp/requirements.txt
    /opt/jupyter/bin/pip uninstall --yes rfc3987-syntax  # (see image/requirements.txt)
    useradd --create-home --uid 1000 --shell /bin/bash datalab
    install -d -o datalab -g datalab /home/datalab/work
    apt-get clean
    rm -rf /var/lib/apt/lists/* /tmp/requirements.txt /usr/share/doc /usr/share/man /root/.cache
  '
  pack_root "$tarball"
fi

# --- extra ---
# The operator's extra requirements, installed in the same venv on a copy of the base rootfs.
if [ -n "$extra" ]; then
  if [ ! -f "$extra_tarball" ]; then
    new_root datalab-rootfs
    step "installing the extra requirements $extra (third step, from PyPI) ..."
    tar -C "$root" --numeric-owner -xpf "$tarball"
    cp "$extra" "$root/tmp/extra-requirements.txt"
    in_chroot '
      /opt/jupyter/bin/pip install --progress-bar off -r /tmp/extra-requirements.txt
      rm -rf /tmp/extra-requirements.txt /root/.cache
    '
    pack_root "$extra_tarball"
  fi
  tarball=$extra_tarball
fi

# --- import ---
# The configuration goes on top of a copy of the cached rootfs (tar -r), owned by root. The root
# file system is read-only at run time (the backend mounts the work directory and /tmp): the
# variables below keep Jupyter's and IPython's own state in /tmp.
layer=$(mktemp -d /var/tmp/datalab-config.XXXXXX)
trap 'rm -rf "$layer"' EXIT
# The settings, and beside them datalab's server extension (datalab_work.py, datalab_archive.py) and
# the proxy's filename rule it loads (as datalab_inputs.py), all on the key above.
for file in "$here"/image/*.py; do
  install -D -m 0644 "$file" "$layer/tree/etc/jupyter/${file##*/}"
done
install -D -m 0644 "$here/addon/inputs.py" "$layer/tree/etc/jupyter/datalab_inputs.py"
# The copy holds no set-uid or set-gid file (su, passwd, mount...): a Swarm service on API 1.41
# cannot ask for no-new-privileges, and such a program would run as uid 0 there. Done on the copy,
# so the cached rootfs (and its key) stay as they are.
python3 - "$tarball" "$layer/rootfs.tar" <<'PY'
import sys
import tarfile

with tarfile.open(sys.argv[1]) as src, tarfile.open(sys.argv[2], "w", format=tarfile.GNU_FORMAT) as dst:
    for member in src:
        data = src.extractfile(member) if member.isreg() else None
        if not member.isdir():  # (a hard link's entry carries a mode too, which import applies)
            member.mode &= ~0o6000
        if member.isreg():
            member.type = tarfile.REGTYPE  # (a sparse entry is written out whole)
        dst.addfile(member, data)
PY
tar -C "$layer/tree" --owner=0 --group=0 --numeric-owner -rf "$layer/rootfs.tar" ./etc/jupyter

step "docker import $tarball (+ configuration) as $image ..."
# (CMD: the server itself, as the process backend runs it: `jupyter notebook` would start a second
# Python that only looks up and execs jupyter-notebook, CPU every boot pays.)
docker import \
  --change 'USER datalab' \
  --change 'WORKDIR /home/datalab/work' \
  --change 'ENV PATH=/opt/jupyter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV HOME=/home/datalab' \
  --change 'ENV JUPYTER_CONFIG_DIR=/tmp/jupyter/config JUPYTER_DATA_DIR=/tmp/jupyter/data JUPYTER_RUNTIME_DIR=/tmp/jupyter/runtime' \
  --change 'ENV IPYTHONDIR=/tmp/ipython XDG_CACHE_HOME=/tmp/cache MPLCONFIGDIR=/tmp/matplotlib' \
  --change 'EXPOSE 8888' \
  --change 'ENTRYPOINT ["/usr/bin/tini", "--"]' \
  --change 'CMD ["jupyter-notebook", "--config=/etc/jupyter/jupyter_server_config.py"]' \
  --message "$comment" \
  "$layer/rootfs.tar" "$image" >&2
step "done: $image"
