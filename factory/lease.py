"""A holder's fenced write, as a state machine with no I/O (after h11's ``_state.py``).

Everything that decides what a lease holder does next while it writes its job record lives in
this file: compare-and-set on the revision it holds, what a conflict means, what a write that
got no answer means, when to back off, when the run is fenced and when to give up. This file
does not know about NATS, asyncio, clocks or the simulation: its caller (the *driver*) performs
each :class:`Action` it returns and feeds the result back in.

Two drivers run it: ``Factory._write`` in ``factory/agent.py`` (real requests to the broker)
and ``chaos/sim.py`` (seeded requests to an in-memory store, with lost replies, partitions and
crashes). Because both drive this one machine, a schedule the simulation explores is a schedule
of the code that runs in production, not of a translation of it.

Why here and not in ``schemas/``: ``schemas/`` holds the wire contract and the protocol's
decisions over records (``schemas/protocol.py``: claim, renew, finish, check_fence, ...), which
the coordinator uses too. This machine is the factory's side of the exchange (how one holder
retries and learns the outcome of its writes), so it lives with the factory, in the module the
design names for "lease and fenced writes"; it is sans-I/O all the same.

Theory of operation
-------------------
A write starts from the record and revision the run holds. ``decide(record)`` (a pure function
of ``schemas/protocol.py``, such as ``renew`` or ``finish``) returns the new record, an
:class:`~gigafactory.schemas.protocol.Outcome`, or None (nothing to write), or raises
``protocol.Fenced`` (the record is no longer this holder's epoch).

::

    start() ──> decide ──> Send(data, last=rev) ──┬─ stored(rev')  ──> Done
                  │  ^                            ├─ conflict()    ──> Read
                  │  │                            └─ no_answer()   ──> Read  (it may have landed)
                  │  │   Read ──┬─ read(None)                    ──> Fenced (record gone)
                  │  │          ├─ read(v), v one of our writes  ──> Done   (landed; reply lost)
                  │  └──────────┼─ read(v) after a conflict      ──> decide again on v
                  │             ├─ read(v) after no answer       ──> BackOff ─ backed_off() ─> decide
                  │             └─ read_unanswered()             ──> GiveUp("unanswered")
                  ├─ Fenced (decide raised protocol.Fenced, or the run was stopped meanwhile)
                  ├─ Done (decide returned None: nothing to write)
                  └─ GiveUp("conflicts") after ``max_tries`` decisions

A write that got no answer may have landed (the reply was lost, or the request waited in the
client's buffer and landed late), so its value is remembered; a later read that returns one of
those values means it landed, and the run goes on under its lease. A read that returns
something else after an unanswered write came, most likely, from a replica while no stream
leader answered (an election): back off, so that the tries outlast an election rather than a
burst. A conflict re-decides at once.

``decide`` may raise ``IllegalTransition`` (a programmer error, or a broken variant in the
simulation): it propagates out of the machine, which must not be used afterwards.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gigafactory.schemas import protocol
from gigafactory.schemas.records import JobRecord, decode, encode

MAX_CAS_RETRIES = 10
"""Decisions (and so writes sent) per fenced write before it gives up."""
WRITE_BACKOFF_BASE_S = 0.1
WRITE_BACKOFF_MAX_S = 2.0
"""Upper bound of the pause between tries of a write that got no answer (a conflict retries at
once). The pause is ``uniform(0.5, 1) * min(WRITE_BACKOFF_MAX_S, WRITE_BACKOFF_BASE_S * 2**try)``:
ten tries then span about ten seconds, longer than a JetStream leader election."""


# -- actions: what the machine asks its driver to do ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a compare-and-set of ``data`` on the job's key at revision ``last``; then call
    :meth:`FencedWrite.stored`, :meth:`~FencedWrite.conflict` or :meth:`~FencedWrite.no_answer`."""

    data: Any
    last: int
    attempt: int
    """0-based index of this try within the write."""
    record: JobRecord
    """The record ``data`` encodes (what the run holds if the write lands)."""


@dataclass(frozen=True, slots=True)
class Read:
    """Read the job's record; then call :meth:`FencedWrite.read` (value and revision, or None
    if the key is gone) or :meth:`FencedWrite.read_unanswered`."""


@dataclass(frozen=True, slots=True)
class BackOff:
    """Wait ``delay_s`` seconds, then call :meth:`FencedWrite.backed_off`."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class Done:
    """The write is over and the run still holds its lease."""

    record: JobRecord
    """The record the run now holds (unchanged if nothing was written)."""
    revision: int | None
    """Its revision, or None if ``decide`` had nothing to write (then the run's revision and
    record stay as they were)."""
    outcome: protocol.Outcome | None
    """What ``decide`` returned when it returned an Outcome (for the event to publish)."""
    attempt: int | None
    """Which :class:`Send` landed (its ``attempt``); None if nothing was written."""
    learned: bool = False
    """True if the reply was lost and a read showed that the write had landed."""


@dataclass(frozen=True, slots=True)
class Fenced:
    """The run no longer holds the lease: stop it; its result goes to quarantine."""

    record: JobRecord | None
    """The record that showed it (None if the key is gone)."""
    noticed: bool
    """True if this write found it (the driver stops the run and says so); False if the run had
    been stopped already, by another path, before this write decided."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The write failed without an answer on the lease: the caller keeps its result in the
    outbox, or lets the next renewal try again."""

    reason: str
    """``"conflicts"``: ``max_tries`` decisions, each refused; ``"unanswered"``: a read got no
    answer either (the broker is away)."""


Action = Send | Read | BackOff | Done | Fenced | GiveUp


class WriteState(enum.Enum):
    """Where a :class:`FencedWrite` waits."""

    IDLE = "idle"
    """Not started."""
    SENDING = "sending"
    """A compare-and-set is out: waiting for stored / conflict / no_answer."""
    READING = "reading"
    """A read is out: waiting for read / read_unanswered."""
    BACKING_OFF = "backing_off"
    """Waiting for backed_off."""
    OVER = "over"
    """Done, Fenced or GiveUp was returned; nothing more may be fed in."""


class LeaseProtocolError(AssertionError):
    """The driver fed the machine an event it does not expect in its state (a driver bug)."""


class FencedWrite:
    """One fenced write of one run's job record (see the module's theory of operation).

    ``record`` and ``revision`` are what the run holds; ``decide(record)`` is the pure decision
    (returns a record, an Outcome, or None; raises ``protocol.Fenced``); ``stopped()`` is asked
    before every decision and says the run was stopped meanwhile (fenced or handed back by
    another path); ``jitter()`` draws a float in [0, 1) for back-off (the simulation passes its
    seeded generator); ``encode``/``decode`` turn a record into the bytes the store compares and
    back (the simulation, whose store keeps records, passes identities: equality of records is
    then equality of their encodings); ``max_tries`` bounds the decisions, ``backoff_max_s``
    the back-off after an unanswered write."""

    __slots__ = ("state", "_rec", "_rev", "_decide", "_stopped", "_jitter", "_encode", "_decode", "_max_tries",
                 "_backoff_max_s", "_attempt", "_sent", "_unanswered", "_after_no_answer")

    def __init__(
        self,
        record: JobRecord,
        revision: int,
        decide: Callable[[JobRecord], JobRecord | protocol.Outcome | None],
        *,
        stopped: Callable[[], bool] = lambda: False,
        jitter: Callable[[], float] = random.random,
        encode: Callable[[JobRecord], Any] = encode,
        decode: Callable[[Any], JobRecord] = lambda v: decode(v, JobRecord),
        max_tries: int = MAX_CAS_RETRIES,
        backoff_max_s: float = WRITE_BACKOFF_MAX_S,
    ) -> None:
        assert max_tries >= 1, "a fenced write needs at least one try"
        self.state = WriteState.IDLE
        self._rec, self._rev = record, revision
        self._decide, self._stopped, self._jitter = decide, stopped, jitter
        self._encode, self._decode = encode, decode
        self._max_tries, self._backoff_max_s = max_tries, backoff_max_s
        self._attempt = 0
        self._sent: tuple[Any, JobRecord, protocol.Outcome | None] | None = None
        self._unanswered: list[tuple[Any, JobRecord, protocol.Outcome | None, int]] = []
        """Writes sent without a reply: each may have landed."""
        self._after_no_answer = False

    # -- events fed in by the driver ------------------------------------------------------------------

    def start(self) -> Action:
        """Begin: decide on the record held."""
        self._expect(WriteState.IDLE, "start")
        return self._decide_now()

    def stored(self, revision: int) -> Action:
        """The compare-and-set was stored at ``revision``."""
        self._expect(WriteState.SENDING, "stored")
        assert self._sent is not None
        _, rec, outcome = self._sent
        return self._over(Done(rec, revision, outcome, self._attempt))

    def conflict(self) -> Action:
        """The compare-and-set was refused: the key changed since the revision held."""
        self._expect(WriteState.SENDING, "conflict")
        self._after_no_answer = False
        self.state = WriteState.READING
        return Read()

    def no_answer(self) -> Action:
        """No reply to the compare-and-set (timeout, lost reply, no responders): it may have landed."""
        self._expect(WriteState.SENDING, "no_answer")
        assert self._sent is not None
        data, rec, outcome = self._sent
        self._unanswered.append((data, rec, outcome, self._attempt))
        self._after_no_answer = True
        self.state = WriteState.READING
        return Read()

    def read(self, value: Any | None, revision: int = 0) -> Action:
        """The read returned ``value`` at ``revision``, or None: the key is gone."""
        self._expect(WriteState.READING, "read")
        if value is None:
            return self._over(Fenced(None, noticed=not self._stopped()))
        for data, rec, outcome, attempt in self._unanswered:
            if value == data:  # one of our unanswered writes landed
                return self._over(Done(rec, revision, outcome, attempt, learned=True))
        self._rec, self._rev = self._decode(value), revision
        if self._after_no_answer:
            # No stream answered, yet a read did: a replica (a leader election, say).
            self.state = WriteState.BACKING_OFF
            cap_s = min(self._backoff_max_s, WRITE_BACKOFF_BASE_S * 2 ** self._attempt)
            return BackOff((0.5 + 0.5 * self._jitter()) * cap_s)
        return self._next_try()

    def read_unanswered(self) -> Action:
        """The read got no answer either: the broker is away; give up (the caller keeps its result)."""
        self._expect(WriteState.READING, "read_unanswered")
        return self._over(GiveUp("unanswered"))

    def backed_off(self) -> Action:
        """The back-off is over: decide again on the record last read."""
        self._expect(WriteState.BACKING_OFF, "backed_off")
        return self._next_try()

    # -- decisions -----------------------------------------------------------------------------------

    def _next_try(self) -> Action:
        self._attempt += 1
        if self._attempt >= self._max_tries:
            return self._over(GiveUp("conflicts"))
        return self._decide_now()

    def _decide_now(self) -> Action:
        if self._stopped():
            return self._over(Fenced(self._rec, noticed=False))
        try:
            new = self._decide(self._rec)
        except protocol.Fenced:
            return self._over(Fenced(self._rec, noticed=True))
        if new is None:
            return self._over(Done(self._rec, None, None, None))
        if isinstance(new, protocol.Outcome):
            rec, outcome = new.record, new
        else:
            rec, outcome = new, None
        data = self._encode(rec)
        self._sent = (data, rec, outcome)
        self.state = WriteState.SENDING
        return Send(data, self._rev, self._attempt, rec)

    def _over(self, action: Action) -> Action:
        self.state = WriteState.OVER
        return action

    def _expect(self, state: WriteState, event: str) -> None:
        if self.state is not state:
            raise LeaseProtocolError(f"fenced write: {event} fed in state {self.state.value} "
                                     f"(expected {state.value})")
