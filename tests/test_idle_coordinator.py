"""An idle coordinator's fixed passes cost nothing per factory and send no request a second.

A thousand idle factories and the coordinator share two cores: the coordinator follows the
halt key with a watch (no read twice a second), a dispatch pass with nothing queued plans
nothing (no walk of every factory and lease), and a reaper pass with no lease reads no broker
clock. Each behaviour still does its job: a halt written elsewhere reaches dispatch at once, a
lost watch is set up again, a job submitted to the idle fleet is dispatched and run.
"""

from __future__ import annotations

import asyncio
import time

from gigafactory.coordinator.halt import change_state
from gigafactory.schemas import halt as H
from gigafactory.schemas import names

from helpers import Fleet, eventually, fast_settings


def _halt(product: str):
    return lambda s: H.halt(s, product=product, mode="drain", at=time.time(), actor="test", reason="by hand")


def test_a_halt_written_elsewhere_is_heard_and_read_at_once_and_the_key_is_not_polled(nats_server, tmp_path):
    """Written by another coordinator or by hand (not through this coordinator's API, which
    applies its own at once): the write is heard on the key's subject and read at once; between
    writes the key is read once a heartbeat (the bound on a missed notice), not twice a second.
    No consumer is used: the control stream's consumers are the factories' halt watches, and
    the server refuses consumers past 1,000 per stream."""
    settings = fast_settings(heartbeat_s=5.0)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            watch, sched = fleet.coordinator.halt, fleet.coordinator.sched
            await eventually(lambda: watch.watches == 1 and watch.reads >= 2, 10, what="the halt key followed")
            assert await fleet.admin.js.consumers_info(f"KV_{names.CONTROL_BUCKET}") == []
            await change_state(fleet.admin, _halt("web"))
            await eventually(lambda: H.covering(sched.halt, "web") is not None, 10, what="the halt reached dispatch")
            await change_state(fleet.admin, lambda s: H.resume(s, product="web"))
            await eventually(lambda: not sched.halt.any, 10, what="the resume reached dispatch")
            assert watch.heard >= 2 and watch.reads_heard >= 2, "both writes were heard, each answered by a read"
            reads, passes = watch.reads, sched.passes
            await eventually(lambda: sched.passes >= passes + 8, 20, what="eight dispatch passes (4 s)")
            assert watch.reads - reads <= 1, "read once a heartbeat (5 s) at most, not twice a second"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_idle_coordinators_passes_walk_no_factory_and_read_no_clock_yet_a_new_job_runs(nats_server, tmp_path):
    """With nothing queued and no offer out, a dispatch pass plans nothing and skips the walk of
    every factory and lease; a reaper pass with no lease reads no broker clock (the clock loop
    keeps the offset). A job submitted to that idle fleet is still dispatched and run at once."""

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings()) as fleet:
            await fleet.add_factory("f1")
            await fleet.add_factory("f2")
            sched = fleet.coordinator.sched
            passes, idle, rounds, clocks = sched.passes, sched.passes_idle, sched.reap_rounds, sched.clock_reads
            await eventually(lambda: sched.passes >= passes + 4 and sched.reap_rounds >= rounds + 8, 20,
                             what="dispatch and reaper passes")
            assert sched.passes_idle - idle == sched.passes - passes, "every idle pass planned nothing"
            # The reaper ran 8 times; only the clock loop (every 5 s) read the broker's clock.
            assert sched.clock_reads - clocks <= 1 + (sched.reap_rounds - rounds) // 8, (sched.clock_reads, clocks)
            planned = sched.passes - sched.passes_idle
            job = await fleet.submit_one(fleet.job(review_policy="auto"))
            await fleet.wait_stage(job, "shipped", timeout_s=30)
            assert sched.passes - sched.passes_idle > planned, "a pass planned the new job"

    asyncio.run(asyncio.wait_for(main(), 90))


def test_the_ref_clean_up_pass_looks_only_at_ended_repo_jobs_whose_refs_are_not_cleaned():
    """The pass runs every 2 s: it keeps the ended ``repo`` jobs still to clean as the view
    changes, instead of sorting every finished job the view holds (100,000 after a busy day)."""
    import msgspec

    from gigafactory.coordinator.shipping import RefCleaner
    from gigafactory.coordinator.view import FleetView
    from gigafactory.schemas.lifecycle import Stage
    from gigafactory.schemas.records import encode
    from test_chaos import job_text_record

    view = FleetView()

    def put(rec, revision: int) -> None:
        view.apply_job(rec.id, encode(rec), revision, time.time())

    def with_repo(jid: str, stage: Stage, **kw):
        rec = job_text_record(jid)
        return msgspec.structs.replace(rec, stage=stage, manifest=msgspec.structs.replace(rec.manifest, repo="r"), **kw)

    put(with_repo("before", Stage.SHIPPED), 1)  # in the view before the cleaner starts
    put(msgspec.structs.replace(job_text_record("plain"), stage=Stage.SHIPPED), 1)  # no repo: nothing to clean
    cleaner = RefCleaner(None, view)
    assert cleaner.pending == {"before"}
    put(with_repo("later", Stage.QUEUED), 1)
    assert cleaner.pending == {"before"}, "not ended yet"
    put(with_repo("later", Stage.FAILED), 2)
    assert cleaner.pending == {"before", "later"}
    put(with_repo("before", Stage.SHIPPED, refs_cleaned="deleted 2 branches"), 2)
    view.apply_job("later", None, 3, time.time())  # archived
    assert cleaner.pending == set()


def test_a_coordinator_loop_makes_no_task_per_round_and_still_wakes_early_and_stops():
    """Ten loops run for the coordinator's whole life, several twice a second: a round's wait
    makes no task (before: one waiting on ``stop`` and one on ``wake``, made and cancelled per
    round). A set ``wake`` still starts the next round before the period ends, and ``stop``
    still ends the loop."""
    from gigafactory.coordinator.scheduler import loop

    async def main():
        made = []
        ev_loop = asyncio.get_running_loop()

        def factory(lp, coro, **kw):
            made.append(getattr(coro, "__qualname__", repr(coro)))
            return asyncio.Task(coro, loop=lp, **kw)

        ev_loop.set_task_factory(factory)
        stop, wake, rounds = asyncio.Event(), asyncio.Event(), []

        async def body() -> None:
            rounds.append(1)
            if len(rounds) >= 50:
                stop.set()

        task = asyncio.create_task(loop("test", 0.001, body, stop))
        await asyncio.wait_for(task, 30)
        # Woken early: a period of an hour, ended by ``wake`` each round.
        stop2, woken = asyncio.Event(), []

        async def body2() -> None:
            woken.append(1)
            if len(woken) >= 5:
                stop2.set()

        task2 = asyncio.create_task(loop("test-wake", 3600.0, body2, stop2, wake))
        while not task2.done():
            wake.set()
            await asyncio.sleep(0)
        ev_loop.set_task_factory(None)
        return made, len(rounds), len(woken)

    made, rounds, woken = asyncio.run(asyncio.wait_for(main(), 60))
    assert rounds == 50 and woken == 5
    assert made == ["loop", "loop"], made  # the two loop tasks themselves, nothing per round
