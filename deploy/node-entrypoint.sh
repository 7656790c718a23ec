#!/bin/sh
# A multi-node test swarm's node (scripts/multinode.sh): its own Docker engine, in a container with every
# capability the host has (not --privileged: this host's bounding set lacks CAP_SYS_RESOURCE, which
# --privileged asks for, so runc refuses it), no seccomp filter, /proc/sys writable, its own cgroup namespace.
# Docker mounts /sys and the cgroup hierarchies read-only there: remounted writable, the engine nests its containers'
# cgroups under the node's own.
# DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1: a service's task runs the image the node holds and the engine never
# asks a registry for it (nor pins a tag to a digest); images reach a node by `docker save | docker load`.
# The engine's data is on a volume (/var/lib/docker: overlay2 cannot sit on the container's own overlay).
# It also listens in /run/datalab-node (a host directory mounted there): the host's docker -H reaches it.
set -eu
for m in /sys $(awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts); do
  mount -o remount,bind,rw "$m"
done
export DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1
# A node killed hard and started again keeps its container's /run: the engine's runtime state from before is
# stale. Its containerd pid file matters most: dockerd finds a live process under that pid (pids restart in the
# new pid namespace; a thread of dockerd itself may hold it), waits for a containerd that never comes, and
# gives up with "timeout waiting for containerd to start". /run is runtime state only: cleared.
rm -rf /run/docker /run/docker.pid /run/containerd /run/datalab-node/docker.sock
mkdir -p /run/datalab-node
exec dockerd --host unix:///var/run/docker.sock --host unix:///run/datalab-node/docker.sock \
  --storage-driver overlay2 "$@"
