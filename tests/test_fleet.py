"""A coordinator and factories on a real broker: locks, retries, routing, priority, drain,
and the human ship gate."""

from __future__ import annotations


import pytest
from helpers import Fleet, eventually, fast_settings, intervals as _intervals, kill_group, overlap as _overlap, pid_alive, rendezvous_script as _rendezvous_script, run

from gigafactory.client import ApiError
from gigafactory.schemas.lifecycle import Stage

pytestmark = pytest.mark.timeout(60)


# -- locks -----------------------------------------------------------------------------------


def test_jobs_sharing_a_lock_never_overlap_across_factories(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            await fleet.add_factory("f2")
            locked_log, free_log = tmp_path / "locked.log", tmp_path / "free.log"
            locked = [j["job"] for j in await fleet.submit(*(
                fleet.job(_rendezvous_script(locked_log), lock="deploy-prod", review_policy="auto") for _ in range(2)
            ))]
            for job in locked:
                await fleet.wait_stage(job, "shipped", timeout_s=20)
            spans = _intervals(locked_log)
            assert sorted(spans) == sorted(locked)
            assert not _overlap(*spans.values()), spans
            later = max(locked, key=lambda j: spans[j][0])
            waits = [e for e in await fleet.events(later) if e["kind"] in ("held", "lock_wait")]
            assert any("deploy-prod" in e["reason"] for e in waits), waits

            # The control: the same jobs without the lock do run together on this fleet.
            free = [j["job"] for j in await fleet.submit(*(
                fleet.job(_rendezvous_script(free_log), review_policy="auto") for _ in range(2)
            ))]
            for job in free:
                await fleet.wait_stage(job, "shipped", timeout_s=20)
            assert _overlap(*_intervals(free_log).values())

    run(main())


# -- retries -----------------------------------------------------------------------------------


def test_a_job_that_always_fails_verify_is_dead_lettered_after_max_retries(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("echo try $GF_ATTEMPT", verify="false", review_policy="auto",
                                                   retry={"max": 1, "backoff": "0.1s"}))
            rec = await fleet.wait_stage(job, "dead_letter")
            assert rec.attempt == 2 and rec.retries_used == 1
            assert [a.outcome for a in rec.attempts] == ["verify_failed", "verify_failed"]
            assert rec.last_failure == "verify_failed"
            assert "retries exhausted" in rec.reason

    run(main())


def test_a_job_failing_once_then_passing_ships_on_attempt_two(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job(
                'echo "attempt $GF_ATTEMPT" >> attempts.txt', verify='test "$GF_ATTEMPT" -ge 2',
                review_policy="auto", retry={"max": 2, "backoff": "0.1s"},
            ))
            rec = await fleet.wait_stage(job, "shipped")
            assert rec.attempt == 2 and rec.retries_used == 1
            assert [(a.attempt, a.outcome) for a in rec.attempts] == [(1, "verify_failed"), (2, "passed")]
            assert (fleet.repo / "attempts.txt").read_text().split("\n")[:2] == ["attempt 1", "attempt 2"]

    run(main())


# -- capabilities ------------------------------------------------------------------------------


def test_a_job_no_factory_can_serve_stays_queued_and_status_says_why(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("linux-1", caps=["os:linux"])
            job = await fleet.submit_one(fleet.job("echo build", capabilities=["has:xcode"]))

            async def explained():
                st = await fleet.client.call("status", {"job": job})
                return st if st["info"].get("missing_capabilities") else None

            st = await eventually(explained, 10, what="status names the missing capability")
            assert st["info"]["missing_capabilities"] == ["has:xcode"]
            assert st["info"]["serving_factories"] == []
            assert "no live factory offers has:xcode" in st["why"]
            # The scheduler's hold is on the record too, for 'gigafactory jobs'.
            rec = await eventually(lambda: _held(fleet, job), 10, what="hold reason on the record")
            assert rec.stage == Stage.QUEUED and rec.attempts == [] and rec.epoch == 0

    run(main())


async def _held(fleet: Fleet, job: str):
    rec, _ = await fleet.record(job)
    return rec if "has:xcode" in rec.reason else None


def test_a_job_requiring_a_capability_runs_only_where_it_is_offered(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("plain", stations=3)
            await fleet.add_factory("gold", caps=["tier:gold"])
            gold_jobs = [j["job"] for j in await fleet.submit(*(
                fleet.job(f"echo gold {i}", capabilities=["tier:gold"], review_policy="auto") for i in range(3)
            ))]
            plain_jobs = [j["job"] for j in await fleet.submit(*(
                fleet.job(f"echo plain {i}", review_policy="auto") for i in range(2)
            ))]
            st = await fleet.client.call("status", {"job": gold_jobs[0]})
            assert st["info"]["serving_factories"] == ["gold"]
            for job in gold_jobs:
                rec = await fleet.wait_stage(job, "shipped")
                assert [a.factory for a in rec.attempts] == ["gold"]
            for job in plain_jobs:
                await fleet.wait_stage(job, "shipped")

    run(main())


# -- priority ----------------------------------------------------------------------------------


def test_a_critical_job_submitted_last_is_claimed_before_earlier_low_ones(nats_server, tmp_path):
    gate = tmp_path / "gate"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("solo", stations=1)
            blocker = await fleet.submit_one(fleet.job(
                f'for i in $(seq 1 400); do [ -f "{gate}" ] && break; sleep 0.05; done', review_policy="auto"))
            await fleet.wait_stage(blocker, "building")
            # The coordinator counts the station busy from here on, so nothing more is dispatched.
            view = fleet.coordinator.view
            await eventually(lambda: blocker in view.jobs and view.jobs[blocker].record.stage == Stage.BUILDING,
                             5, what="coordinator sees the blocker building")
            lows = [await fleet.submit_one(fleet.job(f"echo low {i}", priority="low", review_policy="auto"),
                                           f"low-{i}.md") for i in range(3)]
            critical = await fleet.submit_one(fleet.job("echo critical", priority="critical", review_policy="auto"),
                                              "critical.md")

            async def all_queued():
                resp = await fleet.client.call("list", {"stage": "queued"})
                return {j["id"] for j in resp["jobs"]} == {*lows, critical}

            await eventually(all_queued, 10, what="every waiting job queued in the coordinator's view")
            gate.touch()
            started = {}
            for job in [critical, *lows]:
                rec = await fleet.wait_stage(job, "shipped")
                started[job] = rec.attempts[0].started_at
            assert all(started[critical] < started[low] for low in lows), started
            # And the lows kept their submission order among themselves.
            assert sorted(lows, key=started.get) == lows

    run(main())


# -- drain -------------------------------------------------------------------------------------


def test_a_draining_factory_hands_its_job_back_without_using_a_retry(nats_server, tmp_path):
    pidfile = tmp_path / "engine-leaver.pid"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("leaver", settings=fast_settings(drain_timeout_s=0.3))
            job = await fleet.submit_one(fleet.job(
                f'if [ "$GF_FACTORY" = leaver ]; then echo $$ > {pidfile}; exec sleep 30; fi\n'
                'echo "done on $GF_FACTORY" > drained.txt',
                verify="test -f drained.txt", review_policy="auto", retry={"max": 0},
            ))
            try:
                await fleet.wait_stage(job, "building")
                await eventually(pidfile.exists, 10, what="engine started on leaver")
                engine_pid = int(pidfile.read_text())

                # What SIGTERM does to the factory process: set its stop event, wait for the drain.
                await fleet.stop("leaver")
                rec, _ = await fleet.record(job)
                assert rec.stage == Stage.QUEUED, rec.reason
                assert rec.retries_used == 0 and rec.attempt == 0 and rec.lease is None
                assert [(a.factory, a.outcome) for a in rec.attempts] == [("leaver", "handed_back")]
                assert rec.attempts[0].detail == "factory draining"
                assert await fleet.admin.factories.get("leaver") is None
                await eventually(lambda: not pid_alive(engine_pid), 10, what="engine stopped by the drain")
                backs = [e for e in await fleet.events(job) if e["kind"] == "handed_back"]
                assert [(e["factory"], e["epoch"]) for e in backs] == [("leaver", 1)]

                await fleet.add_factory("stayer")
                rec = await fleet.wait_stage(job, "shipped")
                assert [(a.factory, a.outcome) for a in rec.attempts] == [("leaver", "handed_back"), ("stayer", "passed")]
                assert rec.attempt == 1 and rec.retries_used == 0
                assert (fleet.repo / "drained.txt").read_text().strip() == "done on stayer"
            finally:
                if pidfile.exists():
                    kill_group(int(pidfile.read_text()))

    run(main())


# -- the ship gate ------------------------------------------------------------------------------


def test_manual_review_waits_in_testing_until_shipped_and_a_queued_job_cannot_ship(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("echo ready", verify="true", review_policy="manual"))
            rec = await fleet.wait_stage(job, "testing")
            assert rec.lease is None and "waiting for ship" in rec.reason

            resp = await fleet.client.call("ship", {"job": job, "actor": "alice"})
            assert resp["job"]["stage"] == "shipped"
            rec, _ = await fleet.record(job)
            assert rec.stage == Stage.SHIPPED and rec.reason == "shipped by alice"

            with pytest.raises(ApiError) as ei:
                await fleet.client.call("ship", {"job": job})
            assert ei.value.code == 409 and "shipped" in ei.value.message

            waiting = await fleet.submit_one(fleet.job("echo later", capabilities=["has:unobtainium"]))
            with pytest.raises(ApiError) as ei:
                await fleet.client.call("ship", {"job": waiting})
            assert ei.value.code == 409 and "queued" in ei.value.message
            rec, _ = await fleet.record(waiting)
            assert rec.stage == Stage.QUEUED

    run(main())
