"""Fair dispatch order (coordinator/scheduler.py ``dispatch_order``) and a quiet scheduler.

Priority dominates; within a priority, products take turns, so one product's backlog does
not make another's jobs wait behind all of it. Pure functions over plain records, plus the
fleet view's rule that a heartbeat which changes nothing does not wake the scheduler.
"""

from __future__ import annotations

import msgspec

from gigafactory.coordinator.scheduler import dispatch_order
from gigafactory.coordinator.view import FleetView, JobState
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import FactoryRecord, JobRecord, Station, encode

T0 = 1_000.0


def queued(job_id: str, product: str, at: float, priority: str = "medium") -> JobState:
    parsed = parse_job_text(f"---\nengine: shell\ncwd: x\nproduct: {product}\npriority: {priority}\n---\necho hi\n",
                            "jobs/t.md")
    rec = JobRecord(id=job_id, manifest=parsed.manifest, body=parsed.body, source="jobs/t.md",
                    content_hash=parsed.content_hash, submitted_at=at, pool="any",
                    requirements=list(parsed.manifest.requirements()))
    return JobState(rec, 1, at)


def ids(states) -> list[str]:
    return [st.record.id for st in states]


def test_products_take_turns_within_a_priority_each_in_age_order():
    # Product a submitted a backlog of 6 first; b and c came later with 2 each.
    jobs = [queued(f"a{i}", "a", T0 + i) for i in range(6)]
    jobs += [queued(f"b{i}", "b", T0 + 10 + i) for i in range(2)]
    jobs += [queued(f"c{i}", "c", T0 + 20 + i) for i in range(2)]
    order = ids(dispatch_order(jobs, {}))
    assert order[:6] == ["a0", "b0", "c0", "a1", "b1", "c1"], order
    assert order[6:] == ["a2", "a3", "a4", "a5"], "the backlog's rest follows, oldest first"


def test_at_the_same_turn_the_product_served_least_recently_goes_first():
    jobs = [queued("a0", "a", T0), queued("b0", "b", T0 + 5)]
    assert ids(dispatch_order(jobs, {})) == ["a0", "b0"], "never served: the older job first"
    assert ids(dispatch_order(jobs, {"a": 7, "b": 3})) == ["b0", "a0"], "b was served before a"
    assert ids(dispatch_order(jobs, {"a": 7})) == ["b0", "a0"], "a product never served comes first"


def test_priority_dominates_fair_turns():
    jobs = [queued(f"a{i}", "a", T0 + i) for i in range(3)]
    jobs.append(queued("crit", "a", T0 + 50, priority="critical"))
    jobs.append(queued("b0", "b", T0 + 60, priority="low"))
    order = ids(dispatch_order(jobs, {"b": -5}))
    assert order[0] == "crit", "a critical job goes ahead of the backlog, whatever its product"
    assert order[-1] == "b0", "a low job waits for every medium one, although its product was never served"


def test_a_heartbeat_that_changes_nothing_does_not_wake_the_scheduler():
    view = FleetView()
    rec = FactoryRecord(id="f1", host="h", os="linux", arch="x86_64", capabilities=["engine:shell"],
                        stations=[Station(index=0, since=T0)], heartbeat_at=T0, heartbeat_interval_s=5.0)
    view.apply_factory("f1", encode(rec), T0)
    assert view.changed.is_set(), "a new factory wakes the scheduler"
    view.changed.clear()
    view.apply_factory("f1", encode(msgspec.structs.replace(rec, heartbeat_at=T0 + 5)), T0 + 5)
    assert not view.changed.is_set(), "a routine heartbeat does not"
    assert view.heartbeats_quiet == 1
    view.apply_factory("f1", encode(msgspec.structs.replace(rec, status="draining")), T0 + 6)
    assert view.changed.is_set(), "a status change does"
    view.changed.clear()
    view.apply_factory("f1", encode(msgspec.structs.replace(rec, heartbeat_at=T0 + 30)), T0 + 30)
    assert view.changed.is_set(), "a factory back after missing heartbeats does (it was counted dead)"
