"""The backend contract's steps on a started instance, written once for every backend and run where
its instances can be reached: in the test process for Docker's and the process backend's, inside a
helper container on the overlay for Swarm's (`in_overlay`: the host has no route into a Swarm
overlay, so the proxy runs inside the cluster). Only the standard library and addon/ are imported:
the helper container runs this file with the image's own Python."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import quote

from backends import AUTH_HEADER
from backends import ArchiveRefused
from backends import Backend
from backends import Instance
from backends import Limits
from backends import UnpackLimits

TOKEN = "t0ken"
UNPACKED = ("unpacked/u.txt", b"inside\n")
LIMITS = UnpackLimits(max_entries=100, max_bytes=1 << 20)
ROOT = Path(__file__).resolve().parent.parent


def files() -> list[tuple[str, bytes]]:
    """What put_file places: a small file, an empty one, and one of three contents-API chunks with a
    name to be quoted."""
    return [("a.csv", b"1,2\n"), ("empty", b""), ("blob \u00fc.bin", os.urandom(9 * 1024 * 1024 + 5))]


def _answer(instance: Instance, path: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{instance.host}:{instance.port}{path}", headers={AUTH_HEADER: token})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _content(instance: Instance, name: str) -> bytes | None:
    """The file as Jupyter's contents API reads it back (None: not there)."""
    status, body = _answer(instance, "/api/contents/" + quote(name) + "?content=1&format=base64", instance.token)
    return base64.b64decode(json.loads(body)["content"]) if status == 200 else None


def _zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


async def exercise(backend: Backend, instance_id: str) -> tuple[Instance, dict]:
    """Start an instance and use it as the proxy does; what it answered, as a JSON-able report.
    On failure the instance is stopped."""
    instance = await backend.start(instance_id, TOKEN)
    try:
        report: dict = {"read_back": {}}
        for name, data in files():
            await backend.put_file(instance, name, data)
            report["read_back"][name] = await asyncio.to_thread(_content, instance, name) == data
        report["no_token"] = (await asyncio.to_thread(_answer, instance, "/api/status", ""))[0]
        report["wrong_token"] = (await asyncio.to_thread(_answer, instance, "/api/contents/a.csv", "wrong"))[0]
        # What a boot leaves out (image/jupyter_server_config.py): the language-server extension;
        # terminals stay (the culler reads /api/terminals).
        report["lsp"] = (await asyncio.to_thread(_answer, instance, "/lsp/status", instance.token))[0]
        report["terminals"] = (await asyncio.to_thread(_answer, instance, "/api/terminals", instance.token))[0]
        await backend.unpack(instance, "zip", _zip(dict([UNPACKED])), LIMITS)
        report["unpacked"] = await asyncio.to_thread(_content, instance, UNPACKED[0]) == UNPACKED[1]
        try:
            await backend.unpack(instance, "zip", _zip({"../escape.txt": b"x"}), LIMITS)
            report["refused"] = ""
        except ArchiveRefused as e:
            report["refused"] = e.code
    except BaseException:
        await asyncio.shield(backend.stop(instance.handle))
        raise
    return instance, report


# Swarm: the same steps in a helper container on the backend's overlay.


def in_overlay(backend, instance_id: str) -> tuple[Instance, dict]:
    """Run `exercise` on a Swarm backend's overlay, in a helper container of the instances' image
    with the engine's socket, addon/, tests/ and the docker SDK mounted; its instance and report."""
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    mounts = {ROOT / "addon": "/addon", ROOT / "tests": "/tests", site: "/site"}
    mounts[Path("/var/run/docker.sock")] = "/var/run/docker.sock"
    image = backend.opts.image
    command = ["docker", "run", "--rm", "--user", "0", "--network", backend.opts.swarm_network]
    command += [arg for source, target in mounts.items() for arg in ("-v", f"{source}:{target}")]
    command += ["-e", "PYTHONPATH=/addon:/tests:/site", "-e", f"PREFIX={backend.limits.label_prefix}"]
    command += ["-e", f"IMAGE={image}", "-e", f"INSTANCE={instance_id}", "--entrypoint", "python3", image]
    command += ["-c", "import backend_steps; backend_steps.overlay_main()"]
    for _ in range(5):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        # The node drops its copy of an attachable overlay that nothing uses; a join racing that fails so.
        if done.returncode != 125 or "not found" not in done.stderr:
            break
        time.sleep(0.5)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return Instance.from_json(answer["instance"]), answer["report"]


def overlay_main() -> None:
    """In the helper container: exercise a Swarm instance; print its record and the report."""
    from backends.swarm import SwarmBackend
    from backends.swarm import SwarmOptions

    backend = SwarmBackend(Limits(os.environ["PREFIX"]), SwarmOptions(image=os.environ["IMAGE"]))
    instance, report = asyncio.run(exercise(backend, os.environ["INSTANCE"]))
    print(json.dumps({"instance": instance.to_json(), "report": report}))
