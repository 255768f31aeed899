"""The factory writes the spend ledger: every attempt's usage reports and a final record, with
its attribution resolved before the engine starts (lane, lane kind, job, product, profile,
engine, provider, model, the one funding window), idempotent on replay; fixed seat costs; and a
factory that does not start on a bad funding windows file. A real factory, engine subprocess
and nats-server."""

from __future__ import annotations

import datetime

import pytest

from gigafactory.economics.funding import FundingFileError
from gigafactory.economics.ledger import read_raw_spend, read_spend
from gigafactory.schemas.spend import UNFUNDED, coverage

from helpers import Fleet, eventually, fast_settings, run
from test_usage import FINAL, FIRST, _program, usage_engine  # noqa: F401 (a fixture)

WINDOWS = """
windows:
  - name: all-year
    start: 2020-01-01
    end: 2100-01-01
    amount-usd: 1000
  - name: web-background
    start: 2020-01-01
    end: 2100-01-01
    amount-usd: 100
    products: [web]
    lane-kinds: [background]
"""


async def _ledger_of(fleet: Fleet, job: str, n: int):
    async def enough():
        got = [r for r in await read_spend(fleet.admin) if r.job == job]
        return got if len(got) >= n else None

    return await eventually(enough, 15, what=f"{n} spend records of {job}")


def test_every_usage_report_and_the_end_of_an_attempt_are_in_the_ledger_fully_attributed(
        nats_server, tmp_path, usage_engine):
    (tmp_path / "windows.yaml").write_text(WINDOWS)
    s = fast_settings(funding_windows_file=str(tmp_path / "windows.yaml"))

    async def main():
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            await fleet.add_factory("s-1", probe=True)
            web = await fleet.submit_one(fleet.job(_program(FIRST, FINAL), engine="pyusage", review_policy="auto",
                                                   product="web", lane_kind="background", tracker_item="T-1"),
                                         path="web.md")
            api = await fleet.submit_one(fleet.job(_program(FIRST, FINAL), engine="pyusage", review_policy="auto",
                                                   product="api"), path="api.md")
            for job in (web, api):
                await fleet.wait_stage(job, "shipped")
            recs = await _ledger_of(fleet, web, 3)
            assert [(r.seq, r.kind) for r in recs] == [(1, "usage"), (2, "usage"), (3, "final")]
            assert [r.id for r in recs] == [f"{web}.1.1", f"{web}.1.2", f"{web}.1.3"]
            r = recs[-1]
            assert (r.lane, r.lane_kind, r.product, r.tracker_item, r.engine, r.model, r.outcome) == (
                "s-1/0", "background", "web", "T-1", "pyusage", "m-1", "passed")
            assert r.funding_window == "web-background"  # the most specific window funding it
            assert sum(x.cost_usd for x in recs) == pytest.approx(0.0123)  # deltas: once, not 0.0123 twice
            assert [x.tokens_input for x in recs] == [100, 200, 0]
            assert recs[-1].cost_source == "reported"
            other = await _ledger_of(fleet, api, 3)
            assert {x.funding_window for x in other} == {"all-year"} and {x.lane_kind for x in other} == {"live"}
            cov = coverage(await read_spend(fleet.admin))
            assert cov.ratio == 1.0 and cov.broken == []

    run(main())


def test_a_run_no_window_funds_draws_from_unfunded_and_is_reported(nats_server, tmp_path, usage_engine):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("s-2", probe=True)
            job = await fleet.submit_one(fleet.job(_program(FINAL), engine="pyusage", review_policy="auto"))
            await fleet.wait_stage(job, "shipped")
            recs = await _ledger_of(fleet, job, 2)
            assert {r.funding_window for r in recs} == {UNFUNDED}
            cov = coverage(recs)
            assert cov.unfunded_cost_usd == pytest.approx(0.0123) and cov.ratio == 1.0

    run(main())


def test_a_record_replayed_from_the_spend_outbox_keeps_its_identity(nats_server, tmp_path, usage_engine):
    """A factory's spend records wait in its spend outbox until stored; published again (as
    after a crash between the publish and its removal) they keep their ids: stored once."""
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("s-3", probe=True)
            job = await fleet.submit_one(fleet.job(_program(FIRST, FINAL), engine="pyusage", review_policy="auto"))
            await fleet.wait_stage(job, "shipped")
            recs = await _ledger_of(fleet, job, 3)
            final = recs[-1]
            raw = [r for r in await read_raw_spend(fleet.admin) if r.job == job]
            # Replay: the same record put back in the outbox and published again.
            import msgspec
            f.spend.outbox.put("spend", job, final.epoch, msgspec.json.encode(
                next(r for r in raw if r.id == final.id)))
            assert await f.spend.publish_pending(None)
            again = [r for r in await read_raw_spend(fleet.admin) if r.job == job]
            assert len(again) == len(raw) == 3
            assert sum(r.cost_usd for r in await read_spend(fleet.admin) if r.job == job) == pytest.approx(0.0123)

    run(main())


def test_seats_cost_while_idle_spread_over_the_lanes(nats_server, tmp_path):
    s = fast_settings(seat_costs="claude=720/month,codex=3.6/hour")

    async def main():
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            f = await fleet.add_factory("s-4", stations=2, seats={"codex": 2})
            start = f.spend.fixed_since
            assert f.spend.write_fixed(start + 100.0) == 4  # 2 engines x 2 lanes
            await f.spend.publish_pending(None)
            recs = [r for r in await read_spend(fleet.admin) if r.kind == "fixed"]
            by = {(r.engine, r.lane): r for r in recs}
            # claude: $720 / 30 days = $0.000277/s, one seat, 100 s, shared by two lanes.
            assert by[("claude", "s-4/0")].cost_usd == pytest.approx(720 / (30 * 86400) * 100 / 2)
            # codex: $3.6/hour = $0.001/s, two seats, 100 s, two lanes: $0.1 each.
            assert by[("codex", "s-4/1")].cost_usd == pytest.approx(0.1)
            assert {r.cost_source for r in recs} == {"fixed"} and {r.funding_window for r in recs} == {UNFUNDED}
            assert {r.provider for r in recs} == {"anthropic", "openai"}
            assert coverage(recs).ratio == 1.0
            assert f.spend.write_fixed(start + 100.5) == 0  # under a second: nothing worth a record

    run(main())


def test_a_factory_does_not_start_on_a_bad_funding_windows_file(nats_server, tmp_path):
    (tmp_path / "w.yaml").write_text("windows:\n  - {name: q, start: 2026-01-01, end: 2027-01-01}\n")
    s = fast_settings(funding_windows_file=str(tmp_path / "w.yaml"))

    async def main():
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            with pytest.raises(FundingFileError, match=r"w.yaml: window 'q': field 'amount-usd' is missing"):
                await fleet.add_factory("s-5")

    run(main())


def test_the_metrics_count_spend_by_provider_model_window_and_lane_kind_and_show_coverage_and_drift(
        nats_server, tmp_path, usage_engine):
    from gigafactory.economics.invoices import parse_invoice, store_lines
    from gigafactory.metrics import process_metrics

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("s-6", probe=True)
            job = await fleet.submit_one(fleet.job(_program(FIRST, FINAL), engine="pyusage", review_policy="auto"))
            await fleet.wait_stage(job, "shipped")
            await _ledger_of(fleet, job, 3)
            # The factory counted what its records add: 0.0123 once, not once per record.
            assert f.spend.spend_usd == {("pyusage", "m-1", UNFUNDED, "live", "unknown"): 0.0,
                                         ("pyusage", "m-1", UNFUNDED, "live", "reported"): pytest.approx(0.0123)}
            now = datetime.datetime.now(datetime.timezone.utc)
            await store_lines(fleet.admin, parse_invoice(
                f"period,model,amount\n{now:%Y-%m-%d},m-1,0.02\n".encode(), "inv.csv", "pyusage"))
            await fleet.coordinator.ledger.run_pass()
            text = process_metrics().exposition().decode()
            assert ('gigafactory_spend_usd_total{factory="s-6",lane_kind="live",model="m-1",provider="pyusage",'
                    'source="reported",window="unfunded"} 0.0123') in text
            assert "gigafactory_spend_attribution_coverage_ratio 1.0" in text
            assert 'gigafactory_invoice_drift_usd{model="m-1",provider="pyusage"} -0.0077' in text
            assert job not in text

    run(main())


def test_records_a_killed_factory_left_in_its_spend_outbox_go_out_at_its_next_start_with_their_ids(
        nats_server, tmp_path):
    """A factory killed after writing a record (durably) and before publishing it: the record
    waits in its folder's spend outbox, and the next start publishes it under the same id."""
    from gigafactory.factory.holder import Run
    from gigafactory.factory.spend import SpendWriter
    from gigafactory.schemas import protocol
    from gigafactory.schemas.manifest import parse_job_text
    from gigafactory.schemas.records import JobRecord, Usage

    jf = parse_job_text("---\nengine: claude\ncwd: .\nproduct: web\nmodel: claude-sonnet-4-5\n---\nhi\n", "j.md")
    rec = JobRecord(id="j-killed", manifest=jf.manifest, body=jf.body, source="t", content_hash="h",
                    submitted_at=1.0, pool="p", requirements=[])
    rec = protocol.claim(rec, "s-7", 0, 2.0).record
    dead = SpendWriter(None, tmp_path / "factories" / "s-7", "s-7", 1, fast_settings(), [], {})
    a = dead.begin(Run("j-killed", rec.epoch, 0, 1, rec), "claude")
    dead.usage(a, Usage(model="claude-sonnet-4-5", input_tokens=10, cost_usd=0.5, cost_source="priced"))
    dead.usage(a, Usage(model="claude-sonnet-4-5", input_tokens=30, cost_usd=0.75, cost_source="priced"))
    dead.outbox.close()  # the process dies here: nothing was published

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("s-7")
            recs = await _ledger_of(fleet, "j-killed", 2)
            assert [r.id for r in recs] == ["j-killed.1.1", "j-killed.1.2"]
            assert [r.cost_usd for r in recs] == [0.5, 0.25]
            assert {(r.provider, r.product, r.lane, r.funding_window) for r in recs} == {
                ("anthropic", "web", "s-7/0", UNFUNDED)}
            assert f.spend.outbox.count() == 0

    run(main())
