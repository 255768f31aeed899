"""The spend ledger's records (``GF_SPEND``), funding windows and invoice lines: pure types and
the pure arithmetic over them (no I/O; the broker side is in ``economics/``).

Every attempt of every engine writes spend records while it runs (one per usage report) and a
final one when it ends. A record carries the attempt's *totals so far* (tokens by kind and
cost), never a guess of what changed: a reader computes each record's delta from the one
before it of the same attempt (:func:`with_deltas`), so a record lost in the middle (a factory
killed before its queue was published) costs nothing once a later record of the attempt is
stored, and a record stored twice (a retry, an outbox replay: both keep the record's ``id``)
is counted once (:func:`dedupe`). Fixed costs (seats and hosted services that cost money
while idle) are records of their own, ``cost_source`` ``fixed``, each one its own delta.

Attribution is complete by construction: every record names its lane, lane kind, job,
product, profile, engine, provider, model and funding window; a job no window funds draws
from the explicit window :data:`UNFUNDED`, never from nothing. :func:`coverage` measures it
anyway, and lists any record that would break it.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgspec

UNFUNDED = "unfunded"
"""The funding window of a run no configured window funds: reported as such, never empty."""


class LaneKind(enum.StrEnum):
    """What kind of lane did the work: a factory setting (``lane_kind``), overridden per job by
    the manifest's ``lane-kind``."""

    LIVE = "live"
    """Work an operator is waiting for (the default)."""
    BACKGROUND = "background"
    """Work that can wait: backlog, maintenance."""
    HOSTED = "hosted"
    """A hosted agent service (a cloud seat) doing the work."""
    REMOTE = "remote"
    """A factory on someone else's machine."""
    SHADOW = "shadow"
    """A shadow run (the same job on another engine, for comparison): spend, no shipping."""


class CostSource(enum.StrEnum):
    """Where a record's ``cost_usd`` came from."""

    REPORTED = "reported"
    """The engine's own figure."""
    PRICED = "priced"
    """Token counts times the shipped price table."""
    ESTIMATED = "estimated"
    """Priced from rounded counts or a proxy (premium requests)."""
    UNKNOWN = "unknown"
    """No cost known (``cost_usd`` is 0 and says nothing)."""
    FIXED = "fixed"
    """A seat's or hosted service's fixed cost, spread over the time it was available."""


class SpendKind(enum.StrEnum):
    USAGE = "usage"
    """A usage report while the attempt ran."""
    FINAL = "final"
    """The attempt's last record (its outcome known)."""
    FIXED = "fixed"
    """A fixed cost over an interval (not tied to an attempt)."""


class SpendRecord(msgspec.Struct, omit_defaults=False, forbid_unknown_fields=False):
    """One entry of ``GF_SPEND``. For ``usage`` and ``final`` records the token and cost fields
    are the attempt's totals so far; :func:`with_deltas` turns them into what this record adds.
    For ``fixed`` records they are the interval's own amount.

    ``id`` is the record's identity, also its ``Nats-Msg-Id``: ``<job>.<epoch>.<seq>`` for an
    attempt's records, ``fixed.<factory>.<engine>.<start>`` for a fixed cost. A retry or an
    outbox replay sends the same id, and a reader counts one record per id."""

    id: str
    kind: str
    """A :class:`SpendKind` value."""
    at: float
    """When the record was made (the factory's wall clock, Unix seconds)."""
    lane: str
    """``<factory>/<station>`` (``<factory>/*`` for a fixed cost spread over a factory's lanes)."""
    lane_kind: str
    """A :class:`LaneKind` value."""
    funding_window: str
    """The window this run draws from (:data:`UNFUNDED` when none funds it); never empty."""
    job: str = ""
    """Empty only for a fixed cost."""
    epoch: int = 0
    seq: int = 0
    """The record's number within its attempt (1, 2, ...; the final record has the highest)."""
    attempt: int = 0
    factory: str = ""
    station: int | None = None
    product: str = "default"
    repo: str | None = None
    tracker_item: str | None = None
    profile: str | None = None
    engine: str | None = None
    provider: str | None = None
    model: str | None = None
    tokens_input: int = 0
    tokens_output: int = 0
    tokens_cache_read: int = 0
    tokens_cache_write: int = 0
    cost_usd: float = 0.0
    cost_source: str = CostSource.UNKNOWN.value
    """A :class:`CostSource` value."""
    outcome: str | None = None
    """A final record's outcome (``passed`` or a failure class)."""
    interval_s: float | None = None
    """A fixed record's interval (seconds the seat was available)."""
    note: str = ""

    @property
    def tokens_total(self) -> int:
        return self.tokens_input + self.tokens_output + self.tokens_cache_read + self.tokens_cache_write


ATTRIBUTION_FIELDS = ("lane", "lane_kind", "funding_window", "product", "engine", "provider", "model")
"""What every record must name for its dollars to have an owner (a fixed record needs no model)."""
_ATTEMPT_FIELDS = ("job",)


def attempt_record_id(job: str, epoch: int, seq: int) -> str:
    """The identity of an attempt's ``seq``-th spend record (its ``Nats-Msg-Id`` too)."""
    return f"{job}.{epoch}.{seq}"


def missing_attribution(rec: SpendRecord) -> list[str]:
    """The attribution fields ``rec`` leaves empty (nothing: it is fully attributed).

    :param rec: a spend record.
    """
    fields = [f for f in ATTRIBUTION_FIELDS if not getattr(rec, f)]
    if rec.kind == SpendKind.FIXED:
        fields = [f for f in fields if f != "model"]
    else:
        fields += [f for f in _ATTEMPT_FIELDS if not getattr(rec, f)]
    if rec.lane_kind and rec.lane_kind not in LaneKind.__members__.values():
        fields.append("lane_kind")
    if rec.cost_source not in CostSource.__members__.values():
        fields.append("cost_source")
    return fields


def dedupe(records: list[SpendRecord]) -> list[SpendRecord]:
    """``records`` with one record per ``id`` (the first stored), in their order.

    :param records: records as read from the stream (a replay may have stored one twice).
    """
    seen: set[str] = set()
    out = []
    for r in records:
        if r.id not in seen:
            seen.add(r.id)
            out.append(r)
    return out


SPEND_AMOUNTS = ("tokens_input", "tokens_output", "tokens_cache_read", "tokens_cache_write", "cost_usd")
"""The additive fields of a spend record (an attempt's records carry running totals of these)."""


def with_deltas(records: list[SpendRecord]) -> list[SpendRecord]:
    """Deduplicated ``records`` whose token and cost fields say what each record *adds*: an
    attempt's record minus the one before it (by ``seq``) of the same attempt; a fixed record
    as it is. Summing ``cost_usd`` over the result counts every dollar once, however many
    times a record was stored and whichever records in the middle were lost. A total that
    went down (a parser that restarted its count) adds nothing rather than a negative amount.

    :param records: records as read from ``GF_SPEND``, any order.
    """
    uniq = dedupe(records)
    last: dict[tuple[str, int], SpendRecord] = {}
    out: list[SpendRecord] = []
    for r in sorted(uniq, key=lambda r: (r.kind == SpendKind.FIXED, r.job, r.epoch, r.seq, r.at)):
        if r.kind == SpendKind.FIXED:
            out.append(r)
            continue
        prev = last.get((r.job, r.epoch))
        last[(r.job, r.epoch)] = r
        if prev is None:
            out.append(r)
            continue
        out.append(msgspec.structs.replace(r, **{f: max(0, getattr(r, f) - getattr(prev, f)) for f in SPEND_AMOUNTS}))
    order = {r.id: i for i, r in enumerate(uniq)}
    out.sort(key=lambda r: order[r.id])
    return out


class Coverage(msgspec.Struct):
    """Attribution coverage: dollars (and records) with a complete attribution over all."""

    records: int
    attributed_records: int
    cost_usd: float
    attributed_cost_usd: float
    unfunded_cost_usd: float
    """Dollars drawn from :data:`UNFUNDED` (attributed, but no window funds them)."""
    broken: list[dict[str, Any]]
    """Records that break attribution (their id and missing fields), at most 100."""

    @property
    def ratio(self) -> float:
        """Attributed records over all records (1.0 with none)."""
        return 1.0 if self.records == 0 else self.attributed_records / self.records


BROKEN_LISTED_MAX = 100


def coverage(records: list[SpendRecord]) -> Coverage:
    """How much of the spend has an owner.

    :param records: records as :func:`with_deltas` returns them.
    """
    broken: list[dict[str, Any]] = []
    ok = 0
    total = attributed_usd = unfunded = 0.0
    for r in records:
        total += r.cost_usd
        if r.funding_window == UNFUNDED:
            unfunded += r.cost_usd
        missing = missing_attribution(r)
        if missing:
            if len(broken) < BROKEN_LISTED_MAX:
                broken.append({"id": r.id, "missing": missing})
            continue
        ok += 1
        attributed_usd += r.cost_usd
    return Coverage(records=len(records), attributed_records=ok, cost_usd=total, attributed_cost_usd=attributed_usd,
                    unfunded_cost_usd=unfunded, broken=broken)


# -- fixed costs: seats and hosted services --------------------------------------------------

SEAT_COSTS_MAX_CHARS = 2000
SEAT_PERIOD_S = {"month": 30 * 86400.0, "hour": 3600.0}
"""A seat cost's period in seconds (a month is 30 days)."""
_SEAT_ENTRY = re.compile(r"([a-z][a-z0-9_-]{0,63})=([0-9]+(?:\.[0-9]+)?)/([a-z]+)")


class SeatCostError(ValueError):
    """A ``seat_costs`` value that cannot be read; the message names the entry and the fix."""


def parse_seat_costs(text: str) -> dict[str, float]:
    """``engine=amount/period,...`` (``claude=200/month,codex=0.5/hour``) as engine -> US
    dollars per second of one seat.

    :param text: the ``seat_costs`` setting.
    :raises SeatCostError: an entry that is not ``engine=amount/period``, an unknown period,
        an engine named twice, or a text over :data:`SEAT_COSTS_MAX_CHARS`.
    """
    if len(text) > SEAT_COSTS_MAX_CHARS:
        raise SeatCostError(f"{len(text)} characters; at most {SEAT_COSTS_MAX_CHARS} are allowed")
    out: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        m = _SEAT_ENTRY.fullmatch(entry)
        if m is None:
            raise SeatCostError(f"{entry!r} is not engine=amount/period (e.g. claude=200/month or codex=0.5/hour)")
        engine, amount, period = m.group(1), float(m.group(2)), m.group(3)
        if period not in SEAT_PERIOD_S:
            raise SeatCostError(f"{entry!r}: period {period!r} is not one of {', '.join(SEAT_PERIOD_S)}")
        if engine in out:
            raise SeatCostError(f"{entry!r}: engine {engine!r} is given twice; give each engine once")
        out[engine] = amount / SEAT_PERIOD_S[period]
    return out


def fixed_cost_usd(usd_per_s: float, seats: int, interval_s: float) -> float:
    """What ``seats`` seats at ``usd_per_s`` each cost over ``interval_s`` seconds of being
    available (idle or not: a seat is paid for either way).

    :param usd_per_s: one seat's cost per second (:func:`parse_seat_costs`).
    :param seats: how many seats of the engine the factory offers (at least 1 counted).
    :param interval_s: seconds the seats were available.
    """
    assert usd_per_s >= 0 and interval_s >= 0
    return usd_per_s * max(1, seats) * interval_s


# -- funding windows -------------------------------------------------------------------------


class FundingWindow(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, frozen=True):
    """A named budget: ``amount_usd`` to spend from ``start`` (included) to ``end`` (excluded),
    on the runs it funds. An empty list funds every value (``products: []``: any product).
    Windows may overlap; :func:`choose_window` picks exactly one per run."""

    name: str
    start: float
    """Unix seconds (the file says an ISO date or date-time; a date is midnight UTC)."""
    end: float
    amount_usd: float
    products: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    lane_kinds: tuple[str, ...] = ()

    @property
    def specificity(self) -> int:
        """How many of products, providers and lane kinds it narrows (0 to 3)."""
        return sum(1 for v in (self.products, self.providers, self.lane_kinds) if v)

    def funds(self, at: float, product: str, provider: str, lane_kind: str) -> bool:
        """Whether a run at ``at`` of ``product`` on ``provider`` in a ``lane_kind`` lane may
        draw from this window."""
        return (self.start <= at < self.end and (not self.products or product in self.products)
                and (not self.providers or provider in self.providers)
                and (not self.lane_kinds or lane_kind in self.lane_kinds))


def choose_window(windows: list[FundingWindow] | tuple[FundingWindow, ...], at: float, product: str,
                  provider: str, lane_kind: str) -> str:
    """The one funding window a run draws from, by this ordered rule:

    1. only windows whose period holds ``at`` and that fund the run's product, provider and
       lane kind (an empty list funds any);
    2. the most specific first (narrowing more of products, providers, lane kinds);
    3. then the one that ends first (spend the money that expires soonest);
    4. then by name (so the choice never depends on file order).

    No window funds it: :data:`UNFUNDED` (reported, never nothing).

    :param windows: the configured windows.
    :param at: when the run starts (Unix seconds).
    :param product: the job's product.
    :param provider: the provider the run's engine calls.
    :param lane_kind: the lane kind it runs in.
    """
    fit = [w for w in windows if w.funds(at, product, provider, lane_kind)]
    if not fit:
        return UNFUNDED
    return min(fit, key=lambda w: (-w.specificity, w.end, w.name)).name


PROVIDER_BY_ENGINE = {"claude": "anthropic", "codex": "openai", "gemini": "google", "copilot": "github",
                      "shell": "local", "noop": "local"}
"""The provider an engine's model calls go to, when the engine has only one."""
PROVIDER_BY_MODEL_PREFIX = (("claude", "anthropic"), ("anthropic/", "anthropic"), ("gpt", "openai"),
                            ("openai/", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"),
                            ("gemini", "google"), ("models/gemini", "google"), ("google/", "google"))


def provider_for(engine: str | None, model: str | None) -> str:
    """The provider a run's spend belongs to: by its engine when that has one provider, else by
    its model's name (``aider`` with ``claude-...`` is ``anthropic``), else the engine's own
    name (a declared CLI: its provider is whatever it calls), ``unknown`` with neither.

    :param engine: the engine that ran.
    :param model: the model it used (reported, else the manifest's).
    """
    if engine in PROVIDER_BY_ENGINE:
        return PROVIDER_BY_ENGINE[engine]
    low = (model or "").lower()
    for prefix, provider in PROVIDER_BY_MODEL_PREFIX:
        if low.startswith(prefix):
            return provider
    return engine or "unknown"


# -- invoices --------------------------------------------------------------------------------


class InvoiceLine(msgspec.Struct, omit_defaults=False, frozen=True):
    """One line of a provider's invoice, as imported (``gf_invoices``, key :attr:`id`)."""

    id: str
    """A hash of the line's identity (provider, period, model, tokens, amount, and which of
    several identical lines of one file it is): importing the same file again adds nothing."""
    provider: str
    period: str
    """As the invoice says it: ``2026-11`` (a month) or ``2026-11-01/2026-11-15`` (end excluded)."""
    start: float
    end: float
    model: str
    tokens: int | None
    amount_usd: float
    source: str = ""
    """``<file>:<line>`` it was imported from."""
    imported_at: float = 0.0


def normal_model(model: str | None) -> str:
    """A model name as invoices and the ledger are matched on: lower case, without a provider
    prefix (``anthropic/claude-sonnet-4`` -> ``claude-sonnet-4``).

    :param model: a model name (None: ``unknown``).
    """
    m = (model or "unknown").strip().lower()
    return m.rsplit("/", 1)[-1] or "unknown"
