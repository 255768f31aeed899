"""Reporting a finished attempt: its log, its result under the epoch, the outbox, quarantine.

A result is published with a fenced write (:mod:`holder`); a result the broker does not take
(it is down, or the write got no answer) waits in the local durable outbox (:mod:`outbox`), and
the flusher publishes it when the broker answers, where the epoch decides again. A result
refused for a stale epoch goes to quarantine, never to the broker.

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``outbox``,
``_outbox_kick``, ``stats``, ``s``, ``id``, the broker; ``_write`` (:mod:`holder`) and
``_event`` (:mod:`audit`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors

from gigafactory import tracing
from gigafactory.broker import TRANSIENT, Conflict
from gigafactory.schemas import names, protocol
from gigafactory.schemas.records import JobRecord, decode

from .holder import Run
from .logs import CappedLog, LogUploadTimeout
from .outbox import OutboxItem
from .redact import Redactor
from .results import ResultPayload

log = logging.getLogger(__name__)

OUTBOX_RETRY_S = 1.0
LOG_INLINE_MAX_BYTES = 64 * 1024
"""A log of at most this many bytes (as stored) is read at once on the event loop and handed to
the object store as bytes: reading it costs less than the two hand-offs to a worker thread the
store makes for a reader (one per chunk and one for the end), which a noop run's profile showed
on every job. A larger log is still read one chunk at a time on a worker thread."""
"""While results wait in the outbox, publishing them is tried this often."""


def redact_payload(redactor: Redactor, payload: ResultPayload) -> ResultPayload:
    """``payload`` with its detail and its workspace result's texts redacted (a git error can
    quote a URL with a token in it).

    :param redactor: the factory's redactor.
    :param payload: the result to report."""
    ws = payload.workspace
    if ws is not None:
        ws = msgspec.convert(redactor.value(msgspec.to_builtins(ws)), type(ws))
    return msgspec.structs.replace(payload, detail=redactor.text(payload.detail), workspace=ws)


class Reporting:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: uploading the log, publishing the
    result, the outbox flusher and local quarantine."""

    async def _upload_log(self, run: Run, payload: ResultPayload) -> tuple[ResultPayload, dict]:
        """Store the attempt's log in ``gf_artifacts``; returns the payload (with ``log_object``
        once stored) and what the ``finished`` event says about the log.

        Called while the lease is still renewed (renewals stop only when the result is
        written), so an upload may take as long as ``log_upload_timeout_s`` without losing the
        lease. The store is given a reader (:class:`CappedLog`), never the bytes: it reads
        one chunk at a time on a worker thread, at most ``log_upload_max_bytes`` in all
        (head, marker, tail). An upload that fails or runs past its bound costs the log, not
        the result: the result goes out without it (``log_upload_error`` in the returned dict
        says why and where the log is; the attempt's detail gets it too); if the broker is
        down, that write fails too and the result waits in the outbox, whose replay tries
        the upload again."""
        name = names.log_object_name(run.job, run.record.attempt, run.epoch)
        where = f"{self.id}:{payload.log_path}"
        bound_s = self.settings.log_upload_timeout_s
        try:
            reader = CappedLog(payload.log_path, self.settings.log_upload_max_bytes, where,
                               deadline=time.monotonic() + bound_s, redactor=self.redactor)
        except OSError:
            return payload, {}
        try:
            desc = (f"log of job {run.job} attempt {run.record.attempt} epoch {run.epoch} on {self.id}: "
                    f"{reader.size_bytes} bytes" + (f", {reader.dropped_bytes} dropped from the middle "
                                                    f"(cap {self.settings.log_upload_max_bytes})" if reader.dropped_bytes else ""))
            data = reader
            if reader.stored_bytes <= LOG_INLINE_MAX_BYTES:
                data = reader.readall()  # redacted as it is read, as a chunked upload is
                self.stats["log_uploads_inline"] = self.stats.get("log_uploads_inline", 0) + 1
            # Each chunk's publish is bounded by request_timeout_s and the reader ends the
            # upload at its deadline; this outer bound only catches a hang between the two.
            await asyncio.wait_for(
                self.broker.put_object(name, data, description=desc, headers={
                    "Gf-Log-Bytes": str(reader.size_bytes), "Gf-Log-Dropped-Bytes": str(reader.dropped_bytes)}),
                timeout=bound_s + 3 * self.settings.request_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats["log_upload_failures"] = self.stats.get("log_upload_failures", 0) + 1
            why = "ran past log_upload_timeout_s" if isinstance(e, (LogUploadTimeout, asyncio.TimeoutError)) \
                else f"failed ({type(e).__name__}: {e})"
            log.warning("%s: log of %s (%d bytes) not uploaded: %s; the result goes without it",
                        self.id, run.job, reader.size_bytes, why)
            # The payload stays as it was: a result that waits in the outbox tries the upload again.
            return payload, {"log_upload_error": f"log not uploaded ({why}), the whole log is at {where}"}
        finally:
            reader.close()
        self.stats["log_read_max_bytes"] = max(self.stats.get("log_read_max_bytes", 0), reader.max_read_bytes)
        if reader.dropped_bytes:
            self.stats["logs_capped"] = self.stats.get("logs_capped", 0) + 1
        return (msgspec.structs.replace(payload, log_object=name),
                {"log_bytes": reader.size_bytes, "log_stored_bytes": reader.stored_bytes,
                 "log_dropped_bytes": reader.dropped_bytes})

    async def _report(self, run: Run, payload: ResultPayload) -> None:
        """Publish the result under the epoch, or keep it in the outbox until the broker answers."""
        payload = redact_payload(self.redactor, payload)  # before the record, the outbox, quarantine
        try:
            with tracing.span("report", outcome=str(payload.failure or "passed")):
                await self._publish_result(run, payload)
        except TRANSIENT + (Conflict, nats.errors.Error, OSError) as e:
            run.stop_renewing.set()  # the outbox flusher takes over; the epoch decides on replay
            log.warning("%s: result of %s waits in the outbox (%s)", self.id, run.job, e)
            self.outbox.put("result", run.job, run.epoch, msgspec.json.encode(payload))
            self._outbox_kick.set()

    async def _publish_result(self, run: Run, payload: ResultPayload, item: OutboxItem | None = None) -> None:
        upload: dict = {}
        if payload.log_object is None:
            payload, upload = await self._upload_log(run, payload)
        run.stop_renewing.set()  # not before: the lease is renewed through the upload
        detail = payload.detail + (f"; {upload['log_upload_error']}" if "log_upload_error" in upload else "")
        rec = await self._write(run, lambda r: protocol.finish(
            r, self.id, run.epoch, time.time(), failure=payload.failure, detail=detail,
            exit_code=payload.exit_code, verify_exit_code=payload.verify_exit_code, log=payload.log_object,
            attribution=payload.attribution, usage=payload.usage, retry_after_s=payload.retry_after_s,
            workspace=payload.workspace,
        ))
        if rec is None:
            if item is not None:
                self.outbox.quarantine(item, "result refused: stale epoch", payload.log_path)
                self.stats["quarantined"] += 1
            else:
                self._quarantine_local(run, payload, "result refused: stale epoch")
            return
        self.stats["finished"] += 1
        log.info("%s: %s attempt %d %s: now %s", self.id, run.job, run.record.attempt,
                 str(payload.failure or "passed"), rec.stage)
        await self._event("finished", job=run.job, epoch=run.epoch, stage_from="building", stage_to=str(rec.stage),
                          reason=rec.reason, data={"outcome": str(payload.failure or "passed"),
                                                   "exit_code": payload.exit_code, "log": payload.log_object,
                                                   "attribution": msgspec.to_builtins(payload.attribution),
                                                   "usage": msgspec.to_builtins(payload.usage),
                                                   **({"workspace": msgspec.to_builtins(payload.workspace)}
                                                      if payload.workspace else {}), **upload,
                                                   # The station's class from here on: a station
                                                   # taking job after job sends no station event.
                                                   **self._station_after_run(run)})

    def _quarantine_local(self, run: Run, payload: ResultPayload, reason: str) -> None:
        data = msgspec.json.encode(payload)
        item_id = self.outbox.put("result", run.job, run.epoch, data)
        item = OutboxItem(id=item_id, kind="result", job=run.job, epoch=run.epoch, payload=data,
                          created_at=time.time(), attempts=0)
        self.outbox.quarantine(item, reason, payload.log_path)
        self.stats["quarantined"] += 1
        log.warning("%s: result of %s (epoch %d) quarantined: %s", self.id, run.job, run.epoch, reason)

    # -- the outbox ---------------------------------------------------------------------------------

    async def _outbox_loop(self, stop: asyncio.Event) -> None:
        """Publish what waits in the outbox. While it holds items (the broker was down), try
        every ``OUTBOX_RETRY_S``; while it is empty, sleep until an item is put in it."""
        pending = self.outbox.count() > 0  # items left by an earlier run of this factory
        while not stop.is_set():
            if not pending:
                kick = asyncio.ensure_future(self._outbox_kick.wait())
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({kick, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    kick.cancel()
                    stopped.cancel()
                if stop.is_set():
                    return
            else:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=OUTBOX_RETRY_S)
                    return
                except asyncio.TimeoutError:
                    pass
            self._outbox_kick.clear()
            self.stats["outbox_wakeups"] += 1
            if self.broker.nc.is_connected:
                try:
                    await self._flush_outbox()
                except Exception as e:
                    log.info("%s: outbox flush failed (%s)", self.id, e)
            pending = self.outbox.count() > 0

    async def _flush_outbox(self) -> None:
        for item in self.outbox.pending(100):
            await self._flush_item(item)

    async def _flush_item(self, item: OutboxItem) -> None:
        payload = msgspec.json.decode(item.payload, type=ResultPayload)
        self.outbox.mark_attempt(item.id)
        e = await self.broker.jobs.get(item.job)
        rec = decode(e.value, JobRecord) if e else None
        try:
            protocol.check_fence(rec, item.job, self.id, item.epoch)
        except protocol.Fenced:
            if rec is not None and protocol.already_applied(rec, item.epoch, str(payload.failure or "passed")):
                # The earlier write landed but its reply was lost: nothing to quarantine. Say so
                # (not as a transition: the job may have moved on since, e.g. shipped by a human).
                self.outbox.mark_done(item.id)
                await self._event("report_confirmed", job=item.job, epoch=item.epoch,
                                  reason=f"outbox result of epoch {item.epoch} was already applied; "
                                         f"the job is now {rec.stage}",
                                  data={"outcome": str(payload.failure or "passed"), "log": payload.log_object,
                                        "attribution": msgspec.to_builtins(payload.attribution)})
                return
            self.stats["fenced_writes"] += 1
            self.stats["quarantined"] += 1
            self.outbox.quarantine(item, "result refused on reconnect: the job was reclaimed (stale epoch)", payload.log_path)
            await self._event("fenced", job=item.job, epoch=item.epoch,
                              reason=f"outbox result with stale epoch {item.epoch} refused; quarantined",
                              data={"held_epoch": item.epoch, "record_epoch": rec.epoch if rec else None})
            return
        assert rec is not None and e is not None
        run = Run(item.job, item.epoch, rec.lease.station if rec.lease else 0, e.revision, rec)
        with tracing.span("report", parent=rec.trace, job=item.job, epoch=item.epoch, factory=self.id, via="outbox",
                          outcome=str(payload.failure or "passed")):
            await self._publish_result(run, payload, item)
        if not run.fenced:
            self.outbox.mark_done(item.id)

