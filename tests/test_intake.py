"""Intake through the coordinator's API on a real broker: idempotency keys, dependencies,
and all-or-nothing batches whose refusals name the file, line and field."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from helpers import Fleet, eventually, fast_settings, run

from gigafactory.broker import Broker
from gigafactory.client import ApiError
from gigafactory.coordinator import intake
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import IdempotencyRecord, JobRecord, decode, encode

pytestmark = pytest.mark.timeout(150)

UNOBTAINABLE = ["has:unobtainium"]
"""No test factory offers this, so a job requiring it stays queued as long as a test needs."""


async def _total(fleet: Fleet, expected: int) -> int:
    """Assert the job count, both in the coordinator's ``list`` (fed by a watch, so awaited)
    and in ``gf_jobs`` itself."""

    async def listed():
        return (await fleet.client.call("list", {}))["total"] == expected

    await eventually(listed, 5, what=f"list shows {expected} jobs")
    assert len(await fleet.admin.jobs.keys()) == expected
    return expected


async def _refused(fleet: Fleet, *texts) -> ApiError:
    with pytest.raises(ApiError) as ei:
        await fleet.submit(*texts)
    assert ei.value.code == 400, ei.value.message
    return ei.value


# -- idempotency -----------------------------------------------------------------------------


def test_same_key_and_same_content_returns_the_existing_job(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            text = fleet.job("echo v1", idempotency_key="nightly-build", capabilities=UNOBTAINABLE)
            [first] = await fleet.submit(("a.md", text))
            assert first["status"] == "created" and first["stage"] == "queued"
            [again] = await fleet.submit(("a-again.md", text))
            assert again == {"file": "a-again.md", "job": first["job"], "status": "existing", "stage": "queued"}
            await _total(fleet, 1)
            rec, _ = await fleet.record(first["job"])
            assert rec.epoch == 0 and rec.superseded == 0

    run(main())


def test_same_key_new_content_while_queued_supersedes_the_job_in_place(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            v1 = fleet.job("echo v1", idempotency_key="docs", capabilities=UNOBTAINABLE)
            v2 = fleet.job("echo v2", idempotency_key="docs", capabilities=UNOBTAINABLE)
            job = await fleet.submit_one(v1)
            before, _ = await fleet.record(job)

            [res] = await fleet.submit(("docs-v2.md", v2))
            assert res["job"] == job and res["status"] == "superseded" and res["stage"] == "queued"
            rec, _ = await fleet.record(job)
            assert rec.body.strip() == "echo v2"
            assert rec.content_hash != before.content_hash
            assert rec.epoch == before.epoch + 1 and rec.superseded == 1
            assert rec.stage == Stage.QUEUED and rec.source == "api:docs-v2.md"
            await _total(fleet, 1)
            assert "superseded" in [e["kind"] for e in await fleet.events(job)]
            # The key now names the new content: submitting v2 again is a no-op.
            [again] = await fleet.submit(v2)
            assert (again["job"], again["status"]) == (job, "existing")

    run(main())


def test_same_key_new_content_after_the_job_shipped_is_refused(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("echo v1", idempotency_key="release-1.2", review_policy="auto"))
            await fleet.wait_stage(job, "shipped")
            shipped, rev = await fleet.record(job)

            err = await _refused(fleet, ("release-v2.md", fleet.job("echo v2", idempotency_key="release-1.2",
                                                                     review_policy="auto")))
            [e] = err.errors
            assert e["file"] == "release-v2.md" and e["field"] == "idempotency-key"
            assert job in e["message"] and "shipped" in e["message"]
            rec, rev_after = await fleet.record(job)
            assert rev_after == rev and rec.body == shipped.body
            await _total(fleet, 1)

    run(main())


# -- dependencies ------------------------------------------------------------------------------


def test_hard_deps_wait_for_shipped_and_soft_deps_for_testing(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1", stations=2)
            gate = tmp_path / "gate"  # lib runs until the test has seen its dependents blocked
            jobs = await fleet.submit(
                ("lib.md", fleet.job(f'for i in $(seq 1 200); do [ -f "{gate}" ] && break; sleep 0.05; done',
                                     idempotency_key="lib", review_policy="manual")),
                ("app.md", fleet.job("echo app", deps=["lib"], review_policy="auto")),
                ("docs.md", fleet.job("echo docs", deps=["lib"], deps_mode="soft", review_policy="auto")),
            )
            lib, app, docs = (j["job"] for j in jobs)
            assert [j["stage"] for j in jobs] == ["queued", "blocked", "blocked"]
            rec, _ = await fleet.record(app)
            assert rec.deps == [lib] and lib in rec.reason
            await fleet.wait_stage(lib, "building")
            assert [(await fleet.record(j))[0].stage for j in (app, docs)] == [Stage.BLOCKED, Stage.BLOCKED]

            gate.touch()
            await fleet.wait_stage(lib, "testing")
            # soft: testing is enough; it runs and ships while lib waits for a human.
            await fleet.wait_stage(docs, "shipped")
            # hard: still blocked, and says on what.
            st = await fleet.client.call("status", {"job": app})
            assert st["job"]["stage"] == "blocked" and st["info"]["deps"] == {lib: "testing"}
            assert (await fleet.record(app))[0].attempts == []

            await fleet.client.call("ship", {"job": lib})
            rec = await fleet.wait_stage(app, "shipped")
            assert rec.attempt == 1

    run(main())


def test_a_failed_dependency_fails_its_dependents(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            jobs = await fleet.submit(
                ("schema.md", fleet.job("echo schema", idempotency_key="schema", verify="false",
                                        retry={"max": 0, "on": ["crash"]})),
                ("migrate.md", fleet.job("echo migrate", deps=["schema"], review_policy="auto")),
            )
            schema, migrate = (j["job"] for j in jobs)
            dep = await fleet.wait_stage(schema, "failed")
            assert dep.last_failure == "verify_failed"
            rec = await fleet.wait_stage(migrate, "failed")
            assert schema in rec.reason and "failed" in rec.reason
            assert rec.attempts == [], "a job whose dependency failed never runs"

    run(main())


def test_a_dependency_cycle_is_refused_naming_it_and_nothing_is_written(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            err = await _refused(
                fleet,
                ("a.md", fleet.job("echo a", idempotency_key="a", deps=["b"])),
                ("b.md", fleet.job("echo b", idempotency_key="b", deps=["a"])),
            )
            assert err.errors and all(e["field"] == "deps" for e in err.errors)
            assert {e["file"] for e in err.errors} <= {"a.md", "b.md"}
            assert any("a -> b -> a" in e["message"] or "b -> a -> b" in e["message"] for e in err.errors), err.errors
            assert "cycle" in err.message
            await _total(fleet, 0)
            assert await fleet.admin.idempotency.keys() == []

    run(main())


def test_an_unknown_dependency_is_refused_naming_the_field(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            err = await _refused(fleet, ("needs.md", fleet.job("echo x", deps=["no-such-job-123"])))
            [e] = err.errors
            assert (e["file"], e["field"]) == ("needs.md", "deps[0]")
            assert "no-such-job-123" in e["message"]
            await _total(fleet, 0)

    run(main())


def test_one_invalid_file_in_a_batch_of_three_submits_none(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            good = fleet.job("echo ok", idempotency_key="good-1")
            bad = fleet.job("echo bad", prioirty="high")
            err = await _refused(fleet, ("good-1.md", good), ("bad.md", bad),
                                 ("good-2.md", fleet.job("echo ok 2")))
            [e] = err.errors
            assert e["file"] == "bad.md" and e["field"] == "prioirty" and e["line"] == 3
            assert "priority" in e["message"]  # the suggestion
            await _total(fleet, 0)
            assert await fleet.admin.idempotency.keys() == []
            # The same files without the bad one go through.
            jobs = await fleet.submit(("good-1.md", good), ("good-2.md", fleet.job("echo ok 2")))
            assert [j["status"] for j in jobs] == ["created", "created"]
            await _total(fleet, 2)

    run(main())


# -- never twice: concurrent submitters of one key ----------------------------------------------


def test_concurrent_submissions_of_one_key_create_one_job(nats_server, tmp_path):
    """Eight submitters on their own connections, ten keys each, all at once: one job a key."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            brokers = [await Broker.open(nats_server.url, f"submitter-{i}", fleet.settings) for i in range(8)]
            try:
                keys = [f"race-{k}" for k in range(10)]

                async def one(b: Broker, key: str):
                    return await intake.submit(b, [(f"{key}.md", fleet.job("echo same", idempotency_key=key,
                                                                           capabilities=UNOBTAINABLE))])

                results = await asyncio.gather(*(one(b, k) for k in keys for b in brokers))
                by_key: dict[str, set[str]] = {}
                for [r] in results:
                    by_key.setdefault(r.file, set()).add(r.job)
                assert all(len(ids) == 1 for ids in by_key.values()), by_key
                assert sorted(r.status for [r] in results).count("created") == len(keys)
                await _total(fleet, len(keys))
            finally:
                for b in brokers:
                    await b.close()

    run(main())


def test_concurrent_submissions_of_one_key_with_different_content_leave_one_job(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            brokers = [await Broker.open(nats_server.url, f"submitter-{i}", fleet.settings) for i in range(6)]
            try:
                results = await asyncio.gather(*(
                    intake.submit(b, [(f"v{i}.md", fleet.job(f"echo v{i}", idempotency_key="shared",
                                                             capabilities=UNOBTAINABLE))])
                    for i, b in enumerate(brokers)), return_exceptions=True)
                jobs = {r[0].job for r in results if not isinstance(r, BaseException)}
                assert len(jobs) == 1, results
                await _total(fleet, 1)
                [job] = jobs
                rec, _ = await fleet.record(job)
                assert rec.manifest.idempotency_key == "shared" and rec.stage == Stage.QUEUED
            finally:
                for b in brokers:
                    await b.close()

    run(main())


def test_a_submitter_held_between_its_checks_and_its_write_finds_the_job_another_created(nats_server, tmp_path):
    """The interleaving that made two jobs: A checks (no job), B checks and writes, A writes."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            a = await Broker.open(nats_server.url, "submitter-a", fleet.settings)
            b = await Broker.open(nats_server.url, "submitter-b", fleet.settings)
            try:
                text = fleet.job("echo once", idempotency_key="held", capabilities=UNOBTAINABLE)
                checked, release = asyncio.Event(), asyncio.Event()

                async def hold() -> None:
                    checked.set()
                    await release.wait()

                first = asyncio.create_task(intake.submit(a, [("a.md", text)], planned=hold))
                await asyncio.wait_for(checked.wait(), 10)
                [rb] = await intake.submit(b, [("b.md", text)])
                release.set()
                [ra] = await first

                assert (rb.status, ra.status) == ("created", "existing")
                assert ra.job == rb.job
                await _total(fleet, 1)

                # The same with new content: the held submitter supersedes the job B created.
                checked.clear()
                release.clear()
                v2 = fleet.job("echo twice", idempotency_key="held", capabilities=UNOBTAINABLE)
                held = asyncio.create_task(intake.submit(a, [("a2.md", v2)], planned=hold))
                await asyncio.wait_for(checked.wait(), 10)
                release.set()
                [r2] = await held
                assert (r2.job, r2.status) == (rb.job, "superseded")
                await _total(fleet, 1)
            finally:
                await a.close()
                await b.close()

    run(main())


def test_two_keys_that_used_to_share_a_kv_key_are_two_jobs(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            [slash] = await fleet.submit(("a.md", fleet.job("echo a", idempotency_key="x/y", capabilities=UNOBTAINABLE)))
            [escaped] = await fleet.submit(("b.md", fleet.job("echo b", idempotency_key="x_2fy",
                                                               capabilities=UNOBTAINABLE)))
            assert escaped["status"] == "created" and escaped["job"] != slash["job"]
            await _total(fleet, 2)
            assert (await fleet.record(slash["job"]))[0].body.strip() == "echo a"

    run(main())


# -- ids, deps, limits -----------------------------------------------------------------------------


def test_three_thousand_files_of_one_name_get_three_thousand_ids(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            text = fleet.job("echo lt", capabilities=UNOBTAINABLE)
            ids: list[str] = []
            for _ in range(3):
                ids += [j["job"] for j in await fleet.submit(*(("loads/lt-0.md", text) for _ in range(1000)))]
            assert len(set(ids)) == 3000
            assert all(names.is_job_id(j) and j.startswith("lt-0-") for j in ids)
            # 80 random bits (16 of base 32): 3 random bytes collided in 27% of such runs.
            assert {len(j) - len("lt-0-") for j in ids} == {16}
            assert len(await fleet.admin.jobs.keys()) == 3000

    run(main(), timeout_s=120)


def test_an_in_batch_chain_of_a_thousand_dependencies_is_written_in_order(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            chain = [(f"c{i}.md", fleet.job(f"echo {i}", idempotency_key=f"c{i}", capabilities=UNOBTAINABLE,
                                            **({"deps": [f"c{i - 1}"]} if i else {})))
                     for i in range(1000)]
            # Worst order: every dependency last. A chain is written one wave per job, a thousand
            # fsynced writes in a row: on a loaded machine that outlasts one request's 10 s.
            jobs = await fleet.submit(*reversed(chain), timeout_s=60)
            by_file = {j["file"]: j for j in jobs}
            assert by_file["c0.md"]["stage"] == "queued"
            assert {j["stage"] for f, j in by_file.items() if f != "c0.md"} == {"blocked"}
            rec, _ = await fleet.record(by_file["c999.md"]["job"])
            assert rec.deps == [by_file["c998.md"]["job"]]

    run(main(), timeout_s=120)


def test_a_thousand_deps_are_read_together_and_one_more_is_refused(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            deps = [j["job"] for j in await fleet.submit(*(fleet.job(f"echo {i}", capabilities=UNOBTAINABLE)
                                                            for i in range(1000)))]
            [big] = await fleet.submit(("big.md", fleet.job("echo big", deps=deps)))
            rec, _ = await fleet.record(big["job"])
            assert rec.stage == Stage.BLOCKED and rec.deps == deps
            assert len(rec.reason) <= fleet.settings.max_reason_chars and "cut from" in rec.reason

            err = await _refused(fleet, ("too-many.md", fleet.job("echo x", deps=[*deps, deps[0]])))
            [e] = err.errors
            assert (e["file"], e["field"]) == ("too-many.md", "deps")
            assert "1,001 entries" in e["message"] and "max_deps" in e["message"]

    run(main(), timeout_s=120)


def test_a_record_that_could_not_take_its_lease_and_results_is_refused_at_intake(nats_server, tmp_path):
    """A body just under the broker's max payload: storable, but never claimable (a claim adds
    the lease and an attempt). Refused, naming the headroom and the max payload."""

    async def main():
        roomy = fast_settings(max_job_file_bytes=2 << 20, max_body_bytes=2 << 20)
        async with Fleet(nats_server.url, tmp_path, roomy) as fleet:
            max_payload = fleet.admin.nc.max_payload
            body = "echo near\n" + "#" * (max_payload - 40_000)
            err = await _refused(fleet, ("near.md", fleet.job(body)))
            [e] = err.errors
            assert e["file"] == "near.md"
            assert "record_headroom_bytes" in e["message"] and f"{max_payload:,}" in e["message"]
            await _total(fleet, 0)
            # Within the headroom it goes through.
            [ok] = await fleet.submit(("ok.md", fleet.job("echo ok\n" + "#" * (max_payload // 2),
                                                           capabilities=UNOBTAINABLE)))
            assert ok["status"] == "created"

    run(main())


def test_a_batch_over_the_file_limit_is_refused_naming_the_setting(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(max_batch_files=3)) as fleet:
            err = await _refused(fleet, *(fleet.job(f"echo {i}") for i in range(4)))
            [e] = err.errors
            assert e["file"] == "<batch>" and "4 files" in e["message"] and "max_batch_files = 3" in e["message"]
            await _total(fleet, 0)

    run(main())


def test_a_cancel_reason_over_the_limit_is_refused_and_the_job_left_alone(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(max_reason_chars=100)) as fleet:
            job = await fleet.submit_one(fleet.job("echo x", capabilities=UNOBTAINABLE))
            with pytest.raises(ApiError) as ei:
                await fleet.client.call("cancel", {"job": job, "reason": "r" * 101})
            assert ei.value.code == 400 and "max_reason_chars = 100" in ei.value.message
            assert (await fleet.record(job))[0].stage == Stage.QUEUED
            await fleet.client.call("cancel", {"job": job, "reason": "r" * 100})
            assert (await fleet.record(job))[0].stage == Stage.FAILED

    run(main())


def test_a_key_stored_by_an_older_coordinator_still_finds_its_job(nats_server, tmp_path):
    """Before ids were derived from keys, a key's job had a random id, found through its
    gf_idempotency entry (written under the old, ambiguous escaping). Such a key still
    returns its job; an entry whose stored key is another text is not trusted."""
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            text = fleet.job("echo old", idempotency_key="team_a/old", capabilities=UNOBTAINABLE)
            [new] = await fleet.submit(("old.md", text))
            # Move the job to a random id, as an older coordinator would have stored it.
            e = await fleet.admin.jobs.get(new["job"])
            old_id = names.new_job_id("old")
            rec = msgspec.structs.replace(decode(e.value, JobRecord), id=old_id)
            await fleet.admin.jobs.create(old_id, encode(rec))
            await fleet.admin.jobs.delete(new["job"])
            await fleet.admin.idempotency.delete(names.safe_key("team_a/old"))
            await fleet.admin.idempotency.put(names.legacy_safe_key("team_a/old"), encode(IdempotencyRecord(
                key="team_a/old", job=old_id, content_hash=rec.content_hash)))

            [again] = await fleet.submit(("old-again.md", text))
            assert (again["job"], again["status"]) == (old_id, "existing")
            # "team_a_2fold" had the same old KV key; its entry names another key: a new job.
            [other] = await fleet.submit(("other.md", fleet.job("echo other", idempotency_key="team_a_2fold",
                                                                capabilities=UNOBTAINABLE)))
            assert other["status"] == "created" and other["job"] != old_id

    run(main())


def test_a_job_deleted_while_its_key_is_being_superseded_is_a_named_refusal_not_a_crash(nats_server, tmp_path):
    """A supersede's compare-and-set meets a job an operator deleted after the planning read:
    the submitter is told which file and to submit again (it used to fail an assertion)."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            a = await Broker.open(nats_server.url, "submitter-a", fleet.settings)
            try:
                v1 = fleet.job("echo v1", idempotency_key="gone", capabilities=UNOBTAINABLE)
                v2 = fleet.job("echo v2", idempotency_key="gone", capabilities=UNOBTAINABLE)
                job = await fleet.submit_one(v1)
                checked, release = asyncio.Event(), asyncio.Event()

                async def hold() -> None:
                    checked.set()
                    await release.wait()

                held = asyncio.create_task(intake.submit(a, [("v2.md", v2)], planned=hold))
                await asyncio.wait_for(checked.wait(), 10)
                await fleet.admin.jobs.delete(job)
                release.set()
                with pytest.raises(intake.SubmitError) as ei:
                    await held

                [err] = ei.value.errors
                assert err["file"] == "v2.md" and job in err["message"] and "submit again" in err["message"]
                assert await fleet.admin.jobs.get(job) is None, "nothing was written in its place"
            finally:
                await a.close()

    run(main())
