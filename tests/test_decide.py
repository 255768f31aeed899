"""The coordinator's per-job decisions (coordinator/decide.py), sans-I/O, and proof that the
scheduler and the deterministic simulation both run them (not copies).

Pure values first: reap, unblock, dispatch order, offer/redispatch, hold, the dispatched
event, each in its positive and negative space. Then the shared-code tests: one breaks a
decision on purpose (monkeypatching the module's function) and shows both the scheduler,
over a real broker, and the simulation change their behaviour.
"""

from __future__ import annotations

import msgspec
import pytest
from helpers import fast_settings, run
from test_fairness import queued
from test_protocol import T0, building, record

from gigafactory.broker import Broker
from gigafactory.chaos import sim
from gigafactory.coordinator import decide, scheduler
from gigafactory.coordinator.decide import Offered, Turn
from gigafactory.coordinator.scheduler import Scheduler
from gigafactory.coordinator.view import FleetView
from gigafactory.schemas.lifecycle import Event, Stage
from gigafactory.schemas.records import FactoryRecord, JobRecord, Station, encode

TTL_S = 30.0

# --- reap ------------------------------------------------------------------------------------------


def test_reap_requeues_a_lease_older_than_the_ttl_by_broker_time_and_names_holder_and_old_epoch():
    rec = building("retry:\n  max: 2\n")
    stored_at = T0 + 2

    w = decide.reap(rec, stored_at, stored_at + TTL_S + 0.001, TTL_S)

    assert w is not None
    assert w.out.event == Event.REQUEUE and w.out.record.stage == Stage.QUEUED
    assert w.out.record.epoch == rec.epoch + 1 and w.out.record.lease is None
    assert w.data == {"holder": "f1", "old_epoch": rec.epoch}


def test_reap_leaves_a_live_lease_alone_up_to_exactly_the_ttl():
    rec = building()

    assert decide.reap(rec, T0 + 2, T0 + 2 + TTL_S, TTL_S) is None
    assert decide.reap(rec, T0 + 2, T0 + 2, TTL_S) is None


@pytest.mark.parametrize("stage", [Stage.QUEUED, Stage.BLOCKED, Stage.TESTING, Stage.SHIPPED, Stage.FAILED])
def test_reap_never_touches_a_record_without_a_lease_however_old(stage):
    rec = record(stage=stage)

    assert decide.reap(rec, T0, T0 + 1e6, TTL_S) is None


def test_reap_of_a_job_without_retries_left_ends_it_instead_of_requeueing():
    rec = building("retry:\n  max: 0\n")

    w = decide.reap(rec, T0 + 2, T0 + 100, TTL_S)

    assert w is not None and w.out.record.stage in (Stage.FAILED, Stage.DEAD_LETTER)
    assert w.data["old_epoch"] == rec.epoch


# --- unblock ---------------------------------------------------------------------------------------


def blocked(mode: str = "hard") -> JobRecord:
    return record(f"deps-mode: {mode}\n", stage=Stage.BLOCKED, deps=["a", "b"], reason="waiting for a, b")


def test_dep_stages_takes_the_live_record_first_then_the_archive_then_unknown():
    live = {"a": Stage.BUILDING}
    rec = record(deps=["a", "b", "c"])

    got = decide.dep_stages(rec, live.get, {"a": Stage.SHIPPED, "b": Stage.SHIPPED})

    assert got == {"a": Stage.BUILDING, "b": Stage.SHIPPED, "c": None}


def test_unblock_once_every_dependency_shipped():
    w = decide.unblock(blocked(), {"a": Stage.SHIPPED, "b": Stage.SHIPPED}, T0 + 5)

    assert w is not None and w.out.record.stage == Stage.QUEUED and w.data == {}
    assert w.out.record.reason == "waiting for a factory"


def test_unblock_fails_the_job_when_a_dependency_ended_without_shipping():
    w = decide.unblock(blocked(), {"a": Stage.SHIPPED, "b": Stage.DEAD_LETTER}, T0 + 5)

    assert w is not None and w.out.record.stage == Stage.FAILED
    assert "b" in w.out.reason


@pytest.mark.parametrize("stages", [
    {"a": Stage.SHIPPED, "b": Stage.BUILDING},
    {"a": Stage.SHIPPED, "b": None},  # not known yet (not in gf_jobs, not archived)
    {"a": Stage.SHIPPED},  # missing from the map: not known either
    {"a": Stage.SHIPPED, "b": Stage.TESTING},  # testing satisfies only deps-mode: soft
])
def test_unblock_waits_while_a_dependency_is_undecided(stages):
    assert decide.unblock(blocked(), stages, T0 + 5) is None


def test_soft_dependencies_are_met_by_testing():
    w = decide.unblock(blocked("soft"), {"a": Stage.SHIPPED, "b": Stage.TESTING}, T0 + 5)

    assert w is not None and w.out.record.stage == Stage.QUEUED


def test_unblock_ignores_a_record_that_is_not_blocked():
    rec = msgspec.structs.replace(blocked(), stage=Stage.QUEUED)

    assert decide.unblock(rec, {"a": Stage.SHIPPED, "b": Stage.SHIPPED}, T0 + 5) is None


# --- dispatch order ---------------------------------------------------------------------------------


def test_dispatch_order_on_plain_records_priority_then_product_turns_then_age():
    recs = [queued(f"a{i}", "a", T0 + i).record for i in range(3)]
    recs += [queued("b0", "b", T0 + 10).record, queued("crit", "c", T0 + 20, priority="critical").record]

    order = [r.id for r in decide.dispatch_order(recs, {}, lambda r: r)]

    assert order == ["crit", "a0", "b0", "a1", "a2"]
    assert [r.id for r in decide.dispatch_order(recs, {"a": 5, "b": 1}, lambda r: r)][:3] == ["crit", "b0", "a0"]


def test_order_key_is_what_the_scheduler_queue_sorts_by():
    st = queued("a0", "a", T0)
    q = scheduler.QueueOrder()
    q.on_job(None, st)

    (key, got), = list(q.pool_order("any", {"a": 3}))

    assert got is st
    assert key == decide.order_key(st.record.priority_rank, 0, 3, T0, "a0")


# --- offer, redispatch, hold ----------------------------------------------------------------------


def test_offer_turn_new_pending_due():
    assert decide.offer_turn(None, 1, 100.0, 15.0) is Turn.NEW
    assert decide.offer_turn(Offered(epoch=0, at_s=99.0), 1, 100.0, 15.0) is Turn.NEW, "an earlier epoch's offer"
    assert decide.offer_turn(Offered(epoch=1, at_s=90.0), 1, 100.0, 15.0) is Turn.PENDING
    assert decide.offer_turn(Offered(epoch=1, at_s=85.0), 1, 100.0, 15.0) is Turn.DUE, "exactly redispatch_s"
    assert decide.offer_turn(Offered(epoch=1, at_s=0.0), 1, 100.0, 15.0) is Turn.DUE


def test_locks_taken_a_leased_holder_wins_over_an_offer_and_jobs_without_a_lock_take_none():
    taken = decide.locks_taken(leased=[("run-1", "db"), ("run-2", None)],
                               offered=[("offer-1", "db"), ("offer-2", "cache"), ("offer-3", "cache")])

    assert taken == {"db": "run-1", "cache": "offer-2"}
    assert decide.locks_taken([], []) == {}


def hold(rec: JobRecord, stored_at: float = T0, now: float = T0 + 1, **kw):
    args = {"redispatch": False, "lock_holder": None, "gap": None, "inflight": 0, "capacity": 4, **kw}
    return decide.hold_reason(rec, stored_at, now, **args)


def test_hold_nothing_offers():
    assert hold(record()) is None


def test_hold_for_the_retry_backoff_judged_from_the_stored_revision_by_broker_time():
    rec = record(backoff_s=10.0)

    assert hold(rec, stored_at=T0, now=T0 + 9.9) == ""
    assert hold(rec, stored_at=T0, now=T0 + 10.0) is None
    assert hold(rec, stored_at=T0, now=T0 + 9.9, redispatch=True) == "", "a redispatch waits out the backoff too"


def test_hold_for_a_lock_taken_by_another_job_only():
    rec = record("lock: db\n")

    assert hold(rec, lock_holder="job-9") == "waiting for lock 'db' held by job job-9"
    assert hold(rec, lock_holder=rec.id) is None, "its own offer of the lock"
    assert hold(rec, lock_holder=None) is None
    assert hold(record(), lock_holder="job-9") is None, "a job without a lock"


def test_hold_with_the_capability_gap_of_a_pool_nothing_serves():
    assert hold(record(), gap="no live factory offers gpu") == "no live factory offers gpu"


def test_hold_a_first_offer_when_every_station_has_one_but_never_a_redispatch():
    assert hold(record(), inflight=4, capacity=4) == ""
    assert hold(record(), inflight=3, capacity=4) is None
    assert hold(record(), inflight=4, capacity=4, redispatch=True) is None
    assert hold(record(), inflight=10**6, capacity=None) is None, "no capacity limit"


def test_the_dispatched_event_says_redispatch_or_position():
    rec = record()
    kw = dict(at=T0 + 3, actor="c", broker_now_s=T0 + 3, redispatch_s=15.0, position=2, queued_in_pool=7,
              pool_capacity=4, serving_factories=["f1"])

    first = decide.dispatched_event(rec, redispatch=False, **kw)
    again = decide.dispatched_event(rec, redispatch=True, **kw)

    assert first.kind == again.kind == "dispatched" and first.stage_from == first.stage_to == "queued"
    assert "#2 of 7 queued in pool any" in first.reason and "waited 3.0s" in first.reason
    assert "offered again: not taken within 15s" in again.reason
    assert first.data["redispatch"] is False and again.data["redispatch"] is True
    assert first.data["pool_capacity"] == 4 and first.data["serving_factories"] == ["f1"]


# --- one decision code for the scheduler and the simulation -----------------------------------------


def test_the_simulation_and_the_scheduler_import_the_same_decision_module():
    assert sim.decide is decide
    assert scheduler.decide is decide


def _never(*_a, **_kw):
    return None


def test_breaking_the_shared_reap_decision_stops_the_simulation_reaping(monkeypatch):
    seed = next(s for s in range(50) if sim.simulate(s).report.counts["lease_expired"] > 0)

    monkeypatch.setattr(decide, "reap", _never)

    assert sim.simulate(seed).report.counts["lease_expired"] == 0


def test_breaking_the_shared_hold_decision_stops_the_simulation_dispatching(monkeypatch):
    healthy = sim.simulate(0, faults=sim.FaultConfig.none(), limit_s=300.0)
    assert healthy.report.counts.get("dispatched", 0) > 0 and healthy.settled

    monkeypatch.setattr(decide, "hold_reason", lambda *a, **kw: "broken on purpose")
    res = sim.simulate(0, faults=sim.FaultConfig.none(), limit_s=300.0)

    assert res.report.counts.get("dispatched", 0) == 0 and not res.settled


async def _scheduler_reaps_and_dispatches(url: str) -> tuple[int, int]:
    """A real broker, one factory with two stations, one expired lease (its station stays busy:
    no watch feeds the view here) and one queued job: (jobs reaped, jobs dispatched)."""
    settings = fast_settings(redispatch_s=60.0)
    b = await Broker.open(url, "test-decide", settings)
    try:
        view = FleetView()
        sched = Scheduler(b, view, settings, "test")
        now = await sched.sync_clock()
        fac = FactoryRecord(id="f1", host="h", os="linux", arch="x86_64", capabilities=["engine:shell"],
                            stations=[Station(index=i, since=now) for i in range(2)], heartbeat_at=now,
                            heartbeat_interval_s=settings.heartbeat_s)
        view.apply_factory("f1", encode(fac), now)
        held = msgspec.structs.replace(building(), id="held-1")
        await b.jobs.delete("held-1")
        rev = await b.jobs.put("held-1", encode(held))
        # Its revision as the view saw it, stored longer than the lease ago (broker time).
        view.apply_job("held-1", encode(held), rev, now - settings.lease_ttl_s - 10)
        st = queued("wait-1", "a", now - 5)
        view.apply_job("wait-1", encode(st.record), 1, now - 5)
        return await sched.reap(), await sched.dispatch()
    finally:
        await b.close()


def test_breaking_the_shared_decisions_changes_the_scheduler_too(nats_server, monkeypatch):
    assert run(_scheduler_reaps_and_dispatches(nats_server.url)) == (1, 1), "the real decisions reap and offer"

    monkeypatch.setattr(decide, "reap", _never)
    monkeypatch.setattr(decide, "hold_reason", lambda *a, **kw: "broken on purpose")

    assert run(_scheduler_reaps_and_dispatches(nats_server.url)) == (0, 0)
