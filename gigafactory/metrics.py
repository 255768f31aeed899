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

from dataclasses import dataclass

# Label vocabularies (a value outside one is exported as ``other``).
HOLD_REASONS = ("capability", "lock", "deps", "backoff", "budget", "other")
"""Why a waiting job is not offered: no live factory offers its requirements (capability),
its ``lock`` is held by another job (lock), it is ``blocked`` on dependencies (deps), its
retry back-off has not elapsed (backoff), a spend budget holds it (budget; once the
economics issue lands), or anything else the scheduler wrote (other)."""
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
DISPATCH_MODES = ("push", "poll")
ROLES = ("coordinator", "factory")

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
"""Dispatch latency: from well under a second (push, a free station) to an hour (a backlog)."""
STAGE_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)
"""Stage durations: seconds (a shell job) to half a day (a long agent run)."""
REPLAY_BUCKETS_S = ()


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
    Spec("gigafactory_dead_letters_total", "counter", ("product",),
         "Jobs that reached stage dead_letter.", "view"),
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
         "Age of the oldest queued job per pool (broker time now minus its submission); 0 when none.", "view"),
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
    Spec("gigafactory_attempts_finished_total", "counter", ("factory",),
         "Attempts this factory ran to the end and reported.", "factory"),
    Spec("gigafactory_handed_back_total", "counter", ("factory",),
         "Jobs this factory handed back unfinished (draining).", "factory"),
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
    Spec("gigafactory_ready", "gauge", ("role", "factory"),
         "1 once ready (coordinator: view replayed and the API answers; factory: registered), else 0.",
         "process"),
)
"""Every metric exported by a gigafactory process: see :class:`Spec`."""

BY_NAME: dict[str, Spec] = {s.name: s for s in CATALOGUE}
assert len(BY_NAME) == len(CATALOGUE), "a metric name is in the catalogue twice"
