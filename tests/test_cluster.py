"""A 3-node JetStream cluster of real ``nats-server`` processes on loopback: the broker layout
is R3 everywhere, compare-and-set writes go on through a follower's death and through the
failover of the job bucket's leader, and a killed node restarts on its store and catches up.

One cluster serves the module (starting one costs ~2 s); the failover test restarts every
node it kills, so the cluster is whole again when it ends.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import nats
from gigafactory.broker import auth_options
import nats.js.errors
import pytest
from helpers import run

from gigafactory.broker import TRANSIENT, Broker, Bucket, Conflict
from gigafactory.config import Settings
from gigafactory.testing import Cluster
from gigafactory.schemas import names

JOBS_STREAM = f"KV_{names.JOBS_BUCKET}"

SETTINGS = dict(replicas=3, request_timeout_s=2.0, reconnect_wait_s=0.1, reconnect_jitter_s=0.2)
"""R3, and short bounds so a client on a killed node moves on quickly."""

RETRYABLE = TRANSIENT + (Conflict, nats.js.errors.NoStreamResponseError)
"""What a CAS writer retries with a fresh read: a lost race or a spurious R3 refusal
(Conflict), and the broker not answering. During a leader election a KV write gets
NoStreamResponseError (a 503: no responders), which the broker's TRANSIENT does not list."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("cluster"))).start()
    try:
        yield c
    finally:
        c.stop()


async def cas_bump(bucket: Bucket, key: str, timeout_s: float = 30.0) -> tuple[int, int, int]:
    """Read ``key`` (an integer), write it + 1 with ``last=`` its revision; on a retryable
    error read afresh and try again, within ``timeout_s``. Returns (value, revision, attempts)."""
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        attempts += 1
        try:
            e = await bucket.get(key)
            assert e is not None, f"{key} vanished"
            value = int(e.value) + 1
            return value, await bucket.update(key, str(value).encode(), last=e.revision), attempts
        except RETRYABLE as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"no CAS write to {bucket.name}/{key} within {timeout_s:g}s "
                                     f"({attempts} attempts); last error: {err!r}") from err
            await asyncio.sleep(0.1)


async def read_int(bucket: Bucket, key: str) -> tuple[int, int]:
    e = await bucket.get(key)
    assert e is not None
    return int(e.value), e.revision


def test_cluster_forms_and_every_bucket_and_stream_is_placed_on_all_three_nodes(cluster):
    assert len(cluster.nodes) == 3 and all(n.alive for n in cluster.nodes)
    names_ = {n.name for n in cluster.nodes}
    assert len(names_) == 3
    assert len({n.port for n in cluster.nodes} | {n.cluster_port for n in cluster.nodes}) == 6
    assert len({n.store_dir for n in cluster.nodes}) == 3
    assert cluster.urls.count("nats://127.0.0.1:") == 3
    with pytest.raises(KeyError, match="not a node"):
        cluster.index_of("elsewhere")

    async def main():
        b = await Broker.open(cluster.urls, "test-cluster-layout", Settings(**SETTINGS))
        try:
            streams = {si.config.name: si async for si in _streams(b)}
            expected = {f"KV_{n}" for n in (names.JOBS_BUCKET, names.QUEUE_BUCKET, names.FACTORIES_BUCKET,
                                             names.POOLS_BUCKET, names.LOCKS_BUCKET, names.IDEMPOTENCY_BUCKET,
                                             names.CLOCK_BUCKET)}
            expected |= {names.DISPATCH_STREAM, names.EVENTS_STREAM, f"OBJ_{names.ARTIFACTS_STORE}"}
            assert expected <= set(streams), sorted(set(streams))
            for name in expected:
                si = streams[name]
                assert si.config.num_replicas == 3, f"{name} has R{si.config.num_replicas}"
                peers = {si.cluster.leader} | {p.name for p in si.cluster.replicas or []}
                assert peers == names_, f"{name} is placed on {sorted(peers)}, not on every node"
            assert cluster.nodes[await cluster.stream_leader(JOBS_STREAM)].name == streams[JOBS_STREAM].cluster.leader

            rev = await b.jobs.create("cas-layout", b"0")
            assert await b.jobs.update("cas-layout", b"1", last=rev) > rev
            with pytest.raises(Conflict):
                await b.jobs.update("cas-layout", b"stale", last=rev)
            assert await read_int(b.jobs, "cas-layout") == (1, rev + 1)
        finally:
            await b.close()

    run(main(), 40)


async def _streams(b: Broker):
    for si in await b.js.streams_info():
        yield si


def test_cas_writes_go_on_through_a_follower_kill_and_a_job_bucket_leader_failover(cluster):
    """Measured on 2 cores: a kill -9 of the leader costs 4-8 s of election; a SIGTERM, <1 s."""
    async def main():
        b = await Broker.open(cluster.urls, "test-cluster-failover", Settings(**SETTINGS))
        try:
            await b.jobs.create("cas-failover", b"0")
            leader = await cluster.stream_leader(JOBS_STREAM)
            follower = next(i for i in range(3) if i != leader)

            # A follower dies: the leader and the other follower are a quorum; writes go on.
            cluster.kill(follower)
            value, _, _ = await cas_bump(b.jobs, "cas-failover", timeout_s=15)
            assert value == 1
            cluster.restart(follower)
            rejoin_follower_s = await cluster.wait_rejoined(follower, [JOBS_STREAM], timeout_s=30)

            # The job bucket's leader dies: a new one is elected among the survivors, and a
            # CAS write (fresh read, retried) succeeds there.
            value, stale_rev, _ = await cas_bump(b.jobs, "cas-failover", timeout_s=15)
            assert value == 2
            t0 = time.monotonic()
            cluster.kill(leader)
            new_leader = await cluster.wait_stream_leader(JOBS_STREAM, not_on=leader, timeout_s=30)
            elected_s = time.monotonic() - t0
            value, rev, attempts = await cas_bump(b.jobs, "cas-failover", timeout_s=30)
            writable_s = time.monotonic() - t0
            assert new_leader != leader and cluster.nodes[new_leader].alive
            # Nothing acknowledged before the failover was lost, and CAS still fences stale writers.
            assert value == 3 and await read_int(b.jobs, "cas-failover") == (3, rev)
            with pytest.raises(Conflict):
                await b.jobs.update("cas-failover", b"stale", last=stale_rev)

            # The old leader restarts on its store, rejoins, and catches up.
            cluster.restart(leader)
            rejoin_leader_s = await cluster.wait_rejoined(leader, [JOBS_STREAM], timeout_s=30)
            assert await _value_through(cluster.nodes[leader].url, "cas-failover", b"3") == b"3"

            # A graceful stop of the leader hands leadership over instead of waiting for an election.
            t0 = time.monotonic()
            cluster.terminate(new_leader)
            successor = await cluster.wait_stream_leader(JOBS_STREAM, not_on=new_leader, timeout_s=30)
            handover_s = time.monotonic() - t0
            assert successor != new_leader
            assert (await cas_bump(b.jobs, "cas-failover", timeout_s=30))[0] == 4
            cluster.restart(new_leader)
            await cluster.wait_rejoined(new_leader, [JOBS_STREAM], timeout_s=30)
            print(f"\nfollower rejoin {rejoin_follower_s:.2f}s; leader kill -9: elected {elected_s:.2f}s, "
                  f"writable {writable_s:.2f}s ({attempts} attempts); old leader rejoin {rejoin_leader_s:.2f}s; "
                  f"SIGTERM handover {handover_s:.2f}s")
        finally:
            await b.close()

    run(main(), 120)


async def _value_through(url: str, key: str, want: bytes, timeout_s: float = 15.0) -> object:
    """The key's value read through one node (a direct get, which replicas answer too),
    polled until it is ``want``: a restarted replica is caught up once it serves the latest."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **auth_options())
    try:
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                msg = await js.get_msg(JOBS_STREAM, subject=f"$KV.{names.JOBS_BUCKET}.{key}", direct=True)
                last = msg.data
                if last == want:
                    return last
            except RETRYABLE + (nats.js.errors.NotFoundError,) as e:
                last = e
            await asyncio.sleep(0.1)
        return last  # the caller's assertion names it
    finally:
        await nc.close()


def _info(node) -> dict:
    """The INFO line a node greets a client with."""
    with socket.create_connection((node.host, node.port), timeout=5) as s, s.makefile("rb") as f:
        line = f.readline(1 << 16)
    assert line.startswith(b"INFO "), line
    return json.loads(line[5:])


def test_no_advertise_keeps_the_other_nodes_urls_from_clients(cluster, tmp_path):
    """By default a node tells clients every node's URL, so a client behind a fault proxy
    would reconnect around it; ``no_advertise`` is how a partition scenario prevents that."""
    others = {f"127.0.0.1:{n.port}" for n in cluster.nodes[1:]}
    assert others <= set(_info(cluster.nodes[0]).get("connect_urls") or []), _info(cluster.nodes[0])

    with Cluster(str(tmp_path), name="quiet", no_advertise=True) as quiet:  # routes up: JetStream placed R3
        for node in quiet.nodes:
            assert not _info(node).get("connect_urls"), _info(node)
