"""Prometheus metrics: the catalogue, the per-process registry, and the HTTP endpoints.

The catalogue (:data:`CATALOGUE`) is the single source of truth for every metric a gigafactory
process exports: its exposed name, type, labels and help. Dashboards and alert rules use only
names from it; ``tests/test_metrics.py`` checks that a live fleet exports exactly these.

Rules the catalogue keeps (Prometheus conventions):

- every name starts ``gigafactory_``; counters end ``_total``; durations are ``_seconds``
  histograms or gauges; money is ``_usd``; sizes are ``_bytes``;
- labels are bounded: stage, product, pool, engine, model, class (a failure class), reason (a
  hold reason class), state, idle_reason, mode, kind, role, factory. Never a job id, an epoch,
  a path or free text: a label value outside its vocabulary is folded into ``other``.

Where a figure comes from (``source``):

- ``view``: computed at scrape time from the coordinator's view of ``gf_jobs`` and
  ``gf_factories`` (gauges), or counted as the view sees a job's record change (counters and
  histograms; see :class:`ViewObserver`). Every coordinator watches every job, so with two
  coordinators each counts every transition: aggregate those with ``max``, not ``sum``.
- ``coordinator``: this coordinator's own work (its passes, its quarantines, its replay).
- ``factory``: read at scrape time from each factory's own state and counters, labelled with
  its id (a fleet host runs many factories in one process and one registry).
- ``process``: the process itself (its broker connections, readiness).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass

import orjson
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Label vocabularies (a value outside one is exported as ``other``).
HOLD_REASONS = ("capability", "lock", "deps", "backoff", "budget", "halted", "other")
"""Why a waiting job is not offered: no live factory offers its requirements (capability),
its ``lock`` is held by another job (lock), it is ``blocked`` on dependencies (deps), its
retry back-off has not elapsed (backoff), a spend budget holds it (budget; once the
economics issue lands), the kill switch (halted), or anything else the scheduler wrote (other)."""
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
DISPATCH_MODES = ("push", "poll")
ROLES = ("coordinator", "factory")

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
"""Dispatch latency: from well under a second (push, a free station) to an hour (a backlog)."""
STAGE_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)
"""Stage durations: seconds (a shell job) to half a day (a long agent run)."""


@dataclass(frozen=True)
class Spec:
    """One metric of the catalogue.

    :param name: the exposed name (counters with their ``_total``; a histogram's series are
        ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``).
    :param kind: ``counter``, ``gauge`` or ``histogram``.
    :param labels: its label names, in order.
    :param help: what it measures, in its unit.
    :param source: where it comes from: ``view``, ``coordinator``, ``factory`` or ``process``.
    :param buckets: a histogram's upper bounds, in its unit.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    source: str
    buckets: tuple[float, ...] = ()

    @property
    def base(self) -> str:
        """The name prometheus-client wants (a counter without ``_total``)."""
        return self.name[:-len("_total")] if self.kind == "counter" else self.name


CATALOGUE: tuple[Spec, ...] = (
    # -- jobs (coordinator, from its view) -------------------------------------------------------
    Spec("gigafactory_jobs", "gauge", ("stage", "product"),
         "Jobs in gf_jobs by stage and product, as this coordinator's view holds them.", "view"),
    Spec("gigafactory_jobs_submitted_total", "counter", ("product",),
         "Jobs that entered gf_jobs (submitted) while this coordinator watched.", "view"),
    Spec("gigafactory_jobs_shipped_total", "counter", ("product",),
         "Jobs that reached stage shipped.", "view"),
    Spec("gigafactory_attempt_failures_total", "counter", ("product", "class"),
         "Attempts that ended failing, by failure class (timeout, crash, verify_failed, lease_expired, ...), "
         "whether or not the job is retried.", "view"),
    Spec("gigafactory_jobs_failed_total", "counter", ("product", "class"),
         "Jobs that reached stage failed (no retry left or not retried), by their last failure class.", "view"),
    Spec("gigafactory_dead_letters_total", "counter", ("product", "class"),
         "Jobs that reached stage dead_letter (retries exhausted), by their last failure class.", "view"),
    Spec("gigafactory_retries_total", "counter", ("product",),
         "Jobs sent back to queued using one of their retries (retries_used went up).", "view"),
    Spec("gigafactory_requeues_total", "counter", ("product",),
         "Jobs sent back to queued without using a retry: handed back by a draining factory, "
         "an operator's requeue, a rebase.", "view"),
    Spec("gigafactory_leases_reclaimed_total", "counter", ("product",),
         "Leases the reaper reclaimed: a leased job whose holder stopped renewing "
         "(its attempt ended lease_expired).", "view"),
    Spec("gigafactory_queue_depth", "gauge", ("pool",),
         "Queued jobs per dispatch pool.", "view"),
    Spec("gigafactory_queue_oldest_age_seconds", "gauge", ("pool",),
         "Age of the oldest queued job per pool: broker time now minus its submission (a retried job "
         "counts from its first submission); the series is absent when the pool has nothing queued.", "view"),
    Spec("gigafactory_pool_live_factories", "gauge", ("pool",),
         "Live factories that offer every requirement of a pool with queued jobs (0: nothing can take "
         "them; their jobs are held for capability).", "view"),
    Spec("gigafactory_jobs_held", "gauge", ("pool", "reason"),
         "Waiting jobs not offered to any factory, by hold reason class: capability, lock, deps, "
         "backoff, budget, other.", "view"),
    Spec("gigafactory_dispatch_latency_seconds", "histogram", ("pool",),
         "From submission to the claim of the job's first attempt (broker time).", "view", LATENCY_BUCKETS_S),
    Spec("gigafactory_stage_duration_seconds", "histogram", ("stage",),
         "Time a job spent in a stage before leaving it (broker time; only stages this coordinator "
         "saw the job enter).", "view", STAGE_BUCKETS_S),
    Spec("gigafactory_tokens_total", "counter", ("engine", "model", "product", "kind"),
         "Model tokens of ended attempts, from their usage records, by kind: input, output, cache_read, "
         "cache_write. Engines that report no usage (shell) add nothing.", "view"),
    Spec("gigafactory_cost_usd_total", "counter", ("engine", "model", "product"),
         "Cost in US dollars of ended attempts, from their usage records (reported or estimated).", "view"),
    # -- factories and stations, as the coordinator sees them --------------------------------------
    Spec("gigafactory_factories_live", "gauge", ("mode",),
         "Live factories (up, heartbeat within three periods) by dispatch mode: push, or poll (some pool "
         "fell back to polling the queue index).", "view"),
    Spec("gigafactory_fleet_stations", "gauge", ("state", "idle_reason"),
         "Stations of the live factories by state (busy, idle) and idle reason, from their heartbeats.", "view"),
    Spec("gigafactory_view_jobs", "gauge", (),
         "Job records in this coordinator's view.", "coordinator"),
    Spec("gigafactory_view_factories", "gauge", (),
         "Factory records in this coordinator's view.", "coordinator"),
    Spec("gigafactory_view_replay_seconds", "gauge", (),
         "How long this coordinator's first replay of gf_jobs and gf_factories took (0 until done).",
         "coordinator"),
    Spec("gigafactory_records_quarantined_total", "counter", (),
         "gf_jobs revisions this coordinator quarantined (poison records).", "coordinator"),
    # -- identities and signed holder writes (issue 12, helper auth) ----------------------------
    Spec("gigafactory_forged_writes_total", "counter", (),
         "gf_jobs revisions in a leased stage whose holder signature was missing or wrong (written by an "
         "identity that does not hold the lease), quarantined by this coordinator.", "coordinator"),
    Spec("gigafactory_reaper_passes_total", "counter", (),
         "Reaper passes this coordinator completed (a flat line: the reaper is not running).", "coordinator"),
    Spec("gigafactory_dispatch_passes_total", "counter", (),
         "Dispatch passes this coordinator ran.", "coordinator"),
    Spec("gigafactory_dispatch_errors_total", "counter", (),
         "Dispatch publishes that failed (the push path is down; jobs stay queued for polling).", "coordinator"),
    # -- each factory (labelled with its id) ------------------------------------------------------
    Spec("gigafactory_claims_total", "counter", ("factory",),
         "Jobs this factory claimed (a won compare-and-set).", "factory"),
    Spec("gigafactory_claim_conflicts_total", "counter", ("factory",),
         "Claims this factory lost to another (the record changed first).", "factory"),
    Spec("gigafactory_claims_skipped_total", "counter", ("factory",),
         "Dispatch offers this factory passed over without a claim write (the job was gone, no longer "
         "queued, in its back-off, or no engine seat was free here).", "factory"),
    Spec("gigafactory_attempts_finished_total", "counter", ("factory",),
         "Attempts this factory ran to the end and reported.", "factory"),
    Spec("gigafactory_handed_back_total", "counter", ("factory",),
         "Jobs this factory handed back unfinished, without using a retry (draining, or the job's lock "
         "held elsewhere).", "factory"),
    Spec("gigafactory_fenced_writes_refused_total", "counter", ("factory",),
         "Writes this factory made under an epoch that was no longer current, refused by the fence.", "factory"),
    Spec("gigafactory_self_fenced_total", "counter", ("factory",),
         "Runs this factory stopped itself because its lease could not be renewed in time.", "factory"),
    Spec("gigafactory_results_quarantined_total", "counter", ("factory",),
         "Results this factory quarantined (their epoch turned stale: kept on disk, never shipped).", "factory"),
    Spec("gigafactory_outbox_depth", "gauge", ("factory",),
         "Events and results waiting in this factory's local outbox for the broker.", "factory"),
    Spec("gigafactory_outbox_oldest_age_seconds", "gauge", ("factory",),
         "Age of the oldest item in this factory's outbox (this machine's clock); 0 when empty.", "factory"),
    Spec("gigafactory_stations", "gauge", ("factory", "state", "idle_reason"),
         "This factory's stations by state (busy, idle) and idle reason (empty when busy).", "factory"),
    Spec("gigafactory_seats_in_use", "gauge", ("factory", "engine"),
         "Stations running each engine on this factory.", "factory"),
    Spec("gigafactory_seats_limit", "gauge", ("factory", "engine"),
         "The seat limit of each engine that has one on this factory.", "factory"),
    Spec("gigafactory_pools_served", "gauge", ("factory", "mode"),
         "Pools this factory pulls from, by dispatch mode (push or poll).", "factory"),
    Spec("gigafactory_events_dropped_total", "counter", ("factory",),
         "Audit events this factory gave up on (its queue was full).", "factory"),
    # -- the process ----------------------------------------------------------------------------
    Spec("gigafactory_broker_connected", "gauge", ("role", "factory"),
         "1 while this connection to the broker is up, else 0 (factory is empty for a coordinator's).",
         "process"),
    Spec("gigafactory_broker_reconnects_total", "counter", ("role", "factory"),
         "Reconnections of this connection to the broker.", "process"),
    Spec("gigafactory_event_loop_lag_seconds", "gauge", (),
         "How late this process's event loop last woke a timer (a busy or stalled loop shows here).",
         "process"),
    Spec("gigafactory_jetstream_storage_bytes", "gauge", (),
         "File storage the broker account uses (JetStream account info, read by the coordinator at scrape).",
         "coordinator"),
    Spec("gigafactory_jetstream_storage_limit_bytes", "gauge", (),
         "The account's file storage limit (-1: no limit set for the account).", "coordinator"),
    Spec("gigafactory_ready", "gauge", ("role", "factory"),
         "1 once ready (coordinator: view replayed and the API answers; factory: registered), else 0.",
         "process"),
    # -- the spend ledger and invoices (issue 13, helper ledger) ------------------------------------
    Spec("gigafactory_spend_usd_total", "counter", ("factory", "provider", "model", "window", "lane_kind", "source"),
         "US dollars this factory wrote to the spend ledger (GF_SPEND): usage while attempts run, their final "
         "records and fixed seat costs, by provider, model, funding window, lane kind and cost source "
         "(reported, priced, estimated, unknown, fixed).", "factory"),
    Spec("gigafactory_spend_attribution_coverage_ratio", "gauge", (),
         "Spend records with a complete attribution (lane, lane kind, job, product, engine, provider, model, "
         "funding window) over all, at the coordinator's last ledger pass (1 = every dollar has an owner).",
         "coordinator"),
    Spec("gigafactory_spend_unfunded_usd", "gauge", (),
         "US dollars in the ledger drawn from the 'unfunded' window (no funding window funds them), at the "
         "coordinator's last ledger pass.", "coordinator"),
    Spec("gigafactory_invoice_drift_usd", "gauge", ("provider", "model"),
         "Ledger dollars matched to imported invoice lines minus the dollars billed, per provider and model "
         "(negative: the factories' reported/priced figures undercount), at the last ledger pass.", "coordinator"),
    Spec("gigafactory_invoice_drift_ratio", "gauge", ("provider", "model"),
         "Invoice drift over the dollars billed, per provider and model (absent when nothing was billed).",
         "coordinator"),
    # -- the fleet as capital: idle, lanes, budgets, throughput per dollar (issue 13, budget) -----
    Spec("gigafactory_idle_classification_coverage_ratio", "gauge", (),
         "Idle stations of live factories whose idle reason is a known class, over idle stations (1 when none "
         "is idle); the floor is 1. Over a window: avg_over_time, or 'gigafactory report idle'.", "view"),
    Spec("gigafactory_lane_allocation_ratio", "gauge", (),
         "Busy stations of live factories over their stations, now (0 with none); sustained allocation is "
         "avg_over_time of it (floor 0.5), or 'gigafactory report lanes'.", "view"),
    Spec("gigafactory_merge_queue_jobs", "gauge", (),
         "Jobs waiting between a passed attempt and shipping (review and testing): merge-queue occupancy.", "view"),
    Spec("gigafactory_merge_queue_refill_seconds", "gauge", (),
         "How long the merge queue last stayed empty before a job entered it again (0 until it has been empty).",
         "view"),
    Spec("gigafactory_budget_enforcement", "gauge", (),
         "1 when budget enforcement is on (GIGAFACTORY_PIPELINE_BUDGET_ENFORCEMENT), 0 in pilot mode.",
         "coordinator"),
    Spec("gigafactory_budget_daily_usd", "gauge", (),
         "Today's pipeline budget in dollars as last computed from the business signals.", "coordinator"),
    Spec("gigafactory_budget_residual_usd", "gauge", (),
         "Today's budget less the ledger's spend since midnight UTC, in dollars.", "coordinator"),
    Spec("gigafactory_features_shipped_total", "counter", (),
         "Features this coordinator wrote to pipeline_runs since it started.", "coordinator"),
    Spec("gigafactory_features_cost_usd_total", "counter", (),
         "The cost in dollars of those features (their pipeline_runs rows).", "coordinator"),
    Spec("gigafactory_throughput_per_usd", "gauge", (),
         "Validated throughput per funded dollar: features shipped per dollar, over this coordinator's runs "
         "(0 until one cost something).", "coordinator"),
    # -- the kill switch (issue 12, helper guard) -------------------------------------------------
    Spec("gigafactory_halted", "gauge", ("scope", "mode"),
         "1 per halt in force (scope: 'fleet' or 'product:<name>'; mode: drain or stop), as this coordinator "
         "read gf_control/halt; no series: nothing is halted.", "coordinator"),
)
"""Every metric exported by a gigafactory process: see :class:`Spec`."""

FACTORY_STATS: dict[str, str] = {
    "gigafactory_claims_total": "claims",
    "gigafactory_claim_conflicts_total": "claim_conflicts",
    "gigafactory_claims_skipped_total": "claim_skipped",
    "gigafactory_attempts_finished_total": "finished",
    "gigafactory_handed_back_total": "handed_back",
    "gigafactory_fenced_writes_refused_total": "fenced_writes",
    "gigafactory_self_fenced_total": "self_fenced",
    "gigafactory_results_quarantined_total": "quarantined",
    "gigafactory_events_dropped_total": "events_dropped",
}
"""The factory counters read from its ``stats`` (metric name -> key): the load suite maps
them back to its phase's figures."""

BY_NAME: dict[str, Spec] = {s.name: s for s in CATALOGUE}
assert len(BY_NAME) == len(CATALOGUE), "a metric name is in the catalogue twice"


# -- the registry ----------------------------------------------------------------------------------

log = logging.getLogger(__name__)

# A ``<name>_created`` series per counter and histogram doubles what a scrape carries and no
# dashboard of ours reads it.
prometheus_client.disable_created_metrics()

LABEL_VALUE_MAX_CHARS = 100
"""A label value (a pool, product, engine or model name) longer than this is cut: the names
are bounded by their own validation, this bounds what a bad record could add."""
LOOP_TICK_S = 0.5
"""How often the event-loop probe wakes (``gigafactory_event_loop_lag_seconds``, /healthz)."""
LOOP_STALL_S = 5.0
"""/healthz answers 503 when the event loop's probe last woke longer ago than this."""
SCRAPE_REFRESH_TIMEOUT_S = 2.0
"""Longest a scrape waits for the broker's account info before answering without it."""
REQUEST_MAX_BYTES = 8192
"""An HTTP request line and headers larger than this are refused (413)."""
REQUEST_TIMEOUT_S = 5.0
"""A client that has not sent its request within this many seconds is dropped."""
_FAILURE_CLASSES = frozenset(
    {"timeout", "verify_failed", "crash", "lease_expired", "budget_exceeded", "setup_failed", "rate_limited",
     "auth_failed", "context_overflow", "scope_violation", "merge_conflict"})


def _label(value: object) -> str:
    """A bounded label value (empty for None)."""
    return "" if value is None else str(value)[:LABEL_VALUE_MAX_CHARS]


def hold_class(reason: str) -> str:
    """The :data:`HOLD_REASONS` class of a hold reason the scheduler wrote (pure)."""
    if reason.startswith("waiting for lock"):
        return "lock"
    if reason.startswith(("no live factory", "no single live factory")):
        return "capability"
    if reason.startswith("halted"):
        return "halted"
    if "budget" in reason:
        return "budget"
    return "other"


class ViewObserver:
    """Counts what the coordinator's view sees change in a job record: submissions, ships,
    failures by class, dead letters, retries, requeues, reclaimed leases, tokens and cost of
    ended attempts, dispatch latency and stage durations. Called as a view listener
    (``fn(old, new)``, each a ``JobState`` or None) for every change; before the first replay
    is done, and for a revision already seen (a re-watch replays the latest values), it
    counts nothing, so a restart never counts history again.

    :param metrics: the registry's instruments.
    :param synced: whether the view's first replay of ``gf_jobs`` is done.
    """

    def __init__(self, metrics: "Metrics", synced) -> None:
        self.m = metrics
        self.synced = synced
        self.entered: dict[str, tuple[str, float]] = {}
        """job id -> (the stage it entered while watched, broker time then): stage durations.
        Bounded by the jobs in the view: an entry leaves with its job or its terminal stage."""
        self.errors = 0

    def __call__(self, old, new) -> None:
        # Never raise: the view treats a listener's exception as the record's fault.
        try:
            self._observe(old, new)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("metrics: a job change could not be counted (counted as an error, not retried)")

    def _observe(self, old, new) -> None:
        if new is None:
            if old is not None:
                self.entered.pop(old.key, None)  # not old.record: a finished job's is packed
            return
        if not self.synced() or (old is not None and old.revision == new.revision):
            return
        m, rec = self.m, new.record
        product = _label(rec.manifest.product)
        stage = str(rec.stage)
        if old is None:
            if rec.attempt == 0 and not rec.attempts:
                m.counter("gigafactory_jobs_submitted_total").labels(product).inc()
            self._enter(rec.id, stage, new.ts)
            return
        o = old.record
        self._attempts_ended(o, rec, product)
        if rec.retries_used > o.retries_used:
            m.counter("gigafactory_retries_total").labels(product).inc()
        if str(o.stage) == stage:
            return
        if stage == "queued" and str(o.stage) != "blocked" and rec.retries_used <= o.retries_used:
            m.counter("gigafactory_requeues_total").labels(product).inc()
        elif stage == "shipped":
            m.counter("gigafactory_jobs_shipped_total").labels(product).inc()
        elif stage == "failed":
            m.counter("gigafactory_jobs_failed_total").labels(product, _failure(rec.last_failure)).inc()
        elif stage == "dead_letter":
            m.counter("gigafactory_dead_letters_total").labels(product, _failure(rec.last_failure)).inc()
        # The first claim only: into assigned, or straight into building (a claim that started
        # its run, the claim_started shortcut), never the start that follows an assigned claim.
        claimed = stage == "assigned" or (stage == "building" and str(o.stage) == "queued")
        if claimed and rec.attempt == 1 and len(rec.attempts) == 1:
            m.histogram("gigafactory_dispatch_latency_seconds").labels(_label(rec.pool)).observe(
                max(0.0, new.ts - rec.submitted_at))
        seen = self.entered.get(rec.id)
        if seen is not None and seen[0] == str(o.stage):
            m.histogram("gigafactory_stage_duration_seconds").labels(seen[0]).observe(max(0.0, new.ts - seen[1]))
        self._enter(rec.id, stage, new.ts)

    def _enter(self, jid: str, stage: str, ts: float) -> None:
        if stage in ("shipped", "failed", "dead_letter"):
            self.entered.pop(jid, None)
        else:
            self.entered[jid] = (stage, ts)

    def _attempts_ended(self, o, rec, product: str) -> None:
        """Count each attempt that ended between ``o`` and ``rec`` (its outcome left ``running``)."""
        before = {a.epoch: a.outcome for a in o.attempts}
        for a in rec.attempts:
            if a.outcome == "running" or before.get(a.epoch, "running") != "running":
                continue
            if a.outcome in _FAILURE_CLASSES:
                self.m.counter("gigafactory_attempt_failures_total").labels(product, a.outcome).inc()
                if a.outcome == "lease_expired":
                    self.m.counter("gigafactory_leases_reclaimed_total").labels(product).inc()
            u = a.usage
            if u is None:
                continue
            engine, model = _label(a.engine or a.attribution.engine), _label(u.model or a.attribution.model)
            for kind, n in (("input", u.input_tokens), ("output", u.output_tokens),
                            ("cache_read", u.cache_read_tokens), ("cache_write", u.cache_write_tokens)):
                if n:
                    self.m.counter("gigafactory_tokens_total").labels(engine, model, product, kind).inc(n)
            if u.cost_usd:
                self.m.counter("gigafactory_cost_usd_total").labels(engine, model, product).inc(u.cost_usd)


def _failure(cls) -> str:
    return str(cls) if cls is not None and str(cls) in _FAILURE_CLASSES else "other"


class Metrics:
    """One process's registry: the instruments counted as things happen, and a collector that
    reads the coordinators' and factories' state at scrape time. A fleet host's many factories
    share it (each labelled with its id). Coordinators and factories are held weakly: one that
    is gone stops being reported without anyone removing it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._instruments: dict[str, Counter | Histogram] = {}
        for spec in CATALOGUE:
            if spec.source != "view" or spec.kind == "gauge":
                continue
            if spec.kind == "counter":
                self._instruments[spec.name] = Counter(spec.base, spec.help, spec.labels, registry=self.registry)
            else:
                self._instruments[spec.name] = Histogram(spec.base, spec.help, spec.labels, registry=self.registry,
                                                         buckets=spec.buckets)
        self.coordinators: weakref.WeakSet = weakref.WeakSet()
        self.factories: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.observed: weakref.WeakSet = weakref.WeakSet()
        """Coordinators whose view counts into this registry (only the first of a process: two
        would count each transition twice)."""
        self.loop_lag_s = 0.0
        self.loop_tick_at = time.monotonic()
        self.storage: tuple[int, int] | None = None
        self.registry.register(_StateCollector(self))

    def counter(self, name: str) -> Counter:
        return self._instruments[name]  # type: ignore[return-value]

    def histogram(self, name: str) -> Histogram:
        return self._instruments[name]  # type: ignore[return-value]

    def add_coordinator(self, coord) -> None:
        """Report ``coord`` (a :class:`~gigafactory.coordinator.service.Coordinator`): its view's
        gauges at scrape time; and, if it is this process's first, count its view's changes."""
        self.coordinators.add(coord)
        if not len(self.observed):
            self.observed.add(coord)
            coord.view.job_listeners.append(ViewObserver(self, coord.view.jobs_synced.is_set))

    def add_factory(self, factory) -> None:
        """Report ``factory`` (a :class:`~gigafactory.factory.agent.Factory`), labelled with its id."""
        self.factories[factory.id] = factory

    # -- what the endpoints answer ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Before a scrape: read what needs a broker round trip (the account's storage), bounded
        by SCRAPE_REFRESH_TIMEOUT_S; on failure the figures are left out, not stale."""
        self.storage = None
        coord = next(iter(self.coordinators), None)
        if coord is None or not coord.broker.nc.is_connected:
            return
        try:
            info = await asyncio.wait_for(coord.broker.js.account_info(), timeout=SCRAPE_REFRESH_TIMEOUT_S)
            self.storage = (int(info.storage or 0), int(info.limits.max_storage if info.limits else -1))
        except Exception as e:  # the broker is slow or gone: /metrics still answers
            log.debug("metrics: account info not read (%s: %s)", type(e).__name__, e)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> tuple[bool, dict]:
        """/healthz: the process is up and its event loop woke its probe within LOOP_STALL_S."""
        since = time.monotonic() - self.loop_tick_at
        ok = since <= LOOP_STALL_S
        return ok, {"ok": ok, "loop_lag_s": round(self.loop_lag_s, 4), "loop_tick_age_s": round(since, 3)}

    def readiness(self) -> tuple[bool, dict]:
        """/readyz: every coordinator and factory of the process is connected to the broker and
        ready (coordinator: its view replayed and its API answers; factory: registered)."""
        parts: dict[str, dict] = {}
        for c in list(self.coordinators):
            parts[f"coordinator {c.name}"] = {"broker": c.broker.nc.is_connected, "ready": c.ready.is_set()}
        for fid, f in list(self.factories.items()):
            if f.record.status == "down":
                continue
            parts[f"factory {fid}"] = {"broker": f.broker.nc.is_connected, "ready": f.ready.is_set()}
        ok = bool(parts) and all(p["broker"] and p["ready"] for p in parts.values())
        return ok, {"ok": ok, "parts": parts}

    async def loop_probe(self, stop: asyncio.Event) -> None:
        """Wake every LOOP_TICK_S and note how late the loop woke us (the lag)."""
        while not stop.is_set():
            t0 = time.monotonic()
            self.loop_tick_at = t0
            try:
                await asyncio.wait_for(stop.wait(), timeout=LOOP_TICK_S)
            except asyncio.TimeoutError:
                pass
            self.loop_lag_s = max(0.0, time.monotonic() - t0 - LOOP_TICK_S)


class _StateCollector:
    """The gauges and counters read from state the processes hold, at scrape time."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self):
        return []

    def collect(self):
        fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for spec in CATALOGUE:
            if spec.name in self.m._instruments:
                continue
            cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            fams[spec.name] = cls(spec.base, spec.help, labels=spec.labels)
        coord = next(iter(self.m.coordinators), None)
        if coord is not None:
            self._coordinator(coord, fams)
        for fid, f in sorted(self.m.factories.items()):
            if f.record.status != "down":
                self._factory(fid, f, fams)
        fams["gigafactory_event_loop_lag_seconds"].add_metric((), self.m.loop_lag_s)
        if self.m.storage is not None:
            fams["gigafactory_jetstream_storage_bytes"].add_metric((), self.m.storage[0])
            fams["gigafactory_jetstream_storage_limit_bytes"].add_metric((), self.m.storage[1])
        yield from fams.values()

    def _coordinator(self, c, fams) -> None:
        view, sched = c.view, c.sched
        add = lambda name, labels, v: fams[name].add_metric(labels, v)  # noqa: E731
        add("gigafactory_broker_connected", ("coordinator", ""), 1 if c.broker.nc.is_connected else 0)
        add("gigafactory_broker_reconnects_total", ("coordinator", ""), c.broker.nc.stats["reconnects"])
        add("gigafactory_ready", ("coordinator", ""), 1 if c.ready.is_set() else 0)
        add("gigafactory_view_jobs", (), len(view.jobs))
        add("gigafactory_view_factories", (), len(view.factories))
        add("gigafactory_view_replay_seconds", (), c.replay_s or 0.0)
        add("gigafactory_records_quarantined_total", (), sched.poisoned_total)
        add("gigafactory_reaper_passes_total", (), sched.reap_rounds)
        add("gigafactory_forged_writes_total", (), getattr(sched, "forged_total", 0))
        add("gigafactory_dispatch_passes_total", (), sched.passes)
        add("gigafactory_dispatch_errors_total", (), sched.dispatch_errors)
        self._ledger(getattr(c, "ledger", None), add)
        halt = getattr(sched, "halt", None)
        if halt is not None:
            if halt.fleet is not None:
                add("gigafactory_halted", ("fleet", halt.fleet.mode), 1)
            for product, h in sorted(halt.products.items()):
                add("gigafactory_halted", (f"product:{_label(product)}", h.mode), 1)
        if not view.jobs_synced.is_set():
            return  # half a replay would look like jobs vanishing
        now = sched.broker_now_estimate()
        depth = self._jobs(c, now, add)
        self._fleet(c, now, depth, add)
        self._capital(c, add)

    @staticmethod
    def _capital(c, add) -> None:
        """The fleet-as-capital figures (issue 13): lanes, idle coverage, merge queue, budget, runs."""
        from gigafactory.economics.idle import CLASSES

        live = c.view.live_factories(c.sched.broker_now_estimate(), c.settings.heartbeat_s)
        stations = [s for f in live for s in f.record.stations]
        busy = sum(1 for s in stations if str(s.state) == "busy")
        idle = [s for s in stations if str(s.state) != "busy"]
        known = sum(1 for s in idle if s.idle_reason is not None and str(s.idle_reason) in CLASSES)
        add("gigafactory_lane_allocation_ratio", (), busy / len(stations) if stations else 0.0)
        add("gigafactory_idle_classification_coverage_ratio", (), known / len(idle) if idle else 1.0)
        mq = c.merge_queue
        add("gigafactory_merge_queue_jobs", (), mq.occupancy)
        add("gigafactory_merge_queue_refill_seconds", (), mq.last_refill_s)
        gov = c.sched.governor
        add("gigafactory_budget_enforcement", (), 1 if gov.enforcement else 0)
        daily = gov.budget.daily_pipeline_budget_usd if gov.budget is not None else float("nan")  # NaN: not yet
        add("gigafactory_budget_daily_usd", (), daily)
        add("gigafactory_budget_residual_usd", (), daily - gov.spent_today_usd)
        add("gigafactory_features_shipped_total", (), c.runs.features)
        add("gigafactory_features_cost_usd_total", (), c.runs.features_cost_usd)
        add("gigafactory_throughput_per_usd", (), c.runs.features / c.runs.features_cost_usd
            if c.runs.features_cost_usd > 0 else 0.0)

    @staticmethod
    def _ledger(ledger, add) -> None:
        """The coordinator's last ledger pass (economics/ledger.py): absent until one ran."""
        if ledger is None or ledger.coverage_ratio is None:
            return
        add("gigafactory_spend_attribution_coverage_ratio", (), ledger.coverage_ratio)
        add("gigafactory_spend_unfunded_usd", (), ledger.unfunded_usd or 0.0)
        for (provider, model), (usd, ratio) in sorted(ledger.drift.items()):
            add("gigafactory_invoice_drift_usd", (_label(provider), _label(model)), usd)
            if ratio is not None:
                add("gigafactory_invoice_drift_ratio", (_label(provider), _label(model)), ratio)

    @staticmethod
    def _jobs(c, now: float, add) -> dict[str, int]:
        """Jobs by stage and product, queue depth and age, holds; returns the queue depth by pool."""
        view, sched = c.view, c.sched
        by: dict[tuple[str, str], int] = defaultdict(int)
        depth: dict[str, int] = defaultdict(int)
        oldest: dict[str, float] = {}
        held: dict[tuple[str, str], int] = defaultdict(int)
        for jid, st in view.jobs.items():
            stage = str(st.stage)
            by[(stage, _label(st.product))] += 1
            if stage not in ("blocked", "queued"):
                continue  # st.record would decode a finished job's packed record: not needed here
            rec = st.record
            if stage == "blocked":
                held[(_label(rec.pool), "deps")] += 1
            elif stage == "queued":
                pool = _label(rec.pool)
                depth[pool] += 1
                oldest[pool] = min(oldest.get(pool, rec.submitted_at), rec.submitted_at)
                reason = sched.held.get(jid)
                if st.ts + rec.backoff_s > now:
                    held[(pool, "backoff")] += 1
                elif reason:
                    held[(pool, hold_class(reason))] += 1
        for (stage, product), n in sorted(by.items()):
            add("gigafactory_jobs", (stage, product), n)
        for pool, n in sorted(depth.items()):
            add("gigafactory_queue_depth", (pool,), n)
            add("gigafactory_queue_oldest_age_seconds", (pool,), max(0.0, now - oldest[pool]))
        for (pool, reason), n in sorted(held.items()):
            add("gigafactory_jobs_held", (pool, reason), n)
        return depth

    @staticmethod
    def _fleet(c, now: float, depth: dict[str, int], add) -> None:
        """Live factories by mode, per pool with queued jobs, and their stations."""
        view, sched = c.view, c.sched
        live = view.live_factories(now, c.settings.heartbeat_s)
        reqs = sched.queue.requirements
        for pool in sorted(depth):
            want = reqs.get(pool)
            if want is not None:
                add("gigafactory_pool_live_factories", (pool,), sum(1 for f in live if not f.offers.missing(want)))
        modes = dict.fromkeys(DISPATCH_MODES, 0)
        stations: dict[tuple[str, str], int] = defaultdict(int)
        for f in live:
            mode = f.record.dispatch_mode if f.record.dispatch_mode in DISPATCH_MODES else "push"
            modes[mode] += 1
            for s in f.record.stations:
                stations[(str(s.state), "" if s.idle_reason is None or str(s.state) == "busy"
                          else str(s.idle_reason))] += 1
        for mode, n in modes.items():
            add("gigafactory_factories_live", (mode,), n)
        for (state, reason), n in sorted(stations.items()):
            add("gigafactory_fleet_stations", (state, reason), n)

    def _factory(self, fid: str, f, fams) -> None:
        add = lambda name, labels, v: fams[name].add_metric(labels, v)  # noqa: E731
        st = f.stats
        for name, key in FACTORY_STATS.items():
            add(name, (fid,), st.get(key, 0))
        add("gigafactory_broker_connected", ("factory", fid), 1 if f.broker.nc.is_connected else 0)
        add("gigafactory_broker_reconnects_total", ("factory", fid), f.broker.nc.stats["reconnects"])
        add("gigafactory_ready", ("factory", fid), 1 if f.ready.is_set() else 0)
        try:
            depth, oldest_at = f.outbox.depth_and_oldest()
        except Exception as e:  # closed (drained) or the disk failing: leave the figures out
            log.debug("metrics: outbox of %s not read (%s)", fid, e)
        else:
            add("gigafactory_outbox_depth", (fid,), depth)
            add("gigafactory_outbox_oldest_age_seconds", (fid,), max(0.0, time.time() - oldest_at) if depth else 0.0)
        counts: dict[tuple[str, str], int] = defaultdict(int)
        idle_now = None
        for s in f.record.stations:
            if str(s.state) == "busy":
                counts[("busy", "")] += 1
            else:
                # The record's reason is refreshed at heartbeats; a scrape asks now.
                idle_now = idle_now if idle_now is not None else str(f._idle_reason())
                counts[("idle", idle_now)] += 1
        for (state, reason), n in sorted(counts.items()):
            add("gigafactory_stations", (fid, state, reason), n)
        spend = getattr(f, "spend", None)
        for key, usd in sorted(spend.spend_usd.items() if spend is not None else ()):
            add("gigafactory_spend_usd_total", (fid, *(_label(k) for k in key)), usd)
        for engine, n in sorted(f.engine_running.items()):
            add("gigafactory_seats_in_use", (fid, _label(engine)), n)
        for engine, n in sorted(f.record.seats.items()):
            add("gigafactory_seats_limit", (fid, _label(engine)), n)
        modes = dict.fromkeys(DISPATCH_MODES, 0)
        for p in f.pools.values():
            if p.mode in modes:
                modes[p.mode] += 1
        for mode, n in modes.items():
            add("gigafactory_pools_served", (fid, mode), n)


_PROCESS: Metrics | None = None


def process_metrics() -> Metrics:
    """This process's registry (made on first use)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = Metrics()
    return _PROCESS


# -- the HTTP endpoints ---------------------------------------------------------------------------


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1 in the process's event loop (so
    a scrape reads state between two steps of the loop, never half-way through one; and a
    stalled loop does not answer, which a health check counts as down).

    :param metrics: the registry to serve.
    :param host: the address to listen on.
    :param port: the TCP port (0: a free one; :attr:`port` says which after :meth:`start`).
    """

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.m = metrics
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._stop = asyncio.Event()
        self._probe: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> "MetricsServer":
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=REQUEST_MAX_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        self._probe = asyncio.create_task(self.m.loop_probe(self._stop), name="metrics-loop-probe")
        log.info("metrics on %s/metrics (health %s/healthz, readiness %s/readyz)", self.url, self.url, self.url)
        return self

    async def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._probe is not None:
            await asyncio.gather(self._probe, return_exceptions=True)

    async def __aenter__(self) -> "MetricsServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=REQUEST_TIMEOUT_S)
            except (asyncio.LimitOverrunError, ValueError):
                await self._send(writer, 413, "text/plain", b"request headers too large\n")
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3:
                await self._send(writer, 400, "text/plain", b"bad request line\n")
                return
            method, path = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await self._send(writer, 405, "text/plain", b"only GET\n")
                return
            if path == b"/metrics":
                await self.m.refresh()
                await self._send(writer, 200, CONTENT_TYPE_LATEST, self.m.exposition(), head_only=method == b"HEAD")
            elif path in (b"/healthz", b"/readyz"):
                ok, body = self.m.health() if path == b"/healthz" else self.m.readiness()
                await self._send(writer, 200 if ok else 503, "application/json", orjson.dumps(body) + b"\n",
                                 head_only=method == b"HEAD")
            else:
                await self._send(writer, 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n")
        except Exception:
            log.exception("metrics: request failed")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes,
                    head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  413: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + (b"" if head_only else body))
        await writer.drain()


async def serve(host: str, port: int | None) -> MetricsServer | None:
    """Start this process's metrics endpoints on ``host``:``port`` (None: metrics are off, and
    None is returned). The caller closes the server."""
    if port is None:
        return None
    return await MetricsServer(process_metrics(), host, port).start()
