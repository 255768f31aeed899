"""The kill switch (issue 12): ``gigafactory halt [--product P] [--drain|--stop]`` and
``resume``, on a real nats-server with real factories and the real CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from helpers import Fleet, eventually, fast_env, gigafactory_cmd, run

from gigafactory.broker import Broker
from gigafactory.coordinator.service import Coordinator
from gigafactory.metrics import hold_class
from gigafactory.schemas import halt as H

pytestmark = pytest.mark.timeout(120)


def _waiter(flag: str) -> str:
    """A job that runs until the test creates ``flag`` (bounded: 60 s)."""
    return f"""```sh
echo started
for i in $(seq 1200); do [ -f "{flag}" ] && break; sleep 0.05; done
[ -f "{flag}" ] && echo finished
```
"""


def _cli(url: str, *args: str) -> dict:
    out = subprocess.run([*gigafactory_cmd(), *args, "--nats", url, "--json"], capture_output=True, text=True,
                         timeout=60, env=fast_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def _cli_async(url: str, *args: str) -> dict:
    return await asyncio.to_thread(_cli, url, *args)


async def _still_queued_after_passes(fleet: Fleet, job: str, passes: int = 6) -> None:
    """``job`` stays queued while the coordinator dispatches ``passes`` more times and every
    factory heartbeats (the proof that nothing took it, without sleeping)."""
    sched = fleet.coordinator.sched
    start = sched.passes
    beats = {fid: f.record.heartbeat_at for fid, f in fleet.factories.items()}
    await eventually(lambda: sched.passes >= start + passes and all(
        f.record.heartbeat_at > beats[fid] for fid, f in fleet.factories.items()), 15, what="passes and heartbeats")
    rec, _ = await fleet.record(job)
    assert str(rec.stage) == "queued" and rec.reason.startswith("halted"), (rec.stage, rec.reason)


# -- pure ----------------------------------------------------------------------------------------


def test_the_halt_state_covers_the_fleet_or_one_product_and_resumes_by_scope():
    s = H.halt(H.HaltState(), product="web", mode="stop", at=1.0, actor="ann")
    assert H.covering(s, "web").mode == "stop" and H.covering(s, "api") is None
    assert H.hold_reason(s, "web").startswith("halted: product web (stop) by ann")
    s = H.halt(s, product=None, mode="drain", at=2.0, actor="bob", reason="incident 7")
    assert H.covering(s, "api").mode == "drain" and H.hold_reason(s, "api").startswith("halted: the fleet")
    assert H.decode_state(H.encode_state(s)) == s
    s = H.resume(s, product=None)
    assert H.covering(s, "api") is None and H.covering(s, "web") is not None, "a product halt outlives the fleet's"
    assert not H.resume(s, product="web").any
    with pytest.raises(H.HaltError, match="drain, stop"):
        H.halt(s, product=None, mode="panic", at=0, actor="")
    with pytest.raises(H.HaltError, match="not a product name"):
        H.halt(s, product="a b", mode="stop", at=0, actor="")
    with pytest.raises(H.HaltError, match="not readable"):
        H.decode_state(b"{garbage")
    assert hold_class(H.hold_reason(s, "web")) == "halted"


# -- drain ---------------------------------------------------------------------------------------


def test_halt_drain_lets_running_jobs_finish_holds_queued_ones_and_resume_dispatches(nats_server, tmp_path):
    flag = tmp_path / "go"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            running = await fleet.submit_one(fleet.job(_waiter(str(flag)), review_policy="auto"))
            await fleet.wait_stage(running, "building")
            out = await _cli_async(nats_server.url, "halt", "--drain", "--reason", "incident 7")
            assert out["halt"]["halted"] and out["halt"]["fleet"]["mode"] == "drain"
            queued = await fleet.submit_one(fleet.job("echo later", review_policy="auto"), "later.md")
            flag.write_text("go")
            rec = await fleet.wait_stage(running, "shipped", "failed", timeout_s=30)
            assert str(rec.stage) == "shipped", "drain: the running job finished"
            await _still_queued_after_passes(fleet, queued)
            st = await fleet.client.call("status", {"job": queued})
            assert st["why"].startswith("halted: the fleet (drain)") and "incident 7" in st["why"]
            assert st["info"]["halted"] is True
            facs = await fleet.client.call("factories")
            assert facs["halt"]["halted"] and "fleet halted (drain" in facs["halt"]["summary"]
            held = [e for e in await fleet.events(queued) if e["kind"] == "held"]
            assert held and held[-1]["reason"].startswith("halted")

            out = await _cli_async(nats_server.url, "resume")
            assert not out["halt"]["halted"]
            await fleet.wait_stage(queued, "shipped", timeout_s=20)

    run(main(), 100)


# -- stop ----------------------------------------------------------------------------------------


def test_halt_stop_stops_running_jobs_and_hands_them_back_fenced_then_resume_runs_them(nats_server, tmp_path):
    flag = tmp_path / "go"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job(_waiter(str(flag)), review_policy="auto"))
            before = await fleet.wait_stage(job, "building")
            logs = tmp_path / "factories" / "f1" / "logs"
            # Building is written before the engine starts: halt once the script runs, so the
            # log shows what the stop cut short.
            await eventually(lambda: "started" in "".join(p.read_text() for p in logs.glob(f"{job}-*.log")), 15,
                             what="the job's script started")
            await fleet.client.call("halt", {"mode": "stop", "actor": "ops"})
            rec = await fleet.wait_stage(job, "queued", timeout_s=15)
            assert rec.epoch > before.epoch, "handed back with a bumped epoch: the old holder is fenced"
            assert rec.attempts[-1].outcome == "handed_back" and "halted" in rec.attempts[-1].detail
            assert rec.retries_used == before.retries_used, "a stop is not charged as a retry"
            assert f.stats["handed_back"] == 1 and not f.runs
            log = (tmp_path / "factories" / "f1" / "logs").glob(f"{job}-*.log")
            text = "".join(p.read_text() for p in log)
            assert "started" in text and "finished" not in text and "cancelled" in text
            await _still_queued_after_passes(fleet, job)
            flag.write_text("go")
            await fleet.client.call("resume", {})
            rec = await fleet.wait_stage(job, "shipped", timeout_s=30)
            assert rec.attempts[-1].epoch == rec.epoch and "finished" in "".join(
                p.read_text() for p in (tmp_path / "factories" / "f1" / "logs").glob(f"{job}-*.log"))

    run(main(), 100)


def test_a_factory_refuses_a_dispatch_message_already_out_for_a_halted_job(nats_server, tmp_path):
    """The scheduler holds halted jobs, but a message published before the halt (or by
    another coordinator that has not read it yet) still reaches a factory: the factory's own
    check refuses it."""
    from gigafactory.coordinator.intake import ensure_pool
    from gigafactory.schemas import names
    from gigafactory.schemas.records import DispatchMessage, encode

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            await fleet.client.call("halt", {"product": "web", "mode": "drain"})
            job = await fleet.submit_one(fleet.job("echo ran > ran.txt", review_policy="auto", product="web"))
            await eventually(lambda: H.covering(f.halt_state, "web") is not None, 10, what="the factory read the halt")
            rec, _ = await fleet.record(job)
            assert await ensure_pool(fleet.admin, rec.pool, rec.requirements)
            skipped = f.stats["claim_skipped"]
            await fleet.admin.js.publish(names.dispatch_subject(rec.pool),
                                         encode(DispatchMessage(job=job, epoch=rec.epoch, pool=rec.pool)))
            await eventually(lambda: f.stats["claim_skipped"] > skipped, 15, what="the factory looked at the offer")
            rec, _ = await fleet.record(job)
            assert str(rec.stage) == "queued" and not rec.attempts, (rec.stage, rec.attempts)
            assert not (fleet.repo / "ran.txt").exists()

    run(main(), 60)


# -- restart and scope ---------------------------------------------------------------------------


def test_a_restarted_coordinator_keeps_the_halt_and_one_product_halt_leaves_the_others(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1", stations=2)
            await fleet.client.call("halt", {"product": "web", "mode": "drain"})
            web = await fleet.submit_one(fleet.job("echo web", review_policy="auto", product="web"), "web.md")
            api = await fleet.submit_one(fleet.job("echo api", review_policy="auto", product="api"), "api.md")
            await fleet.wait_stage(api, "shipped", timeout_s=20)
            await _still_queued_after_passes(fleet, web)

            # A new coordinator (the old one stopped) reads the halt before it dispatches anything.
            await fleet.stop("<coordinator>")
            cb = await Broker.open(fleet.url, "test-coordinator-2", fleet.settings)
            coord = Coordinator(cb, fleet.settings)
            stop = asyncio.Event()
            task = asyncio.create_task(coord.run(stop))
            try:
                await eventually(lambda: coord.ready.is_set(), 30, what="second coordinator ready")
                assert H.covering(coord.sched.halt, "web") is not None
                fleet.coordinator = coord
                await _still_queued_after_passes(fleet, web)
                api2 = await fleet.submit_one(fleet.job("echo api2", review_policy="auto", product="api"), "a2.md")
                await fleet.wait_stage(api2, "shipped", timeout_s=20)
                out = await fleet.client.call("resume", {"product": "web"})
                assert not out["halt"]["halted"]
                await fleet.wait_stage(web, "shipped", timeout_s=20)
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
                await cb.close()

    run(main(), 110)


# -- top -----------------------------------------------------------------------------------------


def test_top_model_shows_the_halt_and_forgets_it_when_deleted():
    from gigafactory.topmodel import TopModel

    m = TopModel()
    assert m.snapshot(10.0).halt == ""
    m.apply_control(H.HALT_KEY, H.encode_state(H.halt(H.HaltState(), product="web", mode="stop", at=1.0,
                                                        actor="ann")), 1.0)
    assert m.snapshot(10.0).halt == "product web halted (stop, by ann)"
    m.apply_control(H.HALT_KEY, b"{nonsense", 2.0)
    assert "not readable" in m.snapshot(10.0).halt
    m.apply_control(H.HALT_KEY, None, 3.0)
    assert m.snapshot(10.0).halt == ""


def test_top_shows_a_live_halt_in_its_header(nats_server, tmp_path):
    from textual.widgets import Static

    from gigafactory.broker import connect
    from gigafactory.top import TopApp

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            nc = await connect(nats_server.url, "test-top", fleet.settings)
            app = TopApp(nc, url=nats_server.url, refresh_s=0.1)
            try:
                async with app.run_test(size=(160, 50)) as pilot:
                    summary = lambda: str(app.query_one("#summary", Static).render())  # noqa: E731
                    await eventually(lambda: "jobs" in summary(), 15, what="top drawn")
                    assert "HALTED" not in summary()
                    await fleet.client.call("halt", {"mode": "stop", "actor": "ops"})
                    await eventually(lambda: "HALTED: fleet halted (stop, by ops)" in summary(), 15,
                                     what=f"the halt in top's header: {summary()}")
                    await fleet.client.call("resume", {})
                    await eventually(lambda: "HALTED" not in summary(), 15, what="the halt gone from the header")
                    await pilot.press("q")
            finally:
                await nc.close()

    run(main(), 90)
