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
            classes = {e["data"]["class"] for e in evs if e["kind"] == "station"}
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
            assert {e["data"]["class"] for e in evs if e["kind"] == "station"} >= {"policy-paused"}
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
