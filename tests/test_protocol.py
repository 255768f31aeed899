"""The claim protocol as pure functions over job records (schemas/protocol.py).

No broker here: each function gets the record as read and returns the record to write back
with a compare-and-set. The broker half of the protocol is tested against a real server
elsewhere.
"""

from __future__ import annotations

import msgspec
import pytest

from gigafactory.schemas import protocol as p
from gigafactory.schemas.lifecycle import Event, IllegalTransition, Stage
from gigafactory.schemas.manifest import FailureClass, Reviewers, parse_job_text
from gigafactory.schemas.records import MAX_ATTEMPTS_KEPT, Attribution, JobRecord, Lease

T0 = 1_000.0


def record(front: str = "", **fields) -> JobRecord:
    """A queued job record whose manifest is ``engine: shell`` and ``cwd: x`` plus ``front``."""
    parsed = parse_job_text(f"---\nengine: shell\ncwd: x\n{front}---\necho hi\n", "jobs/t.md")
    rec = JobRecord(
        id="job-1",
        manifest=parsed.manifest,
        body=parsed.body,
        source="jobs/t.md",
        content_hash=parsed.content_hash,
        submitted_at=T0,
        pool="any",
        requirements=list(parsed.manifest.requirements()),
    )
    return msgspec.structs.replace(rec, **fields)


def building(front: str = "", factory: str = "f1", station: int = 0, **fields) -> JobRecord:
    """A job claimed by ``factory`` and started: the holder is at ``rec.epoch``."""
    claimed = p.claim(record(front, **fields), factory, station, T0 + 1).record
    return p.start(claimed, factory, claimed.epoch, T0 + 2).record


# --- claim -----------------------------------------------------------------------------------


def test_claim_moves_queued_to_assigned_bumping_epoch_and_attempt_and_setting_the_lease():
    rec = record(epoch=4, attempt=1)

    out = p.claim(rec, "f1", 2, T0 + 5)

    assert (out.stage_from, out.event, out.record.stage) == (Stage.QUEUED, Event.CLAIM, Stage.ASSIGNED)
    assert out.record.epoch == 5
    assert out.record.attempt == 2
    assert out.record.lease == Lease(factory="f1", station=2, epoch=5)
    assert out.record.updated_at == T0 + 5
    assert out.record.backoff_s == 0.0
    assert out.reason == "claimed by f1/2"
    last = out.record.attempts[-1]
    assert (last.attempt, last.epoch, last.factory, last.station, last.started_at) == (2, 5, "f1", 2, T0 + 5)
    assert last.outcome == "running"
    assert rec.stage is Stage.QUEUED and rec.lease is None  # the input is not changed


@pytest.mark.parametrize("stage", [s for s in Stage if s is not Stage.QUEUED])
def test_claim_of_a_job_that_is_not_queued_raises_not_claimable(stage):
    with pytest.raises(p.NotClaimable, match=f"job job-1 is {stage.value}, not queued"):
        p.claim(record(stage=stage), "f1", 0, T0)


def test_two_claims_of_the_same_read_produce_the_same_epoch_so_only_one_cas_can_win():
    rec = record()

    a = p.claim(rec, "f1", 0, T0).record
    b = p.claim(rec, "f2", 0, T0).record

    # Both would write epoch 1 on the same revision; the broker lets exactly one through, and
    # the loser re-reading finds an assigned job it cannot claim.
    assert a.epoch == b.epoch == 1
    with pytest.raises(p.NotClaimable):
        p.claim(a, "f2", 0, T0)


def test_the_attempt_history_is_bounded():
    rec = record(attempts=[])
    for i in range(MAX_ATTEMPTS_KEPT + 5):
        claimed = p.claim(rec, "f1", 0, T0 + i).record
        rec = p.hand_back(claimed, "f1", claimed.epoch, T0 + i, "draining").record

    assert len(rec.attempts) == MAX_ATTEMPTS_KEPT
    assert rec.attempts[-1].epoch == rec.epoch - 1


# --- fencing ---------------------------------------------------------------------------------


def test_check_fence_passes_the_holder_at_its_epoch():
    rec = building()

    assert p.check_fence(rec, rec.id, "f1", rec.epoch) is rec


def test_check_fence_refuses_another_factory():
    rec = building()

    with pytest.raises(p.Fenced, match="f2 holds stale epoch"):
        p.check_fence(rec, rec.id, "f2", rec.epoch)


def test_check_fence_refuses_a_stale_epoch():
    rec = building()

    with pytest.raises(p.Fenced) as caught:
        p.check_fence(rec, rec.id, "f1", rec.epoch - 1)
    assert caught.value.held_epoch == rec.epoch - 1
    assert caught.value.record is rec


def test_check_fence_refuses_a_stage_without_a_lease():
    rec = building()
    passed = p.finish(rec, "f1", rec.epoch, T0 + 3, failure=None).record  # testing; lease dropped
    still_leased_but_testing = msgspec.structs.replace(passed, lease=rec.lease, epoch=rec.epoch)

    with pytest.raises(p.Fenced):
        p.check_fence(still_leased_but_testing, rec.id, "f1", rec.epoch)
    with pytest.raises(p.Fenced):
        p.check_fence(passed, rec.id, "f1", rec.epoch)


def test_check_fence_refuses_a_job_that_is_gone():
    with pytest.raises(p.Fenced, match="record is at gone"):
        p.check_fence(None, "job-1", "f1", 1)


def test_renew_restamps_the_record_for_the_holder_only():
    rec = building()

    renewed = p.renew(rec, "f1", rec.epoch, T0 + 30)

    assert renewed.updated_at == T0 + 30
    assert renewed.lease is not None and renewed.lease.renewals == 1
    assert (renewed.stage, renewed.epoch) == (rec.stage, rec.epoch)
    with pytest.raises(p.Fenced):
        p.renew(rec, "f1", rec.epoch + 1, T0 + 30)


def test_start_moves_assigned_to_building_under_the_fence():
    claimed = p.claim(record(), "f1", 3, T0).record

    out = p.start(claimed, "f1", claimed.epoch, T0 + 1)

    assert (out.stage_from, out.record.stage) == (Stage.ASSIGNED, Stage.BUILDING)
    assert out.record.epoch == claimed.epoch
    assert out.reason == "running on f1/3"
    with pytest.raises(p.Fenced):
        p.start(claimed, "f2", claimed.epoch, T0 + 1)


# --- finish: passed --------------------------------------------------------------------------


def test_finish_passed_goes_to_testing_under_the_manual_policy():
    rec = building()

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=None, exit_code=0, verify_exit_code=0, log="logs/x")

    assert (out.event, out.record.stage) == (Event.VERIFIED, Stage.TESTING)
    assert out.record.lease is None
    last = out.record.attempts[-1]
    assert (last.outcome, last.ended_at, last.exit_code, last.verify_exit_code, last.log) == (
        "passed", T0 + 10, 0, 0, "logs/x",
    )
    assert last.attribution.lane == "f1/0" and last.attribution.job == "job-1"


def test_finish_passed_goes_to_review_when_the_policy_names_reviewers():
    rec = building("review-policy: {reviewers: ['@alice', '@bob']}\n")
    assert rec.manifest.review_policy == Reviewers(reviewers=["@alice", "@bob"])

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=None)

    assert (out.event, out.record.stage) == (Event.NEEDS_REVIEW, Stage.REVIEW)
    assert out.reason == "verify passed; waiting for @alice, @bob"
    assert out.record.lease is None


def test_finish_passed_ships_at_once_under_the_auto_policy():
    rec = building("review-policy: auto\n")

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=None)

    assert (out.stage_from, out.event, out.record.stage) == (Stage.BUILDING, Event.SHIP, Stage.SHIPPED)
    assert "review-policy auto" in out.reason


def test_finish_keeps_the_attribution_it_is_given():
    rec = building()
    spend = Attribution(lane="f1/0", job="job-1", provider="anthropic", tokens_in=10, cost_usd=0.5)

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=None, attribution=spend)

    assert out.record.attempts[-1].attribution == spend


def test_finish_by_a_fenced_holder_is_refused():
    rec = building()
    cancelled = p.cancel(rec, T0 + 5, "ops").record

    with pytest.raises(p.Fenced):
        p.finish(cancelled, "f1", rec.epoch, T0 + 10, failure=None)


# --- finish: failed --------------------------------------------------------------------------


def test_a_retried_failure_requeues_with_exponential_backoff():
    rec = building("retry: {max: 3, backoff: 10s}\n")
    backoffs = []
    for i in range(3):
        out = p.finish(rec, "f1", rec.epoch, T0 + 10 * i, failure=FailureClass.CRASH, detail="exit 1")
        assert (out.event, out.record.stage) == (Event.REQUEUE, Stage.QUEUED)
        assert out.record.lease is None
        assert out.record.last_failure is FailureClass.CRASH
        assert out.record.retries_used == i + 1
        assert out.record.epoch == rec.epoch + 1
        assert out.record.attempts[-1].outcome == "crash"
        backoffs.append(out.record.backoff_s)
        claimed = p.claim(out.record, "f1", 0, T0 + 10 * i + 1).record
        rec = p.start(claimed, "f1", claimed.epoch, T0 + 10 * i + 2).record

    assert backoffs == [10.0, 20.0, 40.0]
    assert rec.attempt == 4


def test_backoff_is_capped_at_one_hour():
    rec = building("retry: {max: 50, backoff: 30m}\n", retries_used=5)

    assert p.retry_backoff_s(rec) == p.BACKOFF_CAP_S == 3600.0


def test_a_rate_limited_retry_waits_the_providers_retry_after_when_known():
    rec = building("retry: {max: 3, backoff: 10s}\n")

    told = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=FailureClass.RATE_LIMITED, detail="429",
                    retry_after_s=42.5)
    unknown = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=FailureClass.RATE_LIMITED, detail="429")

    assert (told.event, told.record.stage, told.record.backoff_s) == (Event.REQUEUE, Stage.QUEUED, 42.5)
    assert "retry-after" in told.reason
    assert unknown.record.backoff_s == 10.0  # the policy's back-off


def test_retry_after_is_ignored_for_other_classes_and_bounded():
    rec = building("retry: {max: 3, backoff: 10s}\n")

    assert p.failure_backoff_s(rec, FailureClass.CRASH, 42.5) == 10.0
    assert p.failure_backoff_s(rec, FailureClass.RATE_LIMITED, 10 * 86400) == p.BACKOFF_CAP_S
    assert p.failure_backoff_s(rec, FailureClass.RATE_LIMITED, -1) == 10.0
    assert p.failure_backoff_s(rec, FailureClass.RATE_LIMITED, float("nan")) == 10.0
    assert p.failure_backoff_s(rec, FailureClass.RATE_LIMITED, 0) == 0.0


def test_rate_limited_and_auth_failed_are_retried_by_default():
    rec = building()

    for cls in (FailureClass.RATE_LIMITED, FailureClass.AUTH_FAILED):
        out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=cls, detail="refused")
        assert (out.event, out.record.stage) == (Event.REQUEUE, Stage.QUEUED), cls


def test_a_failure_class_not_in_retry_on_fails_the_job():
    rec = building("retry: {on: [crash]}\n")

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=FailureClass.VERIFY_FAILED, detail="make test: 2")

    assert (out.event, out.record.stage) == (Event.FAIL, Stage.FAILED)
    assert out.record.retries_used == 0
    assert out.record.epoch == rec.epoch + 1
    assert "retry.on does not include verify_failed" in out.reason


def test_budget_exceeded_is_not_retried_by_default():
    rec = building()

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=FailureClass.BUDGET_EXCEEDED)

    assert out.record.stage is Stage.FAILED


def test_a_failure_with_retries_exhausted_goes_to_dead_letter():
    rec = building("retry: {max: 2}\n", retries_used=2)

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=FailureClass.TIMEOUT, detail="30m")

    assert (out.event, out.record.stage) == (Event.DEAD_LETTER, Stage.DEAD_LETTER)
    assert out.record.lease is None
    assert out.record.epoch == rec.epoch + 1
    assert "retries exhausted: 2 of 2 used" in out.reason


def test_retry_max_zero_means_one_attempt_only():
    rec = building("retry: {max: 0}\n")

    out = p.finish(rec, "f1", rec.epoch, T0 + 10, failure=FailureClass.CRASH)

    assert out.record.stage is Stage.DEAD_LETTER


def test_a_setup_failure_before_start_follows_the_retry_policy_from_assigned():
    claimed = p.claim(record("retry: {on: [setup_failed]}\n"), "f1", 0, T0).record

    out = p.finish(claimed, "f1", claimed.epoch, T0 + 1, failure=FailureClass.SETUP_FAILED, detail="no cwd")

    assert (out.stage_from, out.record.stage) == (Stage.ASSIGNED, Stage.QUEUED)


# --- expire ----------------------------------------------------------------------------------


def test_expire_leaves_a_live_lease_alone():
    rec = building()

    assert p.expire(rec, record_ts=T0, broker_now=T0 + 30, lease_ttl_s=30) is None
    assert p.expire(rec, record_ts=T0, broker_now=T0 + 10, lease_ttl_s=30) is None


def test_expire_ignores_stages_without_a_lease():
    for stage in (Stage.QUEUED, Stage.TESTING, Stage.REVIEW, Stage.SHIPPED, Stage.FAILED):
        assert p.expire(record(stage=stage), record_ts=T0, broker_now=T0 + 999, lease_ttl_s=30) is None


def test_an_expired_lease_is_requeued_with_a_bumped_epoch_so_the_old_holder_is_fenced():
    rec = building()

    out = p.expire(rec, record_ts=T0, broker_now=T0 + 31, lease_ttl_s=30)

    assert out is not None
    assert (out.event, out.record.stage) == (Event.REQUEUE, Stage.QUEUED)
    assert out.record.epoch == rec.epoch + 1
    assert out.record.lease is None
    assert out.record.last_failure is FailureClass.LEASE_EXPIRED
    assert out.record.retries_used == 1
    assert out.record.backoff_s == 5.0
    assert out.record.attempts[-1].outcome == "lease_expired"
    assert "31.0s since last renewal > 30s" in out.reason
    with pytest.raises(p.Fenced):
        p.finish(out.record, "f1", rec.epoch, T0 + 32, failure=None)


def test_an_expired_lease_with_retries_exhausted_is_dead_lettered():
    rec = building("retry: {max: 1}\n", retries_used=1)

    out = p.expire(rec, record_ts=T0, broker_now=T0 + 100, lease_ttl_s=30)

    assert out is not None
    assert (out.event, out.record.stage) == (Event.DEAD_LETTER, Stage.DEAD_LETTER)
    assert out.record.epoch == rec.epoch + 1


def test_two_reapers_deciding_on_the_same_read_write_the_same_record():
    # Either one's compare-and-set wins; the loser's re-read finds a queued job and does nothing.
    rec = building()

    a = p.expire(rec, T0, T0 + 60, 30)
    b = p.expire(rec, T0, T0 + 60, 30)

    assert a is not None and b is not None and a.record == b.record
    assert p.expire(a.record, T0 + 60, T0 + 200, 30) is None


# --- hand back, cancel, fail, operator requeue, ship, deps ------------------------------------


def test_hand_back_requeues_without_consuming_a_retry():
    rec = building(retries_used=1)

    out = p.hand_back(rec, "f1", rec.epoch, T0 + 5, "lock busy", backoff_s=2.0)

    assert (out.event, out.record.stage) == (Event.REQUEUE, Stage.QUEUED)
    assert out.record.retries_used == 1
    assert out.record.attempt == rec.attempt - 1
    assert out.record.epoch == rec.epoch + 1
    assert out.record.lease is None
    assert out.record.backoff_s == 2.0
    assert out.record.attempts[-1].outcome == "handed_back"
    assert out.reason == "handed back by f1: lock busy"


def test_hand_back_by_a_stale_holder_is_refused():
    rec = building()

    with pytest.raises(p.Fenced):
        p.hand_back(rec, "f1", rec.epoch - 1, T0 + 5, "draining")


def test_cancel_bumps_the_epoch_so_the_old_holder_is_fenced():
    rec = building()

    out = p.cancel(rec, T0 + 5, "alice", "wrong repo")

    assert (out.event, out.record.stage) == (Event.CANCEL, Stage.FAILED)
    assert out.record.epoch == rec.epoch + 1
    assert out.record.lease is None
    assert out.reason == "cancelled by alice: wrong repo"
    with pytest.raises(p.Fenced):
        p.renew(out.record, "f1", rec.epoch, T0 + 6)


def test_a_shipped_job_cannot_be_cancelled_or_requeued():
    shipped = record(stage=Stage.SHIPPED)

    with pytest.raises(IllegalTransition):
        p.cancel(shipped, T0, "alice")
    with pytest.raises(IllegalTransition):
        p.operator_requeue(shipped, T0, "alice")


def test_fail_ends_a_job_that_has_not_run():
    out = p.fail(record(stage=Stage.BLOCKED), T0, "dependency job-0 failed")

    assert (out.event, out.record.stage) == (Event.FAIL, Stage.FAILED)
    assert out.record.epoch == 1
    assert out.reason == "dependency job-0 failed"


def test_operator_requeue_resets_retries_and_backoff():
    dead = record(stage=Stage.DEAD_LETTER, retries_used=2, backoff_s=40.0, epoch=7)

    out = p.operator_requeue(dead, T0, "alice")

    assert (out.event, out.record.stage) == (Event.REQUEUE, Stage.QUEUED)
    assert out.record.retries_used == 0
    assert out.record.backoff_s == 0.0
    assert out.record.epoch == 8
    assert out.reason == "requeued by alice"


def test_operator_requeue_of_a_running_job_fences_its_holder():
    rec = building()

    out = p.operator_requeue(rec, T0 + 5, "alice")

    with pytest.raises(p.Fenced):
        p.finish(out.record, "f1", rec.epoch, T0 + 6, failure=None)


def test_ship_is_the_human_gate_from_testing_or_review_only():
    for stage in (Stage.TESTING, Stage.REVIEW):
        out = p.ship(record(stage=stage), T0, "alice")
        assert out.record.stage is Stage.SHIPPED
        assert out.reason == "shipped by alice"
    with pytest.raises(IllegalTransition):
        p.ship(record(stage=Stage.BUILDING), T0, "alice")


def test_blocking_and_unblocking_on_dependencies():
    blocked = p.set_blocked(record(), T0, ["job-a", "job-b"])
    assert (blocked.record.stage, blocked.reason) == (Stage.BLOCKED, "waiting for job-a, job-b")

    queued = p.unblock(blocked.record, T0 + 1)
    assert queued.record.stage is Stage.QUEUED


def test_a_dependency_is_satisfied_by_shipped_or_by_testing_when_soft():
    assert p.dep_satisfied(Stage.SHIPPED, "hard")
    assert p.dep_satisfied(Stage.SHIPPED, "soft")
    assert p.dep_satisfied(Stage.TESTING, "soft")
    assert not p.dep_satisfied(Stage.TESTING, "hard")
    assert not p.dep_satisfied(Stage.BUILDING, "soft")
    assert {s for s in Stage if p.dep_doomed(s)} == {Stage.FAILED, Stage.DEAD_LETTER}
