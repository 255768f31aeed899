"""The coordinator's budget governor: reads the signals and the ledger, computes today's budget
(:mod:`economics.budget`, pure), and decides per job before its kickoff. Every reading, every
new computation and every decision is on ``GF_EVENTS`` with its inputs (the auditable trail):

- ``budget_signals`` (fleet event): the reading (values, source, digest) each time it is read;
- ``budget_computed`` (fleet event): a new computation (factors, daily and per-feature budget,
  policy, the reading's digest) under its ``computation_id``;
- per job: the ``dispatched`` event carries ``data.budget`` (the decision), a ``budget`` hold
  says so in the job's reason and ``held`` event, both naming the ``computation_id``.

The residual daily budget is today's budget less the ledger's spend since midnight UTC. The
ledger and the readings are read at most every ``budget_signals_max_age_s`` (and before a pass
that has queued jobs), so a busy coordinator does not read the whole ledger per pass."""

from __future__ import annotations

import collections
import logging
import time

from gigafactory.schemas.records import EventRecord, JobRecord

from . import budget as B
from .signals import read_signals

log = logging.getLogger(__name__)

DECISIONS_KEPT = 10_000
"""Latest decisions kept for the ``dispatched`` events (oldest dropped first)."""
SIMILAR_RUNS = 20
"""At most this many recent similar attempts make a projection."""
SIMILAR_WINDOW_S = 14 * 86400
"""Similar attempts are looked for in the last this-many seconds of the ledger."""


def day_start_s(now_s: float) -> float:
    """Midnight UTC of ``now_s``'s day (the residual budget's day)."""
    return now_s - now_s % 86400


class Governor:
    """One per scheduler. ``refresh`` before a pass (async, I/O); ``decide`` in it (pure)."""

    def __init__(self, broker, settings, actor: str, publish, ledger=None) -> None:
        """:param publish: ``async (EventRecord) -> bool`` (the scheduler's event publisher).
        :param ledger: the coordinator's :class:`~gigafactory.economics.ledger.LedgerPass`, whose
            running totals are read incrementally (None, or set later as ``ledger``: the
            ledger's last :data:`SIMILAR_WINDOW_S` is read whole at each refresh)."""
        self.broker, self.settings, self.actor, self.publish = broker, settings, actor, publish
        self.ledger = ledger
        self.policy = B.policy_from_settings(settings)
        self.budget: B.Budget | None = None
        self.read_at_mono = -1e18
        self.spent_today_usd = 0.0
        self.attempt_costs: list[tuple[str, str, float]] = []
        """(profile, engine, cost) of recent finished attempts, newest last."""
        self.ledger_note = ""
        self.error = ""
        self.decisions: collections.OrderedDict[str, B.Decision] = collections.OrderedDict()

    @property
    def enforcement(self) -> bool:
        return bool(self.settings.pipeline_budget_enforcement)

    async def refresh(self) -> None:
        """Read the signals and the ledger again if the last reading is older than
        ``budget_signals_max_age_s``; a failed read keeps the last budget (or, with none yet, a
        budget of 0 when enforcement is on: no reading, no spend) and is logged."""
        if time.monotonic() - self.read_at_mono < self.settings.budget_signals_max_age_s and self.budget is not None:
            return
        self.read_at_mono = time.monotonic()
        try:
            signals = await read_signals(self.settings)
            self.error = ""
        except B.SignalsError as e:
            self.error = str(e)
            log.warning("budget signals not read: %s", e)
            if self.budget is not None:
                return
            signals = B.Signals(source=f"error: {e}", read_at_s=time.time(),
                                cash_balance_usd=0.0 if self.enforcement else None, monthly_burn_usd=1.0)
        await self.publish(EventRecord(kind="budget_signals", at=time.time(), actor=self.actor,
                                       reason=signals.source, data=signals.to_dict()))
        await self._read_ledger()
        new = B.compute(signals, self.policy)
        if self.budget is None or new.computation_id != self.budget.computation_id:
            await self.publish(EventRecord(
                kind="budget_computed", at=time.time(), actor=self.actor,
                reason=f"daily ${new.daily_pipeline_budget_usd:.2f}, per feature ${new.per_feature_budget_usd:.2f}; "
                       f"{B.enforcement_line(self.enforcement)}",
                data={**new.to_dict(), "enforcement": self.enforcement, "spent_today_usd": self.spent_today_usd,
                      "ledger": self.ledger_note}))
        self.budget = new

    async def _read_ledger(self) -> None:
        """Spend since midnight UTC and recent attempts' costs, from the ledger (``GF_SPEND``):
        the coordinator's running totals when it has them (what was stored since the last
        read), else the last :data:`SIMILAR_WINDOW_S` of the ledger, read whole."""
        now = time.time()
        if self.ledger is not None:
            try:
                totals = await self.ledger.catch_up()
            except Exception as e:  # a ledger that cannot be read must not stop dispatch
                self.ledger_note = f"ledger not read: {type(e).__name__}: {e}"
                log.warning("budget: %s", self.ledger_note)
                return
            self.spent_today_usd = totals.spent_on_day_usd(now)
            self.attempt_costs = totals.finished_attempts(now - SIMILAR_WINDOW_S)
            self.ledger_note = f"{totals.records} records read (running totals)"
            return
        try:
            from .ledger import read_spend  # the ledger helper's reader (issue 13)
        except ImportError:
            self.ledger_note = "no ledger in this build: spend today counted as 0"
            return
        try:
            records = await read_spend(self.broker, since_s=now - SIMILAR_WINDOW_S)
        except Exception as e:  # a ledger that cannot be read must not stop dispatch
            self.ledger_note = f"ledger not read: {type(e).__name__}: {e}"
            log.warning("budget: %s", self.ledger_note)
            return
        day0 = day_start_s(now)
        self.spent_today_usd = sum(r.cost_usd for r in records if r.at >= day0)
        per_attempt: dict[tuple[str, int], list] = {}
        for r in records:
            if r.job:
                a = per_attempt.setdefault((r.job, r.epoch), [r.profile or "", r.engine or "", 0.0, False])
                a[2] += r.cost_usd
                a[3] = a[3] or r.kind == "final"
        self.attempt_costs = [(p, e, c) for p, e, c, final in per_attempt.values() if final]
        self.ledger_note = f"{len(records)} records read"

    def projection(self, rec: JobRecord) -> tuple[float, str]:
        """The job's projected cost (:func:`economics.budget.project_cost`)."""
        profile = rec.profile.name if rec.profile is not None else ""
        engine = rec.manifest.engine or ""
        similar = [c for p, e, c in self.attempt_costs if p == profile and e == engine][-SIMILAR_RUNS:]
        return B.project_cost(rec.manifest.budget.usd, similar, self.policy.default_projected_usd)

    def decide(self, rec: JobRecord) -> str | None:
        """The hold reason for ``rec`` (``budget: ...``), or None: it may start. Kept for
        :meth:`trail` (the ``dispatched`` event's ``data.budget``)."""
        if self.budget is None:
            return None
        projected, how = self.projection(rec)
        d = B.decide(self.budget, projected_usd=projected, projection=how, spent_today_usd=self.spent_today_usd,
                     enforcement=self.enforcement, override=rec.budget_override)
        self.decisions[rec.id] = d
        self.decisions.move_to_end(rec.id)
        while len(self.decisions) > DECISIONS_KEPT:
            self.decisions.popitem(last=False)
        return None if d.allowed else d.reason

    def trail(self, job: str) -> dict:
        """The decision made for ``job`` (empty if none), for its events."""
        d = self.decisions.get(job)
        return {"budget": {**d.to_dict(), "line": B.enforcement_line(d.enforcement)}} if d else {}

    def state(self) -> dict:
        """For ``report budget`` and the metrics."""
        return {"enforcement": self.enforcement, "line": B.enforcement_line(self.enforcement),
                "budget": self.budget.to_dict() if self.budget else None, "spent_today_usd": self.spent_today_usd,
                "residual_usd": (self.budget.daily_pipeline_budget_usd - self.spent_today_usd) if self.budget else None,
                "ledger": self.ledger_note, "signals_error": self.error}
