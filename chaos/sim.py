"""Deterministic simulation of the claim protocol, after TigerBeetle's VOPR.

One seed is one complete, reproducible schedule: jobs are submitted, two coordinators dispatch,
unblock and reap, N factories with S stations claim, start, renew, run, report, retry, hand back
on drain, flush their outbox after a partition; an operator ships, cancels and requeues; and
seeded faults hit all of it. Afterwards :func:`gigafactory.chaos.invariants.check` judges the
final records and the audit trail, exactly as it judges a real broker.

What is real and what is modelled
---------------------------------
- Every decision goes through the pure functions of ``schemas/protocol.py`` that production
  uses (claim, check_fence, renew, start, hand_back, finish, expire, cancel, fail,
  operator_requeue, ship, unblock); nothing here re-implements the protocol. A holder's fenced
  write is production's own state machine, :class:`gigafactory.factory.lease.FencedWrite`
  (retry on conflict, learn an unanswered write by reading, back off, fenced, give up), driven
  here with simulated requests as ``Factory._write`` drives it with real ones. The control flow
  around them mirrors ``factory/agent.py`` (``_claim_and_run``, ``_execute``, ``_report``,
  ``_flush_item``, drain), and writes the same :class:`EventRecord` kinds with the same fields.
- The coordinators decide with production's own per-job decisions,
  ``coordinator/decide.py``, which ``Scheduler.resolve_deps``, ``reap`` and ``dispatch`` call
  too: ``decide.unblock`` (on ``decide.dep_stages``), ``decide.reap`` (outcome and event data),
  ``decide.dispatch_order`` (production's ordering key), ``decide.offer_turn`` (first offer,
  redispatch after ``redispatch_s``, or not yet), ``decide.locks_taken`` and
  ``decide.hold_reason`` (retry back-off by the store's clock, a lock a leased or offered job
  has), ``decide.dispatched_event``; and a dispatch pass is production's planner,
  ``coordinator/plan_dispatch.py`` (redispatches first, then first offers up to the live
  factories' free stations, in dispatch order), as ``Scheduler.dispatch`` runs it. What the
  simulation keeps of its own is the I/O around them, simplified: one pool that every factory
  serves, a hold is counted (``stats['dispatch_lock_holds']``), not written into the record with a ``held``
  event, no retention (a dependency is never archived), no quarantine (no record here is
  unreadable or too large), offers stamped with sim time (production: its monotonic clock), and
  coordinators that neither crash nor lose a reply.
- ``gf_jobs`` is a :class:`SimStore`: compare-and-set on the revision, every revision stamped with
  the store's clock (sim time) like JetStream's server timestamps. Lease expiry is judged with
  these stamps only; factory clocks (which jump) only stamp ``updated_at`` and events' ``at``.
- A factory's request lands after a latency, and its reply comes back after another. A reply
  can be lost (the client times out after ``request_timeout_s``, though the write landed); a
  partition either drops requests or holds them in the client's buffer until it heals, so a
  write can land long after its client gave up (and dies with the process if it crashes first).
  A fenced write that timed out re-reads the record, as ``Factory._write`` does: a record equal
  to what it wrote means the write landed, and the run goes on (a read that times out too ends
  the write with an error, as production's exception does).
- A factory publishes an event after its write's reply (or after the read that learned it
  landed), so a write whose outcome it never learns lands without its event, as in production.
  The event takes the write's position in the audit (production publishes it a moment later,
  which can reorder it with a racing writer's event).
- Coordinators and the operator sit next to the broker: their reads and writes take a latency
  and race with everyone else's, but they do not crash or lose replies.
- Faults come only within ``FaultConfig.window_s`` (plus the durations they started); after
  that the fleet is healthy and every run must quiesce: no job queued, blocked, assigned or
  building, no write in flight, every outbox empty. A run that does not quiesce within
  ``limit_s`` of sim time is a liveness failure (``SimResult.settled`` is False).

Engines, locks, intake, replicas, the store (issue 8)
----------------------------------------------------
- An engine is a process: it starts after the ``start`` write, makes side effects while it
  lives, and ends by itself, or when it is killed. It dies with its factory (the parent-death
  signal, within ``PARENT_DEATH_S``), and a holder's supervisor stops it (SIGTERM, then SIGKILL
  within a third of the margin) once ``lease_ttl_s - fence_margin_s`` have passed on the
  factory's own monotonic clock (which drifts by up to ``FaultConfig.clock_drift``) since the
  last successful lease write was *sent*; a reply that comes after that deadline starts no
  engine. Invariant ``side_effect_after_lease_lost``: when a reaper's write ends an epoch's
  lease, no engine of that epoch is alive. An operator's requeue or cancel is a revocation the
  holder learns at its next renewal; engines alive then are counted
  (``engine_alive_after_revocation``), not judged.
- SIGSTOP pauses (``pauses``) stop the loop, the supervisor and the engines; after SIGCONT an
  engine can run until the supervisor, late, stops it. That window is the only allowance:
  counted in ``stats['pause_window']``, never a violation. A stalled event loop
  (``loop_stalls``) stops renewals and reply handling only; the supervisor's deadline does not
  depend on the loop.
- Locks (``locked``): taken before ``start`` (a held lock hands the job back with a back-off),
  re-written on every successful renewal, released when the run ends. A lock is free only when
  released, or when its holder is known stopped: its record at its epoch has its result, or the
  lock entry is older than ``lease_ttl_s + fence_margin_s`` (broker time). Invariant
  ``lock_shared``: no engine holding a lock starts while another engine of that lock lives.
- Intake (``dup_submits``): two submitters send one job with one idempotency key at once; the
  job id derives from the key and the create is "must not exist". Invariant
  ``one_job_per_key``.
- Replicas: a factory's read may be answered by a replica that lags (``follower_reads``,
  ``follower_lag_s``); the compare-and-set after it is judged by the leader. Before a push the
  holder fences by a compare-and-set renewal; invariant ``fence_from_stale_read``: no push
  authorised by a view the leader did not hold then. A coordinator's view lags too
  (``view_lag_s``): it decides deps and expiry from it and writes by compare-and-set.
- Power loss of the broker's node (``power_losses``): a durable store (``sync_interval:
  always``) loses nothing and its clients see an outage. Invariant ``epoch_handed_out_twice``:
  an epoch acknowledged to two claims.

The broken variants of these rules: ``unfenced_engines`` (no parent-death kill, no self-fence:
``unsafe_unfenced_engines``), ``deadline_on_loop`` (the self-fence deadline is enforced from the
event loop, so a frozen loop delays it), ``lock_free_on_epoch`` (main's rule: free as soon as the
record left the holder's epoch), ``intake_reuse_missing`` (main's intake: a key reserved for a job
that does not exist yet is taken over), ``fence_from_read`` (the pre-push fence is a read a lagging
replica may answer), ``unsynced_store`` (fsync every ``UNSYNCED_SYNC_INTERVAL_S``: a power loss
rolls the store back) and ``reap_blind_retry`` (a reaper whose compare-and-set conflicts re-applies
the decision it made on its lagging view to the fresh revision).

Determinism: one ``random.Random(seed)`` draws everything, actions run in (time, sequence)
order from one priority queue, and nothing iterates a set or reads a real clock. The same seed
gives the same trace, records and events, bit for bit.

Breaking it on purpose (to show the checker catches it): ``broken="no_revision_check"`` makes the
store's compare-and-set ignore the revision; ``broken="no_fence"`` makes reports skip
``check_fence``; ``broken="epoch_blind_fence"`` keeps the fence but drops its epoch test, a subtle
flaw that only shows when a factory reclaims a job while its own stale run is still going.

CLI: ``gigafactory chaos sim --seeds 0:2000 [--json] [--broken no_fence]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from gigafactory.config import Settings
from gigafactory.coordinator import decide, plan_dispatch
from gigafactory.coordinator.view import FactoryState, JobState
from gigafactory.factory import lease
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import LEASED, IllegalTransition, Stage
from gigafactory.schemas.manifest import FailureClass, Manifest, Retry, Reviewers
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas.records import EventRecord, FactoryRecord, JobRecord, LockRecord, Station

from . import invariants

BROKEN = ("no_revision_check", "no_fence", "epoch_blind_fence", "unfenced_engines", "deadline_on_loop",
          "lock_free_on_epoch", "intake_reuse_missing", "fence_from_read", "unsynced_store", "reap_blind_retry")
"""Deliberately broken variants, for testing the checker (see the module docstring and :func:`simulate`)."""
SIM_INVARIANTS = ("side_effect_after_lease_lost", "lock_shared", "one_job_per_key", "epoch_handed_out_twice",
                  "fence_from_stale_read")
"""Invariants only the simulation can judge, because only it sees engines, submitters and the
replicas' lag (the chaos lab's side-effect ledger judges the first on real processes)."""
PARENT_DEATH_S = 0.05
"""An engine dies this soon after its factory (parent-death signal)."""
ENGINE_KILL_S = 0.1
"""A fenced run's engine dies this soon after the fence (``run.cancel``)."""
IDEMPOTENT_SUBMIT_GAP_S = (0.0, 3.0)
"""A submitter's pause between reserving an idempotency key and writing the job (a slow one)."""
UNSYNCED_SYNC_INTERVAL_S = 30.0
"""How often a non-fsynced store (``unsynced_store``) makes its writes durable."""
HISTORY_PER_KEY = 16
"""Revisions of a key a replica or a lagging view can still show."""

MAX_OPERATOR_RETRIES = 20
"""As ``coordinator/api.py``: an operator transition gives up after this many conflicts."""
MAX_OUTBOX_ATTEMPTS = 50
"""Production retries an outbox item forever; the simulation stops after this many tries so a
poison item (possible only in a broken variant) cannot keep a run from quiescing."""
MAX_POOL_QUEUE = 1000
"""Dispatch messages a pool keeps; the oldest are discarded (``DiscardPolicy.OLD``)."""
POOL = "p-sim"
SIM_OFFERS = caps.Offers(["engine:shell"])
"""What every simulated factory offers (one pool that every factory serves)."""
LATENCY_S = (0.001, 0.02)
"""One network leg between a client and the broker."""

# Request outcomes that are not values.
TIMEOUT = "timeout"
CONFLICT = "conflict"
ILLEGAL = "illegal"


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Seeded faults. Rates are expectations per factory (or per job, or per message) within
    ``window_s``; a rate of 0 turns a fault off."""

    window_s: float = 120.0
    """Faults start within [0, window_s); after they end the fleet must settle."""
    msg_loss: float = 0.1
    """Probability that a dispatch message is lost."""
    msg_dup: float = 0.1
    """Probability that a dispatch message is delivered twice (a redelivery)."""
    msg_delay_s: float = 3.0
    """Dispatch messages arrive after up to this long, so messages published together arrive in
    any order; 0 delivers them in publication order after one network leg."""
    reply_loss: float = 0.02
    """Probability that a factory's request lands but its reply is lost (the client times out)."""
    crashes: float = 0.6
    """Expected hard crashes per factory (runs and in-memory state lost; the outbox survives)."""
    drains: float = 0.3
    """Expected graceful restarts per factory: stop claiming, wait ``drain_timeout_s``, hand back."""
    restart_s: tuple[float, float] = (1.0, 30.0)
    partitions: float = 0.8
    """Expected partitions per factory: its requests are dropped, or held in its client's buffer
    until the partition heals, while its engines keep running."""
    partition_s: tuple[float, float] = (2.0, 45.0)
    clock_jumps: float = 1.0
    """Expected jumps of a factory's clock (its ``time.time()``), each by up to ``clock_jump_s``."""
    clock_jump_s: float = 3600.0
    slow_report: float = 0.1
    """Probability that a result is uploaded slowly after the engine ends (renewals go on meanwhile, as in
    production, so a slow upload alone no longer costs the lease)."""
    slow_report_s: tuple[float, float] = (5.0, 40.0)
    dispatch_stalls: float = 0.3
    """Expected push-dispatch stalls per factory; it polls the queue meanwhile (the fallback)."""
    stall_s: tuple[float, float] = (5.0, 40.0)
    cancels: float = 0.05
    """Probability per job that an operator cancels it at a random time in the window."""
    requeues: float = 0.05
    """Probability per job that an operator requeues it at a random time in the window."""
    pauses: float = 0.15
    """Expected SIGSTOP-style pauses per factory: its loop, its supervisor and its engines all stop
    (a VM freeze). The only case where an engine may outlive its lease: counted, not judged."""
    pause_s: tuple[float, float] = (5.0, 40.0)
    loop_stalls: float = 0.3
    """Expected freezes of a factory's event loop (CPU-bound work on it): no renewal, no reply is
    handled; its engines and its supervisor go on."""
    loop_stall_s: tuple[float, float] = (2.0, 40.0)
    clock_drift: float = 0.01
    """Bound of the rate error of each factory's monotonic clock (0.01: 1 %)."""
    locked: float = 0.25
    """Probability per job that it takes one of two shared locks."""
    dup_submits: float = 0.1
    """Probability per job that two submitters send it at once with one idempotency key."""
    power_losses: float = 0.5
    """Expected power losses of the broker's node per run: a durable store loses nothing (its
    clients see an outage); a non-fsynced one (``unsynced_store``) loses its unsynced writes."""
    outage_s: tuple[float, float] = (1.0, 5.0)
    follower_reads: float = 0.1
    """Probability that a factory's read of a job record is answered by a replica that lags."""
    follower_lag_s: float = 2.0
    """A read answered by a replica shows the record as it was up to this long ago."""
    view_lag_s: float = 3.0
    """A coordinator's watch-fed view shows records as they were up to this long ago."""

    @classmethod
    def none(cls) -> "FaultConfig":
        """No faults at all: a healthy fleet."""
        return cls(msg_loss=0.0, msg_dup=0.0, msg_delay_s=0.0, reply_loss=0.0, crashes=0.0, drains=0.0,
                   partitions=0.0, clock_jumps=0.0, slow_report=0.0, dispatch_stalls=0.0, cancels=0.0,
                   requeues=0.0, pauses=0.0, loop_stalls=0.0, clock_drift=0.0, locked=0.0, dup_submits=0.0,
                   power_losses=0.0, follower_reads=0.0, follower_lag_s=0.0, view_lag_s=0.0)


def sim_settings() -> Settings:
    """Production timings, but a short drain so drains do hand jobs back within the runs' lengths."""
    return Settings(drain_timeout_s=5.0)


@dataclass(slots=True)
class JobSpec:
    """What the simulation knows about a job and the protocol does not: how its attempts go."""

    id: str
    fail_p: float
    fail_classes: tuple[FailureClass, ...]
    run_s: tuple[float, float]
    human_ships: bool
    """The operator ships it from ``testing``/``review``; otherwise it waits there for good."""


_RETRIED = (FailureClass.CRASH, FailureClass.VERIFY_FAILED, FailureClass.TIMEOUT)
_NOT_RETRIED = (FailureClass.SETUP_FAILED, FailureClass.BUDGET_EXCEEDED)


# -- the store -------------------------------------------------------------------------------------


class SimStore:
    """``gf_jobs`` in memory: compare-and-set on the revision, revisions stamped with sim time.

    Revisions come from one sequence, as a KV bucket's come from its stream. Records are kept as
    the immutable values the protocol returns (it never mutates a record it is given)."""

    __slots__ = ("recs", "seq", "check_revision", "by_stage", "hist", "journal")

    def __init__(self, check_revision: bool = True) -> None:
        self.recs: dict[str, tuple[JobRecord, int, float]] = {}
        self.seq = 0
        self.check_revision = check_revision
        self.by_stage: dict[Stage, dict[str, None]] = {s: {} for s in Stage}
        """Insertion-ordered index of keys by stage (a coordinator's watch-fed view)."""
        self.hist: dict[str, list[tuple[float, tuple[JobRecord, int, float]]]] = {}
        """The last revisions of each key with the time they were stored: what a lagging replica
        or view still shows."""
        self.journal: list[tuple[str, tuple[JobRecord, int, float] | None, int]] = []
        """Writes not yet synced to disk (only a non-fsynced store keeps any): key, the entry it
        replaced, the sequence before it."""

    def get(self, key: str) -> tuple[JobRecord, int, float] | None:
        return self.recs.get(key)

    def get_as_of(self, key: str, t: float) -> tuple[JobRecord, int, float] | None:
        """The entry a replica that lags until ``t`` shows (None: not there yet)."""
        h = self.hist.get(key, ())
        for at, entry in reversed(h):
            if at <= t:
                return entry
        # Older than what is kept: the oldest kept (a replica lags by seconds, not by history).
        return h[0][1] if len(h) >= HISTORY_PER_KEY else None

    def _put(self, key: str, entry: tuple[JobRecord, int, float], prev, now: float, durable: bool) -> None:
        self.recs[key] = entry
        h = self.hist.setdefault(key, [])
        h.append((now, entry))
        if len(h) > HISTORY_PER_KEY:
            del h[0]
        if not durable:
            self.journal.append((key, prev, entry[1] - 1))

    def create(self, key: str, rec: JobRecord, now: float, durable: bool = True) -> int | None:
        if key in self.recs:
            return None
        self.seq += 1
        self._put(key, (rec, self.seq, now), None, now, durable)
        self.by_stage[rec.stage][key] = None
        return self.seq

    def update(self, key: str, rec: JobRecord, last: int, now: float, durable: bool = True) -> int | None:
        """The new revision, or None on a conflict (the key changed since ``last``)."""
        cur = self.recs.get(key)
        if cur is None or (self.check_revision and cur[1] != last):
            return None
        self.seq += 1
        if cur[0].stage is not rec.stage:
            del self.by_stage[cur[0].stage][key]
            self.by_stage[rec.stage][key] = None
        self._put(key, (rec, self.seq, now), cur, now, durable)
        return self.seq

    def roll_back(self) -> int:
        """Power loss of a non-fsynced store: every unsynced write is lost, newest first, and the
        sequence goes back with them (revisions are handed out again). Returns how many."""
        n = len(self.journal)
        for key, prev, seq in reversed(self.journal):
            cur = self.recs.pop(key)
            del self.by_stage[cur[0].stage][key]
            if self.hist.get(key):
                self.hist[key].pop()
            if prev is not None:
                self.recs[key] = prev
                self.by_stage[prev[0].stage][key] = None
            self.seq = seq
        self.journal.clear()
        return n

    def keys(self, *stages: Stage) -> list[str]:
        out: list[str] = []
        for s in stages:
            out.extend(self.by_stage[s])
        return out


# -- actors ----------------------------------------------------------------------------------------


class SimRun:
    """A factory's claim of one job at one epoch (``factory/agent.py`` ``Run``)."""

    __slots__ = ("job", "epoch", "station", "revision", "record", "fenced", "draining", "writing",
                 "write_q", "engine_done", "ended", "stop_renewing", "engine", "lease_sent_at", "lock",
                 "lock_sent_at")

    def __init__(self, job: str, epoch: int, station: int, revision: int, record: JobRecord) -> None:
        self.job, self.epoch, self.station, self.revision, self.record = job, epoch, station, revision, record
        self.fenced = False
        self.draining = False
        self.writing = False
        self.write_q: list[tuple] = []
        self.engine_done = False
        self.stop_renewing = False
        self.ended = False
        self.engine: SimEngine | None = None
        self.lease_sent_at = 0.0
        """When the last lease write that succeeded (claim, start, renewal, ...) was sent: the
        self-fence counts from here (sent, not acknowledged: conservative)."""
        self.lock: str | None = None
        self.lock_sent_at = 0.0
        """When the last lock write that landed (acquisition or refresh) was sent."""

    def fence_base(self) -> float:
        """The self-fence counts from the older of the run's two leases: its job record's and,
        if it holds a lock, its lock entry's (which frees the lock when it ages out)."""
        return self.lease_sent_at if self.lock is None else min(self.lease_sent_at, self.lock_sent_at)


class SimEngine:
    """A job's engine process: it makes side effects while it lives. It belongs to its factory's
    process group (it dies with it, unless ``unfenced_engines``) and outlives nothing else."""

    __slots__ = ("job", "epoch", "fid", "lock", "alive", "end_at", "run", "inc", "pause_end", "lease_sent_at")

    def __init__(self, run: SimRun, fid: str, inc: int, end_at: float) -> None:
        self.job, self.epoch, self.fid, self.lock = run.job, run.epoch, fid, run.lock
        self.alive = True
        self.end_at = end_at
        self.run: SimRun | None = run
        """None once its factory is gone (a leftover engine)."""
        self.inc = inc
        self.pause_end = -1.0
        """When the last SIGSTOP of its factory ended."""
        self.lease_sent_at = run.fence_base()


class SimOutboxItem:
    __slots__ = ("job", "epoch", "station", "failure", "detail", "attempts")

    def __init__(self, job: str, epoch: int, station: int, failure: FailureClass | None, detail: str) -> None:
        self.job, self.epoch, self.station, self.failure, self.detail = job, epoch, station, failure, detail
        self.attempts = 0


class SimFactory:
    __slots__ = ("id", "stations", "free", "inc", "alive", "draining", "clock_offset", "partition_until",
                 "partition_drop", "mode", "runs", "outbox", "claiming", "waiting", "flush_scheduled",
                 "flushing", "poll_scheduled", "frozen_until", "paused_until", "drift")

    def __init__(self, fid: str, stations: int) -> None:
        self.id = fid
        self.stations = stations
        self.free: list[int] = list(range(stations))
        self.inc = 0
        """Incarnation: bumped by every crash or restart; callbacks of an older one are dropped."""
        self.alive = True
        self.draining = False
        self.clock_offset = 0.0
        self.partition_until = 0.0
        self.partition_drop = False
        self.mode = "push"
        self.runs: dict[tuple[str, int], SimRun] = {}
        self.outbox: list[SimOutboxItem] = []
        """Durable: survives crashes (SQLite in production)."""
        self.claiming = False
        self.waiting = False
        self.flush_scheduled = False
        self.flushing = False
        self.poll_scheduled = False
        self.frozen_until = 0.0
        """The event loop handles nothing before this (a stalled loop, or a pause)."""
        self.paused_until = 0.0
        """SIGSTOP: the whole process (supervisor and engines too) is stopped until then."""
        self.drift = 0.0
        """Rate error of its monotonic clock: its ``x`` seconds take ``x / (1 + drift)``."""


class SimCoordinator:
    __slots__ = ("id", "published", "last_served", "served_seq")

    def __init__(self, cid: str) -> None:
        self.id = cid
        self.published: dict[str, decide.Offered] = {}
        """As ``Scheduler.published``: job -> its latest offer (``at_s`` in sim time)."""
        self.last_served: dict[str, int] = {}
        """As ``Scheduler.last_served``: product -> sequence number of its latest offer."""
        self.served_seq = 0


class Req:
    """One request of a factory to the broker, answered once: by its reply or by its timeout."""

    __slots__ = ("f", "inc", "on_reply", "done", "slot")

    def __init__(self, f: SimFactory, on_reply: Callable) -> None:
        self.f, self.inc, self.on_reply = f, f.inc, on_reply
        self.done = False
        self.slot: int | None = None


# -- results ---------------------------------------------------------------------------------------


@dataclass
class SimResult:
    seed: int
    jobs: dict[str, JobRecord]
    events: list[EventRecord]
    report: invariants.Report
    trace: list[tuple]
    """Compact: ``(time_us, actor, action, job, epoch)`` for every decision and fault."""
    stats: dict[str, int]
    settled: bool
    """The run quiesced within its limits (liveness); False is a failure too."""
    end_s: float
    steps: int
    acknowledged: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.report.ok and self.settled

    def digest(self) -> str:
        """A fingerprint of the trace, the final records and the audit: equal for equal runs."""
        h = hashlib.sha256(repr(self.trace).encode())
        h.update(msgspec.json.encode([self.jobs[k] for k in sorted(self.jobs)]))
        h.update(msgspec.json.encode(self.events))
        return h.hexdigest()[:16]

    def trace_text(self, limit: int | None = None) -> str:
        rows = self.trace if limit is None else self.trace[:limit]
        return "\n".join(f"{t / 1e6:11.6f} {actor:<6} {what:<22} {job or '-':<5} {'' if ep is None else ep}"
                         for t, actor, what, job, ep in rows)

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        live = "" if self.settled else " (did not settle: liveness)"
        return (f"seed {self.seed}: {verdict}{live}; {self.steps} steps, {self.end_s:.1f}s simulated, "
                f"digest {self.digest()}\n" + self.report.to_text())


# -- the simulation --------------------------------------------------------------------------------


class Sim:
    def __init__(self, seed: int, *, jobs: int, factories: int, stations: int, coordinators: int,
                 faults: FaultConfig, settings: Settings, broken: str | None, limit_s: float,
                 max_steps: int) -> None:
        assert jobs >= 1 and factories >= 1 and stations >= 1 and coordinators >= 1
        assert broken is None or broken in BROKEN, f"broken must be one of {BROKEN}, not {broken!r}"
        assert settings.lease_renew_s < settings.lease_ttl_s
        self.seed = seed
        self.rng = random.Random(seed)
        self.random = self.rng.random
        self.fc = faults
        self.settings = settings
        self.broken = broken
        self.limit_s = limit_s
        self.max_steps = max_steps
        self.t = 0.0
        self.q: list[tuple] = []
        self.qseq = 0
        self.steps = 0
        self.done = False
        self.store = SimStore(check_revision=broken != "no_revision_check")
        self.events: list[EventRecord | None] = []
        """The audit in stream order; a reserved slot stays None if its event was never published."""
        self.trace: list[tuple] = []
        self.stats: Counter[str] = Counter()
        self.pool: deque[tuple[str, int]] = deque()
        self.fetchers: deque[SimFactory] = deque()
        self.landing = 0
        """Requests sent that have not landed yet (a buffered write can still change a record)."""
        self.quiet_after = 0.0
        self.acknowledged: set[str] = set()
        self.specs: dict[str, JobSpec] = {}
        self.factories = [SimFactory(f"f{i}", stations) for i in range(factories)]
        self.by_id = {f.id: f for f in self.factories}
        self.coordinators = [SimCoordinator(f"c{i}") for i in range(coordinators)]
        self.durable = broken != "unsynced_store"
        self.engines: dict[tuple[str, int], SimEngine] = {}
        """Engines alive now, by (job, epoch), wherever they run (leftovers too)."""
        self.locks: dict[str, tuple[str, int, str, float]] = {}
        """``gf_locks``: lock -> (job, epoch, factory, broker time of its last write)."""
        self.granted: Counter[tuple[str, int]] = Counter()
        """Claims acknowledged to a factory, by (job, epoch): the epochs handed out."""
        self.keyed: dict[str, str] = {}
        """Idempotency key -> the job id of its first submission (to tell jobs per key)."""
        self.idem: dict[str, str] = {}
        """``gf_idempotency``: key -> job id (only the broken intake uses reservations)."""
        self.found: list[invariants.Violation] = []
        """Violations of :data:`SIM_INVARIANTS`."""
        # Production's margin and kill grace (derived from the lease timings unless set): the
        # holder stops its engine ``lease_ttl_s - margin`` after its last successful lease write
        # was sent, on its own clock, and the engine is dead within the grace after that.
        self.margin_s = settings.fence_margin_effective_s
        self.kill_grace_s = settings.fence_kill_grace_s
        self._plan(jobs)

    # -- the loop ------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable, *args) -> None:
        self.qseq += 1
        heapq.heappush(self.q, (t, self.qseq, fn, args))

    def run(self) -> bool:
        """Run to quiescence or a limit; True if the run quiesced."""
        q, pop, limit_s, max_steps = self.q, heapq.heappop, self.limit_s, self.max_steps
        steps = self.steps
        while q and not self.done:
            if steps >= max_steps or q[0][0] > limit_s:
                break
            t, _, fn, args = pop(q)
            self.t = t
            steps += 1
            fn(*args)
        self.steps = steps
        return self.done

    def note(self, actor: str, what: str, job: str | None = None, epoch: int | None = None) -> None:
        self.trace.append((round(self.t * 1e6), actor, what, job, epoch))

    def lat(self) -> float:
        return LATENCY_S[0] + (LATENCY_S[1] - LATENCY_S[0]) * self.random()

    def faulty(self) -> bool:
        return self.t < self.fc.window_s

    def emit(self, ev: EventRecord, slot: int | None = None) -> None:
        if slot is None:
            self.events.append(ev)
        else:
            self.events[slot] = ev

    # -- the plan: jobs, ticks, faults ----------------------------------------------------------

    def _plan(self, n_jobs: int) -> None:
        rng, fc = self.rng, self.fc
        submit_at = sorted(rng.uniform(0.0, 10.0) for _ in range(n_jobs))
        for i, t in enumerate(submit_at):
            jid = f"j{i:03d}"
            kind = rng.random()
            fail_p = 0.0 if kind < 0.5 else (0.4 if kind < 0.85 else 1.0)
            classes = _RETRIED if rng.random() < 0.8 else _RETRIED + _NOT_RETRIED
            spec = JobSpec(jid, fail_p, classes, (1.0, rng.choice((5.0, 15.0, 40.0))), rng.random() < 0.9)
            self.specs[jid] = spec
            policy = rng.random()
            review = "auto" if policy < 0.3 else ("manual" if policy < 0.9 else Reviewers(reviewers=["@sim-reviewer"]))
            lock = f"lock-{rng.randrange(2)}" if fc.locked and rng.random() < fc.locked else None
            manifest = Manifest(cwd="w", engine="shell", retry=Retry(max=rng.randint(0, 3), backoff="2s"),
                                review_policy=review, lock=lock)
            candidates = [d for d in list(self.specs)[:-1]
                          if self.specs[d].human_ships and f"key-{d}" not in self.keyed]
            deps = [rng.choice(candidates)] if candidates and rng.random() < 0.2 else []
            if fc.dup_submits and not deps and rng.random() < fc.dup_submits:
                # Two submitters, one idempotency key, at nearly the same time.
                manifest = msgspec.structs.replace(manifest, idempotency_key=f"key-{jid}")
                self.keyed[f"key-{jid}"] = jid
                for who in (0, 1):
                    self._fault_at(t + rng.uniform(0.0, 0.5), IDEMPOTENT_SUBMIT_GAP_S[1] + 1.0,
                                   self._submit_keyed, jid, manifest, who)
            else:
                self._fault_at(t, 0.0, self._submit, jid, manifest, deps)  # not quiet before every job is in
            if fc.cancels and rng.random() < fc.cancels:
                self._fault_at(t + rng.uniform(0.0, max(0.0, fc.window_s - t)), 0.0, self._operator, jid, "cancel")
            if fc.requeues and rng.random() < fc.requeues:
                self._fault_at(t + rng.uniform(0.0, max(0.0, fc.window_s - t)), 0.0, self._operator, jid, "requeue")
        for i, c in enumerate(self.coordinators):
            self.at(rng.uniform(0.0, self.settings.reaper_interval_s), self._tick, c, i == 0)
        self.at(rng.uniform(0.0, 2.0), self._operator_tick)
        for _ in range(self._count(fc.power_losses)):
            d = rng.uniform(*fc.outage_s)
            self._fault_at(rng.uniform(0, fc.window_s), d, self._power_loss, d)
        if not self.durable:
            self.at(UNSYNCED_SYNC_INTERVAL_S, self._sync)
        for f in self.factories:
            f.drift = rng.uniform(-fc.clock_drift, fc.clock_drift)
            for _ in range(self._count(fc.pauses)):
                d = rng.uniform(*fc.pause_s)
                self._fault_at(rng.uniform(0, fc.window_s), d, self._pause, f, d)
            for _ in range(self._count(fc.loop_stalls)):
                d = rng.uniform(*fc.loop_stall_s)
                self._fault_at(rng.uniform(0, fc.window_s), d, self._loop_stall, f, d)
            self.at(0.0, self._fetch, f)
            for _ in range(self._count(fc.crashes)):
                self._fault_at(rng.uniform(0, fc.window_s), fc.restart_s[1], self._crash, f)
            for _ in range(self._count(fc.drains)):
                self._fault_at(rng.uniform(0, fc.window_s), fc.restart_s[1] + self.settings.drain_timeout_s + 10,
                               self._drain, f)
            for _ in range(self._count(fc.partitions)):
                d = rng.uniform(*fc.partition_s)
                self._fault_at(rng.uniform(0, fc.window_s), d, self._partition, f, d, rng.random() < 0.5)
            for _ in range(self._count(fc.clock_jumps)):
                self._fault_at(rng.uniform(0, fc.window_s), 0.0, self._clock_jump, f,
                               rng.uniform(-fc.clock_jump_s, fc.clock_jump_s))
            for _ in range(self._count(fc.dispatch_stalls)):
                d = rng.uniform(*fc.stall_s)
                self._fault_at(rng.uniform(0, fc.window_s), d, self._stall, f, d)

    def _count(self, rate: float) -> int:
        n = int(rate)
        return n + (1 if self.rng.random() < rate - n else 0)

    def _fault_at(self, t: float, lasts_s: float, fn: Callable, *args) -> None:
        self.quiet_after = max(self.quiet_after, t + lasts_s)
        self.at(t, fn, *args)

    # -- intake ---------------------------------------------------------------------------------

    def _submit(self, jid: str, manifest: Manifest, deps: list[str]) -> None:
        """``coordinator/intake.py`` ``submit``: create the record, then audit it."""
        waiting = [d for d in deps if self.store.get(d) is None  # lost by a non-fsynced store
                   or not protocol.dep_satisfied(self.store.get(d)[0].stage, manifest.deps_mode)]
        stage = Stage.BLOCKED if waiting else Stage.QUEUED
        reason = ("waiting for " + ", ".join(waiting)) if waiting else "waiting for a factory"
        rec = JobRecord(id=jid, manifest=manifest, body="echo sim\n", source=f"sim:{jid}.md",
                        content_hash=jid, submitted_at=self.t, pool=POOL, requirements=["engine:shell"],
                        deps=list(deps), stage=stage, reason=reason, updated_at=self.t)
        assert self.store.create(jid, rec, self.t, self.durable) is not None
        self.acknowledged.add(jid)
        self.emit(EventRecord(kind="submitted", at=self.t, job=jid, stage_to=str(stage), actor="sim",
                              reason=reason, data={"pool": POOL, "deps": list(deps)}))
        self.note("intake", "submitted", jid, 0)

    def _submit_keyed(self, jid: str, manifest: Manifest, who: int) -> None:
        """One of two concurrent submitters of one idempotency key (``coordinator/intake.py``).

        Real (the fix): the job id is derived from the key, and the job is created with "must
        not exist": the second create conflicts and gets the first one's job. Broken
        (``intake_reuse_missing``, the logic of main): reserve the key for a fresh id, then write
        the job; a submitter that finds the key reserved for a job that does not exist (yet)
        takes the key over, unable to tell a dead submitter from a slow one."""
        key = manifest.idempotency_key
        assert key is not None
        rec = JobRecord(id=jid, manifest=manifest, body="echo sim\n", source=f"sim:{jid}.md",
                        content_hash=jid, submitted_at=self.t, pool=POOL, requirements=["engine:shell"],
                        stage=Stage.QUEUED, reason="waiting for a factory", updated_at=self.t)
        if self.broken != "intake_reuse_missing":
            return self.at(self.t + self.lat(), self._create_job, rec, who)
        mine = jid if who == 0 else f"{jid}-{who}"
        rec = msgspec.structs.replace(rec, id=mine)
        self.at(self.t + self.lat(), self._reserve_key, key, rec, who)

    def _reserve_key(self, key: str, rec: JobRecord, who: int) -> None:
        idem = self.idem
        cur = idem.get(key)
        if cur is None or cur == rec.id or self.store.get(cur) is None:
            idem[key] = rec.id  # main's _claim_key: a reservation whose job is missing is reused
            gap = self.rng.uniform(*IDEMPOTENT_SUBMIT_GAP_S)
            return self.at(self.t + gap, self._create_job, rec, who)
        self.stats["submit_key_taken"] += 1

    def _create_job(self, rec: JobRecord, who: int) -> None:
        if self.store.create(rec.id, rec, self.t, self.durable) is None:
            self.stats["submit_existing"] += 1  # the other submitter's job: acknowledged with its id
            return
        if rec.id not in self.specs:
            self.specs[rec.id] = dataclasses.replace(self.specs[rec.id.split("-")[0]], id=rec.id)
        self.acknowledged.add(rec.id)
        self.emit(EventRecord(kind="submitted", at=self.t, job=rec.id, stage_to="queued", actor=f"submitter{who}",
                              reason=rec.reason, data={"pool": POOL, "deps": []}))
        self.note("intake", "submitted", rec.id, 0)

    # -- coordinators -----------------------------------------------------------------------------

    def _tick(self, c: SimCoordinator, judge_quiet: bool) -> None:
        """One pass of a coordinator's loops: deps, reap, dispatch (``coordinator/scheduler.py``)."""
        now = self.t
        recs, by = self.store.recs, self.store.by_stage
        # The coordinator decides from its watch-fed view, which may lag the store; its writes
        # are compare-and-sets on the revision it saw, so a stale decision conflicts.
        lag_s = self.rng.uniform(0.0, self.fc.view_lag_s) if self.fc.view_lag_s and self.faulty() else 0.0
        view = (lambda j: recs.get(j)) if not lag_s else (lambda j: self.store.get_as_of(j, now - lag_s))
        # Writes are scheduled, not made, while the index is iterated: it does not change under us.
        # The decisions are production's (coordinator/decide.py), on the (lagging) view.
        def live_stage(d: str) -> Stage | None:
            de = view(d)
            return de[0].stage if de is not None else None

        for jid in by[Stage.BLOCKED]:
            entry = view(jid)
            if entry is None:
                continue
            rec, rev, _ = entry
            # No retention here: a dependency is never archived, so nothing is looked up there.
            w = decide.unblock(rec, decide.dep_stages(rec, live_stage, {}), now)
            if w is not None:
                self.at(now + self.lat(), self._coord_write, c, jid, rev, w, False)
        ttl_s = self.settings.lease_ttl_s
        for stage in (Stage.ASSIGNED, Stage.BUILDING):
            for jid in by[stage]:
                entry = view(jid)
                if entry is None:
                    continue
                rec, rev, ts = entry
                w = decide.reap(rec, ts, now, ttl_s)
                if w is not None:
                    self.at(now + self.lat(), self._coord_write, c, jid, rev, w, True)
        if by[Stage.QUEUED] or c.published:
            self._dispatch(c, now)
        if judge_quiet and self._quiet():
            self.done = True
            return
        self.at(now + self.settings.reaper_interval_s, self._tick, c, judge_quiet)

    def _coord_write(self, c: SimCoordinator, jid: str, rev: int, w: decide.Write, reaping: bool) -> None:
        """``Scheduler._write``: compare-and-set, then the event (the coordinator is next to the broker)."""
        out = w.out
        lost_epoch = w.data["old_epoch"] if reaping else None
        if self.store.update(jid, out.record, rev, self.t, self.durable) is None:
            self.stats["coordinator_conflicts"] += 1
            cur = self.store.get(jid)
            if self.broken != "reap_blind_retry" or not reaping or cur is None or cur[0].stage not in LEASED:
                return
            # Broken: the reaper re-applies the decision it made on its (lagging) view to the
            # fresh revision instead of judging the fresh record: it reaps a renewed lease.
            if self.store.update(jid, out.record, cur[1], self.t) is None:
                return
            self.stats["blind_reaps"] += 1
            lost_epoch = cur[0].epoch
        if lost_epoch is not None:
            self._lease_lost(jid, lost_epoch)
        kind = str(out.event)
        self.emit(EventRecord(kind=kind, at=out.record.updated_at, job=jid, stage_from=str(out.stage_from),
                              stage_to=str(out.record.stage), epoch=out.record.epoch, actor=c.id,
                              reason=out.reason, data=dict(w.data)))
        self.note(c.id, f"reap:{kind}" if reaping else kind, jid, out.record.epoch)

    def _dispatch(self, c: SimCoordinator, now: float) -> None:
        """``Scheduler.dispatch``: production's planner (``coordinator/plan_dispatch.py``, on
        production's per-job decisions of ``coordinator/decide.py``) on a snapshot of the store,
        then its plan performed: the offers out for ``redispatch_s`` go again first, then first
        offers in production's dispatch order up to the live factories' free stations, unless
        :func:`decide.hold_reason` holds a job (its retry back-off, by the store's clock; a lock a
        leased or offered job has). One pool that every factory serves, holds counted and not
        written: see the module docstring."""
        recs = self.store.recs
        queue = plan_dispatch.QueueOrder()
        for j in self.store.by_stage[Stage.QUEUED]:
            rec, rev, ts = recs[j]
            queue.on_job(None, JobState(rec, rev, ts))
        leased = [recs[j][0] for stage in LEASED for j in self.store.by_stage[stage]]
        live = [self._factory_state(f, now) for f in self.factories if f.alive]
        plan = plan_dispatch.plan_dispatch(plan_dispatch.DispatchInput(
            queue=queue, live=live, leased=leased, published=c.published, held={}, gap_seen={},
            last_served=c.last_served, quarantined=lambda st: False, broker_now_s=now, now_mono_s=now,
            redispatch_s=self.settings.redispatch_s, max_record_bytes=1 << 62))
        for jid in plan.forget:
            del c.published[jid]
        # Production writes a hold into the record with a ``held`` event; here it is counted.
        self.stats["dispatch_lock_holds"] += sum(1 for _st, why in plan.holds if why.startswith("waiting for lock"))
        serving = [f.id for f in self.factories if f.alive]
        for st, redispatch, pos in plan.offers:
            rec = st.record
            c.published[rec.id] = decide.Offered(rec.epoch, now)
            c.served_seq += 1
            c.last_served[rec.manifest.product] = c.served_seq
            self.emit(decide.dispatched_event(
                rec, at=now, actor=c.id, broker_now_s=now, redispatch=redispatch,
                redispatch_s=self.settings.redispatch_s, position=pos, queued_in_pool=plan.depth[rec.pool],
                pool_capacity=plan.capacity[rec.pool], serving_factories=serving))
            self._publish((rec.id, rec.epoch))

    @staticmethod
    def _factory_state(f: SimFactory, now: float) -> FactoryState:
        """What the coordinator's view holds of a live factory: its stations and capabilities."""
        return FactoryState(FactoryRecord(id=f.id, host=f.id, os="sim", arch="sim", capabilities=["engine:shell"],
                                          stations=[Station(index=i, since=0.0) for i in range(f.stations)],
                                          heartbeat_at=now), now, SIM_OFFERS)

    def _publish(self, msg: tuple[str, int]) -> None:
        """A dispatch message on its way to the pool's work queue, through the faults."""
        rng, fc = self.rng, self.fc
        if not self.faulty() or not fc.msg_delay_s:
            self.at(self.t + self.lat(), self._deliver, msg)
            return
        if rng.random() < fc.msg_loss:
            self.stats["msg_lost"] += 1
            return
        copies = 2 if rng.random() < fc.msg_dup else 1
        self.stats["msg_duplicated"] += copies - 1
        for _ in range(copies):
            self.at(self.t + rng.uniform(0.0, fc.msg_delay_s), self._deliver, msg)

    def _deliver(self, msg: tuple[str, int]) -> None:
        if len(self.pool) >= MAX_POOL_QUEUE:
            self.pool.popleft()
            self.stats["msg_discarded"] += 1
        self.pool.append(msg)
        while self.fetchers:
            f = self.fetchers.popleft()
            f.waiting = False
            if self._can_fetch(f):
                self.at(self.t + self.lat(), self._fetch, f)
                break

    def _quiet(self) -> bool:
        if self.t < self.quiet_after or self.landing:
            return False
        by = self.store.by_stage
        if by[Stage.QUEUED] or by[Stage.BLOCKED] or by[Stage.ASSIGNED] or by[Stage.BUILDING]:
            return False
        if any(self.specs[j].human_ships for j in self.store.keys(Stage.TESTING, Stage.REVIEW)):
            return False
        for f in self.factories:
            if not f.alive or f.runs or f.outbox or f.claiming or f.partition_until > self.t:
                return False
        return True

    # -- operator ------------------------------------------------------------------------------------

    def _operator_tick(self) -> None:
        """A human at the ship gate: ships what waits in testing or review, after a while."""
        for jid in self.store.keys(Stage.TESTING, Stage.REVIEW):
            if self.specs[jid].human_ships and self.rng.random() < 0.5:
                self.at(self.t + self.lat(), self._operator, jid, "ship")
        if not self.done:
            self.at(self.t + 2.0, self._operator_tick)

    def _operator(self, jid: str, action: str, tries: int = 0) -> None:
        """``coordinator/api.py`` ``_transition``: read, decide, compare-and-set, retry on conflict."""
        got = self.store.get(jid)
        if got is None:  # never written (a lost submission in a broken variant)
            return
        rec, rev, _ = got
        decide = {"ship": protocol.ship, "cancel": protocol.cancel, "requeue": protocol.operator_requeue}[action]
        try:
            out = decide(rec, self.t, "operator")
        except IllegalTransition:
            self.stats[f"operator_{action}_refused"] += 1
            return
        self.at(self.t + self.lat(), self._operator_write, jid, action, rev, out, tries)

    def _operator_write(self, jid: str, action: str, rev: int, out: protocol.Outcome, tries: int) -> None:
        before = self.store.get(jid)
        if self.store.update(jid, out.record, rev, self.t, self.durable) is None:
            if tries + 1 < MAX_OPERATOR_RETRIES:
                self._operator(jid, action, tries + 1)
            return
        if before is not None and (jid, before[0].epoch) in self.engines and out.record.epoch != before[0].epoch:
            # A revocation: the holder learns it at its next renewal (fenced), not before; its
            # engine runs until then. Counted, not judged: no lease expired under it.
            self.stats["engine_alive_after_revocation"] += 1
        self.emit(EventRecord(kind=str(out.event), at=self.t, job=jid, stage_from=str(out.stage_from),
                              stage_to=str(out.record.stage), epoch=out.record.epoch, actor="operator",
                              reason=out.reason))
        self.note("op", action, jid, out.record.epoch)

    # -- factory: requests -------------------------------------------------------------------------------

    def _send(self, f: SimFactory, op: str, key: str | None, on_reply: Callable, value: JobRecord | None = None,
              last: int = 0, audit: int = 0) -> Req:
        """A request from ``f``: lands after a latency (or when a partition heals, or never), and
        its reply or its timeout reaches ``on_reply(result, slot)`` exactly once. Returns the
        request (its ``slot`` is set if it lands as an audited write). ``audit``: how many
        events say the write (0: none), reserved in the audit where it lands."""
        t = self.t
        req = Req(f, on_reply)
        timeout_at = t + self.settings.request_timeout_s
        lost = bool(self.fc.reply_loss) and self.faulty() and self.rng.random() < self.fc.reply_loss
        if f.partition_until > t:
            if f.partition_drop:
                self.at(timeout_at, self._timeout, req)
                return req
            land, buffered = f.partition_until + self.lat(), True
        else:
            land, buffered = t + self.lat(), False
        if lost or land + LATENCY_S[1] >= timeout_at:
            self.at(timeout_at, self._timeout, req)
        self.landing += 1
        self.at(land, self._land, req, op, key, value, last, audit, buffered, lost)
        return req

    def _land(self, req: Req, op: str, key: str | None, value: JobRecord | None, last: int, audit: bool,
              buffered: bool, lost: bool) -> None:
        self.landing -= 1
        if buffered and req.f.inc != req.inc:
            self.stats["buffered_lost_in_crash"] += 1  # the client's buffer died with its process
            return
        store = self.store
        if op == "get":
            got = store.get(key)
            if self.fc.follower_reads and self.faulty() and self.rng.random() < self.fc.follower_reads:
                # A direct get answered by a replica that lags (ADR-31): never decide a fence
                # from it; the compare-and-set that follows is judged by the leader.
                self.stats["stale_reads"] += 1
                got = store.get_as_of(key, self.t - self.rng.uniform(0.0, self.fc.follower_lag_s))
            result = None if got is None else (*got, self.t)
        elif op == "update":
            rev = store.update(key, value, last, self.t, self.durable)
            result = CONFLICT if rev is None else rev
            if rev is not None and audit:
                req.slot = len(self.events)
                # ``audit`` events say this write, in its place in the audit.
                self.events.extend([None] * int(audit))
        elif op == "follower_get":  # a replica that lags; value is (factory, epoch) asking
            lag_s = self.rng.uniform(0.0, self.fc.follower_lag_s) if self.fc.follower_lag_s else 0.0
            got = store.get_as_of(key, self.t - lag_s)
            leader = store.get(key)
            truth = leader is not None and _holds(leader[0], *value)
            result = (None if got is None else got[0], truth)
        elif op == "lock":
            result = self._lock_land(key, *value)
        elif op == "lock_refresh":
            cur = self.locks.get(key)
            result = cur is not None and cur[:2] == value[:2]
            if result:
                self.locks[key] = (*cur[:3], self.t)
        elif op == "lock_release":
            cur = self.locks.get(key)
            if cur is not None and cur[:2] == value[:2]:
                del self.locks[key]
            result = True
        else:  # "scan": the queue index of the pool, best first
            entries = [store.get(j)[0] for j in store.keys(Stage.QUEUED)]
            entries.sort(key=lambda r: (r.submitted_at, r.id))
            result = [r.id for r in entries]
        if lost:
            self.stats["reply_lost"] += 1
            if req.slot is not None:
                self.stats["write_without_event"] += 1  # landed, but its reply never reaches the writer
            return
        self.at(self.t + self.lat(), self._reply, req, result)

    def _reply(self, req: Req, result) -> None:
        if req.f.frozen_until > self.t and req.f.inc == req.inc and not req.done:
            return self.at(req.f.frozen_until, self._reply, req, result)  # the loop handles it later
        if req.done or req.f.inc != req.inc:
            if req.slot is not None:
                self.stats["write_without_event"] += 1
            return
        req.done = True
        req.on_reply(result, req.slot)

    def _timeout(self, req: Req) -> None:
        if req.done:
            return
        if req.f.frozen_until > self.t and req.f.inc == req.inc:
            return self.at(req.f.frozen_until, self._timeout, req)
        req.done = True
        if req.f.inc == req.inc:
            req.on_reply(TIMEOUT, None)

    # -- factory: fetching and claiming ----------------------------------------------------------------

    def _can_fetch(self, f: SimFactory) -> bool:
        return (f.alive and not f.draining and not f.claiming and bool(f.free)
                and f.partition_until <= self.t and f.mode == "push")

    def _fetch(self, f: SimFactory) -> None:
        """The pool puller: with a free station, take the next dispatch message, or wait for one."""
        if not self._can_fetch(f):
            return
        if f.frozen_until > self.t:
            return self.at(f.frozen_until, self._fetch, f)
        if not self.pool:
            if not f.waiting:
                f.waiting = True
                self.fetchers.append(f)
            return
        jid, _ = self.pool.popleft()
        self._claim(f, jid, f.free.pop(0), lambda: self._fetch(f))

    def _stall(self, f: SimFactory, duration_s: float) -> None:
        """Push dispatch stalls for ``f``: it falls back to polling the queue index."""
        self.note(f.id, "dispatch_stall")
        f.mode = "poll"
        self.at(self.t + duration_s, self._unstall, f)
        if not f.poll_scheduled:
            f.poll_scheduled = True
            self.at(self.t + self.rng.uniform(0.5, 2.0), self._poll, f)

    def _unstall(self, f: SimFactory) -> None:
        f.mode = "push"
        self._fetch(f)

    def _poll(self, f: SimFactory) -> None:
        """``Factory._poll_pass``: claim queued jobs from the index, best first, while stations are free."""
        f.poll_scheduled = False
        if f.mode != "poll":
            return
        f.poll_scheduled = True
        self.at(self.t + self.rng.uniform(1.0, 4.0), self._poll, f)
        if f.alive and not f.draining and not f.claiming and f.free:
            f.claiming = True  # one pass at a time, as the puller awaits it
            self._send(f, "scan", None, lambda res, _slot, inc=f.inc: self._polled(f, inc, res))

    def _polled(self, f: SimFactory, inc: int, res) -> None:
        f.claiming = False
        if res == TIMEOUT or f.inc != inc:
            return
        self._poll_next(f, list(res))

    def _poll_next(self, f: SimFactory, ids: list[str]) -> None:
        if ids and f.free and f.alive and not f.draining:
            jid = ids.pop(0)
            self.stats["polled"] += 1
            self._claim(f, jid, f.free.pop(0), lambda: self._poll_next(f, ids))

    def _claim(self, f: SimFactory, jid: str, station: int, then: Callable) -> None:
        """``Factory._claim_and_run``: read, check, claim with a compare-and-set on that revision."""
        f.claiming = True
        inc = f.inc
        self._send(f, "get", jid, lambda res, _slot: self._claim_read(f, inc, jid, station, then, res))

    def _claim_skip(self, f: SimFactory, inc: int, station: int, then: Callable, why: str) -> None:
        self.stats[f"claim_{why}"] += 1
        if f.inc != inc:
            return
        f.claiming = False
        self._release(f, station)
        then()

    def _claim_read(self, f: SimFactory, inc: int, jid: str, station: int, then: Callable, res) -> None:
        if res == TIMEOUT or res is None:
            return self._claim_skip(f, inc, station, then, "error" if res == TIMEOUT else "gone")
        rec, rev, ts, store_now = res
        if rec.stage is not Stage.QUEUED:
            return self._claim_skip(f, inc, station, then, "skipped")
        if rec.backoff_s and store_now < ts + rec.backoff_s:
            return self._claim_skip(f, inc, station, then, "backoff")
        # As production: a job with no lock to take first is claimed straight into building.
        out = protocol.claim(rec, f.id, station, self.t + f.clock_offset, start=not rec.manifest.lock)
        sent_at = self.t
        self._send(f, "update", jid,
                   lambda r, slot: self._claimed(f, inc, jid, station, then, out, r, slot, sent_at),
                   out.record, rev, audit=1)

    def _claimed(self, f: SimFactory, inc: int, jid: str, station: int, then: Callable, out: protocol.Outcome,
                 res, slot: int | None, sent_at: float = 0.0) -> None:
        if res == TIMEOUT or res == CONFLICT:
            return self._claim_skip(f, inc, station, then, "timeout" if res == TIMEOUT else "conflict")
        f.claiming = False
        rec = out.record
        run = SimRun(jid, rec.epoch, station, res, rec)
        run.lease_sent_at = sent_at
        f.runs[(jid, rec.epoch)] = run
        self.granted[(jid, rec.epoch)] += 1
        if self.granted[(jid, rec.epoch)] == 2:
            self._violation("epoch_handed_out_twice", jid,
                            f"epoch {rec.epoch} was handed out again (to {f.id}): the store lost the first claim")
        started = rec.stage == Stage.BUILDING  # the claim started the run (no lock)
        self.emit(EventRecord(kind="claimed", at=self.t + f.clock_offset, job=jid, stage_from="queued",
                              stage_to=str(rec.stage), epoch=rec.epoch, factory=f.id, actor=f.id, reason=out.reason,
                              data={"station": station, "attempt": rec.attempt,
                                    **({"started": True} if started else {})}), slot)
        self.note(f.id, "claimed", jid, rec.epoch)
        if started:
            # No start write and no ``started`` event: the claim was it (its ``claimed`` says
            # ``started``), and the lease counts from when it was sent.
            self._started(f, inc, run, out, None, with_claim=True)
        elif rec.manifest.lock:
            lock_sent_at = self.t
            self._send(f, "lock", rec.manifest.lock, lambda r, _s: self._locked(f, inc, run, r, lock_sent_at),
                       (run.job, run.epoch, f.id))
        else:
            self._start(f, inc, run)
        then()

    def _start(self, f: SimFactory, inc: int, run: SimRun) -> None:
        self._write(f, run, lambda r: protocol.start(r, f.id, run.epoch, self.t + f.clock_offset), True,
                    lambda res, slot: self._started(f, inc, run, res, slot))

    # -- factory: locks (``Factory._acquire_lock``) ------------------------------------------------------

    def _lock_land(self, name: str, job: str, epoch: int, fid: str) -> str:
        """The lock taken (``"ok"``) or the job holding it, decided where the request lands (the
        acquisition's reads and compare-and-set in one step)."""
        cur = self.locks.get(name)
        if cur is None or cur[:2] == (job, epoch) or self._lock_free(cur):
            self.locks[name] = (job, epoch, fid, self.t)
            return "ok"
        return cur[0]

    def _lock_free(self, cur: tuple[str, int, str, float]) -> bool:
        """A lock is free when released, or when its holder is known stopped
        (:func:`protocol.lock_verdict`): its attempt at the lock's epoch has reported, or the
        lock entry (rewritten on every successful renewal) is older than ``lease_ttl_s +
        fence_margin_s`` (broker time).
        ``lock_free_on_epoch`` (main's rule) frees it as soon as the record left that epoch."""
        job, epoch, _, ts = cur
        got = self.store.get(job)
        rec = None if got is None else got[0]
        if self.broken == "lock_free_on_epoch":
            return rec is None or rec.stage not in LEASED or rec.epoch != epoch
        # Production's own rule, the one the factory and the stale-lock cleaner decide by.
        return protocol.lock_verdict(LockRecord(lock="?", job=job, epoch=epoch, factory=cur[2]), rec, self.t - ts,
                                     lease_ttl_s=self.settings.lease_ttl_s, fence_margin_s=self.margin_s).free

    def _locked(self, f: SimFactory, inc: int, run: SimRun, res, sent_at: float) -> None:
        if f.inc != inc:
            return
        if res == "ok":
            run.lock = run.record.manifest.lock
            run.lock_sent_at = sent_at
            return self._start(f, inc, run)
        holder = "?" if res == TIMEOUT else res
        self.stats["lock_wait"] += 1
        self.emit(EventRecord(kind="lock_wait", at=self.t + f.clock_offset, job=run.job, epoch=run.epoch,
                              factory=f.id, actor=f.id, reason=f"lock held by job {holder}"))
        run.engine_done = True  # nothing started
        self._hand_back(f, inc, run, f"lock held by job {holder}", backoff_s=1.0)

    def _release(self, f: SimFactory, station: int) -> None:
        f.free.append(station)
        f.free.sort()

    # -- factory: the fenced write (``Factory._write``) -------------------------------------------------

    def _write(self, f: SimFactory, run: SimRun, decide: Callable, audit: bool, done: Callable) -> None:
        """``Factory._write``: drive :class:`lease.FencedWrite` (the machine production drives)
        with this simulation's requests. ``decide(record) -> record | Outcome`` under the fence.
        ``done(result, slot)`` gets the new record (or Outcome), None (fenced), TIMEOUT (a
        read unanswered too: production's exception), CONFLICT (retries exhausted) or ILLEGAL.
        One write at a time per run, like production's ``write_lock``; a crash (a new
        incarnation) drops the write wherever it is, as it kills production's coroutine."""
        if run.ended:
            return done(None, None)  # production's _execute has returned: nothing writes for this run
        if run.writing:
            run.write_q.append((decide, audit, done))
            return
        run.writing = True
        t0 = self.t  # before any try is sent: conservative for the self-fence
        machine = lease.FencedWrite(run.record, run.revision, decide, stopped=lambda: run.fenced,
                                    jitter=self.random, encode=_same, decode=_same)
        sent: dict[int, Req] = {}
        self._write_act(f, f.inc, run, machine, audit, done, sent, lambda: machine.start(), t0)

    def _write_act(self, f: SimFactory, inc: int, run: SimRun, machine: lease.FencedWrite, audit: bool, done: Callable,
                   sent: dict[int, Req], feed: Callable[[], lease.Action], t0: float = 0.0) -> None:
        """Feed one result into the machine (``feed``) and perform the action it returns."""
        if f.inc != inc:
            return
        try:
            act = feed()
        except IllegalTransition:
            # Production lets this escape _write (only Fenced is handled there): the caller's run
            # ends with a logged error. Only a broken variant can get here.
            self.stats["illegal_transition"] += 1
            return self._write_done(f, inc, run, done, ILLEGAL)
        step = self._write_act
        if isinstance(act, lease.Send):
            def on_update(res, slot):
                if res == TIMEOUT:
                    self.stats["write_unanswered"] += 1
                    return step(f, inc, run, machine, audit, done, sent, t0=t0, feed=machine.no_answer)
                if res == CONFLICT:
                    self.stats["write_conflicts"] += 1
                    return step(f, inc, run, machine, audit, done, sent, t0=t0, feed=machine.conflict)
                step(f, inc, run, machine, audit, done, sent, t0=t0, feed=lambda: machine.stored(res))

            sent[act.attempt] = self._send(f, "update", run.job, on_update, act.data, act.last, audit=audit)
        elif isinstance(act, lease.Read):
            def on_fresh(res, _slot):
                if res == TIMEOUT:
                    return step(f, inc, run, machine, audit, done, sent, t0=t0, feed=machine.read_unanswered)
                step(f, inc, run, machine, audit, done, sent, t0=t0,
                     feed=lambda: machine.read(None) if res is None else machine.read(res[0], res[1]))

            self._send(f, "get", run.job, on_fresh)
        elif isinstance(act, lease.BackOff):
            self.stats["write_backoffs"] += 1
            self.at(self.t + act.delay_s, step, f, inc, run, machine, audit, done, sent, machine.backed_off, t0)
        elif isinstance(act, lease.Done):
            slot = None
            if act.revision is not None:
                run.revision, run.record = act.revision, act.record
                if t0 > run.lease_sent_at and act.record.stage in LEASED:  # the lease runs from t0 on
                    run.lease_sent_at = t0
                    self._rearm(f, run)
                req = sent[act.attempt]
                slot, req.slot = req.slot, None  # the landed write's audit slot goes to its event
                if act.learned:
                    self.stats["write_learned"] += 1
                    self.note(f.id, "write_learned", run.job, run.epoch)
            self._write_done(f, inc, run, done, act.outcome or act.record, slot)
        elif isinstance(act, lease.Fenced):
            if act.noticed:
                self._fenced(f, run, act.record)
            self._write_done(f, inc, run, done, None)
        else:
            assert isinstance(act, lease.GiveUp), act
            self._write_done(f, inc, run, done, TIMEOUT if act.reason == "unanswered" else CONFLICT)

    def _write_done(self, f: SimFactory, inc: int, run: SimRun, done: Callable, result, slot: int | None = None) -> None:
        run.writing = False
        if f.inc != inc:
            return
        done(result, slot)
        if run.write_q and not run.writing:
            decide, audit, nxt = run.write_q.pop(0)
            self._write(f, run, decide, audit, nxt)

    def _fenced(self, f: SimFactory, run: SimRun, rec: JobRecord | None) -> None:
        """``Factory._fenced``: stop the run and say so; its result will be quarantined."""
        if run.fenced:
            return
        run.fenced = True
        self.stats["fenced"] += 1
        self.note(f.id, "fenced", run.job, run.epoch)
        self._publish_fenced(f, run.job, run.epoch, rec, f"write with stale epoch {run.epoch} refused")
        if not run.engine_done:  # the engine is killed at once (run.cancel)
            self._kill(run, ENGINE_KILL_S)

    def _publish_fenced(self, f: SimFactory, jid: str, epoch: int, rec: JobRecord | None, why: str) -> None:
        if f.partition_until > self.t:
            self.stats["event_lost"] += 1  # production's _event logs a failed publish and moves on
            return
        self.emit(EventRecord(kind="fenced", at=self.t + f.clock_offset, job=jid, epoch=epoch, factory=f.id,
                              actor=f.id, reason=why,
                              data={"held_epoch": epoch, "record_epoch": rec.epoch if rec else None}))

    # -- factory: running a job (``Factory._execute``) --------------------------------------------------

    def _started(self, f: SimFactory, inc: int, run: SimRun, res, slot: int | None, with_claim: bool = False) -> None:
        if not isinstance(res, protocol.Outcome):
            return self._end_run(f, run)  # fenced, or an error: production logs it and frees the station
        # As Execute._execute_attempt: a run the claim started has no event of its own (the
        # ``claimed`` said it); a start write has its ``started``.
        if not with_claim:
            self.emit(EventRecord(kind="started", at=self.t + f.clock_offset, job=run.job, stage_from="assigned",
                                  stage_to="building", epoch=run.epoch, factory=f.id, actor=f.id,
                                  reason=res.reason), slot)
        # Stopped while the start was in flight (a drain, a fence): production's run.cancel is
        # set before the engine is spawned, so it is killed at once.
        if run.engine_done:
            return
        if run.fenced:
            return self._engine_end(f, inc, run)
        if self.broken != "unfenced_engines" and self.t >= self._fence_deadline(f, run):
            # The reply came too late (a stalled loop, a pause): the self-fence deadline has
            # passed, so the engine is not started at all (the supervisor checks before spawning).
            run.fenced = run.stop_renewing = True
            self.stats["self_fenced_before_start"] += 1
            return self._quarantine(f, run, "self-fenced before the engine started")
        spec = self.specs[run.job]
        eng = SimEngine(run, f.id, inc, self.t + self.rng.uniform(*spec.run_s))
        eng.pause_end = f.paused_until if f.paused_until else -1.0
        run.engine = eng
        if eng.lock is not None:
            for other in self.engines.values():
                if other.lock == eng.lock:
                    paused = eng if eng.pause_end >= eng.lease_sent_at else other
                    self._side_effect_overlap(paused, f"lock {eng.lock!r}: engine of {other.job} epoch "
                                                      f"{other.epoch} still runs as {run.job} epoch {run.epoch} starts",
                                              "lock_shared", run.job)
        self.engines[(run.job, run.epoch)] = eng
        self.stats["engines"] += 1
        self.at(eng.end_at, self._engine_exit, eng, eng.end_at)
        self._arm_self_fence(f, run)
        self._refresh_lock(f, inc, run)
        self.at(self.t + self.settings.lease_renew_s, self._renew, f, inc, run)

    def _renew(self, f: SimFactory, inc: int, run: SimRun) -> None:
        if f.inc != inc or run.stop_renewing or run.fenced:
            return
        if f.frozen_until > self.t:
            return self.at(f.frozen_until, self._renew, f, inc, run)
        # Like production: re-checked under the write lock, so no renewal follows the result.
        self._write(f, run, lambda r: None if run.stop_renewing
                    else protocol.renew(r, f.id, run.epoch, self.t + f.clock_offset), False,
                    lambda res, _slot: self._renewed(f, inc, run, res))

    def _renewed(self, f: SimFactory, inc: int, run: SimRun, res=None) -> None:
        if isinstance(res, JobRecord) and not run.fenced and not run.stop_renewing:
            self._refresh_lock(f, inc, run)
        # Errors are logged and the loop goes on: the lease may expire, and the epoch decides.
        if not run.stop_renewing and not run.fenced:
            self.at(self.t + self.settings.lease_renew_s, self._renew, f, inc, run)

    def _refresh_lock(self, f: SimFactory, inc: int, run: SimRun) -> None:
        """The lock entry is re-written after every successful lease write (start, renewals): its
        age tells others the holder has stopped. A refresh that lands moves the self-fence on."""
        if run.lock is None:
            return
        sent_at = self.t

        def landed(res, _slot):
            if f.inc == inc and res is True and sent_at > run.lock_sent_at:
                run.lock_sent_at = sent_at
                self._rearm(f, run)

        self._send(f, "lock_refresh", run.lock, landed, (run.job, run.epoch))

    def _engine_end(self, f: SimFactory, inc: int, run: SimRun) -> None:
        """The factory's loop learns that the run's engine has exited (or was stopped)."""
        if f.inc != inc or run.engine_done:
            return
        if f.frozen_until > self.t:
            return self.at(f.frozen_until, self._engine_end, f, inc, run)
        run.engine_done = True  # renewals go on through the upload (production's stop_renewing)
        if run.draining or run.fenced:
            run.stop_renewing = True
        if run.draining and not run.fenced:
            return self._hand_back(f, inc, run, "factory draining")
        if run.fenced:
            return self._quarantine(f, run, "lease lost while running (stale epoch)")
        self._push(f, inc, run)
        spec = self.specs[run.job]
        failure = self.rng.choice(spec.fail_classes) if self.rng.random() < spec.fail_p else None
        upload_s = self.rng.uniform(0.01, 0.5)
        if self.faulty() and self.rng.random() < self.fc.slow_report:
            upload_s = self.rng.uniform(*self.fc.slow_report_s)
            self.stats["slow_report"] += 1
        self.at(self.t + upload_s, self._report, f, inc, run, failure)

    def _push(self, f: SimFactory, inc: int, run: SimRun) -> None:
        """The run pushes its branch, fenced just before (``gigafactory fence``): by a compare-and-set
        renewal (the leader decides), or, broken (``fence_from_read``), by a read that a lagging
        replica may answer. A push whose fence was decided on a view the leader did not hold at
        that moment is a ``fence_from_stale_read``."""
        if self.broken != "fence_from_read":
            def renewed(res, _slot):
                if isinstance(res, JobRecord | protocol.Outcome):
                    self.stats["pushes"] += 1  # the leader stored our renewal: we held the lease
            return self._write(f, run, lambda r: protocol.renew(r, f.id, run.epoch, self.t + f.clock_offset),
                               False, renewed)

        def read(res, _slot):
            if f.inc != inc or res == TIMEOUT:
                return
            rec, truth = res
            try:
                protocol.check_fence(rec, run.job, f.id, run.epoch)
            except protocol.Fenced:
                return
            self.stats["pushes"] += 1
            if not truth:
                self._violation("fence_from_stale_read", run.job,
                                f"{f.id} pushed under epoch {run.epoch}: a replica's read said it held the lease, "
                                f"the leader's record did not")

        self._send(f, "follower_get", run.job, read, (f.id, run.epoch))

    def _report(self, f: SimFactory, inc: int, run: SimRun, failure: FailureClass | None) -> None:
        """``Factory._report``: the result under the epoch, or into the outbox if the broker does not answer."""
        if f.inc != inc:
            return
        if f.frozen_until > self.t:
            return self.at(f.frozen_until, self._report, f, inc, run, failure)
        detail = f"sim: {failure or 'passed'}"
        run.stop_renewing = True
        self._write(f, run, self._finisher(f, run.epoch, failure, detail), True,
                    lambda res, slot: self._reported(f, run, failure, detail, res, slot))

    def _finisher(self, f: SimFactory, epoch: int, failure: FailureClass | None, detail: str) -> Callable:
        def decide(rec: JobRecord) -> protocol.Outcome:
            now = self.t + f.clock_offset
            if self.broken == "no_fence":
                return _finish_unfenced(rec, f.id, epoch, now, failure=failure, detail=detail)
            return protocol.finish(rec, f.id, epoch, now, failure=failure, detail=detail)

        return decide

    def _reported(self, f: SimFactory, run: SimRun, failure: FailureClass | None, detail: str, res, slot) -> None:
        if isinstance(res, protocol.Outcome):
            self._emit_finished(f, run, failure, res, slot)
        elif res is None:
            self._quarantine(f, run, "result refused: stale epoch")
            return
        elif res == ILLEGAL:
            self.stats["result_lost"] += 1
        else:  # TIMEOUT or CONFLICT: production keeps it in the outbox until the broker answers
            self.stats["outbox_put"] += 1
            self.note(f.id, "outbox_put", run.job, run.epoch)
            f.outbox.append(SimOutboxItem(run.job, run.epoch, run.station, failure, detail))
            self._schedule_flush(f)
        self._end_run(f, run)

    def _emit_finished(self, f: SimFactory, run: SimRun, failure: FailureClass | None, out: protocol.Outcome,
                       slot: int | None) -> None:
        self.stats["finished"] += 1
        self.emit(EventRecord(kind="finished", at=self.t + f.clock_offset, job=run.job, epoch=run.epoch,
                              factory=f.id, actor=f.id, stage_from="building", stage_to=str(out.record.stage),
                              reason=out.reason, data={"outcome": str(failure or "passed")}), slot)
        self.note(f.id, f"finished:{out.record.stage}", run.job, run.epoch)

    def _quarantine(self, f: SimFactory, run: SimRun, why: str) -> None:
        self.stats["quarantined"] += 1
        self.note(f.id, "quarantined", run.job, run.epoch)
        self._end_run(f, run)

    def _end_run(self, f: SimFactory, run: SimRun) -> None:
        if run.ended:
            return
        run.ended = True
        run.engine_done = True
        run.stop_renewing = True
        if run.lock is not None:
            self._send(f, "lock_release", run.lock, lambda *_: None, (run.job, run.epoch))
        if f.runs.get((run.job, run.epoch)) is run:
            del f.runs[(run.job, run.epoch)]
            self._release(f, run.station)
        if f.draining and not f.runs:
            self._down(f, f.inc)
        else:
            self._fetch(f)

    def _hand_back(self, f: SimFactory, inc: int, run: SimRun, reason: str, backoff_s: float = 0.0) -> None:
        def done(res, slot):
            if isinstance(res, protocol.Outcome):
                self.emit(EventRecord(kind="handed_back", at=self.t + f.clock_offset, job=run.job, epoch=run.epoch,
                                      factory=f.id, actor=f.id, stage_to="queued", reason=reason), slot)
                self.note(f.id, "handed_back", run.job, run.epoch)
                run.fenced = True  # the lease is given up: nothing more may be written under it
            self._end_run(f, run)

        self._write(f, run, lambda r: protocol.hand_back(r, f.id, run.epoch, self.t + f.clock_offset, reason,
                                                         backoff_s), True, done)

    # -- factory: the outbox (``Factory._flush_item``) ---------------------------------------------------

    def _schedule_flush(self, f: SimFactory) -> None:
        if f.alive and not f.flush_scheduled and f.outbox:
            f.flush_scheduled = True
            self.at(self.t + 1.0, self._flush, f, f.inc)

    def _flush(self, f: SimFactory, inc: int) -> None:
        f.flush_scheduled = False
        if f.inc != inc or not f.alive:
            return  # a restart schedules its own flush
        if f.flushing or (f.partition_drop and f.partition_until > self.t):
            return self._schedule_flush(f)  # not connected: the loop checks again in a second
        f.flushing = True
        self._flush_next(f, inc, list(f.outbox))

    def _flush_next(self, f: SimFactory, inc: int, items: list[SimOutboxItem]) -> None:
        if f.inc != inc:
            return
        if not items:
            f.flushing = False
            return self._schedule_flush(f)
        item = items.pop(0)
        item.attempts += 1
        if item.attempts > MAX_OUTBOX_ATTEMPTS:
            self.stats["outbox_given_up"] += 1
            f.outbox.remove(item)
            return self._flush_next(f, inc, items)
        self._send(f, "get", item.job, lambda res, _slot: self._flush_read(f, inc, item, items, res))

    def _flush_read(self, f: SimFactory, inc: int, item: SimOutboxItem, items: list[SimOutboxItem], res) -> None:
        if res == TIMEOUT:  # the round stops at the first error (the exception ends _flush_outbox)
            f.flushing = False
            return self._schedule_flush(f)
        rec, rev = (None, 0) if res is None else (res[0], res[1])
        if self.broken != "no_fence":
            try:
                protocol.check_fence(rec, item.job, f.id, item.epoch)
            except protocol.Fenced:
                if rec is not None and protocol.already_applied(rec, item.epoch, str(item.failure or "passed")):
                    # ``Factory._flush_item``: the write had landed, its reply was lost.
                    f.outbox.remove(item)
                    self.stats["report_confirmed"] += 1
                    self.emit(EventRecord(kind="report_confirmed", at=self.t + f.clock_offset, job=item.job,
                                          epoch=item.epoch, factory=f.id, actor=f.id,
                                          reason=f"outbox result of epoch {item.epoch} was already applied"))
                    return self._flush_next(f, inc, items)
                self.stats["fenced"] += 1
                self.stats["quarantined"] += 1
                self.note(f.id, "outbox_fenced", item.job, item.epoch)
                f.outbox.remove(item)
                self._publish_fenced(f, item.job, item.epoch, rec,
                                     f"outbox result with stale epoch {item.epoch} refused; quarantined")
                return self._flush_next(f, inc, items)
        if rec is None:
            f.outbox.remove(item)
            return self._flush_next(f, inc, items)
        run = SimRun(item.job, item.epoch, item.station, rev, rec)
        run.engine_done = True  # no engine behind an outbox item: nothing to kill if it is fenced

        def done(res, slot):
            if isinstance(res, protocol.Outcome):
                self._emit_finished(f, run, item.failure, res, slot)
                f.outbox.remove(item)
            elif res is None:
                self.stats["quarantined"] += 1
                self.note(f.id, "quarantined", item.job, item.epoch)
                f.outbox.remove(item)
            elif res != ILLEGAL:  # TIMEOUT or CONFLICT: stays pending, next round
                f.flushing = False
                return self._schedule_flush(f)
            self._flush_next(f, inc, items)

        self._write(f, run, self._finisher(f, item.epoch, item.failure, item.detail), True, done)

    # -- engines, the side-effect ledger and self-fencing ----------------------------------------------

    def _engine_exit(self, eng: SimEngine, end_at: float) -> None:
        """The engine finishes its work (its last side effect) and exits."""
        if not eng.alive or end_at != eng.end_at:
            return  # killed, or its end moved by a pause
        self.stats["side_effects"] += 1
        self._engine_gone(eng)

    def _engine_gone(self, eng: SimEngine) -> None:
        """The engine process is gone (exited, or killed): no side effect after this."""
        if not eng.alive:
            return
        eng.alive = False
        if self.engines.get((eng.job, eng.epoch)) is eng:
            del self.engines[(eng.job, eng.epoch)]
        if eng.run is not None:
            f = self.by_id[eng.fid]
            self._engine_end(f, eng.inc, eng.run)

    def _kill(self, run: SimRun, within_s: float) -> None:
        """Stop the run's engine (``run.cancel``); the loop then learns it ended. A run without a
        live engine has nothing to stop (its start was refused, or the exit is being handled)."""
        if run.engine is not None and run.engine.alive:
            self.at(self.t + within_s, self._engine_gone, run.engine)

    def _arm_self_fence(self, f: SimFactory, run: SimRun) -> None:
        """The supervisor's deadline: ``lease_ttl_s - margin`` after the last successful lease write
        was sent, on the factory's own monotonic clock (which runs off by ``f.drift``)."""
        if self.broken == "unfenced_engines":
            return
        self.at(self._fence_deadline(f, run), self._self_fence, f, f.inc, run, run.fence_base())

    def _rearm(self, f: SimFactory, run: SimRun) -> None:
        if run.engine is not None and run.engine.alive:
            run.engine.lease_sent_at = run.fence_base()
            self._arm_self_fence(f, run)

    def _fence_deadline(self, f: SimFactory, run: SimRun) -> float:
        """Sim time at which ``f``'s monotonic clock says ``lease_ttl_s - margin`` have passed
        since the run's last successful lease write was sent."""
        return run.fence_base() + (self.settings.lease_ttl_s - self.margin_s) / (1.0 + f.drift)

    def _self_fence(self, f: SimFactory, inc: int, run: SimRun, armed_for: float) -> None:
        eng = run.engine
        if f.inc != inc or run.fence_base() != armed_for or eng is None or not eng.alive or run.fenced:
            return
        if f.paused_until > self.t:  # SIGSTOP stops the supervisor too
            return self.at(f.paused_until, self._self_fence, f, inc, run, armed_for)
        if self.broken == "deadline_on_loop" and f.frozen_until > self.t:
            return self.at(f.frozen_until, self._self_fence, f, inc, run, armed_for)
        run.fenced = True
        run.stop_renewing = True
        self.stats["self_fenced"] += 1
        self.note(f.id, "self_fenced", run.job, run.epoch)
        if f.partition_until <= self.t:
            self.emit(EventRecord(kind="self_fenced", at=self.t + f.clock_offset, job=run.job, epoch=run.epoch,
                                  factory=f.id, actor=f.id,
                                  reason=f"no successful renewal for {self.t - armed_for:.1f}s: engine stopped"))
        self.at(self.t + self.rng.uniform(0.0, self.kill_grace_s), self._engine_gone, eng)  # SIGTERM, SIGKILL

    def _lease_lost(self, jid: str, epoch: int) -> None:
        """A reaper took the lease of ``epoch``: no engine of that epoch may still run."""
        eng = self.engines.get((jid, epoch))
        if eng is not None:
            self._side_effect_overlap(eng, f"engine of epoch {epoch} on {eng.fid} still running when its lease "
                                           f"was reaped", "side_effect_after_lease_lost", jid)

    def _side_effect_overlap(self, eng: SimEngine, detail: str, invariant: str, jid: str) -> None:
        if eng.pause_end >= eng.lease_sent_at:
            # Its holder was paused (SIGSTOP) since its last renewal: the documented window.
            self.stats["pause_window"] += 1
            return
        self._violation(invariant, jid, detail)

    def _violation(self, invariant: str, jid: str | None, detail: str) -> None:
        assert invariant in SIM_INVARIANTS
        if len(self.found) < invariants.MAX_VIOLATIONS:
            self.found.append(invariants.Violation(invariant, jid, detail))

    # -- faults -----------------------------------------------------------------------------------------

    def _pause(self, f: SimFactory, duration_s: float) -> None:
        """SIGSTOP, then SIGCONT: the loop, the supervisor and the engines all stand still."""
        if not f.alive:
            return
        self.stats["pauses"] += 1
        self.note(f.id, "pause")
        end = self.t + duration_s
        f.paused_until = max(f.paused_until, end)
        f.frozen_until = max(f.frozen_until, end)
        for run in f.runs.values():
            eng = run.engine
            if eng is not None and eng.alive:
                eng.end_at += duration_s
                eng.pause_end = end
                self.at(eng.end_at, self._engine_exit, eng, eng.end_at)

    def _loop_stall(self, f: SimFactory, duration_s: float) -> None:
        """The event loop is busy (CPU-bound work on it); engines and the supervisor go on."""
        if not f.alive:
            return
        self.stats["loop_stalls"] += 1
        self.note(f.id, "loop_stall")
        f.frozen_until = max(f.frozen_until, self.t + duration_s)

    def _power_loss(self, outage_s: float) -> None:
        """The broker's node loses power: its clients see an outage; a non-fsynced store also loses
        every write since its last sync, so revisions and epochs are handed out again."""
        self.stats["power_losses"] += 1
        self.note("broker", "power_loss")
        lost = self.store.roll_back()
        self.stats["writes_rolled_back"] += lost
        for f in self.factories:
            self._partition(f, outage_s, True)

    def _sync(self) -> None:
        self.store.journal.clear()
        if not self.done:
            self.at(self.t + UNSYNCED_SYNC_INTERVAL_S, self._sync)


    def _crash(self, f: SimFactory) -> None:
        if not f.alive:
            return
        self.stats["crashes"] += 1
        self.note(f.id, "crash")
        self._down(f, f.inc, crashed=True)

    def _down(self, f: SimFactory, inc: int, crashed: bool = False) -> None:
        if f.inc != inc or not f.alive:
            return
        f.alive = False
        f.inc += 1  # every callback of the old process is dropped
        for eng in list(self.engines.values()):
            if eng.fid == f.id and eng.run is not None:  # an engine of this process
                eng.run = None
                if self.broken != "unfenced_engines":  # parent-death signal: the group dies with it
                    self.at(self.t + PARENT_DEATH_S, self._engine_gone, eng)
                else:
                    self.stats["leftover_engines"] += 1
        f.runs.clear()
        f.claiming = f.waiting = f.flushing = f.draining = f.flush_scheduled = False
        f.free = list(range(f.stations))
        if not crashed:
            self.note(f.id, "down")
        self.at(self.t + self.rng.uniform(*self.fc.restart_s), self._restart, f)

    def _restart(self, f: SimFactory) -> None:
        f.alive = True
        f.inc += 1
        self.note(f.id, "restart")
        self._fetch(f)
        self._schedule_flush(f)

    def _drain(self, f: SimFactory) -> None:
        """SIGTERM: stop claiming, let runs finish for ``drain_timeout_s``, hand back the rest."""
        if not f.alive or f.draining:
            return
        self.stats["drains"] += 1
        self.note(f.id, "drain")
        f.draining = True
        if not f.runs:
            return self._down(f, f.inc)
        self.at(self.t + self.settings.drain_timeout_s, self._drain_deadline, f, f.inc)

    def _drain_deadline(self, f: SimFactory, inc: int) -> None:
        if f.inc != inc:
            return
        for run in list(f.runs.values()):
            run.draining = True
            if run.engine is not None and run.engine.alive:
                self._engine_gone(run.engine)  # stopped (SIGTERM) before it is handed back
            self._engine_end(f, inc, run)
        self.at(self.t + 10.0, self._down, f, inc)  # production waits at most 10 s more

    def _partition(self, f: SimFactory, duration_s: float, drop: bool) -> None:
        self.stats["partitions"] += 1
        self.note(f.id, "partition_drop" if drop else "partition_stall")
        end = self.t + duration_s
        if end > f.partition_until:
            f.partition_until, f.partition_drop = end, drop
        self.at(end, self._heal, f)

    def _heal(self, f: SimFactory) -> None:
        if f.partition_until <= self.t:
            self.note(f.id, "healed")
            self._fetch(f)
            self._schedule_flush(f)

    def _clock_jump(self, f: SimFactory, by_s: float) -> None:
        self.stats["clock_jumps"] += 1
        self.note(f.id, "clock_jump")
        f.clock_offset += by_s


def _holds(rec: JobRecord, factory: str, epoch: int) -> bool:
    """The record is leased to ``factory`` at ``epoch`` (what a fence must establish)."""
    return rec.stage in LEASED and rec.lease is not None and rec.lease.factory == factory and rec.epoch == epoch


def _same(value):
    """The store keeps records, not bytes: the fenced write compares records (equal records have
    equal encodings), so its encode and decode are the identity here."""
    return value


def _epoch_blind_fence(rec: JobRecord | None, job_id: str, factory: str, epoch: int) -> JobRecord:
    """``protocol.check_fence`` without its epoch test: the ``epoch_blind_fence`` variant."""
    if rec is None or rec.lease is None or rec.lease.factory != factory or rec.stage not in LEASED:
        raise protocol.Fenced(job_id, factory, epoch, rec)
    return rec


def _finish_unfenced(rec: JobRecord, factory: str, epoch: int, now: float, **kw) -> protocol.Outcome:
    """``protocol.finish`` with its fence removed: the ``no_fence`` variant, for testing the checker.
    The simulation is single-threaded, so swapping the module's ``check_fence`` for one call is safe."""
    saved = protocol.check_fence
    protocol.check_fence = lambda rec, *_: rec
    try:
        return protocol.finish(rec, factory, epoch, now, **kw)
    finally:
        protocol.check_fence = saved


# -- API -------------------------------------------------------------------------------------------


def simulate(
    seed: int,
    *,
    jobs: int = 20,
    factories: int = 4,
    stations: int = 2,
    coordinators: int = 2,
    faults: FaultConfig | None = None,
    settings: Settings | None = None,
    broken: str | None = None,
    limit_s: float = 4 * 3600.0,
    max_steps: int = 500_000,
    strict_audit: bool = False,
) -> SimResult:
    """Run one seeded schedule to quiescence and judge it with :func:`invariants.check`.

    ``jobs``, ``factories`` (each with ``stations``) and ``coordinators`` size the fleet;
    ``faults`` defaults to :class:`FaultConfig` (every fault on), ``FaultConfig.none()`` is a
    healthy fleet; ``settings`` defaults to :func:`sim_settings` (production timings);
    ``broken`` is None or one of :data:`BROKEN` (``epoch_blind_fence`` swaps the protocol module's
    ``check_fence`` for the run, and puts it back); ``limit_s`` (sim time) and ``max_steps``
    bound the run, and a run that hits them has not settled. ``strict_audit`` is passed to
    :func:`invariants.check` (a write that landed without its event becomes a violation).
    """
    sim = Sim(seed, jobs=jobs, factories=factories, stations=stations, coordinators=coordinators,
              faults=faults if faults is not None else FaultConfig(), settings=settings or sim_settings(),
              broken=broken, limit_s=limit_s, max_steps=max_steps)
    if broken == "epoch_blind_fence":
        # Every fenced write looks check_fence up in the protocol module at call time; the
        # simulation is single-threaded, so swapping it for one run and restoring it is safe.
        saved, protocol.check_fence = protocol.check_fence, _epoch_blind_fence
        try:
            settled = sim.run()
        finally:
            protocol.check_fence = saved
    else:
        settled = sim.run()
    records = {k: v[0] for k, v in sim.store.recs.items()}
    events = [e for e in sim.events if e is not None]
    report = invariants.check(records, events, submitted=set(sim.specs), acknowledged=sim.acknowledged,
                              allow_in_flight=False, strict_audit=strict_audit)
    per_key = Counter(r.manifest.idempotency_key for r in records.values() if r.manifest.idempotency_key)
    for key, n in per_key.items():
        if n > 1:
            sim._violation("one_job_per_key", sim.keyed.get(key), f"idempotency key {key!r} has {n} jobs")
    report.violations.extend(sim.found)
    stats = dict(sorted(sim.stats.items()))
    return SimResult(seed=seed, jobs=records, events=events, report=report, trace=sim.trace, stats=stats,
                     settled=settled, end_s=sim.t, steps=sim.steps, acknowledged=set(sim.acknowledged))


def run_many(seeds: range | list[int], **kw) -> list[int]:
    """The seeds whose run broke an invariant or did not settle (``kw`` as :func:`simulate`)."""
    return [seed for seed in seeds if not simulate(seed, **kw).ok]


# -- what the command line prints (the command itself: ``gigafactory chaos sim``, chaos/cli.py) -----


def parse_seed_range(text: str) -> range:
    """``START:STOP`` (like ``0:2000``) or one seed, as a range.

    :param text: what was given to ``--seeds``.
    :raises ValueError: naming what is expected.
    """
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            seeds = range(int(a), int(b))
        else:
            seeds = range(int(text), int(text) + 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a seed range: expected START:STOP (like 0:2000) or one seed") from None
    if len(seeds) == 0:
        raise ValueError(f"{text!r} is an empty seed range: STOP must be greater than START")
    return seeds


def parse_fault_setting(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` for one :class:`FaultConfig` field; a range is ``LOW:HIGH``.

    :param text: what was given to ``--fault``.
    :raises ValueError: naming the fields or the value expected.
    """
    fields = {f.name: f for f in dataclasses.fields(FaultConfig)}
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in fields:
        raise ValueError(f"{text!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
    try:
        if "tuple" in str(fields[name].type):
            low, high = raw.split(":", 1)
            return name, (float(low), float(high))
        return name, float(raw)
    except ValueError:
        raise ValueError(f"{text!r}: {name} takes a number"
                         + (" range LOW:HIGH" if "tuple" in str(fields[name].type) else "")) from None


SIM_DEFAULTS = {"jobs": 20, "factories": 4, "stations": 2, "coordinators": 2}
"""The fleet a run simulates unless told otherwise."""


def reproduce_flags(sizes: dict[str, int], no_faults: bool, faults: list[tuple[str, object]], broken: str | None,
                    strict_audit: bool) -> list[str]:
    """The options of a run other than its seeds, to print a command that reproduces one seed.

    :param sizes: ``jobs``, ``factories``, ``stations``, ``coordinators`` as run.
    :param no_faults: the run started from a healthy fleet.
    :param faults: the ``--fault`` settings, in order.
    :param broken: the deliberately broken variant, if any.
    :param strict_audit: the run required every stage to be audited.
    """
    out = [f"--{k}={v}" for k, v in sizes.items() if v != SIM_DEFAULTS[k]]
    if no_faults:
        out.append("--no-faults")
    out += [f"--fault={name}={value if not isinstance(value, tuple) else f'{value[0]:g}:{value[1]:g}'}"
            for name, value in faults]
    if broken:
        out.append(f"--broken={broken}")
    if strict_audit:
        out.append("--strict-audit")
    return out


def run_report(seeds: range, *, sizes: dict[str, int], no_faults: bool, faults: list[tuple[str, object]],
               broken: str | None, strict_audit: bool, as_json: bool, trace_rows: int) -> tuple[str, int]:
    """Simulate every seed and say what was found: the text (or JSON document) to print and the
    exit code (1 if any seed failed, else 0).

    :param seeds: the seeds to run.
    :param sizes: ``jobs``, ``factories``, ``stations``, ``coordinators``.
    :param no_faults: start from a healthy fleet (``faults`` then turns single faults on).
    :param faults: :class:`FaultConfig` fields to set, as ``(name, value)``.
    :param broken: a variant of :data:`BROKEN` (the checker must object), or None.
    :param strict_audit: also require every record's stage to be audited.
    :param as_json: one JSON document instead of text.
    :param trace_rows: trace rows of the first failing seed to print (text only).
    """
    config = FaultConfig.none() if no_faults else FaultConfig()
    config = dataclasses.replace(config, **dict(faults))
    kw = dict(**sizes, faults=config, broken=broken, strict_audit=strict_audit)
    t0 = time.perf_counter()
    failing: list[int] = []
    first: SimResult | None = None
    for seed in seeds:
        res = simulate(seed, **kw)
        if not res.ok:
            failing.append(seed)
            first = first or res
    elapsed_s = time.perf_counter() - t0
    n = len(seeds)
    rate = n / elapsed_s if elapsed_s > 0 else float("inf")
    code = 1 if failing else 0
    if as_json:
        return msgspec.json.encode({
            "seeds": [seeds.start, seeds.stop], "runs": n, "failing": failing,
            "elapsed_s": round(elapsed_s, 3), "seeds_per_s": round(rate, 1), "broken": broken,
            "first_failure": None if first is None else {
                "seed": first.seed, "settled": first.settled, "digest": first.digest(),
                "report": msgspec.json.decode(first.report.to_json()), "stats": first.stats,
            },
        }).decode(), code
    lines = [f"{n} seeds in {elapsed_s:.2f}s ({rate:.0f} seeds/s); {len(failing)} failing"]
    if failing:
        shown = ", ".join(map(str, failing[:50])) + (" ..." if len(failing) > 50 else "")
        lines.append(f"failing seeds: {shown}")
        assert first is not None
        lines.append(first.summary())
        flags = "".join(f" {a}" for a in reproduce_flags(sizes, no_faults, faults, broken, strict_audit))
        lines.append(f"reproduce: gigafactory chaos sim --seeds {first.seed}{flags}")
        if trace_rows:
            lines.append(first.trace_text(trace_rows))
    return "\n".join(lines), code
