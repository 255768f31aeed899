"""Running the load suite: the harness's processes (:mod:`harness`) driven through the
workloads (:mod:`workloads`), one phase after another, into one result.

Above both, so that the workloads can use the harness and the harness never imports them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gigafactory.schemas import names

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
        ctx.timelines = timelines_from(ours)
        ctx.timelines.update(timelines_from(base))
        for j, ts in (await read_first_events(run.admin_().js, "dispatched")).items():
            if j in ctx.timelines:
                ctx.timelines[j].dispatched = ts
        say("reading the stations' classes")
        ctx.info["lanes"] = await wl.lane_figures(run.admin_(), windows)
        if cfg.idle_s > 0:
            say(f"idle fleet for {cfg.idle_s:g}s")
            ctx.idle = await run.measure_idle(cfg.idle_s)
        if cfg.restart_jobs > 0:
            say(f"restart with {cfg.restart_jobs} jobs in the bucket")
            try:
                ctx.restart = await wl.restart_measure(ctx, cfg.restart_jobs)
            except (RuntimeError, TimeoutError) as e:
                # Reported, with the figures already taken, rather than losing the whole run.
                ctx.restart = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        result = wl.report(ctx)
    result.update({
        "command": None, "started_at": started, "elapsed_s": round(time.monotonic() - t0, 2),
        "config": cfg.to_dict(), "workdir": str(Path(cfg.workdir).resolve()),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    })
    return result
