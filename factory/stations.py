"""A factory's stations: which are free, engine seats, and why an idle one is idle.

A station is one slot that runs one job at a time; ``seats`` caps how many stations may run a
given engine at once (a licence, a GPU). A pool puller asks for work only while a station and a
seat are free, and reserves both before it claims, so a factory never takes a job it has no
room for. A job that names its ``engine`` takes a seat of it with the station; an
``engine-class`` job takes the seat of the engine chosen for it (:func:`choose_engine`: an
engine of the class with a free seat, in ``prefers`` order) once its record is read, still
before the claim, and that same seat is released when the run ends. This is slot management
only, apart from what runs in the slot (:mod:`execute`, :mod:`engines`), as Temporal's worker
keeps its slot supplier apart from its activity execution.

State it uses, all set up by :class:`~gigafactory.factory.agent.Factory`: ``record`` (the
stations and seats), ``free``, ``station_cv``, ``engine_running``, ``draining``, ``pools`` and the
broker connection (for the idle reason).
"""

from __future__ import annotations

import asyncio
import time

from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.profiles import EngineChoice, choose_engine
from gigafactory.schemas.records import IdleReason, StationState

from . import engines

STICKY_IDLE_S = 5.0
"""How long an idle reason a run gave on release (``lock-wait``) stands before the station's
reason is worked out afresh: about the hand-back's backoff, after which the job is offered again."""


class Stations:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: reserving and releasing stations."""

    def _idle_reason(self, index: int | None = None) -> IdleReason:
        """Why a free station is idle now. What the whole factory is in (draining, broker down,
        dispatch down) wins; then what the station's last job said (``lock-wait``: a reason
        given on release, kept for ``STICKY_IDLE_S``); then seats, then no work.

        :param index: the station (None: the factory's reason for any free station)."""
        if self.draining.is_set():
            return IdleReason.DRAINING
        if not self.broker.nc.is_connected:
            return IdleReason.BROKER_DOWN
        if self.halt_state.fleet is not None:
            # The kill switch covers every job: nothing may be claimed here, whatever is queued.
            return IdleReason.POLICY_PAUSED
        if self.pools and all(p.mode == "poll" for p in self.pools.values()):
            return IdleReason.DISPATCH_DOWN
        sticky = self.sticky_idle.get(index) if index is not None else None
        if sticky is not None and time.monotonic() < sticky[1]:
            return sticky[0]
        if self.pools and not any(self._seat_free(p.engine, p.engine_class) for p in self.pools.values()):
            # A station is free but no pool this factory serves has a seat left for its jobs.
            return IdleReason.SEAT_LIMIT
        if self.policy_held_pools & set(self.pools):
            # The coordinator holds queued work of a pool served here by policy, a product halt
            # or the budget (the ``policy-holds`` control key, :mod:`halting`): paused, not short of work.
            return IdleReason.POLICY_PAUSED
        return IdleReason.NO_WORK

    def _set_station(self, index: int, job: str | None, epoch: int | None, reason: IdleReason | None = None) -> None:
        st = self.record.stations[index]
        st.state = StationState.BUSY if job else StationState.IDLE
        st.job, st.epoch = job, epoch
        self.station_waiting.pop(index, None)
        if job or reason is None:
            self.sticky_idle.pop(index, None)
        else:
            # Said by the run that just ended (a lock held elsewhere): true until the next
            # offer is likely (the hand-back's backoff), not forever.
            self.sticky_idle[index] = (reason, time.monotonic() + STICKY_IDLE_S)
        st.idle_reason = None if job else (reason or self._idle_reason(index))
        st.since = time.time()
        # A station taken by a claim is said busy by the caller's ``claimed`` event (its
        # ``data.station``), which :mod:`economics.idle` reads as the start of a busy interval:
        # no ``station`` event of its own.
        self._note_station(index, said=bool(job))

    def _station_waits(self, index: int, reason: IdleReason | None) -> None:
        """Say that busy station ``index``'s run only waits now (``reason``, e.g. ``waiting-merge``),
        or works again (None); a ``station`` event is sent when the class changes.

        :param index: the station its run holds.
        :param reason: what it waits on, or None."""
        if reason is None:
            self.station_waiting.pop(index, None)
        else:
            self.station_waiting[index] = reason
        self._note_station(index)

    def _refresh_idle(self) -> None:
        """Recompute every free station's idle reason (at each heartbeat) and say the changes."""
        for st in self.record.stations:
            if st.state == StationState.IDLE:
                st.idle_reason = self._idle_reason(st.index)
                self._note_station(st.index)

    def _note_station(self, index: int, said: bool = False) -> None:
        """Publish a ``station`` event when station ``index``'s class changed since the class
        the audit last said for it: ``busy``, or its idle reason. ``economics.idle`` turns these
        into intervals (idle classes, coverage, lane allocation); only changes are sent, so a
        steady fleet sends none. A job's own events say the changes of a station taking job
        after job (``claimed``: busy; a run's end event: :meth:`_station_after_run`), so such a
        station sends no ``station`` event at all.

        :param index: the station.
        :param said: another event queued now says the class (``claimed``): record it, send nothing."""
        st = self.record.stations[index]
        if st.state == StationState.BUSY:
            # A run holding its station while it only waits (a forge's checks, the merge) is
            # not working: it says so with ``station_waiting`` (:mod:`ship`).
            waiting = self.station_waiting.get(index)
            cls = str(waiting) if waiting is not None else "busy"
        else:
            cls = str(st.idle_reason) if st.idle_reason else ""
        if self.station_class.get(index) == cls:
            return
        self.station_class[index] = cls
        if said:
            return
        # _event only queues (no await inside): spawned, it runs in creation order.
        self._spawn(self._event("station", reason=cls, data={"station": index, "class": cls, "job": st.job}),
                    f"station-{index}")

    def _station_after_run(self, run) -> dict:
        """The ``data`` fields a run's end event (``finished``, a drained ``handed_back``) adds
        so that it also says what the run's station becomes: ``station`` and ``station_class``,
        the class the station takes once the run releases it (:meth:`_release_station`). That
        class is recorded as said, so the release sends a ``station`` event only when the class
        it finds differs by then (a halt or a drain that came in between). Empty for a run not
        holding its station here (a result replayed from the outbox): its release was said.

        Worked out as the release will: with the run's engine seat counted free (the release
        frees it first), and with no reason the run gives on release (those runs end without
        these fields: their release says the class).

        :param run: the run whose end event is about to be queued (it still holds its station)."""
        if self.runs.get((run.job, run.epoch)) is not run:
            return {}
        seat = run.record.attempts[-1].engine if run.record.attempts else None
        held = seat is not None and self.engine_running.get(seat, 0) > 0
        if held:  # no await until it is given back: nothing else sees the count meanwhile
            self.engine_running[seat] -= 1
        try:
            cls = str(self._idle_reason(run.station))
        finally:
            if held:
                self.engine_running[seat] += 1
        self.station_class[run.station] = cls
        return {"station": run.station, "station_class": cls}

    # -- engine seats -----------------------------------------------------------------------------

    def _offered_engines(self) -> dict[str, str]:
        """The registered engines this factory offers now (``engine:<name>``; a withdrawn engine
        is not), name -> engine class."""
        return {n: e.engine_class for n, e in engines.registry().items() if f"engine:{n}" in self.offers.tokens}

    def _full_engines(self) -> set[str]:
        """The engines whose seats are all taken here."""
        return {n for n, cap in self.record.seats.items() if self.engine_running.get(n, 0) >= cap}

    def _seat_free(self, engine: str | None, engine_class: str | None) -> bool:
        """Whether a job of a pool could get a seat here now: a seat of ``engine`` (the pool
        names one), else of any offered engine of ``engine_class`` (an engine-class pool)."""
        full = self._full_engines()
        if engine:
            return engine not in full
        if engine_class:
            return any(c == engine_class and n not in full for n, c in self._offered_engines().items())
        return True

    def _engine_version(self, engine: str) -> str | None:
        """The version the probe offered for ``engine`` (its ``<engine>:<version>`` token), or None."""
        prefix = f"{engine}:"
        return next((t[len(prefix):] for t in sorted(self.offers.tokens) if t.startswith(prefix)), None)

    async def _take_seat(self, manifest: Manifest) -> EngineChoice:
        """Choose the engine an engine-class job runs on here (:func:`choose_engine`: free seats,
        then ``prefers``) and take one of its seats, in one step so that no other claim can take
        the same last seat. The caller releases it (with its station) if it does not claim.

        :param manifest: the job's resolved manifest.
        """
        async with self.station_cv:
            choice = choose_engine(manifest, self._offered_engines(), self._full_engines())
            if choice.engine:
                self.engine_running[choice.engine] = self.engine_running.get(choice.engine, 0) + 1
            return choice

    # -- stations -----------------------------------------------------------------------------------

    async def _take_station(self, engine: str | None, engine_class: str | None = None) -> int | None:
        """Reserve a free station without waiting; None if none. With ``engine`` (its pool names
        one) a seat of it is taken too; with ``engine_class`` only a station, and only while some
        engine of the class has a free seat: the seat is chosen once the job is read
        (:meth:`_take_seat`), still before the claim."""
        async with self.station_cv:
            if not self.free or self.draining.is_set():
                return None
            if not self._seat_free(engine, engine_class):
                return None
            idx = min(self.free)
            self.free.discard(idx)
            if engine:
                self.engine_running[engine] = self.engine_running.get(engine, 0) + 1
            return idx

    async def _release_station(self, index: int, engine: str | None, reason: IdleReason | None = None) -> None:
        """Free station ``index`` and the seat of ``engine`` it held (None: no seat)."""
        async with self.station_cv:
            self.free.add(index)
            if engine:
                self.engine_running[engine] = max(0, self.engine_running.get(engine, 0) - 1)
            self._set_station(index, None, None, reason)
            self.station_cv.notify_all()

    async def _wait_capacity(self, engine: str | None, timeout_s: float | None = None,
                             engine_class: str | None = None) -> bool:
        """Wait until a station (and a seat of ``engine``, or of an engine of ``engine_class``)
        is free, or draining; False if ``timeout_s`` passed first."""
        def ok() -> bool:
            return self.draining.is_set() or self._has_capacity(engine, engine_class)

        if ok():  # the idle case, at every long poll: no task and timer for a wait that is over
            return True
        async with self.station_cv:
            try:
                await asyncio.wait_for(self.station_cv.wait_for(ok), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True

    def _has_capacity(self, engine: str | None, engine_class: str | None = None) -> bool:
        return bool(self.free) and self._seat_free(engine, engine_class)
