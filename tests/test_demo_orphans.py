"""A killed demo leaves nothing of its own running: its broker, coordinator and factories die
with it (issue 8, section 6: no orphans of our own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import pid_alive, wait_until

from gigafactory import osproc


def _children(pid: int) -> list[int]:
    return [c for c in osproc.descendants(pid) if osproc.parent_pid(c) == pid]


def _argv(pid: int) -> list[str]:
    return osproc.cmdline(pid) or []


def _role(pid: int) -> str | None:
    """What a child of the demo is, from its argv (not its folders: they may hold any word)."""
    argv = _argv(pid)
    if argv and os.path.basename(argv[0]) == "nats-server":
        return "broker"
    if argv[1:4] in (["-m", "gigafactory", "coordinator"], ["-m", "gigafactory", "factory"]):
        return argv[3]
    return None


def test_a_sigkilled_demo_takes_its_broker_coordinator_and_factories_with_it(tmp_path):
    demo = subprocess.Popen([sys.executable, "-m", "gigafactory", "demo", "--dir", str(tmp_path / "demo")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        # The demo is running once its broker, its coordinator and its factories are its children.
        def started() -> list[int] | None:
            kids = {k: _role(k) for k in _children(demo.pid)}
            roles = set(kids.values())
            return [k for k, r in kids.items() if r] if {"broker", "coordinator", "factory"} <= roles else None

        kids = wait_until(started, 60, what="the demo's broker, coordinator and factories running")
        assert len(kids) >= 3
        demo.send_signal(signal.SIGKILL)
        demo.wait(10)
        # Factories get SIGTERM and drain (their jobs are handed back), the broker SIGKILL.
        wait_until(lambda: not any(pid_alive(k) for k in kids), 60,
                   what=f"every child of the killed demo gone: {[(k, _argv(k)) for k in kids if pid_alive(k)]}")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
