"""The factory side of a ``repo`` job's workspace: check out, commit, fenced push, release.

:mod:`workspace` does the git work (off the event loop); this mixin decides when, with the lease
in hand. The order for one attempt (:meth:`Execute._run_engine` calls it):

1. :meth:`_ws_checkout` before the engine: a fresh worktree on ``gf/<job>/e<epoch>`` from
   ``base``; the engine's ``cwd`` is the manifest's ``cwd`` inside it.
2. :meth:`_ws_commit` after the engine (whatever its outcome, unless the run was fenced):
   everything changed is committed with the job's trailers; the diff stats are taken.
3. Verify runs in the worktree.
4. :meth:`_ws_push` only if the attempt passed: a compare-and-set renewal of the lease first
   (the ``gigafactory fence`` rule: epoch unchanged, at least ``git_push_min_remaining_s`` left);
   a holder that is fenced, or has too little lease left, never pushes.
5. :meth:`_ws_release` after the result is reported (or quarantined): the worktree goes.

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``git`` (the
:class:`workspace.Store`), ``checkouts``, ``s``, ``id``; ``_write`` (:mod:`holder`) and
``_event`` (:mod:`audit`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import msgspec

from gigafactory.schemas import protocol
from gigafactory.schemas.manifest import FailureClass, effective_scope
from gigafactory.schemas.scope import check_scope
from gigafactory.schemas.records import WorkspaceResult

from . import workspace
from .engines.base import Outcome
from .holder import Run
from .workspace import Checkout, GitError

log = logging.getLogger("gigafactory.factory")


class Ship:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: a ``repo`` job's worktree, commit
    and fenced push."""

    async def _ws_clean_at_start(self) -> None:
        """Remove what a crashed run of this factory left (worktrees, local attempt branches)."""
        removed = await asyncio.to_thread(self.git.clean_leftovers)
        if removed:
            log.info("%s: removed %d worktrees left by an earlier run: %s", self.id, len(removed),
                     ", ".join(removed[:20]))

    async def _ws_checkout(self, run: Run, start: workspace.StartPoint | None = None) -> Checkout:
        """The attempt's fresh worktree (raises :class:`GitError`); kept until :meth:`_ws_release`.

        :param run: the run.
        :param start: a WIP checkpoint to start from instead of ``base`` (:mod:`checkpoint`).
        """
        m = run.record.manifest
        assert m.repo is not None
        co = await asyncio.to_thread(self.git.checkout, m.repo, m.base, run.job, run.epoch, start=start)
        self.checkouts[(run.job, run.epoch)] = co
        return co

    async def _ws_release(self, run: Run) -> None:
        """Remove the attempt's worktree and local branch (after the result was reported or
        quarantined), then evict mirrors over ``git_mirrors_max_bytes``. Never raises."""
        co = self.checkouts.pop((run.job, run.epoch), None)
        if co is None:
            return
        try:
            await asyncio.to_thread(self.git.release, co)
        except Exception as e:  # a leftover is cleaned at the next start
            log.warning("%s: worktree %s of %s not removed (%s)", self.id, co.path, run.job, e)
        if self.git.evicted:
            log.info("%s: mirrors evicted (over git_mirrors_max_bytes): %s", self.id, ", ".join(self.git.evicted))
            self.git.evicted.clear()

    async def _ws_commit(self, run: Run, co: Checkout, *, engine: str, model: str | None) -> tuple[WorkspaceResult, list[str]]:
        """Commit everything the engine changed in the worktree, with the job's trailers; returns
        the attempt's workspace result (head, diff stats; not pushed yet) and the changed paths
        (for the scope check). Raises :class:`GitError`.

        :param run: the run.
        :param co: its checkout.
        :param engine: the engine that ran (the ``Gigafactory-Engine`` trailer).
        :param model: the model it used, if known (``Gigafactory-Model``; ``default`` if not).
        """
        rec = run.record
        trailers = {
            "Gigafactory-Job": run.job, "Gigafactory-Epoch": str(run.epoch), "Gigafactory-Attempt": str(rec.attempt),
            "Gigafactory-Engine": engine, "Gigafactory-Model": model or "default",
        }
        message = workspace.commit_message(workspace.subject_from(rec.body, run.job), trailers)
        timeout_s = self.s.git_timeout_s

        def work() -> workspace.Stats:
            workspace.commit_all(co, message, author="Gigafactory", email=f"{self.id}@gigafactory.invalid",
                                 timeout_s=timeout_s)
            return workspace.diff_stats(co, timeout_s=timeout_s)

        st = await asyncio.to_thread(work)
        ws = WorkspaceResult(branch=co.branch, base=co.base, base_commit=co.base_commit, head=st.head,
                             files_changed=st.files_changed, lines_added=st.lines_added,
                             lines_deleted=st.lines_deleted)
        await self._event("committed", job=run.job, epoch=run.epoch,
                          reason=f"{co.branch} at {st.head[:12]}: {st.files_changed} files, "
                                 f"+{st.lines_added} -{st.lines_deleted}",
                          data={"branch": co.branch, "head": st.head, "base": co.base, "base_commit": co.base_commit,
                                "files_changed": st.files_changed, "lines_added": st.lines_added,
                                "lines_deleted": st.lines_deleted, "paths": st.paths[:100],
                                "paths_total": len(st.paths)})
        return ws, st.paths

    async def _judge_scope(self, run: Run, out: Outcome, ws: WorkspaceResult,
                           changed: list[str]) -> tuple[Outcome, WorkspaceResult]:
        """The scope guardrail: judge the attempt's ``changed`` paths against the job's scope
        (its own, else its profile's), its ``scope-mode`` and the factory's ``protected_paths``.
        A refusal turns a passing outcome into ``scope_violation`` (so it is neither verified
        nor pushed); any violation is recorded on the workspace result and in a
        ``scope_violation`` event, even under ``warn`` or on an attempt that failed anyway.

        :param run: the run.
        :param out: the engine's outcome so far.
        :param ws: the attempt's workspace result (after the commit).
        :param changed: every path the branch changed since base (a rename: both paths).
        """
        m = run.record.manifest
        allowed = effective_scope(m, run.record.profile.scope if run.record.profile else None)
        if allowed is None and not self.s.protected_paths:
            return out, ws
        try:
            verdict = check_scope(changed, allowed, self.s.protected_paths, m.scope_mode)
        except ValueError as e:  # GlobError too: a glob the submit check let through (an old record)
            detail = f"the scope could not be judged: {e}"[:500]
            ws = msgspec.structs.replace(ws, scope=detail)
            if out.failure is None:
                out = dataclasses.replace(out, failure=FailureClass.SCOPE_VIOLATION, detail=detail)
            return out, ws
        ws = msgspec.structs.replace(ws, outside_scope=verdict.outside[:100], protected=verdict.protected[:100],
                                     scope=verdict.detail[:2000] if allowed is not None or verdict.protected else "")
        if verdict.outside or verdict.protected:
            await self._event("scope_violation", job=run.job, epoch=run.epoch, reason=verdict.detail[:500],
                              data={"outside": verdict.outside[:100], "protected": verdict.protected[:100],
                                    "mode": m.scope_mode, "refused": not verdict.ok})
        if not verdict.ok and out.failure is None:
            out = dataclasses.replace(out, failure=FailureClass.SCOPE_VIOLATION, detail=verdict.detail[:500])
        return out, ws

    async def _ws_push(self, run: Run, co: Checkout, ws: WorkspaceResult) -> tuple[WorkspaceResult, str | None]:
        """Push the attempt's branch, fenced; returns the workspace result (``pushed`` and why)
        and None when pushed or nothing needed pushing, else why the attempt must not pass.

        Immediately before the push, the lease is renewed by compare-and-set (:meth:`_write`:
        it checks the epoch and the holder); a refused renewal means another epoch owns the job:
        the run is fenced and nothing is pushed. A renewal that landed counts only if at least
        ``git_push_min_remaining_s`` of lease is sure to be left (measured from when the write
        was sent); the push is then bounded by what is left."""
        if ws.head is None or ws.head == ws.base_commit:
            return _replace(ws, detail="nothing changed: no commit to push"), None
        ttl_s = self.s.lease_ttl_s
        want_s = protocol.fence_min_remaining_s(ttl_s, self.s.git_push_min_remaining_s)
        sent_s = time.monotonic()
        try:
            held = await self._write(run, lambda r: protocol.renew(r, self.id, run.epoch, time.time()))
        except Exception as e:  # cannot tell: a push must not go out on a guess
            why = f"push not fenced: the renewal before it failed ({type(e).__name__}: {e})"
            await self._event("push_refused", job=run.job, epoch=run.epoch, reason=why, data={"branch": co.branch})
            return _replace(ws, detail=why), why
        if held is None or run.fenced:
            why = f"push refused: epoch {run.epoch} is stale (the job was reclaimed or cancelled)"
            self.stats["pushes_fenced"] = self.stats.get("pushes_fenced", 0) + 1
            await self._event("push_refused", job=run.job, epoch=run.epoch, reason=why, data={"branch": co.branch})
            return _replace(ws, detail=why), why
        left_s = protocol.fence_remaining_s(ttl_s, time.monotonic() - sent_s)
        if left_s < want_s:
            why = (f"push not made: only {left_s:.2f}s of lease is sure to be left after the fence, less "
                   f"than git_push_min_remaining_s {want_s:g}s")
            await self._event("push_refused", job=run.job, epoch=run.epoch, reason=why, data={"branch": co.branch})
            return _replace(ws, detail=why), why
        try:
            await asyncio.to_thread(workspace.push, co, timeout_s=min(self.s.git_timeout_s, left_s))
        except GitError as e:
            why = f"push of {co.branch} failed: {e}"
            await self._event("push_failed", job=run.job, epoch=run.epoch, reason=why[:500],
                              data={"branch": co.branch})
            return _replace(ws, detail=why[:500]), why[:500]
        self.stats["pushes"] = self.stats.get("pushes", 0) + 1
        await self._event("pushed", job=run.job, epoch=run.epoch, reason=f"{co.branch} at {ws.head[:12]} pushed",
                          data={"branch": co.branch, "head": ws.head, "remote": co.url,
                                "lease_left_s": round(left_s, 3)})
        return _replace(ws, pushed=True, detail=f"pushed to {co.url}"), None


def _replace(ws: WorkspaceResult, **changes) -> WorkspaceResult:
    return msgspec.structs.replace(ws, **changes)
