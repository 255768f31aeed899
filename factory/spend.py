"""The factory's side of the spend ledger: every attempt's spend records, and the fixed costs
of its seats, written durably and published to ``GF_SPEND``.

- :meth:`SpendWriter.begin` resolves an attempt's attribution before its engine starts: lane,
  lane kind (the job's ``lane-kind``, else the factory's ``lane_kind``), job, product, repo,
  tracker item, profile, engine, provider, model and funding window (one window, by
  :func:`~gigafactory.schemas.spend.choose_window`; ``unfunded`` when none funds the run).
  Resolution cannot fail: every field has a value, so coverage is 100% by construction.
- :meth:`SpendWriter.usage` writes a record per usage report while the engine runs, and
  :meth:`SpendWriter.final` the last one. Each carries the attempt's totals so far and the id
  ``<job>.<epoch>.<seq>``.
- Fixed seat costs (``seat_costs``) are written every ``seat_cost_interval_s`` for the time
  the factory was up, one record per seat engine and station (each lane carries its share).

Every record is put in this factory's spend outbox (SQLite, fsynced) before it is published,
and is removed only once ``GF_SPEND`` stored it: a factory killed mid-run publishes what it
wrote when it starts again, with the same ids, so nothing is lost or counted twice. The
outbox is bounded: beyond :data:`SPEND_OUTBOX_MAX` pending records, usage records are not
written (a later record of the same attempt carries the totals), final and fixed ones are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from pathlib import Path

import msgspec

from gigafactory.schemas import names
from gigafactory.schemas.records import Usage
from gigafactory.schemas.spend import (
    CostSource,
    FundingWindow,
    SpendKind,
    SpendRecord,
    attempt_record_id,
    choose_window,
    fixed_cost_usd,
    parse_seat_costs,
    provider_for,
)

from .outbox import Outbox

log = logging.getLogger(__name__)

SPEND_OUTBOX_MAX = 100_000
"""Pending spend records kept while the broker is away; beyond it usage records are skipped."""
PUBLISH_BATCH = 200
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
FIXED_PRODUCT = "fleet"
"""The product of fixed seat costs (a seat serves every product)."""
LOCAL_PROVIDER = "local"
FIXED_MIN_INTERVAL_S = 1.0

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(SpendRecord)


def funding_windows(settings) -> list[FundingWindow]:
    """The windows of ``funding_windows_file`` ([] when unset). A bad file raises
    :class:`~gigafactory.economics.funding.FundingFileError` naming file, window and field: a
    factory does not start with it (its runs' windows would be wrong)."""
    if not settings.funding_windows_file:
        return []
    from gigafactory.economics.funding import load_funding_windows

    return load_funding_windows(settings.funding_windows_file)


@dataclasses.dataclass
class AttemptSpend:
    """One attempt's attribution (resolved at :meth:`SpendWriter.begin`) and its record count."""

    base: SpendRecord
    """The attribution every record of the attempt carries; amounts and ids are set per record."""
    seq: int = 0
    cost_usd: float = 0.0
    """The cost of the attempt's last record (what its next record adds is the difference)."""
    finished: bool = False


def record_subject(rec: SpendRecord) -> str:
    if rec.kind == SpendKind.FIXED:
        return names.fixed_spend_subject(rec.factory)
    return names.spend_subject(rec.job, rec.epoch)


def amounts(usage: Usage | None, provider: str) -> dict:
    """A record's token and cost fields from ``usage`` (the attempt's totals so far)."""
    if usage is None:
        # A local engine (shell) calls no model: its spend is known to be nothing.
        source = CostSource.REPORTED if provider == LOCAL_PROVIDER else CostSource.UNKNOWN
        return {"cost_source": source.value}
    return {"tokens_input": usage.input_tokens or 0, "tokens_output": usage.output_tokens or 0,
            "tokens_cache_read": usage.cache_read_tokens or 0, "tokens_cache_write": usage.cache_write_tokens or 0,
            "cost_usd": usage.cost_usd or 0.0, "cost_source": usage.cost_source or CostSource.UNKNOWN.value}


class SpendWriter:
    """Writes one factory's spend records (see the module doc).

    :param broker: the factory's broker connection.
    :param directory: the factory's folder (the spend outbox goes in ``spend-outbox``).
    :param factory_id: the factory's id.
    :param stations: how many stations it has (fixed costs are shared among them).
    :param settings: its settings (``lane_kind``, ``seat_costs``, ``seat_cost_interval_s``).
    :param windows: the funding windows (already loaded and checked).
    :param seats: engine -> seat limit on this factory (an engine not named has one seat).
    """

    def __init__(self, broker, directory: Path, factory_id: str, stations: int, settings,
                 windows: list[FundingWindow], seats: dict[str, int]) -> None:
        self.broker, self.id, self.stations, self.settings = broker, factory_id, stations, settings
        self.windows = list(windows)
        self.seats = dict(seats)
        self.seat_usd_per_s = parse_seat_costs(settings.seat_costs)
        self.outbox = Outbox(str(directory / "spend-outbox"))
        self.kick = asyncio.Event()
        self.fixed_since = time.time()
        self.stats = {"spend_records": 0, "spend_published": 0, "spend_usage_skipped": 0}
        self.spend_usd: dict[tuple[str, str, str, str, str], float] = {}
        """Dollars written, by (provider, model, window, lane kind, cost source): the
        ``gigafactory_spend_usd_total`` counter (no job in its labels)."""

    # -- attempts --------------------------------------------------------------------------

    def begin(self, run, engine: str, at: float | None = None) -> AttemptSpend:
        """The attempt's attribution, resolved before its engine starts (see the module doc).

        :param run: the run (its record, epoch and station).
        :param engine: the engine that will run.
        :param at: when it starts (default now), for the funding window's period.
        """
        rec, m = run.record, run.record.manifest
        at = time.time() if at is None else at
        lane_kind = m.lane_kind or self.settings.lane_kind
        provider = provider_for(engine, m.model)
        window = choose_window(self.windows, at, m.product, provider, lane_kind)
        base = SpendRecord(
            id="", kind=SpendKind.USAGE.value, at=at, lane=f"{self.id}/{run.station}", lane_kind=lane_kind,
            funding_window=window, job=run.job, epoch=run.epoch, attempt=rec.attempt, factory=self.id,
            station=run.station, product=m.product, repo=m.repo, tracker_item=m.tracker_item,
            profile=rec.profile.name if rec.profile else m.profile, engine=engine, provider=provider,
            model=m.model or "unknown",
        )
        return AttemptSpend(base)

    def usage(self, a: AttemptSpend | None, usage: Usage | None) -> None:
        """Write a record of the attempt's usage so far (one per usage report)."""
        if a is None or usage is None or a.finished:
            return
        if self.outbox.count() >= SPEND_OUTBOX_MAX:
            self.stats["spend_usage_skipped"] += 1  # the attempt's next record carries the totals
            return
        self._write(self._record(a, SpendKind.USAGE, usage), self._added(a, usage))

    async def final(self, a: AttemptSpend | None, usage: Usage | None, outcome: str) -> None:
        """Write the attempt's last record (its totals and outcome); once per attempt. Durable
        when this returns, as :meth:`_write`; the outbox's commit (an fsync) runs on a worker
        thread, so the event loop (every other run of this process) does not wait for the disk."""
        if a is None or a.finished:
            return
        a.finished = True
        rec = msgspec.structs.replace(self._record(a, SpendKind.FINAL, usage), outcome=outcome)
        data = _ENC.encode(rec)
        await asyncio.to_thread(self.outbox.put, "spend", rec.job or "_fixed", rec.epoch, data)
        self._count(rec, self._added(a, usage))

    @staticmethod
    def _added(a: AttemptSpend, usage: Usage | None) -> float:
        """What a record of ``usage`` adds to the attempt's cost (never negative, as readers count it)."""
        cost = (usage.cost_usd or 0.0) if usage is not None else a.cost_usd
        added, a.cost_usd = max(0.0, cost - a.cost_usd), max(cost, a.cost_usd)
        return added

    def _record(self, a: AttemptSpend, kind: SpendKind, usage: Usage | None) -> SpendRecord:
        a.seq += 1
        b = a.base
        model = (usage.model if usage is not None else None) or b.model
        return msgspec.structs.replace(b, id=attempt_record_id(b.job, b.epoch, a.seq), kind=kind.value,
                                       at=time.time(), seq=a.seq, model=model, **amounts(usage, b.provider or ""))

    # -- fixed costs -----------------------------------------------------------------------

    def fixed_records(self, start: float, end: float) -> list[SpendRecord]:
        """The fixed seat costs of ``[start, end)``: per seat engine, its cost shared equally by
        the stations (each lane carries its share).

        :param start: the interval's start (Unix seconds).
        :param end: its end.
        """
        out = []
        interval_s = max(0.0, end - start)
        for engine, usd_per_s in sorted(self.seat_usd_per_s.items()):
            total = fixed_cost_usd(usd_per_s, self.seats.get(engine, 1), interval_s)
            provider = provider_for(engine, None)
            window = choose_window(self.windows, start, FIXED_PRODUCT, provider, self.settings.lane_kind)
            for st in range(self.stations):
                out.append(SpendRecord(
                    id=f"fixed.{self.id}.{engine}.{st}.{int(start * 1000)}", kind=SpendKind.FIXED.value, at=end,
                    lane=f"{self.id}/{st}", lane_kind=self.settings.lane_kind, funding_window=window, factory=self.id,
                    station=st, product=FIXED_PRODUCT, engine=engine, provider=provider, model=None,
                    cost_usd=total / self.stations, cost_source=CostSource.FIXED.value, interval_s=interval_s,
                    note=f"{self.seats.get(engine, 1)} seat(s) of {engine} for {interval_s:.0f}s"))
        return out

    def write_fixed(self, now: float | None = None) -> int:
        """Write the fixed costs since the last call (or the start); returns records written."""
        if not self.seat_usd_per_s:
            return 0
        now = time.time() if now is None else now
        if now - self.fixed_since < FIXED_MIN_INTERVAL_S:
            return 0  # nothing worth a record (a drain right after a periodic write)
        records = self.fixed_records(self.fixed_since, now)
        self.fixed_since = now
        for r in records:
            self._write(r, r.cost_usd)
        return len(records)

    async def fixed_loop(self, stop: asyncio.Event) -> None:
        """Write fixed costs every ``seat_cost_interval_s`` until ``stop``; the last part at stop."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.seat_cost_interval_s)
            except asyncio.TimeoutError:
                pass
            self.write_fixed()

    # -- publishing ------------------------------------------------------------------------

    def _write(self, rec: SpendRecord, added_usd: float) -> None:
        """Put ``rec`` in the spend outbox (durable when this returns) and count what it adds."""
        self.outbox.put("spend", rec.job or "_fixed", rec.epoch, _ENC.encode(rec))
        self._count(rec, added_usd)

    def _count(self, rec: SpendRecord, added_usd: float) -> None:
        """Count ``rec`` (now durable in the outbox) and what it adds; wake the publisher."""
        self.stats["spend_records"] += 1
        key = (rec.provider or "", rec.model or "", rec.funding_window, rec.lane_kind, rec.cost_source)
        self.spend_usd[key] = self.spend_usd.get(key, 0.0) + added_usd
        self.kick.set()

    async def publish_pending(self, deadline: float | None = None) -> bool:
        """Publish what waits in the spend outbox, oldest first, retrying with back-off, until it
        is empty (True) or ``deadline`` (monotonic) passes (False)."""
        delay = RETRY_MIN_S
        while True:
            # A read is no commit (no fsync): it stays on the loop; the removal's commit does not.
            items = self.outbox.pending(PUBLISH_BATCH)
            if not items:
                return True
            done: list[int] = []  # published: removed together, one commit per batch
            try:
                for item in items:
                    rec = _DEC.decode(item.payload)
                    try:
                        await self.broker.js.publish(record_subject(rec), item.payload,
                                                     headers={"Nats-Msg-Id": rec.id},
                                                     timeout=self.settings.request_timeout_s)
                    except Exception as e:  # noqa: BLE001 -- kept in the outbox, tried again
                        log.info("%s: spend record %s not stored yet (%s); retrying", self.id, rec.id, e)
                        pause = random.uniform(delay / 2, delay)
                        if deadline is not None and time.monotonic() + pause > deadline:
                            return False
                        await asyncio.sleep(pause)
                        delay = min(delay * 2, RETRY_MAX_S)
                        break
                    done.append(item.id)
                    self.stats["spend_published"] += 1
                    delay = RETRY_MIN_S
            finally:
                # Also when cancelled: a record published but not yet removed would be published
                # again at the next start, under the same id (stored once within GF_SPEND's
                # duplicate window), so removing promptly is what keeps it from being counted twice.
                if done:
                    # Not fsynced: a removal a power loss undoes publishes the records again,
                    # under the same ids, which GF_SPEND's duplicate window and every reader
                    # (one record per id, per attempt by seq) count once.
                    await asyncio.shield(asyncio.to_thread(self.outbox.mark_done_many, done, durable=False))
            if len(done) == len(items) < PUBLISH_BATCH:
                # All there was is out: a record written meanwhile set ``kick``, and
                # :meth:`publish_loop` comes back for it (no read just to find nothing).
                return True

    async def publish_loop(self) -> None:
        """Publish records as they are written (and those left by an earlier run at start)."""
        while True:
            self.kick.clear()
            await self.publish_pending()
            await self.kick.wait()

    async def close(self, timeout_s: float) -> None:
        """At drain: write the last fixed costs, publish what is left (at most ``timeout_s``)."""
        self.write_fixed()
        if not await self.publish_pending(time.monotonic() + timeout_s):
            log.warning("%s: %d spend records wait in the spend outbox; published at the next start",
                        self.id, self.outbox.count())
        self.outbox.close()
