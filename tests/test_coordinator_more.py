"""The inbox folder, per-engine seats, hard time ceilings, and two coordinators at once."""

from __future__ import annotations

import asyncio
import time

from helpers import Fleet, eventually, fast_settings, intervals, overlap, rendezvous_script, run

from gigafactory.broker import Broker, Conflict, auth_options
from gigafactory.coordinator.inbox import Inbox
from gigafactory.coordinator.service import Coordinator
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import JobRecord, decode, encode

# -- inbox ------------------------------------------------------------------------------------


def test_inbox_submits_valid_files_and_rejects_invalid_ones_with_the_reason(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            inbox_dir = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, inbox_dir)
            # Two files that depend on each other are picked up together, so the dep resolves.
            (inbox_dir / "a.md").write_text(fleet.job("echo a", idempotency_key="inbox-a"))
            (inbox_dir / "b.md").write_text(fleet.job("echo b", deps=["inbox-a"]))
            (inbox_dir / "bad.md").write_text("---\nengine: shell\ncwd: x\nprioity: high\n---\necho\n")
            assert await inbox.scan() == 0  # first sight: not yet known to be stable
            assert (inbox_dir / "a.md").exists()
            assert await inbox.scan() == 2
            assert sorted(p.name for p in inbox_dir.glob("*.md")) == []
            done = inbox_dir / ".submitted"
            assert sorted(p.name for p in done.glob("*.md")) == ["a.md", "b.md"]
            job_a = (done / "a.md.job").read_text().strip()
            job_b = (done / "b.md.job").read_text().strip()
            rec_b, _ = await fleet.record(job_b)
            assert rec_b.deps == [job_a] and rec_b.stage == Stage.BLOCKED
            rejected = inbox_dir / ".rejected"
            assert (rejected / "bad.md").exists(), "a refused file is kept, never deleted"
            error = (rejected / "bad.md.error.txt").read_text()
            assert "bad.md:4" in error and "prioity" in error and "priority" in error
            listed = await fleet.client.call("list", {})
            assert listed["total"] == 2

    run(main())


def test_inbox_leaves_a_file_that_is_still_being_written(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            inbox_dir = tmp_path / "inbox"
            inbox = Inbox(fleet.admin, inbox_dir)
            p = inbox_dir / "growing.md"
            p.write_text(fleet.job("echo 1"))
            assert await inbox.scan() == 0
            with p.open("a") as f:  # still being copied in
                f.write("echo 2\n")
            assert await inbox.scan() == 0, "a file that changed since the last scan is not read"
            assert await inbox.scan() == 1
            job = ((inbox_dir / ".submitted" / "growing.md.job").read_text().strip())
            rec, _ = await fleet.record(job)
            assert rec.body.endswith("echo 1\necho 2\n")

    run(main())


# -- seats ------------------------------------------------------------------------------------


def test_an_engine_seat_limit_caps_concurrency_below_the_station_count(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("seated", stations=2, seats={"shell": 1})
            log = tmp_path / "seats.log"
            jobs = [j["job"] for j in await fleet.submit(
                *(fleet.job(rendezvous_script(log), review_policy="auto") for _ in range(2)))]
            for j in jobs:
                await fleet.wait_stage(j, "shipped")
            spans = intervals(log)
            assert not overlap(*spans.values()), f"two shell jobs ran at once on one seat: {spans}"

            # The control: without the seat limit the same factory runs both at once.
            await fleet.stop("seated")
            await fleet.add_factory("unseated", stations=2)
            log2 = tmp_path / "free.log"
            jobs = [j["job"] for j in await fleet.submit(
                *(fleet.job(rendezvous_script(log2), review_policy="auto") for _ in range(2)))]
            for j in jobs:
                await fleet.wait_stage(j, "shipped")
            assert overlap(*intervals(log2).values())

    run(main())


# -- time ceilings ----------------------------------------------------------------------------


def test_timeout_kills_the_engine_and_the_retry_policy_decides(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            t0 = time.monotonic()
            job = await fleet.submit_one(fleet.job("sleep 30", timeout="1s", retry={"max": 0}))
            rec = await fleet.wait_stage(job, "dead_letter", timeout_s=20)
            assert time.monotonic() - t0 < 20
            assert rec.attempts[-1].outcome == "timeout"
            assert rec.last_failure == "timeout"

    run(main())


def test_budget_wall_is_a_hard_ceiling_that_is_not_retried_by_default(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("sleep 30", timeout="30m", budget={"wall": "1s"}))
            rec = await fleet.wait_stage(job, "failed", timeout_s=20)
            assert rec.attempts[-1].outcome == "budget_exceeded"
            assert rec.attempt == 1, "budget_exceeded is not in the default retry.on"
            assert "budget_exceeded" in rec.reason

    run(main())


# -- several coordinators -----------------------------------------------------------------------


def test_two_coordinators_share_the_work_and_two_reapers_cannot_both_win(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            second_broker = await Broker.open(nats_server.url, "second-coordinator", fleet.settings)
            second = Coordinator(second_broker, fleet.settings, name="coordinator-2")
            stop = asyncio.Event()
            task = asyncio.create_task(second.run(stop))
            try:
                await asyncio.wait_for(second.ready.wait(), 30)
                await fleet.add_factory("f1", stations=2)
                await fleet.add_factory("f2", stations=2)
                jobs = [j["job"] for j in await fleet.submit(
                    *(fleet.job(f"echo {i}", review_policy="auto") for i in range(12)))]
                for j in jobs:
                    await fleet.wait_stage(j, "shipped")
                for j in jobs:
                    kinds = [e["kind"] for e in await fleet.events(j)]
                    assert kinds.count("claimed") == 1, (j, kinds)
                    assert kinds.count("finished") == 1, (j, kinds)

                # A ghost holder that never renews: both reapers see the lease expire; one wins.
                ghost = await fleet.submit_one(fleet.job("echo never", capabilities=["has:nothing-serves-this"]))
                async def ghost_claims() -> bool:
                    # A CAS like any claimer's: the coordinator may write the hold reason in between.
                    e = await fleet.admin.jobs.get(ghost)
                    out = protocol.claim(decode(e.value, JobRecord), "ghost", 0, time.time())
                    try:
                        await fleet.admin.jobs.update(ghost, encode(out.record), last=e.revision)
                        return True
                    except Conflict:
                        return False

                await eventually(ghost_claims, 5, what="the ghost's claim")
                rec = await fleet.wait_stage(ghost, "queued", timeout_s=15)
                assert rec.epoch == 2 and rec.last_failure == "lease_expired"

                async def reaped():
                    evs = [ev for ev in await fleet.events(ghost) if ev.get("data", {}).get("holder") == "ghost"]
                    return evs

                await eventually(reaped, 5, what="the reap event")
                # Both reapers make two more full passes over the same (now requeued) record.
                marks = (fleet.coordinator.sched.reap_rounds, second.sched.reap_rounds)
                await eventually(lambda: fleet.coordinator.sched.reap_rounds >= marks[0] + 2
                                 and second.sched.reap_rounds >= marks[1] + 2, 10, what="two more reaper passes")
                evs = await reaped()
                assert len(evs) == 1, f"the lease was reaped more than once: {evs}"
                actors = {ev["actor"] for ev in evs}
                assert actors <= {fleet.coordinator.name, "coordinator-2"}
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
                await second_broker.close()

    run(main())


# -- startup ----------------------------------------------------------------------------------


def test_a_coordinator_retries_a_startup_read_the_broker_refuses_for_now_and_then_becomes_ready(
        nats_server, tmp_path, caplog):
    """The load suite saw a coordinator exit at startup: loading the queue index (a scan, so a
    consumer) was refused with "maximum consumers limit reached" while a fleet's scans held
    the stream's consumers. Such a refusal passes; the coordinator waits it out, not ready and
    not exiting, says so in its log (once, not per try), and is ready once it clears."""
    import logging

    import nats
    from nats.js import api

    from gigafactory.schemas import names

    caplog.set_level(logging.INFO, logger="gigafactory.coordinator")

    async def main():
        # The queue index's stream, as a KV bucket that allows a single consumer.
        nc = await nats.connect(nats_server.url, **auth_options())
        js = nc.jetstream()
        stream = f"KV_{names.QUEUE_BUCKET}"
        await js.add_stream(api.StreamConfig(
            name=stream, subjects=[f"$KV.{names.QUEUE_BUCKET}.>"], max_msgs_per_subject=1, allow_direct=True,
            allow_rollup_hdrs=True, deny_delete=True, discard=api.DiscardPolicy.NEW, max_consumers=1))
        await js.add_consumer(stream, api.ConsumerConfig(durable_name="holder", ack_policy=api.AckPolicy.NONE))
        b = await Broker.open(nats_server.url, "test-coordinator", fast_settings())
        c = Coordinator(b)
        stop = asyncio.Event()
        task = asyncio.create_task(c.run(stop))
        try:
            await eventually(lambda: c.startup_retries >= 3, 30, what="the coordinator retries loading the index")
            assert not task.done(), "the coordinator exited on a transient refusal"
            assert not c.ready.is_set()
            await js.delete_consumer(stream, "holder")
            await asyncio.wait_for(c.ready.wait(), 30)
            return c.startup_retries
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            await b.close()
            await nc.close()

    retries = run(main())

    failed = [r.getMessage() for r in caplog.records if "loading the queue index failed" in r.getMessage()]
    assert len(failed) == 1 and "maximum consumers" in failed[0], failed
    assert any(f"succeeded after {retries} failed tries" in r.getMessage() for r in caplog.records)
