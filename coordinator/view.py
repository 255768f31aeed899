"""The coordinator's in-memory view of the fleet, fed by KV watches.

The view is a cache for decisions (what to dispatch, what to reap, what to unblock); every
decision is then written with a compare-and-set against the broker, so a stale view costs a
lost CAS, never a wrong state. Several coordinators may each hold their own view.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
import zlib
from collections import deque
from dataclasses import dataclass, field

import msgspec

from gigafactory.broker import Broker, WatchProgress
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas.lifecycle import TERMINAL, Stage
from gigafactory.schemas.records import FactoryRecord, JobRecord, decode

log = logging.getLogger(__name__)


class RecordPacker:
    """Finished jobs' records, packed: zlib with a preset dictionary.

    A view holds every record of ``gf_jobs``, and most of them are finished (100,000 after a
    busy week): decoded, each is a tree of about ten containers and dozens of strings, 3-4 KB
    of Python objects. A finished job's record is read only by rare paths (status, list,
    clean-up, archive, a feature's run row), so the view keeps it packed and decodes it when
    one of them asks. The dictionary is the first record this process packs: records of one
    fleet share their field names and most values, so each packs to its differences from it.
    The dictionary never changes afterwards (every packed record depends on it)."""

    LEVEL = 1
    """zlib's fastest level: the replay packs every finished record once, and the dictionary
    does most of the work."""
    WBITS = -12
    """A raw deflate stream (no header: a few bytes less per record) with a 4 KiB window: room
    for the dictionary and most of a record. zlib's default (32 KiB, memory level 9) spent
    ~100 us per record setting up its tables, more than the whole rest of a replay's record."""
    MEM_LEVEL = 4
    """Smaller hash tables to set up per record; no worse on records this size (measured)."""
    ZDICT_MAX_BYTES = 1 << -WBITS
    """The window's size: a longer dictionary could not be reached."""

    __slots__ = ("zdict", "_primed")

    def __init__(self) -> None:
        self.zdict: bytes | None = None
        self._primed = None
        """A compressor with the dictionary loaded: each record is packed by a copy of it."""

    def pack(self, value: bytes) -> bytes:
        if self._primed is None:
            self.zdict = bytes(value[-self.ZDICT_MAX_BYTES:])
            self._primed = zlib.compressobj(self.LEVEL, zlib.DEFLATED, self.WBITS, self.MEM_LEVEL,
                                            zlib.Z_DEFAULT_STRATEGY, self.zdict)
        c = self._primed.copy()
        return c.compress(value) + c.flush()

    def unpack(self, packed: bytes) -> bytes:
        assert self.zdict is not None, "a packed record without the dictionary it was packed with"
        d = zlib.decompressobj(self.WBITS, self.zdict)
        return d.decompress(packed) + d.flush()


PACK_SLICE = 1000
"""Records :meth:`FleetView.pack_deferred` packs between two turns of the event loop (~15 ms)."""


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing): a replay held every stored record for a moment, and freed memory in the middle
    of the heap would otherwise stay in the process's resident size."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


PACKER = RecordPacker()
"""One per process: a packed record needs the dictionary it was packed with."""


class JobState:
    """One job as the view holds it: the record, its revision and the revision's broker
    timestamp, and a few fields read from it that passes over every job need.

    A finished job's record (a terminal stage) is held packed (:class:`RecordPacker`):
    :attr:`record` decodes it on each read, so a pass over every job must read the fields
    below, never :attr:`record`, for a job it does not act on.

    :param record: the decoded record (the view packs it later with :meth:`evict`).
    :param revision: its ``gf_jobs`` revision.
    :param ts: the broker timestamp of ``revision``.
    :param size_bytes: the size of the stored value.
    """

    __slots__ = ("key", "stage", "deps", "revision", "ts", "size_bytes", "product", "submitted_at", "parent",
                 "refs_pending", "_record", "_packed", "_raw")

    def __init__(self, record: JobRecord, revision: int, ts: float, size_bytes: int = 0) -> None:
        self.key = record.id
        self.stage = record.stage
        self.deps: tuple[str, ...] = tuple(record.deps) if record.deps else ()
        self.revision = revision
        self.ts = ts
        """Broker timestamp of ``revision``."""
        self.size_bytes = size_bytes
        """Size of the stored value: a record too close to the broker's maximum message size
        cannot take a claim and its attempt history (see ``Scheduler.dispatch``)."""
        self.product = sys.intern(record.manifest.product)
        self.submitted_at = record.submitted_at
        self.parent = record.manifest.parent or None
        """The manifest's ``parent`` (a feature's run row finds its children by it)."""
        self.refs_pending = record.manifest.repo is not None and not record.refs_cleaned
        """A ``repo`` job whose remote branches the coordinator has not cleaned up yet."""
        self._record: JobRecord | None = record
        self._packed: bytes | None = None
        self._raw: bytes | None = None
        """The stored bytes, held until packed (a replay defers packing: see FleetView.pack_deferred)."""

    @property
    def record(self) -> JobRecord:
        """The full record: held, or decoded from its packed form (a new object each read)."""
        rec = self._record
        if rec is None:
            raw = self._raw
            if raw is None:
                assert self._packed is not None
                raw = PACKER.unpack(self._packed)
            rec = decode(raw, JobRecord)
        return rec

    @property
    def packed(self) -> bool:
        """Whether the view holds the record packed (finished jobs), not decoded."""
        return self._record is None

    def evict(self, value: bytes, *, defer: bool = False) -> None:
        """Hold the record as ``value`` (its stored bytes) packed, and drop the decoded one.

        :param value: the record as stored.
        :param defer: hold ``value`` as it is until :meth:`pack` (a replay packs afterwards).
        """
        if defer:
            self._raw = value
        else:
            self._packed = PACKER.pack(value)
        self._record = None

    def pack(self) -> None:
        """Pack the bytes :meth:`evict` held as they were (nothing to do otherwise)."""
        if self._raw is not None:
            self._packed = PACKER.pack(self._raw)
            self._raw = None


@dataclass(slots=True)
class PoisonNote:
    """A ``gf_jobs`` revision the view could not take in (it does not decode, or its id is
    not its key). The scheduler quarantines it (``Scheduler.flush``); the view leaves it
    out, so no decision ever reads it again, until the key gets a new revision."""

    revision: int
    reason: str
    size_bytes: int


@dataclass(slots=True)
class FactoryState:
    record: FactoryRecord
    ts: float
    offers: caps.Offers


@dataclass
class FleetView:
    jobs: dict[str, JobState] = field(default_factory=dict)
    factories: dict[str, FactoryState] = field(default_factory=dict)
    by_stage: dict[Stage, set[str]] = field(default_factory=lambda: {s: set() for s in Stage})
    dependents: dict[str, set[str]] = field(default_factory=dict)
    """job id -> ids of jobs that list it in ``deps``."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    jobs_synced: asyncio.Event = field(default_factory=asyncio.Event)
    factories_synced: asyncio.Event = field(default_factory=asyncio.Event)
    job_listeners: list = field(default_factory=list)
    """Called as ``fn(old, new)`` (each a :class:`JobState` or None) on every job change, so a
    consumer (the scheduler's dispatch order) keeps its own structures without rescanning."""
    poison: dict[str, PoisonNote] = field(default_factory=dict)
    """gf_jobs keys whose latest revision is not a usable job record (see :class:`PoisonNote`)."""
    defer_packing: bool = False
    """Set while a watch replays ``gf_jobs``: finished records are held as stored and packed
    after the replay (:meth:`pack_deferred`), so the view is ready (and the first dispatch
    pass runs) without waiting for 100,000 compressions."""
    _unpacked: deque = field(default_factory=deque)
    """Job states whose record :meth:`pack_deferred` is still to pack."""
    _packing: asyncio.Task | None = None
    heartbeats_quiet: int = 0
    """Heartbeats that changed nothing dispatch depends on, so did not wake the scheduler
    (1,000 factories heartbeat 100 times a second; each would be a dispatch pass)."""

    def apply_job(self, key: str, value: bytes | None, revision: int, ts: float) -> None:
        """Take in one ``gf_jobs`` change (``value`` None: deleted). A value that is not a
        usable job record is left out of the view and noted in :attr:`poison`: one bad
        record must never stop the watch (an exception here would end it, and every
        re-watch would replay into the same record)."""
        old = self.jobs.pop(key, None)
        if old is not None:
            self.by_stage[old.stage].discard(key)
            for d in old.deps:
                waiting_on_d = self.dependents.get(d)
                if waiting_on_d is not None:
                    waiting_on_d.discard(key)
                    if not waiting_on_d:  # archived jobs leave: keep the map bounded by the live ones
                        del self.dependents[d]
        self.poison.pop(key, None)
        if not value:
            if old is not None:  # a key the view never held (poison, or before the replay) changes nothing
                self._tell(old, None)
            self.changed.set()
            return
        try:
            rec = decode(value, JobRecord)
            if rec.id != key:
                raise ValueError(f"its id {rec.id!r} is not its key")
        except (msgspec.DecodeError, ValueError) as e:
            self._poisoned(key, revision, f"not a job record: {e}", len(value), old)
            return
        new = JobState(rec, revision, ts, len(value))
        try:
            self._tell(old, new)
        except Exception as e:  # a consumer cannot take this record: keep it out of every decision
            log.exception("gf_jobs/%s revision %d refused by the scheduler's queue", key, revision)
            self._tell(new, None)
            self._poisoned(key, revision, f"refused by the coordinator ({type(e).__name__}: {e})", len(value), None)
            return
        new.key = key  # the dict's own key object: one string per job, not two
        if rec.stage in TERMINAL:
            # Told with the decoded record above; from now on only rare paths read it.
            new.evict(value, defer=self.defer_packing)
            if self.defer_packing:
                self._unpacked.append(new)
        self.jobs[key] = new
        self.by_stage[rec.stage].add(key)
        for d in rec.deps:
            self.dependents.setdefault(d, set()).add(key)
        self.changed.set()

    def replay_done(self) -> None:
        """The replay of ``gf_jobs`` is over: pack what it deferred, in the background."""
        self.defer_packing = False
        if self._unpacked and (self._packing is None or self._packing.done()):
            self._packing = asyncio.get_running_loop().create_task(self.pack_deferred(), name="pack-records")

    async def pack_deferred(self) -> int:
        """Pack the finished records a replay deferred, PACK_SLICE at a time with the event loop
        free in between (a dispatch pass never waits behind more than one slice); returns how
        many. Then the freed bytes go back to the system (:func:`_trim_heap`)."""
        n = 0
        while self._unpacked:
            for _ in range(min(PACK_SLICE, len(self._unpacked))):
                self._unpacked.popleft().pack()
                n += 1
            await asyncio.sleep(0)
        _trim_heap()
        return n

    def _poisoned(self, key: str, revision: int, reason: str, size_bytes: int, old: JobState | None) -> None:
        log.error("gf_jobs/%s revision %d left out of the view: %s", key, revision, reason)
        self.poison[key] = PoisonNote(revision, reason, size_bytes)
        if old is not None:
            self._tell(old, None)
        self.changed.set()

    def _tell(self, old: JobState | None, new: JobState | None) -> None:
        for fn in self.job_listeners:
            fn(old, new)

    def apply_factory(self, key: str, value: bytes | None, ts: float) -> None:
        if not value:
            self.factories.pop(key, None)
            self.changed.set()
            return
        try:
            rec = decode(value, FactoryRecord)
            old = self.factories.get(key)
            # A heartbeat rarely changes the capabilities: keep the parsed set (and its cache).
            offers = (old.offers if old is not None and old.record.capabilities == rec.capabilities
                      else caps.Offers(rec.capabilities))
        except (msgspec.DecodeError, caps.CapabilityError) as e:
            log.error("gf_factories/%s is not a factory record: %s", key, e)
            return
        old = self.factories.get(key)
        self.factories[key] = FactoryState(rec, ts, offers)
        if old is None or _dispatch_relevant(old, rec, ts):
            self.changed.set()
        else:
            self.heartbeats_quiet += 1

    def live_factories(self, broker_now: float, heartbeat_s: float) -> list[FactoryState]:
        """Factories that are up and heartbeated within three periods (broker time)."""
        out = []
        for f in self.factories.values():
            period = f.record.heartbeat_interval_s or heartbeat_s
            if f.record.status == "up" and broker_now - f.ts <= 3 * period:
                out.append(f)
        return out

    def stage_ids(self, *stages: Stage) -> set[str]:
        out: set[str] = set()
        for s in stages:
            out |= self.by_stage[s]
        return out


def _dispatch_relevant(old: FactoryState, new: FactoryRecord, ts: float) -> bool:
    """Whether a factory's new record can change a dispatch decision: its status, stations,
    capabilities or pools changed, or it comes back after long enough to have been counted
    dead. Busy and free stations are read from the job records, not from heartbeats."""
    o = old.record
    period = new.heartbeat_interval_s or o.heartbeat_interval_s or 0.0
    return (o.status != new.status or len(o.stations) != len(new.stations) or o.capabilities != new.capabilities
            or o.pools != new.pools or o.seats != new.seats or o.dispatch_mode != new.dispatch_mode
            or o.heartbeat_interval_s != new.heartbeat_interval_s or ts - old.ts > 2 * period)


class _ReplayGC:
    """Python's cyclic garbage collector held off while watches replay, for the whole process.

    A replay builds the view: 100,000 job records of about ten tracked containers each. Every
    700 allocations the collector runs, and each older-generation pass walks what the replay
    built so far: measured, 17 us of a record's 21 us of decoding went to it. The records hold
    no reference cycles (plain data, freed by reference counting as they are replaced), so
    nothing waits for the collector meanwhile. When the last replay is done, one full
    collection, then ``gc.freeze()``: what exists now (the view) moves to the permanent
    generation, so later collections no longer walk it again and again either."""

    depth = 0
    paused = False

    @classmethod
    def hold(cls) -> None:
        if cls.depth == 0 and gc.isenabled():
            gc.disable()
            cls.paused = True
        cls.depth += 1

    @classmethod
    def release(cls) -> None:
        assert cls.depth > 0
        cls.depth -= 1
        if cls.depth == 0 and cls.paused:
            cls.paused = False
            gc.enable()
            gc.collect()
            gc.freeze()


def _replay_over(view: FleetView, jobs: bool) -> None:
    """The watch's replay is over: collection back on, and the job view's deferred packing runs."""
    _ReplayGC.release()
    if jobs:
        view.replay_done()


async def _take_updates(e, w, progress: "WatchProgress", synced: asyncio.Event, apply, trailing: bool) -> bool:
    """Apply ``e`` and every update already received behind it without awaiting each (a restart
    replays every record, 100,000 jobs, and a timed wait per record, a task and a timer each, was
    a quarter of the replay's cost; ``_updates`` is nats-py's queue behind ``updates()``).
    Returns whether the view still trails the watch's consumer."""
    while True:
        if e is None:
            if synced.is_set() or await progress.caught_up():
                synced.set()
            else:
                trailing = True
        else:
            progress.consumed += 1
            deleted = e.operation in ("DEL", "PURGE")
            ts = e.created.timestamp() if e.created else 0.0
            apply(e.key, None if deleted else e.value, e.revision or 0, ts)
            if trailing and e.delta == 0 and await progress.caught_up():
                trailing = False
                synced.set()
        try:
            e = w._updates.get_nowait()
        except asyncio.QueueEmpty:
            return trailing


async def _follow_bucket(broker: Broker, view: FleetView, stop: asyncio.Event, bucket, apply,
                         synced: asyncio.Event, jobs: bool) -> None:
    """Keep ``view`` in step with one bucket (see :func:`follow`); ``jobs``: it is ``gf_jobs``."""
    while not stop.is_set():
        try:
            reconnects = broker.nc.stats["reconnects"]
            w = await bucket.watch(">")
            # The initial load ends when the watch has delivered everything its consumer
            # had to, not at nats-py's marker alone (see broker.caught_up): after a broker
            # restart the marker can come first, and a view marked synced then is empty,
            # so the coordinator would call itself ready, and sync_index delete every entry
            # of the queue index, before a single job was loaded.
            progress, trailing = WatchProgress(w), False
            replaying = True
            _ReplayGC.hold()
            if jobs:
                view.defer_packing = True
            try:
                while not stop.is_set():
                    if broker.nc.stats["reconnects"] != reconnects:
                        # A broker restart drops the watch's ephemeral consumer; nats-py only
                        # notices after two missed idle heartbeats (10-20 s), and until then
                        # the view sees no change: nothing new is dispatched. Watch again now
                        # (a full replay of the latest values).
                        log.info("reconnected to the broker; re-watching %s", bucket.name)
                        break
                    try:
                        e = await w.updates(timeout=1.0)
                    except (asyncio.TimeoutError, TimeoutError):
                        if trailing and await progress.caught_up():
                            trailing = False
                            synced.set()
                    else:
                        trailing = await _take_updates(e, w, progress, synced, apply, trailing)
                    if replaying and synced.is_set():
                        replaying = False
                        _replay_over(view, jobs)
            finally:
                if replaying:
                    _ReplayGC.release()
                    if jobs:
                        view.defer_packing = False
                        if not stop.is_set():  # a failed watch: pack what it held (it re-watches next)
                            view.replay_done()
                try:
                    await w.stop()
                except Exception:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception as ex:  # connection trouble: back off and replay
            log.warning("watch on %s failed (%s); re-watching", bucket.name, ex)
            await asyncio.sleep(1.0)


async def follow(broker: Broker, view: FleetView, stop: asyncio.Event) -> None:
    """Keep ``view`` in step with ``gf_jobs`` and ``gf_factories`` until ``stop`` is set.
    Watches are re-established (with a full replay of latest values) if they fail."""
    try:
        await asyncio.gather(
            _follow_bucket(broker, view, stop, broker.jobs, view.apply_job, view.jobs_synced, True),
            _follow_bucket(broker, view, stop, broker.factories, lambda k, v, _r, ts: view.apply_factory(k, v, ts),
                           view.factories_synced, False),
        )
    finally:
        if view._packing is not None:  # the view's background packing ends with the watches
            view._packing.cancel()
