"""The fleet-as-capital metrics, scraped from a live in-process fleet on a real broker: budget
enforcement state and today's budget, idle coverage and lane allocation, merge-queue
occupancy and refill latency, features shipped and throughput per funded dollar. And the merge
queue's arithmetic as a table."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest

from gigafactory import metrics
from gigafactory.economics.runs import MergeQueue

from helpers import Fleet, eventually, fast_settings, run
from test_metrics import _scrape, fresh_registry  # noqa: F401  (a fixture)
from test_usage import usage_engine  # noqa: F401  (a fixture)


def _st(jid, stage):
    # The view's JobState: its key and stage are fields (a finished job's record is packed).
    return NS(key=jid, stage=stage, record=NS(id=jid, stage=stage))


def test_the_merge_queue_counts_jobs_waiting_to_ship_and_how_long_it_stayed_empty():
    t = [0.0]
    mq = MergeQueue(clock=lambda: t[0])
    mq.on_job(None, _st("a", "review"))
    assert mq.occupancy == 1 and mq.last_refill_s == 0
    t[0] = 10
    mq.on_job(_st("a", "review"), _st("a", "shipped"))
    assert mq.occupancy == 0
    t[0] = 25
    mq.on_job(None, _st("b", "building"))
    mq.on_job(_st("b", "building"), _st("b", "testing"))
    assert mq.occupancy == 1 and mq.last_refill_s == 15
    mq.on_job(_st("b", "testing"), None)  # deleted (retention)
    assert mq.occupancy == 0


def test_a_fleets_capital_metrics(nats_server, tmp_path, usage_engine, fresh_registry):  # noqa: F811
    usage = dict(model="m-1", input_tokens=300, output_tokens=40, cost_usd=0.25, cost_source="reported")
    program = "print(" + repr("usage: " + json.dumps(usage)) + ", flush=True)"

    async def main():
        async with metrics.MetricsServer(fresh_registry, "127.0.0.1", 0) as srv:
            s = fast_settings(pipeline_budget_enforcement=True)
            async with Fleet(nats_server.url, tmp_path, s) as fleet:
                await fleet.add_factory("cm-1", stations=2, probe=True)
                feat = await fleet.submit_one(fleet.job(program, engine="pyusage", review_policy="auto",
                                                        feature=True), "feat.md")
                waits = await fleet.submit_one(fleet.job("echo ok"), "waits.md")  # manual: waits to ship
                await fleet.wait_stage(feat, "shipped")
                await fleet.wait_stage(waits, "review", "testing")

                async def settled():
                    sc = await _scrape(srv.url)
                    return sc if sc.value("gigafactory_features_shipped_total") == 1 and \
                        sc.value("gigafactory_merge_queue_jobs") == 1 else None

                sc = await eventually(settled, 15, what="the feature counted and the merge queue at 1")
                assert sc.value("gigafactory_budget_enforcement") == 1
                assert sc.value("gigafactory_budget_daily_usd") == pytest.approx(3000 / 30)
                assert sc.value("gigafactory_features_cost_usd_total") == pytest.approx(0.25)
                assert sc.value("gigafactory_throughput_per_usd") == pytest.approx(4.0)
                assert sc.value("gigafactory_idle_classification_coverage_ratio") == 1.0
                assert 0 <= sc.value("gigafactory_lane_allocation_ratio") <= 1
                await fleet.client.call("ship", {"job": waits})
                await fleet.wait_stage(waits, "shipped")
                again = await fleet.submit_one(fleet.job("echo ok"), "again.md")
                await fleet.wait_stage(again, "review", "testing")
                sc = await eventually(lambda: _refilled(srv.url), 15, what="a refill latency")
                assert sc.value("gigafactory_merge_queue_jobs") == 1

    run(main(), timeout_s=120)


async def _refilled(url):
    sc = await _scrape(url)
    return sc if sc.value("gigafactory_merge_queue_refill_seconds") > 0 else None
