"""The load suite: its arithmetic as pure functions, the factory's noop engine against a real
broker, and a CI-sized run of the whole harness through the CLI.

Nothing here asserts a timing: the run must complete every job and produce every figure,
sane and consistent; the targets are reported by the run, never checked by the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gigafactory.loadtest import stats as st
from gigafactory.loadtest.harness import LoadConfig, fleet_layout, timelines_from
from gigafactory.loadtest.workloads import WORKLOADS
from gigafactory.schemas.lifecycle import Stage

from helpers import Fleet, eventually, gigafactory_cmd, run

# -- the arithmetic ---------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks_and_none_for_no_values():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert st.percentile(xs, 50) == pytest.approx(5.5)
    assert st.percentile(xs, 0) == 1.0 and st.percentile(xs, 100) == 10.0
    assert st.percentile(xs, 99) == pytest.approx(9.91)
    assert st.percentile([3.0], 99) == 3.0
    assert st.percentile([], 50) is None
    assert st.percentile(list(reversed(xs)), 90) == st.percentile(xs, 90)  # order does not matter
    with pytest.raises(AssertionError):
        st.percentile(xs, 101)


def test_latency_summary_is_in_milliseconds_with_the_count():
    s = st.summary_ms([0.001, 0.002, 0.003, 0.010])
    assert s["n"] == 4 and s["p50_ms"] == pytest.approx(2.5) and s["max_ms"] == pytest.approx(10.0)
    assert s["min_ms"] == pytest.approx(1.0)
    empty = st.summary_ms([])
    assert empty["n"] == 0 and empty["p99_ms"] is None


def test_ratios_rates_and_targets_say_met_missed_or_not_applicable():
    assert st.ratio(70.0, 100.0) == pytest.approx(0.7)
    assert st.ratio(1.0, 0.0) is None and st.ratio(None, 3.0) is None
    assert st.rate(10, 2.0) == 5.0 and st.rate(0, 2.0) is None and st.rate(3, 0.0) is None
    at_least = st.Target(">=", 0.70, ">= 0.70x")
    assert st.judge(0.70, at_least) == "met"
    assert st.judge(0.69, at_least) == "missed"
    assert st.judge(None, at_least) == "n/a"
    assert st.judge(0.5, None) == ""
    under = st.Target("<", 10.0, "< 10 ms")
    assert st.judge(9.99, under) == "met" and st.judge(10.0, under) == "missed"
    # A throughput target bounds the ratio to the baseline, not the figure itself.
    r = st.row("throughput", 700.0, "jobs/s", baseline=1000.0, target=at_least, judge_on="ratio")
    assert r.ratio == pytest.approx(0.7) and r.verdict == "met"
    r = st.row("throughput", 600.0, "jobs/s", baseline=1000.0, target=at_least, judge_on="ratio", note="coordinator")
    assert r.verdict == "missed"
    text, md = st.to_text([st.Table("t", [r])]), st.to_markdown([st.Table("t", [r])])
    assert "missed" in text and "coordinator" in text  # a missed target says what bounds it
    assert md.splitlines()[2].startswith("| figure | value | baseline | ratio | target | met |")
    assert "| throughput | 600 jobs/s | 1,000 jobs/s | 0.60 | >= 0.70x | missed: coordinator |" in md


def test_busy_fraction_clips_intervals_to_the_window_and_overtaken_counts_claims_between():
    # Two stations over [0, 10]: one busy 0-10, the other 2-7 -> 15 of 20 station-seconds.
    assert st.busy_fraction([(0, 10), (2, 7)], 2, 0, 10) == pytest.approx(0.75)
    assert st.busy_fraction([(-5, 20)], 1, 0, 10) == pytest.approx(1.0)
    assert st.busy_fraction([(0, 1)], 1, 5, 5) is None
    # Critical job submitted at 1, claimed at 4: the backlog claims at 2 and 3 went ahead.
    assert st.overtaken([(1.0, 4.0), (5.0, 5.5)], [0.5, 2.0, 3.0, 6.0]) == [2, 0]


def test_timelines_come_from_broker_revisions_and_skip_truncated_histories():
    tl = timelines_from({
        "a": [(1.0, "queued"), (1.2, "assigned"), (1.3, "building"), (1.5, "shipped")],
        "d": [(1.0, "blocked"), (2.0, "queued"), (2.1, "assigned"), (2.4, "shipped")],
        "lost": [(3.0, "building"), (3.1, "shipped")],  # its first revisions aged out
        "open": [(1.0, "queued")],
        "fast": [(1.0, "queued"), (1.4, "building"), (1.6, "shipped")],  # claimed straight into building
    })
    assert set(tl) == {"a", "d", "open", "fast"}
    assert tl["fast"].claimed == 1.4
    assert (tl["a"].submitted, tl["a"].claimed, tl["a"].done) == (1.0, 1.2, 1.5)
    assert tl["d"].queued == 2.0 and tl["d"].claimed == 2.1
    assert tl["open"].claimed is None and tl["open"].done is None


def test_the_fleet_layout_has_a_bulk_pool_a_fifth_with_gpu_and_one_rare_factory():
    hosts = fleet_layout(100, 2)
    assert sum(h.count for h in hosts) == 100
    assert [h.count for h in hosts if "hsm" in h.caps] == [1]
    assert sum(h.count for h in hosts if "gpu" in h.caps) == 20 + 1
    assert all("engine:noop" in h.caps for h in hosts)
    assert sum(h.count for h in fleet_layout(2, 4)) == 2 and all("gpu" not in h.caps for h in fleet_layout(2, 4))


def test_a_config_no_run_could_honour_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--pace-fraction"):
        LoadConfig(pace_fraction=1.5).validate()
    with pytest.raises(ValueError, match="--batch"):
        LoadConfig(batch=5000).validate()
    LoadConfig().validate()


# -- the noop engine ---------------------------------------------------------------------------


def _noop(fleet: Fleet, **manifest) -> str:
    manifest.setdefault("cwd", str(fleet.repo))
    return fleet.job("this body is never run", engine="noop", review_policy="auto", **manifest)


def test_a_noop_job_ships_without_a_process_and_skips_verify(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("noop-1", caps=["engine:noop"])
            plain = await fleet.submit_one(_noop(fleet))
            verified = await fleet.submit_one(_noop(fleet, verify="false"), path="v.md")
            for job in (plain, verified):
                rec = await fleet.wait_stage(job, "shipped")
                a = rec.attempts[-1]
                assert a.outcome == "passed" and a.exit_code == 0 and a.verify_exit_code is None
                assert a.log is None  # nothing ran, so there is no log to keep
            rec, _ = await fleet.record(verified)
            assert "verify skipped (noop engine)" in rec.attempts[-1].detail
            assert not list((tmp_path / "factories" / "noop-1" / "logs").iterdir())

    run(main())


def test_a_noop_job_is_never_run_by_a_factory_without_the_noop_token(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("shell-only")
            job = await fleet.submit_one(_noop(fleet))

            async def held():
                rec, _ = await fleet.record(job)
                return rec if "engine:noop" in rec.reason else None

            rec = await eventually(held, 10, what="the noop job held for want of engine:noop")
            assert rec.stage == Stage.QUEUED and rec.attempts == []

    run(main())


# -- a CI-sized run -----------------------------------------------------------------------------------


def test_a_ci_sized_run_of_every_workload_completes_and_produces_every_figure(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [*gigafactory_cmd(), "loadtest", "run", "--factories", "10", "--jobs", "40", "--idle-s", "2",
         "--restart-jobs", "500", "--dir", str(tmp_path / "run"), "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["incomplete"] == {}
    assert res["command"].startswith("gigafactory loadtest run --factories 10")
    figs = res["figures"]
    for w in WORKLOADS:
        assert any(k == f"ours:{w}" or k.startswith(f"ours:{w} ") for k in figs), w
    for key, f in figs.items():
        assert f["completed"] == f["jobs"] > 0, key
        assert f["untracked"] == 0 and f["failed"] == 0, key
        assert f["throughput_jobs_per_s"] > 0, key
        assert f["dispatch"]["n"] == f["jobs"] and f["dispatch"]["min_ms"] >= 0, key
        assert f["completion"]["p50_ms"] <= f["completion"]["p99_ms"] <= f["completion"]["max_ms"], key
        assert f["claim_attempts"] >= f["jobs"], key  # every job was claimed at least once
        assert all(v >= 0 for v in f["cpu_s"].values()), key
    # The baseline ran in the same run, both phases, every job done.
    assert figs["baseline:saturated"]["completed"] == 40
    assert figs["baseline:paced"]["completed"] == figs["ours:noop paced"]["jobs"]
    assert figs["ours:noop saturated"]["claim_conflicts"] >= 0
    assert figs["ours:noop saturated"]["cpu_s"]["coordinator"] > 0
    assert figs["ours:utilisation"]["utilisation"]["busy_pct"] > 0
    # Workload specifics: critical jobs and products were measured, the dag has its hops.
    assert len(figs["ours:priorities"]["critical"]["offered_ahead_of"]) >= 3
    assert set(figs["ours:multi-product"]["products"]) == {"prod-a", "prod-b", "prod-c"}
    assert figs["ours:dag"]["dag"]["hop"]["n"] > 0
    assert figs["ours:herd"]["attempts_per_job"] >= 1
    assert res["idle"]["in_msgs_per_s"] > 0 and res["idle"]["window_s"] >= 2
    r = res["restart"]
    assert r["first_job_done"] and 0 < r["api_s"] <= r["ready_s"] <= r["first_claim_s"]
    assert r["rss_bytes"]["single_before"] > 0 and r["rss_bytes"]["single_after"] > 0
    # The table carries every row with a verdict column; the targets are reported, not asserted.
    titles = [t["title"] for t in res["tables"]]
    assert len(titles) == 9, titles
    # Lane allocation and idle coverage per workload, from the stations' events: no dark idle.
    assert set(res["lanes"]) == set(WORKLOADS)
    for name, f in res["lanes"].items():
        assert f["idle_coverage"] == 1.0, (name, f)
        assert 0 < f["lane_allocation"] <= 1 and f["stations"] > 0, (name, f)
    verdicts = {row["verdict"] for t in res["tables"] for row in t["rows"]}
    assert verdicts <= {"", "met", "missed", "n/a"}
    assert "saturated throughput" in proc.stdout and "| figure |" not in proc.stdout


def test_the_cli_lists_workloads_and_refuses_an_unknown_one(tmp_path):
    listed = subprocess.run([*gigafactory_cmd(), "loadtest", "workloads", "--json"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0
    assert [w["name"] for w in json.loads(listed.stdout)["workloads"]] == list(WORKLOADS)
    bad = subprocess.run([*gigafactory_cmd(), "loadtest", "run", "--workload", "nope", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no workload 'nope'" in bad.stderr and "noop" in bad.stderr
    assert sys.executable  # the console script runs this interpreter's package
