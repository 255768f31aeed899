"""The scope guardrail on real repositories: after the engine, the attempt's changed paths are
judged against the job's (or its profile's) ``scope`` and the factory's ``protected_paths``;
``enforce`` and protected paths refuse the attempt (``scope_violation``, nothing pushed),
``warn`` ships and records the violation."""

from __future__ import annotations

import pytest

from gigafactory.schemas.manifest import ManifestError, parse_job_text

from helpers import Fleet, fast_settings, run
from test_workspace import branches, make_remote, repo_job

WRITES = "mkdir -p docs src\necho doc > docs/a.md\necho code > src/x.py\n"


def test_enforce_refuses_changes_outside_the_scope_and_pushes_nothing(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(WRITES, repo=str(remote), review_policy="auto", scope=["docs/**"],
                                                  scope_mode="enforce", retry={"max": 0}))
            rec = await fleet.wait_stage(job, "failed", "dead_letter", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "scope_violation", a
            assert "src/x.py" in a.detail and "enforce" in a.detail
            assert a.workspace.outside_scope == ["src/x.py"] and not a.workspace.pushed
            assert a.workspace.head  # committed (what it did is kept on the factory's side) ...
            assert set(branches(remote)) == {"main"}  # ... but never pushed
            ev = [e for e in await fleet.events(job) if e["kind"] == "scope_violation"]
            assert ev and ev[0]["data"]["refused"] is True and ev[0]["data"]["outside"] == ["src/x.py"]

    run(main(), 90)


def test_warn_ships_and_records_the_violation(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(WRITES, repo=str(remote), review_policy="auto", scope=["docs/**"]))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=30)
            w = rec.attempts[-1].workspace
            assert w.pushed and branches(remote)[w.branch] == w.head
            assert w.outside_scope == ["src/x.py"] and "warn" in w.scope
            ev = [e for e in await fleet.events(job) if e["kind"] == "scope_violation"]
            assert ev and ev[0]["data"]["refused"] is False

    run(main(), 90)


def test_a_protected_path_is_refused_whatever_the_scope_mode(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")  # the default: .github/workflows/** is protected
            ci = await fleet.submit_one(repo_job("mkdir -p .github/workflows\necho 'on: push' > .github/workflows/ci.yml",
                                                 repo=str(remote), review_policy="auto", retry={"max": 0}),
                                        path="ci.md")
            rec = await fleet.wait_stage(ci, "failed", "dead_letter", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "scope_violation", a
            assert a.workspace.protected == [".github/workflows/ci.yml"] and not a.workspace.outside_scope
            # A factory's own protected paths: deploy/** on f2, for a job with a wide scope in warn mode.
            await fleet.add_factory("f2", caps=["strict"], settings=fast_settings(protected_paths=["deploy/**"]))
            dep = await fleet.submit_one(repo_job("mkdir -p deploy\necho x > deploy/run.sh", repo=str(remote),
                                                  review_policy="auto", scope=["**"], capabilities=["strict"],
                                                  retry={"max": 0}), path="deploy.md")
            rec = await fleet.wait_stage(dep, "failed", "dead_letter", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "scope_violation" and a.workspace.protected == ["deploy/run.sh"], a
            assert set(branches(remote)) == {"main"}

    run(main(), 90)


def test_the_profiles_scope_applies_when_the_job_states_none(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            # docs-writer's scope: ['**/*.md', docs/**, examples/**]
            job = await fleet.submit_one(repo_job(WRITES, repo=str(remote), review_policy="auto",
                                                  profile="docs-writer", engine="shell", scope_mode="enforce",
                                                  retry={"max": 0}))
            rec = await fleet.wait_stage(job, "failed", "dead_letter", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "scope_violation" and a.workspace.outside_scope == ["src/x.py"], a

    run(main(), 90)


@pytest.mark.parametrize("glob, why", [
    ("src/**.py", "src/**/*.py"),
    ("src/[a", "["),
])
def test_a_glob_the_guardrail_cannot_judge_is_refused_at_submit(glob, why):
    text = repo_job("true", repo="/tmp/r.git", scope=["docs/**", glob])
    with pytest.raises(ManifestError) as ei:
        parse_job_text(text, "jobs/bad.md")
    msg = str(ei.value)
    assert "jobs/bad.md" in msg and "scope[1]" in msg and why in msg, msg
