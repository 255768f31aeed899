"""The factory: one long-running agent per machine.

Probe, register, heartbeat; bind to the dispatch pools this machine can serve and pull only
when a station is free; claim with a compare-and-set; run the engine in its own process
group; gate with ``verify``; report under the lease's epoch. A write refused for a stale
epoch stops the run, and its result goes to quarantine, never to the broker.

A holder fences itself too. Each engine runs under a supervisor (:mod:`supervise`) that
stops the engine's process group when this factory dies by any signal. A run whose lease was
not renewed successfully for ``lease_ttl_s - fence_margin_s`` (this machine's boot clock,
from when the last successful renewal was sent) stops its engine, SIGTERM then SIGKILL, before
the reaper may reclaim it; the supervisor enforces that deadline even when this event loop
is stalled. The result goes to quarantine and a ``self_fenced`` event says why. A job's lock
entry is rewritten on every successful renewal, so others can tell a live holder from a
stopped one (:func:`protocol.lock_verdict`).

When push dispatch is unavailable (stream or consumer gone, or stalled while jobs wait in
the queue index), a pool falls back to polling the ``gf_queue`` index with jittered
back-off, and returns to push once its consumer answers again. When the broker is down,
running jobs go on and their results wait in the local durable outbox.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import secrets
import socket
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from gigafactory import __version__
from gigafactory.broker import TRANSIENT, Broker, Conflict
from gigafactory.config import Settings
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import FailureClass, parse_duration, shell_script
from gigafactory.schemas.records import (
    Attribution,
    DispatchMessage,
    EventRecord,
    FactoryRecord,
    IdleReason,
    JobRecord,
    LockRecord,
    PoolRecord,
    QueueEntry,
    Station,
    StationState,
    decode,
    encode,
)

from . import lease
from . import probe as probe_mod
from . import shell
from .logs import CappedLog, LogUploadTimeout
from .outbox import Outbox, OutboxItem

log = logging.getLogger("gigafactory.factory")

STALL_CHECKS_PER_REDISPATCH = 1 / 3
"""An idle pool puller checks that no queued job of its pool has waited unclaimed (a stall)
every ``redispatch_s / STALL_CHECKS_PER_REDISPATCH`` (30 s with the default 10 s). A deleted
stream or consumer needs no check: the next fetch is refused at once (503, no responders) and
the pool falls back within a long poll. The check is for push that stays silent while jobs
wait (a coordinator that is gone, say); a stall is only visible after
``2 * redispatch_s + long_poll_s`` anyway, so checking more often would cost for nothing.

What a check costs: while the pool's queue index stays as a check last found it, empty (the
idle fleet), one direct get that asks whether anything was written to it since (no consumer,
no clock probe, no JetStream API request). Otherwise a full check: one scan of the pool's
index and, only when something is queued, a broker-clock probe, the consumer lookup and up to
STALL_READS_MAX record reads."""
STALL_READS_MAX = 8
"""Index entries old enough to look stalled are confirmed against their job records, at most
this many per check (a healthy pool has none: each read costs one request)."""
POLL_BACKOFF_MIN_S = 0.5
"""First back-off between polling passes that claimed nothing; doubles up to
``poll_backoff_max_s``."""
MAX_CAS_RETRIES = lease.MAX_CAS_RETRIES
"""Tries of a lock write; the job record's writes are bounded by :mod:`lease` itself."""
EVENT_QUEUE_MAX = 10_000
"""Audit events waiting to be stored (the broker away) beyond this drop the oldest, logged."""
EVENT_RETRY_MIN_S = 0.05
EVENT_RETRY_MAX_S = 2.0
"""Back-off between tries of an audit event the stream did not store."""
OUTBOX_RETRY_S = 1.0
"""While results wait in the outbox, publishing them is tried this often."""
NOOP_ENGINE = "noop"
"""The built-in engine that does nothing (see :meth:`Factory._run_noop`)."""


class ResultPayload(msgspec.Struct):
    """What the outbox keeps for a finished attempt until the broker takes it."""

    job: str
    epoch: int
    failure: FailureClass | None
    detail: str
    exit_code: int | None
    verify_exit_code: int | None
    log_path: str
    log_object: str | None
    attribution: Attribution
    finished_at: float


@dataclass
class Run:
    job: str
    epoch: int
    station: int
    revision: int
    record: JobRecord
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    """Stops the engine (fenced, draining)."""
    stop_renewing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set just before the result (or hand-back) is written: renewals go on through the log
    upload, so a slow upload cannot let the lease expire under a good result."""
    fenced: bool = False
    draining: bool = False
    """Set by drain: the run is stopped and handed back, not reported as a failure."""
    lock_key: str | None = None
    lock_rev: int = 0
    lock_value: bytes = b""
    lock_sent_s: float | None = None
    """When (:func:`shell.fence_clock`) the write that took or refreshed the lock entry was sent:
    the lock is presumed free ``lease_ttl_s + fence_margin_s`` after that entry was stored, so
    the first self-fencing deadline counts from the older of this and the start write."""
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fence: shell.FenceDeadline | None = None
    """The self-fencing deadline (None before the start write, or with
    ``unsafe_unfenced_engines``): extended after each successful renewal."""
    self_fenced: str | None = None
    """Why the run stopped its own engine (the deadline passed without a renewal), if it did."""


@dataclass
class PoolState:
    id: str
    requirements: list[str]
    engine: str | None
    mode: str = "push"
    task: asyncio.Task | None = None
    psub: object | None = None
    """The pool consumer's pull subscription while in push mode."""
    gone: bool = False
    """Its ``gf_pools`` entry was deleted (the coordinator's retention collected the idle
    pool): the puller stops at its next turn and the factory unbinds."""
    index_quiet: tuple[int, int] | None = None
    """``(sequence, reconnects)``: a stall check found the pool's queue index empty, and the
    newest message on its keys then had this stream sequence (on this connection, counted by
    its reconnects). While nothing is written after it, nothing of the pool waits, and an idle
    check costs one direct get (see :meth:`Factory._index_quiet`). None: not known empty."""


class Factory:
    def __init__(
        self,
        broker: Broker,
        *,
        factory_id: str | None = None,
        stations: int = 2,
        seats: dict[str, int] | None = None,
        extra_capabilities: list[str] | tuple[str, ...] = (),
        probe: bool = True,
        workspace: str | None = None,
        data_dir: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        assert stations >= 1
        self.b = broker
        self.s = (settings or broker.settings).validate()
        if self.s.unsafe_unfenced_engines:
            log.warning("UNSAFE: unsafe_unfenced_engines is on: engines are not killed when this factory dies "
                        "and are not stopped when its leases lapse; a job's side effects can happen twice. "
                        "Use this only for the chaos suite's broken-on-purpose variant.")
        self.id = factory_id or socket.gethostname().split(".")[0].lower()
        assert names.is_job_id(self.id) or all(c.isalnum() or c in "-_" for c in self.id), self.id
        desc = probe_mod.describe()
        tokens = probe_mod.probe(extra_capabilities) if probe else list(extra_capabilities) + ["engine:shell"]
        tokens = sorted(set(tokens) | {f"factory:{self.id}"})
        self.offers = caps.Offers(tokens)
        self.record = FactoryRecord(
            id=self.id, host=desc.get("host", socket.gethostname()), os=desc.get("os", ""),
            arch=desc.get("arch", ""), capabilities=sorted(self.offers.tokens),
            stations=[Station(index=i, since=time.time()) for i in range(stations)],
            seats=dict(seats or {}), started_at=time.time(), heartbeat_interval_s=self.s.heartbeat_s,
            pid=os.getpid(), version=__version__,
        )
        base = Path(data_dir) if data_dir else Path.home() / ".gigafactory" / "factories"
        self.dir = base / self.id
        self.logs_dir = self.dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.workspace = Path(workspace) if workspace else self.dir / "work"
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(str(self.dir / "outbox"))
        self.free: set[int] = set(range(stations))
        self.station_cv = asyncio.Condition()
        self.engine_running: dict[str, int] = {}
        self.runs: dict[tuple[str, int], Run] = {}
        """In-flight runs by (job, epoch): a stale run of a job never shadows a newer one."""
        self.pools: dict[str, PoolState] = {}
        self.draining = asyncio.Event()
        self.ready = asyncio.Event()
        self.stats = {"claims": 0, "claim_conflicts": 0, "claim_skipped": 0, "fenced_writes": 0,
                      "handed_back": 0, "finished": 0, "quarantined": 0, "polled_claims": 0,
                      "events_published": 0, "events_dropped": 0,
                      "pool_scans": 0, "pool_records": 0, "outbox_wakeups": 0,
                      "stall_probes": 0, "stall_checks": 0, "self_fenced": 0}
        """Counters. ``pool_scans``/``pool_records``/``outbox_wakeups`` say how much work an
        idle factory does (none beyond its heartbeat and long polls is the goal);
        ``stall_probes`` counts the one-request checks of a quiet pool index, ``stall_checks``
        the full ones (an index scan, and a consumer lookup when something is queued)."""
        self._stop: asyncio.Event | None = None
        self._pools_rescan = asyncio.Event()
        """Set when the pools must be read again (after a reconnect)."""
        self._outbox_kick = asyncio.Event()
        """Set when an item is put in the outbox: the flusher sleeps until then."""
        self._tasks: set[asyncio.Task] = set()
        self._events: collections.deque[tuple[EventRecord, str]] = collections.deque()
        """Audit events not stored yet, oldest first, each with its message id."""
        self._events_waiting = asyncio.Event()

    # -- stations -----------------------------------------------------------------------------

    def _idle_reason(self) -> IdleReason:
        if self.draining.is_set():
            return IdleReason.DRAINING
        if not self.b.nc.is_connected:
            return IdleReason.BROKER_DOWN
        if self.pools and all(p.mode == "poll" for p in self.pools.values()):
            return IdleReason.DISPATCH_DOWN
        return IdleReason.NO_WORK

    def _set_station(self, index: int, job: str | None, epoch: int | None, reason: IdleReason | None = None) -> None:
        st = self.record.stations[index]
        st.state = StationState.BUSY if job else StationState.IDLE
        st.job, st.epoch = job, epoch
        st.idle_reason = None if job else (reason or self._idle_reason())
        st.since = time.time()

    async def _take_station(self, engine: str | None) -> int | None:
        """Reserve a free station (and an engine seat) without waiting; None if none."""
        async with self.station_cv:
            if not self.free or self.draining.is_set():
                return None
            if engine and engine in self.record.seats and self.engine_running.get(engine, 0) >= self.record.seats[engine]:
                return None
            idx = min(self.free)
            self.free.discard(idx)
            if engine:
                self.engine_running[engine] = self.engine_running.get(engine, 0) + 1
            return idx

    async def _release_station(self, index: int, engine: str | None, reason: IdleReason | None = None) -> None:
        async with self.station_cv:
            self.free.add(index)
            if engine:
                self.engine_running[engine] = max(0, self.engine_running.get(engine, 0) - 1)
            self._set_station(index, None, None, reason)
            self.station_cv.notify_all()

    async def _wait_capacity(self, engine: str | None, timeout_s: float | None = None) -> bool:
        """Wait until a station (and a seat of ``engine``) is free, or draining; False if
        ``timeout_s`` passed first."""
        def ok() -> bool:
            if self.draining.is_set():
                return True
            if not self.free:
                return False
            return not (engine and engine in self.record.seats
                        and self.engine_running.get(engine, 0) >= self.record.seats[engine])

        async with self.station_cv:
            try:
                await asyncio.wait_for(self.station_cv.wait_for(ok), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain: stop claiming, let in-flight work finish
        (up to ``drain_timeout_s``), hand back what is left, deregister."""
        self._stop = stop
        await self._heartbeat()
        for st in self.record.stations:
            st.idle_reason = IdleReason.NO_WORK
        self._spawn(self._events_loop(), "events")
        self._spawn(self._heartbeat_loop(stop), "heartbeat")
        self._spawn(self._pools_loop(stop), "pools")
        self._spawn(self._outbox_loop(stop), "outbox")
        await self._event("factory_up", reason=f"{len(self.record.stations)} stations",
                          data={"capabilities": self.record.capabilities})
        self.ready.set()
        await stop.wait()
        await self.drain()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        t = asyncio.create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def drain(self) -> None:
        log.info("%s draining: %d jobs in flight", self.id, len(self.runs))
        self.draining.set()
        self.record.status = "draining"
        async with self.station_cv:
            self.station_cv.notify_all()
        for p in self.pools.values():
            if p.task:
                p.task.cancel()
        await self._safe(self._heartbeat())
        deadline = time.monotonic() + self.s.drain_timeout_s
        while self.runs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in list(self.runs.values()):
            run.draining = True  # _execute hands it back once the engine has stopped
            run.cancel.set()
        deadline = time.monotonic() + 10
        while self.runs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._safe(self._flush_outbox())
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.record.status = "down"
        await self._safe(self.b.factories.delete(self.id))
        await self._event("factory_down", reason="drained")
        if not await self._publish_events(time.monotonic() + self.s.request_timeout_s * 2):
            log.warning("%s: %d audit events not stored at exit", self.id, len(self._events))
        self.outbox.close()

    async def _safe(self, coro):
        try:
            return await asyncio.wait_for(coro, timeout=self.s.request_timeout_s * 2)
        except Exception as e:
            log.info("%s: %s during drain (%s)", self.id, type(e).__name__, e)
            return None

    async def _heartbeat(self) -> None:
        self.record.heartbeat_at = time.time()
        self.record.outbox_pending = self.outbox.count()
        self.record.pools = sorted(self.pools)
        self.record.dispatch_mode = "poll" if any(p.mode == "poll" for p in self.pools.values()) else "push"
        for st in self.record.stations:
            if st.state == StationState.IDLE:
                st.idle_reason = self._idle_reason()
        await self.b.factories.put(self.id, encode(self.record))

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        self._heartbeat_reconnects = self.b.nc.stats["reconnects"]
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.s.heartbeat_s)
            except asyncio.TimeoutError:
                pass
            if stop.is_set() or self.draining.is_set():
                return
            try:
                await self._heartbeat()
            except Exception as e:
                log.info("%s: heartbeat failed (%s)", self.id, e)
            if self.b.nc.stats["reconnects"] != self._heartbeat_reconnects:
                self._heartbeat_reconnects = self.b.nc.stats["reconnects"]
                self._pools_rescan.set()

    async def _event(self, kind: str, *, job: str | None = None, epoch: int | None = None,
                     stage_from: str | None = None, stage_to: str | None = None, reason: str = "",
                     data: dict | None = None) -> None:
        """Queue an audit event; :meth:`_events_loop` publishes the queue in order.

        An event follows the record write it describes, and the write may have reached the job
        bucket while ``GF_EVENTS`` has no leader (an election on a cluster) or the broker went
        away just after: published inline, such an event was lost, and the audit showed a
        result with no claim before it. Queued, it is retried until stored (with one message id,
        so a retry of a publish whose reply was lost is stored once), and the events after it
        wait their turn, so the audit keeps the order of the writes. The run never waits on it."""
        ev = EventRecord(
            kind=kind, at=time.time(), job=job, epoch=epoch, factory=self.id, actor=self.id,
            stage_from=stage_from, stage_to=stage_to, reason=reason, data=data or {},
        )
        if len(self._events) >= EVENT_QUEUE_MAX:
            lost, _ = self._events.popleft()
            self.stats["events_dropped"] += 1
            log.warning("%s: audit queue full (%d); event %s for %s dropped", self.id, EVENT_QUEUE_MAX,
                        lost.kind, lost.job)
        self._events.append((ev, f"{self.id}-{secrets.token_hex(8)}"))
        self._events_waiting.set()

    async def _publish_events(self, deadline: float | None = None) -> bool:
        """Publish queued events in order until the queue is empty (True) or ``deadline``
        (monotonic) passes (False). A failed publish is retried, with back-off, before any
        later event is sent."""
        delay, failures = EVENT_RETRY_MIN_S, 0
        while self._events:
            ev, msg_id = self._events[0]
            try:
                await self.b.publish_event(ev, msg_id=msg_id)
            except Exception as e:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.info("%s: event %s for %s not stored yet (%s); %d queued, retrying", self.id, ev.kind,
                             ev.job, e, len(self._events))
                pause = random.uniform(delay / 2, delay)
                if deadline is not None and time.monotonic() + pause > deadline:
                    return False
                await asyncio.sleep(pause)
                delay = min(delay * 2, EVENT_RETRY_MAX_S)
                continue
            self._events.popleft()
            self.stats["events_published"] += 1
            delay, failures = EVENT_RETRY_MIN_S, 0
        return True

    async def _events_loop(self) -> None:
        while True:
            self._events_waiting.clear()
            await self._publish_events()
            await self._events_waiting.wait()

    # -- pools ------------------------------------------------------------------------------------

    async def _pools_loop(self, stop: asyncio.Event) -> None:
        """Bind to every pool this factory can serve, as pools appear.

        A plain subscription to the bucket's subjects hears each pool as it is written, and
        costs nothing while none is: an idle fleet's traffic stays heartbeats and long polls.
        (A long-lived KV watch is an ordered consumer: an idle-heartbeat message every 5 s and
        a flow-control timer every 0.25 s per factory, with nothing to say.) A scan reads the
        pools written before, and again after a reconnect (the subscription missed whatever
        was written while the connection was down); the heartbeat loop asks for that one."""
        sub = None
        scanned_at = -1
        while not stop.is_set():
            try:
                if sub is None:
                    sub = await self.b.nc.subscribe(f"$KV.{names.POOLS_BUCKET}.>", cb=self._on_pool_msg)
                self._pools_rescan.clear()
                reconnects = self.b.nc.stats["reconnects"]
                if reconnects != scanned_at:
                    self.stats["pool_scans"] += 1
                    async for e in self.b.pools.scan():
                        self._bind_pool(e.key, e.value, stop)
                    scanned_at = reconnects
                await self._pools_rescan.wait()
            except asyncio.CancelledError:
                raise
            except Exception as ex:
                log.info("%s: reading the pools failed (%s); reading again", self.id, ex)
                await asyncio.sleep(1.0)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be gone; the subscription goes with it
                pass

    async def _on_pool_msg(self, msg) -> None:
        key = msg.subject[len(f"$KV.{names.POOLS_BUCKET}."):]
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            # The pool was collected as idle: stop pulling from its (deleted) consumer rather
            # than fall back to polling it forever. It is bound again if it comes back.
            ps = self.pools.get(key)
            if ps is not None and not ps.gone:
                ps.gone = True
                log.info("%s: pool %s was deleted; unbinding", self.id, key)
            return
        self._bind_pool(key, msg.data, self._stop)

    def _bind_pool(self, key: str, value: bytes, stop: asyncio.Event | None) -> None:
        self.stats["pool_records"] += 1
        old = self.pools.get(key)
        if stop is None or stop.is_set() or self.draining.is_set() or not value or (old is not None and not old.gone):
            return
        try:
            pool = decode(value, PoolRecord)
        except msgspec.DecodeError:
            return
        if self.offers.missing(pool.requirements):
            return
        engine = next((r.split(":", 1)[1] for r in pool.requirements if r.startswith("engine:")), None)
        ps = PoolState(pool.id, pool.requirements, engine)
        self.pools[pool.id] = ps
        ps.task = self._spawn(self._puller(ps, stop), f"pool-{pool.id}")
        log.info("%s serves pool %s (%s)", self.id, pool.id, " ".join(pool.requirements))

    async def _puller(self, ps: PoolState, stop: asyncio.Event) -> None:
        try:
            await self._pull_loop(ps, stop)
        finally:
            if ps.gone and self.pools.get(ps.id) is ps:  # not rebound meanwhile
                del self.pools[ps.id]
            # A fetch cut short (drain cancels this task) leaves its subscription buffering
            # messages that no one takes; nats-py's connection drain then waits for them until
            # its timeout. Dropping the subscription lets the factory shut down at once.
            await self._drop_psub(ps)

    async def _drop_psub(self, ps: PoolState) -> None:
        psub, ps.psub = ps.psub, None
        if psub is None:
            return
        try:
            await asyncio.wait_for(psub.unsubscribe(), timeout=self.s.request_timeout_s)
        except Exception as e:  # the connection may be gone; the subscription goes with it
            log.debug("%s: dropping the pull subscription of pool %s: %s", self.id, ps.id, e)

    @property
    def stall_after_s(self) -> float:
        """A queued, dispatchable job of a pool that has waited this long (broker time) while
        a station of this factory was free says push is not delivering: the coordinator
        republishes an unclaimed offer after ``redispatch_s``, so two periods and a long poll
        are only ever exceeded when dispatch itself is broken."""
        return 2 * self.s.redispatch_s + self.s.long_poll_s

    @property
    def stall_check_s(self) -> float:
        """How often an idle push puller checks for a stall (see STALL_CHECKS_PER_REDISPATCH)."""
        return self.s.redispatch_s / STALL_CHECKS_PER_REDISPATCH

    async def _pull_loop(self, ps: PoolState, stop: asyncio.Event) -> None:
        """One pool's dispatch: push (a long-poll fetch on the pool consumer) while it works,
        else polling the ``gf_queue`` index with jittered back-off until the consumer answers
        and nothing waits stalled. Each switch is logged and published as a ``dispatch_mode``
        event."""
        errors = 0
        # A random phase: factories started together would otherwise all check at once, every
        # stall_check_s, a herd of consumer lookups and index scans on the broker.
        last_check = time.monotonic() - random.uniform(0.0, self.stall_check_s)
        backoff = POLL_BACKOFF_MIN_S
        while not stop.is_set() and not self.draining.is_set() and not ps.gone:
            while not await self._wait_capacity(ps.engine, timeout_s=self.s.long_poll_s):
                await self._hand_back_stranded(ps)
            if self.draining.is_set():
                return
            if ps.mode == "poll":
                claimed = await self._poll_pass(ps)
                if await self._push_healthy(ps):
                    await self._switch(ps, "push", "the pool consumer answers and no queued job waits stalled")
                    errors, backoff, last_check = 0, POLL_BACKOFF_MIN_S, time.monotonic()
                    continue
                if not claimed:
                    backoff = min(backoff * 2, self.s.poll_backoff_max_s)
                    await asyncio.sleep(random.uniform(backoff / 2, backoff))
                else:
                    backoff = POLL_BACKOFF_MIN_S
                continue
            if not self.b.nc.is_connected:
                # A pull request sent now would wait in the client's buffer and reach the
                # broker on reconnect with every other one sent during the outage: a fleet of
                # idle stations would return with several stale requests each on every pool
                # consumer (past its max_waiting, for a big fleet and a long outage). Wait for
                # the connection instead; the request goes out as soon as it is back.
                await self.b.wait_connected(self.s.long_poll_s)
                continue
            try:
                if ps.psub is None:
                    ps.psub = await self.b.js.pull_subscribe_bind(
                        durable=names.pool_consumer(ps.id), stream=names.DISPATCH_STREAM,
                    )
                msgs = await asyncio.wait_for(
                    ps.psub.fetch(1, timeout=self.s.long_poll_s),
                    timeout=self.s.long_poll_s + self.s.request_timeout_s,
                )
                errors = 0
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                errors = 0
                # Only with the connection up: a broker that is not answering says nothing
                # about the consumer, and a fleet checking during an outage would all fall back.
                if time.monotonic() - last_check > self.stall_check_s and self.b.nc.is_connected:
                    last_check = time.monotonic()
                    reconnects = self.b.nc.stats["reconnects"]

                    def verdict_holds() -> bool:
                        # A check the connection dropped under (its requests timed out) is no
                        # verdict on the consumer: a fleet checking when the broker died would
                        # all fall back at once.
                        return self.b.nc.is_connected and self.b.nc.stats["reconnects"] == reconnects

                    if await self._index_quiet(ps):
                        continue
                    self.stats["stall_checks"] += 1
                    stalled = await self._stalled(ps)
                    if ps.index_quiet is not None:
                        continue  # nothing queued: nothing for push to deliver, nothing to check
                    if not await self._consumer_ok(ps):
                        if verdict_holds():
                            await self._drop_psub(ps)
                            await self._switch(ps, "poll", "the pool consumer does not answer")
                    elif stalled and verdict_holds():
                        await self._drop_psub(ps)
                        await self._switch(ps, "poll", f"a queued job waited over {self.stall_after_s:g}s "
                                                       "while a station was free (push is not delivering)")
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # A deleted consumer or stream answers a fetch at once with 503 (no responders).
                await self._drop_psub(ps)
                if not self.b.nc.is_connected:
                    continue  # the connection went, not the consumer: wait for it (above)
                errors += 1
                log.info("%s: fetch on pool %s failed (%s)", self.id, ps.id, e)
                if errors >= 3 or not await self._consumer_ok(ps):
                    await self._switch(ps, "poll", f"fetch failed: {type(e).__name__} {e}".strip())
                    backoff = POLL_BACKOFF_MIN_S
                else:
                    await asyncio.sleep(random.uniform(0.2, 1.0))
                continue
            for msg in msgs:
                await self._on_dispatch(ps, msg)

    async def _hand_back_stranded(self, ps: PoolState) -> None:
        """A pull request this factory no longer waits on (a long poll that timed out as its
        message arrived, or one buffered while disconnected and sent on reconnect) still takes
        a dispatch message on the server, and the message waits in the subscription until the
        next fetch, which with every station busy may be long. Take such messages now: with a
        station free again they are claimed, else nak'd, so a factory with a free one can.
        Reads only what already waits (no new pull request), skipping the status replies."""
        psub = ps.psub
        if psub is None:
            return
        for _ in range(min(psub.pending_msgs, 1000)):
            try:
                msg = await psub._sub.next_msg(timeout=0.01)  # nats-py's queue under the pull subscription
            except Exception:  # drained meanwhile, or the connection is gone
                return
            if not JetStreamContext.is_status_msg(msg):  # 408/404 replies to expired requests
                await self._on_dispatch(ps, msg)

    async def _switch(self, ps: PoolState, mode: str, why: str) -> None:
        """Set pool ``ps`` to ``mode`` ("push" or "poll"); a change is logged and published
        (event ``dispatch_mode``, with the pool, from, to, why and this factory's polled claims
        so far), and shows in the factory record's ``dispatch_mode`` at the next heartbeat."""
        assert mode in ("push", "poll"), mode
        if ps.mode == mode:
            return
        old, ps.mode = ps.mode, mode
        if mode == "poll":
            log.warning("%s: pool %s falls back to polling: %s", self.id, ps.id, why)
        else:
            log.info("%s: pool %s back to push dispatch: %s", self.id, ps.id, why)
        await self._event("dispatch_mode", reason=f"pool {ps.id}: {old} -> {mode}: {why}",
                          data={"pool": ps.id, "from": old, "to": mode, "why": why,
                                "polled_claims": self.stats["polled_claims"]})

    def _has_capacity(self, engine: str | None) -> bool:
        if not self.free:
            return False
        return not (engine and engine in self.record.seats
                    and self.engine_running.get(engine, 0) >= self.record.seats[engine])

    async def _push_healthy(self, ps: PoolState) -> bool:
        """Whether a polling pool may go back to push: its consumer answers, and no queued job
        waits stalled. With every station busy right after a polling pass, a backlog says
        nothing about push (this factory could not have taken more), so only the consumer
        counts; push mode checks for stalls again while idle."""
        if not await self._consumer_ok(ps):
            return False
        return not self._has_capacity(ps.engine) or not await self._stalled(ps)

    async def _consumer_ok(self, ps: PoolState) -> bool:
        try:
            await self.b.js.consumer_info(names.DISPATCH_STREAM, names.pool_consumer(ps.id))
            return True
        except Exception:
            return False

    async def _index_quiet(self, ps: PoolState) -> bool:
        """Whether the pool's queue index is still as a stall check last found it, empty:
        nothing written to its keys since (one direct get; a reply of a 404 status while
        idle). Unknown (never checked, or checked on an earlier connection: a broker that
        came back without its store numbers messages from 1 again), or a probe that fails,
        is False: the caller does the full check, with its own guards for a broker that is
        not answering. The index is the coordinator's, so a quiet index is also what a
        fleet sees while the coordinator is down and nothing waits."""
        q = ps.index_quiet
        if q is None or q[1] != self.b.nc.stats["reconnects"]:
            return False
        self.stats["stall_probes"] += 1
        try:
            if not await self.b.queue.written_after(f"{ps.id}.>", q[0]):
                return True
        except Exception as ex:
            log.info("%s: probing the index of pool %s failed (%s)", self.id, ps.id, ex)
        ps.index_quiet = None
        return False

    async def _stalled(self, ps: PoolState) -> bool:
        """A queued job of this pool that it could take has waited longer than
        ``stall_after_s`` (broker time): push is not delivering. One filtered scan of the
        pool's index; only the entries old enough are confirmed against their records (at
        most STALL_READS_MAX), so jobs that wait by design (in retry back-off, for a lock,
        or already claimed but not yet out of the index) do not count. An index found empty
        sets ``ps.index_quiet`` (and costs no clock probe); anything in it clears it."""
        ps.index_quiet = None
        try:
            # Read before the scan: a key written between the two is seen by the scan, one
            # written after it has a later sequence, so the next probe sees it.
            mark, reconnects = await self.b.queue.newest_seq(f"{ps.id}.>"), self.b.nc.stats["reconnects"]
            now: float | None = None
            old = []
            async for e in self.b.queue.scan(f"{ps.id}.>"):
                if now is None:
                    now = await self.b.broker_now()
                if now - e.ts > self.stall_after_s:
                    old.append(e)
            ps.index_quiet = (mark, reconnects) if now is None else None
            assert now is not None or not old
            for e in old[:STALL_READS_MAX]:
                try:
                    q = decode(e.value, QueueEntry)
                except msgspec.DecodeError:
                    continue
                je = await self.b.jobs.get(q.job)
                if je is None:
                    continue
                rec = decode(je.value, JobRecord)
                if rec.stage != Stage.QUEUED or rec.epoch != q.epoch or rec.manifest.lock:
                    continue
                if now - max(e.ts, je.ts + rec.backoff_s) > self.stall_after_s:
                    return True
        except Exception as ex:  # the broker does not answer: push cannot be working either
            log.info("%s: stall check of pool %s failed (%s)", self.id, ps.id, ex)
            return True
        return False

    async def _poll_pass(self, ps: PoolState) -> bool:
        """Try to claim queued jobs of a pool straight from the index, best first."""
        try:
            entries = []
            async for e in self.b.queue.scan(f"{ps.id}.>"):
                try:
                    entries.append(decode(e.value, QueueEntry))
                except msgspec.DecodeError:
                    continue
        except Exception as e:
            log.info("%s: polling pool %s failed (%s)", self.id, ps.id, e)
            return False
        entries.sort(key=lambda q: (q.priority_rank, q.submitted_at))
        claimed = False
        for q in entries:
            station = await self._take_station(ps.engine)
            if station is None:
                break
            if await self._claim_and_run(q.job, station, ps.engine, via="poll"):
                claimed = True
                self.stats["polled_claims"] += 1
        return claimed

    async def _on_dispatch(self, ps: PoolState, msg) -> None:
        try:
            d = decode(msg.data, DispatchMessage)
        except msgspec.DecodeError:
            await msg.term()  # not ours to understand; never redeliver garbage
            return
        station = await self._take_station(ps.engine)
        if station is None:
            await msg.nak()  # another factory (or this one, later) takes it
            return
        try:
            await self._claim_and_run(d.job, station, ps.engine, via="push")
        finally:
            try:
                await msg.ack()
            except Exception:
                pass  # redelivery is harmless: the claim is a CAS on the record

    # -- one job ------------------------------------------------------------------------------------

    async def _claim_and_run(self, job_id: str, station: int, engine: str | None, *, via: str = "push") -> bool:
        """Claim ``job_id`` on ``station``; on success the run continues in the background.
        ``via`` says how the job was found ("push": a dispatch message, "poll": the queue
        index), for the ``claimed`` event. Returns True if this factory won the claim."""
        try:
            e = await self.b.jobs.get(job_id)
            if e is None:
                self.stats["claim_skipped"] += 1
                await self._release_station(station, engine)
                return False
            rec = decode(e.value, JobRecord)
            if rec.stage != Stage.QUEUED or self.offers.missing(rec.requirements):
                self.stats["claim_skipped"] += 1
                await self._release_station(station, engine)
                return False
            if rec.backoff_s and (await self.b.broker_now()) < e.ts + rec.backoff_s:
                self.stats["claim_skipped"] += 1
                await self._release_station(station, engine)
                return False
            out = protocol.claim(rec, self.id, station, time.time())
            self.stats["claims"] += 1
            try:
                rev = await self.b.jobs.update(job_id, encode(out.record), last=e.revision)
            except Conflict:
                self.stats["claim_conflicts"] += 1
                await self._release_station(station, engine)
                return False
        except Exception as ex:
            log.info("%s: claim of %s failed (%s)", self.id, job_id, ex)
            await self._release_station(station, engine)
            return False
        run = Run(job_id, out.record.epoch, station, rev, out.record)
        self.runs[(job_id, run.epoch)] = run
        self._set_station(station, job_id, run.epoch)
        await self._event("claimed", job=job_id, epoch=run.epoch, stage_from="queued", stage_to="assigned",
                          reason=out.reason, data={"station": station, "attempt": out.record.attempt, "via": via})
        self._spawn(self._execute(run, engine), f"job-{job_id}")
        return True

    async def _write(self, run: Run, decide, *, renewal: bool = False) -> JobRecord | None:
        """A fenced write: ``decide(record) -> record|Outcome``, CAS on the revision we hold.
        Returns the record the run holds afterwards, or None if the run is fenced; raises
        ``Conflict`` after ``MAX_CAS_RETRIES`` refused tries, and the broker's error when a
        read after a conflict or an unanswered write gets no answer either.

        This is only the I/O: every decision (retry, learn that an unanswered write landed,
        back off, fenced, give up) is :class:`lease.FencedWrite`'s, the machine the
        deterministic simulation drives too."""
        async with run.write_lock:
            machine = lease.FencedWrite(run.record, run.revision, decide, stopped=lambda: run.fenced)
            act = machine.start()
            while True:
                if isinstance(act, lease.Send):
                    try:
                        act = machine.stored(await self.b.jobs.update(run.job, act.data, last=act.last))
                    except Conflict:
                        act = machine.conflict()
                    except TRANSIENT:
                        act = machine.no_answer()
                elif isinstance(act, lease.Read):
                    try:
                        fresh = await self.b.jobs.get(run.job)
                    except TRANSIENT:
                        machine.read_unanswered()
                        raise
                    act = machine.read(None) if fresh is None else machine.read(fresh.value, fresh.revision)
                elif isinstance(act, lease.BackOff):
                    await asyncio.sleep(act.delay_s)
                    act = machine.backed_off()
                elif isinstance(act, lease.Done):
                    if act.revision is not None:
                        run.revision, run.record = act.revision, act.record
                    return act.record
                elif isinstance(act, lease.Fenced):
                    if act.noticed:
                        await self._fenced(run, act.record)
                    return None
                else:
                    assert isinstance(act, lease.GiveUp), act
                    raise Conflict(f"{run.job}: could not write after {lease.MAX_CAS_RETRIES} tries")

    async def _fenced(self, run: Run, rec: JobRecord | None) -> None:
        if run.fenced:
            return
        run.fenced = True
        run.stop_renewing.set()
        run.cancel.set()
        self.stats["fenced_writes"] += 1
        now = f"epoch {rec.epoch}, {rec.stage}" if rec else "gone"
        log.warning("%s: fenced on %s: held epoch %d, record at %s", self.id, run.job, run.epoch, now)
        await self._event("fenced", job=run.job, epoch=run.epoch,
                          reason=f"write with stale epoch {run.epoch} refused (record at {now})",
                          data={"held_epoch": run.epoch, "record_epoch": rec.epoch if rec else None})

    def _fence_deadline_s(self, sent_s: float) -> float:
        """The self-fencing deadline for a lease write sent at ``sent_s`` (:func:`shell.fence_clock`)."""
        return sent_s + self.s.lease_ttl_s - self.s.fence_margin_effective_s

    def _self_fence_reason(self, run: Run) -> str:
        assert run.fence is not None
        since_s = shell.fence_clock() - (run.fence.at_s - self.s.lease_ttl_s + self.s.fence_margin_effective_s)
        return (f"no successful lease renewal for {since_s:.1f}s (deadline lease_ttl_s - fence_margin_s = "
                f"{self.s.lease_ttl_s - self.s.fence_margin_effective_s:g}s): engine stopped before the lease "
                "could be reclaimed")

    async def _self_fence(self, run: Run, payload: ResultPayload) -> None:
        """The run's deadline passed while its engine ran: the engine is stopped (by the
        supervisor and by shell), nothing more is written under the lease, the result goes to
        quarantine, and a ``self_fenced`` event says why."""
        assert run.self_fenced is not None
        run.fenced = True
        run.stop_renewing.set()
        self.stats["self_fenced"] += 1
        log.warning("%s: self-fenced on %s (epoch %d): %s", self.id, run.job, run.epoch, run.self_fenced)
        self._quarantine_local(run, payload, f"self-fenced: {run.self_fenced}")
        await self._event("self_fenced", job=run.job, epoch=run.epoch, reason=run.self_fenced,
                          data={"held_epoch": run.epoch, "lease_ttl_s": self.s.lease_ttl_s,
                                "fence_margin_s": self.s.fence_margin_effective_s})

    async def _renew_loop(self, run: Run) -> None:
        """Renew the lease every ``lease_renew_s``. A renewal counts (extends the self-fencing
        deadline) only when the record write succeeded and, for a job holding a lock, the lock
        entry was rewritten too (its age is how others judge the holder stopped)."""
        while not run.stop_renewing.is_set():
            try:
                await asyncio.wait_for(run.stop_renewing.wait(), timeout=self.s.lease_renew_s)
                return
            except asyncio.TimeoutError:
                pass
            decided: list[JobRecord | None] = [None]

            def decide(r: JobRecord) -> JobRecord | None:
                # Checked again under the write lock: a renewal after the result would be refused
                # by the fence and miscounted as a stale write.
                decided[0] = None if run.stop_renewing.is_set() else protocol.renew(r, self.id, run.epoch, time.time())
                return decided[0]

            sent_s = shell.fence_clock()
            try:
                wrote = await self._write(run, decide, renewal=True)
            except Exception as e:  # broker trouble: keep running until the deadline; the epoch decides
                log.info("%s: renewal of %s failed (%s)", self.id, run.job, e)
                continue
            # Renewed only if what was written is the renewal last decided (equality, not
            # identity: whatever drives the write may hand back a copy). A None decision (the
            # run ended meanwhile) or a fenced write extends nothing.
            if wrote is None or decided[0] is None or wrote != decided[0] or run.fenced:
                continue
            if run.lock_key and not await self._renew_lock(run):
                continue
            if run.fence is not None:
                run.fence.extend(self._fence_deadline_s(sent_s))

    async def _renew_lock(self, run: Run) -> bool:
        """Rewrite the job's lock entry (CAS on its revision), so its broker timestamp says the
        holder is alive. False if it could not: the deadline is then not extended."""
        assert run.lock_key is not None
        for _ in range(2):
            try:
                run.lock_rev = await asyncio.wait_for(
                    self.b.locks.update(run.lock_key, run.lock_value, last=run.lock_rev), self.s.request_timeout_s)
                return True
            except Conflict:
                pass
            except Exception as e:
                log.info("%s: lock %s of %s not renewed (%s)", self.id, run.lock_key, run.job, e)
                return False
            # A rewrite whose reply was lost (or an R3 bucket refusing a CAS spuriously) leaves
            # our revision behind: an entry that is still ours is adopted and written again.
            try:
                cur = await self.b.locks.get(run.lock_key)
            except Exception as e:
                log.info("%s: lock %s of %s not read (%s)", self.id, run.lock_key, run.job, e)
                return False
            if cur is None or cur.value != run.lock_value:
                # Someone judged us stopped and took it (our entry aged past lease_ttl_s +
                # fence_margin_s), or it was deleted: our deadline has passed. Never write it again.
                log.warning("%s: lock %s of %s was taken over; the run fences itself at its deadline",
                            self.id, run.lock_key, run.job)
                run.lock_key = None
                return False
            run.lock_rev = cur.revision
        return False

    def _resolve_cwd(self, cwd: str) -> Path:
        p = Path(os.path.expandvars(os.path.expanduser(cwd)))
        return p if p.is_absolute() else self.workspace / p

    async def _acquire_lock(self, run: Run, lock: str) -> str | None:
        """Take the job's lock; returns None when taken, else the holder's job id.

        A lock is free only when deleted, or when its holder is known stopped
        (:func:`protocol.lock_verdict`): never because the holder's record moved to another
        epoch (cancelled, requeued or reclaimed), since its engine may still be running."""
        key = names.safe_key(lock)
        value = encode(LockRecord(lock=lock, job=run.job, epoch=run.epoch, factory=self.id))
        run.lock_value = value
        for _ in range(MAX_CAS_RETRIES):
            sent_s = shell.fence_clock()
            try:
                run.lock_rev = await self.b.locks.create(key, value)
                run.lock_key, run.lock_sent_s = key, sent_s
                return None
            except Conflict:
                pass
            cur = await self.b.locks.get(key)
            if cur is None:
                continue
            try:
                holder = decode(cur.value, LockRecord)
            except msgspec.DecodeError:
                # Not a lock entry (written by hand or by a broken client): it holds the lock
                # until it is as old as a holder's entry that stopped being renewed.
                if await self.b.broker_now() - cur.ts <= self.s.lease_ttl_s + self.s.fence_margin_effective_s:
                    return f"<an unreadable entry in {names.LOCKS_BUCKET}/{key}>"
                sent_s = shell.fence_clock()
                try:
                    run.lock_rev = await self.b.locks.update(key, value, last=cur.revision)
                except Conflict:
                    continue
                run.lock_key, run.lock_sent_s = key, sent_s
                return None
            if holder.job == run.job and holder.epoch == run.epoch:
                # Ours already (a create whose reply was lost), but stored at a time we do not
                # know: rewrite it, so the entry's age and our deadline count from one send.
                sent_s = shell.fence_clock()
                try:
                    run.lock_rev = await self.b.locks.update(key, value, last=cur.revision)
                except Conflict:
                    continue
                run.lock_key, run.lock_sent_s = key, sent_s
                return None
            he = await self.b.jobs.get(holder.job)
            try:
                hrec = decode(he.value, JobRecord) if he else None
            except msgspec.DecodeError:
                hrec = None  # a poisoned record tells nothing: only the entry's age can
            verdict = protocol.lock_verdict(holder, hrec, await self.b.broker_now() - cur.ts,
                                            lease_ttl_s=self.s.lease_ttl_s,
                                            fence_margin_s=self.s.fence_margin_effective_s)
            if not verdict.free:
                return holder.job
            sent_s = shell.fence_clock()
            try:
                run.lock_rev = await self.b.locks.update(key, value, last=cur.revision)
                run.lock_key, run.lock_sent_s = key, sent_s
                log.info("%s: lock %r taken over for %s: %s", self.id, lock, run.job, verdict.reason)
                return None
            except Conflict:
                continue
        return "?"

    async def _release_lock(self, run: Run) -> None:
        if run.lock_key:
            try:
                await self.b.locks.delete(run.lock_key, last=run.lock_rev)
            except Exception as e:  # stale-lock cleanup takes it later
                log.info("%s: lock %s not released (%s)", self.id, run.lock_key, e)
            run.lock_key = None

    async def _hand_back(self, run: Run, reason: str, backoff_s: float = 0.0) -> None:
        run.stop_renewing.set()
        rec = await self._write(run, lambda r: protocol.hand_back(r, self.id, run.epoch, time.time(), reason, backoff_s))
        if rec is not None:
            self.stats["handed_back"] += 1
            await self._event("handed_back", job=run.job, epoch=run.epoch, stage_to="queued", reason=reason)
            run.fenced = True  # the lease is given up: nothing more may be written under it

    async def _execute(self, run: Run, engine: str | None) -> None:
        renewer: asyncio.Task | None = None
        try:
            m = run.record.manifest
            if m.lock:
                holder = await self._acquire_lock(run, m.lock)
                if holder is not None:
                    await self._event("lock_wait", job=run.job, epoch=run.epoch,
                                      reason=f"lock {m.lock!r} held by job {holder}")
                    await self._hand_back(run, f"lock {m.lock!r} held by job {holder}", backoff_s=1.0)
                    return
            sent_s = shell.fence_clock()
            started = await self._write(run, lambda r: protocol.start(r, self.id, run.epoch, time.time()))
            if started is None:
                return
            if run.lock_sent_s is not None:
                # The lock entry may be older than the start write (a start that took retries):
                # the engine must stop before the lock can be presumed free, too.
                sent_s = min(sent_s, run.lock_sent_s)
            if not self.s.unsafe_unfenced_engines:
                # Measured from when the write was *sent*: the broker stamped it later, so the
                # reaper's clock starts later than ours (conservative).
                run.fence = shell.FenceDeadline(self._fence_deadline_s(sent_s), self.s.fence_kill_grace_s)
            await self._event("started", job=run.job, epoch=run.epoch, stage_from="assigned", stage_to="building",
                              reason=started.reason)
            renewer = asyncio.create_task(self._renew_loop(run))
            payload = await self._run_engine(run, engine)
            if run.self_fenced is not None:
                await self._self_fence(run, payload)
                return
            if run.draining and not run.fenced:
                # Stopped by a drain: give the job back without charging it a retry.
                await self._hand_back(run, "factory draining")
                return
            if run.fenced:
                self._quarantine_local(run, payload, "lease lost while running (stale epoch)")
                return
            await self._report(run, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: job %s failed inside the factory", self.id, run.job)
        finally:
            run.stop_renewing.set()
            if renewer is not None:
                try:
                    await asyncio.wait_for(renewer, timeout=self.s.request_timeout_s * 2)
                except Exception:
                    renewer.cancel()
            await self._release_lock(run)
            self.runs.pop((run.job, run.epoch), None)
            await self._release_station(run.station, engine)

    async def _run_engine(self, run: Run, engine: str | None) -> ResultPayload:
        rec = run.record
        m = rec.manifest
        log_path = str(self.logs_dir / f"{run.job}-attempt-{rec.attempt}-epoch-{run.epoch}.log")
        cwd = self._resolve_cwd(m.cwd)
        attribution = Attribution(
            lane=f"{self.id}/{run.station}", job=run.job, tracker_item=m.tracker_item, repo=str(cwd),
            product=m.product, provider="local" if (m.engine or "") == "shell" else None, model=m.model,
            cost_usd=0.0, cost_estimated=False,
        )

        def result(failure, detail, code=None, vcode=None) -> ResultPayload:
            return ResultPayload(job=run.job, epoch=run.epoch, failure=failure, detail=detail, exit_code=code,
                                 verify_exit_code=vcode, log_path=log_path, log_object=None,
                                 attribution=attribution, finished_at=time.time())

        if m.engine == NOOP_ENGINE:
            return self._run_noop(run, result)
        if (m.engine or "shell") != "shell":
            Path(log_path).write_text(f"engine {m.engine!r} has no runner on factory {self.id}\n")
            return result(FailureClass.SETUP_FAILED, f"engine {m.engine!r} is not runnable on {self.id}")
        if not cwd.is_dir():
            Path(log_path).write_text(f"cwd {cwd} does not exist on factory {self.id}\n")
            return result(FailureClass.SETUP_FAILED, f"cwd {cwd} does not exist on {self.id}")
        env = dict(os.environ)
        env.update({
            "GF_JOB_ID": run.job, "GF_EPOCH": str(run.epoch), "GF_ATTEMPT": str(rec.attempt),
            "GF_FACTORY": self.id, "GF_STATION": str(run.station), "GF_WORKSPACE": str(self.workspace),
            "GF_BRANCH": f"gf/{run.job}/e{run.epoch}",
            # For `gigafactory fence` right before a push or merge request (side effects are fenced too):
            # the lease it computes what is left of must be the one the coordinators reap by.
            "GIGAFACTORY_NATS_URL": self.b.urls, "GF_LEASE_TTL_S": repr(self.s.lease_ttl_s),
        })
        # This installation's `gigafactory` first on PATH, so scripts can call `gigafactory fence`.
        env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", "")])
        subject = names.logs_subject(run.job, run.epoch)

        def on_output(chunk: bytes) -> None:
            if self.b.nc.is_connected:
                try:
                    asyncio.get_running_loop().create_task(self.b.nc.publish(subject, chunk))
                except Exception:
                    pass

        limit_s = m.timeout_s()
        wall_binds = m.budget.wall is not None and parse_duration(m.budget.wall) <= parse_duration(m.timeout)
        # Off the event loop: the scan is linear, but a body of up to max_body_bytes still costs
        # tens of milliseconds the loop owes to every other run's renewals.
        script = await asyncio.to_thread(shell_script, rec.body)
        t0 = time.monotonic()
        try:
            res = await shell.run_script(
                script, cwd=str(cwd), env=env, timeout_s=limit_s, log_path=log_path,
                on_output=on_output, cancel=run.cancel, kill_grace_s=5.0,
                header=f"# gigafactory: job {run.job} attempt {rec.attempt} epoch {run.epoch} on {self.id}/{run.station}\n",
                fence=run.fence, supervised=not self.s.unsafe_unfenced_engines,
            )
        except FileNotFoundError as e:
            return result(FailureClass.SETUP_FAILED, str(e))
        if res.fenced:
            run.self_fenced = self._self_fence_reason(run)
            return result(FailureClass.CRASH, f"self-fenced: {run.self_fenced}", res.exit_code)
        timeout_class = FailureClass.BUDGET_EXCEEDED if wall_binds else FailureClass.TIMEOUT
        if res.cancelled:
            return result(FailureClass.CRASH, "cancelled (lease lost or factory draining)", res.exit_code)
        if res.timed_out:
            return result(timeout_class, f"engine ran past {limit_s:g}s and was killed", res.exit_code)
        if res.exit_code != 0:
            why = f"signal {res.signal}" if res.signal else f"exit code {res.exit_code}"
            return result(FailureClass.CRASH, f"engine ended with {why}", res.exit_code)
        if not m.verify:
            return result(None, "engine exited 0; no verify command", 0)
        remaining = max(1.0, limit_s - (time.monotonic() - t0))
        v = await shell.run_command(
            m.verify, cwd=str(cwd), env=env, timeout_s=remaining, log_path=log_path, on_output=on_output,
            cancel=run.cancel, kill_grace_s=5.0, header=f"# gigafactory: verify: {m.verify}\n",
            fence=run.fence, supervised=not self.s.unsafe_unfenced_engines,
        )
        if v.fenced:
            run.self_fenced = self._self_fence_reason(run)
            return result(FailureClass.CRASH, f"self-fenced during verify: {run.self_fenced}", 0, v.exit_code)
        if v.cancelled:
            return result(FailureClass.CRASH, "cancelled during verify", 0, v.exit_code)
        if v.timed_out:
            return result(timeout_class, f"verify ran past the remaining {remaining:g}s", 0, v.exit_code)
        if v.exit_code != 0:
            return result(FailureClass.VERIFY_FAILED, f"verify exited {v.exit_code}: {m.verify}", 0, v.exit_code)
        return result(None, f"verify passed: {m.verify}", 0, 0)

    def _run_noop(self, run: Run, result) -> ResultPayload:
        """The built-in ``noop`` engine, for the load suite: it completes at once, starts no
        process and writes no log, so a run measures the claim protocol, not the cost of a fork.
        ``verify`` is skipped too (nothing ran, so there is nothing to verify): the attempt
        passes with no verify exit code, and its detail says so. Only a factory started with
        the ``engine:noop`` capability token runs it; elsewhere it fails as any engine this
        factory does not offer, so real work can never be swallowed by it."""
        if f"engine:{NOOP_ENGINE}" not in self.offers.tokens:
            return result(FailureClass.SETUP_FAILED,
                          f"engine 'noop' is not offered by {self.id} (start it with --cap engine:noop)")
        skipped = "; verify skipped (noop engine)" if run.record.manifest.verify else ""
        return result(None, f"noop engine: completed at once{skipped}", 0)

    async def _upload_log(self, run: Run, payload: ResultPayload) -> tuple[ResultPayload, dict]:
        """Store the attempt's log in ``gf_artifacts``; returns the payload (with ``log_object``
        once stored) and what the ``finished`` event says about the log.

        Called while the lease is still renewed (renewals stop only when the result is
        written), so an upload may take as long as ``log_upload_timeout_s`` without losing the
        lease. The store is given a reader (:class:`CappedLog`), never the bytes: it reads
        one chunk at a time on a worker thread, at most ``log_upload_max_bytes`` in all
        (head, marker, tail). An upload that fails or runs past its bound costs the log, not
        the result: the result goes out without it (``log_upload_error`` in the returned dict
        says why and where the log is; the attempt's detail gets it too); if the broker is
        down, that write fails too and the result waits in the outbox, whose replay tries
        the upload again."""
        name = names.log_object_name(run.job, run.record.attempt, run.epoch)
        where = f"{self.id}:{payload.log_path}"
        bound_s = self.s.log_upload_timeout_s
        try:
            reader = CappedLog(payload.log_path, self.s.log_upload_max_bytes, where,
                               deadline=time.monotonic() + bound_s)
        except OSError:
            return payload, {}
        try:
            desc = (f"log of job {run.job} attempt {run.record.attempt} epoch {run.epoch} on {self.id}: "
                    f"{reader.size_bytes} bytes" + (f", {reader.dropped_bytes} dropped from the middle "
                                                    f"(cap {self.s.log_upload_max_bytes})" if reader.dropped_bytes else ""))
            # Each chunk's publish is bounded by request_timeout_s and the reader ends the
            # upload at its deadline; this outer bound only catches a hang between the two.
            await asyncio.wait_for(
                self.b.put_object(name, reader, description=desc, headers={
                    "Gf-Log-Bytes": str(reader.size_bytes), "Gf-Log-Dropped-Bytes": str(reader.dropped_bytes)}),
                timeout=bound_s + 3 * self.s.request_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats["log_upload_failures"] = self.stats.get("log_upload_failures", 0) + 1
            why = "ran past log_upload_timeout_s" if isinstance(e, (LogUploadTimeout, asyncio.TimeoutError)) \
                else f"failed ({type(e).__name__}: {e})"
            log.warning("%s: log of %s (%d bytes) not uploaded: %s; the result goes without it",
                        self.id, run.job, reader.size_bytes, why)
            # The payload stays as it was: a result that waits in the outbox tries the upload again.
            return payload, {"log_upload_error": f"log not uploaded ({why}), the whole log is at {where}"}
        finally:
            reader.close()
        self.stats["log_read_max_bytes"] = max(self.stats.get("log_read_max_bytes", 0), reader.max_read_bytes)
        if reader.dropped_bytes:
            self.stats["logs_capped"] = self.stats.get("logs_capped", 0) + 1
        return (msgspec.structs.replace(payload, log_object=name),
                {"log_bytes": reader.size_bytes, "log_stored_bytes": reader.stored_bytes,
                 "log_dropped_bytes": reader.dropped_bytes})

    async def _report(self, run: Run, payload: ResultPayload) -> None:
        """Publish the result under the epoch, or keep it in the outbox until the broker answers."""
        try:
            await self._publish_result(run, payload)
        except TRANSIENT + (Conflict, nats.errors.Error, OSError) as e:
            run.stop_renewing.set()  # the outbox flusher takes over; the epoch decides on replay
            log.warning("%s: result of %s waits in the outbox (%s)", self.id, run.job, e)
            self.outbox.put("result", run.job, run.epoch, msgspec.json.encode(payload))
            self._outbox_kick.set()

    async def _publish_result(self, run: Run, payload: ResultPayload, item: OutboxItem | None = None) -> None:
        upload: dict = {}
        if payload.log_object is None:
            payload, upload = await self._upload_log(run, payload)
        run.stop_renewing.set()  # not before: the lease is renewed through the upload
        detail = payload.detail + (f"; {upload['log_upload_error']}" if "log_upload_error" in upload else "")
        rec = await self._write(run, lambda r: protocol.finish(
            r, self.id, run.epoch, time.time(), failure=payload.failure, detail=detail,
            exit_code=payload.exit_code, verify_exit_code=payload.verify_exit_code, log=payload.log_object,
            attribution=payload.attribution,
        ))
        if rec is None:
            if item is not None:
                self.outbox.quarantine(item, "result refused: stale epoch", payload.log_path)
                self.stats["quarantined"] += 1
            else:
                self._quarantine_local(run, payload, "result refused: stale epoch")
            return
        self.stats["finished"] += 1
        await self._event("finished", job=run.job, epoch=run.epoch, stage_from="building", stage_to=str(rec.stage),
                          reason=rec.reason, data={"outcome": str(payload.failure or "passed"),
                                                   "exit_code": payload.exit_code, "log": payload.log_object,
                                                   "attribution": msgspec.to_builtins(payload.attribution), **upload})

    def _quarantine_local(self, run: Run, payload: ResultPayload, reason: str) -> None:
        data = msgspec.json.encode(payload)
        item_id = self.outbox.put("result", run.job, run.epoch, data)
        item = OutboxItem(id=item_id, kind="result", job=run.job, epoch=run.epoch, payload=data,
                          created_at=time.time(), attempts=0)
        self.outbox.quarantine(item, reason, payload.log_path)
        self.stats["quarantined"] += 1
        log.warning("%s: result of %s (epoch %d) quarantined: %s", self.id, run.job, run.epoch, reason)

    # -- outbox -------------------------------------------------------------------------------------

    async def _outbox_loop(self, stop: asyncio.Event) -> None:
        """Publish what waits in the outbox. While it holds items (the broker was down), try
        every ``OUTBOX_RETRY_S``; while it is empty, sleep until an item is put in it."""
        pending = self.outbox.count() > 0  # items left by an earlier run of this factory
        while not stop.is_set():
            if not pending:
                kick = asyncio.ensure_future(self._outbox_kick.wait())
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({kick, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    kick.cancel()
                    stopped.cancel()
                if stop.is_set():
                    return
            else:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=OUTBOX_RETRY_S)
                    return
                except asyncio.TimeoutError:
                    pass
            self._outbox_kick.clear()
            self.stats["outbox_wakeups"] += 1
            if self.b.nc.is_connected:
                try:
                    await self._flush_outbox()
                except Exception as e:
                    log.info("%s: outbox flush failed (%s)", self.id, e)
            pending = self.outbox.count() > 0

    async def _flush_outbox(self) -> None:
        for item in self.outbox.pending(100):
            await self._flush_item(item)

    async def _flush_item(self, item: OutboxItem) -> None:
        payload = msgspec.json.decode(item.payload, type=ResultPayload)
        self.outbox.mark_attempt(item.id)
        e = await self.b.jobs.get(item.job)
        rec = decode(e.value, JobRecord) if e else None
        try:
            protocol.check_fence(rec, item.job, self.id, item.epoch)
        except protocol.Fenced:
            if rec is not None and protocol.already_applied(rec, item.epoch, str(payload.failure or "passed")):
                # The earlier write landed but its reply was lost: nothing to quarantine. Say so
                # (not as a transition: the job may have moved on since, e.g. shipped by a human).
                self.outbox.mark_done(item.id)
                await self._event("report_confirmed", job=item.job, epoch=item.epoch,
                                  reason=f"outbox result of epoch {item.epoch} was already applied; "
                                         f"the job is now {rec.stage}",
                                  data={"outcome": str(payload.failure or "passed"), "log": payload.log_object,
                                        "attribution": msgspec.to_builtins(payload.attribution)})
                return
            self.stats["fenced_writes"] += 1
            self.stats["quarantined"] += 1
            self.outbox.quarantine(item, "result refused on reconnect: the job was reclaimed (stale epoch)", payload.log_path)
            await self._event("fenced", job=item.job, epoch=item.epoch,
                              reason=f"outbox result with stale epoch {item.epoch} refused; quarantined",
                              data={"held_epoch": item.epoch, "record_epoch": rec.epoch if rec else None})
            return
        assert rec is not None and e is not None
        run = Run(item.job, item.epoch, rec.lease.station if rec.lease else 0, e.revision, rec)
        await self._publish_result(run, payload, item)
        if not run.fenced:
            self.outbox.mark_done(item.id)
