"""Holding a lease: fenced writes, renewal, self-fencing and locks.

The epoch is the fencing token. Every write by the holder after the claim (start, renewal,
hand-back, result) is a compare-and-set decided by the sans-I/O machine :mod:`lease`, which the
deterministic simulation drives too; this module is only the I/O around it. A write refused for
a stale epoch stops the run, and its result goes to quarantine, never to the broker.

A holder fences itself too. A run whose lease was not renewed successfully for
``lease_ttl_s - fence_margin_s`` (this machine's boot clock, from when the last successful
renewal was sent) stops its engine, SIGTERM then SIGKILL, before the reaper may reclaim it; the
supervisor (:mod:`supervise`) enforces that deadline even when this event loop is stalled. The
result goes to quarantine and a ``self_fenced`` event says why. A job's lock entry is rewritten
on every successful renewal, so others can tell a live holder from a stopped one
(:func:`protocol.lock_verdict`).

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``stats``, ``s``, ``id``,
the broker; ``_event`` (:mod:`audit`) and ``_quarantine_local`` (:mod:`reporting`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gigafactory.broker import TRANSIENT, Conflict
from gigafactory.identity import holder_signer
from gigafactory.schemas import names, protocol
from gigafactory.schemas.records import JobRecord, LockRecord, decode, encode

from . import lease, shell
from .results import ResultPayload

log = logging.getLogger(__name__)

MAX_CAS_RETRIES = lease.MAX_CAS_RETRIES
"""Tries of a lock write; the job record's writes are bounded by :mod:`lease` itself."""


@dataclass
class Run:
    job: str
    epoch: int
    station: int
    revision: int
    record: JobRecord
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    """Stops the engine (fenced, draining)."""
    stop_renewing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set just before the result (or hand-back) is written: renewals go on through the log
    upload, so a slow upload cannot let the lease expire under a good result."""
    fenced: bool = False
    draining: bool = False
    """Set by drain: the run is stopped and handed back, not reported as a failure."""
    handback_reason: str = ""
    """Why a stopped run hands its job back (a ``stop`` halt); empty: the factory drains."""
    lock_key: str | None = None
    lock_rev: int = 0
    lock_value: bytes = b""
    lock_sent_s: float | None = None
    """When (:func:`shell.fence_clock`) the write that took or refreshed the lock entry was sent:
    the lock is presumed free ``lease_ttl_s + fence_margin_s`` after that entry was stored, so
    the first self-fencing deadline counts from the older of this and the start write."""
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fence: shell.FenceDeadline | None = None
    """The self-fencing deadline (None before the start write, or with
    ``unsafe_unfenced_engines``): extended after each successful renewal."""
    self_fenced: str | None = None
    """Why the run stopped its own engine (the deadline passed without a renewal), if it did."""
    started_sent_s: float | None = None
    """Set when the claim itself started the run (``queued -> building``, no lock to take
    first): when (:func:`shell.fence_clock`) that write was sent, so the self-fencing deadline
    counts from it; None: the run starts with its own write after the claim."""
    fence_socket: Any = None
    """The attempt's :class:`~gigafactory.factory.fence_socket.FenceSocket` (``GF_FENCE_SOCKET``)
    while its engine may run; None before the start write and after the attempt."""


class Holder:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: the lease a run holds, written,
    renewed, fenced, and the job's lock."""

    def _signing(self, decide):
        """``decide`` whose records come out signed by this factory's identity
        (schemas/signing.py), so the coordinator can tell its writes from anyone else's; the
        record the run holds afterwards is the one stored, signature included."""
        signer = holder_signer(self.settings)

        def signed(rec: JobRecord):
            out = decide(rec)
            if isinstance(out, protocol.Outcome):
                return dataclasses.replace(out, record=signer.sign_record(out.record))
            return signer.sign_record(out) if isinstance(out, JobRecord) else out

        return signed

    async def _write(self, run: Run, decide, *, renewal: bool = False) -> JobRecord | None:
        """A fenced write: ``decide(record) -> record|Outcome``, CAS on the revision we hold.
        Returns the record the run holds afterwards, or None if the run is fenced; raises
        ``Conflict`` after ``MAX_CAS_RETRIES`` refused tries, and the broker's error when a
        read after a conflict or an unanswered write gets no answer either.

        This is only the I/O: every decision (retry, learn that an unanswered write landed,
        back off, fenced, give up) is :class:`lease.FencedWrite`'s, the machine the
        deterministic simulation drives too."""
        async with run.write_lock:
            machine = lease.FencedWrite(run.record, run.revision, self._signing(decide), stopped=lambda: run.fenced)
            act = machine.start()
            while True:
                if isinstance(act, lease.Send):
                    try:
                        act = machine.stored(await self.broker.jobs.update(run.job, act.data, last=act.last))
                    except Conflict:
                        act = machine.conflict()
                    except TRANSIENT:
                        act = machine.no_answer()
                elif isinstance(act, lease.Read):
                    try:
                        fresh = await self.broker.jobs.get(run.job)
                    except TRANSIENT:
                        machine.read_unanswered()
                        raise
                    act = machine.read(None) if fresh is None else machine.read(fresh.value, fresh.revision)
                elif isinstance(act, lease.BackOff):
                    await asyncio.sleep(act.delay_s)
                    act = machine.backed_off()
                elif isinstance(act, lease.Done):
                    if act.revision is not None:
                        run.revision, run.record = act.revision, act.record
                    return act.record
                elif isinstance(act, lease.Fenced):
                    if act.noticed:
                        await self._fenced(run, act.record)
                    return None
                else:
                    assert isinstance(act, lease.GiveUp), act
                    raise Conflict(f"{run.job}: could not write after {lease.MAX_CAS_RETRIES} tries")

    async def _fenced(self, run: Run, rec: JobRecord | None) -> None:
        if run.fenced:
            return
        run.fenced = True
        run.stop_renewing.set()
        run.cancel.set()
        self.stats["fenced_writes"] += 1
        now = f"epoch {rec.epoch}, {rec.stage}" if rec else "gone"
        log.warning("%s: fenced on %s: held epoch %d, record at %s", self.id, run.job, run.epoch, now)
        await self._event("fenced", job=run.job, epoch=run.epoch,
                          reason=f"write with stale epoch {run.epoch} refused (record at {now})",
                          data={"held_epoch": run.epoch, "record_epoch": rec.epoch if rec else None})

    def _fence_deadline_s(self, sent_s: float) -> float:
        """The self-fencing deadline for a lease write sent at ``sent_s`` (:func:`shell.fence_clock`)."""
        return sent_s + self.settings.lease_ttl_s - self.settings.fence_margin_effective_s

    def _self_fence_reason(self, run: Run) -> str:
        assert run.fence is not None
        since_s = shell.fence_clock() - (run.fence.at_s - self.settings.lease_ttl_s + self.settings.fence_margin_effective_s)
        return (f"no successful lease renewal for {since_s:.1f}s (deadline lease_ttl_s - fence_margin_s = "
                f"{self.settings.lease_ttl_s - self.settings.fence_margin_effective_s:g}s): engine stopped before the lease "
                "could be reclaimed")

    async def _self_fence(self, run: Run, payload: ResultPayload) -> None:
        """The run's deadline passed while its engine ran: the engine is stopped (by the
        supervisor and by shell), nothing more is written under the lease, the result goes to
        quarantine, and a ``self_fenced`` event says why."""
        assert run.self_fenced is not None
        run.fenced = True
        run.stop_renewing.set()
        self.stats["self_fenced"] += 1
        log.warning("%s: self-fenced on %s (epoch %d): %s", self.id, run.job, run.epoch, run.self_fenced)
        self._quarantine_local(run, payload, f"self-fenced: {run.self_fenced}")
        await self._event("self_fenced", job=run.job, epoch=run.epoch, reason=run.self_fenced,
                          data={"held_epoch": run.epoch, "lease_ttl_s": self.settings.lease_ttl_s,
                                "fence_margin_s": self.settings.fence_margin_effective_s})

    async def _renew_loop(self, run: Run) -> None:
        """Renew the lease every ``lease_renew_s``. A renewal counts (extends the self-fencing
        deadline) only when the record write succeeded and, for a job holding a lock, the lock
        entry was rewritten too (its age is how others judge the holder stopped)."""
        while not run.stop_renewing.is_set():
            try:
                await asyncio.wait_for(run.stop_renewing.wait(), timeout=self.settings.lease_renew_s)
                return
            except asyncio.TimeoutError:
                pass
            decided: list[JobRecord | None] = [None]

            def decide(r: JobRecord) -> JobRecord | None:
                # Checked again under the write lock: a renewal after the result would be refused
                # by the fence and miscounted as a stale write.
                decided[0] = None if run.stop_renewing.is_set() else protocol.renew(r, self.id, run.epoch, time.time())
                return decided[0]

            sent_s = shell.fence_clock()
            try:
                wrote = await self._write(run, decide, renewal=True)
            except Exception as e:  # broker trouble: keep running until the deadline; the epoch decides
                log.info("%s: renewal of %s failed (%s)", self.id, run.job, e)
                continue
            # Renewed only if what was written is the renewal last decided (equality, not
            # identity: whatever drives the write may hand back a copy). A None decision (the
            # run ended meanwhile) or a fenced write extends nothing.
            # (The stored record carries the signature the write added: compare without it.)
            if (wrote is None or decided[0] is None or run.fenced
                    or msgspec.structs.replace(wrote, sig=None) != msgspec.structs.replace(decided[0], sig=None)):
                continue
            if run.lock_key and not await self._renew_lock(run):
                continue
            if run.fence is not None:
                run.fence.extend(self._fence_deadline_s(sent_s))

    async def _fence_for_job(self, run: Run, min_remaining_s: float | None) -> dict:
        """The verdict of ``gigafactory fence`` asked by the attempt's job on its fence socket
        (:mod:`fence_socket`): a compare-and-set renewal of ``run``'s lease, written and signed as
        every holder write, then the lease sure to be left against ``min_remaining_s`` (None: half
        the TTL). Never renews once the attempt is over (its result is being written) or fenced.

        :param run: the attempt whose socket was asked.
        :param min_remaining_s: the lease the job wants left after the renewal."""
        ttl_s = self.settings.lease_ttl_s
        try:
            want_s = protocol.fence_min_remaining_s(ttl_s, min_remaining_s)
        except ValueError as e:
            return {"outcome": "usage", "reason": str(e)}
        base = {"lease_ttl_s": ttl_s, "min_remaining_s": want_s}
        if run.stop_renewing.is_set() or run.fenced or run.self_fenced is not None:
            return {**base, "outcome": "fenced", "reason": f"epoch {run.epoch} of {run.job} is over on {self.id}"}
        decided: list[JobRecord | None] = [None]

        def decide(r: JobRecord) -> JobRecord | None:
            # Under the write lock, as the renewal loop: never a renewal after the result.
            decided[0] = None if run.stop_renewing.is_set() else protocol.renew(r, self.id, run.epoch, time.time())
            return decided[0]

        read_rev = run.revision
        sent_s = time.monotonic()  # before the write goes out: the broker stamps it later
        try:
            wrote = await self._write(run, decide)
        except Exception as e:  # cannot tell: a push must not go out on a guess
            return {**base, "outcome": "unknown", "reason": f"the renewal failed ({type(e).__name__}: {e})"[:500]}
        if wrote is None or decided[0] is None or run.fenced:
            return {**base, "outcome": "fenced", "read_revision": read_rev,
                    "reason": f"stale epoch {run.epoch}: {run.job} was reclaimed, cancelled or has ended"}
        left_s = protocol.fence_remaining_s(ttl_s, time.monotonic() - sent_s)
        got = {**base, "read_revision": read_rev, "revision": run.revision, "remaining_s": left_s}
        if left_s < want_s:
            return {**got, "outcome": "too_late",
                    "reason": f"{self.id} holds {run.job} at epoch {run.epoch}, but only {left_s:.3f}s of lease "
                              f"is sure to be left, less than --min-remaining-s {want_s:g}s: do not push now"}
        return {**got, "outcome": "held",
                "reason": f"{self.id} holds {run.job} at epoch {run.epoch}: lease renewed (revision "
                          f"{run.revision}), at least {left_s:.3f}s left"}

    async def _renew_lock(self, run: Run) -> bool:
        """Rewrite the job's lock entry (CAS on its revision), so its broker timestamp says the
        holder is alive. False if it could not: the deadline is then not extended."""
        assert run.lock_key is not None
        for _ in range(2):
            try:
                run.lock_rev = await asyncio.wait_for(
                    self.broker.locks.update(run.lock_key, run.lock_value, last=run.lock_rev), self.settings.request_timeout_s)
                return True
            except Conflict:
                pass
            except Exception as e:
                log.info("%s: lock %s of %s not renewed (%s)", self.id, run.lock_key, run.job, e)
                return False
            # A rewrite whose reply was lost (or an R3 bucket refusing a CAS spuriously) leaves
            # our revision behind: an entry that is still ours is adopted and written again.
            try:
                cur = await self.broker.locks.get(run.lock_key)
            except Exception as e:
                log.info("%s: lock %s of %s not read (%s)", self.id, run.lock_key, run.job, e)
                return False
            if cur is None or cur.value != run.lock_value:
                # Someone judged us stopped and took it (our entry aged past lease_ttl_s +
                # fence_margin_s), or it was deleted: our deadline has passed. Never write it again.
                log.warning("%s: lock %s of %s was taken over; the run fences itself at its deadline",
                            self.id, run.lock_key, run.job)
                run.lock_key = None
                return False
            run.lock_rev = cur.revision
        return False


    async def _acquire_lock(self, run: Run, lock: str) -> str | None:
        """Take the job's lock; returns None when taken, else the holder's job id.

        A lock is free only when deleted, or when its holder is known stopped
        (:func:`protocol.lock_verdict`): never because the holder's record moved to another
        epoch (cancelled, requeued or reclaimed), since its engine may still be running."""
        key = names.safe_key(lock)
        value = encode(LockRecord(lock=lock, job=run.job, epoch=run.epoch, factory=self.id))
        run.lock_value = value
        for _ in range(MAX_CAS_RETRIES):
            sent_s = shell.fence_clock()
            try:
                run.lock_rev = await self.broker.locks.create(key, value)
                run.lock_key, run.lock_sent_s = key, sent_s
                return None
            except Conflict:
                pass
            cur = await self.broker.locks.get(key)
            if cur is None:
                continue
            try:
                holder = decode(cur.value, LockRecord)
            except msgspec.DecodeError:
                # Not a lock entry (written by hand or by a broken client): it holds the lock
                # until it is as old as a holder's entry that stopped being renewed.
                if await self.broker.broker_now() - cur.ts <= self.settings.lease_ttl_s + self.settings.fence_margin_effective_s:
                    return f"<an unreadable entry in {names.LOCKS_BUCKET}/{key}>"
                sent_s = shell.fence_clock()
                try:
                    run.lock_rev = await self.broker.locks.update(key, value, last=cur.revision)
                except Conflict:
                    continue
                run.lock_key, run.lock_sent_s = key, sent_s
                return None
            if holder.job == run.job and holder.epoch == run.epoch:
                # Ours already (a create whose reply was lost), but stored at a time we do not
                # know: rewrite it, so the entry's age and our deadline count from one send.
                sent_s = shell.fence_clock()
                try:
                    run.lock_rev = await self.broker.locks.update(key, value, last=cur.revision)
                except Conflict:
                    continue
                run.lock_key, run.lock_sent_s = key, sent_s
                return None
            he = await self.broker.jobs.get(holder.job)
            try:
                hrec = decode(he.value, JobRecord) if he else None
            except msgspec.DecodeError:
                hrec = None  # a poisoned record tells nothing: only the entry's age can
            verdict = protocol.lock_verdict(holder, hrec, await self.broker.broker_now() - cur.ts,
                                            lease_ttl_s=self.settings.lease_ttl_s,
                                            fence_margin_s=self.settings.fence_margin_effective_s)
            if not verdict.free:
                return holder.job
            sent_s = shell.fence_clock()
            try:
                run.lock_rev = await self.broker.locks.update(key, value, last=cur.revision)
                run.lock_key, run.lock_sent_s = key, sent_s
                log.info("%s: lock %r taken over for %s: %s", self.id, lock, run.job, verdict.reason)
                return None
            except Conflict:
                continue
        return "?"

    async def _release_lock(self, run: Run) -> None:
        if run.lock_key:
            try:
                await self.broker.locks.delete(run.lock_key, last=run.lock_rev)
            except Exception as e:  # stale-lock cleanup takes it later
                log.info("%s: lock %s not released (%s)", self.id, run.lock_key, e)
            run.lock_key = None

    async def _hand_back(self, run: Run, reason: str, backoff_s: float = 0.0) -> None:
        run.stop_renewing.set()
        rec = await self._write(run, lambda r: protocol.hand_back(r, self.id, run.epoch, time.time(), reason, backoff_s))
        if rec is not None:
            self.stats["handed_back"] += 1
            # A drained or stopped run's station goes to the factory's reason (draining, a
            # halt's policy-paused), which this event says; a run handed back for a reason of
            # its own (a lock held elsewhere) leaves it to the release, which knows that reason.
            await self._event("handed_back", job=run.job, epoch=run.epoch, stage_to="queued", reason=reason,
                              data=self._station_after_run(run) if run.draining else None)
            run.fenced = True  # the lease is given up: nothing more may be written under it

