"""The spend ledger on the broker: writing spend records to ``GF_SPEND`` and reading them back.

The records and their arithmetic are pure (:mod:`gigafactory.schemas.spend`); this module is
the thin I/O around them. A record is published with its ``id`` as ``Nats-Msg-Id`` (the
stream stores it once within its duplicate window), and :func:`read_spend` counts one record
per id whatever the window, so a retried or replayed record never adds a dollar twice.
"""

from __future__ import annotations

import logging
import time

import msgspec
import nats.js.errors
from nats.js import api

from gigafactory.broker import Broker
from gigafactory.schemas import names
from gigafactory.schemas.spend import SpendKind, SpendRecord, with_deltas

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


async def read_raw_spend(broker: Broker, max_records: int = READ_MAX_RECORDS) -> list[SpendRecord]:
    """Every record in ``GF_SPEND`` as stored (oldest first, duplicates included), at most
    ``max_records``; [] when the stream does not exist (a layout older than the ledger).

    :param broker: an open broker.
    :param max_records: the bound on records read.
    """
    try:
        info = await broker.js.stream_info(names.SPEND_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    last_seq = info.state.last_seq
    if info.state.messages == 0:
        return []
    out: list[SpendRecord] = []
    psub = await broker.js.pull_subscribe(
        f"{names.SPEND_PREFIX}.>", stream=names.SPEND_STREAM,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                  inactive_threshold=30.0, mem_storage=True),
    )
    try:
        while len(out) < max_records:
            try:
                msgs = await psub.fetch(min(READ_BATCH, max_records - len(out)), timeout=READ_FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                try:
                    out.append(_DEC.decode(m.data))
                except msgspec.ValidationError as e:
                    log.warning("GF_SPEND seq %s is not a spend record (%s); skipped", m.metadata.sequence.stream, e)
            if not msgs or msgs[-1].metadata.sequence.stream >= last_seq or msgs[-1].metadata.num_pending == 0:
                break
        else:
            log.warning("read_spend stopped at %d records (READ_MAX_RECORDS); older spend is not counted",
                        max_records)
    finally:
        try:
            await psub.unsubscribe()
        except Exception:  # noqa: BLE001 -- the consumer is ephemeral and goes on its own
            pass
    return out


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

PASS_MAX_RECORDS = 200_000
"""Records one ledger pass reads at most (its memory: some hundred bytes each); a larger ledger
is reported from its oldest part only, and the pass logs that it stopped."""


class LedgerPass:
    """What the coordinator's periodic ledger pass found last, for the metrics: attribution
    coverage, dollars drawn from ``unfunded``, and invoice drift per provider and model.
    Every ``spend_metrics_interval_s``; reads the whole ledger (bounded by
    :data:`PASS_MAX_RECORDS`) and the invoice lines.

    :param broker: the coordinator's broker.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.coverage_ratio: float | None = None
        self.unfunded_usd: float | None = None
        self.drift: dict[tuple[str, str], tuple[float, float | None]] = {}
        """(provider, model) -> (drift in dollars, drift ratio or None)."""
        self.passes = 0

    async def run_pass(self) -> None:
        from gigafactory.schemas.spend import coverage

        from .invoices import load_lines, reconcile

        records = with_deltas(await read_raw_spend(self.broker, PASS_MAX_RECORDS))
        cov = coverage(records)
        lines = await load_lines(self.broker)
        rec = reconcile(lines, records)
        self.coverage_ratio, self.unfunded_usd = cov.ratio, cov.unfunded_cost_usd
        self.drift = {(d.provider, d.model): (d.drift_usd, d.drift_ratio) for d in rec.drift}
        self.passes += 1
        if cov.broken:
            log.warning("spend ledger: %d of %d records break attribution (first: %s)",
                        cov.records - cov.attributed_records, cov.records, cov.broken[0])
