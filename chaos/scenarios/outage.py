"""Scenario 7, total outage with work running."""

from __future__ import annotations

import asyncio
import time

from gigafactory.schemas.lifecycle import Stage

from ..harness import Expectations, Lab, ScenarioConfig, ScenarioResult, scenario
from .common import (
    SETTLE_TIMEOUT_S,
    short_job,
)

# -- 7. total outage with work running ------------------------------------------------------------


@scenario("total-outage",
          "the broker stopped while jobs run: jobs finish anyway, results wait in each factory's durable "
          "outbox, and on reconnect are published, or quarantined if the lease was reclaimed meanwhile")
async def total_outage(cfg: ScenarioConfig) -> ScenarioResult:
    exp = Expectations()
    notes: list[str] = []
    # A lease long enough that a prompt return finds it still held (results published), and a
    # short request timeout so a result meets the dead broker, and the outbox, soon after its job.
    timings = {"lease_ttl_s": 8.0, "lease_renew_s": 1.0, "request_timeout_s": 1.5}
    fids, stations = ["f1", "f2"], 2
    async with Lab(cfg.workdir, seed=cfg.seed, timings=timings, factory_env=cfg.factory_env) as lab:
        load_rng, chaos_rng = lab.random("load"), lab.random("chaos")
        ttl = lab.settings.lease_ttl_s
        for fid in fids:
            await lab.start_factory(fid, stations=stations)
        # Round kinds: 'prompt' (everyone returns as soon as the results wait in the outboxes:
        # the leases still hold, so the results are published) and 'late' (the factories return
        # only after the reaper has reclaimed their leases, as a factory whose reconnect jitter
        # outlasts its lease would: their results are quarantined). The full form alternates
        # them, in a seeded order, until its duration is spent.
        kinds = ["prompt", "late"]
        if not cfg.bounded:
            t_end = time.monotonic() + cfg.duration_s
            kinds = []
        rounds: list[dict] = []
        outbox_max = 0
        while True:
            if cfg.bounded:
                if len(rounds) == len(kinds):
                    break
                kind = kinds[len(rounds)]
            else:
                if time.monotonic() > t_end:
                    break
                kind = chaos_rng.choice(["prompt", "late"])
            n_jobs = len(fids) * stations  # one per station: every job runs through the outage
            # Each job waits for the round's gate, which opens once the broker is down: so
            # every one of them ends during the outage, however late it was dispatched.
            gate = lab.workdir / f"gate-{len(rounds) + 1}"
            ids = await lab.submit([short_job(lab, load_rng, 0.5, 1.5, gate=gate) for _ in range(n_jobs)])
            exp.expect(len(ids) == n_jobs, f"round {len(rounds) + 1}: only {len(ids)} of {n_jobs} submissions acknowledged")

            async def all_building() -> bool:
                recs = await lab.records()
                return all(j in recs and recs[j][0].stage == Stage.BUILDING for j in ids)

            await lab.wait_for(all_building, 30.0, what=f"round {len(rounds) + 1}: every job building",
                               interval_s=0.1)
            held = {j: (r.lease.factory, r.epoch) for j, (r, _rev, _ts) in (await lab.records()).items()
                    if j in ids and r.lease is not None}
            await lab.stop_broker()
            t_stop = time.monotonic()
            gate.touch()

            def outbox_full() -> list[tuple[str, str, int]]:
                items = [(fid, job, epoch) for fid in fids for job, epoch in lab.outbox_items(fid)]
                return items if len(items) >= len(ids) else []

            # The jobs end with the broker down; each result meets the dead broker and is kept.
            items = await lab.wait_for(outbox_full, 1.5 + 10 * lab.settings.request_timeout_s + 10.0,
                                       what="every result waits in a factory's outbox", interval_s=0.1)
            outbox_max = max(outbox_max, len(items))
            exp.expect(not lab.server.proc or lab.server.proc.poll() is not None,
                       "the broker was not down while the results went to the outboxes")
            exp.expect(sorted((f, j, e) for j, (f, e) in held.items()) == sorted(items),
                       f"outbox items {sorted(items)} are not the leases held at the stop {sorted(held.items())}")
            if not cfg.bounded:
                # The schedule: a longer outage, which can outlast a lease; then whether the
                # reaper or the outbox flush comes first is a race, and either end is legal.
                await asyncio.sleep(chaos_rng.uniform(0.0, 4.0))
            if kind == "late":
                for fid in fids:
                    lab.factories[fid].pause()
            await lab.restart_broker()
            down_s = time.monotonic() - t_stop
            if kind == "late":
                async def reclaimed() -> bool:
                    got = await lab.reclaims()
                    return all((j, e) in got for j, (_f, e) in held.items())

                await lab.wait_for(reclaimed, ttl + 20.0, what="the reaper reclaims the absent factories' leases",
                                   interval_s=0.25)
                for fid in fids:
                    lab.factories[fid].resume()
            absent_s = time.monotonic() - t_stop

            def outboxes_empty() -> bool:
                return not any(lab.outbox_items(fid) for fid in fids)

            await lab.wait_for(outboxes_empty, 30.0, what="every outbox drained after the broker came back",
                               interval_s=0.1)
            unsettled = await lab.settle(SETTLE_TIMEOUT_S)
            exp.expect(not unsettled, f"round {len(rounds) + 1}: not settled within the bound: {unsettled}")
            records = await lab.records()
            published = quarantined = 0
            for fid, job, epoch in items:
                rec = records[job][0]
                passed = any(a.epoch == epoch and a.outcome == "passed" for a in rec.attempts)
                kept = any(q.startswith(f"{job}-epoch-{epoch}-") for q in lab.quarantined(fid))
                exp.expect(passed != kept, f"{job} epoch {epoch} on {fid}: published={passed}, quarantined={kept}; "
                                           "exactly one was expected")
                published += passed
                quarantined += kept and not passed
            if kind == "late":
                exp.expect(quarantined == len(items), f"late round: {quarantined} of {len(items)} results "
                                                      "quarantined, though every lease was reclaimed first")
            rounds.append({"kind": kind, "jobs": len(ids), "outbox_items": len(items), "broker_down_s": round(down_s, 2),
                           "factories_away_s": round(absent_s, 2), "published": published, "quarantined": quarantined})

        report = await lab.check()
        records = await lab.records()
        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        exp.expect(shipped == len(lab.acknowledged), f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")
        exp.expect(outbox_max > 0, "no result ever waited in an outbox")
        figures = {
            "rounds": len(rounds),
            "round_kinds": [r["kind"] for r in rounds],
            "broker_down_s": [r["broker_down_s"] for r in rounds],
            "factories_away_s": [r["factories_away_s"] for r in rounds],
            "outbox_pending_max": outbox_max,
            "results_published": sum(r["published"] for r in rounds),
            "results_quarantined": sum(r["quarantined"] for r in rounds),
            "quarantine_folders": sum(len(lab.quarantined(f)) for f in fids),
            "fenced_events": report.counts.get("fenced", 0),
            "lease_expired": report.counts.get("lease_expired", 0),
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_shipped": shipped,
        }
        notes.append(f"lease_ttl_s {ttl:g}; one job per station, each held until the broker is down, then "
                     "0.5-1.5 s more, so every one of them ends during the outage")
        for i, r in enumerate(rounds, 1):
            notes.append(f"round {i} ({r['kind']}): {r['outbox_items']} results in outboxes, broker down "
                         f"{r['broker_down_s']:.1f}s, factories away {r['factories_away_s']:.1f}s, "
                         f"{r['published']} published, {r['quarantined']} quarantined")
        return ScenarioResult("total-outage", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)
