"""The user's work, end to end (issue 17): real mitmdump, Redis, containers from the image (and the
process backend where it applies). A result a kernel writes is in the live snapshot, in the saved
archive after stop, idle culling and max age; a start unpacks an archive (resuming from saved work);
hostile archives are refused with JSON and leave nothing; a proxy killed mid-save never serves a
half archive, and reconciliation still saves and ends its instance."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import signal
import tarfile
import threading
import time
import zipfile

import pytest
import requests

from e2e.hostile_jupyter import CODE
from e2e.proxy import Browser

RESULT = "print(open('result.txt', 'w').write('answer=42'))"


def wait_until(check, what: str, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def members(archive: bytes) -> dict[str, bytes]:
    """Names and contents of a tar.gz's regular files."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}


def write_result(proxy, nonce: str) -> Browser:
    """A user opens the view and runs code that writes result.txt into the working directory."""
    page = Browser(proxy)
    page.view(nonce)
    page.execute(page.start_kernel(), RESULT)
    return page


def work_record(world, prefix: str, work_id: str) -> dict | None:
    raw = world.redis.get(f"{prefix}work:{work_id}")
    return json.loads(raw) if raw else None


@pytest.fixture(params=["docker", "process"])
def backend(request) -> str:
    return request.param


def test_the_work_is_fetched_live_then_saved_by_stop_then_deleted(make_proxy, world, backend):
    prefix = world.sub(f"work-{backend}")
    p = make_proxy(prefix=prefix, datalab_backend=backend)
    nonce, work = p.start_with_work("a.csv", b"x,y\n1,2\n")
    assert len(work) >= 22 and work != nonce
    write_result(p, nonce)

    live = p.work(work)
    assert live.status_code == 200, live.text
    assert live.headers["Content-Type"] == "application/gzip"
    assert live.headers["Content-Disposition"] == f'attachment; filename="datalab-work-{work[:8]}.tar.gz"'
    assert members(live.content) == {"a.csv": b"x,y\n1,2\n", "result.txt": b"answer=42"}

    assert p.stop_instance(nonce).status_code == 200
    saved = p.work(work)
    assert saved.status_code == 200, saved.text
    assert members(saved.content)["result.txt"] == b"answer=42"
    record = work_record(world, prefix, work)
    assert (record["state"], record["ended"]) == ("saved", "stopped")
    assert (record["size"], record["sha256"]) == (len(saved.content), hashlib.sha256(saved.content).hexdigest())
    assert 7 * 86400 - 60 < world.redis.ttl(f"{prefix}work:{work}") <= 7 * 86400

    assert p.work(work, method="DELETE").json() == {"code": "OK", "result": {}}
    gone = p.work(work)
    assert (gone.status_code, gone.json()["code"]) == (410, "WORK_DELETED")


def test_work_requests_are_signed_once_and_unknown_ids_are_404(proxy, world):
    nonce, work = proxy.start_with_work("s.csv", b"1\n")
    ts = str(int(time.time() * 1000))
    bad = proxy.work(work, ts=ts, sign="0" * 64)
    assert (bad.status_code, bad.json()["code"]) == (403, "BAD_SIGNATURE")
    assert proxy.work(work, ts=ts).status_code == 200
    replayed = proxy.work(work, ts=ts)
    assert (replayed.status_code, replayed.json()["code"]) == (403, "REPLAYED")
    unknown = proxy.work("U" * 32)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "WORK_UNKNOWN")
    live = proxy.work(work, method="DELETE")
    assert (live.status_code, live.json()["code"]) == (409, "WORK_LIVE")
    assert proxy.stop_instance(nonce).status_code == 200


def test_idle_culling_and_max_age_save_the_work_and_the_browser_is_told(make_proxy, world):
    idle = make_proxy(prefix=world.sub("idle"), datalab_idle_timeout=6, datalab_cull_interval=2)
    aged = make_proxy(prefix=world.sub("aged"), datalab_max_age=12, datalab_cull_interval=2)
    # Each user writes as soon as their instance starts: the idle one's 6 s run from its start, and
    # the other's boot (seconds on a loaded machine) must not come between.
    started, pages = [], []
    for p in (idle, aged):
        nonce, work = p.start_with_work("d.csv", b"1\n")
        started.append((p, nonce, work))
        pages.append(write_result(p, nonce))
    for (p, _, work), cause, page in zip(started, ("idle", "max_age"), pages, strict=True):
        prefix = p.prefix
        saved = lambda prefix=prefix, work=work: (work_record(world, prefix, work) or {}).get("state") == "saved"  # noqa: E731
        wait_until(saved, f"{cause} save", 90)
        assert work_record(world, prefix, work)["ended"] == cause
        assert members(p.work(work).content)["result.txt"] == b"answer=42"
        api = page.get("/api/contents")
        assert (api.status_code, api.json()["code"]) == (410, "INSTANCE_GONE")
        navigation = page.get("/lab", headers={"Sec-Fetch-Mode": "navigate", "Accept": "text/html"})
        assert navigation.status_code == 410 and navigation.headers["Content-Type"].startswith("text/html")
        assert "This notebook has ended" in navigation.text and "Your work was saved" in navigation.text


def test_resume_by_unpacking_the_saved_work_and_a_zip_with_a_folder(proxy):
    nonce, work = proxy.start_with_work("r.csv", b"r\n")
    write_result(proxy, nonce)
    assert proxy.stop_instance(nonce).status_code == 200
    archive = proxy.work(work).content

    resumed, _ = proxy.start_with_work("work.tar.gz", archive, unpack=True)
    page = Browser(proxy)
    page.view(resumed)
    assert page.get("/files/result.txt", headers={"Referer": proxy.url("/")}).content == b"answer=42"

    folder = io.BytesIO()
    with zipfile.ZipFile(folder, "w") as z:
        z.writestr("data/x.csv", "a,b\n")
        z.writestr("data/deeper/y.txt", "y")
        z.writestr("analysis.ipynb", json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    unpacked, _ = proxy.start_with_work("folder.zip", folder.getvalue(), unpack=True)
    page = Browser(proxy)
    page.view(unpacked)
    listing = page.get("/api/contents/data").json()
    assert sorted(c["name"] for c in listing["content"]) == ["deeper", "x.csv"]
    assert page.get("/api/contents/analysis.ipynb").json()["type"] == "notebook"
    for n in (resumed, unpacked):
        assert proxy.stop_instance(n).status_code == 200


def _tar(add) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        add(tar)
    return out.getvalue()


def _entry(tar: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@functools.cache
def zip_bomb(size: int = 2 << 30) -> bytes:
    """A real zip whose one entry inflates to `size` bytes of zeros (about 2 MiB on the wire)."""
    out = io.BytesIO()
    block = bytes(1 << 20)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z, z.open("zeros.bin", "w", force_zip64=True) as member:
        for _ in range(size >> 20):
            member.write(block)
    return out.getvalue()


HOSTILE = {
    "dotdot.tar.gz": (lambda: _tar(lambda t: _entry(t, "../escape.txt")), 400),
    "absolute.tar.gz": (lambda: _tar(lambda t: _entry(t, "/etc/cron.d/x")), 400),
    "symlink.tar.gz": (lambda: _tar(lambda t: _entry(t, "passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")), 400),
    "entries.tar.gz": (lambda: _tar(lambda t: [_entry(t, f"f{i}", b"") for i in range(100_000)]), 413),
    "bomb.zip": (zip_bomb, 413),
}


def test_hostile_archives_are_refused_with_json_and_leave_nothing(make_proxy, world):
    prefix = world.sub("hostile")
    p = make_proxy(prefix=prefix)
    for name, (make, status) in HOSTILE.items():
        before = {c.id for c in world.containers(prefix)}
        r = p.upload(name, make(), unpack=True)
        assert r.status_code == status, (name, r.text)
        assert r.json()["code"] == ("ARCHIVE_TOO_LARGE" if status == 413 else "BAD_ARCHIVE"), name
        removed = lambda before=before: {c.id for c in world.containers(prefix)} <= before  # noqa: E731
        wait_until(removed, f"{name}: its instance removed", 30)
        keys = {k.decode() for k in world.keys(prefix)}
        assert not {k for k in keys if k.startswith((f"{prefix}instance:", f"{prefix}work:", f"{prefix}nonce:"))}
    not_an_archive = p.upload("plain.csv", b"1\n", unpack=True)
    assert (not_an_archive.status_code, not_an_archive.json()["code"]) == (400, "BAD_REQUEST")


def test_a_proxy_killed_mid_save_never_serves_half_an_archive(make_proxy, world, tmp_path):
    prefix = world.sub("killed")
    store = tmp_path / "work"
    options = {"datalab_work_dir": str(store), "datalab_work_timeout": 8}
    doomed = make_proxy(prefix=prefix, **options)
    nonce, work = doomed.start_with_work("big.csv", b"1\n")
    page = Browser(doomed)
    page.view(nonce)
    page.execute(page.start_kernel(), "import os; open('big.bin', 'wb').write(os.urandom(100 << 20))")
    threading.Thread(target=lambda: _quietly(doomed.stop_instance, nonce), daemon=True).start()
    wait_until(lambda: any(n.name.endswith(".part") for n in store.rglob(".*")), "a save under way", 30, 0.02)
    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait()
    doomed.proc = None
    assert not list(store.rglob(f"{work}.tar.gz"))
    assert work_record(world, prefix, work)["state"] == "saving"

    heir = make_proxy(prefix=prefix, datalab_cull_interval=2, **options)
    early = heir.work(work)
    assert (early.status_code, early.json()["code"]) == (503, "WORK_SAVING")
    wait_until(lambda: work_record(world, prefix, work)["state"] in ("saved", "unsaved"), "reconciliation", 90)
    wait_until(lambda: not world.containers(prefix), "the instance ended", 30)
    record = work_record(world, prefix, work)
    saved = heir.work(work)
    print("after reconciliation:", record["state"], record["why"])
    if record["state"] == "saved":
        assert hashlib.sha256(saved.content).hexdigest() == record["sha256"]
        assert len(members(saved.content)["big.bin"]) == 100 << 20
    else:  # too slow for the bound here: said so, never a half archive
        assert (saved.status_code, saved.json()["code"]) == (410, "WORK_UNSAVED")


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception:  # the proxy is killed under it
        pass


def test_a_notebook_answering_for_its_jupyter_reaches_the_frontend_with_nothing_but_bytes(make_proxy, world):
    """The notebook user takes over their own Jupyter's port (process backend: hostile_jupyter.py) and
    answers the work's requests as they like: the frontend's server gets a JSON 502 for anything but a
    framed 200, the proxy's own headers only (no redirect to follow, no encoding to inflate), and a
    live snapshot cut at datalab_work_max; the save at the end is bounded the same way."""
    prefix = world.sub("hostile-jupyter")
    p = make_proxy(prefix=prefix, datalab_backend="process", datalab_work_max="8m", datalab_work_timeout=15)
    nonce, work = p.start_with_work("h.csv", b"1\n")
    page = Browser(p)
    page.view(nonce)
    out = page.execute(page.start_kernel(), CODE.replace("CANARY", "9"))
    assert out.strip() == "stolen 1", out
    time.sleep(3)  # the server is stopped; the kernel answers its port

    def answer(mode: str, **kw):
        switched = requests.get(page.url(f"/hostile/{mode}"), headers={"Cookie": page.cookie_header()}, timeout=30)
        assert switched.text == f"mode {mode}", switched.text
        return p.work(work, allow_redirects=False, **kw)

    for mode in ("redirect", "notfound", "hugehead"):
        r = answer(mode)
        assert (r.status_code, r.json()["code"]) == (502, "INSTANCE_UNREACHABLE"), mode
        assert "Location" not in r.headers
    r = answer("gzipenc")
    assert r.status_code == 200 and "Content-Encoding" not in r.headers
    assert len(r.content) < 1 << 20  # its bytes as they are: the gzip of 200 MiB is not inflated for anyone
    r = answer("endless", stream=True)
    got = 0
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut: the frontend sees it unfinished
        for chunk in r.iter_content(1 << 20):
            got += len(chunk)
    assert got <= (8 << 20) + (1 << 18)

    assert p.stop_instance(nonce).status_code == 200
    record = work_record(world, prefix, work)
    assert record["state"] == "unsaved" and "larger than datalab_work_max" in record["why"]
