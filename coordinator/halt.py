"""The kill switch on the coordinator: the ``halt`` and ``resume`` endpoints and the state the
scheduler dispatches by (issue 12). The state's rules are :mod:`gigafactory.schemas.halt`.

The state lives in one KV key (``gf_control`` / ``halt``), so it survives a coordinator
restart and every coordinator reads the same one: :class:`HaltWatch` reads it before the
coordinator is ready and then every :data:`HALT_REFRESH_S`, and the answering coordinator
applies a change at once. A read that fails keeps the last state (a halted fleet stays halted
through a broker hiccup). The scheduler holds the jobs a halt covers (its ``halt`` attribute,
read by :func:`~gigafactory.coordinator.plan_dispatch.plan_dispatch`); factories refuse
claims and, under ``stop``, hand back runs (:mod:`gigafactory.factory.halting`).

Only ``admin`` may call the endpoints (the broker's permissions, issue 12's identities).
"""

from __future__ import annotations

import logging
import time

from gigafactory.broker import Broker, Conflict
from gigafactory.schemas import halt as H
from gigafactory.schemas.api import ApiError
from gigafactory.schemas.records import EventRecord

log = logging.getLogger(__name__)

HALT_REFRESH_S = 0.5
"""How often a coordinator reads the halt state (a change by another coordinator or by hand)."""
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

    async def refresh(self) -> None:
        """Read the stored state into the scheduler; on a failed read keep the last one."""
        try:
            state, _rev = await read_state(self.broker)
        except H.HaltError as e:
            # Unreadable: halt everything rather than guess; an operator writes it again.
            log.error("%s", e)
            state = H.HaltState(fleet=H.Halt(mode="drain", at=time.time(), actor="coordinator", reason=str(e)))
        except Exception as e:
            self.read_failures += 1
            log.info("halt state not read (%s); keeping the last one", e)
            return
        self.apply(state)

    def apply(self, state: H.HaltState) -> None:
        """Take ``state`` as current (the answering coordinator, right after writing it)."""
        if state != self.sched.halt:
            log.warning("halt state now: %s", H.describe(state))
        self.sched.halt = state


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
