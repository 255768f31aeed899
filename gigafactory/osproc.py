"""Every operating-system-specific process and resource call of the project, in one module,
on psutil: liveness (with protection against a recycled pid), command lines, environments,
parents, process trees, process groups, CPU time and resident memory, and the Linux
parent-death signal. Nothing else in the package reads ``/proc``, calls ``killpg`` or
``getpgid``, or calls ``prctl`` (``tests/test_osproc.py`` checks); a caller that must choose
(start a supervisor or not) asks this module's constants (:data:`POSIX`,
:data:`HAS_PROCESS_GROUPS`).

What each operating system gets (the factory's documented support follows from it):

- Linux: everything. Process groups (an engine and all it starts are signalled as one), the
  kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``, :func:`parent_death_preexec`),
  zombies told from live processes.
- macOS (and the BSDs): everything but the parent-death signal, for which
  :func:`parent_death_preexec` returns None ("not on this OS") and callers use the pipe-EOF
  mechanisms instead (the engine supervisor's control pipe, :mod:`gigafactory.procs`'s
  watchdog). psutil reads the environment of the user's own processes only, as on Linux.
- Windows: no process groups to signal. :func:`new_group_popen_kwargs` starts a child in a new
  console process group; :func:`signal_group` turns SIGTERM into ``CTRL_BREAK_EVENT`` to that
  group and any other signal into terminating the *tree* rooted at the leader (psutil's
  children walk, then ``TerminateProcess``); :func:`group_alive` looks at that tree. A process
  whose parent exited before the walk is not found. :func:`process_group` raises
  :class:`NotOnThisOS`; :func:`parent_death_preexec` returns None.

Two small standard-library scripts keep their own platform branches because they run with
``python -I -S`` and cannot import this package (they must start fast and survive a job's
``PYTHONPATH``): the engine supervisor (``factory/supervise.py``: Linux ``prctl`` plus the
POSIX control pipe; not used on Windows) and :data:`gigafactory.procs.WATCHDOG_CODE` (POSIX).

A pid is only a name for "some process now": the kernel hands it out again once the process
is reaped. Where a pid is kept across time (a state file, a lock), keep its
:func:`create_time` with it and pass it back as ``created_at``: a process with the same pid
but another start time is a stranger, and is reported dead and never signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

LINUX = sys.platform.startswith("linux")
MACOS = sys.platform == "darwin"
WINDOWS = os.name == "nt"
POSIX = os.name == "posix"

HAS_PROCESS_GROUPS = POSIX
"""Whether the OS signals a process group as one (POSIX). Windows: the tree is walked instead."""

CREATE_TIME_TOLERANCE_S = 1.0
"""How far a process's start time may differ from the one recorded with its pid and still be
the same process. Start times are derived from the boot time, which a step of the wall clock
moves on Linux; a pid recycled within this window of the original start would be taken for
the original (it takes a full cycle of the pid space, so in practice it does not happen)."""

KILL_WAIT_S = 5.0
"""After SIGKILL, how long :func:`kill_tree` waits for the processes to be gone (a process in
the kernel's D state can take a while)."""

KILL_POLL_S = 0.02
"""How often :func:`kill_tree` looks whether the killed processes are gone."""

MAX_TREE_PROCESSES = 10_000
"""Bound on the processes :func:`descendants` returns (a fork bomb must not exhaust us)."""

PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""

SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)
"""SIGKILL where it exists; on Windows every stop is ``TerminateProcess`` anyway."""


class NotOnThisOS(OSError):
    """The call has no meaning on this operating system (the message says which, and what to use)."""


def _process(pid: int, created_at: float | None) -> psutil.Process | None:
    """The process ``pid`` if it exists and, when ``created_at`` is given, started then (one
    whose start time cannot be read is then not taken for ours)."""
    if pid <= 0:
        return None
    try:
        p = psutil.Process(pid)
    except (psutil.Error, OSError):
        return None
    if created_at is None:
        return p
    try:
        same = abs(p.create_time() - created_at) <= CREATE_TIME_TOLERANCE_S
    except (psutil.Error, OSError):
        same = False
    return p if same else None


def create_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, as psutil reports it), None if it
    is gone or unreadable. Record it next to a pid that is kept across time.

    :param pid: the process id.
    """
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def pid_alive(pid: int, *, created_at: float | None = None) -> bool:
    """True while process ``pid`` exists and is not a zombie (a zombie still holds its pid but
    is dead for every purpose here). Works the same on Linux, macOS and Windows.

    :param pid: the process id.
    :param created_at: the start time recorded with the pid (:func:`create_time`); if given, a
        process that now holds the pid but started at another time counts as dead.
    """
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if created_at is not None and abs(p.create_time() - created_at) > CREATE_TIME_TOLERANCE_S:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError, OverflowError):
        return False  # gone, or a number no process can have
    except psutil.AccessDenied:
        # Another user's process: it exists. Its start time could not be checked, so it only
        # counts when none was asked for.
        return created_at is None


def cmdline(pid: int) -> list[str] | None:
    """The command line of process ``pid``, None if it is gone, a zombie or not ours to read.

    :param pid: the process id.
    """
    try:
        return psutil.Process(pid).cmdline() or None
    except (psutil.Error, OSError):
        return None


def environ(pid: int) -> dict[str, str] | None:
    """The environment process ``pid`` started with, None if it is gone, a zombie or another
    user's (every OS restricts this to the user's own processes).

    :param pid: the process id.
    """
    try:
        env = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return None
    return env or None


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid``, None if it is gone.

    :param pid: the process id.
    """
    try:
        return psutil.Process(pid).ppid()
    except (psutil.Error, OSError):
        return None


def pids_with_env(name: str, value: str) -> list[int]:
    """Pids of the user's processes (not this one) whose environment has ``name=value``: how
    a lab finds everything it started, whoever re-parented it.

    :param name: the environment variable.
    :param value: its value to match exactly.
    """
    me, out = os.getpid(), []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(name) == value:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (its own, not its children's), None
    if it is gone.

    :param pid: the process id (``os.getpid()`` for this one).
    """
    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.Error, OSError):
        return None
    return t.user + t.system


def rss_bytes(pid: int) -> int | None:
    """Resident memory of process ``pid`` now, in bytes (Windows: the working set), None if it
    is gone.

    :param pid: the process id (``os.getpid()`` for this one).
    """
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):
        return None


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (children, grandchildren, ...), at most
    :data:`MAX_TREE_PROCESSES`. A process re-parented away (its parent exited; POSIX gives it
    to init) is no longer found here: where that matters, use the process group.

    :param pid: the root of the tree.
    """
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except (psutil.Error, OSError):
        return []
    return [k.pid for k in kids[:MAX_TREE_PROCESSES]]


def kill_tree(pid: int, *, created_at: float | None = None, include_root: bool = True,
              timeout_s: float = KILL_WAIT_S) -> list[int]:
    """Kill process ``pid`` and all its descendants (SIGKILL; Windows ``TerminateProcess``),
    then wait for them, bounded. The tree is taken before anything is killed, so children are
    found before their parent's death re-parents them. Returns the pids still alive after
    ``timeout_s`` (empty: all gone).

    :param pid: the root of the tree.
    :param created_at: the root's recorded start time; a recycled pid is left alone.
    :param include_root: False to kill only the descendants.
    :param timeout_s: how long to wait for them to be gone.
    """
    root = _process(pid, created_at)
    if root is None:
        return []
    try:
        procs = root.children(recursive=True)[:MAX_TREE_PROCESSES]
    except (psutil.Error, OSError):
        procs = []
    if include_root:
        procs.insert(0, root)
    for p in procs:
        try:
            p.kill()
        except (psutil.Error, OSError):
            continue
    # Not psutil.wait_procs: it reaps the caller's own children, stealing their exit status
    # from whoever started them (subprocess, asyncio's child watcher). A zombie counts as
    # gone; there is no event for "a stranger exited", so poll, bounded.
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return [p.pid for p in alive]
        time.sleep(KILL_POLL_S)


def _running(p: psutil.Process) -> bool:
    """Alive and still the same process (psutil compares start times), zombies dead."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def process_group(pid: int) -> int | None:
    """The process group of ``pid`` (POSIX), None if it is gone. Windows has no process
    groups: raises :class:`NotOnThisOS`.

    :param pid: the process id (0: this process).
    """
    if not HAS_PROCESS_GROUPS:
        raise NotOnThisOS("process groups do not exist on Windows: use descendants()/kill_tree()")
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def new_group_popen_kwargs() -> dict:
    """``subprocess.Popen`` keywords that start a child as the leader of its own group, so
    that it and everything it starts can be stopped as one (:func:`signal_group`): a new
    session on POSIX, ``CREATE_NEW_PROCESS_GROUP`` on Windows."""
    if HAS_PROCESS_GROUPS:
        return {"start_new_session": True}
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]


def signal_group(leader: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``leader`` (started with
    :func:`new_group_popen_kwargs`). A group already gone is not an error.

    Windows has no signals to send to a group: SIGTERM becomes ``CTRL_BREAK_EVENT`` to the
    leader's console process group (a polite stop a console program can handle), any other
    signal terminates the tree rooted at ``leader`` (``TerminateProcess``; a process whose
    parent already exited is not found).

    :param leader: the pid of the group's leader (its pgid on POSIX).
    :param sig: the signal (``signal.SIGTERM``, :data:`SIGKILL`, ...).
    """
    if not HAS_PROCESS_GROUPS:
        if sig == signal.SIGTERM:
            try:
                os.kill(leader, signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            except OSError:
                pass
        else:
            kill_tree(leader, timeout_s=0)
        return
    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` is alive (zombies awaiting their reaper are
    dead: an init that reaps lazily, as in some containers, must not make us wait out a
    grace period for processes that are already dead). Windows: the tree rooted at ``pgid``.

    :param pgid: the group (on Windows, the leader's pid).
    """
    if not HAS_PROCESS_GROUPS:
        return pid_alive(pgid) or any(pid_alive(c) for c in descendants(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def kill(pid: int, sig: int = SIGKILL, *, created_at: float | None = None) -> bool:
    """Send ``sig`` to process ``pid`` (Windows: terminate it, whatever ``sig``). False if it
    was gone, or (with ``created_at``) the pid now names another process, which is left alone.

    :param pid: the process id.
    :param sig: the signal.
    :param created_at: the recorded start time of the process meant.
    """
    p = _process(pid, created_at)
    if p is None:
        return False
    try:
        if WINDOWS:
            p.kill()
        else:
            p.send_signal(sig)  # psutil refuses if the pid was reused since ``p`` was made
        return True
    except (psutil.Error, OSError):
        return False


# -- parent-death signal (Linux only) -----------------------------------------------------------

_prctl: Callable[..., int] | None = None
_prctl_looked = False


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once in the starter (never in a forked child: loading a
    library there could take a lock another thread held at fork time)."""
    global _prctl, _prctl_looked
    if not _prctl_looked:
        _prctl_looked = True
        if LINUX:
            try:
                # The interpreter's own symbols include libc's (no find_library: it runs ldconfig).
                fn = ctypes.CDLL(None, use_errno=True).prctl
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
                _prctl = fn
            except (OSError, AttributeError):
                _prctl = None
    return _prctl


def parent_death_supported() -> bool:
    """True where the kernel signals a child when its starter dies (Linux with ``prctl``)."""
    return _load_prctl() is not None


def parent_death_preexec(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies (Linux's
    ``PR_SET_PDEATHSIG``), or None on an OS without it (macOS, the BSDs, Windows): the caller
    then ties the child another way (a watchdog holding a pipe whose only write end is ours).

    The kernel counts the *thread* that forked as the parent: fork from the main thread or
    from a thread that lives as long as the process (:func:`gigafactory.procs.popen_tied`
    does). The child re-checks ``getppid()`` after the call: a starter that died before it
    would never signal, so the child refuses to start.

    :param sig: the signal the child gets.
    """
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent_pid = os.getpid()

    def child() -> None:
        # Between fork and exec, in the child: only the prctl call and getppid, no imports.
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:
            raise ChildProcessError(f"the starting process {parent_pid} died before the child started")

    return child


__all__ = [
    "CREATE_TIME_TOLERANCE_S", "HAS_PROCESS_GROUPS", "LINUX", "MACOS", "NotOnThisOS", "POSIX", "SIGKILL", "WINDOWS",
    "cmdline", "cpu_seconds", "create_time", "descendants", "environ", "group_alive", "kill", "kill_tree",
    "new_group_popen_kwargs", "parent_death_preexec", "parent_death_supported", "parent_pid", "pid_alive",
    "pids_with_env", "process_group", "rss_bytes", "signal_group",
]
