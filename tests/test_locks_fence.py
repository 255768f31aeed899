"""Locks are held until their holder is known stopped, never "free because the epoch moved"
(issue 8, section 1): the pure decision, and a real fleet where a lock holder is cancelled
while its engine still runs."""

from __future__ import annotations

import asyncio

import pytest
from helpers import Fleet, eventually, run

from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.records import AttemptRecord, JobRecord, Lease, LockRecord

TTL_S, MARGIN_S = 2.0, 0.5
LOCK = LockRecord(lock="db", job="j1", epoch=3, factory="f1")


def holder(stage: Stage, epoch: int, outcome: str = "running", attempt_epoch: int = 3) -> JobRecord:
    return JobRecord(
        id="j1", manifest=Manifest(cwd="."), body="", source="api", content_hash="", submitted_at=0.0, pool="p",
        requirements=[], stage=stage, epoch=epoch,
        lease=Lease(factory="f1", station=0, epoch=epoch) if stage in (Stage.ASSIGNED, Stage.BUILDING) else None,
        attempts=[AttemptRecord(attempt=1, epoch=attempt_epoch, factory="f1", station=0, started_at=0.0,
                                outcome=outcome)],
    )


def verdict(rec, age_s):
    return protocol.lock_verdict(LOCK, rec, age_s, lease_ttl_s=TTL_S, fence_margin_s=MARGIN_S)


def test_a_running_holder_keeps_its_lock():
    v = verdict(holder(Stage.BUILDING, 3), 0.1)
    assert not v.free and "held by job j1 at epoch 3" in v.reason


@pytest.mark.parametrize("stage", [Stage.FAILED, Stage.QUEUED, Stage.BUILDING])
def test_an_epoch_that_moved_does_not_free_the_lock(stage):
    # Cancelled (failed), requeued by an operator or reclaimed and claimed again (building at 5):
    # the record moved on, but nothing says the epoch-3 engine stopped.
    assert not verdict(holder(stage, 5), 1.0).free
    assert not verdict(None, 1.0).free  # record gone: only the age can tell
    # The reaper's lease_expired is not the holder's report either.
    assert not verdict(holder(Stage.QUEUED, 4, outcome="lease_expired"), TTL_S + MARGIN_S).free


@pytest.mark.parametrize("outcome", ["passed", "crash", "handed_back", "verify_failed"])
def test_a_reported_attempt_frees_the_lock(outcome):
    v = verdict(holder(Stage.SHIPPED, 4, outcome=outcome), 0.0)
    assert v.free and outcome in v.reason
    # ...but only the attempt of the lock's epoch.
    assert not verdict(holder(Stage.SHIPPED, 4, outcome=outcome, attempt_epoch=2), 0.0).free


def test_an_entry_older_than_the_lease_plus_the_margin_is_free():
    assert not verdict(holder(Stage.BUILDING, 3), TTL_S + MARGIN_S).free
    v = verdict(holder(Stage.BUILDING, 3), TTL_S + MARGIN_S + 0.01)
    assert v.free and "not renewed" in v.reason
    assert verdict(None, TTL_S + MARGIN_S + 0.01).free


@pytest.mark.timeout(90)
def test_a_cancelled_lock_holder_keeps_the_lock_until_its_engine_stopped(nats_server, tmp_path):
    """Job A holds lock ``db`` and ignores SIGTERM (its engine lingers after the cancel); job B
    wants the same lock. Before this fix B took the lock as soon as A's epoch moved, and ran
    while A's engine was still writing."""
    side = tmp_path / "side.log"
    a_pid = tmp_path / "a.pid"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("worker", stations=2)
            job_a = await fleet.submit_one(fleet.job(
                # The trap first: a cancel that lands right after A says it started must find it.
                f"trap 'echo \"A term $(date +%s.%N)\" >> {side}' TERM\n"
                f"echo \"A tick $(date +%s.%N)\" >> {side}\n"
                f"echo $$ > {a_pid}\n"
                f"for i in $(seq 1 600); do echo \"A tick $(date +%s.%N)\" >> {side}; sleep 0.05; done\n",
                lock="db", retry={"max": 0}), path="a.md")
            await fleet.wait_stage(job_a, "building")
            await eventually(a_pid.exists, 10, what="A's engine started")
            job_b = await fleet.submit_one(fleet.job(
                f'echo "B start $(date +%s.%N)" >> {side}\n', lock="db", review_policy="auto"), path="b.md")
            resp = await fleet.client.call("cancel", {"job": job_a, "reason": "epoch moves, engine lingers"})
            assert resp["job"]["stage"] == "failed"
            await eventually(lambda: side.exists() and "A term" in side.read_text(), 10,
                             what="A got SIGTERM and lingers")
            await fleet.wait_stage(job_b, "shipped", timeout_s=30)

            # A tick whose `date` the SIGTERM killed has no time: it cannot be placed.
            lines = [ln.split() for ln in side.read_text().splitlines() if len(ln.split()) == 3]
            b_start = next(float(ln[2]) for ln in lines if ln[0] == "B")
            a_last = max(float(ln[2]) for ln in lines if ln[0] == "A")
            assert a_last < b_start, "job B ran while the cancelled holder of its lock was still running"
            rec, _ = await fleet.record(job_b)
            assert rec.attempts[-1].outcome == "passed"

    run(main(), 80)


@pytest.mark.timeout(60)
def test_the_stale_lock_cleaner_keeps_a_lock_whose_holder_was_cancelled_but_not_stopped(nats_server, tmp_path):
    """The coordinator's cleaner used to delete a lock as soon as the holder's record left the
    leased stages at that epoch; now only a report of the holder's attempt, or an entry older
    than lease_ttl_s + fence_margin_s, frees it."""
    from gigafactory.schemas import names
    from gigafactory.schemas.records import encode

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("worker")
            job = await fleet.submit_one(fleet.job("sleep 30", lock="db", retry={"max": 0}))
            await fleet.wait_stage(job, "building")
            # Stand in for a holder that is cancelled while its engine runs on (on a factory
            # that is not answering): our entry replaces the worker's, which then lets it be.
            key = names.safe_key("db")
            await fleet.client.call("cancel", {"job": job, "reason": "epoch moves"})
            held = LockRecord(lock="db", job=job, epoch=1, factory="elsewhere")
            await fleet.admin.locks.put(key, encode(held))
            sched = fleet.coordinator.sched
            assert await sched.release_stale_locks() == 0  # record failed at epoch 2; attempt 1 not reported
            assert await fleet.admin.locks.get(key) is not None
            # Once the entry is older than lease_ttl_s + fence_margin_s (broker time), it is free.
            s = fleet.settings
            limit_s = s.lease_ttl_s + s.fence_margin_effective_s

            async def aged():
                e = await fleet.admin.locks.get(key)
                return e is not None and await fleet.admin.broker_now() - e.ts > limit_s

            await eventually(aged, limit_s + 5, what="lock entry older than the limit")
            await sched.release_stale_locks()  # (or the coordinator's own round, every 5 s, got there first)
            assert await fleet.admin.locks.get(key) is None

    run(main(), 50)


@pytest.mark.timeout(60)
def test_the_first_deadline_counts_from_the_lock_write_when_it_is_older_than_the_start(nats_server, tmp_path):
    """The lock is presumed free ``lease_ttl_s + fence_margin_s`` after its entry was stored, and
    the entry is rewritten only by renewals. A lock write whose reply came back late (here:
    held back longer than ``lease_ttl_s - fence_margin_s``, as a loaded broker or a paused
    process would) must not give the engine a deadline counted from the later start write:
    the engine would then run past the moment another job may take the lock. Counted from the
    lock write, the deadline has passed before the engine starts: it never starts, and the run
    says it fenced itself."""
    side = tmp_path / "side.log"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("worker")
            s = fleet.settings
            hold_s = s.lease_ttl_s - s.fence_margin_effective_s + 0.3
            real_create = f.broker.locks.create

            async def late_reply(key, value):
                rev = await real_create(key, value)  # stored now, by broker time
                await asyncio.sleep(hold_s)  # the injected fault: the reply arrives late
                return rev

            f.broker.locks.create = late_reply
            job = await fleet.submit_one(fleet.job(f"echo ran >> {side}\nsleep 5\n", lock="db",
                                                   retry={"max": 0}))

            async def self_fenced():
                return [e for e in await fleet.events(job) if e["kind"] == "self_fenced"]

            evs = await eventually(self_fenced, 20, what="a self_fenced event for the late lock")
            assert "no successful lease renewal" in evs[0]["reason"]
            assert not side.exists(), "the engine started after its lock could be presumed free"
            assert f.stats["self_fenced"] == 1

    run(main(), 50)


@pytest.mark.timeout(60)
def test_unreadable_lock_entries_and_records_neither_stop_the_cleaner_nor_keep_a_lock_for_good(nats_server, tmp_path):
    """A lock entry that is not a lock record, and one whose holder's job record is not a job
    record, used to be skipped forever and to abort the whole cleaning pass (every lock after
    it kept). Now the pass goes on; an unreadable entry is deleted once it is as old as an entry
    no holder renews any more; an unreadable holder record is judged by the entry's age."""
    from gigafactory.schemas import names
    from gigafactory.schemas.records import encode

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            sched = fleet.coordinator.sched
            locks = fleet.admin.locks
            await fleet.admin.jobs.put("poisoned-job", b"\x00 not a job record")
            await locks.put(names.safe_key("a"), encode(LockRecord(lock="a", job="poisoned-job", epoch=1,
                                                                   factory="f")))
            await locks.put(names.safe_key("b"), b"{not a lock record")
            # Written after them: a lock whose holder is long gone and never reported.
            await locks.put(names.safe_key("c"), encode(LockRecord(lock="c", job="never-was", epoch=1, factory="f")))
            s = fleet.settings
            limit_s = s.lease_ttl_s + s.fence_margin_effective_s

            async def aged():
                e = await locks.get(names.safe_key("c"))
                return e is None or await fleet.admin.broker_now() - e.ts > limit_s

            await eventually(aged, limit_s + 5, what="the entries older than the limit")
            await sched.release_stale_locks()  # (the coordinator's own round may have got there first)
            for name in "abc":
                assert await locks.get(names.safe_key(name)) is None, f"lock {name} kept"

    run(main(), 50)


@pytest.mark.timeout(60)
def test_a_job_waits_out_an_unreadable_entry_of_its_lock_then_runs(nats_server, tmp_path):
    """The factory read the entry of a taken lock as a lock record and failed the run inside
    the factory when it was not one; now the entry holds the lock until it has aged like an
    entry nobody renews, and the job then takes the lock and ships."""
    from gigafactory.schemas import names

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.admin.locks.put(names.safe_key("db"), b"garbage")
            await fleet.add_factory("worker")
            job = await fleet.submit_one(fleet.job("echo ok", lock="db", review_policy="auto", retry={"max": 0}))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=30)
            assert rec.attempts[-1].outcome == "passed"
            assert "failed inside the factory" not in (rec.reason or "")

    run(main(), 50)
