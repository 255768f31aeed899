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

State it uses on :class:`~gigafactory.factory.agent.Factory`: ``halt_state``, ``runs``, ``b``.
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
            w = await control.watch(H.HALT_KEY)
            while not stop.is_set() and factory.broker.nc.stats["reconnects"] == reconnects:
                try:
                    e = await w.updates(timeout=factory.settings.heartbeat_s)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                if e is not None:  # None: the end of the initial values
                    apply_halt(factory, None if e.operation in ("DEL", "PURGE") else e.value)
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
