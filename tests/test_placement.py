"""Placement constraints read as Swarm reads them, and the Swarm backend's capacity from the nodes they admit."""

import pytest

from backends.placement import Constraint
from backends.placement import admits
from backends.placement import parse_constraint
from backends.swarm import SwarmOptions
from backends.swarm import instance_memory

GIB = 1 << 30


def node(role="worker", labels=None, hostname="n1", state="ready", availability="active", memory=8 * GIB):
    return {
        "ID": f"id-{hostname}",
        "Spec": {"Role": role, "Labels": labels or {}, "Availability": availability},
        "Description": {
            "Hostname": hostname,
            "Platform": {"OS": "linux", "Architecture": "x86_64"},
            "Resources": {"MemoryBytes": memory},
            "Engine": {"Labels": {"zone": "a"}},
        },
        "Status": {"State": state},
    }


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("node.role==worker", Constraint("node.role", True, "worker")),
        (" node.role != manager ", Constraint("node.role", False, "manager")),
        ("node.labels.datalab.instances==true", Constraint("node.labels.datalab.instances", True, "true")),
        ("engine.labels.zone==a", Constraint("engine.labels.zone", True, "a")),
    ],
)
def test_a_constraint_is_parsed(text, parsed):
    assert parse_constraint(text) == parsed


@pytest.mark.parametrize("text", ["node.role", "node.role=worker", "node.color==red", "node.labels.==x", "==x"])
def test_what_swarm_would_refuse_is_refused(text):
    with pytest.raises(ValueError):
        parse_constraint(text)


@pytest.mark.parametrize(
    "text, n, admitted",
    [
        ("node.role==worker", node(), True),
        ("node.role==Worker", node(), True),  # Swarm ignores case
        ("node.role==worker", node(role="manager"), False),
        ("node.role!=manager", node(), True),
        ("node.hostname==n2", node(hostname="n2"), True),
        ("node.platform.os==linux", node(), True),
        ("node.labels.datalab.instances==true", node(labels={"datalab.instances": "true"}), True),
        ("node.labels.datalab.instances==true", node(), False),  # a label the node lacks fails ==
        ("node.labels.datalab.instances!=true", node(), True),  # and passes !=
        ("engine.labels.zone==b", node(), False),
    ],
)
def test_a_constraint_admits_the_nodes_swarm_would_place_on(text, n, admitted):
    assert admits(parse_constraint(text), n) is admitted


def test_capacity_counts_only_the_ready_active_nodes_the_constraint_admits():
    marked = {"datalab.instances": "true"}
    nodes = [
        node("manager", hostname="m"),
        node(labels=marked, hostname="w1"),
        node(labels=marked, hostname="w2"),
        node(labels=marked, hostname="w3", state="down"),
        node(labels=marked, hostname="w4", availability="drain"),
    ]
    assert instance_memory(nodes, "") == 3 * 8 * GIB  # every schedulable node, as before
    assert instance_memory(nodes, "node.labels.datalab.instances==true") == 2 * 8 * GIB
    assert instance_memory(nodes, "node.role==manager") == 8 * GIB


def test_a_constraint_the_capacity_cannot_read_fails_at_start_up():
    with pytest.raises(ValueError, match="datalab_swarm_constraint"):
        SwarmOptions(swarm_constraint="node.role=worker")
    assert SwarmOptions(swarm_constraint="").swarm_constraint == ""
    assert SwarmOptions(swarm_constraint="node.role==worker").swarm_constraint == "node.role==worker"
