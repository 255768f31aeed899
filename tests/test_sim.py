"""The deterministic simulation (chaos/sim.py): seeded schedules of the real protocol functions
under seeded faults, judged by the invariant checker. No broker, no sleeps: sim time only."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections import Counter

import msgspec
import pytest

from helpers import gigafactory_cmd

from gigafactory.chaos import sim
from gigafactory.chaos.sim import FaultConfig, run_many, simulate
from gigafactory.config import Settings
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import TERMINAL, Stage
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.records import JobRecord
from gigafactory.schemas.protocol import check_fence as REAL_CHECK_FENCE

SEEDS = range(500)


def test_every_seed_of_500_with_every_fault_keeps_every_invariant_and_settles():
    failing = run_many(SEEDS)

    assert failing == [], f"reproduce with: gigafactory chaos sim --seeds {failing[0]}"


def test_the_faults_really_happen_in_those_runs():
    stats: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for seed in range(100):
        res = simulate(seed)
        stats.update(res.stats)
        counts.update(res.report.counts)

    for fault in ("msg_lost", "msg_duplicated", "reply_lost", "crashes", "drains", "partitions", "clock_jumps",
                  "slow_report", "polled", "buffered_lost_in_crash", "claim_conflict", "write_conflicts",
                  "write_unanswered", "write_learned", "write_backoffs", "pauses", "loop_stalls", "power_losses",
                  "engines", "self_fenced", "pause_window", "lock_wait", "pushes", "submit_existing"):
        assert stats[fault] > 0, fault
    # ...and the protocol's answers to them show in the audit.
    for answer in ("fenced", "lease_expired", "handed_back", "cancel", "dead_letter", "deps_met"):
        assert counts[answer] > 0, answer
    assert stats["outbox_put"] > 0 and stats["quarantined"] > 0


def test_every_refused_stale_write_is_audited_as_fenced_unless_its_publish_failed():
    for seed in range(100):
        res = simulate(seed)

        refused = res.stats.get("fenced", 0)
        assert res.report.counts["fenced"] == refused - res.stats.get("event_lost", 0), res.seed


def test_a_harsher_fleet_with_tight_leases_keeps_every_invariant():
    harsh = FaultConfig(msg_loss=0.4, msg_dup=0.4, reply_loss=0.2, crashes=2, drains=1, partitions=3,
                        slow_report=0.4, dispatch_stalls=1, cancels=0.2, requeues=0.3, window_s=200)
    tight = Settings(lease_ttl_s=5.0, lease_renew_s=4.0, drain_timeout_s=2.0, request_timeout_s=3.0)

    assert run_many(range(100), faults=harsh, settings=tight) == []
    assert run_many(range(100), jobs=40, factories=8, stations=1, coordinators=3, faults=harsh) == []


def test_a_healthy_fleet_finishes_every_job_without_a_fence_or_an_expired_lease():
    for seed in range(50):
        res = simulate(seed, faults=FaultConfig.none())

        assert res.ok, res.summary()
        assert res.report.counts["fenced"] == 0
        assert res.report.counts["lease_expired"] == 0
        assert res.report.counts["audit_gaps"] == 0
        assert all(r.stage in TERMINAL or r.stage in (Stage.TESTING, Stage.REVIEW) for r in res.jobs.values())


def test_factory_clock_jumps_alone_never_expire_a_lease_because_the_store_clock_judges():
    jumps = dataclasses.replace(FaultConfig.none(), clock_jumps=3.0, clock_jump_s=1e6)

    for seed in range(50):
        res = simulate(seed, faults=jumps)

        assert res.stats["clock_jumps"] > 0
        assert res.ok, res.summary()
        assert res.report.counts["lease_expired"] == 0
        assert res.report.counts["fenced"] == 0


# --- engines, locks, intake, replicas, the store: the faults of issue 8 ------------------------------

# Each broken variant, the faults that make it show, the seeds, and the invariant it must break.
# The same seeds with the same faults and the real rules must keep every invariant.
CAUGHT = [
    ("unfenced_engines", FaultConfig(), range(12), "side_effect_after_lease_lost"),
    ("deadline_on_loop", FaultConfig(loop_stalls=1.0), range(20), "side_effect_after_lease_lost"),
    ("lock_free_on_epoch", FaultConfig(cancels=0.3, requeues=0.3, locked=0.6), range(20), "lock_shared"),
    ("intake_reuse_missing", FaultConfig(), range(10), "one_job_per_key"),
    ("fence_from_read", FaultConfig(follower_lag_s=6.0, requeues=0.3, cancels=0.3), range(20),
     "fence_from_stale_read"),
    ("unsynced_store", FaultConfig(), range(12), "epoch_handed_out_twice"),
    ("reap_blind_retry", FaultConfig(view_lag_s=10.0), range(10), "side_effect_after_lease_lost"),
]


@pytest.mark.parametrize("broken,faults,seeds,invariant", CAUGHT, ids=[c[0] for c in CAUGHT])
def test_each_broken_rule_is_caught_and_the_real_rule_is_not(broken, faults, seeds, invariant):
    results = [simulate(seed, broken=broken, faults=faults) for seed in seeds]

    caught = [r.seed for r in results if invariant in r.report.by_invariant()]
    assert caught, f"{broken}: no {invariant} in seeds {seeds}"
    assert run_many(seeds, faults=faults) == []


def test_a_paused_holder_is_the_only_allowance_and_it_is_counted_not_judged():
    pauses = dataclasses.replace(FaultConfig.none(), pauses=2.0, pause_s=(20.0, 60.0))

    results = [simulate(seed, faults=pauses) for seed in range(30)]

    assert all(r.ok for r in results), [r.summary() for r in results if not r.ok][:1]
    assert sum(r.stats.get("pause_window", 0) for r in results) > 0
    # Without pauses nothing needs the allowance, even with every other fault on.
    assert all(simulate(seed, faults=dataclasses.replace(FaultConfig(), pauses=0.0)).stats.get("pause_window", 0) == 0
               for seed in range(30))


def test_a_holder_cut_off_from_the_broker_stops_its_engine_before_the_reaper_takes_the_lease():
    cut = dataclasses.replace(FaultConfig.none(), partitions=2.0, partition_s=(30.0, 60.0))

    results = [simulate(seed, faults=cut) for seed in range(30)]

    assert all(r.ok for r in results)
    assert sum(r.stats.get("self_fenced", 0) for r in results) > 0
    assert sum(r.report.counts.get("lease_expired", 0) for r in results) > 0


def test_a_frozen_event_loop_cannot_keep_an_engine_past_its_lease_because_the_supervisor_fences_it():
    stalls = dataclasses.replace(FaultConfig.none(), loop_stalls=2.0, loop_stall_s=(20.0, 40.0))

    results = [simulate(seed, faults=stalls) for seed in range(20)]

    assert all(r.ok for r in results)
    fenced = [e for r in results for e in r.events if e.kind == "self_fenced"]
    assert fenced and all(e.epoch is not None and e.factory and "no successful renewal" in e.reason for e in fenced)


def test_the_simulation_drives_the_factorys_own_fenced_write_machine(monkeypatch):
    from gigafactory.factory import lease

    made = []
    real = lease.FencedWrite

    class Counting(real):
        def __init__(self, *a, **kw):
            made.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(lease, "FencedWrite", Counting)
    res = simulate(3)

    assert res.ok and len(made) > 20


# --- determinism ----------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_trace_records_and_audit():
    a, b = simulate(7), simulate(7)

    assert a.trace == b.trace
    assert len(a.trace) > 50
    assert msgspec.json.encode(a.jobs) == msgspec.json.encode(b.jobs)
    assert a.events == b.events
    assert a.stats == b.stats
    assert a.digest() == b.digest()


def test_different_seeds_give_different_schedules():
    digests = {simulate(seed).digest() for seed in range(20)}

    assert len(digests) == 20
    assert simulate(1).trace != simulate(2).trace


# --- the checker catches a broken protocol --------------------------------------------------------


def test_a_store_whose_compare_and_set_ignores_the_revision_lets_two_holders_share_an_epoch():
    seeds = range(30)

    results = [simulate(seed, broken="no_revision_check") for seed in seeds]

    caught = [r.seed for r in results if "unique_holder" in r.report.by_invariant()]
    assert caught, "no double claim at one epoch in 30 seeds"
    assert run_many(seeds) == []  # the same schedules with the real compare-and-set are fine


def test_reports_that_skip_the_fence_let_a_stale_epoch_write_a_result():
    seeds = range(30)

    results = [simulate(seed, broken="no_fence") for seed in seeds]

    caught = [r for r in results if "stale_write_accepted" in r.report.by_invariant()]
    assert caught, "no stale result accepted in 30 seeds"
    detail = next(v.detail for v in caught[0].report.violations if v.invariant == "stale_write_accepted")
    assert detail.startswith("finished by ")


def test_a_fence_that_forgets_the_epoch_lets_a_factorys_own_stale_run_write_over_its_new_lease():
    # Subtle: it takes a lease lost (partition, slow report) and then reclaimed by the *same*
    # factory while its old run still goes; holder and stage then match, only the epoch differs.
    results = [simulate(seed, broken="epoch_blind_fence") for seed in range(200)]

    caught = [r for r in results if not r.ok]
    assert caught, "an epoch-blind fence went unnoticed in 200 seeds"
    found = {inv for r in caught for inv in r.report.by_invariant()}
    # A stale result written over the new lease also ends it early for the lock rule: the lock
    # goes free while the new holder's engine runs (a consequence, seen as lock_shared).
    assert "stale_write_accepted" in found and found <= {"stale_write_accepted", "lock_shared"}
    assert protocol.check_fence is REAL_CHECK_FENCE  # put back after every run
    assert run_many(range(40)) == []


def test_a_failing_seed_reproduces_exactly():
    seed = run_many(range(30), broken="no_revision_check")[0]

    first, again = simulate(seed, broken="no_revision_check"), simulate(seed, broken="no_revision_check")

    assert not first.ok
    assert first.report.violations == again.report.violations
    assert first.trace == again.trace
    assert first.digest() == again.digest()


def test_an_unknown_broken_variant_is_refused():
    with pytest.raises(AssertionError, match="broken must be one of"):
        simulate(0, broken="no_such_thing")


# --- liveness and the audit -------------------------------------------------------------------------


def test_a_run_that_cannot_quiesce_within_its_limit_is_a_failure():
    res = simulate(0, limit_s=5.0)

    assert not res.settled
    assert not res.ok
    assert "did not settle" in res.summary()


def test_a_report_that_lands_after_its_client_timed_out_has_no_event_and_strict_audit_says_so():
    # Production publishes an event after its write's reply. A report whose reply is lost has
    # landed, but the factory replays it from its outbox, the fence refuses the replay (the job
    # is no longer leased), and the audit shows 'fenced' where the result actually went in.
    # A gap takes a lost reply to a report that is not learned by the read after it; with the
    # default faults that is rare (2 seeds of the first 300), so lost replies are frequent here.
    lossy = FaultConfig(reply_loss=0.2)
    lenient = [simulate(seed, faults=lossy) for seed in range(40)]
    gaps = [r.seed for r in lenient if r.report.counts["audit_gaps"]]

    assert all(r.ok for r in lenient)
    assert gaps
    strict = simulate(gaps[0], faults=lossy, strict_audit=True)
    assert set(strict.report.by_invariant()) == {"audit_matches_record"}


def test_a_write_whose_reply_never_came_is_learned_by_reading_the_record_as_the_agent_does():
    """``Factory._write``: a write that timed out may have landed, so the factory reads the
    record, and a record equal to what it wrote means it did; the run goes on under its lease.
    Here the factory's client holds its requests in a partition a little longer than the
    request timeout: the ``start`` write times out, then lands, and the read tells. (The model
    this replaces gave up on the timeout and abandoned the run to the reaper.)"""
    s = sim.Sim(0, jobs=1, factories=1, stations=1, coordinators=1, faults=FaultConfig.none(),
                settings=sim.sim_settings(), broken=None, limit_s=600.0, max_steps=10_000)
    s.q.clear()  # nothing planned: only this write and what it sends
    f = s.factories[0]
    queued = JobRecord(id="jx", manifest=Manifest(cwd="w", engine="shell"), body="true\n", source="test",
                       content_hash="h", submitted_at=0.0, pool=sim.POOL, requirements=["engine:shell"])
    s.store.create("jx", queued, 0.0)
    claim = protocol.claim(queued, f.id, 0, 0.0)
    run = sim.SimRun("jx", claim.record.epoch, 0, s.store.update("jx", claim.record, 1, 0.0), claim.record)
    f.runs[("jx", run.epoch)] = run
    f.partition_until, f.partition_drop = 1.5 * s.settings.request_timeout_s, False
    got = []

    s._write(f, run, lambda r: protocol.start(r, f.id, run.epoch, s.t), True,
             lambda res, slot: got.append((res, slot)))
    s.run()

    [(res, slot)] = got
    assert isinstance(res, protocol.Outcome) and res.record.stage == Stage.BUILDING
    stored, stored_rev, _ = s.store.get("jx")
    assert stored.stage == Stage.BUILDING and stored == run.record and stored_rev == run.revision
    assert s.stats["write_unanswered"] == 1 and s.stats["write_learned"] == 1
    assert slot is not None and s.events[slot] is None, "the landed write's audit slot is handed to its event"
    assert not run.fenced and not run.ended


# --- the command line -----------------------------------------------------------------------------


def run_cli(args: list[str]) -> int:
    """``gigafactory chaos sim ARGS`` in this process (its output to capsys); the exit code."""
    from gigafactory.chaos.cli import chaos_sim

    return chaos_sim.main(args=args, prog_name="gigafactory chaos sim", standalone_mode=False)


def test_the_cli_passes_healthy_seeds_and_exits_zero(capsys):
    assert run_cli(["--seeds", "0:20"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("20 seeds in ")
    assert "; 0 failing" in out


def test_the_cli_reports_failing_seeds_as_json_and_exits_one(capsys):
    assert run_cli(["--seeds", "0:10", "--broken", "no_revision_check", "--json"]) == 1

    doc = json.loads(capsys.readouterr().out)
    assert doc["runs"] == 10
    assert doc["failing"] and doc["failing"][0] == doc["first_failure"]["seed"]
    assert doc["first_failure"]["report"]["ok"] is False
    assert doc["failing"] == run_many(range(10), broken="no_revision_check")


def test_the_cli_prints_the_first_failure_and_how_to_reproduce_it(capsys):
    # Seeds 0-4 no longer expose the missing fence: a result whose reply was lost is now learned
    # by re-reading the record, not replayed from the outbox, where a stale replay met it.
    assert run_cli(["--seeds", "0:10", "--broken", "no_fence", "--trace", "5"]) == 1

    out = capsys.readouterr().out
    assert "failing seeds: " in out
    assert "FAILED" in out and "[stale_write_accepted]" in out
    assert "reproduce: gigafactory chaos sim --seeds " in out and "--broken=no_fence" in out


def test_the_cli_sets_single_faults_on_a_healthy_fleet(capsys):
    # Slow log uploads alone (within production's own upload bound) cost no lease: renewals go
    # on until the result is written. The CLI sets the single fault and reports no failure.
    assert run_cli(["--seeds", "0:5", "--no-faults", "--fault", "slow_report=0.3",
                     "--fault", "slow_report_s=5:20", "--json"]) == 0

    assert json.loads(capsys.readouterr().out)["failing"] == []
    only_slow = dataclasses.replace(FaultConfig.none(), slow_report=0.3, slow_report_s=(5.0, 20.0))
    res = simulate(0, faults=only_slow)
    assert res.ok and res.stats["slow_report"] > 0
    assert res.report.counts["fenced"] == 0 and res.report.counts["lease_expired"] == 0


def _sim_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*gigafactory_cmd(), "chaos", "sim", *args], capture_output=True, text=True, timeout=120)


def test_the_cli_refuses_an_unknown_fault():
    r = _sim_process("--fault", "meteor_strike=1")
    assert r.returncode == 2, r.stderr
    assert "Invalid value for '--fault'" in r.stderr and "'meteor_strike=1': expected NAME=VALUE" in r.stderr
    assert "slow_report" in r.stderr  # the fields it does know are named


def test_the_cli_refuses_a_malformed_seed_range():
    r = _sim_process("--seeds", "a:b")
    assert r.returncode == 2 and "'a:b' is not a seed range" in r.stderr, r.stderr
    r = _sim_process("--seeds", "5:5")
    assert r.returncode == 2 and "'5:5' is an empty seed range" in r.stderr, r.stderr


def test_the_cli_is_one_click_command_with_choices():
    """`gigafactory chaos sim --help` is the CLI's own (not a second parser's), and --broken
    takes only the known variants."""
    r = _sim_process("--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: gigafactory chaos sim [OPTIONS]"), r.stdout
    assert "python -m" not in r.stdout
    r = _sim_process("--broken", "no_such_bug")
    assert r.returncode == 2 and "no broken variant 'no_such_bug'" in r.stderr and "no_fence" in r.stderr, r.stderr


def test_the_simulated_factory_publishes_one_start_per_run_as_the_real_one_does():
    """As Execute: a claim straight into building is the run's start (``claimed`` with
    ``started``) and no ``started`` event follows it; a claim into ``assigned`` (a job with a
    lock) is followed by at most its start write's ``started``. The checker counts one start
    per run. Healthy fleets and faulty ones (where the lock jobs are)."""
    into_building = into_assigned = 0
    for seed in range(30):
        res = simulate(seed, faults=FaultConfig.none() if seed % 2 else None)
        assert res.ok, res.summary()
        starts = Counter((e.job, e.epoch) for e in res.events if e.kind == "started")
        assert not any(e.data.get("with_claim") for e in res.events if e.kind == "started"), seed
        for e in res.events:
            if e.kind != "claimed":
                continue
            if e.data.get("started"):
                assert e.stage_to == "building" and starts[(e.job, e.epoch)] == 0, (seed, e)
                into_building += 1
            else:
                assert e.stage_to == "assigned" and starts[(e.job, e.epoch)] <= 1, (seed, e)
                into_assigned += 1
        claimed_started = sum(1 for e in res.events if e.kind == "claimed" and e.data.get("started"))
        assert res.report.counts["started"] == claimed_started + sum(starts.values()), seed
    # Both forms happened (jobs with and without a lock).
    assert into_building > 0 and into_assigned > 0
