"""Routing proposals: which engine and model to prefer per profile, from the last weeks of runs.

Read from ``job_outcomes`` (:mod:`economics.runs`): per profile and per (engine, model) that
ran it, the **pass rate** (shipped / ended), the **cost per shipped job** (all the cost of its
jobs, failed ones included, over the shipped ones) and the **p95 latency** (submission to end,
of shipped jobs). The proposal for a profile is the candidate with the highest pass rate, then
the lowest cost per shipped job, then the lowest p95, among those with at least ``min_jobs``
ended jobs whose cost per shipped job is within the per-feature budget (the seed: never
propose a rotation whose expected per-feature cost exceeds the budget). A candidate over the
budget is listed as excluded, with why; a profile with no candidate left gets no proposal.

A proposal is a file (:func:`proposal`) an operator reads and applies by hand (the profile's
``prefers`` line it suggests); nothing here changes routing by itself. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

MIN_JOBS = 3
"""Fewer ended jobs than this say too little about a candidate to propose it."""


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank), None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def candidate_stats(outcomes: Iterable[dict]) -> dict[str, dict[tuple[str, str], dict]]:
    """profile -> (engine, model) -> {ended, shipped, pass_rate, cost_usd, cost_per_shipped_usd, p95_latency_s}.

    :param outcomes: ``job_outcomes`` rows (``profile`` None counts as ``none``).
    """
    acc: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for o in outcomes:
        key = (o.get("engine") or "?", o.get("model") or "?")
        c = acc[o.get("profile") or "none"].setdefault(key, {"ended": 0, "shipped": 0, "cost_usd": 0.0, "lat": []})
        c["ended"] += 1
        c["cost_usd"] += o.get("cost_usd") or 0.0
        if o.get("stage") == "shipped":
            c["shipped"] += 1
            c["lat"].append(o.get("latency_s") or 0.0)
    for per in acc.values():
        for c in per.values():
            lat = c.pop("lat")
            c["pass_rate"] = c["shipped"] / c["ended"]
            c["cost_per_shipped_usd"] = c["cost_usd"] / c["shipped"] if c["shipped"] else None
            c["p95_latency_s"] = p95(lat)
            c["cost_usd"] = round(c["cost_usd"], 6)
    return acc


def propose(outcomes: Iterable[dict], per_feature_budget_usd: float | None, min_jobs: int = MIN_JOBS) -> dict:
    """Per profile: the proposed (engine, model), the others ranked, the excluded with why.

    :param outcomes: ``job_outcomes`` rows of the window.
    :param per_feature_budget_usd: the ceiling on a candidate's cost per shipped job (None: none).
    :param min_jobs: fewest ended jobs for a candidate to be proposed.
    """
    out: dict[str, dict] = {}
    for profile, cands in sorted(candidate_stats(outcomes).items()):
        ranked, excluded = [], []
        for (engine, model), c in cands.items():
            entry = {"engine": engine, "model": model, **c}
            if c["ended"] < min_jobs:
                excluded.append({**entry, "why": f"only {c['ended']} ended jobs (< {min_jobs})"})
            elif c["cost_per_shipped_usd"] is None:
                excluded.append({**entry, "why": "nothing shipped"})
            elif per_feature_budget_usd is not None and c["cost_per_shipped_usd"] > per_feature_budget_usd:
                excluded.append({**entry, "why": f"${c['cost_per_shipped_usd']:.4f} per shipped job > per-feature "
                                                 f"budget ${per_feature_budget_usd:.4f}"})
            else:
                ranked.append(entry)
        ranked.sort(key=lambda e: (-e["pass_rate"], e["cost_per_shipped_usd"], e["p95_latency_s"] or 0.0))
        best = ranked[0] if ranked else None
        out[profile] = {
            "prefer": {"engine": best["engine"], "model": best["model"]} if best else None,
            "prefers_line": f"prefers: [engine:{best['engine']}]" if best else None,
            "why": (f"pass rate {best['pass_rate']:.0%}, ${best['cost_per_shipped_usd']:.4f} per shipped job, "
                    f"p95 {best['p95_latency_s'] or 0:.0f}s" if best else "no candidate within the budget and data"),
            "ranked": ranked, "excluded": excluded}
    return out


def proposal(outcomes: list[dict], budget: dict | None, *, since_s: float, generated_at_s: float,
             min_jobs: int = MIN_JOBS) -> dict:
    """The proposal document written for the operator.

    :param outcomes: ``job_outcomes`` rows since ``since_s``.
    :param budget: the budget computation (``Budget.to_dict()``) it was constrained by, or None.
    """
    per_feature = budget["per_feature_budget_usd"] if budget else None
    return {"kind": "gigafactory-routing-proposal", "generated_at_s": generated_at_s, "since_s": since_s,
            "jobs_read": len(outcomes), "per_feature_budget_usd": per_feature,
            "budget_computation_id": budget.get("computation_id") if budget else None,
            "apply": "a proposal, not a change: set each profile's 'prefers' line by hand if you agree",
            "profiles": propose(outcomes, per_feature, min_jobs)}
