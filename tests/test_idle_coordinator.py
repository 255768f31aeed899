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


def _coordinator_watches(infos: list) -> list:
    return [c for c in infos if c.config.filter_subject == f"$KV.{names.CONTROL_BUCKET}.{H.HALT_KEY}"]


def test_a_halt_written_elsewhere_reaches_the_coordinator_through_its_watch_with_no_read(nats_server, tmp_path):
    """Written by another coordinator or by hand (not through this coordinator's API, which
    applies its own at once): the watch delivers it, and the coordinator read the key only at
    start, not twice a second. A resume arrives the same way."""

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings()) as fleet:
            watch, sched = fleet.coordinator.halt, fleet.coordinator.sched
            await eventually(lambda: watch.watches == 1, 10, what="the halt watch is set up")
            reads = watch.reads
            await change_state(fleet.admin, _halt("web"))
            await eventually(lambda: H.covering(sched.halt, "web") is not None, 10, what="the halt reached dispatch")
            await change_state(fleet.admin, lambda s: H.resume(s, product="web"))
            await eventually(lambda: not sched.halt.any, 10, what="the resume reached dispatch")
            assert watch.reads == reads, "no read of the key: the watch delivered both changes"
            assert watch.heard >= 2 and watch.watches == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_coordinators_halt_watch_lost_on_the_broker_is_set_up_again_and_a_later_halt_arrives(nats_server,
                                                                                               tmp_path):
    """A watch whose consumer vanished goes silent; within a heartbeat (plus a request
    timeout) the coordinator watches again, and a halt written after the loss reaches dispatch."""
    settings = fast_settings()

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            watch, sched = fleet.coordinator.halt, fleet.coordinator.sched
            stream = f"KV_{names.CONTROL_BUCKET}"
            [lost] = await eventually(lambda: _coordinator_watches_now(fleet, stream), 10, what="the halt watch")
            await fleet.admin.js.delete_consumer(stream, lost.name)
            await change_state(fleet.admin, _halt("web"))
            await eventually(lambda: H.covering(sched.halt, "web") is not None,
                             2 * settings.heartbeat_s + settings.request_timeout_s + 10,
                             what="the halt reached dispatch through a new watch")
            assert watch.watches == 2
            [now] = await _coordinator_watches_now(fleet, stream)
            assert now.name != lost.name

    asyncio.run(asyncio.wait_for(main(), 60))


async def _coordinator_watches_now(fleet: Fleet, stream: str) -> list:
    return _coordinator_watches(await fleet.admin.js.consumers_info(stream))


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
