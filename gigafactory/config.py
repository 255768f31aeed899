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

    # -- services: waiting for the broker at start (issue 8, section 6) --------------------
    connect_timeout_s: float = 0.0
    """How long a factory, a coordinator or ``up`` waits at start for its broker to answer
    (and a factory with no URL configured, for an embedded broker on this machine to appear),
    in seconds; 0 (the default) waits forever, as a service started by systemd or compose
    before its broker should. Each try is bounded on its own; the log says what it waits for.
    Risk of 0: a wrong URL waits forever instead of failing (the log names the URL)."""
    connect_backoff_max_s: float = 10.0
    """Longest pause, in seconds, between two tries while waiting for the broker at start (the
    pause doubles from 0.1 s, each one jittered down by up to half, so a fleet started together
    does not try together). Larger: a slower start once the broker is up; smaller: more tries."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        s = cls()
        for f in fields(cls):
            raw = env.get(f"GIGAFACTORY_{f.name.upper()}")
            if raw is None:
                continue
            typ = type(getattr(s, f.name))
            if f.name == "sync_interval":
                setattr(s, f.name, raw or None)
            elif typ is int:
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
