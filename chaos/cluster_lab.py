"""The chaos lab on a 3-node JetStream cluster: the same real coordinator and factory
processes as :class:`~gigafactory.chaos.harness.Lab`, connected to every node's URL, with
every bucket and stream at R3, and a node that can be ``kill -9``ed and restarted on its store.

Only the broker differs from the single-server lab: :attr:`ClusterLab.url` is every node's
client URL (comma-separated, which the CLI's ``--nats`` and :func:`gigafactory.broker.connect`
take), ``replicas`` is 3 in the timings (so each process gets ``GIGAFACTORY_REPLICAS=3`` and
creates, or binds to, the R3 layout), and the ``*_broker`` methods act on the whole cluster.
:meth:`kill_node` and :meth:`restart_node` act on one node; :meth:`leader_of` and
:meth:`peers_of` say which node leads a stream and which follow it.

A client on a killed node reconnects to another with the jittered reconnect every client
has; an R3 write is acknowledged by a quorum (two of three), so it survives the loss of any
one node even with the default ``sync_interval`` (the survivors hold it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gigafactory.testing import Cluster

from .harness import HOST, Lab

CLUSTER_SIZE = 3
"""Nodes of the lab's cluster; every bucket and stream is replicated on all of them."""
CLUSTER_READY_TIMEOUT_S = 60.0
"""Bound on the cluster (re)forming: every node up and an R3 stream placeable. Generous, as
three servers and a raft election share two loaded cores with everything else."""
REJOIN_TIMEOUT_S = 45.0
"""Bound on a restarted node answering and catching up as a current replica of a stream."""


class ClusterLab(Lab):
    """A :class:`Lab` whose broker is a :class:`~gigafactory.testing.Cluster` of three
    ``nats-server`` processes. ``no_advertise`` keeps the nodes from telling clients the
    other nodes' URLs (needed when a client reaches the cluster through a fault proxy)."""

    def __init__(self, workdir: Path, *, seed: int, timings: dict[str, float] | None = None,
                 sync_interval: str | None = None, no_advertise: bool = False) -> None:
        super().__init__(workdir, seed=seed, timings={**(timings or {}), "replicas": CLUSTER_SIZE},
                         sync_interval=sync_interval)
        self.server = None  # the single server of the base lab is never started here
        self.cluster = Cluster(str(self.workdir / "cluster"), size=CLUSTER_SIZE, host=HOST,
                               sync_interval=sync_interval, no_advertise=no_advertise)
        self.node_kills = 0

    @property
    def url(self) -> str:
        return self.cluster.urls

    # -- the whole cluster (what the single-server lab's broker methods mean here) ------------

    async def start_broker(self) -> None:
        """Start every node that is not running (on its store and ports) and wait until the
        cluster can place an R3 stream."""
        await asyncio.to_thread(self.cluster.start, CLUSTER_READY_TIMEOUT_S)

    async def kill_broker(self) -> None:
        """``kill -9`` every node: a total outage of the cluster; stores stay."""
        for i in range(CLUSTER_SIZE):
            await self.kill_node(i)

    async def stop_broker(self) -> None:
        await asyncio.to_thread(self.cluster.stop)

    # -- one node -----------------------------------------------------------------------------

    def node_name(self, i: int) -> str:
        return self.cluster.nodes[i].name

    async def kill_node(self, i: int) -> None:
        """``kill -9`` node ``i``; its store and ports stay for :meth:`restart_node`."""
        await asyncio.to_thread(self.cluster.kill, i)
        self.node_kills += 1

    async def restart_node(self, i: int, streams: list[str] | tuple[str, ...] = ()) -> float:
        """Start node ``i`` again on its store and ports, and wait until it answers and is a
        current replica (or the leader) of each of ``streams``. Returns the seconds it took."""
        t0 = time.monotonic()
        await asyncio.to_thread(self.cluster.restart, i)
        await self.cluster.wait_rejoined(i, streams, timeout_s=REJOIN_TIMEOUT_S)
        return time.monotonic() - t0

    async def leader_of(self, stream: str, *, not_on: int | None = None, timeout_s: float = 30.0) -> int:
        """The node index leading ``stream`` (waits, bounded, for one other than ``not_on``)."""
        return await self.cluster.wait_stream_leader(stream, not_on=not_on, timeout_s=timeout_s)

    async def peers_of(self, stream: str) -> tuple[int, list[int]]:
        """(leader, followers) of ``stream`` as node indexes, from the stream's cluster info;
        a follower is a replica the leader reports current and online. Retried (bounded): on
        a loaded machine one stream-info request can miss its short timeout."""

        async def info():
            got = await self.cluster.stream_info(stream, timeout_s=2.0)
            return got if (got.get("cluster") or {}).get("leader") else None

        c = (await self.cluster._poll(info, f"the peers of {stream}", 20.0)).get("cluster") or {}
        leader = self.cluster.index_of(c["leader"])
        followers = sorted(self.cluster.index_of(p["name"]) for p in c.get("replicas") or []
                           if p.get("current") and not p.get("offline"))
        return leader, followers
