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
4b. :meth:`_ws_ship` for a ``review-policy: auto`` job whose ``ship-as`` is ``pr-opened`` or
   ``merged``: the pull request, and the merge, each behind the same fence
   (:meth:`_fence_side_effect`). A conflict ends the attempt ``merge_conflict``.
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

from gigafactory import forges
from gigafactory.forges import body
from gigafactory.forges.local import LocalForge
from gigafactory.schemas import protocol
from gigafactory.schemas.manifest import FailureClass, effective_scope
from gigafactory.schemas.records import IdleReason, WorkspaceResult
from gigafactory.schemas.scope import check_scope

from . import workspace
from .engines.base import Outcome
from .holder import Run
from .workspace import Checkout, GitError

log = logging.getLogger(__name__)


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
        if start is not None and protocol.rebase_pending(run.record):
            # After rebase-needed the previous branch no longer merged into base: start from the
            # NEW base (fetched by the checkout), never from the checkpoint, whose history holds
            # the old base. The earlier work is merged onto it once the engine is known
            # (:meth:`Checkpoints._carry_onto_new_base`: an agent resolves a conflict, a script
            # starts from the new base).
            start = None
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
        timeout_s = self.settings.git_timeout_s

        def work() -> workspace.Stats:
            workspace.commit_all(co, message, author="Gigafactory", email=f"{self.id}@gigafactory.invalid",
                                 timeout_s=timeout_s)
            return workspace.diff_stats(co, timeout_s=timeout_s)

        st = await asyncio.to_thread(work)
        ws = WorkspaceResult(branch=co.branch, base=co.base, base_commit=co.base_commit, head=st.head,
                             files_changed=st.files_changed, lines_added=st.lines_added,
                             lines_deleted=st.lines_deleted, carried=co.carry_detail)
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
        if allowed is None and not self.settings.protected_paths:
            return out, ws
        try:
            verdict = check_scope(changed, allowed, self.settings.protected_paths, m.scope_mode)
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
        fenced = await self._fence_side_effect(run, "push", {"branch": co.branch})
        if isinstance(fenced, str):
            return _replace(ws, detail=fenced), fenced
        left_s = fenced
        try:
            await asyncio.to_thread(workspace.push, co, timeout_s=min(self.settings.git_timeout_s, left_s))
        except GitError as e:
            why = f"push of {co.branch} failed: {e}"
            await self._event("push_failed", job=run.job, epoch=run.epoch, reason=why[:500],
                              data={"branch": co.branch})
            return _replace(ws, detail=why[:500]), why[:500]
        self.stats["pushes"] = self.stats.get("pushes", 0) + 1
        await self._event("pushed", job=run.job, epoch=run.epoch, reason=f"{co.branch} at {ws.head[:12]} pushed",
                          data={"branch": co.branch, "head": ws.head, "remote": co.url,
                                "lease_left_s": round(left_s, 3)})
        return _replace(ws, pushed=True, detail=f"pushed to {co.url}", shipped_as="branch"), None

    async def _fence_side_effect(self, run: Run, what: str, data: dict) -> float | str:
        """The fence in front of every side effect outside the broker (push, opening a pull
        request, merging): a compare-and-set renewal of the lease (:meth:`_write` checks the
        epoch and the holder), and then at least ``git_push_min_remaining_s`` of lease sure to
        be left (measured from when the write was sent). Returns the lease left in seconds
        (the bound for the side effect), or why it must not happen (a ``<what>_refused`` event
        says it too). A stale holder therefore never pushes, opens nor merges.

        :param run: the run.
        :param what: ``push``, ``pull_request`` or ``merge`` (the event's name and the words).
        :param data: what the refusal event carries (the branch, the pull request).
        """
        ttl_s = self.settings.lease_ttl_s
        want_s = protocol.fence_min_remaining_s(ttl_s, self.settings.git_push_min_remaining_s)
        sent_s = time.monotonic()
        try:
            held = await self._write(run, lambda r: protocol.renew(r, self.id, run.epoch, time.time()))
        except Exception as e:  # cannot tell: a side effect must not go out on a guess
            why = f"{what} not fenced: the renewal before it failed ({type(e).__name__}: {e})"
            await self._event(f"{what}_refused", job=run.job, epoch=run.epoch, reason=why, data=data)
            return why
        if held is None or run.fenced:
            why = f"{what} refused: epoch {run.epoch} is stale (the job was reclaimed or cancelled)"
            key = "pushes_fenced" if what == "push" else f"{what}s_fenced"
            self.stats[key] = self.stats.get(key, 0) + 1
            await self._event(f"{what}_refused", job=run.job, epoch=run.epoch, reason=why, data=data)
            return why
        left_s = protocol.fence_remaining_s(ttl_s, time.monotonic() - sent_s)
        if left_s < want_s:
            why = (f"{what} not made: only {left_s:.2f}s of lease is sure to be left after the fence, less "
                   f"than git_push_min_remaining_s {want_s:g}s")
            await self._event(f"{what}_refused", job=run.job, epoch=run.epoch, reason=why, data=data)
            return why
        return left_s

    async def _ws_ship(self, run: Run, co: Checkout, ws: WorkspaceResult, facts: "body.RunFacts",
                       verify_passed: bool) -> tuple[WorkspaceResult, str | None]:
        """After a passed, pushed attempt of a ``review-policy: auto`` job: make the branch what
        its ``ship-as`` asks (``pr-opened``: open the pull request; ``merged``: open it, report
        verify as its checks on the local forge, wait up to ``ship_checks_wait_s`` for pending
        checks, merge). Each forge call is fenced like the push. Returns the workspace result
        (pull request, merge, or why not: ``ship_detail``) and, when the merge conflicts, the
        forge's words (the attempt then ends ``merge_conflict``: :func:`protocol.rebase_or_fail`).
        A forge that refuses or errs leaves the job verified but not shipped (``testing``).

        :param run: the run; :param co: its checkout; :param ws: the pushed result.
        :param facts: what the pull request's body says about the run.
        :param verify_passed: the job's ``verify`` ran and passed (the local forge's checks).
        """
        m = run.record.manifest
        if m.ship_as == "branch" or not ws.pushed:
            return ws, None
        data = {"branch": co.branch, "base": co.base}
        try:
            forge = forges.forge_for(co.url, forges.base.context_from(self.settings, self.broker), self.settings.forge)
        except forges.ForgeError as e:
            return await self._ship_stopped(run, ws, f"no forge: {e}", data), None
        fenced = await self._fence_side_effect(run, "pull_request", data)
        if isinstance(fenced, str):
            return _replace(ws, ship_detail=fenced[:500]), None
        try:
            pr = await asyncio.wait_for(forge.open_pull_request(
                m.repo or co.url, co.branch, co.base, body.pull_request_title(run.job, run.record.body),
                body.pull_request_body(facts)), timeout=fenced)
        except (forges.ForgeError, asyncio.TimeoutError) as e:
            return await self._ship_stopped(run, ws, f"opening the pull request failed: {_words(e)}", data), None
        ws = _replace(ws, pull_number=pr.number, pull_url=pr.url, pull_state=pr.state, shipped_as="pr-opened",
                      ship_detail=f"pull request #{pr.number} opened on the {forge.kind} forge")
        self.stats["pull_requests"] = self.stats.get("pull_requests", 0) + 1
        await self._event("pull_request_opened", job=run.job, epoch=run.epoch,
                          reason=f"#{pr.number} {co.branch} -> {co.base}" + (f" {pr.url}" if pr.url else ""),
                          data={**data, "number": pr.number, "url": pr.url, "forge": forge.kind})
        if m.ship_as != "merged":
            return ws, None
        return await self._ws_merge(run, forge, pr, ws, verify_passed, data)

    async def _ws_merge(self, run: Run, forge, pr, ws: WorkspaceResult, verify_passed: bool,
                        data: dict) -> tuple[WorkspaceResult, str | None]:
        """The ``merged`` half of :meth:`_ws_ship`: checks, a bounded wait, the fenced merge.
        The station is held meanwhile but does no work: it reads ``waiting-merge`` (issue 13's
        idle classes) until the merge is decided."""
        self._station_waits(run.station, IdleReason.WAITING_MERGE)
        try:
            return await self._ws_merge_waiting(run, forge, pr, ws, verify_passed, data)
        finally:
            if self.runs.get((run.job, run.epoch)) is run:  # still holds its station
                self._station_waits(run.station, None)

    async def _ws_merge_waiting(self, run: Run, forge, pr, ws: WorkspaceResult, verify_passed: bool,
                                data: dict) -> tuple[WorkspaceResult, str | None]:
        data = {**data, "number": pr.number}
        try:
            if isinstance(forge, LocalForge):
                # The local forge's checks are this attempt's verify, pinned to the pushed head.
                await forge.set_checks(pr, "success" if verify_passed else "none", ws.head or "",
                                       "verify passed" if verify_passed else "the job has no verify")
            state = await self._wait_for_checks(run, forge, pr)
        except (forges.ForgeError, asyncio.TimeoutError) as e:
            return await self._ship_stopped(run, ws, f"reading the checks failed: {_words(e)}", data), None
        if state in ("pending", "failure"):
            return await self._ship_stopped(run, ws, f"merge blocked: checks are {state} on {(ws.head or '')[:12]}"
                                            + (f" after {self.settings.ship_checks_wait_s:g}s (ship_checks_wait_s)"
                                               if state == "pending" else ""), data), None
        fenced = await self._fence_side_effect(run, "merge", data)
        if isinstance(fenced, str):
            return _replace(ws, ship_detail=fenced[:500]), None
        try:
            res = await asyncio.wait_for(forge.merge(pr), timeout=fenced)
        except (forges.ForgeError, asyncio.TimeoutError) as e:
            return await self._ship_stopped(run, ws, f"the merge failed: {_words(e)}", data), None
        if res.outcome == "conflict":
            why = f"#{pr.number} does not merge: {res.reason}"[:500]
            await self._event("merge_conflict", job=run.job, epoch=run.epoch, reason=why, data=data)
            return _replace(ws, ship_detail=why), why
        if res.outcome == "blocked":
            return await self._ship_stopped(run, ws, f"merge blocked: {res.reason}", data), None
        self.stats["merges"] = self.stats.get("merges", 0) + 1
        await self._event("merged", job=run.job, epoch=run.epoch,
                          reason=f"#{pr.number} merged into {pr.base} at {(res.sha or '')[:12]}",
                          data={**data, "merged_commit": res.sha})
        return _replace(ws, pull_state="merged", merged_commit=res.sha, shipped_as="merged",
                        ship_detail=f"pull request #{pr.number} merged into {pr.base}"), None

    async def _wait_for_checks(self, run: Run, forge, pr) -> str:
        """The pull request's checks, re-read every ``ship_checks_poll_s`` while ``pending``, for
        at most ``ship_checks_wait_s`` (the lease is renewed meanwhile); stops early if the run
        is cancelled or fenced."""
        deadline_s = time.monotonic() + self.settings.ship_checks_wait_s
        timeout_s = self.settings.forge_http_timeout_s * 2 + 1
        while True:
            state = await asyncio.wait_for(forge.checks(pr), timeout=timeout_s)
            left_s = deadline_s - time.monotonic()
            if state != "pending" or left_s <= 0 or run.fenced:
                return state
            try:
                await asyncio.wait_for(run.cancel.wait(), timeout=min(self.settings.ship_checks_poll_s, left_s))
                return state  # cancelled or fenced: stop waiting
            except asyncio.TimeoutError:
                pass

    async def _ship_stopped(self, run: Run, ws: WorkspaceResult, why: str, data: dict) -> WorkspaceResult:
        """Shipping stopped short of ``ship-as`` without a conflict: say so (a ``ship_blocked``
        event); the job waits in ``testing`` for a human's ``ship`` to try again."""
        await self._event("ship_blocked", job=run.job, epoch=run.epoch, reason=why[:500], data=data)
        return _replace(ws, ship_detail=why[:500])


def _replace(ws: WorkspaceResult, **changes) -> WorkspaceResult:
    return msgspec.structs.replace(ws, **changes)


def _words(e: BaseException) -> str:
    return str(e) or type(e).__name__


VERIFY_LOG_TAIL_BYTES = 64 * 1024
"""What of an attempt's log is read for the pull request's verify summary (its end)."""
VERIFY_HEADER = "# gigafactory: verify: "


def verify_output(log_path: str) -> str:
    """Verify's output from the attempt's log: what follows the last verify header in the
    log's last ``VERIFY_LOG_TAIL_BYTES`` (empty when verify did not run or the log is gone)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - VERIFY_LOG_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    at = text.rfind(VERIFY_HEADER)
    if at < 0:
        return ""
    return text[at:].partition("\n")[2]
