"""The engine supervisor: a tiny process between the factory and an engine, so that an
engine never outlives its factory, nor its lease.

Run as ``python -I -S supervise.py --control-fd N [--status-fd M] [--deadline T] [--grace-s G] -- argv...``
by :mod:`shell` (standard library only, no package imports: it starts in a few tens of
milliseconds and cannot be broken by the job's ``PYTHONPATH``).

Theory of operation:

- The factory starts the supervisor as the leader of a new session; the supervisor starts the
  engine as its child, in that same process group, with the output pipe the factory owns. To
  the factory the supervisor *is* the engine: the group it signals (timeout, cancel, leftovers)
  is the supervisor's, and the supervisor exits with the engine's status (re-raising the
  engine's fatal signal on itself, so "killed by SIGTERM" still reads as such).
- The factory dies, by any signal, SIGKILL included: the supervisor learns it in two
  independent ways and then stops the whole group (SIGTERM, ``--grace-s``, SIGKILL):
  1. the control pipe: the factory holds the only write end (non-inheritable), so the kernel
     closes it when the factory exits however it exits, and the supervisor reads EOF. This
     works on every POSIX system (Linux, macOS, the BSDs).
  2. Linux only: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, re-checked with ``getppid()`` right
     after it is set (a parent that died before the call would otherwise never signal). It
     covers a write end leaked to another process (a library that forks without exec).
     A SIGTERM counts as parent death only when ``getppid()`` changed: the factory itself
     SIGTERMs the whole group to stop a job, and then the supervisor only waits for the engine.
- Self-fencing: the factory writes ``d <seconds>\\n`` lines (on :func:`fence_clock`) to the
  control pipe after each successful lease renewal; the latest is the deadline. When it
  passes without an extension, the supervisor stops the group itself. The clock is one clock
  for the whole machine, so the factory's deadline means the same here; and since the
  supervisor does not depend on the factory's event loop, a stalled loop or a factory stopped
  alone (SIGSTOP of the factory process only) cannot keep the engine alive. The SIGKILL is due
  at deadline + grace: a supervisor paused with its group past the deadline has that much
  less grace left when it resumes, none if it resumes after that.
- What it cannot do: a supervisor paused together with its engine (SIGSTOP of the whole
  group, a frozen VM) runs nothing; it acts when it resumes, at once, because its deadline
  has passed. Windows has no supervisor (see :mod:`shell`).
- Platforms: this script and :data:`gigafactory.procs.WATCHDOG_CODE` are the only places
  outside :mod:`gigafactory.osproc` with operating-system branches, because they run with
  ``python -I -S`` and cannot import the package (nor psutil). Linux: both ways of learning
  the factory died, and :func:`group_others_alive` tells live group members from zombies.
  macOS and the BSDs: the control pipe only (:func:`set_parent_death_signal` returns False:
  not on this OS), and without ``/proc`` the supervisor cannot see whether the group emptied
  early, so a stop always waits out the grace before its SIGKILL.
- The status pipe (``--status-fd``, write end, not passed on to the engine): before stopping
  the group for a passed deadline the supervisor writes ``fenced``, so the factory can tell
  a self-fence from an engine that died of a signal, even if its event loop only looks later
  (after a stall, by which time a renewal may have moved the deadline again).
"""

from __future__ import annotations

# Only C modules beyond os and sys: ``signal``, ``selectors`` and ``ctypes`` would cost more
# start-up time (their Python code pulls in enum, collections, struct) than everything else,
# and a factory starting a hundred engines at once pays it a hundred times.
import _signal as signal
import errno
import os
import select
import sys
import time

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def fence_clock() -> float:
    """The clock of self-fencing deadlines, in seconds, the same in every process of the
    machine: ``CLOCK_BOOTTIME`` on Linux (monotonic, and it keeps counting while the machine is
    suspended, as the broker's clock does), else ``time.monotonic()``."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""
KILL_WAIT_S = 5.0
"""After SIGKILL to the group, how long the supervisor waits for it to be gone (a process in
the kernel's D state can take a while) before it exits anyway."""
LATE_S = 0.25
"""Acting this late on a deadline means we did not run (paused): said so in the job log."""
POLL_S = 0.02
"""How often the group is checked while waiting for it to stop (no event says "group empty")."""
CONTROL_LINE_MAX_BYTES = 4096
"""A control line longer than this is a protocol error: the supervisor stops the group."""
EXIT_USAGE = 125
"""Exit status when the supervisor itself could not start the engine (bad arguments, exec
failure); 126/127 are the engine's own (not executable, not found), as in a shell."""


def _log(msg: str) -> None:
    # stderr is the job's output pipe: the note lands in the job log, where an operator looks.
    try:
        os.write(2, f"[gigafactory supervisor {os.getpid()}] {msg}\n".encode())
    except OSError:
        pass


def set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel to send ``sig`` when our parent dies. False elsewhere or on error."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import _ctypes

        # The interpreter's own symbols include libc's prctl (no find_library: it runs ldconfig).
        prctl = _ctypes.dlsym(_ctypes.dlopen(None), "prctl")
        return _ctypes.call_function(prctl, (PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0
    except (ImportError, OSError, AttributeError, TypeError):
        try:
            import ctypes

            return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
        except (ImportError, OSError, AttributeError):
            return False


def group_others_alive(pgid: int, me: int) -> bool:
    """True while a process of group ``pgid`` other than ``me`` is alive (zombies are dead).
    Without ``/proc`` (macOS): True while the group exists at all (we are in it), so the
    caller waits out the grace, then SIGKILLs."""
    if not os.path.isdir("/proc/self"):
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class Supervisor:
    """One engine under watch. See the module docstring."""

    def __init__(self, argv: list[str], control_fd: int, deadline: float | None, grace_s: float,
                 status_fd: int | None = None) -> None:
        self.argv = argv
        self.control_fd = control_fd
        self.status_fd = status_fd
        self.deadline = deadline
        self.grace_s = grace_s
        self.ppid = os.getppid()
        if os.getpgid(0) != os.getpid():
            # Never signal a group we do not lead (it would be our parent's): lead our own.
            os.setsid()
        self.pgid = os.getpgid(0)
        assert self.pgid == os.getpid()
        self.engine: int | None = None
        """The engine's pid while it is not reaped."""
        self.engine_rc: int | None = None
        self._buf = b""

    def run(self) -> int:
        """Start the engine and watch it; returns the exit status (or re-raises its signal)."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # wake the loop; the loop decides
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.ppid:
            # The factory died before prctl took effect: no signal will ever come.
            return self._stop("the factory died before the engine started")
        os.set_blocking(self.control_fd, False)
        # The engine gets neither the control pipe nor the status pipe (our own pipes are
        # non-inheritable already). A signal we catch is reset to its default by exec, one we
        # ignore is not: Python ignores SIGPIPE and SIGXFSZ, so reset them as subprocess does
        # (``restore_signals``), or ``yes | head`` in a job would never end.
        private = [fd for fd in (self.control_fd, self.status_fd) if fd is not None]
        restore = [getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, n)]
        try:
            self.engine = os.posix_spawnp(self.argv[0], self.argv, os.environ,
                                          file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in private],
                                          setsigdef=restore)
        except OSError as e:
            _log(f"cannot start the engine {self.argv[0]!r}: {e}")
            return 127 if e.errno == errno.ENOENT else 126
        # poll, not epoll: it takes any descriptor (epoll refuses regular files).
        poller = select.poll()
        poller.register(self.control_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            rc = self._poll_engine()
            if rc is not None:
                return rc
            if os.getppid() != self.ppid:
                return self._stop("the factory died (parent-death signal)")
            # Extensions written while we were not running (paused with our group while the
            # factory renewed on) count before the deadline is judged.
            if not self._read_control():
                return self._stop("the factory died (control pipe closed)")
            timeout = None
            if self.deadline is not None:
                timeout = self.deadline - fence_clock()
                if timeout <= 0:
                    self._status(b"fenced\n")
                    # The SIGKILL is due at deadline + grace whenever we look: a supervisor that
                    # was paused (with its group) past the deadline has that much less grace left.
                    late_s = -timeout
                    grace_s = max(0.0, self.grace_s - late_s)
                    if late_s > LATE_S:
                        return self._stop(f"lease deadline passed {late_s:.1f}s ago (paused?): self-fencing, "
                                          f"{grace_s:.1f}s of grace left", grace_s)
                    return self._stop("lease deadline passed without a renewal: self-fencing", grace_s)
            try:
                ready = poller.poll(None if timeout is None else max(1, int(timeout * 1000 + 1)))
            except InterruptedError:  # PEP 475 retries, but a handler may still surface it
                ready = []
            for fd, _ in ready:
                if fd == wake_r:
                    _drain(wake_r)
                elif not self._read_control():  # POLLIN, or POLLHUP: the read says EOF
                    return self._stop("the factory died (control pipe closed)")

    def _read_control(self) -> bool:
        """Apply what the factory wrote; False on EOF (the factory is gone) or garbage."""
        try:
            data = os.read(self.control_fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[0] != b"d":
                _log(f"bad control line {line[:80]!r}")
                return False
            try:
                self.deadline = max(self.deadline or 0.0, float(parts[1]))
            except ValueError:
                _log(f"bad deadline {parts[1][:80]!r}")
                return False
        if len(self._buf) > CONTROL_LINE_MAX_BYTES:
            _log("control line too long")
            return False
        return True

    def _poll_engine(self) -> int | None:
        """The engine's exit status (``-signal`` if a signal ended it), reaping it; None while it runs."""
        if self.engine is None:
            return self.engine_rc
        try:
            pid, status = os.waitpid(self.engine, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.engine, 0
        if pid == 0:
            return None
        self.engine, self.engine_rc = None, os.waitstatus_to_exitcode(status)
        return self.engine_rc

    def _status(self, line: bytes) -> None:
        if self.status_fd is None:
            return
        try:
            os.write(self.status_fd, line)
        except OSError:  # the factory is gone, or not listening: nothing to tell
            pass

    def _stop(self, why: str, grace_s: float | None = None) -> int:
        """SIGTERM the group, wait up to the grace for the engine and the rest, SIGKILL the group
        (ourselves included: nothing of the job may remain)."""
        _log(f"{why}: stopping process group {self.pgid}")
        _killpg(self.pgid, signal.SIGTERM)
        end = time.monotonic() + (self.grace_s if grace_s is None else grace_s)
        while time.monotonic() < end:
            engine_done = self.engine is None or self._poll_engine() is not None
            if engine_done and not group_others_alive(self.pgid, os.getpid()):
                break
            time.sleep(POLL_S)
        _killpg(self.pgid, signal.SIGKILL)  # ends us too, unless the group already is only us
        time.sleep(KILL_WAIT_S)  # not reached on Linux: SIGKILL is delivered before killpg returns
        return 137


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _exit_like(rc: int) -> None:
    """Exit with the engine's status: a signal death is re-raised on ourselves (no core file)."""
    if rc >= 0:
        os._exit(rc)
    sig = -rc
    try:
        import resource  # only now: not on the start-up path

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is not to terminate


USAGE = "usage: supervise --control-fd N [--status-fd M] [--deadline T] [--grace-s G] -- argv..."


def parse_args(argv: list[str]) -> tuple[int, int | None, float | None, float, list[str]]:
    """``(control_fd, status_fd, deadline, grace_s, engine argv)``; ValueError on bad usage.
    Parsed by hand: argparse alone costs more start-up time than the rest of the supervisor."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] not in ("--control-fd", "--status-fd", "--deadline", "--grace-s") or i + 1 >= len(argv):
            raise ValueError(f"unknown or incomplete option {argv[i]!r}")
        opts[argv[i]] = argv[i + 1]
        i += 2
    cmd = argv[i + 1:]
    if "--control-fd" not in opts or not cmd:
        raise ValueError("--control-fd and an engine command after -- are required")
    grace_s = float(opts.get("--grace-s", "5"))
    if not grace_s >= 0:
        raise ValueError(f"--grace-s must be zero or positive, got {grace_s!r}")
    status = opts.get("--status-fd")
    deadline = opts.get("--deadline")
    return (int(opts["--control-fd"]), int(status) if status is not None else None,
            float(deadline) if deadline is not None else None, grace_s, cmd)


def main(argv: list[str] | None = None) -> None:
    try:
        control_fd, status_fd, deadline, grace_s, cmd = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        _log(f"{e}; {USAGE}")
        os._exit(EXIT_USAGE)
    _exit_like(Supervisor(cmd, control_fd, deadline, grace_s, status_fd).run())


if __name__ == "__main__":
    main()
