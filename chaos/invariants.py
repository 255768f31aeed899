"""The invariant checker: one judge, run after every chaos scenario, over the broker's own records.

:func:`check` is a pure function over plain data: the job records (``gf_jobs``) and the audit
trail (``GF_EVENTS``) in stream order. It knows nothing about who produced them, so it judges a
real broker (read with :func:`collect`) and the deterministic simulation's in-memory store
(``chaos/sim.py``) alike. It raises nothing on bad data: every finding is a :class:`Violation`
in the :class:`Report`, named by invariant and job, with the detail an operator needs.

The invariants (names as they appear in reports):

``no_lost_submission``
    Every acknowledged submission has a record, and so does every job the audit says was
    ``submitted``. A submission that was never acknowledged may be missing.
``settled``
    Every submitted job ends in exactly one terminal stage (``shipped``, ``failed``,
    ``dead_letter``), or is still legitimately waiting, with a reason: ``queued`` or
    ``blocked`` (for a factory, a backoff, a dependency), ``testing`` or ``review`` (for the
    human ship gate). ``assigned`` and ``building`` are accepted only while the run is still
    live (``allow_in_flight``); after a scenario has quiesced they mean a lease nobody reaps.
``single_terminal``
    Once a job is terminal, only an operator ``requeue`` takes it out again, and nothing
    takes a job out of ``shipped``.
``shipped_once``
    A job is shipped at most once, over its whole history.
``single_report``
    At most one ``finished`` and at most one ``ship`` event per job and epoch: a result is
    reported (and a job shipped) once per lease.
``unique_holder``
    No two claims of the same job at the same epoch: the epoch is the fencing token, and a
    token held twice fences nothing.
``claim_epochs_increase``
    The epochs of a job's claims strictly increase in audit order (a repeated epoch is reported
    as ``unique_holder``).
``stale_write_accepted``
    A holder's write (``started``, ``finished``, ``handed_back``) carries the epoch and the
    factory of the job's latest claim, and that lease was not ended since (by a reaper's
    requeue, a cancel, a hand back or a result). A write from a stale epoch must have been
    refused; refusals appear as ``fenced`` events, which are counted, not judged.
``record_consistent``
    Each record is internally consistent: a lease exactly in ``assigned``/``building``, at
    the record's epoch, and an epoch never below any epoch the job was claimed at.
``audit_well_formed``
    Events that the rules above rely on carry what those rules read (an epoch, a factory).
``audit_matches_record`` (only with ``strict_audit=True``)
    Each record's stage is the stage its last audited transition moved it to. Production
    publishes an event only after its write's reply, so a write that landed while its writer
    timed out (or crashed) has no event; such gaps are always counted (``audit_gaps``), and
    judged only when the caller asks for a complete audit.

Audit order is the stream order of ``GF_EVENTS``. Production publishes each event just after
its compare-and-set, so two writers racing on one key can publish in the other order than they
wrote; the simulation appends an event at its write's position, so there the order is exact.
A violation on a real broker names the events involved, so such a race can be told from a
protocol failure by reading them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

import msgspec

from gigafactory.schemas.lifecycle import LEASED, TERMINAL, Stage
from gigafactory.schemas.records import EventRecord, JobRecord, decode

INVARIANTS: tuple[str, ...] = (
    "no_lost_submission",
    "settled",
    "single_terminal",
    "shipped_once",
    "single_report",
    "unique_holder",
    "claim_epochs_increase",
    "stale_write_accepted",
    "record_consistent",
    "audit_well_formed",
    "audit_matches_record",
)

MAX_VIOLATIONS = 1000
"""Violations kept in a report; the rest are counted in ``counts['violations_dropped']``."""

ALWAYS_COUNTED = ("events", "claims", "started", "finished", "handed_back", "fenced", "lease_expired",
                  "requeue", "dead_letter", "fail", "cancel", "ship", "audit_gaps")
"""Counts present in every report, 0 or not, so a scenario can assert on them."""

HOLDER_WRITES = frozenset({"started", "finished", "handed_back"})
"""Event kinds a factory publishes after a fenced write under its lease."""
LEASE_ENDERS = frozenset({"requeue", "dead_letter", "fail", "cancel"})
"""Event kinds of coordinator and operator writes that take a job (and any lease) away."""
DECISIONS = frozenset({"dispatched", "held"})
"""Scheduler decisions: they say what the scheduler saw, they do not move the job."""
_TERMINAL_NAMES = frozenset(str(s) for s in TERMINAL)
_WAITING_FOR_HUMAN = (Stage.TESTING, Stage.REVIEW)


class Violation(msgspec.Struct, frozen=True):
    """One broken invariant: which, for which job (None: not about one job), and why."""

    invariant: str
    job: str | None
    detail: str


class Report(msgspec.Struct):
    """What :func:`check` found. ``counts`` are figures for the scenario's log (jobs by
    stage, claims, fenced writes, ...), not judgements; ``violations`` are."""

    violations: list[Violation] = msgspec.field(default_factory=list)
    counts: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_invariant(self) -> dict[str, int]:
        return dict(Counter(v.invariant for v in self.violations))

    def to_text(self, limit: int = 50) -> str:
        """Human-readable: the verdict, the counts, then up to ``limit`` violations."""
        verdict = "OK" if self.ok else f"{len(self.violations)} VIOLATION(S)"
        lines = [f"invariants: {verdict}"]
        lines.append("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        if not self.ok:
            lines.append("by invariant: " + ", ".join(f"{k}={v}" for k, v in sorted(self.by_invariant().items())))
        for v in self.violations[:limit]:
            lines.append(f"  [{v.invariant}] {v.job or '-'}: {v.detail}")
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join(lines)

    def to_json(self) -> str:
        return msgspec.json.encode({
            "ok": self.ok, "by_invariant": self.by_invariant(),
            "violations": self.violations, "counts": self.counts,
        }).decode()


class _Findings:
    """Collects violations up to :data:`MAX_VIOLATIONS` (a limit on everything)."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.dropped = 0

    def add(self, invariant: str, job: str | None, detail: str) -> None:
        assert invariant in INVARIANTS, invariant
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(Violation(invariant, job, detail))
        else:
            self.dropped += 1


def check(
    jobs: dict[str, JobRecord],
    events: Iterable[EventRecord],
    *,
    submitted: set[str] | None = None,
    acknowledged: set[str] | None = None,
    allow_in_flight: bool = False,
    strict_audit: bool = False,
) -> Report:
    """Judge one scenario's final records and audit trail.

    ``jobs``: every record of ``gf_jobs`` by key. ``events``: every event of ``GF_EVENTS`` in
    stream order (fleet events without a job are ignored). ``submitted``: the jobs the scenario
    submitted and expects to settle; None means every job on record or audited as submitted.
    ``acknowledged``: the submissions that intake acknowledged; each must have a record.
    ``allow_in_flight``: the run is still live, so ``assigned``/``building`` jobs are fine.
    ``strict_audit``: judge ``audit_matches_record`` (otherwise its gaps are only counted).
    """
    found = _Findings()
    counts: Counter[str] = Counter(dict.fromkeys(ALWAYS_COUNTED, 0))
    per_job: dict[str, list[EventRecord]] = {}
    for ev in events:
        counts["events"] += 1
        if ev.job is not None:
            per_job.setdefault(ev.job, []).append(ev)

    # no_lost_submission
    audited = [j for j, evs in per_job.items() if any(e.kind == "submitted" for e in evs)]
    for j in sorted(acknowledged or ()):
        if j not in jobs:
            found.add("no_lost_submission", j, "submission was acknowledged but the job has no record")
    for j in audited:
        if j not in jobs and j not in (acknowledged or ()):
            found.add("no_lost_submission", j, "the audit has a 'submitted' event but the job has no record")
    expected = set(submitted) if submitted is not None else set(jobs) | set(audited)
    counts["jobs"] = len(jobs)
    counts["jobs_expected"] = len(expected)
    if acknowledged is not None:
        counts["acknowledged"] = len(acknowledged)
    counts["submitted_unacknowledged_missing"] = sum(
        1 for j in expected if j not in jobs and j not in (acknowledged or ())
    )

    for jid in sorted(jobs):
        rec = jobs[jid]
        counts[f"stage_{rec.stage}"] += 1
        _check_record(found, jid, rec)
        if jid in expected:
            _check_settled(found, rec, allow_in_flight)

    for jid, evs in per_job.items():
        _check_trail(found, counts, jid, evs, jobs.get(jid))

    for jid in sorted(jobs):
        stage = str(jobs[jid].stage)
        audited_stage = _last_transition(per_job.get(jid, ()))
        if audited_stage != stage:
            counts["audit_gaps"] += 1
            if strict_audit:
                found.add("audit_matches_record", jid, f"record is {stage} but the audit's last transition "
                                                       f"says {audited_stage or 'nothing'}")

    if found.dropped:
        counts["violations_dropped"] = found.dropped
    return Report(violations=found.violations, counts=dict(sorted(counts.items())))


def _last_transition(evs) -> str | None:
    for ev in reversed(evs):
        if ev.stage_to is not None and ev.kind not in DECISIONS:
            return ev.stage_to
    return None


def _check_record(found: _Findings, key: str, rec: JobRecord) -> None:
    if rec.id != key:
        found.add("record_consistent", key, f"record stored under key {key!r} names job {rec.id!r}")
    leased = rec.stage in LEASED
    if leased and rec.lease is None:
        found.add("record_consistent", key, f"stage {rec.stage} without a lease (epoch {rec.epoch})")
    elif not leased and rec.lease is not None:
        found.add("record_consistent", key, f"stage {rec.stage} still names lease holder "
                                            f"{rec.lease.factory} at epoch {rec.lease.epoch}")
    elif rec.lease is not None and rec.lease.epoch != rec.epoch:
        found.add("record_consistent", key, f"lease of {rec.lease.factory} is at epoch {rec.lease.epoch} "
                                            f"but the record is at epoch {rec.epoch}")


def _check_settled(found: _Findings, rec: JobRecord, allow_in_flight: bool) -> None:
    stage = rec.stage
    if stage in TERMINAL:
        return
    if stage in LEASED:
        if not allow_in_flight:
            holder = f"{rec.lease.factory}/{rec.lease.station}" if rec.lease else "nobody"
            found.add("settled", rec.id, f"still {stage} (holder {holder}, epoch {rec.epoch}) after the "
                                         f"run quiesced: a lease nobody renews or reaps")
        return
    # queued, blocked (waiting for a factory, a backoff, a dependency) or testing, review
    # (waiting for the human ship gate): legitimate only with a reason an operator can read.
    if not rec.reason.strip():
        why = "the human ship gate" if stage in _WAITING_FOR_HUMAN else "a factory or a dependency"
        found.add("settled", rec.id, f"{stage} (waiting for {why}) with no reason on the record")


def _check_trail(found: _Findings, counts: Counter, jid: str, evs: list[EventRecord], rec: JobRecord | None) -> None:
    """Walk one job's events in audit order."""
    claims: dict[int, str] = {}           # epoch -> holder of the claim at that epoch
    last_claim: tuple[int, str | None] | None = None  # (epoch, factory) of the latest claim
    lease_open = False                    # the latest claim's lease has not been ended since
    ended_by = ""                         # what ended it, for the report
    finished: Counter[int] = Counter()
    shipped_at: Counter[int] = Counter()
    shipped = 0
    terminal: str | None = None           # the terminal stage the job is in, per the audit
    for n, ev in enumerate(evs):
        kind = ev.kind
        where = f"event #{n} ({kind})"
        if kind == "claimed":
            counts["claims"] += 1
            if ev.epoch is None:
                found.add("audit_well_formed", jid, f"{where} has no epoch")
                continue
            holder = f"{ev.factory}/{ev.data.get('station', '?')}"
            if ev.epoch in claims:
                found.add("unique_holder", jid, f"epoch {ev.epoch} claimed by {claims[ev.epoch]} and again by {holder}")
            elif last_claim is not None and ev.epoch < last_claim[0]:
                found.add("claim_epochs_increase", jid, f"{where}: claim at epoch {ev.epoch} by {holder} "
                                                        f"after a claim at epoch {last_claim[0]}")
            claims.setdefault(ev.epoch, holder)
            last_claim = (ev.epoch, ev.factory)
            lease_open, ended_by = True, ""
        elif kind in HOLDER_WRITES:
            counts[kind] += 1
            if ev.epoch is None or ev.factory is None:
                found.add("audit_well_formed", jid, f"{where} lacks its epoch or factory")
                continue
            holder_ok = False
            if last_claim is None:
                found.add("stale_write_accepted", jid, f"{kind} by {ev.factory} at epoch {ev.epoch} "
                                                       f"with no claim of the job before it")
            elif (ev.epoch, ev.factory) != last_claim:
                found.add("stale_write_accepted", jid, f"{kind} by {ev.factory} at epoch {ev.epoch}, but the latest "
                                                       f"claim is epoch {last_claim[0]} by {last_claim[1]}")
            elif not lease_open:
                found.add("stale_write_accepted", jid, f"{kind} by {ev.factory} at epoch {ev.epoch} after that "
                                                       f"lease was ended by {ended_by}")
            else:
                holder_ok = True
            if kind == "finished":
                finished[ev.epoch] += 1
                if finished[ev.epoch] == 2:
                    found.add("single_report", jid, f"result reported twice at epoch {ev.epoch} "
                                                    f"(second: {where} by {ev.factory})")
            # Only the holder's own result or hand back ends its lease: a stale write is reported
            # once, and does not make the holder's later, valid writes look stale too.
            if kind != "started" and holder_ok:
                lease_open, ended_by = False, f"{kind} (epoch {ev.epoch})"
        elif kind in LEASE_ENDERS:
            counts[kind] += 1
            if "old_epoch" in ev.data:
                counts["lease_expired"] += 1
            lease_open, ended_by = False, f"{kind} ({ev.actor or 'unknown actor'}, epoch {ev.epoch})"
        elif kind == "fenced":
            counts["fenced"] += 1
        elif kind == "ship":
            counts["ship"] += 1
            if ev.epoch is None:
                found.add("audit_well_formed", jid, f"{where} has no epoch")
            else:
                shipped_at[ev.epoch] += 1
                if shipped_at[ev.epoch] == 2:
                    found.add("single_report", jid, f"shipped twice at epoch {ev.epoch}")
        elif kind in ("submitted", "superseded", "dispatched", "held", "lock_wait", "deps_met", "deps_unmet"):
            counts[kind] += 1

        if ev.stage_to == Stage.SHIPPED:
            shipped += 1
            if shipped == 2:
                found.add("shipped_once", jid, f"shipped again by {where} (actor {ev.actor or ev.factory})")
        if ev.stage_to is None or kind in DECISIONS:
            continue
        if terminal is not None:
            reopened = kind == "requeue" and terminal != Stage.SHIPPED and ev.stage_to not in _TERMINAL_NAMES
            if not reopened:
                found.add("single_terminal", jid, f"{where} moved the job to {ev.stage_to} after it ended {terminal}")
        # Follow the audit after a finding, so one bad event is reported once, not at every later one.
        terminal = ev.stage_to if ev.stage_to in _TERMINAL_NAMES else None

    if rec is not None and claims and rec.epoch < max(claims):
        found.add("record_consistent", jid, f"record at epoch {rec.epoch}, below the epoch {max(claims)} it was "
                                            f"claimed at: an epoch went backwards")


# -- reading a real broker ---------------------------------------------------------------------


async def collect(broker, *, batch: int = 256, timeout_s: float | None = None,
                  max_events: int = 1_000_000) -> tuple[dict[str, JobRecord], list[EventRecord]]:
    """Every record of ``gf_jobs`` and every event of ``GF_EVENTS`` (stream order), for :func:`check`.

    ``broker`` is a :class:`gigafactory.broker.Broker`. Events are read with an ephemeral pull
    consumer (deliver all, ack none) in batches of ``batch`` until nothing is pending; every
    fetch is bounded by ``timeout_s`` (default: the broker's request timeout) and the whole
    read by ``max_events``. A read that stalls raises rather than return a partial audit,
    because a checker fed half the events passes scenarios it should fail.
    """
    from nats.js import api

    from gigafactory.schemas import names

    wait_s = timeout_s if timeout_s is not None else broker.settings.request_timeout_s
    jobs: dict[str, JobRecord] = {}
    async for entry in broker.jobs.scan():
        jobs[entry.key] = decode(entry.value, JobRecord)

    info = await asyncio.wait_for(broker.js.stream_info(names.EVENTS_STREAM), timeout=wait_s)
    events: list[EventRecord] = []
    if info.state.messages == 0:
        return jobs, events
    last_seq = info.state.last_seq
    psub = await broker.js.pull_subscribe(
        f"{names.EVENTS_PREFIX}.>", stream=names.EVENTS_STREAM,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=max(10.0, 4 * wait_s), mem_storage=True, num_replicas=1,
        ),
    )
    try:
        while len(events) < max_events:
            try:
                msgs = await asyncio.wait_for(psub.fetch(min(batch, max_events - len(events)), timeout=wait_s),
                                              timeout=2 * wait_s)
            except TimeoutError as e:  # asyncio's and nats-py's timeouts both derive from it
                raise TimeoutError(f"reading {names.EVENTS_STREAM} stalled after {len(events)} events "
                                   f"(stream last sequence {last_seq}); is the broker answering?") from e
            for m in msgs:
                events.append(decode(m.data, EventRecord))
            meta = msgs[-1].metadata
            if meta.num_pending == 0 or meta.sequence.stream >= last_seq:
                break
    finally:
        try:
            await asyncio.wait_for(psub.unsubscribe(), timeout=wait_s)
        except Exception:  # the ephemeral consumer expires by itself (inactive_threshold)
            pass
    return jobs, events
