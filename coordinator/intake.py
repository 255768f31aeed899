"""Intake: validate a batch of job files and store them durably on the broker.

A batch is all-or-nothing at validation: every file is parsed, every dependency resolved
and every idempotency key checked before the first write, and all the errors found are
returned together, each naming its file, line and field. Jobs are then written in
dependency order (a job's dependencies exist before it does).

Idempotency (``idempotency-key``): the same key with the same content returns the existing
job; the same key with different content supersedes the earlier job in place if it is
still ``queued`` or ``blocked``, and is refused otherwise.

Never twice: a keyed job's id is derived from its key (:func:`names.derived_job_id`), and
the job record is created with create-if-absent, so of two submitters of one key exactly
one creates the job and the other finds it, however their reads and writes interleave; the
``gf_idempotency`` entry is written after the job, as an index for ``nats kv get``. A
caller that can name what it submits (the inbox: one file, as dropped) passes an
``identity`` per file, and an unkeyed file's id is derived from that: a retried submission
of a half-written batch finds the jobs it already wrote instead of making new ones.

Everything is bounded: files per batch, file, front matter, body, deps and key sizes (see
:mod:`gigafactory.schemas.limits`), and a job record must leave ``record_headroom_bytes``
under the broker's max payload for the lease and results added to it later.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import nats.js.errors

from gigafactory.broker import Broker, Conflict
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import WAITING, Stage
from gigafactory.schemas.limits import Limits, clip_reason, hint
from gigafactory.schemas import profiles
from gigafactory.schemas.manifest import JobFile, ManifestError, parse_job_text
from gigafactory.schemas.records import (
    EventRecord,
    IdempotencyRecord,
    JobRecord,
    PoolRecord,
    decode,
    encode,
)

log = logging.getLogger("gigafactory.coordinator")

MAX_CAS_RETRIES = 20
WRITES_IN_FLIGHT = 128
"""Jobs of one batch written concurrently (each its record, then its event)."""
READS_IN_FLIGHT = 128
"""Broker reads one submission has in flight at once (key lookups, dependencies): 10,000
dependencies are 79 round trips, not 30,000, and one submission cannot flood the broker."""
MAX_GRAPH_READS = 100_000
"""Stored jobs a cycle check may read before it gives up (with a named error)."""
SUBMITTED_REPLAY_S = 90.0
"""A job found already written (a retried batch) gets its ``submitted`` event published again
if it is younger than this: the event carries a message id, and the events stream drops a
duplicate id within its 120 s window, so a retry fills the gap a failed first try left and
never doubles the event."""
KEY_NAMESPACE = "idempotency-key"
FILE_NAMESPACE = "file"


class SubmitError(Exception):
    """One or more files of a batch were refused; nothing of the batch was written."""

    def __init__(self, errors: list[dict]) -> None:
        self.errors = errors
        super().__init__("; ".join(_fmt(e) for e in errors))


def _fmt(e: dict) -> str:
    where = e["file"] + (f":{e['line']}" if e.get("line") else "")
    field = f" field '{e['field']}':" if e.get("field") else ""
    return f"{where}:{field} {e['message']}"


@dataclass
class SubmitResult:
    file: str
    job: str
    status: str
    """``created``, ``existing`` (same key and content) or ``superseded``."""
    stage: str

    def to_dict(self) -> dict:
        return {"file": self.file, "job": self.job, "status": self.status, "stage": self.stage}


def new_job_id(hint: str) -> str:
    """A fresh, readable job id for a file named ``hint`` (see :func:`names.new_job_id`)."""
    return names.new_job_id(hint)


def key_job_id(key: str) -> str:
    """The job id an idempotency key always maps to."""
    return names.derived_job_id(key, KEY_NAMESPACE, key)


def file_identity(name: str, data: bytes, size: int, mtime_ns: int) -> str:
    """What makes one dropped file one submission: its name, size, modification time and
    content. A retried scan of the same file has the same identity (and so the same job id);
    the same content dropped again later is a new file (a new mtime) and a new job."""
    return f"{name}\0{size}\0{mtime_ns}\0{hashlib.sha256(data).hexdigest()}"


@dataclass
class _Plan:
    jf: JobFile
    job_id: str
    action: str  # create | existing | supersede
    deps: list[str] = field(default_factory=list)
    key: str | None = None
    identity: str | None = None
    """The caller's identity of the file: its id was derived from it."""
    prior: JobRecord | None = None
    prior_rev: int = 0
    record: JobRecord | None = None
    """The record to create (``create``), built at planning so its size is checked before any write."""


async def _read_job(broker: Broker, job_id: str) -> tuple[JobRecord, int, float] | None:
    """The job's record, revision and broker timestamp; a job archived by the retention pass
    (a final stage, no body) is read from ``gf_archive`` with revision 0."""
    e = await broker.jobs.get(job_id)
    if e is None:
        from .archive import read_archived

        rec = await read_archived(broker, job_id)
        return (rec, 0, 0.0) if rec is not None else None
    return decode(e.value, JobRecord), e.revision, e.ts


async def _bounded(items, fn, limit: int = READS_IN_FLIGHT) -> list:
    """``[await fn(x) for x in items]``, at most ``limit`` at once, results in order."""
    items = list(items)
    out: list = []
    for i in range(0, len(items), limit):
        out += await asyncio.gather(*(fn(x) for x in items[i:i + limit]))
    return out


async def _lookup_key(broker: Broker, key: str) -> tuple[str, JobRecord | None, int]:
    """The job an idempotency key names: ``(job id, record, revision)``; the record is None
    when no job has the key yet (the id is then the one to create it under).

    The derived id is looked at first. An older coordinator chose a random id and wrote it
    in ``gf_idempotency`` (under the old, ambiguous key escaping): such an entry counts only
    if the key stored in it is this key and its job still exists."""
    det = key_job_id(key)
    got = await _read_job(broker, det)
    if got is not None:
        return det, got[0], got[1]
    for k in dict.fromkeys((names.safe_key(key), names.legacy_safe_key(key))):
        idem = await broker.idempotency.get(k)
        if idem is None:
            continue
        rec = decode(idem.value, IdempotencyRecord)
        if rec.key != key or rec.job == det:
            continue
        prior = await _read_job(broker, rec.job)
        if prior is not None:
            return rec.job, prior[0], prior[1]
    return det, None, 0
async def ensure_pool(broker: Broker, pool: str, requirements: list[str]) -> bool:
    """Register the pool and its one durable pull consumer (idempotent). Returns False when
    the dispatch stream is missing, so the consumer could not be created: the pool record is
    written anyway, because the job record is the truth and the push path only a pointer to
    it. Factories bind to the pool, find the push path down and poll the queue index, and the
    coordinator's ``repair_dispatch`` recreates the stream and the consumer."""
    from nats.js import api

    # The consumer first, then the pool record: factories bind when they see the record.
    ok = True
    try:
        await broker.js.add_consumer(
            names.DISPATCH_STREAM,
            api.ConsumerConfig(
                durable_name=names.pool_consumer(pool),
                filter_subject=names.dispatch_subject(pool),
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=30.0,
                max_deliver=-1,
                max_waiting=4096,
                max_ack_pending=-1,
                description=f"pool {pool}: " + " ".join(requirements),
            ),
        )
    except nats.js.errors.NotFoundError:  # the stream is gone: submissions go on (poll fallback)
        log.info("dispatch stream %s missing: pool %s has no consumer until it is repaired",
                    names.DISPATCH_STREAM, pool)
        ok = False
    except Exception as e:  # exists with another config: leave it; the dispatcher repairs deleted ones
        if "consumer already exists" not in str(e).lower() and "already in use" not in str(e).lower():
            raise
    try:
        await broker.pools.create(pool, encode(PoolRecord(id=pool, requirements=requirements, created_at=time.time())))
    except Conflict:
        pass
    return ok


async def submit(
    broker: Broker,
    files: list[tuple[str, str]],
    *,
    source: str = "api",
    ready_pools: set[str] | None = None,
    identities: list[str | None] | None = None,
    planned: Callable[[], Awaitable[None]] | None = None,
) -> list[SubmitResult]:
    """Submit a batch of ``(path, text)`` job files. Raises :class:`SubmitError` (nothing written).

    ``source``: who submits (``api``, ``inbox``), stored on each record as ``<source>:<path>``.
    ``ready_pools``: pools whose dispatch consumer this process already made sure of (the
    scheduler's set); their consumer is not created again. Creating one is a JetStream
    meta-layer request: on a cluster it waits out a meta leader election (seconds after a
    node's kill -9), and every submission would wait with it, though the job bucket itself
    still takes writes. A consumer deleted later is recreated by the dispatcher's repair.
    ``identities``: one per file or None; a file without an ``idempotency-key`` gets the job
    id derived from its identity, so submitting it again returns the job (``existing``).
    ``planned``: awaited once everything is checked, before the first write (a seam for tests
    that hold a submitter in the window where two submitters of one key both decide).

    Errors other than :class:`SubmitError` (the broker not answering) may leave part of the
    batch written; submitting the same batch again is safe for keyed files and files with an
    identity (they are found, not created twice)."""
    lim = Limits.from_settings(broker.settings)
    if not files:
        raise SubmitError([_batch_error("no job files given")])
    if len(files) > lim.max_batch_files:
        raise SubmitError([_batch_error(
            f"{len(files):,} files in one batch, more than {lim.max_batch_files:,} "
            f"{hint('max_batch_files', lim.max_batch_files)}; submit them in smaller batches")])
    if identities is not None and len(identities) != len(files):
        raise ValueError("identities: one per file (or None)")
    errors: list[dict] = []
    parsed: list[JobFile] = []
    for path, text in files:
        try:
            parsed.append(parse_job_text(text, path, lim))
        except ManifestError as e:
            errors.append(e.to_dict())
    if errors:
        raise SubmitError(errors)
    parsed = _apply_profiles(parsed, broker.settings, errors)
    if errors:
        raise SubmitError(errors)
    idents = identities or [None] * len(parsed)

    def err(jf: JobFile, field: str | None, message: str) -> None:
        errors.append({"file": jf.path, "line": None, "field": field, "message": message})

    # Keys used twice within the batch.
    seen_keys: dict[str, JobFile] = {}
    for jf in parsed:
        k = jf.manifest.idempotency_key
        if k is None:
            continue
        if k in seen_keys and seen_keys[k].content_hash != jf.content_hash:
            err(jf, "idempotency-key", f"{k!r} is also used by {seen_keys[k].path} in this batch with other content")
        seen_keys.setdefault(k, jf)

    # What each key and each file identity already names on the broker: every read of the
    # batch at once (bounded), not one after the other.
    keys = list(seen_keys)
    by_key_found = dict(zip(keys, await _bounded(keys, lambda k: _lookup_key(broker, k))))
    ident_ids = {i: names.derived_job_id(_stem(jf.path), FILE_NAMESPACE, i)
                 for jf, i in zip(parsed, idents) if i is not None and jf.manifest.idempotency_key is None}
    ident_found = dict(zip(ident_ids, await _bounded(ident_ids.values(), lambda j: _read_job(broker, j))))

    plans: list[_Plan] = []
    by_key: dict[str, _Plan] = {}
    for jf, ident in zip(parsed, idents):
        key = jf.manifest.idempotency_key
        if key is not None and key in by_key:
            plans.append(_Plan(jf, by_key[key].job_id, "existing", key=key))
            continue
        plan = _Plan(jf, "", "create", key=key)
        if key is not None:
            plan.job_id, prior_rec, prior_rev = by_key_found[key]
            if prior_rec is not None:
                problem = _decide_existing(plan, prior_rec, prior_rev)
                if problem:
                    err(jf, "idempotency-key", problem)
            by_key[key] = plan
        elif ident is not None:
            plan.identity = ident
            plan.job_id = ident_ids[ident]
            got = ident_found[ident]
            if got is not None:
                if got[0].content_hash == jf.content_hash:
                    plan.action, plan.prior, plan.prior_rev = "existing", got[0], got[1]
                else:
                    err(jf, None, f"job id {plan.job_id} is taken by other content (an id collision); submit again")
        else:
            plan.job_id = new_job_id(_stem(jf.path))
        plans.append(plan)

    # Dependencies: another file's idempotency key in this batch, a stored key, or a job id.
    # Each distinct name is resolved once, all of them concurrently.
    batch_ids = {p.job_id for p in plans}
    wanted = list(dict.fromkeys(d for p in plans if p.action != "existing" for d in p.jf.manifest.deps
                                if d not in by_key))
    stored: dict[str, JobRecord] = {p.job_id: p.prior for p in plans if p.action == "existing" and p.prior}
    """Records read while planning (by job id): their stages decide blocked or queued."""

    async def resolve(dep: str) -> str | None:
        job_id, rec, _ = await _lookup_key(broker, dep)
        if rec is not None:
            stored[job_id] = rec
            return job_id
        if not names.is_job_id(dep):
            return None
        if dep in batch_ids:
            return dep
        got = await _read_job(broker, dep)
        if got is None:
            return None
        stored[dep] = got[0]
        return dep

    resolved = dict(zip(wanted, await _bounded(wanted, resolve)))
    for plan in plans:
        if plan.action == "existing":
            continue
        for i, dep in enumerate(plan.jf.manifest.deps):
            target = by_key[dep].job_id if dep in by_key else resolved[dep]
            if target is None:
                err(plan.jf, f"deps[{i}]",
                    f"{dep!r} is neither a job id nor the idempotency-key of a submitted job or of another "
                    "file in this batch; submit the dependency first (or in the same batch)")
                continue
            if target == plan.job_id:
                err(plan.jf, f"deps[{i}]", f"{dep!r} is this job itself")
                continue
            plan.deps.append(target)
    if errors:
        raise SubmitError(errors)

    # Cycles: through the batch, and through stored jobs where one can lead back into it.
    writing = [p for p in plans if p.action != "existing"]
    for plan, cycle in await _cycles(broker, writing, stored):
        label = {p.job_id: (p.jf.manifest.idempotency_key or p.job_id) for p in plans}
        err(plan.jf, "deps", "would close a dependency cycle: " + " -> ".join(label.get(j, j) for j in cycle))
    if errors:
        raise SubmitError(errors)

    # Records, and their size, before the first write: a record that cannot grow by the
    # lease and results the protocol adds later would be stored but never claimable.
    now = time.time()
    max_payload = broker.nc.max_payload
    for plan in writing:
        m = plan.jf.manifest
        reqs = list(m.requirements())
        rec = JobRecord(
            id=plan.job_id, manifest=m, body=plan.jf.body, source=f"{source}:{plan.jf.path}",
            content_hash=plan.jf.content_hash, submitted_at=now, pool=caps.pool_id(reqs), requirements=reqs,
            deps=plan.deps, updated_at=now, profile=plan.jf.profile,
        )
        if plan.action == "create":
            plan.record = rec
        size = len(encode(rec))
        if size + lim.record_headroom_bytes > max_payload:
            err(plan.jf, None, (
                f"its job record would be {size:,} bytes; with {lim.record_headroom_bytes:,} bytes kept for the "
                f"lease and results added later {hint('record_headroom_bytes', lim.record_headroom_bytes)}, the "
                f"broker's max payload ({max_payload:,} bytes) leaves {max_payload - lim.record_headroom_bytes:,}; "
                "shorten the prompt (keep large inputs in the repository) or raise the broker's max_payload"))
    if errors:
        raise SubmitError(errors)
    if planned is not None:
        await planned()

    known = ready_pools if ready_pools is not None else broker.pools_known
    for plan in writing:
        reqs = list(plan.jf.manifest.requirements())
        pool = caps.pool_id(reqs)
        if pool not in known:
            # Two broker requests (a consumer create, a pool record create) that only the
            # first job of a pool needs; each also waits on the cluster's meta leader. A
            # consumer deleted later is recreated by the scheduler's repair pass.
            await ensure_pool(broker, pool, reqs)
            known.add(pool)

    in_batch = {p.job_id for p in writing}
    results: dict[int, SubmitResult] = {}

    def unmet(plan: _Plan) -> list[str]:
        # Stages read while resolving: a dependency that moved on since is caught by the
        # scheduler's pass over blocked jobs, which re-reads every dependency.
        mode = plan.jf.manifest.deps_mode
        return [d for d in plan.deps if d in in_batch or d not in stored
                or not protocol.dep_satisfied(stored[d].stage, mode)]

    async def write(plan: _Plan) -> None:
        waiting = unmet(plan)
        if plan.action == "supersede":
            stage = await _supersede(broker, plan, waiting, now, source, lim)
            results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "superseded", str(stage))
            return
        assert plan.record is not None
        rec = msgspec.structs.replace(
            plan.record, stage=Stage.BLOCKED if waiting else Stage.QUEUED,
            reason=clip_reason("waiting for " + ", ".join(waiting), lim.max_reason_chars) if waiting
            else "waiting for a factory")
        try:
            await broker.jobs.create(plan.job_id, encode(rec))
        except Conflict:
            # Another submitter of the same key (or a previous try of this same file) was
            # first: the record it wrote decides, exactly as if it had been read at planning.
            got = await _read_job(broker, plan.job_id)
            if got is None:  # created and deleted since: the next submission decides
                raise SubmitError([{"file": plan.jf.path, "line": None, "field": None,
                                    "message": f"job {plan.job_id} changed while being submitted; submit again"}])
            problem = _decide_existing(plan, got[0], got[1])
            if problem:
                raise SubmitError([{"file": plan.jf.path, "line": None,
                                    "field": "idempotency-key" if plan.key else None, "message": problem}]) from None
            if plan.action == "existing":
                await _replay_submitted(broker, got[0], source)
                results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "existing", str(got[0].stage))
                return
            await write(plan)  # now a supersede
            return
        if plan.key is not None:
            await _index_key(broker, plan.key, plan.job_id, plan.jf.content_hash)
        await _publish_submitted(broker, rec, source)
        results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "created", str(rec.stage))

    # Write, dependencies first: in waves of jobs none of which depends on another of its
    # wave, each wave's writes concurrently (one round trip per wave, not two per job).
    for wave in _waves(writing):
        for i in range(0, len(wave), WRITES_IN_FLIGHT):
            failures = [r for r in await asyncio.gather(*(write(p) for p in wave[i:i + WRITES_IN_FLIGHT]),
                                                        return_exceptions=True)
                        if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
    found = {p.prior.id: p.prior for p in plans if p.action == "existing" and p.prior is not None}
    await _bounded(found.values(), lambda r: _replay_submitted(broker, r, source), WRITES_IN_FLIGHT)
    out = []
    for plan in plans:
        if id(plan) in results:
            out.append(results[id(plan)])
        else:  # existing at planning (or another file of this batch with the same key)
            first = by_key.get(plan.key) if plan.key else None
            rec = plan.prior if plan.prior is not None else (first.prior if first else None)
            stage = str(results[id(first)].stage) if first is not None and id(first) in results else (
                str(rec.stage) if rec is not None else "unknown")
            out.append(SubmitResult(plan.jf.path, plan.job_id, "existing", stage))
    return out


def _apply_profiles(parsed: list[JobFile], settings, errors: list[dict]) -> list[JobFile]:
    """Each job file with its profile resolved (:func:`profiles.resolve`); the catalog is read
    only when a file names a profile. Problems are appended to ``errors`` (nothing written).

    :param parsed: the batch's parsed job files.
    :param settings: the coordinator's settings (``profiles_dir``).
    :param errors: where refusals go, one per file (or one for a broken catalog).
    """
    if not any(jf.manifest.profile for jf in parsed):
        return parsed
    try:
        catalog = profiles.load_catalog(getattr(settings, "profiles_dir", None))
    except profiles.ProfileError as e:
        errors.append({"file": e.path, "line": None, "field": e.field,
                       "message": f"the profile catalog is invalid: {e.message}"})
        return parsed
    out = []
    for jf in parsed:
        try:
            out.append(profiles.resolve(jf, catalog))
        except ManifestError as e:
            errors.append(e.to_dict())
    return out


async def _publish_submitted(broker: Broker, rec: JobRecord, source: str) -> None:
    """The ``submitted`` audit event of a new record, with a message id (see SUBMITTED_REPLAY_S)."""
    await broker.publish_event(EventRecord(
        kind="submitted", at=rec.submitted_at, job=rec.id, stage_to=str(rec.stage), actor=source,
        reason=rec.reason, data={"file": rec.source.split(":", 1)[-1], "pool": rec.pool,
                                 "requirements": rec.requirements, "priority": str(rec.manifest.priority),
                                 "deps": rec.deps},
    ), msg_id=f"submitted-{rec.id}-{rec.content_hash[:16]}")


async def _replay_submitted(broker: Broker, rec: JobRecord, source: str) -> None:
    """Publish again the ``submitted`` event of a job a retried submission found: the first
    try may have written the record and died before its event. Only while the events
    stream would still drop the copy (a young, untouched record)."""
    if rec.epoch == 0 and rec.stage in WAITING and time.time() - rec.submitted_at < SUBMITTED_REPLAY_S:
        await _publish_submitted(broker, rec, source)


def _batch_error(message: str) -> dict:
    return {"file": "<batch>", "line": None, "field": None, "message": message}


def _stem(path: str) -> str:
    return re.sub(r"\.md$", "", path.replace("\\", "/").rsplit("/", 1)[-1])


def _decide_existing(plan: _Plan, rec: JobRecord, rev: int) -> str | None:
    """Set ``plan`` to what a stored job ``rec`` at its id means: ``existing`` (same content),
    ``supersede`` (other content, still waiting). Returns the refusal, or None."""
    key = plan.key
    if key is not None and rec.manifest.idempotency_key != key and rec.id == key_job_id(key):
        return (f"job id {rec.id} (derived from the key {key!r}) is held by a job with another key "
                f"({rec.manifest.idempotency_key!r}); use another key")
    if rec.content_hash == plan.jf.content_hash:
        plan.action, plan.prior, plan.prior_rev = "existing", rec, rev
        return None
    if key is None:
        return f"job id {rec.id} is taken by other content (an id collision); submit again"
    if rec.stage in WAITING:
        plan.action, plan.prior, plan.prior_rev = "supersede", rec, rev
        return None
    return (f"{key!r} belongs to job {rec.id}, which is {rec.stage} and has other content; "
            f"use a new key to submit new work, or 'gigafactory requeue {rec.id}' to run it again")


async def _index_key(broker: Broker, key: str, job_id: str, content_hash: str) -> None:
    """Point the key's ``gf_idempotency`` entry at its job (after the job is written: the
    entry is an index for people and tools; the derived job id is what intake relies on)."""
    await broker.idempotency.put(names.safe_key(key),
                                 encode(IdempotencyRecord(key=key, job=job_id, content_hash=content_hash)))


async def _supersede(broker: Broker, plan: _Plan, waiting: list[str], now: float, source: str,
                     lim: Limits) -> Stage:
    rec, rev = plan.prior, plan.prior_rev
    assert rec is not None
    m = plan.jf.manifest
    reqs = list(m.requirements())
    pool = caps.pool_id(reqs)
    for _ in range(MAX_CAS_RETRIES):
        if rec.content_hash == plan.jf.content_hash:
            return rec.stage  # a concurrent submitter of the same content was first
        if rec.stage not in WAITING:
            raise SubmitError([{"file": plan.jf.path, "line": None, "field": "idempotency-key",
                                "message": f"job {rec.id} was claimed ({rec.stage}) while this submission was "
                                           "being checked; it can no longer be superseded"}])
        new = msgspec.structs.replace(
            rec, manifest=m, body=plan.jf.body, content_hash=plan.jf.content_hash, profile=plan.jf.profile,
            source=f"{source}:{plan.jf.path}", pool=pool, requirements=reqs, deps=plan.deps,
            superseded=rec.superseded + 1, epoch=rec.epoch + 1, backoff_s=0.0,
        )
        out = protocol.set_blocked(new, now, waiting) if waiting else protocol.unblock(new, now)
        reason = clip_reason(out.reason, lim.max_reason_chars) if waiting else "waiting for a factory"
        new = msgspec.structs.replace(out.record, reason=reason)
        try:
            await broker.jobs.update(rec.id, encode(new), last=rev)
        except Conflict:
            got = await _read_job(broker, rec.id)
            assert got is not None
            rec, rev, _ = got
            continue
        await _index_key(broker, m.idempotency_key or "", rec.id, plan.jf.content_hash)
        await broker.publish_event(EventRecord(
            kind="superseded", at=now, job=rec.id, stage_from=str(rec.stage), stage_to=str(new.stage),
            epoch=new.epoch, actor=source, reason=f"new content for idempotency-key {m.idempotency_key!r}",
            data={"file": plan.jf.path},
        ))
        return new.stage
    raise SubmitError([{"file": plan.jf.path, "line": None, "field": None,
                        "message": f"job {rec.id} kept changing while superseding it; submit again"}])


async def _cycles(broker: Broker, plans: list[_Plan], stored: dict[str, JobRecord]) -> list[tuple[_Plan, list[str]]]:
    """The plans that would sit on a dependency cycle, each with one cycle through it
    (``[a, b, a]``). Iterative throughout: a chain of 10,000 is no deeper for Python than a
    chain of 2.

    Stored jobs are followed only when the batch supersedes a job: a stored job's deps were
    fixed when it was submitted and can only name jobs that existed then, so only an id that
    already existed (a superseded job) can be the way back into the batch."""
    graph: dict[str, list[str]] = {p.job_id: p.deps for p in plans}
    if any(p.action == "supersede" for p in plans):
        frontier = {d for p in plans for d in p.deps if d not in graph}
        reads = 0
        while frontier:
            reads += len(frontier)
            if reads > MAX_GRAPH_READS:
                raise SubmitError([_batch_error(
                    f"the dependencies reach more than {MAX_GRAPH_READS:,} stored jobs; a cycle check cannot "
                    "follow them all: depend on fewer, later jobs")])
            todo = sorted(frontier)
            got = dict(zip(todo, await _bounded(todo, lambda j: stored.get(j) or _read_rec(broker, j))))
            frontier = set()
            for j, rec in got.items():
                graph[j] = rec.deps if rec is not None else []
                frontier |= {d for d in graph[j] if d not in graph}
    on_cycle = _strongly_connected(graph)
    out = []
    for plan in plans:
        comp = on_cycle.get(plan.job_id)
        if comp is not None:
            out.append((plan, _path_back(plan.job_id, graph, comp)))
    return out


async def _read_rec(broker: Broker, job_id: str) -> JobRecord | None:
    got = await _read_job(broker, job_id)
    return got[0] if got else None


def _strongly_connected(graph: dict[str, list[str]]) -> dict[str, frozenset[str]]:
    """Every node on a cycle, mapped to its strongly connected component (Tarjan's algorithm,
    with an explicit stack instead of recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: dict[str, frozenset[str]] = {}
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = graph.get(node, [])
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in graph.get(node, []):
                    members = frozenset(comp)
                    out.update(dict.fromkeys(comp, members))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def _path_back(start: str, graph: dict[str, list[str]], comp: frozenset[str]) -> list[str]:
    """A shortest cycle ``start -> ... -> start`` within its component (breadth first)."""
    parent: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for d in graph.get(node, []):
            if d not in comp:
                continue
            if d == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if d not in parent:
                parent[d] = node
                queue.append(d)
    return [start, start]


def _waves(plans: list[_Plan]) -> list[list[_Plan]]:
    """The plans in waves, dependencies first: a plan's wave is one past the latest wave of
    the plans (of this batch) it depends on, so each wave can be written concurrently once
    the earlier ones are. Kahn's algorithm: iterative, and linear in plans plus deps."""
    by_id = {p.job_id: p for p in plans}
    waiting_on = {p.job_id: sum(1 for d in set(p.deps) if d in by_id) for p in plans}
    dependents: dict[str, list[str]] = {}
    for p in plans:
        for d in set(p.deps):
            if d in by_id:
                dependents.setdefault(d, []).append(p.job_id)
    wave = [p.job_id for p in plans if waiting_on[p.job_id] == 0]
    waves: list[list[_Plan]] = []
    while wave:
        waves.append([by_id[j] for j in wave])
        nxt = []
        for j in wave:
            for k in dependents.get(j, []):
                waiting_on[k] -= 1
                if waiting_on[k] == 0:
                    nxt.append(k)
        wave = nxt
    assert sum(map(len, waves)) == len(plans), "a cycle reached the write phase"
    return waves
