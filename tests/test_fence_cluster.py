"""`gigafactory fence` on a 3-node JetStream cluster (R3 buckets): asked through a node that
does not lead the job bucket, it still renews by compare-and-set on the stream leader, and a
stale epoch writes nothing."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import fast_env, gigafactory_cmd, run

from gigafactory.broker import Broker
from gigafactory.config import Settings
from gigafactory.testing import Cluster
from gigafactory.schemas import protocol
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import JobRecord, decode, encode

pytestmark = pytest.mark.timeout(120)

JOB = "fence-on-a-cluster"


def _building(factory: str) -> JobRecord:
    parsed = parse_job_text("---\nengine: shell\ncwd: x\n---\necho hi\n", "jobs/t.md")
    rec = JobRecord(id=JOB, manifest=parsed.manifest, body=parsed.body, source="jobs/t.md",
                    content_hash=parsed.content_hash, submitted_at=1.0, pool="any",
                    requirements=list(parsed.manifest.requirements()))
    claimed = protocol.claim(rec, factory, 0, 2.0).record
    return protocol.start(claimed, factory, claimed.epoch, 3.0).record


def _fence(url: str, epoch: int) -> tuple[int, dict]:
    r = subprocess.run([*gigafactory_cmd(), "fence", "--nats", url, "--job", JOB, "--epoch", str(epoch),
                        "--factory", "f1", "--lease-ttl-s", "15", "--json"],
                       env=fast_env(), capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout)


def test_fence_renews_through_a_follower_and_refuses_a_stale_epoch(tmp_path):
    async def main():
        import asyncio

        cluster = Cluster(str(tmp_path / "cluster"))
        await asyncio.to_thread(cluster.start)
        try:
            b = await Broker.open(cluster.urls, "test-fence-cluster", Settings(replicas=3, request_timeout_s=5.0))
            try:
                created = await b.jobs.create(JOB, encode(_building("f1")))
                leader = await cluster.stream_leader(b.jobs.stream)
                follower = cluster.nodes[(leader + 1) % len(cluster.nodes)].url

                code, out = await asyncio.to_thread(_fence, follower, 1)
                assert code == 0 and out["held"], out
                assert out["read_revision"] == created and out["revision"] > created
                e = await b.jobs.get(JOB)
                assert e.revision == out["revision"], "the renewal is the record's latest revision"
                assert decode(e.value, JobRecord).lease.renewals == 1

                code, out = await asyncio.to_thread(_fence, follower, 2)
                assert code == 1 and not out["held"] and "stale epoch 2" in out["reason"], out
                assert (await b.jobs.get(JOB)).revision == e.revision, "a stale epoch wrote nothing"
            finally:
                await b.close()
        finally:
            await asyncio.to_thread(cluster.stop)

    run(main(), 100)
