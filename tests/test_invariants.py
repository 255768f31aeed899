"""The invariant checker (chaos/invariants.py) over hand-built records and audit trails.

Each invariant is shown holding on a valid history, then broken by one change to that history
(valid data becoming invalid). The records come from the real protocol functions; the events
are written the way the coordinator and the factory publish them. One test reads a real
``nats-server`` with ``collect``.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from gigafactory.chaos import invariants as inv
from gigafactory.chaos.invariants import Report, check
from gigafactory.schemas import protocol as p
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import FailureClass, Manifest
from gigafactory.schemas.records import EventRecord, JobRecord, Lease

T0 = 1_000.0


def queued(jid: str = "j1", **fields) -> JobRecord:
    rec = JobRecord(id=jid, manifest=Manifest(cwd="w", engine="shell"), body="echo hi\n", source="t",
                    content_hash="h", submitted_at=T0, pool="p", requirements=["engine:shell"],
                    reason="waiting for a factory")
    return msgspec.structs.replace(rec, **fields)


def ev(kind: str, job: str = "j1", epoch: int | None = None, factory: str | None = None,
       stage_from: str | None = None, stage_to: str | None = None, actor: str = "", **data) -> EventRecord:
    return EventRecord(kind=kind, at=T0, job=job, epoch=epoch, factory=factory, actor=actor or factory or "c0",
                       stage_from=stage_from, stage_to=stage_to, data=data)


def submitted(job: str = "j1") -> EventRecord:
    return ev("submitted", job, stage_to="queued", actor="api")


def claimed(epoch: int, factory: str = "f1", job: str = "j1", station: int = 0) -> EventRecord:
    return ev("claimed", job, epoch, factory, "queued", "assigned", station=station)


def started(epoch: int, factory: str = "f1", job: str = "j1") -> EventRecord:
    return ev("started", job, epoch, factory, "assigned", "building")


def finished(epoch: int, factory: str = "f1", stage_to: str = "testing", job: str = "j1") -> EventRecord:
    return ev("finished", job, epoch, factory, "building", stage_to, outcome="passed")


def reaped(new_epoch: int, holder: str = "f1", job: str = "j1", stage_to: str = "queued") -> EventRecord:
    """The reaper's event for an expired lease: kind by retry policy, the *new* epoch."""
    kind = {"queued": "requeue", "dead_letter": "dead_letter", "failed": "fail"}[stage_to]
    return ev(kind, job, new_epoch, None, "building", stage_to, actor="c0", holder=holder, old_epoch=new_epoch - 1)


def shipped_history() -> tuple[dict[str, JobRecord], list[EventRecord]]:
    """j1: submitted, dispatched, claimed by f1 at epoch 1, built, passed, shipped by a human."""
    rec = queued()
    rec = p.claim(rec, "f1", 0, T0 + 1).record
    rec = p.start(rec, "f1", 1, T0 + 2).record
    rec = p.finish(rec, "f1", 1, T0 + 3, failure=None).record
    rec = p.ship(rec, T0 + 4, "alice").record
    events = [
        submitted(),
        ev("dispatched", epoch=0, stage_from="queued", stage_to="queued"),
        claimed(1), started(1), finished(1),
        ev("ship", epoch=1, stage_from="testing", stage_to="shipped", actor="operator"),
    ]
    return {"j1": rec}, events


def reclaimed_history() -> tuple[dict[str, JobRecord], list[EventRecord]]:
    """j1: f1's lease at epoch 1 expires (requeue to epoch 2), f2 claims at epoch 3 and passes;
    f1's late report is refused (fenced)."""
    rec = queued()
    rec = p.claim(rec, "f1", 0, T0).record
    rec = p.start(rec, "f1", 1, T0).record
    rec = p.expire(rec, T0, T0 + 100, 15.0).record
    rec = p.claim(rec, "f2", 1, T0 + 101).record
    rec = p.start(rec, "f2", 3, T0 + 102).record
    rec = p.finish(rec, "f2", 3, T0 + 103, failure=None).record
    events = [
        submitted(), claimed(1), started(1), reaped(2),
        claimed(3, "f2", station=1), started(3, "f2"),
        ev("fenced", epoch=1, factory="f1", held_epoch=1, record_epoch=3),
        finished(3, "f2"),
    ]
    return {"j1": rec}, events


def names(report: Report) -> list[str]:
    return [v.invariant for v in report.violations]


# --- valid histories ----------------------------------------------------------------------------


def test_a_shipped_history_satisfies_every_invariant_and_is_counted():
    jobs, events = shipped_history()

    report = check(jobs, events, submitted={"j1"}, acknowledged={"j1"})

    assert report.ok, report.to_text()
    assert report.counts["claims"] == 1
    assert report.counts["finished"] == 1
    assert report.counts["ship"] == 1
    assert report.counts["stage_shipped"] == 1
    assert report.counts["audit_gaps"] == 0


def test_a_reclaimed_job_with_a_refused_stale_report_is_valid_and_the_refusal_is_counted():
    jobs, events = reclaimed_history()

    report = check(jobs, events, acknowledged={"j1"})

    assert report.ok, report.to_text()
    assert report.counts["fenced"] == 1
    assert report.counts["lease_expired"] == 1
    assert report.counts["claims"] == 2


def test_events_without_a_job_are_ignored():
    jobs, events = shipped_history()
    fleet = EventRecord(kind="factory_up", at=T0, factory="f1", actor="f1")

    report = check(jobs, [fleet, *events])

    assert report.ok
    assert report.counts["events"] == len(events) + 1


# --- no_lost_submission -------------------------------------------------------------------------


def test_an_acknowledged_submission_without_a_record_is_lost():
    jobs, events = shipped_history()

    report = check(jobs, events, acknowledged={"j1", "j2"})

    assert names(report) == ["no_lost_submission"]
    assert report.violations[0].job == "j2"


def test_an_audited_submission_without_a_record_is_lost():
    jobs, events = shipped_history()

    report = check(jobs, [*events, submitted("j9")])

    assert names(report) == ["no_lost_submission"]
    assert report.violations[0].job == "j9"


def test_a_submission_never_acknowledged_may_be_missing_and_is_only_counted():
    jobs, events = shipped_history()

    report = check(jobs, events, submitted={"j1", "j2"}, acknowledged={"j1"})

    assert report.ok
    assert report.counts["submitted_unacknowledged_missing"] == 1


# --- settled ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [Stage.QUEUED, Stage.BLOCKED, Stage.TESTING, Stage.REVIEW,
                                   Stage.SHIPPED, Stage.FAILED, Stage.DEAD_LETTER])
def test_a_job_waiting_with_a_reason_or_terminal_is_settled(stage):
    report = check({"j1": queued(stage=stage, reason="waiting for something")}, [])

    assert report.ok


@pytest.mark.parametrize("stage", [Stage.QUEUED, Stage.BLOCKED, Stage.TESTING, Stage.REVIEW])
def test_a_waiting_job_without_a_reason_is_not_settled(stage):
    report = check({"j1": queued(stage=stage, reason="  ")}, [])

    assert names(report) == ["settled"]
    assert "no reason" in report.violations[0].detail


def test_a_held_job_is_not_settled_once_the_run_quiesced_but_is_while_it_is_live():
    rec = p.start(p.claim(queued(), "f1", 0, T0).record, "f1", 1, T0).record
    events = [submitted(), claimed(1), started(1)]

    quiesced = check({"j1": rec}, events)
    live = check({"j1": rec}, events, allow_in_flight=True)

    assert names(quiesced) == ["settled"]
    assert "still building (holder f1/0, epoch 1)" in quiesced.violations[0].detail
    assert live.ok


def test_only_the_submitted_jobs_are_judged_settled():
    unsettled = queued("j2", reason="")

    assert check({"j2": unsettled}, [], submitted=set()).ok
    assert names(check({"j2": unsettled}, [], submitted={"j2"})) == ["settled"]


# --- single_terminal and shipped_once ------------------------------------------------------------


def test_an_operator_requeue_may_take_a_failed_job_out_and_it_may_end_again():
    rec = p.cancel(queued(), T0, "op").record
    rec = p.operator_requeue(rec, T0 + 1, "op").record
    rec = p.cancel(rec, T0 + 2, "op").record
    events = [submitted(),
              ev("cancel", epoch=1, stage_from="queued", stage_to="failed", actor="operator"),
              ev("requeue", epoch=2, stage_from="failed", stage_to="queued", actor="operator"),
              ev("cancel", epoch=3, stage_from="queued", stage_to="failed", actor="operator")]

    assert check({"j1": rec}, events).ok


def test_a_job_that_ended_and_moves_on_without_a_requeue_breaks_single_terminal():
    jobs, events = shipped_history()
    # The job is cancelled (failed) before its result arrives; the result is then accepted anyway.
    events.insert(4, ev("cancel", epoch=2, stage_from="building", stage_to="failed", actor="operator"))

    report = check(jobs, events)

    assert names(report) == ["stale_write_accepted", "single_terminal"]
    assert "ended by cancel (operator, epoch 2)" in report.violations[0].detail
    assert "moved the job to testing after it ended failed" in report.violations[1].detail


def test_a_submitted_event_stored_after_the_job_shipped_is_its_birth_published_late_not_a_reopen():
    # The intake publishes `submitted` after its write returns; a fast fleet may dispatch, run
    # and ship the job before that publish is stored (seen in a CI-sized load run).
    jobs, events = shipped_history()
    events = [*events[1:], msgspec.structs.replace(events[0], at=T0)]
    for i, e in enumerate(events[:-1]):
        events[i] = msgspec.structs.replace(e, at=T0 + 1 + i)

    report = check(jobs, events, submitted={"j1"}, acknowledged={"j1"})

    assert report.ok, report.to_text()
    assert report.counts["submitted"] == 1 and report.counts["submitted_late"] == 1
    # A `submitted` stamped after the job ended is a move out of its terminal stage.
    late = msgspec.structs.replace(events[-1], at=T0 + 100)
    assert names(check(jobs, [*events[:-1], late])) == ["single_terminal"]
    # So is a second one, whenever it was stamped.
    again = [events[-1], *events[:-1], msgspec.structs.replace(events[-1], at=T0)]
    assert names(check(jobs, again)) == ["single_terminal"]


def test_nothing_takes_a_job_out_of_shipped_not_even_a_requeue():
    jobs, events = shipped_history()
    events.append(ev("requeue", epoch=2, stage_from="shipped", stage_to="queued", actor="operator"))

    assert names(check(jobs, events)) == ["single_terminal"]


def test_a_job_shipped_twice_breaks_shipped_once():
    jobs, events = shipped_history()
    events += [ev("requeue", epoch=2, stage_from="testing", stage_to="queued", actor="operator"),
               claimed(3), started(3), finished(3, stage_to="shipped")]

    report = check(jobs, events)

    assert "shipped_once" in names(report)
    assert "shipped again by event #9 (finished)" in report.violations[names(report).index("shipped_once")].detail


# --- single_report --------------------------------------------------------------------------------


def test_a_result_reported_twice_at_one_epoch_breaks_single_report():
    jobs, events = shipped_history()
    events.insert(5, finished(1))

    report = check(jobs, events)

    assert "single_report" in names(report)
    assert "reported twice at epoch 1" in report.violations[names(report).index("single_report")].detail


def test_a_ship_twice_at_one_epoch_breaks_single_report_and_shipped_once():
    jobs, events = shipped_history()
    events.append(events[-1])

    assert set(names(check(jobs, events))) == {"single_report", "shipped_once", "single_terminal"}


def test_results_at_two_epochs_of_two_leases_are_two_reports_not_a_double_report():
    rec = queued()
    events = [submitted()]
    for epoch, factory, outcome in ((1, "f1", FailureClass.CRASH), (3, "f2", None)):
        rec = p.claim(rec, factory, 0, T0).record
        rec = p.start(rec, factory, epoch, T0).record
        rec = p.finish(rec, factory, epoch, T0, failure=outcome).record
        events += [claimed(epoch, factory), started(epoch, factory),
                   finished(epoch, factory, stage_to=str(rec.stage))]

    report = check({"j1": rec}, events)

    assert report.ok, report.to_text()
    assert report.counts["finished"] == 2


# --- unique_holder and claim_epochs_increase ------------------------------------------------------


def test_two_claims_at_one_epoch_break_unique_holder():
    jobs, events = shipped_history()
    events.insert(3, claimed(1, "f2", station=1))

    report = check(jobs, events)

    # The second claim is the one the audit follows from there on, so f1's writes read as stale too.
    assert names(report) == ["unique_holder", "stale_write_accepted", "stale_write_accepted"]
    assert report.violations[0].detail == "epoch 1 claimed by f1/0 and again by f2/1"


def test_the_same_factory_claiming_one_epoch_twice_also_breaks_unique_holder():
    jobs, events = shipped_history()
    events.insert(3, claimed(1, "f1", station=1))

    assert "unique_holder" in names(check(jobs, events))


def test_claim_epochs_that_go_back_break_claim_epochs_increase():
    jobs, events = reclaimed_history()
    events.insert(6, claimed(2, "f3"))  # after the claim at epoch 3

    report = check(jobs, events)

    assert names(report)[0] == "claim_epochs_increase"
    assert "claim at epoch 2 by f3/0 after a claim at epoch 3" in report.violations[0].detail


# --- stale_write_accepted --------------------------------------------------------------------------


def test_a_result_from_a_stale_epoch_accepted_after_a_reclaim_is_a_stale_write():
    jobs, events = reclaimed_history()
    events[6] = finished(1, "f1")  # the late report was accepted instead of fenced

    report = check(jobs, events)

    assert names(report) == ["stale_write_accepted"]
    assert "latest claim is epoch 3 by f2" in report.violations[0].detail
    assert report.counts["fenced"] == 0


def test_a_result_accepted_after_the_reaper_ended_the_lease_is_a_stale_write():
    # f1's lease expired and the job was requeued at epoch 2; f1's failure report still went in.
    failed = queued(stage=Stage.FAILED, epoch=3, reason="setup_failed: sim")
    events = [submitted(), claimed(1), started(1), reaped(2), finished(1, stage_to="failed")]

    report = check({"j1": failed}, events)

    assert names(report) == ["stale_write_accepted"]
    assert "after that lease was ended by requeue (c0, epoch 2)" in report.violations[0].detail


def test_a_write_by_another_factory_at_the_holders_epoch_is_a_stale_write():
    jobs, events = shipped_history()
    events[3] = started(1, "f2")

    assert names(check(jobs, events)) == ["stale_write_accepted"]


def test_a_holder_write_with_no_claim_before_it_is_a_stale_write():
    jobs, events = shipped_history()
    del events[2]  # the claim

    assert "stale_write_accepted" in names(check(jobs, events))


def test_a_hand_back_ends_the_lease_so_a_later_result_under_it_is_a_stale_write():
    rec = p.hand_back(p.start(p.claim(queued(), "f1", 0, T0).record, "f1", 1, T0).record, "f1", 1, T0, "drain").record
    valid = [submitted(), claimed(1), started(1), ev("handed_back", epoch=1, factory="f1", stage_to="queued")]

    assert check({"j1": rec}, valid).ok
    assert names(check({"j1": rec}, [*valid, finished(1)])) == ["stale_write_accepted"]


# --- record_consistent and audit_well_formed --------------------------------------------------------


@pytest.mark.parametrize("fields, detail", [
    (dict(stage=Stage.BUILDING, lease=None, epoch=1), "without a lease"),
    (dict(stage=Stage.QUEUED, lease=Lease("f1", 0, 1), epoch=1), "still names lease holder f1"),
    (dict(stage=Stage.BUILDING, lease=Lease("f1", 0, 1), epoch=2), "lease of f1 is at epoch 1"),
])
def test_a_lease_outside_the_leased_stages_or_at_another_epoch_is_inconsistent(fields, detail):
    report = check({"j1": queued(**fields)}, [], allow_in_flight=True)

    assert names(report) == ["record_consistent"]
    assert detail in report.violations[0].detail


def test_a_record_under_another_key_is_inconsistent():
    assert names(check({"j2": queued("j1")}, [], submitted=set())) == ["record_consistent"]


def test_a_record_whose_epoch_went_below_a_claimed_epoch_is_inconsistent():
    jobs, events = shipped_history()
    jobs["j1"] = msgspec.structs.replace(jobs["j1"], epoch=0)

    report = check(jobs, events)

    assert names(report) == ["record_consistent"]
    assert "an epoch went backwards" in report.violations[0].detail


def test_a_claim_without_an_epoch_is_malformed():
    jobs, events = shipped_history()
    events[2] = ev("claimed", epoch=None, factory="f1", stage_to="assigned")

    assert "audit_well_formed" in names(check(jobs, events))


# --- audit_matches_record ----------------------------------------------------------------------------


def test_a_record_ahead_of_its_audit_is_counted_and_judged_only_when_asked():
    jobs, events = shipped_history()
    del events[-1]  # the ship landed but its event was never published

    lenient = check(jobs, events)
    strict = check(jobs, events, strict_audit=True)

    assert lenient.ok and lenient.counts["audit_gaps"] == 1
    assert names(strict) == ["audit_matches_record"]
    assert "record is shipped but the audit's last transition says testing" in strict.violations[0].detail


# --- the report ---------------------------------------------------------------------------------------


def test_the_report_renders_as_text_and_json():
    jobs, events = shipped_history()

    report = check(jobs, events, acknowledged={"j1", "j2"})
    text = report.to_text()
    doc = msgspec.json.decode(report.to_json())

    assert not report.ok
    assert text.startswith("invariants: 1 VIOLATION(S)")
    assert "[no_lost_submission] j2: submission was acknowledged but the job has no record" in text
    assert doc["ok"] is False
    assert doc["by_invariant"] == {"no_lost_submission": 1}
    assert doc["violations"] == [{"invariant": "no_lost_submission", "job": "j2",
                                  "detail": "submission was acknowledged but the job has no record"}]
    assert doc["counts"]["claims"] == 1
    assert check(*shipped_history()).to_text().startswith("invariants: OK")


def test_the_report_keeps_a_bounded_number_of_violations_and_counts_the_rest():
    n = inv.MAX_VIOLATIONS + 5
    jobs = {f"j{i}": queued(f"j{i}", reason="") for i in range(n)}

    report = check(jobs, [])

    assert len(report.violations) == inv.MAX_VIOLATIONS
    assert report.counts["violations_dropped"] == 5


# --- collect: a real broker ---------------------------------------------------------------------------


def test_collect_reads_every_record_and_every_event_of_a_real_broker_in_stream_order():
    from gigafactory.broker import Broker
    from gigafactory.config import Settings
    from gigafactory.schemas.records import encode
    from gigafactory.testing import broker_url

    jobs, events = reclaimed_history()
    many = [ev("dispatched", f"k{i}", epoch=0, stage_to="queued") for i in range(300)]  # > one batch

    async def scenario(url: str):
        b = await Broker.open(url, "test-invariants", Settings(request_timeout_s=2.0))
        try:
            empty = await inv.collect(b)
            for jid, rec in jobs.items():
                await b.jobs.create(jid, encode(rec))
            for e in [*events, *many]:
                await b.publish_event(e)
            await b.publish_event(EventRecord(kind="factory_up", at=T0, factory="f1"))
            return empty, await inv.collect(b, batch=128), await inv.collect_timed(b, batch=100), time.time()
        finally:
            await b.close()

    t0 = time.time()
    with broker_url() as url:
        empty, (got_jobs, got_events), timed, t1 = asyncio.run(asyncio.wait_for(scenario(url), timeout=60))

    assert empty == ({}, [])
    # The broker's stamps: one per event, in stream order, from the clock of this machine.
    assert timed[:2] == (got_jobs, got_events)
    stamps = timed[2]
    assert len(stamps) == len(got_events) and stamps == sorted(stamps)
    assert t0 - 1 <= stamps[0] and stamps[-1] <= t1 + 1
    assert got_jobs == jobs
    assert got_events[: len(events)] == events
    assert len(got_events) == len(events) + len(many) + 1
    assert check(got_jobs, got_events, submitted={"j1"}, acknowledged={"j1"}).ok


# --- side effects: the ledger against the broker's timed audit ---------------------------------------


def timed_reclaim() -> tuple[dict[str, JobRecord], list[EventRecord], list[float]]:
    """:func:`reclaimed_history` with broker timestamps: f1 claims epoch 1 at T0+1, the reaper
    takes it at T0+10 (requeue to epoch 2), f2 claims epoch 3 at T0+11 and passes at T0+20."""
    jobs, events = reclaimed_history()
    ts = [T0, T0 + 1, T0 + 2, T0 + 10, T0 + 11, T0 + 12, T0 + 13, T0 + 20]
    assert len(ts) == len(events)
    return jobs, events, ts


def line(epoch: int, phase: str, t: float, job: str = "j1", n: int = 0) -> inv.LedgerLine:
    return inv.LedgerLine(job, epoch, phase, t, n)


def within_leases() -> list[inv.LedgerLine]:
    """f1's run of epoch 1 (cut off by the reaper, so no END) and f2's run of epoch 3."""
    first = [line(1, "start", T0 + 2.1), *(line(1, "progress", T0 + 2.1 + k) for k in range(1, 8))]
    second = [line(3, "start", T0 + 12.1), line(3, "progress", T0 + 15.0), line(3, "END", T0 + 19.0)]
    return [*first, *second]


def judged(lines, *, drop: int | None = None, pauses=(), grace_s: float = 0.0, leftovers=(), problems=()) -> Report:
    """Check :func:`timed_reclaim` with ``lines`` as its ledger (``drop``: leave that event out)."""
    jobs, events, ts = timed_reclaim()
    if drop is not None:
        del events[drop], ts[drop]
    effects = inv.SideEffects(ledger=list(lines), event_ts=ts, pauses=list(pauses), pause_grace_s=grace_s,
                              leftovers=list(leftovers), problems=list(problems))
    return check(jobs, events, side_effects=effects)


def test_side_effects_of_each_epoch_inside_its_lease_satisfy_the_ledger_invariants():
    report = judged(within_leases())

    assert report.ok, report.to_text()
    assert report.counts["ledger_lines"] == 11
    assert report.counts["ledger_jobs"] == 1 and report.counts["ledger_epochs"] == 2
    assert report.counts["ledger_epochs_ended"] == 1
    assert report.counts["side_effects_after_lease_lost"] == 0
    assert report.counts["side_effects_in_pause_window"] == 0
    assert report.allowances == []


def test_a_side_effect_after_the_reaper_took_the_lease_is_a_violation():
    zombie = line(1, "progress", T0 + 10.5, n=42)

    report = judged([*within_leases(), zombie])

    assert names(report) == ["no_side_effect_after_lease_lost"]
    [v] = report.violations
    assert v.job == "j1"
    assert "1 side effect(s) of epoch 1 (held by f1)" in v.detail
    assert "requeue by c0: lease expired" in v.detail and "ledger line 42" in v.detail and "0.500s after" in v.detail
    assert report.counts["side_effects_after_lease_lost"] == 1


def test_an_engine_running_on_beside_the_next_epoch_breaks_both_side_effect_invariants():
    zombie = [line(1, "progress", T0 + 12.5), line(1, "END", T0 + 13.0)]

    report = judged([*within_leases(), *zombie])

    assert sorted(names(report)) == ["no_side_effect_after_lease_lost", "one_epoch_at_a_time"]
    overlap = [v for v in report.violations if v.invariant == "one_epoch_at_a_time"][0]
    assert "epochs 1 and 3 ran side effects at the same time: 2 line(s)" in overlap.detail
    assert report.counts["side_effects_after_lease_lost"] == 2
    assert report.counts["side_effects_overlapping_epochs"] == 2


def test_the_clock_tolerance_is_one_millisecond_either_side_of_the_loss():
    assert inv.CLOCK_TOLERANCE_S == 0.001
    at_loss = T0 + 10

    assert judged([*within_leases(), line(1, "END", at_loss + 0.0005)]).ok
    assert names(judged([*within_leases(), line(1, "END", at_loss + 0.002)])) == ["no_side_effect_after_lease_lost"]


def test_an_epoch_that_starts_twice_ran_its_engine_twice_under_one_lease():
    again = line(3, "start", T0 + 16.0, n=30)

    report = judged([*within_leases(), again])

    assert names(report) == ["one_epoch_at_a_time"]
    assert "epoch 3 started 2 times (ledger lines 0, 30)" in report.violations[0].detail


def test_a_later_claim_ends_the_lease_when_the_reapers_event_is_missing():
    # Without the requeue (an audit gap), f2's claim of epoch 3 at T0+11 is when epoch 1 was gone.
    zombie = line(1, "progress", T0 + 11.5)

    before_claim = judged([*within_leases(), line(1, "progress", T0 + 10.5)], drop=3)
    after_claim = judged([*within_leases(), zombie], drop=3)

    assert before_claim.ok, before_claim.to_text()
    assert names(after_claim) == ["no_side_effect_after_lease_lost"]
    assert "claimed at epoch 3 by f2" in after_claim.violations[0].detail


def test_two_epochs_at_once_are_caught_without_any_broker_time():
    lines = [*within_leases(), line(1, "progress", T0 + 12.5)]
    jobs, _events, _ts = timed_reclaim()

    report = check(jobs, [], submitted=set(), side_effects=inv.SideEffects(ledger=lines, event_ts=[]))

    assert names(report) == ["one_epoch_at_a_time"]


def test_an_operator_cancel_takes_the_lease_of_the_latest_claim():
    rec = p.claim(queued(), "f1", 0, T0).record
    rec = p.cancel(rec, T0 + 5, "operator").record
    events = [submitted(), claimed(1), started(1),
              ev("cancel", epoch=2, stage_from="building", stage_to="failed", actor="operator")]
    ts = [T0, T0 + 1, T0 + 2, T0 + 5]
    lines = [line(1, "start", T0 + 2.1), line(1, "progress", T0 + 4.9)]

    ok = check({"j1": rec}, events, side_effects=inv.SideEffects(ledger=lines, event_ts=ts))
    late = check({"j1": rec}, events, side_effects=inv.SideEffects(ledger=[*lines, line(1, "progress", T0 + 5.2)],
                                                                   event_ts=ts))

    assert ok.ok, ok.to_text()
    assert names(late) == ["no_side_effect_after_lease_lost"]
    assert "cancel by operator" in late.violations[0].detail


def test_a_lease_its_holder_ended_itself_was_not_lost():
    jobs, events = shipped_history()
    ts = [T0 + k for k in range(len(events))]
    lines = [line(1, "start", T0 + 3.1), line(1, "END", T0 + 3.9)]

    report = check(jobs, events, side_effects=inv.SideEffects(ledger=lines, event_ts=ts))

    assert report.ok, report.to_text()


def test_the_labs_pause_window_excuses_a_paused_holders_side_effects_and_reports_them():
    # f1 (started at T0-1, so it claimed epoch 1 at T0+1) was SIGSTOPped at T0+5, resumed at T0+11.
    pause = inv.PauseWindow("f1", since=T0 - 1, start=T0 + 5, end=T0 + 11)
    in_window = [line(1, "progress", T0 + 10.5, n=7), line(1, "progress", T0 + 11.9, n=8)]

    report = judged([*within_leases(), *in_window], pauses=[pause], grace_s=1.0)

    assert report.ok, report.to_text()
    assert report.counts["side_effects_in_pause_window"] == 2  # each line counted once, by both rules
    assert report.counts["pause_windows"] == 1
    [allowed] = report.allowances
    assert allowed.kind == "pause_window" and allowed.job == "j1"
    assert "2 side effect(s) of epoch 1" in allowed.detail and "holder f1 was paused" in allowed.detail
    assert "ledger lines 7..8" in allowed.detail
    text = report.to_text()
    assert "allowed, not judged: 1" in text and "(pause_window) j1" in text
    assert msgspec.json.decode(report.to_json())["allowances"][0]["kind"] == "pause_window"


def test_the_pause_window_ends_a_grace_after_the_resume():
    pause = inv.PauseWindow("f1", since=T0 - 1, start=T0 + 5, end=T0 + 11)

    report = judged([*within_leases(), line(1, "progress", T0 + 12.2)], pauses=[pause], grace_s=1.0)

    assert sorted(names(report)) == ["no_side_effect_after_lease_lost", "one_epoch_at_a_time"]
    assert report.counts["side_effects_in_pause_window"] == 0


@pytest.mark.parametrize("pause", [
    inv.PauseWindow("f2", since=T0 - 1, start=T0 + 5, end=T0 + 11),   # another factory
    inv.PauseWindow("f1", since=T0 + 3, start=T0 + 5, end=T0 + 11),   # a later incarnation of f1
    inv.PauseWindow("f1", since=T0 - 1, start=T0 + 10.8, end=T0 + 11),  # stopped after the line
])
def test_a_pause_excuses_only_its_own_incarnations_leases_while_it_lasts(pause):
    report = judged([*within_leases(), line(1, "progress", T0 + 10.5)], pauses=[pause], grace_s=1.0)

    assert names(report) == ["no_side_effect_after_lease_lost"]
    assert report.allowances == []


def test_a_pause_still_going_at_the_check_excuses_until_the_end():
    pause = inv.PauseWindow("f1", since=T0 - 1, start=T0 + 5, end=None)

    report = judged([*within_leases(), line(1, "progress", T0 + 10.5)], pauses=[pause])

    assert report.ok and report.counts["side_effects_in_pause_window"] == 1


def test_parse_ledger_reads_good_lines_and_names_every_bad_one():
    text = "\n".join([
        "j1 1 start 1000.5",
        "j1 1 progress 1001,25",          # bash's $EPOCHREALTIME in a locale with a decimal comma
        "",
        "j1 1 END",                       # 3 fields
        "j1 one progress 1002.0",
        "j1 1 progress soon",
        "j1 1 finish 1003.0",
        "j1 -1 progress 1003.0",
        "j1 1 progress nan",
        "j1 1 progress " + "9" * inv.LEDGER_MAX_LINE_BYTES,
        "j1 1 END 1004.0",
    ]) + "\n"

    lines, problems = inv.parse_ledger(text, "lab/ledger.txt")

    assert lines == [line(1, "start", 1000.5, n=1), line(1, "progress", 1001.25, n=2), line(1, "END", 1004.0, n=11)]
    assert [pr.split(":")[0] for pr in problems] == [f"lab/ledger.txt line {n}" for n in (4, 5, 6, 7, 8, 9, 10)]
    assert "3 fields, expected 4 (job epoch phase time)" in problems[0]
    assert "epoch 'one' is not an integer" in problems[1]
    assert "time 'soon' is not a number of seconds" in problems[2]
    assert "phase 'finish' is not one of END, progress, start" in problems[3]
    assert "LEDGER_MAX_LINE_BYTES" in problems[6]


def test_an_unreadable_ledger_line_is_a_violation():
    report = judged(within_leases(), problems=["lab/ledger.txt line 4: 3 fields, expected 4"])

    assert names(report) == ["ledger_well_formed"]
    assert report.violations[0].detail == "lab/ledger.txt line 4: 3 fields, expected 4"


def test_an_engine_that_outlived_its_factory_is_a_violation_naming_its_job_and_epoch():
    left = [inv.LeftoverProcess(pid=4242, pgid=4240, cmd="sleep 120", job="j1", epoch=1, factory="f1"),
            inv.LeftoverProcess(pid=4240, pgid=4240, cmd="bash job.sh", job="j1", epoch=1, factory="f1")]

    report = judged(within_leases(), leftovers=left)

    assert names(report) == ["no_leftover_engine", "no_leftover_engine"]
    assert "pid 4242 (process group 4240: sleep 120) of job j1 epoch 1, started by factory f1" in \
        report.violations[0].detail
    assert report.counts["leftover_processes"] == 2 and report.counts["leftover_engines"] == 1


def test_without_side_effects_nothing_about_them_is_judged_or_counted():
    jobs, events = reclaimed_history()

    report = check(jobs, events)

    assert report.ok
    assert "ledger_lines" not in report.counts and report.allowances == []


def test_event_timestamps_must_come_with_every_event():
    jobs, events, ts = timed_reclaim()

    with pytest.raises(AssertionError):
        check(jobs, events, side_effects=inv.SideEffects(ledger=[], event_ts=ts[:-1]))


def test_a_leased_record_not_signed_by_its_holder_breaks_holder_signed():
    """The checker verifies signed holder writes too: a record held by f1 must carry f1's valid
    signature (schemas/signing.py); one signed by another key, or changed after signing, is a
    ``holder_signed`` violation. Without keys (the simulation) nothing is judged."""
    from gigafactory.identity import new_keypair, sign
    from gigafactory.schemas import signing

    seed1, pub1 = new_keypair()
    seed2, pub2 = new_keypair()
    held = queued(stage=Stage.BUILDING, epoch=1, lease=Lease(factory="f1", station=0, epoch=1))
    good = signing.signed(held, pub1, lambda d: sign(seed1, d))
    events = [submitted(), claimed(1), started(1)]
    assert "holder_signed" not in check({"j1": good}, events, allow_in_flight=True,
                                        holder_keys={"f1": pub1}).by_invariant()
    for bad in (signing.signed(held, pub2, lambda d: sign(seed2, d)), msgspec.structs.replace(good, reason="x"), held):
        r = check({"j1": bad}, events, allow_in_flight=True, holder_keys={"f1": pub1})
        assert r.by_invariant().get("holder_signed") == 1, r.to_text()
    assert "holder_signed" not in check({"j1": held}, events, allow_in_flight=True).by_invariant()


def test_the_started_event_of_a_claim_into_building_published_after_a_reclaim_is_the_claims_write():
    """A claim straight into building (claim_started) is one write; its `started` event, published
    after a pause that outlived the lease, names that write, not a new one. A plain `started`
    at the same place is still a stale write, and a `with_claim` one by another holder too."""
    failed = queued(stage=Stage.FAILED, epoch=3, reason="setup_failed: sim")
    late = msgspec.structs.replace(started(1), stage_from=None, stage_to=None, data={"with_claim": True})
    events = [submitted(), claimed(1), reaped(2), late]
    assert "stale_write_accepted" not in names(check({"j1": failed}, events))
    assert "stale_write_accepted" in names(check({"j1": failed}, [submitted(), claimed(1), reaped(2), started(1)]))
    other = msgspec.structs.replace(late, factory="f2")
    assert "stale_write_accepted" in names(check({"j1": failed}, [submitted(), claimed(1), reaped(2), other]))


def claimed_started(epoch: int, factory: str = "f1", job: str = "j1", station: int = 0) -> EventRecord:
    """A claim straight into building, as the factory publishes it: the run's start, no
    `started` event after it."""
    return ev("claimed", job, epoch, factory, "queued", "building", station=station, started=True)


def started_claim_history() -> tuple[dict[str, JobRecord], list[EventRecord]]:
    """j1: claimed straight into building by f1 at epoch 1 (no `started`), passed, shipped."""
    rec = p.claim(queued(), "f1", 0, T0 + 1, start=True).record
    rec = p.finish(rec, "f1", 1, T0 + 3, failure=None).record
    rec = p.ship(rec, T0 + 4, "alice").record
    events = [submitted(), ev("dispatched", epoch=0, stage_from="queued", stage_to="queued"),
              claimed_started(1), finished(1),
              ev("ship", epoch=1, stage_from="testing", stage_to="shipped", actor="operator")]
    return {"j1": rec}, events


def test_a_claim_straight_into_building_is_the_start_and_the_holders_result_after_it_is_valid():
    jobs, events = started_claim_history()
    r = check(jobs, events, strict_audit=True)
    assert r.ok, r.to_text()
    # One claim, one start (the claim's), one result: as the two-write form counts them.
    assert (r.counts["claims"], r.counts["started"], r.counts["finished"]) == (1, 1, 1)
    two_writes = check(*shipped_history(), strict_audit=True)
    assert {k: r.counts[k] for k in ("claims", "started", "finished")} == \
        {k: two_writes.counts[k] for k in ("claims", "started", "finished")}
    # A claim into assigned is not a start (its holder's `started` is).
    assert check(jobs, [submitted(), claimed(1)], allow_in_flight=True).counts["started"] == 0


def test_writes_after_a_claim_straight_into_building_are_judged_against_that_claim():
    jobs, events = started_claim_history()
    # A result by another factory, or at another epoch, is a stale write.
    for bad in (finished(1, factory="f2"), finished(2)):
        r = check(jobs, [*events[:3], bad, *events[4:]])
        assert "stale_write_accepted" in names(r), r.to_text()
    # A result after the reaper took that lease away is one too.
    failed = queued(stage=Stage.FAILED, epoch=3, reason="setup_failed: sim")
    assert "stale_write_accepted" in names(check({"j1": failed}, [submitted(), claimed_started(1), reaped(2),
                                                                 finished(1)]))
    # A second claim of the epoch is a second holder, started or not.
    assert "unique_holder" in names(check(jobs, [*events[:3], claimed_started(1, "f2"), *events[3:]]))


def test_an_older_factorys_started_after_its_claim_into_building_is_accepted_and_counted_once():
    """Records written before the claim became the start: `claimed` (started) then a `started`
    with `with_claim` naming the same write. Still valid, still one start."""
    jobs, events = started_claim_history()
    echo = ev("started", "j1", 1, "f1", with_claim=True)
    r = check(jobs, [*events[:3], echo, *events[3:]], strict_audit=True)
    assert r.ok, r.to_text()
    assert (r.counts["claims"], r.counts["started"]) == (1, 1)
