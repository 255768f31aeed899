"""Real spend from a real engine: the ``claude`` CLI (pinned, scripts/install-agent-clis) runs
jobs against the scripted model server on a real factory and nats-server; its spend lands in
the ledger, each run in exactly one of two overlapping funding windows; an invoice with
overlapping lines is imported twice through the real ``gigafactory`` command (the second
import adds nothing) and reconciled: every ledger dollar matched once, the drift named.
A missing ``claude`` FAILS with the install hint (never skips)."""

from __future__ import annotations

import datetime
import json
import subprocess

import pytest

from gigafactory.economics.ledger import read_spend
from gigafactory.model_server import parse_script, serve_in_thread

from helpers import Fleet, eventually, fast_env, fast_settings, gigafactory_cmd, run
from test_engine_claude import claude_env  # noqa: F401 (a fixture)

SCRIPT = {"turns": [{"text": "Nothing to change."}]}
WINDOWS = """
windows:
  - name: everything
    start: 2020-01-01
    end: 2100-01-01
    amount-usd: 1000
  - name: web-on-anthropic
    start: 2020-01-01
    end: 2100-01-01
    amount-usd: 50
    products: [web]
    providers: [anthropic]
"""


def cli(*args: str, url: str, **env: str) -> dict:
    out = subprocess.run([*gigafactory_cmd(), *args, "--nats", url, "--json"], capture_output=True, text=True,
                         env={**fast_env(), **env}, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout)


@pytest.mark.timeout(300)
def test_claude_spend_is_in_the_ledger_once_per_window_and_reconciles_against_an_overlapping_invoice(
        nats_server, tmp_path, claude_env):
    (tmp_path / "windows.yaml").write_text(WINDOWS)
    s = fast_settings(funding_windows_file=str(tmp_path / "windows.yaml"))

    async def main():
        with serve_in_thread(parse_script(SCRIPT)) as server:
            async with Fleet(nats_server.url, tmp_path, s) as fleet:
                claude_env(server.url)
                await fleet.add_factory("c-1", probe=True)
                jobs = {}
                for product in ("web", "api"):
                    jobs[product] = await fleet.submit_one(fleet.job(
                        "Say that nothing needs changing.", engine="claude", model="claude-sonnet-4-5",
                        review_policy="auto", product=product, retry={"max": 0}, timeout="120s"),
                        path=f"{product}.md")
                usage = {}
                for product, job in jobs.items():
                    rec = await fleet.wait_stage(job, "shipped", "failed", timeout_s=150)
                    assert rec.stage == "shipped", rec.attempts[-1].detail
                    usage[product] = rec.attempts[-1].usage
                    assert usage[product].cost_usd > 0 and usage[product].cost_source == "reported"

                async def finals():
                    recs = await read_spend(fleet.admin)
                    done = {r.job for r in recs if r.kind == "final"}
                    return recs if set(jobs.values()) <= done else None

                ledger = await eventually(finals, 20, what="final spend records of both claude jobs")
                for product, job in jobs.items():
                    mine = [r for r in ledger if r.job == job]
                    assert mine[-1].kind == "final" and len(mine) >= 2  # usage while it ran, then the end
                    assert sum(r.cost_usd for r in mine) == pytest.approx(usage[product].cost_usd)
                    assert {(r.engine, r.provider, r.model, r.product, r.lane) for r in mine} == {
                        ("claude", "anthropic", "claude-sonnet-4-5", product, "c-1/0")}
                windows = {product: {r.funding_window for r in ledger if r.job == job} for product, job in jobs.items()}
                assert windows == {"web": {"web-on-anthropic"}, "api": {"everything"}}
                total = sum(u.cost_usd for u in usage.values())

                # The invoice bills 10% more than the CLI reported; a daily line overlaps the month.
                now = datetime.datetime.now(datetime.timezone.utc)
                billed = round(total * 1.1, 6)
                inv = tmp_path / "anthropic.csv"
                inv.write_text(f"period,model,tokens,amount\n{now:%Y-%m},claude-sonnet-4-5,,{billed}\n"
                               f"{now:%Y-%m-%d},claude-sonnet-4-5,,{billed}\n")
                first = cli("invoices", "import", str(inv), "--provider", "anthropic", url=nats_server.url)
                again = cli("invoices", "import", str(inv), "--provider", "anthropic", url=nats_server.url)
                assert (first["added"], first["already_imported"]) == (2, 0)
                assert (again["added"], again["already_imported"]) == (0, 2)

                rep = cli("report", "invoices", url=nats_server.url)
                assert rep["lines"] == 2
                assert rep["matched_usd"] == pytest.approx(total, abs=1e-5)  # each dollar once, not twice
                [drift] = rep["drift"]
                assert (drift["provider"], drift["model"]) == ("anthropic", "claude-sonnet-4-5")
                assert drift["billed_usd"] == pytest.approx(2 * billed, abs=1e-5)
                assert drift["ledger_usd"] == pytest.approx(total, abs=1e-5)
                assert rep["unmatched_lines_count"] == 1 and rep["unmatched_ledger_usd"] == 0

                spend = cli("report", "spend", "--by", "window", url=nats_server.url,
                            GIGAFACTORY_FUNDING_WINDOWS_FILE=str(tmp_path / "windows.yaml"))
                assert {g["key"]: g["cost_usd"] for g in spend["groups"]} == pytest.approx(
                    {"web-on-anthropic": usage["web"].cost_usd, "everything": usage["api"].cost_usd}, abs=1e-5)
                assert spend["cost_usd"] == pytest.approx(total, abs=1e-5)
                assert spend["coverage"]["ratio"] == 1.0 and spend["coverage"]["broken"] == []
                balances = {w["window"]: w for w in spend["windows"]}
                assert balances["web-on-anthropic"]["remaining_usd"] == pytest.approx(50 - usage["web"].cost_usd,
                                                                                      abs=1e-5)
                assert balances["everything"]["drawn_usd"] == pytest.approx(usage["api"].cost_usd, abs=1e-5)

    run(main(), timeout_s=280)
