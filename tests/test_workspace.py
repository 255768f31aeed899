"""A ``repo`` job's workspace, end to end with real git and a real broker: a bare "remote"
repository in a temporary folder, factories running the ``shell`` engine in per-attempt
worktrees, commits with the job's trailers, stats in the record, fenced pushes, mirror eviction
and the clean-up of a crashed factory's leftovers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gigafactory.cli import main as cli
from gigafactory.factory import workspace as ws
from gigafactory.factory.workspace import GitError, Store

from helpers import Fleet, eventually, fast_settings, job_text, run

IDENT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
         "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def sh_git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **IDENT}, check=True, capture_output=True,
                          text=True, timeout=60).stdout


def make_remote(root: Path, name: str = "remote.git", *, branches: tuple[str, ...] = ()) -> Path:
    """A bare repository with one commit on ``main`` (README.md, a .gitignore of ``*.log``),
    and the other ``branches`` at that commit."""
    src = root / f"{name}-src"
    src.mkdir(parents=True)
    sh_git("init", "-q", "-b", "main", cwd=src)
    (src / "README.md").write_text("hello\nworld\n")
    (src / ".gitignore").write_text("*.log\n")
    sh_git("add", "-A", cwd=src)
    sh_git("commit", "-qm", "initial", cwd=src)
    for b in branches:
        sh_git("branch", b, cwd=src)
    remote = root / name
    sh_git("clone", "-q", "--bare", str(src), str(remote))
    return remote


def repo_job(script: str, **manifest) -> str:
    """A shell job on a repository (no ``cwd``: the checkout's root)."""
    return job_text(script, **manifest)


def branches(remote: Path) -> dict[str, str]:
    out = sh_git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/", cwd=remote)
    return dict(line.split(" ", 1) for line in out.splitlines())


def trailers(remote: Path, ref: str) -> dict[str, str]:
    msg = sh_git("log", "-1", "--format=%B", ref, cwd=remote)
    parsed = subprocess.run(["git", "interpret-trailers", "--parse"], input=msg, capture_output=True, text=True,
                            check=True).stdout
    return dict(line.split(": ", 1) for line in parsed.splitlines())


# -- the store on its own (no broker) ------------------------------------------------------------


def test_a_checkout_starts_from_the_remote_head_or_the_named_base_and_a_missing_base_is_named(tmp_path):
    remote = make_remote(tmp_path, branches=("dev",))
    sh_git("update-ref", "refs/heads/dev", sh_git("commit-tree", "-m", "on dev", "-p", "main", "main^{tree}",
                                                  cwd=remote).strip(), cwd=remote)
    store = Store(tmp_path / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    main_co = store.checkout(str(remote), None, "j1", 1)
    assert (main_co.base, main_co.branch) == ("main", "gf/j1/e1")
    assert main_co.base_commit == branches(remote)["main"]
    dev_co = store.checkout(str(remote), "dev", "j2", 1)
    assert dev_co.base_commit == branches(remote)["dev"] != main_co.base_commit
    assert main_co.mirror == dev_co.mirror and main_co.path != dev_co.path  # one mirror, two worktrees
    with pytest.raises(GitError, match="has no branch 'nope'"):
        store.checkout(str(remote), "nope", "j3", 1)
    with pytest.raises(GitError):
        store.checkout(str(tmp_path / "no-such-repo.git"), None, "j4", 1)
    for co in (main_co, dev_co):
        store.release(co)
    assert list(store.worktrees.iterdir()) == []
    assert sh_git("for-each-ref", "refs/heads/gf/", cwd=main_co.mirror) == ""


def test_unused_mirrors_are_evicted_least_recently_used_first_and_one_in_use_never(tmp_path):
    remotes = [make_remote(tmp_path, f"r{i}.git") for i in range(3)]
    store = Store(tmp_path / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    cos = [store.checkout(str(r), None, f"j{i}", 1) for i, r in enumerate(remotes)]
    for i, co in enumerate(cos):
        os.utime(store.mirrors / f"{co.key}.used", (1000.0 + i, 1000.0 + i))  # r0 oldest, r2 newest
    one = max(size for size, _ in store.mirror_sizes().values())
    store.max_bytes = one  # room for one mirror
    assert store.evict() == []  # all three in use: none goes, the store stays over its bound
    store.release(cos[0])  # r0 unused now, and the least recently used: it goes
    assert cos[0].key in store.evicted and not cos[0].mirror.exists()
    store.release(cos[2])  # r2 unused too, but r1 (in use) and r2 fit no better: r2 goes
    assert not cos[2].mirror.exists() and cos[1].mirror.exists()
    store.release(cos[1])
    assert cos[1].mirror.exists()  # alone it fits the bound: kept warm
    store.max_bytes = 0
    assert store.evict() == [cos[1].key] and store.mirror_sizes() == {}


def test_concurrent_checkouts_of_one_repo_are_serialised_per_mirror_and_each_gets_its_own_worktree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    remote = make_remote(tmp_path)
    store = Store(tmp_path / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    with ThreadPoolExecutor(4) as pool:  # four stations of one factory at once, the first clone included
        cos = list(pool.map(lambda i: store.checkout(str(remote), None, f"j{i}", 1), range(4)))
    assert len({co.path for co in cos}) == 4 and len({co.mirror for co in cos}) == 1
    assert len(list(store.mirrors.glob("*.git"))) == 1
    for i, co in enumerate(cos):
        (co.path / f"{i}.txt").write_text(f"{i}\n")
        assert ws.commit_all(co, ws.commit_message(f"job {i}", {"Gigafactory-Job": f"j{i}"}), author="a",
                             email="a@example.com", timeout_s=30)
        st = ws.diff_stats(co, timeout_s=30)
        assert (st.files_changed, st.lines_added, st.paths) == (1, 1, [f"{i}.txt"])  # only its own change
    assert ws.commit_all(cos[0], "nothing", author="a", email="a@example.com", timeout_s=30) is None
    for co in cos:
        store.release(co)
    assert not store.in_use(cos[0].key) and list(store.worktrees.iterdir()) == []


def test_commit_subjects_come_from_the_prompts_first_line_and_urls_normalise(tmp_path):
    assert ws.subject_from("\n# Fix the login form\nmore", "j") == "Fix the login form"
    assert ws.subject_from("```sh\necho hi\n```", "j") == "echo hi"
    assert ws.subject_from("  \n", "job-7") == "gigafactory job job-7"
    assert len(ws.subject_from("x" * 500, "j")) == ws.COMMIT_SUBJECT_MAX_CHARS
    assert ws.normalise_url("HTTPS://Git.Example.com/a/b.git", tmp_path) == "https://git.example.com/a/b"
    assert ws.normalise_url("https://git.example.com/a/b/", tmp_path) == "https://git.example.com/a/b"
    assert ws.normalise_url("repos/x.git", tmp_path) == str((tmp_path / "repos/x.git").resolve())
    assert ws.mirror_key(ws.normalise_url("https://h/a.git", tmp_path)) == ws.mirror_key("https://h/a")


# -- factories and a broker ------------------------------------------------------------------------

SHIP_SCRIPT = """\
# Add the numbers file
printf 'one\\ntwo\\nthree\\n' > numbers.txt
echo gone > README.md
echo noise > debug.log
"""


def test_a_repo_job_ships_its_branch_with_the_trailers_and_its_stats_in_the_record(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    base = branches(remote)["main"]

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f1 = await fleet.add_factory("f1")
            # Verify runs in the worktree after the commit: nothing is left uncommitted but the
            # ignored log, and the engine's file is there.
            job = await fleet.submit_one(repo_job(
                SHIP_SCRIPT, repo=str(remote), review_policy="auto",
                verify='test -f numbers.txt && test -z "$(git status --porcelain)" && test -f debug.log'))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "passed", a
            w = a.workspace
            assert w is not None and w.branch == f"gf/{job}/e{rec.attempts[-1].epoch}" == f"gf/{job}/e1"
            assert (w.files_changed, w.lines_added, w.lines_deleted) == (2, 4, 2), w
            assert w.pushed and w.base == "main" and w.base_commit == base
            assert branches(remote)[w.branch] == w.head
            # The usage insights read the same figures next to the spend (the attribution).
            at = a.attribution
            assert (at.files_changed, at.lines_added, at.lines_deleted, at.head) == (2, 4, 2, w.head), at
            assert sh_git("rev-parse", f"{w.head}^", cwd=remote).strip() == base
            assert sh_git("log", "-1", "--format=%s", w.head, cwd=remote).strip() == "Add the numbers file"
            assert trailers(remote, w.head) == {
                "Gigafactory-Job": job, "Gigafactory-Epoch": "1", "Gigafactory-Attempt": "1",
                "Gigafactory-Engine": "shell", "Gigafactory-Model": "default"}
            files = sh_git("ls-tree", "-r", "--name-only", w.head, cwd=remote).split()
            assert sorted(files) == [".gitignore", "README.md", "numbers.txt"]  # debug.log ignored
            kinds = [e["kind"] for e in await fleet.events(job)]
            assert kinds.index("committed") < kinds.index("pushed") < kinds.index("finished"), kinds
            # Removed after the report: no worktree, no local attempt branch.
            # The folder goes first, the local branch right after it (Store._remove_worktree).
            mirror = next(f1.git.mirrors.glob("*.git"))
            await eventually(lambda: not any(f1.git.worktrees.iterdir())
                             and sh_git("for-each-ref", "refs/heads/gf/", cwd=mirror) == "", 10,
                             what="worktree and local attempt branch removed")

            # status --json and the text view show them.
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["status", job, "--json", "--nats",
                                                                    nats_server.url])
            assert res.exit_code == 0, res.output
            shown = json.loads(res.output)["record"]["attempts"][-1]["workspace"]
            assert shown["branch"] == w.branch and shown["head"] == w.head and shown["lines_added"] == 4
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["status", job, "--nats", nats_server.url])
            assert res.exit_code == 0, res.output
            assert f"branch {w.branch} at {w.head[:12]}" in res.output
            assert "2 files +4 -2, pushed" in res.output

            # An unreachable repository is a setup failure that names it.
            bad = await fleet.submit_one(repo_job("true", repo=str(tmp_path / "missing.git"),
                                                   review_policy="auto"), path="bad.md")
            rec = await fleet.wait_stage(bad, "failed", timeout_s=30)
            assert rec.attempts[-1].outcome == "setup_failed"
            assert "missing.git" in rec.attempts[-1].detail and "no worktree" in rec.attempts[-1].detail
            assert rec.attempts[-1].attribution.files_changed is None  # no commit: no figures, not zeros

    run(main(), 90)


def _rendezvous(marks: Path) -> str:
    # Each job says where it ran, then waits (bounded) until both have started: they overlap.
    return (f'pwd > "{marks}/$GF_JOB_ID.pwd"; echo "$GF_JOB_ID" > "$GF_JOB_ID.txt"\n'
            f'for i in $(seq 400); do [ "$(ls "{marks}" | wc -l)" -ge 2 ] && exit 0; sleep 0.05; done; exit 1\n')


def test_two_jobs_on_one_repo_across_two_factories_get_their_own_worktrees_and_both_push(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            await fleet.add_factory("f2")
            jobs = [j["job"] for j in await fleet.submit(*(
                repo_job(_rendezvous(marks), repo=str(remote), review_policy="auto") for _ in range(2)))]
            recs = [await fleet.wait_stage(j, "shipped", timeout_s=40) for j in jobs]
            assert {r.attempts[-1].factory for r in recs} == {"f1", "f2"}
            pwds = {(marks / f"{j}.pwd").read_text().strip() for j in jobs}
            assert len(pwds) == 2, pwds  # distinct worktrees
            heads = branches(remote)
            for j, r in zip(jobs, recs):
                w = r.attempts[-1].workspace
                assert w.pushed and heads[w.branch] == w.head and w.files_changed == 1
                files = sh_git("ls-tree", "-r", "--name-only", w.head, cwd=remote).split()
                assert f"{j}.txt" in files and not any(f.endswith(".txt") and f != f"{j}.txt" for f in files)

    run(main(), 120)


def test_a_stale_holder_never_pushes_and_the_next_holder_does(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    # Renewals rare enough that the holder cannot learn of the requeue before its push: the
    # compare-and-set right before the push is what must refuse it.
    slow = fast_settings(lease_ttl_s=60.0, lease_renew_s=20.0)
    script = (f'echo "epoch $GF_EPOCH" > work.txt; touch "{gate}/ready-$GF_EPOCH"\n'
              f'for i in $(seq 1200); do [ -f "{gate}/go" ] && exit 0; sleep 0.05; done; exit 1\n')

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=slow) as fleet:
            f1 = await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(script, repo=str(remote), review_policy="auto"))
            await eventually(lambda: (gate / "ready-1").exists(), 30, what="epoch 1 running")
            await fleet.client.call("requeue", {"job": job})  # the epoch moves on under the holder
            (gate / "go").touch()
            rec = await fleet.wait_stage(job, "shipped", timeout_s=40)
            stale = [e for e in await fleet.events(job) if e["kind"] == "push_refused"]
            assert stale and stale[0]["epoch"] == 1 and "stale" in stale[0]["reason"], stale
            assert f1.stats.get("pushes_fenced") == 1
            heads = branches(remote)
            assert f"gf/{job}/e1" not in heads, heads  # the stale holder pushed nothing
            w = rec.attempts[-1].workspace
            assert rec.attempts[-1].epoch > 1 and w.pushed and heads[w.branch] == w.head
            assert w.branch == f"gf/{job}/e{rec.attempts[-1].epoch}"

    run(main(), 120)


def test_a_mirror_evicted_while_no_job_uses_it_is_cloned_again_for_the_next_job(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=fast_settings(git_mirrors_max_bytes=0)) as fleet:
            f1 = await fleet.add_factory("f1")
            first = await fleet.submit_one(repo_job("echo 1 > one.txt", repo=str(remote),
                                                     review_policy="auto"), path="one.md")
            await fleet.wait_stage(first, "shipped", timeout_s=30)
            await eventually(lambda: not list(f1.git.mirrors.glob("*.git")), 10, what="mirror evicted")
            second = await fleet.submit_one(repo_job("echo 2 > two.txt", repo=str(remote),
                                                      review_policy="auto"), path="two.md")
            rec = await fleet.wait_stage(second, "shipped", timeout_s=30)
            w = rec.attempts[-1].workspace
            assert w.pushed and branches(remote)[w.branch] == w.head and w.files_changed == 1

    run(main(), 90)


def test_a_crashed_factorys_worktrees_and_branches_are_cleaned_at_its_start(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    # What a factory killed mid-attempt leaves: a worktree with work in it, its local branch.
    left = Store(tmp_path / "factories" / "f1" / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    co = left.checkout(str(remote), None, "crashed", 4)
    (co.path / "half-done.txt").write_text("x")
    (left.worktrees / "stray-file").write_text("x")
    assert sh_git("for-each-ref", "refs/heads/gf/", cwd=co.mirror) != ""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f1 = await fleet.add_factory("f1")
            assert list(f1.git.worktrees.iterdir()) == []
            assert sh_git("for-each-ref", "refs/heads/gf/", cwd=co.mirror) == ""
            assert str(co.path) not in sh_git("worktree", "list", cwd=co.mirror)
            # The warm mirror is kept and serves the next job.
            job = await fleet.submit_one(repo_job("echo ok > ok.txt", repo=str(remote),
                                                   review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=30)
            assert rec.attempts[-1].workspace.pushed and co.mirror.exists()

    run(main(), 90)


def test_a_failed_attempt_is_committed_but_not_pushed_nor_one_with_too_little_lease_left(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    # A minimum no renewal can meet (some time always passes after the write is sent): the
    # renewal before the push lands, but the push must not go out.
    greedy = fast_settings(git_push_min_remaining_s=fast_settings().lease_ttl_s - 1e-9)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            await fleet.add_factory("f2", caps=["greedy"], settings=greedy)
            failed = await fleet.submit_one(repo_job("echo x > f.txt\nexit 3", repo=str(remote), review_policy="auto",
                                                     retry={"max": 0}), path="failed.md")
            late = await fleet.submit_one(repo_job("echo y > g.txt", repo=str(remote), review_policy="auto",
                                                   capabilities=["greedy"], retry={"max": 0}), path="late.md")
            rec = await fleet.wait_stage(failed, "dead_letter", "failed", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "crash" and a.workspace is not None, a
            assert a.workspace.head and a.workspace.files_changed == 1 and not a.workspace.pushed
            rec = await fleet.wait_stage(late, "dead_letter", "failed", timeout_s=30)
            a = rec.attempts[-1]
            assert a.outcome == "crash" and "git_push_min_remaining_s" in a.detail, a
            assert not a.workspace.pushed and a.workspace.head
            assert set(branches(remote)) == {"main"}  # neither attempt pushed anything
            refused = [e for e in await fleet.events(late) if e["kind"] == "push_refused"]
            assert refused and "lease" in refused[0]["reason"]

    run(main(), 90)


def test_a_rename_counts_both_paths_and_an_engines_own_commit_is_counted_too(tmp_path):
    remote = make_remote(tmp_path)
    store = Store(tmp_path / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    co = store.checkout(str(remote), None, "j", 1)
    sh_git("mv", "README.md", "docs.md", cwd=co.path)
    sh_git("commit", "-qm", "the engine committed this itself", cwd=co.path)
    (co.path / "more.txt").write_text("a\nb\n")
    head = ws.commit_all(co, "rest", author="a", email="a@example.com", timeout_s=30)
    st = ws.diff_stats(co, timeout_s=30)
    assert st.head == head and sorted(st.paths) == ["README.md", "docs.md", "more.txt"]
    assert (st.files_changed, st.lines_added, st.lines_deleted) == (3, 4, 2)
    store.release(co)


@pytest.mark.parametrize("field, value, named", [
    ("git_timeout_s", 0.0, "GIGAFACTORY_GIT_TIMEOUT_S"),
    ("git_mirrors_max_bytes", -1, "GIGAFACTORY_GIT_MIRRORS_MAX_BYTES"),
    ("git_push_min_remaining_s", 2.0, "GIGAFACTORY_GIT_PUSH_MIN_REMAINING_S"),
    ("git_push_min_remaining_s", -0.5, "GIGAFACTORY_GIT_PUSH_MIN_REMAINING_S"),
    ("ref_cleanup_after_s", -1.0, "GIGAFACTORY_REF_CLEANUP_AFTER_S"),
    ("ref_cleanup_after_s", 31 * 86400.0, "GIGAFACTORY_REF_CLEANUP_AFTER_S"),
])
def test_workspace_settings_that_cannot_work_are_refused_naming_the_variable(field, value, named):
    from gigafactory.config import SettingsError

    with pytest.raises(SettingsError, match=named):
        fast_settings(**{field: value}).validate()  # lease_ttl_s is 2.0 here
    fast_settings(git_timeout_s=1.0, git_mirrors_max_bytes=0, git_push_min_remaining_s=1.5).validate()


def test_an_engine_that_repoints_its_worktrees_git_folders_cannot_run_code_through_the_factorys_git(tmp_path):
    """An engine may write anything in its worktree, including the ``.git`` file and (its own git
    folder being writable under bwrap) the ``commondir`` file. Repointed at a repository of the
    engine's own, the factory's later git calls (outside any sandbox) would run that repository's
    hooks and ``core.fsmonitor``, and commit and push there. The factory pins the git folders it
    read when it made the worktree, and runs no hook or fsmonitor whatever a config says."""
    remote = make_remote(tmp_path)
    store = Store(tmp_path / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    co = store.checkout(str(remote), None, "j1", 1)
    assert co.git_dir is not None and co.git_dir.is_dir()
    # The engine's own repository, with a hook and an fsmonitor that leave a mark when run.
    evil = tmp_path / "evil"
    sh_git("init", "-q", str(evil))
    mark = tmp_path / "ran.txt"
    script = evil / "evil.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {mark}\n")
    script.chmod(0o755)
    for hook in ("post-commit", "pre-commit", "post-index-change", "reference-transaction"):
        (evil / ".git" / "hooks" / hook).write_text(script.read_text())
        (evil / ".git" / "hooks" / hook).chmod(0o755)
    sh_git("config", "core.fsmonitor", str(script), cwd=evil)
    (co.path / ".git").write_text(f"gitdir: {evil / '.git'}\n")  # the worktree's .git file, rewritten
    (co.git_dir / "commondir").write_text(f"{evil / '.git'}\n")  # and its commondir
    (co.path / "work.txt").write_text("the engine's work\n")

    head = ws.commit_all(co, "the work", author="gf", email="gf@example.com", timeout_s=30)

    assert not mark.exists(), "a hook or fsmonitor of the engine's repository ran"
    assert head is not None and sh_git("rev-parse", co.branch, cwd=co.mirror).strip() == head
    assert sh_git("show", f"{head}:work.txt", cwd=co.mirror) == "the engine's work\n"
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=evil, capture_output=True).returncode != 0
