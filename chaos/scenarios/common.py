"""What the scenarios share: short verified jobs, a seeded trickle of them, and the bounds
every scenario waits within."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from ..harness import Hit, Lab, ledger_script

RECLAIM_SLACK_S = 0.5
"""Allowance on top of ``lease_ttl_s + reaper_interval_s`` for the reaper's own pass (a clock
probe, the compare-and-set) and the publish of its event, on a loaded two-core machine."""

SETTLE_TIMEOUT_S = 60.0
"""Bound on the fleet finishing every acknowledged job once the chaos has stopped."""
DISPATCH_RESUME_S = 5.0
"""Bound on a job submitted after a broker restart (once every client is back) being claimed."""
READY_BOUND_S = 60.0
"""Bound on a scheduled restart or resume (including its wait for evidence) completing."""


def short_job(lab: Lab, rng: random.Random, lo_s: float, hi_s: float, *, gate: Path | str | None = None,
               **manifest) -> str:
    """A job that works (sleeps) for a seeded time in ``[lo_s, hi_s]``, writes a marker named
    by its job and epoch, and is verified by it; review-policy auto (so it ships) and a
    generous retry budget (so chaos does not dead-letter it: every reclaim costs one retry).
    With ``gate``, it first waits (at most a minute) for that file to exist, so the lab
    decides when it may end. Its side effects go to the lab's ledger (``start``, ``progress``
    while it waits and works, ``END``: see :func:`ledger_script`)."""
    sleep_s = round(rng.uniform(lo_s, hi_s), 2)
    return ledger_job(lab, sleep_s, gate=gate, **manifest)


def ledger_job(lab: Lab, work_s: float, *, gate: Path | str | None = None, **manifest) -> str:
    """:func:`short_job` with an exact work time (a long job, say)."""
    manifest.setdefault("retry", {"max": 50, "backoff": "0.1s"})
    return lab.job(
        ledger_script(lab.ledger, work_s, gate=gate,
                      then='echo "$GF_FACTORY $GF_EPOCH" > "out/$GF_JOB_ID-e$GF_EPOCH"'),
        verify='test -s "out/$GF_JOB_ID-e$GF_EPOCH"', review_policy="auto", **manifest,
    )


async def trickle(lab: Lab, rng: random.Random, until_mono: float, *, batch: tuple[int, int],
                   gap_s: tuple[float, float], sleep_s: tuple[float, float], stats: dict, **manifest) -> None:
    """Submit batches of short jobs until ``until_mono`` (the load; its pauses are the schedule).
    ``manifest`` adds to each job's manifest (``capabilities=[...]`` to keep it in one lane)."""
    while time.monotonic() < until_mono:
        texts = [short_job(lab, rng, *sleep_s, **manifest) for _ in range(rng.randint(*batch))]
        ids = await lab.submit(texts)
        stats["batches"] += 1
        stats["submitted"] += len(texts)
        stats["acknowledged"] += len(ids)
        await asyncio.sleep(rng.uniform(*gap_s))


def own_leases(hit: Hit, hits: list[Hit]) -> list[tuple[str, int]]:
    """The leases a paused factory holds in *this* incarnation: a lease left by an earlier
    incarnation that was SIGKILLed (and not reaped yet) names the same factory id, but the
    restarted process knows nothing of it, so there is nothing to fence; the reaper takes it."""
    inherited = {lease for h in hits if h.action == "kill" and h.factory == hit.factory
                 and h.at_broker < hit.at_broker for lease in h.held}
    return [lease for lease in hit.held if lease not in inherited]


def held_outcomes(hits: list[Hit], reclaims: dict, audit_by_job: dict) -> tuple[dict[str, list[float]], list[str], int]:
    """For every lease a hit factory held: the time from the first hit that found it to the
    reaper's reclaim (broker time), by the kind of hit. A lease whose holder's own result or
    hand-back was already on its way when the signal landed is not a reclaim; it is counted
    apart. Returns (reclaim times by action, leases neither reclaimed nor ended by their
    holder, in-flight endings)."""
    times: dict[str, list[float]] = {"kill": [], "pause": []}
    missing, in_flight = [], 0
    seen: set[tuple[str, int]] = set()
    for hit in sorted(hits, key=lambda h: h.at_broker):
        for job, epoch in hit.held:
            if (job, epoch) in seen:
                continue  # held again at a later hit (restarted, then hit again before the reaper ran)
            seen.add((job, epoch))
            rec = reclaims.get((job, epoch))
            if rec is not None:
                times[hit.action].append(rec.ts - hit.at_broker)
                continue
            own = [a for a in audit_by_job.get(job, ()) if a.event.kind in ("finished", "handed_back")
                   and a.event.epoch == epoch and a.event.factory == hit.factory]
            if own:
                in_flight += 1
            else:
                missing.append(f"{job} epoch {epoch} held by {hit.factory} at its {hit.action}")
    return times, missing, in_flight
