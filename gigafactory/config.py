"""Settings shared by the coordinator, the factories and the CLI.

Every timing that the protocol depends on is here, named with its unit. A setting comes from,
each later one winning: its default, the config file (``gigafactory.toml``: ``--config``,
``GIGAFACTORY_CONFIG``, or in ``GIGAFACTORY_HOME``), the environment (``GIGAFACTORY_<NAME>``),
the command line. Every value read is checked against its type and bounds
(:meth:`Settings.from_env`); :meth:`Settings.validate` adds the rules between settings.
docs/operations.md lists them all (generated from the docstrings below).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, field

from gigafactory.osproc import create_time, pid_alive
from gigafactory.schemas import limits
from gigafactory.schemas.scope import validate_globs

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


HOUR_S = 3600.0
"""The longest a protocol timing (lease, renewal, heartbeat, poll) may be: past it a dead
factory's work or a lost message waits longer than any operator would."""
DAY_S = 86_400.0
DISPATCH_RECORD_MAX_BYTES_CEILING = 512 * 1024
"""Most ``dispatch_record_max_bytes`` may be: half the broker's default max payload (1 MiB)."""


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


class Settings(msgspec.Struct):
    """Every setting: ``name: type = default`` and a docstring (what it does, its unit, what it
    risks). A type may carry bounds (``Annotated[float, Meta(gt=0, le=3600)]``), checked with the
    type wherever a value comes from (:meth:`from_env`, :meth:`validate`); rules that involve two
    settings are ``check_<concern>(s)`` functions called from :meth:`validate`. Constructing one
    in code (``Settings(lease_ttl_s=2.0)``) checks only what ``__post_init__`` checks: call
    :meth:`validate` before relying on it."""

    lease_ttl_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 15.0
    """A lease not renewed for this long (broker time) is reclaimed by the reaper, in seconds
    (at most an hour). Too short: a holder on a loaded machine or a slow link loses jobs it is
    running (they are retried); too long: a dead factory's jobs wait this long to be reclaimed."""
    lease_renew_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 4.0
    """How often a holder renews its lease, in seconds; at most half of ``lease_ttl_s`` (so a
    slow or lost renewal is retried before the lease can lapse), and a renewal must come before
    the holder's self-fencing deadline (``fence_margin_s``)."""
    heartbeat_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 20.0
    """Factory heartbeat period, seconds. A factory silent for 3 heartbeats is not counted as
    live. Each heartbeat is one KV write (a plain publish) that the coordinator reads: 1,000
    factories at 20 s are 50 writes a second, the largest part of an idle fleet's cost on
    both sides (issue 14: it was 10 s). Liveness only steers dispatch (leases expire on their
    own clock, and a pull request reaches only a live factory), so noticing a dead factory
    within a minute is enough. What a longer period risks: a dead factory counted live longer
    (a minute at 20 s), and so in ``factories``/``top`` and in the capacity the scheduler plans
    with; a changed capability or withdrawn engine published up to one period later. Client
    pings follow it, at most every 20 s whatever the period (see ``broker.ping_interval_s``),
    and so does the halt watch's heartbeat (``factory.halting.watch_heartbeat_s``)."""
    reaper_interval_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 1.0
    """How often a coordinator's reaper looks for expired leases, in seconds. An expired lease
    waits up to this long past ``lease_ttl_s`` to be reclaimed; each pass reads the job view
    (no broker write unless it reclaims)."""
    long_poll_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 30.0
    """How long an idle station's pull request waits on the broker before it is renewed.
    With ``heartbeat_s`` this sets the broker traffic of an idle fleet: per factory, one
    heartbeat every ``heartbeat_s`` and, per pool it serves, one pull renewal every
    ``long_poll_s`` (1,000 factories: 50 heartbeats and 33 renewals a second; see
    ``factory.agent.idle_traffic_model``). A waiting
    pull request is answered the moment a job is published, so a longer poll costs no
    dispatch latency; it only bounds how long a request outlives a factory that vanished
    without closing its connection (a dispatch message it took is redelivered after the
    consumer's ack wait, and the coordinator re-publishes after ``redispatch_s``)."""
    redispatch_s: Annotated[float, Meta(gt=0, le=DAY_S)] = 10.0
    """A queued job whose dispatch message went unclaimed this long (seconds) is published
    again. Too short: duplicate dispatch messages (harmless, but broker traffic)."""
    poll_backoff_max_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 10.0
    """Upper bound of the jittered back-off while polling (push dispatch down), seconds."""
    dispatch_repair_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 5.0
    """How often the coordinator checks that the dispatch stream and every pool consumer exist,
    and recreates what is missing. With ``poll_backoff_max_s`` it bounds how long factories
    poll after the push path was deleted."""
    reconnect_wait_s: Annotated[float, Meta(ge=0, le=600)] = 1.0
    """Pause before each reconnect to the broker after a lost connection, seconds (plus
    ``reconnect_jitter_s``)."""
    reconnect_jitter_s: Annotated[float, Meta(ge=0, le=600)] = 2.0
    """Reconnects are spread over this window (seconds) so a thousand factories do not return
    at once."""
    drain_timeout_s: Annotated[float, Meta(ge=0, le=DAY_S)] = 30.0
    """On SIGTERM, in-flight jobs get this long (seconds) to finish before they are handed back.
    A supervisor (systemd, compose) must wait longer than this before SIGKILL."""
    request_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 5.0
    """Bound on every broker request (JetStream API, KV, publish acks), seconds."""
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    """Replicas of every bucket and stream (3 on a 3-node cluster). Raising it on a layout
    that exists migrates every bucket and stream up (where the server can: a cluster with
    that many nodes) or refuses to start with the bucket named; it is never lowered
    automatically (see ``broker.ReplicasError``)."""
    sync_interval: str | None = "always"
    """Embedded broker only: when nats-server fsyncs its store. ``always`` (the default)
    fsyncs every write before acknowledging it, so an acknowledged submission or revision
    survives an OS crash or power loss (about 3x the write latency of the alternative:
    measured 0.9 ms instead of 0.3 ms per KV put on a VM disk). A Go duration (``2m`` is
    nats-server's own default, ``30s``...) or None (the server's default) is an explicit
    opt-in to background fsync: faster, but an OS crash or power loss loses the writes of
    the last interval although they were acknowledged, and rolls revisions back, so a job
    can be lost, or an epoch handed out twice. A process crash (kill -9 of nats-server)
    loses nothing either way. Validated (:func:`check_sync_interval`)."""
    events_max_age_s: Annotated[float, Meta(gt=0)] = 30 * 86400.0
    """Audit events older than this (seconds) are dropped by the broker (``GF_EVENTS``'s age
    limit; see also ``events_max_bytes``)."""

    # -- profiles (issue 9, "Profiles and personas"; owner: profiles) ---------------------------
    profiles_dir: str | None = None
    """A folder of the operator's own profiles (``<name>.md``), read by the coordinator at
    submit in addition to the shipped catalog; a profile there of a shipped name replaces it.
    None (default): the shipped catalog only. An invalid file in it refuses every submission
    that names a profile (naming the file), never silently drops the profile."""

    # -- intake limits (issue 8, section 3; owner: intake) ------------------------------------
    # Every refusal names the setting and its variable. Defaults fit the embedded broker's
    # 1 MiB max payload; the record check below reads the real max payload from the server.
    max_job_file_bytes: Annotated[int, Meta(ge=1)] = limits.MAX_JOB_FILE_BYTES
    """Largest job file, in UTF-8 bytes (default 512 KiB), refused by ``gigafactory submit``
    before sending and by the inbox before reading. Raising it past the broker's max payload
    only moves the refusal to the record check."""
    max_manifest_bytes: Annotated[int, Meta(ge=1)] = limits.MAX_MANIFEST_BYTES
    """Largest front matter, in UTF-8 bytes (default 64 KiB), also counted with every YAML alias
    written out: an alias repeated thousands of times would otherwise expand to gigabytes."""
    max_manifest_depth: Annotated[int, Meta(ge=1, le=limits.DEPTH_CEILING)] = limits.MAX_MANIFEST_DEPTH
    """Deepest YAML nesting in a front matter (default 16; a valid manifest needs 3). Checked
    while parsing; at most 200, because the parser recurses once per level."""
    max_body_bytes: Annotated[int, Meta(ge=1)] = limits.MAX_BODY_BYTES
    """Largest prompt or script (everything after the front matter), in UTF-8 bytes (default
    384 KiB): the body is stored in the job record and read by every factory that claims it."""
    max_deps: Annotated[int, Meta(ge=1)] = limits.MAX_DEPS
    """Most entries in a job's ``deps`` (default 1,000). Each is read at intake and whenever
    the job is checked for unblocking; a job needing more should depend on composite jobs."""
    max_key_chars: Annotated[int, Meta(ge=1)] = limits.MAX_KEY_CHARS
    """Longest ``idempotency-key``, ``lock`` or ``deps`` entry, in characters (default 256):
    keys become KV keys, escaped to up to 8 characters each."""
    max_reason_chars: Annotated[int, Meta(ge=1)] = limits.MAX_REASON_CHARS
    """Longest reason stored on a job record (default 2,000 characters): an operator's cancel
    reason is refused past it; a generated one ("waiting for a, b, ...") is cut, saying so."""
    max_batch_files: Annotated[int, Meta(ge=1)] = limits.MAX_BATCH_FILES
    """Most files in one submission (default 1,000): one ``submit`` call, one inbox batch (the
    inbox leaves the rest for its next scan)."""
    max_batch_bytes: Annotated[int, Meta(ge=1)] = limits.MAX_BATCH_BYTES
    """Most bytes the inbox reads into one batch (default 16 MiB); later files wait for the
    next scan. Bounds the coordinator's memory while a large drop is submitted."""
    record_headroom_bytes: Annotated[int, Meta(ge=1)] = limits.RECORD_HEADROOM_BYTES
    """Room a new job record must leave under the broker's max payload (default 64 KiB) for what
    the protocol adds later (lease, up to 20 attempts with their results, reasons). A record
    without it could be stored but never claimed (a claim that grows it past the max payload
    fails) and would be redispatched forever. At least 4 x ``max_reason_chars``."""
    inbox_retry_max_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 60.0
    """Longest pause before the inbox retries a batch that failed for a passing reason (the
    broker not answering); the pause doubles from 0.5 s up to this, jittered. Files stay in
    the inbox meanwhile: a passing failure never rejects a file."""
    inbox_max_failures: Annotated[int, Meta(ge=1)] = 5
    """Unexpected failures (neither a refusal nor the broker being away) after which the inbox
    moves a file to ``.rejected/`` with the last error, so one file that keeps breaking intake
    cannot hold the others back."""

    # -- run log uploads (one bad record / one big log must not stall everyone) -----------------
    log_upload_max_bytes: Annotated[int, Meta(ge=LOG_UPLOAD_MIN_BYTES)] = 32 * 1024 * 1024
    """Bytes of one attempt's log stored in ``gf_artifacts`` (at least 64 KiB). A longer log is
    stored as its first quarter and its last three quarters with a marker line between that
    says how many bytes were dropped; the whole log stays on the factory's disk. Bounds what
    one flooding engine costs the object store; too small a cap hides the middle of long logs."""
    log_upload_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    """Longest a log upload may take (each chunk is bounded by ``request_timeout_s`` too). The
    lease is renewed throughout, so a slow upload does not lose it; past this bound the result
    is written without the log (its detail says where the log is). Too short loses logs on a
    slow link; too long keeps a finished job's station and lease for that long."""

    # -- durability and retention (issue 8 section 5; coordinator/retention.py) -------------
    # Every stream that grows with the work done has a byte cap and an age limit, so a fleet
    # runs for months on a bounded disk: at the defaults about 14 GiB per replica
    # (events 2 + artifacts 10 + archive 2) plus the live job records (every job not yet
    # archived: at most ``archive_after_s`` of finished work).
    events_max_bytes: Annotated[int, Meta(ge=1)] = 2 * 1024**3
    """Byte cap of the ``GF_EVENTS`` audit stream (per replica). The oldest events are dropped
    when it is reached (as they are after ``events_max_age_s``); a ``retention_warning``
    event goes out at ``retention_warn_ratio`` of it. Risk: a cap too small for the event
    rate drops audit history sooner than ``events_max_age_s``."""
    artifacts_max_bytes: Annotated[int, Meta(ge=1)] = 10 * 1024**3
    """Byte cap of the ``gf_artifacts`` object store (run logs; per replica). At the cap
    uploads are refused (the store never drops an object halfway), so new logs are lost
    until old ones age out: the ``retention_warning`` event at ``retention_warn_ratio`` is
    the time to raise it."""
    artifacts_max_age_s: Annotated[float, Meta(gt=0)] = 30 * 86400.0
    """Run logs older than this are deleted by the broker."""
    archive_after_s: Annotated[float, Meta(ge=RETENTION_MIN_S)] = 7 * 86400.0
    """A ``shipped``, ``failed`` or ``dead_letter`` job whose record has not changed for this
    long (broker time) is moved from ``gf_jobs`` to ``gf_archive`` (without its body; its
    content hash stays), and leaves the coordinators' memory. Its dependents, its
    idempotency key and ``status`` still find it there. A job that still has an unfinished
    dependent is kept. Minimum 60 s. Risk: a short one makes ``gigafactory jobs`` forget
    finished work sooner (``status <job>`` still reads the archive)."""
    archive_max_bytes: Annotated[int, Meta(ge=1)] = 2 * 1024**3
    """Byte cap of ``gf_archive`` (per replica). At the cap nothing more is archived (jobs
    stay in ``gf_jobs``, nothing is lost) and ``retention_warning`` events say so."""
    archive_max_age_s: Annotated[float, Meta(gt=0)] = 365 * 86400.0
    """Archived records older than this are deleted by the broker; after that a dependency
    on the job, or its idempotency key, is unknown again."""
    pool_idle_gc_s: Annotated[float, Meta(ge=RETENTION_MIN_S)] = 86400.0
    """A dispatch pool with no unfinished job and no live factory bound to it for this long
    (as one coordinator sees it) is deleted: its durable consumer and its ``gf_pools``
    entry. A later job for the same requirements creates it again. Minimum 60 s."""
    factory_forget_s: Annotated[float, Meta(ge=RETENTION_MIN_S)] = 7 * 86400.0
    """A ``gf_factories`` record not written (no heartbeat) for this long (broker time) is
    deleted: a factory killed without draining leaves its record behind, and a fleet that
    replaces machines would otherwise keep every one it ever had. A factory that comes back
    registers again. Minimum 60 s."""
    clock_skew_warn_s: Annotated[float, Meta(gt=0)] = 0.5
    """The reaper judges a lease with the clock of the job bucket's leader, the clock that
    stamped it, except after a leader change: then the new leader's clock reads the old
    leader's stamps, and a lease can expire early (or late) by the skew between the two.
    Each retention pass measures the broker nodes' clocks (through the leaders of the
    layout's streams) and sends a ``clock_skew`` event when two differ by more than this.
    Keep it well under ``lease_ttl_s`` and the holders' self-fencing margin; run NTP on the
    broker nodes."""
    retention_interval_s: Annotated[float, Meta(gt=0)] = 60.0
    """How often a coordinator runs the retention pass (archive, pool GC, cap warnings)."""
    retention_warn_ratio: Annotated[float, Meta(gt=0, lt=1)] = 0.8
    """A ``retention_warning`` event (and a log warning) when a capped stream holds more than
    this share of its byte cap; repeated at most hourly while it stays above."""
    retention_batch: Annotated[int, Meta(ge=1)] = 500
    """Most jobs archived (and pools deleted) by one retention pass: bounds the pass's
    broker traffic when a backlog of old jobs is first archived."""

    # -- services: waiting for the broker at start (issue 8, section 6) --------------------
    connect_timeout_s: Annotated[float, Meta(ge=0)] = 0.0
    """How long a factory, a coordinator or ``up`` waits at start for its broker to answer
    (and a factory with no URL configured, for an embedded broker on this machine to appear),
    in seconds; 0 (the default) waits forever, as a service started by systemd or compose
    before its broker should. Each try is bounded on its own; the log says what it waits for.
    Risk of 0: a wrong URL waits forever instead of failing (the log names the URL)."""
    connect_backoff_max_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 10.0
    """Longest pause, in seconds, between two tries while waiting for the broker at start (the
    pause doubles from 0.1 s, each one jittered down by up to half, so a fleet started together
    does not try together). Larger: a slower start once the broker is up; smaller: more tries."""

    # -- engine fencing (issue 8): engines never outlive their factory, nor their lease ------
    fence_margin_s: Annotated[float, Meta(gt=0)] | None = None
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
    # -- engine environment (issue 9): engines get only the variables they need ---------------
    engine_env_passthrough: str = ""
    """Comma-separated names of further environment variables of the factory that engines get
    (``GIGAFACTORY_ENGINE_ENV_PASSTHROUGH=NPM_TOKEN,PIP_INDEX_URL``). By default an engine gets
    only ``PATH``, ``HOME``, the locale, ``TERM``, ``TZ``, the proxy and CA variables, the
    ``GF_*`` variables and the credentials of the ``cred:`` capabilities its job requires; every
    name listed here reaches every job's engine on this factory, secrets included."""
    unsafe_unfenced_engines: bool = False
    """UNSAFE, for the chaos suite's broken-on-purpose variant only
    (``GIGAFACTORY_UNSAFE_UNFENCED_ENGINES=1``): engines run without the supervisor (they
    outlive a killed factory) and without self-fencing (they outlive a lost lease), so a job's
    side effects can happen twice. The factory logs a warning at start when it is on."""
    # -- declared engines (issue 9; owner: declared): agent CLIs added without Python ---------
    engines_dir: str | None = None
    """Folder of engine declarations (``GIGAFACTORY_ENGINES_DIR``): each ``<name>.yaml``,
    ``.yml`` or ``.toml`` file declares an agent CLI the factory runs as engine ``<name>``
    (:mod:`gigafactory.factory.engines.declared`; at most 64 files of 64 KiB). Read when a
    factory starts (and by ``gigafactory logs --follow``). None (the default): no declared
    engines. A file that is not a valid declaration is logged and skipped, never fatal; a
    declaration runs the program it names with the job's prompt and the credentials it declares,
    so this folder must be writable only by the operator."""

    # -- the git workspace (issue 10): mirrors, worktrees, commit, fenced push -----------------
    git_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    """Bound of each git call a factory makes for a ``repo`` job (clone, fetch, worktree, commit,
    diff), seconds; a push is bounded by the smaller of this and the lease left after its fence.
    A call past it is killed and the attempt fails (``setup_failed`` before the engine, ``crash``
    after). Too small: a first clone of a large repository never completes."""
    git_mirrors_max_bytes: Annotated[int, Meta(ge=0)] = 20 * 1024**3
    """Disk the bare mirrors of one factory may use together, bytes. Past it, mirrors no
    worktree uses are deleted, least recently used first, after each attempt (the next job on
    such a repository clones it again). Mirrors in use are never deleted, so the store can stay
    over the bound while they are. 0 keeps no mirror between jobs."""
    git_push_min_remaining_s: Annotated[float, Meta(ge=0)] | None = None
    """Lease that must be left after the compare-and-set renewal that precedes every push,
    seconds (the ``gigafactory fence`` rule); None: half of ``lease_ttl_s``. Less left: no push,
    the attempt fails (``crash``, retried). Larger is safer against a holder paused mid-push;
    it must be less than ``lease_ttl_s``."""

    # -- repository guardrails and forges (issue 10, helper forges) ---------------------------
    protected_paths: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECTED_PATHS))
    """Path globs (repository-relative, the scope grammar of ``schemas/scope.py``) that no job
    may change on this factory, whatever its ``scope`` and ``scope-mode``: an attempt touching
    one ends ``scope_violation`` and pushes nothing. Environment: comma-separated
    (``GIGAFACTORY_PROTECTED_PATHS=.github/workflows/**,deploy/**``; empty: nothing is
    protected). Risk: an empty list lets an agent edit CI, which may run with the repository's
    secrets on the next push."""
    forge: str = "auto"
    """Which forge opens and merges pull requests for a job's ``repo``: ``auto`` (a local path
    or ``file://`` URL: the local forge; a github.com URL: GitHub), ``local`` or ``github``
    (needed for a GitHub Enterprise host, with ``github_api_url``)."""
    github_api_url: str = "https://api.github.com"
    """GitHub's REST API root; ``https://HOST/api/v3`` for GitHub Enterprise Server. Must be
    https (http only on a loopback address, for tests): the token goes with every request."""
    forge_http_timeout_s: Annotated[float, Meta(gt=0, le=HOUR_S)] = 30.0
    """Bound, in seconds, on each request to an HTTP forge (GitHub). Too small: merges of big
    pull requests time out and are retried; too large: a hung forge holds a station."""

    # -- engine-class resolution (issue 9; schemas/profiles.py choose_engine, factory/stations.py)
    prefers_grace_s: float = 5.0
    """Seconds, broker time. A factory that could run an ``engine-class`` job only on an engine
    the job does not prefer (none of its ``prefers`` has a free seat there) leaves the job to
    the rest of the fleet until the job has been claimable this long, so a factory with a
    preferred engine free wins it; after that any factory may take it, so nothing starves.
    0: no holding back (the first factory to get the offer takes it on whatever it has). Costs
    a job whose preferred engines are all busy or absent up to this much extra wait; at most
    ``PREFERS_GRACE_MAX_S``."""

    # -- agent engines and their pricing (issue 9, usage/cost: helper usage9) ------------------
    codex_base_url: str | None = None
    """``GIGAFACTORY_CODEX_BASE_URL``: an OpenAI-compatible Responses API root
    (``http://127.0.0.1:8080/v1``, ``gigafactory model-server``'s ``/v1``) the ``codex`` engine
    uses as a custom provider; None: Codex's built-in OpenAI provider. Must be http(s). Risk: a
    wrong URL fails every codex job (``crash``/``auth_failed``), and the key named by
    ``codex_api_key_var`` is sent to it."""
    codex_api_key_var: str = "OPENAI_API_KEY"
    """``GIGAFACTORY_CODEX_API_KEY_VAR``: the NAME of the variable holding the key for
    ``codex_base_url`` (not the key); the probe offers ``engine:codex`` only when it is set, and
    only that variable (with the ``OPENAI_*`` ones) reaches the CLI. Must be a variable name."""
    codex_model: str | None = None
    """``GIGAFACTORY_CODEX_MODEL``: the model of a codex job that names none; None: the CLI's own
    default, whose cost then stays ``unknown`` (Codex's events do not name the model)."""
    gemini_model: str | None = None
    """``GIGAFACTORY_GEMINI_MODEL``: the model of a gemini job that names none; None:
    ``gemini-2.5-pro`` (always passed explicitly: without ``-m`` the CLI's router adds calls)."""
    copilot_model: str | None = None
    """``GIGAFACTORY_COPILOT_MODEL``: the model of a copilot job that names none (else
    ``COPILOT_MODEL``, else the CLI's default); required with ``COPILOT_PROVIDER_BASE_URL``."""
    aider_model: str | None = None
    """``GIGAFACTORY_AIDER_MODEL``: the model of an aider job that names none; None:
    ``gpt-4.1``. A name without a provider prefix is sent as ``openai/<name>``."""
    price_table: str | None = None
    """``GIGAFACTORY_PRICE_TABLE``: path of the operator's own price table (the format of the
    shipped ``prices.json``), used INSTEAD of the shipped one to price token usage
    (``cost_source: priced``, ``price_table`` = its ``version``). Checked when a factory starts
    (a named error for a missing file, bad JSON, a missing or negative price). Risk: wrong figures
    make every priced cost and every ``budget.usd`` stop wrong; a model missing from it stays
    ``unknown`` and is then never stopped by ``budget.usd``."""
    # -- shipping: pull requests and merges (issue 10, helper shipmodes) -----------------------
    ship_checks_wait_s: Annotated[float, Meta(ge=0, le=SHIP_CHECKS_WAIT_MAX_S)] = 600.0
    """``GIGAFACTORY_SHIP_CHECKS_WAIT_S``: how long, in seconds, a factory shipping a
    ``ship-as: merged`` job waits for the pull request's pending checks (CI) before leaving the
    job in ``testing`` for a human's ``gigafactory ship`` (0: no wait). The station stays busy
    and the lease renewed meanwhile. Risk: a long wait holds a station per job waiting on CI; a
    short one leaves jobs whose CI is slow unmerged. At most ``SHIP_CHECKS_WAIT_MAX_S``."""
    ship_checks_poll_s: Annotated[float, Meta(gt=0, le=SHIP_CHECKS_WAIT_MAX_S)] = 10.0
    """``GIGAFACTORY_SHIP_CHECKS_POLL_S``: seconds between two reads of a pull request's checks
    while waiting (``ship_checks_wait_s``). Risk: a short one spends the forge's API rate limit
    (GitHub: 5,000 requests an hour per token)."""

    # -- the probe (lead) ---------------------------------------------------------------------
    probe_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 30.0
    """Hard limit, seconds, for each version command the factory's probe runs at start (tools
    and agent CLIs, all in parallel). An agent CLI whose ``--version`` misses it is not offered
    (its jobs wait for another factory); a hung tool delays the factory's start by this much."""

    # -- WIP checkpoints and resume (issue 10, helper checkpoint) -------------------------------
    checkpoint_s: Annotated[float, Meta(ge=0, le=CHECKPOINT_MAX_S)] = 300.0
    """While an engine runs on a ``repo`` job, every this many seconds the factory snapshots the
    worktree (a separate index: the engine's own index and files are untouched) into a commit
    on ``gf/<job>/wip``, pushes it fenced and records it on the job record; a retry or a
    reclaimed attempt starts from the last checkpoint instead of ``base``. Only when something
    changed since the last one. 0: no checkpoints (a reclaimed attempt starts from ``base``).
    At most this much of an attempt's work is lost when its factory dies; smaller costs a
    commit, a push and a record write per interval. At least ``CHECKPOINT_MIN_S`` when on."""

    # -- metrics and health endpoints (issue 11, helper metrics) ---------------------------------
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    """``GIGAFACTORY_METRICS_PORT``: TCP port on which ``coordinator``, ``factory`` and ``up``
    (and the load suite's fleet host) serve ``/metrics`` (Prometheus), ``/healthz`` and
    ``/readyz``; unset: no endpoint. 0: a free port, logged. Risk: the endpoint answers anyone
    who can reach it (figures only: no job ids, no secrets); bind it with ``metrics_host``."""
    metrics_host: str = "127.0.0.1"
    """``GIGAFACTORY_METRICS_HOST``: the address the metrics endpoint listens on. The default
    answers this machine only; ``0.0.0.0`` (all interfaces) is what a Prometheus on another host
    or container needs. Risk: all interfaces exposes the fleet's figures to its network."""

    # -- workspace: clean-up of superseded refs (issue 10, helper workspace) --
    ref_cleanup_after_s: float = 300.0
    """``GIGAFACTORY_REF_CLEANUP_AFTER_S``: seconds after a ``repo`` job ended for good
    (shipped, failed, dead-lettered) before the coordinator deletes its superseded epochs'
    branches and its ``gf/<job>/wip`` branch on the remote and closes their pull requests (the
    shipped branch and its pull request are never touched). 0: at once; at most 30 days. Risk:
    short, and a human loses the chance to look at an abandoned epoch's branch; long, and the
    remote collects ``gf/*`` branches (one per epoch) meanwhile."""
    # -- the spend ledger, seats and funding windows (issue 13, helper ledger) ----------------
    spend_max_bytes: int = 1024**3
    """``GIGAFACTORY_SPEND_MAX_BYTES``: byte cap of the ``GF_SPEND`` stream (the spend ledger);
    the oldest records are dropped when it is reached. A record is about 600 bytes: 1 GiB holds
    some 1.7 million usage reports. Risk: too small drops spend history that invoices of the
    period still need to be reconciled against (a ``retention_warning`` says so first)."""
    spend_max_age_s: float = 400 * 86400.0
    """``GIGAFACTORY_SPEND_MAX_AGE_S``: seconds a spend record is kept (default 400 days: a
    year of invoices and a month to import the last). Risk: shorter than the invoice delay
    leaves invoice lines with no ledger dollars to match."""
    spend_metrics_interval_s: float = 600.0
    """``GIGAFACTORY_SPEND_METRICS_INTERVAL_S``: how often a coordinator reads the spend ledger
    and the imported invoices for the attribution-coverage and invoice-drift metrics (0: never;
    else 30 to 86400 s). Each pass reads up to 200,000 records: shorter costs broker reads
    and coordinator memory, longer leaves the gauges older."""
    spend_duplicate_window_s: float = 86400.0
    """``GIGAFACTORY_SPEND_DUPLICATE_WINDOW_S``: the ``GF_SPEND`` stream's duplicate window:
    a record published again with the same id (a retry, an outbox replay) within it is stored
    once. Readers count one record per id whatever this is; longer costs the server memory
    (one id per record in the window)."""
    lane_kind: str = "live"
    """``GIGAFACTORY_LANE_KIND``: what kind of lane this factory's stations are for the ledger
    (``live``, ``background``, ``hosted``, ``remote``, ``shadow``); a job's ``lane-kind``
    overrides it. Funding windows may fund only some kinds."""
    seat_costs: str = ""
    """``GIGAFACTORY_SEAT_COSTS``: fixed costs of this factory's engine seats (and hosted
    services), which cost money while idle: ``engine=amount/period`` comma-separated, period
    ``month`` (30 days) or ``hour``, in US dollars, per seat (``claude=200/month,codex=0.5/hour``).
    Spread over the time the factory was up and written to the ledger every
    ``seat_cost_interval_s`` with ``cost_source`` ``fixed``. Empty: no fixed costs."""
    seat_cost_interval_s: float = 300.0
    """``GIGAFACTORY_SEAT_COST_INTERVAL_S``: how often a factory writes its fixed seat costs to
    the ledger (one record per engine per interval; 60 to 86400 s). Shorter is finer-grained
    and costs more records; a factory killed loses at most one interval of fixed cost."""
    funding_windows_file: str | None = None
    """``GIGAFACTORY_FUNDING_WINDOWS_FILE``: a YAML or TOML file of funding windows (named
    budgets with a period, an amount, and the products, providers and lane kinds they fund;
    see docs/economics.md). Read by factories at start (a bad file stops the start, naming
    file, window and field) and by ``report spend``. Unset: every run draws from ``unfunded``."""
    # -- budgets from business signals, idle and runs (issue 13, helper budget) ------------------
    pipeline_budget_enforcement: bool = False
    """``GIGAFACTORY_PIPELINE_BUDGET_ENFORCEMENT``: when on, a job whose projected cost exceeds
    the residual daily budget or ``max_cost_per_run_usd`` is held (reason ``budget``) before it
    starts, and a running job is stopped at ``max_cost_per_run_usd``. Off (the default, pilot
    mode): every job runs and each decision still records what enforcement would have done. Set
    it on the coordinator and on the factories (the factories stop running jobs at the cap).
    Risk: on with signals that say no runway holds all work until an operator overrides it."""
    max_cost_per_run_usd: float | None = None
    """``GIGAFACTORY_MAX_COST_PER_RUN_USD``: dollars one attempt may cost (with enforcement on):
    a job projected above it is held, a running one past it is stopped (``budget_exceeded``).
    Unset: no per-run cap. Risk: too low stops useful work mid-way (its log is kept)."""
    budget_signals_file: str | None = None
    """``GIGAFACTORY_BUDGET_SIGNALS_FILE``: a JSON file of business signals (``cash_balance_usd``,
    ``monthly_burn_usd``, ``revenue_usd``, ``revenue_prev_usd``, ``funnel``) read before a kickoff.
    Unset (and no command): neutral signals (factors 1). Risk: a stale file is believed."""
    budget_signals_command: str | None = None
    """``GIGAFACTORY_BUDGET_SIGNALS_COMMAND``: a command (split like a shell line, run without a
    shell) printing the same JSON; wins over the file. Risk: it runs on the coordinator's host
    with the coordinator's rights; bounded by ``budget_signals_timeout_s``."""
    budget_signals_timeout_s: float = 10.0
    """``GIGAFACTORY_BUDGET_SIGNALS_TIMEOUT_S``: seconds the signals command may take (killed after)."""
    budget_signals_max_bytes: int = 64 * 1024
    """``GIGAFACTORY_BUDGET_SIGNALS_MAX_BYTES``: largest signals document read; a larger one is an error."""
    budget_signals_max_age_s: float = 60.0
    """``GIGAFACTORY_BUDGET_SIGNALS_MAX_AGE_S``: a reading older than this is read again before a
    kickoff (0: before every dispatch pass). Risk: a large value decides on old cash figures."""
    monthly_pipeline_budget_usd: float = 3000.0
    """``GIGAFACTORY_MONTHLY_PIPELINE_BUDGET_USD``: dollars a month the pipeline may spend before the
    signal factors (docs/economics.md, "Budgets"). Risk: the daily budget is its share times the factors."""
    budget_days_per_month: float = 30.0
    """``GIGAFACTORY_BUDGET_DAYS_PER_MONTH``: the day's share of the monthly budget is 1/this (1: the
    seed's formula to the letter)."""
    budget_runway_floor_months: float = 3.0
    """``GIGAFACTORY_BUDGET_RUNWAY_FLOOR_MONTHS``: at or below this runway (cash / burn) the runway factor is 0."""
    budget_runway_target_months: float = 12.0
    """``GIGAFACTORY_BUDGET_RUNWAY_TARGET_MONTHS``: the runway at which the runway factor is 1."""
    budget_runway_factor_max: float = 1.5
    """``GIGAFACTORY_BUDGET_RUNWAY_FACTOR_MAX``: the most the runway factor may be."""
    budget_growth_sensitivity: float = 1.0
    """``GIGAFACTORY_BUDGET_GROWTH_SENSITIVITY``: revenue growth factor = 1 + this x growth (clamped)."""
    budget_growth_factor_min: float = 0.5
    """``GIGAFACTORY_BUDGET_GROWTH_FACTOR_MIN``: the least the revenue growth factor may be."""
    budget_growth_factor_max: float = 1.5
    """``GIGAFACTORY_BUDGET_GROWTH_FACTOR_MAX``: the most the revenue growth factor may be."""
    expected_features_today: float = 10.0
    """``GIGAFACTORY_EXPECTED_FEATURES_TODAY``: features expected today; per-feature budget = daily / this."""
    budget_default_projected_usd: float = 1.0
    """``GIGAFACTORY_BUDGET_DEFAULT_PROJECTED_USD``: a job's projected cost when it has no ``budget.usd``
    and no similar job ran recently. Risk: 0 lets every unknown job pass the residual check."""
    runs_db: str | None = None
    """``GIGAFACTORY_RUNS_DB``: the coordinator's SQLite database of ``pipeline_runs`` (default
    ``<GIGAFACTORY_HOME>/coordinator/runs.sqlite``)."""
    # -- secrets, kill switch and engine sandbox (issue 12, helper guard) -----------------------
    engine_sandbox: str = "none"
    """``GIGAFACTORY_ENGINE_SANDBOX``: how engines (and the verify gate) are confined on this
    factory: ``none`` (the factory's user, the factory's view of the machine), ``bwrap``
    (bubblewrap: everything read-only but the job's worktree, a private ``/tmp``, the factory's
    data folder and credentials hidden; the network open) or ``user`` (a dedicated unprivileged
    user, ``engine_sandbox_user``; the factory must run as root). See docs/security.md. Risk:
    ``none`` lets a job write anywhere the factory's user may and read its credentials files;
    ``bwrap`` makes an engine's own git commits fail (the factory commits for it)."""
    engine_sandbox_user: str = ""
    """``GIGAFACTORY_ENGINE_SANDBOX_USER``: the unprivileged user (and its group of the same
    name) engines run as with ``engine_sandbox=user``. It must be able to write the workspace
    and must not be able to read the factory's home. Required with ``user``."""
    redact_extra_vars: str = ""
    """``GIGAFACTORY_REDACT_EXTRA_VARS``: comma-separated names of further variables of the
    factory's environment whose values are replaced with ``[REDACTED:<name>]`` in everything
    that leaves the factory (logs, events, reasons, artifacts); variables whose names say
    TOKEN, SECRET, PASSWORD, API_KEY, ... and the ``cred:`` variables are redacted anyway.
    Risk: a short or common value named here (at least 8 characters are needed) blanks out
    every occurrence of it in every log."""
    # -- identities, permissions and TLS on the broker (issue 12, helper auth) ---------------------
    creds: str | None = None
    """``GIGAFACTORY_CREDS``: the credentials file (an nkey seed, written by ``gigafactory creds
    create``) this process connects with; ``--creds`` wins. Unset: the home's ``admin`` identity
    when this machine's identity store has one, else no credentials (refused by a broker with
    authentication on). Risk: the file IS the identity: keep it mode 0600, one per machine."""
    tls_cert: str | None = None
    """``GIGAFACTORY_TLS_CERT``: PEM certificate. For ``server``/``up``: the broker's own (TLS on
    for clients and cluster routes); for a client: its client certificate (mutual TLS).
    Unset: no TLS (traffic, including job output, crosses the network in the clear)."""
    tls_key: str | None = None
    """``GIGAFACTORY_TLS_KEY``: the PEM private key of ``tls_cert``. Risk: whoever reads it can
    impersonate the broker (server) or the client."""
    tls_ca: str | None = None
    """``GIGAFACTORY_TLS_CA``: PEM CA bundle that clients verify the broker with (and the broker
    verifies client certificates with, when both are set). Unset with TLS on: the system CAs."""

    # -- the claim's round trips (issue 14, helper fastclaim) -----------------------------------
    dispatch_record_max_bytes: Annotated[int, Meta(ge=0, le=DISPATCH_RECORD_MAX_BYTES_CEILING)] = 64 * 1024
    """Largest job record (encoded, in bytes) the coordinator carries inside a dispatch message,
    with its revision, so that the factory claims it with one compare-and-set and no read
    (default 64 KiB; 0: never carry it). A larger record (a long prompt) travels as a pointer
    only and the factory reads it. Risk: every dispatch message and its redeliveries carry the
    record, so a high value costs broker bytes and memory in the dispatch stream; at most 512 KiB
    (half the broker's default max payload)."""

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

    @property
    def engine_env_passthrough_names(self) -> tuple[str, ...]:
        """``engine_env_passthrough`` as variable names (checked by :meth:`validate`)."""
        return tuple(n.strip() for n in self.engine_env_passthrough.split(",") if n.strip())

    def validate(self) -> "Settings":
        """Refuse settings under which a lease holder could not fence itself in time, and
        passthrough names that are not variable names; returns self. Raises
        :class:`SettingsError` naming the setting and what to do."""
        check_fields(self)
        check_engine_settings(self)
        check_ledger(self)
        check_budget(self)
        check_guard(self)
        check_auth(self)
        if len(self.engine_env_passthrough) > ENGINE_ENV_PASSTHROUGH_MAX_CHARS:
            raise SettingsError(f"engine_env_passthrough (GIGAFACTORY_ENGINE_ENV_PASSTHROUGH) is "
                                f"{len(self.engine_env_passthrough)} characters; at most "
                                f"{ENGINE_ENV_PASSTHROUGH_MAX_CHARS} are allowed")
        for name in self.engine_env_passthrough_names:
            if not _ENV_NAME_RE.fullmatch(name):
                raise SettingsError(f"engine_env_passthrough (GIGAFACTORY_ENGINE_ENV_PASSTHROUGH) names {name!r}, "
                                    "which is not an environment variable name: give comma-separated names "
                                    "such as NPM_TOKEN,PIP_INDEX_URL")
        if not 0 < self.probe_timeout_s <= 600:
            raise SettingsError(f"probe_timeout_s={self.probe_timeout_s!r} (GIGAFACTORY_PROBE_TIMEOUT_S) must be "
                                "more than 0 and at most 600 seconds")
        if not self.git_timeout_s > 0:
            raise SettingsError(f"git_timeout_s={self.git_timeout_s!r} (GIGAFACTORY_GIT_TIMEOUT_S) must be a "
                                "positive number of seconds")
        if self.git_mirrors_max_bytes < 0:
            raise SettingsError(f"git_mirrors_max_bytes={self.git_mirrors_max_bytes!r} "
                                "(GIGAFACTORY_GIT_MIRRORS_MAX_BYTES) must be 0 or more bytes")
        if self.git_push_min_remaining_s is not None and not (
                0 <= self.git_push_min_remaining_s < self.lease_ttl_s):
            raise SettingsError(f"git_push_min_remaining_s={self.git_push_min_remaining_s!r} "
                                "(GIGAFACTORY_GIT_PUSH_MIN_REMAINING_S) must be at least 0 and less than "
                                f"lease_ttl_s ({self.lease_ttl_s:g}): a push needs lease left after its fence")
        if not 0 <= self.ship_checks_wait_s <= SHIP_CHECKS_WAIT_MAX_S:
            raise SettingsError(f"ship_checks_wait_s={self.ship_checks_wait_s!r} (GIGAFACTORY_SHIP_CHECKS_WAIT_S) "
                                f"must be 0 to {SHIP_CHECKS_WAIT_MAX_S:g} seconds")
        if not 0 < self.ship_checks_poll_s <= SHIP_CHECKS_WAIT_MAX_S:
            raise SettingsError(f"ship_checks_poll_s={self.ship_checks_poll_s!r} (GIGAFACTORY_SHIP_CHECKS_POLL_S) "
                                f"must be more than 0 and at most {SHIP_CHECKS_WAIT_MAX_S:g} seconds")
        if self.checkpoint_s != 0 and not CHECKPOINT_MIN_S <= self.checkpoint_s <= CHECKPOINT_MAX_S:
            raise SettingsError(f"checkpoint_s={self.checkpoint_s!r} (GIGAFACTORY_CHECKPOINT_S) must be 0 (no "
                                f"checkpoints) or between {CHECKPOINT_MIN_S:g} and {CHECKPOINT_MAX_S:g} seconds: "
                                "each checkpoint is a commit, a push and a job-record write")
        check_ref_cleanup(self)
        if not 0 <= self.prefers_grace_s <= PREFERS_GRACE_MAX_S:
            raise SettingsError(f"prefers_grace_s={self.prefers_grace_s!r} (GIGAFACTORY_PREFERS_GRACE_S) must be "
                                f"between 0 and {PREFERS_GRACE_MAX_S:g} seconds: it is how long an engine-class "
                                "job waits for a factory with a preferred engine before any factory may take it")
        check_timings(self)
        check_fencing(self)
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, config_file: str | Path | None = None,
                 **overrides: Any) -> "Settings":
        """This process's settings: the defaults, then the config file (:func:`config_path`),
        then the ``GIGAFACTORY_<NAME>`` variables, then ``overrides`` (command-line flags); each
        later source wins. Every value read is checked against its field's type and bounds,
        and a bad one raises :class:`SettingsError` naming where it came from (the variable,
        the file and key, or the option) and what is expected. Rules between settings are
        :meth:`validate`'s.

        :param environ: the environment to read (default: this process's); ``GIGAFACTORY_CONFIG``
            and ``GIGAFACTORY_HOME`` are looked up in it too.
        :param config_file: read this config file instead of the one :func:`config_path` finds.
        :param overrides: setting name -> value given by a flag; None means "not given".
        """
        env = os.environ if environ is None else environ
        specs = setting_specs()
        unknown = sorted(set(overrides) - set(specs))
        assert not unknown, f"Settings.from_env: no such settings {unknown}"  # a caller's typo
        values: dict[str, Any] = {}
        path = Path(config_file).expanduser() if config_file is not None else config_path(env)
        if path is not None:
            for key, raw in read_config_file(path).items():
                values[key] = specs[key].check(raw, f"config file {path}: {key}")
        for name, spec in specs.items():
            raw = env.get(spec.env)
            if raw is not None:
                values[name] = spec.check(raw, spec.env, text=True)
        for name, v in overrides.items():
            if v is not None:
                values[name] = specs[name].check(v, f"--{name.replace('_', '-')} ({specs[name].env})")
        return cls(**values)

    def __post_init__(self) -> None:
        check_log_upload(self)
        check_metrics_port(self)
        check_protected_paths(self)


# -- reading and checking settings: types and bounds, the config file ----------------------------

ENV_CONFIG = "GIGAFACTORY_CONFIG"
"""The config file to read (``--config FILE`` sets it for the command and the processes it starts)."""
CONFIG_FILE_NAME = "gigafactory.toml"
"""The config file looked up in ``GIGAFACTORY_HOME`` when ``GIGAFACTORY_CONFIG`` is not set."""
CONFIG_MAX_BYTES = 64 * 1024
"""A config file larger than this is refused (every setting with a long value fits in a tenth)."""
LIVENESS_HEARTBEATS = 3
"""A factory is live while its last heartbeat is at most this many ``heartbeat_s`` old
(:meth:`gigafactory.coordinator.view.View.live_factories`)."""


class SettingSpec:
    """One field of :class:`Settings`: its name, its variable, its type with bounds (the
    annotation msgspec checks) and a description of what it accepts, for errors.

    :param name: the field's name.
    :param annotation: its resolved annotation (``Annotated[float, Meta(gt=0)]``, ``str | None``).
    :param info: its :mod:`msgspec.inspect` type (for the description and for parsing text).
    """

    def __init__(self, name: str, annotation: Any, info: msgspec.inspect.Type) -> None:
        self.name = name
        self.annotation = annotation
        self.env = f"GIGAFACTORY_{name.upper()}"
        types = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
        self.optional = any(isinstance(t, msgspec.inspect.NoneType) for t in types)
        rest = [t for t in types if not isinstance(t, msgspec.inspect.NoneType)]
        self.base = rest[0] if len(rest) == 1 else info

    @property
    def expected(self) -> str:
        """What the setting accepts, in words: ``a number of seconds, more than 0 and at most 3600``."""
        t = self.base
        if isinstance(t, msgspec.inspect.BoolType):
            text = "true or false (1/0, yes/no, on/off)"
        elif isinstance(t, msgspec.inspect.FloatType):
            text = "a number of seconds" if self.name.endswith("_s") else "a number"
        elif isinstance(t, msgspec.inspect.IntType):
            text = "a whole number of bytes" if self.name.endswith("_bytes") else "a whole number"
        elif isinstance(t, msgspec.inspect.ListType):
            text = "a list of strings (comma-separated in the environment)"
        elif isinstance(t, msgspec.inspect.StrType):
            text = "a string"
        elif isinstance(t, msgspec.inspect.LiteralType):
            text = "one of " + ", ".join(str(v) for v in t.values)
        elif isinstance(t, msgspec.inspect.EnumType):
            text = "one of " + ", ".join(str(m.value) for m in t.cls)
        else:
            text = f"a value of type {self.annotation}"
        bounds = [f"{word} {getattr(t, attr):g}" for attr, word in
                  (("gt", "more than"), ("ge", "at least"), ("lt", "less than"), ("le", "at most"))
                  if getattr(t, attr, None) is not None]
        if bounds:
            text += ", " + " and ".join(bounds)
        return text + (", or empty for none" if self.optional else "")

    def check(self, raw: Any, where: str, *, text: bool = False) -> Any:
        """``raw`` as this setting's value, checked against its type and bounds.

        :param raw: the value as given (a string from the environment, a TOML value, a flag's).
        :param where: where it came from, for the error (``GIGAFACTORY_LEASE_TTL_S``,
            ``/etc/gigafactory.toml: lease_ttl_s``, ``--metrics-port``).
        :param text: ``raw`` is an environment variable's text, to be parsed for the type first.
        :raises SettingsError: ``<where>=<raw>: expected <what> (setting <name>)``.
        """
        value = raw
        if self.optional and isinstance(raw, str) and not raw.strip():
            return None  # empty (the environment's way, and the file's, to say "unset")
        try:
            if text:
                value = self._parse_text(raw)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("not finite")
            value = msgspec.convert(value, self.annotation)
            return FIELD_CHECKS[self.name](value, where) if self.name in FIELD_CHECKS else value
        except (ValueError, msgspec.ValidationError) as e:
            if isinstance(e, SettingsError):
                raise
            raise SettingsError(f"{where}={raw!r}: expected {self.expected} (setting {self.name})") from None

    def _parse_text(self, raw: str) -> Any:
        t = self.base
        if isinstance(t, msgspec.inspect.BoolType):
            return parse_bool(raw, self.env)
        if isinstance(t, msgspec.inspect.IntType):
            return int(raw.strip())
        if isinstance(t, msgspec.inspect.FloatType):
            return float(raw.strip())
        if isinstance(t, msgspec.inspect.ListType):
            return [v.strip() for v in raw.split(",") if v.strip()]
        return raw


FIELD_CHECKS: dict[str, Any] = {
    "sync_interval": lambda value, where: check_sync_interval(value or None, where),
}
"""Setting name -> ``check(value, where) -> value`` for a setting whose type alone says too
little (a Go duration in a string); raises :class:`SettingsError`."""


@lru_cache(maxsize=1)
def setting_specs() -> dict[str, SettingSpec]:
    """Every setting of :class:`Settings`, by name, in declaration order."""
    annotations = {f.name: f.type for f in msgspec.structs.fields(Settings)}
    return {f.name: SettingSpec(f.name, annotations[f.name], f.type)
            for f in msgspec.inspect.type_info(Settings).fields}


def check_fields(s: Settings) -> None:
    """Refuse a :class:`Settings` (constructed in code, or changed after reading) whose fields
    do not have their type and bounds: one :class:`SettingsError` naming each bad setting, its
    variable and what it accepts."""
    bad = []
    for name, spec in setting_specs().items():
        value = getattr(s, name)
        try:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("not finite")
            msgspec.convert(value, spec.annotation)
        except (ValueError, msgspec.ValidationError):
            bad.append(f"{name}={value!r} ({spec.env}): expected {spec.expected}")
    if bad:
        raise SettingsError("; ".join(bad))


def check_timings(s: Settings) -> None:
    """Refuse timings that are each in bounds but dangerous together: a renewal period that
    leaves no second try within the lease, a factory forgotten or its pools deleted while its
    heartbeats still count it live. :class:`SettingsError` naming every rule broken, with the
    variables and what to set (the self-fencing rules are :func:`check_fencing`'s)."""
    bad = []
    if s.lease_renew_s > s.lease_ttl_s / 2:
        bad.append(f"lease_renew_s={s.lease_renew_s:g} (GIGAFACTORY_LEASE_RENEW_S) is more than half of "
                   f"lease_ttl_s={s.lease_ttl_s:g} (GIGAFACTORY_LEASE_TTL_S): a slow or lost renewal must be "
                   f"retried before the lease can lapse; renew every {s.lease_ttl_s / 2:g} s or less")
    live_s = LIVENESS_HEARTBEATS * s.heartbeat_s
    for name, what in (("factory_forget_s", "a factory would be forgotten"),
                       ("pool_idle_gc_s", "a pool would be deleted under a factory bound to it")):
        if getattr(s, name) <= live_s:
            bad.append(f"{name}={getattr(s, name):g} (GIGAFACTORY_{name.upper()}) must be more than "
                       f"{LIVENESS_HEARTBEATS} x heartbeat_s = {live_s:g} s (GIGAFACTORY_HEARTBEAT_S): {what} "
                       "while its heartbeats still count it live")
    if bad:
        raise SettingsError("; ".join(bad))


def config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The config file to read: ``GIGAFACTORY_CONFIG`` if set (it must exist), else
    ``<GIGAFACTORY_HOME>/gigafactory.toml`` if that exists, else None. Never the current
    directory: a service started from another folder must not get other timings silently.

    :param environ: the environment to read (default: this process's).
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_CONFIG, "").strip()
    if raw:
        return Path(raw).expanduser()
    p = home(env) / CONFIG_FILE_NAME
    return p if p.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML config file, by name (values not yet checked: see
    :meth:`SettingSpec.check`).

    :param path: the file.
    :raises SettingsError: naming the file when it cannot be read, is over
        :data:`CONFIG_MAX_BYTES`, is not TOML (with the line), or holds a key that is not a
        setting (naming the key) or a table.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise SettingsError(f"config file {path}: cannot be read ({e.strerror}); fix the path given by --config "
                            f"or {ENV_CONFIG}") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise SettingsError(f"config file {path}: more than {CONFIG_MAX_BYTES:,} bytes; a config file holds "
                            "settings only")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"config file {path}: not valid TOML ({e})") from None
    specs = setting_specs()
    for key, value in doc.items():
        if key not in specs:
            near = difflib.get_close_matches(key, specs, n=3)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise SettingsError(f"config file {path}: unknown setting {key!r}{hint}; the settings are listed in "
                                "docs/operations.md")
        if isinstance(value, dict) and not isinstance(specs[key].base, msgspec.inspect.DictType):
            raise SettingsError(f"config file {path}: {key} is a table; settings are top-level keys "
                                f"({key} = value)")
    return doc


def check_fencing(s: Settings) -> None:
    """Refuse a self-fencing margin under which a lease holder could not stop its engine before
    the reaper may reclaim the job (too small), or would fence itself before its first renewal
    (too large), and a clock-skew warning threshold at or above the margin: :class:`SettingsError`
    naming the setting and what to set. Not checked with ``unsafe_unfenced_engines`` (the chaos
    suite's broken-on-purpose variant)."""
    ttl, renew, margin = s.lease_ttl_s, s.lease_renew_s, s.fence_margin_effective_s
    if not ttl > 0 or not renew > 0:
        raise SettingsError("GIGAFACTORY_LEASE_TTL_S and GIGAFACTORY_LEASE_RENEW_S must be positive "
                            f"(got lease_ttl_s={ttl!r}, lease_renew_s={renew!r})")
    if s.unsafe_unfenced_engines:
        return
    need = 2 * FENCE_KILL_GRACE_MIN_S + s.fence_drift_allowance_s
    if not margin >= need:
        raise SettingsError(
            f"fence_margin_s={margin:g} (GIGAFACTORY_FENCE_MARGIN_S) is too small: it must cover a kill "
            f"grace of at least {FENCE_KILL_GRACE_MIN_S:g} s, as much slack again, and "
            f"{s.fence_drift_allowance_s:g} s of clock drift allowance (with lease_ttl_s={ttl:g}): "
            f"set it to {need:g} or more")
    if not ttl - margin > renew:
        raise SettingsError(
            f"fence_margin_s={margin:g} (GIGAFACTORY_FENCE_MARGIN_S) leaves lease_ttl_s - fence_margin_s = "
            f"{ttl - margin:g} s, not more than lease_renew_s={renew:g}: a holder would fence itself before "
            "its first renewal. Lower the margin or lease_renew_s, or raise lease_ttl_s")
    if s.clock_skew_warn_s >= margin:
        # A skew between broker nodes larger than the margin can reclaim a lease before its
        # holder has stopped: the warning must come before that, not after.
        raise SettingsError(
            f"clock_skew_warn_s={s.clock_skew_warn_s:g} (GIGAFACTORY_CLOCK_SKEW_WARN_S) must be less than the "
            f"self-fencing margin ({margin:g} s, GIGAFACTORY_FENCE_MARGIN_S): a skew between broker nodes that "
            "lets a lease be reclaimed before its holder stops must be reported")


DEFAULT_PROTECTED_PATHS = (".github/workflows/**",)
"""What ``protected_paths`` protects unless told otherwise: GitHub Actions workflows, which
run with the repository's secrets."""


FORGE_SETTING_KINDS = ("auto", "local", "github")
"""Values of the ``forge`` setting (gigafactory/forges/base.py: FORGE_KINDS)."""


REF_CLEANUP_AFTER_MAX_S = 30 * 86400.0
"""Longest ``ref_cleanup_after_s`` accepted (30 days)."""


def check_ref_cleanup(s: Settings) -> None:
    """Refuse a ``ref_cleanup_after_s`` that is negative or past :data:`REF_CLEANUP_AFTER_MAX_S`."""
    if not 0 <= s.ref_cleanup_after_s <= REF_CLEANUP_AFTER_MAX_S:
        raise SettingsError(f"ref_cleanup_after_s={s.ref_cleanup_after_s!r} (GIGAFACTORY_REF_CLEANUP_AFTER_S) must be "
                            f"between 0 and {REF_CLEANUP_AFTER_MAX_S:g} seconds: how long an ended job's superseded "
                            "branches stay on the remote")


def check_protected_paths(s: Settings) -> None:
    """Refuse ``protected_paths`` globs the scope grammar refuses (a typo there would protect
    nothing, silently), and forge settings that would send a token in clear text or never
    time out: SettingsError naming each bad value and what to write."""
    errors = validate_globs(s.protected_paths, "protected_paths (GIGAFACTORY_PROTECTED_PATHS)")
    if s.forge not in FORGE_SETTING_KINDS:
        errors.append(f"forge (GIGAFACTORY_FORGE)={s.forge!r}: expected one of {', '.join(FORGE_SETTING_KINDS)}")
    url = s.github_api_url
    if not (url.startswith("https://") or re.match(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)", url)):
        errors.append(f"github_api_url (GIGAFACTORY_GITHUB_API_URL)={url!r}: must start with https:// (http:// "
                      "only on a loopback address): the GitHub token is sent with every request")
    if not s.forge_http_timeout_s > 0:
        errors.append(f"forge_http_timeout_s (GIGAFACTORY_FORGE_HTTP_TIMEOUT_S)={s.forge_http_timeout_s!r}: "
                      "must be a positive number of seconds")
    if errors:
        raise SettingsError("; ".join(errors))


def env_text(value: object) -> str:
    """A setting's value as its ``GIGAFACTORY_<NAME>`` variable reads it back (lists are
    comma-separated), for code that hands its settings to a child process."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


ENGINE_ENV_PASSTHROUGH_MAX_CHARS = 4096
"""Longest ``engine_env_passthrough`` accepted."""
SHIP_CHECKS_WAIT_MAX_S = 6 * 3600.0
"""Largest ``ship_checks_wait_s`` (and ``ship_checks_poll_s``): a station waits for CI at most six hours."""
PREFERS_GRACE_MAX_S = 600.0
"""Largest ``prefers_grace_s``: beyond ten minutes a preference would be a hidden queue."""
CHECKPOINT_MIN_S = 0.5
"""Shortest ``checkpoint_s`` accepted (0 aside): a checkpoint costs git calls, a push and a write."""
CHECKPOINT_MAX_S = 86_400.0
"""Longest ``checkpoint_s`` accepted (a day)."""
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

LOG_UPLOAD_MIN_BYTES = 64 * 1024
"""Smallest ``log_upload_max_bytes``: room for a head, the marker line and a tail."""


def check_engine_settings(s: Settings) -> None:
    """Refuse agent-engine settings that would fail every job of that engine, or price with a
    table that cannot be read: ``codex_api_key_var`` not a variable name, ``codex_base_url`` not
    http(s), ``price_table`` missing, too large or malformed (the price table's own error, naming
    the file and the field)."""
    if not _ENV_NAME_RE.fullmatch(s.codex_api_key_var or ""):
        raise SettingsError(f"codex_api_key_var (GIGAFACTORY_CODEX_API_KEY_VAR)={s.codex_api_key_var!r} is not an "
                            "environment variable name: name the variable that holds the provider's API key "
                            "(e.g. OPENAI_API_KEY)")
    if s.codex_base_url and not s.codex_base_url.startswith(("http://", "https://")):
        raise SettingsError(f"codex_base_url (GIGAFACTORY_CODEX_BASE_URL)={s.codex_base_url!r} is not an http(s) "
                            "URL: set it to the provider's Responses API root, e.g. http://127.0.0.1:8080/v1, "
                            "or unset it for OpenAI")
    if s.price_table:
        from gigafactory.schemas import pricing

        try:
            pricing.load_table(s.price_table)
        except (OSError, pricing.PriceTableError) as e:
            raise SettingsError(f"price_table (GIGAFACTORY_PRICE_TABLE): {e}") from None


def check_budget(s: Settings) -> None:
    """Refuse budget settings the formulas cannot use (docs/economics.md, "Budgets"): raises
    :class:`SettingsError` naming the variable."""
    if s.max_cost_per_run_usd is not None and not s.max_cost_per_run_usd >= 0:
        raise SettingsError(f"max_cost_per_run_usd={s.max_cost_per_run_usd!r} (GIGAFACTORY_MAX_COST_PER_RUN_USD) "
                            "must be 0 or more dollars, or unset for no cap")
    if not 0 < s.budget_signals_timeout_s <= 300:
        raise SettingsError("budget_signals_timeout_s (GIGAFACTORY_BUDGET_SIGNALS_TIMEOUT_S) must be more than 0 "
                            "and at most 300 seconds")
    if not 0 < s.budget_signals_max_bytes <= 16 * 1024 * 1024:
        raise SettingsError("budget_signals_max_bytes (GIGAFACTORY_BUDGET_SIGNALS_MAX_BYTES) must be 1 byte to 16 MiB")
    if s.budget_signals_max_age_s < 0:
        raise SettingsError("budget_signals_max_age_s (GIGAFACTORY_BUDGET_SIGNALS_MAX_AGE_S) must be 0 or more")
    # The same rules as economics.budget.Policy.check (config imports no economics: no cycle).
    for name in ("budget_days_per_month", "expected_features_today", "budget_runway_factor_max",
                 "budget_growth_factor_max"):
        if not getattr(s, name) > 0:
            raise SettingsError(f"{name}={getattr(s, name)!r} (GIGAFACTORY_{name.upper()}) must be more than 0")
    if s.monthly_pipeline_budget_usd < 0:
        raise SettingsError("monthly_pipeline_budget_usd (GIGAFACTORY_MONTHLY_PIPELINE_BUDGET_USD) must not be negative")
    if not s.budget_runway_target_months > s.budget_runway_floor_months >= 0:
        raise SettingsError("budget runway: need runway_target_months > runway_floor_months >= 0 "
                            "(GIGAFACTORY_BUDGET_RUNWAY_TARGET_MONTHS, GIGAFACTORY_BUDGET_RUNWAY_FLOOR_MONTHS)")
    if not 0 <= s.budget_growth_factor_min <= 1 <= s.budget_growth_factor_max:
        raise SettingsError("budget growth factor: need 0 <= GIGAFACTORY_BUDGET_GROWTH_FACTOR_MIN <= 1 <= "
                            "GIGAFACTORY_BUDGET_GROWTH_FACTOR_MAX")
def check_guard(s: Settings) -> None:
    """The sandbox mode is one of the known ones, and ``user`` names its user."""
    modes = ("none", "bwrap", "user")  # factory/sandbox.py SANDBOX_MODES (config imports no factory code)
    if s.engine_sandbox not in modes:
        raise SettingsError(f"engine_sandbox={s.engine_sandbox!r} (GIGAFACTORY_ENGINE_SANDBOX) must be one of "
                            f"{', '.join(modes)}")
    if s.engine_sandbox == "user" and not _ENV_NAME_RE.fullmatch(s.engine_sandbox_user.replace("-", "_") or "-"):
        raise SettingsError("engine_sandbox=user needs GIGAFACTORY_ENGINE_SANDBOX_USER: the name of a dedicated "
                            "unprivileged user (for example gf-engine)")
    for name in (n.strip() for n in s.redact_extra_vars.split(",")):
        if name and not _ENV_NAME_RE.fullmatch(name):
            raise SettingsError(f"redact_extra_vars (GIGAFACTORY_REDACT_EXTRA_VARS) names {name!r}, which is not an "
                                "environment variable name: give comma-separated names such as MY_DB_URL")


def check_metrics_port(s: Settings) -> None:
    """``metrics_port`` as a whole port number (the environment gives ``int | None`` fields as
    numbers), 0 to 65535; raises :class:`SettingsError` naming the variable otherwise."""
    p = s.metrics_port
    if p is None:
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p != int(p) or not 0 <= p <= 65535:
        raise SettingsError(f"metrics_port={p!r} (GIGAFACTORY_METRICS_PORT, --metrics-port) must be a port number "
                            "from 0 to 65535 (0: any free port), or unset for no metrics endpoint")
    s.metrics_port = int(p)


def check_log_upload(s: Settings) -> None:
    """Refuse log upload settings that would store nothing useful or never finish."""
    if s.log_upload_max_bytes < LOG_UPLOAD_MIN_BYTES:
        raise SettingsError(f"log_upload_max_bytes (GIGAFACTORY_LOG_UPLOAD_MAX_BYTES) is {s.log_upload_max_bytes}; "
                         f"it must be at least {LOG_UPLOAD_MIN_BYTES} bytes (64 KiB)")
    if not s.log_upload_timeout_s > 0:
        raise SettingsError(f"log_upload_timeout_s (GIGAFACTORY_LOG_UPLOAD_TIMEOUT_S) is {s.log_upload_timeout_s}; "
                         f"it must be a positive number of seconds")


_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")


def check_sync_interval(value: str | None, where: str = "sync_interval") -> str | None:
    """``value`` if it is a valid ``sync_interval`` (``always``, a Go duration such as
    ``2m`` or ``1m30s``, or None for the server's default), else a ValueError naming
    ``where`` (the setting or option it came from) and what to write instead."""
    if value is None or value == "always" or (len(value) <= 32 and _GO_DURATION.match(value)):
        return value
    raise SettingsError(f"{where}={value!r}: expected 'always' (fsync every write: durable, the default) "
                     "or a duration such as '2m' or '30s' (background fsync: faster, but an OS crash "
                     "or power loss can lose acknowledged writes)")


RETENTION_MIN_S = 60.0
"""Floor of ``archive_after_s`` and ``pool_idle_gc_s``: what a retention pass does must not
race the normal flow of a job (its dependents' unblocking, its pool's next submission)."""


LANE_KINDS = ("live", "background", "hosted", "remote", "shadow")
"""Values of ``lane_kind`` (schemas/spend.py: LaneKind)."""
SEAT_COST_INTERVAL_MIN_S = 60.0
SEAT_COST_INTERVAL_MAX_S = 86400.0


def check_ledger(s: Settings) -> None:
    """Refuse ledger settings that would drop or misattribute spend: SettingsError naming the
    variable, the value and what to write."""
    bad = []
    if s.lane_kind not in LANE_KINDS:
        bad.append(f"GIGAFACTORY_LANE_KIND={s.lane_kind!r}: expected one of {', '.join(LANE_KINDS)}")
    for name in ("spend_max_bytes", "spend_max_age_s", "spend_duplicate_window_s"):
        if getattr(s, name) <= 0:
            bad.append(f"GIGAFACTORY_{name.upper()}={getattr(s, name)}: must be > 0")
    if s.spend_duplicate_window_s > s.spend_max_age_s:
        bad.append(f"GIGAFACTORY_SPEND_DUPLICATE_WINDOW_S={s.spend_duplicate_window_s:g}: must not exceed "
                   f"spend_max_age_s ({s.spend_max_age_s:g})")
    if s.spend_metrics_interval_s != 0 and not 30 <= s.spend_metrics_interval_s <= 86400:
        bad.append(f"GIGAFACTORY_SPEND_METRICS_INTERVAL_S={s.spend_metrics_interval_s:g}: must be 0 (off) or "
                   "30 to 86400 seconds")
    if not SEAT_COST_INTERVAL_MIN_S <= s.seat_cost_interval_s <= SEAT_COST_INTERVAL_MAX_S:
        bad.append(f"GIGAFACTORY_SEAT_COST_INTERVAL_S={s.seat_cost_interval_s:g}: must be "
                   f"{SEAT_COST_INTERVAL_MIN_S:g} to {SEAT_COST_INTERVAL_MAX_S:g} seconds")
    if s.seat_costs:
        from gigafactory.schemas.spend import SeatCostError, parse_seat_costs

        try:
            parse_seat_costs(s.seat_costs)
        except SeatCostError as e:
            bad.append(f"GIGAFACTORY_SEAT_COSTS: {e}")
    if bad:
        raise SettingsError("invalid ledger settings: " + "; ".join(bad))


def check_retention(s: Settings) -> None:
    """Raise ValueError naming every retention setting (as its ``GIGAFACTORY_<NAME>``
    variable) whose value would be dangerous, and what to write instead."""
    bad = []
    for name in ("events_max_bytes", "artifacts_max_bytes", "archive_max_bytes", "retention_batch"):
        if getattr(s, name) <= 0:
            bad.append(f"GIGAFACTORY_{name.upper()}={getattr(s, name)}: must be > 0")
    for name in ("artifacts_max_age_s", "archive_max_age_s", "retention_interval_s", "clock_skew_warn_s"):
        if getattr(s, name) <= 0:
            bad.append(f"GIGAFACTORY_{name.upper()}={getattr(s, name)}: must be > 0 seconds")
    for name in ("archive_after_s", "pool_idle_gc_s", "factory_forget_s"):
        if getattr(s, name) < RETENTION_MIN_S:
            bad.append(f"GIGAFACTORY_{name.upper()}={getattr(s, name)}: must be at least {RETENTION_MIN_S:g} seconds")
    if s.archive_max_age_s <= s.archive_after_s:
        bad.append(f"GIGAFACTORY_ARCHIVE_MAX_AGE_S={s.archive_max_age_s}: must exceed archive_after_s "
                   f"({s.archive_after_s:g} s), or records would expire as soon as they are archived")
    if not 0.0 < s.retention_warn_ratio < 1.0:
        bad.append(f"GIGAFACTORY_RETENTION_WARN_RATIO={s.retention_warn_ratio}: must be between 0 and 1 (e.g. 0.8)")
    if bad:
        raise SettingsError("invalid retention settings: " + "; ".join(bad))


def check_auth(s: "Settings") -> None:
    """Identities and TLS (issue 12): a key without its certificate, or a credentials or TLS
    file that does not exist, is refused before anything connects (a typo would otherwise
    connect without TLS or fail later with a less clear error)."""
    if s.tls_key and not s.tls_cert:
        raise SettingsError("tls_key (GIGAFACTORY_TLS_KEY) is set without tls_cert (GIGAFACTORY_TLS_CERT): "
                            "give the certificate the key belongs to, or unset the key")
    for name in ("creds", "tls_cert", "tls_key", "tls_ca"):
        path = getattr(s, name)
        if path and not os.path.isfile(path):
            raise SettingsError(f"{name} (GIGAFACTORY_{name.upper()}) names {path!r}, which is not a file: "
                                "give the path of an existing file")


DEFAULT_HOME_DIRNAME = ".gigafactory"
"""The data folder under the user's home directory when ``GIGAFACTORY_HOME`` is not set."""


def home(environ: Mapping[str, str] | None = None) -> Path:
    """The one data folder of this machine's gigafactory: the embedded broker's store and its
    state file, each factory's outbox, logs, git mirrors and work folders (``factories/``),
    load-test results. ``GIGAFACTORY_HOME`` if set (and not empty), else ``~/.gigafactory``.
    Every default path is under it; nothing else names ``~/.gigafactory``.

    :param environ: the environment to read (default: this process's).
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_HOME, "").strip()
    return Path(raw).expanduser() if raw else Path.home() / DEFAULT_HOME_DIRNAME


def factories_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where a factory keeps its folder (``<home>/factories/<factory id>``) unless given
    ``--data-dir``.

    :param environ: the environment to read (default: this process's).
    """
    return home(environ) / "factories"


def server_state_path() -> Path:
    return home() / "server.json"


def write_server_state(url: str, pid: int) -> None:
    """Record the embedded broker ``pid`` serving ``url``, with the pid's start time, so that a
    later reader does not trust a pid the kernel has since given to another process."""
    p = server_state_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": pid, "pid_created_at": create_time(pid) if pid else None}))
    tmp.replace(p)


def clear_server_state(pid: int) -> None:
    p = server_state_path()
    try:
        if json.loads(p.read_text()).get("pid") == pid:
            p.unlink()
    except (OSError, ValueError):
        pass


def running_embedded_url() -> str | None:
    """The URL of an embedded broker started by ``gigafactory up``/``server`` on this machine,
    None if there is none: the state file's pid must be alive *and* have started when the file
    says (a broker that died without clearing the file leaves a pid the kernel may reuse)."""
    try:
        state = json.loads(server_state_path().read_text())
        pid = int(state.get("pid") or 0)
        created_at = state.get("pid_created_at")
        created_at = float(created_at) if created_at is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if pid and pid_alive(pid, created_at=created_at):
        return state.get("url")
    return None


def resolve_url(flag: str | None) -> str | None:
    """``--nats`` wins, then ``GIGAFACTORY_NATS_URL``, then the selected NATS context's ``url``
    (:mod:`gigafactory.natscontext`), then a running embedded broker; None means there is none
    and the caller decides whether to start one."""
    return flag or os.environ.get(ENV_URL) or nats_context_field("url") or running_embedded_url()


def nats_context_field(name: str) -> str:
    """Field ``name`` of the selected NATS context ("" when none is selected, or it lacks the
    field). A selected context that is unreadable is reported (warning naming the file and the
    fix) and not used: the command goes on as without one."""
    from gigafactory.natscontext import ContextError, selected

    try:
        ctx = selected()
    except ContextError as e:
        import logging

        logging.getLogger(__name__).warning("%s", e)
        return ""
    return getattr(ctx, name) if ctx is not None else ""
