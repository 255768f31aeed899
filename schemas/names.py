"""Subject, stream, bucket and key names: the broker layout in one place.

Everything here is inspectable with the ``nats`` CLI, for example::

    nats kv get gf_jobs <job-id>
    nats kv ls gf_factories
    nats stream view GF_EVENTS --subject 'gf.events.<job-id>.>'
    nats micro ls
"""

from __future__ import annotations

import re

JOBS_BUCKET = "gf_jobs"
"""One record per job (key: job id); every change is a compare-and-set on the key's revision."""
QUEUE_BUCKET = "gf_queue"
"""Index of queued jobs by pool (key: ``<pool>.<job-id>``), for the polling fallback: a factory
watches ``<pool>.>`` server-side instead of listing every job."""
FACTORIES_BUCKET = "gf_factories"
"""Factory descriptors and heartbeats (key: factory id)."""
POOLS_BUCKET = "gf_pools"
"""Dispatch pools (key: pool id; value: the canonical requirement set)."""
LOCKS_BUCKET = "gf_locks"
"""Distributed ``lock:`` holders (key: lock key; value: job id and epoch)."""
IDEMPOTENCY_BUCKET = "gf_idempotency"
"""``idempotency-key:`` -> job id and content hash."""
ARCHIVE_BUCKET = "gf_archive"
"""Finished jobs moved out of ``gf_jobs`` after ``archive_after_s`` (key: job id; value: the
job record without its body). Read on a miss in ``gf_jobs`` by dependency resolution,
idempotency and ``status``; capped by ``archive_max_bytes`` and ``archive_max_age_s``."""
CLOCK_BUCKET = "gf_clock"
"""Broker-stamped time: a writer puts a key and reads back the server's timestamp."""
ARTIFACTS_STORE = "gf_artifacts"
"""Object store: run logs and captured artifacts."""

DISPATCH_STREAM = "GF_DISPATCH"
DISPATCH_PREFIX = "gf.dispatch"
EVENTS_STREAM = "GF_EVENTS"
EVENTS_PREFIX = "gf.events"
LOGS_PREFIX = "gf.logs"
"""Core NATS (not stored): live log lines of running jobs, for ``logs --follow``."""
API_PREFIX = "gf.api"
API_SERVICE = "gigafactory"

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-=]")


def dispatch_subject(pool: str) -> str:
    return f"{DISPATCH_PREFIX}.{pool}"


def pool_consumer(pool: str) -> str:
    """The one shared durable pull consumer of a pool."""
    return f"pool-{pool}"


def events_subject(job_id: str, kind: str) -> str:
    return f"{EVENTS_PREFIX}.{job_id}.{kind}"


def fleet_events_subject(kind: str) -> str:
    """Events not about one job (scheduler passes, factory joins and leaves)."""
    return f"{EVENTS_PREFIX}._fleet.{kind}"


def logs_subject(job_id: str, epoch: int | str = ">") -> str:
    """Live output of one attempt (by epoch); the default is the wildcard for every attempt."""
    return f"{LOGS_PREFIX}.{job_id}.{epoch}"


def log_object_name(job_id: str, attempt: int, epoch: int) -> str:
    return f"logs/{job_id}/attempt-{attempt}-epoch-{epoch}.log"


def queue_key(pool: str, job_id: str) -> str:
    return f"{pool}.{job_id}"


def safe_key(text: str) -> str:
    """Map arbitrary text (a lock name, an idempotency key) to a valid KV key, reversibly enough
    to stay readable: unsafe characters become ``_XX`` hex escapes."""
    return _KEY_SAFE.sub(lambda m: "_%02x" % ord(m.group()) if ord(m.group()) < 256 else "_u%x" % ord(m.group()), text)


_JOB_ID_RE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,63}$")


def is_job_id(text: str) -> bool:
    return bool(_JOB_ID_RE.match(text))
