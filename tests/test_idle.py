"""An idle factory costs its heartbeat and its long polls, nothing else.

A thousand idle factories share two cores with the coordinator, so a factory that waits for
work must not wake up to find nothing: it hears new pools as they are written (no timer, no
KV watch with its own heartbeats), and its outbox flusher sleeps while the outbox is empty.
These tests count the work through the factory's counters, against a real broker.
"""

from __future__ import annotations

import asyncio

from gigafactory.broker import PING_MIN_S, Broker, ping_interval_s
from gigafactory.chaos.proxy import FaultProxy
from gigafactory.config import Settings
from gigafactory.coordinator.intake import ensure_pool
from gigafactory.factory.agent import Factory
from gigafactory.schemas import capabilities as caps

from helpers import Fleet, eventually, fast_settings


async def _heartbeats(f: Factory, n: int) -> None:
    """Wait until ``f`` has written ``n`` more heartbeats (the visible clock of an idle factory)."""
    start = f.record.heartbeat_at
    period = f.s.heartbeat_s
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


def test_client_pings_follow_the_heartbeat_and_never_come_faster_than_the_floor():
    assert ping_interval_s(Settings(heartbeat_s=10.0)) == 20.0
    assert ping_interval_s(Settings(heartbeat_s=60.0)) == 120.0
    assert ping_interval_s(Settings(heartbeat_s=0.5)) == PING_MIN_S
