"""Attribution coverage stays 100% across churn: a real factory process is SIGKILLed while its
engine (a declared CLI reporting usage) runs; the spend it recorded before dying is in the
ledger, fully attributed; the job's next attempt elsewhere adds its own records; the killed
factory, started again with its folder, publishes what its spend outbox still held under the
same ids, so no dollar is lost or counted twice."""

from __future__ import annotations

import signal
import sys

import pytest
import yaml

from gigafactory.economics.ledger import read_raw_spend, read_spend
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.spend import coverage, dedupe

from helpers import Fleet, Proc, eventually, fast_env, fast_settings, kill_group, run

METER_CLI = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "meter version 1.0.0"; exit 0; fi
echo $$ > "$METER_PIDS/engine-$GF_FACTORY.pid"
echo '{"type": "usage", "model": "meter-model", "usage": {"input": 1000, "output": 200}, "cost": 0.25}'
if [ "$GF_FACTORY" = victim ]; then exec sleep 60; fi
echo '{"type": "usage", "model": "meter-model", "usage": {"input": 500, "output": 100}, "cost": 0.10}'
"""
DECLARATION = {
    "name": "meter", "engine-class": "agentic-coder", "description": "reports usage and cost",
    "binary": "meter", "version-args": ["--version"], "version-regex": r"version (\d+\.\d+\.\d+)",
    "args": ["{prompt}"], "prompt": "argv", "default-model": "meter-model", "credentials-required": "none",
    "passthrough-env": ["METER_PIDS"],
    "output": {"format": "jsonl", "event-type": "type", "usage-events": ["usage"], "input-tokens": "usage.input",
               "output-tokens": "usage.output", "cost-usd": "cost", "model": "model"},
}


@pytest.mark.timeout(120)
def test_coverage_is_complete_and_no_dollar_is_lost_or_doubled_when_a_factory_is_killed_mid_run(
        nats_server, tmp_path, monkeypatch):
    bin_dir, engines_dir, pids = tmp_path / "bin", tmp_path / "engines", tmp_path / "pids"
    for d in (bin_dir, engines_dir, pids):
        d.mkdir()
    (bin_dir / "meter").write_text(METER_CLI)
    (bin_dir / "meter").chmod(0o755)
    (engines_dir / "meter.yaml").write_text(yaml.safe_dump(DECLARATION, sort_keys=False))
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("METER_PIDS", str(pids))
    settings = fast_settings(engines_dir=str(engines_dir))
    env = fast_env(engines_dir=str(engines_dir))

    def victim_proc(log_name: str) -> Proc:
        return Proc([sys.executable, "-m", "gigafactory", "factory", "--nats", nats_server.url, "--id", "victim",
                     "--no-probe", "--cap", "engine:meter", "--stations", "1",
                     "--data-dir", str(tmp_path / "victim-data"), "--workspace", str(tmp_path / "victim-work")],
                    tmp_path / log_name, env=env)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            victim = victim_proc("victim.log")
            try:
                view = fleet.coordinator.view
                await eventually(lambda: "victim" in view.factories, 30, what="victim registered")
                job = await fleet.submit_one(fleet.job("Meter this.", engine="meter", review_policy="auto",
                                                       product="web", retry={"max": 2, "backoff": "0.1s"}))

                async def victim_spent():
                    return [r for r in await read_spend(fleet.admin) if r.job == job and r.factory == "victim"]

                await eventually(victim_spent, 30, what="the victim's usage record in the ledger")
                victim.signal(signal.SIGKILL)
                assert victim.wait(10) == -signal.SIGKILL
                await fleet.add_factory("rescuer", caps=["engine:meter"])
                final = await fleet.wait_stage(job, "shipped", timeout_s=40)
                assert [a.factory for a in final.attempts] == ["victim", "rescuer"]

                # The victim comes back with its folder: whatever its spend outbox held goes out
                # under the ids it was written with.
                victim = victim_proc("victim-2.log")
                await eventually(lambda: "victim" in view.factories and view.factories["victim"].record.status == "up",
                                 30, what="victim back")

                async def settled():
                    recs = [r for r in await read_spend(fleet.admin) if r.job == job]
                    return recs if any(r.kind == "final" for r in recs) else None

                recs = await eventually(settled, 20, what="the rescuer's final record")
                by_attempt = {(r.factory, r.epoch): [] for r in recs}
                for r in recs:
                    by_attempt[(r.factory, r.epoch)].append((r.seq, r.kind))
                assert by_attempt == {("victim", 1): [(1, "usage")],
                                      ("rescuer", 3): [(1, "usage"), (2, "usage"), (3, "final")]}
                # Every dollar once: the victim's $0.25 before it died, the rescuer's $0.35.
                assert sum(r.cost_usd for r in recs) == pytest.approx(0.60)
                raw = [r for r in await read_raw_spend(fleet.admin) if r.job == job]
                assert len(raw) == len(dedupe(raw)) == 4
                cov = coverage(await read_spend(fleet.admin))
                assert cov.ratio == 1.0 and cov.broken == [] and cov.records == 4
                assert {(r.product, r.engine, r.provider, r.model, r.funding_window, r.lane_kind) for r in recs} == {
                    ("web", "meter", "meter", "meter-model", "unfunded", "live")}
                assert final.stage == Stage.SHIPPED
            finally:
                victim.close()
                for p in pids.glob("*.pid"):
                    kill_group(int(p.read_text()))

    run(main(), 110)
