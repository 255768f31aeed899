"""Reading the archive: a finished job that the retention pass (:mod:`retention`) moved out of
``gf_jobs`` is still found here by intake's dependency and idempotency checks, the scheduler's
dependency resolution and ``status``.

Its own module so that intake (which reads it) and retention (which archives, and re-creates
pools through intake's ``ensure_pool``) do not import each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from gigafactory.broker import Broker
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import JobRecord, decode

READS_IN_FLIGHT = 32
"""Archive reads (and the retention pass's writes) kept in flight at once."""
ARCHIVE_CACHE_MAX = 10_000
"""Archived records remembered by :func:`read_archived` (they never change: a bounded cache)."""


async def read_archived(broker: Broker, job_id: str) -> JobRecord | None:
    """The archived record of ``job_id`` (without its body), or None if it was never
    archived (or has aged out of the archive). For lookups that missed ``gf_jobs``: a job
    is only ever archived in a final stage, so what is found here does not change (a copy
    left by an archiving that lost its compare-and-set is shadowed by the live record)."""
    cache: dict[str, JobRecord] = broker.__dict__.setdefault("_archive_cache", {})
    hit = cache.get(job_id)
    if hit is not None:
        return hit
    if broker.archive is None or not names.is_job_id(job_id):
        return None
    e = await broker.archive.get(job_id)
    if e is None:
        return None
    rec = decode(e.value, JobRecord)
    if len(cache) >= ARCHIVE_CACHE_MAX:
        cache.pop(next(iter(cache)))
    cache[job_id] = rec
    return rec


async def archived_stages(broker: Broker, job_ids: Iterable[str]) -> dict[str, Stage]:
    """The final stage of each of ``job_ids`` found in the archive (the others are absent)."""
    ids = sorted(set(job_ids))
    out: dict[str, Stage] = {}
    for i in range(0, len(ids), READS_IN_FLIGHT):
        chunk = ids[i:i + READS_IN_FLIGHT]
        for jid, rec in zip(chunk, await asyncio.gather(*(read_archived(broker, j) for j in chunk))):
            if rec is not None:
                out[jid] = rec.stage
    return out
