"""The network instances live on: the proxy's own Docker bridge, and what confines it.

- `enable_icc=false`: instances cannot reach each other.
- `internal` (unless datalab_instance_egress): no way off the machine; Docker gives the network no
  gateway route out and drops anything leaving its subnet.
- A firewall rule of the proxy's own drops every new connection from the bridge to the host itself
  (Docker filters forwarded traffic, not traffic to the host's own addresses): host services bound
  to 0.0.0.0, the proxy's ports, Redis, a TCP Docker API are all out of reach. Replies to the
  proxy's own connections to instances are established traffic and pass.

The proxy reaches an instance at its address on this network (the host holds the bridge's
gateway address), so no port is published anywhere.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.models.networks import Network

from backends import BackendError
from backends.container_spec import LABEL_MANAGED
from backends.container_spec import MANAGED_BY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceNetwork:
    name: str
    bridge: str  # the host's interface for it
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address  # the host's own address on it
    egress: bool

    def holds_instance(self, host: str) -> bool:
        """An address a container on this network can have: in the subnet, not the host's end."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        special = {self.subnet.network_address, self.subnet.broadcast_address, self.gateway}
        return address in self.subnet and address not in special


def network_name(egress: bool) -> str:
    """One network per kind, shared by every proxy on the engine (and named for what it allows)."""
    return "datalab-egress" if egress else "datalab-isolated"


def bridge_name(name: str) -> str:
    """A Linux interface name (at most 15 characters) that says whose it is."""
    return "dl-" + hashlib.sha256(name.encode()).hexdigest()[:10]


def ensure_network(client: docker.DockerClient, name: str, egress: bool) -> InstanceNetwork:
    """The instance network, created (and labelled) if missing; a network of that name that is not
    ours, or not confined as asked, is refused rather than used. Blocking: call it in a thread."""
    isolated = {"com.docker.network.bridge.enable_icc": "false", "com.docker.network.bridge.name": bridge_name(name)}
    net = made_or_found(client, name, driver="bridge", internal=not egress, options=isolated)
    attrs = net.attrs
    options = attrs.get("Options") or {}
    refuse_unconfined(
        name,
        attrs,
        {
            "its egress setting differs": attrs.get("Internal") is egress,
            "it lets containers reach each other": options.get("com.docker.network.bridge.enable_icc") != "false",
        },
    )
    bridge = options.get("com.docker.network.bridge.name") or bridge_name(name)
    return InstanceNetwork(name, bridge, *subnet_and_gateway(name, attrs), egress)


def made_or_found(client: docker.DockerClient, name: str, **create: Any) -> Network:
    """The network `name`, created with `create` and the proxy's label when missing (another proxy
    creating it meanwhile is no error). Blocking: call it in a thread."""
    try:
        return client.networks.get(name)
    except docker.errors.NotFound:
        try:
            client.networks.create(name, **create, labels={LABEL_MANAGED: MANAGED_BY})
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: another proxy created it meanwhile
                raise
    return client.networks.get(name)


def refuse_unconfined(name: str, attrs: dict[str, Any], wrong: dict[str, bool]) -> None:
    """A network found not made by the proxy, or not confined as asked (`wrong`: what is wrong
    with it -> whether it is), is never used: the operator removes it."""
    ours = (attrs.get("Labels") or {}).get(LABEL_MANAGED) == MANAGED_BY
    problems = [why for why, bad in {"it was not made by the proxy": not ours, **wrong}.items() if bad]
    if problems:
        raise BackendError(
            "the instance network is not confined as required",
            f"Docker network {name}: {', '.join(problems)}; remove it (docker network rm {name})",
        )


def subnet_and_gateway(
    name: str, attrs: dict
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The network's subnet and the host's (or the overlay's) own address on it, from its inspect
    data. An engine may leave the gateway out where none was asked for (Docker 20.10's default
    bridge on a fresh engine: {"Subnet": "172.17.0.0/16"}); its IPAM then gave the subnet's first
    address, which is never taken for an instance's either way."""
    config = (attrs.get("IPAM") or {}).get("Config") or []
    if not config or not config[0].get("Subnet"):
        raise BackendError("the instance network has no subnet", f"Docker network {name} has no IPAM subnet")
    subnet = ipaddress.ip_network(config[0]["Subnet"], strict=False)
    return subnet, ipaddress.ip_address(config[0].get("Gateway") or next(subnet.hosts()))


def close_host_to(net: InstanceNetwork) -> None:
    """Drop new connections from the instance bridge to the host itself (idempotent). Without the
    rule an instance reaches every host service bound to 0.0.0.0; the proxy will not start
    instances unconfined, so a failure here is a BackendError."""
    iptables = shutil.which("iptables")
    if iptables is None:
        raise BackendError("instances cannot be confined", "iptables is missing (apt-get install iptables)")
    rule = ["INPUT", "-i", net.bridge, "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP"]
    if subprocess.run([iptables, "-w", "-C", *rule], capture_output=True).returncode == 0:
        return
    done = subprocess.run([iptables, "-w", "-I", *rule], capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendError(
            "instances cannot be confined",
            f"could not add the host firewall rule for {net.bridge} (the proxy needs root): {done.stderr.strip()}",
        )
    log.info("datalab: instances on %s (%s) cannot reach this host's services", net.name, net.bridge)
