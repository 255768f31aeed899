"""The dispatch pass's planner (coordinator/plan_dispatch.py), sans-I/O: a snapshot of the
view and the scheduler's memory in, the offers, holds, quarantines and memory updates out.

Pure values only: no broker, no clock. ``test_dispatch_pass.py`` runs the same planner
through ``Scheduler.dispatch`` over a real broker; ``test_decide.py`` pins the per-job
decisions it calls.
"""

from __future__ import annotations

import copy
from collections import Counter

import msgspec
from test_fairness import queued

from gigafactory.coordinator import decide
from gigafactory.coordinator.plan_dispatch import DispatchInput, QueueOrder, plan_dispatch
from gigafactory.coordinator.view import FactoryState, JobState
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import protocol
from gigafactory.schemas.records import FactoryRecord, Station

T0 = 1_000.0
NOW = T0 + 100.0
MONO = 50.0


def factory(fid: str, stations: int, capabilities=("engine:shell",)) -> FactoryState:
    rec = FactoryRecord(id=fid, host="h", os="linux", arch="x86_64", capabilities=list(capabilities),
                        stations=[Station(index=i, since=T0) for i in range(stations)], heartbeat_at=NOW,
                        heartbeat_interval_s=5.0)
    return FactoryState(rec, NOW, caps.Offers(rec.capabilities))


def job(jid: str, product: str = "a", at: float = T0, lock: str | None = None, size_bytes: int = 100) -> JobState:
    st = queued(jid, product, at)
    if lock:
        st.record.manifest = msgspec.structs.replace(st.record.manifest, lock=lock)
    return JobState(st.record, 1, at, size_bytes)


def backlog(*states: JobState) -> QueueOrder:
    q = QueueOrder()
    for st in states:
        q.on_job(None, st)
    return q


def inp(q: QueueOrder, live, **kw) -> DispatchInput:
    base = dict(queue=q, live=live, leased=[], published={}, held={}, gap_seen={}, last_served={},
                quarantined=lambda st: False, broker_now_s=NOW, now_mono_s=MONO, redispatch_s=15.0,
                max_record_bytes=10_000)
    base.update(kw)
    return DispatchInput(**base)


def offered(plan) -> list[tuple[str, bool, int]]:
    return [(st.record.id, redispatch, pos) for st, redispatch, pos in plan.offers]


def test_a_pool_gets_as_many_first_offers_as_free_stations_in_dispatch_order():
    q = backlog(*(job(f"a{i}", "a", T0 + i) for i in range(5)), job("b0", "b", T0 + 10))

    plan = plan_dispatch(inp(q, [factory("f1", 3)]))

    assert offered(plan) == [("a0", False, 1), ("b0", False, 2), ("a1", False, 3)], "products take turns"
    assert plan.visited == 3, "the pass stops where the free stations do"
    assert plan.capacity == {"any": 3} and plan.depth == {"any": 6}
    assert [f.record.id for f in plan.serving["any"]] == ["f1"]
    assert plan.holds == [] and plan.too_large == [] and plan.forget == []


def test_busy_stations_are_counted_from_the_leased_records():
    q = backlog(job("a0"), job("a1", at=T0 + 1))
    leased = [protocol.start(protocol.claim(job("x").record, "f1", 0, T0).record, "f1", 1, T0).record]
    leased[0].id = "x"

    plan = plan_dispatch(inp(q, [factory("f1", 2)], leased=leased))

    assert plan.capacity == {"any": 1} and offered(plan) == [("a0", False, 1)]


def test_an_offer_out_for_redispatch_s_goes_again_first_whatever_the_capacity():
    a0, a1 = job("a0"), job("a1", at=T0 + 1)
    q = backlog(a0, a1)
    published = {"a0": decide.Offered(a0.record.epoch, MONO - 15.0)}

    plan = plan_dispatch(inp(q, [factory("f1", 1)], published=published))

    assert offered(plan) == [("a0", True, 0)], "the redispatch; the one station has an offer out: no first offer"
    assert plan.visited == 1


def test_an_offer_still_pending_is_neither_repeated_nor_counted_twice():
    a0, a1 = job("a0"), job("a1", at=T0 + 1)
    published = {"a0": decide.Offered(a0.record.epoch, MONO - 1.0)}

    plan = plan_dispatch(inp(backlog(a0, a1), [factory("f1", 2)], published=published))

    assert offered(plan) == [("a1", False, 2)]


def test_a_lock_held_by_a_leased_job_holds_the_queued_job_with_the_reason_once():
    q = backlog(job("a0", lock="db"), job("a1", at=T0 + 1))
    holder = job("x", lock="db").record
    live = [factory("f1", 4)]

    plan = plan_dispatch(inp(q, live, leased=[holder]))

    assert offered(plan) == [("a1", False, 2)]
    assert [(st.record.id, why) for st, why in plan.holds] == [("a0", "waiting for lock 'db' held by job x")]
    again = plan_dispatch(inp(q, live, leased=[holder], held={"a0": "waiting for lock 'db' held by job x"}))
    assert again.holds == [], "the reason written already is not written again"


def test_a_pool_nothing_serves_holds_each_job_with_the_gap_then_is_skipped_until_it_changes():
    q = backlog(job("a0"), job("a1", at=T0 + 1))
    live = [factory("f1", 2, capabilities=("engine:claude",))]

    plan = plan_dispatch(inp(q, live))

    assert plan.offers == [] and plan.visited == 2
    assert {why for _st, why in plan.holds} == {"no live factory offers engine:shell"}
    assert plan.gap_seen_set == {"any": (2, "no live factory offers engine:shell")}
    skipped = plan_dispatch(inp(q, live, gap_seen=plan.gap_seen_set))
    assert skipped.visited == 0 and skipped.holds == []
    q.on_job(None, job("a2", at=T0 + 2))
    assert plan_dispatch(inp(q, live, gap_seen=plan.gap_seen_set)).visited == 3, "a new job: look again"


def test_a_served_pool_is_cleared_from_the_gap_memory():
    plan = plan_dispatch(inp(backlog(job("a0")), [factory("f1", 1)], gap_seen={"any": (1, "x")}))

    assert plan.gap_seen_clear == ["any"] and offered(plan) == [("a0", False, 1)]


def test_records_too_large_to_claim_are_quarantined_and_quarantined_ones_left_alone():
    big, bad, ok = job("a0", size_bytes=10_001), job("a1", at=T0 + 1), job("a2", at=T0 + 2)
    q = backlog(big, bad, ok)

    plan = plan_dispatch(inp(q, [factory("f1", 3)], quarantined=lambda st: st.record.id == "a1"))

    assert [st.record.id for st in plan.too_large] == ["a0"]
    assert offered(plan) == [("a2", False, 3)]


def test_offers_of_jobs_no_longer_queued_are_forgotten_and_the_input_is_not_changed():
    q = backlog(job("a0"))
    published = {"gone": decide.Offered(1, MONO), "a0": decide.Offered(0, MONO - 99)}
    held, gap_seen, served = {"a0": "x"}, {"p": (1, "y")}, {"a": 3}
    before = copy.deepcopy((published, held, gap_seen, served, q.where))

    plan = plan_dispatch(inp(q, [factory("f1", 1)], published=published, held=held, gap_seen=gap_seen,
                             last_served=served))

    assert plan.forget == ["gone"]
    assert (published, held, gap_seen, served, q.where) == before, "the planner only reads its input"


# -- one planner for the scheduler and the simulation -----------------------------------------------


def test_the_simulation_dispatches_through_the_same_planner(monkeypatch):
    from gigafactory.chaos import sim
    from gigafactory.coordinator import plan_dispatch as module
    from gigafactory.coordinator import scheduler

    assert sim.plan_dispatch is module and scheduler.plan_dispatch is module
    healthy = sim.simulate(0, faults=sim.FaultConfig.none(), limit_s=300.0)
    assert healthy.report.counts.get("dispatched", 0) > 0 and healthy.settled

    monkeypatch.setattr(module, "plan_dispatch", lambda inp: module.DispatchPlan())
    res = sim.simulate(0, faults=sim.FaultConfig.none(), limit_s=300.0)

    assert res.report.counts.get("dispatched", 0) == 0 and not res.settled


def test_the_simulations_offers_respect_the_free_stations():
    from gigafactory.chaos import sim

    res = sim.simulate(0, faults=sim.FaultConfig.none(), limit_s=300.0, jobs=12, factories=1, stations=2)

    assert res.settled
    first = [e for e in res.events if e.kind == "dispatched" and not e.data["redispatch"]]
    per_pass = Counter((e.actor, e.at) for e in first)
    assert first and max(per_pass.values()) <= 2, "one pass makes at most as many first offers as free stations"
    assert all(e.data["pool_capacity"] is not None and e.data["pool_capacity"] <= 2 for e in first)
