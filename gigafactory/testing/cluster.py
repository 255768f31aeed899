"""A JetStream cluster of embedded brokers on loopback, for tests and chaos scenarios.

Lab support only: a deployment runs its cluster with its own ``nats-server`` configuration;
``gigafactory up`` and ``server`` start one :class:`~gigafactory.embedded.EmbeddedServer`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from gigafactory import natsconf
from gigafactory.embedded import BrokerError, EmbeddedServer, free_ports
from gigafactory.natsconf import NodeConf


def _run_sync(coro):
    """Run ``coro`` to completion from synchronous code, even when this thread already runs
    an event loop (the caller's loop is then blocked for the duration, as it is by
    :meth:`EmbeddedServer.start`; async callers should await the coroutine instead)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class ClusterError(BrokerError):
    """The cluster did not reach the state asked for within the bound."""


@dataclass
class Cluster:
    """A JetStream cluster of ``size`` ``nats-server`` processes on loopback.

    Each node has its own client port, cluster port, monitoring port, store and
    ``server_name`` (``<name>-<i>``), routes to every other node, and the same cluster name.
    Its configuration is rendered from the template of ``compose/nats/n<i>.conf``
    (:mod:`gigafactory.natsconf`): the lab runs the deployment's configuration, placed on
    loopback. Ports are chosen once, at the first :meth:`start`, so :meth:`restart` brings a
    node back where its peers and clients expect it. Files live under ``root``:
    ``n<i>/store`` and ``n<i>/nats-server.log``.

    Synchronous use (fixtures, scripts)::

        with Cluster(root) as c:            # start() waits for a meta leader
            Broker.open(c.urls, ..., Settings(replicas=3))

    From a running event loop, start it off the loop and await the probes::

        c = Cluster(root)
        await asyncio.to_thread(c.start)
        i = await c.stream_leader("KV_gf_jobs")
        c.kill(i)
        await c.wait_stream_leader("KV_gf_jobs", not_on=i)
    """

    root: str
    size: int = 3
    name: str = "gigafactory"
    host: str = "127.0.0.1"
    sync_interval: str | None = None
    """A lab cluster keeps the server's default (background fsync): its nodes share one
    machine, and an R3 write acknowledged by a quorum survives one node's crash anyway; pass
    ``'always'`` for the durability of a deployment (see :class:`EmbeddedServer`)."""
    no_advertise: bool = False
    nodes: list[EmbeddedServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.size >= 1, f"a cluster needs at least one node, not {self.size}"

    # -- addresses -------------------------------------------------------------------------

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (what :meth:`Broker.open` takes)."""
        return ",".join(n.url for n in self.nodes)

    def live_urls(self) -> list[str]:
        return [n.url for n in self.nodes if n.alive]

    def index_of(self, server_name: str) -> int:
        """The node index of a JetStream server name (as in ``cluster.leader``)."""
        for i, n in enumerate(self.nodes):
            if n.name == server_name:
                return i
        raise KeyError(f"{server_name!r} is not a node of cluster {self.name!r} "
                       f"({', '.join(n.name for n in self.nodes)})")

    # -- processes -------------------------------------------------------------------------

    def node_confs(self) -> list[NodeConf]:
        """Every node's configuration, from the template the compose cluster's files are
        rendered from (:func:`gigafactory.natsconf.cluster_nodes`): the same shape as
        ``compose/nats/n<i>.conf``, placed on loopback (see :func:`gigafactory.natsconf.shape`)."""
        return [n.node_conf() for n in self.nodes]

    def _build(self) -> None:
        # Client, route and monitoring ports of every node, chosen together so none repeats.
        ports = free_ports(3 * self.size, self.host)
        client, cluster, http = ports[: self.size], ports[self.size: 2 * self.size], ports[2 * self.size:]
        dirs = [Path(self.root) / f"n{i}" for i in range(self.size)]
        confs = natsconf.cluster_nodes(
            names=[f"{self.name}-{i}" for i in range(self.size)], host=self.host,
            route_hosts=[self.host] * self.size, client_ports=client, cluster_ports=cluster, http_ports=http,
            store_dirs=[str(d / "store") for d in dirs], cluster_name=self.name,
            sync_interval=self.sync_interval, no_advertise=self.no_advertise)
        for d, c in zip(dirs, confs):
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(EmbeddedServer(
                store_dir=c.store_dir, port=c.port, host=c.host, sync_interval=c.sync_interval,
                server_name=c.server_name, cluster_port=c.cluster_port, cluster_name=c.cluster_name,
                routes=list(c.routes), http_port=c.http_port, no_advertise=c.no_advertise,
                log_file=str(d / "nats-server.log"),
            ))
        # Each server renders exactly what the template said for it.
        assert self.node_confs() == confs, (self.node_confs(), confs)

    def start(self, ready_timeout_s: float = 30.0, *, wait_ready: bool = True) -> "Cluster":
        """Start every node; with ``wait_ready`` (default) also wait until JetStream has a
        meta leader and can place a stream on every node (see :meth:`wait_ready`)."""
        if not self.nodes:
            self._build()
        try:
            for n in self.nodes:
                if not n.alive:
                    n.start(ready_timeout_s)
            if wait_ready:
                _run_sync(self.wait_ready(ready_timeout_s))
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, i: int) -> None:
        """``kill -9`` node ``i``. Its store and ports stay for :meth:`restart`.

        A crashed leader hands nothing over: its streams elect a new leader only after the
        raft election timeout, measured at 4-8 s on nats-server 2.15 (not configurable)."""
        self.nodes[i].kill()

    def terminate(self, i: int, timeout_s: float = 10.0) -> None:
        """Stop node ``i`` gracefully (SIGTERM): its stream leaderships move at once (well
        under a second), unlike :meth:`kill`. Its store and ports stay for :meth:`restart`."""
        self.nodes[i].stop(timeout_s)

    def restart(self, i: int, ready_timeout_s: float = 20.0) -> None:
        """Start node ``i`` again on the same store and ports (after :meth:`kill`), and wait
        until it accepts clients. Await :meth:`wait_rejoined` to know it caught up."""
        n = self.nodes[i]
        assert not n.alive, f"node {i} ({n.name}) is running; kill it first"
        n.start(ready_timeout_s)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- JetStream probes (each opens its own short connection to the live nodes) ----------

    async def _request(self, subject: str, payload: bytes = b"", *, urls: list[str] | None = None,
                       timeout_s: float = 2.0) -> dict:
        """One JetStream API request; the decoded JSON reply (which may hold ``error``)."""
        import nats  # the embedded single-server path must not need the client

        from gigafactory.broker import auth_options

        servers = urls or self.live_urls()
        if not servers:
            raise ClusterError(f"no node of cluster {self.name!r} is running")
        async def quiet(_e):  # a dead node in the list is expected here; the caller retries
            pass

        nc = await nats.connect(**auth_options(), servers=servers, connect_timeout=timeout_s, allow_reconnect=False,
                                max_reconnect_attempts=1, error_cb=quiet)
        try:
            msg = await nc.request(subject, payload, timeout=timeout_s)
            return json.loads(msg.data or b"{}")
        finally:
            await nc.close()

    async def _poll(self, probe, what: str, timeout_s: float, interval_s: float = 0.1):
        """Call async ``probe`` until it returns something other than None (bounded); any
        error counts as "not yet", and the last one is named if time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: object = None
        while True:
            remaining = deadline - loop.time()
            try:
                got = await asyncio.wait_for(probe(), max(0.05, remaining))
                if got is not None:
                    return got
            except Exception as e:  # noqa: BLE001 -- errors while a cluster settles are expected
                last = e
            if loop.time() >= deadline:
                raise ClusterError(f"cluster {self.name!r}: {what} not within {timeout_s:g}s; last: {last!r}")
            await asyncio.sleep(interval_s)

    async def wait_ready(self, timeout_s: float = 30.0, *, replicas: int | None = None) -> float:
        """Wait until JetStream has a meta leader that can place a stream on ``replicas``
        nodes (default: every running node): create a memory stream of that many replicas,
        then delete it. Returns the seconds it took."""
        r = replicas or len(self.live_urls())
        probe_name = f"GF_CLUSTER_PROBE_{secrets.token_hex(4)}"
        cfg = json.dumps({"name": probe_name, "subjects": [f"gf_cluster_probe.{probe_name}"],
                          "storage": "memory", "num_replicas": r, "max_msgs": 1}).encode()
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def create():
            reply = await self._request(f"$JS.API.STREAM.CREATE.{probe_name}", cfg)
            # Creating an existing identical stream succeeds too: a retry after a lost reply is fine.
            if "error" in reply:
                raise ClusterError(reply["error"].get("description", reply["error"]))
            return reply

        await self._poll(create, f"a meta leader and an R{r} stream", timeout_s, interval_s=0.2)
        await self._poll(self._delete_probe(probe_name), "deleting the readiness probe stream", timeout_s)
        return loop.time() - t0

    def _delete_probe(self, probe_name: str):
        async def delete():
            reply = await self._request(f"$JS.API.STREAM.DELETE.{probe_name}")
            err = reply.get("error")
            if err and err.get("err_code") != 10059:  # 10059: stream not found (already gone)
                raise ClusterError(err.get("description", err))
            return True

        return delete

    async def stream_info(self, stream: str, timeout_s: float = 1.0) -> dict:
        """``$JS.API.STREAM.INFO.<stream>`` as JSON. Raises :class:`ClusterError` on an API error."""
        reply = await self._request(f"$JS.API.STREAM.INFO.{stream}", timeout_s=timeout_s)
        if "error" in reply:
            raise ClusterError(f"stream info {stream}: {reply['error'].get('description', reply['error'])}")
        return reply

    async def stream_leader(self, stream: str, timeout_s: float = 10.0) -> int:
        """The node index of the current leader of ``stream`` (bounded wait for one)."""
        return await self.wait_stream_leader(stream, timeout_s=timeout_s)

    async def wait_stream_leader(self, stream: str, *, not_on: int | None = None, timeout_s: float = 30.0) -> int:
        """Wait until ``stream`` has a leader on a running node other than ``not_on`` (the
        node just killed: its peers may report it as leader until they notice), and return
        that node's index."""

        async def leader():
            # A stream without a leader does not answer at all (nats-server 2.15): keep each
            # probe short, so the wait ends soon after the election does.
            info = await self.stream_info(stream, timeout_s=0.5)
            name = (info.get("cluster") or {}).get("leader")
            if not name:
                return None
            i = self.index_of(name)
            return i if i != not_on and self.nodes[i].alive else None

        return await self._poll(leader, f"a leader of {stream}" + (f" other than node {not_on}" if not_on is not None else ""),
                                timeout_s)

    async def wait_rejoined(self, i: int, streams: list[str] | tuple[str, ...] = (), timeout_s: float = 30.0) -> float:
        """Wait until node ``i`` answers JetStream requests itself and, for each of
        ``streams``, is its leader or a current, online replica. Returns the seconds it took."""
        node = self.nodes[i]
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def meta():
            reply = await self._request("$JS.API.INFO", urls=[node.url])
            return True if "error" not in reply else None

        await self._poll(meta, f"node {i} ({node.name}) answering $JS.API.INFO", timeout_s)
        for stream in streams:
            async def current(stream=stream):
                c = (await self.stream_info(stream)).get("cluster") or {}
                if c.get("leader") == node.name:
                    return True
                for peer in c.get("replicas") or []:
                    if peer.get("name") == node.name and peer.get("current") and not peer.get("offline"):
                        return True
                return None

            await self._poll(current, f"node {i} ({node.name}) current in {stream}",
                             max(0.1, timeout_s - (loop.time() - t0)))
        return loop.time() - t0
