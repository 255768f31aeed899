"""A factory's git workspace: one bare mirror per repository, one fresh worktree per attempt.

Layout, under the factory's own folder (``<data_dir>/<factory id>/git``)::

    mirrors/<key>.git     a bare clone per repository, ``key`` = a hash of the normalised URL;
                          the remote's branches under refs/remotes/origin/*, the attempts'
                          branches gf/<job>/e<epoch> under refs/heads/*
    mirrors/<key>.used    touched at every use: the age eviction goes by (least recently used)
    worktrees/<job>-e<epoch>   the attempt's working tree, on branch gf/<job>/e<epoch>

Lifecycle of one attempt: :meth:`Store.checkout` (fetch the mirror under its lock, add a worktree
from ``base``, or from a WIP checkpoint when the attempt resumes one), the engine runs in it
(while it runs, :func:`snapshot` and :func:`push_wip` take WIP checkpoints to ``gf/<job>/wip``
without touching its index or files: :mod:`checkpoint`), :func:`commit_all` and
:func:`diff_stats`, verify, the fenced :func:`push`, the result is reported,
:meth:`Store.release` (worktree and its local branch removed). :meth:`Store.clean_leftovers` at
factory start removes what a crashed run left.

Every git call is a real ``git`` subprocess with a timeout (:func:`git`); this module is the thin
I/O around it and is called off the event loop (``asyncio.to_thread``). Locks are per mirror and
per process (one factory process owns its folder): a fetch, a worktree add and an eviction of the
same mirror never overlap.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GIT_STDERR_MAX_CHARS = 2000
"""What a :class:`GitError` keeps of git's standard error (the tail)."""
COMMIT_SUBJECT_MAX_CHARS = 72
"""Longest commit subject taken from the job's prompt."""
LOCK_WAIT_CALLS = 6
"""A checkout waits for its mirror's lock at most this many ``git_timeout_s`` (the holder makes
at most this many bounded git calls under it)."""
CHANGED_PATHS_MAX = 10_000
"""Most changed paths read from one diff (the scope check's input); more is a failure."""

TRAILERS = ("Gigafactory-Job", "Gigafactory-Epoch", "Gigafactory-Attempt", "Gigafactory-Engine", "Gigafactory-Model")
"""The trailers of every commit the factory makes, in this order."""

_GIT_ENV = {
    # Never prompt: a missing credential fails the call instead of hanging it until its timeout.
    # The operator's global config is read (credential helpers, url rewrites, ssh commands are
    # how a fleet reaches its forge); hooks and signing are switched off per mirror and per commit.
    "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "LC_ALL": "C",
}


class GitError(Exception):
    """A git call failed or ran past its timeout. ``str()`` says which call and why."""

    def __init__(self, args: Sequence[str], detail: str) -> None:
        self.args_run = list(args)
        self.detail = detail
        super().__init__(f"git {' '.join(args[:3])}: {detail}")


def branch_name(job: str, epoch: int) -> str:
    """The attempt's branch: ``gf/<job>/e<epoch>`` (the epoch is the fencing token)."""
    return f"gf/{job}/e{epoch}"


def git(args: Sequence[str], *, cwd: Path | None = None, git_dir: Path | None = None, timeout_s: float,
        env: Mapping[str, str] | None = None, check: bool = True,
        input_text: str | None = None, checkout: "Checkout | None" = None) -> subprocess.CompletedProcess:
    """Run ``git <args>``; returns the completed process (text output). Raises :class:`GitError`
    when it exits non-zero (with ``check``) or runs past ``timeout_s`` (it is killed).

    :param args: the arguments after ``git``.
    :param cwd: where it runs.
    :param git_dir: ``--git-dir`` (for calls on a bare mirror).
    :param timeout_s: the bound of this one call, seconds.
    :param env: variables added to the environment (``GIT_AUTHOR_NAME`` ...).
    :param input_text: written to its standard input (else it reads nothing).
    :param checkout: a call in this worktree: its git links are restored first (:meth:`Checkout.restore_git_links`).
    """
    # No hooks and no fsmonitor, whatever a configuration says: the factory runs git on folders
    # an engine wrote to, and never wants either.
    argv = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
            *([f"--git-dir={git_dir}"] if git_dir else []), *args]
    if checkout is not None:
        checkout.restore_git_links()
    full_env = {**os.environ, **_GIT_ENV, **(env or {})}
    try:
        p = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout_s,
                           errors="replace", **({"input": input_text} if input_text is not None
                                                else {"stdin": subprocess.DEVNULL}))
    except subprocess.TimeoutExpired:
        raise GitError(args, f"ran past its {timeout_s:g}s timeout (git_timeout_s) and was killed") from None
    except OSError as e:
        raise GitError(args, f"could not start git ({e}); is git installed on this factory?") from None
    if check and p.returncode != 0:
        raise GitError(args, f"exit {p.returncode}: {p.stderr.strip()[-GIT_STDERR_MAX_CHARS:]}")
    return p


def normalise_url(repo: str, base_dir: Path) -> str:
    """The URL a mirror is keyed by: a local path made absolute (relative to ``base_dir``, the
    factory's workspace) and without a trailing ``/``; a URL without a trailing ``/`` or ``.git``
    difference (``https://h/a/b.git`` and ``https://h/a/b/`` are one repository); the scheme and
    host lower-cased.

    :param repo: the manifest's ``repo``.
    :param base_dir: the folder a relative path is under.
    """
    if "://" in repo:
        scheme, rest = repo.split("://", 1)
        host, _, path = rest.partition("/")
        url = f"{scheme.lower()}://{host.lower()}/{path}"
        if scheme.lower() == "file":
            return "file://" + str(Path("/" + path.lstrip("/")).resolve())
    elif re.match(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:", repo):
        url = repo  # scp-like: user@host:path
    else:
        p = Path(os.path.expandvars(os.path.expanduser(repo)))
        return str((p if p.is_absolute() else base_dir / p).resolve())
    url = url.rstrip("/")
    return url[:-4] if url.endswith(".git") else url


def mirror_key(url: str) -> str:
    """The mirror folder's name for a normalised URL: 20 hex digits of its SHA-256."""
    return hashlib.sha256(url.encode()).hexdigest()[:20]


@dataclass
class Checkout:
    """One attempt's worktree."""

    url: str
    """The normalised repository URL (what ``origin`` is in the mirror)."""
    key: str
    mirror: Path
    path: Path
    """The worktree's root."""
    branch: str
    base: str
    """The branch it started from."""
    base_commit: str
    """The commit ``base`` pointed to when the worktree was made: what diffs are taken against
    (on a resume: the base the checkpoint's work started from)."""
    start_commit: str = ""
    """The commit the worktree started from: ``base_commit``, or the checkpoint resumed from."""
    resumed_from: str | None = None
    """The checkpoint commit the worktree started from, if it resumed one."""
    resume_missed: str | None = None
    """Why a checkpoint asked for was not resumed (its commit is gone from the remote)."""
    carried: str | None = None
    """After ``rebase-needed``: the earlier work merged onto the new base (clean, or left
    conflicted for an agent), None when none was carried."""
    conflicts: list[str] = field(default_factory=list)
    """The paths an in-progress merge of :attr:`carried` left conflicted (empty: clean)."""
    git_dir: Path | None = None
    """The worktree's own git folder, read when it was made (before any engine ran)."""
    git_links: dict[str, str] = field(default_factory=dict)
    """The worktree's ``.git`` file and its git folder's ``commondir`` file as git wrote them
    (path -> text). An engine can rewrite both (the git folder is writable even under bwrap):
    pointed at a repository of the engine's own, the factory's later git calls, outside any
    sandbox, would commit there, push where its config says and run its ``core.sshCommand``.
    :meth:`restore_git_links` writes them back before each of the factory's git calls."""

    def restore_git_links(self) -> None:
        """Put the worktree's git links back as they were made (see :attr:`git_links`)."""
        for path, text in self.git_links.items():
            p = Path(path)
            try:
                if p.is_symlink() or not p.is_file() or p.read_text() != text:
                    p.unlink(missing_ok=True)
                    p.write_text(text)
            except OSError as e:
                raise GitError(["worktree"], f"cannot restore {p} ({e})") from None
    carry_detail: str = ""
    """What was carried onto the new base after ``rebase-needed``, in words (the record's
    :attr:`WorkspaceResult.carried`)."""


@dataclass(frozen=True)
class StartPoint:
    """Where a resumed attempt's worktree starts: a WIP checkpoint."""

    commit: str
    branch: str
    """The WIP branch it was pushed to (``gf/<job>/wip``), for messages."""
    base_commit: str | None = None


@dataclass
class Stats:
    """What an attempt changed: commits ``base_commit..head``."""

    head: str
    files_changed: int = 0
    lines_added: int = 0
    lines_deleted: int = 0
    paths: list[str] = field(default_factory=list)
    """Changed paths relative to the repository's root, POSIX (diffed without rename detection:
    a renamed file is a deletion and an addition, both paths listed, as the scope check wants)."""


class Store:
    """A factory's mirrors and worktrees (see the module's docstring).

    :param root: the folder it owns (created).
    :param timeout_s: the bound of each git call (setting ``git_timeout_s``).
    :param max_bytes: the disk the mirrors may use together before unused ones are evicted,
        least recently used first (setting ``git_mirrors_max_bytes``).
    :param base_dir: where a relative local ``repo`` path is (the factory's workspace).
    """

    def __init__(self, root: Path, *, timeout_s: float, max_bytes: int, base_dir: Path) -> None:
        self.root = Path(root).resolve()
        self.mirrors = self.root / "mirrors"
        self.worktrees = self.root / "worktrees"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        self.worktrees.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.base_dir = Path(base_dir).resolve()
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._in_use: dict[str, int] = {}
        """Worktrees (or checkouts being made) per mirror key: a mirror in use is never evicted."""
        self.evicted: list[str] = []
        """Keys of the mirrors evicted so far (for logs and tests)."""

    # -- locks and use counts ---------------------------------------------------------------

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _use(self, key: str, delta: int) -> None:
        with self._guard:
            n = self._in_use.get(key, 0) + delta
            assert n >= 0, (key, n)
            if n:
                self._in_use[key] = n
            else:
                self._in_use.pop(key, None)

    def in_use(self, key: str) -> bool:
        with self._guard:
            return key in self._in_use

    # -- an attempt's worktree ----------------------------------------------------------------

    def checkout(self, repo: str, base: str | None, job: str, epoch: int, *,
                 start: "StartPoint | None" = None) -> Checkout:
        """Fetch ``repo``'s mirror (cloning it the first time) and add a fresh worktree on
        ``gf/<job>/e<epoch>`` from ``base`` (default: the remote's HEAD), or from ``start`` (a
        WIP checkpoint) when it is given and its commit is found after the fetch; when it is not
        found, from ``base``, with :attr:`Checkout.resume_missed` saying why. Raises
        :class:`GitError` (the repository cannot be reached, ``base`` does not exist, ...).

        :param repo: the manifest's ``repo``.
        :param base: the manifest's ``base``, or None.
        :param job: the job id.
        :param epoch: the attempt's epoch.
        :param start: the checkpoint to resume from (its commit and the base commit its work
            started from), or None.
        """
        url = normalise_url(repo, self.base_dir)
        key = mirror_key(url)
        mirror = self.mirrors / f"{key}.git"
        branch = branch_name(job, epoch)
        path = self.worktrees / f"{job}-e{epoch}"
        self._use(key, +1)  # before the lock: an eviction waiting for it must not take it
        lock = self._lock(key)
        try:
            # Bounded: whoever holds it runs a few git calls, each bounded by timeout_s.
            if not lock.acquire(timeout=self.timeout_s * LOCK_WAIT_CALLS):
                raise GitError(["fetch"], f"the mirror of {url} stayed busy for {self.timeout_s * LOCK_WAIT_CALLS:g}s")
            try:
                self._ensure_mirror(mirror, url)
                (self.mirrors / f"{key}.used").touch()
                git(["fetch", "--prune", "--no-tags", "origin"], git_dir=mirror, timeout_s=self.timeout_s)
                if base is None:
                    base = self._remote_head(mirror)
                ref = f"refs/remotes/origin/{base}"
                got = git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], git_dir=mirror,
                          timeout_s=self.timeout_s, check=False)
                if got.returncode != 0:
                    raise GitError(["rev-parse", base], f"the repository {url} has no branch {base!r}")
                base_commit = got.stdout.strip()
                from_commit, resumed, missed = base_commit, None, None
                if start is not None:
                    if self._has_commit(mirror, start.commit):
                        from_commit, resumed = start.commit, start.commit
                        # Diffs stay against the base the work started from (base may have moved).
                        if start.base_commit and self._has_commit(mirror, start.base_commit):
                            base_commit = start.base_commit
                    else:
                        missed = (f"checkpoint {start.commit[:12]} is not on {url} (its {start.branch} was "
                                  f"deleted or rewritten): starting from {base} at {base_commit[:12]}")
                if path.exists():  # the same attempt again (cannot happen: epochs are unique)
                    self._remove_worktree(mirror, path, branch)
                git(["worktree", "add", "--force", "--no-track", "-B", branch, str(path), from_commit],
                    git_dir=mirror, timeout_s=self.timeout_s)
                # Read now, before any engine ran in it (see Checkout.git_links).
                git_dir = Path(git(["rev-parse", "--absolute-git-dir"], cwd=path,
                                   timeout_s=self.timeout_s).stdout.strip())
                links = {str(f): f.read_text() for f in (path / ".git", git_dir / "commondir") if f.is_file()}
            finally:
                lock.release()
        except BaseException:
            self._use(key, -1)
            raise
        return Checkout(url=url, key=key, mirror=mirror, path=path, branch=branch, base=base,
                        base_commit=base_commit, start_commit=from_commit, resumed_from=resumed,
                        resume_missed=missed, git_dir=git_dir, git_links=links)

    def _has_commit(self, mirror: Path, commit: str) -> bool:
        return git(["cat-file", "-e", f"{commit}^{{commit}}"], git_dir=mirror, timeout_s=self.timeout_s,
                   check=False).returncode == 0

    def release(self, co: Checkout) -> None:
        """Remove the attempt's worktree and its local branch (the pushed branch stays on the
        remote), then evict mirrors over the disk bound. Never raises for a worktree already gone;
        raises :class:`GitError` if the mirror stays locked past its bound."""
        lock = self._lock(co.key)
        try:
            if not lock.acquire(timeout=self.timeout_s * LOCK_WAIT_CALLS):
                raise GitError(["worktree", "remove"], f"the mirror of {co.url} stayed busy; {co.path} is left "
                                                       "for the clean-up at the next start")
            try:
                self._remove_worktree(co.mirror, co.path, co.branch)
            finally:
                lock.release()
        finally:
            self._use(co.key, -1)
        self.evict()

    def _ensure_mirror(self, mirror: Path, url: str) -> None:
        if (mirror / "HEAD").exists():
            return
        shutil.rmtree(mirror, ignore_errors=True)  # a clone interrupted before its HEAD existed
        tmp = mirror.with_name(mirror.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        git(["init", "--quiet", "--bare", str(tmp)], timeout_s=self.timeout_s)
        for args in (["remote", "add", "origin", url],
                     ["config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"],
                     ["config", "gc.auto", "0"], ["config", "core.hooksPath", os.devnull]):
            git(args, git_dir=tmp, timeout_s=self.timeout_s)
        tmp.rename(mirror)  # a mirror exists only once it is complete

    def _remote_head(self, mirror: Path) -> str:
        out = git(["ls-remote", "--symref", "origin", "HEAD"], git_dir=mirror, timeout_s=self.timeout_s).stdout
        m = re.search(r"^ref: refs/heads/(\S+)\s+HEAD$", out, re.M)
        if not m:
            raise GitError(["ls-remote", "HEAD"], "the remote names no default branch (HEAD); set 'base'")
        return m.group(1)

    def _remove_worktree(self, mirror: Path, path: Path, branch: str) -> None:
        git(["worktree", "remove", "--force", "--force", str(path)], git_dir=mirror, timeout_s=self.timeout_s,
            check=False)
        shutil.rmtree(path, ignore_errors=True)
        (path.parent / f".{path.name}.wip-index").unlink(missing_ok=True)  # its snapshots' index
        git(["worktree", "prune"], git_dir=mirror, timeout_s=self.timeout_s, check=False)
        git(["branch", "-D", branch], git_dir=mirror, timeout_s=self.timeout_s, check=False)

    # -- the disk bound -----------------------------------------------------------------------

    def mirror_sizes(self) -> dict[str, tuple[int, float]]:
        """Each mirror's key -> (bytes on disk, last use as a timestamp)."""
        out: dict[str, tuple[int, float]] = {}
        for m in self.mirrors.glob("*.git"):
            key = m.name[:-4]
            used = self.mirrors / f"{key}.used"
            at = used.stat().st_mtime if used.exists() else 0.0
            out[key] = (_du(m), at)
        return out

    def evict(self) -> list[str]:
        """Remove mirrors no worktree uses, least recently used first, until all of them fit
        ``max_bytes``; returns the keys removed. A mirror in use (or locked: being fetched) is
        skipped, so the store may stay over the bound while jobs use it."""
        sizes = self.mirror_sizes()
        total = sum(s for s, _ in sizes.values())
        removed: list[str] = []
        for key, (size, _) in sorted(sizes.items(), key=lambda kv: kv[1][1]):
            if total <= self.max_bytes:
                break
            lock = self._lock(key)
            if self.in_use(key) or not lock.acquire(blocking=False):
                continue
            try:
                if self.in_use(key):
                    continue
                shutil.rmtree(self.mirrors / f"{key}.git", ignore_errors=True)
                (self.mirrors / f"{key}.used").unlink(missing_ok=True)
            finally:
                lock.release()
            total -= size
            removed.append(key)
        self.evicted += removed
        return removed

    # -- after a crash ------------------------------------------------------------------------

    def clean_leftovers(self) -> list[str]:
        """At factory start (nothing of ours runs yet): remove every worktree left under this
        store, prune each mirror's worktree list and delete its local ``gf/*`` branches, remove
        clones interrupted halfway, and evict down to ``max_bytes``. Returns the worktree folders
        removed."""
        removed = []
        for p in sorted(self.worktrees.iterdir()):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
        for tmp in self.mirrors.glob("*.git.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        for mirror in self.mirrors.glob("*.git"):
            try:
                git(["worktree", "prune"], git_dir=mirror, timeout_s=self.timeout_s)
                refs = git(["for-each-ref", "--format=%(refname)", "refs/heads/gf/"], git_dir=mirror,
                           timeout_s=self.timeout_s).stdout.split()
                for ref in refs:
                    git(["update-ref", "-d", ref], git_dir=mirror, timeout_s=self.timeout_s)
            except GitError:
                shutil.rmtree(mirror, ignore_errors=True)  # unusable: cloned again when needed
        self.evict()  # the bound may have been lowered since the last run
        return removed


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


# -- after rebase-needed: the earlier work onto the new base -------------------------------------


CONFLICT_PATHS_MAX = 200
"""Conflicted paths a carry reports (the rest are counted, not named)."""


@dataclass
class Carry:
    """What :func:`carry` did: ``commit`` merged cleanly, or left conflicted (``conflicts``), or
    nothing carried (``commit`` None); ``tried`` says each candidate's fate, in words."""

    commit: str | None = None
    conflicts: list[str] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)


def carry(co: Checkout, candidates: Sequence[str], message: str, *, keep_conflict: bool, author: str, email: str,
          timeout_s: float) -> Carry:
    """Merge earlier work onto a worktree fresh from the NEW base (the attempt after
    ``rebase-needed``): the first of ``candidates`` that merges cleanly is committed as a merge
    (so its commits are in the history of what ships) and becomes :attr:`Checkout.start_commit`.
    When all conflict: with ``keep_conflict`` (an agent will resolve it) the first candidate's
    merge is left in progress, its conflicted paths in :attr:`Checkout.conflicts`; without it
    (a script redoes its work) the worktree stays at the new base. A candidate missing from the
    mirror is skipped. Raises :class:`GitError` for anything else.

    :param co: the attempt's fresh checkout (at the new base).
    :param candidates: commits to try, most complete first (the conflicting branch's head, then
        the last WIP checkpoint).
    :param message: the merge commit's message (:func:`commit_message`).
    :param keep_conflict: leave a conflicting merge for the engine.
    :param author: author and committer name.
    :param email: author and committer email.
    :param timeout_s: the bound of each git call.
    """
    ident = {"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": email,
             "GIT_COMMITTER_NAME": author, "GIT_COMMITTER_EMAIL": email}
    merge = ["-c", "commit.gpgsign=false", "merge", "--no-ff", "--no-verify", "--no-edit", "-m", message]
    out = Carry()
    present = [c for c in dict.fromkeys(candidates)
               if git(["cat-file", "-e", f"{c}^{{commit}}"], cwd=co.path, checkout=co, timeout_s=timeout_s,
                      check=False).returncode == 0]
    out.tried += [f"{c[:12]}: not in the mirror" for c in candidates if c not in present]
    for c in present:
        p = git([*merge, c], cwd=co.path, checkout=co, timeout_s=timeout_s, env=ident, check=False)
        if p.returncode == 0:
            co.start_commit = git(["rev-parse", "HEAD"], cwd=co.path, checkout=co, timeout_s=timeout_s).stdout.strip()
            co.carried, out.commit = c, c
            out.tried.append(f"{c[:12]}: merged cleanly")
            return out
        conflicted = _conflicted(co, timeout_s)
        git(["merge", "--abort"], cwd=co.path, checkout=co, timeout_s=timeout_s, check=False)
        out.tried.append(f"{c[:12]}: conflicts in {', '.join(conflicted[:10]) or 'the merge'}")
    if keep_conflict and present:
        git([*merge, present[0]], cwd=co.path, checkout=co, timeout_s=timeout_s, env=ident, check=False)
        out.conflicts = _conflicted(co, timeout_s)
        if out.conflicts:
            co.carried, co.conflicts, out.commit = present[0], out.conflicts, present[0]
        else:  # it failed for another reason than a conflict: the worktree stays at the base
            git(["merge", "--abort"], cwd=co.path, checkout=co, timeout_s=timeout_s, check=False)
    return out


def _conflicted(co: Checkout, timeout_s: float) -> list[str]:
    out = git(["diff", "--name-only", "-z", "--diff-filter=U"], cwd=co.path, checkout=co, timeout_s=timeout_s,
              check=False).stdout
    return [p for p in out.split("\0") if p][:CONFLICT_PATHS_MAX]


# -- after the engine: commit, diff, push -------------------------------------------------------


def commit_message(subject: str, trailers: Mapping[str, str]) -> str:
    """The commit message: ``subject``, a blank line, one ``Key: value`` trailer a line.

    :param subject: the first line (already cut to :data:`COMMIT_SUBJECT_MAX_CHARS`).
    :param trailers: the trailers, in order.
    """
    lines = [f"{k}: {' '.join(str(v).split())}" for k, v in trailers.items()]
    return f"{subject}\n\n" + "\n".join(lines) + "\n"


def subject_from(body: str, job: str) -> str:
    """A commit subject from the job: the prompt's first non-empty line (markdown heading marks
    and a code fence's opening skipped), cut to :data:`COMMIT_SUBJECT_MAX_CHARS`; else the job id.

    :param body: the job's body (its prompt, or its script).
    :param job: the job id.
    """
    for line in body.splitlines():
        text = line.strip().lstrip("#").strip()
        if not text or text.startswith("```"):
            continue
        text = " ".join(text.split())
        if len(text) > COMMIT_SUBJECT_MAX_CHARS:
            text = text[: COMMIT_SUBJECT_MAX_CHARS - 3].rstrip() + "..."
        return text
    return f"gigafactory job {job}"


def commit_all(co: Checkout, message: str, *, author: str, email: str, timeout_s: float) -> str | None:
    """Commit everything changed in the worktree (``git add -A``: ``.gitignore`` is respected);
    returns the new commit, or None when nothing changed (the engine may have committed itself:
    the branch's head is what counts, see :func:`diff_stats`).

    :param co: the attempt's checkout.
    :param message: the commit message (:func:`commit_message`).
    :param author: author and committer name.
    :param email: author and committer email.
    :param timeout_s: the bound of each git call.
    """
    ident = {"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": email,
             "GIT_COMMITTER_NAME": author, "GIT_COMMITTER_EMAIL": email}
    git(["add", "-A"], cwd=co.path, checkout=co, timeout_s=timeout_s)
    if git(["diff", "--cached", "--quiet"], cwd=co.path, checkout=co, timeout_s=timeout_s, check=False).returncode == 0:
        return None
    msg = co.path.parent / f".{co.path.name}.msg"
    msg.write_text(message, encoding="utf-8")
    try:
        git(["-c", "commit.gpgsign=false", "commit", "--quiet", "--no-verify", "-F", str(msg)], cwd=co.path, checkout=co,
            timeout_s=timeout_s, env=ident)
    finally:
        msg.unlink(missing_ok=True)
    return git(["rev-parse", "HEAD"], cwd=co.path, checkout=co, timeout_s=timeout_s).stdout.strip()


def diff_stats(co: Checkout, *, timeout_s: float, head: str | None = None) -> Stats:
    """What the branch changed since ``base_commit``: files, lines added and deleted (a binary
    file counts as changed with no lines), and the changed paths. Raises :class:`GitError`
    past :data:`CHANGED_PATHS_MAX` paths.

    :param co: the attempt's checkout.
    :param timeout_s: the bound of each git call.
    :param head: the commit to describe (default: the worktree's ``HEAD``; a checkpoint's).
    """
    if head is None:
        head = git(["rev-parse", "HEAD"], cwd=co.path, checkout=co, timeout_s=timeout_s).stdout.strip()
    out = git(["diff", "--numstat", "-z", "--no-renames", co.base_commit, head], cwd=co.path, checkout=co,
              timeout_s=timeout_s).stdout
    st = Stats(head=head)
    for rec in out.split("\0"):
        if not rec:
            continue
        added, deleted, path = rec.split("\t", 2)
        st.files_changed += 1
        st.lines_added += int(added) if added.isdigit() else 0
        st.lines_deleted += int(deleted) if deleted.isdigit() else 0
        if len(st.paths) >= CHANGED_PATHS_MAX:
            raise GitError(["diff", "--numstat"], f"more than {CHANGED_PATHS_MAX:,} changed paths (CHANGED_PATHS_MAX)")
        st.paths.append(path)
    return st


def push(co: Checkout, *, timeout_s: float) -> None:
    """Push the worktree's ``HEAD`` (what the diff stats describe, even if the engine switched
    branches) to ``origin`` as the attempt's branch, never forced (the branch is the epoch's
    own: no one else writes it). Raises :class:`GitError`.

    :param co: the attempt's checkout.
    :param timeout_s: the bound of the push (the factory passes what is left of the lease).
    """
    git(["push", "--quiet", "--porcelain", "origin", f"HEAD:refs/heads/{co.branch}"],
        cwd=co.path, checkout=co, timeout_s=timeout_s)



# -- while the engine runs: WIP checkpoints ------------------------------------------------------


def wip_branch(job: str) -> str:
    """The job's work-in-progress branch, ``gf/<job>/wip`` (one per job, across its epochs)."""
    return f"gf/{job}/wip"


def snapshot(co: Checkout, parent: str, last_tree: str | None, message: str, *, author: str, email: str,
             timeout_s: float) -> tuple[str, str] | None:
    """A commit of the worktree's files as they are now, made WITHOUT touching the engine's
    index, ``HEAD`` or files: ``git add -A`` into a separate, temporary index
    (``GIT_INDEX_FILE``), ``write-tree``, ``commit-tree``. Returns (commit, tree), or None when
    the tree equals ``last_tree`` (nothing changed since the last checkpoint).

    The commit's first parent is ``parent`` (the previous checkpoint, or the worktree's start);
    when the engine committed on its own branch meanwhile (``HEAD`` is not in ``parent``'s
    history), ``HEAD`` is a second parent, so its commits are in the checkpoint's history too.

    :param co: the attempt's checkout.
    :param parent: the previous checkpoint of this attempt, or :attr:`Checkout.start_commit`.
    :param last_tree: the tree of the previous checkpoint (or of the start), or None.
    :param message: the commit message (:func:`commit_message`, with ``Gigafactory-Checkpoint``).
    :param author: author and committer name.
    :param email: author and committer email.
    :param timeout_s: the bound of each git call.
    """
    ident = {"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": email,
             "GIT_COMMITTER_NAME": author, "GIT_COMMITTER_EMAIL": email}
    index = wip_index(co)
    env = {"GIT_INDEX_FILE": str(index)}
    try:
        if not index.exists():
            # Seeded from HEAD's tree, so the snapshot has what the final commit (`add -A` on the
            # engine's own index) would have: tracked files kept even if ignored, ignored ones
            # left out. Kept for the attempt's next checkpoints: its stat data spares `add -A`
            # rehashing every unchanged file at every interval.
            git(["read-tree", "HEAD"], cwd=co.path, checkout=co, timeout_s=timeout_s, env=env)
        git(["add", "-A"], cwd=co.path, checkout=co, timeout_s=timeout_s, env=env)
        tree = git(["write-tree"], cwd=co.path, checkout=co, timeout_s=timeout_s, env=env).stdout.strip()
    except GitError:
        index.unlink(missing_ok=True)  # rebuilt from HEAD next time, whatever state it was left in
        raise
    finally:
        index.with_name(index.name + ".lock").unlink(missing_ok=True)
    if tree == last_tree:
        return None
    parents = ["-p", parent]
    head = git(["rev-parse", "HEAD"], cwd=co.path, checkout=co, timeout_s=timeout_s).stdout.strip()
    if head != parent and git(["merge-base", "--is-ancestor", head, parent], cwd=co.path, checkout=co, timeout_s=timeout_s,
                              check=False).returncode != 0:
        parents += ["-p", head]
    commit = git(["-c", "commit.gpgsign=false", "commit-tree", tree, *parents, "-F", "-"], cwd=co.path, checkout=co,
                 timeout_s=timeout_s, env=ident, input_text=message).stdout.strip()
    return commit, tree


def wip_index(co: Checkout) -> Path:
    """The attempt's own index for its snapshots (next to its worktree, never inside it; removed
    with the worktree)."""
    return co.path.parent / f".{co.path.name}.wip-index"


def tree_of(co: Checkout, commit: str, *, timeout_s: float) -> str:
    """The tree id of ``commit``."""
    return git(["rev-parse", f"{commit}^{{tree}}"], cwd=co.path, checkout=co, timeout_s=timeout_s).stdout.strip()


class WipRaced(GitError):
    """The WIP branch on the remote was not what this holder expected (someone else pushed to
    it since); :attr:`actual` is what it is now (None: it does not exist)."""

    def __init__(self, args: Sequence[str], detail: str, actual: str | None) -> None:
        super().__init__(args, detail)
        self.actual = actual


def push_wip(co: Checkout, commit: str, branch: str, expected: str | None, *, timeout_s: float) -> None:
    """Push ``commit`` to ``branch`` on ``origin`` only if the branch is still at ``expected``
    (None: it must not exist): ``--force-with-lease``, a compare-and-set on the remote ref. A
    resumed attempt's checkpoints descend from the last one, so the push is a fast-forward;
    the lease is what keeps a late push of a stale holder from overwriting a newer epoch's
    checkpoint. Raises :class:`WipRaced` when the branch moved, :class:`GitError` otherwise.

    :param co: the attempt's checkout.
    :param commit: the checkpoint commit.
    :param branch: ``gf/<job>/wip``.
    :param expected: the commit the branch must be at, or None.
    :param timeout_s: the bound of the push.
    """
    ref = f"refs/heads/{branch}"
    args = ["push", "--quiet", "--porcelain", f"--force-with-lease={ref}:{expected or ''}", "origin",
            f"{commit}:{ref}"]
    p = git(args, cwd=co.path, checkout=co, timeout_s=timeout_s, check=False)
    if p.returncode == 0:
        return
    if "stale info" in p.stdout + p.stderr or "rejected" in p.stdout + p.stderr:
        out = git(["ls-remote", "origin", ref], cwd=co.path, checkout=co, timeout_s=timeout_s).stdout.split()
        actual = out[0] if out else None
        if actual != expected:
            raise WipRaced(args, f"{branch} is at {actual or 'nothing'}, not {expected or 'nothing'}", actual)
    raise GitError(args, f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-GIT_STDERR_MAX_CHARS:]}")
