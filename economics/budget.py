"""Budgets from business signals, and the enforcement decision, sans-I/O.

The fleet may not optimise throughput in isolation: cash bounds it. Before each kickoff (a
dispatch of a job) the coordinator reads the operator's business signals (cash balance, monthly
burn, revenue, funnel: :mod:`economics.signals`), and this module turns them into today's budget
and a decision per job. Everything here is a pure function of plain values, so each case is a
table test and each decision can be recomputed from what its event recorded.

The formulas (the product owner's, with the factors defined here):

- ``daily_pipeline_budget_usd = monthly_pipeline_budget_usd / days_per_month
  × cash_runway_factor × revenue_growth_factor``. The seed writes ``monthly_pipeline_budget ×
  factors``, reading the monthly budget as the day's share of it; ``days_per_month`` makes
  that explicit (set it to 1 to take the formula to the letter).
- ``cash_runway_factor``: runway = ``cash_balance_usd / monthly_burn_usd`` months. At or below
  ``runway_floor_months`` it is 0 (no discretionary spend when cash is about to run out);
  at ``runway_target_months`` it is 1; it grows linearly between and beyond, capped at
  ``runway_factor_max``. No burn (or burn ≤ 0): the cap. No cash signal: 1 (neutral, noted).
- ``revenue_growth_factor``: growth = ``revenue_usd / revenue_prev_usd - 1`` (this period's
  revenue over the previous one's); the factor is ``1 + growth_sensitivity × growth``, clamped
  to ``[growth_factor_min, growth_factor_max]``. No revenue history (the pilot: revenue is
  zero): 1 (neutral, noted), so a zero revenue does not zero the budget.
- ``per_feature_budget_usd = daily_pipeline_budget_usd / expected_features_today``.

The decision (:func:`decide`): with enforcement on, a job is held (reason ``budget``) before
it starts when its projected cost exceeds the residual daily budget (today's budget less what
the ledger says was spent since midnight UTC) or the per-run cap; an operator override lets it
go. With enforcement off (the pilot) every job goes, and the decision still says what would
have happened. The projection (:func:`project_cost`) is, in order: the job's own ``budget.usd``
(the most it may spend), else the mean cost of the recent similar jobs (same profile and
engine) in the ledger, else ``default_projected_usd``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping

SIGNAL_FIELDS = ("cash_balance_usd", "monthly_burn_usd", "revenue_usd", "revenue_prev_usd")
"""The numeric signals a reading may carry (each optional); ``funnel`` is a map of name -> number."""


class SignalsError(ValueError):
    """A signals document that cannot be used; the message names the source, the field and
    what to do."""


@dataclasses.dataclass(frozen=True)
class Signals:
    """One reading of the business signals."""

    cash_balance_usd: float | None = None
    monthly_burn_usd: float | None = None
    revenue_usd: float | None = None
    """Revenue of the latest period (a month, or the operator's choice: the ratio is what counts)."""
    revenue_prev_usd: float | None = None
    """Revenue of the period before it."""
    funnel: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Funnel figures (visitors, signups, ...): recorded with the reading, not used by the formulas."""
    source: str = ""
    """Where it came from (``file:<path>``, ``command:<argv0>``, or ``none``)."""
    read_at_s: float = 0.0
    digest: str = ""
    """sha256 of the raw document (the audit trail points to a reading by it)."""

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in SIGNAL_FIELDS}, "funnel": dict(self.funnel),
                "source": self.source, "read_at_s": self.read_at_s, "digest": self.digest}


def parse_signals(raw: bytes, source: str, read_at_s: float) -> Signals:
    """A reading from a JSON object ``{"cash_balance_usd": .., "monthly_burn_usd": ..,
    "revenue_usd": .., "revenue_prev_usd": .., "funnel": {..}}`` (every key optional; unknown
    keys refused so that a misspelt signal is not silently neutral).

    :param raw: the document's bytes (already bounded by the reader).
    :param source: named in errors and recorded (``file:/path`` or ``command:name``).
    :param read_at_s: when it was read (epoch seconds).
    """
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise SignalsError(f"{source}: not JSON ({e}); write an object such as "
                           f'{{"cash_balance_usd": 250000, "monthly_burn_usd": 40000}}') from None
    if not isinstance(doc, dict):
        raise SignalsError(f"{source}: expected a JSON object of signals, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(SIGNAL_FIELDS) - {"funnel"})
    if unknown:
        raise SignalsError(f"{source}: unknown signal {unknown[0]!r}; the signals are "
                           f"{', '.join(SIGNAL_FIELDS)} and funnel")
    values: dict = {}
    for k in SIGNAL_FIELDS:
        v = doc.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise SignalsError(f"{source}: {k} = {v!r} is not a number of dollars; give a number or leave it out")
        values[k] = None if v is None else float(v)
    funnel = doc.get("funnel") or {}
    if not isinstance(funnel, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                           for v in funnel.values()):
        raise SignalsError(f"{source}: funnel must be an object of name -> number")
    return Signals(**values, funnel={str(k): float(v) for k, v in funnel.items()}, source=source,
                   read_at_s=read_at_s, digest=hashlib.sha256(raw).hexdigest())


@dataclasses.dataclass(frozen=True)
class Policy:
    """How signals become a budget (the operator's settings; see the module's formulas)."""

    monthly_pipeline_budget_usd: float
    days_per_month: float = 30.0
    runway_floor_months: float = 3.0
    runway_target_months: float = 12.0
    runway_factor_max: float = 1.5
    growth_sensitivity: float = 1.0
    growth_factor_min: float = 0.5
    growth_factor_max: float = 1.5
    expected_features_today: float = 10.0
    max_cost_per_run_usd: float | None = None
    default_projected_usd: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the setting when a value makes the formulas meaningless."""
        pos = {"days_per_month": self.days_per_month, "expected_features_today": self.expected_features_today,
               "runway_factor_max": self.runway_factor_max, "growth_factor_max": self.growth_factor_max}
        for k, v in pos.items():
            if not v > 0:
                raise ValueError(f"budget {k} = {v:g}: must be more than 0")
        if self.monthly_pipeline_budget_usd < 0:
            raise ValueError("monthly_pipeline_budget_usd must not be negative")
        if not self.runway_target_months > self.runway_floor_months >= 0:
            raise ValueError("budget runway: need runway_target_months > runway_floor_months >= 0")
        if not 0 <= self.growth_factor_min <= 1 <= self.growth_factor_max:
            raise ValueError("budget growth factor: need growth_factor_min <= 1 <= growth_factor_max, min >= 0")


def cash_runway_factor(s: Signals, p: Policy) -> tuple[float, str]:
    """The runway factor and a note saying how it was made."""
    if s.cash_balance_usd is None:
        return 1.0, "no cash signal: neutral 1"
    if s.monthly_burn_usd is None or s.monthly_burn_usd <= 0:
        return p.runway_factor_max, "no burn: the cap"
    runway = s.cash_balance_usd / s.monthly_burn_usd
    if runway <= p.runway_floor_months:
        return 0.0, f"runway {runway:.2f} months <= floor {p.runway_floor_months:g}: 0"
    f = (runway - p.runway_floor_months) / (p.runway_target_months - p.runway_floor_months)
    return min(f, p.runway_factor_max), f"runway {runway:.2f} months"


def revenue_growth_factor(s: Signals, p: Policy) -> tuple[float, str]:
    """The revenue growth factor and a note saying how it was made."""
    if s.revenue_usd is None or not s.revenue_prev_usd:
        return 1.0, "no revenue history: neutral 1"
    growth = s.revenue_usd / s.revenue_prev_usd - 1
    f = 1 + p.growth_sensitivity * growth
    return min(max(f, p.growth_factor_min), p.growth_factor_max), f"revenue growth {growth:+.3f}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Today's budget, with every input that made it."""

    daily_pipeline_budget_usd: float
    per_feature_budget_usd: float
    cash_runway_factor: float
    revenue_growth_factor: float
    notes: tuple[str, ...]
    policy: Policy
    signals: Signals

    @functools.cached_property
    def computation_id(self) -> str:
        """A short hash of the inputs and outputs: the trail from a decision to this budget.
        Computed once per budget (it is frozen): every dispatch decision names it, and a JSON
        dump and hash per queued job per pass were 4% of the coordinator's CPU under load."""
        d = self.to_dict(with_id=False)
        d["signals"].pop("read_at_s")  # the same figures read again are the same computation
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self, with_id: bool = True) -> dict:
        d = {"daily_pipeline_budget_usd": round(self.daily_pipeline_budget_usd, 6),
             "per_feature_budget_usd": round(self.per_feature_budget_usd, 6),
             "cash_runway_factor": round(self.cash_runway_factor, 6),
             "revenue_growth_factor": round(self.revenue_growth_factor, 6),
             "notes": list(self.notes), "policy": dataclasses.asdict(self.policy),
             "signals": self.signals.to_dict()}
        if with_id:
            d["computation_id"] = self.computation_id
        return d


def compute(s: Signals, p: Policy) -> Budget:
    """Today's budget from a reading and the policy (pure).

    :param s: the signals reading.
    :param p: the policy (checked by the caller: :meth:`Policy.check`).
    """
    runway, rn = cash_runway_factor(s, p)
    growth, gn = revenue_growth_factor(s, p)
    daily = p.monthly_pipeline_budget_usd / p.days_per_month * runway * growth
    return Budget(daily, daily / p.expected_features_today, runway, growth, (rn, gn), p, s)


def project_cost(budget_usd: float | None, recent_costs_usd: list[float], default_usd: float) -> tuple[float, str]:
    """A job's projected cost and how it was made (see the module's order).

    :param budget_usd: the job's ``budget.usd`` (None: none).
    :param recent_costs_usd: costs of recent similar attempts (same profile and engine) in the ledger.
    :param default_usd: the projection when nothing is known.
    """
    if budget_usd is not None:
        return budget_usd, "the job's budget.usd"
    if recent_costs_usd:
        return sum(recent_costs_usd) / len(recent_costs_usd), f"mean of {len(recent_costs_usd)} recent similar runs"
    return default_usd, "default projection (no budget.usd, no similar run)"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether a job may start, and the trail back to the budget computation."""

    allowed: bool
    enforcement: bool
    would_hold: bool
    """What enforcement would decide (also when it is off: the pilot sees what it would veto)."""
    reason: str
    projected_usd: float
    projection: str
    residual_usd: float
    spent_today_usd: float
    computation_id: str
    override: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide(budget: Budget, *, projected_usd: float, projection: str, spent_today_usd: float,
           enforcement: bool, override: str = "") -> Decision:
    """May a job start? (pure)

    :param budget: today's budget (:func:`compute`).
    :param projected_usd: the job's projected cost (:func:`project_cost`).
    :param projection: how the projection was made (recorded).
    :param spent_today_usd: the ledger's spend since midnight UTC.
    :param enforcement: ``pipeline_budget_enforcement``.
    :param override: who overrode the budget for this job ("" for nobody).
    """
    residual = budget.daily_pipeline_budget_usd - spent_today_usd
    cap = budget.policy.max_cost_per_run_usd
    why = ""
    if cap is not None and projected_usd > cap:
        why = f"budget: projected ${projected_usd:.4f} ({projection}) > per-run cap ${cap:g}"
    elif projected_usd > residual:
        why = (f"budget: projected ${projected_usd:.4f} ({projection}) > residual daily budget "
               f"${max(residual, 0):.4f} (${budget.daily_pipeline_budget_usd:.4f} - ${spent_today_usd:.4f} spent)")
    would_hold = bool(why)
    allowed = not (enforcement and would_hold and not override)
    reason = why if not allowed else (f"{why}; overridden by {override}" if why and override and enforcement
                                      else why or "within budget")
    cid = budget.computation_id
    return Decision(allowed, enforcement, would_hold, reason + f" [budget {cid}]",
                    projected_usd, projection, residual, spent_today_usd, cid, override)


def enforcement_line(enforcement: bool) -> str:
    """What every kickoff logs."""
    return "budget enforcement ON" if enforcement else "budget enforcement OFF (pilot mode)"


def cap_crossed(cost_usd: float | None, cap_usd: float | None) -> str | None:
    """Why a running job's cost has passed the per-run cap (``max_cost_per_run_usd``), or None.

    :param cost_usd: its cost so far (None: not known yet; never judged as over).
    :param cap_usd: the cap (None: no cap).
    """
    if cap_usd is None or cost_usd is None or cost_usd <= cap_usd:
        return None
    return f"per-run cap exceeded: ${cost_usd:.4f} spent > GIGAFACTORY_MAX_COST_PER_RUN_USD ${cap_usd:g}"


def policy_from_settings(s) -> Policy:
    """The :class:`Policy` of a :class:`~gigafactory.config.Settings` (its budget fields)."""
    return Policy(
        monthly_pipeline_budget_usd=s.monthly_pipeline_budget_usd, days_per_month=s.budget_days_per_month,
        runway_floor_months=s.budget_runway_floor_months, runway_target_months=s.budget_runway_target_months,
        runway_factor_max=s.budget_runway_factor_max, growth_sensitivity=s.budget_growth_sensitivity,
        growth_factor_min=s.budget_growth_factor_min, growth_factor_max=s.budget_growth_factor_max,
        expected_features_today=s.expected_features_today, max_cost_per_run_usd=s.max_cost_per_run_usd,
        default_projected_usd=s.budget_default_projected_usd)
