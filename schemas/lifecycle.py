"""The job lifecycle: every stage, every event, every legal transition.

Rules of this file (after h11's ``_state.py``):

- Everything that decides whether a job may move from one stage to another lives
  here, in one table. Nothing else in the code base may change a job's stage
  without going through :func:`transition`.
- This file does no I/O and does not know who is asking (coordinator, factory,
  operator). Who may fire which event, and under which fencing token, is the
  claim protocol's business (``protocol.py``).

Theory of operation
-------------------
A job is born ``queued`` (or ``blocked`` while a dependency is unmet). A factory
claims it (``assigned``), starts its engine (``building``); a claim whose engine starts at once
(no lock to take first) goes straight to ``building`` in one write (``claim_started``), and its verify gate
sends it to ``review`` (review policy names reviewers) or ``testing``; a human
``ship`` moves it to ``shipped``, or the ``auto`` review policy ships it at once.
What ``shipped`` means for a ``repo`` job is its ``ship-as`` (branch, pull request opened,
merged); a branch that no longer merges goes back to ``queued`` once (``rebase-needed``, from
``building``, ``review`` or ``testing``), then ``failed`` with ``merge_conflict``.
Failures go back to ``queued`` while the retry policy allows, then to
``dead_letter``; a failure class the policy does not retry, a cancel, or a
failed dependency ends in ``failed``. An operator may ``requeue`` a job that has
left the queue (``assigned``, ``building``, ``review``, ``testing``, ``failed``,
``dead_letter``); a ``blocked`` job waits for its dependencies, and ``shipped`` is
final.
"""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    """Where a job is. Terminal stages: ``shipped``, ``failed``, ``dead_letter``."""

    QUEUED = "queued"
    """Ready to run; waiting for a factory with a free station to claim it."""
    BLOCKED = "blocked"
    """Waiting for its dependencies (``deps``) to be satisfied."""
    ASSIGNED = "assigned"
    """Claimed by a factory under a lease; the engine has not started yet."""
    BUILDING = "building"
    """The engine is running on the lease holder's station."""
    REVIEW = "review"
    """Verify passed; waiting for the reviewers named by ``review-policy``."""
    TESTING = "testing"
    """Verify passed; waiting for the human ship gate (``gigafactory ship``)."""
    SHIPPED = "shipped"
    """Done. Final: nothing moves a shipped job."""
    FAILED = "failed"
    """Ended without retry: cancelled, a non-retried failure class, or a dependency failed."""
    DEAD_LETTER = "dead_letter"
    """The retry policy is exhausted; kept with full diagnostics for triage."""


class Event(enum.StrEnum):
    """What happened to a job. Each event is legal only from the stages the table lists."""

    DEPS_MET = "deps_met"
    DEPS_UNMET = "deps_unmet"
    CLAIM = "claim"
    CLAIM_STARTED = "claim_started"
    """A claim whose engine starts at once (no lock to take first): ``queued -> building`` in
    one compare-and-set, the shortcut of ``claim`` then ``start`` (the lease, epoch and attempt
    are the claim's). Its ``claimed`` event (``data.started``) is the run's start: no
    ``started`` event follows it."""
    START = "start"
    VERIFIED = "verified"
    NEEDS_REVIEW = "needs_review"
    SHIP = "ship"
    REQUEUE = "requeue"
    FAIL = "fail"
    CANCEL = "cancel"
    DEAD_LETTER = "dead_letter"


TERMINAL: frozenset[Stage] = frozenset({Stage.SHIPPED, Stage.FAILED, Stage.DEAD_LETTER})
"""Stages a job does not leave on its own (an operator may still requeue failed ones)."""

LEASED: frozenset[Stage] = frozenset({Stage.ASSIGNED, Stage.BUILDING})
"""Stages in which a factory holds the job's lease and must keep renewing it."""

WAITING: frozenset[Stage] = frozenset({Stage.QUEUED, Stage.BLOCKED})
"""Stages in which a job may still be superseded by a new submission of its idempotency key."""

_ACTIVE = (Stage.QUEUED, Stage.BLOCKED, Stage.ASSIGNED, Stage.BUILDING, Stage.REVIEW, Stage.TESTING)

# The table. (stage, event) -> next stage. Anything absent is illegal.
TRANSITIONS: dict[Stage, dict[Event, Stage]] = {
    Stage.BLOCKED: {
        Event.DEPS_MET: Stage.QUEUED,
        Event.DEPS_UNMET: Stage.BLOCKED,
        Event.FAIL: Stage.FAILED,
        Event.CANCEL: Stage.FAILED,
    },
    Stage.QUEUED: {
        Event.DEPS_UNMET: Stage.BLOCKED,
        Event.DEPS_MET: Stage.QUEUED,
        Event.CLAIM: Stage.ASSIGNED,
        Event.CLAIM_STARTED: Stage.BUILDING,
        Event.FAIL: Stage.FAILED,
        Event.CANCEL: Stage.FAILED,
    },
    Stage.ASSIGNED: {
        Event.START: Stage.BUILDING,
        Event.REQUEUE: Stage.QUEUED,
        Event.FAIL: Stage.FAILED,
        Event.CANCEL: Stage.FAILED,
        Event.DEAD_LETTER: Stage.DEAD_LETTER,
    },
    Stage.BUILDING: {
        Event.VERIFIED: Stage.TESTING,
        Event.NEEDS_REVIEW: Stage.REVIEW,
        Event.REQUEUE: Stage.QUEUED,
        Event.FAIL: Stage.FAILED,
        Event.CANCEL: Stage.FAILED,
        Event.DEAD_LETTER: Stage.DEAD_LETTER,
    },
    Stage.REVIEW: {
        Event.SHIP: Stage.SHIPPED,
        Event.REQUEUE: Stage.QUEUED,
        # A human's ship whose merge conflicts after the one rebase-needed retry: merge_conflict.
        Event.FAIL: Stage.FAILED,
        Event.CANCEL: Stage.FAILED,
    },
    Stage.TESTING: {
        Event.SHIP: Stage.SHIPPED,
        Event.REQUEUE: Stage.QUEUED,
        # A human's ship whose merge conflicts after the one rebase-needed retry: merge_conflict.
        Event.FAIL: Stage.FAILED,
        Event.CANCEL: Stage.FAILED,
    },
    Stage.SHIPPED: {},
    Stage.FAILED: {Event.REQUEUE: Stage.QUEUED},
    Stage.DEAD_LETTER: {Event.REQUEUE: Stage.QUEUED},
}

assert set(TRANSITIONS) == set(Stage), "every stage needs a row, even an empty one"
assert all(s in TRANSITIONS for s in _ACTIVE)


class IllegalTransition(ValueError):
    """An event was fired from a stage that does not allow it."""

    def __init__(self, stage: Stage, event: Event, job_id: str | None = None) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[stage])) or "none (final stage)"
        where = f"job {job_id}: " if job_id else ""
        super().__init__(
            f"{where}cannot {event.value!r} a job in stage {stage.value!r}; "
            f"events allowed from {stage.value!r}: {allowed}"
        )
        self.stage = stage
        self.event = event
        self.job_id = job_id


def transition(stage: Stage | str, event: Event | str, job_id: str | None = None) -> Stage:
    """Return the stage that ``event`` leads to from ``stage``, or raise :class:`IllegalTransition`."""
    stage = Stage(stage)
    event = Event(event)
    try:
        return TRANSITIONS[stage][event]
    except KeyError:
        raise IllegalTransition(stage, event, job_id) from None


def allowed_events(stage: Stage | str) -> frozenset[Event]:
    """The events that may be fired from ``stage``."""
    return frozenset(TRANSITIONS[Stage(stage)])
