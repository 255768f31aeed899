"""The claim protocol as pure functions over job records (no I/O).

Every function takes the record as read (at some revision), and returns the record to write
back with a compare-and-set on that revision, or raises. The broker code around these
functions is thin: read, decide here, ``update(key, value, last=revision)``. That keeps the
protocol testable with plain values, and lets the deterministic simulation drive exactly the
code that runs in production.

Fencing: a factory's every write after its claim goes through :func:`check_fence`, which
refuses unless the record still names that factory as the lease holder at that epoch. The
epoch is bumped by every claim, reclaim, requeue and cancel, so a holder whose lease was
taken away can never write again: its compare-and-set either loses on the revision, or, on
a fresh read, fails the fence.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .lifecycle import LEASED, Event, Stage, transition
from .manifest import FailureClass, Reviewers, parse_duration
from .records import MAX_ATTEMPTS_KEPT, AttemptRecord, Attribution, JobRecord, Lease, LockRecord, Usage, WorkspaceResult

BACKOFF_CAP_S = 3600.0


class NotClaimable(Exception):
    """The job cannot be claimed now (someone else has it, or it is not queued)."""


class Fenced(Exception):
    """A write by a holder whose lease was taken away (stale epoch). Never retried."""

    def __init__(self, job_id: str, factory: str, held_epoch: int, rec: JobRecord | None) -> None:
        now = f"epoch {rec.epoch}, stage {rec.stage}, holder {rec.lease.factory if rec and rec.lease else None}" if rec else "gone"
        super().__init__(f"job {job_id}: {factory} holds stale epoch {held_epoch}; record is at {now}")
        self.job_id, self.factory, self.held_epoch, self.record = job_id, factory, held_epoch, rec


@dataclass(frozen=True, slots=True)
class Outcome:
    """A transition to write, and the event that explains it."""

    record: JobRecord
    event: Event
    stage_from: Stage
    reason: str


def _replace(rec: JobRecord, **kw) -> JobRecord:
    return msgspec.structs.replace(rec, **kw)


def _move(rec: JobRecord, event: Event, now: float, reason: str, **kw) -> Outcome:
    to = transition(rec.stage, event, rec.id)
    return Outcome(_replace(rec, stage=to, reason=reason, updated_at=now, **kw), event, rec.stage, reason)


def _update_attempt(rec: JobRecord, epoch: int, **kw) -> list[AttemptRecord]:
    out = list(rec.attempts)
    for i in range(len(out) - 1, -1, -1):
        if out[i].epoch == epoch:
            out[i] = msgspec.structs.replace(out[i], **kw)
            break
    return out


def claim(rec: JobRecord, factory: str, station: int, now: float, *, engine: str | None = None,
          engine_version: str | None = None, start: bool = False) -> Outcome:
    """``queued -> assigned`` with a new lease at ``epoch + 1``. Exactly one compare-and-set on the
    revision this record was read at can win; every other claimer gets a revision conflict.
    ``engine`` (and its ``engine_version``): the engine the claimer will run, kept on the attempt.
    ``start``: the engine starts at once (the job has no lock to take first), so the claim goes
    straight to ``building`` (``claim_started``): one write instead of the claim and
    :func:`start`, with the same lease, epoch and attempt, and the reason :func:`start` gives."""
    if rec.stage != Stage.QUEUED:
        raise NotClaimable(f"job {rec.id} is {rec.stage}, not queued")
    epoch = rec.epoch + 1
    attempt = rec.attempt + 1
    attempts = [*rec.attempts, AttemptRecord(attempt=attempt, epoch=epoch, factory=factory, station=station,
                                              started_at=now, engine=engine, engine_version=engine_version)]
    return _move(
        rec, Event.CLAIM_STARTED if start else Event.CLAIM, now,
        f"claimed by {factory}/{station}" + (f", running on {factory}/{station}" if start else ""),
        epoch=epoch, attempt=attempt, lease=Lease(factory=factory, station=station, epoch=epoch),
        attempts=attempts[-MAX_ATTEMPTS_KEPT:], backoff_s=0.0,
    )


def check_fence(rec: JobRecord | None, job_id: str, factory: str, epoch: int) -> JobRecord:
    """Raise :class:`Fenced` unless ``factory`` still holds the lease at ``epoch``."""
    if (
        rec is None
        or rec.lease is None
        or rec.epoch != epoch
        or rec.lease.epoch != epoch
        or rec.lease.factory != factory
        or rec.stage not in LEASED
    ):
        raise Fenced(job_id, factory, epoch, rec)
    return rec


def renew(rec: JobRecord, factory: str, epoch: int, now: float) -> JobRecord:
    """A lease renewal: any write by the holder restamps the record with broker time."""
    check_fence(rec, rec.id, factory, epoch)
    assert rec.lease is not None
    return _replace(rec, lease=msgspec.structs.replace(rec.lease, renewals=rec.lease.renewals + 1), updated_at=now)


FENCE_MIN_REMAINING_SHARE = 0.5
"""``gigafactory fence`` demands, by default, that at least this share of ``lease_ttl_s`` is left
after its renewal: room for the push it guards, with the rest of the lease as the margin for
clock drift and a slow exit."""


def fence_min_remaining_s(lease_ttl_s: float, min_remaining_s: float | None) -> float:
    """The lease ``gigafactory fence`` must find left after its renewal: ``min_remaining_s`` as
    given, or :data:`FENCE_MIN_REMAINING_SHARE` of ``lease_ttl_s``. Raises ValueError, naming
    the option, for a TTL that is not positive or a minimum outside ``[0, lease_ttl_s)`` (a
    minimum of the whole TTL could never be met: some time always passes after the write)."""
    if not lease_ttl_s > 0:
        raise ValueError(f"--lease-ttl-s must be a positive number of seconds, not {lease_ttl_s!r}")
    want = lease_ttl_s * FENCE_MIN_REMAINING_SHARE if min_remaining_s is None else min_remaining_s
    if not 0 <= want < lease_ttl_s:
        raise ValueError(f"--min-remaining-s must be at least 0 and less than the lease TTL "
                         f"({lease_ttl_s:g}s), not {want!r}")
    return want


def fence_remaining_s(lease_ttl_s: float, since_sent_s: float) -> float:
    """The lease a holder is sure to have left after a successful renewal, ``since_sent_s``
    after it SENT that write (its local monotonic clock). The broker stamped the write after it
    was sent, and the reaper reclaims ``lease_ttl_s`` after that stamp, so this is a lower bound
    (up to the drift between the two clocks' rates over ``lease_ttl_s``)."""
    assert since_sent_s >= 0, f"a monotonic clock does not go back: {since_sent_s}"
    return lease_ttl_s - since_sent_s


def start(rec: JobRecord, factory: str, epoch: int, now: float) -> Outcome:
    """``assigned -> building``: the engine is about to run."""
    check_fence(rec, rec.id, factory, epoch)
    return _move(rec, Event.START, now, f"running on {factory}/{rec.lease.station if rec.lease else '?'}")


def hand_back(rec: JobRecord, factory: str, epoch: int, now: float, reason: str, backoff_s: float = 0.0) -> Outcome:
    """Give a leased job back to the queue without charging it a retry (drain, lock busy)."""
    check_fence(rec, rec.id, factory, epoch)
    attempts = _update_attempt(rec, epoch, outcome="handed_back", ended_at=now, detail=reason)
    return _move(
        rec, Event.REQUEUE, now, f"handed back by {factory}: {reason}",
        epoch=rec.epoch + 1, lease=None, attempt=rec.attempt - 1, attempts=attempts, backoff_s=backoff_s,
    )


def retry_backoff_s(rec: JobRecord) -> float:
    """Delay before the next retry: ``backoff * 2**retries_used``, capped at one hour."""
    base = parse_duration(rec.manifest.retry.backoff)
    return min(base * (2 ** rec.retries_used), BACKOFF_CAP_S)


def failure_backoff_s(rec: JobRecord, cls: FailureClass, retry_after_s: float | None = None) -> float:
    """Delay before retrying an attempt that failed with ``cls``: for ``rate_limited`` with a
    known ``retry_after_s`` (the provider's retry-after, as the engine read it), that delay,
    capped at :data:`BACKOFF_CAP_S`; else the policy's :func:`retry_backoff_s`.

    :param rec: the record (its retry policy and retries used).
    :param cls: the attempt's failure class.
    :param retry_after_s: the provider's retry-after in seconds (None: unknown; a negative or
        non-finite value is treated as unknown).
    """
    if cls == FailureClass.RATE_LIMITED and retry_after_s is not None and 0 <= retry_after_s < float("inf"):
        return min(float(retry_after_s), BACKOFF_CAP_S)
    return retry_backoff_s(rec)


def _after_failure(rec: JobRecord, cls: FailureClass, now: float, detail: str, *,
                   retry_after_s: float | None = None, **kw) -> Outcome:
    """Apply the retry policy to a failed attempt: requeue with backoff (:func:`failure_backoff_s`),
    ``failed`` or ``dead_letter``."""
    policy = rec.manifest.retry
    common = dict(epoch=rec.epoch + 1, lease=None, last_failure=cls, **kw)
    if cls not in policy.on:
        return _move(rec, Event.FAIL, now, f"{cls}: {detail} (retry.on does not include {cls})", **common)
    if rec.retries_used >= policy.max:
        return _move(
            rec, Event.DEAD_LETTER, now,
            f"{cls}: {detail} (retries exhausted: {rec.retries_used} of {policy.max} used)", **common,
        )
    backoff_s = failure_backoff_s(rec, cls, retry_after_s)
    why = " (the provider's retry-after)" if backoff_s != retry_backoff_s(rec) else ""
    return _move(
        rec, Event.REQUEUE, now,
        f"{cls}: {detail}; retry {rec.retries_used + 1} of {policy.max} after {backoff_s:g}s{why}",
        retries_used=rec.retries_used + 1, backoff_s=backoff_s, **common,
    )


def finish(
    rec: JobRecord,
    factory: str,
    epoch: int,
    now: float,
    *,
    failure: FailureClass | None,
    detail: str = "",
    exit_code: int | None = None,
    verify_exit_code: int | None = None,
    log: str | None = None,
    attribution: Attribution | None = None,
    usage: Usage | None = None,
    retry_after_s: float | None = None,
    workspace: WorkspaceResult | None = None,
) -> Outcome:
    """The holder reports the attempt's result. Passed: ``testing`` (``manual``), ``review``
    (reviewers) or straight to ``shipped`` (``auto``). Failed: the retry policy decides.
    ``usage`` is what the engine reported it consumed (None: it reports nothing), kept on the
    attempt as given. ``retry_after_s``: for ``rate_limited``, the provider's retry-after as the
    engine read it; the retry waits that long instead of the policy's back-off."""
    check_fence(rec, rec.id, factory, epoch)
    attempts = _update_attempt(
        rec, epoch, outcome=str(failure) if failure else "passed", ended_at=now, exit_code=exit_code,
        verify_exit_code=verify_exit_code, detail=detail, log=log,
        attribution=attribution or Attribution(job=rec.id, lane=f"{factory}/{rec.lease.station if rec.lease else 0}"),
        usage=usage, workspace=workspace,
    )
    if failure == FailureClass.MERGE_CONFLICT:
        return rebase_or_fail(rec, now, detail, attempts=attempts)
    if failure is not None:
        return _after_failure(rec, failure, now, detail, attempts=attempts, retry_after_s=retry_after_s)
    policy = rec.manifest.review_policy
    if isinstance(policy, Reviewers):
        return _move(
            rec, Event.NEEDS_REVIEW, now, "verify passed; waiting for " + ", ".join(policy.reviewers),
            attempts=attempts, lease=None,
        )
    out = _move(rec, Event.VERIFIED, now, "verify passed; waiting for ship", attempts=attempts, lease=None)
    if policy == "auto":
        short = ship_shortfall(rec.manifest.ship_as, workspace)
        if short is not None:
            # Verify passed and the branch is pushed, but the forge did not (yet) let it become
            # what ship-as asks: a human (or a later `ship`) takes it from here.
            why = (f"verify passed; not shipped as {rec.manifest.ship_as}: {short}; "
                   f"'gigafactory ship {rec.id}' tries again")
            return Outcome(_replace(out.record, reason=why[:2000]), out.event, out.stage_from, why[:2000])
        shipped = _move(out.record, Event.SHIP, now, "verify passed; shipped by review-policy auto"
                        + _shipped_words(rec.manifest.ship_as, workspace))
        return Outcome(shipped.record, Event.SHIP, rec.stage, shipped.reason)
    return out


# -- shipping: ship-as and conflicts -----------------------------------------------------------

MAX_REBASES = 1
"""``rebase-needed`` requeues a job gets (a branch that no longer merges into a moved ``base``)
before the next conflict fails it ``merge_conflict``."""
REBASE_NEEDED = "rebase-needed"
"""The reason's first word when a job is requeued for a conflict (``gigafactory status``)."""


def ship_shortfall(ship_as: str, ws: WorkspaceResult | None) -> str | None:
    """What an attempt's workspace still lacks to count as shipped under ``ship_as``, in words,
    or None when it is shipped (pure).

    Nothing to ship beyond the push (no ``repo``: ``ws`` None; nothing changed: no commit on
    the branch) is shipped. ``branch`` needs nothing more than the verified attempt (a push that
    failed already failed the attempt); ``pr-opened`` needs a pull request; ``merged`` needs
    the forge to say merged.

    :param ship_as: the manifest's ``ship-as``.
    :param ws: the passed attempt's workspace result.
    """
    if ws is None or ws.head is None or ws.head == ws.base_commit or ship_as == "branch":
        return None
    why = ws.ship_detail or ws.detail or "nothing was tried"
    if not ws.pushed:
        return f"the branch was not pushed ({why})"
    if ship_as == "pr-opened":
        return None if ws.pull_number is not None else f"no pull request was opened ({why})"
    assert ship_as == "merged", ship_as
    return None if ws.pull_state == "merged" else f"not merged ({why})"


def _shipped_words(ship_as: str, ws: WorkspaceResult | None) -> str:
    if ws is None or ws.pull_number is None:
        return ""
    if ship_as == "merged" and ws.merged_commit:
        return f" (pull request #{ws.pull_number} merged at {ws.merged_commit[:12]})"
    return f" (pull request #{ws.pull_number} opened)"


def rebase_or_fail(rec: JobRecord, now: float, detail: str, **kw) -> Outcome:
    """The branch no longer merges cleanly into ``base`` (it moved): back to ``queued`` with
    reason ``rebase-needed`` while :data:`MAX_REBASES` allows (a new attempt, on a fresh
    worktree from the new base; no retry of ``retry.max`` is charged and there is no
    back-off), then ``failed`` with ``merge_conflict`` (or as ``retry.on`` says, if it lists
    ``merge_conflict``). From ``building`` (the factory's merge) or ``testing``/``review`` (the
    coordinator's merge after a human's ``ship``). Bumps the epoch either way.

    :param rec: the record as read.
    :param now: the time to stamp.
    :param detail: the forge's words for the conflict.
    :param kw: further record fields to write (the attempts with the conflict recorded).
    """
    if rec.rebases_used < MAX_REBASES:
        return _move(
            rec, Event.REQUEUE, now,
            f"{REBASE_NEEDED}: {detail}; a new attempt from the new base "
            f"(rebase {rec.rebases_used + 1} of {MAX_REBASES})",
            epoch=rec.epoch + 1, lease=None, rebases_used=rec.rebases_used + 1, backoff_s=0.0,
            last_failure=FailureClass.MERGE_CONFLICT, **kw,
        )
    if rec.stage in LEASED:
        return _after_failure(rec, FailureClass.MERGE_CONFLICT, now,
                              f"{detail} (after {rec.rebases_used} rebase-needed retries)", **kw)
    # From testing/review (the coordinator's merge): the retry policy has nothing to rerun here.
    return _move(rec, Event.FAIL, now,
                 f"{FailureClass.MERGE_CONFLICT}: {detail} (after {rec.rebases_used} rebase-needed retries)",
                 epoch=rec.epoch + 1, lease=None, last_failure=FailureClass.MERGE_CONFLICT, **kw)


def rebase_pending(rec: JobRecord) -> bool:
    """True for the attempt that follows a ``rebase-needed`` requeue (the record as claimed:
    the attempt before the current one ended ``merge_conflict``). Its worktree must start from
    the NEW ``base`` (the checkout fetches it), never from a commit whose history holds the old
    one; with WIP checkpoints, "the new base plus the last checkpoint" is the checkpoint's work
    brought onto the new base (see ``factory/ship.py`` ``_ws_checkout``, HOOK rebase-needed)."""
    ended = [a for a in rec.attempts if a.outcome != "running"]
    return bool(ended) and ended[-1].outcome == str(FailureClass.MERGE_CONFLICT) and rec.rebases_used > 0


def shipped_attempt(rec: JobRecord) -> AttemptRecord | None:
    """The attempt a ``ship`` ships: the last one that passed (None: none did)."""
    return next((a for a in reversed(rec.attempts) if a.outcome == "passed"), None)


def with_ship_result(rec: JobRecord, epoch: int, ws: WorkspaceResult) -> list[AttemptRecord]:
    """The record's attempts with the attempt at ``epoch`` carrying ``ws`` (what a human's
    ``ship`` did at the forge)."""
    return _update_attempt(rec, epoch, workspace=ws)


def ship_done(rec: JobRecord, now: float, actor: str, epoch: int, ws: WorkspaceResult) -> Outcome:
    """A human's ship that the forge carried out (the pull request opened, or merged):
    ``testing``/``review`` -> ``shipped``, the attempt at ``epoch`` recording ``ws``."""
    return _move(rec, Event.SHIP, now, f"shipped by {actor}{_shipped_words(rec.manifest.ship_as, ws)}",
                 attempts=with_ship_result(rec, epoch, ws))


def ship_conflict(rec: JobRecord, now: float, actor: str, epoch: int, ws: WorkspaceResult) -> Outcome:
    """A human's ship whose merge conflicted: :func:`rebase_or_fail`."""
    return rebase_or_fail(rec, now, f"{ws.ship_detail} (ship by {actor})", attempts=with_ship_result(rec, epoch, ws))


def already_applied(rec: JobRecord, epoch: int, outcome: str) -> bool:
    """A replayed report (from a factory's outbox) whose write had already landed, its reply
    lost: the attempt at ``epoch`` ended with this ``outcome``. Such a replay is published as
    the missing event, not quarantined as stale."""
    return any(a.epoch == epoch and a.outcome == outcome for a in rec.attempts)


def expire(rec: JobRecord, record_ts: float, broker_now: float, lease_ttl_s: float) -> Outcome | None:
    """The reaper's decision for one record. ``record_ts`` is the broker's timestamp of the
    revision read (the last renewal); ``broker_now`` comes from the broker too. Returns None
    while the lease is live."""
    if rec.stage not in LEASED or broker_now - record_ts <= lease_ttl_s:
        return None
    holder = f"{rec.lease.factory}/{rec.lease.station}" if rec.lease else "?"
    detail = f"lease of {holder} at epoch {rec.epoch} expired ({broker_now - record_ts:.1f}s since last renewal > {lease_ttl_s:g}s)"
    attempts = _update_attempt(rec, rec.epoch, outcome=str(FailureClass.LEASE_EXPIRED), ended_at=broker_now, detail=detail)
    return _after_failure(rec, FailureClass.LEASE_EXPIRED, broker_now, detail, attempts=attempts)


def cancel(rec: JobRecord, now: float, actor: str, reason: str = "") -> Outcome:
    """Operator cancel. Bumps the epoch, so a running holder is fenced on its next write."""
    why = f"cancelled by {actor}" + (f": {reason}" if reason else "")
    return _move(rec, Event.CANCEL, now, why, epoch=rec.epoch + 1, lease=None)


def fail(rec: JobRecord, now: float, reason: str) -> Outcome:
    """End a job that has not run (a dependency failed)."""
    return _move(rec, Event.FAIL, now, reason, epoch=rec.epoch + 1, lease=None)


def operator_requeue(rec: JobRecord, now: float, actor: str) -> Outcome:
    """Operator requeue with a fresh retry budget, from any stage the lifecycle table allows
    (everything that has left the queue but ``shipped``). Bumps the epoch, so a running
    holder is fenced on its next write."""
    return _move(
        rec, Event.REQUEUE, now, f"requeued by {actor}",
        epoch=rec.epoch + 1, lease=None, retries_used=0, backoff_s=0.0,
    )


def ship(rec: JobRecord, now: float, actor: str) -> Outcome:
    """The human gate: ``testing``/``review`` -> ``shipped``."""
    return _move(rec, Event.SHIP, now, f"shipped by {actor}")


def set_blocked(rec: JobRecord, now: float, waiting_on: list[str]) -> Outcome:
    return _move(rec, Event.DEPS_UNMET, now, "waiting for " + ", ".join(waiting_on))


def unblock(rec: JobRecord, now: float) -> Outcome:
    return _move(rec, Event.DEPS_MET, now, "dependencies satisfied")


def dep_satisfied(dep_stage: Stage, mode: str) -> bool:
    if dep_stage == Stage.SHIPPED:
        return True
    return mode == "soft" and dep_stage == Stage.TESTING


def dep_doomed(dep_stage: Stage) -> bool:
    """A dependency that ended without shipping can no longer satisfy anyone."""
    return dep_stage in (Stage.FAILED, Stage.DEAD_LETTER)


def resolve_blocked(rec: JobRecord, dep_stages: dict[str, Stage | None], now: float) -> Outcome | None:
    """The decision for a ``blocked`` job given its dependencies' stages (None: not known yet):
    fail it if a dependency ended without shipping, unblock it once every dependency is
    satisfied (``shipped``, or ``testing`` with ``deps-mode: soft``), else None (still waiting)."""
    waiting = False
    for d in rec.deps:
        stage = dep_stages.get(d)
        if stage is None:
            waiting = True
            continue
        if dep_doomed(stage):
            return fail(rec, now, f"dependency {d} ended {stage}")
        if not dep_satisfied(stage, rec.manifest.deps_mode):
            waiting = True
    if waiting:
        return None
    out = unblock(rec, now)
    return Outcome(_replace(out.record, reason="waiting for a factory"), out.event, out.stage_from, out.reason)


# -- locks -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockVerdict:
    """Whether a ``lock:`` entry may be taken over (or deleted as stale), and why."""

    free: bool
    reason: str


def lock_verdict(lock: LockRecord, holder: JobRecord | None, lock_age_s: float, *,
                 lease_ttl_s: float, fence_margin_s: float) -> LockVerdict:
    """Is the holder of ``lock`` known to be stopped? Used by a factory that finds a lock taken
    and by the coordinator's stale-lock cleaner; a lock that is not free is left alone.

    A lock is held until its holder is *known stopped*, never merely because the holder's job
    record moved to another epoch (cancelled, requeued, reclaimed): the record says nothing
    about whether the holder's engine still runs. Known stopped is one of:

    - the holder wrote the result of its attempt: the record's attempt at ``lock.epoch`` has
      an outcome (passed, a failure class, handed back) other than ``running`` and
      ``lease_expired`` (the reaper's, written without the holder); the holder stops its
      engine before it reports;
    - the lock entry, which its holder rewrites on every successful lease renewal, is older
      than ``lease_ttl_s + fence_margin_s`` by broker time: a live holder fences itself
      (engine stopped) ``lease_ttl_s - fence_margin_s`` after its last successful renewal,
      which it sent before the lock rewrite.

    A deleted lock is free without asking (the caller creates it). A holder paused with its
    engine (SIGSTOP, VM freeze) can outlive the age rule; see the design notes.

    :param lock: the entry as read.
    :param holder: the holder job's record as read, or None if it is gone.
    :param lock_age_s: broker now minus the broker timestamp of the entry's revision.
    :param lease_ttl_s: the fleet's lease TTL.
    :param fence_margin_s: the fleet's self-fencing margin (``Settings.fence_margin_effective_s``).
    """
    if holder is not None:
        for a in holder.attempts:
            if a.epoch == lock.epoch and a.outcome not in ("running", str(FailureClass.LEASE_EXPIRED)):
                return LockVerdict(True, f"job {lock.job} reported its attempt at epoch {lock.epoch} ({a.outcome})")
    limit_s = lease_ttl_s + fence_margin_s
    if lock_age_s > limit_s:
        return LockVerdict(True, f"lock entry of job {lock.job} at epoch {lock.epoch} not renewed for "
                                 f"{lock_age_s:.1f}s > lease_ttl_s + fence_margin_s = {limit_s:g}s")
    return LockVerdict(False, f"held by job {lock.job} at epoch {lock.epoch} (entry renewed {lock_age_s:.1f}s ago; "
                              f"free after {limit_s:g}s or when the holder reports)")
