"""A human's ``gigafactory ship`` of a ``repo`` job whose ``ship-as`` goes beyond the branch:
the coordinator opens the pull request (``pr-opened``) or opens and merges it (``merged``).

Why the coordinator and not a factory: in ``testing`` and ``review`` nobody holds the job's
lease (the factory reported, released its station and removed its worktree), the branch is
already pushed, and what is left is two forge requests. Doing them in the API call gives the
human the answer (the pull request, the merge commit, or why the forge refused) in the reply,
costs no station and no new claim, and keeps the merge gate where the human's decision is
made. The coordinator needs what the factories need for it: the broker (the local forge's
records), a path to a local remote it can reach (an absolute path or ``file://`` URL), or the
GitHub token (``GITHUB_TOKEN``/``GH_TOKEN`` in its environment) and ``github_api_url``.

Fencing: no epoch is held here, so the record's revision is the token. Immediately before each
forge side effect the record is rewritten by compare-and-set on the revision read (a "touch");
a cancel, requeue or another ship in between makes it fail, and nothing more is done. The
result is written by compare-and-set on the touched revision. Both forge requests are
idempotent (an open pull request for the branch is returned again; a merged one merges
"again" to the same commit), so a retry after a lost reply repeats nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec

from gigafactory.broker import Broker, Conflict
from gigafactory import forges
from gigafactory.forges import body
from gigafactory.forges.base import context_from
from gigafactory.forges.local import LocalForge
from gigafactory.schemas.lifecycle import TERMINAL, Stage
from gigafactory.schemas.records import EventRecord, JobRecord, WorkspaceResult, encode

log = logging.getLogger(__name__)

LOG_TAIL_MAX_BYTES = 8 * 1024 * 1024
"""Largest attempt log read back for the pull request's verify summary (a bigger one is not
read: the body then names the logs command only)."""


class ShipStopped(Exception):
    """The record changed under the ship (cancelled, requeued, shipped elsewhere): nothing more
    was done at the forge. ``str()`` says what to do."""


@dataclass
class Shipped:
    """What the forge did for a human's ship: the attempt's workspace result after it, and the
    conflict's words when the merge conflicted (None otherwise)."""

    ws: WorkspaceResult
    conflict: str | None
    revision: int
    """The record's revision the outcome must be written on (the last touch)."""


async def _touch(b: Broker, rec: JobRecord, revision: int) -> int:
    """The fence: rewrite the record unchanged but for ``updated_at`` by compare-and-set on
    ``revision``; the new revision. Raises :class:`ShipStopped` if it moved."""
    try:
        return await b.jobs.update(rec.id, encode(msgspec.structs.replace(rec, updated_at=time.time())),
                                   last=revision)
    except Conflict:
        raise ShipStopped(f"job {rec.id} changed while it was being shipped (cancelled, requeued or shipped "
                          f"by someone else); nothing more was done: see 'gigafactory status {rec.id}'") from None


async def _verify_output(b: Broker, log_object: str | None) -> str:
    if not log_object or b.artifacts is None:
        return ""
    try:
        info = await b.artifacts.get_info(log_object)
        if (info.size or 0) > LOG_TAIL_MAX_BYTES:
            return ""
        data = (await b.artifacts.get(log_object)).data or b""
    except Exception:  # the body names the logs command anyway
        return ""
    text = data.decode(errors="replace")
    at = text.rfind("# gigafactory: verify: ")
    return text[at:].partition("\n")[2] if at >= 0 else ""


async def carry_out(b: Broker, rec: JobRecord, revision: int, epoch: int, ws: WorkspaceResult) -> Shipped:
    """Make the passed attempt at ``epoch`` (workspace ``ws``, its branch pushed) what the job's
    ``ship-as`` asks, at the forge; each forge side effect behind a touch of the record.

    :param b: the coordinator's broker (the local forge's records, the settings).
    :param rec: the record as read at ``revision`` (``testing`` or ``review``).
    :param revision: its revision.
    :param epoch: the epoch of the attempt shipped.
    :param ws: that attempt's workspace result.
    :raises ShipStopped: the record moved under a fence.
    """
    m = rec.manifest
    s = b.settings
    remote = m.repo or ""
    try:
        forge = forges.forge_for(remote, context_from(s, b), s.forge)
    except forges.ForgeError as e:
        return Shipped(msgspec.structs.replace(ws, ship_detail=f"no forge: {e}"[:500]), None, revision)
    bound_s = s.forge_http_timeout_s * 4 + 1
    a = next(x for x in rec.attempts if x.epoch == epoch)
    facts = body.run_facts(msgspec.structs.replace(rec, attempts=[x for x in rec.attempts if x.epoch <= epoch]),
                           branch=ws.branch, base=ws.base, verify_output=await _verify_output(b, a.log))
    facts = msgspec.structs.replace(facts, files_changed=ws.files_changed, lines_added=ws.lines_added,
                                    lines_deleted=ws.lines_deleted)
    if ws.pull_number is None:
        revision = await _touch(b, rec, revision)
        try:
            pr = await asyncio.wait_for(forge.open_pull_request(
                remote, ws.branch, ws.base, body.pull_request_title(rec.id, rec.body),
                body.pull_request_body(facts)), timeout=bound_s)
        except (forges.ForgeError, asyncio.TimeoutError) as e:
            why = f"opening the pull request failed: {e or type(e).__name__}"[:500]
            return Shipped(msgspec.structs.replace(ws, ship_detail=why), None, revision)
        ws = msgspec.structs.replace(ws, pull_number=pr.number, pull_url=pr.url, pull_state=pr.state,
                                     shipped_as="pr-opened",
                                     ship_detail=f"pull request #{pr.number} opened on the {forge.kind} forge")
    else:
        pr = forges.PullRequest(number=ws.pull_number, repo=remote, head=ws.branch, base=ws.base, title="",
                                url=ws.pull_url)
    if m.ship_as != "merged":
        return Shipped(ws, None, revision)
    try:
        if isinstance(forge, LocalForge):
            passed = m.verify is not None and a.verify_exit_code == 0
            await forge.set_checks(pr, "success" if passed else "none", ws.head or "",
                                   "verify passed" if passed else "the job has no verify")
        revision = await _touch(b, rec, revision)
        res = await asyncio.wait_for(forge.merge(pr), timeout=bound_s)
    except (forges.ForgeError, asyncio.TimeoutError) as e:
        why = f"the merge failed: {e or type(e).__name__}"[:500]
        return Shipped(msgspec.structs.replace(ws, ship_detail=why), None, revision)
    if res.outcome == "conflict":
        why = f"#{pr.number} does not merge: {res.reason}"[:500]
        return Shipped(msgspec.structs.replace(ws, ship_detail=why), why, revision)
    if res.outcome == "blocked":
        return Shipped(msgspec.structs.replace(ws, ship_detail=f"merge blocked: {res.reason}"[:500]), None, revision)
    return Shipped(msgspec.structs.replace(ws, pull_state="merged", merged_commit=res.sha, shipped_as="merged",
                                           ship_detail=f"pull request #{pr.number} merged into {pr.base}"),
                   None, revision)


# -- after the job ended for good: superseded branches, the WIP branch, their pull requests -------

REF_CLEANUP_INTERVAL_S = 2.0
"""How often the coordinator looks for ended ``repo`` jobs whose refs are not cleaned yet."""
REF_CLEANUPS_PER_PASS = 16
"""Jobs cleaned per pass at most (each costs a few forge requests); the rest wait a pass."""
REF_CLEANUP_TRIES_MAX = 5
"""Passes a job's clean-up may fail (forge down, remote gone) before the coordinator records
that it gave up (and the refs stay)."""


@dataclass(frozen=True)
class RefPlan:
    """What the clean-up of an ended job keeps and closes (:func:`ref_plan`)."""

    keep: frozenset[str]
    """Branches never deleted: the shipped attempt's (or, for a job that did not ship, the last
    pushed attempt's, or its WIP branch when nothing else of its work is on the remote)."""
    close: tuple[tuple[int, str], ...]
    """Open pull requests of superseded attempts: (number, head branch)."""


def ref_plan(rec: JobRecord) -> RefPlan:
    """The clean-up of a job in a terminal stage (pure): every ``gf/<job>/...`` branch but
    :attr:`RefPlan.keep` is deleted, and the pull requests in :attr:`RefPlan.close` closed.

    A shipped job keeps the branch of the attempt that shipped (and its pull request). A job
    that failed keeps its last pushed branch, or, when no attempt pushed one, its WIP branch:
    a failed attempt never pushes, so the checkpoint may be the only copy of its work.

    :param rec: the record, in ``shipped``, ``failed`` or ``dead_letter``.
    """
    pushed = [a for a in rec.attempts if a.workspace is not None and a.workspace.pushed]
    keep: set[str] = set()
    if rec.stage == Stage.SHIPPED:
        shipped = next((a for a in reversed(rec.attempts) if a.outcome == "passed"), None)
        if shipped is not None and shipped.workspace is not None:
            keep.add(shipped.workspace.branch)
    elif pushed:
        keep.add(pushed[-1].workspace.branch)
    elif rec.checkpoint is not None:
        keep.add(rec.checkpoint.branch)
    close = tuple((a.workspace.pull_number, a.workspace.branch) for a in rec.attempts
                  if a.workspace is not None and a.workspace.pull_number is not None
                  and a.workspace.branch not in keep and a.workspace.pull_state == "open")
    return RefPlan(frozenset(keep), close)


def needs_ref_cleanup(rec: JobRecord) -> bool:
    """An ended ``repo`` job whose clean-up has not run (pure)."""
    return rec.stage in TERMINAL and rec.manifest.repo is not None and not rec.refs_cleaned


async def clean_up_refs(b: Broker, rec: JobRecord) -> tuple[str, dict]:
    """Delete an ended job's superseded branches and WIP branch on its remote and close their
    pull requests (:func:`ref_plan`); returns what it did in words, and the event's data.
    Raises :class:`forges.ForgeError` (the next pass tries again).

    Safe without a fence: the job is terminal, so no holder may push any more (every push is
    fenced by a renewal a terminal record refuses), and a deletion on the local forge is a
    compare-and-swap on the head it listed.

    :param b: the coordinator's broker (settings, the local forge's records).
    :param rec: the record, terminal.
    """
    plan = ref_plan(rec)
    remote = rec.manifest.repo or ""
    forge = forges.forge_for(remote, context_from(b.settings, b), b.settings.forge)
    bound_s = b.settings.forge_http_timeout_s * 4 + 1
    heads = await asyncio.wait_for(forge.branches(f"gf/{rec.id}/"), timeout=bound_s)
    deleted, kept = [], sorted(plan.keep & set(heads))
    for name, sha in sorted(heads.items()):
        if name not in plan.keep and await asyncio.wait_for(forge.delete_branch(name, sha), timeout=bound_s):
            deleted.append(name)
    closed = []
    for number, head in plan.close:
        pr = forges.PullRequest(number=number, repo=remote, head=head, base="", title="")
        if await asyncio.wait_for(forge.close_pull_request(pr), timeout=bound_s) == "closed":
            closed.append(number)
    words = (f"deleted {', '.join(deleted) or 'no branch'}; kept {', '.join(kept) or 'none'}"
             + (f"; closed pull request {', '.join(f'#{n}' for n in closed)}" if closed else ""))
    return words[:2000], {"deleted": deleted[:100], "kept": kept, "closed": closed[:100], "forge": forge.kind}


class RefCleaner:
    """The coordinator's pass over ended ``repo`` jobs (every :data:`REF_CLEANUP_INTERVAL_S`):
    :func:`clean_up_refs`, then the record's ``refs_cleaned`` written by compare-and-set (so it
    runs once) and a ``refs_cleaned`` event. Idempotent: two coordinators doing it at once
    delete and close the same things.

    :param b: the coordinator's broker.
    :param view: its fleet view (the records and their revisions).
    """

    def __init__(self, b: Broker, view) -> None:
        self.broker, self.view = b, view
        self.failures: dict[str, int] = {}
        """Job -> failed passes so far (bounded by :data:`REF_CLEANUP_TRIES_MAX`)."""
        self.pending: set[str] = {jid for jid in view.stage_ids(*TERMINAL)
                                  if (st := view.jobs.get(jid)) is not None and st.refs_pending}
        """Ended jobs whose refs are not cleaned yet, kept by :meth:`on_job` as the view changes:
        a pass (every 2 s) looks at these only, not at every finished job the view holds
        (100,000 of them after a busy day, sorted every pass before)."""
        view.job_listeners.append(self.on_job)

    def on_job(self, old, new) -> None:
        """The view's listener: keep :attr:`pending` (``old``/``new``: a job's states, or None)."""
        if new is not None and new.stage in TERMINAL and new.refs_pending:
            self.pending.add(new.key)
        elif old is not None or new is not None:
            self.pending.discard((new or old).key)

    async def run_pass(self) -> int:
        """Clean up to :data:`REF_CLEANUPS_PER_PASS` jobs that ended at least
        ``ref_cleanup_after_s`` ago (by the broker timestamp of their terminal revision, read
        against the local clock: a skew moves the clean-up by as much); returns how many."""
        cutoff = time.time() - self.broker.settings.ref_cleanup_after_s
        # ``refs_pending`` first: it is read from the view's state, while ``st.record`` decodes a
        # finished job's packed record (done only for the few that need the clean-up).
        due = [st for jid in sorted(self.pending)
               if (st := self.view.jobs.get(jid)) is not None and st.ts <= cutoff and st.refs_pending
               and needs_ref_cleanup(st.record)]
        done = 0
        for st in due[:REF_CLEANUPS_PER_PASS]:
            done += await self._clean(st.record, st.revision)
        return done

    async def _clean(self, rec: JobRecord, revision: int) -> int:
        kind = "refs_cleaned"
        try:
            words, data = await clean_up_refs(self.broker, rec)
        except (forges.ForgeError, asyncio.TimeoutError, OSError) as e:
            n = self.failures[rec.id] = self.failures.get(rec.id, 0) + 1
            log.warning("refs of %s not cleaned (try %d of %d): %s", rec.id, n, REF_CLEANUP_TRIES_MAX, e)
            if n < REF_CLEANUP_TRIES_MAX:
                return 0
            kind, words, data = "refs_not_cleaned", f"gave up after {n} tries: {e}"[:2000], {}
        self.failures.pop(rec.id, None)
        try:
            await self.broker.jobs.update(rec.id, encode(msgspec.structs.replace(rec, refs_cleaned=words)), last=revision)
        except Conflict:
            return 0  # it changed (another coordinator cleaned it): the view shows the new revision
        await self.broker.publish_event(EventRecord(kind=kind, at=time.time(), job=rec.id, actor="coordinator",
                                               reason=words[:500], data=data))
        return 1
