"""When an idle factory's one timer fires, and what it sends then: a heartbeat, a ping, or
both in one write. Pure (no I/O, no clock of its own): the heartbeat loop in
:mod:`gigafactory.factory.agent` feeds it the monotonic time.

Heartbeats come every ``beat_s``, pings every ``ping_s`` (see ``broker.ping_interval_s``);
both schedules start at the same instant and advance by whole periods, so at equal periods
(the defaults) every heartbeat carries a ping, and at a multiple (heartbeat 7 s, ping 14 s)
every other one does. A ping due less than a quarter of the shorter period after a tick is
sent at that tick (early, never late), so two schedules that drift apart by rounding still
share their writes."""

from __future__ import annotations

from dataclasses import dataclass, field

COALESCE_SHARE = 0.25
"""A ping or heartbeat due within this share of the shorter period is sent at the current tick."""


@dataclass(slots=True)
class BeatPlan:
    """The two schedules.

    :param beat_s: the heartbeat period, seconds (> 0).
    :param ping_s: the ping period, seconds (> 0).
    :param start_s: the monotonic time both schedules start from."""

    beat_s: float
    ping_s: float
    start_s: float
    next_beat_s: float = field(init=False)
    next_ping_s: float = field(init=False)

    def __post_init__(self) -> None:
        assert self.beat_s > 0 and self.ping_s > 0, (self.beat_s, self.ping_s)
        self.next_beat_s = self.start_s + self.beat_s
        self.next_ping_s = self.start_s + self.ping_s

    @property
    def slack_s(self) -> float:
        return COALESCE_SHARE * min(self.beat_s, self.ping_s)

    def sleep_s(self, now_s: float) -> float:
        """How long to sleep from ``now_s`` until the next tick (0: one is due)."""
        return max(0.0, min(self.next_beat_s, self.next_ping_s) - now_s)

    def due(self, now_s: float) -> tuple[bool, bool]:
        """At a tick at ``now_s``: (send a heartbeat, send a ping); advances each schedule that
        is due by whole periods past ``now_s`` (ticks missed by a stalled loop are not made up)."""
        horizon_s = now_s + self.slack_s
        beat, ping = self.next_beat_s <= horizon_s, self.next_ping_s <= horizon_s
        while self.next_beat_s <= horizon_s:
            self.next_beat_s += self.beat_s
        while self.next_ping_s <= horizon_s:
            self.next_ping_s += self.ping_s
        return beat, ping
