"""The chaos suite on real processes: a real nats-server, a coordinator process and factory
processes on loopback, tormented by the scenarios of ``chaos/scenarios.py`` and judged by the
one invariant checker.

Each implemented scenario passes its invariant check in its bounded form (what CI runs), and
its figures show that the chaos really happened (a kill, a zombie, a crash with jobs in
flight, results in an outbox). The check judges the records and what the jobs did: every job
appends to a side-effect ledger, and no epoch may act after it lost its lease. Fleets broken
on purpose are caught by the same checker: a rogue claim that skips the revision check, and
factories whose engines neither die with them nor fence themselves
(``GIGAFACTORY_UNSAFE_UNFENCED_ENGINES=1``). The full forms are marked ``slow``; their
duration is ``$GIGAFACTORY_CHAOS_DURATION_S`` (default 20 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import Fleet

from gigafactory.chaos.harness import UNFENCED_ENGINES_ENV, Lab, ScenarioConfig
from gigafactory.chaos.runner import registry, run_scenario
from gigafactory.procs import pid_alive
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import EventRecord, JobRecord, decode, encode

IMPLEMENTED = ["broker-crash", "cluster-failover", "factory-churn", "partition", "push-path-down", "resume",
               "thundering-herd", "total-outage"]
FULL_DURATION_S = float(os.environ.get("GIGAFACTORY_CHAOS_DURATION_S", "20"))


def run_bounded(name: str, tmp_path, seed: int = 0):
    return asyncio.run(run_scenario(name, ScenarioConfig(seed=seed, bounded=True, workdir=tmp_path / name)))


def cli(*args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gigafactory", *args], capture_output=True, text=True,
                          timeout=timeout_s)


# -- the bounded forms ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_resume_ships_a_killed_jobs_work_from_its_checkpoint_losing_at_most_one_interval(tmp_path):
    res = run_bounded("resume", tmp_path)

    assert res.ok, res.to_text()
    f = res.figures
    assert f["kills_mid_run"] == 1 and f["checkpoints_recorded"] == 1
    assert f["jobs_shipped_once"] == f["jobs_acknowledged"] == 1
    assert f["checkpoint_in_shipped_history"] == 1
    assert f["steps_lost_max"] <= f["steps_lost_bound"] and f["lost_span_s_max"] <= f["lost_span_bound_s"]
    assert res.report.counts["lease_expired"] >= 1
    assert f["side_effects_after_lease_lost"] == 0 and f["leftover_engines"] == 0


@pytest.mark.timeout(180)
def test_factory_churn_reclaims_every_lease_in_time_fences_the_zombies_and_ships_every_job(tmp_path):
    res = run_bounded("factory-churn", tmp_path)

    assert res.ok, res.to_text()
    f = res.figures
    assert f["kills"] >= 1 and f["pauses"] >= 1, res.to_text()
    assert f["reclaims_measured"] >= 1
    assert f["reclaim_s_max"] <= f["reclaim_bound_s"]
    assert f["zombie_leases_fenced"] >= 1, "a paused factory woke up holding a lost lease and refused itself"
    assert f["zombie_ships"] == 0
    assert f["fenced_events"] >= f["zombie_leases_fenced"] or f["quarantined_results"] >= 1
    assert f["jobs_shipped"] == f["jobs_acknowledged"] > 0
    assert res.report.counts["lease_expired"] >= 1
    # What the jobs did, judged against the leases: the killed holder of the long job left no
    # engine working on after the reaper took its lease, and nothing outlived its factory.
    assert f["long_jobs"] == 1 and f["ledger_lines"] > f["jobs_acknowledged"]
    assert f["side_effects_after_lease_lost"] == 0 and f["side_effects_overlapping_epochs"] == 0
    assert f["leftover_engines"] == 0
    assert f["pause_windows"] == f["pauses"] + f["pauses_retried_holding_nothing"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["factory-churn", "partition"])
def test_engines_left_to_outlive_their_factory_or_lease_fail_the_side_effect_invariant(name, tmp_path):
    """Broken on purpose: factories started with GIGAFACTORY_UNSAFE_UNFENCED_ENGINES=1 (no
    parent-death kill, no self-fencing). factory-churn's bounded form kills the holder of an
    8 s job in its first seconds; partition's blackholes a holder whose job works on. Either
    way the engine keeps writing to the ledger after the reaper took its lease, and the
    checker must say so, although every record is right."""
    cfg = ScenarioConfig(seed=0, bounded=True, workdir=tmp_path / name, factory_env=UNFENCED_ENGINES_ENV)

    res = asyncio.run(run_scenario(name, cfg))

    assert not res.ok
    found = res.report.by_invariant()
    assert found.get("no_side_effect_after_lease_lost", 0) >= 1, res.to_text()
    assert set(found) <= {"no_side_effect_after_lease_lost", "one_epoch_at_a_time", "no_leftover_engine"}, \
        res.to_text()
    # Not one stray line: an engine working on for seconds (a progress line every 0.25 s).
    assert res.figures["side_effects_after_lease_lost"] >= 3, res.to_text()
    assert "GIGAFACTORY_UNSAFE_UNFENCED_ENGINES=1" in " ".join(res.notes)


@pytest.mark.timeout(180)
def test_broker_crash_through_the_cli_loses_no_acknowledged_job_and_dispatch_resumes(tmp_path):
    out = cli("chaos", "run", "broker-crash", "--seed", "1", "--json", "--dir", str(tmp_path / "bc"))

    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    res = json.loads(out.stdout)
    assert res["scenario"] == "broker-crash" and res["ok"] and res["seed"] == 1
    f = res["figures"]
    assert f["crashes"] == 1 and f["jobs_in_flight_at_crash"][0] > 0
    assert f["acknowledged_lost"] == 0
    assert f["jobs_shipped"] == f["jobs_acknowledged"] > 0
    assert all(s is not None and s <= 5.0 for s in f["claim_after_restart_s"])
    assert res["report"]["ok"] and res["report"]["counts"]["stage_shipped"] == f["jobs_on_record"]
    assert (tmp_path / "bc" / "nats-server.log").exists(), "--dir keeps the run's data"


@pytest.mark.timeout(180)
def test_total_outage_keeps_results_in_the_outbox_then_publishes_or_quarantines_them(tmp_path):
    res = run_bounded("total-outage", tmp_path)

    assert res.ok, res.to_text()
    f = res.figures
    assert f["round_kinds"] == ["prompt", "late"]
    assert f["outbox_pending_max"] > 0
    assert f["results_published"] >= 1, "a prompt return finds its lease and publishes"
    assert f["results_quarantined"] >= 1, "a late return finds its lease reclaimed and quarantines"
    assert f["quarantine_folders"] == f["results_quarantined"]
    assert f["jobs_shipped"] == f["jobs_acknowledged"] > 0


# -- broken on purpose --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_rogue_claim_without_the_revision_check_is_caught_by_the_checker(tmp_path):
    """A claimer that read the job while it was queued, and writes its claim without the
    compare-and-set (a put), takes the lease at the same epoch as the factory that really won
    it, runs, and ships the job a second time. The checker, run over the broker's records,
    must name it."""

    async def main():
        async with Lab(tmp_path / "lab", seed=0) as lab:
            # No factory yet: the job waits in queued, where the rogue reads it.
            [job] = await lab.submit([lab.job("echo ok", review_policy="auto")])
            stale = await lab.admin_().jobs.get(job)
            stale_rec = decode(stale.value, JobRecord)
            assert stale_rec.stage == Stage.QUEUED

            await lab.start_factory("honest", stations=1)

            async def shipped() -> bool:
                e = await lab.admin_().jobs.get(job)
                return decode(e.value, JobRecord).stage == Stage.SHIPPED

            await lab.wait_for(shipped, 30.0, what="the honest factory ships the job")
            before = await lab.check()
            assert before.ok, before.to_text()

            # The rogue: claim from the stale queued read, written without the revision check.
            b, now = lab.admin_(), time.time()
            claim = protocol.claim(stale_rec, "rogue", 0, now)
            await b.jobs.put(job, encode(claim.record))
            await b.publish_event(EventRecord(kind="claimed", at=now, job=job, epoch=claim.record.epoch,
                                              factory="rogue", actor="rogue", stage_from="queued",
                                              stage_to="assigned", data={"station": 0}))
            start = protocol.start(claim.record, "rogue", claim.record.epoch, now)
            await b.jobs.put(job, encode(start.record))
            await b.publish_event(EventRecord(kind="started", at=now, job=job, epoch=start.record.epoch,
                                              factory="rogue", actor="rogue", stage_from="assigned",
                                              stage_to="building"))
            done = protocol.finish(start.record, "rogue", start.record.epoch, now, failure=None)
            await b.jobs.put(job, encode(done.record))
            await b.publish_event(EventRecord(kind="finished", at=now, job=job, epoch=done.record.epoch,
                                              factory="rogue", actor="rogue", stage_from="building",
                                              stage_to=str(done.record.stage)))
            return before, await lab.check(), claim.record.epoch

    before, after, epoch = asyncio.run(asyncio.wait_for(main(), 100))

    assert before.ok
    assert not after.ok
    found = after.by_invariant()
    assert found.get("unique_holder") == 1, after.to_text()
    assert found.get("shipped_once") == 1, after.to_text()
    assert found.get("single_report") == 1, after.to_text()  # two results at one epoch
    [holder] = [v for v in after.violations if v.invariant == "unique_holder"]
    assert f"epoch {epoch} claimed by honest/0 and again by rogue/0" in holder.detail


# -- what the chaos suite found ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_factory_paused_in_the_middle_of_a_write_reads_the_record_to_learn_its_outcome(nats_server, tmp_path):
    """Found by factory-churn: a factory SIGSTOPped between sending its ``start`` write and
    reading the reply wakes up to a request timeout (its timer fired first). It used to drop
    the run there, silently, leaving the lease to expire; it now reads the record, which says
    whether the write landed. Here it did land, so the run goes on under its lease."""
    from gigafactory.broker import Broker
    from gigafactory.config import Settings
    from gigafactory.factory.agent import Factory, Run

    async def main():
        settings = Settings(request_timeout_s=0.5)
        b = await Broker.open(nats_server.url, "paused-writer", settings)
        try:
            f = Factory(b, factory_id="sleepy", probe=False, data_dir=str(tmp_path), settings=settings)
            lab_job = job_text_record("paused-1")
            await b.jobs.create(lab_job.id, encode(lab_job))
            claim = protocol.claim(lab_job, "sleepy", 0, time.time())
            rev = await b.jobs.update(lab_job.id, encode(claim.record), last=1)
            run = Run(lab_job.id, claim.record.epoch, 0, rev, claim.record)

            write = asyncio.create_task(f._write(run, lambda r: protocol.start(r, "sleepy", run.epoch, time.time())))
            # The process stops right after the write was handed to the client (its reply
            # timer armed), for longer than the request timeout: a SIGSTOP, in-process.
            asyncio.get_running_loop().call_soon(time.sleep, 1.0)
            started = await asyncio.wait_for(write, 10)
            renewed = await f._write(run, lambda r: protocol.renew(r, "sleepy", run.epoch, time.time()))
            f.outbox.close()
            e = await b.jobs.get(lab_job.id)
            return started, renewed, decode(e.value, JobRecord), run
        finally:
            await b.close()

    started, renewed, final, run = asyncio.run(asyncio.wait_for(main(), 30))

    assert started is not None and started.stage == Stage.BUILDING
    assert renewed is not None and renewed.lease.renewals == 1, "the revision it learnt lets the next write in"
    assert final.stage == Stage.BUILDING and final.lease.factory == "sleepy" and final.lease.renewals == 1
    assert not run.fenced


@pytest.mark.timeout(90)
def test_a_dispatch_stranded_at_a_busy_factory_is_handed_back_to_an_idle_one(nats_server, tmp_path):
    """Found by total-outage: a pull request the factory no longer waits on (sent while it was
    disconnected and flushed on reconnect, or a long poll that timed out as its message
    arrived) still takes a dispatch message on the server. The message then waited in the
    busy factory's subscription until its next fetch, when a station freed (or until the
    coordinator's redispatch period), while another factory sat idle."""
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            assert fleet.settings.redispatch_s >= 10.0
            busy = await fleet.add_factory("busy", caps=["strand"])
            long_job = await fleet.submit_one(fleet.job("sleep 30", capabilities=["strand"]))
            await fleet.wait_stage(long_job, "building")
            [ps] = busy.pools.values()
            assert ps.psub is not None and ps.mode == "push"
            # A pull request of busy's that nothing of busy's waits on any more, first in line.
            await busy.broker.nc.publish(ps.psub._nms, json.dumps({"batch": 1, "expires": 20_000_000_000}).encode(),
                                    reply=ps.psub._deliver)
            await busy.broker.nc.flush()
            await fleet.add_factory("idle", caps=["strand"])
            t0 = time.monotonic()
            job = await fleet.submit_one(fleet.job("echo ok", capabilities=["strand"], review_policy="auto"))
            final = await fleet.wait_stage(job, "shipped", timeout_s=40)
            return final, time.monotonic() - t0

    final, took_s = asyncio.run(asyncio.wait_for(main(), 80))

    assert [a.factory for a in final.attempts] == ["idle"]
    assert took_s < 5.0, f"the job waited {took_s:.1f}s behind a busy factory"


def job_text_record(job_id: str) -> JobRecord:
    """A queued job record written straight to gf_jobs (no coordinator needed)."""
    from gigafactory.schemas.manifest import Manifest

    return JobRecord(id=job_id, manifest=Manifest(cwd="w", engine="shell"), body="echo hi\n", source="test",
                     content_hash="h", submitted_at=time.time(), pool="p", requirements=["engine:shell"],
                     reason="waiting for a factory")


# -- the lab itself ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_lab_reports_an_engine_that_outlived_its_factory_before_it_cleans_it_up(tmp_path):
    """A factory whose engines may outlive it (unfenced, on purpose) is SIGKILLed: the lab's
    check names the engine it left (job, epoch, process), while the engine of a live factory,
    paused or not, is not counted; closing the lab then kills the leftover."""
    pids = {name: tmp_path / f"{name}.pid" for name in ("victim", "keeper")}

    async def main():
        async with Lab(tmp_path / "lab", seed=0) as lab:
            for name in pids:
                env = UNFENCED_ENGINES_ENV if name == "victim" else {}
                await lab.start_factory(name, stations=1, caps=[f"lane-{name}"], env=env)
            jobs = {}
            for name, pidfile in pids.items():
                [jobs[name]] = await lab.submit([lab.job(f"echo $$ > {pidfile}\nexec sleep 120",
                                                         capabilities=[f"lane-{name}"])])
            for name, pidfile in pids.items():
                await lab.wait_for(pidfile.exists, 30.0, what=f"{name}'s engine started")
            engines = {name: int(pidfile.read_text()) for name, pidfile in pids.items()}
            before = await lab.check(allow_in_flight=True)
            hit = await lab.kill_factory("victim")
            assert hit.held == [(jobs["victim"], 1)], hit
            await lab.pause_factory("keeper")
            after = await lab.check(allow_in_flight=True)
            await lab.resume_factory(lab.hits[-1])
            return engines, jobs, before, after, lab.leftovers, lab.factories["victim"].pid

    engines, jobs, before, after, leftovers, victim_pid = asyncio.run(asyncio.wait_for(main(), 100))

    assert before.ok and before.counts["leftover_engines"] == 0, before.to_text()
    assert not pid_alive(victim_pid)
    assert [(p.pid, p.job, p.epoch, p.factory) for p in leftovers] == [(engines["victim"], jobs["victim"], 1, "victim")]
    assert after.by_invariant() == {"no_leftover_engine": 1}, after.to_text()
    assert after.counts["leftover_engines"] == 1 and after.counts["pause_windows"] == 1
    assert f"pid {engines['victim']}" in after.violations[0].detail and "sleep 120" in after.violations[0].detail
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in engines.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(engines["victim"]), "closing the lab kills what the dead factory left behind"
    assert not pid_alive(engines["keeper"]), "nothing of the lab is left on the machine"


def test_chaos_list_names_exactly_the_implemented_scenarios():
    out = cli("chaos", "list", "--json", timeout_s=60)

    assert out.returncode == 0, out.stderr
    names = [s["name"] for s in json.loads(out.stdout)["scenarios"]]
    assert names == IMPLEMENTED == sorted(registry())
    text = cli("chaos", "list", timeout_s=60).stdout
    assert all(line.split()[0] in IMPLEMENTED for line in text.splitlines())


def test_chaos_run_refuses_an_unknown_scenario_and_names_the_known_ones():
    out = cli("chaos", "run", "partition-everything", timeout_s=60)

    assert out.returncode == 2
    assert "no scenario 'partition-everything'" in out.stderr and "factory-churn" in out.stderr


def test_chaos_sim_forwards_to_the_simulation_and_its_exit_code():
    ok = cli("chaos", "sim", "--seeds", "0:5", "--json", timeout_s=120)
    broken = cli("chaos", "sim", "--seeds", "0:5", "--broken", "no_revision_check", timeout_s=120)

    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["failing"] == []
    assert broken.returncode == 1 and "failing seeds" in broken.stdout


# -- the full forms -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(int(FULL_DURATION_S) + 420)
@pytest.mark.parametrize("name", IMPLEMENTED)
def test_full_form_keeps_every_invariant(name, tmp_path):
    cfg = ScenarioConfig(seed=7, duration_s=FULL_DURATION_S, bounded=False, workdir=tmp_path / name)

    res = asyncio.run(run_scenario(name, cfg))

    assert res.ok, res.to_text()
    assert res.report.counts["jobs"] > 0
