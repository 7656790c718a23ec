"""A swarm node lost, read from the manager's events: which node, and which of our instances ran there.

Swarm's service events say nothing of a task's exit, and when a node dies the manager keeps its
tasks `running` in its record. What it does report, within seconds of the node's last heartbeat, is
the node's own state going to `down` (a node event, on every manager's engine). The instances
whose tasks were placed on that node are then gone; each is checked (`end_if_gone`) before it ends.
Pure rules on the engine's JSON; swarm.py asks the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.container_spec import LABEL_INSTANCE
from backends.container_spec import carries


def node_lost(event: Mapping[str, Any]) -> str | None:
    """The node's ID if `event` says a swarm node went down or was removed, else None."""
    if event.get("Type") != "node":
        return None
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    lost = event.get("Action") == "remove" or attributes.get("state.new") == "down"
    return (actor.get("ID") or None) if lost else None


def instances_of(tasks: list[Mapping[str, Any]], family: Mapping[str, str]) -> list[str]:
    """The instance ids of the tasks (a node's, not ended) that carry all of `family`'s labels."""
    found: list[str] = []
    for task in tasks:
        labels = ((task.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {}
        instance_id = labels.get(LABEL_INSTANCE)
        if instance_id and carries(labels, family) and instance_id not in found:
            found.append(instance_id)
    return found
