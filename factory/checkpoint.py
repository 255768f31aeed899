"""WIP checkpoints of a ``repo`` job while its engine runs, and where a later attempt resumes.

Every ``checkpoint_s`` while the engine runs (:meth:`Checkpoints._checkpoint_loop`, started and
stopped around ``eng.run`` by :meth:`Execute._run_engine`):

1. snapshot the worktree into a commit WITHOUT disturbing the engine (a separate index:
   :func:`workspace.snapshot`), only when its tree differs from the last checkpoint's; its
   parent is the previous checkpoint (or the worktree's start), its trailers the job's plus
   ``Gigafactory-Checkpoint: N``;
2. fence: a compare-and-set renewal of the lease right before the push, with at least
   ``git_push_min_remaining_s`` of lease sure to be left (the rule of every push); a stale
   holder never pushes;
3. push it to ``gf/<job>/wip`` with ``--force-with-lease`` on what this holder last knew the
   branch to be (:func:`workspace.push_wip`): a compare-and-set on the remote ref, so a late
   push of a paused stale holder cannot overwrite a newer epoch's checkpoint;
4. record it on the job record (:class:`~gigafactory.schemas.records.Checkpoint`) by
   compare-and-set as the holder (:func:`record_checkpoint`); a ``checkpointed`` event.

A drain (the factory stopping with the lease held) takes a final checkpoint before it hands
the job back (:meth:`Checkpoints._final_checkpoint`); a normal end needs none (the attempt's
own commit is its work).

A later attempt (a retry, or a reclaim after the holder died) starts its worktree from the
recorded checkpoint (:func:`start_point`), on its own ``gf/<job>/e<epoch>``, so the earlier
epoch's checkpoint is in the history of what it ships; if that commit is gone from the remote,
it starts from ``base`` and a ``resume_missed`` event says so.

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``s``, ``id``, ``stats``;
``_write`` (:mod:`holder`) and ``_event`` (:mod:`audit`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from gigafactory.schemas import protocol
from gigafactory.schemas.records import Checkpoint, JobRecord

from . import workspace
from .engines.base import OutputParser, Resume
from .holder import Run
from .workspace import Checkout, GitError, StartPoint

log = logging.getLogger(__name__)

CHECKPOINT_PATHS_KEPT = 50
"""Changed paths a checkpoint keeps on the record (and so in a resuming agent's note)."""
CHECKPOINT_FAILURES_MAX = 20
"""Checkpoints of one attempt that may fail (git or broker trouble) before the loop stops
trying: the run goes on, it only loses the protection of checkpoints."""


# -- pure decisions ---------------------------------------------------------------------------


def record_checkpoint(rec: JobRecord, factory: str, epoch: int, cp: Checkpoint) -> JobRecord | None:
    """The job record with ``cp`` as its checkpoint, written by the holder of ``epoch``. Raises
    ``protocol.Fenced`` when ``factory`` no longer holds the job at ``epoch``; None (nothing to
    write) when the record already has this checkpoint or a later one of this epoch (a write
    whose reply was lost and is decided again).

    :param rec: the record as last read.
    :param factory: the writing factory.
    :param epoch: the epoch it holds.
    :param cp: the checkpoint, already pushed.
    """
    protocol.check_fence(rec, rec.id, factory, epoch)
    have = rec.checkpoint
    if have is not None and have.epoch == epoch and have.seq >= cp.seq:
        return None
    return msgspec.structs.replace(rec, checkpoint=cp, updated_at=cp.at)


def start_point(rec: JobRecord) -> StartPoint | None:
    """Where an attempt of ``rec`` starts its worktree: its last checkpoint, if an earlier
    attempt took one (the current attempt has none yet: the claim does not clear it); else None
    (from ``base``).

    :param rec: the job record at claim.
    """
    cp = rec.checkpoint
    if cp is None or cp.epoch >= rec.epoch:
        return None
    return StartPoint(commit=cp.commit, branch=cp.branch, base_commit=cp.base_commit)


def carry_candidates(rec: JobRecord) -> list[tuple[str, str]]:
    """After ``rebase-needed`` (:func:`protocol.rebase_pending`): the earlier work to bring onto
    the new base, most complete first, as (commit, what it is): the conflicting attempt's
    pushed branch head, then the last WIP checkpoint (a partial state that may merge where the
    whole did not). Empty when there is nothing (pure).

    :param rec: the job record at claim.
    """
    out: list[tuple[str, str]] = []
    ended = [a for a in rec.attempts if a.outcome != "running"]
    w = ended[-1].workspace if ended else None
    if w is not None and w.pushed and w.head and w.head != w.base_commit:
        out.append((w.head, f"{w.branch} (attempt {ended[-1].attempt})"))
    cp = rec.checkpoint
    if cp is not None and cp.epoch < rec.epoch and all(c != cp.commit for c, _ in out):
        out.append((cp.commit, f"checkpoint {cp.seq} of attempt {cp.attempt}"))
    return out


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class WipState:
    """One attempt's checkpoints so far."""

    parent: str
    """The previous checkpoint of this attempt, or the worktree's start commit."""
    tree: str | None
    """Its tree: a snapshot with the same tree is not a checkpoint."""
    remote: str | None
    """What this holder knows ``gf/<job>/wip`` to be on the remote (None: absent)."""
    seq: int
    """The number the next checkpoint gets."""
    engine: str = ""
    """The engine running (the ``Gigafactory-Engine`` trailer)."""
    model: str | None = None
    session: Callable[[], str | None] = lambda: None
    """The agent CLI's session id so far (None: none said)."""
    taken: int = 0
    failures: int = 0
    task: asyncio.Task | None = None
    """The loop (:meth:`Checkpoints._checkpoint_loop`)."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the engine ended: the loop ends."""


class Checkpoints:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: a ``repo`` job's WIP checkpoints."""

    async def _resume_of(self, run: Run, co: Checkout, engine_class: str = "agent") -> Resume | None:
        """What the engine is told when its worktree started from a checkpoint (None: a fresh
        start); says where the attempt started (:meth:`_resume_event`). After ``rebase-needed``
        the earlier work is first merged onto the new base (:meth:`_carry_onto_new_base`).

        :param run: the run.
        :param co: its worktree.
        :param engine_class: the engine's class: an agent (not ``script``) is left a conflicting
            merge to resolve; a script starts from the new base instead.
        """
        if protocol.rebase_pending(run.record):
            return await self._carry_onto_new_base(run, co, keep_conflict=engine_class != "script")
        await self._resume_event(run, co)
        cp = run.record.checkpoint
        if co.resumed_from is None or cp is None:
            return None
        # A session id is usable only where the session was kept: on the same factory.
        return Resume(commit=cp.commit, from_epoch=cp.epoch, from_attempt=cp.attempt, seq=cp.seq,
                      files_changed=cp.files_changed, lines_added=cp.lines_added, lines_deleted=cp.lines_deleted,
                      paths=tuple(cp.paths), session=cp.session if cp.factory == self.id else None)

    async def _carry_onto_new_base(self, run: Run, co: Checkout, *, keep_conflict: bool) -> Resume | None:
        """The attempt after ``rebase-needed`` starts on the new base (:meth:`_ws_checkout`);
        bring the earlier work onto it (:func:`workspace.carry` of :func:`carry_candidates`):
        a clean merge continues from there (event ``rebased``); a conflict is left in the
        worktree for an agent, named in its resume note (``rebase_conflict``); a script starts
        from the new base alone (``rebase_dropped``). Git trouble is the last case too. Returns
        what the engine is told (None: nothing carried)."""
        rec = run.record
        cands = carry_candidates(rec)
        if not cands:
            return None
        trailers = {"Gigafactory-Job": run.job, "Gigafactory-Epoch": str(run.epoch),
                    "Gigafactory-Attempt": str(rec.attempt), "Gigafactory-Rebase": str(rec.rebases_used)}
        message = workspace.commit_message(f"Carry the earlier work of {run.job} onto the new {co.base}"[:72],
                                           trailers)
        try:
            got = await asyncio.to_thread(
                workspace.carry, co, [c for c, _ in cands], message, keep_conflict=keep_conflict,
                author="Gigafactory", email=f"{self.id}@gigafactory.invalid", timeout_s=self.settings.git_timeout_s)
        except (GitError, OSError) as e:
            got = workspace.Carry(tried=[f"git failed: {e}"[:300]])
        words = dict(cands)
        data = {"base": co.base, "base_commit": co.base_commit, "tried": got.tried, "branch": co.branch}
        if got.commit is None:
            co.carry_detail = (f"started from the new {co.base} at {co.base_commit[:12]} without the earlier work "
                               f"({'; '.join(got.tried)})")[:500]
            await self._event("rebase_dropped", job=run.job, epoch=run.epoch, reason=co.carry_detail, data=data)
            return None
        kind = "rebase_conflict" if got.conflicts else "rebased"
        co.carry_detail = (f"{words[got.commit]} merged onto the new {co.base} at {co.base_commit[:12]}"
                           + (f", conflicts left for the engine in {', '.join(got.conflicts[:20])}"
                              if got.conflicts else ""))[:500]
        await self._event(kind, job=run.job, epoch=run.epoch, reason=co.carry_detail,
                          data={**data, "commit": got.commit, "conflicts": got.conflicts[:100]})
        return self._carried_resume(rec, co, got)

    def _carried_resume(self, rec: JobRecord, co: Checkout, got: "workspace.Carry") -> Resume:
        """What an engine is told about work carried onto the new base (its figures from the
        attempt or checkpoint it came from)."""
        cp = rec.checkpoint
        ended = [a for a in rec.attempts if a.outcome != "running"]
        w = ended[-1].workspace if ended else None
        session = cp.session if cp is not None and cp.factory == self.id else None
        common = dict(commit=got.commit, rebased_onto=co.base_commit, conflicts=tuple(got.conflicts[:50]),
                      session=session)
        if cp is not None and cp.commit == got.commit:
            return Resume(from_epoch=cp.epoch, from_attempt=cp.attempt, seq=cp.seq, files_changed=cp.files_changed,
                          lines_added=cp.lines_added, lines_deleted=cp.lines_deleted, paths=tuple(cp.paths), **common)
        assert w is not None and ended, "a carried head comes from the conflicting attempt"
        return Resume(from_epoch=ended[-1].epoch, from_attempt=ended[-1].attempt, seq=0,
                      files_changed=w.files_changed, lines_added=w.lines_added, lines_deleted=w.lines_deleted,
                      paths=tuple(cp.paths) if cp is not None else (), **common)

    async def _checkpoints_start(self, run: Run, co: Checkout, engine: str, model: str | None,
                                 parsers: list[OutputParser]) -> WipState | None:
        """Start the run's checkpoint loop (call it right before the engine runs); None when
        ``checkpoint_s`` is 0 or the worktree cannot be read (a ``checkpoint_failed`` event: the
        run goes on without checkpoints).

        :param run: the run.
        :param co: its worktree.
        :param engine: the engine about to run.
        :param model: its model, if known.
        :param parsers: the run's output reader (empty once dropped); its ``session_id``, if it
            has one, is recorded with each checkpoint.
        """
        if self.settings.checkpoint_s <= 0:
            return None
        cp = run.record.checkpoint
        try:
            tree = await asyncio.to_thread(workspace.tree_of, co, co.start_commit, timeout_s=self.settings.git_timeout_s)
        except (GitError, OSError) as e:
            await self._event("checkpoint_failed", job=run.job, epoch=run.epoch,
                              reason=f"no checkpoints for this attempt: {e}"[:500])
            return None
        st = WipState(parent=co.start_commit, tree=tree, remote=cp.commit if cp else None,
                      seq=(cp.seq + 1) if cp else 1, engine=engine, model=model,
                      session=lambda: getattr(parsers[0], "session_id", None) if parsers else None)
        st.task = asyncio.create_task(self._checkpoint_loop(run, co, st))
        return st

    async def _checkpoints_stop(self, run: Run, co: Checkout, st: WipState) -> None:
        """Stop the loop once the engine ended: a checkpoint under way finishes (its git calls
        and writes are bounded), so the attempt's own commit comes after it."""
        st.stop.set()
        if st.task is None:
            return
        try:
            await asyncio.wait_for(st.task, timeout=self.settings.git_timeout_s * 3 + self.settings.request_timeout_s * 4)
        except Exception:
            st.task.cancel()

    async def _checkpoint_loop(self, run: Run, co: Checkout, st: WipState) -> None:
        """Take a checkpoint every ``checkpoint_s`` until ``st.stop`` is set (the engine ended)
        or the run is fenced, cancelled, or failed :data:`CHECKPOINT_FAILURES_MAX` times.

        :param run: the run (it holds the lease).
        :param co: its worktree.
        :param st: the loop's state (:meth:`_checkpoints_start`).
        """
        while not st.stop.is_set():
            try:
                await asyncio.wait_for(st.stop.wait(), timeout=self.settings.checkpoint_s)
                return
            except asyncio.TimeoutError:
                pass
            if run.fenced or run.cancel.is_set() or run.self_fenced is not None:
                return
            try:
                await self._checkpoint_once(run, co, st)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # git or broker trouble: the run goes on, the next interval tries again
                st.failures += 1
                why = f"checkpoint {st.seq} of {run.job} failed: {type(e).__name__}: {e}"[:500]
                log.warning("%s: %s", self.id, why)
                await self._event("checkpoint_failed", job=run.job, epoch=run.epoch, reason=why,
                                  data={"branch": workspace.wip_branch(run.job), "failures": st.failures})
                if st.failures >= CHECKPOINT_FAILURES_MAX:
                    return

    async def _final_checkpoint(self, run: Run, co: Checkout, st: WipState) -> None:
        """A last checkpoint of a run its factory's drain stopped (the lease still held), so the
        next holder loses nothing; bounded (``git_timeout_s``); never raises.

        :param run: the run.
        :param co: its worktree.
        :param st: its checkpoint loop's state.
        """
        try:
            await asyncio.wait_for(self._checkpoint_once(run, co, st),
                                   timeout=self.settings.git_timeout_s)
        except Exception as e:
            why = f"final checkpoint of {run.job} at drain failed: {type(e).__name__}: {e}"[:500]
            log.warning("%s: %s", self.id, why)
            await self._event("checkpoint_failed", job=run.job, epoch=run.epoch, reason=why,
                              data={"branch": workspace.wip_branch(run.job), "final": True})

    async def _checkpoint_once(self, run: Run, co: Checkout, st: WipState) -> Checkpoint | None:
        """One checkpoint (see the module's docstring); returns it, or None when nothing changed
        since the last one or the holder may not push (fenced, too little lease left)."""
        rec = run.record
        timeout_s = self.settings.git_timeout_s
        branch = workspace.wip_branch(run.job)
        engine, model, session = st.engine, st.model, st.session()
        trailers = {
            "Gigafactory-Job": run.job, "Gigafactory-Epoch": str(run.epoch), "Gigafactory-Attempt": str(rec.attempt),
            "Gigafactory-Engine": engine, "Gigafactory-Model": model or "default",
            "Gigafactory-Checkpoint": str(st.seq),
        }
        subject = "WIP " + workspace.subject_from(rec.body, run.job)
        message = workspace.commit_message(subject[:workspace.COMMIT_SUBJECT_MAX_CHARS], trailers)

        def snap() -> tuple[str, str, workspace.Stats] | None:
            made = workspace.snapshot(co, st.parent, st.tree, message, author="Gigafactory",
                                      email=f"{self.id}@gigafactory.invalid", timeout_s=timeout_s)
            if made is None:
                return None
            return made[0], made[1], workspace.diff_stats(co, timeout_s=timeout_s, head=made[0])

        taken_at = time.time()  # the state captured is the worktree's at about this time
        made = await asyncio.to_thread(snap)
        if made is None:
            self.stats["checkpoints_unchanged"] = self.stats.get("checkpoints_unchanged", 0) + 1
            return None
        commit, tree, stats = made
        left_s = await self._fence_wip(run, f"checkpoint {st.seq}", branch)
        if left_s is None:
            return None
        try:
            await asyncio.to_thread(workspace.push_wip, co, commit, branch, st.remote,
                                    timeout_s=min(timeout_s, left_s))
        except workspace.WipRaced as e:
            # Someone pushed since (a stale holder's late push, or this holder's own push whose
            # record write failed): fence again, and only then overwrite what is there now.
            log.info("%s: %s moved under %s (%s); fencing again", self.id, branch, run.job, e)
            left_s = await self._fence_wip(run, f"checkpoint {st.seq}", branch)
            if left_s is None:
                return None
            await asyncio.to_thread(workspace.push_wip, co, commit, branch, e.actual,
                                    timeout_s=min(timeout_s, left_s))
        st.remote = commit
        cp = Checkpoint(commit=commit, epoch=run.epoch, attempt=rec.attempt, at=taken_at, branch=branch,
                        seq=st.seq, files_changed=stats.files_changed, lines_added=stats.lines_added,
                        lines_deleted=stats.lines_deleted, base_commit=co.base_commit,
                        paths=stats.paths[:CHECKPOINT_PATHS_KEPT], session=session, factory=self.id,
                        engine=engine)
        held = await self._write(run, lambda r: record_checkpoint(r, self.id, run.epoch, cp))
        if held is None or run.fenced:
            return None
        st.parent, st.tree, st.seq, st.taken = commit, tree, st.seq + 1, st.taken + 1
        self.stats["checkpoints"] = self.stats.get("checkpoints", 0) + 1
        await self._event("checkpointed", job=run.job, epoch=run.epoch,
                          reason=f"checkpoint {cp.seq} {commit[:12]} pushed to {branch}: {cp.files_changed} files, "
                                 f"+{cp.lines_added} -{cp.lines_deleted} since base",
                          data={"commit": commit, "seq": cp.seq, "branch": branch, "attempt": cp.attempt,
                                "files_changed": cp.files_changed, "lines_added": cp.lines_added,
                                "lines_deleted": cp.lines_deleted, "paths": cp.paths, "session": session,
                                "lease_left_s": round(left_s, 3)})
        return cp

    async def _fence_wip(self, run: Run, what: str, branch: str) -> float | None:
        """The fence before a push: a compare-and-set renewal of the lease; returns the lease
        sure to be left (seconds), or None (with a ``checkpoint_refused`` event) when the holder
        is fenced, the renewal's outcome is unknown, or less than ``git_push_min_remaining_s``
        would be left.

        :param run: the run.
        :param what: what is pushed, for the event.
        :param branch: where, for the event.
        """
        ttl_s = self.settings.lease_ttl_s
        want_s = protocol.fence_min_remaining_s(ttl_s, self.settings.git_push_min_remaining_s)
        sent_s = time.monotonic()
        why: str | None = None
        try:
            held = await self._write(run, lambda r: protocol.renew(r, self.id, run.epoch, time.time()))
        except Exception as e:  # cannot tell: a push must not go out on a guess
            held, why = None, f"{what} not pushed: the renewal before it failed ({type(e).__name__}: {e})"
        if why is None and (held is None or run.fenced):
            why = f"{what} not pushed: epoch {run.epoch} is stale (the job was reclaimed or cancelled)"
        left_s = protocol.fence_remaining_s(ttl_s, time.monotonic() - sent_s)
        if why is None and left_s < want_s:
            why = (f"{what} not pushed: only {left_s:.2f}s of lease is sure to be left after the fence, less "
                   f"than git_push_min_remaining_s {want_s:g}s")
        if why is not None:
            await self._event("checkpoint_refused", job=run.job, epoch=run.epoch, reason=why[:500],
                              data={"branch": branch})
            return None
        return left_s

    async def _resume_event(self, run: Run, co: Checkout) -> None:
        """Say where a resumed attempt started: ``resumed`` (from the checkpoint) or
        ``resume_missed`` (the checkpoint's commit is gone: from ``base``)."""
        cp = run.record.checkpoint
        if co.resumed_from is not None and cp is not None:
            await self._event("resumed", job=run.job, epoch=run.epoch,
                              reason=f"started from checkpoint {cp.seq} {cp.commit[:12]} of epoch {cp.epoch} "
                                     f"(attempt {cp.attempt}, {cp.files_changed} files changed)",
                              data={"commit": cp.commit, "seq": cp.seq, "from_epoch": cp.epoch,
                                    "from_attempt": cp.attempt, "branch": co.branch})
        elif co.resume_missed is not None:
            await self._event("resume_missed", job=run.job, epoch=run.epoch, reason=co.resume_missed[:500],
                              data={"commit": cp.commit if cp else None, "branch": co.branch})


__all__ = ["CHECKPOINT_PATHS_KEPT", "Checkpoints", "WipState", "carry_candidates", "record_checkpoint", "start_point"]
