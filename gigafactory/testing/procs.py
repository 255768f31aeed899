"""Processes of a lab (chaos scenarios, load runs, tests): start, signal, pause, stop, and a
bounded wait for what they do.

Every process started here is tied to its starter (:func:`gigafactory.procs.popen_tied`), runs
in a session of its own, and appends its output to a log file kept across restarts.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gigafactory.procs import popen_tied

STOP_TIMEOUT_S = 15.0
"""Bound on a SIGTERMed process draining before it is SIGKILLed."""


class LabProc:
    """One real process of the lab, its output in ``log`` (appended across restarts)."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.log = log_path
        self.env = env
        self.p: subprocess.Popen | None = None
        self.paused = False
        self.starts = 0
        self.pauses: list[list[float | None]] = []
        """[stopped, continued] wall-clock times of every SIGSTOP the lab sent it (continued is
        None while it is stopped): the pause windows the side-effect invariant allows for."""

    def start(self) -> None:
        assert self.p is None or self.p.poll() is not None, f"{self.name} is already running"
        with open(self.log, "ab") as out:
            out.write(f"--- {self.name} start #{self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            # A session of its own: a Ctrl-C of the operator's terminal is for the lab, not for it.
            # Tied to the lab: SIGKILL when the lab dies however it dies, so no run leaves a
            # process behind (SIGKILL also ends one the lab had paused with SIGSTOP).
            self.p = popen_tied(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True)
        self.starts += 1
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.p is not None
            self.p.send_signal(sig)

    async def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if it is still running after ``timeout_s``."""
        assert self.p is not None
        deadline = time.monotonic() + timeout_s
        while self.p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.p.poll()

    async def kill(self) -> None:
        """SIGKILL and reap it (bounded)."""
        if self.alive():
            self.signal(signal.SIGKILL)
            if await self.wait(10.0) is None:
                raise RuntimeError(f"{self.name} (pid {self.pid}) survived SIGKILL for 10s")
        self._pause_ended()
        self.paused = False

    async def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a clean drain); SIGKILL if it has not ended within ``timeout_s``."""
        if not self.alive():
            return self.p.poll() if self.p else None
        if self.paused:
            self.resume()
        self.signal(signal.SIGTERM)
        code = await self.wait(timeout_s)
        if code is None:
            await self.kill()
            return None
        return code

    def pause(self) -> None:
        """SIGSTOP: the process holds its leases but cannot renew them (a GC pause, a VM stall).
        Only this process stops: its engines run on, as beside a stalled factory."""
        if self.alive() and not self.paused:
            # Noted before the signal, so the window covers all of the stop.
            self.pauses.append([time.time(), None])
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self._pause_ended()
        self.paused = False

    def _pause_ended(self) -> None:
        if self.pauses and self.pauses[-1][1] is None:
            self.pauses[-1][1] = time.time()  # noted after the SIGCONT (or the SIGKILL)

    def tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


async def wait_for(pred: Callable[[], Any], timeout_s: float, *, what: str, proc: LabProc | None = None,
                   interval_s: float = 0.05) -> Any:
    """Poll ``pred`` (sync or async) until it returns something truthy, and return that.
    Raises TimeoutError naming ``what`` after ``timeout_s``, or at once if ``proc`` died."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = pred()
        if asyncio.iscoroutine(last) or isinstance(last, asyncio.Future):
            last = await last
        if last:
            return last
        if proc is not None and proc.p is not None and proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode} while waiting for {what}; "
                               f"its log ends:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g}s: {what} (last: {last!r})")
        await asyncio.sleep(interval_s)
