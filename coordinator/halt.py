"""The kill switch on the coordinator: the ``halt`` and ``resume`` endpoints and the state the
scheduler dispatches by (issue 12). The state's rules are :mod:`gigafactory.schemas.halt`.

The state lives in one KV key (``gf_control`` / ``halt``), so it survives a coordinator
restart and every coordinator reads the same one: :class:`HaltWatch` reads it before the
coordinator is ready and then follows it with a watch of the key (:meth:`HaltWatch.follow`: a
change by another coordinator or by hand arrives as it is stored, and an idle coordinator sends
no request for it; it read the key twice a second before). A watch that cannot be set up falls
back to reading every :data:`HALT_REFRESH_S` until one can; a watch that goes silent (its
consumer lost) is set up again within one ``heartbeat_s``. The answering coordinator applies
a change at once. A read that fails keeps the last state (a halted fleet stays halted
through a broker hiccup). The scheduler holds the jobs a halt covers (its ``halt`` attribute,
read by :func:`~gigafactory.coordinator.plan_dispatch.plan_dispatch`); factories refuse
claims and, under ``stop``, hand back runs (:mod:`gigafactory.factory.halting`).

Only ``admin`` may call the endpoints (the broker's permissions, issue 12's identities).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gigafactory.broker import Broker, Conflict
from gigafactory.schemas import halt as H
from gigafactory.schemas.api import ApiError
from gigafactory.schemas.records import EventRecord

log = logging.getLogger(__name__)

HALT_REFRESH_S = 0.5
"""How often a coordinator reads the halt state while its watch of the key cannot be set up
(the polling fallback), and the pause before it tries the watch again."""
WATCH_HEARTBEATS_PER_BEAT = 2
"""The halt watch's consumer sends an idle heartbeat this many times per ``heartbeat_s`` (every
10 s at the default 20 s); a watch that heard nothing for two of them is set up again, so a
lost watch costs at most one ``heartbeat_s`` (plus a request timeout) of a halt unseen."""
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
        """Watches of the key set up (one, unless one was lost)."""
        self.heard = 0
        """Changes of the key the watch delivered."""

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

    async def follow(self, stop: asyncio.Event, heartbeat_s: float, request_timeout_s: float) -> None:
        """Follow the stored state with a watch of the key until ``stop``; while a watch cannot
        be set up, read the key every :data:`HALT_REFRESH_S` instead (the polling fallback).

        :param stop: set when the coordinator stops.
        :param heartbeat_s: the fleet's heartbeat period (``Settings.heartbeat_s``): a lost
            watch is noticed and set up again within it (plus ``request_timeout_s``).
        :param request_timeout_s: the bound on setting up the watch."""
        control = self.broker.control
        if control is None:
            return
        idle_heartbeat_s = heartbeat_s / WATCH_HEARTBEATS_PER_BEAT
        silent_s = 2 * idle_heartbeat_s + request_timeout_s
        while not stop.is_set():
            watch = _HaltKeyWatch(self, control)
            try:
                await watch.start(idle_heartbeat_s, request_timeout_s)
                self.watches += 1
                while not stop.is_set() and not watch.lost.is_set():
                    waits = [asyncio.ensure_future(e.wait()) for e in (stop, watch.lost)]
                    try:
                        await asyncio.wait(waits, timeout=silent_s, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()
                    if time.monotonic() - watch.heard_at > silent_s:
                        log.info("the halt watch went silent; watching again")
                        break
                continue  # lost or silent: a new watch delivers the current value first
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("halt key not watched (%s); reading it every %gs until it is", e, HALT_REFRESH_S)
            finally:
                await watch.stop()
            await self.refresh()
            try:
                await asyncio.wait_for(stop.wait(), timeout=HALT_REFRESH_S)
            except asyncio.TimeoutError:
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


class _HaltKeyWatch:
    """One push consumer on the halt key (its latest value, then every change), delivered to a
    subscription of the coordinator's connection and applied as it arrives. A plain push
    consumer, not a KV watch: nats-py's ordered consumer wakes a flow-control task four times a
    second, forever, for a key that changes a few times a year.

    :param watch: the :class:`HaltWatch` it keeps current.
    :param control: the control bucket."""

    def __init__(self, watch: HaltWatch, control) -> None:
        self.watch = watch
        self.control = control
        self.heard_at = time.monotonic()
        """When the consumer last delivered anything, a change or its heartbeat (monotonic)."""
        self.lost = asyncio.Event()
        """Set on a gap in the consumer's sequence: watch again rather than miss a change."""
        self._delivered = 0
        self._sub = None
        self._subject = f"$KV.{control.name}.{H.HALT_KEY}"

    async def start(self, idle_heartbeat_s: float, request_timeout_s: float) -> None:
        b = self.watch.broker
        inbox = b.nc.new_inbox()
        # Subscribed before the consumer exists, so its first delivery finds the subscription.
        self._sub = await b.nc.subscribe(inbox, cb=self._on_msg)
        await b.js.add_consumer(self.control.stream, config=ConsumerConfig(
            deliver_subject=inbox, filter_subject=self._subject, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE, max_deliver=1, flow_control=False, idle_heartbeat=idle_heartbeat_s,
            mem_storage=True, num_replicas=1,
            # Deleted by the server once this subscription is gone this long (a coordinator that died).
            inactive_threshold=2 * idle_heartbeat_s + request_timeout_s,
        ), timeout=request_timeout_s)
        self.heard_at = time.monotonic()

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()  # the consumer goes after its inactive threshold
            except Exception:  # the connection may be gone; the subscription goes with it
                pass

    async def _on_msg(self, msg) -> None:
        self.heard_at = time.monotonic()
        if msg.headers and msg.headers.get("Status"):  # 100: an idle heartbeat
            return
        try:
            delivered = msg.metadata.sequence.consumer
        except Exception:  # not a consumer delivery: nothing this watch sent
            return
        if delivered != self._delivered + 1:
            self.lost.set()  # a delivery went missing: a change may have gone with it
            return
        self._delivered = delivered
        deleted = msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE")
        try:
            state = H.decode_state(msg.data) if msg.data and not deleted else H.HaltState()
        except H.HaltError as e:
            state = _unreadable(e)
        self.watch.heard += 1
        self.watch.apply(state)


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
