"""The local forge: the remote is a bare git repository on this machine (or a shared disk),
and a pull request is a record in the broker's ``gf_pulls`` bucket.

- A record's key is ``<repo key>.<branch key>``: one pull request per head branch and remote
  (the repo key is a hash of the remote's real path, the branch key :func:`safe_key` of the
  branch), so opening is idempotent by compare-and-set: ``create`` wins once, a second opener
  reads the winner's record. Numbers come from a per-remote counter (``<repo key>.next``),
  incremented by compare-and-set; a lost race wastes a number, never reuses one.
- Checks are what the factory reports with :meth:`LocalForge.set_checks` (its ``verify``),
  pinned to the head commit they ran on: a head that moved since makes them ``pending``.
- :meth:`LocalForge.merge` really merges inside the bare remote: ``git merge-tree
  --write-tree`` computes the merge without a working tree, ``commit-tree`` makes the merge
  commit (two parents, like GitHub's merge button), and ``update-ref`` moves ``base`` only if
  it still points where the merge started (compare-and-swap on the ref). A merge that does
  not apply cleanly changes nothing and returns ``conflict`` naming the files; checks that
  are not green return ``blocked``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from pathlib import Path

import msgspec

from gigafactory.broker import Bucket, Conflict, connected_role
from gigafactory.identity import LAYOUT_ROLES
from gigafactory.forges.base import (
    BRANCHES_LISTED_MAX,
    ChecksState,
    CHECKS_STATES,
    ForgeContext,
    ForgeError,
    ForgeNotFound,
    MergeResult,
    PullRequest,
)
from gigafactory.schemas import names
from gigafactory.schemas.names import safe_key

KIND = "local"
PULLS_BUCKET = names.PULLS_BUCKET
"""Local pull request records (key: ``<repo key>.<branch key>``; value: :class:`LocalPull`),
and one counter per remote (key: ``<repo key>.next``)."""
PULLS_HISTORY = names.PULLS_HISTORY
"""Revisions kept per record: enough to read what a pull request was before its merge."""
GIT_TIMEOUT_S = 120.0
"""Bound on one git command in the remote (a merge of a large repository is the slowest)."""
GIT_OUTPUT_MAX_BYTES = 1024 * 1024
"""What is kept of one git command's output (conflict lists are cut, with a note)."""
CAS_TRIES = 8
"""Compare-and-set retries (counter, record, base ref) before giving up with an error."""
CONFLICT_FILES_SHOWN = 20
"""How many conflicting files a ``conflict`` reason names."""
MERGE_IDENTITY = {
    "GIT_AUTHOR_NAME": "Gigafactory", "GIT_AUTHOR_EMAIL": "gigafactory@localhost",
    "GIT_COMMITTER_NAME": "Gigafactory", "GIT_COMMITTER_EMAIL": "gigafactory@localhost",
}
"""Who the local forge's merge commits are by (the jobs' own commits keep their authors)."""


_GIT_LOCATION_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                      "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_NAMESPACE")


class LocalPull(msgspec.Struct, omit_defaults=True):
    """The stored record of one local pull request."""

    pr: PullRequest
    remote: str
    """The bare repository's real path."""
    checks: ChecksState = "none"
    checks_sha: str = ""
    """The head commit ``checks`` ran on."""
    checks_detail: str = ""


class _Counter(msgspec.Struct):
    next: int


def detect(remote: str) -> bool:
    """A local path (absolute or relative) or a ``file://`` URL; not ``scheme://`` nor
    ``host:path`` (scp-like ssh)."""
    if remote.startswith("file://"):
        return True
    return "://" not in remote and not re.match(r"^[^/]+:", remote)


def make(remote: str, ctx: ForgeContext) -> "LocalForge":
    if ctx.store is None:
        raise ForgeError("the local forge keeps pull requests in the broker, and none was given")
    return LocalForge(remote[len("file://"):] if remote.startswith("file://") else remote, ctx.store)


def repo_key(remote_path: str | os.PathLike) -> str:
    """The key prefix of a remote's records: a hash of its real path (any spelling of the same
    folder shares its pull requests and its numbers)."""
    return "r" + hashlib.sha256(os.path.realpath(remote_path).encode()).hexdigest()[:20]


class LocalForge:
    """Pull requests on a bare repository, kept in the broker.

    :param remote_path: the bare repository (the job's ``repo`` when it is a path).
    :param store: the :class:`~gigafactory.broker.Broker` whose ``gf_pulls`` bucket holds the
        records (created on first use).
    :param require_checks: when True (the default), :meth:`merge` needs ``success``; when
        False, ``none`` (nothing reported) merges too. ``pending`` and ``failure`` never do.
    """

    kind = KIND

    def __init__(self, remote_path: str | os.PathLike, store, *, require_checks: bool = True) -> None:
        self.remote = os.path.realpath(remote_path)
        self.store = store
        self.require_checks = require_checks
        self._rk = repo_key(self.remote)
        self._bucket = None

    def __repr__(self) -> str:
        return f"LocalForge({self.remote!r})"

    # -- the record ---------------------------------------------------------------------------

    async def _pulls(self):
        if self._bucket is None and connected_role(self.store.settings) not in (None, "unknown", *LAYOUT_ROLES):
            # A factory may write the bucket, not create it (broker permissions): the layout
            # roles create it with the layout (Broker.ensure_layout).
            kv = await self.store.js.key_value(PULLS_BUCKET)
            self._bucket = Bucket(self.store.js, kv, PULLS_BUCKET, self.store.settings.request_timeout_s)
        if self._bucket is None:
            # Created on first use with the layout's options (replicas, file storage): a fleet
            # that never opens a local pull request has no such bucket. Broker._kv is the one
            # place buckets are made.
            self._bucket = await self.store._kv(PULLS_BUCKET, history=PULLS_HISTORY,
                                                description="local forge pull requests")
        return self._bucket

    def _key(self, head: str) -> str:
        return f"{self._rk}.{safe_key(head)}"

    async def _read(self, head: str):
        b = await self._pulls()
        e = await b.get(self._key(head))
        if e is None:
            return None, 0
        return msgspec.json.decode(e.value, type=LocalPull), e.revision

    async def _next_number(self) -> int:
        b = await self._pulls()
        key = f"{self._rk}.next"
        for _ in range(CAS_TRIES):
            e = await b.get(key)
            try:
                if e is None:
                    await b.create(key, msgspec.json.encode(_Counter(next=2)))
                    return 1
                n = msgspec.json.decode(e.value, type=_Counter).next
                await b.update(key, msgspec.json.encode(_Counter(next=n + 1)), last=e.revision)
                return n
            except Conflict:
                continue
        raise ForgeError(f"local forge {self.remote}: could not allocate a pull request number after "
                         f"{CAS_TRIES} tries (too many concurrent openers)")

    async def get(self, head: str) -> PullRequest | None:
        """The pull request of branch ``head`` (open, merged or closed), or None."""
        rec, _ = await self._read(head)
        return rec.pr if rec else None

    # -- git in the remote ----------------------------------------------------------------------

    async def _git(self, *args: str, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
        """Run ``git -C <remote> args``; (exit code, stdout). Raises ForgeError on an exit code
        not in ``ok`` (with git's stderr) or when it outlives ``GIT_TIMEOUT_S``."""
        # A factory started from a git hook inherits GIT_DIR and friends, which would point
        # git at another repository than -C's: drop them.
        full_env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
        full_env.update({"GIT_TERMINAL_PROMPT": "0", **(env or {})})
        proc = await asyncio.create_subprocess_exec(
            "git", "-C", self.remote, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=GIT_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise ForgeError(f"local forge {self.remote}: git {args[0]} did not finish within {GIT_TIMEOUT_S:g}s")
        if proc.returncode not in ok:
            msg = err[-2000:].decode(errors="replace").strip()
            raise ForgeError(f"local forge {self.remote}: git {' '.join(args[:2])} failed "
                             f"(exit {proc.returncode}): {msg}")
        return proc.returncode or 0, out[:GIT_OUTPUT_MAX_BYTES].decode(errors="replace")

    async def _branch_sha(self, branch: str) -> str | None:
        rc, out = await self._git("rev-parse", "--verify", "--quiet", "--end-of-options",
                                  f"refs/heads/{branch}^{{commit}}", ok=(0, 1))
        return out.strip() if rc == 0 else None

    async def _check_branch_name(self, branch: str, what: str) -> None:
        rc, _ = await self._git("check-ref-format", f"refs/heads/{branch}", ok=(0, 1))
        if rc != 0 or branch.startswith("-"):
            raise ForgeError(f"local forge: {what} {branch!r} is not a valid branch name")

    async def _is_ancestor(self, a: str, b: str) -> bool:
        rc, _ = await self._git("merge-base", "--is-ancestor", a, b, ok=(0, 1))
        return rc == 0

    # -- the forge ------------------------------------------------------------------------------

    async def open_pull_request(self, repo: str, head: str, base: str, title: str, body: str) -> PullRequest:
        """Open a pull request from ``head`` into ``base`` (both branches of the remote), or
        return the one open for ``head`` already.

        :param repo: the job's ``repo`` as written (kept for display).
        :param head: the branch to merge (``gf/<job>/e<epoch>``).
        :param base: the branch to merge into.
        :param title: one line.
        :param body: markdown (see :func:`~gigafactory.forges.body.pull_request_body`).
        :raises ForgeNotFound: the remote is not a repository, or a branch does not exist.
        """
        if not Path(self.remote).is_dir():
            raise ForgeNotFound(f"local forge: the remote {self.remote} does not exist")
        for branch, what in ((head, "head"), (base, "base")):
            await self._check_branch_name(branch, what)
        head_sha = await self._branch_sha(head)
        if head_sha is None:
            raise ForgeNotFound(f"local forge {self.remote}: head branch {head!r} does not exist (push it first)")
        if await self._branch_sha(base) is None:
            raise ForgeNotFound(f"local forge {self.remote}: base branch {base!r} does not exist")
        b = await self._pulls()
        key = self._key(head)
        for _ in range(CAS_TRIES):
            rec, rev = await self._read(head)
            if rec is not None and rec.pr.state == "open":
                return rec.pr
            now = time.time()
            pr = PullRequest(number=await self._next_number(), repo=repo, head=head, base=base,
                             title=title, body=body, state="open", head_sha=head_sha,
                             created_at=now, updated_at=now)
            value = msgspec.json.encode(LocalPull(pr=pr, remote=self.remote))
            try:
                # A merged or closed one for the same head is replaced (it stays in the history).
                if rec is None:
                    await b.create(key, value)
                else:
                    await b.update(key, value, last=rev)
                return pr
            except Conflict:
                continue  # another opener won: read what it wrote
        raise ForgeError(f"local forge {self.remote}: could not open a pull request for {head!r} after "
                         f"{CAS_TRIES} tries")

    async def set_checks(self, pr: PullRequest, state: ChecksState, sha: str, detail: str = "") -> None:
        """Record the checks of ``pr`` (the factory's ``verify``) as run on commit ``sha``.

        :param pr: the pull request (its ``head`` finds the record).
        :param state: one of :data:`~gigafactory.forges.base.CHECKS_STATES`.
        :param sha: the head commit the checks ran on.
        :param detail: one line for status displays.
        """
        if state not in CHECKS_STATES:
            raise ValueError(f"checks state {state!r}: expected one of {', '.join(CHECKS_STATES)}")
        b = await self._pulls()
        for _ in range(CAS_TRIES):
            rec, rev = await self._read(pr.head)
            if rec is None:
                raise ForgeNotFound(f"local forge {self.remote}: no pull request for {pr.head!r}")
            rec = msgspec.structs.replace(rec, checks=state, checks_sha=sha, checks_detail=detail[:500])
            try:
                await b.update(self._key(pr.head), msgspec.json.encode(rec), last=rev)
                return
            except Conflict:
                continue
        raise ForgeError(f"local forge {self.remote}: could not record checks for {pr.head!r}")

    async def checks(self, pr: PullRequest) -> ChecksState:
        """``none`` until checks are reported; then their state if they ran on the head commit
        the branch has now, else ``pending`` (the head moved since)."""
        rec, _ = await self._read(pr.head)
        if rec is None:
            raise ForgeNotFound(f"local forge {self.remote}: no pull request for {pr.head!r}")
        if rec.checks == "none":
            return "none"
        return rec.checks if rec.checks_sha == await self._branch_sha(pr.head) else "pending"

    async def merge(self, pr: PullRequest) -> MergeResult:
        """Merge ``pr``'s head into its base inside the remote, if its checks are green and it
        merges cleanly. Idempotent: a merged pull request returns its merge again.

        :returns: ``merged`` with the merge commit; ``blocked`` (checks not green, pull
            request closed, a branch gone); ``conflict`` naming the files that do not merge, or
            saying that ``base`` kept moving under the merge.
        """
        for _ in range(CAS_TRIES):
            rec, rev = await self._read(pr.head)
            if rec is None:
                raise ForgeNotFound(f"local forge {self.remote}: no pull request for {pr.head!r}")
            cur = rec.pr
            if cur.number != pr.number:
                return MergeResult("blocked", f"pull request #{pr.number} was replaced by #{cur.number}")
            if cur.state == "merged":
                return MergeResult("merged", "already merged", cur.merge_sha)
            if cur.state == "closed":
                return MergeResult("blocked", f"pull request #{cur.number} is closed")
            head_sha, base_sha = await self._branch_sha(cur.head), await self._branch_sha(cur.base)
            if head_sha is None or base_sha is None:
                gone = cur.head if head_sha is None else cur.base
                return MergeResult("blocked", f"branch {gone!r} no longer exists in {self.remote}")
            state = await self.checks(cur)
            if state != "success" and not (state == "none" and not self.require_checks):
                return MergeResult("blocked", f"checks are {state} on {head_sha[:12]}"
                                   + (f": {rec.checks_detail}" if rec.checks_detail and state == "failure" else ""))
            if await self._is_ancestor(head_sha, base_sha):
                merge_sha = base_sha  # base already has it (merged by hand, or a lost record write)
            else:
                rc, out = await self._git("merge-tree", "--write-tree", "--name-only", "--no-messages",
                                          base_sha, head_sha, ok=(0, 1))
                lines = out.splitlines()
                if rc == 1:
                    files = [f for f in lines[1:] if f]
                    shown = ", ".join(files[:CONFLICT_FILES_SHOWN])
                    more = f" and {len(files) - CONFLICT_FILES_SHOWN} more" if len(files) > CONFLICT_FILES_SHOWN else ""
                    return MergeResult("conflict", f"{cur.head} does not merge cleanly into {cur.base} "
                                       f"({base_sha[:12]}): conflicts in {shown}{more}")
                tree = lines[0].strip()
                _, out = await self._git(
                    "commit-tree", tree, "-p", base_sha, "-p", head_sha,
                    "-m", f"Merge pull request #{cur.number} from {cur.head}\n\n{cur.title}",
                    env=MERGE_IDENTITY)
                merge_sha = out.strip()
                # Compare-and-swap on the base ref: moved meanwhile -> start over from the new base.
                try:
                    await self._git("update-ref", "-m", f"gigafactory: merge pull request #{cur.number}",
                                    f"refs/heads/{cur.base}", merge_sha, base_sha)
                except ForgeError:
                    if await self._branch_sha(cur.base) != base_sha:
                        continue  # lost the race to another merge or push
                    raise
            done = msgspec.structs.replace(rec, pr=msgspec.structs.replace(
                cur, state="merged", merge_sha=merge_sha, head_sha=head_sha, updated_at=time.time()))
            try:
                await (await self._pulls()).update(self._key(cur.head), msgspec.json.encode(done), last=rev)
            except Conflict:
                continue  # the record changed (checks, a concurrent merge): the ref is the truth; look again
            return MergeResult("merged", f"merged {cur.head} into {cur.base}", merge_sha)
        return MergeResult("conflict", f"{cur.base} kept moving while merging #{pr.number} "
                           f"({CAS_TRIES} tries): try again from the new base")

    # -- clean-up of superseded work (after the job ended for good) -----------------------------

    async def close_pull_request(self, pr: PullRequest) -> str:
        """Mark the record of ``pr`` closed (by compare-and-set); a merged or missing one is left
        as it is. Returns its state after."""
        for _ in range(CAS_TRIES):
            rec, rev = await self._read(pr.head)
            if rec is None or rec.pr.number != pr.number:
                return "closed"  # nothing of that number for the branch: nothing open to close
            if rec.pr.state != "open":
                return rec.pr.state
            done = msgspec.structs.replace(rec, pr=msgspec.structs.replace(rec.pr, state="closed",
                                                                             updated_at=time.time()))
            try:
                await (await self._pulls()).update(self._key(pr.head), msgspec.json.encode(done), last=rev)
                return "closed"
            except Conflict:
                continue
        raise ForgeError(f"local forge {self.remote}: #{pr.number} kept changing while it was being closed")

    async def branches(self, prefix: str) -> dict[str, str]:
        """Branches of the remote under ``prefix``: name -> head commit."""
        _, out = await self._git("for-each-ref", f"--count={BRANCHES_LISTED_MAX}",
                                 "--format=%(refname:lstrip=2) %(objectname)", "--", f"refs/heads/{prefix}")
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    async def delete_branch(self, branch: str, sha: str) -> bool:
        """Delete ``branch`` in the remote only if it is still at ``sha`` (``update-ref -d``
        with the old value: a compare-and-swap)."""
        await self._check_branch_name(branch, "branch")
        rc, _ = await self._git("update-ref", "-d", f"refs/heads/{branch}", sha, ok=(0, 1, 128))
        return rc == 0
