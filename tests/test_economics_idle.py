"""Idle classes: every station, every second, has a class, read back from the durable
``station`` events. The arithmetic is a table test; the figures of a real fleet with churn (a
lock held elsewhere, a factory stopped and started again) read 100% coverage against a real
broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from gigafactory.economics import idle
from gigafactory.economics.idle import Transition as T
from gigafactory.schemas import names

from helpers import Fleet, eventually, fast_settings


def test_intervals_close_at_the_next_event_the_factory_leaving_and_the_window():
    ts = [T(10, "f", 0, "starting"), T(12, "f", 0, "no-work"), T(15, "f", 0, "busy"), T(20, "f", 0, "lock-wait"),
          T(22, "f", None, None), T(11, "g", 0, "no-work")]
    ivs = idle.intervals(ts, since_s=11, until_s=30)
    got = [(iv.factory, iv.cls, iv.reason, iv.start_s, iv.end_s) for iv in ivs]
    assert ("f", "prewarm", "starting", 11, 12) in got, "clipped to the window's start"
    assert ("f", "busy", "busy", 15, 20) in got
    assert ("f", "blocked", "lock-wait", 20, 22) in got, "factory_down ends it"
    assert ("g", "no-work", "no-work", 11, 30) in got, "an open interval ends at the window's end"
    s = idle.summarise(ivs)[""]
    assert (s.busy_s, s.idle_s, s.available_s) == (5, 3 + 2 + 19 + 1, 5 + 25)
    assert s.coverage == 1.0 and s.lane_allocation == pytest.approx(5 / 30)


@pytest.mark.parametrize("cls,covered", [("no-work", 1.0), ("", 0.5), ("made-up", 0.5), (None, 0.5)])
def test_an_unknown_or_missing_class_is_dark_idle_and_lowers_coverage(cls, covered):
    ivs = idle.intervals([T(0, "f", 0, "seat-limit"), T(10, "f", 0, cls), T(20, "f", 0, "busy")], 0, 20)
    s = idle.summarise(ivs)[""]
    assert s.coverage == covered
    assert s.lane_allocation == 0.0


def test_summaries_by_factory_and_an_empty_window():
    ivs = idle.intervals([T(0, "a", 0, "busy"), T(0, "b", 0, "no-work"), T(0, "b", 1, "busy")], 0, 10)
    by = idle.summarise(ivs, by="factory")
    assert by["a"].lane_allocation == 1.0 and by["b"].lane_allocation == 0.5 and by["b"].stations == 2
    empty = idle.summarise([])[""]
    assert empty.coverage == 1.0 and empty.lane_allocation == 0.0
    with pytest.raises(ValueError, match="factory or station"):
        idle.summarise(ivs, by="job")


def _ev(kind: str, at: float, factory: str = "f", job: str | None = None, **data) -> dict:
    return {"kind": kind, "at": at, "factory": factory, "job": job, "data": data}


def _st(at: float, station: int, cls: str, factory: str = "f") -> dict:
    return _ev("station", at, factory, station=station, **{"class": cls})


# One timeline, as an older factory said it (a ``station`` event at every change, busy too, and
# end events that say nothing of the station) and as a factory says it now (``claimed`` is
# busy, a run's end event carries the class its station goes to). Station f/0 runs a, then b
# (which waits on the merge for a while), and drains; f/1 runs c and hands it back on the drain;
# g/0's job d finds its lock held (its release says lock-wait, in both). Events of the old
# style a new factory still sends are in both lists.
_COMMON = [_ev("factory_up", 0.0), _st(0.1, 0, "starting"), _st(0.1, 1, "starting"),
           _st(1.0, 0, "no-work"), _st(1.0, 1, "no-work"),
           _st(7.0, 0, "waiting-merge"), _st(8.0, 0, "busy"), _st(10.0, 0, "draining"),
           _ev("factory_down", 11.0),
           _ev("factory_up", 0.0, "g"), _st(0.5, 0, "no-work", "g"), _ev("claimed", 1.0, "g", "d", station=0),
           _ev("handed_back", 2.0, "g", "d"), _st(2.0, 0, "lock-wait", "g"), _st(4.0, 0, "no-work", "g")]
_OLD = _COMMON + [
    _ev("claimed", 2.0, job="a", station=0), _st(2.0005, 0, "busy"),
    _ev("finished", 5.0, job="a", outcome="passed"), _st(5.0, 0, "no-work"),
    _ev("claimed", 3.0, job="c", station=1), _st(3.0005, 1, "busy"),
    _ev("claimed", 5.5, job="b", station=0), _st(5.5005, 0, "busy"),
    _ev("finished", 9.0, job="b", outcome="passed"), _st(9.0, 0, "no-work"),
    _ev("handed_back", 10.0, job="c"), _st(10.0, 1, "draining"),
    _st(1.5, 0, "busy", "g"), _ev("finished", 1.5, "g", "x")]  # an older factory's outbox replay
_NEW = _COMMON + [
    _ev("claimed", 2.0, job="a", station=0), _ev("finished", 5.0, job="a", station=0, station_class="no-work"),
    _ev("claimed", 3.0, job="c", station=1),
    _ev("claimed", 5.5, job="b", station=0), _ev("finished", 9.0, job="b", station=0, station_class="no-work"),
    _ev("handed_back", 10.0, job="c", station=1, station_class="draining"),
    _st(1.5, 0, "busy", "g"), _ev("finished", 1.5, "g", "x", outcome="passed")]  # a replay says no class


def _timeline(evs: list[dict], since_s: float = 0.0, until_s: float = 12.0):
    ivs = idle.intervals(idle.transitions_from_events(evs), since_s, until_s)
    return sorted((iv.factory, iv.station, iv.cls, iv.reason, iv.start_s, iv.end_s) for iv in ivs)


def test_the_jobs_own_events_give_the_intervals_the_station_events_gave():
    old, new = _timeline(_OLD), _timeline(_NEW)
    assert new == old
    assert ("f", 0, "busy", "busy", 2.0, 5.0) in new and ("f", 0, "no-work", "no-work", 5.0, 5.5) in new
    assert ("f", 0, "waiting-merge", "waiting-merge", 7.0, 8.0) in new
    assert ("f", 1, "draining", "draining", 10.0, 11.0) in new, "a drained hand-back says draining"
    assert ("g", 0, "blocked", "lock-wait", 2.0, 4.0) in new, "a hand-back with no class: its release says it"
    assert idle.summarise(idle.intervals(idle.transitions_from_events(_NEW), 0, 12))[""].to_dict() == \
        idle.summarise(idle.intervals(idle.transitions_from_events(_OLD), 0, 12))[""].to_dict()
    # The same from a window that starts inside a busy interval, and in any stream order (events
    # of different jobs may be stored out of the order a factory queued them).
    assert _timeline(list(reversed(_NEW)), 3.0, 9.5) == _timeline(_OLD, 3.0, 9.5)
    assert sum(e["kind"] == "station" for e in _NEW) < sum(e["kind"] == "station" for e in _OLD) - 5


@pytest.mark.parametrize("ev", [
    _ev("claimed", 1.0, job="a"),  # no station
    _ev("claimed", 1.0, job="a", station=True),
    _ev("claimed", 1.0, None, "a", station=0),  # no factory
    _ev("finished", 1.0, job="a", station="0", station_class="busy"),
    {"kind": "claimed", "at": "1", "factory": "f", "data": {"station": 0}},
    {"kind": "claimed", "at": 1.0, "factory": "f", "data": ["station", 0]},
])
def test_a_job_event_that_does_not_name_its_station_says_nothing_of_it(ev):
    assert idle.transitions_from_events([ev]) == []


def test_an_end_event_with_an_unknown_class_is_dark_idle():
    evs = [_ev("claimed", 0.0, job="a", station=0), _ev("finished", 4.0, job="a", station=0, station_class="nap")]
    s = idle.summarise(idle.intervals(idle.transitions_from_events(evs), 0, 10))[""]
    assert (s.busy_s, s.idle_s, s.coverage) == (4.0, 6.0, 0.0)


def test_a_station_taking_job_after_job_sends_no_station_event(nats_server, tmp_path):
    """One station, a backlog of jobs: its busy and idle are said by the jobs' ``claimed`` and
    ``finished`` events alone, and the intervals read back from them cover every second."""
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("b2b", stations=1)
            since = time.time() - 1
            jobs = [j["job"] for j in await fleet.submit(*(fleet.job("echo ok", review_policy="auto")
                                                           for _ in range(5)))]
            for j in jobs:
                await fleet.wait_stage(j, "shipped", timeout_s=30)

            async def all_said():
                evs = await idle.read_station_events(fleet.admin, since)
                ends = [e for e in evs if e["kind"] == "finished" and e.get("job") in jobs]
                return evs if len(ends) == len(jobs) else None

            evs = await eventually(all_said, 15, what="every job's finished event")
            runs = [e for e in evs if e.get("job") in jobs and e["kind"] in ("claimed", "finished")]
            first, last = min(e["at"] for e in runs), max(e["at"] for e in runs)
            between = [e for e in evs if e["kind"] == "station" and first <= e["at"] <= last]
            assert between == [], f"station events while the station took job after job: {between}"
            ends = [e["data"] for e in runs if e["kind"] == "finished"]
            assert all(d["station"] == 0 and d["station_class"] == "no-work" for d in ends), ends
            ivs = idle.intervals(idle.transitions_from_events(evs), since, last)
            busy = [iv for iv in ivs if iv.cls == "busy"]
            assert len(busy) == len(jobs), busy
            s = idle.summarise(ivs)[""]
            assert s.coverage == 1.0 and s.busy_s > 0 and s.stations == 1, s.to_dict()

    asyncio.run(main())


def test_a_class_that_changed_between_the_end_event_and_the_release_is_said_at_the_release(nats_server, tmp_path):
    """The end event says the class the station would take then; a halt that arrives before the
    run releases its station changes it, and the release says so with a ``station`` event."""
    import msgspec

    from gigafactory.factory.holder import Run
    from gigafactory.schemas.records import JobRecord

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("r-1", stations=1)
            since = time.time() - 1
            idx = await f._take_station(None)
            assert idx == 0
            rec = msgspec.json.decode(msgspec.json.encode({
                "id": "jx", "manifest": {}, "body": "", "source": "t", "content_hash": "h", "submitted_at": 0.0,
                "pool": "p", "requirements": [], "stage": "building", "epoch": 1}), type=JobRecord)
            run = Run("jx", 1, idx, 1, rec)
            f.runs[("jx", 1)] = run
            f._set_station(idx, "jx", 1)
            said = f._station_after_run(run)
            assert said == {"station": 0, "station_class": "no-work"}
            assert f._station_after_run(Run("jx", 1, idx, 1, rec)) == {}, "a run not holding the station says nothing"
            await fleet.client.call("halt", {"mode": "drain", "actor": "ops"})
            await eventually(lambda: f.halt_state.fleet is not None, 10, what="the factory to see the halt")
            f.runs.pop(("jx", 1))
            await f._release_station(idx, None)

            async def released():
                evs = await idle.read_station_events(fleet.admin, since)
                mine = [e for e in evs if e["kind"] == "station" and e["data"]["class"] == "policy-paused"]
                return mine or None

            mine = await eventually(released, 10, what="the release's policy-paused station event")
            assert [e["data"]["station"] for e in mine] == [0]

    asyncio.run(main())


def test_every_station_second_of_a_fleet_with_churn_is_classified(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            since = time.time() - 1
            await fleet.add_factory("i-1", stations=2)
            await fleet.add_factory("i-2")
            # A lock entry written by hand holds lock L (until it is as old as a dead holder's):
            # the job that needs it is offered, finds it taken and is handed back, and its
            # station says lock-wait (a kind of blocked).
            await fleet.admin.locks.put(names.safe_key("L"), b"held by hand")
            locked = await fleet.submit_one(fleet.job("echo ok", lock="L", review_policy="auto"), "locked.md")
            await eventually(lambda: any_kind(fleet, locked, "lock_wait"), 15, what="the lock_wait event")
            jobs = [j["job"] for j in await fleet.submit(*(fleet.job("sleep 0.2", review_policy="auto")
                                                           for _ in range(4)))]
            await fleet.stop("i-2")  # churn: a factory leaves and another joins
            await fleet.add_factory("i-3")
            for j in [locked, *jobs]:
                await fleet.wait_stage(j, "shipped", timeout_s=30)

            async def figures():
                evs = await idle.read_station_events(fleet.admin, since)
                ivs = idle.intervals(idle.transitions_from_events(evs), since, time.time())
                s = idle.summarise(ivs)[""]
                return (s, evs) if s.busy_s > 0 and s.stations == 4 else None

            s, evs = await eventually(figures, 15, what="station events of every factory")
            assert s.coverage == 1.0, s.to_dict()
            assert 0 < s.lane_allocation < 1, s.to_dict()
            classes = {t.cls for t in idle.transitions_from_events(evs)}
            assert {"busy", "no-work", "starting", "lock-wait", "draining"} <= classes, classes
            assert s.by_class_s.get("blocked", 0) > 0 and s.by_class_s.get("prewarm", 0) > 0, s.to_dict()

    asyncio.run(main())


async def any_kind(fleet: Fleet, job: str, kind: str) -> bool:
    return any(e["kind"] == kind for e in await fleet.events(job))


def _figures_since(fleet: Fleet, since: float, cls: str):
    """The idle summary of the fleet since ``since`` once ``cls`` has some seconds, else None."""
    async def figures():
        evs = await idle.read_station_events(fleet.admin, since)
        ivs = idle.intervals(idle.transitions_from_events(evs), since, time.time())
        s = idle.summarise(ivs).get("")
        return s if s is not None and s.by_class_s.get(cls, 0) > 0 else None
    return figures


def test_a_halted_fleets_idle_stations_read_policy_paused_and_coverage_stays_full(nats_server, tmp_path):
    """The kill switch is policy: a halted factory's free stations are paused, not short of
    work (issue 13), in its record, in its station events and in the idle report."""
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            since = time.time() - 1
            f = await fleet.add_factory("h-1", stations=2)
            await fleet.client.call("halt", {"mode": "drain", "actor": "ops"})
            await eventually(lambda: all(st.idle_reason == "policy-paused" for st in f.record.stations), 10,
                             what="the factory's stations paused by the halt")
            job = await fleet.submit_one(fleet.job("echo ok", review_policy="auto"))
            s = await eventually(_figures_since(fleet, since, "policy-paused"), 15, what="policy-paused seconds")
            assert s.coverage == 1.0, s.to_dict()
            assert s.by_class_s.get("no-work", 0) < s.by_class_s["policy-paused"] + 5, s.to_dict()
            evs = await idle.read_station_events(fleet.admin, since)
            assert {t.cls for t in idle.transitions_from_events(evs)} >= {"policy-paused"}
            await fleet.client.call("resume", {"actor": "ops"})
            await fleet.wait_stage(job, "shipped", timeout_s=30)
            await eventually(lambda: all(st.idle_reason == "no-work" for st in f.record.stations), 10,
                             what="no-work again once resumed")

    asyncio.run(main())


def test_work_held_for_its_budget_pauses_the_stations_that_would_take_it(nats_server, tmp_path):
    """With enforcement on, a job over the per-run cap is held ``budget``; the coordinator says
    which pools it holds (the ``policy-holds`` control key) and the factory serving that pool reads
    ``policy-paused``; once the job is let go, ``no-work`` again."""
    async def main():
        settings = fast_settings(pipeline_budget_enforcement=True, max_cost_per_run_usd=0.5,
                                 budget_default_projected_usd=0.1, budget_signals_max_age_s=0)
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            since = time.time() - 1
            f = await fleet.add_factory("b-1")
            job = await fleet.submit_one(fleet.job("echo ran", review_policy="auto", budget={"usd": 2}))
            await eventually(lambda: all(st.idle_reason == "policy-paused" for st in f.record.stations), 15,
                             what="the station paused for the budget hold")
            assert f.policy_held_pools, "the factory read the policy-holds key"
            s = await eventually(_figures_since(fleet, since, "policy-paused"), 15, what="policy-paused seconds")
            assert s.coverage == 1.0, s.to_dict()
            await fleet.client.call("budget_override", {"job": job, "actor": "alice", "reason": "worth it"})
            await fleet.wait_stage(job, "shipped", timeout_s=30)
            await eventually(lambda: not f.policy_held_pools and all(
                st.idle_reason == "no-work" for st in f.record.stations), 15, what="no-work once let go")

    asyncio.run(main())


def test_a_product_halt_pauses_the_stations_whose_pool_holds_its_jobs(nats_server, tmp_path):
    """A halt of one product holds its queued jobs; the factory serving their pool has work it may
    not take: its free station reads ``policy-paused`` (not ``no-work``) until the resume."""
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("p-1")
            await fleet.client.call("halt", {"product": "web", "mode": "drain", "actor": "ops"})
            job = await fleet.submit_one(fleet.job("echo ok", review_policy="auto", product="web"))
            await eventually(lambda: all(st.idle_reason == "policy-paused" for st in f.record.stations), 15,
                             what="the station paused by the product halt")
            await fleet.client.call("resume", {"product": "web", "actor": "ops"})
            await fleet.wait_stage(job, "shipped", timeout_s=30)
            await eventually(lambda: not f.policy_held_pools and all(
                st.idle_reason == "no-work" for st in f.record.stations), 15, what="no-work once resumed")

    asyncio.run(main())
