"""``ship-as`` and conflicts as pure values: the manifest field and its refusals, what a passed
attempt lacks to count as shipped (:func:`protocol.ship_shortfall`), the ``auto`` finish that
holds a job in ``testing`` when the forge did not ship it, and ``rebase-needed`` once, then
``merge_conflict`` (from the factory's merge and from a human's ship)."""

from __future__ import annotations

import msgspec
import pytest

from gigafactory.schemas import protocol as p
from gigafactory.schemas.lifecycle import Event, Stage
from gigafactory.schemas.manifest import FailureClass, ManifestError, parse_job_text
from gigafactory.schemas.records import WorkspaceResult

from test_protocol import T0, building, record

REPO = "repo: /srv/app.git\n"


def parse(front: str):
    return parse_job_text(f"---\nengine: shell\n{front}---\necho hi\n", "jobs/s.md").manifest


def pushed(**kw) -> WorkspaceResult:
    kw.setdefault("shipped_as", "branch")
    return WorkspaceResult(branch="gf/job-1/e1", base="main", base_commit="a" * 40, head="b" * 40, pushed=True, **kw)


def test_ship_as_defaults_to_branch_and_takes_the_three_modes_with_a_repo():
    assert parse(REPO).ship_as == "branch"
    for mode in ("branch", "pr-opened", "merged"):
        assert parse(f"{REPO}ship-as: {mode}\nreview-policy: manual\n").ship_as == mode


@pytest.mark.parametrize("front, field, words", [
    ("cwd: x\nship-as: pr-opened\n", "ship-as", "needs 'repo'"),
    (f"{REPO}ship-as: merge\n", "ship-as", "'merge' is not"),
    (f"{REPO}ship-as: true\n", "ship-as", "expected"),
    (f"{REPO}review-policy: merged\n", "review-policy", "write 'ship-as: merged'"),
])
def test_nonsense_ship_settings_are_refused_naming_the_file_and_field(front, field, words):
    with pytest.raises(ManifestError) as e:
        parse(front)
    text = str(e.value)
    assert "jobs/s.md" in text and field in text and words in text, text


def test_the_shortfall_is_what_ship_as_still_lacks():
    ws = pushed()
    assert p.ship_shortfall("branch", ws) is None
    assert p.ship_shortfall("pr-opened", None) is None  # no repo: nothing beyond
    assert p.ship_shortfall("merged", msgspec.structs.replace(ws, head=ws.base_commit)) is None  # nothing changed
    assert "no pull request" in p.ship_shortfall("pr-opened", msgspec.structs.replace(ws, ship_detail="forge down"))
    opened = msgspec.structs.replace(ws, pull_number=3, pull_state="open", shipped_as="pr-opened")
    assert p.ship_shortfall("pr-opened", opened) is None
    short = p.ship_shortfall("merged", msgspec.structs.replace(opened, ship_detail="merge blocked: checks pending"))
    assert short is not None and "checks pending" in short
    merged = msgspec.structs.replace(opened, pull_state="merged", merged_commit="c" * 40)
    assert p.ship_shortfall("merged", merged) is None


def test_an_auto_job_ships_only_when_the_forge_did_what_ship_as_asks():
    rec = building(f"{REPO}review-policy: auto\nship-as: merged\nverify: 'true'\n")
    opened = pushed(pull_number=4, pull_state="open", ship_detail="merge blocked: checks are pending")
    out = p.finish(rec, "f1", rec.epoch, T0 + 3, failure=None, workspace=opened)
    assert out.record.stage == Stage.TESTING and out.record.lease is None
    assert "not shipped as merged" in out.record.reason and "checks are pending" in out.record.reason
    assert "gigafactory ship job-1" in out.record.reason
    done = msgspec.structs.replace(opened, pull_state="merged", merged_commit="c" * 40)
    out = p.finish(rec, "f1", rec.epoch, T0 + 3, failure=None, workspace=done)
    assert out.record.stage == Stage.SHIPPED and "#4 merged at cccccccccccc" in out.record.reason
    # branch (the default) is today's behaviour: pushed is shipped.
    rec = building("review-policy: auto\n")
    assert p.finish(rec, "f1", rec.epoch, T0 + 3, failure=None, workspace=pushed()).record.stage == Stage.SHIPPED


def test_a_conflict_requeues_rebase_needed_once_without_a_retry_then_fails_merge_conflict():
    rec = building(f"{REPO}review-policy: auto\nship-as: merged\n", retries_used=0)
    out = p.finish(rec, "f1", rec.epoch, T0 + 3, failure=FailureClass.MERGE_CONFLICT,
                   detail="#1 does not merge: conflicts in README.md", workspace=pushed())
    r = out.record
    assert (out.event, r.stage) == (Event.REQUEUE, Stage.QUEUED)
    assert r.reason.startswith("rebase-needed: #1 does not merge: conflicts in README.md")
    assert (r.rebases_used, r.retries_used, r.backoff_s, r.epoch, r.lease) == (1, 0, 0.0, rec.epoch + 1, None)
    assert r.attempts[-1].outcome == "merge_conflict" and r.last_failure == FailureClass.MERGE_CONFLICT
    assert not p.rebase_pending(rec)
    again = p.start(p.claim(r, "f2", 0, T0 + 4).record, "f2", r.epoch + 1, T0 + 5).record
    assert again.attempt == 2 and p.rebase_pending(again)  # the checkout's start-point hook
    out = p.finish(again, "f2", again.epoch, T0 + 6, failure=FailureClass.MERGE_CONFLICT, detail="still")
    assert (out.event, out.record.stage) == (Event.FAIL, Stage.FAILED)
    assert out.record.reason.startswith("merge_conflict: still") and out.record.rebases_used == 1


def test_a_humans_ship_records_the_forges_result_or_rebases_once_then_fails_from_testing():
    rec = building(f"{REPO}review-policy: manual\nship-as: merged\n")
    testing = p.finish(rec, "f1", rec.epoch, T0 + 3, failure=None, workspace=pushed()).record
    assert testing.stage == Stage.TESTING
    a = p.shipped_attempt(testing)
    assert a is not None and a.epoch == rec.epoch
    merged = pushed(pull_number=2, pull_state="merged", merged_commit="d" * 40, shipped_as="merged")
    out = p.ship_done(testing, T0 + 4, "alice", a.epoch, merged)
    assert out.record.stage == Stage.SHIPPED and out.record.attempts[-1].workspace.merged_commit == "d" * 40
    assert out.reason == "shipped by alice (pull request #2 merged at dddddddddddd)"
    conflict = pushed(pull_number=2, pull_state="open", ship_detail="#2 does not merge: conflicts in a")
    out = p.ship_conflict(testing, T0 + 4, "alice", a.epoch, conflict)
    assert out.record.stage == Stage.QUEUED and out.record.reason.startswith("rebase-needed: #2 does not merge")
    assert out.record.epoch == testing.epoch + 1 and out.record.attempts[-1].workspace.pull_number == 2
    spent = msgspec.structs.replace(testing, rebases_used=1)
    out = p.ship_conflict(spent, T0 + 4, "alice", a.epoch, conflict)
    assert (out.event, out.record.stage, out.record.last_failure) == (Event.FAIL, Stage.FAILED,
                                                                       FailureClass.MERGE_CONFLICT)
    assert out.record.epoch == testing.epoch + 1  # a stale holder's write would be fenced


def test_a_profile_supplies_ship_as_to_its_repo_jobs_that_state_none_and_never_to_others():
    from gigafactory.schemas import profiles

    cat = {"p": profiles.parse_profile("---\nsummary: s\nengine-class: agentic-coder\nship-as: merged\n---\nA\n",
                                       "p.md")}
    job = "---\nprofile: p\n{}---\nDo it.\n"
    assert profiles.resolve(parse_job_text(job.format(REPO), "j.md"), cat).manifest.ship_as == "merged"
    stated = job.format(REPO + "ship-as: pr-opened\n")
    assert profiles.resolve(parse_job_text(stated, "j.md"), cat).manifest.ship_as == "pr-opened"
    assert profiles.resolve(parse_job_text(job.format("cwd: r\n"), "j.md"), cat).manifest.ship_as == "branch"
    with pytest.raises(profiles.ProfileError) as e:
        profiles.parse_profile("---\nsummary: s\nengine-class: agentic-coder\nship-as: later\n---\nA\n", "bad.md")
    assert "bad.md" in str(e.value) and "ship-as" in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("ship_checks_wait_s", -1.0), ("ship_checks_wait_s", 6 * 3600.0 + 1), ("ship_checks_poll_s", 0.0),
    ("ship_checks_poll_s", -2.0),
])
def test_shipping_settings_that_cannot_work_are_refused_naming_the_variable(field, value):
    from gigafactory.config import Settings, SettingsError

    with pytest.raises(SettingsError, match=f"GIGAFACTORY_{field.upper()}"):
        Settings(**{field: value}).validate()
    Settings(ship_checks_wait_s=0.0, ship_checks_poll_s=0.5).validate()


def _ended(stage: str, *attempts: tuple[int, str, WorkspaceResult | None], checkpoint: bool = False):
    from gigafactory.schemas.records import AttemptRecord, Checkpoint
    rec = record()
    atts = [AttemptRecord(attempt=i + 1, epoch=e, factory="f1", station=0, outcome=o, workspace=w)
            for i, (e, o, w) in enumerate(attempts)]
    cp = Checkpoint(commit="c" * 40, epoch=1, attempt=1, at=T0, branch="gf/job-1/wip") if checkpoint else None
    return msgspec.structs.replace(rec, stage=Stage(stage), attempts=atts, checkpoint=cp)


def ws(epoch: int, pushed_: bool = True, pull: int | None = None, state: str = "") -> WorkspaceResult:
    return WorkspaceResult(branch=f"gf/job-1/e{epoch}", base="main", head="b" * 40, pushed=pushed_,
                           pull_number=pull, pull_state=state)


def test_the_clean_up_of_a_shipped_job_keeps_only_the_shipped_branch_and_closes_superseded_pulls():
    from gigafactory.coordinator.shipping import ref_plan
    rec = _ended("shipped", (1, "merge_conflict", ws(1, pull=1, state="open")),
                 (3, "passed", ws(3, pull=2, state="merged")), checkpoint=True)
    plan = ref_plan(rec)
    assert plan.keep == {"gf/job-1/e3"} and plan.close == ((1, "gf/job-1/e1"),)


def test_the_clean_up_of_a_failed_job_keeps_its_last_pushed_branch_or_else_its_checkpoint():
    from gigafactory.coordinator.shipping import ref_plan
    rec = _ended("failed", (1, "merge_conflict", ws(1, pull=1, state="open")),
                 (3, "merge_conflict", ws(3, pull=2, state="open")), checkpoint=True)
    assert ref_plan(rec).keep == {"gf/job-1/e3"} and ref_plan(rec).close == ((1, "gf/job-1/e1"),)
    never_pushed = _ended("dead_letter", (1, "verify_failed", ws(1, pushed_=False)), checkpoint=True)
    assert ref_plan(never_pushed).keep == {"gf/job-1/wip"}  # the only copy of its work
    assert ref_plan(_ended("failed", (1, "crash", None))).keep == frozenset()
