"""Retention: a fleet's broker storage stays bounded for months, and says so before a limit.

What grows with the work done, and what bounds it:

- ``GF_EVENTS`` and ``gf_artifacts``: byte caps and ages set on the streams themselves
  (``events_max_bytes``/``events_max_age_s``, ``artifacts_max_bytes``/``artifacts_max_age_s``),
  applied by a coordinator's first pass (``Broker.apply_limits``; a layout is created with
  them too). Then watched: a ``retention_warning`` event when one holds more than
  ``retention_warn_ratio`` of its cap.
- ``gf_jobs``, held whole in every coordinator's memory: a finished job (``shipped``,
  ``failed``, ``dead_letter``) whose record has not changed for ``archive_after_s`` (broker
  time) is *archived*: copied without its body to ``gf_archive`` (capped by
  ``archive_max_bytes``, aged out after ``archive_max_age_s``), then deleted from ``gf_jobs``
  with a compare-and-set on the revision read (a job requeued meanwhile is not touched), and
  an ``archived`` event says so. Its final events stay in ``GF_EVENTS``. A job with an
  unfinished dependent is kept until that dependent finishes. Lookups that miss ``gf_jobs``
  read the archive (:func:`read_archived`): intake's dependency and idempotency checks, the
  scheduler's dependency resolution and ``status``.
- ``gf_factories``: the record of a factory silent for ``factory_forget_s`` (killed without
  draining, or a machine gone for good) is deleted; it registers again if it returns.
- ``gf_idempotency``: keys expire ``archive_after_s + archive_max_age_s`` after their last
  write (a bucket age limit), when their job can no longer be found anyway.
- ``gf_pools`` and the dispatch consumers: a pool with no unfinished job and no live
  factory bound to it for ``pool_idle_gc_s`` (as this coordinator saw it, continuously) is
  deleted, entry first (factories unbind on its delete), then its consumer. A later job for
  the same requirements creates it again (``ensure_pool``): the per-process caches of pools
  ensured trust an entry for half of ``pool_idle_gc_s`` only (``broker.KnownPools``), and
  every pass recreates the pool of any queued job whose pool entry is missing (the race of a
  submission with a deletion by another coordinator).

The decisions are pure functions over plain values (:func:`archive_candidates`,
:func:`idle_pools`, :func:`cap_warning`); :class:`Retention` does the I/O, one bounded pass
at a time (at most ``retention_batch`` jobs archived and pools deleted per pass), run by the
coordinator as a loop every ``retention_interval_s``. Several coordinators may run it at
once: every deletion is a compare-and-set, so two passes racing cannot both act.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec
import nats.js.errors
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from gigafactory.broker import Broker, Conflict
from gigafactory.config import Settings, check_retention
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import TERMINAL, Stage
from gigafactory.schemas.records import EventRecord, JobRecord, PoolRecord, decode, encode

from .archive import READS_IN_FLIGHT, archived_stages, read_archived  # noqa: F401 (re-exported)
from .intake import ensure_pool
from .view import FleetView, JobState

log = logging.getLogger(__name__)

WARN_EVERY_S = 3600.0
"""A stream that stays above its warning ratio is warned about again at most this often."""


# -- pure decisions ---------------------------------------------------------------------------


def compact(rec: JobRecord) -> JobRecord:
    """The record as archived: without its body (the prompt, the largest field, kept in the
    job file and the events), everything else as it was, ``content_hash`` included (so an
    idempotent resubmission of the same content is still recognised)."""
    return msgspec.structs.replace(rec, body="")


def archive_candidates(jobs: dict[str, JobState], dependents: dict[str, set[str]], terminal_ids: Iterable[str],
                       broker_now: float, archive_after_s: float, limit: int) -> list[JobState]:
    """The finished jobs to archive now, oldest first, at most ``limit``.

    :param jobs: the view's job states (record, revision, broker timestamp).
    :param dependents: job id -> ids of jobs that list it in ``deps``.
    :param terminal_ids: ids of the jobs in a terminal stage.
    :param broker_now: the broker's clock (the clock that stamped the records).
    :param archive_after_s: how long a record must have been unchanged.
    :param limit: the most to return (one pass's batch).

    A job is kept while any job that depends on it has not finished: resolving that
    dependent must not depend on reading the archive."""
    due = []
    for jid in terminal_ids:
        st = jobs.get(jid)
        # Stages and ids from the states, never ``st.record``: a finished job's is packed.
        if st is None or st.stage not in TERMINAL or broker_now - st.ts < archive_after_s:
            continue
        if any((d := jobs.get(dep)) is not None and d.stage not in TERMINAL for dep in dependents.get(jid, ())):
            continue
        due.append(st)
    due.sort(key=lambda st: (st.ts, st.key))
    return due[:limit]


def idle_pools(pools: Iterable[str], busy: set[str], bound: set[str], idle_since: dict[str, float],
               mono_now: float, pool_idle_gc_s: float) -> list[str]:
    """The pools idle long enough to delete; updates ``idle_since`` (pool -> monotonic time
    it was first seen idle, in this process) in place.

    :param pools: the pools that exist (``gf_pools`` keys).
    :param busy: pools with an unfinished job.
    :param bound: pools a live factory is bound to.
    :param mono_now: this process's monotonic clock now.

    A pool busy or bound now starts over; so does every pool after a coordinator restart
    (``idle_since`` is memory): deleting late is harmless, deleting early is not."""
    present = set(pools)
    for p in list(idle_since):
        if p not in present or p in busy or p in bound:
            del idle_since[p]
    out = []
    for p in sorted(present):
        if p in busy or p in bound:
            continue
        since = idle_since.setdefault(p, mono_now)
        if mono_now - since >= pool_idle_gc_s:
            out.append(p)
    return out


def cap_warning(stream: str, used_bytes: int, max_bytes: int, warn_ratio: float, setting: str,
                at_cap: str) -> str | None:
    """The warning to give about ``stream`` (None: below ``warn_ratio`` of its cap, or no cap).

    :param setting: the ``GIGAFACTORY_<NAME>`` variable that sets the cap.
    :param at_cap: what happens when the cap is reached, in words an operator can act on."""
    if max_bytes <= 0 or used_bytes < warn_ratio * max_bytes:
        return None
    return (f"{stream} holds {used_bytes / 2**20:.1f} MiB, {100 * used_bytes / max_bytes:.0f}% of its "
            f"{max_bytes / 2**20:.0f} MiB cap; at the cap {at_cap}. Raise {setting} (and make room on "
            f"the broker's disk), or shorten the matching age setting")


def clock_skew(offsets: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(skew_s, uncertainty_s) of the servers' clocks: the spread of their offsets from ours,
    and how much of it the round trips can explain (half the two widest, summed).

    :param offsets: server -> (offset_s, rtt_s), as ``Broker.leader_clocks`` measures them."""
    if len(offsets) < 2:
        return 0.0, 0.0
    hi = max(offsets.values(), key=lambda o: o[0])
    lo = min(offsets.values(), key=lambda o: o[0])
    return hi[0] - lo[0], (hi[1] + lo[1]) / 2


# -- the pass ---------------------------------------------------------------------------------


@dataclass
class CapSpec:
    stream: str
    setting: str
    at_cap: str


@dataclass
class PassReport:
    archived: list[str] = field(default_factory=list)
    pools_deleted: list[str] = field(default_factory=list)
    pools_restored: list[str] = field(default_factory=list)
    factories_forgotten: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    limits_set: dict[str, dict] = field(default_factory=dict)
    """Stream -> limits changed by this pass (the first of a coordinator process)."""
    errors: int = 0


class Retention:
    """One coordinator's retention: call :meth:`run_pass` every ``retention_interval_s``.

    :param broker: the coordinator's broker.
    :param view: its fleet view (the jobs and factories it decides from; archived jobs are
        dropped from it at once, not only when the watch delivers the delete).
    :param settings: the retention settings (validated here: :func:`check_retention`).
    :param actor: the name its events carry.
    :param forget_pool: called with a pool's id when this pass deleted it, so per-process
        caches (the scheduler's ``pools_ready``) forget it at once."""

    def __init__(self, broker: Broker, view: FleetView, settings: Settings, actor: str,
                 forget_pool: Callable[[str], None] | None = None) -> None:
        check_retention(settings)
        self.broker = broker
        self.view = view
        self.settings = settings
        self.actor = actor
        self.forget_pool = forget_pool
        self.idle_since: dict[str, float] = {}
        self.warned_at: dict[str, float] = {}
        self.to_purge: list[str] = []
        """gf_jobs keys deleted by the previous pass: their delete markers are purged by the
        next one (every watcher has had a pass interval to see the delete)."""
        self.passes = 0
        self.limits_applied = False
        self.last_offsets: dict[str, tuple[float, float]] = {}
        """The latest pass's measure of the broker nodes' clocks (see Broker.leader_clocks)."""
        self.totals = {"archived": 0, "pools_deleted": 0, "pools_restored": 0, "factories_forgotten": 0,
                       "warnings": 0, "errors": 0}
        self.caps = [
            CapSpec(names.EVENTS_STREAM, "GIGAFACTORY_EVENTS_MAX_BYTES", "the oldest events are dropped"),
            CapSpec(names.SPEND_STREAM, "GIGAFACTORY_SPEND_MAX_BYTES",
                    "the oldest spend records are dropped (invoices of their period cannot be reconciled)"),
            CapSpec(f"OBJ_{names.ARTIFACTS_STORE}", "GIGAFACTORY_ARTIFACTS_MAX_BYTES",
                    "run logs are refused (new logs are lost until old ones age out)"),
            CapSpec(f"KV_{names.ARCHIVE_BUCKET}", "GIGAFACTORY_ARCHIVE_MAX_BYTES",
                    "nothing more is archived: finished jobs stay in gf_jobs and in every coordinator's memory"),
        ]

    async def run_pass(self, *, ahead_s: float = 0.0) -> PassReport:
        """One pass: purge the previous pass's markers, archive, collect idle pools, warn.
        Each step's errors are counted and logged; one failing does not stop the others.

        :param ahead_s: judge every age as if this many seconds later (broker time and this
            process's monotonic clock alike): for tests, which cannot wait days; the
            coordinator's loop never sets it."""
        report = PassReport()
        broker_now = await self.broker.broker_now() + ahead_s
        mono_now = time.monotonic() + ahead_s
        for step in (self._limits, self._purge_markers, lambda r: self._archive(r, broker_now),
                     lambda r: self._pools(r, broker_now, mono_now), lambda r: self._factories(r, broker_now),
                     self._caps, self._clocks):
            try:
                await step(report)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 -- one step's trouble must not stop the rest
                report.errors += 1
                log.warning("retention step failed (%s: %s); next pass", type(e).__name__, e)
        self.passes += 1
        for k in ("archived", "pools_deleted", "pools_restored", "factories_forgotten", "warnings"):
            self.totals[k] += len(getattr(report, k))
        self.totals["errors"] += report.errors
        return report

    async def _limits(self, report: PassReport) -> None:
        """Set the coordinator's retention limits on the streams, once per process (again
        on the next pass if it failed): a layout made by an older version, or by a factory
        with other settings, gets the caps this coordinator was configured with."""
        if not self.limits_applied:
            report.limits_set = await self.broker.apply_limits()
            self.limits_applied = True

    # -- jobs -------------------------------------------------------------------------------

    async def _archive(self, report: PassReport, broker_now: float) -> None:
        terminal = self.view.stage_ids(*TERMINAL)
        due = archive_candidates(self.view.jobs, self.view.dependents, terminal, broker_now,
                                 self.settings.archive_after_s, self.settings.retention_batch)
        if not due:
            return
        assert self.broker.archive is not None, "ensure_layout creates gf_archive"

        async def one(st: JobState) -> str | None:
            rec = st.record
            try:
                await self.broker.archive.put(rec.id, encode(compact(rec)))
            except nats.js.errors.APIError as e:
                # Most likely the archive is at its cap (it refuses new writes): the job stays.
                log.warning("archiving %s failed (%s); it stays in gf_jobs", rec.id, e)
                report.errors += 1
                return None
            try:
                await self.broker.jobs.delete(rec.id, last=st.revision)
            except Conflict:
                # Changed since the view read it (requeued?), or gone already (another
                # coordinator archived it): gf_jobs decides. A stale copy in the archive is
                # harmless (gf_jobs is read first) and is overwritten when it is archived again.
                if await self.broker.jobs.get(rec.id) is None:
                    self._forget(rec.id)
                return None
            self._forget(rec.id)
            return rec.id

        done: list[str] = []
        for i in range(0, len(due), READS_IN_FLIGHT):
            done += [j for j in await asyncio.gather(*(one(st) for st in due[i:i + READS_IN_FLIGHT])) if j]
        by_id = {st.key: st for st in due}  # st.key, st.stage: the records are packed (decoded on each read)
        await _gather_logged([self.broker.publish_event(EventRecord(
            kind="archived", at=time.time(), job=jid, stage_from=str(by_id[jid].stage),
            stage_to=str(by_id[jid].stage), epoch=by_id[jid].record.epoch, actor=self.actor,
            reason=(f"finished {broker_now - by_id[jid].ts:.0f}s ago (archive_after_s {self.settings.archive_after_s:g}); "
                    f"moved to {names.ARCHIVE_BUCKET} without its body"),
            data={"bucket": names.ARCHIVE_BUCKET},
        )) for jid in done], report)
        self.to_purge += done
        report.archived += done
        if done:
            log.info("archived %d finished jobs to %s", len(done), names.ARCHIVE_BUCKET)

    def _forget(self, jid: str) -> None:
        """Drop ``jid`` from the view now (the watch delivers the delete too; a view that
        missed it, after a reconnect's replay, would otherwise keep the record forever)."""
        st = self.view.jobs.get(jid)
        if st is not None:
            self.view.apply_job(jid, None, st.revision, st.ts)

    async def _purge_markers(self, report: PassReport) -> None:
        """Remove the delete markers of the jobs archived by the previous pass: a marker per
        job would otherwise stay in ``KV_gf_jobs`` forever, and be replayed by every watch."""
        keys, self.to_purge = self.to_purge, []
        stream = self.broker.jobs.stream

        async def purge(key: str) -> None:
            subject = f"$KV.{names.JOBS_BUCKET}.{key}"
            last = await self.broker.jobs._direct_get({"last_by_subj": subject})
            if last is None or not last.headers or last.headers.get(KV_OP) not in (KV_DEL, KV_PURGE):
                return  # purged already, or written again since: not ours to remove
            # Up to and including the marker only (``seq`` is exclusive): a write that lands
            # after it, in between, survives.
            await self.broker.js.purge_stream(stream, subject=subject, seq=int(last.headers["Nats-Sequence"]) + 1)

        for i in range(0, len(keys), READS_IN_FLIGHT):
            got = await asyncio.gather(*(purge(k) for k in keys[i:i + READS_IN_FLIGHT]), return_exceptions=True)
            report.errors += sum(isinstance(g, Exception) for g in got)

    # -- pools ------------------------------------------------------------------------------

    async def _pools(self, report: PassReport, broker_now: float, mono_now: float) -> None:
        records: dict[str, tuple[PoolRecord, int]] = {}
        async for e in self.broker.pools.scan():
            try:
                records[e.key] = (decode(e.value, PoolRecord), e.revision)
            except msgspec.DecodeError:
                continue
        busy: dict[str, list[str]] = {}
        for jid in self.view.stage_ids(*(s for s in Stage if s not in TERMINAL)):
            st = self.view.jobs.get(jid)
            if st is not None:
                busy.setdefault(st.record.pool, st.record.requirements)
        # Liveness as of the real now: ``ahead_s`` ages what is idle, not the heartbeats.
        bound = {p for f in self.view.live_factories(broker_now - (mono_now - time.monotonic()), self.settings.heartbeat_s)
                 for p in f.record.pools}

        # A queued job whose pool entry is gone: a submission raced a deletion (by another
        # coordinator, whose caches this one cannot reach). Recreate it; factories rebind.
        for pool, reqs in sorted(busy.items()):
            if pool not in records and len(report.pools_restored) < self.settings.retention_batch:
                await ensure_pool(self.broker, pool, reqs)
                self.broker.pools_known.add(pool)
                report.pools_restored.append(pool)
                log.warning("pool %s had unfinished jobs but no gf_pools entry; recreated it", pool)

        gone = idle_pools(records, set(busy), bound, self.idle_since, mono_now, self.settings.pool_idle_gc_s)
        for pool in gone[: self.settings.retention_batch]:
            rec, revision = records[pool]
            try:
                # The entry first: factories unbind on its delete, and a submission that
                # recreates the pool meanwhile makes this delete (or the next pass) fail.
                await self.broker.pools.delete(pool, last=revision)
            except Conflict:
                continue
            try:
                await self.broker.js.delete_consumer(names.DISPATCH_STREAM, names.pool_consumer(pool))
            except nats.js.errors.NotFoundError:
                pass
            self.idle_since.pop(pool, None)
            self.broker.pools_known.discard(pool)
            if self.forget_pool is not None:
                self.forget_pool(pool)
            report.pools_deleted.append(pool)
            await _gather_logged([self.broker.publish_event(EventRecord(
                kind="pool_deleted", at=time.time(), actor=self.actor,
                reason=(f"pool {pool} had no unfinished job and no live factory bound for "
                        f"{self.settings.pool_idle_gc_s:g}s; deleted its consumer and gf_pools entry "
                        "(the next job for it creates it again)"),
                data={"pool": pool, "requirements": rec.requirements},
            ))], report)
        if report.pools_deleted:
            log.info("deleted %d idle pools: %s", len(report.pools_deleted), ", ".join(report.pools_deleted))

    # -- factories --------------------------------------------------------------------------

    async def _factories(self, report: PassReport, broker_now: float) -> None:
        """Delete the records of factories silent for ``factory_forget_s`` (re-read first, and
        deleted with a compare-and-set: a heartbeat in between keeps the record)."""
        silent = sorted(fid for fid, f in self.view.factories.items() if broker_now - f.ts >= self.settings.factory_forget_s)
        for fid in silent[: self.settings.retention_batch]:
            e = await self.broker.factories.get(fid)
            if e is None or broker_now - e.ts < self.settings.factory_forget_s:
                continue
            try:
                await self.broker.factories.delete(fid, last=e.revision)
            except Conflict:
                continue
            self.view.apply_factory(fid, None, e.ts)
            report.factories_forgotten.append(fid)
            await _gather_logged([self.broker.publish_event(EventRecord(
                kind="factory_forgotten", at=time.time(), factory=fid, actor=self.actor,
                reason=f"no heartbeat for {broker_now - e.ts:.0f}s (factory_forget_s {self.settings.factory_forget_s:g}); "
                       "record deleted (the factory registers again if it returns)",
            ))], report)

    # -- clocks -----------------------------------------------------------------------------

    async def _clocks(self, report: PassReport) -> None:
        """Measure the broker nodes' clocks against each other; a ``clock_skew`` event (at
        most hourly) when two differ by more than ``clock_skew_warn_s`` beyond what the
        round trips explain. One stream info request per stream of the layout."""
        streams = [self.broker.jobs.stream, self.broker.queue.stream, self.broker.factories.stream, self.broker.pools.stream,
                   self.broker.locks.stream, self.broker.idempotency.stream, self.broker.clock.stream,
                   names.DISPATCH_STREAM, names.EVENTS_STREAM, f"OBJ_{names.ARTIFACTS_STORE}"]
        offsets = await self.broker.leader_clocks(streams)
        self.last_offsets = offsets
        skew_s, uncertainty_s = clock_skew(offsets)
        if skew_s - uncertainty_s <= self.settings.clock_skew_warn_s:
            self.warned_at.pop("<clocks>", None)
            return
        last = self.warned_at.get("<clocks>")
        if last is not None and time.monotonic() - last < WARN_EVERY_S:
            return
        self.warned_at["<clocks>"] = time.monotonic()
        text = (f"the broker nodes' clocks differ by {skew_s:.3f}s (+-{uncertainty_s:.3f}s), over clock_skew_warn_s "
                f"{self.settings.clock_skew_warn_s:g}s: after a leader change of {names.JOBS_BUCKET} a lease can expire "
                "that much early; synchronise the nodes' clocks (NTP)")
        log.warning("retention: %s", text)
        report.warnings.append(text)
        await _gather_logged([self.broker.publish_event(EventRecord(
            kind="clock_skew", at=time.time(), actor=self.actor, reason=text,
            data={"skew_s": round(skew_s, 6), "uncertainty_s": round(uncertainty_s, 6),
                  "offsets_s": {k: round(v[0], 6) for k, v in offsets.items()}},
        ))], report)

    # -- caps -------------------------------------------------------------------------------

    async def _caps(self, report: PassReport) -> None:
        for cap in self.caps:
            si = await self.broker.js.stream_info(cap.stream)
            text = cap_warning(cap.stream, si.state.bytes or 0, si.config.max_bytes or 0,
                               self.settings.retention_warn_ratio, cap.setting, cap.at_cap)
            if text is None:
                self.warned_at.pop(cap.stream, None)
                continue
            last = self.warned_at.get(cap.stream)
            if last is not None and time.monotonic() - last < WARN_EVERY_S:
                continue
            self.warned_at[cap.stream] = time.monotonic()
            log.warning("retention: %s", text)
            report.warnings.append(text)
            await _gather_logged([self.broker.publish_event(EventRecord(
                kind="retention_warning", at=time.time(), actor=self.actor, reason=text,
                data={"stream": cap.stream, "bytes": si.state.bytes, "max_bytes": si.config.max_bytes,
                      "ratio": round((si.state.bytes or 0) / si.config.max_bytes, 4), "setting": cap.setting},
            ))], report)


async def _gather_logged(coros: list, report: PassReport) -> None:
    """Await event publishes; a failed one is counted and logged, not raised (the work it
    reports is done)."""
    for r in await asyncio.gather(*coros, return_exceptions=True):
        if isinstance(r, Exception):
            report.errors += 1
            log.info("retention event not published: %s", r)
