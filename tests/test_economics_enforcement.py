"""Budget enforcement on a real fleet (real broker, real factory, a real engine process that
reports its spend as it goes, see test_usage): with enforcement on a too-expensive job is held
``budget`` before it starts, visibly and with its trail, until an operator overrides it; a
running job is stopped at the per-run cap (``budget_exceeded``); with enforcement off (the
pilot) the same job runs and its kickoff says what enforcement would have done."""

from __future__ import annotations

import json

from gigafactory.schemas.manifest import FailureClass

from helpers import Fleet, eventually, fast_settings, run
from test_usage import _program, usage_engine  # noqa: F401  (a fixture)

CHEAP = dict(model="m-1", input_tokens=100, output_tokens=10, cost_usd=0.2, cost_source="reported")
DEAR = dict(model="m-1", input_tokens=900, output_tokens=90, cost_usd=0.9, cost_source="reported")


def _settings(tmp_path, enforce: bool, **kw):
    return fast_settings(pipeline_budget_enforcement=enforce, max_cost_per_run_usd=0.5,
                         budget_default_projected_usd=0.1, budget_signals_max_age_s=0, **kw)


async def _kinds(fleet: Fleet, job: str, kind: str) -> list[dict]:
    return [e for e in await fleet.events(job) if e["kind"] == kind]


def test_enforcement_on_holds_a_job_over_the_cap_until_an_override_and_records_the_trail(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, _settings(tmp_path, True)) as fleet:
            await fleet.add_factory("b-1")
            job = await fleet.submit_one(fleet.job("echo ran", review_policy="auto", budget={"usd": 2}))
            rec = await fleet.wait_stage(job, "queued")

            async def held():
                r, _ = await fleet.record(job)
                return r if r.reason.startswith("budget:") else None

            rec = await eventually(held, 15, what="the budget hold on the record")
            assert "projected $2.0000 (the job's budget.usd) > per-run cap $0.5" in rec.reason
            assert not rec.attempts, "held before it started"
            [ev] = await eventually(lambda: _kinds(fleet, job, "held"), 10, what="the held event")
            trail = ev["data"]["budget"]
            assert trail["allowed"] is False and trail["enforcement"] is True
            assert trail["line"] == "budget enforcement ON"
            assert trail["computation_id"] in rec.reason
            state = await fleet.client.call("budget", {})
            assert state["budget"]["computation_id"] == trail["computation_id"] and state["enforcement"] is True

            await fleet.client.call("budget_override", {"job": job, "actor": "alice", "reason": "worth it"})
            rec = await fleet.wait_stage(job, "shipped", timeout_s=20)
            assert rec.budget_override == "alice"
            [d] = [e for e in await _kinds(fleet, job, "dispatched")]
            assert "overridden by alice" in d["data"]["budget"]["reason"]
            assert await _kinds(fleet, job, "budget_override")

    run(main())


def test_enforcement_on_stops_a_running_job_at_the_per_run_cap(nats_server, tmp_path, usage_engine):  # noqa: F811
    program = _program(CHEAP, DEAR, then="print('still running', flush=True)\ntime.sleep(60)\n"
                                         "open('never-made.txt', 'w').write('x')")

    async def main():
        async with Fleet(nats_server.url, tmp_path, _settings(tmp_path, True)) as fleet:
            await fleet.add_factory("b-2", probe=True)
            job = await fleet.submit_one(fleet.job(program, engine="pyusage", review_policy="auto", retry={"max": 0}))
            rec = await fleet.wait_stage(job, "failed", "dead_letter", timeout_s=30)
            last = rec.attempts[-1]
            assert last.outcome == FailureClass.BUDGET_EXCEEDED
            assert "per-run cap exceeded: $0.9000 spent > GIGAFACTORY_MAX_COST_PER_RUN_USD $0.5" in last.detail
            assert not (fleet.repo / "never-made.txt").exists()
            [d] = await _kinds(fleet, job, "dispatched")
            assert d["data"]["budget"]["allowed"] is True and d["data"]["budget"]["projected_usd"] == 0.1

    run(main())


def test_enforcement_off_runs_the_same_jobs_and_says_pilot_mode(nats_server, tmp_path, usage_engine):  # noqa: F811
    program = _program(CHEAP, DEAR)

    async def main():
        async with Fleet(nats_server.url, tmp_path, _settings(tmp_path, False)) as fleet:
            await fleet.add_factory("b-3", probe=True)
            dear = await fleet.submit_one(fleet.job("echo ok", review_policy="auto", budget={"usd": 2}), "a.md")
            spend = await fleet.submit_one(fleet.job(program, engine="pyusage", review_policy="auto"), "b.md")
            await fleet.wait_stage(dear, "shipped", timeout_s=20)
            await fleet.wait_stage(spend, "shipped", timeout_s=20)
            [d] = await _kinds(fleet, dear, "dispatched")
            b = d["data"]["budget"]
            assert b["line"] == "budget enforcement OFF (pilot mode)"
            assert (b["allowed"], b["would_hold"]) == (True, True), "the pilot sees what would have been vetoed"

    run(main())


def test_signals_with_no_runway_hold_every_job_on_the_residual_daily_budget(nats_server, tmp_path):
    signals = tmp_path / "signals.json"
    signals.write_text(json.dumps({"cash_balance_usd": 10_000, "monthly_burn_usd": 50_000, "funnel": {"signups": 3}}))

    async def main():
        s = _settings(tmp_path, True, budget_signals_file=str(signals))
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            await fleet.add_factory("b-4")
            job = await fleet.submit_one(fleet.job("echo ok", review_policy="auto"))

            async def held():
                r, _ = await fleet.record(job)
                return r if r.reason.startswith("budget:") else None

            rec = await eventually(held, 15, what="the budget hold")
            assert "> residual daily budget $0.0000" in rec.reason
            state = await fleet.client.call("budget", {})
            assert state["budget"]["cash_runway_factor"] == 0
            assert state["budget"]["signals"]["source"] == f"file:{signals}"
            assert state["budget"]["signals"]["funnel"] == {"signups": 3.0}

    run(main())
