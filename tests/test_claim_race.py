"""The claim protocol against a real broker: many claimers, one queued job, one winner."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import fast_settings, job_text, run

from gigafactory.broker import Broker, Conflict
from gigafactory.coordinator import intake
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import JobRecord, decode, encode

CLAIMERS = 50


@pytest.mark.timeout(60)
def test_fifty_concurrent_claimers_exactly_one_wins_and_the_record_names_it(nats_server, tmp_path):
    async def main():
        s = fast_settings()
        admin = await Broker.open(nats_server.url, "race-admin", s)
        [res] = await intake.submit(admin, [("race.md", job_text(cwd=str(tmp_path)))])
        job = res.job
        assert res.stage == "queued"

        # 50 separate connections, each its own Broker, as 50 factories would have.
        brokers = await asyncio.gather(*(
            Broker.open(nats_server.url, f"claimer-{i}", s, ensure=False) for i in range(CLAIMERS)
        ))
        assert len({id(b.nc) for b in brokers}) == CLAIMERS
        # Everyone reads before anyone writes, so every claim is decided by the CAS on the
        # same revision (not by a later read seeing the job already assigned).
        barrier = asyncio.Barrier(CLAIMERS)

        async def claimer(i: int, b: Broker) -> tuple[str, int]:
            e = await b.jobs.get(job)
            assert e is not None
            out = protocol.claim(decode(e.value, JobRecord), f"claimer-{i}", 0, time.time())
            await barrier.wait()
            try:
                await b.jobs.update(job, encode(out.record), last=e.revision)
                return "won", e.revision
            except Conflict:
                return "conflict", e.revision

        try:
            results = await asyncio.gather(*(claimer(i, b) for i, b in enumerate(brokers)))
        finally:
            await asyncio.gather(*(b.close() for b in brokers))

        outcomes = [r for r, _ in results]
        assert len({rev for _, rev in results}) == 1, "every claimer read the same revision"
        assert outcomes.count("won") == 1
        assert outcomes.count("conflict") == CLAIMERS - 1
        winner = f"claimer-{outcomes.index('won')}"

        e = await admin.jobs.get(job)
        rec = decode(e.value, JobRecord)
        assert rec.stage == Stage.ASSIGNED
        assert rec.epoch == 1
        assert rec.lease is not None and rec.lease.factory == winner and rec.lease.epoch == 1
        assert rec.attempt == 1
        assert [(a.factory, a.epoch) for a in rec.attempts] == [(winner, 1)]
        # Exactly one write landed on top of the submitted revision.
        assert e.revision == results[0][1] + 1
        await admin.close()

    run(main())
