"""Idle accounting: every station, every second, has a class (no dark idle).

A station's class is ``busy`` while it runs a job, else its idle reason
(:class:`~gigafactory.schemas.records.IdleReason`). A factory says each change on
``GF_EVENTS``, in the job's own events where there is one, so that a station taking job after
job costs no event of its own:

- ``claimed`` (``data.station``): the station is ``busy`` from then;
- a run's end event (``finished``, a drained ``handed_back``: :data:`RUN_END_KINDS`) carries
  ``data.station`` and ``data.station_class``, the class the station takes once released;
- a ``station`` event (``gf.events._fleet.station``, ``data.class``) for every other change:
  the first class at start (``starting``), the idle reason changing while idle, ``waiting-merge``
  and back to ``busy``, a release whose class differs from what the end event said (or whose
  run's end event said none: a lock held elsewhere, a fenced run).

Records written by an older factory (a ``station`` event for every change, ``busy`` too, and
end events with no ``station_class``) give the same intervals: a transition to the class a
station already has changes nothing. The events stream is durable and bounded
(``events_max_age_s``, ``events_max_bytes``), so these figures survive a restart of anything
and reach back as far as the stream keeps events.

This module turns those transitions into intervals and figures, without I/O
(:func:`intervals`, :func:`summarise`); :func:`read_station_events` is the thin reader.

- **Idle classification coverage** = classified non-working seconds / non-working seconds. A
  second is classified when its class is one of :data:`CLASSES`' keys; an event with no class
  or an unknown one (an older factory, a bug) counts as unclassified. The floor is 100%.
- **Sustained logical lane allocation** = busy station-seconds / available station-seconds
  (every second a station of a live factory exists). The seed's floor is 50%.

An interval starts at a station's transition and ends at that station's next transition to
another class, at its factory's ``factory_down`` (or next ``factory_up``: a factory that died
without saying so restarts), or at the end of the window. Time before a station's first
transition in the window is not counted (nothing is known about it). Transitions are ordered
by their ``at`` (the factory's clock when it queued the event), not by stream order: a
factory's events of different jobs may be stored out of the order it queued them.

A station's busy interval ends at its run's end event, where it ended at the release (after
the worktree's removal) when the release said it: the time a finished run still holds its
station cleaning up counts under the class it goes to.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

BUSY = "busy"
"""The class of a working station."""

CLASSES: dict[str, str] = {
    "no-work": "no-work",
    "draining": "draining",
    "broker-down": "broker-down",
    "dispatch-down": "dispatch-down",
    "seat-limit": "seat-limit",
    "waiting-hosted": "waiting-hosted",
    "waiting-merge": "waiting-merge",
    "policy-paused": "policy-paused",
    "blocked": "blocked",
    "lock-wait": "blocked",
    "prewarm": "prewarm",
    "starting": "prewarm",
    "operator-steering": "operator-steering",
}
"""Idle reason -> the class it is reported under. The seed's six classes (``waiting-hosted``,
``waiting-merge``, ``policy-paused``, ``blocked``, ``prewarm``, ``operator-steering``) plus
what the fleet itself knows (``no-work``, ``draining``, ``broker-down``, ``dispatch-down``,
``seat-limit``); ``lock-wait`` is a kind of ``blocked``, ``starting`` a kind of ``prewarm``."""

UNCLASSIFIED = "unclassified"

RUN_END_KINDS = ("finished", "handed_back")
"""The job events that may say (``data.station_class``) the class a run's station goes to."""

STATION_KINDS = ("claimed", *RUN_END_KINDS)
"""The job events :func:`transitions_from_events` reads a station's class from."""

LANE_ALLOCATION_FLOOR = 0.5
"""The seed's floor for sustained logical lane allocation."""

MAX_EVENTS = 1_000_000
"""At most this many station events are read for one report (:class:`TooManyEvents`)."""


class TooManyEvents(Exception):
    """The window holds more station events than :data:`MAX_EVENTS`: narrow ``--since``."""


@dataclasses.dataclass(frozen=True)
class Transition:
    """One station event: station ``(factory, index)`` has class ``cls`` from ``at_s`` on.
    ``cls`` None: the factory is gone (``factory_down``), or came back (``factory_up``) and
    the station's earlier interval ends there."""

    at_s: float
    factory: str
    station: int | None
    cls: str | None


@dataclasses.dataclass(frozen=True)
class Interval:
    factory: str
    station: int
    cls: str
    """``busy``, a class of :data:`CLASSES`' values, or ``unclassified``."""
    reason: str
    """The idle reason as the factory said it (``lock-wait``, ``seat-limit``, ...)."""
    start_s: float
    end_s: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end_s - self.start_s)


def classify(reason: str | None) -> str:
    """The class of a station event's ``reason`` (``busy``, a class, or ``unclassified``)."""
    if reason == BUSY:
        return BUSY
    return CLASSES.get(reason or "", UNCLASSIFIED)


def transitions_from_events(events: Iterable[dict]) -> list[Transition]:
    """The transitions in decoded ``GF_EVENTS`` entries: ``station`` (its ``data.class``),
    ``claimed`` (``busy``), an end event of :data:`RUN_END_KINDS` that carries
    ``data.station_class``, ``factory_up`` and ``factory_down``; others (and an end event
    without ``station_class``: an older factory's, whose ``station`` event says the class) are
    ignored. An event must name its factory and a numeric ``at``; a station event its
    ``data.station`` (an int)."""
    out = []
    for ev in events:
        kind, fid, at = ev.get("kind"), ev.get("factory"), ev.get("at")
        if not fid or not isinstance(at, (int, float)) or isinstance(at, bool):
            continue
        if kind in ("factory_down", "factory_up"):
            out.append(Transition(float(at), fid, None, None))
            continue
        d = ev.get("data")
        idx = d.get("station") if isinstance(d, dict) else None
        if not isinstance(idx, int) or isinstance(idx, bool):
            continue
        if kind == "station":
            out.append(Transition(float(at), fid, idx, d.get("class")))
        elif kind == "claimed":
            out.append(Transition(float(at), fid, idx, BUSY))
        elif kind in RUN_END_KINDS and "station_class" in d:
            out.append(Transition(float(at), fid, idx, d.get("station_class")))
    return out


def intervals(transitions: Iterable[Transition], since_s: float, until_s: float) -> list[Interval]:
    """Each station's class intervals, clipped to ``[since_s, until_s]``.

    :param transitions: station events (any order; sorted here by time, stable).
    :param since_s: window start (epoch seconds).
    :param until_s: window end; an interval still open ends here.
    """
    open_: dict[tuple[str, int], tuple[float, str]] = {}
    out: list[Interval] = []

    def close(key: tuple[str, int], at_s: float) -> None:
        start, reason = open_.pop(key)
        lo, hi = max(start, since_s), min(at_s, until_s)
        if hi > lo:
            out.append(Interval(key[0], key[1], classify(reason), reason, lo, hi))

    for t in sorted(transitions, key=lambda t: t.at_s):
        if t.at_s > until_s:
            break
        if t.station is None:  # the factory went away or restarted: its stations' intervals end
            for key in [k for k in open_ if k[0] == t.factory]:
                close(key, t.at_s)
            continue
        key = (t.factory, t.station)
        if key in open_:
            if open_[key][1] == (t.cls or ""):
                # The class it has (an older factory's ``station`` busy beside its ``claimed``).
                continue
            close(key, t.at_s)
        open_[key] = (t.at_s, t.cls or "")
    for key in list(open_):
        close(key, until_s)
    return out


@dataclasses.dataclass
class IdleSummary:
    """The figures of a window. Seconds are station-seconds."""

    available_s: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    classified_s: float = 0.0
    by_class_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """class -> idle seconds (``unclassified`` included when there are any)."""
    by_reason_s: dict[str, float] = dataclasses.field(default_factory=dict)
    stations: int = 0

    @property
    def coverage(self) -> float:
        """Idle classification coverage (1.0 when nothing was idle: nothing is dark)."""
        return self.classified_s / self.idle_s if self.idle_s > 0 else 1.0

    @property
    def lane_allocation(self) -> float:
        """Busy station-seconds over available station-seconds (0 when nothing was available)."""
        return self.busy_s / self.available_s if self.available_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"available_s": round(self.available_s, 3), "busy_s": round(self.busy_s, 3),
                "idle_s": round(self.idle_s, 3), "classified_s": round(self.classified_s, 3),
                "idle_coverage": round(self.coverage, 6), "lane_allocation": round(self.lane_allocation, 6),
                "lane_allocation_floor": LANE_ALLOCATION_FLOOR, "stations": self.stations,
                "by_class_s": {k: round(v, 3) for k, v in sorted(self.by_class_s.items())},
                "by_reason_s": {k: round(v, 3) for k, v in sorted(self.by_reason_s.items())}}


def summarise(ivs: Iterable[Interval], by: str | None = None) -> dict[str, IdleSummary]:
    """The figures of ``ivs``, all together (key ``""``) or grouped ``by`` ``factory`` or
    ``station`` (``factory/index``).

    :param ivs: intervals from :func:`intervals`.
    :param by: None, ``factory`` or ``station``.
    """
    if by not in (None, "factory", "station"):
        raise ValueError(f"--by {by!r}: choose factory or station")
    out: dict[str, IdleSummary] = defaultdict(IdleSummary)
    seen: dict[str, set] = defaultdict(set)
    for iv in ivs:
        key = "" if by is None else iv.factory if by == "factory" else f"{iv.factory}/{iv.station}"
        s = out[key]
        seen[key].add((iv.factory, iv.station))
        s.available_s += iv.seconds
        if iv.cls == BUSY:
            s.busy_s += iv.seconds
            continue
        s.idle_s += iv.seconds
        s.by_class_s[iv.cls] = s.by_class_s.get(iv.cls, 0.0) + iv.seconds
        s.by_reason_s[iv.reason or UNCLASSIFIED] = s.by_reason_s.get(iv.reason or UNCLASSIFIED, 0.0) + iv.seconds
        if iv.cls != UNCLASSIFIED:
            s.classified_s += iv.seconds
    for key, s in out.items():
        s.stations = len(seen[key])
    if by is None and "" not in out:
        out[""] = IdleSummary()
    return dict(out)


async def read_station_events(broker, since_s: float | None, until_s: float | None = None,
                              limit: int = MAX_EVENTS) -> list[dict]:
    """The events from ``GF_EVENTS`` that say a station's class (``station``, ``factory_up``,
    ``factory_down``, and the jobs' :data:`STATION_KINDS`) stored at or after ``since_s``
    (None: all kept), oldest first.

    :param broker: an open :class:`~gigafactory.broker.Broker`.
    :param since_s: epoch seconds (the broker's stamp of each message decides).
    :param until_s: stop at the first event after this (None: read to the end).
    :param limit: raise :class:`TooManyEvents` past this many events.
    """
    from .streams import read_stream_since
    from gigafactory.schemas import names

    subjects = [names.fleet_events_subject(k) for k in ("station", "factory_up", "factory_down")]
    subjects += [names.events_subject("*", k) for k in STATION_KINDS]
    return await read_stream_since(broker, names.EVENTS_STREAM, subjects, since_s, until_s, limit,
                                   on_limit=TooManyEvents)
