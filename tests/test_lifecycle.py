"""The job lifecycle table (schemas/lifecycle.py)."""

from __future__ import annotations

import itertools

import pytest

from gigafactory.schemas.lifecycle import (
    LEASED,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Stage,
    allowed_events,
    transition,
)

# The specification, written out independently of the table: if either changes, this fails.
LEGAL = {
    (Stage.BLOCKED, Event.DEPS_MET): Stage.QUEUED,
    (Stage.BLOCKED, Event.DEPS_UNMET): Stage.BLOCKED,
    (Stage.BLOCKED, Event.FAIL): Stage.FAILED,
    (Stage.BLOCKED, Event.CANCEL): Stage.FAILED,
    (Stage.QUEUED, Event.DEPS_UNMET): Stage.BLOCKED,
    (Stage.QUEUED, Event.DEPS_MET): Stage.QUEUED,
    (Stage.QUEUED, Event.CLAIM): Stage.ASSIGNED,
    (Stage.QUEUED, Event.CLAIM_STARTED): Stage.BUILDING,  # the shortcut of a claim whose engine starts at once
    (Stage.QUEUED, Event.FAIL): Stage.FAILED,
    (Stage.QUEUED, Event.CANCEL): Stage.FAILED,
    (Stage.ASSIGNED, Event.START): Stage.BUILDING,
    (Stage.ASSIGNED, Event.REQUEUE): Stage.QUEUED,
    (Stage.ASSIGNED, Event.FAIL): Stage.FAILED,
    (Stage.ASSIGNED, Event.CANCEL): Stage.FAILED,
    (Stage.ASSIGNED, Event.DEAD_LETTER): Stage.DEAD_LETTER,
    (Stage.BUILDING, Event.VERIFIED): Stage.TESTING,
    (Stage.BUILDING, Event.NEEDS_REVIEW): Stage.REVIEW,
    (Stage.BUILDING, Event.REQUEUE): Stage.QUEUED,
    (Stage.BUILDING, Event.FAIL): Stage.FAILED,
    (Stage.BUILDING, Event.CANCEL): Stage.FAILED,
    (Stage.BUILDING, Event.DEAD_LETTER): Stage.DEAD_LETTER,
    (Stage.REVIEW, Event.SHIP): Stage.SHIPPED,
    (Stage.REVIEW, Event.REQUEUE): Stage.QUEUED,
    (Stage.REVIEW, Event.CANCEL): Stage.FAILED,
    (Stage.REVIEW, Event.FAIL): Stage.FAILED,  # a human's ship whose merge conflicts, rebase spent
    (Stage.TESTING, Event.SHIP): Stage.SHIPPED,
    (Stage.TESTING, Event.REQUEUE): Stage.QUEUED,
    (Stage.TESTING, Event.CANCEL): Stage.FAILED,
    (Stage.TESTING, Event.FAIL): Stage.FAILED,
    (Stage.FAILED, Event.REQUEUE): Stage.QUEUED,
    (Stage.DEAD_LETTER, Event.REQUEUE): Stage.QUEUED,
}

ILLEGAL = [pair for pair in itertools.product(Stage, Event) if pair not in LEGAL]


def test_the_table_holds_exactly_the_specified_transitions():
    table = {(stage, event): to for stage, row in TRANSITIONS.items() for event, to in row.items()}

    assert table == LEGAL


@pytest.mark.parametrize(("stage", "event"), sorted(LEGAL), ids=[f"{s}-{e}" for s, e in sorted(LEGAL)])
def test_every_legal_transition_leads_where_the_table_says(stage, event):
    assert transition(stage, event) is LEGAL[(stage, event)]
    assert transition(stage.value, event.value) is LEGAL[(stage, event)]  # plain strings from JSON
    assert event in allowed_events(stage)


@pytest.mark.parametrize(("stage", "event"), ILLEGAL, ids=[f"{s}-{e}" for s, e in ILLEGAL])
def test_every_illegal_pair_is_refused_naming_stage_and_event(stage, event):
    with pytest.raises(IllegalTransition) as caught:
        transition(stage, event, job_id="job-7")

    error = caught.value
    assert (error.stage, error.event, error.job_id) == (stage, event, "job-7")
    assert f"cannot {event.value!r} a job in stage {stage.value!r}" in str(error)
    assert str(error).startswith("job job-7: ")
    assert event not in allowed_events(stage)


def test_the_cross_product_is_covered_completely():
    assert len(LEGAL) + len(ILLEGAL) == len(Stage) * len(Event)
    assert len(ILLEGAL) > len(LEGAL)


def test_an_illegal_transition_lists_the_events_the_stage_allows():
    with pytest.raises(IllegalTransition) as caught:
        transition(Stage.TESTING, Event.START)

    assert "events allowed from 'testing': cancel, fail, requeue, ship" in str(caught.value)


def test_shipped_is_final():
    assert allowed_events(Stage.SHIPPED) == frozenset()
    for event in Event:
        with pytest.raises(IllegalTransition, match="none \\(final stage\\)"):
            transition(Stage.SHIPPED, event)


def test_terminal_stages_are_left_only_by_an_operator_requeue():
    assert TERMINAL == {Stage.SHIPPED, Stage.FAILED, Stage.DEAD_LETTER}
    for stage in TERMINAL - {Stage.SHIPPED}:
        assert allowed_events(stage) == {Event.REQUEUE}


def test_only_assigned_and_building_hold_a_lease():
    assert LEASED == {Stage.ASSIGNED, Stage.BUILDING}


def test_a_blocked_job_cannot_be_claimed_or_requeued_past_its_dependencies():
    for event in (Event.CLAIM, Event.REQUEUE, Event.START):
        with pytest.raises(IllegalTransition):
            transition(Stage.BLOCKED, event)


def test_every_stage_can_be_reached_from_queued():
    reached, frontier = {Stage.QUEUED}, [Stage.QUEUED]
    while frontier:
        for to in TRANSITIONS[frontier.pop()].values():
            if to not in reached:
                reached.add(to)
                frontier.append(to)

    assert reached == set(Stage)


def test_unknown_stage_or_event_names_are_refused():
    with pytest.raises(ValueError, match="'launched' is not a valid Stage"):
        transition("launched", Event.CLAIM)
    with pytest.raises(ValueError, match="'explode' is not a valid Event"):
        transition(Stage.QUEUED, "explode")
