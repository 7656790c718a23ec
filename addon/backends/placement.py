"""Which swarm nodes a placement constraint lets instances run on, read as Swarm reads it.

The Swarm backend's capacity is the memory of the nodes that can run an instance: every ready node's
memory would count managers or proxy nodes that datalab_swarm_constraint keeps instances off, and
admit starts no node can hold. A constraint is `<key> == <value>` or `<key> != <value>` with the keys
of `docker service create --constraint` (node.id, node.hostname, node.role, node.platform.os,
node.platform.arch, node.labels.<name>, engine.labels.<name>); values compare as Swarm compares them,
ignoring case. Pure functions of a node's inspect data (nothing here calls an engine).
"""

from __future__ import annotations

import re
from typing import Any
from typing import NamedTuple

KEYS = ("node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch")
LABELLED = ("node.labels.", "engine.labels.")
SHAPE = re.compile(r"\s*([\w.\-]+)\s*(==|!=)\s*(\S.*?)\s*")


class Constraint(NamedTuple):
    key: str
    equal: bool  # == (True) or != (False)
    value: str


def parse_constraint(text: str) -> Constraint:
    """`node.role==worker` -> Constraint; a key Swarm does not know, or no operator, is a ValueError."""
    shape = SHAPE.fullmatch(text)
    if not shape:
        raise ValueError(f"{text!r} is not <key>==<value> or <key>!=<value>")
    key, op, value = shape.groups()
    if key not in KEYS and not any(key.startswith(p) and len(key) > len(p) for p in LABELLED):
        raise ValueError(f"{key!r} is not a key of a placement constraint ({', '.join(KEYS)}, node.labels.*)")
    return Constraint(key, op == "==", value)


def node_value(key: str, node: dict[str, Any]) -> str | None:
    """The node's value of a constraint's key (its inspect data), None where it has none (a label it lacks)."""
    spec, description = node.get("Spec") or {}, node.get("Description") or {}
    platform = description.get("Platform") or {}
    known = {
        "node.id": node.get("ID"),
        "node.hostname": description.get("Hostname"),
        "node.role": spec.get("Role"),
        "node.platform.os": platform.get("OS"),
        "node.platform.arch": platform.get("Architecture"),
    }
    if key in known:
        return known[key]
    if key.startswith("node.labels."):
        return (spec.get("Labels") or {}).get(key.removeprefix("node.labels."))
    return ((description.get("Engine") or {}).get("Labels") or {}).get(key.removeprefix("engine.labels."))


def admits(constraint: Constraint | None, node: dict[str, Any]) -> bool:
    """Whether Swarm may place a task of this constraint (None: no constraint) on the node. A node
    without the key (a label it lacks) fails == and passes !=, as in Swarm."""
    if constraint is None:
        return True
    value = node_value(constraint.key, node)
    same = value is not None and value.lower() == constraint.value.lower()
    return same if constraint.equal else not same


def schedulable(node: dict[str, Any]) -> bool:
    """A node Swarm gives new tasks to: ready and active (not paused or drained)."""
    return (node.get("Status") or {}).get("State") == "ready" and (node.get("Spec") or {}).get(
        "Availability"
    ) == "active"
