"""The workloads of the load suite, and what the run reports about them.

Every job is a no-op (the factory's built-in ``noop`` engine: no process, no log), except the
utilisation phase of ``noop``, whose jobs must hold their station for a while: those run
``sleep`` under the shell engine, at most about a hundred starts a second, so the machine's
fork rate does not become the figure.

Two workloads need a backlog by construction (``priorities``, ``multi-product``): the fleet
hosts are paused (SIGSTOP) while the backlog is submitted, for less than two heartbeat
periods so no factory is counted dead, then resumed. Their waits are counted from the
resume (or from submission, if later): time in the queue while the fleet could work.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigafactory.factory.agent import STALL_CHECKS_PER_REDISPATCH, idle_traffic_model
from gigafactory.factory.pools import QUIET_PROBE_EVERY_CHECKS
from gigafactory.schemas import names
from gigafactory.schemas.records import JobRecord, decode

from . import baseline as bl
from . import stats as st
from .atleastonce import FETCH_BATCH as ALO_FETCH_BATCH
from .harness import LoadConfig, LoadRun, Phase, Timeline, proc_rss_bytes, read_history, timelines_from

MB = 1024 * 1024
THROUGHPUT_RATIO_TARGET = st.Target(">=", 0.70, ">= 0.70x baseline")
ATLEASTONCE_RATIO_TARGET = st.Target(">=", 0.50, ">= 0.50x at-least-once")
CPU_PER_JOB_TARGET = st.Target("<=", 1.5, "<= 1.5 ms")
COORDINATOR_MEMORY_TARGET = st.Target("<=", 150.0, "<= 150 MB (100,000 jobs)")
IDLE_MODEL_TARGET = st.Target("<=", 10.0, "<= 10% off the model")
RESTART_TARGET_JOBS = 100_000
"""The restart and memory targets are stated for this many records in gf_jobs."""
PACED_P99_TARGET = st.Target("<", 10.0, "< 10 ms (100 factories)")
IDLE_CPU_TARGET = st.Target("<", 5.0, "< 5% (1,000 factories)")
UTIL_TARGET = st.Target(">=", 95.0, ">= 95%")
FAIRNESS_TARGET = st.Target("<=", 1.5, "<= 1.5x")
RESTART_TARGET = st.Target("<", 10.0, "< 10 s (100,000 jobs)")
LANES_TARGET = st.Target(">=", 50.0, ">= 50% (the seed's floor)")
IDLE_COVERAGE_TARGET = st.Target("==", 100.0, "100% (no dark idle)")
MAX_FORKS_PER_S = 100.0
"""Bound on shell starts in the utilisation phase: job length grows with the fleet instead."""


@dataclass
class Context:
    """What the workloads share during a run, and what :func:`report` reads afterwards."""

    run: LoadRun
    timelines: dict[str, Timeline] = field(default_factory=dict)
    phases: dict[str, Phase] = field(default_factory=dict)
    """By ``<side>:<name>``."""
    paced_rate: float | None = None
    paced_count: int = 0
    idle: dict | None = None
    restart: dict | None = None
    no_auth: dict | None = None
    invariants: dict | None = None
    """The invariant checker's report on the run's records (:meth:`LoadRun.check_invariants`)."""
    """The figures of the saturated noop phase run again without authentication or signatures
    (:func:`no_auth_saturated`), None when the run did not compare."""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self):
        return self.run.cfg

    def keep(self, ph: Phase) -> Phase:
        self.phases[f"{ph.side}:{ph.name}"] = ph
        return ph

    async def refresh(self) -> None:
        js = self.run.admin_().js
        self.timelines.update(timelines_from(await read_history(js, f"KV_{names.JOBS_BUCKET}",
                                                                f"$KV.{names.JOBS_BUCKET}.>")))
        self.timelines.update(timelines_from(await read_history(js, f"KV_{bl.BUCKET}", f"$KV.{bl.BUCKET}.>")))


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    run: Callable[[Context], Awaitable[None]]


# -- figures of a phase -------------------------------------------------------------------------


def phase_figures(ctx: Context, ph: Phase, *, wait_from: float | None = None) -> dict[str, Any]:
    """Throughput, latencies, claim counters and CPU per job of one phase, from the broker's
    timelines. ``wait_from``: dispatch waits count from this time if it is later than the
    job's becoming queued (the fleet was paused until then)."""
    tls = [ctx.timelines[j] for j in ph.ids if j in ctx.timelines]
    done = [t for t in tls if t.done is not None]
    n = len(ph.ids)
    first = min((t.submitted for t in tls), default=None)
    last = max((t.done for t in done), default=None)
    window = (last - first) if first is not None and last is not None else None

    def queued_at(t: Timeline) -> float:
        q = t.queued if t.queued is not None else t.submitted
        return max(q, wait_from) if wait_from is not None else q

    dispatch = [t.claimed - queued_at(t) for t in tls if t.claimed is not None]
    completion = [t.done - t.submitted for t in done]
    coord = [t.dispatched - queued_at(t) for t in tls if t.dispatched is not None and t.claimed is not None]
    fact = [t.claimed - t.dispatched for t in tls if t.dispatched is not None and t.claimed is not None]
    claims = ph.counters.get("claims", 0)
    return {
        "jobs": n, "completed": len(done), "not_completed": n - len(done), "untracked": n - len(tls),
        "failed": sum(1 for t in done if t.stage in ("failed", "dead_letter")),
        "window_s": None if window is None else round(window, 4),
        "throughput_jobs_per_s": st.rate(len(done), window),
        "dispatch": st.summary_ms(dispatch), "completion": st.summary_ms(completion),
        "dispatch_coordinator_part": st.summary_ms(coord), "dispatch_factory_part": st.summary_ms(fact),
        "claim_attempts": claims, "claim_conflicts": ph.counters.get("claim_conflicts", 0),
        "claim_skipped": ph.counters.get("claim_skipped", 0),
        "attempts_per_job": st.per_job(claims, n), "conflicts_per_job": st.per_job(ph.counters.get("claim_conflicts", 0), n),
        "cpu_s": ph.cpu_s, "cpu_ms_per_job": {k: (v * 1000 / n if n else None) for k, v in ph.cpu_s.items()},
        "wall_s": round(ph.wall_s, 3), "extra": ph.extra,
    }


# -- the baseline ---------------------------------------------------------------------------------


async def baseline_phase(ctx: Context, name: str, count: int, rate: float | None) -> Phase:
    run = ctx.run
    async with run.phase(name, "baseline") as ph:
        keys = [f"b-{name}-{i:06d}" for i in range(count)]
        ph.ids = keys
        await run.baseline_submit(keys, rate)
        ph.missing = await run.wait_done(keys, run.done_timeout_s(count))
    ctx.keep(ph)
    if name == "saturated":
        await ctx.refresh()
        ctx.info["baseline_saturated_tp"] = phase_figures(ctx, ph)["throughput_jobs_per_s"]
    return ph


async def atleastonce_phase(ctx: Context, name: str, count: int) -> Phase:
    """``count`` tasks through the taskiq-style workers (:mod:`atleastonce`), as fast as the
    submitter publishes them; each task's times come from the workers (there is no record)."""
    run = ctx.run
    async with run.phase(name, "atleastonce") as ph:
        ids = [f"t-{name}-{i:06d}" for i in range(count)]
        ph.ids = ids
        await run.atleastonce_submit(ids)
        await run.atleastonce_wait(run.done_timeout_s(count))
    times = (await run.atleastonce_stats()).get("times", {})
    for tid in ids:
        if tid in times:
            sub, taken, done = times[tid]
            ctx.timelines[tid] = Timeline(submitted=sub, queued=sub, claimed=taken, done=done, stage="shipped")
    ph.missing = [t for t in ids if t not in times]
    return ctx.keep(ph)


async def no_auth_saturated(cfg: LoadConfig, say: Callable[[str], None]) -> dict:
    """The saturated noop phase again, on a broker of its own without authentication, with a
    coordinator and fleet of the same shape that connect without identities (so no permission
    checks and no signed holder writes): its figures, to set beside the run's own. Run while
    nothing else of the run is busy; everything it starts is stopped before it returns."""
    sub = dataclasses.replace(cfg, auth=False, workdir=Path(cfg.workdir) / "no-auth", idle_s=0.0, restart_jobs=0,
                              workloads=("noop",))
    async with LoadRun(sub) as run:
        say(f"no-auth broker on {run.url}: coordinator and {cfg.factories} factories without identities")
        await run.start_coordinator()
        await run.start_fleet()
        ctx = Context(run)
        ph = await _ours(ctx, "noop saturated", [run.job() for _ in range(cfg.jobs)])
        ctx.timelines.update(timelines_from(await read_history(run.admin_().js, f"KV_{names.JOBS_BUCKET}",
                                                               f"$KV.{names.JOBS_BUCKET}.>")))
        figures = phase_figures(ctx, ph)
        figures["invariants"] = await run.check_invariants()
        return figures


# -- workloads ------------------------------------------------------------------------------------


async def _ours(ctx: Context, name: str, texts: list[str], *, rate: float | None = None) -> Phase:
    run = ctx.run
    async with run.phase(name) as ph:
        ph.ids = await (run.submit_paced(texts, rate) if rate else run.submit(texts))
        ph.missing = await run.wait_done(ph.ids, run.done_timeout_s(len(texts)))
    return ctx.keep(ph)


async def noop(ctx: Context) -> None:
    run, cfg = ctx.run, ctx.cfg
    sat = await _ours(ctx, "noop saturated", [run.job() for _ in range(cfg.jobs)])
    await ctx.refresh()
    ours_tp = phase_figures(ctx, sat)["throughput_jobs_per_s"]
    base_tp = ctx.info.get("baseline_saturated_tp")
    slower = min(x for x in (ours_tp, base_tp) if x) if (ours_tp or base_tp) else 10.0
    ctx.paced_rate = max(1.0, cfg.pace_fraction * slower)
    ctx.paced_count = max(20, min(cfg.jobs, int(ctx.paced_rate * 20)))
    paced = await _ours(ctx, "noop paced", [run.job() for _ in range(ctx.paced_count)], rate=ctx.paced_rate)
    paced.extra["rate_jobs_per_s"] = ctx.paced_rate
    # Utilisation: jobs that hold a station, three rounds of the whole fleet, as a backlog.
    stations = cfg.total_stations
    hold_s = max(cfg.busy_job_s, stations / MAX_FORKS_PER_S)
    texts = [run.job(engine="shell", script=f"sleep {hold_s:g}") for _ in range(3 * stations)]
    util = await _ours(ctx, "utilisation", texts)
    util.extra["hold_s"] = hold_s


async def priorities(ctx: Context) -> None:
    run, cfg = ctx.run, ctx.cfg
    n_crit = max(3, cfg.jobs // 20)
    async with run.phase("priorities") as ph:
        run.pause_fleet()
        t0 = time.monotonic()
        backlog: list[str] = []
        try:
            # Bounded: a pause of two heartbeat periods would make the fleet look dead.
            while len(backlog) < cfg.jobs and time.monotonic() - t0 < 1.5 * run.settings.heartbeat_s:
                k = min(cfg.batch, cfg.jobs - len(backlog))
                backlog += await run.submit([run.job(priority="low") for _ in range(k)])
            critical = await run.submit([run.job(priority="critical") for _ in range(n_crit)])
        finally:
            resumed = time.time()  # before the signals: a woken host may claim before this process runs again
            run.resume_fleet()
        ph.ids = backlog + critical
        ph.extra.update(backlog=backlog, critical=critical, resumed_at=resumed)
        ph.missing = await run.wait_done(ph.ids, run.done_timeout_s(len(ph.ids)))
    ctx.keep(ph)


async def dag(ctx: Context) -> None:
    run, cfg = ctx.run, ctx.cfg
    depth = max(3, min(20, cfg.jobs // 10))
    width = max(2, min(cfg.jobs // 4, cfg.total_stations, 400))
    p = f"lt-{run.id}-dag"
    texts, chains = [], []
    for c in range(2):  # two deep chains
        keys = [f"{p}-c{c}-{i}" for i in range(depth)]
        chains.append(keys)
        texts += [run.job(key=k, deps=[keys[i - 1]] if i else None) for i, k in enumerate(keys)]
    wide = [f"{p}-w-{i}" for i in range(width)]  # fan-out from a root, fan-in to a join
    texts.append(run.job(key=f"{p}-root"))
    texts += [run.job(key=k, deps=[f"{p}-root"]) for k in wide]
    texts.append(run.job(key=f"{p}-join", deps=wide))
    async with run.phase("dag") as ph:
        ids = await run.submit(texts, batch=len(texts))
        ph.ids = ids
        ph.missing = await run.wait_done(ids, run.done_timeout_s(len(ids)))
        by_key = dict(zip([k for ch in chains for k in ch] + [f"{p}-root"] + wide + [f"{p}-join"], ids))
        ph.extra.update(depth=depth, width=width, chains=[[by_key[k] for k in ch] for ch in chains],
                        root=by_key[f"{p}-root"], wide=[by_key[k] for k in wide], join=by_key[f"{p}-join"])
    ctx.keep(ph)


async def multi_product(ctx: Context) -> None:
    run, cfg = ctx.run, ctx.cfg
    shares = {"prod-a": 0.5, "prod-b": 0.3, "prod-c": 0.2}
    async with run.phase("multi-product") as ph:
        run.pause_fleet()
        t0 = time.monotonic()
        products: dict[str, list[str]] = {}
        budget_s = 1.5 * run.settings.heartbeat_s  # the pause must stay under two heartbeats
        try:
            cum = 0.0
            for prod, share in shares.items():  # one product after another, the big one first
                cum += share
                want = max(3, int(cfg.jobs * share))
                got: list[str] = []
                # Each product gets its share of the pause, so a slow intake shortens every
                # product instead of leaving the last one out.
                while len(got) < want and (len(got) < 3 or time.monotonic() - t0 < budget_s * cum):
                    got += await run.submit([run.job(product=prod) for _ in range(min(cfg.batch, want - len(got)))])
                products[prod] = got
        finally:
            resumed = time.time()  # before the signals: a woken host may claim before this process runs again
            run.resume_fleet()
        ph.ids = [j for ids in products.values() for j in ids]
        ph.extra.update(products=products, resumed_at=resumed)
        ph.missing = await run.wait_done(ph.ids, run.done_timeout_s(len(ph.ids)))
    ctx.keep(ph)


async def mixed_capabilities(ctx: Context) -> None:
    run, cfg = ctx.run, ctx.cfg
    rng = random.Random(0)
    mix = [("common", ("tier:common",), 0.6), ("gpu", ("gpu",), 0.3), ("rare", ("hsm",), 0.1)]
    if cfg.factories < 3:
        mix = [("common", ("tier:common",), 1.0)]
    plan = [name for name, _caps, share in mix for _ in range(max(2, int(cfg.jobs * share)))]
    rng.shuffle(plan)
    capmap = {name: c for name, c, _ in mix}
    texts = [run.job(caps=capmap[name]) for name in plan]
    async with run.phase("mixed-capabilities") as ph:
        ph.ids = await run.submit(texts)
        ph.missing = await run.wait_done(ph.ids, run.done_timeout_s(len(texts)))
        pools: dict[str, list[str]] = defaultdict(list)
        for name, jid in zip(plan, ph.ids):
            pools[name].append(jid)
        sizes = {"common": cfg.factories}
        for spec in run.layout:
            if "gpu" in spec.caps:
                sizes["gpu"] = sizes.get("gpu", 0) + spec.count
            if "hsm" in spec.caps:
                sizes["rare"] = sizes.get("rare", 0) + spec.count
        ph.extra.update(pools=dict(pools), pool_factories=sizes)
    ctx.keep(ph)


async def herd(ctx: Context) -> None:
    run, cfg = ctx.run, ctx.cfg
    k = max(3, min(20, cfg.jobs))
    async with run.phase("herd") as ph:
        for _ in range(k):  # one at a time into the idle fleet
            ids = await run.submit([run.job()])
            ph.ids += ids
            ph.missing += await run.wait_done(ids, 60.0)
    ctx.keep(ph)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("noop", "no-op jobs saturated and paced, beside the baseline; station utilisation under a backlog", noop),
    Workload("mixed-capabilities", "pools of very different sizes, including a capability one factory holds",
             mixed_capabilities),
    Workload("priorities", "critical jobs arriving into a low-priority backlog", priorities),
    Workload("dag", "two deep dependency chains and a wide fan-out/fan-in", dag),
    Workload("multi-product", "three products of different volumes competing for the same stations", multi_product),
    Workload("herd", "one job at a time into a large idle fleet", herd),
)}


# -- the restart ----------------------------------------------------------------------------------


async def restart_measure(ctx: Context, count: int) -> dict:
    """A coordinator restart with ``count`` more records in ``gf_jobs``: seconds until its API
    answers, until it logs ready (view replayed), and until a job submitted as soon as the API
    answered is claimed (its first dispatch pass). And a factory's memory before and after."""
    run = ctx.run
    single = await run.start_single_factory()
    rss = {"single_before": proc_rss_bytes(single.pid),
           "fleet_before": sum(proc_rss_bytes(p.pid) or 0 for p in run.hosts.values())}
    template = None
    async for e in run.admin_().jobs.scan():
        rec = decode(e.value, JobRecord)
        if str(rec.stage) == "shipped":
            template = rec
            break
    if template is None:
        return {"error": "no shipped job to copy as the fill's template (run a workload first)"}
    assert run.coordinator is not None
    await run.coordinator.terminate(timeout_s=20.0)
    fill_s = await run.fill_jobs(count, template)
    ready_before = run.coordinator_ready_count()
    t0 = time.monotonic()
    api_s = await run.start_coordinator()
    job = (await run.submit([run.job()]))[0]
    await run.wait_until(lambda: run.coordinator_ready_count() > ready_before, 120.0, "the coordinator ready",
                         proc=run.coordinator, interval_s=0.01)
    ready_s = time.monotonic() - t0
    await run.wait_until(lambda: run.stages.get(job) not in (None, "queued", "blocked"), 120.0,
                         "the first job after the restart claimed", interval_s=0.005)
    first_claim_s = time.monotonic() - t0
    missing = await run.wait_done([job], 60.0)
    rss.update(single_after=proc_rss_bytes(single.pid),
               fleet_after=sum(proc_rss_bytes(p.pid) or 0 for p in run.hosts.values()),
               coordinator_after=proc_rss_bytes(run.coordinator.pid))
    return {"jobs_in_bucket": count + len(ctx.timelines), "filled": count, "fill_s": round(fill_s, 3),
            "api_s": round(api_s, 3), "ready_s": round(ready_s, 3), "first_claim_s": round(first_claim_s, 3),
            "first_job_done": not missing, "rss_bytes": rss}


# -- the report -----------------------------------------------------------------------------------


def _ms(summary: dict, q: str) -> float | None:
    return summary.get(f"{q}_ms")


def _cpu_parts(f: dict) -> str:
    """``broker 0.95, coordinator 0.92, ...``: a phase's CPU per job by process, in ms."""
    return ", ".join(f"{k} {v:.2f}" for k, v in f["cpu_ms_per_job"].items() if v is not None)


def _bound_note(f: dict) -> str:
    """What bounds throughput, from the CPU each component spent per job."""
    per = {k: v for k, v in f["cpu_ms_per_job"].items() if v is not None}
    if not per:
        return ""
    total = sum(per.values())
    top = max(per, key=per.get)
    cores = 2
    return (f"CPU per job {total:.2f} ms in all ({', '.join(f'{k} {v:.2f}' for k, v in per.items())}): "
            f"the machine's {cores} cores allow ~{cores * 1000 / total:.0f} jobs/s; the {top} alone, on one core, "
            f"~{1000 / per[top]:.0f} jobs/s")


def report(ctx: Context) -> dict:
    """The result: figures per phase, the tables (as rows) and notes."""
    cfg = ctx.cfg
    tables: list[st.Table] = []
    figures: dict[str, Any] = {}
    for key, ph in ctx.phases.items():
        wait_from = ph.extra.get("resumed_at")
        figures[key] = phase_figures(ctx, ph, wait_from=wait_from)
    if ctx.no_auth is not None and "error" not in ctx.no_auth:
        figures["no-auth:noop saturated"] = ctx.no_auth
    ours, base = figures.get("ours:noop saturated"), figures.get("baseline:saturated")
    paced, base_paced = figures.get("ours:noop paced"), figures.get("baseline:paced")
    t = st.Table(f"noop: ours vs the baseline ({cfg.factories} factories x {cfg.stations} stations)")
    if ours and base:
        t.add(st.row("saturated jobs completed", ours["completed"], baseline=base["completed"]))
        t.add(st.row("saturated throughput", ours["throughput_jobs_per_s"], "jobs/s",
                     baseline=base["throughput_jobs_per_s"], target=THROUGHPUT_RATIO_TARGET, judge_on="ratio",
                     note=_bound_note(ours)))
    alo = figures.get("atleastonce:saturated")
    if ours and alo:
        alo_cpu = st.cpu_total_ms(alo["cpu_ms_per_job"])
        t.add(st.row(f"saturated throughput; baseline: at-least-once workers (fetch {ALO_FETCH_BATCH}, no claim)",
                     ours["throughput_jobs_per_s"], "jobs/s", baseline=alo["throughput_jobs_per_s"],
                     target=ATLEASTONCE_RATIO_TARGET, judge_on="ratio",
                     note=f"the at-least-once workers spend {st.fmt(alo_cpu)} ms CPU per task in all "
                          f"({_cpu_parts(alo)}) for one publish, a sixteenth of a fetch and one ack; ours "
                          f"{st.fmt(st.cpu_total_ms(ours['cpu_ms_per_job']))} ms"))
    if ours and base:
        total = st.cpu_total_ms(ours["cpu_ms_per_job"])
        t.add(st.row("CPU per job, all processes", total, "ms", baseline=st.cpu_total_ms(base["cpu_ms_per_job"]),
                     target=CPU_PER_JOB_TARGET, note=f"{_cpu_parts(ours)} (the baseline column: the CAS baseline's)"))
    if alo:
        t.add(st.row("at-least-once CPU per task, all processes", st.cpu_total_ms(alo["cpu_ms_per_job"]), "ms"))
    if ours and base:
        for label, k in (("dispatch", "dispatch"), ("completion", "completion")):
            for q in ("p50", "p95", "p99"):
                t.add(st.row(f"saturated {label} latency {q}", _ms(ours[k], q), "ms", baseline=_ms(base[k], q)))
        t.add(st.row("claim attempts per job", ours["attempts_per_job"], baseline=base["attempts_per_job"]))
        t.add(st.row("CAS conflicts per job", ours["conflicts_per_job"], baseline=base["conflicts_per_job"]))
        t.add(st.row("coordinator CPU per job", ours["cpu_ms_per_job"].get("coordinator"), "ms"))
        t.add(st.row("factory CPU per job", ours["cpu_ms_per_job"].get("factories"), "ms",
                     baseline=base["cpu_ms_per_job"].get("baseline")))
        t.add(st.row("broker CPU per job", ours["cpu_ms_per_job"].get("broker"), "ms",
                     baseline=base["cpu_ms_per_job"].get("broker")))
    if paced:
        t.add(st.row("paced rate", ctx.paced_rate, "jobs/s"))
        for q in ("p50", "p95", "p99"):
            r = st.row(f"paced dispatch latency {q}", _ms(paced["dispatch"], q), "ms",
                       baseline=_ms(base_paced["dispatch"], q) if base_paced else None,
                       target=PACED_P99_TARGET if q == "p99" else None)
            if q == "p99":
                coord, fact = paced["dispatch_coordinator_part"], paced["dispatch_factory_part"]
                r.note = (f"p99 split: submit->dispatched (coordinator) {fmt_ms(coord['p99_ms'])}, "
                          f"dispatched->claimed (factory) {fmt_ms(fact['p99_ms'])}")
                if cfg.factories < 100:
                    r.verdict, r.note = "n/a", f"target is for 100 factories; this run had {cfg.factories}"
            t.add(r)
        for q in ("p50", "p99"):
            t.add(st.row(f"paced completion latency {q}", _ms(paced["completion"], q), "ms",
                         baseline=_ms(base_paced["completion"], q) if base_paced else None))
    util = figures.get("ours:utilisation")
    if util:
        u = utilisation(ctx, ctx.phases["ours:utilisation"])
        util["utilisation"] = u
        r = st.row("stations busy under a backlog", None if u["busy_pct"] is None else round(u["busy_pct"], 2), "%",
                   target=UTIL_TARGET,
                   note=f"mean gap between a station's jobs {fmt_ms(u['gap_ms_mean'])} against jobs of "
                        f"{u['hold_s']:g}s; ramp to all stations busy {u['ramp_s']}s; keeping "
                        f"{cfg.total_stations} stations busy takes {cfg.total_stations / u['hold_s']:.0f} "
                        f"dispatches/s against a saturated noop throughput of "
                        f"{st.fmt((ours or {}).get('throughput_jobs_per_s'))} jobs/s")
        t.add(r)
    _memory_rows(ctx, t)
    if t.rows:
        tables.append(t)
    for name, fn in (("priorities", _priorities), ("dag", _dag), ("multi-product", _multi_product),
                     ("mixed-capabilities", _mixed), ("herd", _herd)):
        f = figures.get(f"ours:{name}")
        if f:
            tables.append(fn(ctx, ctx.phases[f"ours:{name}"], f))
    if ctx.no_auth is not None:
        tables.append(_security(ctx, ours))
    if ctx.invariants is not None:
        tables.append(_invariants(ctx))
    if ctx.info.get("lanes"):
        tables.append(_lanes(ctx))
    if ctx.idle:
        tables.append(_idle(ctx))
    if ctx.restart:
        tables.append(_restart(ctx))
    incomplete = {k: f["not_completed"] for k, f in figures.items() if f["not_completed"]}
    return {"tables": [{"title": x.title, "rows": [r.to_dict() for r in x.rows]} for x in tables],
            "text": st.to_text(tables), "markdown": st.to_markdown(tables), "figures": figures,
            "idle": ctx.idle, "restart": ctx.restart, "paced_rate": ctx.paced_rate, "lanes": ctx.info.get("lanes"),
            "no_auth": ctx.no_auth, "invariants": ctx.invariants, "incomplete": incomplete,
            "failures": (failures := run_failures(ctx, incomplete)), "ok": not failures}


def run_failures(ctx: Context, incomplete: dict[str, int]) -> list[str]:
    """Why the run failed (empty: it did not): jobs not completed, a phase that could not be
    measured, or a violation found in its records."""
    out = [f"{k}: {n} jobs not completed" for k, n in incomplete.items()]
    if (ctx.restart or {}).get("error"):
        out.append(f"restart: {ctx.restart['error'].splitlines()[-1][:300]}")
    if (ctx.no_auth or {}).get("error"):
        out.append(f"the run without auth: {ctx.no_auth['error'].splitlines()[-1][:300]}")
    if not invariants_ok(ctx):
        for label, rep in (("records", ctx.invariants), ("records without auth", (ctx.no_auth or {}).get("invariants"))):
            if rep is not None and rep.get("ok") is not True:
                out.append(f"invariants of the {label}: " + (rep.get("error") or f"violations {rep.get('by_invariant')}"))
    return out


async def lane_figures(broker, windows: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """Per workload: lane allocation and idle classification coverage over its window (epoch
    seconds), from the factories' ``station`` events (:mod:`gigafactory.economics.idle`). The
    run's broker is its own, so every event in it is this run's: read from the first. A read
    that fails is reported as the workloads' ``error``, never the end of the run."""
    from gigafactory.economics import idle

    if not windows:
        return {}
    try:
        evs = await idle.read_station_events(broker, None, max(b for _a, b in windows.values()))
    except Exception as e:  # the figures are missing, the run's other figures stand
        return {name: {"error": f"{type(e).__name__}: {e}"} for name in windows}
    ts = idle.transitions_from_events(evs)
    return {name: idle.summarise(idle.intervals(ts, a, b))[""].to_dict() for name, (a, b) in windows.items()}


def _lanes(ctx: Context) -> st.Table:
    t = st.Table("lanes and idle per workload (station and run events)")
    for name, f in ctx.info["lanes"].items():
        if "error" in f:
            t.add(st.row(f"{name}: lane allocation", None, "%", note=f["error"]))
            continue
        t.add(st.row(f"{name}: lane allocation", round(f["lane_allocation"] * 100, 2), "%", target=LANES_TARGET,
                     note=f"{f['busy_s']:.1f}s busy of {f['available_s']:.1f}s over {f['stations']} stations"))
        t.add(st.row(f"{name}: idle classification coverage", round(f["idle_coverage"] * 100, 2), "%",
                     target=IDLE_COVERAGE_TARGET,
                     note=", ".join(f"{k} {v:.1f}s" for k, v in sorted(f["by_class_s"].items())) or "no idle time"))
    return t


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def utilisation(ctx: Context, ph: Phase) -> dict:
    stations = ctx.cfg.total_stations
    tls = [ctx.timelines[j] for j in ph.ids if j in ctx.timelines and ctx.timelines[j].claimed is not None]
    hold_s = ph.extra.get("hold_s", 0.0)
    if not tls:
        return {"busy_pct": None, "gap_ms_mean": None, "hold_s": hold_s, "ramp_s": None}
    ivs = [(t.claimed, t.done if t.done is not None else t.claimed) for t in tls]
    first_claim = min(a for a, _ in ivs)
    last_claim = max(a for a, _ in ivs)
    # The window is the steady backlog: from the moment every station was busy (or the peak)
    # to the last claim (after it nothing waited).
    marks = sorted([(a, 1) for a, _ in ivs] + [(b, -1) for _, b in ivs])
    busy, peak, full_at = 0, 0, None
    for ts, d in marks:
        busy += d
        if busy > peak:
            peak, peak_at = busy, ts
        if busy >= stations and full_at is None:
            full_at = ts
    start = full_at if full_at is not None else peak_at
    frac = st.busy_fraction(ivs, stations, start, last_claim)
    held = sum(b - a for a, b in ivs)
    jobs_per_station = len(ivs) / stations
    gap = None
    if frac is not None and jobs_per_station:
        gap = ((1 - frac) * (last_claim - start) * stations / max(1, len(ivs))) * 1000
    return {"busy_pct": None if frac is None else frac * 100, "window_s": round(last_claim - start, 3),
            "ramp_s": round(start - first_claim, 3), "peak_busy": peak, "stations": stations,
            "gap_ms_mean": gap, "hold_s": hold_s, "busy_s": round(held, 3)}


def _priorities(ctx: Context, ph: Phase, f: dict) -> st.Table:
    """Critical jobs are judged by the order in which the coordinator *offered* jobs (its
    ``dispatched`` events, broker time): that order is the scheduler's decision. Claims are
    reported too, but they interleave: a hundred factories claim the offers of one pass at
    once, so a backlog job offered after a critical one can be claimed a millisecond before it."""
    t = st.Table("priorities: critical jobs into a low-priority backlog")
    tl = ctx.timelines
    resumed = ph.extra["resumed_at"]
    crit = [tl[j] for j in ph.extra["critical"] if j in tl and tl[j].claimed is not None]
    back = [tl[j] for j in ph.extra["backlog"] if j in tl]
    back_claims = [b.claimed for b in back if b.claimed is not None]
    claimed_ahead = st.overtaken([(max(c.submitted, resumed), c.claimed) for c in crit], back_claims)
    # Offered ahead: backlog jobs first offered after a critical job was on record and before
    # that critical job was offered. Offers out before it arrived (one per free station) are
    # not counted: they were the right decision when they were made.
    crit_offered = [c for c in crit if c.dispatched is not None]
    offered_ahead = st.overtaken([(c.submitted, c.dispatched) for c in crit_offered],
                                 [b.dispatched for b in back if b.dispatched is not None])
    remaining = [sum(1 for b in back_claims if b > c.claimed) for c in crit]
    waits = [c.claimed - max(c.submitted, resumed) for c in crit]
    ok = bool(crit_offered) and len(crit_offered) == len(crit) and max(offered_ahead) == 0 and min(remaining) > 0
    f["critical"] = {"offered_ahead_of": offered_ahead, "claimed_ahead_of": claimed_ahead,
                     "backlog_waiting_at_claim": remaining, "wait": st.summary_ms(waits)}
    t.add(st.row("backlog (low) jobs", len(ph.extra["backlog"])))
    t.add(st.row("critical jobs", len(ph.extra["critical"])))
    t.add(st.row("critical wait p50 (from resume)", _ms(st.summary_ms(waits), "p50"), "ms"))
    t.add(st.row("critical wait max", _ms(st.summary_ms(waits), "max"), "ms"))
    t.add(st.row("backlog jobs claimed between a critical's submission and its claim (max)", max(claimed_ahead, default=None),
                 note=f"claims of one pass's offers interleave across {ctx.cfg.factories} factories; "
                      f"{ctx.cfg.total_stations} offers were already out when the criticals arrived"))
    t.add(st.row("backlog still waiting when the last critical was claimed", min(remaining, default=None)))
    r = st.row("backlog jobs offered after a critical arrived, ahead of it (max)", max(offered_ahead, default=None))
    r.target = st.Target("==", 0, "critical offered first")
    r.verdict = "met" if ok else ("n/a" if not crit else "missed")
    if not ok:
        r.note = (f"{max(offered_ahead, default=0)} backlog offers went ahead of a critical job on record; "
                  f"{len(crit) - len(crit_offered)} critical jobs without a dispatched event")
    t.add(r)
    t.add(st.row("throughput", f["throughput_jobs_per_s"], "jobs/s"))
    return t


def _dag(ctx: Context, ph: Phase, f: dict) -> st.Table:
    t = st.Table("dag: two deep chains and a wide fan-out/fan-in")
    tl = ctx.timelines
    hops = []
    for chain in ph.extra["chains"]:
        for a, b in zip(chain, chain[1:]):
            if a in tl and b in tl and tl[a].done and tl[b].claimed:
                hops.append(tl[b].claimed - tl[a].done)
    root, join = tl.get(ph.extra["root"]), tl.get(ph.extra["join"])
    wide = [tl[j] for j in ph.extra["wide"] if j in tl]
    fan_out = [w.claimed - root.done for w in wide if root and root.done and w.claimed]
    fan_in = (join.claimed - max(w.done for w in wide)) if join and join.claimed and wide and all(w.done for w in wide) else None
    hop_s = st.summary_ms(hops)
    f["dag"] = {"hop": hop_s, "fan_out": st.summary_ms(fan_out), "fan_in_s": fan_in}
    depth = ph.extra["depth"]
    paced = ctx.phases.get("ours:noop paced")
    single = None
    if paced:
        single = phase_figures(ctx, paced)["completion"]["p50_ms"]
    t.add(st.row("jobs", f["jobs"]))
    t.add(st.row("critical path (jobs)", depth))
    t.add(st.row("makespan", None if f["window_s"] is None else f["window_s"] * 1000, "ms"))
    r = st.row("makespan per critical-path job", None if f["window_s"] is None else f["window_s"] * 1000 / depth, "ms",
               baseline=single)
    r.note = "baseline column: one paced job's completion p50 (the least a hop can cost)"
    t.add(r)
    t.add(st.row("dependency hop (dep shipped -> dependent claimed) p50", hop_s["p50_ms"], "ms"))
    t.add(st.row("dependency hop p99", hop_s["p99_ms"], "ms"))
    t.add(st.row(f"fan-out to {len(wide)} p99", st.summary_ms(fan_out)["p99_ms"], "ms"))
    t.add(st.row("fan-in (last of the wide shipped -> join claimed)", None if fan_in is None else fan_in * 1000, "ms"))
    return t


def _multi_product(ctx: Context, ph: Phase, f: dict) -> st.Table:
    t = st.Table("multi-product: three products of different volumes, same stations")
    tl = ctx.timelines
    resumed = ph.extra["resumed_at"]
    medians = {}
    for prod, ids in ph.extra["products"].items():
        waits = [tl[j].claimed - max(tl[j].submitted, resumed) for j in ids if j in tl and tl[j].claimed]
        medians[prod] = st.percentile(waits, 50)
        t.add(st.row(f"{prod}: jobs / median wait", f"{len(ids)} / {fmt_ms(None if medians[prod] is None else medians[prod] * 1000)}"))
    vals = [m for m in medians.values() if m is not None and m > 0]
    worst = (max(vals) / min(vals)) if len(vals) >= 2 else None
    f["products"] = {k: (None if v is None else v * 1000) for k, v in medians.items()}
    order = list(medians)  # submission order: the biggest product first
    known = [medians[p] for p in order if medians[p] is not None]
    fifo = len(known) >= 2 and all(a <= b for a, b in zip(known, known[1:]))
    slow = max(medians, key=lambda k: medians[k] or 0) if medians else "-"
    note = (f"waits grow in submission order ({' < '.join(order)}): the backlog was served first come, first "
            f"served, with no per-product share" if fifo else f"{slow} waited longest")
    t.add(st.row("max ratio of product median waits", None if worst is None else round(worst, 3), "x",
                 target=FAIRNESS_TARGET, note=note))
    t.add(st.row("throughput", f["throughput_jobs_per_s"], "jobs/s"))
    return t


def _mixed(ctx: Context, ph: Phase, f: dict) -> st.Table:
    t = st.Table("mixed-capabilities: pools of very different sizes")
    tl = ctx.timelines
    per = {}
    for pool, ids in ph.extra["pools"].items():
        ts = [tl[j] for j in ids if j in tl]
        d = st.summary_ms([x.claimed - x.submitted for x in ts if x.claimed])
        c = st.summary_ms([x.done - x.submitted for x in ts if x.done])
        per[pool] = {"jobs": len(ids), "dispatch": d, "completion": c}
        nf = ph.extra["pool_factories"].get(pool)
        t.add(st.row(f"{pool} pool ({nf} factories): jobs", len(ids)))
        t.add(st.row(f"{pool} pool: dispatch p50 / p99", f"{fmt_ms(d['p50_ms'])} / {fmt_ms(d['p99_ms'])}"))
        t.add(st.row(f"{pool} pool: completion p99", c["p99_ms"], "ms"))
    f["pools"] = per
    t.add(st.row("completed", f["completed"], note="every job must complete"))
    t.add(st.row("throughput", f["throughput_jobs_per_s"], "jobs/s"))
    return t


def _herd(ctx: Context, ph: Phase, f: dict) -> st.Table:
    t = st.Table(f"herd: one job at a time into {ctx.cfg.factories} idle factories")
    t.add(st.row("jobs", f["jobs"]))
    t.add(st.row("claim attempts per job", f["attempts_per_job"]))
    t.add(st.row("CAS conflicts per job", f["conflicts_per_job"]))
    t.add(st.row("claims skipped per job", st.per_job(f["claim_skipped"], f["jobs"])))
    t.add(st.row("dispatch latency p50", f["dispatch"]["p50_ms"], "ms"))
    t.add(st.row("dispatch latency p99", f["dispatch"]["p99_ms"], "ms"))
    t.add(st.row("completion latency p50", f["completion"]["p50_ms"], "ms"))
    return t


def _security(ctx: Context, on: dict | None) -> st.Table:
    """The saturated noop phase with authentication, permissions and signed writes (the run's
    own: the value column) beside the same phase on a broker without them (the baseline
    column), and the difference per job."""
    t = st.Table("security: saturated noop with authentication, permissions and signatures (value) and "
                 "without (baseline column), same run")
    off = ctx.no_auth or {}
    if "error" in off or on is None:
        r = t.add(st.row("the run without authentication", "failed" if "error" in off else "no noop phase",
                         note=(off.get("error") or "").splitlines()[-1][:300] if off.get("error") else ""))
        r.verdict = "missed" if "error" in off else "n/a"
        return t
    on_tp, off_tp = on["throughput_jobs_per_s"], off["throughput_jobs_per_s"]
    t.add(st.row("saturated jobs completed (on / off)", on["completed"], baseline=off["completed"]))
    t.add(st.row("saturated throughput (on / off)", on_tp, "jobs/s", baseline=off_tp))
    t.add(st.row("wall time per job, 1 / throughput (on / off)", st.ms_per_job(on_tp), "ms", baseline=st.ms_per_job(off_tp)))
    t.add(st.row("wall time per job: difference (what security costs)",
                 st.difference(st.ms_per_job(on_tp), st.ms_per_job(off_tp)), "ms"))
    on_cpu, off_cpu = st.cpu_total_ms(on["cpu_ms_per_job"]), st.cpu_total_ms(off["cpu_ms_per_job"])
    t.add(st.row("CPU per job, all processes (on / off)", on_cpu, "ms", baseline=off_cpu))
    for k in ("broker", "coordinator", "factories"):
        t.add(st.row(f"CPU per job: {k} (on / off)", on["cpu_ms_per_job"].get(k), "ms", baseline=off["cpu_ms_per_job"].get(k)))
    t.add(st.row("CPU per job: difference, all processes (what security costs)", st.difference(on_cpu, off_cpu), "ms"))
    sec = ctx.info.get("security")
    if sec:
        t.add(st.row("of which signing one holder write (timed apart)", sec["sign_ms_per_write"], "ms"))
        t.add(st.row("and verifying one (timed apart)", sec["verify_ms_per_write"], "ms"))
        t.add(st.row("signatures per job (4 holder writes, sign + verify)", sec["signatures_cpu_ms_per_job"], "ms"))
    return t


NO_VIOLATION = st.Target("==", 0, "none")


def invariants_ok(ctx: Context) -> bool:
    """Whether every judged set of records (the run's, the run without auth's) came out clean;
    a checker that could not judge counts as not clean."""
    reports = [r for r in (ctx.invariants, (ctx.no_auth or {}).get("invariants")) if r is not None]
    return all(r.get("ok") is True for r in reports)


def _invariants(ctx: Context) -> st.Table:
    """The invariant checker's verdict on the records of the run (and of the run without auth)."""
    t = st.Table("invariants: the run's records judged by the chaos suite's checker")
    for label, rep in (("this run", ctx.invariants), ("the run without auth", (ctx.no_auth or {}).get("invariants"))):
        if rep is None:
            continue
        if "error" in rep:
            r = t.add(st.row(f"{label}: violations", None, note=rep["error"][-300:]))
            r.target, r.verdict = NO_VIOLATION, "missed"
            continue
        counts = rep.get("counts", {})
        by = ", ".join(f"{k} {v}" for k, v in sorted(rep["by_invariant"].items()))
        first = "; ".join(f"[{v['invariant']}] {v.get('job') or '-'}: {v['detail']}" for v in rep["violations"][:3])
        t.add(st.row(f"{label}: violations", sum(rep["by_invariant"].values()), target=NO_VIOLATION,
                     note=f"{by}; {first}"[:600]))
        t.add(st.row(f"{label}: jobs and events judged", f"{counts.get('jobs', 0):,} / {counts.get('events', 0):,}"))
    return t


def _memory_rows(ctx: Context, t: st.Table) -> None:
    run = ctx.run
    rss = sum(proc_rss_bytes(p.pid) or 0 for p in run.hosts.values() if p.alive())
    if rss:
        t.add(st.row("resident memory per factory (fleet host / N)", rss / ctx.cfg.factories / MB, "MB"))
    if ctx.restart and "rss_bytes" in ctx.restart:
        t.add(st.row("resident memory of one factory process", ctx.restart["rss_bytes"]["single_before"] / MB, "MB"))


def _idle(ctx: Context) -> st.Table:
    i, cfg, s = ctx.idle, ctx.cfg, ctx.run.settings
    assert i is not None
    t = st.Table(f"idle fleet: {cfg.factories} factories over {i['window_s']:g}s"
                 + (f", {i['settled_s']:g}s after the last job's wake-ups" if i.get("settled_s") else ""))
    fleet_cpu = i["cpu_s"].get("factories", 0.0) + i["cpu_s"].get("coordinator", 0.0)
    pct = 100 * fleet_cpu / i["window_s"]
    r = st.row("fleet + coordinator CPU", round(pct, 3), "% of a core", target=IDLE_CPU_TARGET,
               note=f"factories {100 * i['cpu_s'].get('factories', 0) / i['window_s']:.2f}%, coordinator "
                    f"{100 * i['cpu_s'].get('coordinator', 0) / i['window_s']:.2f}%; per factory "
                    f"{pct / cfg.factories:.4f}%: heartbeats every {s.heartbeat_s:g}s and long polls renewed every "
                    f"{s.long_poll_s:g}s per pool ({i['pools']} pools)")
    polling = i.get("factories_polling", 0)
    if polling:
        r.note += (f"; {polling} of {cfg.factories} factories were polling gf_queue (push judged stalled), "
                   "not waiting on long polls")
    if cfg.factories < 1000:
        r.verdict = "n/a"
        r.note = (f"target is for 1,000 factories; this run had {cfg.factories} ({pct / cfg.factories:.4f}% per "
                  f"factory)" + (f"; {polling} of them were polling gf_queue (push judged stalled)" if polling else ""))
    t.add(r)
    t.add(st.row("factories in poll mode during the window", polling))
    t.add(st.row("broker CPU", round(100 * i["cpu_s"].get("broker", 0) / i["window_s"], 3), "% of a core"))
    t.add(st.row("broker messages in", round(i["in_msgs_per_s"], 2), "msg/s"))
    t.add(st.row("broker messages out", round(i["out_msgs_per_s"], 2), "msg/s"))
    # What an idle factory sends and is sent (factory.agent.idle_traffic_model): heartbeats,
    # long-poll renewals, rare probes of a quiet queue index, the halt watch's heartbeats;
    # client PINGs are protocol, not messages.
    # Long polls and probes are per (factory, pool) served: in a run with pools of different
    # sizes (mixed-capabilities), N x pools counted polls no factory makes.
    served = i.get("served") or cfg.factories * i["pools"]
    model = idle_traffic_model(cfg.factories, i["pools"], s, served=served)
    stall_check_s = s.redispatch_s / STALL_CHECKS_PER_REDISPATCH
    t.add(st.row(f"model in: N/heartbeat_s + P x (1/long_poll_s + 1/({QUIET_PROBE_EVERY_CHECKS} x stall_check_s)), "
                 f"P = {served:,} (factory, pool) pairs served",
                 round(model["in_msgs_per_s"], 2), "msg/s",
                 note=f"heartbeats (plain publishes), long-poll renewals, and a probe every "
                      f"{QUIET_PROBE_EVERY_CHECKS}th stall check (every {QUIET_PROBE_EVERY_CHECKS * stall_check_s:g}s: "
                      "the others listen); measured "
                      f"{i['in_msgs_per_s'] / model['in_msgs_per_s']:.2f}x" if model["in_msgs_per_s"] else ""))
    t.add(st.row("model out: in + N / (2 x heartbeat_s)", round(model["out_msgs_per_s"], 2), "msg/s",
                 note="each heartbeat's copy to the coordinator, each renewal's timeout, each probe's reply, "
                      "and the halt watch's heartbeat"))
    dev = st.deviation_pct(i["in_msgs_per_s"], model["in_msgs_per_s"])
    r = t.add(st.row("broker messages in, off the model", None if dev is None else round(abs(dev), 2), "%",
                     target=IDLE_MODEL_TARGET,
                     note=f"{i['in_msgs_per_s']:.2f} msg/s in against the model's {model['in_msgs_per_s']:.2f} ("
                          + ("-" if dev is None else f"{dev:+.1f}%") + "): what an idle factory sends beyond "
                          "heartbeats, long-poll renewals and quiet-index probes"))
    if cfg.factories < 1000:
        # The model is the fleet's traffic; the coordinator's own passes (a few messages a
        # second whatever the fleet's size) are not in it, and weigh more the smaller the fleet.
        r.verdict = "n/a"
        r.note = (f"target is for 1,000 factories; this run had {cfg.factories}: {i['in_msgs_per_s']:.2f} msg/s in "
                  f"against the model's {model['in_msgs_per_s']:.2f}, the coordinator's own passes (a few messages "
                  "a second whatever the fleet's size) included")
    return t


IDLE_SETTLE_MIN_WINDOW_S = 30.0
"""An idle window this long or longer waits :func:`idle_settle_s` first (a short one, the CI
size, measures at once: its figures are not judged against the model)."""


def idle_settle_s(s) -> float:
    """How long after the last job the fleet's traffic is idle traffic: one stall-check period
    (each factory checks the pool's index once after a write to it) and one long-poll period
    (each pull renewed once since).

    :param s: the fleet's :class:`~gigafactory.config.Settings`."""
    return s.redispatch_s / STALL_CHECKS_PER_REDISPATCH + s.long_poll_s


def idle_model_msgs_per_s(factories: int, pools: int, s) -> tuple[float, float]:
    """Messages per second an idle fleet should send the broker (the ``in`` side of
    :func:`gigafactory.factory.agent.idle_traffic_model`, the one model), and the stall-check
    period it assumes.

    :param factories: factories in the fleet.
    :param pools: dispatch pools each factory serves.
    :param s: the fleet's :class:`~gigafactory.config.Settings`.
    """
    return idle_traffic_model(factories, pools, s)["in_msgs_per_s"], s.redispatch_s / STALL_CHECKS_PER_REDISPATCH


def _restart(ctx: Context) -> st.Table:
    r = ctx.restart
    assert r is not None
    t = st.Table(f"coordinator restart with {r.get('jobs_in_bucket', 0):,} jobs in gf_jobs")
    if "error" in r:
        t.add(st.row("restart", "failed", note=r["error"].splitlines()[-1][:300] if r["error"] else ""))
        t.rows[-1].verdict = "missed"
        return t
    t.add(st.row("fill rate (direct KV writes)", r["filled"] / r["fill_s"] if r["fill_s"] else None, "records/s"))
    t.add(st.row("API answers", r["api_s"], "s"))
    t.add(st.row("view replayed (logged ready)", r["ready_s"], "s"))
    row = st.row("first job claimed (ready to dispatch)", r["first_claim_s"], "s", target=RESTART_TARGET)
    if r["jobs_in_bucket"] < RESTART_TARGET_JOBS:
        row.verdict, row.note = "n/a", f"target is for {RESTART_TARGET_JOBS:,} jobs; this run had {r['jobs_in_bucket']:,}"
    else:
        row.note = "a job submitted as soon as the API answered waits for the view's replay, then one dispatch pass"
    t.add(row)
    rss = r["rss_bytes"]
    grow = (rss["single_after"] - rss["single_before"]) / MB if rss["single_after"] and rss["single_before"] else None
    t.add(st.row("one factory's memory before / after the fill",
                 f"{rss['single_before'] / MB:.1f} / {rss['single_after'] / MB:.1f} MB"))
    t.add(st.row("its growth", None if grow is None else round(grow, 2), "MB", target=st.Target("<", 5.0, "< 5 MB"),
                 note="a factory reads no job it is not dispatched"))
    t.add(st.row("fleet hosts' memory growth", round((rss["fleet_after"] - rss["fleet_before"]) / MB, 2), "MB"))
    mem = st.row("coordinator memory after the restart (view replayed)",
                 rss["coordinator_after"] / MB if rss["coordinator_after"] else None, "MB", target=COORDINATOR_MEMORY_TARGET,
                 note="resident memory of the coordinator once it has replayed gf_jobs and dispatched again")
    if r["jobs_in_bucket"] < RESTART_TARGET_JOBS:
        mem.verdict, mem.note = "n/a", f"target is for {RESTART_TARGET_JOBS:,} jobs; this run had {r['jobs_in_bucket']:,}"
    t.add(mem)
    return t

