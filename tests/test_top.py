"""``gigafactory top``: the model (pure: broker changes in, a snapshot out) checked value by
value, then the textual app driven headless by textual's own pilot against a live fleet (a
real nats-server, the real coordinator and factory), reading what its widgets show."""

from __future__ import annotations

import asyncio
import tracemalloc

import orjson
import pytest
from helpers import Fleet, eventually, fast_settings, run
from test_engines_declared import declared_cli  # noqa: F401 (a fixture: an agent CLI that reports usage)

from gigafactory.broker import connect
from gigafactory.topmodel import STAGE_ORDER, TopModel, format_age

pytestmark = pytest.mark.timeout(120)

T0 = 1_800_000_000.0


def job(jid: str, stage: str, *, pool: str = "p1", attempt: int = 0, submitted_at: float = T0,
        attempts: list | None = None) -> bytes:
    """A ``gf_jobs`` value with the fields top reads, and one it does not (``body``)."""
    return orjson.dumps({"id": jid, "stage": stage, "pool": pool, "attempt": attempt, "submitted_at": submitted_at,
                         "attempts": attempts or [], "body": "x" * 100, "manifest": {"priority": "normal"}})


def attempt(engine: str, cost_usd: float | None, source: str) -> dict:
    return {"attempt": 1, "epoch": 1, "factory": "f", "station": 0, "engine": engine,
            "usage": {"cost_usd": cost_usd, "cost_source": source, "input_tokens": 10}}


def factory(fid: str, *, busy: int = 0, idle: tuple[str, ...] = ("no-work",), mode: str = "push",
            pools: tuple[str, ...] = ("p1",), status: str = "up", caps: tuple[str, ...] = ("engine:shell",),
            seats: dict | None = None) -> bytes:
    stations = [{"index": i, "state": "busy", "job": f"j{i}"} for i in range(busy)]
    stations += [{"index": busy + i, "state": "idle", "idle_reason": r} for i, r in enumerate(idle)]
    return orjson.dumps({"id": fid, "host": "h1", "os": "linux", "arch": "x86_64", "capabilities": list(caps),
                         "stations": stations, "seats": seats or {}, "status": status, "dispatch_mode": mode,
                         "pools": list(pools), "heartbeat_interval_s": 5.0, "outbox_pending": 2, "quarantined": 0})


def event(kind: str, at: float, *, job_id: str = "j1", stage_from: str | None = None, stage_to: str | None = None,
          factory_id: str | None = None, reason: str = "") -> bytes:
    d = {"kind": kind, "at": at, "job": job_id, "reason": reason}
    if stage_from:
        d["stage_from"] = stage_from
    if stage_to:
        d["stage_to"] = stage_to
    if factory_id:
        d["factory"] = factory_id
    return orjson.dumps(d)


# -- the model -----------------------------------------------------------------------------------


def test_stage_counts_follow_each_job_from_stage_to_stage_and_out_when_archived():
    m = TopModel()
    m.apply_job("a", job("a", "queued"), T0)
    m.apply_job("b", job("b", "queued"), T0)
    m.apply_job("a", job("a", "building", attempt=1), T0 + 1)
    s = m.snapshot(T0 + 2)
    assert list(s.stages) == list(STAGE_ORDER)
    assert (s.stages["queued"], s.stages["building"], s.stages["shipped"], s.jobs_total) == (1, 1, 0, 2)
    m.apply_job("a", job("a", "shipped", attempt=1), T0 + 3)
    m.apply_job("b", None, T0 + 4)  # archived (deleted from gf_jobs)
    s = m.snapshot(T0 + 5)
    assert (s.stages["queued"], s.stages["building"], s.stages["shipped"], s.jobs_total) == (0, 0, 1, 1)


def test_pool_depth_and_oldest_age_count_only_queued_jobs_and_keep_a_requeued_jobs_new_wait():
    m = TopModel()
    m.apply_pool("p1", orjson.dumps({"id": "p1", "requirements": ["os:linux"], "created_at": T0}), T0)
    m.apply_pool("p0", orjson.dumps({"id": "p0", "requirements": ["gpu"], "created_at": T0}), T0)
    m.apply_job("old", job("old", "queued", submitted_at=T0 - 100), T0 - 99)
    m.apply_job("new", job("new", "queued", submitted_at=T0 - 10), T0 - 9)
    m.apply_job("run", job("run", "building", attempt=1), T0)
    # a hold's reason changes the record but not the wait
    m.apply_job("old", job("old", "queued", submitted_at=T0 - 100), T0 - 5)
    [p1, p0] = m.snapshot(T0).pools  # the deepest first
    assert (p1.pool, p1.requirements, p1.depth, p1.oldest_age_s) == ("p1", "os:linux", 2, 100.0)
    assert (p0.pool, p0.depth, p0.oldest_age_s) == ("p0", 0, None)
    m.apply_job("old", job("old", "building", attempt=1), T0 + 1)
    m.apply_job("old", job("old", "queued", attempt=1), T0 + 2)  # requeued: waits from now
    [p1, _] = m.snapshot(T0 + 12).pools
    assert (p1.depth, p1.oldest_age_s) == (2, 22.0)
    m.apply_job("old", None, 0)
    m.apply_job("new", None, 0)
    assert [(p.pool, p.depth) for p in m.snapshot(T0 + 12).pools] == [("p0", 0), ("p1", 0)]


def test_factory_rows_show_stations_idle_reasons_engines_mode_and_liveness():
    m = TopModel()
    m.apply_factory("f1", factory("f1", busy=1, idle=("no-work", "no-work", "seat-limit"), mode="poll",
                                  caps=("engine:shell", "engine:claude:2.1", "os:linux"), seats={"claude": 2}), T0)
    m.apply_factory("f0", factory("f0", status="draining"), T0)
    m.apply_pool("p1", orjson.dumps({"id": "p1", "requirements": [], "created_at": T0}), T0)
    s = m.snapshot(T0 + 14)
    f0, f1 = s.factories
    assert (f1.factory, f1.mode, f1.busy, f1.stations, f1.live) == ("f1", "poll", 1, 4, True)
    assert f1.idle == "2 no-work, 1 seat-limit"
    assert f1.engines == "claude(2) shell"
    assert (f1.outbox, f1.heartbeat_age_s) == (2, 14.0)
    assert not f0.live and f0.status == "draining"
    assert s.pools[0].live_factories == 1
    s = m.snapshot(T0 + 16)  # three heartbeat periods (5 s) without one: not live
    assert [f.live for f in s.factories] == [False, False]
    assert s.pools[0].live_factories == 0
    m.apply_factory("f1", None, T0 + 20)
    assert [f.factory for f in m.snapshot(T0 + 20).factories] == ["f0"]


def test_spend_sums_attempt_costs_by_engine_with_their_source_once_per_attempt():
    m = TopModel()
    m.apply_job("a", job("a", "building", attempt=1, attempts=[attempt("claude", 0.5, "priced")]), T0)
    # the same job's next revision, with a second attempt: the first is not counted twice
    m.apply_job("a", job("a", "shipped", attempt=2, attempts=[attempt("claude", 0.5, "priced"),
                                                            attempt("claude", 0.25, "reported")]), T0 + 1)
    m.apply_job("b", job("b", "failed", attempt=1, attempts=[attempt("codex", None, "unknown"),
                                                           {"attempt": 2, "epoch": 2, "factory": "f", "station": 0,
                                                            "engine": "shell"}]), T0)
    s = m.snapshot(T0 + 2)
    assert [(r.engine, r.cost_usd, r.attempts, r.sources) for r in s.spend] == [
        ("claude", 0.75, 2, "priced+reported"), ("codex", 0.0, 1, "unknown")]
    assert s.spend_total_usd == 0.75
    m.apply_job("a", None, T0 + 3)  # archived: what it spent stays spent
    assert m.snapshot(T0 + 3).spend_total_usd == 0.75


def test_events_keep_the_newest_n_newest_first_and_ships_per_minute_over_the_window():
    m = TopModel(events_max=3, throughput_window_s=60.0)
    for i in range(5):
        m.apply_event(event("result", T0 + i, job_id=f"j{i}", stage_from="building", stage_to="shipped",
                            factory_id="f1"))
    m.apply_event(event("claimed", T0 + 5, job_id="j9", stage_from="queued", stage_to="assigned"))
    m.apply_event(event("dispatched", T0 + 6, job_id="j9", stage_from="queued", stage_to="queued"))
    s = m.snapshot(T0 + 10)
    assert [(e.job, e.kind, e.change) for e in s.events] == [
        ("j9", "dispatched", "queued"), ("j9", "claimed", "queued→assigned"), ("j4", "result", "building→shipped")]
    assert (s.ships_seen, s.ships_per_min) == (5, 5.0)
    assert m.snapshot(T0 + 62).ships_per_min == 3.0  # the ships at T0 and T0+1 left the window
    assert m.snapshot(T0 + 200).ships_per_min == 0.0
    assert m.snapshot(T0 + 200).ships_seen == 5


def test_ships_arriving_out_of_time_order_each_count_in_the_window():
    m = TopModel(throughput_window_s=60.0)
    for at in (T0 + 10, T0 + 12, T0 + 11, T0 + 5, T0 + 12.5, T0 - 100):  # stream order, not time order
        m.apply_event(event("finished", at, stage_from="building", stage_to="shipped"))
    s = m.snapshot(T0 + 20)
    assert (s.ships_seen, s.ships_per_min) == (6, 5.0)  # the one 100 s old is outside the window
    assert m.snapshot(T0 + 71).ships_per_min == 3.0  # T0+5 and T0+10 left it


def test_a_replay_forgets_what_was_deleted_while_the_watch_was_away():
    m = TopModel()
    m.apply_job("a", job("a", "queued"), T0)
    m.apply_job("b", job("b", "building", attempt=1), T0)
    m.apply_factory("gone", factory("gone"), T0)
    m.begin_replay("jobs")
    m.apply_job("a", job("a", "queued"), T0)  # b was archived meanwhile: not replayed
    m.end_replay("jobs")
    m.begin_replay("factories")
    m.end_replay("factories")
    s = m.snapshot(T0 + 1)
    assert (s.jobs_total, s.stages["queued"], s.stages["building"]) == (1, 1, 0)
    assert s.factories == []


def test_unreadable_entries_are_counted_and_left_out():
    m = TopModel()
    m.apply_job("a", job("a", "queued"), T0)
    m.apply_job("a", b"{not json", T0 + 1)
    m.apply_factory("f", b"[]", T0)
    m.apply_event(b"\x00")
    s = m.snapshot(T0 + 2)
    assert (s.unreadable, s.jobs_total, s.stages["queued"], s.factories, s.events) == (3, 0, 0, [], [])


def test_bad_limits_are_refused_by_name():
    with pytest.raises(ValueError, match="events_max"):
        TopModel(events_max=0)
    with pytest.raises(ValueError, match="throughput_window_s"):
        TopModel(throughput_window_s=0)


def test_memory_per_job_is_a_few_hundred_bytes_never_the_record_and_events_stay_bounded():
    # 20,000 jobs (tracemalloc slows every allocation): the figure per job is what 100,000 cost
    n = 20_000
    m = TopModel(events_max=100)
    values = [job(f"job-{i}", "queued" if i % 2 else "shipped", pool=f"p{i % 7}") for i in range(1000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            m.apply_job(f"job-{i}", values[i % 1000], T0)
            m.apply_event(event("finished", T0 + i / 1000, job_id=f"job-{i}", stage_from="building",
                                stage_to="shipped"))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    s = m.snapshot(T0 + 100)
    assert (s.jobs_total, s.stages["queued"], s.stages["shipped"], len(s.events)) == (n, n // 2, n // 2, 100)
    assert sum(p.depth for p in s.pools) == n // 2
    # each record is 300+ bytes of JSON and a decoded JobRecord several kB: none is kept
    assert held / n < 400, f"{held / n:.0f} bytes a job"


def test_format_age():
    assert [format_age(x) for x in (None, 0, 59.9, 60, 185, 7620, 273600)] == [
        "-", "0s", "59s", "1m00s", "3m05s", "2h07m", "3d04h"]


# -- the app against a live fleet ----------------------------------------------------------------


def cells(table, row_key: str) -> list[str]:
    return [str(c) for c in table.get_row(row_key)]


def rows(table) -> list[list[str]]:
    return [[str(c) for c in table.get_row(k)] for k in list(table.rows)]


def test_top_shows_stage_counts_a_factory_row_and_events_of_a_live_fleet_and_q_quits(nats_server, tmp_path, declared_cli):
    from textual.widgets import DataTable, Static
    from textual.worker import WorkerState

    from gigafactory.top import TopApp

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(engines_dir=str(declared_cli))) as fleet:
            await fleet.add_factory("top-f1", stations=2, caps=["topcap"])
            await fleet.add_factory("top-agent", probe=True)
            # a declared agent CLI that reports tokens: its attempt's usage is priced
            spender = await fleet.submit_one(fleet.job("Create hello.txt.", engine="fakecli", review_policy="auto"),
                                             path="spend.md")
            await fleet.wait_stage(spender, "shipped", timeout_s=60)
            jobs = [j["job"] for j in await fleet.submit(
                *(fleet.job(f"echo {i}", capabilities=["topcap"], review_policy="auto") for i in range(3)),
                fleet.job("exit 3", capabilities=["topcap"], review_policy="auto", retry={"max": 0}))]
            for j in jobs[:3]:
                await fleet.wait_stage(j, "shipped")
            await fleet.wait_stage(jobs[3], "failed", "dead_letter")

            nc = await connect(nats_server.url, "test-top", fleet.settings)
            app = TopApp(nc, url=nats_server.url, refresh_s=0.1)
            try:
                async with app.run_test(size=(180, 60)) as pilot:
                    stages = app.query_one("#stages", DataTable)
                    factories = app.query_one("#factories", DataTable)
                    events = app.query_one("#events", DataTable)
                    pools = app.query_one("#pools", DataTable)

                    def shown():
                        if "top-f1" not in factories.rows or "shipped" not in stages.rows:
                            return False
                        # a factory publishes its events after the record writes they describe
                        shipped = {r[2] for r in rows(events) if r[3].endswith("→shipped")}
                        return cells(stages, "shipped")[1] == "4" and shipped >= {spender, *jobs[:3]}

                    try:
                        await eventually(shown, 15, what="stage counts, the factory and the events on screen")
                    except AssertionError as e:
                        raise AssertionError(f"{e}\nsummary: {app.query_one('#summary', Static).render()}\n"
                                             f"stages: {rows(stages)}\nfactories: {rows(factories)}\n"
                                             f"events: {rows(events)[:5]}") from None
                    assert cells(stages, "shipped") == ["shipped", "4"]
                    failed = int(cells(stages, "failed")[1]) + int(cells(stages, "dead_letter")[1])
                    assert failed == 1
                    assert cells(stages, "queued") == ["queued", "0"]
                    # stations change in the factory's record at its next heartbeat
                    await eventually(lambda: cells(factories, "top-f1")[4] == "0/2 busy", 10,
                                     what=f"top-f1's stations free: {cells(factories, 'top-f1')}")
                    f = cells(factories, "top-f1")
                    assert f[0] == "top-f1" and f[2] == "yes" and f[3] == "push"
                    assert f[5] == "2 no-work" and f[6] == "shell", f
                    assert "fakecli" in cells(factories, "top-agent")[6]
                    assert any(r[2] == jobs[0] and r[3] == "building→shipped" and r[4] == "top-f1"
                               for r in rows(events)), rows(events)
                    # the factory's record names the pools it serves at its next heartbeat
                    await eventually(lambda: ["engine:shell topcap", "0", "-", "1"] in [r[1:] for r in rows(pools)],
                                     10, what=f"the pool served by one live factory: {rows(pools)}")
                    summary = str(app.query_one("#summary", Static).render())
                    assert "5 jobs" in summary and "4 ships seen" in summary, (summary, rows(events))
                    spend = app.query_one("#spend", DataTable)
                    [[engine, attempts, cost_usd, source]] = rows(spend)
                    assert (engine, attempts, source) == ("fakecli", "1", "priced") and float(cost_usd) > 0, rows(spend)
                    assert f"${float(cost_usd):.4f} spent" in summary, summary

                    # a job queued with no factory for it shows as the pool's depth, live
                    held = await fleet.submit_one(fleet.job("echo later", capabilities=["nobody-has-this"]))
                    await eventually(lambda: any("nobody-has-this" in r[1] and r[2] == "1" for r in rows(pools)),
                                     15, what="a queued job in its pool's depth")
                    assert cells(stages, "queued") == ["queued", "1"]
                    assert held in [r[2] for r in rows(events)]

                    await pilot.press("q")
                    await eventually(lambda: not app.is_running, 10, what="the app exits on q")
                assert app.return_code == 0
                # the feed (its watches and consumer) ended with the app, not left running
                assert app.feed_worker.state == WorkerState.CANCELLED, app.feed_worker.state
            finally:
                await nc.close()

    run(main(), 90)


def test_top_started_before_the_coordinator_says_what_it_cannot_watch_then_follows_the_fleet(nats_server, tmp_path):
    from textual.widgets import DataTable, Static

    from gigafactory.top import TopApp

    async def main():
        nc = await connect(nats_server.url, "test-top-early", fast_settings())
        app = TopApp(nc, url=nats_server.url, refresh_s=0.1)
        try:
            async with app.run_test(size=(160, 50)) as pilot:
                summary = app.query_one("#summary", Static)
                await eventually(lambda: "gf_jobs: not watched" in str(summary.render()), 15,
                                 what="the missing bucket named on screen")
                async with Fleet(nats_server.url, tmp_path) as fleet:
                    await fleet.add_factory("early-f1")
                    job_id = await fleet.submit_one(fleet.job("echo hi", review_policy="auto"))
                    await fleet.wait_stage(job_id, "shipped")
                    stages = app.query_one("#stages", DataTable)
                    await eventually(lambda: str(stages.get_row("shipped")[1]) == "1"
                                     and "early-f1" in app.query_one("#factories", DataTable).rows, 15,
                                     what="the fleet that started after top, on screen")
                    assert "not watched" not in str(summary.render())
                    await pilot.press("q")
        finally:
            await nc.close()

    run(main(), 90)


# -- submit --wait's progress display (rich, textual's own renderer) ------------------------------


def test_submit_wait_progress_on_a_terminal_is_a_rich_display_of_jobs_at_rest_and_counts_by_stage():
    import io

    from rich.console import Console

    from gigafactory.cli import _progress_printer

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    show, done = _progress_printer(False, console)
    show({"a": {"stage": "queued"}, "b": {"stage": "queued"}, "c": {"stage": "building"}})
    show({"a": {"stage": "shipped"}, "b": {"stage": "failed"}, "c": {"stage": "building"}})
    done()
    text = out.getvalue()
    last = text.rstrip().rsplit("\r", 1)[-1].rsplit("\x1b[2K", 1)[-1]
    assert "2/3" in last and "1 building · 1 shipped · 1 failed" in last, repr(text)
    assert "\x1b[" in text, "drawn in place by rich's cursor control, not a bare \\r line"
    assert text.endswith("\n\x1b[?25h"), "left on screen, then the next line, with the cursor shown again"


def test_submit_wait_progress_off_a_terminal_is_one_plain_line_per_change(capsys):
    import io

    from rich.console import Console

    from gigafactory.cli import _progress_printer

    show, done = _progress_printer(False, Console(file=io.StringIO(), force_terminal=False))
    show({"a": {"stage": "queued"}})
    show({"a": {"stage": "queued"}})  # no change: no line
    show({"a": {"stage": "shipped"}})
    done()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["1 queued", "1 shipped"]
    assert not any("\r" in line or "\x1b" in line for line in lines)
    show_json, _ = _progress_printer(True, Console(file=io.StringIO(), force_terminal=True))
    show_json({"a": {"stage": "queued"}})
    assert capsys.readouterr().err == ""


# -- the command in a real terminal ----------------------------------------------------------------


class Pty:
    """A process on a pseudo-terminal of a fixed size: what a user's terminal gives ``top``."""

    def __init__(self, args: list[str], env: dict[str, str], cols: int = 160, rows: int = 48) -> None:
        import fcntl
        import os
        import struct
        import subprocess
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     close_fds=True)
        os.close(slave)
        self.screen = b""

    def read_until(self, needles: list[bytes], timeout_s: float) -> bool:
        """Read the terminal's output until every needle has appeared (True) or ``timeout_s``."""
        import os
        import select
        import time

        deadline = time.monotonic() + timeout_s
        while not all(n in self.screen for n in needles):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # the process closed the terminal
                    return all(n in self.screen for n in needles)
        return True

    def send(self, data: bytes) -> None:
        import os

        os.write(self.master, data)

    def close(self) -> None:
        import os

        from helpers import kill_group

        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        self.proc.wait(10)
        os.close(self.master)


def test_the_top_command_draws_the_fleet_in_a_real_terminal_and_q_exits_zero(nats_server, tmp_path):
    from helpers import fast_env, gigafactory_cmd

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("pty-factory-7", caps=["ptycap"])
            job_id = await fleet.submit_one(fleet.job("echo hi", capabilities=["ptycap"], review_policy="auto"))
            await fleet.wait_stage(job_id, "shipped")
            env = fast_env()
            env.update(TERM="xterm-256color", COLUMNS="160", LINES="48")
            env.pop("GIGAFACTORY_NATS_URL", None)
            term = Pty([*gigafactory_cmd(), "top", "--nats", nats_server.url], env)
            try:
                seen = await asyncio.to_thread(term.read_until, [b"pty-factory-7", job_id.encode(), b"shipped"], 30)
                assert seen, f"the fleet did not appear on the terminal: {term.screen[-3000:]!r}"
                term.send(b"q")
                code = await asyncio.to_thread(term.proc.wait, 15)
                assert code == 0, term.screen[-3000:]
            finally:
                term.close()

    run(main(), 90)


def test_the_top_command_without_a_broker_says_so_and_exits_unavailable(tmp_path):
    import socket
    import subprocess

    from helpers import fast_env, gigafactory_cmd

    from gigafactory.clitools import EXIT_UNAVAILABLE

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([*gigafactory_cmd(), "top", "--nats", f"nats://127.0.0.1:{port}"], env=fast_env(),
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == EXIT_UNAVAILABLE, (r.returncode, r.stderr)
    assert f"cannot connect to nats://127.0.0.1:{port}" in r.stderr, r.stderr
