"""The spend ledger (``GF_SPEND``): records with full attribution, one per id however often a
record is stored, deltas from cumulative totals, and attribution coverage. Pure tables for the
arithmetic; a real nats-server for the stream."""

from __future__ import annotations

import time

import msgspec
import pytest

from gigafactory.broker import Broker
from gigafactory.economics.ledger import publish_spend, read_raw_spend, read_spend, spend_subject
from gigafactory.schemas.spend import (
    UNFUNDED,
    SeatCostError,
    SpendRecord,
    attempt_record_id,
    coverage,
    parse_seat_costs,
    with_deltas,
)

from helpers import fast_settings, run


def rec(job="j1", epoch=1, seq=1, cost=0.0, tokens_in=0, kind="usage", at=100.0, **kw) -> SpendRecord:
    base = dict(lane="f1/0", lane_kind="live", funding_window=UNFUNDED, product="default", engine="claude",
                provider="anthropic", model="claude-sonnet-4")
    base.update(kw)
    return SpendRecord(id=attempt_record_id(job, epoch, seq), kind=kind, at=at, job=job, epoch=epoch, seq=seq,
                       cost_usd=cost, tokens_input=tokens_in, cost_source="priced", **base)


def test_deltas_count_every_dollar_once_with_duplicates_and_a_lost_middle_record():
    records = [rec(seq=1, cost=0.10, tokens_in=100), rec(seq=1, cost=0.10, tokens_in=100),  # a replay
               rec(seq=3, cost=0.50, tokens_in=500, kind="final"),  # seq 2 lost
               rec(job="j2", seq=1, cost=1.0), rec(job="j1", epoch=2, seq=1, cost=0.25)]
    out = with_deltas(records)
    assert [r.id for r in out] == ["j1.1.1", "j1.1.3", "j2.1.1", "j1.2.1"]
    assert [round(r.cost_usd, 6) for r in out] == [0.10, 0.40, 1.0, 0.25]
    assert [r.tokens_input for r in out] == [100, 400, 0, 0]
    assert round(sum(r.cost_usd for r in out), 6) == 1.75


def test_a_total_that_goes_down_adds_nothing_rather_than_a_negative_amount():
    out = with_deltas([rec(seq=1, cost=0.5), rec(seq=2, cost=0.2)])
    assert [r.cost_usd for r in out] == [0.5, 0.0]


def test_coverage_lists_a_record_that_breaks_attribution():
    good = rec(seq=1, cost=1.0)
    bad = rec(job="j2", seq=1, cost=2.0, provider=None, funding_window="")
    cov = coverage([good, bad])
    assert cov.records == 2 and cov.attributed_records == 1 and cov.ratio == 0.5
    assert cov.broken == [{"id": "j2.1.1", "missing": ["funding_window", "provider"]}]
    assert cov.unfunded_cost_usd == 1.0 and cov.attributed_cost_usd == 1.0
    assert coverage([good]).ratio == 1.0


@pytest.mark.parametrize("text, want", [
    ("claude=200/month", {"claude": 200 / (30 * 86400)}),
    ("claude=200/month, codex=0.5/hour", {"claude": 200 / (30 * 86400), "codex": 0.5 / 3600}),
    ("", {}),
])
def test_seat_costs_parse(text, want):
    assert parse_seat_costs(text) == pytest.approx(want)


@pytest.mark.parametrize("text, says", [
    ("claude=200", "not engine=amount/period"),
    ("claude=200/week", "period 'week'"),
    ("claude=1/hour,claude=2/hour", "given twice"),
    ("claude=-1/hour", "not engine=amount/period"),
    ("x" * 2001, "at most 2000"),
])
def test_seat_costs_refused_with_the_entry_named(text, says):
    with pytest.raises(SeatCostError, match=says):
        parse_seat_costs(text)


def test_a_record_replayed_is_stored_once_and_read_once(nats_server):
    async def go():
        b = await Broker.open(nats_server.url, "t", fast_settings())
        try:
            await b.ensure_layout()
            r1 = rec(seq=1, cost=0.1, at=10.0)
            await publish_spend(b, r1)
            await publish_spend(b, r1)  # a retry whose reply was lost: the stream stores it once
            await publish_spend(b, rec(seq=2, cost=0.3, at=20.0, kind="final"))
            assert len(await read_raw_spend(b)) == 2
            got = await read_spend(b)
            assert [round(r.cost_usd, 6) for r in got] == [0.1, 0.2]
            assert [r.id for r in await read_spend(b, since_s=15.0)] == ["j1.1.2"]
            assert [r.id for r in await read_spend(b, until_s=15.0)] == ["j1.1.1"]
        finally:
            await b.close()

    run(go())


def test_the_ledger_stream_is_bounded_by_its_settings_and_a_coordinator_applies_new_ones(nats_server):
    async def go():
        b = await Broker.open(nats_server.url, "t", fast_settings(spend_max_bytes=10 * 1024**2))
        try:
            await b.ensure_layout()
            cfg = (await b.js.stream_info("GF_SPEND")).config
            assert (cfg.max_bytes, cfg.max_age, cfg.duplicate_window) == (10 * 1024**2, 400 * 86400.0, 86400.0)
            assert cfg.subjects == ["gf.spend.>"] and cfg.discard == "old"
            b.settings.spend_max_bytes, b.settings.spend_max_age_s = 20 * 1024**2, 30 * 86400.0
            changes = await b.apply_limits()
            assert changes["GF_SPEND"] == {"max_bytes": 20 * 1024**2, "max_age": 30 * 86400.0}
        finally:
            await b.close()

    run(go())


@pytest.mark.parametrize("env, says", [
    ({"GIGAFACTORY_LANE_KIND": "batch"}, "GIGAFACTORY_LANE_KIND='batch'"),
    ({"GIGAFACTORY_SEAT_COSTS": "claude=20/week"}, "GIGAFACTORY_SEAT_COSTS: 'claude=20/week': period 'week'"),
    ({"GIGAFACTORY_SEAT_COST_INTERVAL_S": "5"}, "GIGAFACTORY_SEAT_COST_INTERVAL_S=5"),
    ({"GIGAFACTORY_SPEND_MAX_BYTES": "0"}, "GIGAFACTORY_SPEND_MAX_BYTES=0"),
    ({"GIGAFACTORY_SPEND_METRICS_INTERVAL_S": "1"}, "GIGAFACTORY_SPEND_METRICS_INTERVAL_S=1"),
])
def test_ledger_settings_that_would_misattribute_or_drop_spend_are_refused(env, says):
    from gigafactory.config import Settings, SettingsError

    with pytest.raises(SettingsError, match="invalid ledger settings") as e:
        Settings.from_env(env).validate()
    assert says in str(e.value)


def _fixed(fid: str, cost: float, at: float) -> SpendRecord:
    return SpendRecord(id=fid, kind="fixed", at=at, lane="f1/0", lane_kind="live", funding_window="q4", factory="f1",
                       product="fleet", engine="claude", provider="anthropic", model="seat", cost_usd=cost,
                       cost_source="fixed")


DAY = 86400.0
STORED = [  # as stored: replays, a lost middle record (j1 seq 2), two days, two models, a fixed cost, a broken record
    rec(seq=1, cost=0.1, at=DAY * 300 + 10), rec(seq=1, cost=0.1, at=DAY * 300 + 10),
    rec(seq=3, cost=0.5, at=DAY * 300 + 30, kind="final"),
    rec(job="j2", seq=1, cost=0.2, at=DAY * 301 + 5, model="claude-opus-4"),
    rec(job="j2", seq=2, cost=0.7, at=DAY * 301 + 50, model="claude-opus-4", kind="final"),
    _fixed("fixed.f1.claude.0.1", 2.5, DAY * 300), _fixed("fixed.f1.claude.0.1", 2.5, DAY * 300),
    rec(job="j3", seq=1, cost=0.05, at=DAY * 301 + 9, lane=""),
]


def _lines():
    from gigafactory.economics.invoices import parse_invoice

    month = time.strftime("%Y-%m", time.gmtime(DAY * 300))
    day2 = time.strftime("%Y-%m-%d", time.gmtime(DAY * 301))
    csv = (f"period,model,tokens,amount\n{month},claude-sonnet-4,,0.4\n{day2},claude-opus-4,,0.6\n"
           f"{month},claude-opus-4,,0.3\n").encode()
    return parse_invoice(csv, "inv.csv", "anthropic")


def test_running_totals_give_the_whole_ledgers_coverage_and_invoice_drift():
    """LedgerTotals, fed the stored records one at a time, gives what coverage() and reconcile()
    give over the deduplicated deltas of the whole ledger; each split of the stream gives the same."""
    from gigafactory.economics.invoices import reconcile
    from gigafactory.economics.ledger import LedgerTotals

    full = with_deltas(STORED)
    want_cov, want = coverage(full), reconcile(_lines(), full)
    for split in range(len(STORED) + 1):
        t = LedgerTotals()
        for r in STORED[:split]:
            t.add(r)
        for r in STORED[split:]:
            t.add(r)
        cov = t.coverage()
        assert (cov.records, cov.attributed_records) == (want_cov.records, want_cov.attributed_records)
        assert round(cov.cost_usd, 9) == round(want_cov.cost_usd, 9) == 3.75
        assert round(cov.unfunded_cost_usd, 9) == round(want_cov.unfunded_cost_usd, 9)
        assert [b["id"] for b in cov.broken] == [b["id"] for b in want_cov.broken] == ["j3.1.1"]
        got = reconcile(_lines(), t.day_records())
        assert [(d.provider, d.model, d.billed_usd, d.ledger_usd, d.drift_usd) for d in got.drift] == \
               [(d.provider, d.model, d.billed_usd, d.ledger_usd, d.drift_usd) for d in want.drift]
        assert got.matched_usd == want.matched_usd and got.unmatched_lines_count == want.unmatched_lines_count == 1


def test_the_ledger_pass_reads_only_what_was_stored_since_and_a_restart_reads_it_all_once(nats_server):
    from gigafactory.economics.invoices import reconcile, store_lines
    from gigafactory.economics.ledger import LedgerPass

    async def go():
        b = await Broker.open(nats_server.url, "t", fast_settings())
        try:
            await b.ensure_layout()
            await store_lines(b, _lines())
            for r in STORED[:5]:
                await b.js.publish(spend_subject(r), msgspec.json.encode(r))  # no Nats-Msg-Id: replays are stored
            p = LedgerPass(b)
            await p.run_pass()
            assert p.read_last_pass == 5 and p.position == 5
            await p.run_pass()
            assert p.read_last_pass == 0, "nothing new: nothing read"
            for r in STORED[5:]:
                await b.js.publish(spend_subject(r), msgspec.json.encode(r))
            await p.run_pass()
            assert p.read_last_pass == 3, "only the records stored since the last pass"

            full = with_deltas(await read_raw_spend(b))
            cov, rec_ = coverage(full), reconcile(_lines(), full)
            want_drift = {(d.provider, d.model): (d.drift_usd, d.drift_ratio) for d in rec_.drift}
            assert p.coverage_ratio == cov.ratio < 1 and p.unfunded_usd == cov.unfunded_cost_usd
            assert p.drift == want_drift and len(want_drift) == 2

            again = LedgerPass(b)  # a coordinator started again: reads the stream once from the start
            await again.run_pass()
            assert again.read_last_pass == 8
            assert (again.coverage_ratio, again.unfunded_usd, again.drift) == (p.coverage_ratio, p.unfunded_usd, p.drift)
        finally:
            await b.close()

    run(go())


def test_running_totals_give_the_runs_recorder_and_the_governor_what_a_whole_read_gives():
    """Per job tokens and dollars (the runs recorder's rows), a day's spend and the finished
    attempts' costs by profile and engine (the governor's), fed one stored record at a time,
    equal what the whole deduplicated ledger gives, replays and a lost record included."""
    from gigafactory.economics.ledger import LedgerTotals
    from gigafactory.economics.runs import ledger_by_job

    stored = STORED + [rec(job="j4", seq=1, cost=0.3, at=DAY * 301 + 60, profile="p", kind="final"),
                       rec(job="j5", seq=1, cost=0.4, at=DAY * 301 + 70, profile="p", kind="final"),
                       rec(job="j5", seq=1, cost=0.4, at=DAY * 301 + 70, profile="p", kind="final")]  # a replay
    full = with_deltas(stored)
    t = LedgerTotals()
    for r in stored:
        t.add(r)
    assert dict(t.jobs) == ledger_by_job(full) and set(t.jobs) == {"j1", "j2", "j3", "j4", "j5"}
    for day in (300, 301):
        want = sum(r.cost_usd for r in full if DAY * day <= r.at < DAY * (day + 1))
        assert round(t.spent_on_day_usd(DAY * day + 3600), 9) == round(want, 9) > 0
    assert t.spent_on_day_usd(DAY * 302) == 0
    finished = t.finished_attempts(since_s=0)
    assert sorted((p, e, round(c, 9)) for p, e, c in finished) == [
        ("", "claude", 0.5), ("", "claude", 0.7), ("p", "claude", 0.3), ("p", "claude", 0.4)]
    assert [c for p, _e, c in finished if p == "p"] == [0.3, 0.4], "newest last"
    assert t.finished_attempts(since_s=DAY * 301) == [(p, e, c) for p, e, c in finished if c != 0.5]


def test_a_jobs_totals_are_kept_for_the_latest_jobs_only():
    from gigafactory.economics.ledger import LedgerTotals

    t = LedgerTotals(attempts_max=3)
    for i in range(5):
        t.add(rec(job=f"j{i}", seq=1, cost=1.0 + i))
    assert list(t.jobs) == ["j2", "j3", "j4"] and t.jobs["j4"] == (0, 5.0)
    assert len(t.last) == 3
