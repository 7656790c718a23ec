"""The user's work: an instance's working directory, saved as one tar.gz in the work store before the
instance is removed, whatever ends it, and kept datalab_work_ttl for the frontend to fetch (api.py
serves it: the live snapshot from the instance, the saved archive through work_files.py).

The instance makes the archive itself (the image's extension, image/datalab_work.py: the CPU falls on
the instance) and the proxy streams it to `<work_dir>/<family>/.<id>.<random>.part`, then renames it to
`<work_dir>/<family>/<id>.tar.gz` (a directory per key prefix: families sharing a store never remove
each other's works): a half-written archive is never served (only final names are, and only
while the record says saved), and a proxy killed mid-save leaves a .part that the culler's rounds
remove, while its instance, whose slot stays leased, is saved and ended by reconciliation.

A save is bounded in bytes (datalab_work_max) and in time (datalab_work_timeout): past either it is
abandoned, logged and counted, its record says unsaved and why, and the end goes on. Records
(store.WorkRecord) move live -> saving (in the end's own script) -> saved | unsaved -> deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import counters
import inputs
from backends import BackendError
from backends import Instance
from backends.jupyter import work_archive
from backends.memory_budget import AUTO
from backends.memory_budget import size_bytes
from store import Store
from store import WorkRecord

log = logging.getLogger(__name__)

SUFFIX = ".tar.gz"
PART = ".part"
CHUNK = 256 * 1024
LEASE_MARGIN = 15.0  # seconds an ending instance's slot outlives its save: the drain and the container's removal
FIRST_BYTES = 10.0  # seconds a live instance takes to begin its archive (a frozen one must not hold its end longer)
CAUSE_GONE = "gone"  # the cause of an end whose container was already gone: nothing to save


def work_max_bytes(option: str, disk_limit: str) -> int:
    """datalab_work_max in bytes; auto: the working directory's size, plus what a tar.gz of
    incompressible files adds (a 512-byte header per file, its padding, gzip's framing)."""
    if option != AUTO:
        return size_bytes(option)
    disk = size_bytes(disk_limit)
    return disk + disk // 32 + (16 << 20)


class WorkTooLarge(Exception):
    pass


async def archive_chunks(instance: Instance, max_bytes: int, timeout: float) -> AsyncIterator[bytes]:
    """The running instance's archive as it comes, under the rules a save and a live snapshot share:
    a framed 200 (else BackendError or OSError), its first bytes within FIRST_BYTES, at most
    `max_bytes` (else WorkTooLarge). Iterate it inside contextlib.aclosing: the connection then
    closes as soon as the reader stops."""
    async with work_archive(instance, timeout=min(FIRST_BYTES, timeout)) as (status, body):
        if status != 200:
            raise BackendError("the instance did not hand over its working directory", f"HTTP {status}")
        size = 0
        async for chunk in body.chunks(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise WorkTooLarge()
            yield chunk


class StoreFailed(Exception):
    """The work store could not take the archive (its disk full, say): the instance is not to blame."""


@dataclasses.dataclass(frozen=True)
class Written:
    size: int
    sha256: str


class WorkStore:
    """The directory of saved works and the saving itself."""

    def __init__(self, store: Store, directory: str, max_bytes: int, ttl: int, timeout: float):
        self.store = store
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.timeout = timeout

    @property
    def settled_after(self) -> float:
        """Seconds after an end past which no save of its work can still run: its own, the lease
        after it, a reconciliation's save again (its proxy died), with two minutes to spare."""
        return 2 * (self.timeout + LEASE_MARGIN) + 120

    def lease_until(self, now: float) -> float:
        """Until when an ending instance keeps its slot: its save, then its removal."""
        return now + self.timeout + LEASE_MARGIN

    def ensure_directory(self) -> None:
        """The store and this family's directory in it, created 0700 (they hold every user's results);
        one that is a link or another user's is refused."""
        for directory in (self.directory.parent, self.directory):
            directory.mkdir(mode=0o700, exist_ok=True)
            info = directory.lstat()
            if directory.is_symlink() or info.st_uid != os.getuid():
                raise OSError(f"the work store {directory} is a link or another user's; refusing it")
            if info.st_mode & 0o077:
                directory.chmod(0o700)

    def path(self, work_id: str) -> Path:
        if not inputs.is_token(work_id):
            raise ValueError("not a work id")
        return self.directory / f"{work_id}{SUFFIX}"

    # Saving

    async def save(self, instance: Instance, cause: str) -> WorkRecord | None:
        """Save the ending instance's working directory, if its record says it is to be saved (the
        end that won marked it saving). Never raises for the instance's sake: the end goes on."""
        if not instance.work:
            return None
        record = await self.store.work(instance.work)
        if record is None or record.state != "saving":
            return record
        if cause == CAUSE_GONE:
            return await self._unsaved(record, "gone", "its container was gone before its work could be saved")
        try:
            async with asyncio.timeout(self.timeout):
                written = await self._write(instance)
        except WorkTooLarge:
            return await self._unsaved(record, "too_large", f"it is larger than datalab_work_max ({self.max_bytes} B)")
        except StoreFailed as e:
            log.error("instance %s: the work store could not take its work: %s", instance.id, e)
            return await self._unsaved(record, "store", "the work store could not take it")
        except TimeoutError:
            return await self._unsaved(record, "timeout", f"saving took longer than {self.timeout:g} s")
        except (OSError, BackendError) as e:
            log.warning("instance %s: its work could not be saved: %s", instance.id, e)
            return await self._unsaved(record, "failed", "the instance did not hand over its working directory")
        saved = dataclasses.replace(
            record, state="saved", size=written.size, sha256=written.sha256, saved_at=time.time()
        )
        if not await self.store.move_work("saving", saved, self.ttl, "work_saved"):
            now = await self.store.work(record.id)
            if now is None or now.state == "deleted":  # deleted meanwhile: its file goes too
                await asyncio.to_thread(self.path(record.id).unlink, missing_ok=True)
            return now
        counters.work_saved(written.size)
        log.info("instance %s: work %s saved (%d bytes)", instance.id, record.id[:8], written.size)
        return saved

    async def _unsaved(self, record: WorkRecord, outcome: str, why: str) -> WorkRecord:
        log.warning("work %s of instance %s not saved: %s", record.id[:8], record.instance, why)
        counters.work_unsaved(outcome)
        unsaved = dataclasses.replace(record, state="unsaved", why=why)
        await self.store.move_work("saving", unsaved, self.ttl, "work_unsaved")
        return unsaved

    async def _write(self, instance: Instance) -> Written:
        """Stream the instance's archive to a temporary name, then rename it into place."""
        final = self.path(instance.work)
        part = self.directory / f".{instance.work}.{secrets.token_hex(4)}{PART}"
        digest = hashlib.sha256()
        size = 0
        await _in_store(self.ensure_directory)
        file = await _in_store(_create, part)
        try:
            async with contextlib.aclosing(archive_chunks(instance, self.max_bytes, self.timeout)) as chunks:
                async for chunk in chunks:
                    size += len(chunk)
                    digest.update(chunk)
                    await _in_store(file.write, chunk)
            await _in_store(_finish, file, part, final)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(_discard, file, part))
            raise
        return Written(size, digest.hexdigest())

    # The frontend's calls

    async def delete(self, record: WorkRecord) -> bool:
        """Forget a saved or unsaved work and remove its file; False if its state moved meanwhile."""
        deleted = dataclasses.replace(record, state="deleted")
        if not await self.store.move_work(record.state, deleted, self.ttl):
            return False
        await asyncio.to_thread(self.path(record.id).unlink, missing_ok=True)
        return True

    # The culler's rounds

    async def sweep(self, now: float) -> int:
        """Remove saved works whose record expired or was deleted, and .part files no save writes any
        more (their proxy died); mark saved a whole archive whose record still says saving long after
        its save ended (Redis was away when it was renamed into place). Returns how many files went."""
        names = await asyncio.to_thread(_listing, self.directory)
        finals = [n.removesuffix(SUFFIX) for n in names if n.endswith(SUFFIX) and inputs.is_token(n[: -len(SUFFIX)])]
        records = await self.store.works(finals)
        doomed = [self.path(w) for w in finals if w not in records or records[w].state == "deleted"]
        stale = now - self.timeout - LEASE_MARGIN - 60
        doomed += [self.directory / n for n in names if n.endswith(PART) and _mtime(self.directory / n) < stale]
        for path in doomed:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        if doomed:
            log.info("datalab: removed %d expired or abandoned work files", len(doomed))
        for record in records.values():
            if record.state == "saving" and record.ended_at < now - self.settled_after:
                await self._mark_saved(record)
        return len(doomed)

    async def _mark_saved(self, record: WorkRecord) -> None:
        """A final name is only ever a whole archive (renamed once written and flushed)."""
        written = await asyncio.to_thread(_measure, self.path(record.id))
        saved = dataclasses.replace(
            record, state="saved", size=written.size, sha256=written.sha256, saved_at=time.time()
        )
        if await self.store.move_work("saving", saved, self.ttl, "work_saved"):
            log.info("work %s: its archive was whole in the store; marked saved", record.id[:8])


async def _in_store(fn, *args):
    """A step on the work store's disk: its failure is the store's, not the instance's."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as e:
        raise StoreFailed(str(e)) from e


def _measure(path: Path) -> Written:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            size += len(chunk)
            digest.update(chunk)
    return Written(size, digest.hexdigest())


def _create(part: Path):
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


def _finish(file, part: Path, final: Path) -> None:
    """Durable before it has its final name: a crash leaves the old state or the whole archive."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(part, final)
    directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _discard(file, part: Path) -> None:
    try:
        file.close()  # (a full disk fails this too: its buffer cannot be written)
    except OSError:
        pass
    finally:
        part.unlink(missing_ok=True)


def _listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")
