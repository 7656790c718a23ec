"""What the instance API (GET /datalab/instances, api.py) tells a frontend's server of an instance:
its state (booting, ready, ended and how), its start (profile, owner, filename), its last activity,
and when idle culling and max age would end it, so the frontend can warn its user before.

The deadlines are lifetime.py's, the culler's own rules: the idle deadline counts from the last
activity the proxies recorded in Redis (written in batches every few seconds); the culler ends an
instance at its first round past either deadline (so up to datalab_cull_interval later), and for
idleness only when its Jupyter too reports nothing newer and no kernel busy (so an idle deadline may
move later, never earlier).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from dataclasses import dataclass

from backends import Instance
from config import Settings
from lifetime import deadlines
from lifetime import lifetime_of
from owners import Owners
from owners import Started
from store import Store
from store import WorkRecord

BOOTING, READY, ENDED = "booting", "ready", "ended"
MAX_LISTED = 500  # entries one listing answers: every booting and ready one, then the newest ended


@dataclass(frozen=True)
class Entry:
    """One instance as the API answers it (times are unix seconds; None where they do not apply)."""

    work: str
    state: str  # booting, ready or ended
    ended: str | None  # how it ended (stopped, idle, max_age, gone, unreachable, removed)
    ended_at: float | None
    profile: str
    owner: str
    filename: str
    created: float  # when it was handed out (booting: when the start began)
    last_activity: float | None
    idle_deadline: float | None
    max_age_deadline: float | None
    work_state: str | None  # the work's (/datalab/work): live, saving, saved, unsaved or deleted

    def to_json(self) -> dict:
        return asdict(self)


def booting(work_id: str, owner: str, started: Started) -> Entry:
    return Entry(work_id, BOOTING, None, None, started.profile, owner, started.filename, started.created, *[None] * 4)


def entry(work: WorkRecord, record: Instance | None, last_activity: float | None, settings: Settings) -> Entry:
    """The entry of a bound instance: ready while its work is live and its record there, else ended."""
    if work.state == "live" and record is not None:
        idle, max_age = deadlines(record, last_activity, lifetime_of(settings, record.profile))
        last = record.claimed if last_activity is None else last_activity
        about = (record.profile, record.owner, record.filename, record.claimed or record.created)
        return Entry(work.id, READY, None, None, *about, last, idle, max_age, work.state)
    ended_at = work.ended_at or None
    about = (work.profile, work.owner, work.filename, work.created)
    return Entry(work.id, ENDED, work.ended or "removed", ended_at, *about, None, None, None, work.state)


class InstanceInfo:
    """Reads what the entries are made of: the work records, the live records and activity, and
    for an owner its index (owners.py), never a scan of the keyspace."""

    def __init__(self, store: Store, owners: Owners, settings: Settings):
        self.store = store
        self.owners = owners
        self.settings = settings

    async def of_work(self, work_id: str) -> Entry | None:
        work = await self.store.work(work_id)
        if work is None:
            return None
        return (await self._entries({work_id: work}))[0]

    async def of_owner(self, owner: str) -> list[Entry]:
        """The owner's instances still known (booting, ready, or ended while their works live), oldest first."""
        started, leases = await self.owners.index(owner)
        works = await self.store.works(sorted(started))
        now = time.time()
        found = await self._entries(works)
        found += [
            booting(w, owner, s) for w, s in started.items() if w not in works and leases.get(w, -math.inf) >= now
        ]
        return sorted(found, key=lambda e: (e.created, e.work))

    async def listing(self, owner: str, most: int = MAX_LISTED) -> tuple[list[Entry], int]:
        """The owner's entries as one answer holds them (`bounded`), and how many were left out."""
        found = await self.of_owner(owner)
        kept = bounded(found, most)
        return kept, len(found) - len(kept)

    async def _entries(self, works: dict[str, WorkRecord]) -> list[Entry]:
        live = [w.instance for w in works.values() if w.state == "live"]
        records = await self.store.records(live)
        activity = await self.store.last_activity(live)
        return [entry(w, records.get(w.instance), activity.get(w.instance), self.settings) for w in works.values()]


def bounded(entries: list[Entry], most: int) -> list[Entry]:
    """At most `most` of these entries (oldest first), leaving out the oldest ended ones first: an
    owner who started thousands within datalab_work_ttl is not answered megabytes of them, and
    never loses sight of what still runs."""
    surplus = max(0, len(entries) - most)
    left_out = set([e.work for e in entries if e.state == ENDED][:surplus])  # entries: oldest first
    return [e for e in entries if e.work not in left_out]
