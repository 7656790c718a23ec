"""Removing a stopped Swarm instance's in-memory volumes on the node that ran it.

A Swarm instance's volumes (swarm.py's in_memory) are made by the engine of the node its task runs
on, and Docker never removes a named volume by itself. The proxy's engine can remove only its own
node's; a manager cannot reach another node's engine. So for an instance that ran on another node,
the proxy leaves a one-shot job there (a replicated-job service pinned by node.id): the instance's
own image (present on that node, since the instance ran there) runs, as root without capabilities,
a short script that deletes those volumes through that node's Docker socket, retrying while they are
in use (the task's container goes a moment after its service) for a bounded time. A node that is
down runs its job when it comes back, so its volumes are not orphaned. Ended jobs are removed by the
proxy's reconciliation rounds (`reap`).
"""

from __future__ import annotations

import re
from typing import Any

from docker.types import Mount
from docker.types import RestartPolicy
from docker.types import ServiceMode

LABEL_CLEANUP = "datalab.volume-cleanup"  # on the job, beside the family's labels (never an instance's)
SOCKET = "/var/run/docker.sock"
WITHIN = 120  # seconds the job keeps trying a volume that is still in use
NAME = re.compile(r"datalab-[0-9a-f]+-(work|tmp|shm)")  # the volumes swarm.py names, nothing else
# Run by the image's python3 on the node: DELETE /volumes/<name> on its engine (204 gone, 404 already
# gone, 409 in use: tried again), exit 1 if any is left at the end.
SCRIPT = f"""
import http.client, socket, sys, time
class Engine(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect({SOCKET!r})
left, end = sys.argv[1:], time.monotonic() + {WITHIN}
while left and time.monotonic() < end:
    kept = []
    for name in left:
        engine = Engine("localhost", timeout=30)
        engine.request("DELETE", "/volumes/" + name)
        if engine.getresponse().status == 409:
            kept.append(name)
        engine.close()
    left = kept
    time.sleep(1 if left else 0)
sys.exit(1 if left else 0)
"""


def cleanup_job(image: str, node_id: str, volumes: list[str], labels: dict[str, str]) -> dict[str, Any]:
    """The services.create arguments of the job that removes `volumes` on the node `node_id`."""
    if bad := [name for name in volumes if not NAME.fullmatch(name)]:
        raise ValueError(f"not an instance's volume: {bad}")
    return dict(
        image=image,
        command=["python3", "-c", SCRIPT, *sorted(volumes)],
        user="0",
        labels={**labels, LABEL_CLEANUP: "true"},
        mode=ServiceMode("replicated-job"),
        constraints=[f"node.id=={node_id}"],
        restart_policy=RestartPolicy(condition="none"),
        mounts=[Mount(SOCKET, SOCKET, type="bind")],
        read_only=True,
        cap_drop=["ALL"],
    )


def node_ids(tasks: list[dict[str, Any]]) -> set[str]:
    """The nodes a service's tasks were given to (where its volumes were made)."""
    return {task["NodeID"] for task in tasks if task.get("NodeID")}


def ended(tasks: list[dict[str, Any]], ended_states: tuple[str, ...]) -> bool:
    """Whether a job ran to its end (its task in one of `ended_states`); one with no task yet has not."""
    return bool(tasks) and all((t.get("Status") or {}).get("State") in ended_states for t in tasks)
