"""Push path down (chaos scenario 5): with the dispatch stream or a pool's consumer deleted,
factories fall back to polling the ``gf_queue`` index and jobs keep completing; once the
coordinator has repaired the push path, every factory returns to it.

The bounded scenario runs on real processes (the chaos lab); the focused tests pin the
factory's switch down in-process, against a real ``nats-server``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import Fleet, eventually, fast_settings

from gigafactory.chaos.harness import ScenarioConfig
from gigafactory.chaos.runner import run_scenario
from gigafactory.schemas import names
from gigafactory.schemas.records import FactoryRecord, decode


def claimed_via(events: list[dict]) -> list[str]:
    return [e["data"].get("via") for e in events if e["kind"] == "claimed"]


async def fleet_events(fleet: Fleet, kind: str) -> list[dict]:
    """The fleet-wide events of ``kind`` (not about one job), oldest first."""
    from nats.js import api

    import orjson

    psub = await fleet.admin.js.pull_subscribe(
        names.fleet_events_subject(kind), stream=names.EVENTS_STREAM,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                  inactive_threshold=10.0, mem_storage=True),
    )
    out: list[dict] = []
    try:
        info = await psub.consumer_info()
        while len(out) < info.num_pending:
            out += [orjson.loads(m.data) for m in await psub.fetch(100, timeout=2.0)]
    finally:
        await psub.unsubscribe()
    return out


@pytest.mark.timeout(90)
def test_a_factory_polls_while_its_consumer_is_deleted_and_returns_to_push_once_it_is_recreated(nats_server, tmp_path):
    # The coordinator's own repair runs once at start and then not for an hour: the test keeps
    # the consumer deleted, then runs that same repair itself. A submission would recreate the
    # consumer too (intake ensures the pool), so the job to be polled is submitted first, while
    # the only station is busy, and the consumer deleted after.
    settings = fast_settings(dispatch_repair_s=3600.0, poll_backoff_max_s=1.0)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("poller", caps=["pushpath"])
            gate = tmp_path / "gate"
            first = await fleet.submit_one(fleet.job(f'while [ ! -e "{gate}" ]; do sleep 0.05; done',
                                                     capabilities=["pushpath"], review_policy="auto"))
            await fleet.wait_stage(first, "building")
            polled = await fleet.submit_one(fleet.job("echo two", capabilities=["pushpath"], review_policy="auto"),
                                            path="two.md")
            [ps] = f.pools.values()
            assert ps.mode == "push"
            await fleet.admin.js.delete_consumer(names.DISPATCH_STREAM, names.pool_consumer(ps.id))
            gate.touch()
            await fleet.wait_stage(polled, "shipped")
            assert ps.mode == "poll", "nothing recreated the consumer, so the factory still polls"
            mode_in_record = await eventually(lambda: _record_mode(fleet, "poller", "poll"), 5,
                                              what="the record says poll")

            repaired = await fleet.coordinator.sched.repair_dispatch()
            await eventually(lambda: ps.mode == "push", 15, what="the factory returns to push")
            pushed = await fleet.submit_one(fleet.job("echo three", capabilities=["pushpath"], review_policy="auto"),
                                            path="three.md")
            await fleet.wait_stage(pushed, "shipped")
            await eventually(lambda: _record_mode(fleet, "poller", "push"), 5, what="the record says push")
            switches = [s for s in await fleet_events(fleet, "dispatch_mode") if s["factory"] == "poller"]
            repairs = await fleet_events(fleet, "dispatch_repaired")
            return (ps.id, mode_in_record, repaired, switches, repairs, f.stats,
                    [claimed_via(await fleet.events(j)) for j in (first, polled, pushed)])

    pool, mode_in_record, repaired, switches, repairs, stats, via = asyncio.run(asyncio.wait_for(main(), 80))

    assert via == [["push"], ["poll"], ["push"]]
    assert mode_in_record
    assert repaired == 1
    assert [(s["data"]["from"], s["data"]["to"]) for s in switches] == [("push", "poll"), ("poll", "push")]
    assert "ServiceUnavailable" in switches[0]["data"]["why"], switches[0]
    assert switches[1]["data"]["polled_claims"] == 1 == stats["polled_claims"]
    assert [r["data"]["recreated"] for r in repairs] == [[f"consumer {names.pool_consumer(pool)}"]]


async def _record_mode(fleet: Fleet, fid: str, mode: str) -> bool:
    e = await fleet.admin.factories.get(fid)
    return e is not None and decode(e.value, FactoryRecord).dispatch_mode == mode


@pytest.mark.timeout(90)
def test_a_deleted_dispatch_stream_is_recreated_and_a_job_waiting_in_a_lock_is_no_stall(nats_server, tmp_path):
    """Two things that must not send a healthy pool to polling, and one that must end it: a
    queued job that waits for its lock (by design) is not a stall, even when it has waited far
    longer than the stall bound; and the coordinator's repair recreates a deleted stream with
    every pool consumer, after which polling factories return to push."""
    settings = fast_settings(dispatch_repair_s=3600.0, poll_backoff_max_s=1.0, redispatch_s=1.0, long_poll_s=0.5)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("locker", stations=2, caps=["lockpath"])
            gate = tmp_path / "gate"
            holder = await fleet.submit_one(fleet.job(f'while [ ! -e "{gate}" ]; do sleep 0.05; done',
                                                      capabilities=["lockpath"], lock="only-one", review_policy="auto"))
            await fleet.wait_stage(holder, "building")
            waiter = await fleet.submit_one(fleet.job("echo waited", capabilities=["lockpath"], lock="only-one",
                                                      review_policy="auto"), path="waiter.md")
            [ps] = f.pools.values()
            # Longer than the stall bound and two stall checks of the idle station.
            t_end = time.monotonic() + f.stall_after_s + 2 * f.stall_check_s + 1.0
            stalled_seen = []
            while time.monotonic() < t_end:
                stalled_seen.append(await f._stalled(ps))
                assert ps.mode == "push", "a job waiting for its lock sent the pool to polling"
                await asyncio.sleep(0.5)  # the schedule of the probe, not a wait for an outcome
            gate.touch()
            await fleet.wait_stage(holder, "shipped")
            await fleet.wait_stage(waiter, "shipped")

            await fleet.admin.js.delete_stream(names.DISPATCH_STREAM)
            await eventually(lambda: ps.mode == "poll", 10, what="the factory falls back to polling")
            polled = await fleet.submit_one(fleet.job("echo polled", capabilities=["lockpath"], review_policy="auto"),
                                            path="polled.md")
            await fleet.wait_stage(polled, "shipped")
            repaired = await fleet.coordinator.sched.repair_dispatch()
            await eventually(lambda: ps.mode == "push", 15, what="the factory returns to push")
            pushed = await fleet.submit_one(fleet.job("echo pushed", capabilities=["lockpath"], review_policy="auto"),
                                            path="pushed.md")
            await fleet.wait_stage(pushed, "shipped")
            return stalled_seen, repaired, [claimed_via(await fleet.events(j)) for j in (polled, pushed)]

    stalled_seen, repaired, via = asyncio.run(asyncio.wait_for(main(), 80))

    assert stalled_seen and not any(stalled_seen)
    assert repaired == 2, "the stream and the pool's consumer"
    assert via == [["poll"], ["push"]]


# -- the scenario ---------------------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_push_path_down_jobs_complete_by_polling_and_every_factory_returns_to_push(tmp_path):
    res = asyncio.run(run_scenario("push-path-down", ScenarioConfig(seed=0, bounded=True,
                                                                    workdir=tmp_path / "push-path-down")))

    assert res.ok, res.to_text()
    f = res.figures
    assert f["outages"] == 2 and sorted(f["outage_targets"]) == ["consumers", "stream"], res.to_text()
    assert all(n > 0 for n in f["jobs_finished_while_down"]), res.to_text()
    assert all(n > 0 for n in f["polled_claims_while_down"]), res.to_text()
    assert all(n == f["factories"] for n in f["factories_fell_back"]), res.to_text()
    assert max(f["fall_back_s_max"]) <= f["fall_back_bound_s"]
    assert max(f["return_s_max"]) <= f["return_bound_s"]
    assert all(n > 0 for n in f["push_claims_after_return"]), res.to_text()
    assert f["records_in_push_at_end"] == f["factories"]
    assert f["jobs_shipped"] == f["jobs_acknowledged"] > 0
