"""Chaos scenarios 3 (cluster failover) and 4 (partition), bounded forms on real processes: a
3-node JetStream cluster with R3 buckets and streams, and a factory behind the fault-injecting
TCP proxy. Each passes the one invariant check, and its figures show that the chaos happened:
a follower and the job bucket's leader really died with jobs in flight and a new leader was
elected; the partitioned factory's lease really expired, its job shipped elsewhere, and its
stale result was fenced and kept in quarantine. The full forms run in ``test_chaos.py``'s
slow parametrized test (``IMPLEMENTED``).

A fix found by cluster-failover is tested here too: a submission no longer asks the
JetStream meta layer for its pool's consumer every time.
"""

from __future__ import annotations

import asyncio

import pytest
import nats.js.errors
from helpers import fast_settings, job_text

from gigafactory.chaos.harness import ScenarioConfig
from gigafactory.chaos.runner import run_scenario


def run_bounded(name: str, tmp_path, seed: int = 0):
    return asyncio.run(run_scenario(name, ScenarioConfig(seed=seed, bounded=True, workdir=tmp_path / name)))


@pytest.mark.timeout(240)
def test_cluster_failover_elects_a_new_leader_resumes_dispatch_and_ships_every_job_once(tmp_path):
    res = run_bounded("cluster-failover", tmp_path)

    assert res.ok, res.to_text()
    f = res.figures
    assert f["nodes"] == 3 and f["replicas"] == 3
    # The nodes ran compose/nats/n<i>.conf's configuration (placed on loopback), fsync included.
    assert f["nats_conf_as_compose"] and f["sync_interval"] == "always"
    assert f["kills"] == ["follower of KV_gf_jobs", "leader of KV_gf_jobs"], res.to_text()
    assert all(n > 0 for n in f["jobs_in_flight_at_kill"]), "each kill hit jobs in flight"
    # The follower was not the leader; the leader kill moved the leadership to a survivor.
    assert f["killed_nodes"][0] != f["leader_before"][0]
    assert f["killed_nodes"][1] == f["leader_before"][1] != f["leader_after"][1]
    assert len(f["failover_s"]) == 1 and f["failover_s"][0] > 0
    assert all(s is not None for s in f["claim_after_kill_s"]), "dispatch resumed after each kill"
    assert f["claim_after_leader_kill_s_max"] >= f["failover_s"][0] - 1.0, "no claim without a leader"
    assert f["acknowledged_lost"] == 0
    assert f["jobs_shipped"] == f["jobs_acknowledged"] > 0
    assert res.report.counts["stage_shipped"] == f["jobs_on_record"]


@pytest.mark.timeout(240)
def test_partition_fences_the_stale_factory_after_the_heal_and_its_lease_survives_a_delay(tmp_path):
    res = run_bounded("partition", tmp_path)

    assert res.ok, res.to_text()
    f = res.figures
    assert f["rounds"] == ["blackhole", "delay", "drop"]
    # Blackhole: the lease expired and was reclaimed in time, the job shipped elsewhere while the
    # factory was still cut off, its own run ended (its holder fenced itself, or the result
    # waited in the outbox and was refused after the heal), and it was kept in quarantine,
    # never shipped; the partitioned engine did nothing after its lease was gone.
    [reclaim_s] = f["blackhole_reclaim_s"]
    assert reclaim_s <= f["blackhole_reclaim_bound_s"]
    # (Equal at the figures' rounding when the holder had fenced itself before the ship.)
    assert f["blackhole_shipped_elsewhere_s"][0] <= f["blackhole_partitioned_s"][0]
    assert f["blackhole_result_in_outbox_s"][0] <= f["blackhole_partitioned_s"][0]
    assert f["blackhole_run_ended"][0] in ("self-fenced", "outbox")
    assert f["fenced_events"] + f["self_fenced_events"] >= 1 and f["quarantined_results"] >= 1
    assert f["stale_ships"] == 0
    assert f["ledger_epochs"] >= 4 and f["side_effects_after_lease_lost"] == 0 and f["leftover_engines"] == 0
    # Delay: a job two lease TTLs long, renewed through the delay, ships with no reclaim.
    assert f["delay_reclaims"] == 0 and f["delay_shipped_after_s"][0] >= f["delay_job_s"]
    # Drop: reconnects were refused, and the factory got back.
    assert f["drop_reconnects_dropped"][0] >= 2 and f["drop_back_after_cut_s"][0] > 0
    assert f["jobs_shipped"] == f["jobs_acknowledged"] == 3
    assert res.report.counts["lease_expired"] >= 1


@pytest.mark.timeout(90)
def test_a_submission_does_not_recreate_its_pools_consumer_once_the_pool_is_ready(nats_server, tmp_path):
    """Found by cluster-failover: every submission created its pool's dispatch consumer again,
    a JetStream meta-layer request, so on a cluster every submission waited out a meta leader
    election after a node's kill -9 (7 s, measured), though the job bucket took writes all the
    while. Once a pool is ready the coordinator no longer asks: here its consumer is deleted
    behind its back, and a submission still succeeds without recreating it (the dispatcher's
    repair does that, on its own period)."""
    from gigafactory.broker import Broker
    from gigafactory.coordinator import intake
    from gigafactory.schemas import names

    async def main():
        b = await Broker.open(nats_server.url, "test-ready-pools", fast_settings())
        try:
            ready: set[str] = set()
            [first] = await intake.submit(b, [("a.md", job_text("echo a", cwd=str(tmp_path)))], ready_pools=ready)
            [pool] = ready
            consumer = names.pool_consumer(pool)
            await b.js.consumer_info(names.DISPATCH_STREAM, consumer)
            await b.js.delete_consumer(names.DISPATCH_STREAM, consumer)
            [second] = await intake.submit(b, [("b.md", job_text("echo b", cwd=str(tmp_path)))], ready_pools=ready)
            try:
                await b.js.consumer_info(names.DISPATCH_STREAM, consumer)
                recreated = True
            except nats.js.errors.NotFoundError:
                recreated = False
            # Without the set (a caller that knows nothing ready), the consumer is made sure of.
            [third] = await intake.submit(b, [("c.md", job_text("echo c", cwd=str(tmp_path)))])
            info = await b.js.consumer_info(names.DISPATCH_STREAM, consumer)
            return first, second, third, recreated, info, consumer
        finally:
            await b.close()

    first, second, third, recreated, info, consumer = asyncio.run(asyncio.wait_for(main(), 60))

    assert len({first.job, second.job, third.job}) == 3
    assert all(r.status == "created" for r in (first, second, third))
    assert info.config.durable_name == consumer
    assert not recreated, "a ready pool's consumer was created again by a submission"
