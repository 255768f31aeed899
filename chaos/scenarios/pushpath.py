"""Scenario 5, push path down.

Under a load of short jobs the push path is taken away: the pool consumers (one outage kind)
or the whole ``GF_DISPATCH`` stream (the other) are deleted with the lab's admin connection.
The system repairs itself (the coordinator's ``repair_dispatch`` every ``dispatch_repair_s``,
and every submission ensures its pool's consumer), so a single deletion is healed in seconds
and proves little. To hold the path down for a known window, the lab plays a persistent fault:
it deletes the target again every time it reappears, checking every ``HOLD_TICK_S``. That
keeps the real coordinator, intake and factories in play unchanged (no setting is turned off
to make the fault stick), and the figures count how often the system had rebuilt the path
in the meantime. A factory can catch the path in one of those brief moments and go back to
push, to be refused and fall back again at its next fetch: those flaps are counted too.

What is measured, from the broker-timestamped audit (``dispatch_mode`` events that each
factory publishes on every switch, ``claimed`` events that say ``via`` push or poll,
``finished`` and ``dispatch_repaired`` events) and from the factory records:

- time to fall back: from the first deletion to each factory's first switch to poll;
- jobs finished, and claims made by polling, while the path was down;
- time to return: from the end of the hold until each factory's last switch back to push,
  and every factory record says ``dispatch_mode: push``; then a job is claimed via push again.
"""

from __future__ import annotations

import asyncio
import random
import time

import nats.js.errors

from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import FactoryRecord, PoolRecord, decode

from ..harness import AuditEntry, Expectations, Lab, ScenarioConfig, ScenarioResult, scenario
from .common import SETTLE_TIMEOUT_S, short_job

TARGETS = ("consumers", "stream")
"""What an outage deletes: every pool consumer, or the dispatch stream (and its consumers with it)."""
HOLD_TICK_S = 0.05
"""How often the lab checks whether the deleted target has been rebuilt, to delete it again."""
JOB_S = (0.2, 1.0)
"""How long each job of the load sleeps: short, so a busy station frees (and fetches) soon."""
BOUND_SLACK_S = 2.0
"""Allowance on top of the bounds derived from the settings, for a loaded two-core machine:
process scheduling, the engine's start, one event publish."""
PUSH_CLAIM_WAIT_S = 15.0
"""Bound on a job being claimed via push once every factory is back in push mode."""
LAB_POLL_BACKOFF_MAX_S = 1.0
"""The lab polls with at most 1 s between passes (production: ``poll_backoff_max_s`` 10 s), so a
trickle of sub-second jobs is carried while push is down, and the return bound stays short."""


@scenario("push-path-down",
          "the dispatch stream or the pool consumers deleted, and kept deleted, during a load of short "
          "jobs: factories fall back to polling and jobs keep completing; once the path is repaired every "
          "factory returns to push within a bound from the settings")
async def push_path_down(cfg: ScenarioConfig) -> ScenarioResult:
    exp = Expectations()
    notes: list[str] = []
    n_factories, stations = 3, 2
    async with Lab(cfg.workdir, seed=cfg.seed, timings={"poll_backoff_max_s": LAB_POLL_BACKOFF_MAX_S}, factory_env=cfg.factory_env) as lab:
        load_rng, chaos_rng = lab.random("load"), lab.random("chaos")
        s = lab.settings
        # A busy factory fetches (and meets the missing path) once a station frees; an idle one
        # within a long poll; then one refused fetch and one consumer check.
        fall_back_bound_s = s.long_poll_s + JOB_S[1] + 2 * s.request_timeout_s + BOUND_SLACK_S
        # The coordinator's repair pass, then a polling factory's next pass (back-off, or a
        # station freeing), its consumer check and stall scan, and the heartbeat that writes it.
        return_bound_s = (s.dispatch_repair_s + s.poll_backoff_max_s + JOB_S[1] + 2 * s.request_timeout_s
                          + s.heartbeat_s + BOUND_SLACK_S)
        fids = [f"f{i}" for i in range(1, n_factories + 1)]
        for fid in fids:
            await lab.start_factory(fid, stations=stations)

        load_stop = asyncio.Event()
        stats = {"batches": 0, "submitted": 0, "acknowledged": 0}
        load = asyncio.create_task(_load(lab, load_rng, load_stop, stats))
        outages: list[dict] = []
        try:
            await lab.wait_for(lambda: _claims_via(lab, "push", 0.0), 30.0,
                               what="a job claimed via push before any outage", interval_s=0.2)
            if cfg.bounded:
                plan = [(t, 6.0) for t in chaos_rng.sample(TARGETS, len(TARGETS))]
                t_end = float("inf")
            else:
                plan = []
                t_end = time.monotonic() + cfg.duration_s
            while True:
                if cfg.bounded:
                    if len(outages) == len(plan):
                        break
                    target, hold_s = plan[len(outages)]
                elif time.monotonic() > t_end:
                    break
                else:
                    target, hold_s = chaos_rng.choice(TARGETS), round(chaos_rng.uniform(4.0, 12.0), 1)
                o = {"target": target, "hold_s": hold_s}
                o["t0"] = await lab.broker_now()
                o["deletions"] = await _hold_down(lab, target, hold_s)
                o["t1"] = await lab.broker_now()
                mono1 = time.monotonic()
                restored = await lab.wait_for(lambda: _path_exists(lab), return_bound_s + 10.0,
                                              what=f"the {target} rebuilt after the outage", interval_s=0.1)
                o["restored_s"] = time.monotonic() - mono1 if restored else None
                try:
                    await lab.wait_for(lambda: _records_in_push(lab, fids), return_bound_s + 10.0,
                                       what="every factory record back in push mode", interval_s=0.1)
                except TimeoutError as e:
                    exp.expect(False, f"outage {len(outages) + 1} ({target}): {e}")
                o["t_back"] = await lab.broker_now()
                try:
                    await lab.wait_for(lambda: _claims_via(lab, "push", o["t_back"]), PUSH_CLAIM_WAIT_S,
                                       what="a job claimed via push after the return", interval_s=0.2)
                except TimeoutError as e:
                    exp.expect(False, f"outage {len(outages) + 1} ({target}): {e}")
                outages.append(o)
                # The schedule: push runs for a while before the next outage.
                await asyncio.sleep(1.0 if cfg.bounded else chaos_rng.uniform(2.0, 6.0))
        finally:
            load_stop.set()
            await asyncio.gather(load, return_exceptions=True)

        unsettled = await lab.settle(SETTLE_TIMEOUT_S)
        exp.expect(not unsettled, f"not settled within {SETTLE_TIMEOUT_S:g}s: {unsettled}")
        report = await lab.check()
        records = await lab.records()
        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        exp.expect(shipped == len(lab.acknowledged), f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")
        in_push = await _records_in_push(lab, fids)
        exp.expect(in_push, "not every factory record says dispatch_mode push at the end")

        switches = await lab.audit(names.fleet_events_subject("dispatch_mode"))
        claims = await lab.audit(f"{names.EVENTS_PREFIX}.*.claimed")
        finished = await lab.audit(f"{names.EVENTS_PREFIX}.*.finished")
        repairs = await lab.audit(names.fleet_events_subject("dispatch_repaired"))
        rows = []
        for i, o in enumerate(outages):
            nxt = outages[i + 1]["t0"] if i + 1 < len(outages) else float("inf")
            rows.append(_measure(o, nxt, fids, switches, claims, finished, repairs))
        for i, (o, r) in enumerate(zip(outages, rows), 1):
            what = f"outage {i} ({o['target']}, held {o['hold_s']:g}s)"
            exp.expect(r["fell_back"] == len(fids), f"{what}: only {r['fell_back']} of {len(fids)} factories "
                                                    "fell back to polling")
            exp.expect(r["fall_back_s_max"] is not None and r["fall_back_s_max"] <= fall_back_bound_s,
                       f"{what}: fall back took {r['fall_back_s_max']}s, bound {fall_back_bound_s:g}s")
            exp.expect(r["finished_while_down"] > 0, f"{what}: no job finished while the push path was down")
            exp.expect(r["polled_claims"] > 0, f"{what}: no job was claimed by polling")
            exp.expect(r["return_s_max"] <= return_bound_s,
                       f"{what}: return to push took {r['return_s_max']:.2f}s, bound {return_bound_s:g}s")
            exp.expect(r["push_claims_after"] > 0, f"{what}: no job claimed via push after the return")
        figures = {
            "factories": len(fids),
            "outages": len(outages),
            "outage_targets": [o["target"] for o in outages],
            "hold_s": [o["hold_s"] for o in outages],
            "deletions": [o["deletions"] for o in outages],
            "recreated_during_hold": [o["deletions"] - 1 for o in outages],
            "factories_fell_back": [r["fell_back"] for r in rows],
            "fall_back_s_max": [r["fall_back_s_max"] for r in rows],
            "fall_back_bound_s": round(fall_back_bound_s, 3),
            "jobs_finished_while_down": [r["finished_while_down"] for r in rows],
            "polled_claims_while_down": [r["polled_claims"] for r in rows],
            "push_claims_while_down": [r["push_claims_down"] for r in rows],
            "flaps_while_down": [r["flaps"] for r in rows],
            "path_restored_s": [None if o["restored_s"] is None else round(o["restored_s"], 2) for o in outages],
            "dispatch_repaired_events": [r["repairs"] for r in rows],
            "return_s_max": [round(r["return_s_max"], 3) for r in rows],
            "return_bound_s": round(return_bound_s, 3),
            "push_claims_after_return": [r["push_claims_after"] for r in rows],
            "polled_claims_total": sum(1 for a in claims if a.event.data.get("via") == "poll"),
            "push_claims_total": sum(1 for a in claims if a.event.data.get("via") == "push"),
            "records_in_push_at_end": sum([await _record_mode(lab, f) == "push" for f in fids]),
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_shipped": shipped,
        }
        notes.append(f"{len(fids)} factories x {stations} stations; jobs of {JOB_S[0]:g}-{JOB_S[1]:g}s; "
                     f"poll_backoff_max_s {s.poll_backoff_max_s:g}, dispatch_repair_s {s.dispatch_repair_s:g}, "
                     f"long_poll_s {s.long_poll_s:g}")
        notes.append("the lab keeps the path down by deleting the target again whenever the coordinator's repair "
                     f"(or a submission's pool check) rebuilt it, checking every {HOLD_TICK_S:g}s")
        for i, (o, r) in enumerate(zip(outages, rows), 1):
            notes.append(f"outage {i} ({o['target']}, {o['hold_s']:g}s): all {r['fell_back']} fell back within "
                         f"{r['fall_back_s_max']}s; {r['finished_while_down']} jobs finished and {r['polled_claims']} "
                         f"claimed by polling while down; back to push within {r['return_s_max']:.2f}s")
        return ScenarioResult("push-path-down", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)


async def _load(lab: Lab, rng: random.Random, stop: asyncio.Event, stats: dict) -> None:
    """Batches of short jobs until ``stop`` (the load; its pauses are the schedule)."""
    while not stop.is_set():
        texts = [short_job(lab, rng, *JOB_S) for _ in range(rng.randint(1, 3))]
        ids = await lab.submit(texts)
        stats["batches"] += 1
        stats["submitted"] += len(texts)
        stats["acknowledged"] += len(ids)
        try:
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(0.3, 0.8))
        except asyncio.TimeoutError:
            pass


async def _pools(lab: Lab) -> list[str]:
    return [decode(e.value, PoolRecord).id async for e in lab.admin_().pools.scan()]


async def _hold_down(lab: Lab, target: str, hold_s: float) -> int:
    """Delete ``target`` now, and again whenever it reappears, for ``hold_s``; returns how many
    deletions it took (1 + the times the system rebuilt it meanwhile)."""
    js = lab.admin_().js
    deletions = 0
    until = time.monotonic() + hold_s
    while time.monotonic() < until:
        if target == "stream":
            try:
                await js.delete_stream(names.DISPATCH_STREAM)
                deletions += 1
            except nats.js.errors.NotFoundError:
                pass
        else:
            for pool in await _pools(lab):
                try:
                    await js.delete_consumer(names.DISPATCH_STREAM, names.pool_consumer(pool))
                    deletions += 1
                except nats.js.errors.NotFoundError:
                    pass
        await asyncio.sleep(HOLD_TICK_S)  # the schedule of a persistent fault
    return deletions


async def _path_exists(lab: Lab) -> bool:
    js = lab.admin_().js
    try:
        await js.stream_info(names.DISPATCH_STREAM)
        for pool in await _pools(lab):
            await js.consumer_info(names.DISPATCH_STREAM, names.pool_consumer(pool))
    except nats.js.errors.NotFoundError:
        return False
    return True


async def _record_mode(lab: Lab, fid: str) -> str | None:
    e = await lab.admin_().factories.get(fid)
    return None if e is None else decode(e.value, FactoryRecord).dispatch_mode


async def _records_in_push(lab: Lab, fids: list[str]) -> bool:
    return all([await _record_mode(lab, f) == "push" for f in fids])


async def _claims_via(lab: Lab, via: str, since_broker: float) -> int:
    return sum(1 for a in await lab.audit(f"{names.EVENTS_PREFIX}.*.claimed")
               if a.ts >= since_broker and a.event.data.get("via") == via)


def _measure(o: dict, next_t0: float, fids: list[str], switches: list[AuditEntry], claims: list[AuditEntry],
             finished: list[AuditEntry], repairs: list[AuditEntry]) -> dict:
    """One outage's figures from the audit (broker time): [t0, t1] is the hold, t_back when
    every record said push again, ``next_t0`` the start of the next outage."""
    t0, t1, t_back = o["t0"], o["t1"], o["t_back"]
    fall_back, returns, flaps = [], [], 0
    for fid in fids:
        mine = [a for a in switches if a.event.factory == fid]
        first_poll = next((a.ts for a in mine if t0 <= a.ts <= t1 and a.event.data.get("to") == "poll"), None)
        if first_poll is not None:
            fall_back.append(first_poll - t0)
        flaps += sum(1 for a in mine if t0 <= a.ts <= t1 and a.event.data.get("to") == "push")
        back = [a.ts for a in mine if t1 <= a.ts <= t_back and a.event.data.get("to") == "push"]
        returns.append(max(back) - t1 if back else 0.0)  # none: it was in push when the hold ended
    down = [a for a in claims if t0 <= a.ts <= t1]
    return {
        "fell_back": len(fall_back),
        "fall_back_s_max": round(max(fall_back), 3) if fall_back else None,
        "flaps": flaps,
        "finished_while_down": sum(1 for a in finished if t0 <= a.ts <= t1),
        "polled_claims": sum(1 for a in down if a.event.data.get("via") == "poll"),
        "push_claims_down": sum(1 for a in down if a.event.data.get("via") == "push"),
        "return_s_max": max(returns) if returns else 0.0,
        "push_claims_after": sum(1 for a in claims if t_back <= a.ts < next_t0 and a.event.data.get("via") == "push"),
        "repairs": sum(1 for a in repairs if t0 <= a.ts <= t_back),
    }
