"""The coordinator's per-job decisions, sans-I/O: reap, unblock, dispatch order, offer or hold.

Plain values in, plain values out: no broker, no clock, no asyncio. The scheduler
(``coordinator/scheduler.py``) reads the records from its view, calls these, and writes what
they decide with a compare-and-set; the deterministic simulation (``chaos/sim.py``) calls the
same functions on its simulated store, the way both drive the holder's ``factory/lease.py``.
So what the simulation checks is the coordinator's own logic, not a copy of it.

A dispatch pass over many pools (free stations per pool, the lazy merge of the pools'
queues, when to leave a pool) is planned by :mod:`.plan_dispatch` on these decisions, and
intake's decisions by :mod:`.plan_submit`. What stays in the scheduler because it is I/O or
bookkeeping of I/O: the view (which feeds the incremental
:class:`~gigafactory.coordinator.plan_dispatch.QueueOrder`, ordered by :func:`order_key`, so
it gives exactly :func:`dispatch_order`), per-job error handling and the quarantine of poison
records, publishing, events.

Each function names its clock: ``broker_now_s`` and ``stored_at_s`` are broker time (a
revision's server timestamp); ``now_s`` of :func:`offer_turn` is whatever clock the caller
stamped its offers with (the scheduler's monotonic clock).
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import EventRecord, JobRecord

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Write:
    """A decision to change a record: ``out`` is compare-and-set over the revision the
    decision was made on (a conflict means the record moved: decide again on the next
    pass, never re-apply this one), and its event carries ``data``."""

    out: protocol.Outcome
    data: dict[str, Any] = field(default_factory=dict)


# -- reaper ---------------------------------------------------------------------------------------


def reap(rec: JobRecord, stored_at_s: float, broker_now_s: float, lease_ttl_s: float) -> Write | None:
    """The reaper's decision for one record: requeue, fail or dead-letter it (by its retry
    policy, :func:`protocol.expire`) when it is leased and its revision was stored more than
    ``lease_ttl_s`` ago by broker time; None otherwise (not leased, or the lease is live).

    ``stored_at_s``: the broker's timestamp of the revision read (the holder's last write).
    ``broker_now_s``: broker time now. The event data names the ``holder`` (factory, or None)
    and the ``old_epoch`` whose lease ended."""
    out = protocol.expire(rec, stored_at_s, broker_now_s, lease_ttl_s)
    if out is None:
        return None
    return Write(out, {"holder": rec.lease.factory if rec.lease else None, "old_epoch": rec.epoch})


# -- dependencies ---------------------------------------------------------------------------------


def dep_stages(rec: JobRecord, live_stage: Callable[[str], Stage | None],
               archived: Mapping[str, Stage]) -> dict[str, Stage | None]:
    """Each dependency of ``rec`` -> its stage: from ``live_stage(dep)`` (the record in
    ``gf_jobs``, None if absent), else from ``archived`` (records the retention pass moved
    out of ``gf_jobs``), else None (not known yet: still waiting)."""
    stages: dict[str, Stage | None] = {}
    for d in rec.deps:
        stage = live_stage(d)
        stages[d] = stage if stage is not None else archived.get(d)
    return stages


def unblock(rec: JobRecord, stages: Mapping[str, Stage | None], now_s: float) -> Write | None:
    """The decision for a ``blocked`` record given its dependencies' ``stages`` (see
    :func:`dep_stages`): unblock it, fail it (a dependency ended without shipping), or None
    (still waiting, or the record is not blocked). ``now_s`` stamps ``updated_at``."""
    if rec.stage is not Stage.BLOCKED:
        return None
    out = protocol.resolve_blocked(rec, dict(stages), now_s)
    return None if out is None else Write(out)


# -- dispatch: order ------------------------------------------------------------------------------


def order_key(rank: int, turn: int, product_served: int, submitted_at: float, job_id: str) -> tuple:
    """The sort key of a queued job in dispatch order: priority ``rank`` first, then its
    product's ``turn`` (the job's index among its product's queued jobs of that priority, in
    age order), then ``product_served`` (the sequence number of the product's latest
    dispatch, -1 if never: least recently served first), then age, then id."""
    return (rank, turn, product_served, submitted_at, job_id)


def age_key(rec: JobRecord) -> tuple[float, str]:
    """A job's age order within its priority and product."""
    return (rec.submitted_at, rec.id)


def dispatch_order(queued: Iterable[T], last_served: Mapping[str, int],
                   record_of: Callable[[T], JobRecord]) -> list[T]:
    """``queued`` (anything ``record_of`` maps to its :class:`JobRecord`) in dispatch order.

    Priority dominates: every critical job comes before any high one, and so on. Within a
    priority, products take turns, so a product that submitted a thousand jobs does not make
    another's few wait behind all of them: turn 0 (the oldest job) of every product comes
    before turn 1 of any. At the same turn, the product served least recently goes first
    (``last_served``: product -> sequence number of its latest dispatch), then the older job."""
    by_age = sorted(queued, key=lambda x: (record_of(x).priority_rank, *age_key(record_of(x))))
    turn: dict[tuple[int, str], int] = defaultdict(int)
    keyed = []
    for x in by_age:
        rec = record_of(x)
        k = (rec.priority_rank, rec.manifest.product)
        keyed.append((order_key(rec.priority_rank, turn[k], last_served.get(rec.manifest.product, -1),
                                rec.submitted_at, rec.id), x))
        turn[k] += 1
    keyed.sort(key=lambda kx: kx[0])
    return [x for _, x in keyed]


# -- dispatch: offer, redispatch, hold --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offered:
    """A dispatch message a coordinator published for a job: at ``epoch``, at ``at_s`` (on
    the clock the caller passes to :func:`offer_turn` as ``now_s``)."""

    epoch: int
    at_s: float


class Turn(enum.Enum):
    """Whether a queued job is up for an offer, given the coordinator's previous one."""

    NEW = "new"
    """Never offered at its current epoch: a first offer (``redispatch: false``)."""
    DUE = "due"
    """Offered at this epoch ``redispatch_s`` ago or more and still queued: offer it again
    (``redispatch: true``), whatever the pool's capacity (that offer is one already counted)."""
    PENDING = "pending"
    """Offered at this epoch less than ``redispatch_s`` ago: not repeated."""


def offer_turn(previous: Offered | None, epoch: int, now_s: float, redispatch_s: float) -> Turn:
    """Whether the job at ``epoch`` is up for an offer now (``now_s``, on the clock of
    ``previous.at_s``), given ``previous``, the coordinator's last offer of it (None: none)."""
    if previous is None or previous.epoch != epoch:
        return Turn.NEW
    if now_s - previous.at_s >= redispatch_s:
        return Turn.DUE
    return Turn.PENDING


def locks_taken(leased: Iterable[tuple[str, str | None]], offered: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """Lock -> the job a dispatch pass treats as holding it, from ``(job, lock or None)``
    pairs: a ``leased`` job first (its holder may be running under the lock), else a job with
    an offer of its current epoch out (``offered``: it may be claimed any moment). The pass
    adds each offer it makes. The factory's lock write stays the authority
    (:func:`protocol.lock_verdict`): this only spares offers that would be handed back."""
    taken: dict[str, str] = {}
    for jid, lock in leased:
        if lock:
            taken[lock] = jid
    for jid, lock in offered:
        if lock:
            taken.setdefault(lock, jid)
    return taken


def hold_reason(rec: JobRecord, stored_at_s: float, broker_now_s: float, *, redispatch: bool,
                lock_holder: str | None, gap: str | None, inflight: int, capacity: int | None) -> str | None:
    """Why a queued job up for an offer (:func:`offer_turn`) is not offered now; None: offer it.
    An empty string holds it silently (the record already says why, or the wait is short).

    - ``stored_at_s + rec.backoff_s > broker_now_s``: its retry back-off, started by the
      broker's timestamp of the revision that set it, has not elapsed (broker time).
    - ``lock_holder``: the job that holds or was offered the job's ``lock`` (None: free).
    - ``gap``: why no live factory serves its pool (None: one does).
    - a first offer (not ``redispatch``) waits while ``inflight`` offers of its pool are out
      for its ``capacity`` free stations (None: no limit)."""
    if stored_at_s + rec.backoff_s > broker_now_s:
        return ""  # retry backoff: the record's reason already says when
    lock = rec.manifest.lock
    if lock and lock_holder is not None and lock_holder != rec.id:
        return f"waiting for lock {lock!r} held by job {lock_holder}"
    if gap is not None:
        return gap
    if not redispatch and capacity is not None and inflight >= capacity:
        return ""  # every station of the pool has an offer outstanding
    return None


def dispatched_event(rec: JobRecord, *, at: float, actor: str, broker_now_s: float, redispatch: bool,
                     redispatch_s: float, position: int, queued_in_pool: int, pool_capacity: int | None,
                     serving_factories: list[str]) -> EventRecord:
    """The ``dispatched`` event of an offer of ``rec``: why now (waited since submission by
    broker time; a redispatch, or its ``position`` of ``queued_in_pool`` in its pool), and
    the pool's capacity and serving factories as the pass saw them."""
    return EventRecord(
        kind="dispatched", at=at, job=rec.id, stage_from="queued", stage_to="queued",
        epoch=rec.epoch, actor=actor,
        reason=f"priority {rec.manifest.priority}, waited {max(0.0, broker_now_s - rec.submitted_at):.1f}s; "
               + (f"offered again: not taken within {redispatch_s:g}s" if redispatch else
                  f"#{position} of {queued_in_pool} queued in pool {rec.pool}"),
        data={"pool": rec.pool, "priority": str(rec.manifest.priority), "position": position,
              "queued_in_pool": queued_in_pool, "pool_capacity": pool_capacity,
              "serving_factories": serving_factories, "redispatch": redispatch},
    )
