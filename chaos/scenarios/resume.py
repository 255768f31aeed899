"""Scenario: resume from a WIP checkpoint (issue 10).

``repo`` jobs on a real bare repository write step files slowly while their factories take WIP
checkpoints every ``checkpoint_s``; the holder of a running job is SIGKILLed mid-run (and
restarted later with the same id). Every job must ship once, from a later epoch than the one
killed, with the killed epoch's last recorded checkpoint in the shipped branch's history, and
the work lost must be at most one checkpoint interval: the steps done again are exactly the
steps the killed epoch did after its last checkpoint, and they span at most ``checkpoint_s``
plus the time one checkpoint takes (:data:`CHECKPOINT_SLACK_S`).
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import time
from pathlib import Path

from gigafactory.schemas.lifecycle import Stage

from ..harness import Expectations, Lab, ScenarioConfig, ScenarioResult, job_text, ledger_prelude, scenario
from .common import READY_BOUND_S, SETTLE_TIMEOUT_S

CHECKPOINT_S = 1.0
"""The factories' ``checkpoint_s`` in this scenario."""
STEPS = 16
STEP_S = 0.3
"""A job's work: ``STEPS`` step files, one every ``STEP_S`` (about five seconds)."""
CHECKPOINT_SLACK_S = 2.0
"""What one checkpoint may take on a loaded two-core machine (snapshot, fence, push, record
write), on top of ``checkpoint_s``, in the bound of the work a kill may lose."""
JOB_EVERY_S = 4.0
"""The full form submits a job this often (s)."""
GIT_TIMEOUT_S = 60.0


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@example.invalid",
           "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@example.invalid", "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_S).stdout


def _is_ancestor(remote: Path, a: str, b: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=remote, capture_output=True,
                          timeout=GIT_TIMEOUT_S).returncode == 0


def make_remote(workdir: Path) -> Path:
    """A bare repository with one commit on ``main``."""
    src = workdir / "remote-src"
    src.mkdir(parents=True, exist_ok=True)
    _git("init", "-q", "-b", "main", cwd=src)
    (src / "README.md").write_text("resume scenario\n")
    _git("add", "-A", cwd=src)
    _git("commit", "-qm", "initial", cwd=src)
    remote = workdir / "remote.git"
    _git("clone", "-q", "--bare", str(src), str(remote))
    return remote


def step_job(lab: Lab, remote: Path, steps_log: Path) -> str:
    """A job that writes ``step-<i>`` files one by one (skipping those its worktree already has:
    a resumed attempt keeps them), each step appended to ``steps_log`` (job, epoch, step, wall
    clock) and to the lab's side-effect ledger."""
    script = (ledger_prelude(lab.ledger) + "gf_ledger start\n"
              f'for i in $(seq {STEPS}); do\n'
              f'  [ -f step-$i ] && continue\n'
              f'  echo "epoch $GF_EPOCH" > step-$i\n'
              f'  t=$EPOCHREALTIME; [ -n "$t" ] || t=$(date +%s.%N)\n'
              f'  printf \'%s %s %s %s\\n\' "$GF_JOB_ID" "$GF_EPOCH" "$i" "$t" >> "{steps_log}"\n'
              f'  gf_ledger progress; sleep {STEP_S}\n'
              f'done\n'
              "gf_ledger END\n")
    return job_text(script, repo=str(remote), review_policy="auto", retry={"max": 20, "backoff": "0.1s"},
                    verify=f"test -f step-{STEPS}")


def read_steps(path: Path) -> dict[str, list[tuple[int, int, float]]]:
    """job -> [(epoch, step, time)] in the order written."""
    out: dict[str, list[tuple[int, int, float]]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        w = line.split()
        if len(w) == 4:
            out.setdefault(w[0], []).append((int(w[1]), int(w[2]), float(w[3].replace(",", "."))))
    return out


@scenario("resume",
          "repo jobs take WIP checkpoints every checkpoint_s; their holders are SIGKILLed mid-run: each job "
          "ships once from a later epoch, with the killed epoch's checkpoint in its history, losing at most one "
          "checkpoint interval of work")
async def resume(cfg: ScenarioConfig) -> ScenarioResult:
    window_s = 0.0 if cfg.bounded else cfg.duration_s
    exp = Expectations()
    notes: list[str] = []
    async with Lab(cfg.workdir, seed=cfg.seed, factory_env=cfg.factory_env,
                   timings={"checkpoint_s": CHECKPOINT_S}) as lab:
        chaos_rng = lab.random("chaos")
        remote = make_remote(lab.workdir)
        steps_log = lab.workdir / "steps.txt"
        fids = ["f1", "f2"] if cfg.bounded else ["f1", "f2", "f3"]
        for fid in fids:
            await lab.start_factory(fid, stations=1)
        kills: list[dict] = []  # {job, epoch, factory, checkpoint (as recorded at the kill), at}
        restarts: list[asyncio.Task] = []

        async def restart_later(fid: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)  # the schedule: how long the machine stays down
            await lab.restart_factory(fid)

        async def kill_one_checkpointed(min_seq: int) -> bool:
            """SIGKILL the holder of a running job that has a checkpoint of its current epoch."""
            records = await lab.records()
            cands = sorted((j, rec) for j, (rec, _r, _t) in records.items()
                           if rec.stage == Stage.BUILDING and rec.lease is not None and rec.checkpoint is not None
                           and rec.checkpoint.epoch == rec.epoch and rec.checkpoint.seq >= min_seq
                           and rec.lease.factory in lab.factories and lab.factories[rec.lease.factory].alive())
            if not cands:
                return False
            job, _ = chaos_rng.choice(cands)
            fresh = (await lab.records())[job][0]
            if fresh.lease is None or fresh.stage != Stage.BUILDING:
                return False
            fid = fresh.lease.factory
            await lab.kill_factory(fid)
            at = time.time()
            # What the dead holder recorded last (read after the kill: nothing more can come).
            rec = (await lab.records())[job][0]
            kills.append({"job": job, "epoch": fresh.epoch, "factory": fid, "checkpoint": rec.checkpoint, "at": at})
            restarts.append(asyncio.create_task(restart_later(fid, chaos_rng.uniform(0.5, 2.0))))
            return True

        jobs: list[str] = []
        if cfg.bounded:
            jobs += await lab.submit([step_job(lab, remote, steps_log)])
            if not jobs:
                raise RuntimeError("the bounded form's job was not acknowledged (is the coordinator up?)")
            await lab.wait_for(lambda: kill_one_checkpointed(2), 60.0, interval_s=0.1,
                               what="a job with two checkpoints of its running epoch")
        else:
            t_end = time.monotonic() + window_s
            next_job = 0.0
            while time.monotonic() < t_end:
                if time.monotonic() >= next_job:
                    jobs += await lab.submit([step_job(lab, remote, steps_log)])
                    next_job = time.monotonic() + JOB_EVERY_S
                await asyncio.sleep(chaos_rng.uniform(1.0, 2.5))  # the chaos schedule
                alive = [f for f in fids if lab.factories[f].alive()]
                if len(alive) > 1:
                    await kill_one_checkpointed(1)
        for t in restarts:
            try:
                await asyncio.wait_for(t, timeout=READY_BOUND_S)
            except Exception as e:
                exp.expect(False, f"a restart did not complete: {type(e).__name__}: {e}")

        unsettled = await lab.settle(SETTLE_TIMEOUT_S if cfg.bounded else 2 * SETTLE_TIMEOUT_S)
        report = await lab.check()
        records = await lab.records()
        steps = read_steps(steps_log)
        heads = dict(line.split(" ", 1)[::-1] for line in
                     _git("for-each-ref", "--format=%(objectname) %(refname:short)", "refs/heads/",
                          cwd=remote).splitlines())
        exp.expect(not unsettled, f"not settled within the bound: {unsettled}")

        shipped_once = sum(_judge_shipped_once(exp, job, records, heads) for job in jobs)
        bound_s = CHECKPOINT_S + CHECKPOINT_SLACK_S
        max_bound_steps = math.ceil(bound_s / STEP_S) + 1
        judged = [_judge_kill(exp, k, records, steps, remote, bound_s, max_bound_steps) for k in kills]
        judged = [j for j in judged if j is not None]
        in_history = sum(1 for ok, _, _ in judged if ok)
        lost_max = max((n for _, n, _ in judged), default=0)
        lost_span_max_s = max((t for _, _, t in judged), default=0.0)
        exp.expect(len(kills) >= 1, "no holder was killed while it had a checkpoint")

        figures = {
            "factories": len(fids),
            "chaos_window_s": window_s,
            "checkpoint_s": CHECKPOINT_S,
            "jobs_acknowledged": len(lab.acknowledged),
            "jobs_shipped_once": shipped_once,
            "kills_mid_run": len(kills),
            "checkpoint_in_shipped_history": in_history,
            "steps_lost_max": lost_max,
            "steps_lost_bound": max_bound_steps,
            "lost_span_s_max": lost_span_max_s,
            "lost_span_bound_s": bound_s,
            "checkpoints_recorded": sum(1 for k in kills if k["checkpoint"] is not None),
            "lease_expired": report.counts.get("lease_expired", 0),
        }
        notes.append(f"{len(kills)} SIGKILL of a holder mid-run (each after a checkpoint of its epoch), "
                     f"{len(jobs)} jobs of {STEPS} steps every {STEP_S:g}s")
        return ScenarioResult("resume", cfg.seed, report.ok and not exp.failures, report, figures, notes,
                              exp.failures)


def _judge_shipped_once(exp: Expectations, job: str, records: dict, heads: dict[str, str]) -> bool:
    """The job shipped exactly once: one passed attempt, pushed, one epoch branch on the remote."""
    rec = records[job][0] if job in records else None
    passed = [a for a in rec.attempts if a.outcome == "passed"] if rec else []
    epoch_branches = [b for b in heads if b.startswith(f"gf/{job}/e")]
    ok = bool(rec is not None and rec.stage == Stage.SHIPPED and len(passed) == 1 and passed[0].workspace
              and passed[0].workspace.pushed and len(epoch_branches) == 1)
    exp.expect(ok, f"{job} did not ship exactly once: stage {rec.stage if rec else None}, "
                   f"{len(passed)} passed attempts, epoch branches {epoch_branches}")
    return ok


def _judge_kill(exp: Expectations, k: dict, records: dict, steps: dict, remote: Path, bound_s: float,
                max_bound_steps: int) -> tuple[bool, int, float] | None:
    """One killed holder's job: shipped from a later epoch, with the killed epoch's last recorded
    checkpoint in the shipped history, having redone exactly (and only) what the killed epoch did
    after that checkpoint, within one interval. Returns (checkpoint in history, steps lost,
    seconds of work lost), or None when the job did not ship (judged by :func:`_judge_shipped_once`)."""
    job, killed, cp = k["job"], k["epoch"], k["checkpoint"]
    rec = records[job][0] if job in records else None
    final = rec.attempts[-1] if rec and rec.attempts else None
    if rec is None or final is None or rec.stage != Stage.SHIPPED or final.workspace is None:
        return None
    exp.expect(final.epoch > killed, f"{job} shipped from epoch {final.epoch}, not later than {killed}")
    if cp is None or cp.epoch != killed:
        exp.expect(False, f"{job}: the killed epoch {killed} had no checkpoint recorded")
        return None
    head = final.workspace.head
    in_history = bool(head) and _is_ancestor(remote, cp.commit, head)
    exp.expect(in_history, f"{job}: checkpoint {cp.commit[:12]} of epoch {killed} is not in the history of "
                           f"the shipped {final.workspace.branch} at {str(head)[:12]}")
    # The work lost: steps the killed epoch did that are not in its last checkpoint.
    in_cp = {int(p.split("-")[1]) for p in _git("ls-tree", "--name-only", cp.commit, cwd=remote).split()
             if p.startswith("step-")}
    by_killed = [(s, t) for e, s, t in steps.get(job, []) if e == killed]
    done_by_killed = {s for s, _ in by_killed}
    lost = done_by_killed - in_cp
    redone = {s for e, s, _ in steps.get(job, []) if e > killed and s in done_by_killed}
    exp.expect(redone == lost, f"{job}: steps done again {sorted(redone)} are not exactly the steps the "
                               f"killed epoch did after its checkpoint {sorted(lost)}")
    exp.expect(not redone & in_cp, f"{job}: steps in the checkpoint were done again: {sorted(redone & in_cp)}")
    span_s = (k["at"] - cp.at) if lost else 0.0
    exp.expect(span_s <= bound_s and len(lost) <= max_bound_steps,
               f"{job}: {len(lost)} steps lost over {span_s:.2f}s since the checkpoint; bound is checkpoint_s "
               f"{CHECKPOINT_S:g} + {CHECKPOINT_SLACK_S:g}s ({max_bound_steps} steps)")
    return in_history, len(lost), span_s
