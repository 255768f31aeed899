"""The engine sandbox: how an engine's process is confined (issue 12, "Engine sandbox").

``GIGAFACTORY_ENGINE_SANDBOX`` chooses the mode; :meth:`Sandbox.wrap` turns an engine's command
line into the confined one. The supervisor stays outside (it wraps the result), so it can still
signal the whole process group and the self-fencing deadline holds.

- ``none``: the engine runs as the factory's user with the factory's view of the machine. Only
  the environment is narrowed (:func:`~gigafactory.factory.engines.base.engine_environment`).
- ``bwrap`` (bubblewrap): the whole filesystem read-only, the job's working folder (its
  worktree) and that worktree's own git metadata writable, a private ``/tmp``, and the
  factory's data folder (logs, outbox, quarantine), ``GIGAFACTORY_HOME`` (identities,
  credentials) and the credentials file replaced by empty ones. The network is left alone:
  engines call model APIs. Protects the machine and the factory from a confused or hostile
  engine: no write outside the worktree (no ``~/.bashrc``, no other job's worktree, no change
  to the installation), no read of the factory's credentials or other jobs' logs. Does not
  protect against exfiltration over the network of what the engine may read (its own
  credentials, the rest of the read-only filesystem), nor against a kernel exploit.
- ``user``: the engine runs as a dedicated unprivileged user (``engine_sandbox_user``) through
  ``setpriv``. Needs: the factory running as root (or allowed to switch to that user), the user
  created (``useradd --system --no-create-home gf-engine``), and the workspace writable by it
  (a shared group and ``chmod g+rwX``, or ownership). Protects whatever the factory's user owns
  and the user cannot read (``chmod 700`` the factory's home and data folder); the engine can
  still write anywhere that user may (``/tmp``, world-writable folders) and read anything
  world-readable.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SANDBOX_MODES: tuple[str, ...] = ("none", "bwrap", "user")
"""The values of ``engine_sandbox``."""


class SandboxUnavailable(Exception):
    """The sandbox the factory is configured with cannot run here (message says what to do)."""


@dataclass(frozen=True)
class Sandbox:
    """A confinement for engines.

    :param mode: one of :data:`SANDBOX_MODES`.
    :param hidden: folders and files the engine must not see (the factory's data folder,
        ``GIGAFACTORY_HOME``, the credentials file): replaced by empty ones under ``bwrap``.
    :param program: the ``bwrap`` or ``setpriv`` executable (resolved path).
    :param user: ``uid:gid`` of the user (``user`` mode; the user's primary group).
    """

    mode: str
    hidden: tuple[str, ...] = ()
    program: str = ""
    user: str = ""
    shown: tuple[str, ...] = ()
    """Folders inside a hidden one the engine still reads (the git mirrors its worktree's
    objects live in): mounted read-only after the hidden ones."""
    bound: tuple[str, ...] = ()
    """Folders of the attempt the engine reaches read-write wherever they are (the folder of its
    fence socket, under the private ``/tmp``): mounted last. Set per attempt by :meth:`binding`."""

    def binding(self, *folders: str) -> "Sandbox":
        """This sandbox with ``folders`` reachable read-write too (one attempt's fence socket).

        :param folders: absolute paths of folders."""
        return dataclasses.replace(self, bound=(*self.bound, *folders))

    def wrap(self, argv: Sequence[str], *, cwd: str, readable: Iterable[str] = ()) -> list[str]:
        """The command line that runs ``argv`` confined.

        :param argv: the engine's command line.
        :param cwd: its working folder (writable under ``bwrap``).
        :param readable: files the engine must read even where they lie in a hidden folder
            (the shell engine's script, written next to the log).
        """
        if self.mode == "bwrap":
            return [self.program, *bwrap_args(cwd, self.hidden, readable, self.shown, self.bound), "--", *argv]
        if self.mode == "user":
            uid, _, gid = self.user.partition(":")
            return [self.program, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--inh-caps=-all",
                    "--", *argv]
        return list(argv)


def bwrap_args(cwd: str, hidden: Iterable[str], readable: Iterable[str] = (), shown: Iterable[str] = (),
               bound: Iterable[str] = ()) -> list[str]:
    """bubblewrap's arguments: the root read-only, fresh ``/dev``, ``/proc`` and ``/tmp``, the
    ``hidden`` paths empty, then ``cwd`` (and its git metadata) writable and ``readable``
    read-only (mounted after, so they show even inside a hidden or the private ``/tmp``).

    :param cwd: the working folder.
    :param hidden: paths the engine must not see.
    :param readable: files to show read-only.
    :param shown: folders inside hidden ones to show read-only (before ``cwd``).
    :param bound: folders to show read-write, last (the attempt's fence socket folder: a
        socket is connected to only where its folder is mounted into the sandbox).
    """
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            # Dies with the supervisor, whatever kills it: nothing outlives the run.
            "--die-with-parent"]
    for path in hidden:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
        elif os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    for path in shown:
        if os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in writable_paths(cwd):
        args += ["--bind", path, path]
    for path in readable:
        args += ["--ro-bind", path, path]
    for path in bound:
        if os.path.isdir(path):
            args += ["--bind", path, path]
    return args + ["--chdir", cwd]


def writable_paths(cwd: str) -> list[str]:
    """``cwd`` and, when it is a git worktree (``.git`` a file naming its git folder), that
    per-worktree git folder (its index and HEAD), so ``git status``/``git add`` work inside.
    The shared object store stays read-only: the factory commits the engine's changes.

    :param cwd: the working folder."""
    out = [cwd]
    dotgit = Path(cwd) / ".git"
    try:
        if dotgit.is_file():
            line = dotgit.read_text(encoding="utf-8", errors="replace").strip()
            if line.startswith("gitdir:"):
                gitdir = (Path(cwd) / line.partition(":")[2].strip()).resolve()
                if gitdir.is_dir():
                    out.append(str(gitdir))
    except OSError:
        pass
    return out


def make_sandbox(mode: str, *, hidden: Iterable[str], shown: Iterable[str] = (), user: str = "") -> Sandbox | None:
    """The factory's sandbox for ``mode`` (None for ``none``), its program found on ``PATH``.
    Raises :class:`SandboxUnavailable` saying what to install or set.

    :param mode: ``engine_sandbox``.
    :param hidden: what the engine must not see (absolute paths; missing ones are skipped).
    :param shown: folders inside hidden ones the engine reads (read-only).
    :param user: ``engine_sandbox_user`` (``user`` mode).
    """
    if mode == "none":
        return None
    if mode == "bwrap":
        program = shutil.which("bwrap")
        if program is None:
            raise SandboxUnavailable("GIGAFACTORY_ENGINE_SANDBOX=bwrap but bwrap is not on PATH: install "
                                     "bubblewrap (apt-get install bubblewrap) or set the sandbox to none")
        return Sandbox("bwrap", tuple(os.path.abspath(h) for h in hidden), program,
                       shown=tuple(os.path.abspath(p) for p in shown))
    if mode == "user":
        program = shutil.which("setpriv")
        if program is None:
            raise SandboxUnavailable("GIGAFACTORY_ENGINE_SANDBOX=user needs setpriv (util-linux) on PATH")
        if not user:
            raise SandboxUnavailable("GIGAFACTORY_ENGINE_SANDBOX=user needs GIGAFACTORY_ENGINE_SANDBOX_USER "
                                     "(a dedicated unprivileged user, e.g. gf-engine)")
        if os.geteuid() != 0:
            raise SandboxUnavailable("GIGAFACTORY_ENGINE_SANDBOX=user needs the factory to run as root, to "
                                     f"switch to {user!r}")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise SandboxUnavailable(f"GIGAFACTORY_ENGINE_SANDBOX_USER={user!r} is not a user here: create it "
                                     "(useradd --system --user-group --no-create-home gf-engine)") from None
        if pw.pw_uid == 0:
            raise SandboxUnavailable(f"GIGAFACTORY_ENGINE_SANDBOX_USER={user!r} is root: name an unprivileged user")
        return Sandbox("user", (), program, f"{pw.pw_uid}:{pw.pw_gid}")
    raise SandboxUnavailable(f"GIGAFACTORY_ENGINE_SANDBOX={mode!r}: use one of {', '.join(SANDBOX_MODES)}")


def factory_sandbox(mode: str, user: str, *, factory_dir: Path, home_dir: Path, creds_path: str = "") -> Sandbox | None:
    """The sandbox of a factory whose folder is ``factory_dir``: hides ``GIGAFACTORY_HOME``
    (identities, other factories' folders), this factory's folder (logs of every job, the
    outbox, quarantine) and the credentials file; shows its git mirrors again read-only.

    :param mode: ``engine_sandbox``.
    :param user: ``engine_sandbox_user``.
    :param factory_dir: the factory's data folder.
    :param home_dir: ``GIGAFACTORY_HOME``.
    :param creds_path: ``GIGAFACTORY_CREDS`` (a file), if set.
    """
    hidden = [str(home_dir), str(factory_dir), *([creds_path] if creds_path else [])]
    return make_sandbox(mode, hidden=hidden, shown=[str(factory_dir / "git")], user=user)
