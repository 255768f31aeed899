"""Durability defaults, read back from real servers: the embedded broker fsyncs every write
unless asked otherwise (as the server itself reports it in ``/varz``), a faster setting is an
explicit opt-in that parses to what it says, and a layout asked for more replicas than its
buckets have is migrated or refused by name, never left at R1 silently."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from helpers import eventually, run

from gigafactory.broker import Broker, ReplicasError
from gigafactory.config import Settings, check_sync_interval
from gigafactory.coordinator.retention import clock_skew
from gigafactory.embedded import BrokerError, EmbeddedServer
from gigafactory.testing import Cluster
from gigafactory.schemas import names


def varz_jetstream(srv: EmbeddedServer) -> dict:
    """The JetStream config as the running server reports it (``/varz``)."""
    with urllib.request.urlopen(srv.monitor_url + "/varz", timeout=5) as r:
        return json.load(r)["jetstream"]["config"]


def test_the_embedded_broker_fsyncs_every_write_by_default_as_the_server_reports_it(tmp_path):
    settings = Settings.from_env({})
    assert settings.sync_interval == "always"
    # Built as the CLI builds it (store, sync_interval from the settings), plus a monitor port.
    with EmbeddedServer(store_dir=str(tmp_path / "store"), sync_interval=settings.sync_interval, http_port=0) as srv:
        assert varz_jetstream(srv).get("sync_always") is True
    # And with nothing passed at all (the demo, the test fixtures).
    with EmbeddedServer(store_dir=str(tmp_path / "store2"), http_port=0) as srv:
        assert varz_jetstream(srv).get("sync_always") is True


@pytest.mark.parametrize("interval, ns", [("2m", 120 * 10**9), ("1m30s", 90 * 10**9), ("500ms", 500 * 10**6)])
def test_a_faster_sync_interval_is_an_opt_in_that_the_server_reads_as_written(tmp_path, interval, ns):
    # A bare 2m in nats-server's config is the number 2,000,000 (seconds: 23 days): the
    # generated config must quote it.
    env = Settings.from_env({"GIGAFACTORY_SYNC_INTERVAL": interval})
    with EmbeddedServer(store_dir=str(tmp_path / "store"), sync_interval=env.sync_interval, http_port=0) as srv:
        cfg = varz_jetstream(srv)
        assert not cfg.get("sync_always")
        assert cfg["sync_interval"] == ns


def test_a_bad_sync_interval_is_refused_naming_where_it_came_from(tmp_path):
    with pytest.raises(ValueError, match="GIGAFACTORY_SYNC_INTERVAL='sometimes'.*'always'"):
        Settings.from_env({"GIGAFACTORY_SYNC_INTERVAL": "sometimes"})
    with pytest.raises(ValueError, match="sync_interval='2 m'"):
        check_sync_interval("2 m")
    with pytest.raises(BrokerError, match="'always'"):
        EmbeddedServer(store_dir=str(tmp_path / "s"), sync_interval="2m; jetstream: false").start()
    assert check_sync_interval(None) is None and check_sync_interval("always") == "always"


def test_the_server_command_says_what_a_faster_sync_interval_risks_and_refuses_a_bad_one(tmp_path):
    cmd = [sys.executable, "-m", "gigafactory", "server"]
    help_ = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0
    text = " ".join(help_.stdout.split())
    assert "'always' (the default" in text and "power loss" in text and "RISKS" in text
    bad = subprocess.run([*cmd, "--port", "0", "--store", str(tmp_path / "s"), "--sync-interval", "often"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "--sync-interval='often'" in bad.stderr and not (tmp_path / "s").exists()


# -- replicas ---------------------------------------------------------------------------------

LAYOUT = [f"KV_{n}" for n in (names.JOBS_BUCKET, names.ARCHIVE_BUCKET, names.QUEUE_BUCKET, names.FACTORIES_BUCKET,
                              names.POOLS_BUCKET, names.LOCKS_BUCKET, names.IDEMPOTENCY_BUCKET, names.CLOCK_BUCKET)]
LAYOUT += [names.DISPATCH_STREAM, names.EVENTS_STREAM, f"OBJ_{names.ARTIFACTS_STORE}"]


def test_raising_replicas_on_a_single_server_layout_is_refused_naming_the_bucket(nats_server):
    async def main():
        b = await Broker.open(nats_server.url, "r1", Settings(request_timeout_s=5.0))
        await b.close()
        with pytest.raises(ReplicasError) as got:
            await Broker.open(nats_server.url, "r3", Settings(request_timeout_s=5.0, replicas=3))
        msg = str(got.value)
        assert f"KV_{names.JOBS_BUCKET}" in msg and "R1" in msg and "R3" in msg
        assert "GIGAFACTORY_REPLICAS" in msg and "cluster" in msg
        # Nothing was changed on the way: the layout is still whole and R1.
        b = await Broker.open(nats_server.url, "r1-again", Settings(request_timeout_s=5.0))
        try:
            for si in await b.js.streams_info():
                assert si.config.num_replicas == 1, si.config.name
        finally:
            await b.close()

    run(main(), 60)


def test_raising_replicas_on_a_cluster_migrates_every_bucket_and_stream_and_lowering_never_happens(tmp_path):
    """An R1 layout on a 3-node cluster (made by a process with the default replicas=1), then
    a process with replicas=3: every bucket, stream and store is R3 on all three nodes. A
    later process with the default replicas=1 (a CLI run without GIGAFACTORY_REPLICAS) must
    not scale it back down."""
    async def main(c: Cluster):
        b = await Broker.open(c.urls, "r1", Settings(request_timeout_s=2.0))
        await b.jobs.create("kept", b"42")
        await b.close()
        b = await Broker.open(c.urls, "r3", Settings(request_timeout_s=5.0, replicas=3))
        try:
            for name in LAYOUT:
                si = await b.js.stream_info(name)
                assert si.config.num_replicas == 3, f"{name} has R{si.config.num_replicas}"
            e = await eventually(lambda: b.jobs.get("kept"), 30, what="the record through the migration")
            assert e.value == b"42"
        finally:
            await b.close()
        b = await Broker.open(c.urls, "r1-again", Settings(request_timeout_s=5.0))
        try:
            for name in LAYOUT:
                si = await b.js.stream_info(name)
                assert si.config.num_replicas == 3, f"{name} lowered to R{si.config.num_replicas}"
        finally:
            await b.close()

    with Cluster(str(tmp_path / "cluster")) as c:
        run(main(c), 120)


def test_limits_are_set_by_the_coordinators_settings_never_by_whoever_opens_the_layout(nats_server):
    """A layout made with other limits (an older version's, or other settings) keeps them
    when a factory or a tool with other settings opens it (a smaller cap would drop events
    at once), and gets the coordinator's when it applies them (its first retention pass)."""
    async def main():
        b = await Broker.open(nats_server.url, "old", Settings(events_max_bytes=10**9, artifacts_max_bytes=10**9))
        await b.close()
        s = Settings(events_max_bytes=5 * 10**8, artifacts_max_bytes=6 * 10**8, artifacts_max_age_s=86400.0,
                     archive_max_bytes=7 * 10**8, archive_max_age_s=30 * 86400.0)
        b = await Broker.open(nats_server.url, "new", s)
        try:
            cfg = {si.config.name: si.config for si in await b.js.streams_info()}
            assert cfg[names.EVENTS_STREAM].max_bytes == 10**9
            assert cfg[f"OBJ_{names.ARTIFACTS_STORE}"].max_bytes == 10**9
            changed = await b.apply_limits()
            assert changed[names.EVENTS_STREAM] == {"max_bytes": 5 * 10**8}
            assert await b.apply_limits() == {}
            cfg = {si.config.name: si.config for si in await b.js.streams_info()}
            assert cfg[names.EVENTS_STREAM].max_bytes == 5 * 10**8
            assert cfg[f"OBJ_{names.ARTIFACTS_STORE}"].max_bytes == 6 * 10**8
            assert cfg[f"OBJ_{names.ARTIFACTS_STORE}"].max_age == 86400.0
            assert cfg[f"KV_{names.ARCHIVE_BUCKET}"].max_bytes == 7 * 10**8
            assert cfg[f"KV_{names.ARCHIVE_BUCKET}"].max_age == 30 * 86400.0
        finally:
            await b.close()

    run(main(), 60)


# -- the reaper's clock -------------------------------------------------------------------------


def test_broker_now_reads_the_clock_of_the_job_bucket_leader_and_writes_nothing(nats_server):
    async def main():
        b = await Broker.open(nats_server.url, "clock", Settings(request_timeout_s=5.0))
        try:
            before = {si.config.name: si.state.messages for si in await b.js.streams_info()}
            rev = await b.jobs.create("stamped", b"x")
            e = await b.jobs.get("stamped")
            assert e is not None and e.revision == rev
            now = await b.broker_now()
            assert now >= e.ts  # the same server's clock, read after the write
            assert b.clock_source == (f"KV_{names.JOBS_BUCKET}", nats_server.name)
            after = {si.config.name: si.state.messages for si in await b.js.streams_info()}
            before[f"KV_{names.JOBS_BUCKET}"] += 1
            assert after == before  # the probe wrote nothing (gf_clock included)
        finally:
            await b.close()

    run(main(), 30)


def test_on_a_cluster_now_comes_from_the_leader_that_stamps_the_job_records(tmp_path):
    """The reaper compares a lease's stamp (by KV_gf_jobs's leader) with "now": both must be
    that server's clock, also when other streams (gf_clock) are led elsewhere and after the
    job bucket's leadership moves."""
    async def main(c: Cluster):
        b = await Broker.open(c.urls, "clock", Settings(request_timeout_s=5.0, replicas=3))
        try:
            jobs = f"KV_{names.JOBS_BUCKET}"
            for _ in range(10):  # move gf_clock's leader off the job bucket's leader
                if await c.stream_leader(jobs) != await c.stream_leader(b.clock.stream):
                    break
                await b.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{b.clock.stream}", b"", timeout=5)
                await c.wait_stream_leader(b.clock.stream)
            leader = await c.stream_leader(jobs)
            assert leader != await c.stream_leader(b.clock.stream)
            await b.broker_now()
            assert b.clock_source == (jobs, c.nodes[leader].name)

            await b.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{jobs}", b"", timeout=5)
            moved = await c.wait_stream_leader(jobs, not_on=leader)

            async def follows():
                try:
                    await b.broker_now()
                except Exception:  # the election is still going on: no leader answers
                    return None
                return b.clock_source == (jobs, c.nodes[moved].name)

            assert await eventually(follows, 30, what="the clock probe answered by the new leader")

            # The nodes' clocks, measured through the leaders of the layout's streams (one
            # machine here: no skew beyond what the round trips explain).
            offsets = await b.leader_clocks([f"KV_{n}" for n in (names.JOBS_BUCKET, names.QUEUE_BUCKET,
                                             names.FACTORIES_BUCKET, names.POOLS_BUCKET, names.LOCKS_BUCKET,
                                             names.IDEMPOTENCY_BUCKET, names.CLOCK_BUCKET, names.ARCHIVE_BUCKET)])
            assert len(offsets) >= 2 and set(offsets) <= {n.name for n in c.nodes}
            skew_s, unsure_s = clock_skew(offsets)
            assert skew_s - unsure_s < 0.5
        finally:
            await b.close()

    with Cluster(str(tmp_path / "cluster")) as c:
        run(main(c), 120)
