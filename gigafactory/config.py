"""Settings shared by the coordinator, the factories and the CLI.

Every timing that the protocol depends on is here, named with its unit, and can be set
from the environment (``GIGAFACTORY_<NAME>``) or the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from gigafactory.procs import pid_alive

ENV_URL = "GIGAFACTORY_NATS_URL"
ENV_HOME = "GIGAFACTORY_HOME"


FENCE_DRIFT_MIN_S = 0.2
"""Fixed part of the self-fencing drift allowance (see ``Settings.fence_drift_allowance_s``)."""
FENCE_DRIFT_RATE = 0.01
"""Part of the allowance proportional to ``lease_ttl_s``."""
FENCE_KILL_GRACE_MIN_S = 0.1
"""The shortest SIGTERM-to-SIGKILL grace a fence margin must leave an engine."""
FENCE_KILL_GRACE_MAX_S = 5.0
"""A fenced engine never gets more than this (the engine's usual kill grace)."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SettingsError(ValueError):
    """A setting whose value is invalid or dangerous; the message names it and what to do."""


def parse_bool(raw: str, name: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case; empty is false). Raises
    :class:`SettingsError` naming ``name`` otherwise."""
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean: use 1/true/yes or 0/false/no")


@dataclass
class Settings:
    lease_ttl_s: float = 15.0
    """A lease not renewed for this long (broker time) is reclaimed by the reaper."""
    lease_renew_s: float = 4.0
    """How often a holder renews its lease; keep well under ``lease_ttl_s``."""
    heartbeat_s: float = 10.0
    """Factory heartbeat period. A factory silent for 3 heartbeats is not counted as live.
    Each heartbeat is one KV write the coordinator reads: 1,000 factories at 10 s are 100
    writes a second. Liveness only steers dispatch (leases expire on their own clock), so
    noticing a dead factory within 30 s is enough; client pings follow it (see
    ``broker.ping_interval_s``)."""
    reaper_interval_s: float = 1.0
    long_poll_s: float = 30.0
    """How long an idle station's pull request waits on the broker before it is renewed.
    With ``heartbeat_s`` this sets the broker traffic of an idle fleet: per factory, one
    heartbeat every ``heartbeat_s`` and, per pool it serves, one pull renewal every
    ``long_poll_s`` (1,000 factories: 100 heartbeats and 33 renewals a second). A waiting
    pull request is answered the moment a job is published, so a longer poll costs no
    dispatch latency; it only bounds how long a request outlives a factory that vanished
    without closing its connection (a dispatch message it took is redelivered after the
    consumer's ack wait, and the coordinator re-publishes after ``redispatch_s``)."""
    redispatch_s: float = 10.0
    """A queued job whose dispatch message went unclaimed this long is published again."""
    poll_backoff_max_s: float = 10.0
    """Upper bound of the jittered back-off while polling (push dispatch down)."""
    dispatch_repair_s: float = 5.0
    """How often the coordinator checks that the dispatch stream and every pool consumer exist,
    and recreates what is missing. With ``poll_backoff_max_s`` it bounds how long factories
    poll after the push path was deleted."""
    reconnect_wait_s: float = 1.0
    reconnect_jitter_s: float = 2.0
    """Reconnects are spread over this window so a thousand factories do not return at once."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, in-flight jobs get this long to finish before they are handed back."""
    request_timeout_s: float = 5.0
    """Bound on every broker request (JetStream API, KV, publish acks)."""
    replicas: int = 1
    """Replicas of every bucket and stream (3 on a 3-node cluster)."""
    sync_interval: str | None = None
    """Embedded broker only: ``always`` fsyncs every write (durable, slower); default is the
    server's (2 minutes), which can lose acknowledged writes on power failure."""
    events_max_age_s: float = 30 * 86400.0

    # -- engine fencing (issue 8): engines never outlive their factory, nor their lease ------
    fence_margin_s: float | None = None
    """Self-fencing margin, seconds. A holder whose last successful lease renewal was *sent*
    (factory's monotonic clock) ``lease_ttl_s - fence_margin_s`` ago stops its engine:
    SIGTERM, then SIGKILL after ``fence_kill_grace_s`` (derived: half of what the margin leaves
    after ``fence_drift_allowance_s``), and quarantines the result, so the engine is dead before
    the reaper may reclaim (``lease_ttl_s`` after the stored write, by broker time). A lock is
    presumed free once its entry is ``lease_ttl_s + fence_margin_s`` old (broker time).
    Default (None): ``min(lease_ttl_s / 3, (lease_ttl_s - lease_renew_s) / 2)``: 5 s with the
    default timings, 0.67 s at ``lease_ttl_s=2, lease_renew_s=0.5``. Too small: an engine may
    still run when its job is reclaimed (refused by :meth:`validate`); too large: a short
    broker outage stops healthy jobs (they are retried)."""
    unsafe_unfenced_engines: bool = False
    """UNSAFE, for the chaos suite's broken-on-purpose variant only
    (``GIGAFACTORY_UNSAFE_UNFENCED_ENGINES=1``): engines run without the supervisor (they
    outlive a killed factory) and without self-fencing (they outlive a lost lease), so a job's
    side effects can happen twice. The factory logs a warning at start when it is on."""

    @property
    def fence_margin_effective_s(self) -> float:
        """``fence_margin_s``, or its default (see there)."""
        if self.fence_margin_s is not None:
            return self.fence_margin_s
        return min(self.lease_ttl_s / 3, (self.lease_ttl_s - self.lease_renew_s) / 2)

    @property
    def fence_drift_allowance_s(self) -> float:
        """Part of the margin kept for what is not the kill grace: the reaper's estimate of
        broker time (clock offset measured over a round trip), the rate drift between clocks
        (1% of the TTL is far above any real oscillator) and scheduling delays."""
        return FENCE_DRIFT_MIN_S + self.lease_ttl_s * FENCE_DRIFT_RATE

    @property
    def fence_kill_grace_s(self) -> float:
        """SIGTERM to SIGKILL when a deadline stops an engine: half of what the margin leaves
        after the drift allowance (the other half is slack for a loaded machine: the SIGKILL
        lands ``fence_margin_s - fence_kill_grace_s`` before the lease can be reclaimed), at
        most ``FENCE_KILL_GRACE_MAX_S``."""
        return min(FENCE_KILL_GRACE_MAX_S, (self.fence_margin_effective_s - self.fence_drift_allowance_s) / 2)

    def validate(self) -> "Settings":
        """Refuse settings under which a lease holder could not fence itself in time; returns
        self. Raises :class:`SettingsError` naming the setting and what to do."""
        ttl, renew, margin = self.lease_ttl_s, self.lease_renew_s, self.fence_margin_effective_s
        if not ttl > 0 or not renew > 0:
            raise SettingsError("GIGAFACTORY_LEASE_TTL_S and GIGAFACTORY_LEASE_RENEW_S must be positive "
                                f"(got lease_ttl_s={ttl!r}, lease_renew_s={renew!r})")
        if self.unsafe_unfenced_engines:
            return self
        need = 2 * FENCE_KILL_GRACE_MIN_S + self.fence_drift_allowance_s
        if not margin >= need:
            raise SettingsError(
                f"fence_margin_s={margin:g} (GIGAFACTORY_FENCE_MARGIN_S) is too small: it must cover a kill "
                f"grace of at least {FENCE_KILL_GRACE_MIN_S:g} s, as much slack again, and "
                f"{self.fence_drift_allowance_s:g} s of clock drift allowance (with lease_ttl_s={ttl:g}): "
                f"set it to {need:g} or more")
        if not ttl - margin > renew:
            raise SettingsError(
                f"fence_margin_s={margin:g} (GIGAFACTORY_FENCE_MARGIN_S) leaves lease_ttl_s - fence_margin_s = "
                f"{ttl - margin:g} s, not more than lease_renew_s={renew:g}: a holder would fence itself before "
                "its first renewal. Lower the margin or lease_renew_s, or raise lease_ttl_s")
        return self

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        s = cls()
        for f in fields(cls):
            raw = env.get(f"GIGAFACTORY_{f.name.upper()}")
            if raw is None:
                continue
            typ = str(f.type)
            if f.name == "sync_interval":
                setattr(s, f.name, raw or None)
            elif typ == "bool":
                setattr(s, f.name, parse_bool(raw, f"GIGAFACTORY_{f.name.upper()}"))
            elif typ.endswith("| None") and not raw.strip():
                setattr(s, f.name, None)
            elif typ == "int":
                setattr(s, f.name, int(raw))
            else:
                setattr(s, f.name, float(raw))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s


def home() -> Path:
    """Where local state lives: the embedded broker's store, factory outboxes and work dirs."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".gigafactory")


def server_state_path() -> Path:
    return home() / "server.json"


def write_server_state(url: str, pid: int) -> None:
    p = server_state_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": pid}))
    tmp.replace(p)


def clear_server_state(pid: int) -> None:
    p = server_state_path()
    try:
        if json.loads(p.read_text()).get("pid") == pid:
            p.unlink()
    except (OSError, ValueError):
        pass


def running_embedded_url() -> str | None:
    """The URL of an embedded broker started by ``gigafactory up``/``server`` on this machine."""
    try:
        state = json.loads(server_state_path().read_text())
    except (OSError, ValueError):
        return None
    if state.get("pid") and pid_alive(int(state["pid"])):
        return state.get("url")
    return None


def resolve_url(flag: str | None) -> str | None:
    """``--nats`` wins, then ``GIGAFACTORY_NATS_URL``, then a running embedded broker; None
    means there is none and the caller decides whether to start one."""
    return flag or os.environ.get(ENV_URL) or running_embedded_url()
