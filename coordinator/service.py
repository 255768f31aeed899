"""The coordinator process: view, scheduler, reaper, API and inbox, run together.

Several coordinators may run against one broker: every transition they make is a
compare-and-set, the API is a queue group, and two reapers racing cannot both win.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time

import nats.errors
import nats.js.errors

from gigafactory.broker import TRANSIENT, Broker
from gigafactory.config import Settings
from gigafactory.economics.ledger import LedgerPass
from gigafactory.economics.runs import MergeQueue, RunsRecorder
from gigafactory.metrics import process_metrics

from .api import Api
from .halt import HaltWatch
from .inbox import Inbox
from .retention import Retention
from .shipping import REF_CLEANUP_INTERVAL_S, RefCleaner
from .scheduler import Scheduler, loop
from .view import FleetView, follow

RUNS_FLUSH_S = 2.0
"""How often ended jobs are written to pipeline_runs and job_outcomes."""

log = logging.getLogger(__name__)

STARTUP_RETRY_MAX_S = 5.0
"""Longest pause between tries of a startup read the broker refused for now."""
STARTUP_LOG_EVERY_S = 30.0
"""While a startup read keeps failing, it is logged once, then at most this often."""
STARTUP_TRANSIENT = TRANSIENT + (nats.errors.Error, nats.js.errors.APIError)
"""What a startup read retries rather than exits on: the broker not answering, and refusals
that pass with time ("maximum consumers limit reached" while a fleet's scans hold the
stream's consumers, a stream without a leader yet). A coordinator that exits on them takes
the API down with it, for a condition that clears by itself."""


class Coordinator:
    """Run with :meth:`run` until ``stop`` is set. ``ready`` is set once the API answers and
    the view has replayed the broker's records."""

    def __init__(self, broker: Broker, settings: Settings | None = None, *, inbox: str | None = None,
                 name: str | None = None) -> None:
        self.broker = broker
        self.settings = settings or broker.settings
        self.name = name or f"coordinator@{socket.gethostname()}"
        self.view = FleetView()
        self.sched = Scheduler(broker, self.view, self.settings, self.name)
        self.api = Api(broker, self.view, self.sched, self.name)
        self.ledger = LedgerPass(broker)
        """The spend ledger's one reader: the metrics' coverage and invoice drift, and the running
        totals the runs recorder and the budget governor read (economics/ledger.py)."""
        self.sched.governor.ledger = self.ledger
        self.runs = RunsRecorder(broker, self.view, self.settings, self.ledger)  # pipeline_runs (issue 13)
        self.view.job_listeners.append(self.runs.on_job)
        self.merge_queue = MergeQueue()  # occupancy and refill latency (a metric)
        self.view.job_listeners.append(self.merge_queue.on_job)
        self.halt = HaltWatch(broker, self.sched)
        self.api.halt_watch = self.halt
        self.inbox = Inbox(broker, inbox) if inbox else None
        self.retention = Retention(broker, self.view, self.settings, self.name, forget_pool=self.sched.pools_ready.discard)
        self.ready = asyncio.Event()
        self.startup_retries = 0
        """Startup reads retried after a transient broker error (see :meth:`_until_done`)."""
        self.replay_s: float | None = None
        """How long the first replay of gf_jobs and gf_factories took (None until done)."""
        process_metrics().add_coordinator(self)  # metrics: read at scrape time, held weakly

    async def run(self, stop: asyncio.Event) -> None:
        replay_t0 = time.monotonic()
        follower = asyncio.create_task(follow(self.broker, self.view, stop), name="view")
        tasks: list[asyncio.Task] = [follower]
        try:
            await self.api.start()
            await asyncio.wait_for(
                asyncio.gather(self.view.jobs_synced.wait(), self.view.factories_synced.wait()),
                timeout=max(60.0, self.settings.request_timeout_s * 4),
            )
            self.replay_s = time.monotonic() - replay_t0
            await self._until_done("reading the broker clock", self.sched.sync_clock, stop)
            await self._until_done("loading the queue index", self.sched.load_index, stop)
            await self._until_done("reading the halt state", self.halt.refresh, stop)  # before any dispatch
            if stop.is_set():
                return
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
                asyncio.create_task(loop("reaper", self.settings.reaper_interval_s, self.sched.reap, stop), name="reaper"),
                asyncio.create_task(loop("locks", 5.0, self.sched.release_stale_locks, stop), name="locks"),
                asyncio.create_task(loop("repair", self.settings.dispatch_repair_s, self.sched.repair_dispatch, stop), name="repair"),
                asyncio.create_task(loop("clock", 5.0, clock, stop), name="clock"),
                asyncio.create_task(loop("runs", RUNS_FLUSH_S, self.runs.flush, stop), name="runs"),
                # Read when a write is heard, and once a heartbeat (not twice a second).
                asyncio.create_task(self.halt.follow(stop, self.settings.heartbeat_s), name="halt"),
                asyncio.create_task(loop("retention", self.settings.retention_interval_s, self.retention.run_pass, stop),
                                    name="retention"),
                asyncio.create_task(loop("refs", REF_CLEANUP_INTERVAL_S, RefCleaner(self.broker, self.view).run_pass, stop),
                                    name="refs"),
            ]
            if self.settings.spend_metrics_interval_s:
                tasks.append(asyncio.create_task(loop("ledger", self.settings.spend_metrics_interval_s, self.ledger.run_pass,
                                                      stop), name="ledger"))
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

    async def _until_done(self, what: str, step, stop: asyncio.Event) -> None:
        """Run the startup ``step`` until it succeeds or ``stop`` is set; a transient broker
        error is retried with jittered back-off (up to STARTUP_RETRY_MAX_S), logged when it
        first happens and then at most every STARTUP_LOG_EVERY_S, never the reason to exit.
        Anything else is a bug and raises."""
        tries, logged_at = 0, float("-inf")
        while not stop.is_set():
            try:
                await step()
                if tries:
                    log.info("%s: %s succeeded after %d failed tries", self.name, what, tries)
                return
            except STARTUP_TRANSIENT as e:
                tries += 1
                self.startup_retries += 1
                if time.monotonic() - logged_at >= STARTUP_LOG_EVERY_S:
                    logged_at = time.monotonic()
                    log.warning("%s: %s failed (%s: %s); retrying (try %d)", self.name, what,
                                type(e).__name__, e, tries)
                pause = min(STARTUP_RETRY_MAX_S, 0.1 * 2 ** min(tries, 10))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=random.uniform(pause / 2, pause))
                except asyncio.TimeoutError:
                    pass
