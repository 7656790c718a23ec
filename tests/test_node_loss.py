"""Reading a lost swarm node from the manager's events, and its instances from the node's tasks
(the engine's JSON as Docker 20.10 sends it; test_multinode.py kills a real node)."""

from __future__ import annotations

import pytest

from backends.container_spec import LABEL_INSTANCE
from backends.node_loss import instances_of
from backends.node_loss import node_lost

pytestmark = pytest.mark.unit


def node_event(action: str, **attributes: str) -> dict:
    return {"Type": "node", "Action": action, "Actor": {"ID": "n3", "Attributes": {"name": "mn-3", **attributes}}}


def test_a_node_gone_down_is_lost():
    assert node_lost(node_event("update", **{"state.old": "ready", "state.new": "down"})) == "n3"


def test_a_node_removed_is_lost():
    assert node_lost(node_event("remove")) == "n3"


@pytest.mark.parametrize(
    "event",
    [
        node_event("update", **{"state.old": "down", "state.new": "ready"}),  # it came back
        node_event("update", **{"availability.old": "active", "availability.new": "drain"}),
        node_event("create"),
        {"Type": "container", "Action": "die", "Actor": {"ID": "c1", "Attributes": {"state.new": "down"}}},
        {"Type": "node", "Action": "remove", "Actor": {}},  # no node named
        {},
    ],
)
def test_anything_else_is_not_a_lost_node(event):
    assert node_lost(event) is None


def task(instance: str | None, **labels: str) -> dict:
    if instance:
        labels[LABEL_INSTANCE] = instance
    return {"Spec": {"ContainerSpec": {"Image": "sha256:x", "Labels": labels}}}


def test_a_lost_nodes_instances_are_those_of_this_family_only():
    family = {"datalab.prefix": "dl:", "datalab.stack": "a"}
    tasks = [
        task("one", **family),
        task("one", **family),  # a second task of the same service counts once
        task("other-stack", **{"datalab.prefix": "dl:", "datalab.stack": "b"}),
        task("no-stack", **{"datalab.prefix": "dl:"}),
        task(None, **family),  # a cleanup job, or anything without an instance
        {"Spec": {}},
        task("two", **family, extra="x"),
    ]
    assert instances_of(tasks, family) == ["one", "two"]


class _Api:
    """The engine's task listing, filtered as Docker filters it (node, desired-state)."""

    def __init__(self, tasks: list[dict]):
        self._tasks = tasks

    def tasks(self, filters: dict) -> list[dict]:
        found = [t for t in self._tasks if t["NodeID"] == filters["node"]]
        if "desired-state" in filters:
            found = [t for t in found if t["DesiredState"] == filters["desired-state"]]
        return found


class _Client:
    def __init__(self, tasks: list[dict]):
        self.api = _Api(tasks)


async def test_a_down_nodes_instances_are_found_once_swarm_has_marked_their_tasks_for_shutdown():
    """Swarm's replicated orchestrator reacts to a node going down in the same store commit the node
    event comes from: restart.Supervisor.Restart sets each of its tasks' DesiredState to `shutdown`
    before it even looks at the restart policy (condition none: no new task). The observed state stays
    `running` (nothing reports otherwise). By the time the proxy asks, the tasks it wants are those."""
    from backends.swarm import SwarmBackend
    from helpers import backend_of

    backend = backend_of(SwarmBackend, image="x")
    family = backend._family
    on_lost = {
        "NodeID": "n3",
        "DesiredState": "shutdown",
        "Status": {"State": "running"},
        **task("lost-one", **family),
    }
    elsewhere = {"NodeID": "n2", "DesiredState": "running", "Status": {"State": "running"}, **task("alive", **family)}
    ended = {"NodeID": "n3", "DesiredState": "shutdown", "Status": {"State": "complete"}, **task("ended", **family)}
    client = _Client([on_lost, elsewhere, ended])

    async def events(filters):
        yield node_event("update", **{"state.old": "ready", "state.new": "down"})

    async def the_client():
        return client

    backend._events = events
    backend.client = the_client
    assert [instance async for instance in backend.exits()] == ["lost-one"]
