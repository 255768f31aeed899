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
from gigafactory.schemas.records import JobRecord, WorkspaceResult, encode

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
