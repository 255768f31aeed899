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
    takes a job out of ``shipped``. A job's first ``submitted`` event stored after its end
    but stamped before it is its birth published late (the intake publishes it after its
    write returns, and a fast fleet can finish the job first): counted ``submitted_late``.
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
    requeue, a cancel, a hand back or a result). A claim straight into ``building``
    (``claimed`` with ``data.started``) is the run's start: it is counted as one (``started``)
    and no ``started`` event follows it. A ``started`` with ``data.with_claim`` (what an older
    factory published after such a claim) names the claim's own write: only its holder and
    epoch are judged, and it is not counted again. A write from a stale epoch must have been
    refused; refusals appear as ``fenced`` events, which are counted, not judged.
``record_consistent``
    Each record is internally consistent: a lease exactly in ``assigned``/``building``, at
    the record's epoch, and an epoch never below any epoch the job was claimed at.
``audit_well_formed``
    Events that the rules above rely on carry what those rules read (an epoch, a factory).
``no_side_effect_after_lease_lost`` (with ``side_effects``)
    No line of the side-effect ledger (what the jobs themselves did, outside the broker) from an
    epoch is stamped after that epoch lost its lease. "Lost" is read from the broker's own data:
    the earliest broker timestamp of an event that took the lease away (the reaper's
    ``requeue``/``fail``/``dead_letter`` naming it as ``old_epoch``, a ``cancel``), or of a claim
    of the job at a later epoch. The only allowance is a pause window the caller declares (the
    holder factory was SIGSTOPped by the lab, plus a grace for it to wake and stop its engine):
    such lines are counted (``side_effects_in_pause_window``) and listed in the report's
    ``allowances``, never dropped silently.
``one_epoch_at_a_time`` (with ``side_effects``)
    A job's side effects come from one epoch at a time: no line of an older epoch is stamped
    after the first line of a newer one (beyond the same pause allowance). This holds even when
    the audit lacks the event that ended a lease. And one run per epoch: an epoch's ``start``
    appears once (a lease runs its engine once).
``ledger_well_formed`` (with ``side_effects``)
    Every ledger line reads ``<job> <epoch> <phase> <time>``, and the ledger was read whole.
``no_leftover_engine`` (with ``side_effects``)
    No process of the run outlived the factory that started it (the caller lists those it
    found before cleaning up).
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
import math
from collections import Counter
from collections.abc import Iterable

import msgspec

from gigafactory.identity import verify_holder
from gigafactory.schemas import signing
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
    "holder_signed",
    "audit_well_formed",
    "audit_matches_record",
    "no_side_effect_after_lease_lost",
    "one_epoch_at_a_time",
    "ledger_well_formed",
    "no_leftover_engine",
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

# -- the side-effect ledger ------------------------------------------------------------------------

LEDGER_PHASES = frozenset({"start", "progress", "END"})
"""What a ledger line says its job was doing: starting, still at work, done."""
LEDGER_MAX_BYTES = 64 * 1024 * 1024
"""Bound on the ledger read for one check (a bounded run writes tens of kilobytes); a longer
ledger is judged up to this size and reported as a ``ledger_well_formed`` violation, since a
checker fed half the side effects would pass runs it should fail."""
LEDGER_MAX_LINE_BYTES = 1024
"""Bound on one ledger line (a real line is about 60 bytes)."""
CLOCK_TOLERANCE_S = 0.001
"""How much later than the lease loss a ledger line may be stamped and still count as before it.
Both stamps read the same machine's realtime clock (the lab, its jobs and its broker run on one
host), so there is no skew to allow for; 1 ms covers the rounding of the two stamps to floats
(a ledger stamp has microseconds, a broker stamp nanoseconds). The judge is lenient in one
direction by construction: the loss is stamped by the event published just after the
compare-and-set that took the lease, so a line may land up to that publish's latency (a few
milliseconds on loopback) after the real loss unnoticed."""


class LedgerLine(msgspec.Struct, frozen=True):
    """One side effect of a job: ``<job> <epoch> <phase> <time>`` appended by the job itself.
    ``t`` is wall-clock seconds on the machine that runs the broker; ``line_no`` (1-based) is
    where it is in the ledger, for the report."""

    job: str
    epoch: int
    phase: str
    t: float
    line_no: int = 0


class PauseWindow(msgspec.Struct, frozen=True):
    """A stretch during which the lab had SIGSTOPped factory ``factory``: its leases could
    expire while it could not stop its engines. ``since``: when that incarnation of the factory
    started (a lease claimed before it belongs to an earlier incarnation, which this pause does
    not excuse). ``start``/``end``: the stop and the continue (wall clock, s); ``end`` None
    means it was still stopped when the check ran."""

    factory: str
    since: float
    start: float
    end: float | None


class LeftoverProcess(msgspec.Struct, frozen=True):
    """A process of the run found alive although the factory that started it is dead: an
    engine (or something an engine started) that outlived its factory. ``job``/``epoch``/
    ``factory`` come from its environment (``GF_JOB_ID``, ``GF_EPOCH``, ``GF_FACTORY``)."""

    pid: int
    pgid: int
    cmd: str
    job: str | None = None
    epoch: int | None = None
    factory: str | None = None


class SideEffects(msgspec.Struct):
    """What :func:`check` needs, beyond the records, to judge what the jobs did.

    ``ledger``: the ledger's lines (see :func:`parse_ledger`); ``problems``: what made lines
    unreadable (each a ``ledger_well_formed`` violation). ``event_ts``: the broker's timestamp
    of each event passed to :func:`check`, in the same order. ``pauses``: the lab's SIGSTOP
    windows. ``pause_grace_s``: how long after a pause ends its factory may take to stop an
    engine whose lease it lost (a renewal period and one request timeout, say).
    ``leftovers``: processes found alive after their factory died. ``tolerance_s``: see
    :data:`CLOCK_TOLERANCE_S`."""

    ledger: list[LedgerLine]
    event_ts: list[float]
    pauses: list[PauseWindow] = msgspec.field(default_factory=list)
    pause_grace_s: float = 0.0
    leftovers: list[LeftoverProcess] = msgspec.field(default_factory=list)
    problems: list[str] = msgspec.field(default_factory=list)
    tolerance_s: float = CLOCK_TOLERANCE_S


def parse_ledger(text: str, source: str = "ledger") -> tuple[list[LedgerLine], list[str]]:
    """Parse a ledger's text into its lines and the problems found (pure; raises nothing).

    ``text``: the ledger, one ``<job> <epoch> <phase> <time>`` per line (a comma is accepted as
    the time's decimal point: bash's ``$EPOCHREALTIME`` follows the locale). ``source``: its
    name for the problems (a path). Blank lines are skipped; a line that does not parse is a
    problem naming its line number, and is left out."""
    lines: list[LedgerLine] = []
    problems: list[str] = []
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        where = f"{source} line {n}"
        if len(raw.encode("utf-8", "replace")) > LEDGER_MAX_LINE_BYTES:
            problems.append(f"{where}: longer than LEDGER_MAX_LINE_BYTES ({LEDGER_MAX_LINE_BYTES})")
            continue
        fields = raw.split()
        if len(fields) != 4:
            problems.append(f"{where}: {len(fields)} fields, expected 4 (job epoch phase time): {raw[:120]!r}")
            continue
        job, epoch_s, phase, t_s = fields
        try:
            epoch = int(epoch_s)
        except ValueError:
            problems.append(f"{where}: epoch {epoch_s!r} is not an integer")
            continue
        try:
            t = float(t_s.replace(",", "."))
        except ValueError:
            problems.append(f"{where}: time {t_s!r} is not a number of seconds")
            continue
        if epoch < 0 or not math.isfinite(t) or t <= 0:
            problems.append(f"{where}: epoch {epoch} or time {t_s} out of range")
            continue
        if phase not in LEDGER_PHASES:
            problems.append(f"{where}: phase {phase!r} is not one of {', '.join(sorted(LEDGER_PHASES))}")
            continue
        lines.append(LedgerLine(job, epoch, phase, t, n))
    return lines, problems


class Violation(msgspec.Struct, frozen=True):
    """One broken invariant: which, for which job (None: not about one job), and why."""

    invariant: str
    job: str | None
    detail: str


class Allowance(msgspec.Struct, frozen=True):
    """A finding the checker excused by a documented allowance (``kind``: which one, e.g.
    ``pause_window``), listed so that it is seen, never silently dropped."""

    kind: str
    job: str | None
    detail: str


class Report(msgspec.Struct):
    """What :func:`check` found. ``counts`` are figures for the scenario's log (jobs by
    stage, claims, fenced writes, ...), not judgements; ``violations`` are; ``allowances``
    are findings excused by a documented allowance (the pause window), reported apart."""

    violations: list[Violation] = msgspec.field(default_factory=list)
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    allowances: list[Allowance] = msgspec.field(default_factory=list)

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
        if self.allowances:
            lines.append(f"allowed, not judged: {len(self.allowances)}")
            for a in self.allowances[:limit]:
                lines.append(f"  ({a.kind}) {a.job or '-'}: {a.detail}")
            if len(self.allowances) > limit:
                lines.append(f"  ... and {len(self.allowances) - limit} more")
        return "\n".join(lines)

    def to_json(self) -> str:
        return msgspec.json.encode({
            "ok": self.ok, "by_invariant": self.by_invariant(),
            "violations": self.violations, "counts": self.counts, "allowances": self.allowances,
        }).decode()


class _Findings:
    """Collects violations up to :data:`MAX_VIOLATIONS` (a limit on everything)."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.allowances: list[Allowance] = []
        self.dropped = 0
        self.allowances_dropped = 0

    def add(self, invariant: str, job: str | None, detail: str) -> None:
        assert invariant in INVARIANTS, invariant
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(Violation(invariant, job, detail))
        else:
            self.dropped += 1

    def allow(self, kind: str, job: str | None, detail: str) -> None:
        if len(self.allowances) < MAX_VIOLATIONS:
            self.allowances.append(Allowance(kind, job, detail))
        else:
            self.allowances_dropped += 1


def check(
    jobs: dict[str, JobRecord],
    events: Iterable[EventRecord],
    *,
    submitted: set[str] | None = None,
    acknowledged: set[str] | None = None,
    allow_in_flight: bool = False,
    strict_audit: bool = False,
    side_effects: SideEffects | None = None,
    holder_keys: dict[str, str] | None = None,
) -> Report:
    """Judge one scenario's final records and audit trail.

    ``jobs``: every record of ``gf_jobs`` by key. ``events``: every event of ``GF_EVENTS`` in
    stream order (fleet events without a job are ignored). ``submitted``: the jobs the scenario
    submitted and expects to settle; None means every job on record or audited as submitted.
    ``acknowledged``: the submissions that intake acknowledged; each must have a record.
    ``allow_in_flight``: the run is still live, so ``assigned``/``building`` jobs are fine.
    ``strict_audit``: judge ``audit_matches_record`` (otherwise its gaps are only counted).
    ``side_effects``: the side-effect ledger and what judging it needs (the broker's
    timestamp of every event, the lab's pauses, leftover processes); None judges the records
    alone (the simulation has no side effects outside its store).
    ``holder_keys``: factory id -> the public nkey of its identity; every record in a leased
    stage held by one of them must carry that key's valid signature (``holder_signed``, see
    schemas/signing.py). None: signatures are not judged (the simulation signs nothing).
    """
    found = _Findings()
    counts: Counter[str] = Counter(dict.fromkeys(ALWAYS_COUNTED, 0))
    per_job: dict[str, list[EventRecord]] = {}
    timed: dict[str, list[tuple[float, EventRecord]]] = {}
    if side_effects is not None:
        events = list(events)
        # A programmer's error, not bad data: the timestamps are read with the events.
        assert len(side_effects.event_ts) == len(events), (len(side_effects.event_ts), len(events))
    for n, ev in enumerate(events):
        counts["events"] += 1
        if ev.job is not None:
            per_job.setdefault(ev.job, []).append(ev)
            if side_effects is not None:
                timed.setdefault(ev.job, []).append((side_effects.event_ts[n], ev))

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
        if holder_keys is not None and rec.lease is not None:
            why = signing.holder_verdict(rec, holder_keys.get(rec.lease.factory), verify_holder)
            if why is not None:
                found.add("holder_signed", jid, why)
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

    if side_effects is not None:
        _check_side_effects(found, counts, timed, side_effects)

    if found.dropped:
        counts["violations_dropped"] = found.dropped
    if found.allowances_dropped:
        counts["allowances_dropped"] = found.allowances_dropped
    return Report(violations=found.violations, counts=dict(sorted(counts.items())), allowances=found.allowances)


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


def _with_claim(ev: EventRecord) -> bool:
    """A ``started`` event of a claim straight into ``building`` (``claim_started``), as an
    older factory published it after its ``claimed``: it names no write of its own but the
    claim's, so it is judged with the claim (its holder and epoch), not by when it was
    published (a factory paused between publishing ``claimed`` and ``started`` publishes the
    second after a reaper may have ended the lease), and the claim counted the start already.
    Current factories publish no such event: the ``claimed`` is the start
    (:func:`_claim_started`)."""
    return ev.kind == "started" and bool((ev.data or {}).get("with_claim"))


def _claim_started(ev: EventRecord) -> bool:
    """A ``claimed`` event whose compare-and-set moved the job straight into ``building``
    (``data.started``): the claim is also the run's start, counted as a ``started``."""
    return ev.kind == "claimed" and bool((ev.data or {}).get("started"))


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
    ended_at: float | None = None         # when the event that ended it was stamped
    born = False                          # a ``submitted`` event was seen
    for n, ev in enumerate(evs):
        kind = ev.kind
        where = f"event #{n} ({kind})"
        if kind == "submitted" and not born and terminal is not None and ended_at is not None and ev.at <= ended_at:
            # The intake publishes a job's birth after its record's write returns; a fast
            # fleet can dispatch, run and ship the job before that publish is stored. Stamped
            # (with the record's submission time) before the end, it is the job's first event
            # published late, not a move out of its terminal stage.
            born = True
            counts["submitted"] += 1
            counts["submitted_late"] += 1
            continue
        born = born or kind == "submitted"
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
            if _claim_started(ev):
                counts["started"] += 1  # the claim is the start: one count per run, as before
        elif kind in HOLDER_WRITES:
            if not _with_claim(ev):  # an older factory's echo of a started claim, counted with it
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
            elif not lease_open and not _with_claim(ev):
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
        elif kind in ("submitted", "superseded", "dispatched", "held", "lock_wait", "deps_met", "deps_unmet",
                      "self_fenced"):
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
        ended_at = ev.at if terminal is not None else None

    if rec is not None and claims and rec.epoch < max(claims):
        found.add("record_consistent", jid, f"record at epoch {rec.epoch}, below the epoch {max(claims)} it was "
                                            f"claimed at: an epoch went backwards")


# -- side effects ----------------------------------------------------------------------------------


def _lease_losses(evs: list[tuple[float, EventRecord]]) -> tuple[
        dict[int, tuple[float, str]], dict[int, tuple[str | None, float]], list[tuple[int, float, str]]]:
    """Read one job's timed events (broker timestamp, event; stream order). Returns: when each
    epoch's lease was taken away by someone other than its holder, and by what (the reaper
    names the epoch it took as ``old_epoch``; a cancel or fail without it ends the lease of the
    latest claim if still open); the holder of each claimed epoch (factory, claim time); and
    every claim (epoch, time, what), since a claim at a later epoch ends every earlier lease."""
    taken: dict[int, tuple[float, str]] = {}
    holders: dict[int, tuple[str | None, float]] = {}
    claims: list[tuple[int, float, str]] = []
    last_claim: int | None = None
    lease_open = False

    def take(epoch: int, ts: float, why: str) -> None:
        if epoch not in taken or ts < taken[epoch][0]:
            taken[epoch] = (ts, why)

    for ts, ev in evs:
        if ev.kind == "claimed" and ev.epoch is not None:
            holders.setdefault(ev.epoch, (ev.factory, ts))
            claims.append((ev.epoch, ts, f"claimed at epoch {ev.epoch} by {ev.factory}"))
            last_claim, lease_open = ev.epoch, True
        elif ev.kind in LEASE_ENDERS:
            old = ev.data.get("old_epoch")
            if isinstance(old, int) and not isinstance(old, bool):
                take(old, ts, f"{ev.kind} by {ev.actor or '?'}: lease expired")
            elif lease_open and last_claim is not None:
                take(last_claim, ts, f"{ev.kind} by {ev.actor or '?'}")
            lease_open = False
        elif ev.kind in ("finished", "handed_back") and ev.epoch == last_claim:
            lease_open = False  # its holder ended it: nothing was taken away
    return taken, holders, claims


def _pause_of(se: SideEffects, holder: tuple[str | None, float] | None, t: float) -> PauseWindow | None:
    """The lab's pause that excuses a side effect at ``t`` of a lease held by ``holder``
    (factory, claim time): that incarnation of the factory was stopped at ``t``, or had been
    resumed less than ``pause_grace_s`` before it."""
    if holder is None:
        return None
    factory, claimed_at = holder
    for w in se.pauses:
        if (w.factory == factory and w.since <= claimed_at and w.start <= t
                and (w.end is None or t <= w.end + se.pause_grace_s)):
            return w
    return None


def _check_side_effects(found: _Findings, counts: Counter, timed: dict[str, list[tuple[float, EventRecord]]],
                        se: SideEffects) -> None:
    """Judge the side-effect ledger against the broker's timed audit (see the module docstring:
    ``no_side_effect_after_lease_lost``, ``one_epoch_at_a_time``, ``ledger_well_formed``,
    ``no_leftover_engine``)."""
    for problem in se.problems:
        found.add("ledger_well_formed", None, problem)
    by_job: dict[str, dict[int, list[LedgerLine]]] = {}
    for line in se.ledger:
        by_job.setdefault(line.job, {}).setdefault(line.epoch, []).append(line)
    counts["ledger_lines"] = len(se.ledger)
    counts["ledger_jobs"] = len(by_job)
    counts["ledger_epochs"] = sum(len(epochs) for epochs in by_job.values())
    counts["ledger_epochs_ended"] = sum(1 for epochs in by_job.values() for lines in epochs.values()
                                        if any(x.phase == "END" for x in lines))
    counts["side_effects_after_lease_lost"] = 0
    counts["side_effects_overlapping_epochs"] = 0
    counts["side_effects_in_pause_window"] = 0
    counts["pause_windows"] = len(se.pauses)
    counts["leftover_processes"] = len(se.leftovers)
    counts["leftover_engines"] = len({p.pgid for p in se.leftovers})
    tol = se.tolerance_s

    for jid in sorted(by_job):
        epochs = by_job[jid]
        for lines in epochs.values():
            lines.sort(key=lambda x: x.t)
        taken, holders, claims = _lease_losses(timed.get(jid, []))
        excused: dict[int, list[LedgerLine]] = {}  # epoch -> its lines excused by a pause
        seen: set[int] = set()  # id() of the lines in excused: each is counted once

        def unexcused(lines: list[LedgerLine]) -> list[LedgerLine]:
            out = []
            for x in lines:
                if _pause_of(se, holders.get(x.epoch), x.t) is None:
                    out.append(x)
                elif id(x) not in seen:
                    seen.add(id(x))
                    excused.setdefault(x.epoch, []).append(x)
            return out

        # no_side_effect_after_lease_lost: the earliest of what took the lease and a later claim.
        for epoch in sorted(epochs):
            ends = ([taken[epoch]] if epoch in taken else []) + [(ts, why) for e, ts, why in claims if e > epoch]
            if not ends:
                continue  # never lost (still held, or ended by its holder)
            lost_ts, why = min(ends)
            bad = unexcused([x for x in epochs[epoch] if x.t > lost_ts + tol])
            if bad:
                counts["side_effects_after_lease_lost"] += len(bad)
                holder = holders.get(epoch, (None, 0.0))[0] or "an unknown holder"
                found.add("no_side_effect_after_lease_lost", jid,
                          f"{len(bad)} side effect(s) of epoch {epoch} (held by {holder}) after it lost its lease "
                          f"at broker time {lost_ts:.3f} ({why}): the first ({bad[0].phase}, ledger line "
                          f"{bad[0].line_no}) {bad[0].t - lost_ts:.3f}s after, the last ({bad[-1].phase}) "
                          f"{bad[-1].t - lost_ts:.3f}s after")

        # one_epoch_at_a_time: one run per epoch, and no older epoch's line after a newer epoch's first.
        for epoch, lines in sorted(epochs.items()):
            starts = [x for x in lines if x.phase == "start"]
            if len(starts) > 1:
                found.add("one_epoch_at_a_time", jid,
                          f"epoch {epoch} started {len(starts)} times (ledger lines "
                          f"{', '.join(str(x.line_no) for x in starts[:10])}): one lease ran its engine more than once")
        ordered = sorted(epochs)
        for i, older in enumerate(ordered):
            for newer in ordered[i + 1:]:
                first_new = epochs[newer][0]
                bad = unexcused([x for x in epochs[older] if x.t > first_new.t + tol])
                if bad:
                    counts["side_effects_overlapping_epochs"] += len(bad)
                    found.add("one_epoch_at_a_time", jid,
                              f"epochs {older} and {newer} ran side effects at the same time: {len(bad)} line(s) "
                              f"of epoch {older} after epoch {newer}'s first ({first_new.phase}, ledger line "
                              f"{first_new.line_no}), the last {bad[-1].t - first_new.t:.3f}s after it")

        for epoch, lines in sorted(excused.items()):
            w = _pause_of(se, holders.get(epoch), lines[0].t)
            assert w is not None
            counts["side_effects_in_pause_window"] += len(lines)
            end = "still paused" if w.end is None else f"resumed at {w.end:.3f}, grace {se.pause_grace_s:g}s"
            found.allow("pause_window", jid,
                        f"{len(lines)} side effect(s) of epoch {epoch} after its lease was lost or a newer "
                        f"epoch began, while its holder {w.factory} was paused by the lab (stopped at "
                        f"{w.start:.3f}, {end}): ledger lines {lines[0].line_no}..{lines[-1].line_no}")

    for p in se.leftovers:
        found.add("no_leftover_engine", p.job,
                  f"pid {p.pid} (process group {p.pgid}: {p.cmd[:100]}) of job {p.job} epoch {p.epoch}, started by "
                  f"factory {p.factory}, is still running although that factory is dead")


# -- reading a real broker ---------------------------------------------------------------------


async def collect(broker, *, batch: int = 256, timeout_s: float | None = None,
                  max_events: int = 1_000_000) -> tuple[dict[str, JobRecord], list[EventRecord]]:
    """Every record of ``gf_jobs`` and every event of ``GF_EVENTS`` (stream order), for :func:`check`.
    See :func:`collect_timed` for the parameters."""
    jobs, events, _ts = await collect_timed(broker, batch=batch, timeout_s=timeout_s, max_events=max_events)
    return jobs, events


COLLECT_UNAVAILABLE_TRIES = 10
"""Consecutive 503 replies (no leader for the events stream or the reading consumer, as right
after a cluster node's restart) a read of the audit waits out, with back-off up to 2 s each."""


async def collect_timed(broker, *, batch: int = 256, timeout_s: float | None = None,
                        max_events: int = 1_000_000) -> tuple[dict[str, JobRecord], list[EventRecord], list[float]]:
    """What :func:`collect` reads, and the broker's timestamp of each event (seconds, the
    server's clock when it stored the event), for :attr:`SideEffects.event_ts`.

    ``broker`` is a :class:`gigafactory.broker.Broker`. Events are read with an ephemeral pull
    consumer (deliver all, ack none) in batches of ``batch`` until nothing is pending; every
    fetch is bounded by ``timeout_s`` (default: the broker's request timeout) and the whole
    read by ``max_events``. A read that stalls raises rather than return a partial audit,
    because a checker fed half the events passes scenarios it should fail.
    """
    import nats.js.errors
    from nats.js import api

    from gigafactory.schemas import names

    wait_s = timeout_s if timeout_s is not None else broker.settings.request_timeout_s
    jobs: dict[str, JobRecord] = {}
    async for entry in broker.jobs.scan():
        jobs[entry.key] = decode(entry.value, JobRecord)

    info = await asyncio.wait_for(broker.js.stream_info(names.EVENTS_STREAM), timeout=wait_s)
    events: list[EventRecord] = []
    stamps: list[float] = []
    if info.state.messages == 0:
        return jobs, events, stamps
    last_seq = info.state.last_seq
    psub = await broker.js.pull_subscribe(
        f"{names.EVENTS_PREFIX}.>", stream=names.EVENTS_STREAM,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=max(10.0, 4 * wait_s), mem_storage=True, num_replicas=1,
        ),
    )
    unavailable = 0
    try:
        while len(events) < max_events:
            try:
                msgs = await asyncio.wait_for(psub.fetch(min(batch, max_events - len(events)), timeout=wait_s),
                                              timeout=2 * wait_s)
            except TimeoutError as e:  # asyncio's and nats-py's timeouts both derive from it
                raise TimeoutError(f"reading {names.EVENTS_STREAM} stalled after {len(events)} events "
                                   f"(stream last sequence {last_seq}); is the broker answering?") from e
            except nats.js.errors.ServiceUnavailableError:
                # A 503 on a cluster just after a node came back: the stream or the consumer has
                # no leader yet. It answers once one is elected; retry, bounded, the same read.
                unavailable += 1
                if unavailable > COLLECT_UNAVAILABLE_TRIES:
                    raise
                await asyncio.sleep(min(2.0, 0.1 * 2 ** unavailable))
                continue
            unavailable = 0
            for m in msgs:
                events.append(decode(m.data, EventRecord))
                stamps.append(m.metadata.timestamp.timestamp())
            meta = msgs[-1].metadata
            if meta.num_pending == 0 or meta.sequence.stream >= last_seq:
                break
    finally:
        try:
            await asyncio.wait_for(psub.unsubscribe(), timeout=wait_s)
        except Exception:  # the ephemeral consumer expires by itself (inactive_threshold)
            pass
    return jobs, events, stamps
