"""``Client.wait`` follows the jobs' records on the broker instead of listing every job."""

from __future__ import annotations

import asyncio

import pytest

from gigafactory.broker import Broker
from gigafactory.client import WATCH_PER_KEY_MAX, ApiError, Client, NoCoordinator
from gigafactory.schemas import protocol
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import JobRecord, encode

pytestmark = pytest.mark.timeout(60)


def _queued(job_id: str) -> JobRecord:
    parsed = parse_job_text("---\nengine: shell\ncwd: x\nreview-policy: auto\n---\necho hi\n", "jobs/t.md")
    return JobRecord(id=job_id, manifest=parsed.manifest, body=parsed.body, source="jobs/t.md",
                     content_hash=parsed.content_hash, submitted_at=1.0, pool="any",
                     requirements=list(parsed.manifest.requirements()))


def _shipped(rec: JobRecord) -> JobRecord:
    claimed = protocol.claim(rec, "f1", 0, 2.0).record
    started = protocol.start(claimed, "f1", claimed.epoch, 3.0).record
    return protocol.finish(started, "f1", claimed.epoch, 4.0, failure=None).record


@pytest.mark.parametrize("n", [1, WATCH_PER_KEY_MAX + 4])
def test_wait_follows_the_records_with_no_coordinator(nats_server, n):
    """No coordinator runs: a wait that lists jobs through the API (the old way) cannot see
    them; one that watches ``gf_jobs`` sees each job reach its end as it is written. Both the
    per-key watch and the whole-bucket watch (above WATCH_PER_KEY_MAX jobs) are exercised,
    with a job not waited for changing alongside."""

    async def main():
        b = await Broker.open(nats_server.url, "test-writer")
        client = await Client.connect(nats_server.url)
        try:
            recs = [_queued(f"w-{i}") for i in range(n)]
            revs = {r.id: await b.jobs.put(r.id, encode(r)) for r in recs}
            other = _queued("not-waited-for")
            await b.jobs.put(other.id, encode(other))
            progress: list[dict] = []
            saw_all = asyncio.Event()

            def on_progress(seen: dict) -> None:
                progress.append(seen)
                if len(seen) == n:
                    saw_all.set()

            waiting = asyncio.create_task(client.wait([r.id for r in recs], timeout_s=30.0, on_progress=on_progress))
            # The wait has seen every job queued before any is shipped.
            await asyncio.wait_for(saw_all.wait(), 20.0)
            assert not waiting.done()
            assert {j.stage for j in progress[-1].values()} == {"queued"}
            for r in recs:
                await b.jobs.update(r.id, encode(_shipped(r)), last=revs[r.id])
            await b.jobs.update(other.id, encode(_shipped(other)), last=await b.jobs.put(other.id, encode(other)))
            final = await asyncio.wait_for(waiting, 30.0)
            assert set(final) == {r.id for r in recs}
            assert {j.stage for j in final.values()} == {"shipped"}
        finally:
            await client.close()
            await b.close()

    asyncio.run(main())


def test_wait_gives_up_at_its_timeout_with_what_it_saw(nats_server):
    async def main():
        b = await Broker.open(nats_server.url, "test-writer")
        client = await Client.connect(nats_server.url)
        try:
            rec = _queued("stays-queued")
            await b.jobs.put(rec.id, encode(rec))
            final = await client.wait([rec.id, "never-existed"], timeout_s=1.0)
            # The job that exists is reported as it is; the one that never existed is absent
            # (no coordinator to ask about an archived job: that question fails quietly).
            assert {k: v.stage for k, v in final.items()} == {"stays-queued": "queued"}
        finally:
            await client.close()
            await b.close()

    asyncio.run(main())


def test_wait_refuses_more_jobs_than_it_follows(nats_server):
    async def main():
        client = await Client.connect(nats_server.url)
        try:
            with pytest.raises(ApiError, match="at most"):
                await client.wait([f"j{i}" for i in range(100_001)], timeout_s=1.0)
        finally:
            await client.close()

    asyncio.run(main())


def test_no_coordinator_is_still_a_clean_error_for_api_calls(nats_server):
    async def main():
        client = await Client.connect(nats_server.url)
        try:
            with pytest.raises(NoCoordinator):
                await client.call("list", {})
        finally:
            await client.close()

    asyncio.run(main())
