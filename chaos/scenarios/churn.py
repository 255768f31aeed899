"""Scenario 1, factory churn."""

from __future__ import annotations

import asyncio
import time

from gigafactory.schemas.lifecycle import Stage

from ..harness import Expectations, Hit, Lab, ScenarioConfig, ScenarioResult, scenario
from .common import (
    READY_BOUND_S,
    RECLAIM_SLACK_S,
    SETTLE_TIMEOUT_S,
    held_outcomes,
    ledger_job,
    own_leases,
    trickle,
)

# -- 1. factory churn -----------------------------------------------------------------------------

LONG_JOB_S = 8.0
"""A long job among the short ones: its holder, SIGKILLed in its first two seconds, leaves an
engine that (if nothing stops it) works on for several seconds after the reaper took the
lease (lease TTL + a reaper interval, about 2.5 s in the lab), writing progress lines the
side-effect invariant must see. The bounded form always kills that holder first."""
LONG_EVERY_S = 6.0
"""The full form submits a long job this often (s), so its random kills hit some."""


@scenario("factory-churn",
          "factories SIGKILLed (and restarted with the same id) or paused past their lease at random "
          "during a load of short jobs: leases reclaimed within lease TTL + one reaper interval, "
          "zombies fenced, every job shipped once")
async def factory_churn(cfg: ScenarioConfig) -> ScenarioResult:
    n_factories = 3 if cfg.bounded else 4
    window_s = 12.0 if cfg.bounded else cfg.duration_s
    exp = Expectations()
    notes: list[str] = []
    async with Lab(cfg.workdir, seed=cfg.seed, factory_env=cfg.factory_env) as lab:
        load_rng, chaos_rng = lab.random("load"), lab.random("chaos")
        ttl, reaper = lab.settings.lease_ttl_s, lab.settings.reaper_interval_s
        pause_s = ttl + reaper + 1.0  # long enough that the paused factory's leases expire and are reaped
        fids = [f"f{i}" for i in range(1, n_factories + 1)]
        for fid in fids:
            await lab.start_factory(fid, stations=2)
        out_of_play: set[str] = set()  # killed, paused, or recovering: not a target until back
        side_tasks: list[asyncio.Task] = []
        zombie_evidence: dict[tuple[str, int, str], str] = {}

        async def restart_later(fid: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)  # the schedule: how long the machine stays down
            await lab.restart_factory(fid)
            out_of_play.discard(fid)

        async def resume_later(hit: Hit, delay_s: float) -> None:
            await asyncio.sleep(delay_s)  # the schedule: how long the pause lasts
            await lab.resume_factory(hit)

            async def fenced_all() -> bool:
                # The zombie, woken, must refuse itself: a 'fenced' event for each lease it lost,
                # or its result kept in quarantine.
                ok = True
                fenced = {(a.event.job, a.event.epoch) for a in await lab.audit("gf.events.*.fenced")
                          if a.event.factory == hit.factory}
                quarantined = lab.quarantined(hit.factory)
                for job, epoch in own_leases(hit, lab.hits):
                    key = (job, epoch, hit.factory)
                    if (job, epoch) in fenced:
                        zombie_evidence[key] = "fenced"
                    elif any(q.startswith(f"{job}-epoch-{epoch}-") for q in quarantined):
                        zombie_evidence[key] = "quarantined"
                    else:
                        ok = False
                return ok

            try:
                await lab.wait_for(fenced_all, 15.0, what=f"zombie {hit.factory} fenced on {hit.held}",
                                   interval_s=0.2)
            except TimeoutError as e:
                notes.append(f"zombie {hit.factory} not fenced: {e}")
            out_of_play.discard(hit.factory)

        stats = {"batches": 0, "submitted": 0, "acknowledged": 0}
        empty_pauses = 0
        long_jobs: list[str] = []
        long_kill: dict[str, object] = {}
        t_end = time.monotonic() + window_s

        async def long_load() -> None:
            # The bounded form: one long job, first in line. The full form: one every LONG_EVERY_S.
            while True:
                long_jobs.extend(await lab.submit([ledger_job(lab, LONG_JOB_S)]))
                if cfg.bounded or time.monotonic() + LONG_EVERY_S > t_end:
                    return
                await asyncio.sleep(LONG_EVERY_S)  # the load's schedule

        if cfg.bounded:
            await long_load()
            if not long_jobs:
                raise RuntimeError("the bounded form's long job was not acknowledged (is the coordinator up?)")
        load = asyncio.create_task(trickle(lab, load_rng, t_end, batch=(1, 3), gap_s=(0.3, 0.8),
                                            sleep_s=(0.2, 1.5), stats=stats))
        long_task = None if cfg.bounded else asyncio.create_task(long_load())

        async def long_job_running() -> tuple[str, str, int] | None:
            # (holder, job, epoch) of the bounded form's long job once its engine has started.
            [job] = long_jobs
            rec = (await lab.records()).get(job)
            if rec is None or rec[0].stage != Stage.BUILDING or rec[0].lease is None:
                return None
            started = any(x.job == job and x.epoch == rec[0].epoch and x.phase == "start" for x in lab.read_ledger()[0])
            return (rec[0].lease.factory, job, rec[0].epoch) if started else None

        try:
            while time.monotonic() < t_end - 1.0:
                await asyncio.sleep(chaos_rng.uniform(1.0, 2.2))  # the chaos schedule
                action = chaos_rng.choices(["kill", "pause"], weights=[3, 1])[0]
                if cfg.bounded and len(lab.hits) == 2 and not any(h.action == "pause" for h in lab.hits):
                    action = "pause"  # the short form shows a zombie every time
                in_play = [f for f in fids if f not in out_of_play]
                if len(in_play) <= 1:
                    continue  # keep one factory working, or nothing would be left to reclaim onto

                async def working() -> list[str]:
                    return [f for f in await lab.factories_with_work() if f in in_play]

                forced = None
                if cfg.bounded and not lab.hits:
                    # The short form kills the long job's holder first, every time: an engine
                    # that outlives its factory then has seconds of work left after the reclaim.
                    holder, job, epoch = await lab.wait_for(long_job_running, 15.0, interval_s=0.1,
                                                            what="the long job's engine has started")
                    action, forced = "kill", holder
                    long_kill.update(job=job, epoch=epoch, factory=holder)
                busy = await working()
                if not busy and action == "pause":
                    try:  # a pause proves something only if the paused factory holds a lease
                        busy = await lab.wait_for(working, 5.0, what="a factory holding a lease", interval_s=0.1)
                    except TimeoutError:
                        pass
                target = forced or chaos_rng.choice(busy or in_play)
                out_of_play.add(target)
                if action == "kill":
                    await lab.kill_factory(target)
                    side_tasks.append(asyncio.create_task(restart_later(target, chaos_rng.uniform(0.2, 1.5))))
                else:
                    hit = await lab.pause_factory(target)
                    if not own_leases(hit, lab.hits):
                        # Its job ended between the choice and the signal: a pause that holds no
                        # lease proves nothing. Wake it now and try again at the next hit (the
                        # bounded form insists on one real zombie).
                        await lab.resume_factory(hit)
                        lab.hits.remove(hit)
                        out_of_play.discard(target)
                        empty_pauses += 1
                        continue
                    side_tasks.append(asyncio.create_task(resume_later(hit, pause_s)))
            await load
            if long_task is not None:
                await long_task
        finally:
            load.cancel()
            if long_task is not None:
                long_task.cancel()
            for t in side_tasks:
                try:
                    await asyncio.wait_for(t, timeout=READY_BOUND_S)
                except Exception as e:
                    exp.expect(False, f"a restart or resume did not complete: {type(e).__name__}: {e}")

        unsettled = await lab.settle(SETTLE_TIMEOUT_S if cfg.bounded else 2 * SETTLE_TIMEOUT_S)
        report = await lab.check()
        records = await lab.records()
        audit = await lab.audit()
        by_job: dict[str, list] = {}
        for a in audit:
            if a.event.job:
                by_job.setdefault(a.event.job, []).append(a)
        reclaims = await lab.reclaims()

        kills = [h for h in lab.hits if h.action == "kill"]
        pauses = [h for h in lab.hits if h.action == "pause"]
        bound_s = ttl + reaper + RECLAIM_SLACK_S
        times, missing, in_flight = held_outcomes(lab.hits, reclaims, by_job)
        exp.expect(not missing, f"leases of killed or paused factories never reclaimed: {missing}")
        all_times = times["kill"] + times["pause"]
        exp.expect(all(t <= bound_s for t in all_times),
                   f"a lease took {max(all_times, default=0):.2f}s from the hit to its reclaim; bound is "
                   f"lease_ttl_s {ttl:g} + reaper_interval_s {reaper:g} + {RECLAIM_SLACK_S:g}s slack")

        # A zombie never ships under the epoch it lost: no holder write of the hit factory at a
        # held epoch after the reclaim (the invariant check judges every such write, too).
        zombie_ships = 0
        for hit in lab.hits:
            for job, epoch in hit.held:
                rec = reclaims.get((job, epoch))
                if rec is None:
                    continue
                # A claim straight into building is the run's start and has no `started` of
                # its own, so every `started` here names a start write of its own. A `claimed`
                # published after the reclaim (paused between its write and its event) is the
                # claim's write, made before the hit: not counted.
                zombie_ships += sum(1 for a in by_job.get(job, ()) if a.ts > rec.ts and a.event.epoch == epoch
                                    and a.event.factory == hit.factory
                                    and a.event.kind in ("finished", "started", "handed_back"))
        exp.expect(zombie_ships == 0, f"{zombie_ships} write(s) by a factory under an epoch it had lost")
        own_paused = {lease for h in pauses for lease in own_leases(h, lab.hits)}
        paused_leases = sum(1 for job, epoch in own_paused if (job, epoch) in reclaims)
        exp.expect(len(zombie_evidence) >= paused_leases,
                   f"only {len(zombie_evidence)} of {paused_leases} leases lost by paused factories were fenced")

        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        exp.expect(not unsettled, f"not settled within the bound: {unsettled}")
        exp.expect(shipped == len(lab.acknowledged),
                   f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")
        quarantined = sum(len(lab.quarantined(f)) for f in fids)
        figures = {
            "factories": n_factories,
            "chaos_window_s": window_s,
            "kills": len(kills),
            "pauses": len(pauses),
            "pauses_retried_holding_nothing": empty_pauses,
            "leases_held_at_hits": sum(len(h.held) for h in lab.hits),
            "reclaims_measured": len(all_times),
            "reclaim_s_max": max(all_times, default=0.0),
            "reclaim_s_max_after_kill": max(times["kill"], default=0.0),
            "reclaim_s_mean": sum(all_times) / len(all_times) if all_times else 0.0,
            "reclaim_bound_s": bound_s,
            "ended_by_holder_in_flight": in_flight,
            "zombie_leases_fenced": len(zombie_evidence),
            "zombie_ships": zombie_ships,
            "fenced_events": report.counts.get("fenced", 0),
            "quarantined_results": quarantined,
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_unacknowledged": lab.unacknowledged_submits,
            "jobs_shipped": shipped,
            "claims": report.counts.get("claims", 0),
            "lease_expired": report.counts.get("lease_expired", 0),
            "long_jobs": len(long_jobs),
            "long_job_s": LONG_JOB_S,
        }
        notes.append(f"{len(kills)} SIGKILL+restart and {len(pauses)} SIGSTOP/SIGCONT of {pause_s:g}s over "
                     f"{window_s:g}s of load ({stats['batches']} batches)")
        if long_kill:
            notes.append(f"first kill: {long_kill['factory']} while it ran the long job {long_kill['job']} "
                         f"(epoch {long_kill['epoch']}, {LONG_JOB_S:g}s of work)")
        return ScenarioResult("factory-churn", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)
