"""Scenario 3, cluster failover: kill -9 of a follower, then of the leader, of the job bucket on a
3-node JetStream cluster under load."""

from __future__ import annotations

import asyncio
import random
import time

from gigafactory import natsconf
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import JobRecord, decode

from ..cluster_lab import ClusterLab
from ..harness import Expectations, ScenarioConfig, ScenarioResult, scenario
from .common import SETTLE_TIMEOUT_S, short_job, trickle

# -- 3. cluster failover --------------------------------------------------------------------------

JOBS_STREAM = f"KV_{names.JOBS_BUCKET}"
"""The stream under the job bucket: every claim, renewal and result is a CAS on it."""
WATCHED_STREAMS = (JOBS_STREAM, names.DISPATCH_STREAM)
"""The streams whose leader the full form may kill, and that a restarted node must rejoin."""

DEPLOYED = natsconf.compose_nodes()[0]
"""The cluster runs compose/nats/n<i>.conf's configuration (one template: gigafactory/natsconf.py),
placed on loopback, including its ``sync_interval`` (every write fsynced before it is
acknowledged), so what this scenario shows holds for the compose deployment."""
TIMINGS = {"lease_ttl_s": 12.0, "lease_renew_s": 1.0}
"""A lease outlives a leader election (4-8 s after a kill -9 on nats-server 2.15, more on a
loaded machine): a cluster is deployed so that losing one node costs no lease, and the
scenario shows it (``lease_expired``). A shorter lease would be legal too; the reaper would
then reclaim every job in flight at each leader kill, and fencing would keep each shipped once."""
ALL_STREAMS = (*(f"KV_{b}" for b in (names.JOBS_BUCKET, names.QUEUE_BUCKET, names.FACTORIES_BUCKET,
                                       names.POOLS_BUCKET, names.LOCKS_BUCKET, names.IDEMPOTENCY_BUCKET,
                                       names.CLOCK_BUCKET)),
               names.DISPATCH_STREAM, names.EVENTS_STREAM, f"OBJ_{names.ARTIFACTS_STORE}")
"""Every stream of the layout. A node leads some of them: its kill -9 costs each of those an
election (4-8 s), so a follower of the job bucket is no pure follower, and the figures name
what the victim led."""
CLAIM_BOUND_S = 30.0
"""Bound on a job submitted right after a kill being claimed: the elections of whatever the
victim led (4-8 s each, in parallel), the clients' reconnects, their next pull, on two loaded
cores."""
LOAD_CAP, PROBE_CAP = "load", "probe"
"""Two lanes: the load runs on the load factories only, and the probe job that measures
dispatch after a kill runs on a factory of its own, idle but for it. So the probe's claim
time says when dispatch resumed, not how long it queued behind the load."""
PROBE_FACTORY = "fprobe"
PROBE_SUBMIT_TIMEOUT_S = 3.0
"""A probe submission that gets no reply within this is tried again (the API cannot write a
record while the job bucket has no leader)."""


async def _stage_of(lab: ClusterLab, job: str) -> str | None:
    try:
        e = await asyncio.wait_for(lab.admin_().jobs.get(job), timeout=2.0)
    except Exception:  # no leader yet, or the lab's connection is moving to another node
        return None
    return None if e is None else str(decode(e.value, JobRecord).stage)


async def _dispatch_probe(lab: ClusterLab, t_ref: float, bound_s: float) -> tuple[float | None, float | None]:
    """Submit one short job (retried until the API acknowledges it) and wait until a factory
    claims it. Returns (seconds from ``t_ref`` to the acknowledgement, to the claim); None
    for what did not happen within ``bound_s`` of ``t_ref``."""
    deadline = t_ref + bound_s
    ids: list[str] = []
    while not ids and time.monotonic() < deadline:
        ids = await lab.submit([short_job(lab, random.Random(0), 0.1, 0.1, capabilities=[PROBE_CAP])],
                               timeout_s=PROBE_SUBMIT_TIMEOUT_S)
        if not ids:
            await asyncio.sleep(0.2)  # the schedule of retries, not a synchronization
    if not ids:
        return None, None
    acked_s = time.monotonic() - t_ref

    async def claimed() -> bool:
        return (await _stage_of(lab, ids[0])) not in (None, str(Stage.QUEUED))

    try:
        await lab.wait_for(claimed, max(0.5, deadline - time.monotonic()), what=f"probe job {ids[0]} claimed",
                           interval_s=0.1)
    except TimeoutError:
        return acked_s, None
    return acked_s, time.monotonic() - t_ref


async def _in_flight(lab: ClusterLab) -> int:
    return sum(1 for s in (await lab.stages()).values() if s in (Stage.ASSIGNED, Stage.BUILDING))


@scenario("cluster-failover",
          "3-node JetStream cluster, every bucket and stream R3: kill -9 of a follower, then of the leader, "
          "of the job bucket under load; a new leader is elected, dispatch resumes, no acknowledged job is "
          "lost and every job ships once")
async def cluster_failover(cfg: ScenarioConfig) -> ScenarioResult:
    exp = Expectations()
    notes: list[str] = []
    fids = ["f1", "f2"]
    async with ClusterLab(cfg.workdir, seed=cfg.seed, timings=TIMINGS, sync_interval=DEPLOYED.sync_interval) as lab:
        lab.factory_env = dict(cfg.factory_env)  # before any factory starts
        load_rng, chaos_rng = lab.random("load"), lab.random("chaos")
        for fid in fids:
            await lab.start_factory(fid, stations=2, caps=[LOAD_CAP])
        await lab.start_factory(PROBE_FACTORY, stations=1, caps=[PROBE_CAP])
        # One probe before any chaos: its pool and consumer exist, and the probe factory is bound.
        _acked, warm_s = await _dispatch_probe(lab, time.monotonic(), CLAIM_BOUND_S)
        exp.expect(warm_s is not None, "the probe lane did not claim a job before any chaos")
        stats = {"batches": 0, "submitted": 0, "acknowledged": 0}
        t0 = time.monotonic()
        # Bounded: the load runs until both kills are done. Full: until the duration is spent.
        t_load_end = t0 + (3600.0 if cfg.bounded else cfg.duration_s)
        stop_load = asyncio.Event()

        async def load() -> None:
            until = t_load_end
            task = asyncio.create_task(trickle(lab, load_rng, until, batch=(1, 3), gap_s=(0.3, 0.8),
                                                sleep_s=(0.3, 1.5), stats=stats, capabilities=[LOAD_CAP]))
            await asyncio.wait([task, asyncio.create_task(stop_load.wait())], return_when=asyncio.FIRST_COMPLETED)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        loader = asyncio.create_task(load())
        kills: list[dict] = []
        try:
            # Bounded: a follower, then the leader, of the job bucket. Full: seeded kills of a
            # follower or the leader of the job bucket or the dispatch stream, until the end.
            plan = [("follower", JOBS_STREAM), ("leader", JOBS_STREAM)]
            while True:
                if cfg.bounded:
                    if len(kills) == len(plan):
                        break
                    role, stream = plan[len(kills)]
                else:
                    if time.monotonic() > t_load_end - 2.0 and kills:
                        break
                    role = chaos_rng.choice(["follower", "leader"])
                    stream = chaos_rng.choice(WATCHED_STREAMS)
                await asyncio.sleep(chaos_rng.uniform(2.0, 4.0))  # the chaos schedule: load builds up
                try:
                    await lab.wait_for(lambda: _in_flight(lab), 20.0, what="jobs in flight before the kill",
                                       interval_s=0.1)
                except TimeoutError:
                    pass  # counted as 0 below, and failed as an expectation
                in_flight = await _in_flight(lab)
                leader, followers = await lab.peers_of(stream)
                # Which streams each node leads: each of them holds an election of its own after
                # the node's kill -9. A follower kill takes the follower that leads the fewest.
                stream_leaders = {s: (await lab.peers_of(s))[0] for s in ALL_STREAMS}
                leads = {i: [s for s, at in stream_leaders.items() if at == i] for i in [leader, *followers]}
                if role == "leader":
                    victim = leader
                else:
                    fewest = min(len(leads[i]) for i in followers)
                    victim = chaos_rng.choice([i for i in followers if len(leads[i]) == fewest])
                led = leads[victim]
                exp.expect(victim == leader if role == "leader" else victim in followers and victim != leader,
                           f"kill {len(kills) + 1}: node {victim} is not the {role} of {stream} "
                           f"(leader {leader}, followers {followers})")
                t_kill = time.monotonic()
                await lab.kill_node(victim)
                kill = {"role": role, "stream": stream, "node": lab.node_name(victim),
                        "leader_before": lab.node_name(leader), "jobs_in_flight": in_flight,
                        "streams_led_by_victim": led}
                if role == "leader":
                    new = await lab.leader_of(stream, not_on=victim, timeout_s=CLAIM_BOUND_S)
                    kill["failover_s"] = round(time.monotonic() - t_kill, 2)
                    kill["leader_after"] = lab.node_name(new)
                bound = CLAIM_BOUND_S
                acked_s, claim_s = await _dispatch_probe(lab, t_kill, bound)
                kill["submit_acked_after_kill_s"] = None if acked_s is None else round(acked_s, 2)
                kill["claim_after_kill_s"] = None if claim_s is None else round(claim_s, 2)
                exp.expect(claim_s is not None,
                           f"kill {len(kills) + 1} ({role} of {stream}): a job submitted after the kill was "
                           f"not claimed within {bound:g}s (acknowledged after {acked_s}s)")
                kill["rejoin_s"] = round(await lab.restart_node(victim, WATCHED_STREAMS), 2)
                kill["leader_after_rejoin"] = lab.node_name(await lab.leader_of(stream))
                kills.append(kill)
                notes.append(f"kill {len(kills)}: " + ", ".join(f"{k} {v}" for k, v in kill.items()))
        finally:
            stop_load.set()
            await asyncio.gather(loader, return_exceptions=True)

        unsettled = await lab.settle(SETTLE_TIMEOUT_S if cfg.bounded else 2 * SETTLE_TIMEOUT_S)
        report = await lab.check()
        records = await lab.records()
        dead = [p.name for p in [lab.coordinator, *lab.factories.values()] if p is not None and not p.alive()]
        exp.expect(not dead, f"processes died instead of moving to another node: {dead}")
        exp.expect(any(k["role"] == "follower" for k in kills) and any(k["role"] == "leader" for k in kills),
                   f"not both a follower and a leader were killed: {[k['role'] for k in kills]}")
        exp.expect(all(k["jobs_in_flight"] > 0 for k in kills), f"a kill hit an idle fleet, proving little: {kills}")
        exp.expect(all(k.get("leader_after", "") != k["node"] for k in kills if k["role"] == "leader"),
                   "a killed leader was reported as the new leader")
        shipped = sum(1 for j in lab.acknowledged if j in records and records[j][0].stage == Stage.SHIPPED)
        lost = sorted(j for j in lab.acknowledged if j not in records)
        exp.expect(not lost, f"acknowledged jobs lost: {lost}")
        exp.expect(not unsettled, f"not settled within the bound: {unsettled}")
        exp.expect(shipped == len(lab.acknowledged), f"{shipped} of {len(lab.acknowledged)} acknowledged jobs shipped")
        leader_kills = [k for k in kills if k["role"] == "leader"]
        figures = {
            "nodes": len(lab.cluster.nodes),
            # What the nodes ran: the compose cluster's configuration, placed on loopback.
            "nats_conf_as_compose": all(natsconf.shape(c) == natsconf.shape(d) and c.sync_interval == d.sync_interval
                                        for c, d in zip(lab.cluster.node_confs(), natsconf.compose_nodes(), strict=True)),
            "sync_interval": lab.cluster.nodes[0].sync_interval,
            "replicas": lab.settings.replicas,
            "node_kills": len(kills),
            "kills": [f"{k['role']} of {k['stream']}" for k in kills],
            "killed_nodes": [k["node"] for k in kills],
            "jobs_in_flight_at_kill": [k["jobs_in_flight"] for k in kills],
            "leader_before": [k["leader_before"] for k in kills],
            "leader_after": [k.get("leader_after", k["leader_before"]) for k in kills],
            "failover_s": [k["failover_s"] for k in leader_kills],
            "submit_acked_after_kill_s": [k["submit_acked_after_kill_s"] for k in kills],
            "claim_before_chaos_s": None if warm_s is None else round(warm_s, 2),
            "claim_after_kill_s": [k["claim_after_kill_s"] for k in kills],
            "claim_after_follower_kill_s_max": max((k["claim_after_kill_s"] or 0.0 for k in kills
                                                    if k["role"] == "follower"), default=0.0),
            "claim_after_leader_kill_s_max": max((k["claim_after_kill_s"] or 0.0 for k in leader_kills), default=0.0),
            "streams_led_by_victim": [k["streams_led_by_victim"] for k in kills],
            "rejoin_s": [k["rejoin_s"] for k in kills],
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_unacknowledged": lab.unacknowledged_submits,
            "jobs_on_record": len(records),
            "jobs_shipped": shipped,
            "acknowledged_lost": len(lost),
            "lease_expired": report.counts.get("lease_expired", 0),
            "fenced_events": report.counts.get("fenced", 0),
            "audit_gaps": report.counts.get("audit_gaps", 0),
        }
        notes.append(f"R{lab.settings.replicas} on {len(lab.cluster.nodes)} nodes, lease_ttl_s "
                     f"{lab.settings.lease_ttl_s:g}; {stats['batches']} batches of load")
        if lab.unacknowledged_submits:
            notes.append(f"{lab.unacknowledged_submits} submissions got no reply during an election "
                         "(never acknowledged, so they may be missing; any on record must still settle)")
        return ScenarioResult("cluster-failover", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)
