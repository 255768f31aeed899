"""Retention: finished jobs leave gf_jobs (and the coordinator's memory) for the archive,
and everything that looks a job up still finds them there; idle pools are collected and come
back when work for them does; a capped stream warns before it is full. Decisions are pure
functions (tested on plain values); the pass runs against a real broker, with ``ahead_s``
standing in for the days a test cannot wait."""

from __future__ import annotations

import asyncio

import pytest
from helpers import Fleet, eventually, fast_settings, run

from gigafactory.broker import KnownPools
from gigafactory.config import Settings, check_retention
from gigafactory.coordinator.intake import ensure_pool
from gigafactory.coordinator.retention import archive_candidates, cap_warning, clock_skew, idle_pools
from gigafactory.coordinator.view import JobState
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import EventRecord, JobRecord, decode

DAY_S = 86400.0


def settings(**kw) -> Settings:
    return fast_settings(archive_after_s=3600.0, pool_idle_gc_s=3600.0, **kw)


# -- pure decisions ---------------------------------------------------------------------------


def _state(jid: str, stage: Stage, ts: float, deps: tuple[str, ...] = ()) -> JobState:
    jf = parse_job_text("---\nengine: shell\ncwd: repo\n---\necho ok\n", f"{jid}.md")
    rec = JobRecord(id=jid, manifest=jf.manifest, body=jf.body, source="t", content_hash=jf.content_hash,
                    submitted_at=0.0, pool="p", requirements=[], deps=list(deps), stage=stage)
    return JobState(rec, 1, ts)


def test_archive_candidates_are_old_finished_jobs_without_an_unfinished_dependent_oldest_first():
    jobs = {s.record.id: s for s in (
        _state("old-shipped", Stage.SHIPPED, 100.0),
        _state("older-failed", Stage.FAILED, 50.0),
        _state("dead", Stage.DEAD_LETTER, 60.0),
        _state("young", Stage.SHIPPED, 950.0),
        _state("running", Stage.BUILDING, 0.0),
        _state("needed", Stage.SHIPPED, 10.0),
        _state("waits", Stage.BLOCKED, 0.0, deps=("needed",)),
        _state("needed-by-done", Stage.SHIPPED, 20.0),
        _state("done", Stage.SHIPPED, 900.0, deps=("needed-by-done",)),
    )}
    dependents = {"needed": {"waits"}, "needed-by-done": {"done"}}
    terminal = [j for j, s in jobs.items() if s.record.stage in (Stage.SHIPPED, Stage.FAILED, Stage.DEAD_LETTER)]
    got = archive_candidates(jobs, dependents, terminal, broker_now=1000.0, archive_after_s=500.0, limit=10)
    assert [s.record.id for s in got] == ["needed-by-done", "older-failed", "dead", "old-shipped"]
    assert [s.record.id for s in archive_candidates(jobs, dependents, terminal, 1000.0, 500.0, limit=2)] == \
        ["needed-by-done", "older-failed"]
    assert archive_candidates(jobs, dependents, terminal, 1000.0, 5000.0, limit=10) == []


def test_a_pool_is_idle_only_after_the_whole_period_without_jobs_or_bound_factories():
    since: dict[str, float] = {}
    assert idle_pools(["a", "b", "c"], busy={"a"}, bound={"b"}, idle_since=since, mono_now=0.0, pool_idle_gc_s=10) == []
    assert since == {"c": 0.0}
    assert idle_pools(["a", "b", "c"], {"a"}, {"b"}, since, 10.0, 10) == ["c"]
    # Busy again: the clock starts over; a pool that vanished is forgotten.
    assert idle_pools(["a", "c"], {"c"}, set(), since, 11.0, 10) == []
    assert since == {"a": 11.0}
    assert idle_pools(["a", "c"], set(), set(), since, 20.0, 10) == []
    assert idle_pools(["a", "c"], set(), set(), since, 21.0, 10) == ["a"]


def test_a_cap_warning_names_the_stream_the_share_and_the_setting():
    assert cap_warning("GF_EVENTS", 79, 100, 0.8, "GIGAFACTORY_EVENTS_MAX_BYTES", "x") is None
    assert cap_warning("GF_EVENTS", 10**9, 0, 0.8, "S", "x") is None  # no cap, nothing to warn about
    text = cap_warning("GF_EVENTS", 85 * 2**20, 100 * 2**20, 0.8, "GIGAFACTORY_EVENTS_MAX_BYTES", "the oldest go")
    assert text is not None
    assert "GF_EVENTS" in text and "85%" in text and "GIGAFACTORY_EVENTS_MAX_BYTES" in text and "the oldest go" in text


def test_dangerous_retention_settings_are_refused_by_name():
    check_retention(Settings())
    with pytest.raises(ValueError) as got:
        check_retention(Settings(archive_after_s=1.0, events_max_bytes=0, retention_warn_ratio=1.5))
    msg = str(got.value)
    assert "GIGAFACTORY_ARCHIVE_AFTER_S=1.0" in msg and "GIGAFACTORY_EVENTS_MAX_BYTES=0" in msg
    assert "GIGAFACTORY_RETENTION_WARN_RATIO=1.5" in msg
    with pytest.raises(ValueError, match="GIGAFACTORY_ARCHIVE_MAX_AGE_S"):
        check_retention(Settings(archive_after_s=DAY_S, archive_max_age_s=DAY_S))


def test_a_known_pool_is_trusted_for_its_time_only():
    k = KnownPools(3600.0)
    k.add("p")
    assert "p" in k and "q" not in k and list(k) == ["p"]
    k.discard("p")
    assert "p" not in k
    expired = KnownPools(0.0)
    expired.add("p")
    assert "p" not in expired and len(expired) == 0


# -- the pass, on a real broker ----------------------------------------------------------------


async def _archived(fleet: Fleet, job: str) -> JobRecord | None:
    e = await fleet.admin.archive.get(job)
    return decode(e.value, JobRecord) if e is not None else None


async def _kinds(fleet: Fleet, job: str) -> list[str]:
    return [e["kind"] for e in await fleet.events(job)]


def test_a_finished_job_moves_to_the_archive_and_dependencies_and_idempotency_still_find_it(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            await fleet.add_factory("f1")
            text = fleet.job("echo ok", review_policy="auto", idempotency_key="nightly-report")
            a = await fleet.submit_one(text, "a.md")
            await fleet.wait_stage(a, "shipped")
            await eventually(lambda: coord.view.jobs.get(a) and coord.view.jobs[a].record.stage == Stage.SHIPPED,
                             what="the view sees the ship")

            # Not old enough: nothing moves.
            report = await coord.retention.run_pass()
            assert report.archived == [] and await fleet.admin.jobs.get(a) is not None

            report = await coord.retention.run_pass(ahead_s=3600.0 + 1)
            assert report.archived == [a] and report.errors == 0
            assert await fleet.admin.jobs.get(a) is None and a not in coord.view.jobs
            arch = await _archived(fleet, a)
            assert arch is not None and arch.stage == Stage.SHIPPED and arch.body == "" and arch.content_hash
            assert "archived" in await eventually(lambda: _kinds(fleet, a), what="the archived event")

            # status still answers, from the archive.
            st = await fleet.client.call("status", {"job": a})
            assert st["info"] == {"archived": True} and st["job"]["stage"] == "shipped" and "archived" in st["why"]

            # The next pass removes the delete marker from KV_gf_jobs (a watch no longer replays it).
            marker = {"last_by_subj": f"$KV.{names.JOBS_BUCKET}.{a}"}
            assert await fleet.admin.jobs._direct_get(marker) is not None
            await coord.retention.run_pass()
            assert await fleet.admin.jobs._direct_get(marker) is None

            # A dependency on it, by job id and by its idempotency key, is satisfied.
            by_id = await fleet.submit_one(fleet.job("echo ok", review_policy="auto", deps=[a]), "b.md")
            by_key = await fleet.submit_one(fleet.job("echo ok", review_policy="auto", deps=["nightly-report"]), "c.md")
            for j in (by_id, by_key):
                rec = await fleet.wait_stage(j, "shipped")
                assert rec.deps == [a]

            # The same key and content: the archived job, not a second one.
            again = await fleet.submit(("a.md", text))
            assert again[0]["job"] == a and again[0]["status"] == "existing" and again[0]["stage"] == "shipped"
            # Other content under the same key: refused, naming the job.
            with pytest.raises(Exception, match=a):
                await fleet.submit(("a.md", fleet.job("echo other", idempotency_key="nightly-report")))
            assert len([j for j in coord.view.jobs if j not in (by_id, by_key)]) == 0
            assert coord.view.dependents == {a: {by_id, by_key}}

            # Once the dependents are archived too, nothing of them stays in memory.
            assert sorted((await coord.retention.run_pass(ahead_s=3600.0 + 1)).archived) == sorted([by_id, by_key])
            assert coord.view.jobs == {} and coord.view.dependents == {}

    run(main(), 90)


def test_a_job_blocked_on_an_archived_failed_dependency_fails(nats_server, tmp_path):
    """The scheduler's dependency resolution reads the archive for a dependency that is not
    in gf_jobs: a job submitted after its dependency failed and was archived is failed."""
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            dep = await fleet.submit_one(fleet.job("echo never", capabilities=["nobody-has-this"]), "dep.md")
            await fleet.client.call("cancel", {"job": dep, "reason": "test"})
            await fleet.wait_stage(dep, "failed")
            await eventually(lambda: coord.view.jobs.get(dep) and coord.view.jobs[dep].record.stage == Stage.FAILED)
            assert (await coord.retention.run_pass(ahead_s=3600.0 + 1)).archived == [dep]

            child = await fleet.submit_one(fleet.job("echo ok", deps=[dep]), "child.md")
            rec = await fleet.wait_stage(child, "failed")
            assert dep in rec.reason and "failed" in rec.reason

    run(main(), 60)


def test_a_job_with_an_unfinished_dependent_is_kept(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            dep = await fleet.submit_one(fleet.job("echo never", capabilities=["nobody-has-this"]), "dep.md")
            child = await fleet.submit_one(fleet.job("echo ok", deps=[dep], capabilities=["nobody-has-this"]), "c.md")
            # The dependency is cancelled; its dependent has not been resolved yet when the pass runs.
            coord.sched.resolve_deps = _never  # type: ignore[method-assign]
            await fleet.client.call("cancel", {"job": dep, "reason": "test"})
            await eventually(lambda: coord.view.jobs.get(dep) and coord.view.jobs[dep].record.stage == Stage.FAILED)
            assert (await coord.retention.run_pass(ahead_s=3600.0 + 1)).archived == []
            assert await fleet.admin.jobs.get(dep) is not None
            assert coord.view.jobs[child].record.stage == Stage.BLOCKED

    run(main(), 60)


async def _never() -> None:
    return None


def test_an_idle_pool_is_collected_and_comes_back_with_the_next_job(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            j = await fleet.submit_one(fleet.job("echo ok", capabilities=["rare"], review_policy="auto"), "r.md")
            rec, _ = await fleet.record(j)
            pool = rec.pool
            consumer = names.pool_consumer(pool)
            await fleet.admin.js.consumer_info(names.DISPATCH_STREAM, consumer)  # exists
            await fleet.client.call("cancel", {"job": j, "reason": "test"})
            await eventually(lambda: coord.view.jobs[j].record.stage == Stage.FAILED)

            assert (await coord.retention.run_pass()).pools_deleted == []  # idle from now on
            report = await coord.retention.run_pass(ahead_s=3600.0 + 1)
            assert report.pools_deleted == [pool]
            assert await fleet.admin.pools.get(pool) is None
            with pytest.raises(Exception):
                await fleet.admin.js.consumer_info(names.DISPATCH_STREAM, consumer)
            assert pool not in coord.sched.pools_ready and pool not in coord.broker.pools_known

            # Work for it again: the pool is created again, a factory binds, the job ships.
            again = await fleet.submit_one(fleet.job("echo ok", capabilities=["rare"], review_policy="auto"), "r2.md")
            assert await fleet.admin.pools.get(pool) is not None
            await fleet.admin.js.consumer_info(names.DISPATCH_STREAM, consumer)
            await fleet.add_factory("rare-one", caps=["rare"])
            await fleet.wait_stage(again, "shipped")

            # Served by a live factory: never idle, whatever its age.
            await eventually(lambda: pool in coord.view.factories["rare-one"].record.pools,
                             what="a heartbeat that shows the binding")
            await coord.retention.run_pass()
            assert (await coord.retention.run_pass(ahead_s=3600.0 + 1)).pools_deleted == []

    run(main(), 90)


def test_a_deleted_pool_is_unbound_by_its_factories_and_bound_again_when_it_returns(nats_server, tmp_path):
    """Another coordinator collected the pool (its view of the factory was stale): the
    factory stops pulling from the deleted consumer instead of polling it forever, and when
    the pool is created again it serves it again."""
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            f = await fleet.add_factory("binder", caps=["bindme"])
            reqs = ["bindme", "engine:shell"]
            pool = caps.pool_id(reqs)
            j = await fleet.submit_one(fleet.job("echo ok", capabilities=["bindme"], review_policy="auto"))
            rec = await fleet.wait_stage(j, "shipped")
            assert rec.pool == pool
            await eventually(lambda: pool in f.pools, what="the factory binds the pool")
            old = f.pools[pool]

            e = await fleet.admin.pools.get(pool)
            assert e is not None
            await fleet.admin.pools.delete(pool, last=e.revision)
            await fleet.admin.js.delete_consumer(names.DISPATCH_STREAM, names.pool_consumer(pool))
            await eventually(lambda: pool not in f.pools, 15, what="the factory unbinds the deleted pool")
            assert old.task is not None and old.task.done()

            assert await ensure_pool(fleet.admin, pool, rec.requirements)
            await eventually(lambda: pool in f.pools, 15, what="the factory binds the pool again")
            assert f.pools[pool] is not old
            j2 = await fleet.submit_one(fleet.job("echo ok", capabilities=["bindme"], review_policy="auto"))
            await fleet.wait_stage(j2, "shipped")

    run(main(), 90)


def test_a_queued_job_whose_pool_entry_vanished_gets_its_pool_back(nats_server, tmp_path):
    """A submission racing a deletion by another coordinator (whose caches this one cannot
    reach) leaves a queued job in a pool without entry or consumer: the next pass recreates it."""
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            j = await fleet.submit_one(fleet.job("echo ok", capabilities=["late"], review_policy="auto"))
            rec, _ = await fleet.record(j)
            # The pass decides from the coordinator's view: wait (bounded) until its watch has the job.
            await eventually(lambda: coord.view.jobs.get(j) is not None, 10, what="the view holds the job")
            e = await fleet.admin.pools.get(rec.pool)
            assert e is not None
            await fleet.admin.pools.delete(rec.pool, last=e.revision)
            await fleet.admin.js.delete_consumer(names.DISPATCH_STREAM, names.pool_consumer(rec.pool))
            report = await coord.retention.run_pass()
            assert report.pools_restored == [rec.pool]
            assert await fleet.admin.pools.get(rec.pool) is not None
            await fleet.add_factory("late-one", caps=["late"])
            await fleet.wait_stage(j, "shipped")

    run(main(), 90)


def test_a_stream_over_its_warning_share_raises_a_retention_warning_once(nats_server, tmp_path):
    async def main():
        cap = 256 * 1024
        async with Fleet(nats_server.url, tmp_path, settings(events_max_bytes=cap)) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            # The coordinator's first pass applies its cap (a layout made by an earlier test
            # process with the defaults would keep them otherwise).
            first = await coord.retention.run_pass()
            assert first.warnings == [] and coord.retention.limits_applied
            filler = "x" * 4000
            await asyncio.gather(*(fleet.admin.publish_event(EventRecord(kind="filler", at=0.0, reason=filler))
                                   for _ in range(60)))
            report = await coord.retention.run_pass()
            assert len(report.warnings) == 1 and names.EVENTS_STREAM in report.warnings[0]
            assert "GIGAFACTORY_EVENTS_MAX_BYTES" in report.warnings[0]
            assert (await coord.retention.run_pass()).warnings == []  # not again within the hour

            async def warned():
                si = await fleet.admin.js.stream_info(names.EVENTS_STREAM)
                msg = await fleet.admin.js.get_last_msg(names.EVENTS_STREAM,
                                                        names.fleet_events_subject("retention_warning"))
                return msg if si.state.bytes <= cap else None

            msg = await eventually(warned, what="a retention_warning event, the stream within its cap")
            ev = decode(msg.data, EventRecord)
            assert ev.data["stream"] == names.EVENTS_STREAM and ev.data["ratio"] >= 0.8
            assert ev.data["max_bytes"] == cap

    run(main(), 60)


def test_a_factory_silent_for_the_forget_period_is_forgotten_and_a_live_one_is_not(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings(factory_forget_s=3600.0)) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            await fleet.add_factory("alive")
            # A factory killed without draining: its record stays, its heartbeats stop.
            ghost = await fleet.admin.factories.get("alive")
            assert ghost is not None
            await fleet.admin.factories.put("ghost", ghost.value.replace(b'"alive"', b'"ghost"'))
            await eventually(lambda: "ghost" in coord.view.factories)
            assert (await coord.retention.run_pass()).factories_forgotten == []

            # An hour later both are silent as far as the pass can tell: both are forgotten,
            # and the live one registers again with its next heartbeat; the ghost never does.
            report = await coord.retention.run_pass(ahead_s=3600.0 + 1)
            assert "ghost" in report.factories_forgotten
            assert await fleet.admin.factories.get("ghost") is None and "ghost" not in coord.view.factories
            assert "factory_forgotten" in [e["kind"] async for e in _fleet_events(fleet)]
            await eventually(lambda: fleet.admin.factories.get("alive"), what="the live factory's next heartbeat")
            await eventually(lambda: "alive" in coord.view.factories)
            assert await fleet.admin.factories.get("ghost") is None

    run(main(), 60)


async def _fleet_events(fleet: Fleet):
    msg = await fleet.admin.js.get_last_msg(names.EVENTS_STREAM, names.fleet_events_subject("factory_forgotten"))
    yield {"kind": decode(msg.data, EventRecord).kind}


def test_clock_skew_is_the_spread_of_the_servers_offsets_less_what_round_trips_explain():
    assert clock_skew({}) == (0.0, 0.0) and clock_skew({"a": (5.0, 0.1)}) == (0.0, 0.0)
    skew, unsure = clock_skew({"a": (0.010, 0.002), "b": (0.710, 0.004), "c": (0.3, 0.5)})
    assert abs(skew - 0.7) < 1e-9 and abs(unsure - 0.003) < 1e-9


def test_the_pass_measures_the_broker_clocks_and_warns_of_a_skew_once(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            report = await coord.retention.run_pass()
            assert list(coord.retention.last_offsets) == [nats_server.name]
            assert not [w for w in report.warnings if "clocks" in w]

            # Two nodes 2 s apart (a measurement we cannot make on one machine: injected).
            async def skewed(_streams):
                return {"n0": (0.0, 0.001), "n1": (2.0, 0.001)}

            coord.broker.leader_clocks = skewed  # type: ignore[method-assign]
            report = await coord.retention.run_pass()
            assert [w for w in report.warnings if "clocks differ by 2.000s" in w]
            assert not [w for w in (await coord.retention.run_pass()).warnings if "clocks" in w]  # hourly
            msg = await eventually(lambda: _last_fleet_event(fleet, "clock_skew"), what="the clock_skew event")
            assert decode(msg.data, EventRecord).data["offsets_s"] == {"n0": 0.0, "n1": 2.0}

    run(main(), 60)


async def _last_fleet_event(fleet: Fleet, kind: str):
    try:
        return await fleet.admin.js.get_last_msg(names.EVENTS_STREAM, names.fleet_events_subject(kind))
    except Exception:  # not there yet
        return None
