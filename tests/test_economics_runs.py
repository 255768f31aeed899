"""pipeline_runs: a shipped feature is a row (composite jobs with their children, jobs that say
``feature: true``; cosmetic jobs never), with the seed's columns; every ended job is a
``job_outcomes`` row. Table tests for the rows, and a real fleet (real broker, a real engine
reporting tokens and cost) writing the coordinator's SQLite database."""

from __future__ import annotations

import json

import pytest

from gigafactory.economics import runs as R
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.records import Attribution, AttemptRecord, JobRecord, WorkspaceResult

from helpers import Fleet, eventually, run
from test_usage import _program, usage_engine  # noqa: F401  (a fixture)


def _rec(jid, *, kind="leaf", feature=False, cosmetic=False, parent=None, source="jobs/x.md", submitted=100.0,
         updated=160.0, tokens=(0, 0, 0), cost=0.0, pr=None, stage="shipped") -> JobRecord:
    m = Manifest(kind=kind, feature=feature, cosmetic=cosmetic, parent=parent, engine="shell")
    a = AttemptRecord(attempt=1, epoch=1, factory="f", station=0, started_at=submitted, engine="shell",
                      attribution=Attribution(lane="f/0", job=jid, tokens_in=tokens[0], tokens_out=tokens[1],
                                              tokens_cached=tokens[2], cost_usd=cost),
                      workspace=WorkspaceResult(branch="b", pull_number=pr) if pr else None)
    return JobRecord(id=jid, manifest=m, body="", source=source, content_hash="", submitted_at=submitted,
                     pool="p", requirements=[], stage=stage, attempts=[a], updated_at=updated)


@pytest.mark.parametrize("kw,feature", [
    ({}, False), ({"kind": "composite"}, True), ({"feature": True}, True),
    ({"feature": True, "cosmetic": True}, False), ({"kind": "composite", "cosmetic": True}, False)])
def test_what_counts_as_a_feature(kw, feature):
    assert R.is_feature(_rec("j", **kw)) is feature


def test_a_composites_row_adds_its_children_and_uses_the_ledger_when_it_has_the_job():
    epic = _rec("epic-1", kind="composite", source="api:jobs/epic.md", submitted=100, updated=200, tokens=(10, 0, 0),
                cost=0.5, pr=42)
    child = _rec("c-1", parent="epic", submitted=90, tokens=(30, 10, 0), cost=1.0)
    other = _rec("o-1", parent="elsewhere", tokens=(999, 0, 0))
    row = R.run_row(epic, {j.id: j for j in (epic, child, other)}, ledger={"c-1": (100, 2.0)})
    assert row["feature_slug"] == "epic" and row["spec_path"] == "api:jobs/epic.md" and row["pr_number"] == 42
    assert row["elapsed_seconds"] == 110, "from the first submission (the child's) to the ship"
    assert (row["tokens_total"], row["cost_usd"]) == (110, 2.5), "the ledger's figure for c-1, the record's for epic"
    assert row["features_per_second_per_token"] == pytest.approx(1 / (110 * 110))
    assert json.loads(row["per_role_breakdown"]) == {"none": {"tokens": 110, "cost_usd": 2.5, "jobs": 2}}
    assert row["merged_at"].endswith("+00:00")


def test_no_tokens_means_no_efficiency_figure_not_an_infinite_one():
    row = R.run_row(_rec("j", feature=True), {}, {})
    assert row["tokens_total"] == 0 and row["features_per_second_per_token"] is None


def test_the_database_writes_a_job_once(tmp_path):
    db = R.RunsDB(tmp_path / "r.sqlite")
    row = R.run_row(_rec("j", feature=True, tokens=(5, 5, 0)), {}, {})
    out = R.outcome_row(_rec("j"), {})
    assert db.write([row], [out]) == 1
    assert db.write([row], [out]) == 0, "the replay of a shipped job adds nothing"
    assert [r["job"] for r in db.runs()] == ["j"] and db.outcomes()[0]["latency_s"] == 60


def test_a_fleet_writes_a_row_per_shipped_feature_and_an_outcome_per_ended_job(nats_server, tmp_path,
                                                                              usage_engine):  # noqa: F811
    spend = _program(dict(model="m-1", input_tokens=300, output_tokens=40, cost_usd=0.25, cost_source="reported"))

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("r-1", probe=True)
            feat = await fleet.submit_one(fleet.job(spend, engine="pyusage", review_policy="auto", feature=True,
                                                    tracker_item="WEB-7"), "feat.md")
            cosm = await fleet.submit_one(fleet.job(spend, engine="pyusage", review_policy="auto", feature=True,
                                                    cosmetic=True), "cosm.md")
            fail = await fleet.submit_one(fleet.job("exit 3", review_policy="auto", retry={"max": 0}), "fail.md")
            for j in (feat, cosm):
                await fleet.wait_stage(j, "shipped", timeout_s=30)
            await fleet.wait_stage(fail, "failed", "dead_letter", timeout_s=30)
            db = R.RunsDB(fleet.settings.runs_db)
            outcomes = await eventually(lambda: len(db.outcomes()) == 3 and db.outcomes(), 15,
                                        what="three job outcomes in the coordinator's database")
            [row] = db.runs()
            assert row["job"] == feat and row["feature_slug"] == "WEB-7" and row["spec_path"] == "api:feat.md"
            assert row["tokens_total"] == 340 and row["cost_usd"] == 0.25
            assert row["features_per_second_per_token"] is None or row["features_per_second_per_token"] > 0
            assert {o["stage"] for o in outcomes} == {"shipped", "failed"} or \
                {o["stage"] for o in outcomes} == {"shipped", "dead_letter"}

    run(main())


def test_the_merge_queue_ignores_the_deletion_of_a_key_the_view_never_held():
    """The view tells its listeners (None, None) when a record it never held is deleted (an
    archived job's key): a listener that raised there stopped the coordinator's gf_jobs watch,
    so no job was resolved any more (an archived failed dependency never failed its dependent)."""
    from gigafactory.economics.runs import MergeQueue

    q = MergeQueue()
    q.on_job(None, None)
    assert q.members == set()



def test_the_coordinator_reads_each_spend_record_once_however_many_flushes_write_rows(nats_server, tmp_path):
    """The runs recorder (at each flush that writes a row) and the budget governor (at each
    refresh) once read the whole spend ledger from its start: every job's end re-read every
    record stored before it, a cost per job that grew with the ledger. They now share the
    coordinator's incremental reader: each stored record reaches the coordinator once, and the
    rows still carry the ledger's tokens and dollars."""
    import asyncio

    from gigafactory.broker import Broker
    from gigafactory.economics.ledger import read_raw_spend

    from helpers import fast_settings

    async def main():
        tap = await Broker.open(nats_server.url, "tap", fast_settings())
        delivered: dict[str, int] = {}

        async def count(m):  # a consumer's delivery of a stored record: the stream's ack subject
            if m.subject.startswith("gf.spend.") and (m.reply or "").startswith("$JS.ACK.GF_SPEND."):
                delivered[m.subject] = delivered.get(m.subject, 0) + 1

        await tap.nc.subscribe(">", cb=count)
        try:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                await fleet.add_factory("r-1")
                db = R.RunsDB(fleet.settings.runs_db)
                jobs = []
                for wave in range(4):  # one wave at a time: each ends in a flush of its own
                    job = await fleet.submit_one(fleet.job("echo ok", review_policy="auto"), f"w{wave}.md")
                    await fleet.wait_stage(job, "shipped", timeout_s=30)
                    jobs.append(job)
                    await eventually(lambda: len(db.outcomes()) == len(jobs), 15,
                                     what=f"{len(jobs)} outcomes in the coordinator's database")
                await tap.nc.flush()
                await asyncio.sleep(0)  # deliveries already in our socket are counted
                seen = dict(delivered)  # before this test's own read below (the tap sees it too)
                stored = await read_raw_spend(tap)
                assert len(stored) >= 4, "every attempt writes a spend record"
                assert seen, "the coordinator read the ledger (its rows need it)"
                again = {s: n for s, n in seen.items() if n > 1}
                assert not again, f"spend records the coordinator read more than once: {again}"
                outcome = {o["job"]: o for o in db.outcomes()}
                assert set(outcome) == set(jobs)
        finally:
            await tap.close()

    run(main())
