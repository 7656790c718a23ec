"""The instance's archive API (image/datalab_work.py) in real Jupyter servers started with the real
configuration: a local process as the process backend starts it, and a container of the built image
as the Docker backend starts it (read-only root, the working directory a tmpfs)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from backends import AUTH_HEADER
from backends import Backend
from backends import Instance
from backends import Limits
from backends.docker_engine import DockerBackend
from backends.docker_engine import DockerOptions
from backends.local_process import ProcessBackend
from backends.local_process import ProcessOptions
from e2e.conftest import IMAGE
from helpers import zip_info
from helpers import zip_of

TOKEN = "archive-" + secrets.token_hex(8)
WORK_IN_IMAGE = "/home/datalab/work"
DISK = "64m"  # the instances' disk limit: the container's work tmpfs, the process's largest file
UNPACK = "/api/datalab/unpack?format={fmt}&max_entries={entries}&max_bytes={size}"


@dataclass
class Box:
    """A running instance and how to reach inside it as its user (for what the API cannot make)."""

    kind: str
    backend: Backend
    instance: Instance
    loop: asyncio.AbstractEventLoop  # the one it was started in (the process backend reaps its child there)
    container: object = None  # the Docker container
    home: Path | None = None  # the process instance's directory

    def stop(self) -> None:
        self.loop.run_until_complete(self.backend.stop(self.instance.handle))
        self.loop.close()

    def url(self, path: str) -> str:
        return f"http://{self.instance.host}:{self.instance.port}{path}"

    def shell(self, script: str) -> str:
        """Run a shell script in the working directory as the notebook's user; its output."""
        if self.container is not None:
            code, out = self.container.exec_run(["sh", "-c", script], user="datalab", workdir=WORK_IN_IMAGE)
            assert code == 0, out
            return out.decode()
        uid = self.home.stat().st_uid
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if os.geteuid() == 0 else []
        done = subprocess.run([*as_user, "sh", "-c", script], cwd=self.home / "work", capture_output=True, check=True)
        return done.stdout.decode()

    def listing(self) -> str:
        return self.shell("find . | sort")


def xsrf_headers(token: str = TOKEN) -> dict[str, str]:
    """What the proxy sends with its own POSTs: the secret, and an _xsrf cookie with its header."""
    xsrf = "2|00000000|" + secrets.token_hex(16) + "|" + str(int(time.time()))
    return {AUTH_HEADER: token, "Cookie": f"_xsrf={xsrf}", "X-XSRFToken": xsrf}


def post_archive(box: Box, data, fmt: str, entries: int = 1000, size: int = 1 << 20, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", xsrf_headers())
    url = box.url(UNPACK.format(fmt=fmt, entries=entries, size=size))
    return requests.post(url, data=data, headers=headers, timeout=120, **kwargs)


def get_archive(box: Box, **kwargs) -> requests.Response:
    return requests.get(box.url("/api/datalab/work"), headers={AUTH_HEADER: TOKEN}, timeout=120, **kwargs)


def members(answer: requests.Response) -> dict[str, bytes | None]:
    """The archive's entries: name -> a file's content, or None for a folder."""
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() if m.isreg() else None for m in tar}


@pytest.fixture(scope="module")
def places() -> Iterator[Path]:
    """A directory for process instances that their own users may pass through."""
    root = Path(tempfile.mkdtemp(prefix="datalab-archive-"))
    root.chmod(0o711)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def start_box(kind: str, places: Path, docker_client=None, **limits) -> Box:
    given = Limits(label_prefix=f"archive-{secrets.token_hex(4)}:", **limits)
    if kind == "docker":
        backend = DockerBackend(given, DockerOptions(image=IMAGE))
    else:
        backend = ProcessBackend(given, ProcessOptions(process_dir=str(places)))
    loop = asyncio.new_event_loop()
    instance = loop.run_until_complete(backend.start(secrets.token_urlsafe(16), TOKEN))
    if kind == "docker":
        return Box(kind, backend, instance, loop, container=docker_client.containers.get(instance.handle))
    return Box(kind, backend, instance, loop, home=backend.family / instance.handle)


@pytest.fixture(scope="module", params=["process", "docker"])
def box(request, places) -> Iterator[Box]:
    docker_client = request.getfixturevalue("docker_client") if request.param == "docker" else None
    started = start_box(request.param, places, docker_client, disk_limit=DISK)
    yield started
    started.stop()


def test_the_archive_holds_the_working_directory(box):
    box.shell(
        "mkdir -p t1/sub/deeper && printf '1,2\\n' > t1/a.csv && head -c 3000000 /dev/urandom > t1/sub/blob.bin"
        " && printf '#!/bin/sh\\n' > t1/run.sh && chmod 755 t1/run.sh && ln -s /etc/passwd t1/passwd"
        " && ln -s /etc t1/etc && mkfifo t1/fifo"
    )
    blob_hash = box.shell("sha256sum t1/sub/blob.bin").split()[0]
    archive = members(get_archive(box))
    mine = {name: data for name, data in archive.items() if name == "t1" or name.startswith("t1/")}
    assert sorted(mine) == ["t1", "t1/a.csv", "t1/run.sh", "t1/sub", "t1/sub/blob.bin", "t1/sub/deeper"]
    assert mine["t1/a.csv"] == b"1,2\n" and hashlib.sha256(mine["t1/sub/blob.bin"]).hexdigest() == blob_hash


def test_a_folder_zip_unpacks_with_its_tree(box):
    data = zip_of(
        (zip_info("proj/", stat.S_IFDIR | 0o700), b""),
        (zip_info("proj/data/x.csv", stat.S_IFREG | 0o600), b"a,b\n1,2\n"),
        (zip_info("proj/run.sh", stat.S_IFREG | stat.S_ISUID | 0o777), b"#!/bin/sh\necho ran\n"),
        ("proj/empty/", b""),
    )
    answer = post_archive(box, data, "zip")
    assert answer.status_code == 201 and answer.json() == {"entries": 4, "bytes": 27}
    user = box.shell("id -u").strip()
    found = box.shell("find proj -printf '%p %y %m %U\\n' | sort").splitlines()
    assert found == [
        f"proj d 755 {user}",
        f"proj/data d 755 {user}",
        f"proj/data/x.csv f 644 {user}",
        f"proj/empty d 755 {user}",
        f"proj/run.sh f 755 {user}",
    ]
    assert box.shell("sh proj/run.sh") == "ran\n"  # (the container's tmpfs is noexec: Docker's default)
    contents = requests.get(
        box.url("/api/contents/proj/data/x.csv?content=1"), headers={AUTH_HEADER: TOKEN}, timeout=30
    )
    assert contents.status_code == 200 and contents.json()["content"] == "a,b\n1,2\n"  # Jupyter sees it


REFUSED = {
    "parent": ("zip", zip_of(("../evil.sh", b"x")), 400, "BAD_ARCHIVE"),
    "absolute": ("zip", zip_of(("/home/datalab/.bashrc", b"x")), 400, "BAD_ARCHIVE"),
    "symlink": (
        "zip",
        zip_of(("ok.csv", b"1"), (zip_info("passwd", stat.S_IFLNK | 0o777), b"/etc/passwd")),
        400,
        "BAD_ARCHIVE",
    ),
    "duplicate": ("zip", zip_of(("r/a.csv", b"1"), ("r/b.csv", b"2"), ("r/a.csv", b"3")), 400, "BAD_ARCHIVE"),
    "corrupt": ("tar.gz", os.urandom(10_000), 400, "BAD_ARCHIVE"),
    "wrong_format": ("tar", zip_of(("a.csv", b"1")), 400, "BAD_ARCHIVE"),
    "too_many_entries": ("zip", zip_of(*((f"r/{i}.csv", b"1") for i in range(1001))), 413, "ARCHIVE_TOO_LARGE"),
    "too_many_bytes": (
        "zip",
        zip_of(("r/a.bin", bytes(600_000)), ("r/b.bin", bytes(600_000))),
        413,
        "ARCHIVE_TOO_LARGE",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_refused_archive_leaves_nothing(box, case):
    fmt, data, status, code = REFUSED[case]
    before = box.listing()
    answer = post_archive(box, data, fmt)
    assert answer.status_code == status and answer.json()["code"] == code, answer.text
    assert answer.headers["Content-Type"].startswith("application/json") and answer.json()["message"]
    assert box.listing() == before


def test_an_archive_larger_than_the_disk_is_413_and_leaves_nothing(box):
    """Within the limits the proxy gives, but more than the disk takes: 100 MiB of zeros (in the
    container the tmpfs is full, ENOSPC; a process hits its largest-file limit, EFBIG)."""
    if box.kind == "process" and os.geteuid() != 0:
        pytest.fail("the process backend limits a file's size only as root")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("big/small.csv", b"1,2\n")
        with zf.open("big/zeros.bin", "w") as entry:
            for _ in range(100):
                entry.write(bytes(1 << 20))
    before = box.listing()
    answer = post_archive(box, out.getvalue(), "zip", size=1 << 30)
    assert answer.status_code == 413 and answer.json()["code"] == "ARCHIVE_TOO_LARGE", answer.text
    assert box.listing() == before


def test_an_archive_that_does_not_fit_in_tmp_is_413(box):
    """The archive waits in TMPDIR while it is checked: in the container a tmpfs of the disk limit; a
    process writes no file larger than it. 80 MiB do not fit, and what was kept of them goes."""
    if box.kind == "process" and os.geteuid() != 0:
        pytest.fail("the process backend limits a file's size only as root")
    before = box.listing()
    answer = post_archive(box, os.urandom(80 << 20), "zip", size=1 << 30)
    assert answer.status_code == 413 and answer.json()["code"] == "ARCHIVE_TOO_LARGE", answer.text
    assert answer.json()["message"] == "there is no room for the archive itself"
    assert box.listing() == before
    if box.kind == "docker":  # the partial archive is gone (closed just after the answer is sent)
        deadline = time.monotonic() + 10
        while (used := int(box.shell("df -k --output=used /tmp | tail -1"))) >= 1024 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert used < 1024


def test_what_is_there_is_not_replaced(box):
    box.shell("mkdir -p keep && printf mine > keep/a.csv")
    answer = post_archive(box, zip_of(("keep/b.csv", b"new"), ("keep/a.csv", b"theirs")), "zip")
    assert answer.status_code == 409 and answer.json()["code"] == "ALREADY_EXISTS"
    assert box.shell("cat keep/a.csv") == "mine" and box.shell("ls keep") == "a.csv\n"


def test_bad_parameters_are_400_before_the_body_is_read(box):
    url = box.url("/api/datalab/unpack?format=zip&max_entries=10")
    answer = requests.post(url, data=zip_of(("a.csv", b"1")), headers=xsrf_headers(), timeout=30)
    assert answer.status_code == 400 and answer.json()["code"] == "BAD_REQUEST" and "max_bytes" in answer.text


def test_nothing_without_the_secret(box):
    before = box.listing()
    data = zip_of(("intruder.csv", b"1"))
    assert requests.get(box.url("/api/datalab/work"), timeout=30).status_code == 403
    assert requests.get(box.url("/api/datalab/work"), headers={AUTH_HEADER: "wrong"}, timeout=30).status_code == 403
    assert post_archive(box, data, "zip", headers=xsrf_headers("wrong")).status_code == 403
    without_xsrf = {AUTH_HEADER: TOKEN}  # the secret alone: Jupyter's XSRF check still applies
    assert post_archive(box, data, "zip", headers=without_xsrf).status_code == 403
    assert box.listing() == before
    assert requests.get(box.url("/tree"), headers={AUTH_HEADER: TOKEN}, timeout=30).status_code == 200  # UI intact


def vm_peak(pid: int) -> int:
    """The process's largest resident set so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_the_archive_streams_at_the_readers_pace(places):
    """A 200 MiB working directory, read slowly: the server's resident memory grows by far less."""
    box = start_box("process", places)
    try:
        box.shell("head -c 209715200 /dev/urandom > big.bin")
        expected = box.shell("sha256sum big.bin").split()[0]
        pid = int((box.backend.family / f"{box.instance.handle}.pid").read_text().split()[0])
        before = vm_peak(pid)
        digest, read = hashlib.sha256(), 0
        with get_archive(box, stream=True) as answer:
            assert answer.status_code == 200
            decompressed = tarfile.open(fileobj=answer.raw, mode="r|gz")
            for chunk in _slowly(decompressed):
                digest.update(chunk)
                read += len(chunk)
        assert read == 200 << 20 and digest.hexdigest() == expected
        assert vm_peak(pid) - before < 48 << 20, (before, vm_peak(pid))
    finally:
        box.stop()


def _slowly(tar: tarfile.TarFile) -> Iterator[bytes]:
    """big.bin's content from the streamed archive, the first 16 MiB at a crawl (the server must wait)."""
    entry = next(iter(tar))
    assert entry.name == "big.bin"
    content = tar.extractfile(entry)
    crawl = threading.Event()
    threading.Timer(3.0, crawl.set).start()
    while chunk := content.read(64 << 10):
        if not crawl.is_set():
            time.sleep(0.01)
        yield chunk
