"""A factory's stations: which are free, engine seats, and why an idle one is idle.

A station is one slot that runs one job at a time; ``seats`` caps how many stations may run a
given engine at once (a licence, a GPU). A pool puller reserves a station (and a seat) before it
asks for work, so a factory never takes a job it has no room for. This is slot management only,
apart from what runs in the slot (:mod:`execute`, :mod:`engines`), as Temporal's worker keeps its
slot supplier apart from its activity execution.

State it uses, all set up by :class:`~gigafactory.factory.agent.Factory`: ``record`` (the
stations and seats), ``free``, ``station_cv``, ``engine_running``, ``draining``, ``pools`` and the
broker connection (for the idle reason).
"""

from __future__ import annotations

import asyncio
import time

from gigafactory.schemas.records import IdleReason, StationState


class Stations:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: reserving and releasing stations."""

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


    def _has_capacity(self, engine: str | None) -> bool:
        if not self.free:
            return False
        return not (engine and engine in self.record.seats
                    and self.engine_running.get(engine, 0) >= self.record.seats[engine])

