"""The embedded broker never outlives the command that started it, and a store never gets a
second broker: real ``gigafactory server``/``up``/``coordinator`` processes, real
``nats-server``s, SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Proc, fast_env, gigafactory_cmd, pid_alive, wait_until

from gigafactory import osproc
from gigafactory.embedded import (
    STORE_LOCK_NAME,
    EmbeddedServer,
    StoreInUse,
    holder_verdict,
    inspect_holder,
    store_holder,
)
from gigafactory.procs import cmdline

pytestmark = pytest.mark.timeout(90)


def _env(home: Path) -> dict[str, str]:
    env = fast_env()
    env["GIGAFACTORY_HOME"] = str(home)
    env.pop("GIGAFACTORY_NATS_URL", None)
    return env


def _served(home: Path) -> dict:
    """What ``server.json`` says once the command's broker is up: its URL and pid."""
    state = home / "server.json"
    return wait_until(lambda: state.exists() and json.loads(state.read_text() or "{}"), 60,
                      what=f"{state} written by the embedded broker's start")


def _is_nats(pid: int) -> bool:
    argv = cmdline(pid)
    return bool(argv) and "nats-server" in argv[0]


def _nats_children(pid: int) -> list[int]:
    return [c for c in osproc.descendants(pid) if osproc.parent_pid(c) == pid and _is_nats(c)]


def _kill(pid: int) -> None:
    if pid and pid_alive(pid) and _is_nats(pid):
        subprocess.run(["kill", "-9", str(pid)])


@pytest.mark.parametrize("command", [["server", "--port", "0"], ["up"]])
def test_a_sigkilled_command_takes_its_embedded_broker_with_it(tmp_path, command):
    home = tmp_path / "home"
    proc = Proc([*gigafactory_cmd(), *command], tmp_path / "cmd.log", _env(home))
    nats_pid = 0
    try:
        nats_pid = _served(home)["pid"]
        assert pid_alive(nats_pid) and _is_nats(nats_pid)
        assert store_holder(str(home / "nats"))["pid"] == nats_pid
        proc.signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        wait_until(lambda: not pid_alive(nats_pid), 20,
                   what=f"the nats-server (pid {nats_pid}) of a SIGKILLed 'gigafactory {command[0]}' stopped")
        # The lock goes with the last of its threads, a moment after the process reads as dead.
        wait_until(lambda: store_holder(str(home / "nats")) is None, 10, what="the store is free again")
    finally:
        proc.close()
        _kill(nats_pid)


def test_a_second_start_on_a_served_store_starts_no_second_broker(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    first = Proc([*gigafactory_cmd(), "server", "--port", "0"], tmp_path / "first.log", env)
    coord = None
    nats_pid = 0
    try:
        served = _served(home)
        nats_pid = served["pid"]
        # Another server on the same store: refused, naming the broker that serves it.
        r = subprocess.run([*gigafactory_cmd(), "server", "--port", "0"], env=env, capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 2, r.stderr
        assert f"nats-server pid {nats_pid}" in r.stderr and served["url"] in r.stderr, r.stderr
        # A coordinator with no broker configured and no server.json to find it by (as after a
        # crash): it finds the broker by the store's lock and uses it, starting none.
        (home / "server.json").unlink()
        coord = Proc([*gigafactory_cmd(), "coordinator"], tmp_path / "coord.log", env)

        def answers():
            r = subprocess.run([*gigafactory_cmd(), "jobs", "--json", "--nats", served["url"]], env=env,
                               capture_output=True, text=True, timeout=30)
            return r.returncode == 0

        wait_until(answers, 60, what="the coordinator serves on the first server's broker")
        assert _nats_children(coord.pid) == [], "the coordinator started a broker of its own"
        assert "using it" in coord.output(), coord.output()
        assert pid_alive(nats_pid) and store_holder(str(home / "nats"))["pid"] == nats_pid
    finally:
        if coord is not None:
            coord.close()
        first.close()
        _kill(nats_pid)
    assert not pid_alive(nats_pid), "the first server stopped its broker on SIGTERM"


ORPHAN = r"""
import sys
from gigafactory.embedded import EmbeddedServer
s = EmbeddedServer(store_dir=sys.argv[1], die_with_parent=False).start()
print(s.proc.pid, flush=True)
"""


def test_an_orphaned_broker_on_the_store_is_stopped_before_a_new_one_starts(tmp_path):
    home = tmp_path / "home"
    store = home / "nats"
    # A broker whose starter is gone, as an older version left them: it holds the store's lock.
    made = subprocess.run([sys.executable, "-c", ORPHAN, str(store)], capture_output=True, text=True, timeout=60)
    orphan = int(made.stdout)
    server = None
    nats_pid = 0
    try:
        assert pid_alive(orphan) and store_holder(str(store))["pid"] == orphan
        server = Proc([*gigafactory_cmd(), "server", "--port", "0"], tmp_path / "server.log", _env(home))
        nats_pid = _served(home)["pid"]
        assert nats_pid != orphan
        assert not pid_alive(orphan), "the orphan was stopped before the new broker started"
        assert store_holder(str(store))["pid"] == nats_pid
        assert "an orphan" in server.output(), server.output()
    finally:
        if server is not None:
            server.close()
        _kill(orphan)
        _kill(nats_pid)


def test_embedded_server_refuses_a_store_another_server_holds(tmp_path):
    store = str(tmp_path / "store")
    with EmbeddedServer(store_dir=store) as first:
        with pytest.raises(StoreInUse) as e:
            EmbeddedServer(store_dir=store).start()
        assert e.value.holder["pid"] == first.proc.pid and e.value.holder["url"] == first.url
        assert (tmp_path / "store" / STORE_LOCK_NAME).exists()
    assert store_holder(store) is None
    again = EmbeddedServer(store_dir=store).start()  # a stopped server's store is free at once
    again.stop()


@pytest.mark.parametrize("holder, facts, verdict", [
    ({}, dict(broker_alive=False, broker_is_nats=False, starter_alive=False), "wait"),  # still starting
    ({"pid": 7}, dict(broker_alive=False, broker_is_nats=False, starter_alive=True), "wait"),  # exiting
    ({"pid": 7}, dict(broker_alive=True, broker_is_nats=False, starter_alive=False), "wait"),  # a reused pid: never signal it
    ({"pid": 7}, dict(broker_alive=True, broker_is_nats=True, starter_alive=True), "reuse"),
    ({"pid": 7}, dict(broker_alive=True, broker_is_nats=True, starter_alive=False), "stop"),
])
def test_holder_verdict(holder, facts, verdict):
    assert holder_verdict(holder, **facts) == verdict


def test_the_store_lock_records_start_times_so_a_recycled_pid_is_not_trusted(tmp_path):
    """The lock says which broker holds the store and who started it, each pid with its start
    time: a pid the kernel has since given to another process counts as dead."""
    store = str(tmp_path / "nats")
    server = EmbeddedServer(store_dir=store).start()
    try:
        holder = store_holder(store)
        assert holder["pid"] == server.proc.pid
        assert holder["pid_created_at"] == osproc.create_time(server.proc.pid)
        assert holder["starter_created_at"] == osproc.create_time(holder["starter_pid"])
        assert inspect_holder(holder) == "reuse", "a live broker whose starter is alive"
        hour_s = 3600.0
        starter_recycled = {**holder, "starter_created_at": holder["starter_created_at"] - hour_s}
        assert inspect_holder(starter_recycled) == "stop", "its starter's pid names another process now: an orphan"
        broker_recycled = {**holder, "pid_created_at": holder["pid_created_at"] - hour_s}
        assert inspect_holder(broker_recycled) == "wait", "never signal a pid that is not the broker"
        older = {k: v for k, v in holder.items() if not k.endswith("_created_at")}
        assert inspect_holder(older) == "reuse", "a lock written by an older version: the pids alone"
    finally:
        server.stop()
