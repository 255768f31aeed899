"""An idle factory costs its heartbeat and its long polls, nothing else.

A thousand idle factories share two cores with the coordinator, so a factory that waits for
work must not wake up to find nothing: it hears new pools as they are written (no timer, no
KV watch with its own heartbeats), and its outbox flusher sleeps while the outbox is empty.
These tests count the work through the factory's counters, against a real broker.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gigafactory.broker import PING_MAX_S, PING_MIN_S, Broker, ping_interval_s
from gigafactory.chaos.proxy import FaultProxy
from gigafactory.config import Settings
from gigafactory.coordinator.intake import ensure_pool
from gigafactory.factory.agent import Factory
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names
from gigafactory.schemas.records import QueueEntry, encode

from helpers import Fleet, eventually, fast_settings
from test_chaos import job_text_record


async def _heartbeats(f: Factory, n: int) -> None:
    """Wait until ``f`` has written ``n`` more heartbeats (the visible clock of an idle factory)."""
    start = f.record.heartbeat_at
    period = f.settings.heartbeat_s
    await eventually(lambda: f.record.heartbeat_at >= start + (n - 0.5) * period, 10 + n * period,
                     what=f"{n} heartbeats of {f.id}")


def test_an_idle_factory_reads_the_pools_once_and_hears_new_pools_without_polling(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("idle-1", caps=["gpu"])
            await _heartbeats(f, 3)
            assert f.stats["pool_scans"] == 1, "the pools are read once at start, not on a timer"
            assert f.stats["outbox_wakeups"] == 0, "an empty outbox does not wake its flusher"

            served = caps.pool_id(["engine:shell", "gpu"])
            other = caps.pool_id(["engine:shell", "docker"])
            await ensure_pool(fleet.admin, other, ["engine:shell", "docker"])
            await ensure_pool(fleet.admin, served, ["engine:shell", "gpu"])
            await eventually(lambda: served in f.pools, 10, what="the new pool is bound")
            assert other not in f.pools, "a pool whose requirements the factory lacks is not bound"
            assert f.stats["pool_scans"] == 1, "a new pool arrives by subscription, without a scan"
            assert f.stats["pool_records"] == 2, "each pool record was heard once"

    asyncio.run(main())


def test_a_factory_reads_the_pools_again_after_a_reconnect_and_binds_one_written_meanwhile(nats_server, tmp_path):
    async def main():
        settings = fast_settings()
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            host, port = nats_server.url.removeprefix("nats://").split(":")
            async with FaultProxy(host, int(port)) as proxy:
                b = await Broker.open(proxy.url, "test-factory-proxied", settings)
                f = Factory(b, factory_id="proxied", stations=1, probe=False, settings=settings,
                            workspace=str(tmp_path / "work"), data_dir=str(tmp_path / "factories"))
                stop = asyncio.Event()
                task = asyncio.create_task(f.run(stop))
                try:
                    await asyncio.wait_for(f.ready.wait(), 30)
                    assert f.stats["pool_scans"] == 1
                    proxy.drop(1.0)  # new connections are closed at once: the factory stays away
                    proxy.reset()
                    await eventually(lambda: not b.nc.is_connected, 10, what="the factory is disconnected")
                    missed = caps.pool_id(["engine:shell"])
                    await ensure_pool(fleet.admin, missed, ["engine:shell"])
                    assert missed not in f.pools
                    proxy.heal()
                    await eventually(lambda: missed in f.pools, 20, what="the pool written while away is bound")
                    assert f.stats["pool_scans"] == 2, "one scan at start, one after the reconnect"
                finally:
                    stop.set()
                    await asyncio.wait_for(task, 30)
                    await b.close()

    asyncio.run(main())


def test_client_pings_follow_the_heartbeat_within_a_floor_and_a_ceiling():
    """Pings follow the heartbeat, but a longer heartbeat (the default is 20 s) does not make
    a silent connection take longer to notice: never more than PING_MAX_S between pings."""
    assert ping_interval_s(Settings(heartbeat_s=7.0)) == 14.0
    assert ping_interval_s(Settings()) == PING_MAX_S == 20.0
    assert ping_interval_s(Settings(heartbeat_s=60.0)) == PING_MAX_S
    assert ping_interval_s(Settings(heartbeat_s=0.5)) == PING_MIN_S


# -- the stall check of an idle pool ----------------------------------------------------------------

STALL_SETTINGS = dict(redispatch_s=0.5, long_poll_s=0.5)
"""A stall check every 1.5 s (three redispatch periods), a stall visible after 1.5 s."""


def test_an_idle_factory_whose_pool_has_nothing_queued_sends_no_stall_check_requests(nats_server, tmp_path):
    """Once a check has found the pool's queue index empty, later checks send nothing: the
    check's one-shot subscription to the index would have heard a write. Only every
    ``QUIET_PROBE_EVERY_CHECKS``-th check sends one direct get ("written since?"); none sends an
    index scan (a consumer created and deleted), a consumer lookup or a broker-clock probe.
    Attributed to the factory by the reply subjects of its requests."""
    from gigafactory.factory.pools import QUIET_PROBE_EVERY_CHECKS

    settings = fast_settings(**STALL_SETTINGS)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("quiet", caps=["quiet"])
            job = await fleet.submit_one(fleet.job(capabilities=["quiet"], review_policy="auto"))
            await fleet.wait_stage(job, "shipped")
            await eventually(lambda: f.stats["stall_listens"] >= 1, 30, what="a check of the quiet index")
            [ps] = f.pools.values()

            sent: list[str] = []
            prefix = bytes(f.broker.nc._resp_sub_prefix).decode()  # nats-py's inbox for this connection's requests

            async def heard(msg) -> None:
                if msg.reply.startswith(prefix):
                    sent.append(msg.subject)

            clock_key = f"$KV.gf_clock.{names.safe_key(f.broker.client_id)}"
            subs = [await fleet.admin.nc.subscribe("$JS.API.>", cb=heard),
                    await fleet.admin.nc.subscribe(clock_key, cb=heard)]
            await fleet.admin.nc.flush()
            checks, probes, listens = f.stats["stall_checks"], f.stats["stall_probes"], f.stats["stall_listens"]
            await eventually(lambda: f.stats["stall_listens"] >= listens + 4, 30, what="four more quiet checks")
            await fleet.admin.nc.flush()
            window_probes = f.stats["stall_probes"] - probes
            for s in subs:
                await s.unsubscribe()
            return ps, sent, f.stats["stall_checks"] - checks, window_probes, f.stats["polled_claims"]

    ps, sent, checks, probes, polled = asyncio.run(asyncio.wait_for(main(), 80))

    assert checks == 0, "a full stall check ran although nothing was written to the index"
    assert QUIET_PROBE_EVERY_CHECKS > 5 and probes <= 1, f"{probes} probes in five quiet checks"
    direct = [s for s in sent if s == "$JS.API.DIRECT.GET.KV_gf_queue"]
    others = [s for s in sent if s != "$JS.API.DIRECT.GET.KV_gf_queue"]
    assert others == [], f"an idle factory sent more than its probes: {sorted(set(others))}"
    assert len(direct) <= probes + 1, (probes, len(direct))
    assert ps.mode == "push" and polled == 0


def test_a_write_to_a_quiet_index_is_heard_and_the_next_check_reads_it_without_a_probe(nats_server, tmp_path):
    """The subscription, not a probe, tells the next check that the index changed: a full
    check follows at once, and finds the entry."""
    settings = fast_settings(**STALL_SETTINGS)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("hears", caps=["hears"])
            job = await fleet.submit_one(fleet.job(capabilities=["hears"], review_policy="auto"))
            await fleet.wait_stage(job, "shipped")
            await eventually(lambda: f.stats["stall_listens"] >= 1, 30, what="a check of the quiet index")
            [ps] = f.pools.values()
            probes, checks = f.stats["stall_probes"], f.stats["stall_checks"]
            # An entry for a job that does not exist: the check reads the index, and the
            # record read finds nothing to claim (no stall, nothing run).
            await fleet.admin.queue.put(names.queue_key(ps.id, "ghost-0001"), encode(QueueEntry(
                job="ghost-0001", priority_rank=2, submitted_at=0.0, epoch=0)))
            await eventually(lambda: ps.index_heard, 10, what="the write was heard")
            await eventually(lambda: f.stats["stall_checks"] > checks, 30, what="a full check")
            return f.stats["stall_probes"] - probes, ps.index_quiet

    probes, quiet = asyncio.run(asyncio.wait_for(main(), 80))
    assert probes == 0, "the write was heard: no probe was needed to find it"
    assert quiet is None, "the index holds an entry: it is not quiet"


def test_a_job_left_waiting_in_a_quiet_index_by_a_dead_coordinator_is_found_and_polled(nats_server, tmp_path):
    """The cheap probe must not hide a stall: with the coordinator gone, a queued job whose
    dispatch message was never published (its index entry written, nothing pushed) is seen
    by the next probe, judged stalled once it has waited ``stall_after_s``, and claimed by
    polling."""
    settings = fast_settings(**STALL_SETTINGS)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("watcher", caps=["orphan"])
            job = await fleet.submit_one(fleet.job(capabilities=["orphan"], review_policy="auto"))
            shipped = await fleet.wait_stage(job, "shipped")
            await eventually(lambda: f.stats["stall_probes"] >= 1, 30, what="a probe of the quiet index")
            [ps] = f.pools.values()
            await fleet.stop("<coordinator>")

            rec = msgspec.structs.replace(job_text_record("orphan-1"), pool=ps.id, requirements=ps.requirements,
                                          manifest=msgspec.structs.replace(shipped.manifest, cwd=str(fleet.repo)))
            await fleet.admin.jobs.put(rec.id, encode(rec))
            await fleet.admin.queue.put(names.queue_key(ps.id, rec.id), encode(QueueEntry(
                job=rec.id, priority_rank=rec.priority_rank, submitted_at=rec.submitted_at, epoch=rec.epoch)))
            await eventually(lambda: f.stats["polled_claims"] == 1, 30, what="the orphaned job is claimed by polling")
            return f.stats["stall_checks"], f.stats["claims"]

    checks, claims = asyncio.run(asyncio.wait_for(main(), 80))

    assert claims == 2, "the submitted job by push, the orphaned one by polling"
    assert checks >= 2, "the entry was seen young once, then stalled"


# -- the halt watch and the heartbeat ------------------------------------------------------------


async def _factory_watches(fleet: Fleet, stream: str) -> list:
    """The factories' watches of the control bucket (both keys); the coordinator's watch of the
    halt key alone (coordinator/halt.py) is left out."""
    return [c for c in await fleet.admin.js.consumers_info(stream) if c.config.filter_subject.endswith(".>")]


def test_an_idle_factory_follows_the_halt_key_without_flow_control_or_a_heartbeat_every_5s(nats_server, tmp_path):
    """A KV watch is an ordered consumer: a heartbeat from the broker every 5 s and a
    flow-control task waking every 0.25 s, per factory, to say that nothing changed. The halt
    watch is a plain push consumer whose heartbeat comes every ``WATCH_HEARTBEATS`` heartbeats;
    a halt still reaches the factory as soon as it is stored."""
    from gigafactory.factory.halting import watch_heartbeat_s
    from gigafactory.schemas import halt as H

    settings = fast_settings()

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("calm")
            stream = f"KV_{names.CONTROL_BUCKET}"
            [watch] = await eventually(lambda: _factory_watches(fleet, stream), 10, what="the halt watch")
            await fleet.client.call("halt", {"product": "web", "mode": "drain"})
            await eventually(lambda: H.covering(f.halt_state, "web") is not None, 10, what="the factory read the halt")
            return watch.config

    config = asyncio.run(asyncio.wait_for(main(), 60))
    assert not config.flow_control, "no flow control: no task waking four times a second per factory"
    assert config.idle_heartbeat == watch_heartbeat_s(settings) == 2 * settings.heartbeat_s
    assert config.ack_policy == "none" and config.mem_storage


def test_a_halt_watch_lost_on_the_broker_is_set_up_again_and_a_later_halt_still_arrives(nats_server, tmp_path):
    """With heartbeats this rare, a watch whose consumer vanished (deleted, or lost with the
    server that held it) must still be noticed: it goes silent, the factory watches again, and
    a halt written after the loss reaches it."""
    from gigafactory.schemas import halt as H

    settings = fast_settings()

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("lost")
            stream = f"KV_{names.CONTROL_BUCKET}"
            [watch] = await eventually(lambda: _factory_watches(fleet, stream), 10, what="the halt watch")
            await fleet.admin.js.delete_consumer(stream, watch.name)
            await fleet.client.call("halt", {"product": "web", "mode": "drain"})
            await eventually(lambda: H.covering(f.halt_state, "web") is not None, 30,
                             what="the halt reached the factory through a new watch")
            names_now = [c.name for c in await _factory_watches(fleet, stream)]
            return watch.name, names_now

    old, now = asyncio.run(asyncio.wait_for(main(), 60))
    assert old not in now and len(now) == 1, (old, now)


def test_periodic_heartbeats_are_stored_without_a_reply_and_the_first_one_is_acked(nats_server, tmp_path):
    """The periodic heartbeat is a plain publish to the key's subject (no reply inbox: half the
    messages of the put), and the bucket still stores each one: the coordinator's view sees
    the factory live, with a fresh ``heartbeat_at``."""
    from gigafactory.schemas.records import FactoryRecord, decode

    settings = fast_settings()

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            replies: list[str] = []

            async def heard(msg) -> None:
                replies.append(msg.reply)

            sub = await fleet.admin.nc.subscribe(f"$KV.{names.FACTORIES_BUCKET}.beating", cb=heard)
            await fleet.admin.nc.flush()
            f = await fleet.add_factory("beating")
            await _heartbeats(f, 3)
            e = await fleet.admin.factories.get("beating")
            stored = decode(e.value, FactoryRecord).heartbeat_at
            await sub.unsubscribe()
            return replies, stored, f.record.heartbeat_at

    replies, stored, last = asyncio.run(asyncio.wait_for(main(), 60))
    assert replies[0], "the first heartbeat (registration) is a put that waits for its ack"
    periodic = replies[1:]
    assert len(periodic) >= 2 and not any(periodic), replies
    assert stored >= last - 2 * FAST_HEARTBEAT_S, "the stored record has a recent heartbeat"


FAST_HEARTBEAT_S = fast_settings().heartbeat_s


def test_an_idle_heartbeat_counts_the_outbox_only_after_it_changed(nats_server, tmp_path):
    """Counting the outbox (a query on its database) was the largest part of an idle
    heartbeat: it is counted again only when the factory changed the outbox, and the
    heartbeat still reports each change."""
    from gigafactory.schemas.records import FactoryRecord, decode

    settings = fast_settings()

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("counts")
            calls = []
            count = f.outbox.count

            def counting() -> int:
                calls.append(1)
                return count()

            f.outbox.count = counting
            await _heartbeats(f, 3)
            idle_calls = len(calls)
            item = f.outbox.put("event", "job-1", 1, b"{}")  # not kicked: the flusher leaves it
            await _heartbeats(f, 2)
            e = await fleet.admin.factories.get("counts")
            pending = decode(e.value, FactoryRecord).outbox_pending
            f.outbox.mark_done(item)
            await _heartbeats(f, 2)
            e = await fleet.admin.factories.get("counts")
            return idle_calls, pending, decode(e.value, FactoryRecord).outbox_pending

    idle_calls, pending, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert idle_calls == 0, "three idle heartbeats counted the unchanged outbox"
    assert pending == 1 and after == 0, (pending, after)


def test_the_idle_traffic_model_counts_heartbeats_renewals_rare_probes_and_the_halt_watch():
    from gigafactory.factory.agent import idle_traffic_model
    from gigafactory.factory.pools import QUIET_PROBE_EVERY_CHECKS

    s = Settings()  # heartbeat 20 s, long poll 30 s, a stall check every 30 s
    m = idle_traffic_model(1000, 1, s)
    probes = 1000 / (30.0 * QUIET_PROBE_EVERY_CHECKS)
    assert m["in_msgs_per_s"] == pytest.approx(50 + 1000 / 30 + probes)
    assert m["out_msgs_per_s"] == pytest.approx(m["in_msgs_per_s"] + 1000 / 40)
    assert idle_traffic_model(1000, 2, s)["in_msgs_per_s"] > m["in_msgs_per_s"], "each pool has its own long poll"
    # Factories serving different pools: the polls and probes are per (factory, pool) pair.
    pairs = idle_traffic_model(100, 5, s, served=121)
    assert pairs["in_msgs_per_s"] == pytest.approx(100 / 20 + 121 / 30 + 121 / (30.0 * QUIET_PROBE_EVERY_CHECKS))
    assert idle_traffic_model(100, 5, s, served=500) == idle_traffic_model(100, 5, s)


# -- pings ride the heartbeat ---------------------------------------------------------------------


def _record_writes(nc) -> list[bytes]:
    """Every write this connection makes to its socket from now on, one entry per write (the
    bytes still go out: the transport's own methods are called)."""
    writes: list[bytes] = []
    t = nc._transport
    write, writelines = t.write, t.writelines

    def one(data: bytes) -> None:
        writes.append(bytes(data))
        write(data)

    def many(lines) -> None:
        lines = list(lines)
        writes.append(b"".join(lines))
        writelines(lines)

    t.write, t.writelines = one, many
    return writes


def test_an_idle_factory_pings_in_its_heartbeats_write_and_the_pongs_come_back(nats_server, tmp_path, monkeypatch):
    """nats-py pings on a timer of its own (a wake-up, a write and a flusher wake-up per
    connection and period: a third of an idle fleet host's CPU). A factory takes its pings
    over: each goes out in the same socket write as a heartbeat (here every second one: the
    ping period is twice the heartbeat), and the broker answers every one."""
    import gigafactory.broker as B

    monkeypatch.setattr(B, "PING_MIN_S", 0.5)
    settings = fast_settings(heartbeat_s=0.5)
    assert ping_interval_s(settings) == 1.0

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("pinging")
            nc = f.broker.nc
            writes = _record_writes(nc)
            pongs = nc._pongs_received
            await _heartbeats(f, 7)
            pinged = [w for w in writes if b"PING\r\n" in w]
            assert len(pinged) >= 2, writes
            beat_subject = f"$KV.{names.FACTORIES_BUCKET}.pinging".encode()
            assert all(beat_subject in w for w in pinged), "a ping went out in a write of its own"
            beats = [w for w in writes if beat_subject in w]
            assert len(pinged) < len(beats), "one ping per two heartbeats, not one per heartbeat"
            assert nc._ping_interval_task.done() and nc.options["ping_interval"] == B.PINGS_OFF_S
            await eventually(lambda: nc._pongs_received >= pongs + len(pinged), 10, what="a pong for every ping")
            assert nc._pings_outstanding == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_factory_that_took_its_pings_over_still_drops_a_silent_connection_and_comes_back(nats_server, tmp_path,
                                                                                            monkeypatch):
    """The pings a factory sends itself still detect a connection that went silent without
    closing (a partition): after MAX_OUTSTANDING_PINGS unanswered pings the client drops it
    and reconnects once the path heals, and the factory heartbeats again."""
    import gigafactory.broker as B

    monkeypatch.setattr(B, "PING_MIN_S", 0.25)
    settings = fast_settings(heartbeat_s=0.25)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            host, port = nats_server.url.removeprefix("nats://").split(":")
            async with FaultProxy(host, int(port)) as proxy:
                lost, back = asyncio.Event(), asyncio.Event()

                async def on_disconnect() -> None:
                    lost.set()

                async def on_reconnect() -> None:
                    back.set()

                b = await Broker.open(proxy.url, "test-factory-partitioned", settings,
                                      on_disconnect=on_disconnect, on_reconnect=on_reconnect)
                f = Factory(b, factory_id="partitioned", stations=1, probe=False, settings=settings,
                            workspace=str(tmp_path / "work"), data_dir=str(tmp_path / "factories"))
                stop = asyncio.Event()
                task = asyncio.create_task(f.run(stop))
                try:
                    await asyncio.wait_for(f.ready.wait(), 30)
                    await _heartbeats(f, 2)
                    assert b.nc.options["ping_interval"] == B.PINGS_OFF_S
                    proxy.blackhole()
                    await asyncio.wait_for(lost.wait(), 20)  # only the factory's own pings can notice it
                    proxy.heal()
                    await asyncio.wait_for(back.wait(), 20)
                    await _heartbeats(f, 2)
                    e = await fleet.admin.factories.get("partitioned")
                    assert e is not None and b.nc.is_connected
                finally:
                    stop.set()
                    await asyncio.wait_for(task, 30)
                    await b.close()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_the_beat_plan_puts_a_ping_in_every_heartbeat_at_equal_periods_and_in_every_other_at_twice():
    from gigafactory.factory.beat import BeatPlan

    def ticks(beat_s: float, ping_s: float, n: int) -> list[tuple[float, bool, bool]]:
        plan, now, out = BeatPlan(beat_s, ping_s, 100.0), 100.0, []
        for _ in range(n):
            now += plan.sleep_s(now)
            out.append((round(now - 100.0, 6), *plan.due(now)))
        return out

    assert ticks(20, 20, 3) == [(20, True, True), (40, True, True), (60, True, True)]  # the defaults: one write
    assert ticks(7, 14, 4) == [(7, True, False), (14, True, True), (21, True, False), (28, True, True)]
    assert ticks(60, 20, 3) == [(20, False, True), (40, False, True), (60, True, True)]  # pings stay within PING_MAX_S
    # A stalled loop does not make up missed ticks: one heartbeat and one ping, then the schedule goes on.
    plan = BeatPlan(1.0, 1.0, 0.0)
    assert plan.due(5.5) == (True, True) and plan.sleep_s(5.5) == 0.5
    assert plan.due(5.6) == (False, False)  # nothing due yet, not even within the slack (a quarter period)
    assert plan.due(5.8) == (True, True)  # due at 6.0: early by less than the slack, sent now
