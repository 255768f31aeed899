"""Scenario 6, thundering herd: hundreds of idle factories as jobs trickle in, and the same
factories reconnecting at once after a broker restart.

The factories are real :class:`~gigafactory.factory.agent.Factory` instances, each on its own
NATS connection, run by fleet hosts (``python -m gigafactory.loadtest.fleet``, a hundred or more
per process: a Python process per factory would spend two cores on interpreters). The lab's
coordinator and broker are the usual real processes.

Phase A, the trickle: jobs arrive one at a time into the pool every factory serves (the next
once the previous is claimed, some after a seeded pause). One dispatch pointer per job goes to
the pool's one durable pull consumer, on which every idle factory waits with a pull request:
the broker hands it to one of them, so a job should cost one claim attempt, not one per factory.

Phase B, the reconnect storm: the broker is killed (``kill -9``) with the fleet idle and
restarted on the same store and port. Every factory must come back, once each, at times spread
over the reconnect jitter window (``reconnect_wait_s + reconnect_jitter_s``) rather than in one
spike, without a storm of warnings, and with its dispatch subscriptions working: a job pinned to
each factory (``factory:<id>``, a capability every factory offers; its pool exists from before
the restart) must be claimed by that factory, by push, not by the polling fallback.
"""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import sys
import time

from gigafactory.coordinator.intake import ensure_pool
from gigafactory.loadtest.fleet import read_stats
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import FactoryRecord, JobRecord, decode

from ..harness import LAB_ENV, Expectations, Lab, LabProc, ScenarioConfig, ScenarioResult, scenario
from .common import SETTLE_TIMEOUT_S, short_job

HERD_TIMINGS: dict[str, float] = dict(
    # Two hundred factories heartbeat, renew and long-poll on two cores: a heartbeat every 3 s
    # and a pull request renewed every 5 s per idle station keep the idle fleet's broker
    # traffic near a hundred messages a second.
    heartbeat_s=3.0,
    long_poll_s=5.0,
    # Leases long enough that a loaded event loop (a hundred factories share one) never lets a
    # short job's lease lapse: a reclaim would add a claim attempt that is not the herd's. A
    # holder stops its engine lease_ttl_s - fence_margin_s after its last renewal (10 s here,
    # margin 5 s), so that, not the TTL, is what a late renewal must beat: 300 pinned jobs
    # starting at once on three loops delayed renewals past the 6.7 s a 10 s lease left.
    lease_ttl_s=15.0,
    lease_renew_s=2.0,
    reaper_interval_s=0.5,
    redispatch_s=10.0,
    drain_timeout_s=1.0,
    request_timeout_s=5.0,
    # A window wide enough to see the spread: each client retries every 0.5-3.5 s.
    reconnect_wait_s=0.5,
    reconnect_jitter_s=3.0,
)
"""The herd lab's timings (``GIGAFACTORY_*`` for every process)."""

FACTORIES_PER_HOST_BOUNDED = 100
FACTORIES_PER_HOST_FULL = 150
HOSTS = 2
"""Two fleet hosts: one per core."""

ATTEMPTS_PER_JOB_MAX = 1.2
"""Phase A's bound on the mean claim attempts per job ("near one")."""
RECONNECT_BUCKET_S = 0.5
"""Width of the histogram buckets the reconnect spread is judged on."""
RECONNECT_BUCKET_SHARE_MAX = 0.4
"""No bucket may hold more than this share of the reconnects (uniform over the 3.5 s window
would put ~14% in each; the forward-recurrence shape of jittered retries ~25% in the first)."""
RECONNECT_SPREAD_MIN = 0.3
"""The middle 80% of reconnects (p10..p90) must span at least this share of the window."""
RECONNECT_SLACK_S = 3.0
"""Allowance past the window for the handshake and a loaded fleet host's event loop."""
WARNINGS_PER_FACTORY_MAX = 0.1
"""The storm may cost at most this many warnings and errors per factory, all kinds together
(one factory in ten logging one; a fleet that falls back to polling logs one per factory)."""
DOWN_BOUNDED_S = (6.0, 8.0)
"""The bounded form's outage: longer than a long poll (5 s), so every idle station's pull
request runs out while the broker is away."""
DOWN_FULL_S = ((1.0, 2.5), (8.0, 15.0))
"""The full form alternates a short outage and a long one (several long polls)."""
PULL_WAITING_SLACK = 0.05
"""Allowance over one waiting pull request per serving station (a request renewed just as it
expired is counted twice for a moment)."""
HOST_READY_TIMEOUT_S = 120.0
RECONNECT_TIMEOUT_S = 60.0
SNAPSHOT_TIMEOUT_S = 10.0


class FleetHostProc(LabProc):
    """A fleet host as a lab process: ``count`` factories ``<prefix><index:04d>`` from ``start``.
    It carries the lab marker, so :meth:`Lab.close` reaps it even if the scenario could not
    stop it, and is one of the lab's :attr:`~Lab.hosts`, so its engines are not leftovers while
    it lives; its figures are read from its stats file."""

    def __init__(self, lab: Lab, name: str, *, prefix: str, start: int, count: int) -> None:
        self.stats_path = lab.workdir / f"{name}.json"
        self.ids = [f"{prefix}{i:04d}" for i in range(start, start + count)]
        # Each factory of the host connects as its own identity, as a real fleet's machines do
        # (not the lab's admin): enrolled here, loaded by one reload of the broker.
        fresh = [fid for fid in self.ids if lab.identities.get(fid) is None]
        for fid in fresh:
            lab.identities.create("factory", fid)
        if fresh and lab.server is not None and lab.server.alive:
            lab.server.reload(lab.identities.users())
        args = [sys.executable, "-m", "gigafactory.loadtest.fleet", "--nats", lab.url, "--count", str(count),
                "--prefix", prefix, "--start", str(start), "--stations", "1",
                "--data-dir", str(lab.workdir / "factories"), "--workspace", str(lab.workdir / "work"),
                "--creds-dir", str(lab.identities.creds_path(self.ids[0]).parent),
                "--stats-file", str(self.stats_path), "--stats-interval-s", "1.0", "--log-level", "info"]
        super().__init__(name, args, lab.workdir / f"{name}.log", lab.env(**{**lab.factory_env, LAB_ENV: lab.id}))
        lab.hosts.append(self)  # its factories' engines are its own, not leftovers

    def figures(self) -> dict | None:
        return read_stats(self.stats_path)

    async def snapshot(self, lab: Lab) -> dict:
        """Fresh figures: ask for a dump (SIGUSR1) and wait for one written after the ask."""
        t = time.time()
        self.signal(signal.SIGUSR1)

        def fresh():
            f = self.figures()
            return f if f and f["at"] >= t else None

        return await lab.wait_for(fresh, SNAPSHOT_TIMEOUT_S, what=f"{self.name} writes its figures", proc=self)


async def _own_identities(lab: Lab, fids: list[str]) -> int:
    """How many of ``fids`` have a descriptor naming their own identity's public key (the key
    their holder writes are signed with): each connected as itself, not as the lab's admin."""
    from gigafactory.schemas.records import FactoryRecord, decode

    own = 0
    for fid in fids:
        e = await lab.admin_().factories.get(fid)
        ident = lab.identities.get(fid)
        own += e is not None and ident is not None and decode(e.value, FactoryRecord).nkey == ident.public_key
    return own


async def _snapshots(lab: Lab, hosts: list[FleetHostProc]) -> list[dict]:
    return list(await asyncio.gather(*(h.snapshot(lab) for h in hosts)))


def _total(snaps: list[dict], key: str) -> int:
    return sum(s["totals"].get(key, 0) for s in snaps)


def _attempts(snaps: list[dict]) -> int:
    """Claim attempts: every dispatch a factory acted on by reading the job record, i.e. each
    compare-and-set it tried (``claims``, won or lost: ``claim_conflicts`` is the part lost) and
    each record it read and found not claimable any more (``claim_skipped``). A dispatch nak'd
    for want of a free station is not an attempt (an idle fleet has one free everywhere)."""
    return _total(snaps, "claims") + _total(snaps, "claim_skipped")


def _warnings(snaps: list[dict]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for s in snaps:
        out.update(s["log_counts"])
    return dict(out)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def _claims_of(lab: Lab, ids: list[str]) -> dict[str, list[tuple[float, str]]]:
    """(broker time, factory) of every 'claimed' event of these jobs."""
    want = set(ids)
    out: dict[str, list[tuple[float, str]]] = {j: [] for j in ids}
    for a in await lab.audit("gf.events.*.claimed"):
        if a.event.job in want:
            out[a.event.job].append((a.ts, a.event.factory or "?"))
    return out


async def _submitted_at(lab: Lab, ids: list[str]) -> dict[str, float]:
    want = set(ids)
    return {a.event.job: a.ts for a in await lab.audit("gf.events.*.submitted") if a.event.job in want}


async def _stage_of(lab: Lab, job: str) -> Stage | None:
    e = await lab.admin_().jobs.get(job)
    return None if e is None else decode(e.value, JobRecord).stage


async def _wait_claimed(lab: Lab, job: str, timeout_s: float) -> None:
    async def claimed() -> bool:
        st = await _stage_of(lab, job)
        return st is not None and st != Stage.QUEUED

    await lab.wait_for(claimed, timeout_s, what=f"job {job} claimed", interval_s=0.02)


async def _num_waiting(lab: Lab) -> dict[str, int]:
    """Pull requests waiting on each pool consumer now (the server's count), by pool."""
    out = {}
    async for e in lab.admin_().pools.scan():
        try:
            info = await lab.admin_().js.consumer_info(names.DISPATCH_STREAM, names.pool_consumer(e.key))
        except Exception:
            continue
        out[e.key] = info.num_waiting or 0
    return out


async def _heartbeats_since(lab: Lab, fids: list[str], since: float) -> list[str]:
    """Factories whose record was not written (heartbeat) after broker time ``since``."""
    seen: dict[str, float] = {}
    async for e in lab.admin_().factories.scan():
        seen[e.key] = e.ts
    return [f for f in fids if seen.get(f, 0.0) <= since]


async def _pools_bound(lab: Lab, fids: list[str], pools_of: dict[str, set[str]]) -> list[str]:
    """Factories whose heartbeat does not list every pool they should serve yet."""
    have: dict[str, set[str]] = {}
    async for e in lab.admin_().factories.scan():
        have[e.key] = set(decode(e.value, FactoryRecord).pools)
    return [f for f in fids if not pools_of[f] <= have.get(f, set())]


def _pinned_job(lab: Lab, fid: str) -> str:
    return short_job(lab, random.Random(fid), 0.0, 0.0, capabilities=[f"factory:{fid}"])


# -- phase A: the trickle ---------------------------------------------------------------------------


async def _trickle_one_at_a_time(lab: Lab, hosts: list[FleetHostProc], rng: random.Random, *, jobs: int,
                                 until_mono: float | None, exp: Expectations, label: str) -> dict:
    """Submit short jobs one at a time, each once the previous is claimed (half of them after
    a seeded pause, so the fleet's pull requests are idle and waiting), and count the claim
    attempts between consecutive submissions: with one job in the system at a time, every
    attempt in that interval is for that job."""
    ids: list[str] = []
    per_job: list[int] = []
    before = await _snapshots(lab, hosts)
    first = before
    while len(ids) < jobs or (until_mono is not None and time.monotonic() < until_mono):
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0.2, 1.5))  # the schedule: a spaced trickle
        got = await lab.submit([short_job(lab, rng, 0.0, 0.3)])
        if not exp.expect(len(got) == 1, f"{label}: a submission was not acknowledged"):
            continue
        await _wait_claimed(lab, got[0], 3 * lab.settings.redispatch_s)
        ids.extend(got)
        after = await _snapshots(lab, hosts)
        per_job.append(_attempts(after) - _attempts(before))
        before = after
    unsettled = await lab.settle(SETTLE_TIMEOUT_S)
    exp.expect(not unsettled, f"{label}: jobs not settled: {unsettled}")
    last = await _snapshots(lab, hosts)
    per_job[-1] += _attempts(last) - _attempts(before)  # attempts that came after the last claim
    claims = await _claims_of(lab, ids)
    submitted = await _submitted_at(lab, ids)
    latency = [min(t for t, _ in claims[j]) - submitted[j] for j in ids if claims[j] and j in submitted]
    attempts = _attempts(last) - _attempts(first)
    return {
        "ids": ids,
        "jobs": len(ids),
        "attempts": attempts,
        "attempts_per_job": attempts / max(1, len(ids)),
        "attempts_max": max(per_job, default=0),
        "conflicts": _total(last, "claim_conflicts") - _total(first, "claim_conflicts"),
        "skipped": _total(last, "claim_skipped") - _total(first, "claim_skipped"),
        "polled": _total(last, "polled_claims") - _total(first, "polled_claims"),
        "claimed_twice": sorted(j for j in ids if len(claims[j]) > 1),
        "claimers": len({f for j in ids for _, f in claims[j]}),
        "latency_s": latency,
    }


# -- phase B: the storm -------------------------------------------------------------------------------


async def _storm(lab: Lab, hosts: list[FleetHostProc], fids: list[str], rng: random.Random,
                 exp: Expectations, label: str, *, down_range_s: tuple[float, float]) -> dict:
    """kill -9 the broker with the fleet idle, restart it on the same store and port after a
    seeded pause in ``down_range_s``, and measure how the fleet comes back."""
    s = lab.settings
    window_s = s.reconnect_wait_s + s.reconnect_jitter_s
    before = await _snapshots(lab, hosts)
    conn0 = {fid: c["reconnects"] for snap in before for fid, c in snap["factory_connection"].items()}
    t_kill = time.time()
    await lab.kill_broker()
    down_s = rng.uniform(*down_range_s)
    await asyncio.sleep(down_s)  # the schedule: how long the broker stays dead
    await lab.start_broker()
    t_back = time.time()  # the server accepts connections from here on
    lab.broker_restarts += 1
    await lab.wait_for(lab._broker_answers, 30.0, what="the lab's connection writes to the restarted broker")
    back_broker = await lab.broker_now()

    async def all_back() -> list[dict] | None:
        snaps = [h.figures() for h in hosts]
        if any(f is None for f in snaps):
            return None
        n = {fid: c["reconnects"] for snap in snaps for fid, c in snap["factory_connection"].items()}
        return snaps if all(n.get(f, 0) > conn0.get(f, 0) for f in fids) else None

    try:
        await lab.wait_for(all_back, RECONNECT_TIMEOUT_S, what="every factory reconnected", interval_s=0.2)
    except TimeoutError as e:
        exp.expect(False, f"{label}: {e}")
    stragglers: list[str] = []
    try:
        async def heartbeats() -> bool:
            stragglers[:] = await _heartbeats_since(lab, fids, back_broker)
            return not stragglers

        await lab.wait_for(heartbeats, RECONNECT_TIMEOUT_S, what="every factory heartbeats to the restarted broker",
                           interval_s=0.5)
    except TimeoutError:
        exp.expect(False, f"{label}: {len(stragglers)} factories never heartbeat after the restart: {stragglers[:10]}")
    waiting = await _num_waiting(lab)
    after = await _snapshots(lab, hosts)
    conn = {fid: c for snap in after for fid, c in snap["factory_connection"].items()}
    per_factory = {f: conn.get(f, {}).get("reconnects", 0) - conn0.get(f, 0) for f in fids}
    delays = sorted(conn[f]["last_reconnect_at"] - t_back for f in fids
                    if per_factory[f] >= 1 and conn[f].get("last_reconnect_at"))
    buckets = collections.Counter(int(max(0.0, d) // RECONNECT_BUCKET_S) for d in delays)
    share = max(buckets.values(), default=0) / max(1, len(delays))
    spread = _pct(delays, 0.9) - _pct(delays, 0.1) if delays else 0.0
    warn = _warnings(after)
    warn0 = _warnings(before)
    storm_warnings = {k: v - warn0.get(k, 0) for k, v in warn.items() if v - warn0.get(k, 0)}

    back = sum(1 for f in fids if per_factory[f] >= 1)
    exp.expect(back == len(fids), f"{label}: {len(fids) - back} of {len(fids)} factories never reconnected")
    twice = sorted(f for f in fids if per_factory[f] > 1)
    exp.expect(not twice, f"{label}: factories reconnected more than once (flapping): {twice[:10]}")
    exp.expect(share <= RECONNECT_BUCKET_SHARE_MAX,
               f"{label}: {share:.0%} of the reconnects fell in one {RECONNECT_BUCKET_S:g}s bucket "
               f"(bound {RECONNECT_BUCKET_SHARE_MAX:.0%}): a spike, not a spread")
    exp.expect(spread >= RECONNECT_SPREAD_MIN * window_s,
               f"{label}: the middle 80% of reconnects spans {spread:.2f}s, under "
               f"{RECONNECT_SPREAD_MIN:.0%} of the {window_s:g}s jitter window")
    exp.expect(not delays or delays[-1] <= window_s + RECONNECT_SLACK_S,
               f"{label}: the last reconnect came {delays[-1] if delays else 0:.2f}s after the broker's return, "
               f"past the {window_s:g}s window + {RECONNECT_SLACK_S:g}s slack")
    # One pull request per idle station on every pool consumer, not one per long poll that
    # ran out during the outage (those, sent while disconnected, would all arrive at once).
    stations = collections.Counter()
    for snap in after:
        for pools in snap["factory_pools"].values():
            stations.update(pools.keys())
    over = {p: (n, stations[p]) for p, n in waiting.items() if n > stations[p] * (1 + PULL_WAITING_SLACK)}
    exp.expect(not over, f"{label}: pool consumers hold more pull requests than stations serve them "
                         f"(stale requests from the outage): {dict(list(over.items())[:5])}")
    n_warn = sum(storm_warnings.values())
    exp.expect(n_warn <= WARNINGS_PER_FACTORY_MAX * len(fids),
               f"{label}: an error storm: {n_warn} warnings and errors from {len(fids)} factories: {storm_warnings}; "
               f"last: {after[0]['log_last'][-3:]}")
    return {
        "down_s": down_s,
        "t_kill": t_kill,
        "t_back": t_back,
        "window_s": window_s,
        "reconnected": back,
        "reconnected_twice": len(twice),
        "delays": delays,
        "bucket_share_max": share,
        "spread_s": spread,
        "warnings": storm_warnings,
        "n_warnings": n_warn,
        "disconnects": sum(s["disconnects"] for s in after) - sum(s["disconnects"] for s in before),
        "num_waiting": waiting,
    }


async def _pinned_round(lab: Lab, hosts: list[FleetHostProc], fids: list[str], exp: Expectations,
                        label: str) -> dict:
    """A job pinned to every factory in ``fids``: each must be claimed by its factory, by push."""
    before = await _snapshots(lab, hosts)
    ids = await lab.submit([_pinned_job(lab, fid) for fid in fids], timeout_s=30.0)
    exp.expect(len(ids) == len(fids), f"{label}: {len(ids)} of {len(fids)} pinned jobs acknowledged")
    unsettled = await lab.settle(SETTLE_TIMEOUT_S)
    exp.expect(not unsettled, f"{label}: pinned jobs not settled: {dict(list(unsettled.items())[:10])}")
    after = await _snapshots(lab, hosts)
    claims = await _claims_of(lab, ids)
    submitted = await _submitted_at(lab, ids)
    records = await lab.records()
    wrong, unclaimed = [], []
    for fid, jid in zip(fids, ids):
        got = [f for _, f in claims.get(jid, [])]
        if not got:
            unclaimed.append(fid)
        elif got != [fid]:
            wrong.append((jid, fid, got))
    polled = _total(after, "polled_claims") - _total(before, "polled_claims")
    polling = sum(s["pools_polling"] for s in after)
    latency = [min(t for t, _ in claims[j]) - submitted[j] for j in ids if claims.get(j) and j in submitted]
    shipped = sum(1 for j in ids if j in records and records[j][0].stage == Stage.SHIPPED)
    attempts = _attempts(after) - _attempts(before)
    exp.expect(not unclaimed, f"{label}: {len(unclaimed)} factories never claimed their pinned job (lost "
                              f"subscriptions?): {unclaimed[:10]}")
    exp.expect(not wrong, f"{label}: pinned jobs claimed by the wrong factory or more than once: {wrong[:5]}")
    exp.expect(polled == 0, f"{label}: {polled} pinned jobs were claimed by polling, not by push")
    exp.expect(polling == 0, f"{label}: {polling} pools fell back to polling")
    return {"ids": ids, "jobs": len(ids), "claimed_by_target": len(ids) - len(unclaimed) - len(wrong),
            "polled": polled, "pools_polling": polling, "latency_s": latency, "shipped": shipped,
            "attempts": attempts}


# -- the scenario ---------------------------------------------------------------------------------


@scenario("thundering-herd",
          "hundreds of idle factories (fleet hosts) as jobs trickle in one at a time: about one claim "
          "attempt per job; then the broker restarted under them: reconnects spread over the jitter "
          "window, no error storm, and every factory's dispatch still delivers (a job pinned to each)")
async def thundering_herd(cfg: ScenarioConfig) -> ScenarioResult:
    exp = Expectations()
    notes: list[str] = []
    per_host = FACTORIES_PER_HOST_BOUNDED if cfg.bounded else FACTORIES_PER_HOST_FULL
    trickle_jobs = 20 if cfg.bounded else 40
    storms = 1 if cfg.bounded else max(2, round(cfg.duration_s / 60))
    async with Lab(cfg.workdir, seed=cfg.seed, timings=HERD_TIMINGS, factory_env=cfg.factory_env) as lab:
        load_rng, chaos_rng = lab.random("load"), lab.random("chaos")
        hosts = [FleetHostProc(lab, f"fleet-host-{k}", prefix="herd-", start=k * per_host, count=per_host)
                 for k in range(HOSTS)]
        fids = [f for h in hosts for f in h.ids]
        try:
            t0 = time.monotonic()
            for h in hosts:
                h.start()
            for h in hosts:
                await lab.wait_for(lambda h=h: (h.figures() or {}).get("ready_at"), HOST_READY_TIMEOUT_S,
                                   what=f"{h.name} has its {len(h.ids)} factories registered", proc=h, interval_s=0.2)
            ready_s = time.monotonic() - t0
            start_failures = [x for h in hosts for x in (h.figures() or {}).get("start_failures", [])]
            exp.expect(not start_failures, f"factories failed to start: {start_failures[:5]}")
            own_identities = await _own_identities(lab, fids)
            exp.expect(own_identities == len(fids), f"only {own_identities} of {len(fids)} factories publish their "
                                                     "own identity's key (the rest connected as someone else)")

            # Every factory's own pool (factory:<id>) exists before the restart, as the first
            # job pinned to it would have made it: after the storm, a pinned job proves that the
            # factory's pull subscription of that pool came through, not a fresh one.
            any_pool = caps.pool_id(parse_job_text(short_job(lab, random.Random(0), 0, 0)).manifest.requirements())
            pools_of: dict[str, set[str]] = {}
            for fid in fids:
                reqs = list(parse_job_text(_pinned_job(lab, fid)).manifest.requirements())
                pool = caps.pool_id(reqs)
                await ensure_pool(lab.admin_(), pool, reqs)
                pools_of[fid] = {pool}

            # Phase A: the trickle (the first job creates the shared pool).
            t_a = time.monotonic()
            until = None if cfg.bounded else time.monotonic() + cfg.duration_s / 2
            a = await _trickle_one_at_a_time(lab, hosts, load_rng, jobs=trickle_jobs, until_mono=until, exp=exp,
                                             label="trickle")
            a_s = time.monotonic() - t_a
            for fid in fids:
                pools_of[fid].add(any_pool)
            missing: list[str] = []

            async def bound() -> bool:
                missing[:] = await _pools_bound(lab, fids, pools_of)
                return not missing

            try:
                await lab.wait_for(bound, 4 * lab.settings.heartbeat_s + 10, what="every factory serves its pools",
                                   interval_s=0.5)
            except TimeoutError:
                exp.expect(False, f"{len(missing)} factories do not serve both their pools: {missing[:10]}")

            # Phase B: the storm(s), each followed by a job pinned to every factory and a short
            # trickle in the shared pool.
            rounds = []
            for k in range(storms):
                t_b = time.monotonic()
                down = DOWN_BOUNDED_S if cfg.bounded else DOWN_FULL_S[k % len(DOWN_FULL_S)]
                b = await _storm(lab, hosts, fids, chaos_rng, exp, f"storm {k + 1}", down_range_s=down)
                p = await _pinned_round(lab, hosts, fids, exp, f"storm {k + 1} pinned")
                after = await _trickle_one_at_a_time(lab, hosts, load_rng, jobs=5, until_mono=None, exp=exp,
                                                     label=f"storm {k + 1} trickle")
                rounds.append((b, p, after, time.monotonic() - t_b))

            unsettled = await lab.settle(SETTLE_TIMEOUT_S)
            exp.expect(not unsettled, f"not settled: {unsettled}")
            report = await lab.check()
            records = await lab.records()
            final = await _snapshots(lab, hosts)
        finally:
            stop_codes = await asyncio.gather(*(h.terminate(timeout_s=30.0) for h in hosts))
        exp.expect(all(c == 0 for c in stop_codes), f"fleet hosts did not drain and exit 0: {stop_codes}")
        dead = [] if lab.coordinator is None or lab.coordinator.alive() else ["coordinator"]
        exp.expect(not dead, "the coordinator died")

        # Phase A's own claims.
        exp.expect(a["attempts_per_job"] <= ATTEMPTS_PER_JOB_MAX,
                   f"trickle: {a['attempts_per_job']:.2f} claim attempts per job (bound {ATTEMPTS_PER_JOB_MAX:g}): "
                   f"a herd")
        exp.expect(not a["claimed_twice"], f"trickle: jobs claimed more than once: {a['claimed_twice']}")
        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        lost = sorted(j for j in lab.acknowledged if j not in records)
        exp.expect(not lost, f"acknowledged jobs lost: {lost}")
        exp.expect(shipped == len(lab.acknowledged), f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")

        b_last, p_last, after_last = rounds[-1][0], rounds[-1][1], rounds[-1][2]
        all_delays = b_last["delays"]
        lat_a = a["latency_s"]
        lat_p = [x for r in rounds for x in r[1]["latency_s"]]
        figures = {
            "factories": len(fids),
            "fleet_hosts": len(hosts),
            "own_identities": own_identities,
            "fleet_ready_s": ready_s,
            "fleet_cpu_s": sum(s["cpu_s"] for s in final),
            "fleet_rss_mb": [round(s["rss_bytes"] / 2**20) for s in final],
            "trickle_jobs": a["jobs"],
            "trickle_s": a_s,
            "claim_attempts_per_job": round(a["attempts_per_job"], 3),
            "claim_attempts_max_per_job": a["attempts_max"],
            "claim_conflicts": a["conflicts"],
            "claim_skipped": a["skipped"],
            "polled_claims": a["polled"],
            "distinct_claimers": a["claimers"],
            "dispatch_latency_s_p50": _pct(lat_a, 0.5),
            "dispatch_latency_s_p90": _pct(lat_a, 0.9),
            "dispatch_latency_s_max": max(lat_a, default=float("nan")),
            "storms": len(rounds),
            "broker_down_s": [round(r[0]["down_s"], 2) for r in rounds],
            "reconnect_window_s": b_last["window_s"],
            "reconnects": [r[0]["reconnected"] for r in rounds],
            "reconnected_twice": sum(r[0]["reconnected_twice"] for r in rounds),
            "reconnect_s_first": all_delays[0] if all_delays else float("nan"),
            "reconnect_s_p10": _pct(all_delays, 0.1),
            "reconnect_s_p50": _pct(all_delays, 0.5),
            "reconnect_s_p90": _pct(all_delays, 0.9),
            "reconnect_s_last": all_delays[-1] if all_delays else float("nan"),
            "reconnect_spread_s": b_last["spread_s"],
            "reconnect_bucket_share_max": round(b_last["bucket_share_max"], 3),
            "reconnect_histogram": _histogram(all_delays),
            "storm_warnings": [r[0]["n_warnings"] for r in rounds],
            "storm_warning_kinds": b_last["warnings"],
            "pinned_jobs": sum(r[1]["jobs"] for r in rounds),
            "pinned_claimed_by_target": sum(r[1]["claimed_by_target"] for r in rounds),
            "pinned_polled_claims": sum(r[1]["polled"] for r in rounds),
            "pinned_attempts": sum(r[1]["attempts"] for r in rounds),
            "pinned_claim_s_p50": _pct(lat_p, 0.5),
            "pinned_claim_s_max": max(lat_p, default=float("nan")),
            "after_storm_attempts_per_job": round(after_last["attempts_per_job"], 3),
            "after_storm_dispatch_latency_s_max": max(after_last["latency_s"], default=float("nan")),
            "pools_polling": p_last["pools_polling"],
            "pull_waiting_shared_pool": [r[0]["num_waiting"].get(any_pool) for r in rounds],
            "pull_waiting_own_pools_max": [max((v for k, v in r[0]["num_waiting"].items() if k != any_pool), default=0)
                                           for r in rounds],
            "storm_round_s": [round(r[3], 1) for r in rounds],
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_shipped": shipped,
            "acknowledged_lost": len(lost),
            "lease_expired": report.counts.get("lease_expired", 0),
        }
        notes.append(f"{len(fids)} factories in {len(hosts)} fleet host processes, one NATS connection each; "
                     f"timings heartbeat {lab.settings.heartbeat_s:g}s, long poll {lab.settings.long_poll_s:g}s, "
                     f"reconnect {lab.settings.reconnect_wait_s:g}s + up to {lab.settings.reconnect_jitter_s:g}s jitter")
        notes.append("claim attempts = claims (compare-and-sets tried, won or lost) + claim_skipped (dispatches "
                     "whose record was no longer claimable), summed over the fleet, per trickle job")
        notes.append("reconnect times are each factory's reconnected callback (wall clock) minus the moment the "
                     "restarted nats-server accepted connections")
        if a["attempts_per_job"] > 1.0 or a["skipped"]:
            notes.append(f"trickle: {a['skipped']} skipped and {a['conflicts']} lost claims over {a['jobs']} jobs")
        return ScenarioResult("thundering-herd", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)


def _histogram(delays: list[float]) -> list[int]:
    """Reconnects per :data:`RECONNECT_BUCKET_S` bucket after the broker's return."""
    if not delays:
        return []
    counts = collections.Counter(int(max(0.0, d) // RECONNECT_BUCKET_S) for d in delays)
    return [counts.get(i, 0) for i in range(max(counts) + 1)]

