"""The kill switch on a factory (issue 12): follow the halt state, claim nothing it covers, and
under ``stop`` stop the runs it covers and hand their jobs back.

The state's rules are :mod:`gigafactory.schemas.halt`; the coordinator holds queued jobs
(:mod:`gigafactory.coordinator.halt`). A factory checks too, because dispatch messages already
published, and the polling fallback, would otherwise still be claimed. It reads the state once
before it claims anything (:func:`refresh_halt`), then follows it with a watch of the key
(:func:`follow_halt`: pushed by the broker, so an idle factory sends no request for it, and a
change arrives well within one heartbeat); the watch is set up again after a reconnect. A read
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

import nats.errors

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


async def follow_halt(factory, stop: asyncio.Event) -> None:
    """Follow the halt key until ``stop``: each change is applied as it is pushed; after a
    reconnect (the watch's consumer may be gone) or a failure, watch again.

    :param factory: the factory.
    :param stop: set when the factory stops."""
    control = factory.broker.control
    if control is None:
        return
    while not stop.is_set():
        w = None
        try:
            reconnects = factory.broker.nc.stats["reconnects"]
            w = await control.watch(">")  # the halt key and the policy-holds key
            while not stop.is_set() and factory.broker.nc.stats["reconnects"] == reconnects:
                try:
                    e = await w.updates(timeout=factory.settings.heartbeat_s)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                if e is None:  # None: the end of the initial values
                    continue
                value = None if e.operation in ("DEL", "PURGE") else e.value
                if e.key == H.HALT_KEY:
                    apply_halt(factory, value)
                elif e.key == H.POLICY_HOLDS_KEY:
                    apply_policy_holds(factory, value)
        except asyncio.CancelledError:
            raise
        except Exception as ex:
            log.info("%s: halt key not watched (%s); watching again", factory.id, ex)
            await asyncio.sleep(REWATCH_PAUSE_S)
        finally:
            if w is not None:
                try:
                    await w.stop()
                except Exception:
                    pass


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
