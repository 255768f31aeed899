"""WIP checkpoints and resume (issue 10), with real git, a real broker and real factories.

A ``repo`` job's engine writes step files slowly; its factory snapshots the worktree every
``checkpoint_s`` into ``gf/<job>/wip`` (fenced push, recorded on the job record). The factory
is SIGKILLed mid-run; the job is reclaimed, and the next holder starts from the last checkpoint
(its engine is told so), redoes only what the dead holder did after that checkpoint, and ships a
branch whose history holds the first epoch's checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from gigafactory.config import Settings, SettingsError
from gigafactory.factory import workspace as ws
from gigafactory.factory.checkpoint import record_checkpoint, start_point
from gigafactory.factory.engines.base import Resume, resume_env, resume_note
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import Checkpoint, JobRecord, Lease

from gigafactory.model_server import parse_script, serve_in_thread
from helpers import Fleet, Proc, eventually, fast_env, fast_settings, kill_group, run
from helpers import job_text
from test_engine_claude import CONTENT, SLOW_PYTHON, claude_env  # noqa: F401 (a fixture)
from test_workspace import branches, make_remote, repo_job, sh_git, trailers

STEPS = 14
STEP_S = 0.3
CHECKPOINT_S = 1.0


def step_script(ledger, pidfile) -> str:
    """Write ``step-<i>`` files one by one, skipping those already in the worktree (a resumed
    attempt keeps them); every step done is appended to ``ledger`` (outside the worktree) with
    the epoch that did it."""
    return (f'echo $$ > "{pidfile}-$GF_EPOCH"\n'
            f'echo "start $GF_EPOCH ${{GF_RESUMING:-0}} ${{GF_RESUME_COMMIT:-none}}" >> "{ledger}"\n'
            f'for i in $(seq {STEPS}); do\n'
            f'  [ -f step-$i ] && continue\n'
            f'  echo "done by epoch $GF_EPOCH" > step-$i; echo "step $i $GF_EPOCH" >> "{ledger}"\n'
            f'  sleep {STEP_S}\n'
            f'done\n')


def read_ledger(ledger) -> tuple[dict[int, list[int]], list[list[str]]]:
    steps: dict[int, list[int]] = {}
    starts = []
    for line in ledger.read_text().splitlines():
        w = line.split()
        if w[0] == "step":
            steps.setdefault(int(w[1]), []).append(int(w[2]))
        else:
            starts.append(w[1:])
    return steps, starts


@pytest.mark.timeout(150)
def test_a_factory_killed_mid_run_is_resumed_from_its_checkpoint_and_ships_with_it_in_history(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    ledger = tmp_path / "ledger"
    pidfile = tmp_path / "engine.pid"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            victim = Proc(
                [sys.executable, "-m", "gigafactory", "factory", "--nats", nats_server.url, "--id", "victim",
                 "--no-probe", "--stations", "1", "--data-dir", str(tmp_path / "victim-data"),
                 "--workspace", str(tmp_path / "victim-work")],
                tmp_path / "victim.log", env=fast_env(checkpoint_s=CHECKPOINT_S),
            )
            try:
                await eventually(lambda: "victim" in fleet.coordinator.view.factories, 30, what="victim registered")
                job = await fleet.submit_one(repo_job(step_script(ledger, pidfile), repo=str(remote),
                                                      review_policy="auto", retry={"max": 2, "backoff": "0.1s"},
                                                      verify=f"test -f step-{STEPS}"))

                async def two_checkpoints():
                    rec, _ = await fleet.record(job)
                    return rec.checkpoint is not None and rec.checkpoint.seq >= 2

                await eventually(two_checkpoints, 60, what="two checkpoints of epoch 1")
                victim.signal(signal.SIGKILL)
                assert victim.wait(10) == -signal.SIGKILL
                if (tmp_path / "engine.pid-1").exists():
                    kill_group(int((tmp_path / "engine.pid-1").read_text()))  # its engine, if it outlived it
                held, _ = await fleet.record(job)
                cp = held.checkpoint
                assert held.stage == Stage.BUILDING and cp is not None and cp.epoch == 1 and cp.attempt == 1
                assert cp.branch == f"gf/{job}/wip" and cp.factory == "victim" and cp.engine == "shell"
                # Pushed before it was recorded: the remote's WIP branch has it (or a later one).
                wip = branches(remote)[cp.branch]
                assert sh_git("merge-base", "--is-ancestor", cp.commit, wip, cwd=remote) == ""
                t = trailers(remote, cp.commit)
                assert t["Gigafactory-Checkpoint"] == str(cp.seq) and t["Gigafactory-Epoch"] == "1"
                assert t["Gigafactory-Job"] == job and t["Gigafactory-Engine"] == "shell"
                in_cp = {int(p.split("-")[1]) for p in
                         sh_git("ls-tree", "--name-only", cp.commit, cwd=remote).split() if p.startswith("step-")}
                assert in_cp and cp.files_changed == len(in_cp)
                victim_steps, _ = read_ledger(ledger)
                assert in_cp <= set(victim_steps)

                await fleet.add_factory("rescuer", settings=fleet.settings)
                final = await fleet.wait_stage(job, "shipped", timeout_s=60)
                a = final.attempts[-1]
                assert a.factory == "rescuer" and a.epoch > 1 and a.outcome == "passed"
                w = a.workspace
                assert w.pushed and branches(remote)[w.branch] == w.head == sh_git(
                    "rev-parse", w.branch, cwd=remote).strip()
                # The shipped branch's history holds the first epoch's checkpoint.
                assert sh_git("merge-base", "--is-ancestor", cp.commit, w.head, cwd=remote) == ""
                assert w.base_commit == cp.base_commit and w.files_changed == STEPS

                steps, starts = read_ledger(ledger)
                # The rescuer's engine was told: GF_RESUMING=1 and the checkpoint it started from.
                assert starts == [["1", "0", "none"], [str(a.epoch), "1", cp.commit]], starts
                assert set(steps) == set(range(1, STEPS + 1))
                redone = {i for i, by in steps.items() if len(by) > 1}
                # Nothing in the checkpoint was done again; what was redone is exactly what the dead
                # holder did after its last recorded checkpoint (at most one interval of work).
                assert not redone & in_cp
                assert redone == set(victim_steps) - in_cp
                assert all(by[-1] == a.epoch for i, by in steps.items() if i not in in_cp)

                events = await fleet.events(job)
                resumed = [e for e in events if e["kind"] == "resumed"]
                assert [(e["epoch"], e["data"]["commit"]) for e in resumed] == [(a.epoch, cp.commit)]
                ckd = [e for e in events if e["kind"] == "checkpointed" and e["epoch"] == 1]
                assert ckd and ckd[-1]["data"]["commit"] == cp.commit
            finally:
                victim.close()
                for p in tmp_path.glob("engine.pid-*"):
                    kill_group(int(p.read_text()))

    run(main(), 140)


@pytest.mark.timeout(90)
def test_checkpoints_go_to_the_wip_branch_only_when_something_changed_and_the_run_ships_normally(
        nats_server, tmp_path):
    remote = make_remote(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    # One file, then a long quiet wait: one checkpoint, however many intervals pass.
    script = (f'echo one > one.txt; git add one.txt\n'
              f'for i in $(seq 600); do [ -f "{gate}/go" ] && break; sleep 0.05; done\n'
              f'test "$(git diff --cached --name-only)" = one.txt && test -z "${{GF_RESUMING:-}}"\n')

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=fast_settings(checkpoint_s=0.5)) as fleet:
            f1 = await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(script, repo=str(remote), review_policy="auto"))

            async def checkpointed():
                return [e for e in await fleet.events(job) if e["kind"] == "checkpointed"]

            first = await eventually(checkpointed, 30, what="a checkpoint")
            # Two more intervals with nothing new: no second checkpoint.
            await eventually(lambda: f1.stats.get("checkpoints_unchanged", 0) >= 2, 20, what="unchanged intervals")
            rec, _ = await fleet.record(job)
            cp = rec.checkpoint
            assert cp is not None and cp.seq == 1 and cp.paths == ["one.txt"] and first[0]["data"]["seq"] == 1
            (gate / "go").touch()
            final = await fleet.wait_stage(job, "shipped", timeout_s=30)
            # The engine's own staged change was untouched by the snapshot (its script checked it),
            # the attempt committed normally on its epoch branch from base, and no other
            # checkpoint was taken.
            w = final.attempts[-1].workspace
            assert w.pushed and w.files_changed == 1
            assert sh_git("rev-parse", f"{w.head}^", cwd=remote).strip() == branches(remote)["main"]
            assert [e["data"]["seq"] for e in await fleet.events(job) if e["kind"] == "checkpointed"] == [1]
            assert branches(remote)[f"gf/{job}/wip"] == cp.commit
            assert sh_git("rev-parse", f"{cp.commit}^", cwd=remote).strip() == branches(remote)["main"]

    run(main(), 80)


@pytest.mark.timeout(120)
def test_a_stale_holder_never_pushes_nor_records_a_checkpoint_and_the_next_holder_resumes_from_the_last_good_one(
        nats_server, tmp_path):
    remote = make_remote(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    # Renewals too rare for the holder to learn of the requeue by itself: the compare-and-set
    # before its next checkpoint's push is what must refuse it.
    slow = fast_settings(lease_ttl_s=60.0, lease_renew_s=20.0, checkpoint_s=0.5)
    script = (f'if [ -n "${{GF_RESUMING:-}}" ]; then echo "$GF_RESUME_COMMIT" > "{gate}/resumed-from"; exit 0; fi\n'
              f'for i in $(seq 1200); do echo $i > "tick-$i"; [ -f "{gate}/go" ] && exit 0; sleep 0.05; done; exit 1\n')

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=slow) as fleet:
            f1 = await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(script, repo=str(remote), review_policy="auto",
                                                  retry={"max": 3, "backoff": "0.1s"}))

            async def checkpointed():
                rec, _ = await fleet.record(job)
                return rec.checkpoint

            await eventually(checkpointed, 30, what="a checkpoint of epoch 1")
            await fleet.client.call("requeue", {"job": job})  # the epoch moves on under the holder
            after_requeue, _ = await fleet.record(job)
            good = after_requeue.checkpoint
            assert good is not None and good.epoch == 1

            async def refused():
                return [e for e in await fleet.events(job) if e["kind"] == "checkpoint_refused"]

            [ev, *_] = await eventually(refused, 30, what="the stale holder's checkpoint refused")
            assert ev["epoch"] == 1 and "stale" in ev["reason"], ev
            # Nothing of the stale epoch after the requeue: not on the remote, not on the record.
            assert branches(remote)[f"gf/{job}/wip"] == good.commit
            (gate / "go").touch()
            final = await fleet.wait_stage(job, "shipped", timeout_s=40)
            a = final.attempts[-1]
            assert a.epoch > 2 and a.outcome == "passed" and f1.stats.get("fenced_writes", 0) >= 1
            assert (gate / "resumed-from").read_text().strip() == good.commit
            assert sh_git("merge-base", "--is-ancestor", good.commit, a.workspace.head, cwd=remote) == ""
            ckd = [e for e in await fleet.events(job) if e["kind"] == "checkpointed" and e["epoch"] == 1]
            assert ckd[-1]["data"]["commit"] == good.commit  # the last one epoch 1 recorded is the good one

    run(main(), 110)


@pytest.mark.timeout(300)
def test_a_claude_attempt_resumed_on_the_same_factory_gets_its_session_back_and_the_note(
        nats_server, tmp_path, claude_env):
    """The real ``claude`` CLI against the scripted model server: the first attempt writes a file
    and starts a long command; a checkpoint records the file and the CLI's session id; the job is
    requeued under it; the next attempt, on the same factory, starts from the checkpoint with
    ``--resume`` (its request carries the first attempt's conversation) and the resume note."""
    remote = make_remote(tmp_path)
    script = {"turns": [
        {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
        {"text": "Waiting.", "tool_calls": [{"run_command": {"command": SLOW_PYTHON}}]},
        {"text": "Resumed; all done."},
    ]}

    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path, settings=fast_settings(checkpoint_s=0.5)) as fleet:
                claude_env(server.url)
                await fleet.add_factory("c-1", probe=True)
                job = await fleet.submit_one(job_text(
                    "Create hello.txt as scripted.", engine="claude", repo=str(remote), review_policy="auto",
                    model="claude-sonnet-4-5", yolo=True, retry={"max": 2, "backoff": "0.1s"}, timeout="120s"))

                async def with_session():
                    rec, _ = await fleet.record(job)
                    cp = rec.checkpoint
                    return cp if cp and cp.session and "hello.txt" in cp.paths else None

                cp = await eventually(with_session, 150, what="a checkpoint with hello.txt and the session id")
                await fleet.client.call("requeue", {"job": job})
                final = await fleet.wait_stage(job, "shipped", "failed", timeout_s=150)
                a = final.attempts[-1]
                assert final.stage == "shipped" and a.epoch > cp.epoch and a.factory == "c-1", a.detail
                assert sh_git("merge-base", "--is-ancestor", cp.commit, a.workspace.head, cwd=remote) == ""
                turns = [e for e in server.exchanges if e.get("kind") in ("turn", "final")]
                last = json.dumps(turns[-1]["body"]["messages"])
                assert "you are resuming this task" in last  # the note
                assert "Create hello.txt as scripted." in last and "Writing the file." in last  # the session
                log = next(p for p in (tmp_path / "factories" / "c-1" / "logs").iterdir()
                           if f"epoch-{a.epoch}" in p.name)
                assert cp.session in log.read_text()

    run(main(), timeout_s=280)


@pytest.mark.timeout(120)
def test_a_checkpoint_gone_from_the_remote_is_not_resumed_the_attempt_starts_from_base_and_says_why(
        nats_server, tmp_path):
    remote = make_remote(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (f'echo "${{GF_RESUMING:-0}}" > "{marks}/$GF_FACTORY-resuming"; echo "$GF_EPOCH" > "work-$GF_EPOCH"\n'
              f'[ "$GF_FACTORY" = f2 ] && exit 0\n'
              f'for i in $(seq 1200); do echo $i > tick; sleep 0.05; done; exit 1\n')

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=fast_settings(checkpoint_s=0.5)) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(script, repo=str(remote), review_policy="auto",
                                                  retry={"max": 3, "backoff": "0.1s"}))

            async def checkpointed():
                rec, _ = await fleet.record(job)
                return rec.checkpoint

            await eventually(checkpointed, 30, what="a checkpoint on f1")
            await fleet.stop("f1")  # drained: the job goes back to the queue, its checkpoint recorded
            cp = (await fleet.record(job))[0].checkpoint
            sh_git("update-ref", "-d", f"refs/heads/{cp.branch}", cwd=remote)  # the WIP branch deleted
            sh_git("-c", "gc.reflogExpire=now", "-c", "gc.pruneExpire=now", "gc", "--quiet", "--prune=now", cwd=remote)
            await fleet.add_factory("f2")  # a fresh mirror: the commit cannot be found anywhere
            final = await fleet.wait_stage(job, "shipped", timeout_s=40)
            a = final.attempts[-1]
            assert a.factory == "f2" and a.outcome == "passed"
            missed = [e for e in await fleet.events(job) if e["kind"] == "resume_missed"]
            assert [(e["epoch"], e["data"]["commit"]) for e in missed] == [(a.epoch, cp.commit)]
            assert cp.commit[:12] in missed[0]["reason"] and "starting from main" in missed[0]["reason"]
            assert (marks / "f2-resuming").read_text().strip() == "0"  # not told it resumes
            assert sh_git("rev-parse", f"{a.workspace.head}^", cwd=remote).strip() == branches(remote)["main"]
            assert not [e for e in await fleet.events(job) if e["kind"] == "resumed"]

    run(main(), 110)


@pytest.mark.timeout(120)
def test_a_drained_factory_takes_a_final_checkpoint_so_the_next_holder_loses_nothing(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    # An interval far longer than the test: the only checkpoint is the drain's.
    script = (f'if [ -n "${{GF_RESUMING:-}}" ]; then ls > "{marks}/resumed-with"; exit 0; fi\n'
              f'echo a > a.txt; echo b > b.txt; touch "{marks}/written"\n'
              f'for i in $(seq 1200); do sleep 0.05; done; exit 1\n')

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=fast_settings(checkpoint_s=3600.0)) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(script, repo=str(remote), review_policy="auto",
                                                  retry={"max": 3, "backoff": "0.1s"}))
            await eventually(lambda: (marks / "written").exists(), 30, what="the files written")
            await fleet.stop("f1")  # drain: the engine is stopped with the lease held
            rec, _ = await fleet.record(job)
            cp = rec.checkpoint
            assert rec.stage == Stage.QUEUED and cp is not None and cp.epoch == 1 and cp.seq == 1
            assert sorted(cp.paths) == ["a.txt", "b.txt"] and branches(remote)[cp.branch] == cp.commit
            await fleet.add_factory("f2")
            final = await fleet.wait_stage(job, "shipped", timeout_s=40)
            assert {"a.txt", "b.txt"} <= set((marks / "resumed-with").read_text().split())
            assert sh_git("merge-base", "--is-ancestor", cp.commit, final.attempts[-1].workspace.head,
                          cwd=remote) == ""

    run(main(), 110)


# -- pure pieces ---------------------------------------------------------------------------------


def _record(epoch: int, factory: str = "f1", checkpoint: Checkpoint | None = None) -> JobRecord:
    from gigafactory.schemas.manifest import Manifest
    return JobRecord(id="j", manifest=Manifest(), body="x", source="api", content_hash="h", submitted_at=0.0,
                     pool="p", requirements=[], stage=Stage.BUILDING, epoch=epoch,
                     lease=Lease(factory=factory, station=0, epoch=epoch), attempt=1, checkpoint=checkpoint)


def _cp(epoch: int, seq: int, commit: str = "c" * 40) -> Checkpoint:
    return Checkpoint(commit=commit, epoch=epoch, attempt=1, at=1.0, branch="gf/j/wip", seq=seq, base_commit="b" * 40)


def test_only_the_holder_records_a_checkpoint_and_a_decided_again_write_is_not_repeated():
    rec = _record(3)
    out = record_checkpoint(rec, "f1", 3, _cp(3, 1))
    assert out is not None and out.checkpoint == _cp(3, 1)
    assert record_checkpoint(out, "f1", 3, _cp(3, 1)) is None  # landed already
    assert record_checkpoint(out, "f1", 3, _cp(3, 2)).checkpoint.seq == 2
    with pytest.raises(protocol.Fenced):
        record_checkpoint(rec, "f1", 2, _cp(2, 1))  # a stale epoch
    with pytest.raises(protocol.Fenced):
        record_checkpoint(rec, "f2", 3, _cp(3, 1))  # not the holder


def test_an_attempt_starts_from_an_earlier_attempts_checkpoint_only():
    assert start_point(_record(1)) is None
    sp = start_point(_record(3, checkpoint=_cp(1, 4)))
    assert sp is not None and sp.commit == "c" * 40 and sp.base_commit == "b" * 40 and sp.branch == "gf/j/wip"
    assert start_point(_record(3, checkpoint=_cp(3, 1))) is None  # its own: not a resume


def test_a_resuming_engine_is_told_by_its_environment_and_an_agent_by_its_prompt():
    r = Resume(commit="a" * 40, from_epoch=1, from_attempt=1, seq=2, files_changed=30, lines_added=5,
               lines_deleted=1, paths=tuple(f"p{i}" for i in range(30)))
    assert resume_env(r) == {"GF_RESUMING": "1", "GF_RESUME_COMMIT": "a" * 40}
    note = resume_note(r)
    assert "resuming" in note and "aaaaaaaaaaaa" in note and "p19" in note and "p20" not in note
    assert "and 10 more" in note and note.endswith("\n\n")


def test_a_snapshot_leaves_the_engines_index_and_files_alone_and_skips_an_unchanged_tree(tmp_path):
    remote = make_remote(tmp_path)
    store = ws.Store(tmp_path / "git", timeout_s=30, max_bytes=10**9, base_dir=tmp_path)
    co = store.checkout(str(remote), None, "j", 1)
    (co.path / "staged.txt").write_text("s\n")
    sh_git("add", "staged.txt", cwd=co.path)
    (co.path / "loose.txt").write_text("l\n")
    (co.path / "x.log").write_text("ignored\n")
    before = sh_git("status", "--porcelain", cwd=co.path)
    tree0 = ws.tree_of(co, co.start_commit, timeout_s=30)
    made = ws.snapshot(co, co.start_commit, tree0, "WIP\n\nGigafactory-Checkpoint: 1\n", author="G",
                       email="g@example.com", timeout_s=30)
    assert made is not None
    commit, tree = made
    assert sh_git("status", "--porcelain", cwd=co.path) == before  # the engine's index is as it was
    assert sorted(sh_git("ls-tree", "--name-only", commit, cwd=co.path).split()) == [
        ".gitignore", "README.md", "loose.txt", "staged.txt"]
    assert sh_git("rev-parse", "HEAD", cwd=co.path).strip() == co.start_commit  # HEAD did not move
    assert ws.snapshot(co, commit, tree, "WIP\n", author="G", email="g@example.com", timeout_s=30) is None
    # The push is a compare-and-set on the remote branch: a holder that expects another value loses.
    ws.push_wip(co, commit, "gf/j/wip", None, timeout_s=30)
    (co.path / "more.txt").write_text("m\n")
    c2, _ = ws.snapshot(co, commit, tree, "WIP 2\n", author="G", email="g@example.com", timeout_s=30)
    with pytest.raises(ws.WipRaced) as e:
        ws.push_wip(co, c2, "gf/j/wip", "0" * 40, timeout_s=30)
    assert e.value.actual == commit
    ws.push_wip(co, c2, "gf/j/wip", commit, timeout_s=30)
    assert branches(remote)["gf/j/wip"] == c2
    # A file deleted since is gone from the next snapshot (its index is the attempt's, kept).
    (co.path / "loose.txt").unlink()
    c3, _ = ws.snapshot(co, c2, None, "WIP 3\n", author="G", email="g@example.com", timeout_s=30)
    assert "loose.txt" not in sh_git("ls-tree", "--name-only", c3, cwd=co.path).split()
    assert ws.wip_index(co).exists()
    store.release(co)
    assert not ws.wip_index(co).exists() and not co.path.exists()
    # A checkout from a checkpoint whose commit is gone falls back to base, saying why.
    co2 = store.checkout(str(remote), None, "j", 2, start=ws.StartPoint("1" * 40, "gf/j/wip", None))
    assert co2.resumed_from is None and "not on" in co2.resume_missed and co2.start_commit == co2.base_commit
    co3 = store.checkout(str(remote), None, "j", 3, start=ws.StartPoint(c2, "gf/j/wip", co.base_commit))
    assert co3.resumed_from == c2 and (co3.path / "more.txt").exists() and co3.base_commit == co.base_commit
    subprocess.run(["git", "status"], cwd=co3.path, check=True, capture_output=True)


@pytest.mark.parametrize("value", [-1.0, 0.1, 10**6])
def test_a_checkpoint_interval_that_cannot_work_is_refused_naming_the_variable(value):
    with pytest.raises(SettingsError, match="GIGAFACTORY_CHECKPOINT_S"):
        Settings(checkpoint_s=value).validate()
    Settings(checkpoint_s=0).validate()  # off
