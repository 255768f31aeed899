"""The real-process chaos scenarios (see ``harness.py`` for the lab they run in).

Each scenario has a bounded form (``ScenarioConfig.bounded``: what CI runs, well under a
minute on two cores) and a full form that applies its chaos for ``duration_s``. Each ends with
the one invariant check over the broker's records, and adds the claims of its own (reclaim
within the lease TTL plus a reaper interval, nothing left in an outbox, ...) as expectations.

Implemented: ``factory-churn`` (1), ``broker-crash`` (2), ``total-outage`` (7). The cluster,
partition, push-path and thundering-herd scenarios (3-6) register here the same way once
their injectors (a 3-node embedded cluster, the fault-injecting proxy) exist.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import JobRecord, decode

from .harness import Expectations, Hit, Lab, ScenarioConfig, ScenarioResult, scenario

RECLAIM_SLACK_S = 0.5
"""Allowance on top of ``lease_ttl_s + reaper_interval_s`` for the reaper's own pass (a clock
probe, the compare-and-set) and the publish of its event, on a loaded two-core machine."""

SETTLE_TIMEOUT_S = 60.0
"""Bound on the fleet finishing every acknowledged job once the chaos has stopped."""
DISPATCH_RESUME_S = 5.0
"""Bound on a job submitted after a broker restart (once every client is back) being claimed."""
READY_BOUND_S = 60.0
"""Bound on a scheduled restart or resume (including its wait for evidence) completing."""


def _short_job(lab: Lab, rng: random.Random, lo_s: float, hi_s: float, *, gate: Path | None = None,
               **manifest) -> str:
    """A job that sleeps, writes a marker named by its job and epoch, and is verified by it;
    review-policy auto (so it ships) and a generous retry budget (so chaos does not
    dead-letter it: every reclaim costs one retry). With ``gate``, it first waits (at most a
    minute) for that file to exist, so the lab decides when it may end."""
    sleep_s = round(rng.uniform(lo_s, hi_s), 2)
    manifest.setdefault("retry", {"max": 50, "backoff": "0.1s"})
    wait = f'for i in $(seq 1 600); do [ -e "{gate}" ] && break; sleep 0.1; done\n' if gate else ""
    return lab.job(
        f'{wait}sleep {sleep_s}\necho "$GF_FACTORY $GF_EPOCH" > "out/$GF_JOB_ID-e$GF_EPOCH"',
        verify='test -s "out/$GF_JOB_ID-e$GF_EPOCH"', review_policy="auto", **manifest,
    )


async def _trickle(lab: Lab, rng: random.Random, until_mono: float, *, batch: tuple[int, int],
                   gap_s: tuple[float, float], sleep_s: tuple[float, float], stats: dict) -> None:
    """Submit batches of short jobs until ``until_mono`` (the load; its pauses are the schedule)."""
    while time.monotonic() < until_mono:
        texts = [_short_job(lab, rng, *sleep_s) for _ in range(rng.randint(*batch))]
        ids = await lab.submit(texts)
        stats["batches"] += 1
        stats["submitted"] += len(texts)
        stats["acknowledged"] += len(ids)
        await asyncio.sleep(rng.uniform(*gap_s))


def _own_leases(hit: Hit, hits: list[Hit]) -> list[tuple[str, int]]:
    """The leases a paused factory holds in *this* incarnation: a lease left by an earlier
    incarnation that was SIGKILLed (and not reaped yet) names the same factory id, but the
    restarted process knows nothing of it, so there is nothing to fence; the reaper takes it."""
    inherited = {lease for h in hits if h.action == "kill" and h.factory == hit.factory
                 and h.at_broker < hit.at_broker for lease in h.held}
    return [lease for lease in hit.held if lease not in inherited]


def _held_outcomes(hits: list[Hit], reclaims: dict, audit_by_job: dict) -> tuple[dict[str, list[float]], list[str], int]:
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


# -- 1. factory churn -----------------------------------------------------------------------------


@scenario("factory-churn",
          "factories SIGKILLed (and restarted with the same id) or paused past their lease at random "
          "during a load of short jobs: leases reclaimed within lease TTL + one reaper interval, "
          "zombies fenced, every job shipped once")
async def factory_churn(cfg: ScenarioConfig) -> ScenarioResult:
    n_factories = 3 if cfg.bounded else 4
    window_s = 12.0 if cfg.bounded else cfg.duration_s
    exp = Expectations()
    notes: list[str] = []
    async with Lab(cfg.workdir, seed=cfg.seed) as lab:
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
                for job, epoch in _own_leases(hit, lab.hits):
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
        t_end = time.monotonic() + window_s
        load = asyncio.create_task(_trickle(lab, load_rng, t_end, batch=(1, 3), gap_s=(0.3, 0.8),
                                            sleep_s=(0.2, 1.5), stats=stats))
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

                busy = await working()
                if not busy and action == "pause":
                    try:  # a pause proves something only if the paused factory holds a lease
                        busy = await lab.wait_for(working, 5.0, what="a factory holding a lease", interval_s=0.1)
                    except TimeoutError:
                        pass
                target = chaos_rng.choice(busy or in_play)
                out_of_play.add(target)
                if action == "kill":
                    await lab.kill_factory(target)
                    side_tasks.append(asyncio.create_task(restart_later(target, chaos_rng.uniform(0.2, 1.5))))
                else:
                    hit = await lab.pause_factory(target)
                    side_tasks.append(asyncio.create_task(resume_later(hit, pause_s)))
            await load
        finally:
            load.cancel()
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
        times, missing, in_flight = _held_outcomes(lab.hits, reclaims, by_job)
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
                zombie_ships += sum(1 for a in by_job.get(job, ()) if a.ts > rec.ts and a.event.epoch == epoch
                                    and a.event.factory == hit.factory
                                    and a.event.kind in ("finished", "started", "handed_back"))
        exp.expect(zombie_ships == 0, f"{zombie_ships} write(s) by a factory under an epoch it had lost")
        own_paused = {lease for h in pauses for lease in _own_leases(h, lab.hits)}
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
        }
        notes.append(f"{len(kills)} SIGKILL+restart and {len(pauses)} SIGSTOP/SIGCONT of {pause_s:g}s over "
                     f"{window_s:g}s of load ({stats['batches']} batches)")
        return ScenarioResult("factory-churn", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)




# -- 2. broker crash ------------------------------------------------------------------------------


async def _reconnected(lab: Lab, since_broker: float, fids: list[str]) -> bool:
    """Every factory has written its heartbeat to the restarted broker."""
    for fid in fids:
        e = await lab.admin_().factories.get(fid)
        if e is None or e.ts <= since_broker:
            return False
    return True


@scenario("broker-crash",
          "kill -9 of the single nats-server during load, restarted on the same store and port: "
          "clients reconnect, no acknowledged job is lost, every job ships once")
async def broker_crash(cfg: ScenarioConfig) -> ScenarioResult:
    window_s = 10.0 if cfg.bounded else cfg.duration_s
    exp = Expectations()
    notes: list[str] = []
    # sync_interval 'always': the server fsyncs every write before acknowledging it. With the
    # default (2 min) it syncs lazily, and acknowledged writes can be lost when the broker dies
    # before the next sync: the Jepsen finding in DESIGN.md (NATS 2.12.1, shown there for power
    # failure). A kill -9 of the process alone leaves written data in the OS page cache, but
    # this scenario stands for the crash of a broker's machine, and its claim "no acknowledged
    # job lost" must not rest on the luck of a page cache.
    async with Lab(cfg.workdir, seed=cfg.seed, sync_interval="always") as lab:
        load_rng, chaos_rng = lab.random("load"), lab.random("chaos")
        fids = ["f1", "f2"]
        for fid in fids:
            await lab.start_factory(fid, stations=2)
        stats = {"batches": 0, "submitted": 0, "acknowledged": 0}
        t0 = time.monotonic()
        t_end = t0 + window_s
        load = asyncio.create_task(_trickle(lab, load_rng, t_end, batch=(1, 3), gap_s=(0.2, 0.6),
                                            sleep_s=(0.2, 1.2), stats=stats))
        crashes: list[dict] = []
        try:
            # Bounded: one crash a few seconds into the load. Full: a crash every 6-12 s.
            next_at = t0 + chaos_rng.uniform(2.5, 4.0)
            while next_at < t_end - 1.0:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # the chaos schedule
                before = await lab.stages()
                in_flight = sum(1 for s in before.values() if s in ("assigned", "building"))
                await lab.kill_broker()
                down_s = chaos_rng.uniform(0.5, 2.5)
                await asyncio.sleep(down_s)  # the schedule: how long the broker stays dead
                back_s = await lab.restart_broker()
                restarted_at = await lab.broker_now()
                t_back = time.monotonic()
                await lab.wait_for(lab._api_answers, 30.0, what="the coordinator answers after the restart")
                api_back_s = time.monotonic() - t_back
                await lab.wait_for(lambda: _reconnected(lab, restarted_at, fids), 30.0,
                                   what="every factory heartbeats to the restarted broker")
                factories_back_s = time.monotonic() - t_back
                # Dispatch resumes: a job submitted now is claimed promptly (the coordinator's
                # view of gf_jobs must follow the restarted broker, not wait out a stale watch).
                t_probe = time.monotonic()
                probe = await lab.submit([_short_job(lab, random.Random(0), 0.1, 0.1)])
                claim_s = None
                if probe:
                    async def claimed() -> bool:
                        e = await lab.admin_().jobs.get(probe[0])
                        return e is not None and decode(e.value, JobRecord).stage != Stage.QUEUED

                    try:
                        await lab.wait_for(claimed, 30.0, what="a job submitted after the restart is claimed",
                                           interval_s=0.05)
                        claim_s = time.monotonic() - t_probe
                    except TimeoutError as e:
                        notes.append(str(e))
                crashes.append({"jobs_in_flight": in_flight, "down_s": round(down_s, 2),
                                "broker_back_s": round(back_s, 2), "api_back_s": round(api_back_s, 2),
                                "factories_back_s": round(factories_back_s, 2),
                                "claim_after_restart_s": None if claim_s is None else round(claim_s, 2)})
                if cfg.bounded:
                    break
                next_at = time.monotonic() + chaos_rng.uniform(6.0, 12.0)
            await load
        finally:
            load.cancel()

        unsettled = await lab.settle(SETTLE_TIMEOUT_S if cfg.bounded else 2 * SETTLE_TIMEOUT_S)
        report = await lab.check()
        records = await lab.records()
        dead = [p.name for p in [lab.coordinator, *lab.factories.values()] if p is not None and not p.alive()]
        exp.expect(not dead, f"processes died instead of reconnecting: {dead}")
        exp.expect(len(crashes) >= 1, "the broker was never crashed (the load window is too short)")
        slow = [c["claim_after_restart_s"] for c in crashes
                if c["claim_after_restart_s"] is None or c["claim_after_restart_s"] > DISPATCH_RESUME_S]
        exp.expect(not slow, f"dispatch did not resume within {DISPATCH_RESUME_S:g}s of a restart: {slow}")
        exp.expect(all(c["jobs_in_flight"] > 0 for c in crashes),
                   f"a crash hit an idle fleet, proving little: {crashes}")
        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        lost = sorted(j for j in lab.acknowledged if j not in records)
        exp.expect(not lost, f"acknowledged jobs lost: {lost}")
        exp.expect(not unsettled, f"not settled within the bound: {unsettled}")
        exp.expect(shipped == len(lab.acknowledged),
                   f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")
        figures = {
            "crashes": len(crashes),
            "jobs_in_flight_at_crash": [c["jobs_in_flight"] for c in crashes],
            "down_s": [c["down_s"] for c in crashes],
            "api_back_s_max": max((c["api_back_s"] for c in crashes), default=0.0),
            "factories_back_s_max": max((c["factories_back_s"] for c in crashes), default=0.0),
            "claim_after_restart_s": [c["claim_after_restart_s"] for c in crashes],
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_unacknowledged": lab.unacknowledged_submits,
            "jobs_on_record": len(records),
            "jobs_shipped": shipped,
            "acknowledged_lost": len(lost),
            "lease_expired": report.counts.get("lease_expired", 0),
            "fenced_events": report.counts.get("fenced", 0),
            "audit_gaps": report.counts.get("audit_gaps", 0),
        }
        notes.append(f"{len(crashes)} kill -9 of nats-server (sync_interval always) over {window_s:g}s of load; "
                     f"restarted on the same store and port {lab.server.port}")
        if lab.unacknowledged_submits:
            notes.append(f"{lab.unacknowledged_submits} submissions got no reply while the broker was down "
                         "(never acknowledged, so they may be missing; any on record must still settle)")
        return ScenarioResult("broker-crash", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)


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
    async with Lab(cfg.workdir, seed=cfg.seed, timings=timings) as lab:
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
            ids = await lab.submit([_short_job(lab, load_rng, 0.5, 1.5, gate=gate) for _ in range(n_jobs)])
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
