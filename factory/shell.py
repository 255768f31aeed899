"""Running an engine's process: a script (the ``shell`` engine), a command (the verify gate)
or a program's argv (an engine that is a CLI of its own), bounded, in its own process group,
with its output appended to a log file and streamed to a callback. The engines themselves are
in :mod:`engines`; this module is what every one of them runs through.

Theory of operation:

- The child runs as the leader of a new session (``start_new_session=True``), so its process
  group contains everything it starts (``sleep 1000 &``, a dev server, an agent's tool calls)
  unless something deliberately escapes with ``setsid``.
- stdout and stderr share one pipe that this module owns (not asyncio's ``PIPE``): in Python
  3.11 ``Process.wait()`` only returns once every pipe is closed, and a background grandchild
  holding stdout would make it wait forever.
- On timeout or cancel the whole group gets SIGTERM, then SIGKILL after ``kill_grace_s``.
  When the leader exits on its own, whatever it left running in its group is stopped the same
  way: a finished job leaves nothing behind on the factory.
- Every wait is bounded. If the caller cancels the coroutine, the group is SIGKILLed at once.
  The leader is always reaped (asyncio's child watcher), so no zombie is left. Grandchildren
  are reparented to init, which reaps them; a zombie is dead, so the group counts as stopped
  once only zombies remain.
- Supervised (the default on POSIX): the session leader is not the shell but a small
  supervisor process (:mod:`supervise`) that starts the shell as its child, in its group, and
  exits with its status. It stops the whole group when this process dies by any signal
  (SIGKILL included: it holds the read end of a control pipe whose only write end is ours;
  on Linux also ``PR_SET_PDEATHSIG``), and when a :class:`FenceDeadline` passes without an
  extension (self-fencing that does not depend on this process's event loop). Everything
  above holds unchanged: the group is the supervisor's, and so is the exit status.
- Platforms (every process call goes through :mod:`gigafactory.osproc`): Linux, parent-death
  signal and control pipe; macOS and other POSIX systems, the control pipe (EOF when the
  factory dies, any signal); Windows, no supervisor: the engine runs in a new console process
  group and is stopped by the factory while the factory lives
  (``CTRL_BREAK_EVENT``, the grace, then the process tree terminated), and the fence deadline
  is enforced by the factory's event loop only. An engine outlives a factory that dies on
  Windows (a Job Object with kill-on-close would be the equivalent; not built).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from gigafactory import osproc

from .supervise import fence_clock

if TYPE_CHECKING:
    from .redact import Redactor
    from .sandbox import Sandbox

log = logging.getLogger(__name__)

_POSIX = osproc.POSIX

# SIGKILL cannot be ignored, but a process stuck in the kernel (D state) can outlive it for
# a while; we stop waiting after this and report what we know.
_KILL_WAIT_S = 5.0
# Once the group is gone, its last output is already in the pipe; only a process that
# escaped the group (setsid, a daemon) can keep the pipe open longer than this.
_DRAIN_TIMEOUT_S = 1.0
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.05
_READ_CHUNK_BYTES = 65536
_SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervise.py")
"""Run by path with ``python -I -S``: standard library only, so it starts fast and the job's
``PYTHONPATH`` cannot break it."""


class FenceDeadline:
    """A self-fencing deadline on :func:`fence_clock` (``CLOCK_BOOTTIME`` on Linux, else
    ``time.monotonic()``: one clock for every process of the machine, that never goes back).

    The holder of a lease makes one per run, and extends it (:meth:`extend`) after each successful
    renewal. Every supervised process running under it gets each extension through its
    control pipe; when the deadline passes, the process group is stopped (SIGTERM,
    ``grace_s``, SIGKILL) by the supervisor and, if its event loop still runs, by the factory.

    :param at_s: the deadline, in :func:`fence_clock` seconds.
    :param grace_s: SIGTERM to SIGKILL when the deadline stops a group.
    """

    def __init__(self, at_s: float, grace_s: float) -> None:
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be zero or positive, got {grace_s!r}")
        self.at_s = at_s
        self.grace_s = grace_s
        self._pipes: set[int] = set()

    def passed(self, now_s: float | None = None) -> bool:
        """Whether the deadline has passed (at ``now_s``, default now)."""
        return (fence_clock() if now_s is None else now_s) >= self.at_s

    def extend(self, at_s: float) -> None:
        """Move the deadline to ``at_s`` (never back) and tell every supervisor running under it."""
        if at_s <= self.at_s:
            return
        self.at_s = at_s
        for fd in list(self._pipes):
            self._send(fd)

    def _attach(self, fd: int) -> None:
        self._pipes.add(fd)
        self._send(fd)  # a deadline extended between the spawn and now

    def _detach(self, fd: int) -> None:
        self._pipes.discard(fd)

    def _send(self, fd: int) -> None:
        try:
            os.write(fd, f"d {self.at_s!r}\n".encode())
        except BlockingIOError:
            # 64 KiB of unread lines: the supervisor is not reading (paused with its group).
            # A later extension is sent again; an older one lost is harmless (the latest wins).
            pass
        except OSError:  # the supervisor is gone
            self._pipes.discard(fd)


@dataclass(frozen=True)
class ProcessResult:
    """How a script or command ended."""

    exit_code: int | None
    """The exit status, or None when a signal ended the process (see ``signal``)."""
    timed_out: bool
    """``timeout_s`` elapsed and the process group was stopped."""
    cancelled: bool
    """The ``cancel`` event was set and the process group was stopped."""
    signal: int | None
    """The signal that ended the process, if one did."""
    duration_s: float
    """From start to the exit of the process (including the kill grace, if it was stopped)."""
    fenced: bool = False
    """The :class:`FenceDeadline` passed and the process group was stopped (or was never
    started, the deadline having passed already)."""

    @property
    def ok(self) -> bool:
        """Exited 0 on its own."""
        return self.exit_code == 0 and not self.timed_out and not self.cancelled and not self.fenced


class WorkdirNotFoundError(FileNotFoundError):
    """The working directory of a job does not exist on this factory."""


class ShellNotFoundError(FileNotFoundError):
    """Neither bash nor sh is on the search path."""


OutputCallback = Callable[[bytes], None]


async def run_script(
    script: str,
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    log_path: str,
    on_output: OutputCallback | None = None,
    cancel: asyncio.Event | None = None,
    kill_grace_s: float = 5.0,
    header: str | None = None,
    fence: FenceDeadline | None = None,
    supervised: bool = True,
    redactor: "Redactor | None" = None,
    sandbox: "Sandbox | None" = None,
) -> ProcessResult:
    """Run ``script`` with ``bash <file>`` (``sh`` if there is no bash) and wait for it, bounded.

    :param script: the script text; written to a temporary file next to ``log_path``, removed
        afterwards.
    :param cwd: working directory; :class:`WorkdirNotFoundError` if it does not exist.
    :param env: the complete environment of the child (the caller merges it).
    :param timeout_s: wall-clock limit; then the process group is stopped and ``timed_out`` set.
    :param log_path: stdout and stderr are appended here (the file is opened in append mode, so
        a later ``run_command`` for verify follows the engine's output).
    :param on_output: called with each chunk of output, in order, on the event loop. If it
        raises, the error is logged and it is not called again; the log file still gets all.
    :param cancel: when set, the process group is stopped and ``cancelled`` set.
    :param kill_grace_s: time between SIGTERM and SIGKILL to the process group.
    :param header: written to the log before the output (a newline is added if missing).
    :param fence: a self-fencing deadline: when it passes, the group is stopped with the
        fence's grace and ``fenced`` set; a deadline already passed starts nothing.
    :param supervised: run under the supervisor (POSIX only; ignored elsewhere), so the group
        dies with this process and the fence holds even if this event loop stalls. False only
        for ``unsafe_unfenced_engines``.
    :param redactor: replaces secrets in the output before it reaches the log or
        ``on_output`` (:mod:`~gigafactory.factory.redact`); None: the output as it is.
    :param sandbox: confines the process (:mod:`~gigafactory.factory.sandbox`); None: none.
    """
    _check_cwd(cwd)
    shell = _find_shell(env)
    log_dir = os.path.dirname(os.path.abspath(log_path))
    os.makedirs(log_dir, exist_ok=True)
    fd, script_path = tempfile.mkstemp(prefix=".gf-script-", suffix=".sh", dir=log_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(script.encode("utf-8"))
        if sandbox is not None and sandbox.mode == "user":
            os.chmod(script_path, 0o644)  # the engine's user reads it (the job's text: no secret)
        return await _run(
            _confine(sandbox, [shell, script_path], cwd, readable=(script_path,)),
            cwd=cwd,
            env=env,
            timeout_s=timeout_s,
            log_path=log_path,
            on_output=on_output,
            cancel=cancel,
            kill_grace_s=kill_grace_s,
            header=header,
            fence=fence,
            supervised=supervised,
            redactor=redactor,
        )
    finally:
        try:
            os.unlink(script_path)
        except FileNotFoundError:
            pass


async def run_command(
    command: str,
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    log_path: str,
    on_output: OutputCallback | None = None,
    cancel: asyncio.Event | None = None,
    kill_grace_s: float = 5.0,
    header: str | None = None,
    fence: FenceDeadline | None = None,
    supervised: bool = True,
    redactor: "Redactor | None" = None,
    sandbox: "Sandbox | None" = None,
) -> ProcessResult:
    """Run ``bash -c command`` (``sh -c`` if there is no bash): the verify gate.

    Parameters as for :func:`run_script`.
    """
    _check_cwd(cwd)
    shell = _find_shell(env)
    log_dir = os.path.dirname(os.path.abspath(log_path))
    os.makedirs(log_dir, exist_ok=True)
    return await _run(
        _confine(sandbox, [shell, "-c", command], cwd),
        cwd=cwd,
        env=env,
        timeout_s=timeout_s,
        log_path=log_path,
        on_output=on_output,
        cancel=cancel,
        kill_grace_s=kill_grace_s,
        header=header,
        fence=fence,
        supervised=supervised,
        redactor=redactor,
    )


async def run_argv(
    argv: list[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    log_path: str,
    on_output: OutputCallback | None = None,
    cancel: asyncio.Event | None = None,
    kill_grace_s: float = 5.0,
    header: str | None = None,
    fence: FenceDeadline | None = None,
    supervised: bool = True,
    redactor: "Redactor | None" = None,
    sandbox: "Sandbox | None" = None,
) -> ProcessResult:
    """Run ``argv`` as it is (no shell): an engine that is a program of its own (an agent CLI).

    :param argv: the program and its arguments; ``argv[0]``, when it is not a path, is looked
        up on ``env``'s ``PATH`` here (a program that is not found raises
        :class:`FileNotFoundError` naming it, before anything is started: under the supervisor
        it would otherwise show only as exit code 127).

    Other parameters as for :func:`run_script`.
    """
    assert argv, "run_argv needs a program to run"
    _check_cwd(cwd)
    program = argv[0]
    if os.path.dirname(program) == "":
        found = shutil.which(program, path=env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"{program} is not on the engine's PATH", program)
        argv = [found, *argv[1:]]
    log_dir = os.path.dirname(os.path.abspath(log_path))
    os.makedirs(log_dir, exist_ok=True)
    return await _run(
        _confine(sandbox, list(argv), cwd),
        cwd=cwd,
        env=env,
        timeout_s=timeout_s,
        log_path=log_path,
        on_output=on_output,
        cancel=cancel,
        kill_grace_s=kill_grace_s,
        header=header,
        fence=fence,
        supervised=supervised,
        redactor=redactor,
    )


def _confine(sandbox: "Sandbox | None", argv: list[str], cwd: str, readable: tuple[str, ...] = ()) -> list[str]:
    """``argv`` wrapped by ``sandbox`` (None: as it is). The supervisor wraps the result, so it
    stays outside the sandbox and can still signal the whole process group."""
    return argv if sandbox is None else sandbox.wrap(argv, cwd=cwd, readable=readable)


def _check_cwd(cwd: str) -> None:
    if not os.path.isdir(cwd):
        raise WorkdirNotFoundError(
            errno.ENOENT,
            "the job's working directory does not exist on this factory "
            "(check the manifest's cwd and that the repository is checked out here)",
            cwd,
        )


def _find_shell(env: Mapping[str, str]) -> str:
    # The job's own PATH first, so a job can pin its shell; then the factory's.
    for search in (env.get("PATH"), os.environ.get("PATH", os.defpath)):
        if not search:
            continue
        for name in ("bash", "sh"):
            found = shutil.which(name, path=search)
            if found:
                return found
    raise ShellNotFoundError(errno.ENOENT, "neither bash nor sh is on PATH; install one to run shell jobs", "bash")


class _Sink:
    """Appends output to the log and forwards it to the callback; never raises into asyncio."""

    def __init__(self, log_file: BinaryIO, on_output: OutputCallback | None,
                 redactor: "Redactor | None" = None) -> None:
        self._log = log_file
        self._on_output = on_output
        self._log_failed = False
        # Secrets are replaced before a byte reaches the log file or the live subject; the
        # stream keeps back a bounded tail so that a secret split across writes is caught.
        self._redact = redactor.stream() if redactor is not None else None

    def __enter__(self) -> "_Sink":
        return self

    def __exit__(self, *exc) -> None:
        """Emit what the redactor kept back, then close the log."""
        try:
            self.flush()
        finally:
            self._log.close()

    def note(self, text: str) -> None:
        """A line of our own in the log (not passed to on_output: it is not the job's output)."""
        self.flush()  # the job's output so far comes first
        self._write(f"[gigafactory] {text}\n".encode())

    def log_only(self, data: bytes) -> None:
        self._write(data)

    def flush(self) -> None:
        """Emit the tail the redactor kept back (at a note and when the run ends)."""
        if self._redact is not None:
            rest = self._redact.flush()
            if rest:
                self._emit(rest)

    def __call__(self, chunk: bytes) -> None:
        if self._redact is not None:
            chunk = self._redact.feed(chunk)
            if not chunk:
                return
        self._emit(chunk)

    def _emit(self, chunk: bytes) -> None:
        self._write(chunk)
        if self._on_output is not None:
            try:
                self._on_output(chunk)
            except Exception:  # noqa: BLE001 - a broken observer must not stop the job
                log.exception("on_output callback failed; not calling it again for this run")
                self._on_output = None

    def _write(self, data: bytes) -> None:
        if self._log_failed:
            return
        try:
            self._log.write(data)
            self._log.flush()
        except (OSError, ValueError):  # ValueError: written after the run closed the log
            # Disk full or similar: keep the job and on_output going rather than SIGPIPE it.
            log.exception("cannot write to the job log; further output goes to on_output only")
            self._log_failed = True


class _PipeProtocol(asyncio.Protocol):
    def __init__(self, sink: _Sink, closed: asyncio.Future) -> None:
        self._sink = sink
        self._closed = closed

    def data_received(self, data: bytes) -> None:
        self._sink(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class _PipeReader:
    """Reads the child's output pipe until EOF; can be closed early."""

    def __init__(self, closed: asyncio.Future, transport: asyncio.BaseTransport | None) -> None:
        self._closed = closed
        self._transport = transport

    @classmethod
    async def start(cls, loop: asyncio.AbstractEventLoop, read_fd: int, sink: _Sink) -> _PipeReader:
        closed = loop.create_future()
        # From here on the reader owns read_fd.
        if _POSIX:
            pipe = os.fdopen(read_fd, "rb", buffering=0)
            try:
                transport, _ = await loop.connect_read_pipe(lambda: _PipeProtocol(sink, closed), pipe)
            except BaseException:
                pipe.close()
                raise
            return cls(closed, transport)
        # The Windows proactor cannot read an anonymous pipe asynchronously: use a thread.
        threading.Thread(target=_read_in_thread, args=(loop, read_fd, sink, closed), daemon=True).start()
        return cls(closed, None)

    async def wait_closed(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout=timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _read_in_thread(loop: asyncio.AbstractEventLoop, fd: int, sink: _Sink, closed: asyncio.Future) -> None:
    def finish() -> None:
        if not closed.done():
            closed.set_result(None)

    try:
        while chunk := os.read(fd, _READ_CHUNK_BYTES):
            loop.call_soon_threadsafe(sink, chunk)
    except (OSError, RuntimeError):  # RuntimeError: the loop is closed
        pass
    finally:
        os.close(fd)
        try:
            loop.call_soon_threadsafe(finish)
        except RuntimeError:  # the loop is closed
            pass


async def _run(
    argv: list[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    log_path: str,
    on_output: OutputCallback | None,
    cancel: asyncio.Event | None,
    kill_grace_s: float,
    header: str | None,
    fence: FenceDeadline | None = None,
    supervised: bool = True,
    redactor: "Redactor | None" = None,
) -> ProcessResult:
    """Run ``argv`` in its own process group until it exits, times out, is cancelled or
    fenced; then stop whatever is left of its group (the theory of operation, above).

    :param argv: the program and its arguments.
    :param cwd: its working folder.
    :param env: its whole environment.
    :param timeout_s: stop it after this many seconds.
    :param log_path: its output is appended here.
    :param on_output: called with each chunk of output, if given.
    :param cancel: stop it when this is set.
    :param kill_grace_s: seconds between SIGTERM and SIGKILL.
    :param header: a line written to the log (only) before it starts.
    :param fence: the lease's self-fencing deadline: stop it when that passes.
    :param supervised: run it under :mod:`supervise` (POSIX only).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not kill_grace_s >= 0:
        raise ValueError(f"kill_grace_s must be zero or positive, got {kill_grace_s!r}")
    supervised = supervised and _POSIX
    loop = asyncio.get_running_loop()
    with _Sink(open(log_path, "ab"), on_output, redactor) as sink:  # noqa: SIM115 (closed by the sink)
        if header:
            sink.log_only(header.encode("utf-8") + (b"" if header.endswith("\n") else b"\n"))
        refused = _refuse_to_start(sink, cancel, fence)
        if refused is not None:
            return refused
        started = time.monotonic()
        child = await _Child.spawn(argv, cwd=cwd, env=env, kill_grace_s=kill_grace_s, fence=fence,
                                   supervised=supervised)
        ended: list[float] = []
        exit_task = asyncio.ensure_future(child.proc.wait())
        exit_task.add_done_callback(lambda _: ended.append(time.monotonic()))
        reader: _PipeReader | None = None
        try:
            reader = await _PipeReader.start(loop, child.read_fd, sink)
            why = await _wait_then_stop(child, exit_task, reader, sink, cancel=cancel, timeout_s=timeout_s,
                                        kill_grace_s=kill_grace_s, fence=fence)
        except BaseException:
            # Cancelled by our caller (or a bug): nothing may outlive the job, and there is no
            # time for a grace period.
            await _kill_and_reap(child.proc, exit_task)
            raise
        finally:
            if reader is not None:
                reader.close()
            child.close_control(fence)

        rc = child.proc.returncode
        return ProcessResult(
            exit_code=rc if rc is not None and rc >= 0 else None,
            timed_out=why == "timeout",
            cancelled=why == "cancelled",
            signal=-rc if rc is not None and rc < 0 else None,
            duration_s=(ended[0] if ended else time.monotonic()) - started,
            fenced=why == "fenced",
        )


def _refuse_to_start(sink: _Sink, cancel: asyncio.Event | None, fence: FenceDeadline | None) -> ProcessResult | None:
    """The result of a run that must not start (cancelled, or its fence passed already), else None.

    :param sink: the run's log.
    :param cancel: the run's cancel event.
    :param fence: the run's self-fencing deadline.
    """
    if cancel is not None and cancel.is_set():
        sink.note("cancelled before start")
        return ProcessResult(exit_code=None, timed_out=False, cancelled=True, signal=None, duration_s=0.0)
    if fence is not None and fence.passed():
        sink.note("the lease deadline has passed (self-fenced): not starting")
        return ProcessResult(exit_code=None, timed_out=False, cancelled=False, signal=None, duration_s=0.0,
                             fenced=True)
    return None


@dataclass
class _Child:
    """A started run: the process (the supervisor, when supervised), the read end of its output
    pipe, and (supervised) our ends of the control and status pipes (-1 otherwise)."""

    proc: asyncio.subprocess.Process
    read_fd: int
    supervised: bool
    ctl_w: int = -1
    st_r: int = -1

    @classmethod
    async def spawn(cls, argv: list[str], *, cwd: str, env: Mapping[str, str], kill_grace_s: float,
                    fence: FenceDeadline | None, supervised: bool) -> _Child:
        """Start ``argv`` (under the supervisor when ``supervised``) writing to a new pipe.

        :param argv: the program and its arguments.
        :param cwd: its working folder.
        :param env: its whole environment.
        :param kill_grace_s: the supervisor's grace between SIGTERM and SIGKILL.
        :param fence: the self-fencing deadline the supervisor enforces.
        :param supervised: start the supervisor, with its control and status pipes.
        """
        read_fd, write_fd = os.pipe()
        ctl_r = ctl_w = st_r = st_w = -1
        if supervised:
            # Only we hold the write end (os.pipe is non-inheritable): when this process dies,
            # however it dies, the kernel closes it and the supervisor reads EOF.
            ctl_r, ctl_w = os.pipe()
            os.set_blocking(ctl_w, False)
            st_r, st_w = os.pipe()  # the supervisor says "fenced" here; the engine cannot
            os.set_blocking(st_r, False)
            grace_s = min(kill_grace_s, fence.grace_s) if fence is not None else kill_grace_s
            argv = [sys.executable, "-I", "-S", _SUPERVISOR, "--control-fd", str(ctl_r), "--status-fd", str(st_w),
                    "--grace-s", repr(grace_s), *(["--deadline", repr(fence.at_s)] if fence is not None else []),
                    "--", *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                cwd=cwd,
                env=dict(env),
                pass_fds=(ctl_r, st_w) if supervised else (),
                **osproc.new_group_popen_kwargs(),
            )
        except BaseException:
            os.close(read_fd)
            if supervised:
                os.close(ctl_w)
                os.close(st_r)
            raise
        finally:
            # The child has its copy; ours must go, or the pipe never reaches EOF.
            os.close(write_fd)
            if supervised:
                os.close(ctl_r)
                os.close(st_w)
        if supervised and fence is not None:
            fence._attach(ctl_w)
        return cls(proc, read_fd, supervised, ctl_w, st_r)

    def close_control(self, fence: FenceDeadline | None) -> None:
        """Close our ends of the control and status pipes (supervised runs), once the run ended.

        :param fence: the deadline the control pipe was attached to, if any.
        """
        if self.supervised:
            if fence is not None:
                fence._detach(self.ctl_w)
            os.close(self.ctl_w)
            os.close(self.st_r)


async def _wait_then_stop(child: _Child, exit_task: asyncio.Future, reader: _PipeReader, sink: _Sink, *,
                          cancel: asyncio.Event | None, timeout_s: float, kill_grace_s: float,
                          fence: FenceDeadline | None) -> str:
    """Wait for the run to exit or be stopped, then stop what is left of its group and drain its
    output; ``exited``, ``timeout``, ``cancelled`` or ``fenced``.

    :param child: the run.
    :param exit_task: the leader's exit.
    :param reader: the output pipe's reader.
    :param sink: the run's log.
    :param cancel: the run's cancel event.
    :param timeout_s: the run's time limit.
    :param kill_grace_s: seconds between SIGTERM and SIGKILL.
    :param fence: the run's self-fencing deadline.
    """
    why = await _wait_exit_or_stop(exit_task, cancel, timeout_s, fence)
    grace_s = kill_grace_s
    if why == "exited" and child.supervised and _said_fenced(child.st_r):
        # The supervisor fenced it while this event loop was not looking (stalled, or
        # this process stopped); a renewal since may have moved the deadline again.
        why = "fenced"
    if why == "timeout":
        sink.note(f"timed out after {timeout_s:g} s: stopping the process group")
    elif why == "cancelled":
        sink.note("cancelled: stopping the process group")
    elif why == "fenced":
        assert fence is not None
        # SIGKILL due at deadline + grace, however late this loop noticed (a stall).
        grace_s = max(0.0, min(kill_grace_s, fence.at_s + fence.grace_s - fence_clock()))
        sink.note("the lease deadline passed without a renewal (self-fenced): stopping the process group")
    elif _POSIX and osproc.group_alive(child.proc.pid):
        sink.note("the job exited but left processes running in its group: stopping them")
    if not await _stop_group(child.proc, exit_task, grace_s):
        sink.note(f"process group {child.proc.pid} still has live processes after SIGKILL")
    if not await reader.wait_closed(_DRAIN_TIMEOUT_S):
        sink.note("output pipe still open after the process group ended (a process escaped the group)")
    return why


async def _kill_and_reap(proc: asyncio.subprocess.Process, exit_task: asyncio.Future) -> None:
    """SIGKILL the group at once and reap the leader, bounded: if the caller's loop closed
    first, the exit would never be delivered and asyncio would complain about a running
    subprocess.

    :param proc: the leader.
    :param exit_task: its exit.
    """
    _kill_now(proc)
    try:
        await asyncio.wait({exit_task}, timeout=_KILL_WAIT_S)
    except BaseException:  # cancelled again: the first error is the one to raise
        pass


def _said_fenced(status_fd: int) -> bool:
    """Whether the supervisor wrote ``fenced`` on its status pipe (it exited: all is there)."""
    try:
        return b"fenced" in os.read(status_fd, 4096)
    except (BlockingIOError, OSError):
        return False


async def _wait_exit_or_stop(exit_task: asyncio.Future, cancel: asyncio.Event | None, timeout_s: float,
                             fence: FenceDeadline | None = None) -> str:
    """``exited``, ``cancelled``, ``fenced`` or ``timeout``: whichever comes first."""
    cancel_task = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    fence_task = asyncio.ensure_future(_deadline_passed(fence)) if fence is not None else None
    waiters = {exit_task} | {t for t in (cancel_task, fence_task) if t is not None}
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (cancel_task, fence_task):
            if t is not None:
                t.cancel()
    if exit_task in done:
        return "exited"
    if cancel_task is not None and cancel_task in done:
        return "cancelled"
    if fence_task is not None and fence_task in done:
        return "fenced"
    return "timeout"


async def _deadline_passed(fence: FenceDeadline) -> None:
    """Return once ``fence`` has passed; follows extensions (each wake re-reads the deadline)."""
    while not fence.passed():
        await asyncio.sleep(max(fence.at_s - fence_clock(), _POLL_MIN_S))


async def _stop_group(proc: asyncio.subprocess.Process, exit_task: asyncio.Future, grace_s: float) -> bool:
    """Stop the leader and everything left in its group: SIGTERM, grace, SIGKILL (Windows:
    CTRL_BREAK to the group, grace, the tree terminated; see :mod:`gigafactory.osproc`).

    Also called after a normal exit, to stop what the job left running in the background.
    Returns False if live processes remain after SIGKILL and the bounded wait.
    """
    pgid = proc.pid

    def stopped() -> bool:
        return exit_task.done() and not osproc.group_alive(pgid)

    if stopped():
        return True
    osproc.signal_group(pgid, signal.SIGTERM)
    if await _poll_until(stopped, grace_s):
        return True
    osproc.signal_group(pgid, osproc.SIGKILL)
    return await _poll_until(stopped, _KILL_WAIT_S)


def _kill_now(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the whole group at once (Windows: terminate the tree), no grace."""
    osproc.signal_group(proc.pid, osproc.SIGKILL)
    if not osproc.HAS_PROCESS_GROUPS:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def _poll_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    # There is no event for "a process group is empty", so we poll, with a short backoff.
    deadline = time.monotonic() + timeout_s
    delay_s = _POLL_MIN_S
    while True:
        if predicate():
            return True
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return False
        await asyncio.sleep(min(delay_s, remaining_s))
        delay_s = min(delay_s * 2, _POLL_MAX_S)
