"""The kill switch on the coordinator: the ``halt`` and ``resume`` endpoints and the state the
scheduler dispatches by (issue 12). The state's rules are :mod:`gigafactory.schemas.halt`.

The state lives in one KV key (``gf_control`` / ``halt``), so it survives a coordinator
restart and every coordinator reads the same one: :class:`HaltWatch` reads it before the
coordinator is ready and then follows it (:meth:`HaltWatch.follow`): a write of the key by
another coordinator or by hand is heard as it is stored and read at once, and the key is read
once per ``heartbeat_s`` in any case (it was read twice a second before); while the key's
writes cannot be followed, it is read every :data:`HALT_REFRESH_S`. The answering coordinator
applies a change at once. A read that fails keeps the last state (a halted fleet stays halted
through a broker hiccup). The scheduler holds the jobs a halt covers (its ``halt`` attribute,
read by :func:`~gigafactory.coordinator.plan_dispatch.plan_dispatch`); factories refuse
claims and, under ``stop``, hand back runs (:mod:`gigafactory.factory.halting`).

Only ``admin`` may call the endpoints (the broker's permissions, issue 12's identities).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gigafactory.broker import Broker, Conflict
from gigafactory.schemas import halt as H
from gigafactory.schemas.api import ApiError
from gigafactory.schemas.records import EventRecord

log = logging.getLogger(__name__)

HALT_REFRESH_S = 0.5
"""How often a coordinator reads the halt state while it cannot follow the key's writes (the
polling fallback), and the pause before it tries to follow them again."""
HALT_CAS_RETRIES = 20
"""Compare-and-set tries of a halt or resume that races another."""


async def read_state(broker: Broker) -> tuple[H.HaltState, int | None]:
    """The stored halt state and its revision (None: never written).

    :param broker: the connection (its ``control`` bucket)."""
    if broker.control is None:
        return H.HaltState(), None
    e = await broker.control.get(H.HALT_KEY)
    if e is None or not e.value:
        return H.HaltState(), (e.revision if e is not None else None)
    return H.decode_state(e.value), e.revision


async def change_state(broker: Broker, change) -> H.HaltState:
    """Apply ``change`` (``HaltState -> HaltState``) to the stored state with a compare-and-set,
    retried on a race (at most :data:`HALT_CAS_RETRIES`). Returns the state written.

    :param broker: the connection.
    :param change: the pure change (:func:`schemas.halt.halt` or :func:`~schemas.halt.resume`)."""
    if broker.control is None:
        raise ApiError(409, "this broker's layout has no gf_control bucket: restart the coordinator with this "
                            "version (it creates it)")
    for _ in range(HALT_CAS_RETRIES):
        try:
            state, rev = await read_state(broker)
        except H.HaltError:
            state, rev = H.HaltState(), (await broker.control.get(H.HALT_KEY)).revision  # overwrite garbage
        new = change(state)
        try:
            if rev is None:
                await broker.control.create(H.HALT_KEY, H.encode_state(new))
            else:
                await broker.control.update(H.HALT_KEY, H.encode_state(new), last=rev)
            return new
        except Conflict:
            continue
    raise ApiError(409, "the halt state kept changing; try again")


class HaltWatch:
    """The coordinator's copy of the halt state, given to its scheduler.

    :param broker: the connection.
    :param scheduler: the scheduler whose ``halt`` attribute is kept current."""

    def __init__(self, broker: Broker, scheduler) -> None:
        self.broker = broker
        self.sched = scheduler
        self.sched.halt = H.HaltState()
        self.read_failures = 0
        self.reads = 0
        """Reads of the stored state (at start, and while no watch can be set up)."""
        self.watches = 0
        """Subscriptions to the key's writes made (one, unless making one failed)."""
        self.heard = 0
        """Writes of the key heard through the subscription."""
        self.reads_heard = 0
        """Reads made because a write was heard (the rest: at start, one per ``heartbeat_s``,
        and every HALT_REFRESH_S while no subscription could be made)."""

    async def refresh(self) -> None:
        """Read the stored state into the scheduler; on a failed read keep the last one."""
        self.reads += 1
        try:
            state, _rev = await read_state(self.broker)
        except H.HaltError as e:
            state = _unreadable(e)
        except Exception as e:
            self.read_failures += 1
            log.info("halt state not read (%s); keeping the last one", e)
            return
        self.apply(state)

    async def follow(self, stop: asyncio.Event, heartbeat_s: float) -> None:
        """Follow the stored state until ``stop``: read it when the broker says the key was
        written, and once every ``heartbeat_s`` whatever it says; while the subscription
        cannot be made, read it every :data:`HALT_REFRESH_S` instead (the polling fallback).

        The key's writes are heard with a plain subscription to its subject (every KV write is
        a message on ``$KV.<bucket>.<key>``), not a consumer: the control stream already holds
        one consumer per factory (their own halt watches), and the server refuses consumers
        past its limit of 1,000 per stream, so a coordinator's consumer would fail, or take a
        factory's place. A subscription is at most once (a message lost to a reconnect or a
        slow consumer is not delivered again), so the read every ``heartbeat_s`` bounds how
        long a halt can go unseen to one heartbeat, as the issue asks. Each notice is answered
        with a read, not applied from the message: the stored value is the truth.

        :param stop: set when the coordinator stops.
        :param heartbeat_s: the fleet's heartbeat period (``Settings.heartbeat_s``)."""
        control = self.broker.control
        if control is None:
            return
        written = asyncio.Event()

        async def heard(_msg) -> None:
            self.heard += 1
            written.set()

        sub = None
        try:
            while not stop.is_set():
                if sub is None:
                    try:
                        sub = await self.broker.nc.subscribe(f"$KV.{control.name}.{H.HALT_KEY}", cb=heard)
                        self.watches += 1
                        written.set()  # read once: a write before the subscription took effect is not heard
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        log.info("halt key not followed (%s); reading it every %gs until it is", e, HALT_REFRESH_S)
                if not written.is_set():
                    waits = [asyncio.ensure_future(e.wait()) for e in (stop, written)]
                    try:
                        await asyncio.wait(waits, timeout=heartbeat_s if sub is not None else HALT_REFRESH_S,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()
                    if stop.is_set():
                        return
                if written.is_set():
                    written.clear()
                    self.reads_heard += 1
                await self.refresh()
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection may be gone; the subscription goes with it
                    pass

    def apply(self, state: H.HaltState) -> None:
        """Take ``state`` as current (the answering coordinator, right after writing it)."""
        if state != self.sched.halt:
            log.warning("halt state now: %s", H.describe(state))
        self.sched.halt = state


def _unreadable(e: H.HaltError) -> H.HaltState:
    """The state a coordinator takes when the stored one cannot be decoded: halt everything
    rather than guess; an operator writes it again."""
    log.error("%s", e)
    return H.HaltState(fleet=H.Halt(mode="drain", at=time.time(), actor="coordinator", reason=str(e)))


def state_dict(state: H.HaltState) -> dict:
    """The state as a reply's ``halt`` field: ``halted``, ``summary``, ``fleet``, ``products``."""
    import msgspec

    return {"halted": state.any, "summary": H.describe(state), **msgspec.to_builtins(state)}


async def api_halt(api, body: dict) -> dict:
    """``halt`` ``{"product"?, "mode"?: "drain"|"stop", "reason"?, "actor"?}``: halt the fleet (or
    one product); returns the new state.

    :param api: the :class:`~gigafactory.coordinator.api.Api` answering.
    :param body: the request."""
    product, mode = body.get("product"), str(body.get("mode") or "drain")
    who, reason = str(body.get("actor") or "operator"), str(body.get("reason") or "")
    try:
        state = await change_state(api.broker, lambda s: H.halt(s, product=product, mode=mode, at=time.time(),
                                                            actor=who, reason=reason))
    except H.HaltError as e:
        raise ApiError(400, str(e)) from None
    await _said(api, "halted", state, who, f"{'product ' + product if product else 'fleet'} halted ({mode})"
                                          + (f": {reason}" if reason else ""))
    return {"halt": state_dict(state)}


async def api_resume(api, body: dict) -> dict:
    """``resume`` ``{"product"?, "actor"?}``: undo a halt of the fleet (or of one product).

    :param api: the :class:`~gigafactory.coordinator.api.Api` answering.
    :param body: the request."""
    product, who = body.get("product"), str(body.get("actor") or "operator")
    try:
        state = await change_state(api.broker, lambda s: H.resume(s, product=product))
    except H.HaltError as e:
        raise ApiError(400, str(e)) from None
    await _said(api, "resumed", state, who, f"{'product ' + product if product else 'fleet'} resumed")
    return {"halt": state_dict(state)}


async def _said(api, kind: str, state: H.HaltState, who: str, reason: str) -> None:
    """Apply the new state here at once and put it in the audit (a fleet event)."""
    watch = getattr(api, "halt_watch", None)
    if watch is not None:
        watch.apply(state)
    try:
        await api.broker.publish_event(EventRecord(kind=kind, at=time.time(), actor=who, reason=reason,
                                              data=state_dict(state)))
    except Exception as e:  # the state is written; the audit line is best effort
        log.warning("%s event not stored: %s", kind, e)
