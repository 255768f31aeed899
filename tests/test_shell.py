"""The shell engine and verify gate: real bash processes, real log files."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from gigafactory import osproc
from gigafactory.factory.shell import (
    ProcessResult,
    WorkdirNotFoundError,
    run_command,
    run_script,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")

GRACE_S = 0.5


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.environ.get("HOME", "/")}


def _pid_gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for init (it no longer runs)."""
    return not osproc.pid_alive(pid)


def _wait_gone(pid: int, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _pid_gone(pid):
            return True
        time.sleep(0.01)
    return _pid_gone(pid)


def _read_pid(path) -> int:
    # The script writes the pid before it blocks, so the file is complete when the run ends.
    return int(path.read_text().strip())


def _run(coro):
    return asyncio.run(coro)


def test_script_exit_code_output_and_header_go_to_the_log_in_order(tmp_path):
    log = tmp_path / "logs" / "job.log"
    chunks: list[bytes] = []
    result = _run(
        run_script(
            "echo out-line\necho err-line >&2\nexit 3\n",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=10,
            log_path=str(log),
            on_output=chunks.append,
            header="== engine shell attempt 1",
        )
    )
    assert result.exit_code == 3
    assert (result.timed_out, result.cancelled, result.signal, result.ok) == (False, False, None, False)
    assert 0 <= result.duration_s < 10
    text = log.read_text()
    assert text.startswith("== engine shell attempt 1\n")
    assert text.index("out-line") < text.index("err-line")
    streamed = b"".join(chunks)
    assert b"out-line\n" in streamed and b"err-line\n" in streamed
    assert b"engine shell attempt" not in streamed  # the header is ours, not the job's output


def test_script_runs_in_cwd_with_exactly_the_given_env(tmp_path):
    log = tmp_path / "job.log"
    env = {**_env(), "GF_TEST_VALUE": "forty-two"}
    result = _run(
        run_script(
            'pwd; echo "value=$GF_TEST_VALUE"; echo "unset=${GF_NOT_GIVEN-none}"',
            cwd=str(tmp_path),
            env=env,
            timeout_s=10,
            log_path=str(log),
        )
    )
    assert result.ok
    text = log.read_text()
    assert os.path.realpath(tmp_path) in text
    assert "value=forty-two" in text
    assert "unset=none" in text


def test_script_temp_file_is_removed_after_the_run(tmp_path):
    log = tmp_path / "job.log"
    _run(run_script('echo "$0"', cwd=str(tmp_path), env=_env(), timeout_s=10, log_path=str(log)))
    script_file = log.read_text().strip()
    assert script_file.endswith(".sh")
    assert not os.path.exists(script_file)


def test_verify_command_appends_after_engine_output(tmp_path):
    log = tmp_path / "job.log"
    engine = _run(run_script("echo engine-said", cwd=str(tmp_path), env=_env(), timeout_s=10, log_path=str(log)))
    verify = _run(
        run_command(
            "echo verify-said && test -f missing.txt",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=10,
            log_path=str(log),
            header="== verify",
        )
    )
    assert engine.exit_code == 0
    assert verify.exit_code == 1 and not verify.ok
    text = log.read_text()
    assert text.index("engine-said") < text.index("== verify") < text.index("verify-said")


def test_verify_command_passes(tmp_path):
    (tmp_path / "present.txt").write_text("x")
    result = _run(
        run_command("test -f present.txt", cwd=str(tmp_path), env=_env(), timeout_s=10, log_path=str(tmp_path / "l"))
    )
    assert result.ok and result.exit_code == 0


def test_timeout_kills_the_whole_group_including_a_background_grandchild(tmp_path):
    log = tmp_path / "job.log"
    pidfile = tmp_path / "grandchild.pid"
    started = time.monotonic()
    result = _run(
        run_script(
            f"sleep 1000 &\necho $! > {pidfile}\nwait\n",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=0.5,
            log_path=str(log),
            kill_grace_s=GRACE_S,
        )
    )
    elapsed_s = time.monotonic() - started
    assert result.timed_out and not result.cancelled
    assert result.exit_code is None and result.signal == signal.SIGTERM
    assert elapsed_s < 0.5 + GRACE_S + 2.0
    assert _wait_gone(_read_pid(pidfile)), "the backgrounded sleep outlived the job"
    assert "timed out after 0.5 s" in log.read_text()


def test_sigterm_ignored_means_sigkill_after_the_grace(tmp_path):
    pidfile = tmp_path / "stubborn.pid"
    started = time.monotonic()
    result = _run(
        run_script(
            # Both the script and its background child ignore SIGTERM.
            f"trap '' TERM\n(trap '' TERM; exec sleep 1000) &\necho $! > {pidfile}\nwhile true; do sleep 0.05; done\n",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=0.3,
            log_path=str(tmp_path / "job.log"),
            kill_grace_s=GRACE_S,
        )
    )
    elapsed_s = time.monotonic() - started
    assert result.timed_out
    assert result.signal == signal.SIGKILL and result.exit_code is None
    assert elapsed_s >= 0.3 + GRACE_S - 0.05  # it waited the grace before SIGKILL
    assert elapsed_s < 0.3 + GRACE_S + 2.0
    assert _wait_gone(_read_pid(pidfile))


def test_script_that_traps_sigterm_and_exits_reports_its_exit_code(tmp_path):
    result = _run(
        run_script(
            "trap 'echo cleaning up; exit 7' TERM\nwhile true; do sleep 0.05; done\n",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=0.3,
            log_path=str(tmp_path / "job.log"),
            kill_grace_s=2.0,
        )
    )
    assert result.timed_out
    assert result.exit_code == 7 and result.signal is None
    assert "cleaning up" in (tmp_path / "job.log").read_text()


def test_cancel_event_stops_the_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    ready = tmp_path / "ready"

    async def scenario() -> ProcessResult:
        cancel = asyncio.Event()
        task = asyncio.create_task(
            run_script(
                f"sleep 1000 &\necho $! > {pidfile}\ntouch {ready}\nwait\n",
                cwd=str(tmp_path),
                env=_env(),
                timeout_s=30,
                log_path=str(tmp_path / "job.log"),
                cancel=cancel,
                kill_grace_s=GRACE_S,
            )
        )
        deadline = time.monotonic() + 5
        while not ready.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert ready.exists()
        cancel.set()
        return await asyncio.wait_for(task, timeout=5)

    result = _run(scenario())
    assert result.cancelled and not result.timed_out
    assert result.exit_code is None
    assert result.duration_s < 5
    assert _wait_gone(_read_pid(pidfile))


def test_cancel_already_set_does_not_start_the_process(tmp_path):
    marker = tmp_path / "ran"

    async def scenario() -> ProcessResult:
        cancel = asyncio.Event()
        cancel.set()
        return await run_script(
            f"touch {marker}", cwd=str(tmp_path), env=_env(), timeout_s=5, log_path=str(tmp_path / "l"), cancel=cancel
        )

    result = _run(scenario())
    assert result.cancelled and result.exit_code is None
    assert not marker.exists()


def test_cancelling_the_coroutine_kills_the_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    leader_pidfile = tmp_path / "leader.pid"
    ready = tmp_path / "ready"

    async def scenario() -> None:
        task = asyncio.create_task(
            run_script(
                f"echo $$ > {leader_pidfile}\nsleep 1000 &\necho $! > {pidfile}\ntouch {ready}\nwait\n",
                cwd=str(tmp_path),
                env=_env(),
                timeout_s=30,
                log_path=str(tmp_path / "job.log"),
                kill_grace_s=GRACE_S,
            )
        )
        deadline = time.monotonic() + 5
        while not ready.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The group's leader (the supervisor) is already reaped when the cancellation arrives:
        # nothing left for a closing loop to warn about. The script's shell is the
        # supervisor's child, killed in the same SIGKILL and reparented to init, so it is dead
        # (gone, or a zombie init reaps), though maybe a moment later.
        assert _wait_gone(_read_pid(leader_pidfile))

    _run(scenario())
    assert _wait_gone(_read_pid(pidfile))


def test_background_leftovers_are_stopped_after_a_normal_exit(tmp_path):
    pidfile = tmp_path / "leftover.pid"
    started = time.monotonic()
    result = _run(
        run_script(
            # The leftover holds stdout open; the run must still end promptly.
            f"sleep 1000 &\necho $! > {pidfile}\necho done\nexit 0\n",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=30,
            log_path=str(tmp_path / "job.log"),
            kill_grace_s=GRACE_S,
        )
    )
    assert result.ok and result.exit_code == 0 and not result.timed_out
    assert time.monotonic() - started < 5
    assert _wait_gone(_read_pid(pidfile))
    text = (tmp_path / "job.log").read_text()
    assert "done" in text and "left processes running" in text


def test_a_process_that_escapes_the_group_cannot_hang_the_run(tmp_path):
    pidfile = tmp_path / "escaped.pid"
    flag = tmp_path / "escaped"
    started = time.monotonic()
    result = _run(
        run_script(
            # setsid puts the sleep in a new session: we cannot signal it, and it holds stdout.
            f"{sys.executable} -c 'import os; os.setsid(); open(\"{flag}\", \"w\").close(); "
            f"os.execvp(\"sleep\", [\"sleep\", \"1000\"])' &\n"
            f"echo $! > {pidfile}\n"
            # Exit only once it has left the group, or the group kill would still reach it.
            f"for i in $(seq 500); do [ -e {flag} ] && break; sleep 0.01; done\nexit 0\n",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=30,
            log_path=str(tmp_path / "job.log"),
            kill_grace_s=GRACE_S,
        )
    )
    escaped = _read_pid(pidfile)
    try:
        assert flag.exists(), "the helper never left the process group"
        assert result.exit_code == 0
        assert time.monotonic() - started < 5
        assert "escaped the group" in (tmp_path / "job.log").read_text()
    finally:
        try:
            os.kill(escaped, signal.SIGKILL)
        except ProcessLookupError:
            pass
        assert _wait_gone(escaped)


def test_on_output_that_raises_does_not_stop_the_job_or_the_log(tmp_path):
    calls: list[bytes] = []

    def broken(chunk: bytes) -> None:
        calls.append(chunk)
        raise RuntimeError("observer is broken")

    result = _run(
        run_script(
            "echo first; sleep 0.05; echo second",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=10,
            log_path=str(tmp_path / "job.log"),
            on_output=broken,
        )
    )
    assert result.ok
    assert len(calls) == 1  # called once, then disabled
    text = (tmp_path / "job.log").read_text()
    assert "first" in text and "second" in text


def test_large_output_is_streamed_completely(tmp_path):
    received = bytearray()
    result = _run(
        run_command(
            "head -c 1048576 /dev/zero | tr '\\0' x",
            cwd=str(tmp_path),
            env=_env(),
            timeout_s=10,
            log_path=str(tmp_path / "job.log"),
            on_output=received.extend,
        )
    )
    assert result.ok
    assert len(received) == 1048576 and set(received) == {ord("x")}
    assert (tmp_path / "job.log").stat().st_size == 1048576


def test_missing_cwd_raises_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-checkout"
    with pytest.raises(FileNotFoundError) as info:
        _run(run_script("true", cwd=str(missing), env=_env(), timeout_s=5, log_path=str(tmp_path / "l")))
    assert isinstance(info.value, WorkdirNotFoundError)
    assert str(missing) in str(info.value)
    with pytest.raises(WorkdirNotFoundError):
        _run(run_command("true", cwd=str(missing), env=_env(), timeout_s=5, log_path=str(tmp_path / "l")))


def test_invalid_timeouts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="timeout_s"):
        _run(run_command("true", cwd=str(tmp_path), env=_env(), timeout_s=0, log_path=str(tmp_path / "l")))
    with pytest.raises(ValueError, match="kill_grace_s"):
        _run(
            run_command(
                "true", cwd=str(tmp_path), env=_env(), timeout_s=1, log_path=str(tmp_path / "l"), kill_grace_s=-1
            )
        )


def test_no_zombie_children_are_left(tmp_path):
    for _ in range(3):
        _run(run_command("exit 0", cwd=str(tmp_path), env=_env(), timeout_s=5, log_path=str(tmp_path / "l")))
    _run(
        run_command(
            "sleep 1000", cwd=str(tmp_path), env=_env(), timeout_s=0.2, log_path=str(tmp_path / "l"), kill_grace_s=GRACE_S
        )
    )
    zombies = [c for c in osproc.descendants(os.getpid()) if not osproc.pid_alive(c)]
    assert zombies == []
