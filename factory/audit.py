"""The factory's audit: events queued in order and stored in ``GF_EVENTS`` by one task.

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``_events`` (the queue),
``_events_waiting``, ``stats``, ``id`` and the broker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time

from gigafactory import tracing
from gigafactory.schemas.records import EventRecord

log = logging.getLogger(__name__)

EVENT_QUEUE_MAX = 10_000
"""Audit events waiting to be stored (the broker away) beyond this drop the oldest, logged."""
_EVENT_NONCE = secrets.token_hex(8)
_EVENT_SEQ = itertools.count()
"""An event's message id is its factory, this process's random nonce and a counter: unique
(so ``GF_EVENTS`` stores a retried publish once, and never takes one event for another) without
drawing random bytes from the system for every event."""
EVENT_WINDOW_MAX = 16
"""Most audit events in flight at once (published together, their acks awaited together)."""
EVENT_RETRY_MIN_S = 0.05
EVENT_RETRY_MAX_S = 2.0
"""Back-off between tries of an audit event the stream did not store."""


class AuditQueue:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: queueing and publishing audit events."""

    async def _event(self, kind: str, *, job: str | None = None, epoch: int | None = None,
                     stage_from: str | None = None, stage_to: str | None = None, reason: str = "",
                     data: dict | None = None) -> None:
        """Queue an audit event; :meth:`_events_loop` publishes the queue in order.

        An event follows the record write it describes, and the write may have reached the job
        bucket while ``GF_EVENTS`` has no leader (an election on a cluster) or the broker went
        away just after: published inline, such an event was lost, and the audit showed a
        result with no claim before it. Queued, it is retried until stored (with one message id,
        so a retry of a publish whose reply was lost is stored once), and the events after it
        wait their turn, so the audit keeps the order of the writes. The run never waits on it."""
        # Redacted here, before it is queued: nothing of a secret reaches the queue or GF_EVENTS.
        ev = EventRecord(
            kind=kind, at=time.time(), job=job, epoch=epoch, factory=self.id, actor=self.id,
            stage_from=stage_from, stage_to=stage_to, reason=self.redactor.text(reason),
            data=self.redactor.value(data or {}),
        )
        if len(self._events) >= EVENT_QUEUE_MAX:
            lost, _ = self._events.popleft()
            self.stats["events_dropped"] += 1
            log.warning("%s: audit queue full (%d); event %s for %s dropped", self.id, EVENT_QUEUE_MAX,
                        lost.kind, lost.job)
        # The trace of the step that says it, taken now: the events task publishes it later.
        self._events.append((ev, (f"{self.id}-{_EVENT_NONCE}-{next(_EVENT_SEQ):x}", tracing.traceparent())))
        self._events_waiting.set()

    async def _publish_events(self, deadline: float | None = None) -> bool:
        """Publish queued events until the queue is empty (True) or ``deadline`` (monotonic)
        passes (False).

        The head of the queue goes out as one window (:func:`event_window`): events of
        different jobs are published together and their acks awaited together, so the audit
        costs one round trip per window, not one per event. Events of one job (or this
        factory's fleet events) are never in the same window: a failed publish is retried,
        with back-off, before any later event of its job is sent, so each job's audit keeps
        the order of its writes whatever fails. A publish that fails while a later event of
        another job is stored leaves those two jobs' events in another order in the stream than
        queued (each job's own order is kept)."""
        delay, failures = EVENT_RETRY_MIN_S, 0
        while self._events:
            _raise_if_cancelled()
            window = event_window(self._events, EVENT_WINDOW_MAX)
            if len(window) > self.stats.get("events_window_max", 0):
                self.stats["events_window_max"] = len(window)
            got = await asyncio.gather(*(self.broker.publish_event(ev, msg_id=msg_id, trace=trace)
                                         for ev, (msg_id, trace) in window), return_exceptions=True)
            _raise_if_cancelled()
            failed = None
            for item, res in zip(window, got):
                if isinstance(res, BaseException):
                    failed = failed or (item[0], res)
                    continue
                try:
                    self._events.remove(item)  # by identity of the tuple: the window's own
                except ValueError:
                    pass  # dropped meanwhile by a full queue (counted there)
                self.stats["events_published"] += 1
            if failed is None:
                delay, failures = EVENT_RETRY_MIN_S, 0
                continue
            ev, e = failed
            if isinstance(e, asyncio.CancelledError):
                raise e
            failures += 1
            if failures == 1 or failures % 20 == 0:
                log.info("%s: event %s for %s not stored yet (%s); %d queued, retrying", self.id, ev.kind,
                         ev.job, e, len(self._events))
            pause = random.uniform(delay / 2, delay)
            if deadline is not None and time.monotonic() + pause > deadline:
                return False
            await asyncio.sleep(pause)
            delay = min(delay * 2, EVENT_RETRY_MAX_S)
        return True

    async def _events_loop(self) -> None:
        while True:
            self._events_waiting.clear()
            await self._publish_events()
            _raise_if_cancelled()
            await self._events_waiting.wait()


def event_window(queue, limit: int) -> list:
    """The events to publish together: the head of ``queue`` (oldest first) up to, not
    including, the first event whose job (or, for a fleet event, whose factory) is already in
    the window, at most ``limit``. Never empty for a non-empty queue.

    :param queue: ``(EventRecord, (msg_id, trace))`` items, oldest first.
    :param limit: the most events in the window (at least 1)."""
    assert limit >= 1, limit
    out, keys = [], set()
    for item in queue:
        ev = item[0]
        key = ("job", ev.job) if ev.job is not None else ("fleet", ev.factory)
        if key in keys or len(out) >= limit:
            break
        keys.add(key)
        out.append(item)
    return out


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop. Python 3.11's ``asyncio.wait_for``
    (inside nats-py's publish) returns the result instead of raising when the cancel lands as
    the broker's ack arrives: the cancel was lost, the loop went back to waiting for events, and
    a drain gathering this task waited forever (seen as a factory that never finished stopping)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
