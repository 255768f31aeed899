"""Intake through the coordinator's API on a real broker: idempotency keys, dependencies,
and all-or-nothing batches whose refusals name the file, line and field."""

from __future__ import annotations

import pytest
from helpers import Fleet, eventually, run

from gigafactory.client import ApiError
from gigafactory.schemas.lifecycle import Stage

pytestmark = pytest.mark.timeout(60)

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
    assert ei.value.code == "400", ei.value.message
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
