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

This module is the wiring: :class:`Factory` holds the state and runs the loops; each concern
is a module of its own, mixed into it:

- :mod:`stations`: stations, engine seats, idle reasons;
- :mod:`audit`: the audit event queue;
- :mod:`pools`: pool binding, push/poll dispatch, stall checks, the pull loop;
- :mod:`holder`: fenced writes (driving :mod:`lease`), renewal, self-fencing, locks;
- :mod:`execute`: one job: claim, lock, start, engine, verify, report;
- :mod:`reporting`: the log upload, the result, the outbox, quarantine;
- :mod:`engines`: what runs in a station, behind one interface;
- :mod:`ship` and :mod:`workspace`: a ``repo`` job's mirror, worktree, commit and fenced push.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from pathlib import Path

from gigafactory import __version__, logcontext
from gigafactory.broker import Broker, ping_interval_s, queue_ping, take_over_pings
from gigafactory.identity import holder_signer
from gigafactory.config import Settings, factories_dir
from gigafactory.config import home as gf_home
from gigafactory.metrics import process_metrics
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names
from gigafactory.schemas.halt import HaltState
from gigafactory.schemas.records import EventRecord, FactoryRecord, IdleReason, Station, encode

from . import engines
from . import fence_socket
from . import probe as probe_mod
from .beat import BeatPlan
from .audit import EVENT_QUEUE_MAX, EVENT_RETRY_MAX_S, EVENT_RETRY_MIN_S, AuditQueue
from .engines.base import credential_fingerprint
from .engines.noop import NOOP_ENGINE
from .execute import Execute
from .holder import MAX_CAS_RETRIES, Holder, Run
from .halting import follow_halt, refresh_halt
from .outbox import Outbox
from .redact import factory_redactor, install_log_redaction
from .sandbox import factory_sandbox
from .pools import POLL_BACKOFF_MIN_S, STALL_CHECKS_PER_REDISPATCH, STALL_READS_MAX, Pools, PoolState
from .reporting import OUTBOX_RETRY_S, Reporting, ResultPayload
from .checkpoint import Checkpoints
from .ship import Ship
from .spend import SpendWriter, funding_windows
from .stations import Stations
from .workspace import Checkout, Store

log = logging.getLogger(__name__)

__all__ = [
    "EVENT_QUEUE_MAX", "EVENT_RETRY_MAX_S", "EVENT_RETRY_MIN_S", "MAX_CAS_RETRIES", "NOOP_ENGINE", "OUTBOX_RETRY_S",
    "POLL_BACKOFF_MIN_S", "STALL_CHECKS_PER_REDISPATCH", "STALL_READS_MAX", "Factory", "PoolState", "ResultPayload",
    "Run", "idle_traffic_model",
]


STATS = ("claims", "claim_conflicts", "claim_skipped", "fenced_writes", "handed_back", "finished", "quarantined",
         "polled_claims", "events_published", "events_dropped", "pool_scans", "pool_records", "outbox_wakeups",
         "stall_probes", "stall_listens", "stall_checks", "self_fenced", "claim_reads", "claims_unread",
         "claim_rereads")
"""A factory's counters. ``pool_scans``/``pool_records``/``outbox_wakeups`` say how much work an
idle factory does (none beyond its heartbeat and long polls is the goal); ``stall_probes`` counts
the one-request checks of a quiet pool index, ``stall_listens`` the checks of one that cost no
request (its one-shot subscription heard no write), ``stall_checks`` the full ones (an index scan, and a
consumer lookup when something is queued). ``claim_reads`` counts reads of a job record before a
claim, ``claims_unread`` the claims tried on the record a dispatch message carried (no read), and
``claim_rereads`` those of them whose revision was stale (followed by a read)."""


def idle_traffic_model(factories: int, pools: int, settings: Settings, served: int | None = None) -> dict[str, float]:
    """The broker messages per second of an idle fleet: what the load suite prints beside what
    it measured (issue 14: within 10%). Per factory, at ``settings``:

    - in (sent to the broker): a heartbeat every ``heartbeat_s`` (a plain publish, no reply),
      and per pool it serves a long-poll renewal every ``long_poll_s`` and a probe of the
      pool's quiet queue index every ``QUIET_PROBE_EVERY_CHECKS`` stall checks;
    - out (sent by the broker): each heartbeat's copy to the coordinator's view, each
      renewal's timeout status, each probe's reply, and the halt watch's idle heartbeat every
      :func:`halting.watch_heartbeat_s`.

    Not counted: client PINGs (protocol, not messages) and the coordinator's own passes (a few
    messages a second, whatever the fleet's size). A job queued meanwhile adds its own
    traffic, and one full stall check per factory and pool afterwards.

    :param factories: idle factories.
    :param pools: pools each serves (when every factory serves as many).
    :param settings: their settings.
    :param served: the (factory, pool) pairs of the fleet, when factories serve different
        pools (a factory of the common pool does not long-poll the ``gpu`` pool); None:
        ``factories x pools``."""
    from .halting import watch_heartbeat_s
    from .pools import QUIET_PROBE_EVERY_CHECKS

    pairs = factories * pools if served is None else served
    stall_check_s = settings.redispatch_s / STALL_CHECKS_PER_REDISPATCH
    beats = factories / settings.heartbeat_s
    polls = pairs / settings.long_poll_s
    probes = pairs / (stall_check_s * QUIET_PROBE_EVERY_CHECKS)
    return {"in_msgs_per_s": beats + polls + probes,
            "out_msgs_per_s": beats + polls + probes + factories / watch_heartbeat_s(settings)}


def warn_if_unsafe(settings: Settings) -> None:
    """Say loudly that ``unsafe_unfenced_engines`` is on (the chaos suite's broken variant)."""
    if settings.unsafe_unfenced_engines:
        log.warning("UNSAFE: unsafe_unfenced_engines is on: engines are not killed when this factory dies "
                    "and are not stopped when its leases lapse; a job's side effects can happen twice. "
                    "Use this only for the chaos suite's broken-on-purpose variant.")


class Factory(Stations, AuditQueue, Pools, Holder, Execute, Reporting, Ship, Checkpoints):
    """One factory: its state, its loops, and drain. The behaviour is in the mixins (see the
    module's docstring); this class only sets up what they share and starts them.

    :param broker: the broker connection (its settings are used unless ``settings`` is given).
    :param factory_id: this factory's id (default: the host name).
    :param stations: how many jobs it runs at once.
    :param seats: at most this many stations per engine at once (``{"claude": 1}``).
    :param extra_capabilities: tokens the operator adds (``--cap``).
    :param probe: probe this machine (else offer only ``extra_capabilities`` and ``engine:shell``).
    :param workspace: the folder relative ``cwd`` values resolve against.
    :param data_dir: where this factory keeps its logs and outbox (one folder per factory id).
    :param settings: the settings (validated here).
    """

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
        self.broker = broker
        self.settings = (settings or broker.settings).validate()
        warn_if_unsafe(self.settings)
        self.id = factory_id or socket.gethostname().split(".")[0].lower()
        assert names.is_job_id(self.id) or all(c.isalnum() or c in "-_" for c in self.id), self.id
        desc = probe_mod.describe()
        tokens = self._probe_offers(extra_capabilities, probe)
        self.offers = caps.Offers(tokens)
        self._probed_tokens: list[str] = tokens
        """Everything the probe and the operator offered; ``offers`` is this less the tokens of
        withdrawn engines."""
        self.withdrawn: dict[str, tuple[str, str]] = {}
        """Engines withdrawn after an ``auth_failed``: name -> (why, fingerprint of their
        credential variables then). Restored when the fingerprint changes (checked each heartbeat)."""
        self.record = FactoryRecord(
            id=self.id, host=desc.get("host", socket.gethostname()), os=desc.get("os", ""),
            arch=desc.get("arch", ""), capabilities=sorted(self.offers.tokens),
            stations=[Station(index=i, since=time.time()) for i in range(stations)],
            seats=dict(seats or {}), started_at=time.time(), heartbeat_interval_s=self.settings.heartbeat_s,
            pid=os.getpid(), version=__version__, nkey=holder_signer(self.settings).public_key,
        )
        self._make_folders(workspace, data_dir)
        self._guard_setup()
        self.halt_state = HaltState()
        """The kill switch as last read (:mod:`halting`)."""
        self.outbox = Outbox(str(self.dir / "outbox"))
        self.spend = SpendWriter(broker, self.dir, self.id, stations, self.settings, funding_windows(self.settings), seats or {})
        """The spend ledger's writer (:mod:`spend`): attempt records, fixed seat costs."""
        self.git = Store(self.dir / "git", timeout_s=self.settings.git_timeout_s, max_bytes=self.settings.git_mirrors_max_bytes,
                         base_dir=self.workspace)
        """This factory's git mirrors and attempt worktrees (``repo`` jobs; :mod:`ship`)."""
        self.checkouts: dict[tuple[str, int], Checkout] = {}
        """The worktree of each in-flight ``repo`` run, by (job, epoch), until it is released."""
        self._init_stations(stations)
        self.deferred_said: set[tuple[str, int]] = set()
        """(job, epoch) this factory said ``claim_deferred`` for (:meth:`Execute._deferred_event`)."""
        self.runs: dict[tuple[str, int], Run] = {}
        """In-flight runs by (job, epoch): a stale run of a job never shadows a newer one."""
        self.pools: dict[str, PoolState] = {}
        self.draining = asyncio.Event()
        self.ready = asyncio.Event()
        self.stats = dict.fromkeys(STATS, 0)
        """Counters (see :data:`STATS`)."""
        self._stop: asyncio.Event | None = None
        self._pools_rescan = asyncio.Event()
        """Set when the pools must be read again (after a reconnect)."""
        self._pools_rescan_all = False
        """Read every pool again even without a reconnect (an engine was offered again)."""
        self._outbox_counted_at = -1
        """``outbox.changes`` when ``record.outbox_pending`` was last counted."""
        self._halt_rewatch = asyncio.Event()
        """Set after a reconnect: the halt watch is set up again (:func:`halting.follow_halt`)."""
        self._outbox_kick = asyncio.Event()
        """Set when an item is put in the outbox: the flusher sleeps until then."""
        self._tasks: set[asyncio.Task] = set()
        self._events: collections.deque[tuple[EventRecord, tuple[str, str]]] = collections.deque()
        """Audit events not stored yet, oldest first, each with its message id and trace context."""
        self._events_waiting = asyncio.Event()
        process_metrics().add_factory(self)  # metrics: read at scrape time, held weakly

    def _init_stations(self, stations: int) -> None:
        """The stations' bookkeeping: which are free, and what each last said it was doing."""
        self.free: set[int] = set(range(stations))
        self.station_cv = asyncio.Condition()
        self.sticky_idle: dict[int, tuple[IdleReason, float]] = {}
        """station -> (idle reason a run gave on release, monotonic time it stands until)."""
        self.station_class: dict[int, str] = {}
        """station -> the class its last ``station`` event said (``busy`` or an idle reason)."""
        self.station_waiting: dict[int, IdleReason] = {}
        """station -> what its run only waits on now (``waiting-merge``): its class instead of busy."""
        self.policy_held_pools: set[str] = set()
        """Pools whose queued work the coordinator holds by policy: a product halt, the budget
        (the ``policy-holds`` control key)."""
        self.engine_running: dict[str, int] = {}

    def _probe_offers(self, extra_capabilities, probe: bool) -> list[str]:
        """What this factory offers: the probe's tokens (or only ``engine:shell`` without it),
        the operator's, and ``factory:<id>``. Declared engines (``engines_dir``) join the
        registry first, so the probe offers them; a bad declaration is logged and skipped."""
        engines.load_declared(self.settings.engines_dir)
        tokens = (probe_mod.probe(extra_capabilities, timeout_s=self.settings.probe_timeout_s) if probe
                  else list(extra_capabilities) + ["engine:shell"])
        return sorted(set(tokens) | {f"factory:{self.id}"})

    def _guard_setup(self) -> None:
        """Issue 12: the redactor of whatever leaves this factory (its secrets and token shapes)
        and the sandbox its engines run in (``engine_sandbox``)."""
        self.redactor = factory_redactor(os.environ, cred_vars=probe_mod.CREDENTIAL_VARS,
                                         urls=getattr(self.broker, "urls", ""),
                                         extra_vars=[n.strip() for n in self.settings.redact_extra_vars.split(",")])
        self.sandbox = factory_sandbox(self.settings.engine_sandbox, self.settings.engine_sandbox_user, factory_dir=self.dir,
                                       home_dir=gf_home(), creds_path=os.environ.get("GIGAFACTORY_CREDS", ""))

    def _make_folders(self, workspace: str | None, data_dir: str | None) -> None:
        """This factory's folder (``data_dir``, default under ``GIGAFACTORY_HOME``), its logs and
        its workspace (default: ``work`` in its folder)."""
        base = Path(data_dir) if data_dir else factories_dir()  # follows GIGAFACTORY_HOME
        self.dir = base / self.id
        self.logs_dir = self.dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.workspace = Path(workspace) if workspace else self.dir / "work"
        self.workspace.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain: stop claiming, let in-flight work finish
        (up to ``drain_timeout_s``), hand back what is left, deregister."""
        self._stop = stop
        logcontext.bind(factory=self.id)  # this task's and its tasks' log lines name this factory
        # Its own log lines are redacted too (a git error with a token in a remote URL).
        unredact = install_log_redaction(self.redactor)
        try:
            await self._run(stop)
        finally:
            unredact()

    async def _run(self, stop: asyncio.Event) -> None:
        # Queued first (published once the events task runs): it opens this factory's station
        # timeline, and the stations' first class (``starting``, a kind of prewarm) follows it.
        await self._event("factory_up", reason=f"{len(self.record.stations)} stations",
                          data={"capabilities": self.record.capabilities})
        for st in self.record.stations:
            self._note_station(st.index)
        await self._ws_clean_at_start()  # before any claim: nothing of ours uses them yet
        swept = await asyncio.to_thread(fence_socket.sweep_stale_folders_once)
        if swept:
            log.info("%s: removed %d fence socket folders of factories that were killed", self.id, swept)
        await refresh_halt(self)  # the kill switch, before any claim; then followed (halting.py)
        await self._heartbeat()
        for st in self.record.stations:
            st.idle_reason = self._idle_reason(st.index)  # no-work, or policy-paused under a halt
            self._note_station(st.index)
        self._spawn(self._events_loop(), "events")
        self._spawn(self._heartbeat_loop(stop), "heartbeat")
        self._spawn(self._pools_loop(stop), "pools")
        self._spawn(self._outbox_loop(stop), "outbox")
        self._spawn(self.spend.publish_loop(), "spend")
        self._spawn(self.spend.fixed_loop(stop), "seat-costs")
        self._spawn(follow_halt(self, stop), "halt")
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
        deadline = time.monotonic() + self.settings.drain_timeout_s
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
        await self.spend.close(self.settings.request_timeout_s * 2)
        self.record.status = "down"
        await self._safe(self.broker.factories.delete(self.id))
        await self._event("factory_down", reason="drained")
        if not await self._publish_events(time.monotonic() + self.settings.request_timeout_s * 2):
            log.warning("%s: %d audit events not stored at exit", self.id, len(self._events))
        self.outbox.close()

    async def _safe(self, coro):
        try:
            return await asyncio.wait_for(coro, timeout=self.settings.request_timeout_s * 2)
        except Exception as e:
            log.info("%s: %s during drain (%s)", self.id, type(e).__name__, e)
            return None

    async def _heartbeat(self, acked: bool = True) -> None:
        """Write this factory's record with a fresh ``heartbeat_at``.

        :param acked: wait for the broker to say it stored it (a KV put). The periodic
            heartbeat of a connected factory passes False: a plain publish to the key's subject,
            which the bucket's stream stores all the same, with no reply message, no reply
            inbox and no timer (half the messages, and most of the client's work, of an idle
            factory's most frequent write). Nothing waits on that ack: a heartbeat that is
            lost is followed by the next one, and liveness allows ``LIVENESS_HEARTBEATS`` of
            them. The first heartbeat (registration) and the last (drain) are acked."""
        self._recheck_withdrawn()
        self.record.heartbeat_at = time.time()
        if self.outbox.changes != self._outbox_counted_at:
            # A COUNT on the outbox's database cost more than the rest of an idle heartbeat
            # (the profile of a fleet host): counted again only when this factory changed it.
            self._outbox_counted_at = self.outbox.changes
            self.record.outbox_pending = self.outbox.count()
        self.record.pools = sorted(self.pools)
        self.record.dispatch_mode = "poll" if any(p.mode == "poll" for p in self.pools.values()) else "push"
        self._refresh_idle()
        if acked or not self.broker.nc.is_connected:
            # Disconnected: the put waits (bounded) rather than queue heartbeats in the
            # client's buffer, to be sent stale all at once on reconnect.
            await self.broker.factories.put(self.id, encode(self.record))
        else:
            await self.broker.nc.publish(f"$KV.{self.broker.factories.name}.{self.id}", encode(self.record))

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        """Heartbeat every ``heartbeat_s`` and ping the broker every ``ping_interval_s``, on one
        timer: the connection's own ping timer is taken over (:func:`broker.take_over_pings`),
        so a ping that falls due with a heartbeat goes out in the heartbeat's write (at the
        defaults, every one does: both periods are 20 s). A stale connection is still dropped
        after ``MAX_OUTSTANDING_PINGS`` unanswered pings, as nats-py's timer does. While the
        factory drains, the heartbeats stop (drain writes its own) and the pings go on."""
        self._heartbeat_reconnects = self.broker.nc.stats["reconnects"]
        nc = self.broker.nc
        take_over_pings(nc)
        beat_s, ping_s = self.settings.heartbeat_s, ping_interval_s(self.settings)
        plan = BeatPlan(beat_s, ping_s, time.monotonic())
        while not stop.is_set():
            # A plain sleep, not a wait on ``stop`` with a timeout (a task made and cancelled
            # per beat, per factory): a stop set meanwhile is seen when it ends, and drain
            # cancels this task anyway.
            await asyncio.sleep(plan.sleep_s(time.monotonic()))
            if stop.is_set():
                return
            beat, ping = plan.due(time.monotonic())
            beat = beat and not self.draining.is_set()
            try:
                if ping and not await queue_ping(nc):
                    continue  # stale: the client drops the connection and reconnects
                if beat:
                    await self._heartbeat(acked=False)  # its flush carries the ping
                elif ping:
                    await nc._flush_pending()
            except Exception as e:
                log.info("%s: heartbeat failed (%s)", self.id, e)
            if self.broker.nc.stats["reconnects"] != self._heartbeat_reconnects:
                self._heartbeat_reconnects = self.broker.nc.stats["reconnects"]
                self._pools_rescan.set()
                self._halt_rewatch.set()

    # -- engines withdrawn after auth_failed ----------------------------------------------------

    def _credential_vars(self, name: str) -> tuple[str, ...]:
        eng = engines.get(name)
        return tuple(eng.credential_vars(os.environ) if eng is not None else probe_mod.CREDENTIAL_VARS)

    def _credential_fingerprint(self, name: str) -> str:
        return credential_fingerprint(self._credential_vars(name), os.environ)

    def _apply_withdrawn(self) -> None:
        """Rebuild ``offers`` and the record's capabilities from the probed tokens less the
        withdrawn engines' (``engine:<name>`` and its version token ``<name>:<version>``), and
        stop pulling from pools that needed them (a puller in a long poll stops at its next
        turn; a dispatch message it gets meanwhile is given back, see :meth:`_on_dispatch`)."""
        gone = {f"engine:{n}" for n in self.withdrawn}
        kept = [t for t in self._probed_tokens
                if t not in gone and caps.parse_offer(t)[0] not in self.withdrawn]
        self.offers = caps.Offers(kept)
        self.record.capabilities = sorted(self.offers.tokens)
        self.record.withdrawn_engines = {n: why for n, (why, _) in sorted(self.withdrawn.items())}
        for ps in self.pools.values():
            if not ps.gone and self.offers.missing(ps.requirements):
                ps.gone = True
                log.info("%s: no longer serves pool %s (%s)", self.id, ps.id, " ".join(ps.requirements))

    def _withdraw_engine(self, name: str, why: str) -> None:
        """Stop offering engine ``name`` until its credential variables change: called when an
        attempt ended ``auth_failed``, before that attempt is reported (so its retry is never
        claimed here again with the same credential).

        :param name: the engine.
        :param why: for the factory record and the ``engine_withdrawn`` event.
        """
        if name in self.withdrawn:
            return
        self.withdrawn[name] = (why, self._credential_fingerprint(name))
        self._apply_withdrawn()
        log.warning("%s: engine %s withdrawn: %s", self.id, name, why)
        self._spawn(self._event("engine_withdrawn", reason=why, data={"engine": name}), f"withdraw-{name}")
        self._spawn(self._safe(self._heartbeat()), f"heartbeat-withdraw-{name}")

    def _recheck_withdrawn(self) -> None:
        """Offer again each withdrawn engine whose credential variables changed (a hash compare:
        no probe runs), and bind again to the pools it serves."""
        back = []
        for n, (why, fp) in list(self.withdrawn.items()):
            now = self._credential_fingerprint(n)
            if now == fp:
                continue
            if not any(os.environ.get(v) for v in self._credential_vars(n)):
                # Changed to nothing (the key was unset): offering the engine now would only fail setup.
                self.withdrawn[n] = (f"{why}; its credential is now unset", now)
                self.record.withdrawn_engines[n] = self.withdrawn[n][0]
                continue
            back.append(n)
        if not back:
            return
        for n in back:
            del self.withdrawn[n]
            log.info("%s: engine %s offered again: its credential changed", self.id, n)
            self._spawn(self._event("engine_restored", reason="its credential changed", data={"engine": n}),
                        f"restore-{n}")
        self._apply_withdrawn()
        self._pools_rescan_all = True
        self._pools_rescan.set()

    @property
    def stall_check_s(self) -> float:
        """How often an idle push puller checks for a stall (see STALL_CHECKS_PER_REDISPATCH).

        Here, not in :mod:`pools`, because this module's ``STALL_CHECKS_PER_REDISPATCH`` is the
        one tests and the load suite tune (``monkeypatch.setattr(agent, ...)``): it is read
        from this module at each call."""
        return self.settings.redispatch_s / STALL_CHECKS_PER_REDISPATCH
