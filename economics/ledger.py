"""The spend ledger on the broker: writing spend records to ``GF_SPEND`` and reading them back.

The records and their arithmetic are pure (:mod:`gigafactory.schemas.spend`); this module is
the thin I/O around them. A record is published with its ``id`` as ``Nats-Msg-Id`` (the
stream stores it once within its duplicate window), and :func:`read_spend` counts one record
per id whatever the window, so a retried or replayed record never adds a dollar twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import msgspec
import nats.js.errors
from nats.js import api

from gigafactory.broker import Broker
from gigafactory.schemas import names
from gigafactory.schemas.spend import SPEND_AMOUNTS, SpendKind, SpendRecord, with_deltas

log = logging.getLogger(__name__)

READ_MAX_RECORDS = 2_000_000
"""At most this many records are read by one :func:`read_spend` (about 1.2 GB of records: the
default stream cap holds fewer); beyond it the reader stops and logs that it did."""
READ_BATCH = 500
READ_FETCH_TIMEOUT_S = 2.0

_DEC = msgspec.json.Decoder(SpendRecord)
_ENC = msgspec.json.Encoder()


def spend_subject(rec: SpendRecord) -> str:
    """The subject ``rec`` is stored under (per attempt, or per factory for a fixed cost)."""
    if rec.kind == SpendKind.FIXED:
        return names.fixed_spend_subject(rec.factory)
    return names.spend_subject(rec.job, rec.epoch)


async def publish_spend(broker: Broker, rec: SpendRecord) -> None:
    """Store ``rec`` in ``GF_SPEND``, once per ``rec.id`` within the stream's duplicate window.
    Raises what the publish raises (the caller retries, keeping the record and its id).

    :param broker: an open broker.
    :param rec: the record (its ``id`` is its identity).
    """
    await broker.js.publish(spend_subject(rec), _ENC.encode(rec), headers={"Nats-Msg-Id": rec.id},
                            timeout=broker.settings.request_timeout_s)


async def iter_raw_spend(broker: Broker, start_seq: int = 1, max_records: int = READ_MAX_RECORDS,
                         until_seq: int | None = None):
    """Yield ``(stream sequence, record)`` for the records of ``GF_SPEND`` from ``start_seq``
    (the oldest still stored, if that one is gone) up to ``until_seq`` (None: the last stored
    when the read starts), oldest first, duplicates included, at most ``max_records``; nothing
    when the stream does not exist. A message that is not a spend record is logged and skipped
    (its sequence is still yielded, with None).

    :param broker: an open broker.
    :param start_seq: the first stream sequence wanted.
    :param max_records: the bound on messages read.
    :param until_seq: the last stream sequence wanted."""
    try:
        info = await broker.js.stream_info(names.SPEND_STREAM)
    except nats.js.errors.NotFoundError:
        return
    last_seq = info.state.last_seq if until_seq is None else min(until_seq, info.state.last_seq)
    if info.state.messages == 0 or last_seq < start_seq:
        return
    psub = await broker.js.pull_subscribe(
        f"{names.SPEND_PREFIX}.>", stream=names.SPEND_STREAM,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=max(1, start_seq), inactive_threshold=30.0, mem_storage=True),
    )
    n = 0
    try:
        while n < max_records:
            try:
                msgs = await psub.fetch(min(READ_BATCH, max_records - n), timeout=READ_FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq > last_seq:
                    return
                n += 1
                try:
                    yield seq, _DEC.decode(m.data)
                except msgspec.ValidationError as e:
                    log.warning("GF_SPEND seq %s is not a spend record (%s); skipped", seq, e)
                    yield seq, None
            if not msgs or msgs[-1].metadata.sequence.stream >= last_seq or msgs[-1].metadata.num_pending == 0:
                break
        else:
            log.warning("the spend read stopped at %d records (its bound); the rest is read later or not counted",
                        max_records)
    finally:
        try:
            await psub.unsubscribe()
        except Exception:  # noqa: BLE001 -- the consumer is ephemeral and goes on its own
            pass


async def read_raw_spend(broker: Broker, max_records: int = READ_MAX_RECORDS) -> list[SpendRecord]:
    """Every record in ``GF_SPEND`` as stored (oldest first, duplicates included), at most
    ``max_records``; [] when the stream does not exist (a layout older than the ledger).

    :param broker: an open broker.
    :param max_records: the bound on records read.
    """
    return [r async for _seq, r in iter_raw_spend(broker, 1, max_records) if r is not None]


async def read_spend(broker: Broker, since_s: float | None = None,
                     until_s: float | None = None) -> list[SpendRecord]:
    """The spend ledger from ``since_s`` to ``until_s`` (Unix seconds, by each record's ``at``;
    None: unbounded), one record per id, each record's tokens and ``cost_usd`` being what it
    *adds* (:func:`~gigafactory.schemas.spend.with_deltas`): summing ``cost_usd`` over the
    result counts every dollar once.

    :param broker: an open broker (``GF_SPEND`` may not exist yet: then []).
    :param since_s: the earliest ``at`` included.
    :param until_s: the first ``at`` excluded.
    """
    # Deltas need the record before the window too: computed over everything, then filtered.
    records = with_deltas(await read_raw_spend(broker))
    return [r for r in records if (since_s is None or r.at >= since_s) and (until_s is None or r.at < until_s)]


def now_s() -> float:
    """The wall clock used for record times (one place, for tests to see)."""
    return time.time()


# -- the report (pure) ---------------------------------------------------------------------------

BY_KEYS = ("lane", "job", "product", "repo", "provider", "model", "window", "engine", "profile", "lane_kind")
"""What ``report spend --by`` groups on (``window`` is the record's ``funding_window``)."""
REPORT_ROWS_MAX = 1000
"""Groups listed in one report (the largest by cost); the totals cover all."""


def group_key(rec: SpendRecord, by: str) -> str:
    """The value ``rec`` is grouped under for ``by`` (one of :data:`BY_KEYS`)."""
    value = rec.funding_window if by == "window" else getattr(rec, by)
    return str(value) if value not in (None, "") else "-"


def summarize(records: list[SpendRecord], by: str) -> dict:
    """The spend report: per group (largest cost first) records, tokens by kind, cost and
    cost by source; the totals; and attribution coverage with the records that break it.

    :param records: the ledger as :func:`read_spend` returns it (amounts as deltas).
    :param by: one of :data:`BY_KEYS`.
    """
    assert by in BY_KEYS, by
    from gigafactory.schemas.spend import coverage

    groups: dict[str, dict] = {}
    for r in records:
        g = groups.setdefault(group_key(r, by), {"key": group_key(r, by), "records": 0, "tokens_input": 0,
                                                  "tokens_output": 0, "tokens_cache_read": 0,
                                                  "tokens_cache_write": 0, "cost_usd": 0.0, "by_source": {}})
        g["records"] += 1
        for f in ("tokens_input", "tokens_output", "tokens_cache_read", "tokens_cache_write"):
            g[f] += getattr(r, f)
        g["cost_usd"] += r.cost_usd
        g["by_source"][r.cost_source] = g["by_source"].get(r.cost_source, 0.0) + r.cost_usd
    rows = sorted(groups.values(), key=lambda g: (-g["cost_usd"], g["key"]))
    for g in rows:
        g["cost_usd"] = round(g["cost_usd"], 6)
        g["by_source"] = {k: round(v, 6) for k, v in sorted(g["by_source"].items())}
    cov = coverage(records)
    return {"by": by, "records": len(records), "cost_usd": round(sum(r.cost_usd for r in records), 6),
            "groups": rows[:REPORT_ROWS_MAX], "groups_total": len(rows),
            "coverage": {"ratio": cov.ratio, "records": cov.records, "attributed_records": cov.attributed_records,
                         "cost_usd": round(cov.cost_usd, 6), "attributed_cost_usd": round(cov.attributed_cost_usd, 6),
                         "unfunded_cost_usd": round(cov.unfunded_cost_usd, 6), "broken": cov.broken}}


# -- the coordinator's ledger pass (for the metrics) -----------------------------------------------

PASS_MAX_RECORDS = 2_000_000
"""Records one ledger pass reads at most (a pass keeps running totals, not the records, so this
bounds its time, not its memory): the first pass after a start reads the stream from its
oldest record (the default stream cap holds fewer than this); later passes read only what was
stored since. A larger backlog is read over the next passes."""
ATTEMPTS_KEPT_MAX = 200_000
"""Attempts whose last record the running totals keep (to turn totals into deltas and to drop a
replayed record), least recently written first out: some hundred bytes each."""
FIXED_IDS_KEPT_MAX = 200_000
"""Fixed-cost record ids kept to drop a replayed one (a factory writes one per engine and station
every ``seat_cost_interval_s``: months of a fleet's)."""
BROKEN_KEPT_MAX = 20
DAY_S = 86400.0
DAY_COSTS_KEPT = 32
"""UTC days whose spend :class:`LedgerTotals` keeps (the governor asks for today's)."""
FINALS_KEPT = 20
"""Finished attempts kept per profile and engine (the governor projects from the latest 20)."""


class LedgerTotals:
    """Running totals over the spend ledger, fed one stored record at a time (pure, no I/O):
    the figures :func:`~gigafactory.schemas.spend.coverage` and
    :func:`~gigafactory.economics.invoices.reconcile` give over the whole ledger, without
    keeping the records.

    - An attempt's record (its totals so far) adds what it has more than the attempt's last
      record kept (:func:`with_deltas`); one whose ``seq`` is not above that one's is a replay
      (or, never in practice, a record stored out of order) and adds nothing.
    - A fixed record adds itself, once per id.
    - For invoices, non-fixed spend is summed per provider, model, cost source and UTC day:
      invoice periods are whole UTC days (:func:`~gigafactory.economics.invoices.parse_period`),
      so a day's sum falls in exactly the lines its records would, and the matched dollars are
      the same as with the records themselves.

    :param attempts_max: :data:`ATTEMPTS_KEPT_MAX`.
    :param fixed_ids_max: :data:`FIXED_IDS_KEPT_MAX`."""

    def __init__(self, attempts_max: int = ATTEMPTS_KEPT_MAX, fixed_ids_max: int = FIXED_IDS_KEPT_MAX) -> None:
        from collections import OrderedDict

        self.attempts_max, self.fixed_ids_max = attempts_max, fixed_ids_max
        self.last: OrderedDict[tuple[str, int], tuple[int, tuple, float]] = OrderedDict()
        """(job, epoch) -> (seq, amounts, dollars added) of the attempt's last record: its
        ``seq`` (a replay is not above it), its running totals in :data:`SPEND_AMOUNTS` order
        (what the next record's delta is taken from) and the sum of its deltas' dollars (the
        attempt's cost). A tuple, not the record: 100,000 attempts in a few MB."""
        self.fixed_ids: OrderedDict[str, None] = OrderedDict()
        self.records = self.attributed_records = 0
        self.cost_usd = self.attributed_cost_usd = self.unfunded_cost_usd = 0.0
        self.broken: list[dict] = []
        self.days: dict[tuple[str, str, float, str], SpendRecord] = {}
        """(provider, model, day start, cost source) -> one record standing for the day's spend."""
        self.jobs: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """job -> (tokens, dollars) its records added (what ``pipeline_runs`` rows carry), for the
        ``attempts_max`` most recently written jobs."""
        self.day_cost_usd: dict[float, float] = {}
        """UTC day start -> dollars added by that day's records, fixed costs included (the
        governor's spend today), for the last :data:`DAY_COSTS_KEPT` days."""
        self.finals: dict[tuple[str, str], collections.deque] = {}
        """(profile, engine) -> (time, cost) of its latest finished attempts, newest last (at
        most :data:`FINALS_KEPT` each): what the governor's projection looks at."""

    def add(self, r: SpendRecord) -> SpendRecord | None:
        """Take stored record ``r`` in; returns what it adds (None: a replay, nothing).

        :param r: a record as stored (an attempt's totals so far, or a fixed cost)."""
        from gigafactory.schemas.spend import UNFUNDED, missing_attribution

        attempt_cost = 0.0
        if r.kind == SpendKind.FIXED:
            if r.id in self.fixed_ids:
                return None
            self.fixed_ids[r.id] = None
            if len(self.fixed_ids) > self.fixed_ids_max:
                self.fixed_ids.popitem(last=False)
            delta = r
        else:
            key = (r.job, r.epoch)
            prev = self.last.get(key)
            if prev is not None and r.seq <= prev[0]:
                return None
            amounts = tuple(getattr(r, f) for f in SPEND_AMOUNTS)
            delta = r if prev is None else msgspec.structs.replace(
                r, **{f: max(0, a - b) for f, a, b in zip(SPEND_AMOUNTS, amounts, prev[1])})
            attempt_cost = (prev[2] if prev is not None else 0.0) + delta.cost_usd
            self.last[key] = (r.seq, amounts, attempt_cost)
            self.last.move_to_end(key)
            if len(self.last) > self.attempts_max:
                self.last.popitem(last=False)
        self.records += 1
        self.cost_usd += delta.cost_usd
        if delta.funding_window == UNFUNDED:
            self.unfunded_cost_usd += delta.cost_usd
        missing = missing_attribution(delta)
        if missing:
            if len(self.broken) < BROKEN_KEPT_MAX:
                self.broken.append({"id": delta.id, "missing": missing})
        else:
            self.attributed_records += 1
            self.attributed_cost_usd += delta.cost_usd
        day = (delta.at // DAY_S) * DAY_S
        if day not in self.day_cost_usd:
            while len(self.day_cost_usd) >= DAY_COSTS_KEPT:
                del self.day_cost_usd[min(self.day_cost_usd)]
        self.day_cost_usd[day] = self.day_cost_usd.get(day, 0.0) + delta.cost_usd
        if delta.kind != SpendKind.FIXED:
            dkey = (delta.provider or "unknown", delta.model or "", day, delta.cost_source)
            have = self.days.get(dkey)
            if have is None:
                self.days[dkey] = msgspec.structs.replace(
                    delta, id=f"day.{dkey[0]}.{dkey[1]}.{int(day)}.{dkey[3]}", at=day)
            else:
                self.days[dkey] = msgspec.structs.replace(
                    have, **{f: getattr(have, f) + getattr(delta, f) for f in SPEND_AMOUNTS})
            if delta.job:
                t, c = self.jobs.get(delta.job, (0, 0.0))
                self.jobs[delta.job] = (t + delta.tokens_total, c + delta.cost_usd)
                self.jobs.move_to_end(delta.job)
                if len(self.jobs) > self.attempts_max:
                    self.jobs.popitem(last=False)
            if delta.kind == SpendKind.FINAL:
                fkey = (delta.profile or "", delta.engine or "")
                q = self.finals.get(fkey)
                if q is None:
                    q = self.finals[fkey] = collections.deque(maxlen=FINALS_KEPT)
                q.append((delta.at, attempt_cost))
        return delta

    def spent_on_day_usd(self, now_s: float) -> float:
        """Dollars added by the records of ``now_s``'s UTC day (fixed costs included)."""
        return self.day_cost_usd.get((now_s // DAY_S) * DAY_S, 0.0)

    def finished_attempts(self, since_s: float) -> list[tuple[str, str, float]]:
        """(profile, engine, cost) of the finished attempts kept whose last record is from
        ``since_s`` on, newest last within each (profile, engine)."""
        return [(p, e, c) for (p, e), q in self.finals.items() for at, c in q if at >= since_s]

    def coverage(self):
        """The attribution coverage of everything added (:class:`~gigafactory.schemas.spend.Coverage`)."""
        from gigafactory.schemas.spend import Coverage

        return Coverage(records=self.records, attributed_records=self.attributed_records, cost_usd=self.cost_usd,
                        attributed_cost_usd=self.attributed_cost_usd, unfunded_cost_usd=self.unfunded_cost_usd,
                        broken=list(self.broken))

    def day_records(self) -> list[SpendRecord]:
        """One record per provider, model, cost source and UTC day (what :func:`reconcile` needs)."""
        return list(self.days.values())


class LedgerPass:
    """The coordinator's one reader of the spend ledger. Its periodic pass sets the metrics'
    figures (attribution coverage, dollars drawn from ``unfunded``, invoice drift per provider
    and model); :meth:`catch_up` gives the same running totals to the runs recorder (tokens and
    dollars per job) and the budget governor (spend today, recent attempts' costs), which
    once read the whole stream from its start on every flush or refresh: a cost that grew with
    the ledger, per job (:func:`read_spend` is still what the CLI's reports read).

    Every ``spend_metrics_interval_s``. Incremental: it keeps its position in ``GF_SPEND`` (the
    last stream sequence read) and running totals (:class:`LedgerTotals`), so a pass reads only
    what was stored since the last one. The position and totals live in memory: a coordinator
    that starts again reads the stream once from its oldest record (bounded by
    :data:`PASS_MAX_RECORDS` per pass), which gives the same totals. A stream that was
    recreated (its last sequence below the position) is read again from the start. Records the
    retention pass removed after they were read stay counted until the next start.

    :param broker: the coordinator's broker.
    """

    def __init__(self, broker: Broker, max_records: int = PASS_MAX_RECORDS) -> None:
        self.broker = broker
        self.max_records = max_records
        self.totals = LedgerTotals()
        self.position = 0
        """The last ``GF_SPEND`` sequence read (0: none yet)."""
        self.read_last_pass = 0
        """Messages the last pass read (what an incremental pass costs)."""
        self.coverage_ratio: float | None = None
        self.unfunded_usd: float | None = None
        self.drift: dict[tuple[str, str], tuple[float, float | None]] = {}
        """(provider, model) -> (drift in dollars, drift ratio or None)."""
        self.passes = 0
        self.reads = 0
        """Reads of the stream so far (passes and catch-ups)."""
        self.read_records = 0
        """Messages read so far, all reads together: each stored record is read once."""
        self._lock = asyncio.Lock()

    async def run_pass(self) -> None:
        """Read what was stored since the last pass into the totals; set the figures. Passes
        run one at a time (the periodic loop and a caller may ask at once)."""
        async with self._lock:
            n = await self._catch_up()
            await self._figures(n)

    async def catch_up(self) -> LedgerTotals:
        """Read what was stored since the last read into the totals and return them (the
        runs recorder's and the governor's ledger: what they used to read whole, each time,
        from the start of the stream). One read at a time, shared with :meth:`run_pass`."""
        async with self._lock:
            await self._catch_up()
            return self.totals

    async def _catch_up(self) -> int:
        try:
            info = await self.broker.js.stream_info(names.SPEND_STREAM)
            if info.state.last_seq < self.position:
                log.warning("GF_SPEND was recreated (last sequence %d < %d read): reading it again from the start",
                            info.state.last_seq, self.position)
                self.totals, self.position = LedgerTotals(), 0
        except nats.js.errors.NotFoundError:
            pass
        n = 0
        async for seq, r in iter_raw_spend(self.broker, self.position + 1, self.max_records):
            n += 1
            self.position = seq
            if r is not None:
                self.totals.add(r)
        self.reads += 1
        self.read_records += n
        return n

    async def _figures(self, n: int) -> None:
        from .invoices import load_lines, reconcile

        self.read_last_pass = n
        cov = self.totals.coverage()
        lines = await load_lines(self.broker)
        rec = reconcile(lines, self.totals.day_records())
        self.coverage_ratio, self.unfunded_usd = cov.ratio, cov.unfunded_cost_usd
        self.drift = {(d.provider, d.model): (d.drift_usd, d.drift_ratio) for d in rec.drift}
        self.passes += 1
        if cov.broken and n:
            log.warning("spend ledger: %d of %d records break attribution (first: %s)",
                        cov.records - cov.attributed_records, cov.records, cov.broken[0])
