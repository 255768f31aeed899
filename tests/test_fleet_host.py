"""The fleet host (``python -m gigafactory.loadtest.fleet``) as a real process on a real broker:
its factories register, each on its own connection, serve jobs, and its figures say so; SIGTERM
drains them (records gone, ``factory_down`` events) and the process exits 0."""

from __future__ import annotations

import signal
import sys
import time

import pytest
from helpers import Proc, eventually, fast_env, job_text, run

from gigafactory.broker import Broker
from gigafactory.client import Client
from gigafactory.loadtest.fleet import read_stats
from gigafactory.schemas import names
from gigafactory.schemas.records import FactoryRecord, JobRecord, decode

pytestmark = pytest.mark.timeout(120)

COUNT = 5


def _fleet_args(url: str, tmp_path, count: int = COUNT) -> list[str]:
    return [sys.executable, "-m", "gigafactory.loadtest.fleet", "--nats", url, "--count", str(count),
            "--prefix", "fh-", "--start", "3", "--data-dir", str(tmp_path / "data"),
            "--workspace", str(tmp_path / "work"), "--stats-file", str(tmp_path / "fleet.json"),
            "--stats-interval-s", "0.5"]


def test_a_fleet_host_runs_its_factories_reports_them_and_drains_on_sigterm(nats_server, tmp_path):
    (tmp_path / "work").mkdir()
    env = fast_env()
    coord = Proc([sys.executable, "-m", "gigafactory", "coordinator", "--nats", nats_server.url],
                 tmp_path / "coordinator.log", env=env)
    host = Proc(_fleet_args(nats_server.url, tmp_path), tmp_path / "fleet.log", env=env)
    ids = [f"fh-{i:04d}" for i in range(3, 3 + COUNT)]
    stats = tmp_path / "fleet.json"
    try:
        async def main():
            b = await Broker.open(nats_server.url, "test-admin", None)
            client = await Client.connect(nats_server.url)
            try:
                await eventually(lambda: "fleet ready: 5 factories" in host.output(), 60,
                                 what="the host says its factories are ready")
                recs = {}
                async for e in b.factories.scan():
                    recs[e.key] = decode(e.value, FactoryRecord)
                assert sorted(recs) == ids
                assert {r.pid for r in recs.values()} == {host.pid}, "all in the one host process"
                assert all(r.status == "up" and f"factory:{r.id}" in r.capabilities for r in recs.values())

                # A job pinned to one of them is claimed by that one.
                await eventually(lambda: _api_answers(client), 30, what="the coordinator answers")
                resp = await client.call("submit", {"files": [{"path": "pinned.md", "text": job_text(
                    "echo ok", cwd=str(tmp_path / "work"), review_policy="auto", capabilities=["factory:fh-0005"])}]})
                job = resp["jobs"][0]["job"]

                async def shipped():
                    e = await b.jobs.get(job)
                    rec = decode(e.value, JobRecord)
                    return rec if str(rec.stage) == "shipped" else None

                rec = await eventually(shipped, 30, what="the pinned job ships")
                assert [(a.factory, a.outcome) for a in rec.attempts] == [("fh-0005", "passed")]

                # The record can read shipped before the factory has its write's answer and counts it:
                # its "finished" event comes after the count.
                await eventually(lambda: _event_factories(b, names.events_subject(job, "finished")), 30,
                                 what="the factory's finished event")

                # Figures on demand (SIGUSR1), complete and fresh.
                t = time.time()
                host.signal(signal.SIGUSR1)
                fig = await eventually(lambda: (s := read_stats(stats)) and s["at"] >= t and s, 10,
                                       what="figures written after SIGUSR1")
                assert fig["count"] == fig["started"] == fig["ready"] == fig["connected"] == COUNT
                assert fig["pid"] == host.pid and fig["start_failures"] == [] and fig["ready_at"]
                assert sorted(fig["factories"]) == ids == sorted(fig["factory_pools"])
                assert fig["factories"]["fh-0005"]["claims"] == 1 and fig["totals"]["claims"] == 1
                assert fig["totals"]["finished"] == 1 and fig["pools_polling"] == 0
                # Only fh-0005 offers factory:fh-0005, so only it serves that job's pool (by push).
                assert list(fig["factory_pools"]["fh-0005"].values()) == ["push"]
                assert all(pools == {} for fid, pools in fig["factory_pools"].items() if fid != "fh-0005")
                assert fig["disconnects"] == fig["reconnects"] == 0 and fig["factory_connection"] == {}
                assert fig["cpu_s"] > 0 and fig["rss_bytes"] > 0 and isinstance(fig["log_counts"], dict)

                # SIGTERM: every factory drains and deregisters; the process exits 0.
                t_term = time.time()
                host.signal(signal.SIGTERM)
                assert host.wait(60) == 0, host.output()[-3000:]
                left = [e.key async for e in b.factories.scan()]
                assert left == [], f"records left after the drain: {left}"
                assert await _event_factories(b, names.fleet_events_subject("factory_down")) == set(ids)
                final = read_stats(stats)
                assert final["at"] >= t_term and final["connected"] == 0
            finally:
                await client.close()
                await b.close()

        run(main(), timeout_s=110)
    finally:
        host.close()
        coord.close()


async def _api_answers(client: Client) -> bool:
    try:
        await client.call("list", {"limit": 1}, timeout_s=1.0)
        return True
    except Exception:
        return False


async def _event_factories(b: Broker, subject: str) -> set[str]:
    """The factories of the audit's events on ``subject``."""
    from nats.js import api

    from gigafactory.schemas.records import EventRecord

    psub = await b.js.pull_subscribe(subject, stream=names.EVENTS_STREAM,
                                     config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE,
                                                               deliver_policy=api.DeliverPolicy.ALL))
    out: set[str] = set()
    try:
        want = (await psub.consumer_info()).num_pending
        read = 0
        while read < want:
            msgs = await psub.fetch(min(100, want - read), timeout=5)
            read += len(msgs)
            out.update(decode(m.data, EventRecord).factory or "" for m in msgs)
    finally:
        await psub.unsubscribe()
    return out


def test_a_fleet_host_refuses_a_count_below_one(tmp_path):
    p = Proc(_fleet_args("nats://127.0.0.1:1", tmp_path, count=0), tmp_path / "fleet.log")
    try:
        assert p.wait(60) == 2
        assert "Invalid value for '--count': 0 is not in the range x>=1" in p.output()
    finally:
        p.close()
