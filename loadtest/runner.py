"""Running the load suite: the harness's processes (:mod:`harness`) driven through the
workloads (:mod:`workloads`), one phase after another, into one result.

Above both, so that the workloads can use the harness and the harness never imports them.
"""

from __future__ import annotations

import asyncio

import os
import time
from pathlib import Path

from gigafactory.schemas import names

from . import atleastonce as alo
from . import baseline as bl
from . import workloads as wl
from .harness import LoadConfig, LoadRun, read_first_events, read_history, timelines_from


async def run_load(cfg: LoadConfig, progress=None) -> dict:
    """One full run; returns the result (figures, tables as rows, notes). ``progress(text)``
    is told what the run is doing."""
    cfg.validate()
    unknown = [w for w in cfg.workloads if w not in wl.WORKLOADS]
    if unknown:
        raise ValueError(f"no workload {', '.join(unknown)}; 'gigafactory loadtest workloads' lists them: "
                         f"{', '.join(wl.WORKLOADS)}")
    say = progress or (lambda _t: None)
    started = time.time()
    t0 = time.monotonic()
    async with LoadRun(cfg) as run:
        say(f"broker on {run.url} (monitor {run.server.monitor_url}); baseline with "
            f"{cfg.total_stations} workers")
        ctx = wl.Context(run)
        await run.start_baseline()
        await wl.baseline_phase(ctx, "saturated", cfg.jobs, rate=None)
        await run.stop_baseline()
        say(f"at-least-once baseline with {cfg.factories} workers (fetch {alo.FETCH_BATCH}, run, ack)")
        await run.start_atleastonce()
        await wl.atleastonce_phase(ctx, "saturated", cfg.jobs)
        await run.stop_atleastonce()
        if cfg.auth and cfg.compare_no_auth and "noop" in cfg.workloads:
            # Before our own fleet starts, so that nothing else of the run is busy meanwhile.
            try:
                ctx.no_auth = await wl.no_auth_saturated(cfg, say)
            except (RuntimeError, TimeoutError, OSError) as e:
                # Reported (and the run marked failed), with the other figures still taken.
                ctx.no_auth = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        say(f"coordinator and {cfg.factories} factories x {cfg.stations} stations in {len(run.layout)} fleet hosts")
        await run.start_coordinator()
        await run.start_fleet()
        windows: dict[str, tuple[float, float]] = {}
        for name in cfg.workloads:
            say(f"workload {name}")
            begun = time.time()
            await wl.WORKLOADS[name].run(ctx)
            windows[name] = (begun, time.time())
        if ctx.paced_rate:
            say(f"baseline paced at {ctx.paced_rate:.1f} jobs/s")
            await run.start_baseline()
            await wl.baseline_phase(ctx, "paced", ctx.paced_count, rate=ctx.paced_rate)
            await run.stop_baseline()
        say("reading the broker's histories")
        ours = await read_history(run.admin_().js, f"KV_{names.JOBS_BUCKET}", f"$KV.{names.JOBS_BUCKET}.>")
        base = await read_history(run.admin_().js, f"KV_{bl.BUCKET}", f"$KV.{bl.BUCKET}.>")
        ctx.timelines.update(timelines_from(ours))  # the at-least-once timelines are in already
        ctx.timelines.update(timelines_from(base))
        for j, ts in (await read_first_events(run.admin_().js, "dispatched")).items():
            if j in ctx.timelines:
                ctx.timelines[j].dispatched = ts
        say("reading the stations' classes")
        ctx.info["lanes"] = await wl.lane_figures(run.admin_(), windows)
        say("judging the run's records with the invariant checker")
        ctx.invariants = await run.check_invariants()
        if cfg.idle_s > 0:
            settle_s = wl.idle_settle_s(run.settings) if cfg.idle_s >= wl.IDLE_SETTLE_MIN_WINDOW_S else 0.0
            if settle_s:
                # The last job's wake-ups (one full stall check per factory and pool, renewed long
                # polls) are not idle traffic: the window opens once they are over.
                say(f"letting the fleet settle for {settle_s:g}s")
                await asyncio.sleep(settle_s)
            say(f"idle fleet for {cfg.idle_s:g}s")
            ctx.idle = await run.measure_idle(cfg.idle_s)
            ctx.idle["settled_s"] = settle_s
        if cfg.restart_jobs > 0:
            say(f"restart with {cfg.restart_jobs} jobs in the bucket")
            try:
                ctx.restart = await wl.restart_measure(ctx, cfg.restart_jobs)
            except (RuntimeError, TimeoutError) as e:
                # Reported, with the figures already taken, rather than losing the whole run.
                ctx.restart = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        ctx.info["security"] = security_cost(cfg.auth)
        result = wl.report(ctx)
    result.update({
        "command": None, "started_at": started, "elapsed_s": round(time.monotonic() - t0, 2),
        "config": cfg.to_dict(), "workdir": str(Path(cfg.workdir).resolve()),
        "security": ctx.info["security"],
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    })
    if ctx.no_auth is None:  # no comparison in this run: say how to get one
        sec = result["security"]
        line = (f"== security: broker auth {'on' if sec['auth'] else 'OFF (--no-auth)'}; signed holder writes cost "
                f"{sec['sign_ms_per_write']:.3f} ms to sign + {sec['verify_ms_per_write']:.3f} ms to verify per "
                f"write, about {sec['signatures_cpu_ms_per_job']:.2f} ms CPU per job; permissions: "
                + ("run with the noop workload (and without --no-compare-security) to measure them"
                   if sec["auth"] else "compare with a default run") + "\n")
        for key in ("text", "markdown"):
            if isinstance(result.get(key), str):
                result[key] += "\n" + line
    return result


SECURITY_SAMPLE_WRITES = 200
"""Signed holder writes timed to estimate their cost (sign on the factory, verify on the coordinator)."""


def security_cost(auth: bool, writes: int = SECURITY_SAMPLE_WRITES) -> dict:
    """What security costs per job, beside the run's figures: the CPU time of signing a job
    record (the factory, every holder write) and verifying it (the coordinator, once per
    revision), measured here on a typical record; ``auth`` says whether this run's broker
    enforced identities and permissions (their cost is the difference between a run and the
    same run with ``--no-auth``). A job makes about 4 holder writes (claim, start, a renewal,
    the result)."""
    import msgspec

    from gigafactory.identity import new_keypair, sign, verify_holder
    from gigafactory.schemas import signing
    from gigafactory.schemas.records import JobRecord

    seed, pub = new_keypair()
    rec = msgspec.json.decode(msgspec.json.encode({
        "id": "load-0000000000000000", "manifest": {}, "body": "echo ok\n" * 20, "source": "loadtest",
        "content_hash": "0" * 64, "submitted_at": 0.0, "pool": "p", "requirements": ["engine:shell"],
        "stage": "building", "epoch": 1, "lease": {"factory": "f1", "station": 0, "epoch": 1}}), type=JobRecord)
    t0 = time.process_time()
    signed = [signing.signed(msgspec.structs.replace(rec, epoch=i), pub, lambda d: sign(seed, d))
              for i in range(writes)]
    t1 = time.process_time()
    bad = sum(signing.holder_verdict(r, pub, verify_holder) is not None for r in signed)
    t2 = time.process_time()
    assert bad == 0, f"{bad} of {writes} sample signatures did not verify"
    sign_ms, verify_ms = (t1 - t0) * 1000 / writes, (t2 - t1) * 1000 / writes
    return {"auth": auth, "sign_ms_per_write": round(sign_ms, 4), "verify_ms_per_write": round(verify_ms, 4),
            "signatures_cpu_ms_per_job": round(4 * (sign_ms + verify_ms), 4),
            "permissions": "enforced by the broker" if auth else "off (--no-auth)"}
