"""The Python client of the coordinator's API (``gf.api.*``), used by the CLI, the demo and tests.

Typed: each method sends the request structure of :mod:`gigafactory.schemas.api` and returns its
reply structure, the very types the coordinator's service decodes and encodes. Errors are one
class, :class:`~gigafactory.schemas.api.ApiError`, with an HTTP-like ``code``.

    from gigafactory import Client

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        [job] = await client.submit_text(TEXT, path="hello.md")
        async for summary in client.watch(job.job, timeout_s=600):
            print(summary.stage, summary.reason)

:meth:`Client.wait` and :meth:`Client.watch` follow the jobs' records in ``gf_jobs`` (a KV watch:
the broker pushes each change), never listing jobs. :meth:`Client.call` is the untyped escape
hatch: any endpoint, a dict in and a dict out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import orjson

from gigafactory import tracing
from gigafactory.schemas import names
from gigafactory.schemas.api import (
    ApiError, CancelRequest, FactoriesReply, FactoriesRequest, JobFile, JobReply, JobSummary, ListReply, ListRequest, LogsReply, LogsRequest,
    Request, RequeueRequest, ShipReply, ShipRequest, StatsRequest, StatusReply, StatusRequest, SubmitRequest,
    SubmittedJob, decode_reply, job_summary,
)
from gigafactory.schemas.lifecycle import TERMINAL, Stage
from gigafactory.schemas.limits import Limits, hint
from gigafactory.schemas.records import JobRecord, decode

__all__ = ["RESTING", "ApiError", "Client", "JobFile", "JobSummary", "NoCoordinator"]

RESTING = frozenset(TERMINAL | {Stage.TESTING, Stage.REVIEW})
"""Stages where a job waits for a human or is done: ``submit --wait`` stops there."""

MAX_WAIT_JOBS = 100_000
"""The most jobs one :meth:`Client.wait` follows (a batch is at most ``max_batch_files``)."""

WATCH_PER_KEY_MAX = 16
"""Up to this many jobs, :meth:`Client.wait` watches each job's key; above, the whole bucket."""

CHANGES_QUEUED_MAX = 1024
"""Record changes a wait holds before it has looked at them; the watch waits for room (the
broker keeps the rest), so a burst over a whole bucket cannot grow memory without bound."""

STATUS_POLL_S = 0.5
"""Only when the broker refuses a KV watch (no JetStream access): how often a wait asks
``status`` for each job instead."""

SUBMIT_TIMEOUT_MIN_S = 30.0
"""A submit may take at least this long (a batch writes many records)."""


class NoCoordinator(ApiError):
    """No coordinator answered (503: none listening; 504: none in time)."""


Progress = Callable[[dict[str, JobSummary]], None]


class Client:
    """A connection to the coordinator's API.

    :param nc: a connected nats-py client (closed by :meth:`close`).
    :param timeout_s: how long each API request may take.
    :param identity: (role, name) of the credentials ``nc`` connected with; the human gate's
        calls (ship, cancel, requeue) then go to the caller's own subject (see
        :func:`gigafactory.identity.gate_subject`), which tells the coordinator who asks.
    :param products: a submitter's products: its submit, list and status go to its own subject
        naming them (:func:`gigafactory.identity.submitter_subject`).
    """

    def __init__(self, nc, timeout_s: float = 10.0, identity: tuple[str, str] | None = None,
                 products: tuple[str, ...] = ()) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.identity = identity
        self.products = tuple(products)
        """A submitter's products (its credentials file names them): part of its API subjects."""

    @classmethod
    async def connect(cls, url: str, timeout_s: float = 10.0, name: str = "gigafactory-cli",
                      creds: str | None = None) -> "Client":
        """Connect through the one connect path every part uses (:func:`gigafactory.broker.connect`:
        connection errors are logged at debug level, never printed as tracebacks), giving up
        after a few reconnect attempts: a CLI call should fail, not hang, on a broker that is gone.

        :param url: the broker URL(s), comma-separated.
        :param timeout_s: how long each API request may take.
        :param name: the connection's name, as the broker's monitoring shows it.
        :param creds: the credentials file to connect with (None: :func:`gigafactory.identity.resolve_creds`).
        """
        from gigafactory.broker import connect
        from gigafactory.config import Settings

        try:
            settings = Settings.from_env()
        except ValueError:
            settings = Settings()  # a bad setting is reported by the command that needs it
        if creds is not None:
            import msgspec

            settings = msgspec.structs.replace(settings, creds=creds)
        from gigafactory.identity import read_creds, resolve_creds

        nc = await connect(url, name, settings, max_reconnect_attempts=3, connect_timeout_s=5.0)
        path = resolve_creds(settings.creds)
        creds = read_creds(path) if path else None
        return cls(nc, timeout_s, identity=(creds.role, creds.name) if creds is not None else None,
                   products=creds.products if creds is not None else ())

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- requests ---------------------------------------------------------------------------

    def _subject(self, endpoint: str) -> str:
        from gigafactory.identity import GATE_ENDPOINTS, SUBMITTER_OWN_ENDPOINTS, gate_subject, submitter_subject

        if endpoint in GATE_ENDPOINTS and self.identity is not None and self.identity[0] in ("admin", "reviewer"):
            return gate_subject(endpoint, *self.identity)
        if endpoint in SUBMITTER_OWN_ENDPOINTS and self.identity is not None and self.identity[0] == "submitter":
            return submitter_subject(endpoint, self.identity[1], self.products)
        return f"{names.API_PREFIX}.{endpoint}"

    async def _send(self, endpoint: str, payload: bytes, timeout_s: float | None) -> bytes:
        """One request to ``gf.api.<endpoint>`` (the caller's own subject for the human gate):
        the reply's body, or the coordinator's error raised as :class:`ApiError`
        (:class:`NoCoordinator` when none answered)."""
        wait_s = timeout_s or self.timeout_s
        try:
            msg = await self.nc.request(self._subject(endpoint), payload, timeout=wait_s,
                                        headers=tracing.inject())
        except nats.errors.MaxPayloadError:
            raise ApiError(400, f"the {endpoint} request is larger than the broker's max payload "
                                f"({self.nc.max_payload:,} bytes); send less at once") from None
        except nats.errors.NoRespondersError:
            raise NoCoordinator(503, "no coordinator is answering on gf.api.*: start one with "
                                     "'gigafactory coordinator' (or 'gigafactory up')") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise NoCoordinator(504, f"the coordinator did not answer {endpoint} within {wait_s:g}s") from None
        code = msg.headers.get("Nats-Service-Error-Code") if msg.headers else None
        if code:
            text = msg.headers.get("Nats-Service-Error", "")
            try:
                data = orjson.loads(msg.data) if msg.data else {}
            except orjson.JSONDecodeError:
                data = {}
            data = data if isinstance(data, dict) else {}
            raise ApiError(int(code) if code.isdigit() else 500, data.get("error") or text, data.get("errors"))
        return msg.data

    async def call(self, endpoint: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        """The untyped escape hatch: any endpoint (one this client has no method for too), a dict
        in and the reply's JSON as builtins out.

        :param endpoint: the endpoint's name (``status``, ``list``, ...).
        :param body: the request's fields.
        :param timeout_s: how long it may take (default: the client's).
        """
        return orjson.loads(await self._send(endpoint, orjson.dumps(body or {}), timeout_s))

    async def request(self, endpoint: str, req: Request, timeout_s: float | None = None) -> Any:
        """A typed request: ``req`` encoded, the reply decoded into ``endpoint``'s reply structure
        (:data:`~gigafactory.schemas.api.REPLIES`).

        :param endpoint: the endpoint's name.
        :param req: its request structure.
        :param timeout_s: how long it may take (default: the client's).
        """
        return decode_reply(endpoint, await self._send(endpoint, msgspec.json.encode(req), timeout_s))

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, files: Sequence[JobFile], source: str = "api", limits: Limits | None = None) -> list[SubmittedJob]:
        """Submit job files as one batch, all or nothing (one invalid file submits none).
        Refuses, before sending anything, a batch or a file over ``limits`` and a request
        larger than the broker's max payload, naming the file and the limit (:class:`ApiError`,
        code 400; a refused file's details in ``errors``).

        :param files: the files' texts, each with the name errors cite.
        :param source: who submits, stored on each job.
        :param limits: the size limits (default: from ``GIGAFACTORY_*``).
        """
        lim = _limits(limits)
        _check_batch(len(files), lim)
        for f in files:
            size = len(f.text.encode("utf-8"))
            if size > lim.max_job_file_bytes:
                raise _too_big(f.path, size, lim)
        req = SubmitRequest(files=list(files), source=source)
        request_bytes = len(msgspec.json.encode(req))
        if request_bytes > self.nc.max_payload:
            msg = (f"the {len(files)} files make a request of {request_bytes:,} bytes, more than the broker's max "
                   f"payload ({self.nc.max_payload:,} bytes); submit them in smaller batches (a file that depends "
                   "on another's idempotency-key can go in a later batch)")
            raise ApiError(400, msg, [_file_error("<batch>", msg)])
        with tracing.span("submit", kind="client", files=len(files), source=source):
            reply = await self.request("submit", req, timeout_s=max(self.timeout_s, SUBMIT_TIMEOUT_MIN_S))
        return reply.jobs

    async def submit_text(self, text: str, path: str = "<api>", source: str = "api") -> list[SubmittedJob]:
        """Submit one job from its text (front matter and body).

        :param text: the job file's text.
        :param path: the name errors cite (and the readable part of the job's id).
        :param source: who submits, stored on the job.
        """
        return await self.submit([JobFile(text=text, path=path)], source=source)

    async def submit_files(self, paths: Sequence[str], source: str = "cli", limits: Limits | None = None) -> list[SubmittedJob]:
        """Submit job files from disk as one batch (:meth:`submit`); a file over the size limit
        is refused before it is read, one that is not UTF-8 text or cannot be read by name.

        :param paths: the files.
        :param source: who submits, stored on each job.
        :param limits: the size limits (default: from ``GIGAFACTORY_*``).
        """
        lim = _limits(limits)
        _check_batch(len(paths), lim)
        files = []
        for p in paths:
            try:
                size = Path(p).stat().st_size
                if size > lim.max_job_file_bytes:
                    raise _too_big(p, size, lim)
                files.append(JobFile(text=Path(p).read_text(encoding="utf-8"), path=p))
            except UnicodeDecodeError:
                raise ApiError(400, f"{p}: not UTF-8 text; save the job file as UTF-8",
                               [_file_error(p, "not UTF-8 text")]) from None
            except OSError as e:
                raise ApiError(400, f"{p}: cannot read: {e.strerror}",
                               [_file_error(p, f"cannot read: {e.strerror}")]) from None
        return await self.submit(files, source, lim)

    # -- one job ----------------------------------------------------------------------------

    async def status(self, job: str, events: int = 50) -> StatusReply:
        """One job: its summary, why it is where it is, its record and its newest events.

        :param job: the job's id.
        :param events: how many events to include (0: none).
        """
        return await self.request("status", StatusRequest(job=job, events=events))

    async def logs(self, job: str, epoch: int, offset: int = 0) -> LogsReply:
        """One page of attempt ``epoch``'s stored log, from ``offset`` (see :meth:`log_pages`).

        :param job: the job's id.
        :param epoch: the attempt's epoch.
        :param offset: the byte to start at."""
        return await self.request("logs", LogsRequest(job=job, epoch=epoch, offset=offset))

    async def log_pages(self, job: str, epoch: int) -> AsyncIterator[bytes]:
        """Attempt ``epoch``'s stored log, page by page, through the ``logs`` API (so a caller
        limited to some products reads only theirs; nothing is read around the coordinator).

        :param job: the job's id.
        :param epoch: the attempt's epoch (its record's ``attempts[].epoch``).
        """
        offset = 0
        while True:
            page = await self.logs(job, epoch, offset)
            if page.data:
                yield page.data
            offset += len(page.data)
            if not page.data or offset >= page.size:
                return

    async def cancel(self, job: str, reason: str = "", actor: str = "operator") -> JobReply:
        """Cancel a job (any stage but shipped, failed, dead_letter): a running one is fenced
        and stopped.

        :param job: the job's id.
        :param reason: why, stored on the record.
        :param actor: who cancels.
        """
        return await self.request("cancel", CancelRequest(job=job, reason=reason, actor=actor))

    async def requeue(self, job: str, actor: str = "operator") -> JobReply:
        """Requeue a job (any stage but shipped) with a fresh retry budget.

        :param job: the job's id.
        :param actor: who requeues.
        """
        return await self.request("requeue", RequeueRequest(job=job, actor=actor))

    async def ship(self, job: str, actor: str = "operator") -> ShipReply:
        """The human gate: ship a job waiting in testing or review (at its forge first when its
        ``ship-as`` asks for a pull request or a merge; 409 with the forge's reason if not).

        :param job: the job's id.
        :param actor: who ships.
        """
        return await self.request("ship", ShipRequest(job=job, actor=actor), timeout_s=max(self.timeout_s, 30.0))

    # -- the fleet --------------------------------------------------------------------------

    async def list(self, stage: Stage | str | None = None, limit: int = 500) -> ListReply:
        """Job summaries, newest first, with the count in each stage.

        :param stage: only jobs in this stage.
        :param limit: at most this many summaries.
        """
        try:
            wanted = Stage(stage) if stage is not None else None
        except ValueError:
            raise ApiError(400, f"unknown stage {stage!r}; stages: {', '.join(s.value for s in Stage)}") from None
        return await self.request("list", ListRequest(stage=wanted, limit=limit))

    async def factories(self) -> FactoriesReply:
        """Every factory's record, with its liveness."""
        return await self.request("factories", FactoriesRequest())

    async def stats(self) -> dict[str, Any]:
        """The answering coordinator's counters (a plain dict: they grow with the scheduler)."""
        return await self.request("stats", StatsRequest())

    # -- following jobs ---------------------------------------------------------------------

    async def wait(self, job_ids: Collection[str], *, timeout_s: float, on_progress: Progress | None = None,
                   until: Collection[str] = RESTING) -> dict[str, JobSummary]:
        """Follow the jobs' records until every one is in ``until``, or ``timeout_s`` passed.

        Watches the jobs' keys in ``gf_jobs`` (one watch, filtered to these keys; the broker
        pushes each change), so a wait costs nothing while nothing happens and does not depend
        on the coordinator answering. A job whose record is no longer in ``gf_jobs`` (archived
        after it ended) is read once through the ``status`` API. Returns each job's summary as
        last seen (a job never seen is missing from the result). When the broker refuses the
        watch (no JetStream access), it falls back to asking ``status`` for each job.

        :param job_ids: the jobs to follow (at most :data:`MAX_WAIT_JOBS`).
        :param timeout_s: give up after this many seconds, returning what was seen.
        :param on_progress: called with the summaries (id -> summary) after each change.
        :param until: the stages that end the wait.
        """
        seen: dict[str, JobSummary] = {}
        async with contextlib.aclosing(self._follow(job_ids, timeout_s, until)) as changes:
            async for seen in changes:
                if on_progress:
                    on_progress(dict(seen))
        return seen

    async def watch(self, job: str, *, timeout_s: float, until: Collection[str] = RESTING) -> AsyncIterator[JobSummary]:
        """Follow one job's record: its summary as it is now, then again at each change, until
        it reaches a stage in ``until`` (that summary is the last) or ``timeout_s`` passed (the
        iteration just ends: look at the last stage). Nothing is polled (see :meth:`wait`).

        :param job: the job's id.
        :param timeout_s: stop after this many seconds.
        :param until: the stages that end the watch.
        """
        last = None
        async with contextlib.aclosing(self._follow([job], timeout_s, until)) as changes:
            async for seen in changes:
                now = seen.get(job)
                if now is not None and now != last:
                    last = now
                    yield now

    async def _follow(self, job_ids: Collection[str], timeout_s: float,
                      until: Collection[str]) -> AsyncIterator[dict[str, JobSummary]]:
        """The jobs' summaries (id -> summary), after each change, until all are in ``until`` or
        ``timeout_s`` passed (see :meth:`wait`)."""
        if len(job_ids) > MAX_WAIT_JOBS:
            raise ApiError(400, f"cannot wait for {len(job_ids):,} jobs at once (at most {MAX_WAIT_JOBS:,}); "
                                "wait for them in smaller groups")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        want = set(job_ids)
        seen: dict[str, JobSummary] = {}
        try:
            kv = await self.nc.jetstream(timeout=self.timeout_s).key_value(names.JOBS_BUCKET)
            # A few jobs: one watch per key. More: one watch on the bucket, keeping ours (it
            # replays every record once, but costs one consumer instead of thousands).
            watchers = ([await kv.watch(job) for job in sorted(want)] if len(want) <= WATCH_PER_KEY_MAX
                        else [await kv.watchall()])
        except Exception:
            async for snapshot in self._follow_by_status(want, deadline, until):
                yield snapshot
            return
        changes: asyncio.Queue = asyncio.Queue(maxsize=CHANGES_QUEUED_MAX)

        async def pump(w) -> None:
            while True:
                try:
                    await changes.put(await w.updates(timeout=60.0))
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue

        pumps = [asyncio.create_task(pump(w)) for w in watchers]
        try:
            replays_left = len(watchers)
            while not (replays_left == 0 and _all_in(seen, want, until)):
                left_s = deadline - loop.time()
                if left_s <= 0:
                    return
                try:
                    e = await asyncio.wait_for(changes.get(), timeout=left_s)
                except asyncio.TimeoutError:
                    return
                if e is None:
                    replays_left -= 1
                    if replays_left:
                        continue
                    # The end of what the bucket held when the watch began: a job not in it was
                    # archived after it ended (or never existed): ask the coordinator once.
                    for job in sorted(want - seen.keys()):
                        try:
                            seen[job] = (await self.status(job, events=0)).job
                        except ApiError:
                            pass
                elif e.key in want and e.value and e.operation is None:
                    try:
                        seen[e.key] = job_summary(decode(e.value, JobRecord))
                    except Exception:
                        continue  # an undecodable record: the coordinator quarantines it
                else:
                    continue
                yield dict(seen)
        finally:
            for t in pumps:
                t.cancel()
            for w in watchers:
                try:
                    await w.stop()
                except Exception:
                    pass

    async def _follow_by_status(self, want: set[str], deadline: float,
                                until: Collection[str]) -> AsyncIterator[dict[str, JobSummary]]:
        loop = asyncio.get_running_loop()
        seen: dict[str, JobSummary] = {}
        while True:
            for job in sorted(want):
                if job in seen and seen[job].stage in until:
                    continue
                try:
                    seen[job] = (await self.status(job, events=0)).job
                except ApiError as e:
                    if isinstance(e, NoCoordinator):
                        raise
            yield dict(seen)
            if _all_in(seen, want, until) or loop.time() > deadline:
                return
            await asyncio.sleep(STATUS_POLL_S)


def _all_in(seen: dict[str, JobSummary], want: set[str], until: Collection[str]) -> bool:
    return len(seen) == len(want) and all(j.stage in until for j in seen.values())


def _limits(limits: Limits | None) -> Limits:
    from gigafactory.config import Settings

    try:
        return limits or Limits.from_settings(Settings.from_env())
    except ValueError as e:  # a limit set to nonsense in the environment
        raise ApiError(400, f"invalid setting: {e}") from None


def _check_batch(n_files: int, lim: Limits) -> None:
    if n_files > lim.max_batch_files:
        msg = (f"{n_files:,} files in one batch, more than {lim.max_batch_files:,} "
               f"{hint('max_batch_files', lim.max_batch_files)}; submit them in smaller batches")
        raise ApiError(400, msg, [_file_error("<batch>", msg)])


def _file_error(path: str, message: str) -> dict:
    return {"file": path, "line": None, "field": None, "message": message}


def _too_big(path: str, size: int, lim: Limits) -> ApiError:
    msg = lim.refusal("max_job_file_bytes", "the job file", size, "bytes",
                      "keep large inputs in the repository and name them in the prompt")
    return ApiError(400, f"{path}: {msg}", [_file_error(path, msg)])
