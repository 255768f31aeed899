"""The coordinator's decisions: unblock, dispatch, reap. Each is written with a CAS.

Dispatch keeps each pool's stream shallow: it publishes, in the order of
:func:`dispatch_order` (priority first; within a priority, products take turns, each in age
order), only as many jobs as the live stations that serve the pool could take now. The rest wait in
``queued`` on the broker (and in the ``gf_queue`` index for the polling fallback), so a
critical job that arrives into a backlog is the next one published, not the last.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors

from gigafactory import tracing
from gigafactory.broker import TRANSIENT, Broker, Conflict, KnownPools
from gigafactory.config import Settings
from gigafactory.economics.budget import enforcement_line
from gigafactory.economics.governor import Governor
from gigafactory.schemas import names, protocol
from gigafactory.schemas import halt as H
from gigafactory.schemas.halt import HaltState
from gigafactory.schemas.lifecycle import LEASED, IllegalTransition, Stage
from gigafactory.schemas.records import (
    EventRecord,
    JobRecord,
    LockRecord,
    PoolRecord,
    QueueEntry,
    decode,
    dispatch_message,
    encode,
)

from . import decide, plan_dispatch, signatures
from .intake import ensure_pool
from .plan_dispatch import QueueOrder, capability_gap  # noqa: F401  (re-exported: tests and tools import them here)
from .retention import archived_stages
from .view import FactoryState, FleetView, JobState

log = logging.getLogger(__name__)

INDEX_IN_FLIGHT = 64
"""``gf_queue`` writes :meth:`Scheduler.sync_index` keeps in flight at once."""
INDEX_AFTER_REDISPATCH = 0.1
"""A job gets a ``gf_queue`` entry once queued this share of ``redispatch_s`` (see sync_index)."""


RECORD_HEADER_BYTES = 512
"""Room left for a write's subject and headers on top of the record: the server counts them
against its maximum message size, and a message over it closes the whole connection
(nats-py checks only the payload), so a record is refused here with a margin."""
RECORD_HEADROOM_BYTES = 16 * 1024
"""A queued record closer than this to the broker's maximum message size cannot be carried
through a claim, its renewals and a result with its attempt history (each adds to it), so
dispatch quarantines it instead of offering it again every ``redispatch_s`` forever."""
EVENT_RETRY_MAX = 1000
"""Events whose publish failed, kept to publish again on the next reaper pass; beyond this
the oldest is dropped and counted (``events_dropped``)."""
POISON_FLUSH_MAX = 100
"""Quarantines a reaper pass stores at most (each is a read and an object upload), so a
flood of bad records delays the pass by a bounded amount; the rest wait for the next pass."""
POISON_LISTED_MAX = 100
"""Quarantined records listed by :meth:`Scheduler.stats` (all are counted)."""
ERRORS_TOLD_MAX = 10_000
"""Distinct per-job errors remembered so each is logged and published once, not every pass."""
STREAM_MSG_TOO_LARGE = 10054
"""JetStream's error code for "message size exceeds maximum allowed" (a stream's max_msg_size)."""


class RecordTooLarge(Exception):
    """A job record whose next write would exceed the broker's maximum message size."""

    def __init__(self, key: str, size_bytes: int, max_bytes: int) -> None:
        super().__init__(f"gf_jobs/{key}: the record's next write is {size_bytes} bytes, over the broker's maximum "
                         f"message size of {max_bytes} bytes ({RECORD_HEADER_BYTES} of them kept for headers)")
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes


@dataclass(slots=True)
class Poisoned:
    """A ``gf_jobs`` revision the coordinator quarantined: it leaves it alone (no reaping,
    unblocking, dispatching, holding) until the key gets a new revision."""

    key: str
    revision: int
    reason: str
    during: str
    """The pass that found it: ``view``, ``reap``, ``deps``, ``dispatch`` or ``hold``."""
    size_bytes: int
    at: float
    object: str | None = None
    """Where its bytes are kept in ``gf_artifacts`` (None until stored)."""
    reported: bool = False
    """Stored and its ``poisoned`` event published (or found stored already)."""


def poison_reason(exc: BaseException) -> str | None:
    """Why ``exc``, raised while deciding or writing one job record, is that record's own
    fault, so that trying it again would fail the same way every pass; None when it is not
    known to be (the broker refusing for now, a bug elsewhere): such a job is retried on
    the next pass and the error counted, never quarantined, since a full disk would
    otherwise quarantine every job that needed a write."""
    if isinstance(exc, RecordTooLarge):
        return str(exc)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return "the record's next write is larger than the broker's maximum message size"
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == STREAM_MSG_TOO_LARGE:
        return f"the record's next write is larger than gf_jobs' maximum message size ({exc.description})"
    if isinstance(exc, (msgspec.DecodeError, msgspec.EncodeError)):
        return f"not a valid job record ({type(exc).__name__}: {exc})"
    if isinstance(exc, IllegalTransition):
        return f"its stage does not allow the transition ({exc})"
    return None


def dispatch_order(queued: list, last_served: dict[str, int]) -> list:
    """The order in which queued jobs (``JobState``) are offered to the stations:
    :func:`decide.dispatch_order` (priority first; within a priority, products take turns,
    each in age order; the product served least recently first). Pure: the scheduler passes
    its own memory of who was served (``last_served``: product -> a sequence number of its
    last dispatch)."""
    return decide.dispatch_order(queued, last_served, lambda st: st.record)


class Scheduler:
    def __init__(self, broker: Broker, view: FleetView, settings: Settings, actor: str) -> None:
        self.broker = broker
        self.view = view
        self.settings = settings
        self.actor = actor
        self.published: dict[str, decide.Offered] = {}
        """job id -> this coordinator's latest offer of it (``at_s`` on the monotonic clock)."""
        self.held: dict[str, str] = {}
        self._policy_pools_said: set[str] | None = None
        """The pools last written to the ``policy-holds`` control key (None: not yet this run)."""
        self.index: dict[str, int] = {}
        """gf_queue keys this coordinator knows to exist -> the epoch written."""
        self.pools_ready = KnownPools(settings.pool_idle_gc_s / 2)
        """Pools this scheduler made sure exist, trusted for a while (the retention pass may
        delete an idle one: see KnownPools)."""
        self.clock_offset_s = 0.0
        self._seq = 0
        self.dispatch_errors = 0
        self.dispatch_repairs = 0
        self.publish_failing: set[str] = set()
        """Pools whose last publish failed (logged once until one succeeds again)."""
        """Streams and consumers this coordinator recreated (``repair_dispatch``)."""
        self.reap_rounds = 0
        self.forged_total = 0
        """Job-record revisions quarantined as forged holder writes (coordinator/signatures.py)."""
        self.sig_verified: dict[str, int] = {}
        """Job -> the revision whose holder signature was verified last (checked once)."""
        self.forged_seen: dict[tuple[str, int], str] = {}
        """(job, revision) -> why: forged holder writes seen since the last reaper pass."""
        """Completed reaper passes (tests await it to know a pass has happened)."""
        self.poison: dict[str, Poisoned] = {}
        """gf_jobs key -> its quarantined revision (see :class:`Poisoned`)."""
        self.poisoned_total = 0
        """Quarantines this coordinator made (a key quarantined at two revisions counts twice)."""
        self.job_errors: dict[str, int] = defaultdict(int)
        """Per pass (``reap``, ``deps``, ``hold``): jobs whose step failed while the pass went on."""
        self.events_failed = 0
        """Event publishes that failed (each is kept and published again, see EVENT_RETRY_MAX)."""
        self.events_dropped = 0
        """Failed events given up: the retry queue was full, or the broker refused one outright."""
        self._event_retry: deque[tuple[EventRecord, str | None]] = deque()
        self._errors_told: set[tuple] = set()
        self.last_served: dict[str, int] = {}
        """product -> the dispatch sequence number of its latest dispatched job (fair turns)."""
        self._served_seq = 0
        self.queue = QueueOrder()
        for jid in view.by_stage[Stage.QUEUED]:
            if jid in view.jobs:
                self.queue.on_job(None, view.jobs[jid])
        view.job_listeners.append(self.queue.on_job)
        view.job_listeners.append(signatures.observer(view, self.sig_verified, self.forged_seen))
        self._gap_seen: dict[str, tuple[int, str | None]] = {}
        """Pools nothing serves, fully held: (jobs that entered it, the reason) at that pass."""
        self.halt = HaltState()
        """The kill switch's state (kept current by :class:`~gigafactory.coordinator.halt.HaltWatch`):
        queued jobs it covers are held, not offered."""
        self.visited = 0
        """Queued jobs the latest dispatch pass looked at (offers, holds, jobs passed over)."""
        self.passes = 0
        self.passes_idle = 0
        """Dispatch passes that found nothing queued and no offer out, so planned nothing (no
        walk of the fleet's factories or leases)."""
        self.clock_reads = 0
        """Reads of the broker's clock (:meth:`sync_clock`): a reaper pass with no lease to
        judge needs none."""
        self.governor = Governor(broker, settings, actor, self._event)
        """The budget governor (issue 13): reads the signals and ledger, decides per kickoff."""

    # -- clock --------------------------------------------------------------------------------

    async def sync_clock(self) -> float:
        """Measure the broker's clock; returns broker now and remembers the offset."""
        t0 = time.time()
        self.clock_reads += 1
        now = await self.broker.broker_now()
        t1 = time.time()
        self.clock_offset_s = now - (t0 + t1) / 2
        return now

    def broker_now_estimate(self) -> float:
        return time.time() + self.clock_offset_s

    # -- deps ---------------------------------------------------------------------------------

    async def resolve_deps(self) -> None:
        """Unblock (or fail) every blocked job whose dependencies decided it. One job's error
        never stops the pass: see :meth:`_job_failed`."""
        now = time.time()
        blocked = list(self.view.by_stage[Stage.BLOCKED])
        # A dependency no longer in gf_jobs may have been archived (coordinator/retention.py).
        archived = await archived_stages(self.broker, {d for jid in blocked if jid in self.view.jobs
                                                  for d in self.view.jobs[jid].deps if d not in self.view.jobs})
        for jid in blocked:
            st = self.view.jobs.get(jid)
            if st is None or self.is_poisoned(st):
                continue
            try:
                stages = decide.dep_stages(st.record, self._live_stage, archived)
                w = decide.unblock(st.record, stages, now)
                if w is None:
                    continue
                await self._write(st.record, st.revision, w.out, **w.data)
            except TRANSIENT:
                raise  # the broker is not answering: every other write would wait out its timeout too
            except Exception as e:
                await self._job_failed("deps", st, e)

    def _live_stage(self, jid: str) -> Stage | None:
        """The stage of ``jid`` in the view (None: not in ``gf_jobs`` as far as it knows)."""
        st = self.view.jobs.get(jid)
        return st.stage if st is not None else None  # not st.record: a finished dependency's is packed

    async def _write(self, rec: JobRecord, revision: int, out: protocol.Outcome, **data) -> bool:
        """CAS ``out`` over ``revision``; False if the record changed meanwhile. Its event is
        published after the write; a failed publish is kept for the next pass (:meth:`_event`)."""
        try:
            await self.broker.jobs.update(rec.id, self._fits(rec.id, encode(out.record)), last=revision)
        except Conflict:
            return False
        await self._event(EventRecord(
            kind=str(out.event), at=out.record.updated_at, job=rec.id, stage_from=str(out.stage_from),
            stage_to=str(out.record.stage), epoch=out.record.epoch, actor=self.actor, reason=out.reason, data=data,
        ))
        return True

    def _fits(self, key: str, value: bytes) -> bytes:
        """``value``, if a write of it fits the broker's maximum message size; else raises
        :class:`RecordTooLarge` (before sending: the server would close the connection)."""
        max_bytes = self.broker.nc.max_payload
        if len(value) + RECORD_HEADER_BYTES > max_bytes:
            raise RecordTooLarge(key, len(value), max_bytes)
        return value

    # -- errors, events, quarantine ----------------------------------------------------------------

    def is_poisoned(self, st: JobState) -> bool:
        """Whether ``st``'s revision is quarantined (the coordinator leaves it alone)."""
        p = self.poison.get(st.key)  # st.key: a finished job's record is packed (decoded on each read)
        return p is not None and p.revision == st.revision

    async def _event(self, ev: EventRecord, msg_id: str | None = None) -> bool:
        """Publish ``ev``; a failure is counted and the event kept (up to EVENT_RETRY_MAX) for
        the next reaper pass, never raised: a failed publish must not stop a pass."""
        try:
            await self.broker.publish_event(ev, msg_id=msg_id)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.events_failed += 1
            if len(self._event_retry) >= EVENT_RETRY_MAX:
                self._event_retry.popleft()
                self.events_dropped += 1
            self._event_retry.append((ev, msg_id))
            log.log(logging.WARNING if len(self._event_retry) == 1 else logging.DEBUG,
                    "event %s of %s not published (%s: %s); kept for the next pass (%d waiting)",
                    ev.kind, ev.job or "the fleet", type(e).__name__, e, len(self._event_retry))
            return False

    async def _retry_events(self) -> None:
        """Publish the events kept by :meth:`_event`, oldest first; stop at the first the
        broker does not answer (the rest wait for the next pass). An event the broker refuses
        outright is dropped and counted: it would be refused every pass."""
        for _ in range(len(self._event_retry)):
            ev, msg_id = self._event_retry[0]
            try:
                await self.broker.publish_event(ev, msg_id=msg_id)
            except TRANSIENT:
                return
            except Exception as e:
                self.events_dropped += 1
                log.error("event %s of %s dropped: the broker refuses it (%s: %s)", ev.kind, ev.job, type(e).__name__, e)
            self._event_retry.popleft()

    async def _job_failed(self, during: str, st: JobState, exc: Exception) -> None:
        """One job's step failed in a pass; the pass goes on with the next job. A record that
        is itself the cause (:func:`poison_reason`) is quarantined; any other error is
        counted, logged and published once (``job_error``), and the job is tried again on
        the next pass (the pass's period bounds how often)."""
        self.job_errors[during] += 1
        rec = st.record
        reason = poison_reason(exc)
        if reason is not None:
            await self.quarantine(rec.id, st.revision, reason, during=during, size_bytes=st.size_bytes)
            return
        told = (rec.id, st.revision, during, type(exc).__name__)
        if told in self._errors_told:
            log.debug("%s of job %s failed again: %s: %s", during, rec.id, type(exc).__name__, exc)
            return
        if len(self._errors_told) >= ERRORS_TOLD_MAX:
            self._errors_told.clear()
        self._errors_told.add(told)
        log.warning("%s of job %s (revision %d) failed: %s: %s; the pass goes on, the job is tried again next pass",
                    during, rec.id, st.revision, type(exc).__name__, exc, exc_info=exc)
        await self._event(EventRecord(
            # No stage_from/stage_to: not a transition (the audit and its checker follow those).
            kind="job_error", at=time.time(), job=rec.id, epoch=rec.epoch, actor=self.actor,
            reason=f"{during} failed: {type(exc).__name__}: {exc}"[:1000] + "; tried again on the next pass",
            data={"during": during, "error": type(exc).__name__, "revision": st.revision},
        ))

    async def quarantine(self, key: str, revision: int, reason: str, *, during: str, size_bytes: int = 0) -> None:
        """Quarantine revision ``revision`` of ``gf_jobs/<key>``: from now on no pass touches
        it, its exact bytes are kept in ``gf_artifacts`` (``poison/gf_jobs/<key>/rev-<n>``)
        and a ``poisoned`` event says why. The record itself is left as it is (rewriting a
        record that cannot be read or written would lose what it holds); an operator fixes
        or deletes it, and its next revision is judged afresh."""
        p = self.poison.get(key)
        if p is not None and p.revision == revision:
            return
        p = self.poison[key] = Poisoned(key, revision, reason, during, size_bytes, time.time())
        self.poisoned_total += 1
        log.error("gf_jobs/%s revision %d quarantined (found by %s): %s", key, revision, during, reason)
        await self._report_poison(p)

    async def _report_poison(self, p: Poisoned) -> None:
        """Keep ``p``'s bytes and publish its event; if the broker fails, :meth:`flush`
        tries again on the next reaper pass (the record stays out of every pass meanwhile)."""
        try:
            e = await self.broker.jobs.get(p.key)
            if e is None or e.revision != p.revision:
                # Changed or deleted meanwhile: its new revision is judged afresh.
                if self.poison.get(p.key) is p:
                    del self.poison[p.key]
                return
            p.size_bytes = len(e.value)
            p.object, fresh = await self.broker.quarantine_record(names.JOBS_BUCKET, p.key, p.revision, e.value,
                                                             p.reason, found_by=self.actor)
        except asyncio.CancelledError:
            raise
        except Exception as ex:
            log.warning("poison record gf_jobs/%s revision %d not stored yet (%s: %s); next reaper pass tries again",
                        p.key, p.revision, type(ex).__name__, ex)
            return
        p.reported = True
        if fresh:  # stored by an earlier run or another coordinator: its event went out then
            await self._event(EventRecord(
                kind="poisoned", at=time.time(), job=p.key, actor=self.actor,
                reason=f"gf_jobs/{p.key} revision {p.revision} quarantined: {p.reason}; its bytes are kept "
                       f"as {p.object} in {names.ARTIFACTS_STORE}; fix or delete the record to release it",
                data={"bucket": names.JOBS_BUCKET, "revision": p.revision, "size_bytes": p.size_bytes,
                      "object": p.object, "during": p.during},
            ), msg_id=f"poisoned:{p.key}:{p.revision}")

    async def flush(self) -> None:
        """Quarantine what the view could not take in, store quarantines the broker refused
        before (at most POISON_FLUSH_MAX), forget those whose key changed since, and publish
        the events kept by :meth:`_event`. Runs at the start of every reaper pass."""
        budget = POISON_FLUSH_MAX
        for key, note in list(self.view.poison.items()):
            if budget <= 0:
                break
            p = self.poison.get(key)
            if p is None or p.revision != note.revision:
                budget -= 1
                await self.quarantine(key, note.revision, note.reason, during="view", size_bytes=note.size_bytes)
        for p in [p for p in self.poison.values() if not p.reported][:max(0, budget)]:
            await self._report_poison(p)
        for key, p in list(self.poison.items()):
            st, note = self.view.jobs.get(key), self.view.poison.get(key)
            current = st.revision if st is not None else (note.revision if note is not None else None)
            if current != p.revision and p.reported:
                del self.poison[key]  # fixed, replaced or deleted: the next revision is judged afresh
        await self._retry_events()

    def stats(self) -> dict:
        """The scheduler's counters, and the records it keeps quarantined (the API's ``stats``)."""
        return {
            "reap_rounds": self.reap_rounds, "dispatch_passes": self.passes,
            "dispatch_errors": self.dispatch_errors, "dispatch_repairs": self.dispatch_repairs,
            "job_errors": dict(self.job_errors), "events_failed": self.events_failed,
            "events_waiting": len(self._event_retry), "events_dropped": self.events_dropped,
            "poisoned_total": self.poisoned_total, "poisoned_now": len(self.poison),
            "poisoned": [
                {"job": p.key, "revision": p.revision, "reason": p.reason, "found_by": p.during,
                 "size_bytes": p.size_bytes, "object": p.object, "at": p.at, "stored": p.reported}
                for p in sorted(self.poison.values(), key=lambda p: p.at)[:POISON_LISTED_MAX]
            ],
        }

    # -- dispatch -----------------------------------------------------------------------------

    async def dispatch(self) -> int:
        """One dispatch pass: plan it (:func:`plan_dispatch.plan_dispatch`, pure) on a snapshot
        of the view and this scheduler's memory, then perform the plan: quarantine the records
        too large to claim, publish the offers and their events, write the holds. Returns how
        many jobs were published."""
        if not self.queue.states and not self.published:
            # Nothing queued and no offer out: the plan would be empty. An idle fleet's passes
            # (twice a second, and on every change) skip walking every factory and lease.
            self.visited = 0
            self.passes += 1
            self.passes_idle += 1
            await self._say_policy_holds()
            return 0
        broker_now = self.broker_now_estimate()
        mono = time.monotonic()
        if self.queue.states:
            await self.governor.refresh()  # read before a kickoff, not on an empty queue
        leased = []
        for jid in self.view.stage_ids(*LEASED):
            st = self.view.jobs.get(jid)
            if st and not self.is_poisoned(st):  # quarantined: its holder is gone or it never had one
                leased.append(st.record)
        plan = plan_dispatch.plan_dispatch(plan_dispatch.DispatchInput(
            queue=self.queue, live=self.view.live_factories(broker_now, self.settings.heartbeat_s), leased=leased,
            published=self.published, held=self.held, gap_seen=self._gap_seen, last_served=self.last_served,
            quarantined=self.is_poisoned, broker_now_s=broker_now, now_mono_s=mono,
            redispatch_s=self.settings.redispatch_s, halt=self.halt,
            max_record_bytes=self.broker.nc.max_payload - RECORD_HEADROOM_BYTES - RECORD_HEADER_BYTES,
            budget_hold=self.governor.decide))
        for jid in plan.forget:
            del self.published[jid]
        self._gap_seen.update(plan.gap_seen_set)
        for pool in plan.gap_seen_clear:
            self._gap_seen.pop(pool, None)
        self.visited = plan.visited
        self.passes += 1
        for st in plan.too_large:
            await self.quarantine(
                st.record.id, st.revision, during="dispatch", size_bytes=st.size_bytes,
                reason=f"the record is {st.size_bytes} bytes: a claim and its attempt history need up to "
                       f"{RECORD_HEADROOM_BYTES} more, and the broker takes at most {self.broker.nc.max_payload} "
                       f"bytes per message, so no factory could ever claim it")
        sent = await self._offer(plan.offers, plan.holds, broker_now, mono, plan.depth, plan.capacity,
                                 plan.serving)
        await self._say_policy_holds()
        return sent

    async def _say_policy_holds(self) -> None:
        """Write the pools with queued jobs held by policy (a halt of their product, their budget)
        to the ``policy-holds`` control key when the set changed: the factories serving one then
        classify their free stations ``policy-paused``, not ``no-work`` (issue 13). A failed
        write is tried again next pass."""
        if self.broker.control is None:
            return
        pools = {st.record.pool for jid, reason in self.held.items()
                 if reason.startswith(("budget:", "halted")) and (st := self.queue.states.get(jid)) is not None}
        if pools == self._policy_pools_said:
            return
        try:
            await self.broker.control.put(H.POLICY_HOLDS_KEY, H.encode_policy_holds(pools, time.time()))
        except Exception as e:
            log.info("policy holds not written (%s); trying again next pass", e)
            return
        self._policy_pools_said = pools

    async def _offer(self, offers: list, holds: list, broker_now: float, mono: float, depth: dict[str, int],
                     capacity: dict[str, int], serving: dict[str, list[FactoryState]]) -> int:
        """Publish a pass's offers, then its ``dispatched`` events, then its holds, each group
        concurrently: one broker round trip per group instead of one per job and message
        (the client writes the messages of a group together). Dispatch messages go out in
        the pass's order (the client sends them in the order they were started)."""
        for pool in {st.record.pool for st, _r, _p in offers} - self.pools_ready:
            rec = next(st.record for st, _r, _p in offers if st.record.pool == pool)
            try:
                if await ensure_pool(self.broker, pool, rec.requirements):
                    self.pools_ready.add(pool)
            except Exception as e:  # the publish below fails too and is handled there
                log.info("dispatch pool %s not ensured: %s", pool, e)
        results = await asyncio.gather(*(self._publish(st.record, st.revision) for st, _r, _p in offers))
        events = []
        for (st, redispatch, pos), ok in zip(offers, results):
            if not ok:
                continue
            rec = st.record
            self.published[rec.id] = decide.Offered(rec.epoch, mono)
            self._served_seq += 1
            self.last_served[rec.manifest.product] = self._served_seq
            self.held.pop(rec.id, None)
            ev = decide.dispatched_event(
                rec, at=time.time(), actor=self.actor, broker_now_s=broker_now, redispatch=redispatch,
                redispatch_s=self.settings.redispatch_s, position=pos, queued_in_pool=depth[rec.pool],
                pool_capacity=capacity[rec.pool], serving_factories=[f.record.id for f in serving[rec.pool]])
            ev.data.update(self.governor.trail(rec.id))  # the kickoff's budget decision and its trail
            if not redispatch:
                log.info("kickoff %s: %s", rec.id, enforcement_line(self.governor.enforcement))
            events.append(self._event(ev))
        sent = len(events)
        await asyncio.gather(*events)  # never raises: a failed event is kept for the next pass
        await _gather_raising([self._hold(st, reason) for st, reason in holds])
        return sent

    async def _publish(self, rec: JobRecord, revision: int | None = None) -> bool:
        self._seq += 1
        msg = dispatch_message(rec, revision, self.settings.dispatch_record_max_bytes)
        try:
            with tracing.span("dispatch", parent=rec.trace, kind="producer", job=rec.id, epoch=rec.epoch,
                              pool=rec.pool):
                await self.broker.js.publish(
                    names.dispatch_subject(rec.pool), encode(msg),
                    headers=tracing.inject({"Nats-Msg-Id": f"{rec.id}:{rec.epoch}:{self._seq}"}),
                    timeout=self.settings.request_timeout_s,
                )
            if rec.pool in self.publish_failing:
                self.publish_failing.discard(rec.pool)
                log.info("dispatch to pool %s publishes again", rec.pool)
            return True
        except Exception as e:  # the push path is down: repair it; jobs stay queued (poll fallback)
            self.dispatch_errors += 1
            self.pools_ready.discard(rec.pool)
            # Every pass tries every queued job again: say it once per outage, not per job and pass.
            first = rec.pool not in self.publish_failing
            self.publish_failing.add(rec.pool)
            log.log(logging.WARNING if first else logging.DEBUG, "dispatch of %s to pool %s failed: %s%s",
                    rec.id, rec.pool, type(e).__name__, f" {e}" if str(e) else "")
            return False

    async def _hold(self, st, reason: str) -> None:
        """Write ``reason`` into a job the pass does not offer, and say so in a ``held``
        event. One job's failure is that job's (:meth:`_job_failed`); only a broker that
        does not answer raises, after the other holds of the pass are done."""
        rec = st.record
        if self.held.get(rec.id) == reason:
            return
        self.held[rec.id] = reason
        if rec.reason != reason:
            # The backoff has elapsed (holds are decided after it): clear it, or this write's
            # new broker timestamp would start it again.
            new = msgspec.structs.replace(rec, reason=reason, backoff_s=0.0)
            try:
                await self.broker.jobs.update(rec.id, self._fits(rec.id, encode(new)), last=st.revision)
            except Conflict:
                # The view was behind the record: forget the hold, so the next pass (on the
                # record's change) decides again instead of believing it written.
                self.held.pop(rec.id, None)
                return
            except TRANSIENT:
                self.held.pop(rec.id, None)
                raise
            except Exception as e:
                self.held.pop(rec.id, None)
                await self._job_failed("hold", st, e)
                return
        await self._event(EventRecord(
            kind="held", at=time.time(), job=rec.id, stage_from="queued", stage_to="queued",
            epoch=rec.epoch, actor=self.actor, reason=reason,
            data=self.governor.trail(rec.id) if reason.startswith("budget:") else {},
        ))

    async def repair_dispatch(self) -> int:
        """Recreate the dispatch stream and pool consumers if something deleted them; returns
        how many it recreated. Each repair is published as a ``dispatch_repaired`` event.

        Only a definite "not found" counts as missing: a broker that does not answer raises
        (the loop logs it and tries again), so a slow broker is not mistaken for a deleted
        stream. Jobs published to a pool whose consumer was recreated are forgotten, so the
        next dispatch pass publishes them again at once, not after ``redispatch_s``."""
        repaired: list[str] = []
        try:
            await self.broker.js.stream_info(names.DISPATCH_STREAM)
        except nats.js.errors.NotFoundError:
            log.warning("dispatch stream %s missing; recreating it", names.DISPATCH_STREAM)
            await self.broker.ensure_dispatch_stream()
            self.pools_ready.clear()
            repaired.append(f"stream {names.DISPATCH_STREAM}")
        async for e in self.broker.pools.scan():
            try:
                pool = decode(e.value, PoolRecord)
            except msgspec.DecodeError:
                continue
            try:
                await self.broker.js.consumer_info(names.DISPATCH_STREAM, names.pool_consumer(pool.id))
                continue
            except nats.js.errors.NotFoundError:
                pass
            log.warning("consumer for pool %s missing; recreating it", pool.id)
            if not await ensure_pool(self.broker, pool.id, pool.requirements):
                continue  # the stream went again meanwhile: the next round recreates both
            repaired.append(f"consumer {names.pool_consumer(pool.id)}")
            # Everything published for that pool is gone with it: publish again.
            for jid in list(self.published):
                st = self.view.jobs.get(jid)
                if st and st.record.pool == pool.id:
                    del self.published[jid]
        if repaired:
            self.dispatch_repairs += len(repaired)
            await self.broker.publish_event(EventRecord(
                kind="dispatch_repaired", at=time.time(), actor=self.actor,
                reason="recreated " + ", ".join(repaired), data={"recreated": repaired},
            ))
        return len(repaired)

    # -- queue index (poll fallback) ------------------------------------------------------------

    async def load_index(self) -> None:
        self.index = {k: -1 for k in await self.broker.queue.keys()}

    async def sync_index(self) -> None:
        """Bring ``gf_queue`` in step with the queued jobs of the view: an entry for every job
        queued for at least :meth:`index_after_s`, none for any other.

        The index is only the polling fallback's pointer (the job record is the truth), so a
        job that push dispatches and a factory claims within that time never gets an entry:
        that spares the broker two writes per job (the put and its delete) on the normal
        path. Writes go out :data:`INDEX_IN_FLIGHT` at a time."""
        want: dict[str, JobRecord] = {}
        due = self.broker_now_estimate() - self.index_after_s
        for jid in self.view.by_stage[Stage.QUEUED]:
            st = self.view.jobs.get(jid)
            if st is None or self.is_poisoned(st):
                continue  # a quarantined job gets no index entry: polling factories would try it forever
            key = names.queue_key(st.record.pool, jid)
            if key in self.index or st.ts <= due:
                want[key] = st.record
        gone = [k for k in self.index if k not in want]
        stale = [(k, rec) for k, rec in want.items() if self.index.get(k) != rec.epoch]

        async def delete(key: str) -> None:
            try:
                await self.broker.queue.delete(key)
            except Conflict:
                pass
            self.index.pop(key, None)

        async def put(key: str, rec: JobRecord) -> None:
            await self.broker.queue.put(key, encode(QueueEntry(
                job=rec.id, priority_rank=rec.priority_rank, submitted_at=rec.submitted_at, epoch=rec.epoch,
            )))
            self.index[key] = rec.epoch

        writes = [(delete, (k,)) for k in gone] + [(put, (k, rec)) for k, rec in stale]
        for i in range(0, len(writes), INDEX_IN_FLIGHT):
            await _gather_raising([fn(*args) for fn, args in writes[i:i + INDEX_IN_FLIGHT]])

    @property
    def index_after_s(self) -> float:
        """How long a job is queued before it gets a ``gf_queue`` entry: a tenth of
        ``redispatch_s``, far below the time after which a factory judges push stalled
        and polls the index (two redispatch periods and a long poll)."""
        return self.settings.redispatch_s * INDEX_AFTER_REDISPATCH

    # -- reaper -------------------------------------------------------------------------------

    async def reap(self) -> int:
        """Requeue, fail or dead-letter every job whose lease expired (broker time). First
        :meth:`flush` (quarantines and kept events). One job's error never stops the pass:
        see :meth:`_job_failed`; only a broker that does not answer ends it early."""
        await self.flush()
        await signatures.quarantine_forged(self)  # signed holder writes: before anything acts on one
        n = 0
        leased = list(self.view.stage_ids(*LEASED))
        # Broker time is read only when there is a lease to judge by it: an idle fleet's reaper
        # sends no request a second (the clock loop keeps the offset for estimates).
        broker_now = await self.sync_clock() if leased else self.broker_now_estimate()
        for jid in leased:
            st = self.view.jobs.get(jid)
            if st is None or self.is_poisoned(st):
                continue
            try:
                # A revoked holder (`gigafactory creds revoke`) can no longer renew: its lease ends now.
                w = decide.reap(st.record, signatures.lease_stamp(self.view, st), broker_now, self.settings.lease_ttl_s)
                if w is None:
                    continue
                with tracing.span("reclaim", parent=st.record.trace, job=jid, epoch=w.out.record.epoch,
                                  factory=st.record.lease.factory if st.record.lease else None,
                                  stage_to=str(w.out.record.stage)):
                    if await self._write(st.record, st.revision, w.out, **w.data):
                        n += 1
            except TRANSIENT:
                raise  # the broker is not answering: every other write would wait out its timeout too
            except Exception as e:
                await self._job_failed("reap", st, e)
        self.reap_rounds += 1
        return n

    async def release_stale_locks(self) -> int:
        """Delete lock entries whose holder is known stopped (:func:`protocol.lock_verdict`):
        it reported its attempt, or its entry (rewritten on each of its lease renewals) is
        older than ``lease_ttl_s + fence_margin_s`` by broker time. Never because the holder's
        record moved to another epoch: its engine may still run. The delete is a
        compare-and-set on the revision read, so a holder's rewrite in between keeps it."""
        n = 0
        broker_now = None
        limit_s = self.settings.lease_ttl_s + self.settings.fence_margin_effective_s
        async for e in self.broker.locks.scan():
            if broker_now is None:  # read once there is an entry to judge: an idle fleet has none
                broker_now = await self.sync_clock()
            try:
                lock = decode(e.value, LockRecord)
            except msgspec.DecodeError:
                # Not a lock entry: no holder can be asked. A live holder rewrites its entry on
                # every renewal, so one that aged past the limit has none: without this it
                # would keep its lock from every job for good.
                if broker_now - e.ts > limit_s:
                    try:
                        await self.broker.locks.delete(e.key, last=e.revision)
                        n += 1
                        log.warning("lock entry %s is not a lock record and is %.0fs old: deleted", e.key,
                                    broker_now - e.ts)
                    except Conflict:
                        pass
                continue
            st = self.view.jobs.get(lock.job)
            rec = st.record if st else None
            verdict = protocol.lock_verdict(lock, rec, broker_now - e.ts, lease_ttl_s=self.settings.lease_ttl_s,
                                            fence_margin_s=self.settings.fence_margin_effective_s)
            if not verdict.free and st is None:
                # Not in the view (yet): the record itself may already show the report.
                fresh = await self.broker.jobs.get(lock.job)
                try:
                    fresh_rec = decode(fresh.value, JobRecord) if fresh is not None else None
                except msgspec.DecodeError:
                    fresh_rec = None  # a poisoned record tells nothing: only the entry's age can
                if fresh_rec is not None:
                    verdict = protocol.lock_verdict(lock, fresh_rec, broker_now - e.ts,
                                                    lease_ttl_s=self.settings.lease_ttl_s,
                                                    fence_margin_s=self.settings.fence_margin_effective_s)
            if not verdict.free:
                continue
            try:
                await self.broker.locks.delete(e.key, last=e.revision)
                n += 1
                log.info("stale lock %s released: %s", lock.lock, verdict.reason)
            except Conflict:
                pass
        return n


async def _gather_raising(coros: list) -> None:
    """Await every coroutine concurrently; when any failed, raise the first failure only after
    all have finished (a failed event publish must not leave the others unawaited)."""
    if not coros:
        return
    for r in await asyncio.gather(*coros, return_exceptions=True):
        if isinstance(r, BaseException):
            raise r


async def loop(name: str, interval_s: float, body, stop: asyncio.Event, wake: asyncio.Event | None = None) -> None:
    """Run ``body`` every ``interval_s`` (or sooner when ``wake`` is set) until ``stop`` is set
    or the task is cancelled; broker trouble is logged and retried on the next round, never fatal.

    The wait between rounds makes no task: a plain sleep, or a timer that sets ``wake``. The
    coordinator runs ten of these loops, several of them twice a second, forever: two tasks
    made and cancelled per round (a wait on ``stop`` and one on ``wake``) were most of an idle
    coordinator's fixed cost. A ``stop`` set during the wait is seen when it ends; the
    coordinator cancels its loops when it stops, so none waits out its period."""
    timers = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except TRANSIENT as e:
            log.info("%s: broker not answering (%s); next round", name, e)
        except Exception:
            log.exception("%s failed; next round", name)
        if stop.is_set():
            return
        if wake is None:
            await asyncio.sleep(interval_s)
            continue
        timer = timers.call_later(interval_s, wake.set)
        try:
            await wake.wait()
        finally:
            timer.cancel()
        wake.clear()
