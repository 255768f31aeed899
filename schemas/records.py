"""Records stored on the broker. Values are JSON (msgspec), readable with ``nats kv get``.

Economics are part of the data model: every attempt carries an :class:`Attribution`
(lane, job, tracker item, repo, provider, model, funding window, tokens, cost with an
``estimated`` flag), and every station that is not working carries an idle reason.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from .lifecycle import Stage
from .manifest import FailureClass, Manifest
from .profiles import ProfileSnapshot

MAX_ATTEMPTS_KEPT = 20
"""Attempt history kept on the job record; older attempts stay in ``GF_EVENTS``."""


class Lease(msgspec.Struct, forbid_unknown_fields=False):
    """Who holds a job. ``epoch`` is the fencing token: every write by the holder checks it."""

    factory: str
    station: int
    epoch: int
    renewals: int = 0


class Attribution(msgspec.Struct, omit_defaults=True):
    """Where the money and tokens of one attempt went. ``cost_estimated`` is True when the
    cost was computed from token counts and list prices rather than read from an invoice."""

    lane: str = ""
    """factory id x station index, as ``<factory>/<station>``."""
    job: str = ""
    tracker_item: str | None = None
    repo: str | None = None
    product: str = "default"
    provider: str | None = None
    engine: str | None = None
    """The engine that ran the attempt (``claude``, ``shell``), resolved at claim for an
    ``engine-class`` job (None: no engine ran, or a record older than this field)."""
    model: str | None = None
    funding_window: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    cost_usd: float = 0.0
    cost_estimated: bool = True
    # -- the workspace (issue 10): what the money bought, for the usage insights --
    files_changed: int | None = None
    """Files a ``repo`` job's attempt changed since ``base`` (its branch's diff; None: no repo,
    or nothing was committed). Copied from the attempt's :class:`WorkspaceResult`, so a spend
    reader (tokens, cost) has the work done next to it (cost per changed line)."""
    lines_added: int | None = None
    """Lines the attempt added since ``base`` (None as for ``files_changed``)."""
    lines_deleted: int | None = None
    """Lines the attempt deleted since ``base`` (None as for ``files_changed``)."""
    head: str | None = None
    """The commit those figures describe (the attempt's branch head)."""


def with_workspace(attribution: Attribution, ws: "WorkspaceResult | None") -> Attribution:
    """``attribution`` with the workspace figures of ``ws`` (files changed, lines added and
    deleted, head commit); unchanged without a workspace or a commit (pure).

    :param attribution: the attempt's attribution.
    :param ws: the attempt's workspace result, or None (no ``repo``).
    """
    if ws is None or ws.head is None:
        return attribution
    return msgspec.structs.replace(attribution, files_changed=ws.files_changed, lines_added=ws.lines_added,
                                   lines_deleted=ws.lines_deleted, head=ws.head)


class Usage(msgspec.Struct, omit_defaults=False):
    """What one attempt of an engine consumed, as parsed from its output while it ran.
    Every field is always encoded (an unknown count as null, ``cost_source`` even when it is
    ``unknown``): a reader never has to guess what a missing key meant.

    A count the engine did not report is None, never a made-up zero; ``cost_source`` says where
    ``cost_usd`` came from: ``reported`` (the CLI's own figure), ``priced`` (token counts times
    the shipped price table, whose version is ``price_table``), ``estimated`` (priced from
    counts the CLI only rounded, or from a proxy such as premium requests), or ``unknown``
    (``cost_usd`` None)."""

    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    turns: int | None = None
    tool_calls: int | None = None
    cost_usd: float | None = None
    cost_source: str = "unknown"
    """``reported``, ``priced``, ``estimated`` or ``unknown``."""
    price_table: str | None = None
    """The version of the price table a ``priced`` or ``estimated`` cost came from."""
    premium_requests: float | None = None
    """Premium requests the CLI reported (GitHub Copilot), when it counts in those, not tokens."""
    cost_note: str | None = None
    """How a cost not made from token counts was made (``priced per premium request …``)."""


def usage_tokens(usage: Usage) -> int:
    """Every token a run's model processed: input, output, cache-read and cache-write (a count
    the engine did not report adds nothing). What ``budget.tokens`` is compared with.

    :param usage: what the engine reported so far.
    """
    return sum(n or 0 for n in (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                                usage.cache_write_tokens))


def attributed(attribution: Attribution, usage: Usage | None) -> Attribution:
    """``attribution`` with its spend fields taken from ``usage``: tokens in (input plus
    cache-write, what was sent and billed as input), out, cached (cache reads), the model, and
    the cost, ``cost_estimated`` unless the engine reported the cost itself. Without usage
    (the engine reports nothing) it is returned unchanged.

    :param attribution: the attempt's attribution (lane, job, repo, ...).
    :param usage: what the engine reported, or None.
    """
    if usage is None:
        return attribution
    return msgspec.structs.replace(
        attribution,
        model=usage.model or attribution.model,
        tokens_in=(usage.input_tokens or 0) + (usage.cache_write_tokens or 0),
        tokens_out=usage.output_tokens or 0,
        tokens_cached=usage.cache_read_tokens or 0,
        cost_usd=usage.cost_usd or 0.0,
        cost_estimated=usage.cost_source != "reported",
    )


class WorkspaceResult(msgspec.Struct, omit_defaults=True):
    """What an attempt of a ``repo`` job did to its repository (issue 10): its branch, the head
    commit, what changed since ``base``, and whether the branch was pushed (fenced)."""

    branch: str
    """``gf/<job>/e<epoch>``."""
    base: str = ""
    """The branch the worktree started from."""
    base_commit: str | None = None
    head: str | None = None
    """The branch's last commit (the factory's commit of the engine's changes, or the engine's
    own); None when the attempt ended before anything was committed."""
    files_changed: int = 0
    lines_added: int = 0
    lines_deleted: int = 0
    pushed: bool = False
    detail: str = ""
    """Why it was not pushed (failed, fenced, nothing changed, the push failed), or the push."""
    outside_scope: list[str] = msgspec.field(default_factory=list)
    """Changed paths outside the job's ``scope`` (at most 100; shipped under ``scope-mode:
    warn``, refused under ``enforce``)."""
    protected: list[str] = msgspec.field(default_factory=list)
    """Changed paths matching the factory's ``protected_paths`` (at most 100; always refused)."""
    scope: str = ""
    """The scope guardrail's verdict in words (empty: the job had no scope and touched nothing
    protected)."""
    # -- shipping (``ship-as``; issue 10, helper shipmodes) --
    shipped_as: str = ""
    """How far shipping got: ``branch`` (pushed), ``pr-opened``, ``merged``; empty until
    pushed. Written by the factory (``review-policy: auto``) or the coordinator (a human's
    ``gigafactory ship``)."""
    pull_number: int | None = None
    """The pull request opened from ``branch`` into ``base`` (None: none opened)."""
    pull_url: str = ""
    """Where a human reads it (GitHub's page; empty for the local forge)."""
    pull_state: str = ""
    """``open``, ``merged`` or ``closed`` as the forge last said."""
    merged_commit: str | None = None
    """The merge commit on ``base``, once merged."""
    ship_detail: str = ""
    """Why shipping stopped short of ``ship-as`` (merge blocked by checks or protection, a
    conflict, a forge error), or what it did."""
    carried: str = ""
    """The attempt after ``rebase-needed``: what of the earlier work its worktree carried onto
    the new ``base`` (merged cleanly, merged with conflicts left for the agent, or nothing: a
    script starts from the new base), in words; empty for every other attempt."""


class Checkpoint(msgspec.Struct, omit_defaults=True):
    """The last work-in-progress snapshot of a ``repo`` job (issue 10): a commit on
    ``gf/<job>/wip`` that a later attempt starts its worktree from. Written by the holder of
    ``epoch``, by compare-and-set, only after the commit was pushed (fenced)."""

    commit: str
    epoch: int
    attempt: int
    at: float
    """When the worktree was snapshotted (the holder's wall clock, just before the snapshot):
    what the engine did after it is not in this checkpoint."""
    branch: str
    """``gf/<job>/wip``."""
    seq: int = 1
    """Its number within the job (the ``Gigafactory-Checkpoint`` trailer)."""
    files_changed: int = 0
    lines_added: int = 0
    lines_deleted: int = 0
    """What the job changed since ``base_commit``, as of this checkpoint."""
    base_commit: str | None = None
    """The base the job's work started from (diffs are taken against it)."""
    paths: list[str] = msgspec.field(default_factory=list)
    """Some of the changed paths (at most 50), for the resuming engine's note."""
    session: str | None = None
    """The agent CLI's session id (Claude's stream ``session_id``, Codex's ``thread_id``, the id
    the factory gave Gemini or Copilot), so a later attempt on ``factory`` resumes it."""
    factory: str = ""
    """Where it was taken (a session id is usable only there)."""
    engine: str = ""


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    """One execution attempt of a job (a new one for every claim)."""

    attempt: int
    epoch: int
    factory: str
    station: int
    started_at: float = 0.0
    ended_at: float = 0.0
    engine: str | None = None
    """The engine this attempt runs, chosen by the claiming factory before its claim (for an
    ``engine-class`` job: by seats and ``prefers``); None in records older than this field."""
    engine_version: str | None = None
    """That engine's version as the factory's probe found it (its ``<engine>:<version>`` offer),
    None when the probe knows none."""
    outcome: str = "running"
    """``running``, ``passed``, a :class:`FailureClass` value, ``handed_back`` or ``fenced``."""
    exit_code: int | None = None
    verify_exit_code: int | None = None
    detail: str = ""
    log: str | None = None
    """Object name of the captured log in ``gf_artifacts``."""
    attribution: Attribution = msgspec.field(default_factory=Attribution)
    usage: Usage | None = None
    """What the engine consumed (tokens, turns, tool calls, cost and its source), as it reported
    it; None when the engine reports nothing (``shell``, ``noop``) or the attempt never ran one."""
    workspace: WorkspaceResult | None = None
    """A ``repo`` job's branch, head commit, diff stats and push (None: no repo, or not reached)."""


class Approval(msgspec.Struct):
    """One listed reviewer's ship of a job whose ``review-policy`` asks a quorum.

    :param identity: the reviewer's authenticated identity (from the gate subject).
    :param epoch: the epoch it approved (a requeued job's new attempt needs new approvals).
    :param at: when (seconds since the epoch)."""

    identity: str
    epoch: int
    at: float


class JobRecord(msgspec.Struct, omit_defaults=False):
    """The durable source of truth for a job (``gf_jobs``, key = job id)."""

    id: str
    manifest: Manifest
    body: str
    source: str
    """Where it came from: a file path, ``inbox:<name>`` or ``api``."""
    content_hash: str
    submitted_at: float
    pool: str
    requirements: list[str]
    deps: list[str] = msgspec.field(default_factory=list)
    """Resolved dependency job ids."""
    stage: Stage = Stage.QUEUED
    reason: str = ""
    """Why the job is in its stage, in words an operator can act on."""
    epoch: int = 0
    """Fencing token. Bumped by every claim and every reclaim/requeue/cancel."""
    lease: Lease | None = None
    attempt: int = 0
    """Claims so far (the current or last attempt's number)."""
    retries_used: int = 0
    backoff_s: float = 0.0
    """Retry backoff: the job is not dispatched until this long after the broker timestamp of
    the revision that requeued it (broker time, never a factory's clock)."""
    last_failure: FailureClass | None = None
    attempts: list[AttemptRecord] = msgspec.field(default_factory=list)
    superseded: int = 0
    """How many times a new submission of the same idempotency key replaced this one."""
    updated_at: float = 0.0
    profile: ProfileSnapshot | None = None
    """The profile the job named, as it was at submit (name, content hash, persona, scope); the
    manifest above is already resolved against it. Factories read this, never profile files."""
    rebases_used: int = 0
    """``rebase-needed`` requeues so far (a branch that no longer merged into a moved ``base``);
    after :data:`~gigafactory.schemas.protocol.MAX_REBASES` the job fails ``merge_conflict``."""
    checkpoint: Checkpoint | None = None
    """The last WIP checkpoint of a ``repo`` job (None: none taken); a later attempt resumes from it."""
    trace: str = ""
    """The job's trace context, a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``) of its
    ``intake`` span, written at submit ("" when the coordinator that took it did not trace and
    its submitter sent none). Claims, results and reclaims are writes on this record, not
    messages, so every later span of the job takes its parent from here (gigafactory/tracing.py)."""
    refs_cleaned: str = ""
    """What the coordinator's clean-up did once the job ended for good (``repo`` jobs): the
    superseded epochs' branches and the WIP branch deleted on the remote, their pull requests
    closed; in words. Empty until it ran (it runs once: this field says it is done)."""
    budget_override: str = ""
    """Who let this job start over its budget (``gigafactory budget override``; "" for nobody):
    with budget enforcement on, a job held for ``budget`` is offered once this is set."""
    approvals: list[Approval] = msgspec.field(default_factory=list)
    """Reviewers' approvals toward a ``review-policy`` quorum (coordinator/gate.py); one per
    reviewer and epoch."""
    sig: str | None = None
    """The lease holder's signature over this write: ``<public nkey>:<base64 Ed25519 signature>``
    over (job, epoch, stage, content hash) (:mod:`~gigafactory.schemas.signing`). Every write by
    a factory with an identity carries one; the coordinator verifies it against the holder's
    descriptor (``FactoryRecord.nkey``), because subject permissions cannot narrow a factory's
    writes to the jobs it holds. None: a write by the coordinator, or a factory without one."""

    @property
    def priority_rank(self) -> int:
        from .manifest import PRIORITY_RANK

        return PRIORITY_RANK[self.manifest.priority]


class StationState(enum.StrEnum):
    BUSY = "busy"
    IDLE = "idle"


class IdleReason(enum.StrEnum):
    """Why a station is not working. Every idle station has one (no dark idle)."""

    NO_WORK = "no-work"
    """Pulling, but no queued job in any pool this factory serves."""
    STARTING = "starting"
    DRAINING = "draining"
    SEAT_LIMIT = "seat-limit"
    """The engine's seat limit is reached on this factory."""
    LOCK_WAIT = "lock-wait"
    """The last job offered waits on a lock held elsewhere."""
    DISPATCH_DOWN = "dispatch-down"
    """Push dispatch is unavailable; polling the queue index instead."""
    BROKER_DOWN = "broker-down"
    """Disconnected from the broker; results wait in the local outbox."""
    # The seed's classes (issue 13): set where the fleet knows them, and grouped by
    # economics/idle.py. Added at the end: old records keep decoding.
    WAITING_HOSTED = "waiting-hosted"
    """Its work waits on a hosted service (a hosted CI run, a remote agent) to answer."""
    WAITING_MERGE = "waiting-merge"
    """Its work waits on a merge (review, merge queue) before the next can start."""
    POLICY_PAUSED = "policy-paused"
    """Paused by policy: the fleet is halted, or the queued work is held for its budget."""
    BLOCKED = "blocked"
    """The work it could take is blocked (dependencies, a capability this factory lacks)."""
    PREWARM = "prewarm"
    """Getting ready to work (probing, cleaning its workspace, warming a mirror)."""
    OPERATOR_STEERING = "operator-steering"
    """An operator holds it (steering a session by hand)."""


class Station(msgspec.Struct):
    index: int
    state: StationState = StationState.IDLE
    job: str | None = None
    epoch: int | None = None
    idle_reason: IdleReason | None = IdleReason.STARTING
    since: float = 0.0


class FactoryRecord(msgspec.Struct):
    """A factory's descriptor and heartbeat (``gf_factories``, key = factory id)."""

    id: str
    host: str
    os: str
    arch: str
    capabilities: list[str]
    stations: list[Station]
    seats: dict[str, int] = msgspec.field(default_factory=dict)
    status: str = "up"
    """``up``, ``draining`` or ``down``."""
    dispatch_mode: str = "push"
    """``push`` (pool consumers) or ``poll`` (fallback)."""
    pools: list[str] = msgspec.field(default_factory=list)
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    heartbeat_interval_s: float = 5.0
    pid: int = 0
    version: str = ""
    outbox_pending: int = 0
    quarantined: int = 0
    withdrawn_engines: dict[str, str] = msgspec.field(default_factory=dict)
    """Engines this factory stopped offering, each with why (an ``auth_failed`` attempt): it
    offers them again once their credential variables change."""
    nkey: str | None = None
    """The public nkey this factory signs its job-record writes with (its broker identity). Only
    the factory itself can write its descriptor (the broker's permissions), so the coordinator
    trusts this key for records the factory holds. None: no identity, no signatures."""


class PoolRecord(msgspec.Struct):
    id: str
    requirements: list[str]
    created_at: float


class LockRecord(msgspec.Struct):
    lock: str
    job: str
    epoch: int
    factory: str


class IdempotencyRecord(msgspec.Struct):
    key: str
    job: str
    content_hash: str


class QueueEntry(msgspec.Struct):
    """``gf_queue`` value: enough to order candidates without reading every job."""

    job: str
    priority_rank: int
    submitted_at: float
    epoch: int


class DispatchMessage(msgspec.Struct, omit_defaults=True):
    """What travels on ``gf.dispatch.<pool>``: a pointer to the job, and (when it fits) the record
    as the coordinator last saw it, with its ``gf_jobs`` revision. The job record in the bucket
    stays the truth: a factory claims with a compare-and-set on ``revision``, so a carried copy
    that is no longer current loses the CAS and the factory falls back to reading the record.
    Carrying it saves the factory's read (one round trip per job); a message without it (an
    older coordinator, a record over ``dispatch_record_max_bytes``) is claimed as before: read,
    then CAS. Older factories ignore the two extra fields."""

    job: str
    epoch: int
    pool: str
    revision: int | None = None
    """The ``gf_jobs`` revision ``record`` was stored at (None: not carried)."""
    record: msgspec.Raw = msgspec.Raw()
    """The job record stored at ``revision``, as JSON (empty: read it from ``gf_jobs``). Kept
    raw so that a record this factory cannot decode costs only the shortcut, never the offer."""

    def carried(self) -> JobRecord | None:
        """The carried record when it is usable for a claim without a read: present, with its
        revision, decodable, and naming the same job and epoch as the pointer. Anything else is
        ignored (None), and the factory reads the record as an older coordinator's message
        makes it do."""
        if not self.record or self.revision is None or self.revision < 1:
            return None
        try:
            rec = decode(self.record, JobRecord)
        except msgspec.DecodeError:
            return None
        return rec if rec.id == self.job and rec.epoch == self.epoch else None


def dispatch_message(rec: JobRecord, revision: int | None, max_record_bytes: int) -> DispatchMessage:
    """The dispatch message offering ``rec`` (stored at ``revision``): the record rides along
    when its encoding is at most ``max_record_bytes`` (``dispatch_record_max_bytes``), else the
    message is a pointer only and the factory reads the record.

    :param rec: the job record as stored at ``revision``, whole (a compact or partial copy must
        never be carried: the factory's claim is built on it).
    :param revision: its ``gf_jobs`` revision; None: carry nothing.
    :param max_record_bytes: the largest encoded record carried (0: never)."""
    msg = DispatchMessage(job=rec.id, epoch=rec.epoch, pool=rec.pool)
    if revision is None or max_record_bytes <= 0:
        return msg
    data = _ENC.encode(rec)
    if len(data) > max_record_bytes:
        return msgspec.structs.replace(msg, revision=revision)
    return msgspec.structs.replace(msg, revision=revision, record=msgspec.Raw(data))


class EventRecord(msgspec.Struct, omit_defaults=True):
    """One entry of the ``GF_EVENTS`` audit stream."""

    kind: str
    at: float
    job: str | None = None
    stage_from: str | None = None
    stage_to: str | None = None
    epoch: int | None = None
    factory: str | None = None
    actor: str = ""
    reason: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


_ENC = msgspec.json.Encoder()
_DECODERS: dict[type, msgspec.json.Decoder] = {}


def encode(obj: msgspec.Struct) -> bytes:
    return _ENC.encode(obj)


def decode(data: bytes, typ: type[Any]) -> Any:
    dec = _DECODERS.get(typ)
    if dec is None:
        dec = _DECODERS[typ] = msgspec.json.Decoder(typ)
    return dec.decode(data)
