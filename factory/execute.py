"""One job on this factory: claim, lock, start, engine, verify, report.

The claim is a compare-and-set on the record's revision (exactly one claimer of a revision
wins); the lock, the start write, renewals and the result are the holder's fenced writes
(:mod:`holder`). The engine is whatever :mod:`engines` registers under the job's ``engine``:
this module builds what the engine needs (:class:`~engines.base.EngineJob`), runs it, runs the
shared ``verify`` gate after an engine that passed (:mod:`engines.verify`), and hands the
result to :mod:`reporting`. It knows no engine by name.

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``runs``, ``offers``,
``workspace``, ``logs_dir``, ``stats``, ``s``, ``id``, the broker; the stations
(:mod:`stations`), the holder (:mod:`holder`), reporting (:mod:`reporting`), ``_event``
(:mod:`audit`) and ``_spawn``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path

import msgspec

from gigafactory.broker import Conflict
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import FailureClass, parse_duration
from gigafactory.schemas.profiles import engine_prompt, prefers_names, prefers_wait_s, resolve_engine
from gigafactory.schemas.records import Attribution, JobRecord, Usage, WorkspaceResult, attributed, decode, encode

from . import engines, shell
from . import probe
from .checkpoint import start_point
from .engines.base import EngineJob, SetupFailed, budget_crossed, cred_variables, resume_env, resume_note
from .engines.verify import verify_gate
from .holder import Run
from .workspace import Checkout, GitError
from .reporting import ResultPayload

log = logging.getLogger("gigafactory.factory")


DEFERRED_SAID_MAX = 4096
"""Job epochs a factory remembers having said ``claim_deferred`` for (the memory is then cleared)."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """What :meth:`Execute._claim_and_run` did; true when the job was claimed."""

    claimed: bool
    offer_again_in_s: float | None = None
    """Not None: not claimed, but the job should be offered again (the dispatch message given
    back, not acknowledged): at once (0), or after this long, when this factory would take
    it itself (its claim held back for ``prefers``)."""

    def __bool__(self) -> bool:
        return self.claimed


class Execute:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: one job's lifecycle."""

    async def _claim_and_run(self, job_id: str, station: int, engine: str | None, *, via: str = "push") -> "Claim":
        """Claim ``job_id`` on ``station``; on success the run continues in the background.

        The engine is decided before the claim: ``engine`` is the one the job's pool names (its
        seat was taken with the station); for an engine-class job it is chosen here once the
        record is read (:meth:`_take_seat`: an engine of the class with a free seat, in
        ``prefers`` order) and its seat taken. If no engine the job prefers has a free seat here,
        the claim is held back until the job has been claimable ``prefers_grace_s`` (broker
        time), so a factory with a preferred engine free can win it. The engine is recorded on
        the attempt, and the same seat is released when the run ends.

        :param job_id: the job offered.
        :param station: the station reserved for it (released here if nothing is claimed).
        :param engine: the engine whose seat was reserved with the station, or None.
        :param via: how the job was found ("push": a dispatch message, "poll": the queue
            index), for the ``claimed`` event.
        """
        seat = engine  # the seat held with the station: released with it on every way out
        try:
            e = await self.b.jobs.get(job_id)
            if e is None:
                self.stats["claim_skipped"] += 1
                await self._release_station(station, seat)
                return Claim(False)
            rec = decode(e.value, JobRecord)
            if rec.stage != Stage.QUEUED or self.offers.missing(rec.requirements):
                self.stats["claim_skipped"] += 1
                await self._release_station(station, seat)
                return Claim(False)
            now: float | None = None
            if rec.backoff_s:
                now = await self.b.broker_now()
                if now < e.ts + rec.backoff_s:
                    self.stats["claim_skipped"] += 1
                    await self._release_station(station, seat)
                    return Claim(False)
            if seat is None and (rec.manifest.engine or rec.manifest.engine_class):
                choice = await self._take_seat(rec.manifest)
                seat = choice.engine
                if seat is None:
                    # No engine of the job's class has a free seat here: give it to the fleet.
                    self.stats["claim_skipped"] += 1
                    await self._release_station(station, None)
                    return Claim(False, offer_again_in_s=0.0)
                if not choice.preferred and self.s.prefers_grace_s > 0:
                    if now is None:
                        now = await self.b.broker_now()
                    wait_s = prefers_wait_s(choice, now - (e.ts + rec.backoff_s), self.s.prefers_grace_s)
                    if wait_s > 0:
                        self.stats["claims_deferred"] = self.stats.get("claims_deferred", 0) + 1
                        await self._release_station(station, seat)
                        await self._deferred_event(rec, choice.reason, wait_s)
                        return Claim(False, offer_again_in_s=wait_s)
            out = protocol.claim(rec, self.id, station, time.time(), engine=seat,
                                 engine_version=self._engine_version(seat) if seat else None)
            self.stats["claims"] += 1
            try:
                rev = await self.b.jobs.update(job_id, encode(out.record), last=e.revision)
            except Conflict:
                self.stats["claim_conflicts"] += 1
                await self._release_station(station, seat)
                return Claim(False)
        except Exception as ex:
            log.info("%s: claim of %s failed (%s)", self.id, job_id, ex)
            await self._release_station(station, seat)
            return Claim(False)
        run = Run(job_id, out.record.epoch, station, rev, out.record)
        self.runs[(job_id, run.epoch)] = run
        self._set_station(station, job_id, run.epoch)
        await self._event("claimed", job=job_id, epoch=run.epoch, stage_from="queued", stage_to="assigned",
                          reason=out.reason, data={"station": station, "attempt": out.record.attempt, "via": via,
                                                   "engine": seat})
        self._spawn(self._execute(run, seat), f"job-{job_id}")
        return Claim(True)

    async def _deferred_event(self, rec: JobRecord, why: str, wait_s: float) -> None:
        """Say once per job epoch (not at every redelivery) that this factory holds back its
        claim for ``prefers``; a bounded memory of what it said already."""
        key = (rec.id, rec.epoch)
        said = self.deferred_said
        if key in said:
            return
        if len(said) >= DEFERRED_SAID_MAX:
            said.clear()  # at worst an event said twice
        said.add(key)
        await self._event("claim_deferred", job=rec.id, epoch=rec.epoch,
                          reason=f"{self.id} holds back: {why}; any factory may take it in {wait_s:.1f}s "
                                 f"(prefers_grace_s={self.s.prefers_grace_s:g})",
                          data={"factory": self.id, "prefers": prefers_names(rec.manifest.prefers),
                                "wait_s": round(wait_s, 3)})


    async def _execute(self, run: Run, engine: str | None) -> None:
        renewer: asyncio.Task | None = None
        try:
            m = run.record.manifest
            if m.lock:
                holder = await self._acquire_lock(run, m.lock)
                if holder is not None:
                    await self._event("lock_wait", job=run.job, epoch=run.epoch,
                                      reason=f"lock {m.lock!r} held by job {holder}")
                    await self._hand_back(run, f"lock {m.lock!r} held by job {holder}", backoff_s=1.0)
                    return
            sent_s = shell.fence_clock()
            started = await self._write(run, lambda r: protocol.start(r, self.id, run.epoch, time.time()))
            if started is None:
                return
            if run.lock_sent_s is not None:
                # The lock entry may be older than the start write (a start that took retries):
                # the engine must stop before the lock can be presumed free, too.
                sent_s = min(sent_s, run.lock_sent_s)
            if not self.s.unsafe_unfenced_engines:
                # Measured from when the write was *sent*: the broker stamped it later, so the
                # reaper's clock starts later than ours (conservative).
                run.fence = shell.FenceDeadline(self._fence_deadline_s(sent_s), self.s.fence_kill_grace_s)
            await self._event("started", job=run.job, epoch=run.epoch, stage_from="assigned", stage_to="building",
                              reason=started.reason)
            renewer = asyncio.create_task(self._renew_loop(run))
            payload = await self._run_engine(run, engine)
            if run.self_fenced is not None:
                await self._self_fence(run, payload)
                return
            if run.draining and not run.fenced:
                # Stopped by a drain: give the job back without charging it a retry.
                await self._hand_back(run, "factory draining")
                return
            if run.fenced:
                self._quarantine_local(run, payload, "lease lost while running (stale epoch)")
                return
            await self._report(run, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: job %s failed inside the factory", self.id, run.job)
        finally:
            run.stop_renewing.set()
            if renewer is not None:
                try:
                    await asyncio.wait_for(renewer, timeout=self.s.request_timeout_s * 2)
                except Exception:
                    renewer.cancel()
            await self._release_lock(run)
            await self._ws_release(run)  # after the report: the worktree goes, the pushed branch stays
            self.runs.pop((run.job, run.epoch), None)
            await self._release_station(run.station, engine)

    async def _run_engine(self, run: Run, engine: str | None) -> ResultPayload:
        """Run the job's engine and the verify gate; the result to report (never raises for
        what the job did: an engine that cannot start here is ``setup_failed``).

        :param run: the run (it holds the lease; its ``fence`` and ``cancel`` bound the engine).
        :param engine: the engine chosen before the claim, whose seat the run holds (the one
            the job names, or for an engine-class job the one :meth:`_take_seat` chose).
        """
        rec = run.record
        m = rec.manifest
        log_path = str(self.logs_dir / f"{run.job}-attempt-{rec.attempt}-epoch-{run.epoch}.log")
        co: Checkout | None = None  # a repo job's worktree (:mod:`ship`), released after the report
        ws: WorkspaceResult | None = None
        ws_error: str | None = None
        if m.repo is not None:
            try:
                # A retry or a reclaim starts from the last WIP checkpoint, when there is one.
                co = await self._ws_checkout(run, start_point(rec))
                cwd = co.path / m.cwd
            except (GitError, OSError) as e:  # OSError: the factory's own disk (full, read-only)
                ws_error = f"no worktree of {m.repo} on {self.id}: {e}"[:1000]
                cwd = self.git.worktrees
        else:
            cwd = self._resolve_cwd(m.cwd)
        attribution = Attribution(
            lane=f"{self.id}/{run.station}", job=run.job, tracker_item=m.tracker_item, repo=m.repo or str(cwd),
            product=m.product, provider="local" if (m.engine or "") == "shell" else None, model=m.model,
            cost_usd=0.0, cost_estimated=False,
        )

        def result(failure, detail, code=None, vcode=None, usage: Usage | None = None,
                   retry_after_s: float | None = None) -> ResultPayload:
            return ResultPayload(job=run.job, epoch=run.epoch, failure=failure, detail=detail, exit_code=code,
                                 verify_exit_code=vcode, log_path=log_path, log_object=None,
                                 attribution=attributed(attribution, usage), finished_at=time.time(), usage=usage,
                                 retry_after_s=retry_after_s, workspace=ws)

        if ws_error is not None:
            Path(log_path).write_text(f"{ws_error}\n")
            return result(FailureClass.SETUP_FAILED, ws_error)
        resume = await self._resume_of(run, co) if co is not None else None

        # The engine chosen before the claim (its seat is held); resolved here only for a run
        # that came without one.
        name = engine or resolve_engine(m, self._offered_engines()) or ("" if m.engine_class else "shell")
        attribution = msgspec.structs.replace(attribution, engine=name or None)
        eng = engines.get(name)
        if eng is None:
            what = (f"engine {m.engine!r} is not runnable on {self.id}" if m.engine else
                    f"no engine of class {str(m.engine_class)!r} is offered by {self.id}")
            Path(log_path).write_text(f"{what}\n")
            return result(FailureClass.SETUP_FAILED, what)
        if eng.opt_in and f"engine:{name}" not in self.offers.tokens:
            # An opt-in engine (noop) runs only where the operator offered it, so real work can
            # never be swallowed by it; the claim's requirement check already keeps it away.
            return result(FailureClass.SETUP_FAILED,
                          f"engine {name!r} is not offered by {self.id} (start it with --cap engine:{name})")
        subject = names.logs_subject(run.job, run.epoch)
        # The run's output reader; dropped if it raises (that costs its progress events, never the run).
        parsers = [eng.parser()]
        budget_stop: list[str] = []  # why the run was stopped for its spend budget, once it is

        def on_output(chunk: bytes) -> None:
            if self.b.nc.is_connected:
                try:
                    asyncio.get_running_loop().create_task(self.b.nc.publish(subject, chunk))
                except Exception:
                    pass
            for parser in parsers:
                try:
                    said = parser.feed(chunk)
                except Exception:
                    log.exception("%s: engine %s could not read its output; not reading it further", self.id, name)
                    parsers.clear()
                    return
                for p in said:
                    # Queued in order like every audit event (:meth:`_event` only queues).
                    data = {**p.data, "engine": name} if p.kind == "usage" else dict(p.data)
                    self._spawn(self._event(p.kind, job=run.job, epoch=run.epoch, data=data),
                                f"{p.kind}-{run.job}")
                if not budget_stop and any(p.kind == "usage" for p in said):
                    try:
                        crossed = budget_crossed(m.budget, parser.usage())
                    except Exception:
                        log.exception("%s: engine %s could not say its usage; not reading it further", self.id, name)
                        parsers.clear()
                        return
                    if crossed:
                        # Stopped through the path a cancel takes (its process group is signalled,
                        # its output so far stays in the log); the outcome is rewritten below.
                        budget_stop.append(crossed)
                        log.info("%s: job %s stopped: %s", self.id, run.job, crossed)
                        run.cancel.set()

        body = engine_prompt(rec.profile, rec.body, eng.engine_class)
        if resume is not None and eng.engine_class != "script":
            body = resume_note(resume) + body  # an agent is told what the earlier attempt did
        limit_s = m.timeout_s()
        wall_binds = m.budget.wall is not None and parse_duration(m.budget.wall) <= parse_duration(m.timeout)
        job = EngineJob(
            job=run.job, epoch=run.epoch, attempt=rec.attempt, factory=self.id, station=run.station, manifest=m,
            body=body, cwd=cwd, log_path=log_path,
            gf_env={
                "GF_JOB_ID": run.job, "GF_EPOCH": str(run.epoch), "GF_ATTEMPT": str(rec.attempt),
                "GF_FACTORY": self.id, "GF_STATION": str(run.station), "GF_WORKSPACE": str(self.workspace),
                "GF_BRANCH": f"gf/{run.job}/e{run.epoch}",
                # For `gigafactory fence` right before a push or merge request (side effects are fenced
                # too): the lease it computes what is left of must be the one the coordinators reap by.
                "GIGAFACTORY_NATS_URL": self.b.urls, "GF_LEASE_TTL_S": repr(self.s.lease_ttl_s),
                **(resume_env(resume) if resume is not None else {}),
            },
            timeout_s=limit_s,
            timeout_class=FailureClass.BUDGET_EXCEEDED if wall_binds else FailureClass.TIMEOUT,
            header=f"# gigafactory: job {run.job} attempt {rec.attempt} epoch {run.epoch} on {self.id}/{run.station}\n",
            on_output=on_output, cancel=run.cancel, fence=run.fence, supervised=not self.s.unsafe_unfenced_engines,
            kill_grace_s=5.0, parser=parsers[0],
            env_passthrough=(*cred_variables(rec.requirements, probe.CREDENTIAL_VARS),
                             *self.s.engine_env_passthrough_names),
            settings=self.s, resume=resume,
        )
        try:
            # Off the event loop: preparing may read files and scan the body (the shell engine's
            # script extraction is linear, but a body of up to max_body_bytes still costs tens of
            # milliseconds the loop owes to every other run's renewals).
            prepared = await asyncio.to_thread(eng.prepare, job)
        except SetupFailed as e:
            if e.log_line is not None:
                Path(log_path).write_text(e.log_line)
            return result(FailureClass.SETUP_FAILED, e.detail)
        t0 = time.monotonic()
        # WIP checkpoints while the engine runs (a repo job, checkpoint_s on): :mod:`checkpoint`.
        wip = await self._checkpoints_start(run, co, name, m.model, parsers) if co is not None else None
        try:
            out = await eng.run(job, prepared)
        finally:
            if wip is not None:
                await self._checkpoints_stop(run, co, wip)
        if wip is not None and run.draining and not run.fenced and not out.self_fenced:
            # A drain stopped the engine while the lease is still held: keep its work for the
            # next holder (a normal end needs no final checkpoint: the attempt's commit is it).
            await self._final_checkpoint(run, co, wip)
        if out.usage is None and parsers:
            try:
                out = dataclasses.replace(out, usage=parsers[0].usage())
            except Exception:
                log.exception("%s: engine %s could not say its usage", self.id, name)
        if budget_stop and not out.self_fenced and not run.fenced and not run.draining:
            out = dataclasses.replace(out, failure=FailureClass.BUDGET_EXCEEDED, detail=budget_stop[0])
        if co is not None and not out.self_fenced and not run.fenced and not run.draining:
            # Whatever the engine's outcome: the commit and its stats say what it did.
            try:
                ws, changed = await self._ws_commit(
                    run, co, engine=name, model=(out.usage.model if out.usage else None) or m.model)
            except (GitError, OSError) as e:
                changed = []
                ws = WorkspaceResult(branch=co.branch, base=co.base, base_commit=co.base_commit,
                                     detail=f"commit failed: {e}"[:500])
                if out.failure is None:
                    out = dataclasses.replace(out, failure=FailureClass.CRASH,
                                              detail=f"the engine's changes could not be committed: {e}"[:500])
            # The scope guardrail, before verify: a refused attempt is neither verified nor pushed.
            out, ws = await self._judge_scope(run, out, ws, changed)
        if out.failure is None and eng.verifies:
            # The gate's outcome knows nothing of the engine's usage: keep what the engine reported.
            # It runs in the worktree (prepared.cwd is the job's cwd inside it), after the commit.
            out = dataclasses.replace(await verify_gate(job, prepared, out, t0), usage=out.usage)
        if (co is not None and ws is not None and out.failure is None and not out.self_fenced and not run.fenced
                and not run.draining):
            # Only a passed attempt ships, and only while this holder's epoch is the job's.
            ws, refused = await self._ws_push(run, co, ws)
            if refused is not None and not run.fenced:
                out = dataclasses.replace(out, failure=FailureClass.CRASH, detail=refused)
            elif refused is None and m.review_policy == "auto" and m.ship_as != "branch" and not run.fenced:
                # The factory ships beyond the branch only what no human gates; for manual and
                # reviewers the coordinator does it when a human ships (coordinator/api.py).
                verified = m.verify is not None and out.verify_exit_code == 0
                ws, conflict = await self._ws_ship(run, co, ws, self._pr_facts(run, out, ws, name, log_path), verified)
                if conflict is not None and not run.fenced:
                    out = dataclasses.replace(out, failure=FailureClass.MERGE_CONFLICT, detail=conflict)
        if out.failure == FailureClass.AUTH_FAILED and not out.self_fenced and not run.fenced:
            # Before the report: the retry it may queue must never land here with the same key.
            self._withdraw_engine(name, f"auth_failed on job {run.job} attempt {rec.attempt}: {out.detail}"[:300])
        if out.self_fenced:
            run.self_fenced = self._self_fence_reason(run)
            return result(out.failure, f"{out.detail}: {run.self_fenced}", out.exit_code, out.verify_exit_code,
                          out.usage)
        return result(out.failure, out.detail, out.exit_code, out.verify_exit_code, out.usage,
                      out.retry_after_s if out.failure == FailureClass.RATE_LIMITED else None)

    def _pr_facts(self, run: Run, out, ws: WorkspaceResult, engine: str, log_path: str):
        """What the pull request of this attempt says (:mod:`forges.body`): the record's
        attempts with this one's engine, usage and verify result filled in."""
        from gigafactory.forges import body
        from .ship import verify_output

        rec = run.record
        attempts = [msgspec.structs.replace(a, engine=a.engine or engine, usage=out.usage,
                                            verify_exit_code=out.verify_exit_code)
                    if a.epoch == run.epoch else a for a in rec.attempts]
        facts = body.run_facts(msgspec.structs.replace(rec, attempts=attempts), branch=ws.branch, base=ws.base,
                               verify_output=verify_output(log_path))
        return msgspec.structs.replace(facts, files_changed=ws.files_changed, lines_added=ws.lines_added,
                                       lines_deleted=ws.lines_deleted, scope_detail=ws.scope if ws.outside_scope else "")

    def _resolve_cwd(self, cwd: str) -> Path:
        p = Path(os.path.expandvars(os.path.expanduser(cwd)))
        return p if p.is_absolute() else self.workspace / p

