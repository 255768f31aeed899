"""Run logs reach the object store in bounded chunks, capped per attempt, while the lease is
renewed (factory/agent.py ``_upload_log``/``_publish_result``, factory/logs.py).

A log over ``log_upload_max_bytes`` is stored as head, marker, tail; a multi-MB log under it
is stored whole; either way the store reads a reader one chunk at a time, never the whole
file; and an upload slower than the old fixed bound (four request timeouts) keeps the lease
and ends with the result written at the same epoch.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from helpers import Fleet, eventually, fast_settings, run

from gigafactory.broker import OBJECT_CHUNK_BYTES
from gigafactory.config import Settings
from gigafactory.factory.logs import CappedLog, LogUploadTimeout

pytestmark = pytest.mark.timeout(120)

# About 2.9 MB of numbered lines, the last one "400000".
BIG_SCRIPT = "seq 1 400000"


def test_a_capped_log_is_head_marker_tail_within_the_cap(tmp_path):
    data = b"".join(b"line %07d\n" % i for i in range(100_000))  # 1.3 MB
    p = tmp_path / "run.log"
    p.write_bytes(data)
    cap = 64 * 1024
    r = CappedLog(str(p), cap, "f1:/logs/run.log")
    out = bytearray()
    buf = bytearray(OBJECT_CHUNK_BYTES)
    while n := r.readinto(buf):
        out += buf[:n]
    r.close()
    assert len(out) == r.stored_bytes <= cap
    m = re.search(rb"\n# gigafactory: (\d+) bytes of this log \((\d+) in all\) were dropped here .*f1:/logs/run.log\n", out)
    assert m, out[:200]
    head, tail = out[:m.start()], out[m.end():]
    assert int(m.group(1)) == r.dropped_bytes == len(data) - len(head) - len(tail) > 0
    assert int(m.group(2)) == len(data)
    assert data.startswith(head) and data.endswith(tail)
    assert len(tail) > 2 * len(head), "the tail (where failures are) gets the larger share"
    assert r.max_read_bytes <= OBJECT_CHUNK_BYTES


def test_a_log_under_the_cap_is_read_whole_and_a_deadline_ends_the_read(tmp_path):
    p = tmp_path / "run.log"
    p.write_bytes(b"x" * 300_000)
    r = CappedLog(str(p), 1 << 20, "here")
    buf = bytearray(OBJECT_CHUNK_BYTES)
    got = b""
    while n := r.readinto(buf):
        got += bytes(buf[:n])
    assert got == p.read_bytes() and r.dropped_bytes == 0 and r.stored_bytes == 300_000
    late = CappedLog(str(p), 1 << 20, "here", deadline=0.0)
    with pytest.raises(LogUploadTimeout):
        late.readinto(buf)
    late.close()


def test_log_upload_settings_are_validated():
    with pytest.raises(ValueError, match="log_upload_max_bytes .* at least 65536"):
        Settings(log_upload_max_bytes=1000)
    with pytest.raises(ValueError, match="log_upload_timeout_s"):
        Settings.from_env({"GIGAFACTORY_LOG_UPLOAD_TIMEOUT_S": "0"})


async def _finished_event(fleet: Fleet, job: str) -> dict:
    return await eventually(
        lambda: _first(fleet, job, "finished"), 10, what=f"finished event of {job}")


async def _first(fleet: Fleet, job: str, kind: str):
    return next((e for e in await fleet.events(job) if e["kind"] == kind), None)


def test_a_log_over_the_cap_is_stored_capped_and_the_job_finishes(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            cap = 256 * 1024
            f = await fleet.add_factory("f1", settings=fast_settings(log_upload_max_bytes=cap))
            job = await fleet.submit_one(fleet.job(BIG_SCRIPT))
            rec = await fleet.wait_stage(job, "testing", "shipped", timeout_s=60)
            a = rec.attempts[-1]
            assert a.outcome == "passed" and a.log, a
            stored = (await fleet.admin.artifacts.get(a.log)).data
            assert len(stored) <= cap
            assert stored.startswith(b"# gigafactory: job " + job.encode())
            assert stored.endswith(b"399999\n400000\n")
            m = re.search(rb"# gigafactory: (\d+) bytes of this log \((\d+) in all\) were dropped here", stored)
            assert m and int(m.group(1)) > 2_000_000
            ev = await _finished_event(fleet, job)
            assert ev["data"]["log_dropped_bytes"] == int(m.group(1))
            assert ev["data"]["log_stored_bytes"] == len(stored)
            assert f.stats["logs_capped"] == 1
            info = await fleet.admin.artifacts.get_info(a.log)
            assert info.headers["Gf-Log-Dropped-Bytes"] == [m.group(1).decode()]
            assert "dropped from the middle" in info.description

    run(main(), 110)


def test_a_multi_mb_log_is_stored_whole_read_in_chunks_from_a_reader(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            given: list[object] = []
            real_put = f.broker.artifacts.put

            async def observed_put(name, data, meta=None):
                given.append(data)
                return await real_put(name, data, meta=meta)

            f.broker.artifacts.put = observed_put  # observes what the factory hands the real store
            job = await fleet.submit_one(fleet.job(BIG_SCRIPT))
            rec = await fleet.wait_stage(job, "testing", "shipped", timeout_s=60)
            a = rec.attempts[-1]
            stored = (await fleet.admin.artifacts.get(a.log)).data
            local = next((tmp_path / "factories").rglob(f"{job}-attempt-1-epoch-1.log")).read_bytes()
            assert len(local) > 2_500_000 and stored == local, "stored whole, byte for byte"
            assert len(given) == 1 and hasattr(given[0], "readinto"), given
            assert not isinstance(given[0], (bytes, bytearray, str)), "a reader, not the log in memory"
            assert 0 < f.stats["log_read_max_bytes"] <= OBJECT_CHUNK_BYTES
            ev = await _finished_event(fleet, job)
            assert ev["data"]["log_dropped_bytes"] == 0 and ev["data"]["log_bytes"] == len(local)

    run(main(), 110)


def test_an_upload_slower_than_the_old_bound_keeps_the_lease_and_the_result(nats_server, tmp_path):
    """The store is held until the lease was renewed for longer than the old bound (four
    request timeouts) plus a lease TTL: the lease holds, and the result lands at epoch 1."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            s = fast_settings(request_timeout_s=1.0)
            f = await fleet.add_factory("f1", settings=s)
            gate, entered = asyncio.Event(), asyncio.Event()
            real_put = f.broker.artifacts.put

            async def held_put(name, data, meta=None):
                entered.set()
                await gate.wait()
                return await real_put(name, data, meta=meta)

            f.broker.artifacts.put = held_put
            job = await fleet.submit_one(fleet.job("echo slow upload"))
            await asyncio.wait_for(entered.wait(), 30)
            rec0, _ = await fleet.record(job)
            needed = int((4 * s.request_timeout_s + s.lease_ttl_s) / s.lease_renew_s) + 2

            async def renewed_long():
                rec, _ = await fleet.record(job)
                assert rec.epoch == 1 and rec.lease is not None, f"lease lost during the upload: {rec.reason}"
                return rec.lease.renewals - rec0.lease.renewals >= needed

            await eventually(renewed_long, 40, interval_s=0.2, what=f"{needed} renewals during the upload")
            gate.set()
            rec = await fleet.wait_stage(job, "testing", "shipped", timeout_s=30)
            assert rec.epoch == 1 and rec.attempts[-1].outcome == "passed" and rec.attempts[-1].log
            assert f.stats["quarantined"] == 0
            stored = (await fleet.admin.artifacts.get(rec.attempts[-1].log)).data
            assert b"slow upload" in stored

    run(main(), 110)


def test_a_failed_upload_costs_the_log_not_the_result(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            await fleet.admin.js.delete_object_store("gf_artifacts")  # every upload fails now
            job = await fleet.submit_one(fleet.job("echo result without its log"))
            rec = await fleet.wait_stage(job, "testing", "shipped", timeout_s=30)
            a = rec.attempts[-1]
            assert rec.epoch == 1 and a.outcome == "passed" and a.log is None, a
            assert "log not uploaded" in a.detail and f"f1:{tmp_path}" in a.detail, a.detail
            assert f.stats["log_upload_failures"] == 1 and f.stats["quarantined"] == 0
            ev = await _finished_event(fleet, job)
            assert "log not uploaded" in ev["data"]["log_upload_error"]

    run(main(), 110)
