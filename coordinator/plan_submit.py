"""Intake's planner, sans-I/O: what a batch of job files means, given what the broker holds.

Plain values in, plain values out: no broker, no clock, no asyncio. :func:`intake.submit`
(``coordinator/intake.py``) is the thin I/O around it; a batch is planned in phases because
what to read next depends on what was read before:

1. :func:`parse_batch` (the request) and :func:`batch_keys` (a key used twice in the batch
   with other content is refused). Intake then reads what each key and each file identity
   names on the broker.
2. :meth:`SubmitPlanner.assign`: each file's job id and action (``create``, ``existing``,
   ``supersede``) from those reads (:func:`decide_existing`). Intake reads the dependencies
   :meth:`SubmitPlanner.deps_to_resolve` names.
3. :meth:`SubmitPlanner.link`: each dependency resolved to a job id, or refused. Intake reads
   the stored jobs a cycle could pass through (only when the batch supersedes a job).
4. :meth:`SubmitPlanner.check_cycles` (Tarjan's algorithm, iterative) and
   :meth:`SubmitPlanner.build`: the records to create (stage, reason and size checked before any
   write), the pools to make sure of, and the writes in waves, dependencies first
   (a :class:`SubmitPlan`).

Every phase adds its refusals to ``errors`` (each naming file, line and field); intake raises
them together (:class:`SubmitError`) at the end of a phase, before any write. Writes are
intake's: create-if-absent for a new job (a conflict is judged again by
:func:`decide_existing` on the record found), a compare-and-set for a supersede
(:func:`superseding_record`), then the key's index entry and the ``submitted`` event.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import WAITING, Stage
from gigafactory.schemas.limits import Limits, clip_reason, hint
from gigafactory.schemas.manifest import JobFile, ManifestError, parse_job_text
from gigafactory.schemas.records import JobRecord, encode

KEY_NAMESPACE = "idempotency-key"
FILE_NAMESPACE = "file"


class SubmitError(Exception):
    """One or more files of a batch were refused; nothing of the batch was written."""

    def __init__(self, errors: list[dict]) -> None:
        self.errors = errors
        super().__init__("; ".join(format_error(e) for e in errors))


def format_error(e: dict) -> str:
    """One refusal as ``file:line: field 'f': message``."""
    where = e["file"] + (f":{e['line']}" if e.get("line") else "")
    field = f" field '{e['field']}':" if e.get("field") else ""
    return f"{where}:{field} {e['message']}"


def batch_error(message: str) -> dict:
    return {"file": "<batch>", "line": None, "field": None, "message": message}


def file_error(jf: JobFile, field: str | None, message: str) -> dict:
    return {"file": jf.path, "line": None, "field": field, "message": message}


@dataclass
class SubmitResult:
    file: str
    job: str
    status: str
    """``created``, ``existing`` (same key and content) or ``superseded``."""
    stage: str

    def to_dict(self) -> dict:
        return {"file": self.file, "job": self.job, "status": self.status, "stage": self.stage}


def key_job_id(key: str) -> str:
    """The job id an idempotency key always maps to."""
    return names.derived_job_id(key, KEY_NAMESPACE, key)


def stem(path: str) -> str:
    """A file's name without folders and ``.md``: the readable part of its job id."""
    return re.sub(r"\.md$", "", path.replace("\\", "/").rsplit("/", 1)[-1])


@dataclass
class JobPlan:
    """What intake does with one file of the batch."""

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
    waiting: list[str] = field(default_factory=list)
    """Its dependencies not met when the batch was read: it is written ``blocked`` on them."""


def parse_batch(files: list[tuple[str, str]], identities: list | None, lim: Limits) -> list[JobFile]:
    """Every ``(path, text)`` of the batch parsed; raises :class:`SubmitError` with every
    file's refusal (or the batch's: empty, over ``lim.max_batch_files``).

    :param identities: one per file or None (a programming error otherwise: ValueError)."""
    if not files:
        raise SubmitError([batch_error("no job files given")])
    if len(files) > lim.max_batch_files:
        raise SubmitError([batch_error(
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
    return parsed


def batch_keys(parsed: list[JobFile]) -> tuple[list[str], list[dict]]:
    """The batch's distinct idempotency keys (first use first), and a refusal for each file
    that uses a key another file of the batch uses with other content."""
    seen: dict[str, JobFile] = {}
    errors = []
    for jf in parsed:
        k = jf.manifest.idempotency_key
        if k is None:
            continue
        if k in seen and seen[k].content_hash != jf.content_hash:
            errors.append(file_error(jf, "idempotency-key",
                                     f"{k!r} is also used by {seen[k].path} in this batch with other content"))
        seen.setdefault(k, jf)
    return list(seen), errors


def identity_ids(parsed: list[JobFile], identities: list[str | None]) -> dict[str, str]:
    """identity -> the job id derived from it, for each unkeyed file the caller identified."""
    return {i: names.derived_job_id(stem(jf.path), FILE_NAMESPACE, i)
            for jf, i in zip(parsed, identities) if i is not None and jf.manifest.idempotency_key is None}


def decide_existing(plan: JobPlan, rec: JobRecord, rev: int) -> str | None:
    """Set ``plan`` to what a stored job ``rec`` (at revision ``rev``) at its id means:
    ``existing`` (same content), ``supersede`` (other content, still waiting). Returns the
    refusal, or None."""
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


KeyFound = tuple[str, "JobRecord | None", int]
"""What a key names on the broker: (job id, its record or None if none yet, revision)."""
Resolved = tuple[str, "JobRecord | None"] | None
"""What a dependency names: (job id, its stored record, None for a job of this batch), or
None: nothing."""


@dataclass
class SubmitPlan:
    """The writes of a batch, all checked: make sure of ``pools`` (those the submitter does not
    know to exist), write ``waves`` in order
    (each wave's jobs concurrently), publish again the ``submitted`` events of ``found``
    (young jobs a retried batch found), and answer with ``plans`` in file order."""

    plans: list[JobPlan]
    waves: list[list[JobPlan]]
    pools: list[tuple[str, list[str]]]
    found: list[JobRecord]
    now: float


class SubmitPlanner:
    """One batch's plan, built phase by phase from the request and the reads intake makes in
    between (see the module docstring). Pure: it reads only its arguments; ``errors`` gathers
    the refusals of the phases so far.

    :param parsed: the batch's job files (profiles resolved).
    :param identities: one per file or None: an unkeyed file's id is derived from it.
    :param source: who submits (``api``, ``inbox``), stored as ``<source>:<path>``.
    :param lim: the size limits (``record_headroom_bytes``, ``max_reason_chars``).
    :param new_id: a fresh job id for a file name stem (random in production)."""

    def __init__(self, parsed: list[JobFile], identities: list[str | None] | None, *, source: str,
                 lim: Limits, new_id: Callable[[str], str]) -> None:
        self.parsed = parsed
        self.identities = identities or [None] * len(parsed)
        self.source, self.lim, self.new_id = source, lim, new_id
        self.keys, self.errors = batch_keys(parsed)
        self.ident_ids = identity_ids(parsed, self.identities)
        self.plans: list[JobPlan] = []
        self.by_key: dict[str, JobPlan] = {}
        """key -> the plan of the batch's first file with it."""
        self.stored: dict[str, JobRecord] = {}
        """Records read while planning (by job id): their stages decide blocked or queued."""

    def err(self, jf: JobFile, field: str | None, message: str) -> None:
        self.errors.append(file_error(jf, field, message))

    @property
    def writing(self) -> list[JobPlan]:
        return [p for p in self.plans if p.action != "existing"]

    def assign(self, key_found: Mapping[str, KeyFound],
               ident_found: Mapping[str, tuple[JobRecord, int, float] | None]) -> None:
        """Each file's job id and action. ``key_found``: what each of :attr:`keys` names;
        ``ident_found``: the record (and revision) at each of :attr:`ident_ids`' ids, or None."""
        for jf, ident in zip(self.parsed, self.identities):
            key = jf.manifest.idempotency_key
            if key is not None and key in self.by_key:
                self.plans.append(JobPlan(jf, self.by_key[key].job_id, "existing", key=key))
                continue
            plan = JobPlan(jf, "", "create", key=key)
            if key is not None:
                plan.job_id, prior_rec, prior_rev = key_found[key]
                if prior_rec is not None:
                    problem = decide_existing(plan, prior_rec, prior_rev)
                    if problem:
                        self.err(jf, "idempotency-key", problem)
                self.by_key[key] = plan
            elif ident is not None:
                plan.identity, plan.job_id = ident, self.ident_ids[ident]
                got = ident_found[ident]
                if got is not None:
                    if got[0].content_hash == jf.content_hash:
                        plan.action, plan.prior, plan.prior_rev = "existing", got[0], got[1]
                    else:
                        self.err(jf, None, f"job id {plan.job_id} is taken by other content (an id collision); "
                                           "submit again")
            else:
                plan.job_id = self.new_id(stem(jf.path))
            self.plans.append(plan)
        self.stored = {p.job_id: p.prior for p in self.plans if p.action == "existing" and p.prior}

    def deps_to_resolve(self) -> list[str]:
        """The distinct dependency names to look up: those of the files to write that name
        no key of this batch. Each is another key (``KeyFound``) or a job id."""
        return list(dict.fromkeys(d for p in self.plans if p.action != "existing" for d in p.jf.manifest.deps
                                  if d not in self.by_key))

    @property
    def batch_ids(self) -> set[str]:
        """The job ids of this batch (a dependency naming one needs no read)."""
        return {p.job_id for p in self.plans}

    def link(self, resolved: Mapping[str, Resolved]) -> None:
        """Each file's dependencies as job ids (``resolved``: what each of
        :meth:`deps_to_resolve` names), each refused if it names nothing or the job itself."""
        for dep, got in resolved.items():
            if got is not None and got[1] is not None:
                self.stored[got[0]] = got[1]
        for plan in self.writing:
            for i, dep in enumerate(plan.jf.manifest.deps):
                got = resolved.get(dep)
                target = self.by_key[dep].job_id if dep in self.by_key else (got[0] if got else None)
                if target is None:
                    self.err(plan.jf, f"deps[{i}]",
                             f"{dep!r} is neither a job id nor the idempotency-key of a submitted job or of another "
                             "file in this batch; submit the dependency first (or in the same batch)")
                    continue
                if target == plan.job_id:
                    self.err(plan.jf, f"deps[{i}]", f"{dep!r} is this job itself")
                    continue
                plan.deps.append(target)

    def cycle_graph(self) -> tuple[dict[str, list[str]], bool]:
        """The batch's dependency graph (job id -> deps), and whether stored jobs must be
        followed from it: only when the batch supersedes a job. A stored job's deps were fixed
        when it was submitted and can only name jobs that existed then, so only an id that
        already existed (a superseded job) can be the way back into the batch."""
        writing = self.writing
        return {p.job_id: p.deps for p in writing}, any(p.action == "supersede" for p in writing)

    def check_cycles(self, graph: Mapping[str, list[str]]) -> None:
        """Refuse each file that would sit on a dependency cycle of ``graph`` (the batch's,
        extended with the stored jobs it reaches), naming one cycle through it."""
        on_cycle = strongly_connected(graph)
        label = {p.job_id: (p.jf.manifest.idempotency_key or p.job_id) for p in self.plans}
        for plan in self.writing:
            comp = on_cycle.get(plan.job_id)
            if comp is not None:
                cycle = path_back(plan.job_id, graph, comp)
                self.err(plan.jf, "deps", "would close a dependency cycle: " + " -> ".join(label.get(j, j) for j in cycle))

    def build(self, now: float, max_payload: int) -> SubmitPlan:
        """The records to create (stamped ``now``), each refused if it would not leave
        ``record_headroom_bytes`` under the broker's ``max_payload`` for the lease and results
        the protocol adds later (it would be stored but never claimable); the pools the
        writes go to; the waves."""
        writing = self.writing
        in_batch = {p.job_id for p in writing}
        for plan in writing:
            m = plan.jf.manifest
            reqs = list(m.requirements())
            rec = JobRecord(
                id=plan.job_id, manifest=m, body=plan.jf.body, source=f"{self.source}:{plan.jf.path}",
                content_hash=plan.jf.content_hash, submitted_at=now, pool=caps.pool_id(reqs), requirements=reqs,
                deps=plan.deps, updated_at=now, profile=plan.jf.profile,
            )
            self._check_size(plan, rec, max_payload)
            plan.waiting = self._unmet(plan, in_batch)
            if plan.action == "create":
                plan.record = msgspec.structs.replace(rec, **waiting_fields(plan.waiting, self.lim))
        pools: dict[str, list[str]] = {}
        for plan in writing:
            reqs = list(plan.jf.manifest.requirements())
            pools.setdefault(caps.pool_id(reqs), reqs)
        found = {p.prior.id: p.prior for p in self.plans if p.action == "existing" and p.prior is not None}
        return SubmitPlan(self.plans, waves(writing) if not self.errors else [], list(pools.items()),
                          list(found.values()), now)

    def _check_size(self, plan: JobPlan, rec: JobRecord, max_payload: int) -> None:
        lim = self.lim
        size = len(encode(rec))
        if size + lim.record_headroom_bytes > max_payload:
            self.err(plan.jf, None, (
                f"its job record would be {size:,} bytes; with {lim.record_headroom_bytes:,} bytes kept for the "
                f"lease and results added later {hint('record_headroom_bytes', lim.record_headroom_bytes)}, the "
                f"broker's max payload ({max_payload:,} bytes) leaves {max_payload - lim.record_headroom_bytes:,}; "
                "shorten the prompt (keep large inputs in the repository) or raise the broker's max_payload"))

    def _unmet(self, plan: JobPlan, in_batch: set[str]) -> list[str]:
        # Stages read while resolving: a dependency that moved on since is caught by the
        # scheduler's pass over blocked jobs, which re-reads every dependency.
        mode = plan.jf.manifest.deps_mode
        return [d for d in plan.deps if d in in_batch or d not in self.stored
                or not protocol.dep_satisfied(self.stored[d].stage, mode)]


def waiting_fields(waiting: list[str], lim: Limits) -> dict:
    """A new record's stage and reason: ``blocked`` on its unmet dependencies, else ``queued``."""
    if waiting:
        return {"stage": Stage.BLOCKED, "reason": clip_reason("waiting for " + ", ".join(waiting), lim.max_reason_chars)}
    return {"stage": Stage.QUEUED, "reason": "waiting for a factory"}


def superseding_record(rec: JobRecord, plan: JobPlan, now: float, source: str, lim: Limits) -> JobRecord:
    """The record that replaces the waiting job ``rec`` with ``plan``'s new content: the
    epoch bumped (an offer of the old content is void), blocked on ``plan.waiting`` or queued."""
    m = plan.jf.manifest
    reqs = list(m.requirements())
    new = msgspec.structs.replace(
        rec, manifest=m, body=plan.jf.body, content_hash=plan.jf.content_hash, profile=plan.jf.profile,
        source=f"{source}:{plan.jf.path}", pool=caps.pool_id(reqs), requirements=reqs, deps=plan.deps,
        superseded=rec.superseded + 1, epoch=rec.epoch + 1, backoff_s=0.0,
    )
    out = protocol.set_blocked(new, now, plan.waiting) if plan.waiting else protocol.unblock(new, now)
    reason = clip_reason(out.reason, lim.max_reason_chars) if plan.waiting else "waiting for a factory"
    return msgspec.structs.replace(out.record, reason=reason)


def answers(plan: SubmitPlan, results: Mapping[int, SubmitResult]) -> list[SubmitResult]:
    """The answer per file, in file order: the result of its write (``results``: by
    ``id(plan)``), else ``existing`` with the stage of the job found (or of the batch's
    first file with the same key)."""
    by_key = {}
    for p in plan.plans:
        if p.key is not None:
            by_key.setdefault(p.key, p)
    out = []
    for p in plan.plans:
        if id(p) in results:
            out.append(results[id(p)])
            continue
        first = by_key.get(p.key) if p.key else None
        rec = p.prior if p.prior is not None else (first.prior if first else None)
        stage = str(results[id(first)].stage) if first is not None and id(first) in results else (
            str(rec.stage) if rec is not None else "unknown")
        out.append(SubmitResult(p.jf.path, p.job_id, "existing", stage))
    return out


def strongly_connected(graph: Mapping[str, list[str]]) -> dict[str, frozenset[str]]:
    """Every node on a cycle, mapped to its strongly connected component (Tarjan's algorithm,
    with an explicit stack instead of recursion: a chain of 10,000 is no deeper for Python
    than a chain of 2)."""
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


def path_back(start: str, graph: Mapping[str, list[str]], comp: frozenset[str]) -> list[str]:
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


def waves(plans: list[JobPlan]) -> list[list[JobPlan]]:
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
    out: list[list[JobPlan]] = []
    while wave:
        out.append([by_id[j] for j in wave])
        nxt = []
        for j in wave:
            for k in dependents.get(j, []):
                waiting_on[k] -= 1
                if waiting_on[k] == 0:
                    nxt.append(k)
        wave = nxt
    assert sum(map(len, out)) == len(plans), "a cycle reached the write phase"
    return out
