"""The dispatch pass's cost follows its offers, not the backlog (coordinator/scheduler.py
``QueueOrder``, ``Scheduler.dispatch``).

The queue is kept in dispatch order as the view changes (no sort per pass), read lazily one
pool at a time, and a pass leaves a pool once every free station has an offer. The order
must stay exactly ``dispatch_order``'s (priority, products taking turns, age), which the pure
tests of test_fairness.py pin; here: the incremental order equals it on a random queue, and a
pass over a real broker visits at most the free stations plus the jobs it passes over.
"""

from __future__ import annotations

import random

import pytest
from helpers import fast_settings, run
from test_fairness import queued

from gigafactory.broker import Broker
from gigafactory.coordinator.scheduler import QueueOrder, Scheduler, dispatch_order
from gigafactory.coordinator.view import FleetView
from gigafactory.schemas import names
from gigafactory.schemas.records import DispatchMessage, FactoryRecord, Station, decode, encode

pytestmark = pytest.mark.timeout(60)

T0 = 1_000.0


def merged(q: QueueOrder, last_served: dict[str, int]) -> list[str]:
    out = []
    for pool in q.by_pool:
        out += [(key, st.record.id) for key, st in q.pool_order(pool, last_served)]
    return [jid for _key, jid in sorted(out)]


def test_the_incremental_order_is_dispatch_order_as_jobs_come_and_go():
    rng = random.Random(7)
    q = QueueOrder()
    live: dict[str, object] = {}
    for step in range(600):
        if live and rng.random() < 0.3:  # a job leaves the queue (claimed, cancelled)
            jid = rng.choice(sorted(live))
            q.on_job(live.pop(jid), None)
            continue
        st = queued(f"j{step}", rng.choice("abc"), T0 + rng.randint(0, 50),
                    priority=rng.choice(["critical", "high", "medium", "low"]))
        st.record.pool = rng.choice(["p1", "p2"])
        live[st.record.id] = st
        q.on_job(None, st)
    served = {"a": 9, "c": 4}
    want = [st.record.id for st in dispatch_order(list(live.values()), served)]
    assert len(q) == len(live)
    assert merged(q, served) == want, "the pools merged give dispatch_order of every queued job"


def test_a_pass_over_a_backlog_visits_the_free_stations_not_the_backlog(nats_server):
    """A backlog of 300 jobs, one factory with 4 stations: the first pass makes 4 offers
    and looks at 4 jobs; the next (nothing claimed) makes none and looks at the 4 out."""

    async def main():
        settings = fast_settings(redispatch_s=60.0)
        b = await Broker.open(nats_server.url, "test-pass", settings)
        try:
            view = FleetView()
            sched = Scheduler(b, view, settings, "test")
            now = await sched.sync_clock()
            fac = FactoryRecord(id="f1", host="h", os="linux", arch="x86_64", capabilities=["engine:shell"],
                                stations=[Station(index=i, since=now) for i in range(4)], heartbeat_at=now,
                                heartbeat_interval_s=settings.heartbeat_s)
            view.apply_factory("f1", encode(fac), now)
            backlog = []
            for i in range(300):
                st = queued(f"job-{i:03d}", "ab"[i % 2], now - 300 + i)
                st.record.pool = "any"
                backlog.append(st.record)
                view.apply_job(st.record.id, encode(st.record), 1, now - 60)
            psub = await b.js.pull_subscribe(names.dispatch_subject("any"), durable="test-pass",
                                             stream=names.DISPATCH_STREAM)

            assert await sched.dispatch() == 4
            assert sched.visited == 4, f"the pass looked at {sched.visited} jobs for 4 free stations"
            msgs = await psub.fetch(10, timeout=2)
            got = [decode(m.data, DispatchMessage).job for m in msgs]
            want = [st.record.id for st in dispatch_order([view.jobs[r.id] for r in backlog], {})][:4]
            assert got == want, "the offers are the head of dispatch_order, in that order"

            assert await sched.dispatch() == 0, "every station has an offer out: nothing more"
            assert sched.visited <= 4, f"the second pass looked at {sched.visited} jobs"
        finally:
            await b.close()

    run(main())
