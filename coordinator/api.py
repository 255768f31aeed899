"""The coordinator's request/reply API, a ``nats.micro`` service (``nats micro ls``).

Endpoints (subjects ``gf.api.<name>``), JSON in and out; each request and reply is a structure
of :mod:`gigafactory.schemas.api` (the Python client uses the same ones), and a request that does
not fit its structure is refused with a 400 naming the field:

- ``submit``    ``{"files": [{"path", "text"}], "source"}`` -> ``{"jobs": [...]}``
- ``cancel``    ``{"job", "reason"?}``   any stage but shipped/failed/dead_letter -> failed
- ``requeue``   ``{"job"}``              any stage but shipped -> queued (fresh retry budget)
- ``ship``      ``{"job"}``              testing/review -> shipped (the human gate); for a ``repo``
                                         job with ``ship-as: pr-opened|merged``, after the
                                         coordinator opened (and merged) its pull request
                                         (:mod:`shipping`); 409 with the forge's reason if not
- ``status``    ``{"job"}``              the record, why it is where it is, and its events
- ``list``      ``{"stage"?, "limit"?}`` job summaries, newest first
- ``factories`` ``{}``                   factory records with liveness
- ``logs``      ``{"job", "epoch", "offset"?, "max_bytes"?}`` a page of one attempt's stored log
                                         (found on the job's record: a submitter limited to some
                                         products reads only theirs)
- ``stats``     ``{}``                   the answering coordinator's counters: per-job errors,
                                         failed events, quarantined (poison) records
- ``halt``      ``{"product"?, "mode"?}`` the kill switch (:mod:`halt`): stop dispatching (the
                                         fleet or one product); ``mode`` ``drain`` or ``stop``
- ``resume``    ``{"product"?}``         undo a halt

Errors come back as a micro error (``Nats-Service-Error-Code`` 400/404/409) with a body
``{"error": message, "errors": [...]}`` naming the file, line and field where there is one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from nats.micro import add_service
from nats.micro.request import Request

from gigafactory import __version__, tracing
from gigafactory.broker import Broker, Conflict
from gigafactory.economics import api as budget_api
from gigafactory.identity import caller_of, submitter_of
from gigafactory.schemas import names, protocol
from gigafactory.schemas.lifecycle import LEASED, IllegalTransition, Stage
from gigafactory.schemas.limits import hint
from gigafactory.schemas.api import (
    ApiError, CancelRequest, ErrorReply, FactoriesReply, FactoriesRequest, JobReply, ListReply, ListRequest,
    LogsReply, LogsRequest,
    RequeueRequest, ShipReply, ShipRequest, StatsRequest, StatusReply, StatusRequest, SubmitReply, SubmitRequest,
    SubmittedJob, decode_request, job_summary,
)
from gigafactory.schemas.records import Approval, EventRecord, JobRecord, LockRecord, decode, encode

from . import gate, halt, intake, shipping
from .retention import read_archived
from .scheduler import capability_gap
from .view import FleetView

log = logging.getLogger(__name__)
MAX_CAS_RETRIES = 20


LOG_CACHE_MAX_BYTES = 64 * 1024 * 1024
"""Stored logs the API keeps between pages, in bytes (the oldest go first)."""
STATUS_BODY_MAX_CHARS = 64 * 1024
"""A job body longer than this is cut in ``status`` replies (a reply cannot exceed the broker's
maximum message size, and a record may come close to it); ``nats kv get`` shows it whole."""


def _with_usage(record: dict) -> dict:
    """``record`` with ``usage``, ``engine`` and ``engine_version`` on every attempt, ``null``
    where there is none (the stored record omits them then): ``status --json`` readers see no
    usage or no engine, never a missing key.

    :param record: a job record as builtins.
    """
    for a in record.get("attempts", []):
        a.setdefault("usage", None)
        a.setdefault("engine", None)
        a.setdefault("engine_version", None)
        if a.get("workspace") is not None:
            # What shipping did (ship-as), present even when nothing was opened or merged.
            for k, v in (("shipped_as", ""), ("pull_number", None), ("pull_url", ""), ("pull_state", ""),
                         ("merged_commit", None), ("ship_detail", "")):
                a["workspace"].setdefault(k, v)
    return record


def _with_body_cut(record: dict, job: str) -> dict:
    body = record.get("body") or ""
    if len(body) > STATUS_BODY_MAX_CHARS:
        record["body"] = (body[:STATUS_BODY_MAX_CHARS] + f"\n[... {len(body) - STATUS_BODY_MAX_CHARS} more characters "
                          f"cut from this reply: 'nats kv get gf_jobs {job}' shows the whole record]")
    return record


async def read_events(broker: Broker, job_id: str, limit: int = 200) -> list[dict]:
    """The job's audit trail from ``GF_EVENTS``, oldest first (at most ``limit``)."""
    from nats.js import api

    if limit <= 0:
        return []

    out: list[dict] = []
    psub = await broker.js.pull_subscribe(
        f"{names.EVENTS_PREFIX}.{job_id}.>", stream=names.EVENTS_STREAM,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=10.0, mem_storage=True,
        ),
    )
    try:
        while len(out) < limit:
            try:
                msgs = await psub.fetch(min(100, limit - len(out)), timeout=0.5)
            except Exception:
                break
            for m in msgs:
                out.append(orjson.loads(m.data))
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    finally:
        try:
            await psub.unsubscribe()
        except Exception:
            pass
    return out


class Api:
    def __init__(self, broker: Broker, view: FleetView, scheduler, actor: str) -> None:
        self.broker = broker
        self.view = view
        self.sched = scheduler
        self.actor = actor
        self.service = None
        self._log_cache: dict[str, bytes] = {}
        """Stored logs read lately (object name -> bytes; at most ``LOG_CACHE_MAX_BYTES`` in all): a long
        log is read in pages without fetching it once per page."""
        self.halt_watch: "halt.HaltWatch | None" = None
        """The coordinator's halt state (set by the service): a halt applies here at once."""

    async def start(self) -> None:
        self.service = await add_service(
            self.broker.nc, name=names.API_SERVICE, version=__version__,
            description="Gigafactory coordinator API", queue_group="gf-coordinators",
        )
        group = self.service.add_group(name=names.API_PREFIX)
        for name, fn in (
            ("submit", self.submit), ("cancel", self.cancel), ("requeue", self.requeue), ("ship", self.ship),
            ("status", self.status), ("list", self.list), ("factories", self.factories),
            ("stats", self.stats), ("logs", self.logs),
            ("budget", self.budget), ("budget_override", self.budget_override),
            ("halt", lambda body: halt.api_halt(self, body)), ("resume", lambda body: halt.api_resume(self, body)),
        ):
            await group.add_endpoint(name=name, handler=self._wrap(name, fn))
        for name, fn in (("cancel", self.cancel), ("requeue", self.requeue), ("ship", self.ship)):
            # The human gate on the caller's own subject (gf.api.ship.<role>.<name>): see gate.py.
            await group.add_endpoint(name=f"{name}-by", subject=f"{name}.*.*", handler=self._wrap(name, fn))
        for name, fn in (("submit", self.submit), ("list", self.list), ("status", self.status), ("logs", self.logs)):
            # A submitter's own subject, naming its products (gf.api.submit.submitter.<name>.<p>).
            await group.add_endpoint(name=f"{name}-by-submitter", subject=f"{name}.submitter.*.*",
                                     handler=self._wrap(name, fn))

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()

    def _wrap(self, name: str, fn: Callable[[Any], Awaitable[Any]]):
        """The micro handler of endpoint ``name``: decodes the request into its structure
        (:data:`~gigafactory.schemas.api.REQUESTS`; a dict for an endpoint not there), calls
        ``fn`` and encodes what it returns (a reply structure or a dict); every error becomes
        a micro error with an :class:`ErrorReply` body.

        :param name: the endpoint's name.
        :param fn: its handler.
        """
        async def handler(req: Request) -> None:
            try:
                body = decode_request(name, req.data)
                gate.CALLER.set(caller_of(req.subject))  # only the subject names the caller
                sub = submitter_of(req.subject)
                gate.PRODUCTS.set(sub[1] if sub is not None else None)
                with tracing.span(f"api {name}", parent=req.headers, kind="server"):
                    resp = await fn(body)
                await req.respond(msgspec.json.encode(resp))
            except gate.GateRefused as e:
                await req.respond_error("403", str(e), msgspec.json.encode(ErrorReply(error=str(e))))
            except ApiError as e:
                await req.respond_error(str(e.code), e.message, msgspec.json.encode(ErrorReply(error=e.message,
                                                                                               errors=e.errors)))
            except intake.SubmitError as e:
                await req.respond_error("400", str(e), msgspec.json.encode(ErrorReply(error=str(e), errors=e.errors)))
            except Exception as e:  # report, never crash the service
                log.exception("api %s failed", name)
                await req.respond_error("500", f"{type(e).__name__}: {e}", msgspec.json.encode(ErrorReply(error=str(e))))

        return handler

    # -- endpoints --------------------------------------------------------------------------

    async def submit(self, req: SubmitRequest) -> SubmitReply:
        results = await intake.submit(
            self.broker, [(f.path or "<api>", f.text) for f in req.files],
            source=req.source or "api", ready_pools=getattr(self.sched, "pools_ready", None),
            check=lambda parsed: gate.check_products([(jf.path, jf.manifest.product) for jf in parsed]),
        )
        self.view.changed.set()
        return SubmitReply(jobs=[SubmittedJob(file=r.file, job=r.job, status=r.status, stage=r.stage) for r in results])

    async def budget(self, body: dict) -> dict:
        return await budget_api.state(self, body)

    async def budget_override(self, body: dict) -> dict:
        try:
            return await budget_api.override(self, body)
        except budget_api.OverrideError as e:
            raise ApiError(e.code, str(e)) from None

    async def _transition(self, job: str, decide, audit: dict | None = None) -> JobRecord:
        for _ in range(MAX_CAS_RETRIES):
            e = await self.broker.jobs.get(job)
            if e is None:
                raise ApiError(404, f"no job {job!r}; 'gigafactory jobs' lists them")
            rec = decode(e.value, JobRecord)
            try:
                out = decide(rec)
            except IllegalTransition as ex:
                raise ApiError(409, str(ex)) from None
            try:
                await self.broker.jobs.update(job, encode(out.record), last=e.revision)
            except Conflict:
                continue
            await self.broker.publish_event(EventRecord(
                kind=str(out.event), at=time.time(), job=job, stage_from=str(out.stage_from),
                stage_to=str(out.record.stage), epoch=out.record.epoch, actor=self.actor, reason=out.reason,
                **({"data": audit} if audit else {}),
            ))
            self.view.changed.set()
            return out.record
        raise ApiError(409, f"job {job} kept changing; try again")

    async def cancel(self, req: CancelRequest) -> JobReply:
        by = gate.actor(req.actor)
        job, who, reason = req.job, by.name, req.reason
        max_chars = self.broker.settings.max_reason_chars
        if len(reason) > max_chars or len(who) > max_chars:
            # Both are stored on the job record, which must stay claimable and readable.
            raise ApiError(400, f"the reason is {len(reason):,} characters and the actor {len(who):,}; at most "
                                f"{max_chars:,} each {hint('max_reason_chars', max_chars)}")
        rec = await self._transition(job, lambda r: protocol.cancel(r, time.time(), who, reason), by.audit())
        return JobReply(job=job_summary(rec))

    async def requeue(self, req: RequeueRequest) -> JobReply:
        by = gate.actor(req.actor)
        job, who = req.job, by.name
        rec = await self._transition(job, lambda r: protocol.operator_requeue(r, time.time(), who), by.audit())
        return JobReply(job=job_summary(rec))

    async def ship(self, req: ShipRequest) -> ShipReply:
        """The human gate. A ``repo`` job whose ``ship-as`` is ``pr-opened`` or ``merged`` and
        whose passed attempt is not there yet is shipped at its forge first (:mod:`shipping`):
        shipped when the forge did it; a conflict requeues it ``rebase-needed`` once, then fails
        it ``merge_conflict``; a refusal (checks, protection, a forge error) leaves it where it
        is, with the reason, and answers 409."""
        by = gate.actor(req.actor)
        job, who = req.job, by.name
        if len(who) > self.broker.settings.max_reason_chars:
            raise ApiError(400, f"the actor is {len(who):,} characters; at most {self.broker.settings.max_reason_chars:,}")
        e = await self.broker.jobs.get(job)
        if e is None:
            raise ApiError(404, f"no job {job!r}; 'gigafactory jobs' lists them")
        rec = decode(e.value, JobRecord)
        gate.check_ship(rec.manifest.review_policy, by)
        if rec.stage in (Stage.TESTING, Stage.REVIEW):
            q = gate.quorum(rec.manifest.review_policy, by, rec.approvals, rec.epoch)
            if not q.ships:
                return await self._approve(job, by)
        a = protocol.shipped_attempt(rec)
        ws = a.workspace if a is not None else None
        if (rec.stage not in (Stage.TESTING, Stage.REVIEW) or a is None
                or protocol.ship_shortfall(rec.manifest.ship_as, ws) is None or ws is None or not ws.pushed):
            rec = await self._transition(job, lambda r: protocol.ship(r, time.time(), who), by.audit())
            return ShipReply(job=job_summary(rec))
        try:
            with tracing.span("ship", parent=rec.trace, job=job, epoch=a.epoch, ship_as=str(rec.manifest.ship_as)):
                done = await shipping.carry_out(self.broker, rec, e.revision, a.epoch, ws)
        except shipping.ShipStopped as ex:
            raise ApiError(409, str(ex)) from None
        now = time.time()
        if done.conflict is not None:
            out = protocol.ship_conflict(rec, now, who, a.epoch, done.ws)
        elif protocol.ship_shortfall(rec.manifest.ship_as, done.ws) is None:
            out = protocol.ship_done(rec, now, who, a.epoch, done.ws)
        else:
            out = None
        if out is None:
            # Not shipped: the forge refused. Keep what was done (a pull request opened) and why.
            why = (f"not shipped as {rec.manifest.ship_as}: {done.ws.ship_detail}; 'gigafactory ship {job}' "
                   "tries again")[:2000]
            held = msgspec.structs.replace(rec, attempts=protocol.with_ship_result(rec, a.epoch, done.ws),
                                           reason=why, updated_at=now)
            try:
                await self.broker.jobs.update(job, encode(held), last=done.revision)
            except Conflict:
                pass  # it moved meanwhile: the forge's state is the truth, a new ship reads it again
            await self.broker.publish_event(EventRecord(
                kind="ship_blocked", at=now, job=job, stage_from=str(rec.stage), stage_to=str(rec.stage),
                epoch=rec.epoch, actor=self.actor, reason=why))
            self.view.changed.set()
            raise ApiError(409, f"job {job}: {why}")
        try:
            await self.broker.jobs.update(job, encode(out.record), last=done.revision)
        except Conflict:
            raise ApiError(409, f"job {job} changed while it was being shipped; what the forge did: "
                                f"{done.ws.ship_detail}; see 'gigafactory status {job}'") from None
        await self.broker.publish_event(EventRecord(
            kind=str(out.event), at=now, job=job, stage_from=str(out.stage_from), stage_to=str(out.record.stage),
            epoch=out.record.epoch, actor=self.actor, reason=out.reason,
            data={**by.audit(), "ship_as": rec.manifest.ship_as, "pull_number": done.ws.pull_number,
                  "pull_url": done.ws.pull_url, "merged_commit": done.ws.merged_commit}))
        self.view.changed.set()
        return ShipReply(job=job_summary(out.record), workspace=msgspec.to_builtins(done.ws))

    async def _approve(self, job: str, by: gate.Actor) -> ShipReply:
        """Record ``by``'s approval toward the job's review quorum (one per reviewer and epoch:
        a second ship by the same reviewer changes nothing) and publish an ``approved`` event;
        the job stays where it is. If the quorum was met meanwhile (another reviewer's approval
        raced this one), ship it instead."""
        for _ in range(MAX_CAS_RETRIES):
            e = await self.broker.jobs.get(job)
            if e is None:
                raise ApiError(404, f"no job {job!r}; 'gigafactory jobs' lists them")
            rec = decode(e.value, JobRecord)
            q = gate.quorum(rec.manifest.review_policy, by, rec.approvals, rec.epoch)
            if q.ships or rec.stage not in (Stage.TESTING, Stage.REVIEW):
                return await self.ship(ShipRequest(job=job, actor=by.name))
            if not q.new:
                return ShipReply(job=job_summary(rec), approved=list(q.approved), quorum=q.needed)
            now = time.time()
            approvals = [*rec.approvals, Approval(identity=str(by.identity), epoch=rec.epoch, at=now)]
            out = msgspec.structs.replace(rec, approvals=approvals, updated_at=now)
            try:
                await self.broker.jobs.update(job, encode(out), last=e.revision)
            except Conflict:
                continue
            await self.broker.publish_event(EventRecord(
                kind="approved", at=now, job=job, stage_from=str(rec.stage), stage_to=str(rec.stage),
                epoch=rec.epoch, actor=self.actor,
                reason=f"approved by {by.name} ({len(q.approved)} of {q.needed})",
                data={**by.audit(), "approved": list(q.approved), "quorum": q.needed}))
            self.view.changed.set()
            return ShipReply(job=job_summary(out), approved=list(q.approved), quorum=q.needed)
        raise ApiError(409, f"job {job} kept changing; try again")

    @staticmethod
    def _check_product(job: str, product: str) -> None:
        """Refuse (403) a submitter limited to other products the job of ``product``."""
        if not gate.may_see(product):
            raise gate.GateRefused(f"job {job} is of product {product!r}, not one of this submitter's products "
                                   f"({', '.join(gate.PRODUCTS.get() or ())})")

    async def logs(self, req: LogsRequest) -> LogsReply:
        """A page of attempt ``epoch``'s stored log, found on the job's record (live or
        archived), after the caller's products are checked."""
        import nats.js.errors

        e = await self.broker.jobs.get(req.job)
        if e is not None:
            try:
                rec = decode(e.value, JobRecord)
            except msgspec.DecodeError:
                raise ApiError(409, f"gf_jobs/{req.job} revision {e.revision} is not a job record; its logs "
                                    "cannot be found through it") from None
        else:
            rec = await read_archived(self.broker, req.job)
            if rec is None:
                raise ApiError(404, f"no job {req.job!r}; 'gigafactory jobs' lists them")
        self._check_product(req.job, rec.manifest.product)
        att = next((a for a in rec.attempts if a.epoch == req.epoch), None)
        if att is None or not att.log:
            raise ApiError(404, f"job {req.job} has no stored log for epoch {req.epoch} (an attempt's log is "
                                "stored when it ends; 'gigafactory logs --follow' shows a running one)")
        data = self._log_cache.get(att.log)
        if data is None:
            store = await self.broker.js.object_store(names.ARTIFACTS_STORE)
            try:
                data = (await store.get(att.log)).data or b""
            except nats.js.errors.ObjectNotFoundError:
                raise ApiError(404, f"job {req.job} epoch {req.epoch}: its log {att.log} is no longer in "
                                    f"{names.ARTIFACTS_STORE} (retention)") from None
            # A log read page by page is fetched once: the last few stay (bounded in bytes).
            if len(data) <= LOG_CACHE_MAX_BYTES:
                while self._log_cache and sum(map(len, self._log_cache.values())) + len(data) > LOG_CACHE_MAX_BYTES:
                    self._log_cache.pop(next(iter(self._log_cache)))
                self._log_cache[att.log] = data
        page = data[req.offset:req.offset + req.max_bytes]
        return LogsReply(job=req.job, epoch=req.epoch, offset=req.offset, data=page, size=len(data))

    async def status(self, req: StatusRequest) -> StatusReply:
        job = req.job
        e = await self.broker.jobs.get(job)
        if e is None:
            arch = await read_archived(self.broker, job)
            if arch is None:
                raise ApiError(404, f"no job {job!r}; 'gigafactory jobs' lists them")
            self._check_product(job, arch.manifest.product)
            return StatusReply(
                job=job_summary(arch), revision=0, record=_with_usage(msgspec.to_builtins(arch)),
                why=f"{arch.stage}, then archived (moved out of {names.JOBS_BUCKET} without its body): {arch.reason}",
                info={"archived": True},
                events=await read_events(self.broker, job, limit=req.events),
            )
        poisoned = self.sched.poison.get(job) if hasattr(self.sched, "poison") else None
        poisoned = poisoned if poisoned is not None and poisoned.revision == e.revision else None
        try:
            rec = decode(e.value, JobRecord)
        except msgspec.DecodeError as ex:
            if gate.PRODUCTS.get() is not None:  # no product to check it against: not shown
                raise gate.GateRefused(f"job {job}: its record is unreadable, so its product cannot be "
                                       "checked; ask an admin") from None
            where = f"; its bytes are kept as {poisoned.object} in gf_artifacts" if poisoned and poisoned.object else ""
            raise ApiError(409, f"gf_jobs/{job} revision {e.revision} is not a job record ({ex}); the coordinator "
                                f"leaves it alone (quarantined{where}): fix it with 'nats kv put gf_jobs {job}' or "
                                f"delete it with 'nats kv del gf_jobs {job}'") from None
        self._check_product(job, rec.manifest.product)
        now = await self.broker.broker_now()
        live = self.view.live_factories(now, self.broker.settings.heartbeat_s)
        why = rec.reason
        serving = [f.record.id for f in live if not f.offers.missing(rec.requirements)]
        info: dict = {"serving_factories": serving}
        if rec.stage == Stage.QUEUED:
            held = halt.H.hold_reason(getattr(self.sched, "halt", None) or halt.H.HaltState(), rec.manifest.product)
            if held:
                info["halted"] = True
            if not serving:
                why = capability_gap(rec.requirements, live)
                info["missing_capabilities"] = sorted({
                    r for r in rec.requirements if all(f.offers.missing([r]) for f in live)
                }) if live else list(rec.requirements)
            if e.ts + rec.backoff_s > now:
                info["retry_in_s"] = round(e.ts + rec.backoff_s - now, 3)
            if rec.manifest.lock:
                lk = await self.broker.locks.get(names.safe_key(rec.manifest.lock))
                if lk is not None:
                    holder = decode(lk.value, LockRecord)
                    if holder.job != rec.id:
                        info["lock_holder"] = holder.job
        if rec.stage == Stage.BLOCKED:
            deps = {}
            for d in rec.deps:
                de = await self.broker.jobs.get(d)
                deps[d] = str(decode(de.value, JobRecord).stage) if de else "missing"
            info["deps"] = deps
        if rec.stage in LEASED:
            info["lease_age_s"] = round(now - e.ts, 3)
        if rec.stage == Stage.QUEUED and info.get("halted"):
            why = held
        if poisoned is not None:
            why = (f"quarantined: {poisoned.reason} (the coordinator leaves revision {poisoned.revision} alone; "
                   f"fix or delete the record to release it)")
            info["quarantined_as"] = poisoned.object
        return StatusReply(
            job=job_summary(rec), why=why, info=info,
            record=_with_usage(_with_body_cut(msgspec.to_builtins(rec), job)), revision=e.revision,
            events=await read_events(self.broker, job, limit=req.events),
        )

    async def list(self, req: ListRequest) -> ListReply:
        stage = req.stage
        # Filter and sort on the states' own fields; decode only the records listed (a finished
        # job's record is held packed: decoding all of them would cost a pass over 100,000).
        states = [st for st in self.view.jobs.values()
                  if (stage is None or st.stage == stage) and gate.may_see(st.product)]
        states.sort(key=lambda st: (st.submitted_at, st.key), reverse=True)
        counts = {s.value: len(self.view.by_stage[s]) for s in Stage}
        return ListReply(jobs=[job_summary(st.record) for st in states[:req.limit]], counts=counts,
                         total=len(self.view.jobs))

    async def factories(self, req: FactoriesRequest) -> FactoriesReply:
        now = await self.broker.broker_now()
        out = []
        for f in sorted(self.view.factories.values(), key=lambda f: f.record.id):
            d = msgspec.to_builtins(f.record)
            period = f.record.heartbeat_interval_s or self.broker.settings.heartbeat_s
            d["heartbeat_age_s"] = round(now - f.ts, 3)
            d["live"] = f.record.status == "up" and now - f.ts <= 3 * period
            out.append(d)
        return FactoriesReply(factories=out, halt=halt.state_dict(getattr(self.sched, "halt", None) or halt.H.HaltState()))

    async def stats(self, req: StatsRequest) -> dict:
        """The answering coordinator's counters (with several coordinators, each keeps its
        own; ``nats micro stats`` shows which one answered how often)."""
        out = {"coordinator": self.actor, "jobs": len(self.view.jobs), "unreadable_records": len(self.view.poison)}
        out.update(self.sched.stats())
        return out
