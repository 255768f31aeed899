"""Provider invoices: import them (CSV or JSON), store them once, and reconcile them against the
spend ledger.

An invoice file has one line per period and model: ``period``, ``model``, ``tokens``,
``amount`` (US dollars), and ``provider`` unless ``--provider`` names it. CSV has a header row;
JSON is a list of objects (or ``{"lines": [...]}``). A period is a month (``2026-11``), a day
(``2026-11-03``) or a range ``2026-11-01/2026-11-16`` (end excluded), in UTC.

Reconciliation (:func:`reconcile`, pure): each invoice line takes the ledger's records of the
same provider and model whose time falls in its period, and no ledger record is taken twice:
lines are matched in a fixed order (earliest start, then shortest period, then id), so of two
overlapping lines (a monthly line and a weekly one, or a file imported under two names) the
first takes the record and the other does not see it. Drift per provider and model is the
ledger's cost (reported, priced or estimated by the factories) minus what the invoice billed.
Lines with no ledger spend, and ledger spend of an invoiced provider that no line covers, are
listed. Fixed costs (seats) are not reconciled against usage lines.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import time
from collections import defaultdict
from typing import Any

import msgspec
import nats.js.errors
from nats.js import api

from gigafactory.broker import Broker, Bucket, Conflict
from gigafactory.schemas import names
from gigafactory.schemas.spend import InvoiceLine, SpendKind, SpendRecord, normal_model

FILE_MAX_BYTES = 8 * 1024 * 1024
"""An invoice file larger than this is refused."""
LINES_MAX = 50_000
FIELD_MAX_CHARS = 200
LISTED_MAX = 100
"""Unmatched items listed per side in a report (the counts and dollars cover all)."""


class InvoiceError(ValueError):
    """An invoice file that cannot be imported; the message names the file, line and field."""


# -- parsing ---------------------------------------------------------------------------------


def parse_period(text: str) -> tuple[float, float]:
    """``2026-11`` (a month), ``2026-11-03`` (a day) or ``START/END`` (ISO dates, end
    excluded) as (start, end) Unix seconds, UTC.

    :param text: the invoice's period.
    :raises ValueError: a period in none of these forms, or one that ends before it starts.
    """
    text = text.strip()
    if "/" in text:
        a, b = text.split("/", 1)
        start, end = _day(a), _day(b)
    elif len(text) == 7:
        y, m = (int(x) for x in text.split("-"))
        start = datetime.datetime(y, m, 1, tzinfo=datetime.timezone.utc)
        end = datetime.datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=datetime.timezone.utc)
    else:
        start = _day(text)
        end = start + datetime.timedelta(days=1)
    if not end > start:
        raise ValueError(f"period {text!r} ends before it starts")
    return start.timestamp(), end.timestamp()


def _day(text: str) -> datetime.datetime:
    d = datetime.date.fromisoformat(text.strip())
    return datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.timezone.utc)


def parse_invoice(data: bytes, where: str, provider: str | None = None, *, now: float | None = None) -> list[InvoiceLine]:
    """The lines of an invoice file (JSON when ``where`` ends in ``.json`` or the text starts
    with ``[`` or ``{``; else CSV with a header).

    :param data: the file's bytes.
    :param where: its name, for errors and each line's ``source``.
    :param provider: the provider of every line (else each line's ``provider`` field).
    :param now: the import time recorded on each line (default now).
    :raises InvoiceError: naming ``where``, the line and the field, and what to write.
    """
    if len(data) > FILE_MAX_BYTES:
        raise InvoiceError(f"{where}: {len(data)} bytes; an invoice file may have at most {FILE_MAX_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvoiceError(f"{where}: not UTF-8 text (byte {e.start})") from e
    rows = _json_rows(text, where) if where.endswith(".json") or text.lstrip()[:1] in ("[", "{") \
        else _csv_rows(text, where)
    if len(rows) > LINES_MAX:
        raise InvoiceError(f"{where}: {len(rows)} lines; at most {LINES_MAX} per file")
    now = time.time() if now is None else now
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    for lineno, row in rows:
        line = _line(row, f"{where}:{lineno}", provider, now)
        ident = (line.provider, line.period, line.model, line.tokens, line.amount_usd)
        seen[ident] += 1  # two identical lines of one file are two lines, the same on re-import
        digest = hashlib.sha256(json.dumps([*ident, seen[ident]]).encode()).hexdigest()[:32]
        out.append(msgspec.structs.replace(line, id=digest))
    return out


def _json_rows(text: str, where: str) -> list[tuple[int, Any]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvoiceError(f"{where}:{e.lineno}: not JSON: {e.msg}") from e
    if isinstance(doc, dict):
        doc = doc.get("lines")
    if not isinstance(doc, list):
        raise InvoiceError(f"{where}: expected a JSON list of lines, or an object with a 'lines' list")
    return [(i, row) for i, row in enumerate(doc, 1)]  # JSON: the line's index in the list


def _csv_rows(text: str, where: str) -> list[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise InvoiceError(f"{where}: empty; expected a header row: period,model,tokens,amount[,provider]")
    missing = [f for f in ("period", "model", "amount") if f not in [n.strip().lower() for n in reader.fieldnames]]
    if missing:
        raise InvoiceError(f"{where}:1: header has no {', '.join(missing)} column; expected "
                           "period,model,tokens,amount[,provider]")
    out = []
    try:
        for row in reader:
            out.append((reader.line_num, {(k or "").strip().lower(): v for k, v in row.items()}))
            if len(out) > LINES_MAX:
                break
    except csv.Error as e:
        raise InvoiceError(f"{where}:{reader.line_num}: not CSV: {e}") from e
    return out


def _line(row: Any, where: str, provider: str | None, now: float) -> InvoiceLine:
    if not isinstance(row, dict):
        raise InvoiceError(f"{where}: expected an object with period, model, tokens, amount")
    prov = provider or _text(row, "provider", where, "give --provider or a provider column")
    period = _text(row, "period", where, "2026-11, 2026-11-03 or 2026-11-01/2026-11-16")
    try:
        start, end = parse_period(period)
    except ValueError as e:
        raise InvoiceError(f"{where}: field 'period': {e}; write 2026-11, 2026-11-03 or 2026-11-01/2026-11-16") \
            from None
    model = _text(row, "model", where, "the model billed, e.g. claude-sonnet-4-5")
    tokens = row.get("tokens")
    if tokens in (None, ""):
        tokens = None
    else:
        try:
            tokens = int(str(tokens).replace(",", "").replace("_", ""))
            assert tokens >= 0
        except (ValueError, AssertionError):
            raise InvoiceError(f"{where}: field 'tokens': {row.get('tokens')!r} is not a whole number, 0 or more") \
                from None
    try:
        amount = float(str(row.get("amount", "")).replace("$", "").replace(",", ""))
        assert amount == amount and abs(amount) < 1e12
    except (ValueError, AssertionError):
        raise InvoiceError(f"{where}: field 'amount': {row.get('amount')!r} is not an amount in US dollars") from None
    return InvoiceLine(id="", provider=prov.strip().lower(), period=period, start=start, end=end,
                       model=normal_model(model), tokens=tokens, amount_usd=amount, source=where, imported_at=now)


def _text(row: dict, field: str, where: str, hint: str) -> str:
    v = row.get(field)
    if v is None or not str(v).strip():
        raise InvoiceError(f"{where}: field {field!r} is missing: {hint}")
    if len(str(v)) > FIELD_MAX_CHARS:
        raise InvoiceError(f"{where}: field {field!r}: longer than {FIELD_MAX_CHARS} characters")
    return str(v).strip()


# -- reconciliation (pure) -------------------------------------------------------------------


class Drift(msgspec.Struct):
    """What the ledger says against what was billed, for one provider and model."""

    provider: str
    model: str
    billed_usd: float
    ledger_usd: float
    """The ledger's dollars matched to the lines (each counted once)."""
    drift_usd: float
    """``ledger_usd - billed_usd``: negative when the factories' figures undercount."""
    drift_ratio: float | None
    """``drift_usd / billed_usd`` (None when nothing was billed)."""
    billed_tokens: int | None
    ledger_tokens: int
    lines: int
    records: int
    cost_sources: dict[str, float]
    """Matched ledger dollars by ``cost_source`` (reported, priced, estimated, unknown)."""


class Reconciliation(msgspec.Struct):
    drift: list[Drift]
    unmatched_lines: list[dict[str, Any]]
    """Invoice lines no ledger record fell in (at most :data:`LISTED_MAX`)."""
    unmatched_lines_count: int
    unmatched_lines_usd: float
    unmatched_ledger: list[dict[str, Any]]
    """Ledger spend of an invoiced provider that no line covers, by provider and model."""
    unmatched_ledger_usd: float
    matched_records: int
    matched_usd: float


def _order(line: InvoiceLine) -> tuple:
    return (line.start, line.end - line.start, line.id)


def reconcile(lines: list[InvoiceLine], records: list[SpendRecord]) -> Reconciliation:
    """Match invoice lines with ledger records (see the module doc): no record counted twice.

    :param lines: the stored invoice lines.
    :param records: the ledger as :func:`~gigafactory.economics.ledger.read_spend` returns it
        (one record per id, amounts as deltas).
    """
    pool: dict[tuple[str, str], list[SpendRecord]] = defaultdict(list)
    for r in records:
        if r.kind != SpendKind.FIXED:
            pool[(r.provider or "unknown", normal_model(r.model))].append(r)
    taken: set[str] = set()
    per: dict[tuple[str, str], dict[str, Any]] = {}
    unmatched: list[InvoiceLine] = []
    for line in sorted(lines, key=_order):
        key = (line.provider, line.model)
        got = [r for r in pool.get(key, ()) if r.id not in taken and line.start <= r.at < line.end]
        taken.update(r.id for r in got)
        acc = per.setdefault(key, {"billed": 0.0, "ledger": 0.0, "btok": 0, "ltok": 0, "lines": 0, "records": 0,
                                   "sources": defaultdict(float), "tokens_known": True})
        acc["billed"] += line.amount_usd
        acc["lines"] += 1
        acc["tokens_known"] &= line.tokens is not None
        acc["btok"] += line.tokens or 0
        for r in got:
            acc["ledger"] += r.cost_usd
            acc["ltok"] += r.tokens_total
            acc["records"] += 1
            acc["sources"][r.cost_source] += r.cost_usd
        if not got:
            unmatched.append(line)
    return _result(per, unmatched, pool, taken, {line.provider for line in lines})


def _result(per, unmatched, pool, taken, invoiced) -> Reconciliation:
    drift = [Drift(provider=p, model=m, billed_usd=round(a["billed"], 6), ledger_usd=round(a["ledger"], 6),
                   drift_usd=round(a["ledger"] - a["billed"], 6),
                   drift_ratio=round((a["ledger"] - a["billed"]) / a["billed"], 6) if a["billed"] else None,
                   billed_tokens=a["btok"] if a["tokens_known"] else None, ledger_tokens=a["ltok"],
                   lines=a["lines"], records=a["records"], cost_sources={k: round(v, 6) for k, v in a["sources"].items()})
             for (p, m), a in sorted(per.items())]
    left: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    matched_usd = 0.0
    for key, recs in pool.items():
        for r in recs:
            if r.id in taken:
                matched_usd += r.cost_usd
            elif key[0] in invoiced:
                left[key][0] += 1
                left[key][1] += r.cost_usd
    return Reconciliation(
        drift=drift,
        unmatched_lines=[{"id": x.id, "provider": x.provider, "model": x.model, "period": x.period,
                          "amount_usd": x.amount_usd, "source": x.source} for x in unmatched[:LISTED_MAX]],
        unmatched_lines_count=len(unmatched), unmatched_lines_usd=round(sum(x.amount_usd for x in unmatched), 6),
        unmatched_ledger=[{"provider": p, "model": m, "records": n, "cost_usd": round(usd, 6)}
                          for (p, m), (n, usd) in sorted(left.items())][:LISTED_MAX],
        unmatched_ledger_usd=round(sum(usd for _, usd in left.values()), 6),
        matched_records=len(taken), matched_usd=round(matched_usd, 6))


# -- the store (gf_invoices) -----------------------------------------------------------------


async def store_lines(broker: Broker, lines: list[InvoiceLine]) -> tuple[int, int]:
    """Store ``lines`` in ``gf_invoices`` (created when missing), each under its id, only if
    absent: returns (added, already there). Re-importing a file adds nothing.

    :param broker: an open broker.
    :param lines: parsed lines.
    """
    bucket = await invoices_bucket(broker, create=True)
    assert bucket is not None
    added = kept = 0
    for line in lines:
        try:
            await bucket.create(f"{line.provider}.{line.id}", msgspec.json.encode(line))
            added += 1
        except Conflict:
            kept += 1
    return added, kept


async def load_lines(broker: Broker) -> list[InvoiceLine]:
    """Every stored invoice line ([] when none was ever imported).

    :param broker: an open broker.
    """
    bucket = await invoices_bucket(broker, create=False)
    if bucket is None:
        return []
    return [msgspec.json.decode(e.value, type=InvoiceLine) async for e in bucket.scan(">") if e.value]


async def invoices_bucket(broker: Broker, *, create: bool) -> Bucket | None:
    """``gf_invoices`` (history 1, file storage, the layout's replicas); None when it does not
    exist and ``create`` is false.

    :param broker: an open broker.
    :param create: create it when missing.
    """
    try:
        kv = await broker.js.key_value(names.INVOICES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
        kv = await broker.js.create_key_value(api.KeyValueConfig(
            bucket=names.INVOICES_BUCKET, history=1, storage=api.StorageType.FILE,
            replicas=broker.settings.replicas, description="imported provider invoice lines"))
    return Bucket(broker.js, kv, names.INVOICES_BUCKET, broker.settings.request_timeout_s)
