"""Intake: validate a batch of job files and store them durably on the broker.

A batch is all-or-nothing at validation: every file is parsed, every dependency resolved
and every idempotency key checked before the first write, and all the errors found are
returned together, each naming its file, line and field. Jobs are then written in
dependency order (a job's dependencies exist before it does).

Idempotency (``idempotency-key``): the same key with the same content returns the existing
job; the same key with different content supersedes the earlier job in place if it is
still ``queued`` or ``blocked``, and is refused otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass

import msgspec
import nats.js.errors

from gigafactory.broker import Broker, Conflict
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import WAITING, Stage
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

MAX_BATCH = 1000
MAX_CAS_RETRIES = 20
WRITES_IN_FLIGHT = 128
"""Jobs of one batch written concurrently (each its record, then its event)."""


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


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s or "job")[:40].rstrip("-") or "job"


def new_job_id(hint: str) -> str:
    return f"{_slug(hint)}-{secrets.token_hex(3)}"


@dataclass
class _Plan:
    jf: JobFile
    job_id: str
    action: str  # create | existing | supersede
    deps: list[str]
    prior: JobRecord | None = None
    prior_rev: int = 0


async def _read_job(broker: Broker, job_id: str) -> tuple[JobRecord, int, float] | None:
    """The job's record, revision and broker timestamp; a job archived by the retention pass
    (a final stage, no body) is read from ``gf_archive`` with revision 0."""
    e = await broker.jobs.get(job_id)
    if e is None:
        from .retention import read_archived  # retention imports this module

        rec = await read_archived(broker, job_id)
        return (rec, 0, 0.0) if rec is not None else None
    return decode(e.value, JobRecord), e.revision, e.ts


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
) -> list[SubmitResult]:
    """Submit a batch of ``(path, text)`` job files. Raises :class:`SubmitError` (nothing written).

    ``ready_pools``: pools whose dispatch consumer this process already made sure of (the
    scheduler's set); their consumer is not created again. Creating one is a JetStream
    meta-layer request: on a cluster it waits out a meta leader election (seconds after a
    node's kill -9), and every submission would wait with it, though the job bucket itself
    still takes writes. A consumer deleted later is recreated by the dispatcher's repair."""
    if not files:
        raise SubmitError([{"file": "<batch>", "line": None, "field": None, "message": "no job files given"}])
    if len(files) > MAX_BATCH:
        raise SubmitError([{"file": "<batch>", "line": None, "field": None,
                            "message": f"{len(files)} files in one batch; submit at most {MAX_BATCH} at a time"}])
    errors: list[dict] = []
    parsed: list[JobFile] = []
    for path, text in files:
        try:
            parsed.append(parse_job_text(text, path))
        except ManifestError as e:
            errors.append(e.to_dict())
    if errors:
        raise SubmitError(errors)

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

    # Idempotency against the broker, and job ids.
    plans: list[_Plan] = []
    by_key: dict[str, _Plan] = {}
    for jf in parsed:
        key = jf.manifest.idempotency_key
        if key is not None and key in by_key:
            plans.append(_Plan(jf, by_key[key].job_id, "existing", []))
            continue
        plan = _Plan(jf, "", "create", [])
        if key is not None:
            idem = await broker.idempotency.get(names.safe_key(key))
            if idem is not None:
                rec = decode(idem.value, IdempotencyRecord)
                prior = await _read_job(broker, rec.job)
                if prior is not None:
                    prior_rec, prior_rev, _ = prior
                    plan.job_id = rec.job
                    if prior_rec.content_hash == jf.content_hash:
                        plan.action = "existing"
                    elif prior_rec.stage in WAITING:
                        plan.action, plan.prior, plan.prior_rev = "supersede", prior_rec, prior_rev
                    else:
                        err(jf, "idempotency-key",
                            f"{key!r} belongs to job {rec.job}, which is {prior_rec.stage} and has other content; "
                            f"use a new key to submit new work, or 'gigafactory requeue {rec.job}' to run it again")
        if not plan.job_id:
            stem = key or re.sub(r"\.md$", "", jf.path.replace("\\", "/").rsplit("/", 1)[-1])
            plan.job_id = new_job_id(stem)
        plans.append(plan)
        if key is not None:
            by_key[key] = plan

    # Dependencies: another file's idempotency key in this batch, a stored key, or a job id.
    batch_ids = {p.job_id for p in plans}
    dep_cache: dict[str, JobRecord] = {}
    for plan in plans:
        if plan.action == "existing":
            continue
        for i, dep in enumerate(plan.jf.manifest.deps):
            target = None
            if dep in by_key:
                target = by_key[dep].job_id
            else:
                idem = await broker.idempotency.get(names.safe_key(dep))
                if idem is not None:
                    target = decode(idem.value, IdempotencyRecord).job
                elif names.is_job_id(dep) and (dep in batch_ids or await _read_job(broker, dep) is not None):
                    target = dep
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

    # Cycles: follow deps through the batch and the stored jobs.
    graph = {p.job_id: p.deps for p in plans if p.action != "existing"}
    label = {p.job_id: (p.jf.manifest.idempotency_key or p.job_id) for p in plans}

    async def deps_of(job_id: str) -> list[str]:
        if job_id in graph:
            return graph[job_id]
        if job_id not in dep_cache:
            got = await _read_job(broker, job_id)
            if got is None:
                return []
            dep_cache[job_id] = got[0]
        return dep_cache[job_id].deps

    for plan in plans:
        if plan.action == "existing":
            continue
        cycle = await _find_cycle(plan.job_id, deps_of)
        if cycle:
            err(plan.jf, "deps", "would close a dependency cycle: " + " -> ".join(label.get(j, j) for j in cycle))
    if errors:
        raise SubmitError(errors)

    # Write, dependencies first: in waves of jobs none of which depends on another of its
    # wave, each wave's writes concurrently (one round trip per wave, not two per job).
    order = _topo([p for p in plans if p.action != "existing"])
    results: dict[int, SubmitResult] = {}
    now = time.time()
    known = ready_pools if ready_pools is not None else broker.pools_known
    for plan in order:
        reqs = list(plan.jf.manifest.requirements())
        pool = caps.pool_id(reqs)
        if pool not in known:
            # Two broker requests (a consumer create, a pool record create) that only the
            # first job of a pool needs; each also waits on the cluster's meta leader. A
            # consumer deleted later is recreated by the scheduler's repair pass.
            await ensure_pool(broker, pool, reqs)
            known.add(pool)

    async def write(plan: _Plan) -> None:
        m = plan.jf.manifest
        reqs = list(m.requirements())
        pool = caps.pool_id(reqs)
        waiting = await _unmet(broker, plan.deps, m.deps_mode)
        if plan.action == "create":
            rec = JobRecord(
                id=plan.job_id, manifest=m, body=plan.jf.body, source=f"{source}:{plan.jf.path}",
                content_hash=plan.jf.content_hash, submitted_at=now, pool=pool, requirements=reqs,
                deps=plan.deps, stage=Stage.BLOCKED if waiting else Stage.QUEUED,
                reason=("waiting for " + ", ".join(waiting)) if waiting else "waiting for a factory",
                updated_at=now,
            )
            if m.idempotency_key is not None:
                await _claim_key(broker, m.idempotency_key, plan.job_id, plan.jf.content_hash)
            await broker.jobs.create(plan.job_id, encode(rec))
            stage = rec.stage
            await broker.publish_event(EventRecord(
                kind="submitted", at=now, job=plan.job_id, stage_to=str(stage), actor=source,
                reason=rec.reason, data={"file": plan.jf.path, "pool": pool, "requirements": reqs,
                                         "priority": str(m.priority), "deps": plan.deps},
            ))
            results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "created", str(stage))
        else:
            stage = await _supersede(broker, plan, pool, reqs, waiting, now, source)
            results[id(plan)] = SubmitResult(plan.jf.path, plan.job_id, "superseded", str(stage))

    for wave in _waves(order):
        for i in range(0, len(wave), WRITES_IN_FLIGHT):
            failures = [r for r in await asyncio.gather(*(write(p) for p in wave[i:i + WRITES_IN_FLIGHT]),
                                                        return_exceptions=True)
                        if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
    out = []
    for plan in plans:
        if plan.action == "existing":
            got = await _read_job(broker, plan.job_id)
            stage = str(got[0].stage) if got else "unknown"
            out.append(SubmitResult(plan.jf.path, plan.job_id, "existing", stage))
        else:
            out.append(results[id(plan)])
    return out


async def _claim_key(broker: Broker, key: str, job_id: str, content_hash: str) -> None:
    value = encode(IdempotencyRecord(key=key, job=job_id, content_hash=content_hash))
    k = names.safe_key(key)
    try:
        await broker.idempotency.create(k, value)
    except Conflict:
        cur = await broker.idempotency.get(k)
        if cur is None:
            await broker.idempotency.create(k, value)
            return
        rec = decode(cur.value, IdempotencyRecord)
        if rec.job == job_id:
            await broker.idempotency.update(k, value, last=cur.revision)
            return
        if await _read_job(broker, rec.job) is None:
            # A reservation whose job was never written (a submitter died in between): reuse it.
            await broker.idempotency.update(k, value, last=cur.revision)
            return
        raise SubmitError([{"file": "<batch>", "line": None, "field": "idempotency-key",
                            "message": f"{key!r} was just taken by job {rec.job} (a concurrent submission); submit again"}])


async def _supersede(broker: Broker, plan: _Plan, pool: str, reqs: list[str], waiting: list[str], now: float, source: str) -> Stage:
    rec, rev = plan.prior, plan.prior_rev
    assert rec is not None
    for _ in range(MAX_CAS_RETRIES):
        if rec.stage not in WAITING:
            raise SubmitError([{"file": plan.jf.path, "line": None, "field": "idempotency-key",
                                "message": f"job {rec.id} was claimed ({rec.stage}) while this submission was "
                                           "being checked; it can no longer be superseded"}])
        new = msgspec.structs.replace(
            rec, manifest=plan.jf.manifest, body=plan.jf.body, content_hash=plan.jf.content_hash,
            source=f"{source}:{plan.jf.path}", pool=pool, requirements=reqs, deps=plan.deps,
            superseded=rec.superseded + 1, epoch=rec.epoch + 1, backoff_s=0.0,
        )
        out = protocol.set_blocked(new, now, waiting) if waiting else protocol.unblock(new, now)
        new = msgspec.structs.replace(out.record, reason=out.reason if waiting else "waiting for a factory")
        try:
            await broker.jobs.update(rec.id, encode(new), last=rev)
        except Conflict:
            got = await _read_job(broker, rec.id)
            assert got is not None
            rec, rev, _ = got
            continue
        await _claim_key(broker, plan.jf.manifest.idempotency_key or "", rec.id, plan.jf.content_hash)
        await broker.publish_event(EventRecord(
            kind="superseded", at=now, job=rec.id, stage_from=str(rec.stage), stage_to=str(new.stage),
            epoch=new.epoch, actor=source, reason=f"new content for idempotency-key {plan.jf.manifest.idempotency_key!r}",
            data={"file": plan.jf.path},
        ))
        return new.stage
    raise SubmitError([{"file": plan.jf.path, "line": None, "field": None,
                        "message": f"job {rec.id} kept changing while superseding it; submit again"}])


async def _unmet(broker: Broker, deps: list[str], mode: str) -> list[str]:
    waiting = []
    for d in deps:
        got = await _read_job(broker, d)
        if got is None or not protocol.dep_satisfied(got[0].stage, mode):
            waiting.append(d)
    return waiting


async def _find_cycle(start: str, deps_of) -> list[str] | None:
    """A path ``start -> ... -> start`` through dependencies, or None. Bounded by the graph."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for d in await deps_of(node):
            if d == start:
                return [*path, start]
            if d not in seen:
                seen.add(d)
                stack.append((d, [*path, d]))
    return None


def _waves(order: list[_Plan]) -> list[list[_Plan]]:
    """Split a dependency-first order into runs of consecutive plans none of which depends on
    another of the same run: each run can be written concurrently once the earlier ones are."""
    waves: list[list[_Plan]] = []
    ids: set[str] = set()
    for plan in order:
        if not waves or any(d in ids for d in plan.deps):
            waves.append([])
            ids = set()
        waves[-1].append(plan)
        ids.add(plan.job_id)
    return waves


def _topo(plans: list[_Plan]) -> list[_Plan]:
    by_id = {p.job_id: p for p in plans}
    out: list[_Plan] = []
    done: set[str] = set()

    def visit(p: _Plan) -> None:
        if p.job_id in done:
            return
        done.add(p.job_id)
        for d in p.deps:
            if d in by_id:
                visit(by_id[d])
        out.append(p)

    for p in plans:
        visit(p)
    return out
