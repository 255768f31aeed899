"""Process helpers shared by the CLI, the factory, the labs and the tests.

No orphans of our own: every long-lived child this project starts (the embedded
``nats-server``, the chaos and load labs' processes) goes through :func:`popen_tied`, so that
it dies with the process that started it, however that process dies (SIGKILL included).

Theory of operation:

- Linux: the child asks the kernel for a parent-death signal (``prctl(PR_SET_PDEATHSIG)``)
  between fork and exec, then re-checks ``getppid()``: a starter that died before the call
  would otherwise never signal, so the child refuses to start. The kernel counts the *thread*
  that forked as the parent: a child forked from a worker thread (``asyncio.to_thread``, a
  pool) would be signalled when that thread exits, with its starter alive. So a child is
  forked only from the main thread or from one daemon thread kept for the process's life
  (:func:`_on_spawner_thread`), never from a thread that may end.
- Elsewhere (macOS, the BSDs), or where ``prctl`` is unavailable: a watchdog process
  (:data:`WATCHDOG_CODE`, standard library only) holds the read end of a pipe whose only write
  end is the starter's; the kernel closes it when the starter exits however it exits, the
  watchdog reads EOF, signals the child, waits ``grace_s`` and SIGKILLs it. The watchdog exits
  as soon as the child is gone; it polls for that every :data:`WATCHDOG_POLL_S`, so in that
  window a recycled pid is the one (narrow) way it could signal a stranger. A SIGKILLed
  watchdog protects nothing: the fallback is best effort, the Linux path is the guarantee.
- Windows: neither exists; children are not tied (documented limit).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""
WATCHDOG_POLL_S = 0.2
"""How often the fallback watchdog checks that its child is still there."""
WATCHDOG_GRACE_S = 5.0
"""After the death signal, how long the watchdog waits before SIGKILL (when the signal is not SIGKILL)."""


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a zombie still answers
    ``kill(pid, 0)``, but it is dead for every purpose here). Off POSIX: assume alive."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): kill(0) said it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False  # gone between the two looks
    except (OSError, IndexError):
        return True


def cmdline(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (Linux ``/proc``; ``ps`` elsewhere), None if it is
    gone or cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except OSError:
        return None
    try:  # no /proc (macOS): ask ps, bounded
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() or None


# -- parent-death signalling ------------------------------------------------------------------

_prctl: Callable[..., int] | None = None
_prctl_looked = False


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once in the starter (never in a forked child: loading a
    library there could take a lock another thread held at fork time)."""
    global _prctl, _prctl_looked
    if not _prctl_looked:
        _prctl_looked = True
        if sys.platform.startswith("linux"):
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


def _pdeathsig_preexec(parent_pid: int, sig: int, prctl: Callable[..., int]) -> Callable[[], None]:
    def child() -> None:
        # Between fork and exec, in the child: only the prctl call and getppid, no imports.
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:
            # The starter died between fork and prctl: no signal will ever come. Do not start.
            raise ChildProcessError(f"the starting process {parent_pid} died before the child started")

    return child


_spawn_queue: queue.SimpleQueue | None = None
_spawn_lock = threading.Lock()


def _spawner_loop(q: queue.SimpleQueue) -> None:
    while True:
        fn, fut = q.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 -- handed to the caller, who raises it
                fut.set_exception(e)


def _on_spawner_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main thread (when called there) or on the one spawner thread, which
    lives as long as the process: a child forked there gets its parent-death signal only when
    the process dies, never when some worker thread ends."""
    global _spawn_queue
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _spawn_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(target=_spawner_loop, args=(_spawn_queue,), name="gigafactory-spawner",
                             daemon=True).start()
        q = _spawn_queue
    fut: concurrent.futures.Future = concurrent.futures.Future()
    q.put((fn, fut))
    return fut.result()


WATCHDOG_CODE = r"""
import os, select, signal, sys, time
fd, child, sig, grace, poll = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while alive(child):
    r, _, _ = select.select([fd], [], [], poll)
    if r and not os.read(fd, 64):  # EOF: the starter is gone, however it died
        try:
            os.kill(child, sig)
            end = time.monotonic() + grace
            while alive(child) and time.monotonic() < end:
                time.sleep(0.05)
            if alive(child):
                os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break
"""
"""The fallback watchdog (``python -I -S -c WATCHDOG_CODE fd child sig grace poll``): standard
library only, so it starts fast and a job's ``PYTHONPATH`` cannot break it."""

_watchdog_pipes: dict[int, tuple[subprocess.Popen, int]] = {}
"""child pid -> (its watchdog, the write end the starter holds). Closed once the watchdog ended."""


def _reap_watchdogs() -> None:
    for pid, (wd, w) in list(_watchdog_pipes.items()):
        if wd.poll() is not None:
            os.close(w)
            del _watchdog_pipes[pid]


def start_watchdog(child_pid: int, sig: int = signal.SIGKILL, grace_s: float = WATCHDOG_GRACE_S) -> subprocess.Popen:
    """Start the fallback watchdog for ``child_pid`` (see the module docstring)."""
    _reap_watchdogs()
    r, w = os.pipe()  # both non-inheritable; the watchdog gets r through pass_fds only
    try:
        wd = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", WATCHDOG_CODE, str(r), str(child_pid), str(int(sig)),
             repr(grace_s), repr(WATCHDOG_POLL_S)],
            pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # the operator's Ctrl-C is for the starter, which stops the child itself
        )
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    _watchdog_pipes[child_pid] = (wd, w)
    return wd


def popen_tied(args: list[str], *, death_signal: int = signal.SIGKILL, mechanism: str = "auto",
               **popen_kw: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **popen_kw)`` for a child that must die with this process.

    ``death_signal`` is what the child gets when this process dies (SIGKILL by default: it
    also ends a stopped child, and cannot be caught). ``mechanism``: ``auto`` (the kernel's
    parent-death signal where supported, else the watchdog), ``pdeathsig`` or ``watchdog``
    (to test either). A ``preexec_fn`` of the caller's is refused: there is one."""
    assert "preexec_fn" not in popen_kw, "popen_tied sets preexec_fn itself"
    assert mechanism in ("auto", "pdeathsig", "watchdog"), mechanism
    prctl = _load_prctl() if mechanism in ("auto", "pdeathsig") else None
    if mechanism == "pdeathsig" and prctl is None:
        raise OSError("PR_SET_PDEATHSIG is not available on this platform")
    if prctl is not None:
        preexec = _pdeathsig_preexec(os.getpid(), death_signal, prctl)
        return _on_spawner_thread(lambda: subprocess.Popen(args, preexec_fn=preexec, **popen_kw))
    p = subprocess.Popen(args, **popen_kw)
    if os.name == "posix":
        try:
            start_watchdog(p.pid, death_signal)
        except BaseException:
            p.kill()
            p.wait()
            raise
    return p
