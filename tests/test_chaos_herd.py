"""Chaos scenario 6, the thundering herd, in its bounded form (what CI runs): 200 factories in
two fleet host processes, each on its own NATS connection, as jobs trickle in one at a time,
then through a kill -9 and restart of the broker under them.

The figures must show the herd really happened and was tamed: at least 200 factories; about
one claim attempt per job, not one per factory; every factory reconnected once, spread over the
jitter window rather than in one spike, with no storm of warnings; and every factory still
receiving dispatches by push afterwards (a job pinned to each one, claimed by that one).
"""

from __future__ import annotations

import asyncio

import pytest

from gigafactory.chaos.harness import ScenarioConfig
from gigafactory.chaos.runner import run_scenario
from gigafactory.chaos.scenarios import herd


@pytest.mark.timeout(300)
def test_thundering_herd_costs_one_claim_per_job_and_survives_a_reconnect_storm(tmp_path):
    res = asyncio.run(run_scenario("thundering-herd", ScenarioConfig(seed=0, bounded=True, workdir=tmp_path / "herd")))
    print(res.to_text())

    assert res.ok, res.to_text()
    f = res.figures
    n = f["factories"]
    assert n >= 200 and f["fleet_hosts"] == 2
    assert f["own_identities"] == n  # every factory of a fleet host connected as its own identity
    # Phase A: the trickle.
    assert f["trickle_jobs"] >= 20
    assert f["claim_attempts_per_job"] <= herd.ATTEMPTS_PER_JOB_MAX
    assert f["distinct_claimers"] > 1, "one factory took every job: the others were never offered one"
    # Phase B: the storm.
    assert f["reconnects"] == [n] and f["reconnected_twice"] == 0
    window = f["reconnect_window_s"]
    assert f["reconnect_spread_s"] >= herd.RECONNECT_SPREAD_MIN * window
    assert f["reconnect_bucket_share_max"] <= herd.RECONNECT_BUCKET_SHARE_MAX
    assert sum(f["reconnect_histogram"]) == n and len(f["reconnect_histogram"]) >= 4
    assert f["reconnect_s_last"] <= window + herd.RECONNECT_SLACK_S
    assert f["storm_warnings"][0] <= herd.WARNINGS_PER_FACTORY_MAX * n
    assert f["pull_waiting_shared_pool"][0] <= n * (1 + herd.PULL_WAITING_SLACK)
    # No lost subscriptions: a job pinned to each factory, claimed by it, by push.
    assert f["pinned_jobs"] == f["pinned_claimed_by_target"] == n
    assert f["pinned_polled_claims"] == 0 and f["pools_polling"] == 0
    assert f["after_storm_attempts_per_job"] <= herd.ATTEMPTS_PER_JOB_MAX
    # Every acknowledged job shipped, once (the checker agrees).
    assert f["jobs_shipped"] == f["jobs_acknowledged"] == f["trickle_jobs"] + n + 5
    assert f["acknowledged_lost"] == 0
    assert res.report.ok and res.report.counts["stage_shipped"] == f["jobs_acknowledged"]
