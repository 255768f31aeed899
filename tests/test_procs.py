"""No orphans of our own: a child started with :func:`gigafactory.procs.popen_tied` dies with
the process that started it, killed with SIGKILL (real processes, no mocks)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from helpers import pid_alive, wait_until

from gigafactory.procs import parent_death_supported

pytestmark = pytest.mark.timeout(60)

STARTER = r"""
import sys, threading, time
from gigafactory.procs import popen_tied
mechanism, where = sys.argv[1], sys.argv[2]
box = []
def start():
    box.append(popen_tied(["sleep", "120"], mechanism=mechanism))
if where == "thread":
    t = threading.Thread(target=start)
    t.start()
    t.join()  # the thread that asked for the child is gone; the child must not go with it
else:
    start()
p = box[0]
print(p.pid, flush=True)
try:
    p.wait(timeout=float(sys.argv[3]))
    print("child died while its starter lives", flush=True)
except Exception:
    print("alive", flush=True)
time.sleep(120)
"""


def _start(mechanism: str, where: str, hold_s: float = 0.0):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, mechanism, where, str(hold_s)],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(starter.stdout.readline())
    return starter, child


MECHANISMS = ["watchdog"] + (["pdeathsig"] if parent_death_supported() else [])


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_tied_child_dies_with_its_sigkilled_starter(mechanism):
    starter, child = _start(mechanism, "main")
    try:
        assert starter.stdout.readline().strip() == "alive"
        assert pid_alive(child)
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        wait_until(lambda: not pid_alive(child), 10, what=f"the {mechanism}-tied child died with its starter")
    finally:
        starter.kill()
        starter.wait(10)
        if pid_alive(child):
            subprocess.run(["kill", "-9", str(child)])


def test_a_child_started_from_a_thread_that_ends_lives_on_until_the_process_dies():
    """The kernel's parent-death signal follows the *thread* that forked: the helper forks on a
    thread that lives as long as the process, so a worker thread's end kills nothing."""
    starter, child = _start("auto", "thread", hold_s=1.0)
    try:
        assert starter.stdout.readline().strip() == "alive", "the child died when its starting thread ended"
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        wait_until(lambda: not pid_alive(child), 10, what="the child died with its starter")
    finally:
        starter.kill()
        starter.wait(10)
        if pid_alive(child):
            subprocess.run(["kill", "-9", str(child)])


LAB_STARTER = r"""
import os, sys, time
from pathlib import Path
from gigafactory.testing.procs import LabProc
p = LabProc("sleeper", ["sleep", "120"], Path(sys.argv[1]), dict(os.environ))
p.start()
p.pause()  # a paused lab process must go too (SIGKILL ends a stopped process)
print(p.pid, flush=True)
time.sleep(120)
"""


def test_the_chaos_and_load_labs_processes_die_with_a_sigkilled_lab(tmp_path):
    """LabProc starts every process of the chaos lab and of the load suite (its coordinator,
    fleet hosts, baseline): none outlives a lab killed with SIGKILL, even one it had paused."""
    lab = subprocess.Popen([sys.executable, "-c", LAB_STARTER, str(tmp_path / "sleeper.log")],
                           stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(lab.stdout.readline())
    try:
        assert pid_alive(child)
        lab.send_signal(signal.SIGKILL)
        lab.wait(10)
        wait_until(lambda: not pid_alive(child), 10, what="the lab's process died with the lab")
    finally:
        lab.kill()
        lab.wait(10)
        if pid_alive(child):
            subprocess.run(["kill", "-9", str(child)])
