"""An engine never outlives its factory, nor its lease (issue 8, section 1).

Real processes throughout: a factory (or a plain Python parent running ``shell.run_script``)
is SIGKILLed or SIGSTOPped in the middle of a script that writes ``start`` and ``END`` lines
and leaves a background grandchild running; the engine's whole process group must be gone
and no ``END`` line may appear. Self-fencing: a holder whose renewals stop succeeding stops
its engine before ``lease_ttl_s`` has passed since its last renewal, quarantines the result
and says so in a ``self_fenced`` event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import Fleet, Proc, eventually, fast_env, fast_settings, kill_group, pid_alive, run, wait_until

from gigafactory import osproc
from gigafactory.config import Settings, SettingsError
from gigafactory.factory import shell
from gigafactory.schemas import names

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death kill is Linux-tested")


def ledger_script(d: Path, seconds: int = 6) -> str:
    """Writes ``start``, leaves a background grandchild ticking, ticks itself (broker-comparable
    wall time) for ``seconds``, then writes ``END``; pids in files for the test to watch."""
    return textwrap.dedent(f"""\
        echo "start epoch $GF_EPOCH" >> {d}/ledger
        echo $$ > {d}/engine.pid
        ( while true; do echo bg >> {d}/bg.txt; sleep 0.05; done ) &
        echo $! > {d}/bg.pid
        for i in $(seq 1 {seconds * 10}); do date +%s.%N >> {d}/ticks; sleep 0.1; done
        echo "END epoch $GF_EPOCH" >> {d}/ledger
        """)


def group_gone(pgid: int) -> bool:
    return not osproc.group_alive(pgid)


def _kill_leftovers(d: Path) -> None:
    for name in ("engine.pid", "bg.pid"):
        p = d / name
        if p.exists():
            pid = int(p.read_text())
            try:
                kill_group(os.getpgid(pid))
            except ProcessLookupError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


PARENT = """\
import asyncio, sys
from gigafactory.factory import shell

async def main():
    await shell.run_script(sys.argv[1], cwd=sys.argv[2], env={"PATH": "/usr/bin:/bin", "GF_EPOCH": "1"},
                           timeout_s=60, log_path=sys.argv[3], kill_grace_s=5.0)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_sigkilled_parent_takes_the_engine_group_with_it(tmp_path):
    d = tmp_path
    parent = subprocess.Popen([sys.executable, "-c", PARENT, ledger_script(d), str(d), str(d / "job.log")],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (d / "bg.pid").exists() and (d / "ticks").exists(), 20, what="engine started")
        engine_pid, bg_pid = int((d / "engine.pid").read_text()), int((d / "bg.pid").read_text())
        pgid = os.getpgid(engine_pid)
        assert os.getpgid(bg_pid) == pgid and pgid != parent.pid
        parent.kill()
        assert parent.wait(10) == -signal.SIGKILL
        wait_until(lambda: group_gone(pgid), 10, what="engine process group gone after its parent was SIGKILLed")
        assert not pid_alive(engine_pid) and not pid_alive(bg_pid)
        ledger = (d / "ledger").read_text().splitlines()
        assert ledger == ["start epoch 1"]  # and never END: nothing of the group is left to write it
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill_leftovers(d)


def _factory_proc(nats_url: str, tmp_path: Path, fid: str, **settings) -> Proc:
    return Proc(
        [sys.executable, "-m", "gigafactory", "factory", "--nats", nats_url, "--id", fid, "--no-probe",
         "--stations", "1", "--data-dir", str(tmp_path / f"{fid}-data"), "--workspace", str(tmp_path / f"{fid}-work"),
         "--log-level", "debug"],
        tmp_path / f"{fid}.log", env=fast_env(**settings),
    )


@pytest.mark.timeout(90)
def test_sigkilled_factory_process_takes_its_engine_with_it(nats_server, tmp_path):
    d = tmp_path / "side"
    d.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            victim = _factory_proc(nats_server.url, tmp_path, "victim")
            try:
                await eventually(lambda: "victim" in fleet.coordinator.view.factories, 30, what="victim registered")
                job = await fleet.submit_one(fleet.job(ledger_script(d), retry={"max": 0}))
                await eventually(lambda: (d / "bg.pid").exists() and (d / "ticks").exists(), 20, what="engine started")
                engine_pid, bg_pid = int((d / "engine.pid").read_text()), int((d / "bg.pid").read_text())
                pgid = os.getpgid(engine_pid)
                victim.signal(signal.SIGKILL)
                assert victim.wait(10) == -signal.SIGKILL
                await eventually(lambda: group_gone(pgid), 10, what="engine group gone after the factory's SIGKILL")
                assert not pid_alive(bg_pid)
                assert (d / "ledger").read_text().splitlines() == ["start epoch 1"]
                await fleet.wait_stage(job, "dead_letter", timeout_s=20)  # lease expired, no retry left
            finally:
                victim.close()
                _kill_leftovers(d)

    run(main(), 80)


@pytest.mark.timeout(90)
def test_a_stopped_factory_cannot_keep_its_engine_past_the_lease(nats_server, tmp_path):
    """SIGSTOP of the factory process alone: its event loop runs nothing, so only the
    supervisor can stop the engine; it does, at the deadline, before the lease can be
    reclaimed. Resumed, the factory records the self-fence and quarantines the result."""
    d = tmp_path / "side"
    d.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            victim = _factory_proc(nats_server.url, tmp_path, "victim")
            try:
                await eventually(lambda: "victim" in fleet.coordinator.view.factories, 30, what="victim registered")
                job = await fleet.submit_one(fleet.job(ledger_script(d, seconds=30), retry={"max": 0}))
                await eventually(lambda: (d / "bg.pid").exists() and (d / "ticks").exists(), 20, what="engine started")
                engine_pid = int((d / "engine.pid").read_text())
                pgid = os.getpgid(engine_pid)
                victim.signal(signal.SIGSTOP)
                await eventually(lambda: group_gone(pgid), 10, what="engine group stopped by its supervisor")
                last = await fleet.admin.jobs.get(job)  # the victim's last renewal, stamped by the broker
                last_tick = float((d / "ticks").read_text().split()[-1])
                s = fleet.settings
                assert last_tick < last.ts + s.lease_ttl_s, "the engine ran on after its lease could be reclaimed"
                assert (d / "ledger").read_text().splitlines() == ["start epoch 1"]
                victim.signal(signal.SIGCONT)

                async def self_fenced():
                    return [e for e in await fleet.events(job) if e["kind"] == "self_fenced"]

                [ev] = await eventually(self_fenced, 20, what="self_fenced event")
                assert ev["factory"] == "victim" and ev["epoch"] == 1
                assert "no successful lease renewal" in ev["reason"]
                qdir = tmp_path / "victim-data" / "victim" / "outbox" / "quarantine"
                await eventually(lambda: any(qdir.iterdir()), 10, what="result quarantined")
                assert "the factory died" not in (tmp_path / "victim.log").read_text()
            finally:
                victim.signal(signal.SIGCONT)
                victim.close()
                _kill_leftovers(d)

    run(main(), 80)


@pytest.mark.timeout(90)
def test_a_holder_whose_renewals_fail_stops_its_engine_and_quarantines(nats_server, tmp_path):
    """Renewals stop succeeding while the factory and the broker both run (the job bucket
    refuses the record: its stream's max message size is lowered under it). Before this fix the
    factory only logged the failed renewals and its engine ran to the END line."""
    d = tmp_path / "side"
    d.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            worker = await fleet.add_factory("worker")
            job = await fleet.submit_one(fleet.job(ledger_script(d, seconds=12), retry={"max": 0}))
            js = fleet.admin.js
            stream = f"KV_{names.JOBS_BUCKET}"
            old_max = None
            try:
                await eventually(lambda: (d / "ticks").exists(), 20, what="engine started")

                async def renewed():
                    rec, _ = await fleet.record(job)
                    return rec.lease is not None and rec.lease.renewals >= 1

                await eventually(renewed, 10, what="a first renewal")
                e = await fleet.admin.jobs.get(job)
                cfg = (await js.stream_info(stream)).config
                old_max = cfg.max_msg_size
                cfg.max_msg_size = len(e.value) // 2
                await js.update_stream(cfg)

                q = await eventually(worker.outbox.quarantined, 15, what="result quarantined")
                assert [(i["job"], i["epoch"]) for i in q] == [(job, 1)]
                assert "self-fenced" in q[0]["reason"]
                last = await fleet.admin.jobs.get(job)  # the last renewal that got through
                last_tick = float((d / "ticks").read_text().split()[-1])
                assert last_tick < last.ts + fleet.settings.lease_ttl_s
                assert not pid_alive(int((d / "engine.pid").read_text()))
                assert not pid_alive(int((d / "bg.pid").read_text()))
                assert (d / "ledger").read_text().splitlines() == ["start epoch 1"]
                assert worker.stats["self_fenced"] == 1

                async def self_fenced():
                    return [e for e in await fleet.events(job) if e["kind"] == "self_fenced"]

                [ev] = await eventually(self_fenced, 10, what="self_fenced event")
                assert ev["factory"] == "worker" and ev["epoch"] == 1
            finally:
                if old_max is not None:
                    cfg = (await js.stream_info(stream)).config
                    cfg.max_msg_size = old_max
                    await js.update_stream(cfg)
                _kill_leftovers(d)

    run(main(), 80)


@pytest.mark.timeout(60)
def test_unsafe_unfenced_engines_disables_the_supervisor(tmp_path):
    """The chaos suite's broken variant: with supervised=False the engine survives its parent."""
    d = tmp_path
    code = PARENT.replace("kill_grace_s=5.0)", "kill_grace_s=5.0, supervised=False)")
    parent = subprocess.Popen([sys.executable, "-c", code, ledger_script(d, seconds=30), str(d), str(d / "job.log")],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (d / "bg.pid").exists(), 20, what="engine started")
        engine_pid = int((d / "engine.pid").read_text())
        assert os.getpgid(engine_pid) == engine_pid  # the shell leads its own group: no supervisor
        parent.kill()
        parent.wait(10)
        wait_until(lambda: (d / "ticks").exists(), 20, what="the engine's first tick")  # bg.pid comes first
        lines = len((d / "ticks").read_text().split())
        wait_until(lambda: len((d / "ticks").read_text().split()) > lines + 3, 10, what="engine still ticking")
        assert pid_alive(engine_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill_leftovers(d)


def test_fence_settings_are_validated_with_the_setting_named():
    ok = fast_settings().validate()
    assert ok.fence_margin_effective_s == pytest.approx(2.0 / 3)
    assert 0 < ok.fence_kill_grace_s < ok.fence_margin_effective_s
    assert Settings().validate().fence_margin_effective_s == 5.0
    with pytest.raises(SettingsError, match="fence_margin_s=0.1 .*too small"):
        fast_settings(fence_margin_s=0.1).validate()
    with pytest.raises(SettingsError, match="fence_margin_s=1.6 .*lease_renew_s"):
        fast_settings(fence_margin_s=1.6).validate()
    assert fast_settings(fence_margin_s=0.1, unsafe_unfenced_engines=True).validate()
    env = {"GIGAFACTORY_UNSAFE_UNFENCED_ENGINES": "yes", "GIGAFACTORY_FENCE_MARGIN_S": "0.5"}
    s = Settings.from_env(env)
    assert s.unsafe_unfenced_engines is True and s.fence_margin_s == 0.5
    assert Settings.from_env({"GIGAFACTORY_UNSAFE_UNFENCED_ENGINES": "0"}).unsafe_unfenced_engines is False
    with pytest.raises(SettingsError, match="GIGAFACTORY_UNSAFE_UNFENCED_ENGINES='maybe'"):
        Settings.from_env({"GIGAFACTORY_UNSAFE_UNFENCED_ENGINES": "maybe"})


def test_a_passed_deadline_stops_a_running_group_and_starts_nothing_new(tmp_path):
    async def main():
        fence = shell.FenceDeadline(shell.fence_clock() + 0.5, grace_s=0.2)
        res = await shell.run_script(ledger_script(tmp_path, seconds=30), cwd=str(tmp_path), env={"PATH": os.defpath},
                                     timeout_s=30, log_path=str(tmp_path / "job.log"), fence=fence)
        assert res.fenced and not res.ok and not res.timed_out and not res.cancelled
        again = await shell.run_command("touch never", cwd=str(tmp_path), env={"PATH": os.defpath}, timeout_s=5,
                                        log_path=str(tmp_path / "job.log"), fence=fence)
        assert again.fenced and not (tmp_path / "never").exists()
        # Extended in time, a deadline lets the job finish.
        ext = shell.FenceDeadline(shell.fence_clock() + 0.5, grace_s=0.2)

        async def keep_extending():
            while True:
                ext.extend(shell.fence_clock() + 0.5)
                await asyncio.sleep(0.1)

        keeper = asyncio.create_task(keep_extending())
        try:
            ok = await shell.run_command("sleep 1.5", cwd=str(tmp_path), env={"PATH": os.defpath}, timeout_s=10,
                                         log_path=str(tmp_path / "job2.log"), fence=ext)
        finally:
            keeper.cancel()
        assert ok.ok and not ok.fenced

    try:
        asyncio.run(main())
    finally:
        _kill_leftovers(tmp_path)
    assert (tmp_path / "ledger").read_text().splitlines() == ["start epoch "]


def test_a_stalled_event_loop_cannot_keep_the_engine_alive(tmp_path):
    """The loop is blocked (a CPU-bound call, a GC pause) past the deadline: the supervisor
    stops the group on its own, and the run says fenced even though the deadline was extended
    again once the loop woke up (before it saw the exit)."""
    import time

    async def main():
        fence = shell.FenceDeadline(shell.fence_clock() + 0.5, grace_s=0.2)

        async def stall_then_extend():
            await asyncio.sleep(0.2)
            time.sleep(1.5)  # blocks the loop: no in-process fence, no renewal
            fence.extend(shell.fence_clock() + 30)  # a renewal that got through after all

        staller = asyncio.create_task(stall_then_extend())
        res = await shell.run_script(ledger_script(tmp_path, seconds=30), cwd=str(tmp_path), env={"PATH": os.defpath},
                                     timeout_s=30, log_path=str(tmp_path / "job.log"), fence=fence)
        await staller
        return res

    try:
        res = asyncio.run(main())
    finally:
        _kill_leftovers(tmp_path)
    assert res.fenced and not res.ok
    assert not pid_alive(int((tmp_path / "engine.pid").read_text()))
    assert "lease deadline passed without a renewal" in (tmp_path / "job.log").read_text()


@pytest.mark.timeout(60)
def test_a_factory_with_unsafe_unfenced_engines_runs_them_unsupervised_and_says_so(nats_server, tmp_path, caplog):
    d = tmp_path / "side"
    d.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            unsafe = fast_settings(unsafe_unfenced_engines=True)
            worker = await fleet.add_factory("unsafe", settings=unsafe)
            job = await fleet.submit_one(fleet.job(ledger_script(d, seconds=2), review_policy="auto"))
            await eventually(lambda: (d / "engine.pid").exists(), 20, what="engine started")
            engine_pid = int((d / "engine.pid").read_text())
            assert os.getpgid(engine_pid) == engine_pid  # the shell leads its group: no supervisor
            assert all(r.fence is None for r in worker.runs.values())
            await fleet.wait_stage(job, "shipped", timeout_s=20)

    try:
        run(main(), 50)
    finally:
        _kill_leftovers(d)
    assert any("UNSAFE: unsafe_unfenced_engines is on" in r.getMessage() for r in caplog.records)


PAUSED_PARENT = """\
import asyncio, sys
from gigafactory.factory import shell

async def main():
    fence = shell.FenceDeadline(shell.fence_clock() + float(sys.argv[4]), grace_s=float(sys.argv[5]))
    print(repr(fence.at_s), flush=True)
    res = await shell.run_script(sys.argv[1], cwd=sys.argv[2], env={"PATH": "/usr/bin:/bin", "GF_EPOCH": "1"},
                                 timeout_s=60, log_path=sys.argv[3], kill_grace_s=float(sys.argv[5]), fence=fence)
    print("fenced" if res.fenced else "not fenced", flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_a_group_paused_past_its_deadline_is_killed_without_a_grace_when_it_resumes(tmp_path):
    """The residual window: a supervisor paused together with its engine (SIGSTOP of the whole
    group, here with the factory stopped too) runs nothing while paused. The SIGKILL is due at
    deadline + grace: resumed after that (the lease may be someone else's by now), the
    supervisor SIGKILLs at once, though the engine ignores SIGTERM."""
    grace_s = 6.0
    script = "trap '' TERM\n" + ledger_script(tmp_path, seconds=50)  # only SIGKILL stops it
    parent = subprocess.Popen([sys.executable, "-c", PAUSED_PARENT, script, str(tmp_path), str(tmp_path / "job.log"),
                               "4.0", str(grace_s)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        at_s = float(parent.stdout.readline())
        wait_until(lambda: (tmp_path / "ticks").exists(), 20, what="engine started")
        pgid = os.getpgid(int((tmp_path / "engine.pid").read_text()))
        parent.send_signal(signal.SIGSTOP)
        os.killpg(pgid, signal.SIGSTOP)
        assert shell.fence_clock() < at_s, "paused after the deadline: the test proves nothing (machine too slow?)"
        wait_until(lambda: shell.fence_clock() > at_s + grace_s + 0.5, 20, what="paused past deadline + grace")
        os.killpg(pgid, signal.SIGCONT)  # the group only: the factory stays stopped
        # Gone long before the grace could have run out: SIGKILL without a grace.
        wait_until(lambda: group_gone(pgid), grace_s / 2, what="the resumed group killed at once")
        parent.send_signal(signal.SIGCONT)
        out, _ = parent.communicate(timeout=20)
        assert out.decode().split() == ["fenced"]
        assert "(paused?): self-fencing" in (tmp_path / "job.log").read_text()
        assert (tmp_path / "ledger").read_text().splitlines() == ["start epoch 1"]
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGCONT)
            parent.kill()
        _kill_leftovers(tmp_path)


def test_a_group_paused_while_its_holder_renews_on_is_not_stopped(tmp_path):
    """Only the engine's group is paused (the factory keeps renewing): when it resumes, the
    extensions written meanwhile count, and the job runs to its end."""

    async def main():
        fence = shell.FenceDeadline(shell.fence_clock() + 0.5, grace_s=0.2)

        async def renew_on():
            while True:
                fence.extend(shell.fence_clock() + 0.5)
                await asyncio.sleep(0.1)

        renewer = asyncio.create_task(renew_on())
        try:
            task = asyncio.create_task(shell.run_script(ledger_script(tmp_path, seconds=2), cwd=str(tmp_path),
                                                        env={"PATH": os.defpath}, timeout_s=30,
                                                        log_path=str(tmp_path / "job.log"), fence=fence))
            await eventually(lambda: (tmp_path / "ticks").exists(), 10, what="engine started")
            pgid = os.getpgid(int((tmp_path / "engine.pid").read_text()))
            os.killpg(pgid, signal.SIGSTOP)
            paused_at = shell.fence_clock()
            try:
                await eventually(lambda: shell.fence_clock() > paused_at + 1.0, 5, what="paused past a deadline")
            finally:
                os.killpg(pgid, signal.SIGCONT)
            return await asyncio.wait_for(task, 20)
        finally:
            renewer.cancel()

    try:
        res = asyncio.run(main())
    finally:
        _kill_leftovers(tmp_path)
    assert res.ok and not res.fenced
    assert (tmp_path / "ledger").read_text().splitlines() == ["start epoch ", "END epoch "]


@pytest.mark.timeout(60)
def test_a_healthy_holder_renews_past_many_deadlines_and_ships(nats_server, tmp_path):
    """The other side: renewals that succeed keep moving the deadline, so a job that runs for
    several lease TTLs is never fenced."""
    d = tmp_path / "side"
    d.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            worker = await fleet.add_factory("worker")
            seconds = int(3 * fleet.settings.lease_ttl_s)
            job = await fleet.submit_one(fleet.job(ledger_script(d, seconds=seconds), review_policy="auto"))
            final = await fleet.wait_stage(job, "shipped", timeout_s=seconds + 20)
            assert final.attempts[-1].outcome == "passed" and final.attempts[-1].epoch == 1
            assert worker.stats["self_fenced"] == 0
            assert not any(e["kind"] == "self_fenced" for e in await fleet.events(job))

    try:
        run(main(), 50)
    finally:
        _kill_leftovers(d)
    assert (d / "ledger").read_text().splitlines() == ["start epoch 1", "END epoch 1"]
