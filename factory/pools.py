"""Pool binding and dispatch: which pools this factory serves, push or poll, and stall checks.

A pool is a canonical requirement set (:mod:`gigafactory.schemas.capabilities`); the factory
binds to every pool whose requirements it offers and runs one puller per pool. A puller asks
for work only when a station (and an engine seat) is free (:mod:`stations`); what it gets is
claimed and run by :mod:`execute`.

When push dispatch is unavailable (stream or consumer gone, or stalled while jobs wait in
the queue index), a pool falls back to polling the ``gf_queue`` index with jittered
back-off, and returns to push once its consumer answers again.

State it uses, set up by :class:`~gigafactory.factory.agent.Factory`: ``pools``, ``_pools_rescan``,
``_stop``, ``draining``, ``stats``, ``s``, ``id``, the broker; and ``stall_check_s``, which the
factory derives from :data:`STALL_CHECKS_PER_REDISPATCH` (see there why it lives in ``agent``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.js.client import JetStreamContext

from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.records import DispatchMessage, JobRecord, PoolRecord, QueueEntry, decode

log = logging.getLogger(__name__)

STALL_CHECKS_PER_REDISPATCH = 1 / 3
"""An idle pool puller checks that no queued job of its pool has waited unclaimed (a stall)
every ``redispatch_s / STALL_CHECKS_PER_REDISPATCH`` (30 s with the default 10 s). A deleted
stream or consumer needs no check: the next fetch is refused at once (503, no responders) and
the pool falls back within a long poll. The check is for push that stays silent while jobs
wait (a coordinator that is gone, say); a stall is only visible after
``2 * redispatch_s + long_poll_s`` anyway, so checking more often would cost for nothing.

What a check costs: while the pool's queue index stays as a check last found it, empty (the
idle fleet), nothing: a one-shot subscription to the index's subjects would have heard a write
(see :meth:`Pools._index_quiet`), and only every ``QUIET_PROBE_EVERY_CHECKS``-th check confirms
it with one direct get that asks whether anything was written since (no consumer, no clock
probe, no JetStream API request). Otherwise a full check: one scan of the pool's
index and, only when something is queued, a broker-clock probe, the consumer lookup and up to
STALL_READS_MAX record reads."""
QUIET_PROBE_EVERY_CHECKS = 10
"""While a pool's queue index is known empty and nothing was heard written to it (see
:meth:`Pools._index_quiet`), only every this many stall checks sends the probe (one direct get):
the others cost no request. The probe bounds what the subscription could miss: a write in the
moment a cluster spreads a new subscription's interest, or a subscription the broker refused
(a server whose permissions predate it). A stall it finds is found within this many checks
(five minutes at the defaults) instead of one, for a pool whose coordinator is gone while
push is silent."""
STALL_READS_MAX = 8
"""Index entries old enough to look stalled are confirmed against their job records, at most
this many per check (a healthy pool has none: each read costs one request)."""
POLL_BACKOFF_MIN_S = 0.5
"""First back-off between polling passes that claimed nothing; doubles up to
``poll_backoff_max_s``."""
PREFERS_RECHECK_S = 1.0
"""A dispatch message this factory gives back (its job prefers engines that have no free seat
here, see ``prefers_grace_s``) is offered again after at most this long: how often a held-back
job is looked at again, and so at most ``prefers_grace_s / PREFERS_RECHECK_S`` deliveries of
its message while it is held back."""


def redelivery_delay_s(offer_again_in_s: float, deliveries: int) -> float:
    """How long a message given back is kept from every puller of the pool: not at all on its
    first delivery (a puller of another factory that already waits gets it at once: the
    preferred one, if it is idle), then ``PREFERS_RECHECK_S`` at most, and never past the time
    when this factory would take it itself (``offer_again_in_s``).

    :param offer_again_in_s: when the claim is worth trying here again (0: at once).
    :param deliveries: how many times the broker has delivered this message (1: the first).
    """
    if deliveries <= 1:
        return 0.0
    return max(0.0, min(offer_again_in_s, PREFERS_RECHECK_S))


def _deliveries(msg) -> int:
    """The message's delivery count (JetStream metadata); 1 when it cannot be read."""
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


@dataclass
class PoolState:
    id: str
    requirements: list[str]
    engine: str | None
    """The engine the pool's requirements name (``engine:<name>``): its jobs take its seats."""
    engine_class: str | None = None
    """The class an engine-class pool needs (``engine-class:<class>``, no ``engine:``): each job
    takes a seat of the engine chosen for it (:meth:`Stations._take_seat`)."""
    mode: str = "push"
    task: asyncio.Task | None = None
    psub: object | None = None
    """The pool consumer's pull subscription while in push mode."""
    gone: bool = False
    """Its ``gf_pools`` entry was deleted (the coordinator's retention collected the idle
    pool): the puller stops at its next turn and the factory unbinds."""
    index_quiet: tuple[int, int] | None = None
    """``(sequence, reconnects)``: a stall check found the pool's queue index empty, and the
    newest message on its keys then had this stream sequence (on this connection, counted by
    its reconnects). While nothing is written after it, nothing of the pool waits, and an idle
    check costs one direct get (see :meth:`Factory._index_quiet`). None: not known empty."""
    index_sub: object | None = None
    """A one-shot subscription to the pool's queue index subjects, made by the check that
    found it empty: the first write to the index after that check is delivered to it (and the
    broker then drops it), setting ``index_heard``."""
    index_heard: bool = False
    """Something was written to the pool's queue index since ``index_sub`` was made."""
    quiet_checks: int = 0
    """Stall checks answered by ``index_sub`` alone since the last probe."""


@dataclass
class PullPace:
    """How one pool's puller is paced: its fetch errors in a row, its polling back-off, and
    when it last checked push for a stall (``time.monotonic()``)."""

    errors: int
    backoff_s: float
    last_check: float


class Pools:
    """Mixin of :class:`~gigafactory.factory.agent.Factory`: binding to pools and pulling work."""

    async def _pools_loop(self, stop: asyncio.Event) -> None:
        """Bind to every pool this factory can serve, as pools appear.

        A plain subscription to the bucket's subjects hears each pool as it is written, and
        costs nothing while none is: an idle fleet's traffic stays heartbeats and long polls.
        (A long-lived KV watch is an ordered consumer: an idle-heartbeat message every 5 s and
        a flow-control timer every 0.25 s per factory, with nothing to say.) A scan reads the
        pools written before, and again after a reconnect (the subscription missed whatever
        was written while the connection was down); the heartbeat loop asks for that one."""
        sub = None
        scanned_at = -1
        while not stop.is_set():
            try:
                if sub is None:
                    sub = await self.broker.nc.subscribe(f"$KV.{names.POOLS_BUCKET}.>", cb=self._on_pool_msg)
                self._pools_rescan.clear()
                reconnects = self.broker.nc.stats["reconnects"]
                if reconnects != scanned_at or self._pools_rescan_all:
                    self._pools_rescan_all = False
                    self.stats["pool_scans"] += 1
                    async for e in self.broker.pools.scan():
                        self._bind_pool(e.key, e.value, stop)
                    scanned_at = reconnects
                await self._pools_rescan.wait()
            except asyncio.CancelledError:
                raise
            except Exception as ex:
                log.info("%s: reading the pools failed (%s); reading again", self.id, ex)
                await asyncio.sleep(1.0)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be gone; the subscription goes with it
                pass

    async def _on_pool_msg(self, msg) -> None:
        key = msg.subject[len(f"$KV.{names.POOLS_BUCKET}."):]
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            # The pool was collected as idle: stop pulling from its (deleted) consumer rather
            # than fall back to polling it forever. It is bound again if it comes back.
            ps = self.pools.get(key)
            if ps is not None and not ps.gone:
                ps.gone = True
                log.info("%s: pool %s was deleted; unbinding", self.id, key)
            return
        self._bind_pool(key, msg.data, self._stop)

    def _bind_pool(self, key: str, value: bytes, stop: asyncio.Event | None) -> None:
        self.stats["pool_records"] += 1
        old = self.pools.get(key)
        if stop is None or stop.is_set() or self.draining.is_set() or not value or (old is not None and not old.gone):
            return
        try:
            pool = decode(value, PoolRecord)
        except msgspec.DecodeError:
            return
        if self.offers.missing(pool.requirements):
            return
        engine = next((r.split(":", 1)[1] for r in pool.requirements if r.startswith("engine:")), None)
        engine_class = None if engine else next(
            (r.split(":", 1)[1] for r in pool.requirements if r.startswith("engine-class:")), None)
        ps = PoolState(pool.id, pool.requirements, engine, engine_class)
        self.pools[pool.id] = ps
        ps.task = self._spawn(self._puller(ps, stop), f"pool-{pool.id}")
        log.info("%s serves pool %s (%s)", self.id, pool.id, " ".join(pool.requirements))
        if engine_class and engine_class not in self._offered_engines().values():
            # Offered by an operator's --cap with no engine of the class behind it: say why the
            # pool's jobs are never taken here (they wait for a factory that can run them).
            log.warning("%s offers engine-class:%s but no engine of that class: it takes none of pool %s's jobs",
                        self.id, engine_class, pool.id)

    async def _puller(self, ps: PoolState, stop: asyncio.Event) -> None:
        try:
            await self._pull_loop(ps, stop)
        finally:
            if ps.gone and self.pools.get(ps.id) is ps:  # not rebound meanwhile
                del self.pools[ps.id]
            # A fetch cut short (drain cancels this task) leaves its subscription buffering
            # messages that no one takes; nats-py's connection drain then waits for them until
            # its timeout. Dropping the subscription lets the factory shut down at once.
            await self._drop_psub(ps)
            await self._drop_index_sub(ps)

    async def _drop_psub(self, ps: PoolState) -> None:
        psub, ps.psub = ps.psub, None
        if psub is None:
            return
        try:
            await asyncio.wait_for(psub.unsubscribe(), timeout=self.settings.request_timeout_s)
        except Exception as e:  # the connection may be gone; the subscription goes with it
            log.debug("%s: dropping the pull subscription of pool %s: %s", self.id, ps.id, e)


    async def _drop_index_sub(self, ps: PoolState) -> None:
        sub, ps.index_sub = ps.index_sub, None
        if sub is None:
            return
        try:
            await sub.unsubscribe()
        except Exception:  # already delivered its one message, or the connection is gone
            pass

    async def _listen_index(self, ps: PoolState) -> None:
        """Replace the pool's one-shot index subscription by a new one, before a full check
        reads the index: a write after this point is heard, one before it is seen by the
        check. The broker drops the subscription after its first message (``UNSUB`` with a
        limit), so a busy pool costs each idle factory at most one message per check.

        :param ps: the pool."""
        await self._drop_index_sub(ps)
        ps.index_heard, ps.quiet_checks = False, 0

        async def heard(_msg) -> None:
            ps.index_heard = True

        try:
            sub = await self.broker.nc.subscribe(f"$KV.{names.QUEUE_BUCKET}.{ps.id}.>", cb=heard)
            await sub.unsubscribe(limit=1)
        except Exception as ex:  # no subscription: every check probes, as before it existed
            log.info("%s: listening to the index of pool %s failed (%s)", self.id, ps.id, ex)
            return
        ps.index_sub = sub

    @property
    def stall_after_s(self) -> float:
        """A queued, dispatchable job of a pool that has waited this long (broker time) while
        a station of this factory was free says push is not delivering: the coordinator
        republishes an unclaimed offer after ``redispatch_s``, so two periods and a long poll
        are only ever exceeded when dispatch itself is broken."""
        return 2 * self.settings.redispatch_s + self.settings.long_poll_s

    async def _pull_loop(self, ps: PoolState, stop: asyncio.Event) -> None:
        """One pool's dispatch: push (a long-poll fetch on the pool consumer) while it works,
        else polling the ``gf_queue`` index with jittered back-off until the consumer answers
        and nothing waits stalled. Each switch is logged and published as a ``dispatch_mode``
        event.

        :param ps: the pool.
        :param stop: set when the factory stops.
        """
        # A random phase: factories started together would otherwise all check at once, every
        # stall_check_s, a herd of consumer lookups and index scans on the broker.
        pace = PullPace(errors=0, backoff_s=POLL_BACKOFF_MIN_S,
                        last_check=time.monotonic() - random.uniform(0.0, self.stall_check_s))
        while not stop.is_set() and not self.draining.is_set() and not ps.gone:
            while not await self._wait_capacity(ps.engine, timeout_s=self.settings.long_poll_s, engine_class=ps.engine_class):
                await self._hand_back_stranded(ps)
            if self.draining.is_set():
                return
            if ps.mode == "poll":
                await self._poll_round(ps, pace)
                continue
            if not self.broker.nc.is_connected:
                # A pull request sent now would wait in the client's buffer and reach the
                # broker on reconnect with every other one sent during the outage: a fleet of
                # idle stations would return with several stale requests each on every pool
                # consumer (past its max_waiting, for a big fleet and a long outage). Wait for
                # the connection instead; the request goes out as soon as it is back.
                await self.broker.wait_connected(self.settings.long_poll_s)
                continue
            for msg in await self._fetch_round(ps, pace):
                await self._on_dispatch(ps, msg)

    async def _poll_round(self, ps: PoolState, pace: PullPace) -> None:
        """One polling pass on a pool in ``poll`` mode, then back to push if the consumer
        answers again, else a jittered back-off (doubling while nothing is claimed).

        :param ps: the pool.
        :param pace: the pool's pacing, updated.
        """
        claimed = await self._poll_pass(ps)
        if await self._push_healthy(ps):
            await self._switch(ps, "push", "the pool consumer answers and no queued job waits stalled")
            pace.errors, pace.backoff_s, pace.last_check = 0, POLL_BACKOFF_MIN_S, time.monotonic()
            return
        if not claimed:
            pace.backoff_s = min(pace.backoff_s * 2, self.settings.poll_backoff_max_s)
            await asyncio.sleep(random.uniform(pace.backoff_s / 2, pace.backoff_s))
        else:
            pace.backoff_s = POLL_BACKOFF_MIN_S

    async def _fetch_round(self, ps: PoolState, pace: PullPace) -> list:
        """One long-poll fetch on the pool consumer: the messages it brought ([] on a timeout,
        after a stall check when one is due, or on an error, after handling it).

        :param ps: the pool (in ``push`` mode).
        :param pace: the pool's pacing, updated.
        """
        try:
            if ps.psub is None:
                ps.psub = await self.broker.js.pull_subscribe_bind(
                    durable=names.pool_consumer(ps.id), stream=names.DISPATCH_STREAM,
                )
            msgs = await asyncio.wait_for(
                ps.psub.fetch(1, timeout=self.settings.long_poll_s),
                timeout=self.settings.long_poll_s + self.settings.request_timeout_s,
            )
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            pace.errors = 0
            # Only with the connection up: a broker that is not answering says nothing
            # about the consumer, and a fleet checking during an outage would all fall back.
            if time.monotonic() - pace.last_check > self.stall_check_s and self.broker.nc.is_connected:
                pace.last_check = time.monotonic()
                await self._check_push(ps)
            return []
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._fetch_failed(ps, pace, e)
            return []
        pace.errors = 0
        return msgs

    async def _check_push(self, ps: PoolState) -> None:
        """The stall check of an idle pool in ``push`` mode: falls back to ``poll`` when the
        pool consumer does not answer, or a queued job waited while a station was free.

        :param ps: the pool.
        """
        reconnects = self.broker.nc.stats["reconnects"]

        def verdict_holds() -> bool:
            # A check the connection dropped under (its requests timed out) is no
            # verdict on the consumer: a fleet checking when the broker died would
            # all fall back at once.
            return self.broker.nc.is_connected and self.broker.nc.stats["reconnects"] == reconnects

        if await self._index_quiet(ps):
            return
        self.stats["stall_checks"] += 1
        # Listen before the check reads the index: whatever is written from then on is heard
        # (or, for the rare check that probes, has a sequence after the check's mark).
        await self._listen_index(ps)
        stalled = await self._stalled(ps)
        if ps.index_quiet is not None:
            return  # nothing queued: nothing for push to deliver, nothing to check
        if not await self._consumer_ok(ps):
            if verdict_holds():
                await self._drop_psub(ps)
                await self._switch(ps, "poll", "the pool consumer does not answer")
        elif stalled and verdict_holds():
            await self._drop_psub(ps)
            await self._switch(ps, "poll", f"a queued job waited over {self.stall_after_s:g}s "
                                           "while a station was free (push is not delivering)")

    async def _fetch_failed(self, ps: PoolState, pace: PullPace, e: Exception) -> None:
        """A fetch that failed: falls back to ``poll`` after three in a row or when the
        consumer does not answer, else waits a moment before the next fetch.

        :param ps: the pool.
        :param pace: the pool's pacing, updated.
        :param e: what the fetch raised.
        """
        # A deleted consumer or stream answers a fetch at once with 503 (no responders).
        await self._drop_psub(ps)
        if not self.broker.nc.is_connected:
            return  # the connection went, not the consumer: the loop waits for it
        pace.errors += 1
        log.info("%s: fetch on pool %s failed (%s)", self.id, ps.id, e)
        if pace.errors >= 3 or not await self._consumer_ok(ps):
            await self._switch(ps, "poll", f"fetch failed: {type(e).__name__} {e}".strip())
            pace.backoff_s = POLL_BACKOFF_MIN_S
        else:
            await asyncio.sleep(random.uniform(0.2, 1.0))

    async def _hand_back_stranded(self, ps: PoolState) -> None:
        """A pull request this factory no longer waits on (a long poll that timed out as its
        message arrived, or one buffered while disconnected and sent on reconnect) still takes
        a dispatch message on the server, and the message waits in the subscription until the
        next fetch, which with every station busy may be long. Take such messages now: with a
        station free again they are claimed, else nak'd, so a factory with a free one can.
        Reads only what already waits (no new pull request), skipping the status replies."""
        psub = ps.psub
        if psub is None:
            return
        for _ in range(min(psub.pending_msgs, 1000)):
            try:
                msg = await psub._sub.next_msg(timeout=0.01)  # nats-py's queue under the pull subscription
            except Exception:  # drained meanwhile, or the connection is gone
                return
            if not JetStreamContext.is_status_msg(msg):  # 408/404 replies to expired requests
                await self._on_dispatch(ps, msg)

    async def _switch(self, ps: PoolState, mode: str, why: str) -> None:
        """Set pool ``ps`` to ``mode`` ("push" or "poll"); a change is logged and published
        (event ``dispatch_mode``, with the pool, from, to, why and this factory's polled claims
        so far), and shows in the factory record's ``dispatch_mode`` at the next heartbeat."""
        assert mode in ("push", "poll"), mode
        if ps.mode == mode:
            return
        old, ps.mode = ps.mode, mode
        if mode == "poll":
            log.warning("%s: pool %s falls back to polling: %s", self.id, ps.id, why)
        else:
            log.info("%s: pool %s back to push dispatch: %s", self.id, ps.id, why)
        await self._event("dispatch_mode", reason=f"pool {ps.id}: {old} -> {mode}: {why}",
                          data={"pool": ps.id, "from": old, "to": mode, "why": why,
                                "polled_claims": self.stats["polled_claims"]})


    async def _push_healthy(self, ps: PoolState) -> bool:
        """Whether a polling pool may go back to push: its consumer answers, and no queued job
        waits stalled. With every station busy right after a polling pass, a backlog says
        nothing about push (this factory could not have taken more), so only the consumer
        counts; push mode checks for stalls again while idle."""
        if not await self._consumer_ok(ps):
            return False
        return not self._has_capacity(ps.engine, ps.engine_class) or not await self._stalled(ps)

    async def _consumer_ok(self, ps: PoolState) -> bool:
        try:
            await self.broker.js.consumer_info(names.DISPATCH_STREAM, names.pool_consumer(ps.id))
            return True
        except Exception:
            return False

    async def _index_quiet(self, ps: PoolState) -> bool:
        """Whether the pool's queue index is still as a stall check last found it, empty:
        nothing written to its keys since. Answered without a request while the check's
        one-shot subscription heard nothing (``index_sub``), except every
        ``QUIET_PROBE_EVERY_CHECKS``-th time, and always when there is no subscription: then one
        direct get (a reply of a 404 status while idle). Unknown (never checked, or checked on
        an earlier connection: writes while disconnected were not heard, and a broker that came
        back without its store numbers messages from 1 again), a write heard, or a probe that
        fails, is False: the caller does the full check, with its own guards for a broker that
        is not answering. The index is the coordinator's, so a quiet index is also what a fleet
        sees while the coordinator is down and nothing waits."""
        q = ps.index_quiet
        if q is None or q[1] != self.broker.nc.stats["reconnects"] or ps.index_heard:
            ps.index_quiet = None
            return False
        if ps.index_sub is not None:
            ps.quiet_checks += 1
            if ps.quiet_checks < QUIET_PROBE_EVERY_CHECKS:
                self.stats["stall_listens"] += 1
                return True
            ps.quiet_checks = 0
        self.stats["stall_probes"] += 1
        try:
            if not await self.broker.queue.written_after(f"{ps.id}.>", q[0]):
                return True
        except Exception as ex:
            log.info("%s: probing the index of pool %s failed (%s)", self.id, ps.id, ex)
        ps.index_quiet = None
        return False

    async def _stalled(self, ps: PoolState) -> bool:
        """A queued job of this pool that it could take has waited longer than
        ``stall_after_s`` (broker time): push is not delivering. One filtered scan of the
        pool's index; only the entries old enough are confirmed against their records (at
        most STALL_READS_MAX), so jobs that wait by design (in retry back-off, for a lock,
        or already claimed but not yet out of the index) do not count. An index found empty
        sets ``ps.index_quiet`` (and costs no clock probe); anything in it clears it."""
        ps.index_quiet = None
        try:
            # Read before the scan: a key written between the two is seen by the scan, one
            # written after it has a later sequence, so the next probe sees it.
            mark, reconnects = await self.broker.queue.newest_seq(f"{ps.id}.>"), self.broker.nc.stats["reconnects"]
            now: float | None = None
            old = []
            async for e in self.broker.queue.scan(f"{ps.id}.>"):
                if now is None:
                    now = await self.broker.broker_now()
                if now - e.ts > self.stall_after_s:
                    old.append(e)
            ps.index_quiet = (mark, reconnects) if now is None else None
            assert now is not None or not old
            for e in old[:STALL_READS_MAX]:
                try:
                    q = decode(e.value, QueueEntry)
                except msgspec.DecodeError:
                    continue
                je = await self.broker.jobs.get(q.job)
                if je is None:
                    continue
                rec = decode(je.value, JobRecord)
                if rec.stage != Stage.QUEUED or rec.epoch != q.epoch or rec.manifest.lock:
                    continue
                # A job that prefers engines may be held back by factories without them for up
                # to prefers_grace_s by design (see Execute._claim_and_run): not a stall until then.
                held_s = self.settings.prefers_grace_s if rec.manifest.prefers and not rec.manifest.engine else 0.0
                if now - max(e.ts, je.ts + rec.backoff_s) > self.stall_after_s + held_s:
                    return True
        except Exception as ex:  # the broker does not answer: push cannot be working either
            log.info("%s: stall check of pool %s failed (%s)", self.id, ps.id, ex)
            return True
        return False

    async def _poll_pass(self, ps: PoolState) -> bool:
        """Try to claim queued jobs of a pool straight from the index, best first."""
        try:
            entries = []
            async for e in self.broker.queue.scan(f"{ps.id}.>"):
                try:
                    entries.append(decode(e.value, QueueEntry))
                except msgspec.DecodeError:
                    continue
        except Exception as e:
            log.info("%s: polling pool %s failed (%s)", self.id, ps.id, e)
            return False
        entries.sort(key=lambda q: (q.priority_rank, q.submitted_at))
        claimed = False
        for q in entries:
            station = await self._take_station(ps.engine, ps.engine_class)
            if station is None:
                break
            if await self._claim_and_run(q.job, station, ps.engine, via="poll"):
                claimed = True
                self.stats["polled_claims"] += 1
        return claimed

    async def _on_dispatch(self, ps: PoolState, msg) -> None:
        try:
            d = decode(msg.data, DispatchMessage)
        except msgspec.DecodeError:
            await msg.term()  # not ours to understand; never redeliver garbage
            return
        if ps.gone or self.offers.missing(ps.requirements):
            # Unbound meanwhile (an engine withdrawn after auth_failed): another factory takes it.
            await msg.nak()
            return
        station = await self._take_station(ps.engine, ps.engine_class)
        if station is None:
            await msg.nak()  # another factory (or this one, later) takes it
            return
        claim = None
        try:
            carried = d.carried()  # the record as offered: claimed with one CAS and no read
            claim = await self._claim_and_run(d.job, station, ps.engine, via="push", trace=msg.headers,
                                              offered=None if carried is None else (carried, d.revision))
        finally:
            try:
                if claim is not None and claim.offer_again_in_s is not None:
                    await msg.nak(delay=redelivery_delay_s(claim.offer_again_in_s, _deliveries(msg)))
                else:
                    await msg.ack()
            except Exception:
                pass  # redelivery is harmless: the claim is a CAS on the record

