"""The coordinator process: view, scheduler, reaper, API and inbox, run together.

Several coordinators may run against one broker: every transition they make is a
compare-and-set, the API is a queue group, and two reapers racing cannot both win.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from gigafactory.broker import Broker
from gigafactory.config import Settings

from .api import Api
from .inbox import Inbox
from .scheduler import Scheduler, loop
from .view import FleetView, follow

log = logging.getLogger("gigafactory.coordinator")


class Coordinator:
    """Run with :meth:`run` until ``stop`` is set. ``ready`` is set once the API answers and
    the view has replayed the broker's records."""

    def __init__(self, broker: Broker, settings: Settings | None = None, *, inbox: str | None = None,
                 name: str | None = None) -> None:
        self.b = broker
        self.s = settings or broker.settings
        self.name = name or f"coordinator@{socket.gethostname()}"
        self.view = FleetView()
        self.sched = Scheduler(broker, self.view, self.s, self.name)
        self.api = Api(broker, self.view, self.sched, self.name)
        self.inbox = Inbox(broker, inbox) if inbox else None
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        follower = asyncio.create_task(follow(self.b, self.view, stop), name="view")
        tasks: list[asyncio.Task] = [follower]
        try:
            await self.api.start()
            await asyncio.wait_for(
                asyncio.gather(self.view.jobs_synced.wait(), self.view.factories_synced.wait()),
                timeout=max(60.0, self.s.request_timeout_s * 4),
            )
            await self.sched.sync_clock()
            await self.sched.load_index()
            self.ready.set()
            log.info("%s ready: %d jobs, %d factories", self.name, len(self.view.jobs), len(self.view.factories))

            async def schedule() -> None:
                await self.sched.resolve_deps()
                await self.sched.dispatch()

            async def clock() -> None:
                await self.sched.sync_clock()

            tasks += [
                asyncio.create_task(loop("schedule", 0.5, schedule, stop, self.view.changed), name="schedule"),
                # The queue index (the polling fallback's pointer) on a period of its own: a
                # dispatch pass never waits behind index writes, and entries are due only
                # after index_after_s anyway.
                asyncio.create_task(loop("index", min(0.5, self.sched.index_after_s), self.sched.sync_index, stop),
                                    name="index"),
                asyncio.create_task(loop("reaper", self.s.reaper_interval_s, self.sched.reap, stop), name="reaper"),
                asyncio.create_task(loop("locks", 5.0, self.sched.release_stale_locks, stop), name="locks"),
                asyncio.create_task(loop("repair", self.s.dispatch_repair_s, self.sched.repair_dispatch, stop), name="repair"),
                asyncio.create_task(loop("clock", 5.0, clock, stop), name="clock"),
            ]
            if self.inbox is not None:
                tasks.append(asyncio.create_task(loop("inbox", 0.5, self.inbox.scan, stop), name="inbox"))
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.api.stop()
            except Exception:
                pass
