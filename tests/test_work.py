"""The work store (work.py, store.py's work records) against a real Redis and a stand-in for the
instance's archive endpoint (a loopback HTTP server): saves that succeed, are too large, too slow or
refused, ends that record how and why, deletes, and the culler's sweep. The real archive, made by the
image's extension, is tested end to end in tests/e2e/test_work.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

import counters
import work
from backends import Instance
from paths import family_name
from store import EndNote
from store import Store
from store import WorkRecord
from store import connect
from work import PART
from work import WorkStore
from work import work_max_bytes

NOW = time.time()
WORK = "W" * 32


class FakeArchive:
    """Answers GET /api/datalab/work with `body` in chunks, pausing `delay` between them (`cut`: the
    connection closes before the last chunk, as when the instance's archiving fails midway)."""

    def __init__(self, body: bytes = b"", status: int = 200, delay: float = 0.0, cut: bool = False):
        self.body, self.status, self.delay, self.cut = body, status, delay, cut
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeArchive:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {self.status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            for i in range(0, len(self.body), 65536):
                piece = self.body[i : i + 65536]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(self.delay)
            if not self.cut:
                writer.write(b"0\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def instance(port: int, ident: str = "i") -> Instance:
    return Instance(ident * 32, "docker", "c-" + ident, "127.0.0.1", port, "a.csv", NOW, "tok", NOW, WORK)


async def ending(redis_url: str, inst: Instance, cause: str = "stopped") -> Store:
    """The instance bound with its live work, then ended: the work is 'saving', as an end leaves it."""
    store = Store(connect(redis_url), "unit:")
    await store.reserve(inst.id, time.time(), 60, 10)
    assert await store.bind(inst, "N" * 32, 60, NOW, WorkRecord(WORK, inst.id, "live", NOW), 600)
    note = EndNote(cause, 600, time.time() + 60, 600, time.time())
    assert await store.remove_instance(inst.id, end=note)
    return store


def saves(outcome: str) -> float:
    return counters.WORK_SAVES.labels(outcome)._value.get()


async def test_an_end_records_how_and_marks_the_work_saving_and_keeps_the_slot_leased(redis_url):
    store = await ending(redis_url, instance(1), cause="idle")
    record = await store.work(WORK)
    assert (record.state, record.ended, record.instance) == ("saving", "idle", "i" * 32)
    ended = await store.ended("i" * 32)
    assert (ended.cause, ended.work, ended.instance.token) == ("idle", WORK, "tok")
    assert await store.instance("i" * 32) is None
    assert await store.slot_holders(time.time()) == {"i" * 32}  # leased while the work is saved
    assert await store.slot_holders(time.time() + 61) == set()
    assert 590 < await store.redis.ttl(store.key("work", WORK)) <= 600
    await store.close()


async def test_a_save_streams_the_archive_into_place_with_its_size_and_digest(redis_url, tmp_path):
    body = os.urandom(3 << 20)
    async with FakeArchive(body) as fake:
        store = await ending(redis_url, instance(fake.port))
        works = WorkStore(store, str(tmp_path / "work"), 10 << 20, 600, 10)
        before = saves("saved")
        record = await works.save(instance(fake.port), "stopped")
    assert (record.state, record.size, record.sha256) == ("saved", len(body), hashlib.sha256(body).hexdigest())
    assert (tmp_path / "work" / f"{WORK}.tar.gz").read_bytes() == body
    assert oct((tmp_path / "work").stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in (tmp_path / "work").iterdir()] == [f"{WORK}.tar.gz"]  # no .part left
    assert (await store.work(WORK)).state == "saved" and saves("saved") == before + 1
    await store.close()


@pytest.mark.parametrize(
    ("fake", "limit", "timeout", "outcome", "why"),
    [
        (FakeArchive(b"x" * (2 << 20)), 1 << 20, 10, "too_large", "larger than datalab_work_max"),
        (FakeArchive(b"x" * (1 << 20), delay=0.5), 10 << 20, 1, "timeout", "took longer than 1 s"),
        (FakeArchive(b"{}", status=404), 10 << 20, 10, "failed", "did not hand over"),
        (FakeArchive(b"x" * (1 << 20), cut=True), 10 << 20, 10, "failed", "did not hand over"),
    ],
)
async def test_a_save_past_its_bounds_or_refused_is_abandoned_and_says_why(
    redis_url, tmp_path, fake, limit, timeout, outcome, why
):
    async with fake:
        store = await ending(redis_url, instance(fake.port))
        works = WorkStore(store, str(tmp_path), limit, 600, timeout)
        before = saves(outcome)
        record = await works.save(instance(fake.port), "stopped")
    assert record.state == "unsaved" and why in record.why
    assert (await store.work(WORK)).state == "unsaved" and saves(outcome) == before + 1
    assert list(tmp_path.iterdir()) == []  # neither a final archive nor a .part
    await store.close()


async def test_nothing_answers_at_all_and_a_gone_container_is_said_unsaved_at_once(redis_url, tmp_path):
    store = await ending(redis_url, instance(1))
    works = WorkStore(store, str(tmp_path), 1 << 20, 600, 5)
    assert "did not hand over" in (await works.save(instance(1), "stopped")).why  # port 1: refused
    await store.close()
    store = await ending(redis_url, instance(1), cause="gone")
    record = await WorkStore(store, str(tmp_path), 1 << 20, 600, 5).save(instance(1), "gone")
    assert record.state == "unsaved" and "gone" in record.why
    await store.close()


async def test_a_work_deleted_while_it_is_saved_stays_deleted_and_its_file_goes(redis_url, tmp_path):
    async with FakeArchive(b"y" * (1 << 20), delay=0.05) as fake:
        store = await ending(redis_url, instance(fake.port))
        works = WorkStore(store, str(tmp_path), 10 << 20, 600, 10)
        saving = asyncio.create_task(works.save(instance(fake.port), "stopped"))
        await asyncio.sleep(0.2)
        record = await store.work(WORK)
        assert await store.move_work("saving", replace(record, state="deleted"), 600)
        assert (await saving).state == "deleted"
    assert (await store.work(WORK)).state == "deleted" and list(tmp_path.iterdir()) == []
    await store.close()


async def test_delete_forgets_a_saved_work_once(redis_url, tmp_path):
    async with FakeArchive(b"z" * 1000) as fake:
        store = await ending(redis_url, instance(fake.port))
        works = WorkStore(store, str(tmp_path), 10 << 20, 600, 10)
        saved = await works.save(instance(fake.port), "stopped")
    assert await works.delete(saved) and not works.path(WORK).exists()
    assert (await store.work(WORK)).state == "deleted"
    assert not await works.delete(saved)  # its state moved: a second delete finds it deleted
    await store.close()


async def test_the_sweep_removes_expired_deleted_and_abandoned_files_only(redis_url, tmp_path):
    store = Store(connect(redis_url), "unit:")
    works = WorkStore(store, str(tmp_path), 1 << 20, 600, 10)
    kept, expired, deleted = "K" * 32, "E" * 32, "D" * 32
    await store.redis.set(store.key("work", kept), WorkRecord(kept, "i", "saved", NOW).to_json())
    await store.redis.set(store.key("work", deleted), WorkRecord(deleted, "i", "deleted", NOW).to_json())
    for w in (kept, expired, deleted):
        (tmp_path / f"{w}.tar.gz").write_bytes(b"x")
    fresh, old = tmp_path / f".{kept}.aaaa{PART}", tmp_path / f".{expired}.bbbb{PART}"
    fresh.write_bytes(b"half")
    old.write_bytes(b"half")
    os.utime(old, (NOW - 3600, NOW - 3600))
    assert await works.sweep(time.time()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{kept}.tar.gz", fresh.name])
    await store.close()


async def test_families_sharing_a_store_never_sweep_each_others_works(redis_url, tmp_path):
    """Two key prefixes, one datalab_work_dir: each family has its own directory in it (instances.py)."""
    ours, theirs = Store(connect(redis_url), "unit:"), Store(connect(redis_url), "other:")
    mine = WorkStore(ours, str(tmp_path / family_name("unit:")), 1 << 20, 600, 10)
    other = WorkStore(theirs, str(tmp_path / family_name("other:")), 1 << 20, 600, 10)
    for works, store in ((mine, ours), (other, theirs)):
        works.ensure_directory()
        await store.redis.set(store.key("work", WORK), WorkRecord(WORK, "i", "saved", NOW).to_json())
        works.path(WORK).write_bytes(b"archive")
    await ours.redis.delete(ours.key("work", WORK))  # ours expired: only ours goes
    assert await mine.sweep(time.time()) == 1 and await other.sweep(time.time()) == 0
    assert not mine.path(WORK).exists() and other.path(WORK).read_bytes() == b"archive"
    await ours.close()
    await theirs.close()


async def test_a_full_work_store_is_the_stores_fault_and_leaves_no_part(redis_url, tmp_path, monkeypatch):
    """Writes into /dev/full fail as a full disk does (ENOSPC), closing the file included."""

    def full(part: Path):
        part.touch()
        return open("/dev/full", "wb")

    monkeypatch.setattr(work, "_create", full)
    async with FakeArchive(os.urandom(1 << 20)) as fake:
        store = await ending(redis_url, instance(fake.port))
        before = saves("store")
        record = await WorkStore(store, str(tmp_path), 10 << 20, 600, 10).save(instance(fake.port), "stopped")
    assert (record.state, record.why) == ("unsaved", "the work store could not take it")
    assert saves("store") == before + 1 and list(tmp_path.iterdir()) == []
    await store.close()


async def test_the_sweep_marks_saved_a_whole_archive_its_record_missed(redis_url, tmp_path):
    """Redis away when the archive was renamed into place: the record says saving long after."""
    store = Store(connect(redis_url), "unit:")
    works = WorkStore(store, str(tmp_path), 1 << 20, 600, 10)
    ended = time.time() - works.settled_after - 1
    await store.redis.set(store.key("work", WORK), WorkRecord(WORK, "i", "saving", NOW, "stopped", ended).to_json())
    works.path(WORK).write_bytes(b"whole")
    assert await works.sweep(time.time()) == 0
    record = await store.work(WORK)
    assert (record.state, record.size, record.sha256) == ("saved", 5, hashlib.sha256(b"whole").hexdigest())
    await store.close()


def test_work_max_auto_is_the_disk_limit_with_the_archives_overhead():
    assert work_max_bytes("10m", "288m") == 10 << 20
    assert 288 << 20 < work_max_bytes("auto", "288m") < 320 << 20


async def test_the_work_store_is_refused_when_it_is_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="link"):
        WorkStore(None, str(tmp_path / "link"), 1, 1, 1).ensure_directory()
    Path(tmp_path / "open").mkdir(mode=0o755)
    WorkStore(None, str(tmp_path / "open"), 1, 1, 1).ensure_directory()
    assert oct((tmp_path / "open").stat().st_mode & 0o777) == "0o700"
