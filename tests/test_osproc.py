"""The portable process module (:mod:`gigafactory.osproc`) on real processes: liveness of a
live, a dead, a zombie and a recycled pid; a real process tree found and killed; a real
process group signalled; the CPU time and resident memory of a real busy child; a process
found by its environment. CI runs Linux only: these tests exercise the same interface that
macOS and Windows use (psutil underneath), not the other platforms themselves."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

from gigafactory import osproc
from gigafactory.config import running_embedded_url, server_state_path, write_server_state

pytestmark = pytest.mark.timeout(60)

HOUR_S = 3600.0


def _sleeper(*extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", *extra],
                            stdin=subprocess.PIPE, **kw)


def _end(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)


def test_a_live_process_is_alive_and_a_reaped_one_is_not():
    p = _sleeper()
    try:
        assert osproc.pid_alive(p.pid)
        assert osproc.parent_pid(p.pid) == os.getpid()
        assert osproc.cmdline(p.pid)[0] == sys.executable
    finally:
        _end(p)
    assert not osproc.pid_alive(p.pid), "a reaped pid is dead"
    assert osproc.cmdline(p.pid) is None and osproc.cpu_seconds(p.pid) is None and osproc.rss_bytes(p.pid) is None
    assert not osproc.pid_alive(0) and not osproc.pid_alive(-1)


def test_a_zombie_is_dead():
    p = subprocess.Popen(["true"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not osproc.pid_alive(p.pid), "a zombie holds its pid but is dead"
    finally:
        p.wait(timeout=10)


def test_a_recycled_pid_is_dead_and_never_signalled():
    """A pid recorded with its start time, now held by a process that started at another time
    (what the kernel's pid reuse looks like to the reader of a state file)."""
    p = _sleeper()
    try:
        started = osproc.create_time(p.pid)
        assert started is not None
        assert osproc.pid_alive(p.pid, created_at=started)
        assert osproc.pid_alive(p.pid, created_at=started + osproc.CREATE_TIME_TOLERANCE_S / 2)
        stranger = started - HOUR_S
        assert not osproc.pid_alive(p.pid, created_at=stranger)
        assert not osproc.kill(p.pid, osproc.SIGKILL, created_at=stranger)
        assert osproc.kill_tree(p.pid, created_at=stranger) == []
        assert p.poll() is None and osproc.pid_alive(p.pid), "the stranger was left alone"
        assert osproc.kill(p.pid, osproc.SIGKILL, created_at=started)
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        _end(p)


def test_the_embedded_broker_url_is_not_trusted_to_a_recycled_pid(tmp_path, monkeypatch):
    monkeypatch.setenv("GIGAFACTORY_HOME", str(tmp_path))
    p = _sleeper()
    try:
        write_server_state("nats://127.0.0.1:4999", p.pid)
        state = json.loads(server_state_path().read_text())
        assert state["pid_created_at"] == osproc.create_time(p.pid)
        assert running_embedded_url() == "nats://127.0.0.1:4999"
        state["pid_created_at"] -= HOUR_S  # the broker died; its pid now names another process
        server_state_path().write_text(json.dumps(state))
        assert running_embedded_url() is None
        del state["pid_created_at"]  # a file written by an older version: the pid alone
        server_state_path().write_text(json.dumps(state))
        assert running_embedded_url() == "nats://127.0.0.1:4999"
    finally:
        _end(p)
    assert running_embedded_url() is None, "a dead pid"


TREE = r"""
import subprocess, sys
code = sys.argv[1]
depth = int(sys.argv[2])
kids = [subprocess.Popen([sys.executable, "-c", code, code, str(depth - 1)]) for _ in range(2 if depth else 0)]
import time
while True:
    time.sleep(60)
"""


def test_a_process_tree_is_found_and_killed_whole():
    root = subprocess.Popen([sys.executable, "-c", TREE, TREE, "2"], stdout=subprocess.PIPE, text=True)
    try:
        # two children, each with two children: six below the root
        found = wait_until(lambda: (d := osproc.descendants(root.pid)) and len(d) == 6 and d, 30,
                           what="the tree's six descendants")
        assert root.pid not in found
        assert all(osproc.pid_alive(pid) for pid in found)
        assert osproc.kill_tree(root.pid) == []
        assert root.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: not any(osproc.pid_alive(pid) for pid in found), 10,
                   what="every descendant dead (re-parented, then reaped)")
    finally:
        _end(root)


def test_kill_tree_can_spare_the_root():
    root = subprocess.Popen([sys.executable, "-c", TREE, TREE, "1"])
    try:
        kids = wait_until(lambda: (d := osproc.descendants(root.pid)) and len(d) == 2 and d, 30, what="two children")
        assert osproc.kill_tree(root.pid, include_root=False) == []
        assert root.poll() is None and osproc.pid_alive(root.pid)
        assert not any(osproc.pid_alive(k) for k in kids)
    finally:
        _end(root)


def test_a_process_group_is_signalled_as_one():
    leader = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                              **osproc.new_group_popen_kwargs())
    try:
        bg = int(leader.stdout.readline())
        assert osproc.process_group(bg) == leader.pid == osproc.process_group(leader.pid)
        assert osproc.process_group(0) != leader.pid, "the child leads a group of its own"
        assert osproc.group_alive(leader.pid)
        osproc.signal_group(leader.pid, osproc.SIGKILL)
        assert leader.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: not osproc.group_alive(leader.pid), 10, what="the whole group dead")
        assert not osproc.pid_alive(bg)
        osproc.signal_group(leader.pid, osproc.SIGKILL)  # a group already gone is not an error
    finally:
        _end(leader)


BUSY = r"""
import sys, time
buf = bytearray(64 * 1024 * 1024)
for i in range(0, len(buf), 4096):
    buf[i] = 1  # touch every page: resident, not just reserved
while time.process_time() < 0.6:  # more than asserted: the kernel counts CPU in ticks
    pass
print("ready", flush=True)
sys.stdin.read()
"""


def test_cpu_and_memory_of_a_busy_child():
    busy = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    idle = _sleeper()
    try:
        assert busy.stdout.readline().strip() == "ready"
        cpu_s, rss = osproc.cpu_seconds(busy.pid), osproc.rss_bytes(busy.pid)
        assert cpu_s is not None and cpu_s >= 0.5
        assert rss is not None and rss >= 64 * 1024 * 1024
        idle_cpu_s, idle_rss = osproc.cpu_seconds(idle.pid), osproc.rss_bytes(idle.pid)
        assert idle_cpu_s is not None and idle_cpu_s < cpu_s
        assert idle_rss is not None and 0 < idle_rss < rss
    finally:
        _end(busy)
        _end(idle)


def test_the_load_suite_reads_processes_through_osproc():
    from gigafactory.loadtest import fleet
    from gigafactory.loadtest.harness import proc_cpu_s, proc_rss_bytes

    busy = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready"
        assert proc_cpu_s(busy.pid) >= 0.5 and proc_rss_bytes(busy.pid) >= 64 * 1024 * 1024
        assert proc_cpu_s(None) is None and proc_rss_bytes(None) is None
    finally:
        _end(busy)
    assert proc_cpu_s(busy.pid) is None and proc_rss_bytes(busy.pid) is None
    assert fleet.rss_bytes() > 0 and fleet.cpu_seconds() > 0


def test_processes_are_found_by_their_environment():
    marker = f"osproc-test-{os.getpid()}"
    p = _sleeper(env={**os.environ, "GF_OSPROC_TEST": marker})
    other = _sleeper(env={**os.environ, "GF_OSPROC_TEST": marker + "-other"})
    try:
        wait_until(lambda: osproc.environ(p.pid), 10, what="the child's environment readable")
        assert osproc.pids_with_env("GF_OSPROC_TEST", marker) == [p.pid]
        assert osproc.environ(p.pid)["GF_OSPROC_TEST"] == marker
    finally:
        _end(p)
        _end(other)
    assert osproc.pids_with_env("GF_OSPROC_TEST", marker) == []
    assert osproc.environ(p.pid) is None


def test_parent_death_signal_is_offered_on_linux_only():
    preexec = osproc.parent_death_preexec(signal.SIGKILL)
    assert osproc.parent_death_supported() == (preexec is not None)
    if sys.platform.startswith("linux"):
        assert preexec is not None, "Linux has PR_SET_PDEATHSIG"
    else:
        assert preexec is None, "not on this OS: the caller uses the watchdog"


OS_SPECIFIC = re.compile(r"""(?:open|listdir|scandir|isdir|Path)\(f?["']/proc|\bos\.killpg\(|\bos\.getpgid\(|\.prctl\b"""
                         r"""|getrusage\(|CREATE_NEW_PROCESS_GROUP|\bos\.setsid\(""")
"""Process calls that differ between operating systems."""
STANDALONE = {"gigafactory/osproc.py", "factory/supervise.py"}
"""osproc, and the engine supervisor: it runs with ``python -I -S`` and cannot import it."""


def test_os_specific_process_calls_live_in_osproc():
    root = Path(__file__).resolve().parent.parent
    offenders, seen = {}, set()
    for d in ("gigafactory", "schemas", "coordinator", "factory", "chaos", "loadtest"):
        for path in (root / d).rglob("*.py"):
            rel = str(path.relative_to(root))
            hits = [m.group(0) for m in OS_SPECIFIC.finditer(path.read_text(encoding="utf-8"))]
            if hits:
                seen.add(rel)
            if hits and rel not in STANDALONE:
                offenders[rel] = hits
    assert seen == STANDALONE, "the scan finds the calls where they are"
    assert offenders == {}, "call gigafactory.osproc instead"
