"""Scenario 4, partition: one factory reaches the broker only through a fault-injecting TCP proxy
(``chaos/proxy.py``), which partitions it (blackhole), slows it down (delay), or cuts it and
refuses most of its reconnects (reset, then drop)."""

from __future__ import annotations

import time
from pathlib import Path

from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import FactoryRecord, JobRecord, decode

from ..harness import Expectations, Lab, LabProxy, ScenarioConfig, ScenarioResult, scenario
from .common import RECLAIM_SLACK_S, SETTLE_TIMEOUT_S, short_job

# -- 4. partition ---------------------------------------------------------------------------------

BEHIND = "fp"
"""The factory behind the proxy (the one partitioned)."""
DIRECT = "fd"
"""A factory connected to the broker directly (where a reclaimed job goes)."""
PROXIED_CAP = "proxied"
"""Only the factory behind the proxy has it: a job that requires it can run nowhere else."""

DELAY_MS, DELAY_JITTER_MS = 100.0, 40.0
"""Each way, so a round trip costs 0.12-0.28 s: a hundred times the lab's usual, yet short
enough that a holder renewing through it keeps its lease *and* never fences itself: a holder
stops its engine once its last renewal that succeeded was sent ``lease_ttl_s -
fence_margin_s`` ago (1.33 s with the lab's timings), and renewals succeed at most two round
trips and a renewal period apart (0.5 + 2 x 0.28 = 1.06 s)."""
DELAY_JOB_S = 4.0
"""The delayed job runs for two lease TTLs: it survives only if its renewals get through."""
DROP_P = 0.8
"""While the drop fault is on, each new connection of the cut factory is refused with this
probability (seeded), so it takes it several jittered tries to get back."""
DROPS_WANTED = 2
"""The drop round heals once the proxy has refused this many reconnects."""
DROP_JOB_S = 3.0
ROUND_TIMEOUT_S = 40.0
"""Bound on each wait of a round (a claim, a reclaim, a ship, a fence) on a loaded machine."""
OUTBOX_TIMEOUT_S = 45.0
"""Bound on a partitioned factory's result reaching its outbox: the job's end, then the log
upload and the result write each running into their request timeouts (several seconds)."""


async def _record(lab: Lab, job: str) -> JobRecord | None:
    e = await lab.admin_().jobs.get(job)
    return None if e is None else decode(e.value, JobRecord)


async def _wait_stage(lab: Lab, job: str, stages: tuple[str, ...], what: str) -> JobRecord:
    async def at() -> JobRecord | None:
        rec = await _record(lab, job)
        return rec if rec is not None and str(rec.stage) in stages else None

    return await lab.wait_for(at, ROUND_TIMEOUT_S, what=what, interval_s=0.1)


async def _heartbeat_after(lab: Lab, fid: str, since_broker: float) -> bool:
    e = await lab.admin_().factories.get(fid)
    return e is not None and e.ts > since_broker and decode(e.value, FactoryRecord).status == "up"


async def _blackhole_round(lab: Lab, proxy: LabProxy, gates: Path, k: int, exp: Expectations) -> dict:
    """The behind factory holds a job that waits on its gate; the proxy blackholes it; its lease
    expires, the reaper requeues the job, the direct factory runs and ships it. Then the gate
    opens, so the partitioned run ends and its result goes to the outbox; heal; the stale
    result is refused (fenced) and kept in quarantine."""
    ttl, reaper = lab.settings.lease_ttl_s, lab.settings.reaper_interval_s
    rng = lab.random(f"partition-load-{k}")
    # Only the behind factory runs when the job is submitted, so it is the one that claims it.
    direct = lab.factories.get(DIRECT)
    if direct is not None and direct.alive():
        await direct.terminate()
    # A gate per factory ($GF_FACTORY expands in the job's shell): the direct factory's is open
    # from the start; the behind factory's opens only once the job has shipped elsewhere.
    (gates / f"r{k}-{DIRECT}").touch()
    gate_behind = gates / f"r{k}-{BEHIND}"
    [job] = await lab.submit([short_job(lab, rng, 0.3, 0.6, gate=gates / f"r{k}-$GF_FACTORY")])
    held = await _wait_stage(lab, job, ("building",), f"round {k}: {BEHIND} runs {job}")
    exp.expect(held.lease is not None and held.lease.factory == BEHIND,
               f"round {k}: {job} is held by {held.lease and held.lease.factory}, not by {BEHIND}")
    epoch = held.epoch
    if direct is None:
        await lab.start_factory(DIRECT, stations=2)
    else:
        await lab.restart_factory(DIRECT)

    t_cut = await lab.broker_now()
    await proxy.send("blackhole")

    async def reclaimed():
        return (await lab.reclaims()).get((job, epoch))

    reclaim = await lab.wait_for(reclaimed, ROUND_TIMEOUT_S, what=f"round {k}: the reaper reclaims {job} "
                                 f"epoch {epoch} from the partitioned {BEHIND}", interval_s=0.2)
    reclaim_s = reclaim.ts - t_cut
    bound_s = ttl + reaper + RECLAIM_SLACK_S
    exp.expect(reclaim_s <= bound_s, f"round {k}: the partitioned lease took {reclaim_s:.2f}s to be reclaimed; "
                                     f"bound is lease_ttl_s {ttl:g} + reaper_interval_s {reaper:g} + {RECLAIM_SLACK_S:g}s")
    shipped = await _wait_stage(lab, job, ("shipped", "failed", "dead_letter"),
                                f"round {k}: {job} ships elsewhere while {BEHIND} is partitioned")
    shipped_s = await lab.broker_now() - t_cut
    winners = [(a.factory, a.epoch) for a in shipped.attempts if a.outcome == "passed"]
    exp.expect(str(shipped.stage) == "shipped" and len(winners) == 1 and winners[0][0] == DIRECT
               and winners[0][1] > epoch,
               f"round {k}: {job} ended {shipped.stage} with passed attempts {winners}; expected one, "
               f"by {DIRECT} at an epoch above {epoch}")

    # The partitioned run ends now, if its holder has not stopped it already: a holder that
    # cannot renew fences itself (stops its engine and quarantines what it made before the
    # reaper may reclaim); one that does not (an unfenced build) finishes, and its result,
    # unable to reach the broker, waits in the outbox. The ledger judges which really happened.
    gate_behind.touch()

    def quarantined() -> bool:
        return any(q.startswith(f"{job}-epoch-{epoch}-") for q in lab.quarantined(BEHIND))

    def ended() -> str | None:
        # Before the heal only a self-fenced holder can have quarantined: the outbox's own
        # quarantine needs the record, which the partition hides.
        if quarantined():
            return "self-fenced"
        return "outbox" if (job, epoch) in lab.outbox_items(BEHIND) else None

    how = await lab.wait_for(ended, OUTBOX_TIMEOUT_S, what=f"round {k}: {BEHIND}'s run of {job} epoch {epoch} "
                             "ended while partitioned (result in its outbox, or self-fenced and quarantined)",
                             interval_s=0.1)
    outbox_s = await lab.broker_now() - t_cut
    partitioned_s = await lab.broker_now() - t_cut

    t_heal = await lab.broker_now()
    await proxy.send("heal")

    async def fenced() -> bool:
        events = [a for kind in ("fenced", "self_fenced") for a in await lab.audit(f"gf.events.{job}.{kind}")]
        return (any(a.event.factory == BEHIND and a.event.epoch == epoch for a in events)
                and quarantined() and (job, epoch) not in lab.outbox_items(BEHIND))

    await lab.wait_for(fenced, ROUND_TIMEOUT_S, what=f"round {k}: after the heal, {BEHIND}'s fence on {job} "
                       f"epoch {epoch} (fenced or self_fenced) is on record and its result in quarantine",
                       interval_s=0.2)
    fence_s = await lab.broker_now() - t_heal
    final = await _record(lab, job)
    stale_ships = [a for a in (final.attempts if final else []) if a.factory == BEHIND and a.epoch == epoch
                   and a.outcome == "passed"]
    exp.expect(not stale_ships and final is not None and str(final.stage) == "shipped",
               f"round {k}: the stale result of {BEHIND} reached {job}: {stale_ships}")
    await lab.wait_for(lambda: _heartbeat_after(lab, BEHIND, t_heal), ROUND_TIMEOUT_S,
                       what=f"round {k}: {BEHIND} heartbeats again after the heal", interval_s=0.2)
    return {"kind": "blackhole", "job": job, "epoch_lost": epoch, "ended": how, "reclaim_s": round(reclaim_s, 2),
            "reclaim_bound_s": bound_s, "shipped_elsewhere_s": round(shipped_s, 2),
            "outbox_s": round(outbox_s, 2), "partitioned_s": round(partitioned_s, 2),
            "fenced_after_heal_s": round(fence_s, 2)}


async def _delay_round(lab: Lab, proxy: LabProxy, k: int, exp: Expectations) -> dict:
    """Every byte to and from the behind factory is late, by less than the request timeout: a
    job that only it can run lasts two lease TTLs, renewed through the delay, and ships from it
    under the epoch it claimed, with no reclaim."""
    rng = lab.random(f"partition-load-{k}")
    before = await proxy.send("stats")
    await proxy.send(f"delay {DELAY_MS:g} {DELAY_JITTER_MS:g}")
    t0 = await lab.broker_now()
    [job] = await lab.submit([short_job(lab, rng, DELAY_JOB_S, DELAY_JOB_S, capabilities=[PROXIED_CAP])])
    rec = await _wait_stage(lab, job, ("shipped", "failed", "dead_letter"),
                            f"round {k}: {job} ships from {BEHIND} through a {DELAY_MS:g} ms delay")
    took_s = await lab.broker_now() - t0
    after = await proxy.send("heal")
    runs = [(a.factory, a.epoch, a.outcome) for a in rec.attempts]
    reclaimed = [key for key in await lab.reclaims() if key[0] == job]
    exp.expect(str(rec.stage) == "shipped" and len(runs) == 1 and runs[0][0] == BEHIND and runs[0][2] == "passed",
               f"round {k}: the delayed job {job} ended {rec.stage} with attempts {runs}; expected one, "
               f"passed on {BEHIND}")
    exp.expect(not reclaimed, f"round {k}: the delayed factory's lease on {job} was reclaimed: {reclaimed}")
    moved = after["bytes_client_to_target"] - before["bytes_client_to_target"]
    exp.expect(moved > 0, f"round {k}: nothing went through the delaying proxy")
    return {"kind": "delay", "job": job, "delay_ms": DELAY_MS, "jitter_ms": DELAY_JITTER_MS,
            "job_s": DELAY_JOB_S, "shipped_after_s": round(took_s, 2), "attempts": len(runs),
            "reclaims": len(reclaimed), "bytes_delayed": moved}


async def _drop_round(lab: Lab, proxy: LabProxy, k: int, seed: int, exp: Expectations) -> dict:
    """The behind factory's connection is cut (TCP reset) while it runs a job only it can run,
    and most of its reconnects are refused (drop) until it has been turned away a few times.
    It gets back in; the job ships once: under its first epoch if the lease outlived the
    outage, else under a new one after a reclaim (its old run then fenced)."""
    rng = lab.random(f"partition-load-{k}")
    [job] = await lab.submit([short_job(lab, rng, DROP_JOB_S, DROP_JOB_S, capabilities=[PROXIED_CAP])])
    held = await _wait_stage(lab, job, ("building",), f"round {k}: {BEHIND} runs {job}")
    before = await proxy.send(f"drop {DROP_P:g} {seed}")
    t_cut = time.monotonic()
    cut = 0

    async def turned_away() -> dict | None:
        # A reconnect that got through (1 - DROP_P of them do) is cut again: the link stays
        # flaky until the proxy has turned the factory away DROPS_WANTED times.
        nonlocal cut
        s = await proxy.send("stats")
        if s["connections_dropped"] - before["connections_dropped"] >= DROPS_WANTED:
            return s
        if s["connections_active"]:
            cut += (await proxy.send("reset"))["cut"]
        return None

    stats = await lab.wait_for(turned_away, ROUND_TIMEOUT_S, what=f"round {k}: the proxy refuses {DROPS_WANTED} "
                               f"of {BEHIND}'s reconnects", interval_s=0.1)
    t_heal = await lab.broker_now()
    await proxy.send("heal")
    await lab.wait_for(lambda: _heartbeat_after(lab, BEHIND, t_heal), ROUND_TIMEOUT_S,
                       what=f"round {k}: {BEHIND} reconnects and heartbeats after the drops", interval_s=0.1)
    back_s = time.monotonic() - t_cut
    rec = await _wait_stage(lab, job, ("shipped", "failed", "dead_letter"), f"round {k}: {job} ships after the drops")
    passed = [(a.factory, a.epoch) for a in rec.attempts if a.outcome == "passed"]
    exp.expect(str(rec.stage) == "shipped" and len(passed) == 1 and passed[0][0] == BEHIND,
               f"round {k}: {job} ended {rec.stage} with passed attempts {passed}; expected one, on {BEHIND}")
    exp.expect(cut >= 1, f"round {k}: the reset cut no connection of {BEHIND}")
    return {"kind": "drop", "job": job, "drop_p": DROP_P, "connections_cut": cut,
            "reconnects_dropped": stats["connections_dropped"] - before["connections_dropped"],
            "back_after_cut_s": round(back_s, 2),
            "lease_survived": bool(passed) and passed[0][1] == held.epoch}


@scenario("partition",
          "one factory behind a fault-injecting TCP proxy: blackholed, its lease expires and the job ships "
          "elsewhere; on heal the stale factory is fenced and keeps its result in quarantine; under a delay "
          "shorter than the TTL its lease survives; cut with most reconnects dropped, it gets back")
async def partition(cfg: ScenarioConfig) -> ScenarioResult:
    exp = Expectations()
    notes: list[str] = []
    async with Lab(cfg.workdir, seed=cfg.seed, factory_env=cfg.factory_env) as lab:
        chaos_rng = lab.random("chaos")
        gates = lab.workdir / "gates"
        gates.mkdir(exist_ok=True)
        proxy = await lab.start_proxy(BEHIND)
        await lab.start_factory(BEHIND, stations=1, caps=[PROXIED_CAP], url=proxy.url)
        # Bounded: one round of each fault. Full: seeded rounds until the duration is spent.
        kinds = ["blackhole", "delay", "drop"]
        t_end = time.monotonic() + cfg.duration_s
        rounds: list[dict] = []
        while True:
            if cfg.bounded:
                if len(rounds) == len(kinds):
                    break
                kind = kinds[len(rounds)]
            else:
                if time.monotonic() > t_end and len(rounds) >= len(kinds):
                    break
                kind = kinds[len(rounds)] if len(rounds) < len(kinds) else chaos_rng.choice(kinds)
            k = len(rounds) + 1
            if kind == "blackhole":
                r = await _blackhole_round(lab, proxy, gates, k, exp)
            elif kind == "delay":
                r = await _delay_round(lab, proxy, k, exp)
            else:
                r = await _drop_round(lab, proxy, k, chaos_rng.randrange(1 << 16), exp)
            rounds.append(r)
            notes.append(f"round {k}: " + ", ".join(f"{key} {v}" for key, v in r.items()))

        unsettled = await lab.settle(SETTLE_TIMEOUT_S)
        report = await lab.check()
        records = await lab.records()
        dead = [p.name for p in [lab.coordinator, *lab.factories.values(), *(p.proc for p in lab.proxies)]
                if p is not None and not p.alive()]
        exp.expect(not dead, f"processes died: {dead}")
        exp.expect(not unsettled, f"not settled within the bound: {unsettled}")
        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        exp.expect(shipped == len(lab.acknowledged), f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")
        exp.expect(not lab.outbox_items(BEHIND), f"{BEHIND}'s outbox still holds {lab.outbox_items(BEHIND)}")
        # The stale factory never ships: no result of it is on record at an epoch it lost.
        lost = {(r["job"], r["epoch_lost"]) for r in rounds if r["kind"] == "blackhole"}
        stale = [(j, a.epoch) for j, (rec, _rev, _ts) in records.items() for a in rec.attempts
                 if (j, a.epoch) in lost and a.outcome == "passed"]
        exp.expect(not stale, f"results of lost leases reached the broker: {stale}")
        by = {kind: [r for r in rounds if r["kind"] == kind] for kind in kinds}
        quarantined = lab.quarantined(BEHIND)
        figures = {
            "rounds": [r["kind"] for r in rounds],
            "blackhole_reclaim_s": [r["reclaim_s"] for r in by["blackhole"]],
            "blackhole_reclaim_bound_s": lab.settings.lease_ttl_s + lab.settings.reaper_interval_s + RECLAIM_SLACK_S,
            "blackhole_shipped_elsewhere_s": [r["shipped_elsewhere_s"] for r in by["blackhole"]],
            "blackhole_result_in_outbox_s": [r["outbox_s"] for r in by["blackhole"]],
            "blackhole_partitioned_s": [r["partitioned_s"] for r in by["blackhole"]],
            "blackhole_fenced_after_heal_s": [r["fenced_after_heal_s"] for r in by["blackhole"]],
            "blackhole_run_ended": [r["ended"] for r in by["blackhole"]],
            "delay_ms_each_way": DELAY_MS,
            "delay_job_s": DELAY_JOB_S,
            "delay_shipped_after_s": [r["shipped_after_s"] for r in by["delay"]],
            "delay_reclaims": sum(r["reclaims"] for r in by["delay"]),
            "drop_reconnects_dropped": [r["reconnects_dropped"] for r in by["drop"]],
            "drop_back_after_cut_s": [r["back_after_cut_s"] for r in by["drop"]],
            "drop_lease_survived": [r["lease_survived"] for r in by["drop"]],
            "stale_ships": len(stale),
            "quarantined_results": len(quarantined),
            "fenced_events": report.counts.get("fenced", 0),
            "self_fenced_events": report.counts.get("self_fenced", 0),
            "lease_expired": report.counts.get("lease_expired", 0),
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_shipped": shipped,
        }
        notes.append(f"lease_ttl_s {lab.settings.lease_ttl_s:g}, request_timeout_s "
                     f"{lab.settings.request_timeout_s:g}; {BEHIND} connects through proxy {proxy.url} -> "
                     f"{proxy.target}, {DIRECT} directly")
        return ScenarioResult("partition", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)
