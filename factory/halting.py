"""The kill switch on a factory (issue 12): follow the halt state, claim nothing it covers, and
under ``stop`` stop the runs it covers and hand their jobs back.

The state's rules are :mod:`gigafactory.schemas.halt`; the coordinator holds queued jobs
(:mod:`gigafactory.coordinator.halt`). A factory checks too, because dispatch messages already
published, and the polling fallback, would otherwise still be claimed. It reads the state once
before it claims anything (:func:`refresh_halt`), then follows it with a watch of the key
(:func:`follow_halt`: pushed by the broker the moment it is stored, so an idle factory sends no
request for it); the watch is set up again after a reconnect. The watch is a plain push
consumer with a rare heartbeat, not a KV watch (see :func:`watch_heartbeat_s` for why). A read
that fails keeps the last state; a state that cannot be decoded halts everything here (a
garbled kill switch must not mean "go").

The same watch follows the ``policy-holds`` key (:data:`~gigafactory.schemas.halt.POLICY_HOLDS_KEY`):
the pools whose queued work the coordinator holds by policy (a halt of the job's product, its
budget), so that a free station serving one reads ``policy-paused`` (issue 13's idle classes),
not ``no-work``.

State it uses on :class:`~gigafactory.factory.agent.Factory`: ``halt_state``, ``policy_held_pools``,
``runs``, ``broker``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gigafactory.schemas import halt as H

log = logging.getLogger(__name__)


async def refresh_halt(factory) -> None:
    """Read the halt state into ``factory.halt_state``; under ``stop``, stop the covered runs.

    :param factory: the factory (its broker's ``control`` bucket, its ``runs``)."""
    control = factory.broker.control
    if control is None:
        return
    try:
        e = await control.get(H.HALT_KEY)
    except Exception as ex:
        log.info("%s: halt state not read (%s); keeping the last one", factory.id, ex)
        return
    apply_halt(factory, e.value if e is not None else None)
    try:
        b = await control.get(H.POLICY_HOLDS_KEY)
    except Exception as ex:  # the key was never written (nothing held), or a failed read: keep
        if "not found" not in str(ex).lower():
            log.info("%s: policy holds not read (%s); keeping the last ones", factory.id, ex)
        return
    apply_policy_holds(factory, b.value if b is not None else None)


REWATCH_PAUSE_S = 1.0
"""Pause before the halt key is watched again after a failed watch."""
WATCH_HEARTBEATS = 2
"""The halt watch's consumer sends an idle heartbeat every this many ``heartbeat_s`` while
nothing changes (40 s at the default 20 s; see :func:`watch_heartbeat_s`)."""
WATCH_SILENT_HEARTBEATS = 2
"""A watch that has delivered nothing, not even its idle heartbeat, for this many of its
heartbeat periods (plus ``request_timeout_s``) is presumed lost and set up again."""


def watch_heartbeat_s(settings) -> float:
    """How often the halt watch's consumer says it is alive while nothing changes, seconds.

    Why so rarely, and why not a KV watch: a KV watch (an ordered consumer) gets an idle
    heartbeat every 5 s and wakes a flow-control task every 0.25 s, per factory, forever: for
    an idle fleet of 1,000 that was 200 messages a second from the broker and 4,000 event-loop
    wake-ups a second in the fleet, to say that nothing changed. This watch is a plain push
    consumer (no flow control: it carries two small keys) whose heartbeat only proves that the
    consumer still exists (a memory consumer is lost with the server that held it, without this
    connection noticing on a cluster). A change is pushed the moment it is stored, whatever
    the heartbeat period; a reconnect sets the watch up again at once (the heartbeat loop says
    so). What the longer period risks: a watch lost without a reconnect is noticed within
    ``WATCH_SILENT_HEARTBEATS`` periods (85 s at the defaults), and a halt written in
    that window reaches this factory when the watch is set up again (it reads the current
    values first); the coordinator holds halted jobs meanwhile regardless.

    :param settings: the factory's settings (``heartbeat_s``)."""
    return WATCH_HEARTBEATS * settings.heartbeat_s


async def follow_halt(factory, stop: asyncio.Event) -> None:
    """Follow the halt key (and the policy-holds key) until ``stop``: each change is applied as
    it is stored; after a reconnect (the heartbeat loop sets ``factory._halt_rewatch``), a gap,
    a watch gone silent, or a failure, watch again (reading the current values first).

    :param factory: the factory.
    :param stop: set when the factory stops."""
    control = factory.broker.control
    if control is None:
        return
    rewatch = getattr(factory, "_halt_rewatch", None) or asyncio.Event()
    while not stop.is_set():
        watch = None
        try:
            rewatch.clear()
            watch = _KeyWatch(factory, control)
            await watch.start()
            silent_s = WATCH_SILENT_HEARTBEATS * watch.heartbeat_s + factory.settings.request_timeout_s
            while not stop.is_set() and not rewatch.is_set() and not watch.lost.is_set():
                waits = [asyncio.ensure_future(e.wait()) for e in (stop, rewatch, watch.lost)]
                try:
                    await asyncio.wait(waits, timeout=silent_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                if time.monotonic() - watch.heard_at > silent_s:
                    log.info("%s: the halt watch went silent; watching again", factory.id)
                    break
        except asyncio.CancelledError:
            raise
        except Exception as ex:
            log.info("%s: halt key not watched (%s); watching again", factory.id, ex)
            await asyncio.sleep(REWATCH_PAUSE_S)
        finally:
            if watch is not None:
                await watch.stop()


class _KeyWatch:
    """One push consumer on the control bucket (its latest value per key, then every change),
    delivered to a subscription of this connection, applied as it arrives.

    :param factory: the factory (its broker, settings, ``id``; the state it applies to).
    :param control: the control bucket."""

    def __init__(self, factory, control) -> None:
        self.factory = factory
        self.control = control
        self.heartbeat_s = watch_heartbeat_s(factory.settings)
        self.heard_at = time.monotonic()
        """When the consumer last delivered anything, a change or its heartbeat (monotonic)."""
        self.lost = asyncio.Event()
        """Set on a gap in the consumer's sequence: watch again rather than miss a change."""
        self._delivered = 0
        self._sub = None
        self._prefix = f"$KV.{control.name}."

    async def start(self) -> None:
        nc = self.factory.broker.nc
        inbox = nc.new_inbox()
        # Subscribed before the consumer exists, so its first deliveries find the subscription.
        self._sub = await nc.subscribe(inbox, cb=self._on_msg)
        await self.factory.broker.js.add_consumer(self.control.stream, config=ConsumerConfig(
            deliver_subject=inbox, filter_subject=f"{self._prefix}>", deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE, max_deliver=1, flow_control=False, idle_heartbeat=self.heartbeat_s,
            mem_storage=True, num_replicas=1,
            # Deleted by the server once this subscription is gone this long (a factory that died).
            inactive_threshold=WATCH_SILENT_HEARTBEATS * self.heartbeat_s,
        ), timeout=self.factory.settings.request_timeout_s)
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
        key = msg.subject[len(self._prefix):]
        value = None if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE") else msg.data
        if key == H.HALT_KEY:
            apply_halt(self.factory, value)
        elif key == H.POLICY_HOLDS_KEY:
            apply_policy_holds(self.factory, value)


def apply_halt(factory, value: bytes | None) -> None:
    """Take the stored ``value`` of the halt key as the state; under ``stop``, stop the runs.

    :param factory: the factory.
    :param value: the key's value (None: deleted or never written)."""
    try:
        state = H.decode_state(value)
    except H.HaltError as ex:
        state = H.HaltState(fleet=H.Halt(mode="drain", at=time.time(), reason=str(ex)))
    if state != factory.halt_state:
        log.warning("%s: halt state changed: fleet=%s products=%s", factory.id,
                    state.fleet.mode if state.fleet else None, sorted(state.products))
    factory.halt_state = state
    stop_covered_runs(factory)
    _reclassify(factory)


def apply_policy_holds(factory, value: bytes | None) -> None:
    """Take the stored ``value`` of the policy-holds key: the pools whose queued work the
    coordinator holds by policy (a product halt, the budget); a free station serving one reads
    ``policy-paused``.

    :param factory: the factory.
    :param value: the key's value (None: deleted or never written)."""
    pools = set(H.decode_policy_holds(value).pools)
    if pools != factory.policy_held_pools:
        log.info("%s: pools with work held by policy: %s", factory.id, sorted(pools) or "none")
    factory.policy_held_pools = pools
    _reclassify(factory)


def _reclassify(factory) -> None:
    """Work out the free stations' idle classes again now (not at the next heartbeat), so a
    halt or a budget hold shows in the station events as it happens."""
    refresh = getattr(factory, "_refresh_idle", None)
    ready = getattr(factory, "ready", None)
    if refresh is not None and ready is not None and ready.is_set():  # while starting they read prewarm
        refresh()


def claim_refused(factory, product: str) -> bool:
    """Whether a job of ``product`` may not be claimed here now (a halt covers it).

    :param factory: the factory.
    :param product: the job's product."""
    return H.covering(factory.halt_state, product) is not None


def stop_covered_runs(factory) -> None:
    """Under a ``stop`` halt, stop the engine of every run it covers; the attempt then hands
    its job back (fenced, no retry charged) through the path a drain takes."""
    for run in list(factory.runs.values()):
        h = H.covering(factory.halt_state, run.record.manifest.product)
        if h is None or h.mode != "stop" or run.draining:
            continue
        run.handback_reason = H.hold_reason(factory.halt_state, run.record.manifest.product) or "halted"
        run.draining = True  # _execute_attempt hands it back once the engine has stopped
        run.cancel.set()
        log.warning("%s: stopping %s (epoch %d): %s", factory.id, run.job, run.epoch, run.handback_reason)
