"""The load suite's arithmetic, with no I/O: percentiles, latency summaries, ratios to the
baseline, targets, and the results table (text and markdown).

Everything here is a pure function over plain values, so the figures a run reports can be
checked by a unit test. A target is *reported*, never asserted: :func:`judge` says met,
missed or n/a, and the run carries on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default); None for no values."""
    assert 0.0 <= q <= 100.0, q
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summary_ms(seconds: Iterable[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max of durations given in seconds, reported in milliseconds, with the count.
    Negative durations (clock steps) are kept as measured: the caller sees them in ``min_ms``."""
    xs = [s * 1000.0 for s in seconds]
    return {
        "n": len(xs),
        "p50_ms": _r(percentile(xs, 50)),
        "p95_ms": _r(percentile(xs, 95)),
        "p99_ms": _r(percentile(xs, 99)),
        "max_ms": _r(max(xs)) if xs else None,
        "min_ms": _r(min(xs)) if xs else None,
    }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def ratio(ours: float | None, baseline: float | None) -> float | None:
    """``ours / baseline``; None when either is missing or the baseline is zero."""
    if ours is None or baseline is None or baseline == 0:
        return None
    return ours / baseline


def rate(count: int, seconds: float | None) -> float | None:
    """``count / seconds``; None for an empty or zero-length window."""
    if not seconds or seconds <= 0 or count <= 0:
        return None
    return count / seconds


def per_job(total: float | None, jobs: int) -> float | None:
    if total is None or jobs <= 0:
        return None
    return total / jobs


def cpu_total_ms(cpu_ms_per_job: dict[str, float | None]) -> float | None:
    """CPU per job of all processes: the sum of the components measured (None: none was)."""
    vals = [v for v in cpu_ms_per_job.values() if v is not None]
    return sum(vals) if vals else None


def ms_per_job(throughput_jobs_per_s: float | None) -> float | None:
    """Wall time per job at a throughput (``1000 / throughput``); None for no throughput."""
    if not throughput_jobs_per_s or throughput_jobs_per_s <= 0:
        return None
    return 1000.0 / throughput_jobs_per_s


def difference(a: float | None, b: float | None) -> float | None:
    """``a - b``; None when either is missing."""
    if a is None or b is None:
        return None
    return a - b


def deviation_pct(measured: float | None, model: float | None) -> float | None:
    """How far ``measured`` is off ``model``, in percent of the model (signed: above is
    positive); None without a model."""
    if measured is None or not model:
        return None
    return 100.0 * (measured - model) / model


# -- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target from the issue: ``value <op> bound``. ``op`` is one of ``>=``, ``<=``, ``<``,
    ``>``, ``==``; ``text`` is how the table shows it."""

    op: str
    bound: float
    text: str

    def met(self, value: float | None) -> bool | None:
        """True/False, or None when there is no value to judge."""
        if value is None:
            return None
        return {">=": value >= self.bound, ">": value > self.bound, "<=": value <= self.bound,
                "<": value < self.bound, "==": value == self.bound}[self.op]


def judge(value: float | None, target: Target | None) -> str:
    """``met``, ``missed``, ``n/a`` (no value) or ``""`` (no target)."""
    if target is None:
        return ""
    ok = target.met(value)
    return "n/a" if ok is None else ("met" if ok else "missed")


@dataclass
class Row:
    """One line of the results table."""

    figure: str
    value: float | int | str | None
    unit: str = ""
    baseline: float | int | None = None
    ratio: float | None = None
    target: Target | None = None
    verdict: str = ""
    note: str = ""
    """What bounds the figure when a target is missed, or how it was measured."""

    def to_dict(self) -> dict[str, Any]:
        return {"figure": self.figure, "value": self.value, "unit": self.unit, "baseline": self.baseline,
                "ratio": None if self.ratio is None else round(self.ratio, 4),
                "target": self.target.text if self.target else None, "verdict": self.verdict, "note": self.note}


def row(figure: str, value, unit: str = "", *, baseline=None, target: Target | None = None,
        judge_on: str = "value", note: str = "") -> Row:
    """A row with its ratio to the baseline and its verdict. ``judge_on`` is ``value`` (the
    target bounds the figure) or ``ratio`` (it bounds ours / baseline)."""
    num = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    rt = ratio(num, baseline) if baseline is not None else None
    verdict = judge(rt if judge_on == "ratio" else num, target)
    return Row(figure, value, unit, baseline, rt, target, verdict, note)


@dataclass
class Table:
    title: str
    rows: list[Row] = field(default_factory=list)

    def add(self, r: Row) -> Row:
        self.rows.append(r)
        return r


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


COLUMNS = ("figure", "value", "baseline", "ratio", "target", "met")


def _cells(r: Row) -> list[str]:
    value = fmt(r.value) + (f" {r.unit}" if r.unit and r.value is not None else "")
    base = fmt(r.baseline) + (f" {r.unit}" if r.unit and r.baseline is not None else "")
    return [r.figure, value, base if r.baseline is not None else "",
            f"{r.ratio:.2f}" if r.ratio is not None else "", r.target.text if r.target else "", r.verdict]


def to_text(tables: list[Table]) -> str:
    """Fixed-width tables with notes under the rows that carry one."""
    out: list[str] = []
    for t in tables:
        cells = [_cells(r) for r in t.rows]
        widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(COLUMNS)]
        out.append(f"== {t.title}")
        out.append("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip())
        for r, cs in zip(t.rows, cells):
            out.append("  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip())
            if r.note and r.verdict in ("missed", "n/a"):
                out.append(f"    ^ {r.note}")
        out.append("")
    return "\n".join(out)


def to_markdown(tables: list[Table]) -> str:
    """One markdown table per section, for docs/load-results.md."""
    out: list[str] = []
    for t in tables:
        out.append(f"**{t.title}**\n")
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "|".join("---" for _ in COLUMNS) + "|")
        for r in t.rows:
            cs = _cells(r)
            if r.note and r.verdict in ("missed", "n/a"):
                cs[-1] = f"{cs[-1]}: {r.note}"
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cs) + " |")
        out.append("")
    return "\n".join(out)


# -- timelines ------------------------------------------------------------------------------


def busy_fraction(intervals: Sequence[tuple[float, float]], stations: int, start: float, end: float) -> float | None:
    """Share of ``stations × (end - start)`` covered by the busy ``intervals`` (claim to
    terminal), each clipped to the window; None for an empty window."""
    if end <= start or stations <= 0:
        return None
    busy = 0.0
    for a, b in intervals:
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            busy += hi - lo
    return busy / (stations * (end - start))


def overtaken(critical: Sequence[tuple[float, float]], backlog_claims: Sequence[float]) -> list[int]:
    """For each critical job (submitted, claimed), how many backlog jobs were claimed after it
    was submitted and before it was claimed: the backlog dispatched ahead of it."""
    claims = sorted(backlog_claims)
    out = []
    for sub, claim in critical:
        out.append(sum(1 for c in claims if sub < c < claim))
    return out
