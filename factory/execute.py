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

from gigafactory import tracing
from gigafactory.broker import Conflict
from gigafactory.economics.budget import cap_crossed
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import FailureClass, parse_duration
from gigafactory.schemas.profiles import engine_prompt, prefers_names, prefers_wait_s, resolve_engine
from gigafactory.schemas.records import (Attribution, IdleReason, JobRecord, Usage, WorkspaceResult, attributed, decode,
                                         encode, with_workspace)

from . import engines, fence_socket, shell
from . import probe
from .checkpoint import start_point
from .engines.base import (EngineJob, SetupFailed, budget_crossed, cred_variables, resume_env, resume_note,
                           strip_url_credentials)
from .engines.verify import verify_gate
from .fence_socket import FENCE_SOCKET_ENV
from .halting import claim_refused, stop_covered_runs
from .holder import Run
from .spend import AttemptSpend
from .workspace import Checkout, GitError
from .reporting import ResultPayload

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class _Won:
    """A won claim: the record it was built on, the outcome written, the revision stored and
    when (:func:`shell.fence_clock`) the write was sent."""

    read: JobRecord
    out: protocol.Outcome
    revision: int
    sent_s: float


def _claims_unread(rec: JobRecord, seat: str | None) -> bool:
    """Whether a carried record can be claimed without reading it: not when the job is in
    back-off, nor when its engine is chosen at claim time (both decisions need the broker's
    timestamp of the stored revision, which only a read gives)."""
    if rec.backoff_s:
        return False
    return not (seat is None and (rec.manifest.engine or rec.manifest.engine_class))


@dataclasses.dataclass
class Attempt:
    """One attempt's state through :meth:`Execute._run_engine`."""

    run: Run
    log_path: str
    cwd: Path
    co: Checkout | None
    attribution: Attribution
    setup_error: str | None = None
    name: str = ""
    """The engine that runs (set by :meth:`Execute._engine_for`)."""
    ws: WorkspaceResult | None = None
    """A repo job's workspace result (after its commit)."""
    spend: AttemptSpend | None = None
    """The attempt's spend attribution (:mod:`spend`), resolved before its engine starts."""

    def result(self, failure, detail, code=None, vcode=None, usage: Usage | None = None,
               retry_after_s: float | None = None) -> ResultPayload:
        """The result to report, with the attempt's attribution (and ``usage``) and workspace."""
        return ResultPayload(job=self.run.job, epoch=self.run.epoch, failure=failure, detail=detail, exit_code=code,
                             verify_exit_code=vcode, log_path=self.log_path, log_object=None,
                             attribution=with_workspace(attributed(self.attribution, usage), self.ws), finished_at=time.time(), usage=usage,
                             retry_after_s=retry_after_s, workspace=self.ws)

    def setup_failed(self, why: str) -> ResultPayload:
        """A ``setup_failed`` result, its reason written to the attempt's log."""
        Path(self.log_path).write_text(f"{why}\n")
        return self.result(FailureClass.SETUP_FAILED, why)


class OutputReader:
    """An engine's output as it streams: published to the job's live-logs subject, read by the
    engine's parser into progress and usage events, and judged against the job's spend budget
    after every usage change (crossing it stops the run as a cancel does). A parser that raises
    is dropped: that costs the run's progress events, never the run."""

    def __init__(self, factory, run: Run, name: str, eng) -> None:
        self.factory, self.run, self.name = factory, run, name
        self.subject = names.logs_subject(run.job, run.epoch, run.record.manifest.product)
        self.parsers = [eng.parser()]
        self.budget_stop: list[str] = []  # why the run was stopped for its spend budget, once it is
        self.spend: AttemptSpend | None = None  # the attempt's ledger attribution (:mod:`spend`)

    def on_output(self, chunk: bytes) -> None:
        f, run = self.factory, self.run
        if f.broker.nc.is_connected:
            try:
                asyncio.get_running_loop().create_task(f.broker.nc.publish(self.subject, chunk))
            except Exception:
                pass
        for parser in self.parsers:
            try:
                said = parser.feed(chunk)
            except Exception:
                log.exception("%s: engine %s could not read its output; not reading it further", f.id, self.name)
                self.parsers.clear()
                return
            for p in said:
                # Queued in order like every audit event (:meth:`_event` only queues).
                data = {**p.data, "engine": self.name} if p.kind == "usage" else dict(p.data)
                f._spawn(f._event(p.kind, job=run.job, epoch=run.epoch, data=data), f"{p.kind}-{run.job}")
            for p in said:
                if p.kind == "usage":
                    self._record_spend(parser, p.data)
            if not self.budget_stop and any(p.kind == "usage" for p in said):
                self._judge_budget(parser)

    def _record_spend(self, parser, said: dict) -> None:
        """A spend record of the usage so far as one usage report ``said`` it (the ledger's one
        record per usage report, even when one chunk of output holds several)."""
        try:
            try:
                usage = msgspec.convert(said, Usage)
            except msgspec.ValidationError:
                usage = parser.usage()
            self.factory.spend.usage(self.spend, usage)
        except Exception:  # noqa: BLE001 -- the ledger's final record still carries the totals
            log.exception("%s: spend record of %s not written", self.factory.id, self.run.job)

    def _judge_budget(self, parser) -> None:
        f, run = self.factory, self.run
        try:
            usage = parser.usage()
            crossed = budget_crossed(run.record.manifest.budget, usage)
            if not crossed and f.settings.pipeline_budget_enforcement and usage is not None:
                crossed = cap_crossed(usage.cost_usd, f.settings.max_cost_per_run_usd)  # the fleet's per-run cap
        except Exception:
            log.exception("%s: engine %s could not say its usage; not reading it further", f.id, self.name)
            self.parsers.clear()
            return
        if crossed:
            # Stopped through the path a cancel takes (its process group is signalled, its
            # output so far stays in the log); the outcome is rewritten by :meth:`finish`.
            self.budget_stop.append(crossed)
            log.info("%s: job %s stopped: %s", f.id, run.job, crossed)
            run.cancel.set()

    def finish(self, out, run: Run):
        """The engine's outcome with the usage its stream said (when the engine reported
        none), and ``budget_exceeded`` when the budget stopped it."""
        if out.usage is None and self.parsers:
            try:
                out = dataclasses.replace(out, usage=self.parsers[0].usage())
            except Exception:
                log.exception("%s: engine %s could not say its usage", self.factory.id, self.name)
        if self.budget_stop and not out.self_fenced and not run.fenced and not run.draining:
            out = dataclasses.replace(out, failure=FailureClass.BUDGET_EXCEEDED, detail=self.budget_stop[0])
        return out


class Execute:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: one job's lifecycle."""

    async def _claim_and_run(self, job_id: str, station: int, engine: str | None, *, via: str = "push",
                             trace: dict | None = None, offered: tuple[JobRecord, int] | None = None) -> "Claim":
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
        :param trace: the dispatch message's headers: its trace context is the claim span's
            parent (else the record's, :mod:`gigafactory.tracing`).
        :param offered: the record the dispatch message carried and the revision it was stored
            at (:meth:`DispatchMessage.carried`): the claim is then one compare-and-set on that
            revision with no read. Not used for a job in back-off or whose engine is chosen here
            (both need the broker's timestamp of the revision); a CAS it loses (the record
            changed since it was offered) is followed by a read and one more claim, as without it.
        """
        t0_ns = time.time_ns()  # the claim span covers the read and the compare-and-set
        seat = engine  # the seat held with the station: released with it on every way out
        got: _Won | None = None
        try:
            if offered is not None and _claims_unread(offered[0], seat):
                if self._not_claimable(offered[0]):  # the same checks as on a record read
                    return await self._skip_claim(station, seat)
                got = await self._claim_offered(job_id, station, seat, offered)
            if got is None:
                self.stats["claim_reads"] += 1
                e = await self.broker.jobs.get(job_id)
                if e is None:
                    return await self._skip_claim(station, seat)
                rec = decode(e.value, JobRecord)
                if self._not_claimable(rec):
                    return await self._skip_claim(station, seat)
                now: float | None = None
                if rec.backoff_s:
                    now = await self.broker.broker_now()
                    if now < e.ts + rec.backoff_s:
                        return await self._skip_claim(station, seat)
                if seat is None and (rec.manifest.engine or rec.manifest.engine_class):
                    choice = await self._take_seat(rec.manifest)
                    seat = choice.engine
                    if seat is None:
                        # No engine of the job's class has a free seat here: give it to the fleet.
                        self.stats["claim_skipped"] += 1
                        await self._release_station(station, None)
                        return Claim(False, offer_again_in_s=0.0)
                    if not choice.preferred and self.settings.prefers_grace_s > 0:
                        if now is None:
                            now = await self.broker.broker_now()
                        wait_s = prefers_wait_s(choice, now - (e.ts + rec.backoff_s), self.settings.prefers_grace_s)
                        if wait_s > 0:
                            self.stats["claims_deferred"] = self.stats.get("claims_deferred", 0) + 1
                            await self._release_station(station, seat)
                            await self._deferred_event(rec, choice.reason, wait_s)
                            return Claim(False, offer_again_in_s=wait_s)
                got = await self._claim_once(job_id, station, seat, rec, e.revision)
                if got is None:
                    await self._release_station(station, seat)
                    return Claim(False)
        except Exception as ex:
            log.info("%s: claim of %s failed (%s)", self.id, job_id, ex)
            await self._release_station(station, seat)
            return Claim(False)
        return await self._claimed(got, station, seat, via, trace, t0_ns)

    async def _skip_claim(self, station: int, seat: str | None) -> "Claim":
        """Nothing claimed: the station (and seat) go back; counted as ``claim_skipped``."""
        self.stats["claim_skipped"] += 1
        await self._release_station(station, seat)
        return Claim(False)

    async def _claim_offered(self, job_id: str, station: int, seat: str | None,
                             offered: tuple[JobRecord, int]) -> "_Won | None":
        """The claim on the record a dispatch message carried, with no read: the won claim, or
        None when the offered revision is no longer the record's (then it is read, and what is
        there claimed: ``claim_rereads``)."""
        self.stats["claims_unread"] += 1
        got = await self._claim_once(job_id, station, seat, offered[0], offered[1])
        if got is None:
            self.stats["claim_rereads"] += 1
        return got

    def _not_claimable(self, rec: JobRecord) -> bool:
        """Whether this factory must not claim ``rec`` (as read, or as a dispatch message
        carried it): not queued, a requirement it does not offer, or its product halted (the
        kill switch, :mod:`halting`)."""
        return rec.stage != Stage.QUEUED or bool(self.offers.missing(rec.requirements)) or \
            claim_refused(self, rec.manifest.product)

    async def _claim_once(self, job_id: str, station: int, seat: str | None, rec: JobRecord,
                          revision: int) -> "_Won | None":
        """One compare-and-set claiming ``rec`` (stored at ``revision``) on ``station``: the won
        claim, or None when the revision is no longer the record's (``claim_conflicts``). A job
        with no lock is claimed straight into ``building`` (:func:`protocol.claim`, ``start``):
        its engine starts at once, so the start is the claim's write, not a second one.

        :param job_id: the job.
        :param station: the station reserved for it.
        :param seat: the engine whose seat the run takes (None: resolved at run time).
        :param rec: the record as stored at ``revision``.
        :param revision: the ``gf_jobs`` revision the CAS is on."""
        start = not rec.manifest.lock  # a lock is taken between the claim and the start
        out = self._signing(lambda r: protocol.claim(
            r, self.id, station, time.time(), engine=seat,
            engine_version=self._engine_version(seat) if seat else None, start=start))(rec)
        self.stats["claims"] += 1
        sent_s = shell.fence_clock()  # the lease counts from this write when it starts the run
        try:
            rev = await self.broker.jobs.update(job_id, encode(out.record), last=revision)
        except Conflict:
            self.stats["claim_conflicts"] += 1
            return None
        return _Won(rec, out, rev, sent_s)

    async def _claimed(self, got: "_Won", station: int, seat: str | None, via: str, trace: dict | None,
                       t0_ns: int) -> "Claim":
        """Take the won claim ``got`` in and start its attempt; ``Claim(True)``."""
        out = got.out
        run = Run(out.record.id, out.record.epoch, station, got.revision, out.record)
        if out.record.stage == Stage.BUILDING:
            run.started_sent_s = got.sent_s
        # Only a won claim is a span (a skipped offer is not a step of the job); the attempt's
        # task starts inside it, so everything the attempt does is below it in the job's trace.
        with tracing.span("claim", parent=tracing.extract(trace) or got.read.trace, start_ns=t0_ns, job=run.job,
                          epoch=out.record.epoch, factory=self.id, via=via, attempt=out.record.attempt, engine=seat):
            await self._start_run(run, out.reason, via, seat)
        return Claim(True)

    async def _start_run(self, run: Run, reason: str, via: str, seat: str | None) -> None:
        """Take ``run`` in (its station busy), say ``claimed`` and start the attempt's task."""
        self.runs[(run.job, run.epoch)] = run
        stop_covered_runs(self)  # a --stop halt that arrived during the claim hands it back
        self._set_station(run.station, run.job, run.epoch)
        log.info("%s: claimed %s (attempt %d, epoch %d, via %s, station %d)", self.id, run.job, run.record.attempt,
                 run.epoch, via, run.station)
        # A claim that started the run says so (stage_to ``building``, ``data.started``): it is
        # the run's start, and no ``started`` event follows (:meth:`_execute_attempt`), one
        # audit message per job fewer for the broker, this factory and the coordinator.
        await self._event("claimed", job=run.job, epoch=run.epoch, stage_from="queued",
                          stage_to=str(run.record.stage), reason=reason,
                          data={"station": run.station, "attempt": run.record.attempt, "via": via, "engine": seat,
                                **({"started": True} if run.started_sent_s is not None else {})})
        self._spawn(self._execute(run, seat), f"job-{run.job}")

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
                                 f"(prefers_grace_s={self.settings.prefers_grace_s:g})",
                          data={"factory": self.id, "prefers": prefers_names(rec.manifest.prefers),
                                "wait_s": round(wait_s, 3)})


    async def _execute(self, run: Run, engine: str | None) -> None:
        with tracing.span("attempt", job=run.job, epoch=run.epoch, factory=self.id, attempt=run.record.attempt,
                          station=run.station):
            await self._execute_attempt(run, engine)

    async def _execute_attempt(self, run: Run, engine: str | None) -> None:
        renewer: asyncio.Task | None = None
        idle_after: IdleReason | None = None  # the station's idle reason once this run ends (None: worked out)
        try:
            m = run.record.manifest
            if run.started_sent_s is not None:
                # Claimed straight into building (no lock to take first): the claim's write
                # started the run, and the lease counts from when that write was sent.
                sent_s, started = run.started_sent_s, None
            else:
                if m.lock:
                    holder = await self._acquire_lock(run, m.lock)
                    if holder is not None:
                        idle_after = IdleReason.LOCK_WAIT
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
            if not self.settings.unsafe_unfenced_engines:
                # Measured from when the write was *sent*: the broker stamped it later, so the
                # reaper's clock starts later than ours (conservative).
                run.fence = shell.FenceDeadline(self._fence_deadline_s(sent_s), self.settings.fence_kill_grace_s)
            if started is not None:
                # The start write's event. A claim that started the run said so itself
                # (``claimed`` with ``data.started``): that write has no second event.
                await self._event("started", job=run.job, epoch=run.epoch, stage_from="assigned",
                                  stage_to="building", reason=started.reason)
            renewer = asyncio.create_task(self._renew_loop(run))
            # The job's `gigafactory fence` asks this socket (the factory renews for it: the job
            # never holds its identity). An engine starting no process (noop) gets none.
            try:
                if getattr(engines.get(engine or run.record.manifest.engine or ""), "starts_process", True):
                    run.fence_socket = await fence_socket.serve(
                        lambda want_s: self._fence_for_job(run, want_s), job=run.job, epoch=run.epoch,
                        factory=self.id, renew_timeout_s=self.settings.request_timeout_s * 2,
                        owner=self._fence_socket_owner())
            except OSError as e:  # the job runs on; its `gigafactory fence` cannot tell (exit 4): no push
                log.warning("%s: no fence socket for %s epoch %s (%s)", self.id, run.job, run.epoch, e)
            payload = await self._run_engine(run, engine)
            if run.self_fenced is not None:
                await self._self_fence(run, payload)
                return
            if run.draining and not run.fenced:
                # Stopped by a drain: give the job back without charging it a retry.
                await self._hand_back(run, run.handback_reason or "factory draining")
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
                    await asyncio.wait_for(renewer, timeout=self.settings.request_timeout_s * 2)
                except Exception:
                    renewer.cancel()
            if run.fence_socket is not None:  # the attempt is over: its socket answers no more
                await run.fence_socket.close()
                run.fence_socket = None
            await self._release_lock(run)
            await self._ws_release(run)  # after the report: the worktree goes, the pushed branch stays
            self.runs.pop((run.job, run.epoch), None)
            await self._release_station(run.station, engine, idle_after)

    async def _run_engine(self, run: Run, engine: str | None) -> ResultPayload:
        """Run the job's engine and the verify gate; the result to report (never raises for
        what the job did: an engine that cannot start here is ``setup_failed``).

        The steps: the attempt's workspace (:meth:`_attempt_for`), the engine
        (:meth:`_engine_for`), its job (:meth:`_engine_job`, reading its output with
        :class:`OutputReader`), the run (with WIP checkpoints, :mod:`checkpoint`), then what
        follows a run: commit, scope, verify, push, ship (:meth:`_after_engine`).

        :param run: the run (it holds the lease; its ``fence`` and ``cancel`` bound the engine).
        :param engine: the engine chosen before the claim, whose seat the run holds (the one
            the job names, or for an engine-class job the one :meth:`_take_seat` chose).
        """
        a = await self._attempt_for(run)
        if a.setup_error is not None:
            return a.setup_failed(self.redactor.text(a.setup_error))
        eng, why = self._engine_for(a, engine)
        if eng is None:
            return a.setup_failed(self.redactor.text(why))
        resume = await self._resume_of(run, a.co, eng.engine_class) if a.co is not None else None
        a.spend = self.spend.begin(run, a.name)  # attribution resolved before the engine starts
        reader = OutputReader(self, run, a.name, eng)
        reader.spend = a.spend
        job = self._engine_job(run, a, eng, reader, resume)
        try:
            # Off the event loop: preparing may read files and scan the body (the shell engine's
            # script extraction is linear, but a body of up to max_body_bytes still costs tens of
            # milliseconds the loop owes to every other run's renewals).
            prepared = await asyncio.to_thread(eng.prepare, job)
        except SetupFailed as e:
            if e.log_line is not None:
                Path(a.log_path).write_text(self.redactor.text(e.log_line))
            await self.spend.final(a.spend, None, str(FailureClass.SETUP_FAILED))
            return a.result(FailureClass.SETUP_FAILED, e.detail)
        t0 = time.monotonic()
        # WIP checkpoints while the engine runs (a repo job, checkpoint_s on): :mod:`checkpoint`.
        wip = await self._checkpoints_start(run, a.co, a.name, run.record.manifest.model, reader.parsers) \
            if a.co is not None else None
        try:
            with tracing.span("engine", engine=a.name):
                out = await eng.run(job, prepared)
        finally:
            if wip is not None:
                await self._checkpoints_stop(run, a.co, wip)
        if wip is not None and run.draining and not run.fenced and not out.self_fenced:
            # A drain stopped the engine while the lease is still held: keep its work for the
            # next holder (a normal end needs no final checkpoint: the attempt's commit is it).
            await self._final_checkpoint(run, a.co, wip)
        out = reader.finish(out, run)
        try:
            out = await self._after_engine(run, a, eng, job, prepared, out, t0)
        finally:
            await self.spend.final(a.spend, out.usage, str(out.failure or "passed"))
        if out.failure == FailureClass.AUTH_FAILED and not out.self_fenced and not run.fenced:
            # Before the report: the retry it may queue must never land here with the same key.
            self._withdraw_engine(a.name, f"auth_failed on job {run.job} attempt {run.record.attempt}: "
                                          f"{out.detail}"[:300])
        if out.self_fenced:
            run.self_fenced = self._self_fence_reason(run)
            return a.result(out.failure, f"{out.detail}: {run.self_fenced}", out.exit_code, out.verify_exit_code,
                            out.usage)
        return a.result(out.failure, out.detail, out.exit_code, out.verify_exit_code, out.usage,
                        out.retry_after_s if out.failure == FailureClass.RATE_LIMITED else None)

    async def _attempt_for(self, run: Run) -> "Attempt":
        """The attempt's log path, its folder (a repo job's fresh worktree, from the last WIP
        checkpoint when there is one; else ``cwd`` on this factory) and its attribution."""
        rec, m = run.record, run.record.manifest
        log_path = str(self.logs_dir / f"{run.job}-attempt-{rec.attempt}-epoch-{run.epoch}.log")
        co: Checkout | None = None  # a repo job's worktree (:mod:`ship`), released after the report
        error: str | None = None
        if m.repo is not None:
            try:
                co = await self._ws_checkout(run, start_point(rec))
                cwd = co.path / m.cwd
            except (GitError, OSError) as e:  # OSError: the factory's own disk (full, read-only)
                error = f"no worktree of {m.repo} on {self.id}: {e}"[:1000]
                cwd = self.git.worktrees
        else:
            cwd = self._resolve_cwd(m.cwd)
        attribution = Attribution(
            lane=f"{self.id}/{run.station}", job=run.job, tracker_item=m.tracker_item, repo=m.repo or str(cwd),
            product=m.product, provider="local" if (m.engine or "") == "shell" else None, model=m.model,
            cost_usd=0.0, cost_estimated=False,
        )
        return Attempt(run=run, log_path=log_path, cwd=cwd, co=co, attribution=attribution, setup_error=error)

    def _fence_socket_owner(self) -> tuple[int, int] | None:
        """Who the fence socket belongs to: the engines' user under the ``user`` sandbox (they
        run as it and must connect), else None (the factory's user; mode 0600)."""
        if self.sandbox is None or self.sandbox.mode != "user":
            return None
        uid, _, gid = self.sandbox.user.partition(":")
        return int(uid), int(gid)

    def _engine_for(self, a: "Attempt", engine: str | None):
        """The engine to run and None, or None and why it cannot run here. Sets ``a.name`` and
        the attribution's engine."""
        m = a.run.record.manifest
        # The engine chosen before the claim (its seat is held); resolved here only for a run
        # that came without one.
        a.name = engine or resolve_engine(m, self._offered_engines()) or ("" if m.engine_class else "shell")
        a.attribution = msgspec.structs.replace(a.attribution, engine=a.name or None)
        eng = engines.get(a.name)
        if eng is None:
            return None, (f"engine {m.engine!r} is not runnable on {self.id}" if m.engine else
                          f"no engine of class {str(m.engine_class)!r} is offered by {self.id}")
        if eng.opt_in and f"engine:{a.name}" not in self.offers.tokens:
            # An opt-in engine (noop) runs only where the operator offered it, so real work can
            # never be swallowed by it; the claim's requirement check already keeps it away.
            return None, f"engine {a.name!r} is not offered by {self.id} (start it with --cap engine:{a.name})"
        return eng, None

    def _engine_job(self, run: Run, a: "Attempt", eng, reader: "OutputReader", resume) -> EngineJob:
        """What the engine is given: its prompt, folder, environment, limits and output reader."""
        rec, m = run.record, run.record.manifest
        body = engine_prompt(rec.profile, rec.body, eng.engine_class)
        if resume is not None and eng.engine_class != "script":
            body = resume_note(resume) + body  # an agent is told what the earlier attempt did
        wall_binds = m.budget.wall is not None and parse_duration(m.budget.wall) <= parse_duration(m.timeout)
        return EngineJob(
            job=run.job, epoch=run.epoch, attempt=rec.attempt, factory=self.id, station=run.station, manifest=m,
            body=body, cwd=a.cwd, log_path=a.log_path,
            gf_env={
                "GF_JOB_ID": run.job, "GF_EPOCH": str(run.epoch), "GF_ATTEMPT": str(rec.attempt),
                "GF_FACTORY": self.id, "GF_STATION": str(run.station), "GF_WORKSPACE": str(self.workspace),
                "GF_BRANCH": f"gf/{run.job}/e{run.epoch}",
                # For `gigafactory fence` right before a push or merge request (side effects are fenced
                # too): the attempt's fence socket, on which the factory renews for the job (the job
                # never gets the factory's credentials), and the TTL the coordinators reap by.
                # The broker's address only: a password in the URL is the factory's, never the job's.
                "GIGAFACTORY_NATS_URL": strip_url_credentials(self.broker.urls), "GF_LEASE_TTL_S": repr(self.settings.lease_ttl_s),
                **({FENCE_SOCKET_ENV: run.fence_socket.path} if run.fence_socket is not None else {}),
                **(resume_env(resume) if resume is not None else {}),
            },
            timeout_s=m.timeout_s(),
            timeout_class=FailureClass.BUDGET_EXCEEDED if wall_binds else FailureClass.TIMEOUT,
            header=f"# gigafactory: job {run.job} attempt {rec.attempt} epoch {run.epoch} on {self.id}/{run.station}\n",
            on_output=reader.on_output, cancel=run.cancel, fence=run.fence,
            supervised=not self.settings.unsafe_unfenced_engines, kill_grace_s=5.0, parser=reader.parsers[0],
            env_passthrough=(*cred_variables(rec.requirements, probe.CREDENTIAL_VARS),
                             *self.settings.engine_env_passthrough_names),
            settings=self.settings, resume=resume, redactor=self.redactor,
            sandbox=(self.sandbox.binding(run.fence_socket.folder)
                     if self.sandbox is not None and run.fence_socket is not None else self.sandbox),
        )

    async def _after_engine(self, run: Run, a: "Attempt", eng, job: EngineJob, prepared, out, t0: float):
        """What follows the engine: a repo job's commit and scope verdict (whatever the
        engine's outcome: they say what it did), the verify gate, then a passed attempt's
        fenced push and shipping. Returns the outcome; keeps the workspace result on ``a``."""
        m = run.record.manifest
        live = not out.self_fenced and not run.fenced and not run.draining
        if a.co is not None and live:
            try:
                a.ws, changed = await self._ws_commit(
                    run, a.co, engine=a.name, model=(out.usage.model if out.usage else None) or m.model)
            except (GitError, OSError) as e:
                changed = []
                a.ws = WorkspaceResult(branch=a.co.branch, base=a.co.base, base_commit=a.co.base_commit,
                                       detail=f"commit failed: {e}"[:500])
                if out.failure is None:
                    out = dataclasses.replace(out, failure=FailureClass.CRASH,
                                              detail=f"the engine's changes could not be committed: {e}"[:500])
            # The scope guardrail, before verify: a refused attempt is neither verified nor pushed.
            out, a.ws = await self._judge_scope(run, out, a.ws, changed)
        if out.failure is None and eng.verifies:
            # The gate's outcome knows nothing of the engine's usage: keep what the engine reported.
            # It runs in the worktree (prepared.cwd is the job's cwd inside it), after the commit.
            with tracing.span("verify"):
                out = dataclasses.replace(await verify_gate(job, prepared, out, t0), usage=out.usage)
        if a.co is None or a.ws is None or out.failure is not None or out.self_fenced or run.fenced \
                or run.draining:
            return out
        # Only a passed attempt ships, and only while this holder's epoch is the job's.
        with tracing.span("push", branch=a.ws.branch):
            a.ws, refused = await self._ws_push(run, a.co, a.ws)
        if refused is not None and not run.fenced:
            return dataclasses.replace(out, failure=FailureClass.CRASH, detail=refused)
        if refused is None and m.review_policy == "auto" and m.ship_as != "branch" and not run.fenced:
            # The factory ships beyond the branch only what no human gates; for manual and
            # reviewers the coordinator does it when a human ships (coordinator/api.py).
            verified = m.verify is not None and out.verify_exit_code == 0
            with tracing.span("ship", ship_as=str(m.ship_as)):
                a.ws, conflict = await self._ws_ship(run, a.co, a.ws,
                                                     self._pr_facts(run, out, a.ws, a.name, a.log_path), verified)
            if conflict is not None and not run.fenced:
                return dataclasses.replace(out, failure=FailureClass.MERGE_CONFLICT, detail=conflict)
        return out

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

