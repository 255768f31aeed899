"""The budget helper's reports: ``--since`` parsing and routing proposals as tables; then the
real CLI (``gigafactory report idle|lanes|budget|runs|routing``, ``gigafactory budget
override``) run as processes against a real fleet on a real broker."""

from __future__ import annotations

import asyncio
import json
import click
import pytest

from gigafactory.economics import routing
from gigafactory.economics.reports import parse_since

from helpers import Fleet, eventually, fast_settings, gigafactory_cmd, run

NOW = 1_800_000_000.0


@pytest.mark.parametrize("text,expect", [
    (None, NOW - 60), ("90m", NOW - 5400), ("7d", NOW - 7 * 86400),
    ("2027-01-15", 1_799_971_200.0), ("2027-01-15T01:00+01:00", 1_799_971_200.0)])
def test_since_accepts_a_duration_or_an_iso_date(text, expect):
    assert parse_since(text, 60, NOW) == expect


def test_since_refuses_what_it_cannot_read():
    with pytest.raises(click.BadParameter, match="duration back from now"):
        parse_since("last tuesday", 60, NOW)


def _o(profile, engine, model, stage, cost, lat=10.0):
    return {"profile": profile, "engine": engine, "model": model, "stage": stage, "cost_usd": cost, "latency_s": lat}


def test_routing_prefers_pass_rate_then_cost_and_never_a_candidate_over_the_per_feature_budget():
    rows = ([_o("coder", "claude", "opus", "shipped", 3.0)] * 4 + [_o("coder", "claude", "opus", "failed", 1.0)] +
            [_o("coder", "codex", "gpt", "shipped", 0.5)] * 3 + [_o("coder", "codex", "gpt", "failed", 0.5)] * 2 +
            [_o("coder", "aider", "ds", "shipped", 0.1)] * 2 +
            [_o("reviewer", "claude", "opus", "shipped", 9.0)] * 3)
    p = routing.propose(rows, per_feature_budget_usd=2.0)
    coder = p["coder"]
    assert coder["prefer"] == {"engine": "codex", "model": "gpt"}, "opus costs $3.25 per shipped job > $2"
    assert {e["engine"]: e["why"] for e in coder["excluded"]} == {
        "claude": "$3.2500 per shipped job > per-feature budget $2.0000", "aider": "only 2 ended jobs (< 3)"}
    assert coder["ranked"][0]["pass_rate"] == pytest.approx(0.6)
    assert p["reviewer"]["prefer"] is None, "its only candidate is over the budget"
    rich = routing.propose(rows, per_feature_budget_usd=None)
    assert rich["coder"]["prefer"]["engine"] == "claude", "with no ceiling the higher pass rate wins"
    assert routing.p95([1.0, 2.0, 3.0]) == 3.0 and routing.p95([]) is None


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*gigafactory_cmd(), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def test_the_reports_read_a_real_fleet(nats_server, tmp_path):
    async def main():
        s = fast_settings(pipeline_budget_enforcement=True, max_cost_per_run_usd=1.0)
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            await fleet.add_factory("rp-1", stations=2)
            jobs = [j["job"] for j in await fleet.submit(*(fleet.job("sleep 0.3", review_policy="auto", feature=True)
                                                           for _ in range(3)))]
            dear = await fleet.submit_one(fleet.job("echo ok", review_policy="auto", budget={"usd": 5}), "dear.md")
            for j in jobs:
                await fleet.wait_stage(j, "shipped", timeout_s=30)
            url = nats_server.url

            rc, out, err = await _cli("report", "idle", "--nats", url, "--json", "--since", "10m", "--by", "station")
            assert rc == 0, err
            idle = json.loads(out)
            assert idle["fleet"]["idle_coverage"] == 1.0 and set(idle["groups"]) == {"rp-1/0", "rp-1/1"}
            rc, out, err = await _cli("report", "lanes", "--nats", url, "--since", "10m")
            assert rc == 0 and "lane allocation" in out and "rp-1" in out, err

            rc, out, err = await _cli("report", "budget", "--nats", url)
            assert rc == 0 and out.startswith("budget enforcement ON") and "per feature $" in out, err
            rc, out, err = await _cli("budget", "override", "--nats", url, "--actor", "ops", dear)
            assert rc == 0 and "overridden by ops" in out, err
            await fleet.wait_stage(dear, "shipped", timeout_s=30)

            db = fleet.settings.runs_db
            async def three_runs():
                rc, out, _ = await _cli("report", "runs", "--db", db, "--json", "--by", "product")
                return json.loads(out) if rc == 0 and len(json.loads(out)["runs"]) == 3 else None

            runs = await eventually(three_runs, 20, what="three pipeline_runs rows", interval_s=0.5)
            assert runs["summary"]["features"] == 3 and runs["summary"]["groups"]["default"]["features"] == 3
            proposal = tmp_path / "proposal.json"
            rc, out, err = await _cli("report", "routing", "--db", db, "--nats", url, "--out", str(proposal),
                                      "--min-jobs", "1")
            assert rc == 0, err
            doc = json.loads(proposal.read_text())
            assert doc["profiles"]["none"]["prefer"] == {"engine": "shell", "model": "?"}
            assert doc["budget_computation_id"] and doc["per_feature_budget_usd"] > 0
            rc, out, err = await _cli("report", "runs", "--db", str(tmp_path / "nope.sqlite"))
            assert rc == 2 and "no runs database" in err

    run(main(), timeout_s=180)
