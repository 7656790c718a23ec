"""The job that removes a stopped Swarm instance's volumes on the node that ran it: its spec, and its script
against a stand-in of a node's Docker socket (the real thing: tests/e2e/test_multinode.py)."""

import http.server
import socketserver
import subprocess
import sys
import threading

import pytest

from backends.swarm import ENDED
from backends.swarm import volume_names
from backends.volume_cleanup import LABEL_CLEANUP
from backends.volume_cleanup import SCRIPT
from backends.volume_cleanup import SOCKET
from backends.volume_cleanup import cleanup_job
from backends.volume_cleanup import ended
from backends.volume_cleanup import node_ids

VOLUMES = sorted(volume_names("datalab-0123456789abcdef").values())


def test_the_job_runs_once_on_that_node_with_its_socket_and_nothing_else():
    job = cleanup_job("sha256:abc", "node7", VOLUMES, {"datalab.prefix": "p:"})
    assert job["constraints"] == ["node.id==node7"] and job["mode"] == {"ReplicatedJob": {}}
    assert job["restart_policy"]["Condition"] == "none" and job["image"] == "sha256:abc"
    assert job["labels"] == {"datalab.prefix": "p:", LABEL_CLEANUP: "true"}
    assert [(m["Source"], m["Target"]) for m in job["mounts"]] == [(SOCKET, SOCKET)]
    assert job["command"][:2] == ["python3", "-c"] and job["command"][3:] == VOLUMES
    assert job["cap_drop"] == ["ALL"] and job["read_only"] is True


@pytest.mark.parametrize("name", ["datalab-redis-data", "other", "datalab-0123-work/../x", "datalab-abc-work-1"])
def test_the_job_removes_only_an_instances_volumes(name):
    with pytest.raises(ValueError):
        cleanup_job("sha256:abc", "node7", [name], {})


def test_the_nodes_and_the_end_of_a_job_come_from_its_tasks():
    tasks = [{"NodeID": "a", "Status": {"State": "complete"}}, {"NodeID": "b", "Status": {"State": "shutdown"}}]
    assert node_ids(tasks + [{"NodeID": ""}]) == {"a", "b"}
    assert ended(tasks, ENDED) and not ended([], ENDED)
    assert not ended([{"Status": {"State": "pending"}}], ENDED)  # a node that is down: it waits for it


class Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def stand_in(path, in_use: dict[str, int], deleted: list[str]):
    """A node's socket that answers DELETE /volumes/<name>: 409 while `in_use[name]` tries remain, then 204."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_DELETE(self):
            name = self.path.removeprefix("/volumes/")
            busy = in_use.get(name, 0) > 0
            in_use[name] = in_use.get(name, 0) - 1
            if not busy:
                deleted.append(name)
            self.send_response(409 if busy else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def address_string(self):
            return "socket"

        def log_message(self, *args):
            pass

    server = Engine(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_script_deletes_each_volume_waiting_while_one_is_in_use(tmp_path):
    in_use, deleted = {VOLUMES[0]: 2}, []
    server = stand_in(tmp_path / "docker.sock", in_use, deleted)
    try:
        script = SCRIPT.replace(repr(SOCKET), repr(str(tmp_path / "docker.sock")))
        done = subprocess.run([sys.executable, "-c", script, *VOLUMES], timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0 and sorted(deleted) == VOLUMES
