"""What a broker outage does to push dispatch, on a real broker that is killed and restarted on
the same port and store (what the thundering-herd scenario found at 200 factories, here with one).

- A scan (the polling fallback and the stall check scan the queue index) leaves no consumer on
  the server: nats-server refuses new consumers on a stream past 1000, and a polling fleet
  reached that in seconds, after which no scan, watch or poll of the bucket worked.
- An idle factory sends no pull requests while disconnected: each would wait in the client's
  buffer and reach the pool consumer on reconnect, stale, with all the others.
- A consumer check that the outage interrupts, or that falls due during it, does not switch
  the pool to polling: a broker that does not answer says nothing about the consumer.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import Fleet, eventually, fast_settings, run

from gigafactory.broker import Broker
from gigafactory.client import Client
from gigafactory.factory import agent
from gigafactory.schemas import names

pytestmark = pytest.mark.timeout(90)


def test_a_scan_deletes_its_consumer_when_it_ends(nats_server):
    async def main():
        b = await Broker.open(nats_server.url, "test-scan", fast_settings())
        try:
            await b.queue.put("pool.job-1", b"1")
            await b.queue.put("pool.job-2", b"2")
            for _ in range(5):
                assert sorted([e.key async for e in b.queue.scan("pool.>")]) == ["pool.job-1", "pool.job-2"]
            assert await b.queue.keys("pool.>") == ["pool.job-1", "pool.job-2"]

            info = await b.js.stream_info(b.queue.stream)
            assert info.state.consumer_count == 0, "every scan left its consumer on the server"
        finally:
            await b.close()

    run(main())


def test_wait_connected_is_false_while_the_broker_is_away_and_true_once_it_is_back(nats_server):
    async def main():
        b = await Broker.open(nats_server.url, "test-wait", fast_settings())
        try:
            assert await b.wait_connected(0.1)
            nats_server.kill()
            await eventually(lambda: not b.nc.is_connected, 10, what="the client notices the broker is gone")
            assert not await b.wait_connected(0.3)

            nats_server.start()
            assert await b.wait_connected(15.0)
            assert b.nc.is_connected
        finally:
            await b.close()

    run(main())


async def _reconnect_client(fleet: Fleet) -> None:
    """The test's API client is the CLI's (three reconnect attempts): a new one after an outage."""
    await fleet.client.close()
    fleet.client = await Client.connect(fleet.url)

    async def answers() -> bool:
        try:
            await fleet.client.call("list", {"limit": 1}, timeout_s=1.0)
            return True
        except Exception:  # the coordinator's own connection may still be on its way back
            return False

    await eventually(answers, 15, what="the coordinator's API answers after the outage")


async def _pool_waiting(fleet: Fleet, pool: str) -> int:
    info = await fleet.admin.js.consumer_info(names.DISPATCH_STREAM, names.pool_consumer(pool))
    return info.num_waiting or 0


def test_an_idle_factory_comes_back_from_an_outage_with_one_pull_request_not_a_pile(nats_server, tmp_path):
    # Long polls of 0.5 s during a 3 s outage: a factory that kept fetching would return with
    # about six requests waiting on the pool consumer, every one but the last stale.
    s = fast_settings(long_poll_s=0.5, reconnect_wait_s=0.2, reconnect_jitter_s=0.2)

    async def main():
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            f = await fleet.add_factory("f1", stations=1)
            job = await fleet.submit_one(fleet.job(review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped")
            await eventually(lambda: _pool_waiting(fleet, rec.pool), 10, what="the idle factory waits on its pool")

            nats_server.kill()
            await eventually(lambda: not f.broker.nc.is_connected, 10, what="the factory notices the broker is gone")
            await asyncio.sleep(6 * s.long_poll_s)  # the schedule: an outage of six long polls
            nats_server.start()
            await eventually(lambda: f.broker.nc.is_connected, 15, what="the factory reconnects")
            waiting = await eventually(lambda: _pool_waiting(fleet, rec.pool), 15,
                                       what="the factory's pull request reaches the restarted broker")

            # One request per idle station (two for the instant a renewal overlaps an expiry).
            assert waiting <= 2, f"{waiting} pull requests wait on the pool consumer for one idle station"
            await _reconnect_client(fleet)
            again = await fleet.submit_one(fleet.job(review_policy="auto"))
            await fleet.wait_stage(again, "shipped")
            assert f.stats["polled_claims"] == 0

    run(main())


def test_an_outage_during_the_consumer_check_does_not_switch_the_pool_to_polling(nats_server, tmp_path,
                                                                                  monkeypatch, caplog):
    # Check the consumer after every long poll, so the outage meets checks in flight and
    # checks falling due; requests time out within the outage.
    monkeypatch.setattr(agent, "STALL_CHECKS_PER_REDISPATCH", 1e9)
    s = fast_settings(long_poll_s=0.5, request_timeout_s=1.0, reconnect_wait_s=0.2, reconnect_jitter_s=0.2)
    caplog.set_level(logging.WARNING, logger="gigafactory.factory")

    async def main():
        async with Fleet(nats_server.url, tmp_path, s) as fleet:
            f = await fleet.add_factory("f1", stations=1)
            job = await fleet.submit_one(fleet.job(review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped")
            await eventually(lambda: _pool_waiting(fleet, rec.pool), 10, what="the idle factory waits on its pool")

            nats_server.kill()
            await eventually(lambda: not f.broker.nc.is_connected, 10, what="the factory notices the broker is gone")
            await asyncio.sleep(3 * s.request_timeout_s)  # the schedule: longer than a request's bound
            nats_server.start()
            await eventually(lambda: f.broker.nc.is_connected, 15, what="the factory reconnects")
            await eventually(lambda: _pool_waiting(fleet, rec.pool), 15, what="the factory pulls again")

            assert [p.mode for p in f.pools.values()] == ["push"]
            fallbacks = [r.getMessage() for r in caplog.records if "falls back to polling" in r.getMessage()]
            assert not fallbacks, fallbacks
            await _reconnect_client(fleet)
            again = await fleet.submit_one(fleet.job(review_policy="auto"))
            await fleet.wait_stage(again, "shipped")
            assert f.stats["polled_claims"] == 0, "the job after the outage was claimed by polling, not push"

    run(main())
