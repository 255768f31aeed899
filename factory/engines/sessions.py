"""Agent CLI sessions kept past their attempt, so a later attempt on this factory resumes them.

Codex, Gemini and Copilot run with a private per-attempt ``HOME`` (:func:`.agentcli.attempt_home`)
that is removed when the run ends, and each keeps its session transcript inside it. Before the
home goes, the engine copies the transcript of the session its output named into the factory's
session store, ``<factory dir>/cli-sessions/<engine>/``; a later attempt of the job on this
factory (a retry, a requeue, a reclaim after a hand-back) whose checkpoint recorded that session
id copies it back into its own fresh home and starts the CLI with its resume flag.

Bounded: a transcript over :data:`SESSION_MAX_BYTES` is not kept (the prompt's resume note is
all the next attempt gets), and the store keeps the :data:`SESSIONS_KEPT_MAX` newest sessions
per engine. A session id is only ever used as a file-name part after :data:`SESSION_ID_RE`
accepted it (never a path).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
"""What a session id must look like to be kept or looked up (the CLIs' are UUIDs)."""
SESSION_MAX_BYTES = 64 * 1024 * 1024
"""A session's files larger than this together are not kept."""
SESSIONS_KEPT_MAX = 200
"""Sessions kept per engine on one factory; the oldest go first."""


def store_dir(log_path: str, engine: str) -> Path:
    """The engine's session store on this factory (next to ``logs/`` and ``cli-homes/``).

    :param log_path: the attempt's log path (``<factory dir>/logs/...``).
    :param engine: the engine's name.
    """
    return Path(log_path).resolve().parent.parent / "cli-sessions" / engine


def keep(files: list[Path], root: Path, store: Path, session: str | None) -> bool:
    """Copy a session's ``files`` (paths under ``root``, the CLI's own folder in the attempt's
    home) into ``store/<session>/``, keeping their paths relative to ``root``; then trim the
    store to :data:`SESSIONS_KEPT_MAX`. True when kept. Never raises for the disk: a session
    not kept costs the resume, not the run.

    :param files: the session's files (empty: nothing to keep).
    :param root: the folder their relative paths start from.
    :param store: :func:`store_dir`.
    :param session: the session id the CLI's output named.
    """
    if not session or not SESSION_ID_RE.fullmatch(session) or not files:
        return False
    try:
        if sum(f.stat().st_size for f in files) > SESSION_MAX_BYTES:
            return False
        dest = store / session
        shutil.rmtree(dest, ignore_errors=True)
        for f in files:
            target = dest / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        _trim(store)
        return True
    except (OSError, ValueError):
        return False


def restore(store: Path, session: str | None, root: Path) -> bool:
    """Copy kept session ``session`` back under ``root`` (the CLI's folder in the new attempt's
    home), at the paths it had; True when there was one to restore.

    :param store: :func:`store_dir`.
    :param session: the session id recorded with the checkpoint.
    :param root: where the CLI looks for its sessions in the new home.
    """
    if not session or not SESSION_ID_RE.fullmatch(session):
        return False
    src = store / session
    if not src.is_dir():
        return False
    try:
        shutil.copytree(src, root, dirs_exist_ok=True)
        (store / session).touch()  # recently used: trimmed last
        return True
    except OSError:
        return False


def _trim(store: Path) -> None:
    kept = sorted((p for p in store.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[SESSIONS_KEPT_MAX:]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["SESSION_ID_RE", "SESSIONS_KEPT_MAX", "SESSION_MAX_BYTES", "keep", "restore", "store_dir"]
