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

The parent-death signal itself (the ``prctl`` call) is in :mod:`gigafactory.osproc`, with
every other OS-specific call; this module decides which mechanism ties a child.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

# The OS-specific calls live in osproc; pid_alive, cmdline and parent_death_supported are
# re-exported here for the callers that knew them from this module.
from gigafactory.osproc import POSIX, cmdline, parent_death_preexec, parent_death_supported, pid_alive  # noqa: F401

WATCHDOG_POLL_S = 0.2
"""How often the fallback watchdog checks that its child is still there."""
WATCHDOG_GRACE_S = 5.0
"""After the death signal, how long the watchdog waits before SIGKILL (when the signal is not SIGKILL)."""


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
    preexec = parent_death_preexec(death_signal) if mechanism in ("auto", "pdeathsig") else None
    if mechanism == "pdeathsig" and preexec is None:
        raise OSError("PR_SET_PDEATHSIG is not available on this platform")
    if preexec is not None:
        return _on_spawner_thread(lambda: subprocess.Popen(args, preexec_fn=preexec, **popen_kw))
    p = subprocess.Popen(args, **popen_kw)
    if POSIX:  # the watchdog needs pass_fds and signals: POSIX only (Windows: not tied)
        try:
            start_watchdog(p.pid, death_signal)
        except BaseException:
            p.kill()
            p.wait()
            raise
    return p


__all__ = ["WATCHDOG_CODE", "cmdline", "parent_death_supported", "pid_alive", "popen_tied", "start_watchdog"]
