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

Every decision above is made by the pure planner :mod:`.plan_submit` (unit-tested on plain
values); this module is its I/O: the reads each planning phase needs, then the writes of
the finished plan (create-if-absent, compare-and-set supersede, key index, events).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.js.errors

from gigafactory import tracing
from gigafactory.broker import Broker, Conflict
from gigafactory.schemas import names, profiles
from gigafactory.schemas.lifecycle import WAITING, Stage
from gigafactory.schemas.limits import Limits
from gigafactory.schemas.manifest import JobFile, ManifestError
from gigafactory.schemas.records import (
    EventRecord,
    IdempotencyRecord,
    JobRecord,
    PoolRecord,
    decode,
    encode,
)

from . import plan_submit
from .plan_submit import (  # noqa: F401  (the API and the inbox use them as intake's)
    FILE_NAMESPACE,
    KEY_NAMESPACE,
    JobPlan,
    SubmitError,
    SubmitPlan,
    SubmitPlanner,
    SubmitResult,
    format_error,
    key_job_id,
)

log = logging.getLogger(__name__)

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


def new_job_id(hint: str) -> str:
    """A fresh, readable job id for a file named ``hint`` (see :func:`names.new_job_id`)."""
    return names.new_job_id(hint)


def file_identity(name: str, data: bytes, size: int, mtime_ns: int) -> str:
    """What makes one dropped file one submission: its name, size, modification time and
    content. A retried scan of the same file has the same identity (and so the same job id);
    the same content dropped again later is a new file (a new mtime) and a new job."""
    return f"{name}\0{size}\0{mtime_ns}\0{hashlib.sha256(data).hexdigest()}"


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
    check: Callable[[list[JobFile]], None] | None = None,
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
    ``check``: called with the batch's parsed job files (profiles applied) before anything is
    read or written; raises to refuse the batch (the caller's products: coordinator/gate.py).

    The decisions are :mod:`.plan_submit`'s; this function makes the reads each phase needs
    and then the writes of the plan. Errors other than :class:`SubmitError` (the broker not
    answering) may leave part of the batch written; submitting the same batch again is safe
    for keyed files and files with an identity (they are found, not created twice)."""
    lim = Limits.from_settings(broker.settings)
    parsed = _apply_profiles(plan_submit.parse_batch(files, identities, lim), broker.settings)
    if check is not None:
        check(parsed)
    planner = SubmitPlanner(parsed, identities, source=source, lim=lim, new_id=new_job_id)
    await _read_prior(broker, planner)
    await _resolve_deps(broker, planner)
    _raise(planner)
    graph, follow = planner.cycle_graph()
    if follow:
        graph = await _stored_graph(broker, graph, planner.stored)
    planner.check_cycles(graph)
    _raise(planner)
    plan = planner.build(time.time(), broker.nc.max_payload)
    _raise(planner)
    if planned is not None:
        await planned()
    known = ready_pools if ready_pools is not None else broker.pools_known
    return await _perform(broker, plan, known, source, lim)


def _raise(planner: SubmitPlanner) -> None:
    if planner.errors:
        raise SubmitError(planner.errors)


async def _read_prior(broker: Broker, planner: SubmitPlanner) -> None:
    """What each key and each file identity of the batch already names on the broker (every
    read of the batch at once, bounded), then the planner's assignment of ids and actions."""
    keys, idents = planner.keys, planner.ident_ids
    key_found = dict(zip(keys, await _bounded(keys, lambda k: _lookup_key(broker, k))))
    ident_found = dict(zip(idents, await _bounded(idents.values(), lambda j: _read_job(broker, j))))
    planner.assign(key_found, ident_found)


async def _resolve_deps(broker: Broker, planner: SubmitPlanner) -> None:
    """Read what each dependency name names (another file's idempotency key in this batch,
    a stored key, or a job id), each distinct name once, all of them concurrently."""
    wanted = planner.deps_to_resolve()
    batch_ids = planner.batch_ids

    async def resolve(dep: str) -> plan_submit.Resolved:
        job_id, rec, _ = await _lookup_key(broker, dep)
        if rec is not None:
            return job_id, rec
        if not names.is_job_id(dep):
            return None
        if dep in batch_ids:
            return dep, None
        got = await _read_job(broker, dep)
        return (dep, got[0]) if got is not None else None

    planner.link(dict(zip(wanted, await _bounded(wanted, resolve))))


async def _stored_graph(broker: Broker, graph: dict[str, list[str]],
                        stored: dict[str, JobRecord]) -> dict[str, list[str]]:
    """``graph`` extended with the stored jobs it reaches (their deps), read breadth first,
    at most MAX_GRAPH_READS of them (a named error beyond)."""
    graph = dict(graph)
    frontier = {d for deps in list(graph.values()) for d in deps if d not in graph}
    reads = 0
    while frontier:
        reads += len(frontier)
        if reads > MAX_GRAPH_READS:
            raise SubmitError([plan_submit.batch_error(
                f"the dependencies reach more than {MAX_GRAPH_READS:,} stored jobs; a cycle check cannot "
                "follow them all: depend on fewer, later jobs")])
        todo = sorted(frontier)
        got = dict(zip(todo, await _bounded(todo, lambda j: stored.get(j) or _read_rec(broker, j))))
        frontier = set()
        for j, rec in got.items():
            graph[j] = rec.deps if rec is not None else []
            frontier |= {d for d in graph[j] if d not in graph}
    return graph


async def _read_rec(broker: Broker, job_id: str) -> JobRecord | None:
    got = await _read_job(broker, job_id)
    return got[0] if got else None


async def _perform(broker: Broker, plan: SubmitPlan, known: set[str], source: str,
                   lim: Limits) -> list[SubmitResult]:
    """Make the writes of ``plan``: the pools it needs that are not in ``known`` (added once
    made sure of), its jobs wave by wave (dependencies
    first; each wave's writes concurrently, one round trip per wave, not two per job), the
    ``submitted`` events of the jobs found; and the answer per file."""
    for pool, reqs in plan.pools:
        if pool not in known:
            # Two broker requests (a consumer create, a pool record create) that only the
            # first job of a pool needs; each also waits on the cluster's meta leader. A
            # consumer deleted later is recreated by the scheduler's repair pass.
            await ensure_pool(broker, pool, reqs)
            known.add(pool)
    results: dict[int, SubmitResult] = {}
    for wave in plan.waves:
        for i in range(0, len(wave), WRITES_IN_FLIGHT):
            failures = [r for r in await asyncio.gather(
                *(_write(broker, p, plan.now, source, lim, results) for p in wave[i:i + WRITES_IN_FLIGHT]),
                return_exceptions=True) if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
    await _bounded(plan.found, lambda r: _replay_submitted(broker, r, source), WRITES_IN_FLIGHT)
    return plan_submit.answers(plan, results)


async def _write(broker: Broker, plan: JobPlan, now: float, source: str, lim: Limits,
                 results: dict[int, SubmitResult]) -> None:
    """Write one job of the batch and put its answer in ``results`` (by ``id(plan)``): a
    supersede is a compare-and-set; a new job is created only if absent, and a job found at
    its id instead is judged as if it had been read at planning."""
    if plan.action == "supersede":
        stage = await _supersede(broker, plan, now, source, lim)
        results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "superseded", str(stage))
        return
    rec = plan.record
    assert rec is not None
    with tracing.span("intake", job=plan.job_id, product=rec.manifest.product, pool=rec.pool):
        rec = msgspec.structs.replace(rec, trace=tracing.traceparent())
    try:
        await broker.jobs.create(plan.job_id, encode(rec))
    except Conflict:
        # Another submitter of the same key (or a previous try of this same file) was
        # first: the record it wrote decides, exactly as if it had been read at planning.
        got = await _read_job(broker, plan.job_id)
        if got is None:  # created and deleted since: the next submission decides
            raise SubmitError([plan_submit.file_error(
                plan.jf, None, f"job {plan.job_id} changed while being submitted; submit again")]) from None
        problem = plan_submit.decide_existing(plan, got[0], got[1])
        if problem:
            raise SubmitError([plan_submit.file_error(
                plan.jf, "idempotency-key" if plan.key else None, problem)]) from None
        if plan.action == "existing":
            await _replay_submitted(broker, got[0], source)
            results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "existing", str(got[0].stage))
            return
        await _write(broker, plan, now, source, lim, results)  # now a supersede
        return
    if plan.key is not None:
        await _index_key(broker, plan.key, plan.job_id, plan.jf.content_hash)
    await _publish_submitted(broker, rec, source)
    results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "created", str(rec.stage))


def _apply_profiles(parsed: list[JobFile], settings) -> list[JobFile]:
    """Each job file with its profile resolved (:func:`profiles.resolve`); the catalog is read
    (from disk) only when a file names a profile. Raises :class:`SubmitError` with every
    file's problem (or one for a broken catalog): nothing is written.

    :param parsed: the batch's parsed job files.
    :param settings: the coordinator's settings (``profiles_dir``).
    """
    if not any(jf.manifest.profile for jf in parsed):
        return parsed
    try:
        catalog = profiles.load_catalog(getattr(settings, "profiles_dir", None))
    except profiles.ProfileError as e:
        raise SubmitError([{"file": e.path, "line": None, "field": e.field,
                            "message": f"the profile catalog is invalid: {e.message}"}]) from None
    out, errors = [], []
    for jf in parsed:
        try:
            out.append(profiles.resolve(jf, catalog))
        except ManifestError as e:
            errors.append(e.to_dict())
    if errors:
        raise SubmitError(errors)
    return out


async def _publish_submitted(broker: Broker, rec: JobRecord, source: str) -> None:
    """The ``submitted`` audit event of a new record, with a message id (see SUBMITTED_REPLAY_S)."""
    await broker.publish_event(EventRecord(
        kind="submitted", at=rec.submitted_at, job=rec.id, stage_to=str(rec.stage), actor=source,
        reason=rec.reason, data={"file": rec.source.split(":", 1)[-1], "pool": rec.pool,
                                 "requirements": rec.requirements, "priority": str(rec.manifest.priority),
                                 "deps": rec.deps},
    ), msg_id=f"submitted-{rec.id}-{rec.content_hash[:16]}", trace=rec.trace)


async def _replay_submitted(broker: Broker, rec: JobRecord, source: str) -> None:
    """Publish again the ``submitted`` event of a job a retried submission found: the first
    try may have written the record and died before its event. Only while the events
    stream would still drop the copy (a young, untouched record)."""
    if rec.epoch == 0 and rec.stage in WAITING and time.time() - rec.submitted_at < SUBMITTED_REPLAY_S:
        await _publish_submitted(broker, rec, source)


async def _index_key(broker: Broker, key: str, job_id: str, content_hash: str) -> None:
    """Point the key's ``gf_idempotency`` entry at its job (after the job is written: the
    entry is an index for people and tools; the derived job id is what intake relies on)."""
    await broker.idempotency.put(names.safe_key(key),
                                 encode(IdempotencyRecord(key=key, job=job_id, content_hash=content_hash)))


async def _supersede(broker: Broker, plan: JobPlan, now: float, source: str, lim: Limits) -> Stage:
    """Replace the waiting job ``plan.prior`` with the plan's content (a compare-and-set on
    the revision read, retried on a conflict up to MAX_CAS_RETRIES times, judging the record
    read afresh each time); returns the stage it was written at."""
    rec, rev = plan.prior, plan.prior_rev
    assert rec is not None
    m = plan.jf.manifest
    for _ in range(MAX_CAS_RETRIES):
        if rec.content_hash == plan.jf.content_hash:
            return rec.stage  # a concurrent submitter of the same content was first
        if rec.stage not in WAITING:
            raise SubmitError([plan_submit.file_error(
                plan.jf, "idempotency-key", f"job {rec.id} was claimed ({rec.stage}) while this submission was "
                                            "being checked; it can no longer be superseded")])
        new = plan_submit.superseding_record(rec, plan, now, source, lim)
        try:
            await broker.jobs.update(rec.id, encode(new), last=rev)
        except Conflict:
            got = await _read_job(broker, rec.id)
            if got is None:  # deleted since planning (an operator): the next submission decides
                raise SubmitError([plan_submit.file_error(
                    plan.jf, None, f"job {rec.id} was deleted while being superseded; submit again")]) from None
            rec, rev, _ = got
            continue
        await _index_key(broker, m.idempotency_key or "", rec.id, plan.jf.content_hash)
        await broker.publish_event(EventRecord(
            kind="superseded", at=now, job=rec.id, stage_from=str(rec.stage), stage_to=str(new.stage),
            epoch=new.epoch, actor=source, reason=f"new content for idempotency-key {m.idempotency_key!r}",
            data={"file": plan.jf.path},
        ))
        return new.stage
    raise SubmitError([plan_submit.file_error(
        plan.jf, None, f"job {rec.id} kept changing while superseding it; submit again")])
