"""Fencing across the broker: a factory that dies, or whose job is taken away, never ships.

The first test kills a real factory process with SIGKILL mid-job; the lease expires by the
broker's clock, the reaper requeues the job with a bumped epoch, another factory finishes it,
and the dead factory's late report, replayed exactly as its fenced write would make it, is
refused. The second cancels a running job through the API: the factory stops the engine and
keeps its result in quarantine.
"""

from __future__ import annotations

import re
import signal
import sys
import time

import pytest
from helpers import Fleet, Proc, eventually, fast_env, kill_group, pid_alive, run

from gigafactory.broker import Conflict
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.records import encode


@pytest.mark.timeout(90)
def test_sigkilled_factory_loses_its_lease_and_its_late_report_is_fenced(nats_server, tmp_path):
    pidfile = tmp_path / "engine-victim.pid"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            victim = Proc(
                [sys.executable, "-m", "gigafactory", "factory", "--nats", nats_server.url, "--id", "victim",
                 "--no-probe", "--stations", "1",
                 "--data-dir", str(tmp_path / "victim-data"), "--workspace", str(tmp_path / "victim-work"),
                 "--log-level", "debug"],
                tmp_path / "victim.log", env=fast_env(),
            )
            try:
                view = fleet.coordinator.view
                await eventually(lambda: "victim" in view.factories, 30, what="victim registered")
                # Only the victim runs: the job sleeps there, and finishes at once anywhere else.
                job = await fleet.submit_one(fleet.job(
                    f'echo $$ > {tmp_path}/engine-$GF_FACTORY.pid\n'
                    'if [ "$GF_FACTORY" = victim ]; then exec sleep 30; fi\n'
                    'echo "rescued by $GF_FACTORY at epoch $GF_EPOCH" > rescued.txt',
                    verify="test -f rescued.txt", review_policy="auto",
                    retry={"max": 2, "backoff": "0.1s"},
                ))

                async def building_on_victim():
                    rec, _ = await fleet.record(job)
                    return rec.stage == Stage.BUILDING and rec.lease and rec.lease.factory == "victim" and pidfile.exists()

                await eventually(building_on_victim, 20, what="job building on victim")
                victim.signal(signal.SIGKILL)
                assert victim.wait(10) == -signal.SIGKILL
                # The victim's last write: what it held when it died.
                held, held_rev = await fleet.record(job)
                assert held.stage == Stage.BUILDING and held.epoch == 1
                assert held.lease.factory == "victim" and held.lease.epoch == 1

                await fleet.add_factory("rescuer")
                final = await fleet.wait_stage(job, "shipped", timeout_s=20)

                assert final.epoch == 3  # claim 1, reaper 2, rescuer's claim 3
                assert [(a.factory, a.epoch, a.outcome) for a in final.attempts] == [
                    ("victim", 1, str(FailureClass.LEASE_EXPIRED)), ("rescuer", 3, "passed")]
                assert final.retries_used == 1
                assert (fleet.repo / "rescued.txt").read_text().strip() == "rescued by rescuer at epoch 3"

                events = await fleet.events(job)
                expiries = [e for e in events if e["kind"] == "requeue" and e.get("data", {}).get("holder") == "victim"]
                assert len(expiries) == 1, [(e["kind"], e.get("reason")) for e in events]
                [exp] = expiries
                assert "lease_expired" in exp["reason"] and exp["epoch"] == 2 and exp["data"]["old_epoch"] == 1
                # Judged on the broker's clock against the lease TTL of the coordinator's settings.
                silent_s = float(re.search(r"\(([0-9.]+)s since last renewal > 2s\)", exp["reason"]).group(1))
                assert silent_s >= fleet.settings.lease_ttl_s  # printed to 0.1s; the reaper tested ">"
                assert exp["stage_from"] == "building" and exp["stage_to"] == "queued"
                assert not any(e["kind"] == "finished" and e.get("factory") == "victim" for e in events)

                # Replay the victim's late report. On the record it held, the report would ship...
                now = time.time()
                stale = protocol.finish(held, "victim", 1, now, failure=None, detail="late", exit_code=0)
                assert stale.record.stage == Stage.SHIPPED
                fresh, fresh_rev = await fleet.record(job)
                fresh_bytes = (await fleet.admin.jobs.get(job)).value
                # ...but the fence on a fresh read refuses it,
                with pytest.raises(protocol.Fenced):
                    protocol.finish(fresh, "victim", 1, now, failure=None, detail="late", exit_code=0)
                with pytest.raises(protocol.Fenced):
                    protocol.check_fence(fresh, job, "victim", 1)
                # and the compare-and-set on the revision it held loses.
                with pytest.raises(Conflict):
                    await fleet.admin.jobs.update(job, encode(stale.record), last=held_rev)
                after = await fleet.admin.jobs.get(job)
                assert after.revision == fresh_rev and after.value == fresh_bytes
            finally:
                victim.close()
                if pidfile.exists():
                    kill_group(int(pidfile.read_text()))

    run(main(), 80)


@pytest.mark.timeout(60)
def test_cancel_while_running_stops_the_engine_and_quarantines_the_result(nats_server, tmp_path):
    pidfile = tmp_path / "engine.pid"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            worker = await fleet.add_factory("worker")
            job = await fleet.submit_one(fleet.job(
                f"echo $$ > {pidfile}\nexec sleep 30", verify="true", review_policy="auto",
            ))
            try:
                await fleet.wait_stage(job, "building")
                await eventually(pidfile.exists, 10, what="engine started")
                engine_pid = int(pidfile.read_text())
                assert pid_alive(engine_pid)

                resp = await fleet.client.call("cancel", {"job": job, "reason": "wrong branch"})
                assert resp["job"]["stage"] == "failed"

                q = await eventually(worker.outbox.quarantined, 10, what="result quarantined")
                assert [(i["job"], i["epoch"]) for i in q] == [(job, 1)]
                assert "stale epoch" in q[0]["reason"]
                await eventually(lambda: not pid_alive(engine_pid), 10, what="engine process stopped")
                assert worker.stats["fenced_writes"] >= 1

                rec, _ = await fleet.record(job)
                assert rec.stage == Stage.FAILED and rec.epoch == 2 and rec.lease is None
                assert "cancelled by operator: wrong branch" in rec.reason
                events = await fleet.events(job)
                kinds = [e["kind"] for e in events]
                assert "fenced" in kinds
                assert "finished" not in kinds and "ship" not in kinds
            finally:
                if pidfile.exists():
                    kill_group(int(pidfile.read_text()))

    run(main(), 50)


@pytest.mark.timeout(60)
def test_sigterm_drains_a_real_factory_process_and_hands_its_job_back(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            env = fast_env(drain_timeout_s=0.5)
            worker = Proc(
                [sys.executable, "-m", "gigafactory", "factory", "--nats", nats_server.url, "--id", "drained",
                 "--no-probe", "--stations", "1", "--cap", "drain-test",
                 "--data-dir", str(tmp_path / "drained-data"), "--workspace", str(tmp_path / "drained-work")],
                tmp_path / "drained.log", env=env,
            )
            try:
                view = fleet.coordinator.view
                await eventually(lambda: "drained" in view.factories, 30, what="factory registered")
                job = await fleet.submit_one(fleet.job(
                    'if [ "$GF_FACTORY" = drained ]; then exec sleep 30; fi\necho done',
                    capabilities=["drain-test"], review_policy="auto"))

                async def building():
                    rec, _ = await fleet.record(job)
                    return rec.stage == Stage.BUILDING and rec.lease and rec.lease.factory == "drained"

                await eventually(building, 20, what="job building on the factory process")
                worker.signal(signal.SIGTERM)
                assert worker.wait(20) == 0, worker.output()[-2000:]
                rec, _ = await fleet.record(job)
                assert rec.stage == Stage.QUEUED, f"{rec.stage}: {rec.reason}"
                assert rec.retries_used == 0 and rec.attempts[-1].outcome == "handed_back"
                assert await fleet.admin.factories.get("drained") is None, "a drained factory deregisters"
                kinds = [e["kind"] for e in await fleet.events(job)]
                assert "handed_back" in kinds and "fenced" not in kinds
                await fleet.add_factory("after", caps=["drain-test"])
                final = await fleet.wait_stage(job, "shipped", timeout_s=20)
                assert final.attempts[-1].factory == "after"
            finally:
                worker.close()

    run(main(), 55)
