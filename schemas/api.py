"""The coordinator's API as types: one request and one reply structure per endpoint, shared by
the coordinator's service (``coordinator/api.py`` decodes each request into its structure and
encodes the reply) and the Python client (``gigafactory/client.py`` encodes the requests and
decodes the replies). A field renamed here is renamed on both sides at once; a coordinator and
a client of different versions that disagree fail with a named error, never silently.

On the wire each is a JSON object on ``gf.api.<endpoint>`` (the ``nats`` CLI can send one:
``nats req gf.api.status '{"job": "..."}'``). A request with an unknown field, a missing one or
a value of the wrong type or out of bounds is refused with :class:`ApiError` 400, naming the
field (``$.job``). :data:`REQUESTS` and :data:`REPLIES` map endpoint names to the structures;
an endpoint not in them (one added later) takes and gives plain JSON objects.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .lifecycle import Stage
from .names import JOB_ID_MAX_CHARS
from .records import JobRecord

STATUS_EVENTS_MAX = 1000
"""The most events one ``status`` reply carries (the oldest first; ``GF_EVENTS`` keeps them all)."""
LIST_LIMIT_MAX = 100_000
"""The most job summaries one ``list`` reply carries (newest first)."""
SOURCE_MAX_CHARS = 256
"""The longest ``source`` a submit may name (it is stored on every job record of the batch)."""
ACTOR_MAX_CHARS = 256
"""The longest ``actor`` a request may name (stored on the record and its event); the
coordinator's ``max_reason_chars`` may bound it further."""

JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=JOB_ID_MAX_CHARS,
                                    description="a job id, as 'gigafactory jobs' lists them")]
Actor = Annotated[str, msgspec.Meta(max_length=ACTOR_MAX_CHARS, description="who asks (empty: operator)")]


class ApiError(Exception):
    """An API request refused or failed: ``code`` is an HTTP-like status (400 bad request,
    404 unknown job, 409 wrong stage, 500 the coordinator failed, 502 a reply the client
    cannot read, 503/504 no coordinator), ``errors`` the per-file details of a refused submit
    ({file, line, field, message}). The coordinator raises it, the service sends it as a NATS
    micro error (:class:`ErrorReply`), and the client raises the same class again."""

    def __init__(self, code: int, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.errors = int(code), message, errors or []

    @property
    def is_client_error(self) -> bool:
        """The request was wrong (4xx): sending it again will not help."""
        return 400 <= self.code < 500


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every request: unknown fields are refused (a misspelt one is an error, not a
    default silently taken)."""


class Reply(msgspec.Struct, kw_only=True):
    """Base of every reply: a client reads a reply that has more fields than it knows (a newer
    coordinator), never one that lacks a field it needs."""


class ErrorReply(Reply):
    """The body of an error reply (with the ``Nats-Service-Error-Code`` header)."""

    error: str
    """What was wrong and what to do."""
    errors: list[dict[str, Any]] = []
    """A refused submit's details, one per problem: ``{file, line, field, message}``."""


# -- what the replies carry -------------------------------------------------------------------


class JobSummary(Reply):
    """One job as ``list``, ``status``, ``cancel``, ``requeue``, ``ship`` and the client's
    ``wait``/``watch`` show it (:func:`job_summary` makes it from the record)."""

    id: str
    stage: str
    """A :class:`~gigafactory.schemas.lifecycle.Stage` value."""
    priority: str
    product: str
    attempt: int
    """Attempts started so far."""
    epoch: int
    """The fencing token of the current (or last) lease."""
    holder: str | None
    """The factory holding the job's lease, or None."""
    reason: str
    """Why the job is where it is."""
    submitted_at: float
    """Unix seconds."""
    source: str
    idempotency_key: str | None
    lock: str | None
    deps: list[str]
    requirements: list[str]


def job_summary(rec: JobRecord) -> JobSummary:
    """The summary of one job.

    :param rec: the job's record (from ``gf_jobs`` or the archive).
    """
    return JobSummary(
        id=rec.id, stage=str(rec.stage), priority=str(rec.manifest.priority),
        product=rec.manifest.product, attempt=rec.attempt, epoch=rec.epoch,
        holder=rec.lease.factory if rec.lease else None, reason=rec.reason,
        submitted_at=rec.submitted_at, source=rec.source,
        idempotency_key=rec.manifest.idempotency_key, lock=rec.manifest.lock,
        deps=list(rec.deps), requirements=list(rec.requirements),
    )


# -- submit -----------------------------------------------------------------------------------


class JobFile(Request):
    """One job file of a submit: its text (front matter and body) and the name errors cite."""

    text: str
    path: str = "<api>"


class SubmitRequest(Request):
    """``submit``: a batch of job files, all or nothing (one invalid file submits none)."""

    files: list[JobFile]
    source: Annotated[str, msgspec.Meta(max_length=SOURCE_MAX_CHARS)] = "api"
    """Who submitted (``cli``, ``inbox``, ...), stored on each job."""


class SubmittedJob(Reply):
    """What became of one file of a submit."""

    file: str
    job: str
    """The job's id."""
    status: str
    """``created``, ``existing`` (same idempotency key and content) or ``superseded``."""
    stage: str


class SubmitReply(Reply):
    jobs: list[SubmittedJob]
    """One per file, in the request's order."""


# -- one job ----------------------------------------------------------------------------------


class StatusRequest(Request):
    """``status``: one job, why it is where it is, and its newest events."""

    job: JobId
    events: Annotated[int, msgspec.Meta(ge=0, le=STATUS_EVENTS_MAX)] = 50
    """How many of its events to include (0: none)."""


LOG_PAGE_MAX_BYTES = 256 * 1024
"""The most log bytes one ``logs`` reply carries (base64 in JSON: a reply stays well under the
broker's 1 MiB message size); a longer log is read in pages."""


class LogsRequest(Request):
    """``logs``: one page of one attempt's stored log (``gf_artifacts``). By epoch, not by
    object name: the coordinator finds the log on the job's own record, so a caller limited to
    some products reads only their jobs' logs."""

    job: JobId
    epoch: Annotated[int, msgspec.Meta(ge=1)]
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=LOG_PAGE_MAX_BYTES)] = LOG_PAGE_MAX_BYTES


class LogsReply(Reply):
    job: str
    epoch: int
    offset: int
    """Where ``data`` starts in the log."""
    data: bytes
    """The page (base64 in JSON)."""
    size: int
    """The whole log's size in bytes: read on from ``offset + len(data)`` while it is less."""


class StatusReply(Reply):
    job: JobSummary
    why: str
    """Why the job is where it is, as an operator reads it."""
    info: dict[str, Any]
    """Stage-dependent details: ``serving_factories``, ``missing_capabilities``,
    ``retry_in_s``, ``lock_holder``, ``deps``, ``lease_age_s``, ``archived``, ..."""
    record: dict[str, Any]
    """The whole job record (its body cut to ``STATUS_BODY_MAX_CHARS``)."""
    revision: int
    """The record's revision in ``gf_jobs`` (0: archived)."""
    events: list[dict[str, Any]]
    """The job's events, oldest first."""


class CancelRequest(Request):
    """``cancel``: any stage but shipped, failed and dead_letter -> failed (a running job is
    fenced and stopped)."""

    job: JobId
    reason: str = ""
    actor: Actor = "operator"


class RequeueRequest(Request):
    """``requeue``: any stage but shipped -> queued, with a fresh retry budget."""

    job: JobId
    actor: Actor = "operator"


class ShipRequest(Request):
    """``ship``: the human gate, testing or review -> shipped (at its forge first for a ``repo``
    job whose ``ship-as`` asks for a pull request or a merge)."""

    job: JobId
    actor: Actor = "operator"


class JobReply(Reply):
    """The job after a ``cancel`` or ``requeue``."""

    job: JobSummary


class ShipReply(Reply):
    job: JobSummary
    workspace: dict[str, Any] | None = None
    """What shipping at the forge did (pull request, merge commit), when it shipped there."""
    approved: list[str] = []
    """A quorum review: the distinct reviewers who approved so far (empty: no quorum asked)."""
    quorum: int = 1
    """How many approvals the job needs to ship."""


# -- the fleet --------------------------------------------------------------------------------


class ListRequest(Request):
    """``list``: job summaries, newest first."""

    stage: Stage | None = None
    """Only jobs in this stage."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=LIST_LIMIT_MAX)] = 500


class ListReply(Reply):
    jobs: list[JobSummary]
    counts: dict[str, int]
    """Jobs per stage (every stage, 0 included)."""
    total: int
    """Jobs in ``gf_jobs``."""


class FactoriesRequest(Request):
    """``factories``: every factory record, with its liveness."""


class FactoriesReply(Reply):
    factories: list[dict[str, Any]]
    """Each factory's record, with ``heartbeat_age_s`` and ``live``."""
    halt: dict[str, Any] = msgspec.field(default_factory=dict)
    """The kill switch's state (``halted``, ``summary``, ``fleet``, ``products``; see
    ``gigafactory halt``); empty from a coordinator older than it."""


class StatsRequest(Request):
    """``stats``: the answering coordinator's counters (a plain object: the counters are the
    scheduler's, and grow with it)."""


REQUESTS: dict[str, type[Request]] = {
    "submit": SubmitRequest, "status": StatusRequest, "cancel": CancelRequest, "requeue": RequeueRequest,
    "ship": ShipRequest, "list": ListRequest, "factories": FactoriesRequest, "stats": StatsRequest,
    "logs": LogsRequest,
}
"""Endpoint -> its request structure (the service decodes into it, the client encodes it)."""
REPLIES: dict[str, Any] = {
    "submit": SubmitReply, "status": StatusReply, "cancel": JobReply, "requeue": JobReply,
    "ship": ShipReply, "list": ListReply, "factories": FactoriesReply, "stats": dict[str, Any],
    "logs": LogsReply,
}
"""Endpoint -> its reply structure (the service encodes it, the client decodes into it)."""


def decode_request(endpoint: str, data: bytes) -> Any:
    """A request's body as its endpoint's structure (a plain dict for an endpoint not in
    :data:`REQUESTS`); an empty body is ``{}``.

    :param endpoint: the endpoint's name.
    :param data: the request's JSON.
    :raises ApiError: 400, naming the field that is wrong and how.
    """
    kind = REQUESTS.get(endpoint, dict)
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.ValidationError as e:
        fields = ", ".join(kind.__struct_fields__) if kind is not dict else ""
        known = f" (its fields: {fields})" if fields else ""
        raise ApiError(400, f"bad {endpoint} request: {e}{known}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"bad {endpoint} request: not a JSON object ({e})") from None


def decode_reply(endpoint: str, data: bytes) -> Any:
    """A reply's body as its endpoint's structure (a plain dict for an endpoint not in
    :data:`REPLIES`).

    :param endpoint: the endpoint's name.
    :param data: the reply's JSON.
    :raises ApiError: 502, when the reply does not have the structure this client expects (a
        coordinator of another version).
    """
    try:
        return msgspec.json.decode(data, type=REPLIES.get(endpoint, dict[str, Any]))
    except msgspec.DecodeError as e:
        raise ApiError(502, f"the coordinator's {endpoint} reply is not what this client reads ({e}); "
                            "is the coordinator of another gigafactory version?") from None
