"""What ``gigafactory top`` shows, computed from the broker's changes: pure, no I/O, no widgets.

The feed (:mod:`gigafactory.top`) hands every change it watches to a :class:`TopModel`:
``gf_jobs``, ``gf_factories`` and ``gf_pools`` entries (key, value or None for a delete,
broker timestamp) and ``GF_EVENTS`` messages. The widgets read :meth:`TopModel.snapshot`, a
plain value. Everything here is a unit test away from being checked, with no broker.

Memory is bounded for a fleet of 100,000 jobs: the model keeps no job record. Per job it keeps
its stage, pool, queued-since time and what its attempts spent (a small tuple; the empty tuple
is shared by every job that spent nothing), because a watch delivers only the new value and a
count must lose the old stage when a job moves. Events are kept as the latest
``events_max``; ships as per-second counts over ``throughput_window_s``. Factories and pools
are kept whole: one row each, as many as the fleet has.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import msgspec

from gigafactory.schemas.halt import HALT_KEY, Halt, HaltError, HaltState, decode_state, describe
from gigafactory.schemas.lifecycle import Stage

STAGE_ORDER: tuple[str, ...] = tuple(str(s) for s in (
    Stage.BLOCKED, Stage.QUEUED, Stage.ASSIGNED, Stage.BUILDING, Stage.REVIEW, Stage.TESTING,
    Stage.SHIPPED, Stage.FAILED, Stage.DEAD_LETTER))
"""The stages in lifecycle order, as the stage table shows them (every stage, zero or not)."""

EVENTS_MAX_DEFAULT = 200
"""Events the model keeps (the newest); older ones are dropped, never the counts."""
THROUGHPUT_WINDOW_S_DEFAULT = 60.0
"""Ships per minute are averaged over this many seconds of event time."""


# -- glances: only the fields top reads (msgspec skips the rest, so a 100,000-job replay
# decodes a fraction of each record and keeps none of it) ------------------------------------

class _UsageGlance(msgspec.Struct):
    cost_usd: float | None = None
    cost_source: str = "unknown"


class _AttemptGlance(msgspec.Struct):
    engine: str | None = None
    usage: _UsageGlance | None = None


class _JobGlance(msgspec.Struct):
    id: str
    stage: str
    pool: str = ""
    submitted_at: float = 0.0
    attempt: int = 0
    attempts: list[_AttemptGlance] = msgspec.field(default_factory=list)


class _StationGlance(msgspec.Struct):
    index: int = 0
    state: str = "idle"
    job: str | None = None
    idle_reason: str | None = None


class _FactoryGlance(msgspec.Struct):
    id: str
    host: str = ""
    capabilities: list[str] = msgspec.field(default_factory=list)
    stations: list[_StationGlance] = msgspec.field(default_factory=list)
    seats: dict[str, int] = msgspec.field(default_factory=dict)
    status: str = "up"
    dispatch_mode: str = "push"
    pools: list[str] = msgspec.field(default_factory=list)
    heartbeat_interval_s: float = 5.0
    outbox_pending: int = 0
    quarantined: int = 0


class _PoolGlance(msgspec.Struct):
    id: str
    requirements: list[str] = msgspec.field(default_factory=list)


class _EventGlance(msgspec.Struct):
    kind: str
    at: float
    job: str | None = None
    stage_from: str | None = None
    stage_to: str | None = None
    factory: str | None = None
    reason: str = ""


_DEC_JOB = msgspec.json.Decoder(_JobGlance)
_DEC_FACTORY = msgspec.json.Decoder(_FactoryGlance)
_DEC_POOL = msgspec.json.Decoder(_PoolGlance)
_DEC_EVENT = msgspec.json.Decoder(_EventGlance)

_NO_SPEND: tuple = ()


# -- the snapshot: what the widgets show -----------------------------------------------------

@dataclass(frozen=True, slots=True)
class PoolRow:
    pool: str
    requirements: str
    depth: int
    """Queued jobs of this pool."""
    oldest_age_s: float | None
    """Age of its oldest queued job (None: none queued)."""
    live_factories: int
    """Live factories that serve it."""


@dataclass(frozen=True, slots=True)
class FactoryRow:
    factory: str
    host: str
    live: bool
    """Status ``up`` and heartbeat within three of its periods."""
    status: str
    mode: str
    """Dispatch mode: ``push`` or ``poll``."""
    busy: int
    stations: int
    idle: str
    """Idle stations by reason (``2 no-work``), or ``-``."""
    engines: str
    """Engines offered, with seats where limited (``claude(2) shell``)."""
    outbox: int
    quarantined: int
    heartbeat_age_s: float


@dataclass(frozen=True, slots=True)
class EventLine:
    at: float
    kind: str
    job: str
    change: str
    """``queued→assigned`` or the one stage, or empty."""
    factory: str
    reason: str


@dataclass(frozen=True, slots=True)
class SpendRow:
    engine: str
    cost_usd: float
    attempts: int
    """Attempts of this engine that reported usage."""
    sources: str
    """The ``cost_source`` values summed in (``priced``, ``reported+estimated``, ...);
    ``unknown`` attempts add nothing to ``cost_usd``."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    stages: dict[str, int]
    jobs_total: int
    pools: list[PoolRow]
    factories: list[FactoryRow]
    events: list[EventLine]
    """Newest first."""
    ships_per_min: float
    ships_seen: int
    spend: list[SpendRow]
    spend_total_usd: float
    unreadable: int
    """Entries top could not decode (left out of every figure)."""
    halt: str = ""
    """What the kill switch halts (``gf_control``/``halt``), in words; empty: nothing."""


# -- the model ---------------------------------------------------------------------------------

@dataclass(slots=True)
class _JobState:
    stage: str
    pool: str
    since: float
    spend: tuple
    """Per attempt with usage: (engine, cost_usd or None, cost_source)."""


@dataclass
class _Spend:
    cost_usd: float = 0.0
    attempts: int = 0
    sources: collections.Counter = field(default_factory=collections.Counter)


class TopModel:
    """The fleet as ``top`` shows it, fed change by change.

    :param events_max: how many of the newest events to keep.
    :param throughput_window_s: the window ships per minute are averaged over.
    """

    def __init__(self, events_max: int = EVENTS_MAX_DEFAULT,
                 throughput_window_s: float = THROUGHPUT_WINDOW_S_DEFAULT) -> None:
        if events_max < 1:
            raise ValueError(f"events_max must be at least 1, got {events_max}")
        if not throughput_window_s > 0:
            raise ValueError(f"throughput_window_s must be positive, got {throughput_window_s}")
        self.events_max = events_max
        self.window_s = throughput_window_s
        self._jobs: dict[str, _JobState] = {}
        self._stages: collections.Counter = collections.Counter()
        self._queued: dict[str, dict[str, float]] = {}
        """pool -> queued job -> since (broker time): depth and oldest age per pool."""
        self._factories: dict[str, tuple[_FactoryGlance, float]] = {}
        self._pools: dict[str, _PoolGlance] = {}
        self._control: dict[str, HaltState] = {}
        """``gf_control`` entries (the kill switch's ``halt``)."""
        self._spend: dict[str, _Spend] = {}
        self._events: collections.deque[EventLine] = collections.deque(maxlen=events_max)
        self._ships: dict[int, int] = {}
        """Second (event time) -> ships in it, for the seconds of the window only."""
        self._newest_ship_s: int | None = None
        self.ships_seen = 0
        self.unreadable = 0
        self._replay: dict[str, set[str]] = {}
        self.version = 0
        """Bumped by every change that alters what is shown: the view redraws only then."""

    # -- replays: a re-watch after a reconnect delivers the latest values again, without the
    # deletes that happened meanwhile; keys not replayed are gone -----------------------------

    def begin_replay(self, bucket: str) -> None:
        """A watch of ``bucket`` (``jobs``, ``factories`` or ``pools``) starts its replay."""
        self._replay[bucket] = set()

    def end_replay(self, bucket: str) -> None:
        """The replay of ``bucket`` is complete: forget every key it did not deliver."""
        seen = self._replay.pop(bucket, None)
        if seen is None:
            return
        held = {"jobs": self._jobs, "factories": self._factories, "pools": self._pools,
                "control": self._control}[bucket]
        apply = {"jobs": self.apply_job, "factories": self.apply_factory, "pools": self.apply_pool,
                 "control": self.apply_control}[bucket]
        for key in [k for k in held if k not in seen]:
            apply(key, None, 0.0)

    def _seen(self, bucket: str, key: str) -> None:
        seen = self._replay.get(bucket)
        if seen is not None:
            seen.add(key)

    # -- changes -------------------------------------------------------------------------------

    def apply_job(self, key: str, value: bytes | None, ts: float) -> None:
        """One ``gf_jobs`` change.

        :param key: the job id.
        :param value: the record's JSON, or None (deleted or purged: archived).
        :param ts: the broker's timestamp of this revision (seconds since the epoch).
        """
        self._seen("jobs", key)
        old = self._jobs.pop(key, None)
        if old is not None:
            self._stages[old.stage] -= 1
            if old.stage == "queued":
                self._unqueue(old.pool, key)
        self.version += 1
        if value:
            try:
                g = _DEC_JOB.decode(value)
            except msgspec.DecodeError:
                self.unreadable += 1
                return
        else:
            return  # an archived job's spend stays counted: money spent is not unspent
        if old is not None and old.stage == "queued" and g.stage == "queued":
            since = old.since  # still queued (a hold's reason changed): the wait goes on
        else:
            # First sight of a never-claimed job: it has waited since submission; otherwise
            # since this revision (a requeue, or a replay's best knowledge).
            since = g.submitted_at if (old is None and g.attempt == 0 and g.submitted_at) else ts
        spend = tuple((a.engine or "?", a.usage.cost_usd, a.usage.cost_source)
                      for a in g.attempts if a.usage is not None) or _NO_SPEND
        self._add_spend(old.spend if old is not None else _NO_SPEND, -1)
        self._add_spend(spend, +1)
        self._jobs[key] = _JobState(g.stage, g.pool, since, spend)
        self._stages[g.stage] += 1
        if g.stage == "queued":
            self._queued.setdefault(g.pool, {})[key] = since

    def _unqueue(self, pool: str, key: str) -> None:
        q = self._queued.get(pool)
        if q is not None:
            q.pop(key, None)
            if not q:
                del self._queued[pool]

    def _add_spend(self, spend: tuple, sign: int) -> None:
        for engine, cost, source in spend:
            s = self._spend.setdefault(engine, _Spend())
            s.cost_usd += sign * (cost or 0.0)
            s.attempts += sign
            s.sources[source] += sign
            if s.attempts <= 0:
                del self._spend[engine]

    def apply_factory(self, key: str, value: bytes | None, ts: float) -> None:
        """One ``gf_factories`` change (``value`` None: forgotten); ``ts`` is its broker time."""
        self._seen("factories", key)
        self.version += 1
        if not value:
            self._factories.pop(key, None)
            return
        try:
            self._factories[key] = (_DEC_FACTORY.decode(value), ts)
        except msgspec.DecodeError:
            self.unreadable += 1

    def apply_control(self, key: str, value: bytes | None, ts: float) -> None:
        """One ``gf_control`` change: the kill switch's state (an unreadable one shows as such)."""
        self._seen("control", key)
        self.version += 1
        if key != HALT_KEY:
            return
        if value is None:
            self._control.pop(key, None)
            return
        try:
            self._control[key] = decode_state(value)
        except HaltError as e:
            self._control[key] = HaltState(fleet=Halt(mode="?", at=ts, reason=str(e)))

    def apply_pool(self, key: str, value: bytes | None, ts: float) -> None:
        """One ``gf_pools`` change (``value`` None: the pool was collected)."""
        self._seen("pools", key)
        self.version += 1
        if not value:
            self._pools.pop(key, None)
            return
        try:
            self._pools[key] = _DEC_POOL.decode(value)
        except msgspec.DecodeError:
            self.unreadable += 1

    def apply_event(self, data: bytes) -> None:
        """One ``GF_EVENTS`` message (its JSON). A move into ``shipped`` counts as a ship."""
        try:
            e = _DEC_EVENT.decode(data)
        except msgspec.DecodeError:
            self.unreadable += 1
            return
        self.version += 1
        if e.stage_from and e.stage_to and e.stage_from != e.stage_to:
            change = f"{e.stage_from}→{e.stage_to}"
        else:
            change = e.stage_to or e.stage_from or ""
        self._events.append(EventLine(e.at, e.kind, e.job or "", change, e.factory or "", e.reason))
        if e.stage_to == "shipped" and e.stage_from != "shipped":
            self.ships_seen += 1
            sec = math.floor(e.at)
            # Events arrive in stream order, not in ``at`` order (each factory stamps its own,
            # and publishes from a queue): count each ship into its own second.
            if self._newest_ship_s is None or sec > self._newest_ship_s:
                self._newest_ship_s = sec
            if sec >= self._newest_ship_s - self.window_s:
                self._ships[sec] = self._ships.get(sec, 0) + 1
                self._prune_ships(self._newest_ship_s)

    def _prune_ships(self, now: float) -> None:
        """Drop seconds older than the window (before ``now``): at most ``window_s`` + 1 stay."""
        if len(self._ships) > self.window_s + 1 or (self._ships and min(self._ships) < now - self.window_s):
            for sec in [s for s in self._ships if s < now - self.window_s]:
                del self._ships[sec]

    # -- the view ------------------------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        """What to show at ``now`` (seconds since the epoch, the same clock as the timestamps)."""
        self._prune_ships(now)
        ships = sum(n for sec, n in self._ships.items() if sec >= now - self.window_s)
        factories = [self._factory_row(g, ts, now) for g, ts in self._factories.values()]
        factories.sort(key=lambda r: r.factory)
        serving = collections.Counter(p for g, ts in self._factories.values()
                                      if _live(g, ts, now) for p in g.pools)
        pools = []
        for pid in set(self._pools) | set(self._queued):
            q = self._queued.get(pid, {})
            p = self._pools.get(pid)
            pools.append(PoolRow(
                pool=pid, requirements=" ".join(p.requirements) if p else "?", depth=len(q),
                oldest_age_s=max(0.0, now - min(q.values())) if q else None, live_factories=serving[pid]))
        pools.sort(key=lambda p: (-p.depth, p.pool))  # the deepest queues first: what needs a look
        spend = [SpendRow(engine, s.cost_usd, s.attempts,
                          "+".join(src for src, n in sorted(s.sources.items()) if n > 0))
                 for engine, s in sorted(self._spend.items())]
        return Snapshot(
            stages={s: self._stages.get(s, 0) for s in STAGE_ORDER}
            | {s: n for s, n in self._stages.items() if s not in STAGE_ORDER and n},
            jobs_total=len(self._jobs), pools=pools, factories=factories,
            events=list(reversed(self._events)), ships_per_min=ships * 60.0 / self.window_s,
            ships_seen=self.ships_seen, spend=spend, spend_total_usd=sum(r.cost_usd for r in spend),
            unreadable=self.unreadable,
            halt=describe(self._control[HALT_KEY]) if HALT_KEY in self._control and self._control[HALT_KEY].any
            else "",
        )

    @staticmethod
    def _factory_row(g: _FactoryGlance, ts: float, now: float) -> FactoryRow:
        idle = collections.Counter(st.idle_reason or "?" for st in g.stations if st.state != "busy")
        engines = []
        for c in g.capabilities:
            if c.startswith("engine:"):
                name = c.split(":")[1]
                engines.append(f"{name}({g.seats[name]})" if name in g.seats else name)
        return FactoryRow(
            factory=g.id, host=g.host, live=_live(g, ts, now), status=g.status, mode=g.dispatch_mode,
            busy=sum(1 for st in g.stations if st.state == "busy"), stations=len(g.stations),
            idle=", ".join(f"{n} {r}" for r, n in sorted(idle.items())) or "-",
            engines=" ".join(sorted(engines)) or "-", outbox=g.outbox_pending, quarantined=g.quarantined,
            heartbeat_age_s=max(0.0, now - ts),
        )


def _live(g: _FactoryGlance, ts: float, now: float) -> bool:
    """Up and heartbeated within three periods: the coordinator's own rule (FleetView)."""
    return g.status == "up" and now - ts <= 3 * (g.heartbeat_interval_s or 5.0)


def format_age(seconds: float | None) -> str:
    """``-``, ``42s``, ``3m05s``, ``2h07m`` or ``3d04h``: an age in at most six characters."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
