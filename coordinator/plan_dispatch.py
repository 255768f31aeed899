"""The dispatch pass's planner, sans-I/O: which queued jobs to offer, which to hold and why.

Plain values in, a :class:`DispatchPlan` out: no broker, no clock, no asyncio. The scheduler
(``Scheduler.dispatch`` in ``coordinator/scheduler.py``) takes a :class:`DispatchInput`
snapshot of its view and its own memory (offers out, holds written, pools found unserved),
calls :func:`plan_dispatch`, and performs the plan: quarantines the records too large to
claim, publishes the offers and their ``dispatched`` events, writes the holds, and applies
the memory updates the plan names. The per-job decisions are :mod:`.decide`'s (the
simulation, ``chaos/sim.py``, calls those too); this module adds what one pass over many
pools decides: free stations per pool, the lazy merge of the pools' queues in
:func:`decide.dispatch_order`, and when to leave a pool.

:class:`QueueOrder` (the queued jobs kept sorted as the view changes) lives here because the
planner reads it; the scheduler owns one and feeds it from the view's job listener.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gigafactory.schemas.halt import HaltState
from gigafactory.schemas.halt import hold_reason as halt_hold_reason
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import JobRecord

from . import decide

if TYPE_CHECKING:  # types only: this module reads the view's values, never the view
    from .view import FactoryState, JobState


def capability_gap(reqs: list[str], live: list[FactoryState]) -> str:
    """Why no live factory serves ``reqs``, in words an operator can act on."""
    if not live:
        return "no live factory is connected"
    best = min(live, key=lambda f: (len(f.offers.missing(reqs)), f.record.id))
    missing_anywhere = [r for r in reqs if all(f.offers.missing([r]) for f in live)]
    if missing_anywhere:
        return "no live factory offers " + ", ".join(missing_anywhere)
    return f"no single live factory offers all of {', '.join(reqs)} (closest: {best.record.id}, missing {', '.join(best.offers.missing(reqs))})"


class QueueOrder:
    """The queued jobs, kept sorted as the view changes, so a dispatch pass reads them in
    :func:`decide.dispatch_order` lazily, one pool at a time, and stops where the pool's free
    stations do: its cost follows the offers it makes, not the backlog.

    Per (priority rank, product), every queued job in age order (a job's fair turn is its
    index there), and per pool the same lists restricted to the pool. A pool's next job is
    the smallest head of its lists by the ``dispatch_order`` key; the pools merged by the
    same key (:func:`decide.order_key`) give exactly ``dispatch_order`` of all queued jobs."""

    def __init__(self) -> None:
        self.by_turn: dict[tuple[int, str], list[tuple[float, str]]] = defaultdict(list)
        self.by_pool: dict[str, dict[tuple[int, str], list[tuple[float, str]]]] = defaultdict(lambda: defaultdict(list))
        self.where: dict[str, tuple[int, str, str, tuple[float, str]]] = {}
        """job id -> (rank, product, pool, age key) as inserted (a record can change)."""
        self.states: dict[str, JobState] = {}
        self.requirements: dict[str, list[str]] = {}
        """pool -> its requirements (from the jobs that entered it)."""
        self.added: dict[str, int] = defaultdict(int)
        """pool -> how many jobs ever entered it (tells a pass whether a pool has new jobs)."""

    def __len__(self) -> int:
        return len(self.where)

    def depth(self, pool: str) -> int:
        return sum(len(v) for v in self.by_pool.get(pool, {}).values())

    def on_job(self, old: JobState | None, new: JobState | None) -> None:
        if old is not None:
            self._remove(old.key)  # not old.record: a finished job's is packed (decoded on each read)
        if new is not None and new.stage == Stage.QUEUED:
            rec = new.record
            rank, product, age = rec.priority_rank, rec.manifest.product, decide.age_key(rec)
            bisect.insort(self.by_turn[(rank, product)], age)
            bisect.insort(self.by_pool[rec.pool][(rank, product)], age)
            self.where[rec.id] = (rank, product, rec.pool, age)
            self.states[rec.id] = new
            self.requirements.setdefault(rec.pool, rec.requirements)
            self.added[rec.pool] += 1

    def _remove(self, jid: str) -> None:
        got = self.where.pop(jid, None)
        if got is None:
            return
        self.states.pop(jid, None)
        rank, product, pool, age = got
        for lists, k in ((self.by_turn, (rank, product)), (self.by_pool[pool], (rank, product))):
            lst = lists[k]
            i = bisect.bisect_left(lst, age)
            if i < len(lst) and lst[i] == age:
                del lst[i]
            if not lst:
                del lists[k]
        if not self.by_pool[pool]:
            del self.by_pool[pool]

    def key_of(self, jid: str, last_served: Mapping[str, int]) -> tuple:
        """The dispatch-order key of queued job ``jid`` (see :func:`decide.order_key`)."""
        rank, product, _pool, age = self.where[jid]
        return self._key(rank, product, age, last_served)

    def _key(self, rank: int, product: str, age: tuple[float, str], last_served: Mapping[str, int]) -> tuple:
        turn = bisect.bisect_left(self.by_turn[(rank, product)], age)
        return decide.order_key(rank, turn, last_served.get(product, -1), age[0], age[1])

    def pool_order(self, pool: str, last_served: Mapping[str, int]) -> Iterator[tuple[tuple, JobState]]:
        """A pool's queued jobs in dispatch order, with their keys, lazily."""
        lists = self.by_pool.get(pool)
        if not lists:
            return
        heap = []
        for (rank, product), lst in lists.items():
            heap.append((self._key(rank, product, lst[0], last_served), rank, product, 0))
        heapq.heapify(heap)
        # Read synchronously by a pass (no await in between), so the lists do not change under it.
        while heap:
            key, rank, product, i = heapq.heappop(heap)
            lst = lists[(rank, product)]
            st = self.states.get(lst[i][1])
            if i + 1 < len(lst):
                heapq.heappush(heap, (self._key(rank, product, lst[i + 1], last_served), rank, product, i + 1))
            if st is not None:
                yield key, st


@dataclass(frozen=True)
class DispatchInput:
    """What one dispatch pass decides on: a snapshot of the view and the scheduler's memory.
    The planner reads these and changes none of them."""

    queue: QueueOrder
    """The queued jobs (the scheduler's :class:`QueueOrder`)."""
    live: list[FactoryState]
    """Factories up and heartbeated recently (``FleetView.live_factories``)."""
    leased: list[JobRecord]
    """Records of the jobs ``assigned`` or ``building``, quarantined ones left out."""
    published: Mapping[str, decide.Offered]
    """job id -> the scheduler's latest offer of it (``at_s`` on ``now_mono_s``'s clock)."""
    held: Mapping[str, str]
    """job id -> the hold reason the scheduler last wrote into it."""
    gap_seen: Mapping[str, tuple[int, str | None]]
    """Pools nothing serves whose every job was held already: (jobs that had entered it, reason)."""
    last_served: Mapping[str, int]
    """product -> the sequence number of its latest dispatch (fair turns)."""
    quarantined: Callable[[JobState], bool]
    """Whether a job's revision is quarantined (the pass leaves it alone)."""
    broker_now_s: float
    """Broker time (judges retry back-offs)."""
    now_mono_s: float
    """The scheduler's monotonic clock (judges offers out for ``redispatch_s``)."""
    redispatch_s: float
    max_record_bytes: int
    """A queued record larger than this cannot be carried through a claim: quarantine it."""
    budget_hold: Callable[[JobRecord], str | None] | None = None
    """The budget governor's decision for a job that would be offered (``economics.governor``):
    a ``budget: ...`` hold reason, or None to offer it. None: no budget check."""
    halt: HaltState | None = None
    """The kill switch (:mod:`~gigafactory.schemas.halt`): the jobs it covers are held ``halted``."""


@dataclass
class DispatchPlan:
    """What a dispatch pass does, in this order: quarantine ``too_large``, publish ``offers``
    (in order) with their ``dispatched`` events, write ``holds``; and the scheduler's memory
    updates: forget the offers of ``forget``, set ``gap_seen_set``, drop ``gap_seen_clear``."""

    offers: list[tuple[JobState, bool, int]] = field(default_factory=list)
    """(job, redispatch, position in its pool), in publish order."""
    holds: list[tuple[JobState, str]] = field(default_factory=list)
    """Jobs not offered whose record should say why (the reason differs from the last written)."""
    too_large: list[JobState] = field(default_factory=list)
    forget: list[str] = field(default_factory=list)
    """Jobs with an offer remembered that are no longer queued."""
    gap_seen_set: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    gap_seen_clear: list[str] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)
    """pool -> queued jobs in it (for the events)."""
    capacity: dict[str, int] = field(default_factory=dict)
    """pool -> its free stations now."""
    serving: dict[str, list[FactoryState]] = field(default_factory=dict)
    """pool -> the live factories that serve it."""
    visited: int = 0
    """Queued jobs the pass looked at (offers, holds, jobs passed over)."""


def gap_reason(queue: QueueOrder, pool: str, live: list[FactoryState]) -> str | None:
    """The capability-gap reason of ``pool`` now (None if a live factory serves it, or its
    requirements are not known)."""
    reqs = queue.requirements.get(pool)
    if reqs is None:
        return None
    if any(not f.offers.missing(reqs) for f in live):
        return None
    return capability_gap(reqs, live)


class _Pass:
    """One pass's working state: the free stations and offers of each pool it has touched."""

    def __init__(self, inp: DispatchInput) -> None:
        self.inp = inp
        self.plan = DispatchPlan()
        self.busy: dict[str, int] = defaultdict(int)
        for rec in inp.leased:
            if rec.lease:
                self.busy[rec.lease.factory] += 1
        self.inflight: dict[str, int] = defaultdict(int)
        self.gaps: dict[str, str] = {}
        self.partial: set[str] = set()
        """Pools nothing serves where some job was not held with the pool's reason this pass."""
        self.locks: dict[str, str] = {}

    def pool_of(self, st: JobState) -> str:
        """The job's pool, its serving factories and free stations computed on first sight."""
        rec, plan, inp = st.record, self.plan, self.inp
        if rec.pool not in plan.serving:
            plan.serving[rec.pool] = [f for f in inp.live if not f.offers.missing(rec.requirements)]
            # Free stations now, from the jobs watch (live), not from heartbeats (seconds old).
            plan.capacity[rec.pool] = sum(
                max(0, len(f.record.stations) - self.busy[f.record.id]) for f in plan.serving[rec.pool])
            plan.depth[rec.pool] = inp.queue.depth(rec.pool)
            if not plan.serving[rec.pool]:
                self.gaps[rec.pool] = capability_gap(rec.requirements, inp.live)
        return rec.pool

    def open(self, pool: str) -> bool:
        """Whether the pass still has something to do in ``pool``."""
        if not self.plan.serving[pool]:
            return True  # every job gets its capability-gap hold (once: see gap_seen)
        return self.inflight[pool] < self.plan.capacity[pool]

    def decide_one(self, st: JobState, redispatch: bool, pos: int) -> None:
        """Offer ``st`` or hold it (with a reason, or silently)."""
        rec, plan, inp = st.record, self.plan, self.inp
        if inp.quarantined(st):
            return
        if st.size_bytes > inp.max_record_bytes:
            plan.too_large.append(st)
            return
        pool = self.pool_of(st)
        hold = halt_hold_reason(inp.halt, rec.manifest.product) if inp.halt is not None else None
        hold = hold or decide.hold_reason(
            rec, st.ts, inp.broker_now_s, redispatch=redispatch,
            lock_holder=self.locks.get(rec.manifest.lock) if rec.manifest.lock else None,
            gap=self.gaps.get(pool), inflight=self.inflight[pool], capacity=plan.capacity[pool])
        if hold is None and inp.budget_hold is not None:
            hold = inp.budget_hold(rec)  # last: a job another reason holds is not charged a decision
        if hold is not None:
            if hold and inp.held.get(rec.id) != hold:
                plan.holds.append((st, hold))
            if pool in self.gaps and hold != self.gaps[pool]:
                self.partial.add(pool)  # held for another reason (a backoff): look again next pass
            return
        if not redispatch:
            self.inflight[pool] += 1
        if rec.manifest.lock:
            self.locks[rec.manifest.lock] = rec.id
        plan.offers.append((st, redispatch, pos))

    def offers_out(self) -> list[JobState]:
        """Count the offers out per pool and take their locks; the ones due again, in
        dispatch order. Offers of jobs no longer queued are to be forgotten."""
        inp, q = self.inp, self.inp.queue
        offered_locks: list[tuple[str, str | None]] = []
        due: list[tuple[tuple, JobState]] = []
        for jid, p in inp.published.items():
            st = q.states.get(jid)
            if st is None:
                self.plan.forget.append(jid)
                continue
            turn = decide.offer_turn(p, st.record.epoch, inp.now_mono_s, inp.redispatch_s)
            if turn is decide.Turn.NEW:
                continue  # an offer of an earlier epoch: the job is offered afresh below
            self.inflight[st.record.pool] += 1
            offered_locks.append((jid, st.record.manifest.lock))
            if turn is decide.Turn.DUE:
                due.append((q.key_of(jid, inp.last_served), st))
        due.sort(key=lambda x: x[0])
        self.locks = decide.locks_taken([(r.id, r.manifest.lock) for r in inp.leased], offered_locks)
        return [st for _key, st in due]

    def first_offers(self) -> None:
        """Merge the pools' queues in dispatch order and offer each job up for a first offer,
        leaving a pool once its free stations all have one."""
        inp, q, plan = self.inp, self.inp.queue, self.plan
        heap: list = []
        iters: dict[str, Iterator] = {}
        position: dict[str, int] = defaultdict(int)
        for pool in list(q.by_pool):
            seen = inp.gap_seen.get(pool)
            if seen is not None and seen == (q.added[pool], gap_reason(q, pool, inp.live)):
                continue  # nothing serves it, and every job in it was held with that reason already
            it = q.pool_order(pool, inp.last_served)
            first = next(it, None)
            if first is not None:
                iters[pool] = it
                heap.append((first[0], pool, first[1]))
        heapq.heapify(heap)
        while heap:
            _k, pool, st = heapq.heappop(heap)
            self.pool_of(st)
            if not self.open(pool):
                continue
            plan.visited += 1
            position[pool] += 1
            if decide.offer_turn(inp.published.get(st.record.id), st.record.epoch, inp.now_mono_s,
                                 inp.redispatch_s) is decide.Turn.NEW:
                self.decide_one(st, False, position[pool])
            nxt = next(iters[pool], None)
            if nxt is not None:
                heapq.heappush(heap, (nxt[0], pool, nxt[1]))
            elif not plan.serving.get(pool, True) and pool not in self.partial:
                plan.gap_seen_set[pool] = (q.added[pool], self.gaps[pool])


def plan_dispatch(inp: DispatchInput) -> DispatchPlan:
    """One dispatch pass's decisions over ``inp``.

    The offers out for ``redispatch_s`` go again first (whatever the capacity: each is an
    offer already counted), in dispatch order; then the pools' queues are read merged in
    :func:`decide.dispatch_order` (from :class:`QueueOrder`, no sort), and a pool is left as
    soon as every one of its free stations has an offer. The pass visits the offers it makes,
    the jobs it passes over (held by a lock or a backoff, or offered already) and, for a pool
    nothing serves, each new job once to hold it with the reason (``visited`` counts them);
    a pool all of whose jobs got that hold is remembered (``gap_seen_set``) and skipped until
    a job enters it or the reason changes."""
    p = _Pass(inp)
    for st in p.offers_out():
        p.plan.visited += 1
        p.decide_one(st, True, 0)
    p.first_offers()
    p.plan.gap_seen_clear = [pool for pool, fs in p.plan.serving.items() if fs]
    return p.plan
