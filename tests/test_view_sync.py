"""The coordinator's view is synced only once its watch delivered every record.

nats-py's "caught up" marker can come before the entries after a broker restart (the server
counts them delivered before they reach the client); ``Bucket.scan`` was fixed for it, and
the view's initial load had the same race: it set ``jobs_synced`` at the marker, so a
coordinator starting then called itself ready with an empty view (and its ``sync_index``
deleted the whole queue index). Seen here in 1 of 60 restarts of a 300-key bucket.
"""

from __future__ import annotations

import asyncio

import pytest

from gigafactory.broker import Broker, caught_up
from gigafactory.config import Settings
from gigafactory.coordinator.view import FleetView, follow
from gigafactory.embedded import EmbeddedServer

from helpers import eventually
from test_chaos import job_text_record

N_JOBS = 300


def test_a_marker_before_the_entries_is_not_caught_up():
    # What nats-py reports at a marker that came first: nothing pending, all delivered, none read.
    assert not caught_up(num_pending=0, delivered=N_JOBS, consumed=0)
    assert not caught_up(num_pending=0, delivered=N_JOBS, consumed=N_JOBS - 1)
    assert not caught_up(num_pending=5, delivered=N_JOBS, consumed=N_JOBS)
    assert caught_up(num_pending=0, delivered=N_JOBS, consumed=N_JOBS)
    assert caught_up(num_pending=0, delivered=0, consumed=0), "an empty bucket is caught up at once"


async def _fill(url: str) -> None:
    from gigafactory.schemas.records import encode

    b = await Broker.open(url, "fill", Settings(request_timeout_s=5.0))
    try:
        for i in range(N_JOBS):
            rec = job_text_record(f"sync-{i:03d}")
            await b.jobs.put(rec.id, encode(rec))
    finally:
        await b.close()


async def _jobs_at_sync(url: str) -> int:
    """Start a view on a fresh connection; how many jobs it holds when it says it is synced."""
    b = await Broker.open(url, "view", Settings(request_timeout_s=5.0), ensure=False)
    view, stop = FleetView(), asyncio.Event()
    task = asyncio.create_task(follow(b, view, stop))
    try:
        await asyncio.wait_for(view.jobs_synced.wait(), 30)
        return len(view.jobs)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await b.close()


@pytest.mark.timeout(60)
def test_the_view_is_synced_with_every_job_on_record(nats_server):
    asyncio.run(_fill(nats_server.url))

    assert asyncio.run(_jobs_at_sync(nats_server.url)) == N_JOBS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_broker_restarts_the_view_is_never_synced_before_its_jobs_are_loaded(tmp_path):
    srv = EmbeddedServer(store_dir=str(tmp_path / "store"), log_file=str(tmp_path / "nats-server.log")).start()
    try:
        asyncio.run(_fill(srv.url))
        counts = []
        for _ in range(150):  # the race showed in about 1 of 60 restarts
            srv.kill()
            srv.start()
            counts.append(asyncio.run(_jobs_at_sync(srv.url)))
    finally:
        srv.stop()

    assert counts == [N_JOBS] * len(counts), [i for i, n in enumerate(counts) if n != N_JOBS]


@pytest.mark.timeout(60)
def test_the_garbage_collector_is_held_off_only_while_the_view_replays(nats_server):
    """The replay holds Python's cyclic collector off (it walked the records built so far,
    most of a record's cost); once synced, the collector runs again, and the view it built
    is frozen out of later collections."""
    import gc

    asyncio.run(_fill(nats_server.url))

    async def main():
        b = await Broker.open(nats_server.url, "view", Settings(request_timeout_s=5.0), ensure=False)
        view, stop = FleetView(), asyncio.Event()
        frozen_before = gc.get_freeze_count()
        task = asyncio.create_task(follow(b, view, stop))
        try:
            await asyncio.wait_for(asyncio.gather(view.jobs_synced.wait(), view.factories_synced.wait()), 30)
            await eventually(gc.isenabled, 10, what="the collector runs again once the view is synced")
            return len(view.jobs), gc.get_freeze_count() - frozen_before
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await b.close()

    assert gc.isenabled()
    jobs, frozen = asyncio.run(main())
    assert jobs == N_JOBS
    assert frozen > N_JOBS, "the replayed records were not frozen out of later collections"
    assert gc.isenabled()
