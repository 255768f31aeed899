"""Pricing a run's token usage with the price table shipped with the project (``prices.json``).

An agent CLI that reports its own cost (Claude Code) gives ``cost_source: reported``; for the
others the engine parses token counts and :func:`price` multiplies them by the table's list
prices (``cost_source: priced``, ``price_table: <the table's version>``). A model the table does
not know, or a run whose input or output count is unknown, stays ``cost_source: unknown`` with
``cost_usd`` None: never a fabricated zero.

Token convention (what :class:`~gigafactory.schemas.records.Usage` holds, whatever the CLI
calls it): ``input_tokens`` are uncached input tokens, ``cache_read_tokens`` and
``cache_write_tokens`` the input read from / written to a prompt cache (so the whole input is
their sum), and ``output_tokens`` include reasoning tokens. A model with no ``cache_write`` price
is billed ordinary input for cache writes (its provider charges no write premium).

Pure apart from reading the table file once (:func:`load_table`). It lives in ``schemas/``
(not with the engines that price with it) because the configuration checks an operator's
``GIGAFACTORY_PRICE_TABLE`` with it, and the configuration must not import the factory.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import msgspec

from gigafactory.schemas.records import Usage

MAX_TABLE_BYTES = 1024 * 1024
"""A price table larger than this is refused (it holds a few dozen models)."""
_TOKENS_PER_PRICE_UNIT = 1_000_000
_KINDS = ("input", "cache_read", "cache_write", "output")
# A trailing release date on a model id: -20250929 (Anthropic) or -2025-04-14 (OpenAI).
_DATE_SUFFIX_RE = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$")


class PriceTableError(ValueError):
    """The price table cannot be used; the message names the file, the field and the fix."""


MAX_NOTE_CHARS = 500
"""A model's ``source``, ``as_of`` or ``note`` longer than this is refused."""
_META = ("source", "as_of", "note")


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of each kind for one model (``cache_write`` None: billed as input),
    and where the figures come from (``source``, ``as_of``: the date they were taken)."""

    input: float
    cache_read: float
    output: float
    cache_write: float | None = None
    source: str | None = None
    as_of: str | None = None


@dataclass(frozen=True)
class RequestPrice:
    """USD per request of a CLI that bills per request, not per token (GitHub Copilot's premium
    requests), and where the figure comes from."""

    usd: float
    source: str | None = None
    as_of: str | None = None


@dataclass(frozen=True)
class PriceTable:
    """A loaded price table: its version, prices by model name, and aliases to those names."""

    version: str
    models: dict[str, ModelPrice]
    aliases: dict[str, str]
    requests: dict[str, RequestPrice] | None = None
    """Per-request prices by name (``copilot-premium-request``); None or empty: none known."""

    def lookup(self, model: str | None) -> ModelPrice | None:
        """The prices of ``model``, or None when the table does not know it.

        :param model: a model id as a CLI reports it; lower-cased, stripped of a provider prefix
            (``openai/``, ``models/``) and of a trailing release date before it is looked up.
            No looser matching: ``gpt-5-mini`` must never be priced as ``gpt-5``.
        """
        if not model:
            return None
        name = model.strip().lower().rsplit("/", 1)[-1]
        for candidate in (name, _DATE_SUFFIX_RE.sub("", name)):
            candidate = self.aliases.get(candidate, candidate)
            if candidate in self.models:
                return self.models[candidate]
        return None


def parse_table(raw: bytes, source: str) -> PriceTable:
    """Parse and check a price table.

    :param raw: the file's bytes (JSON).
    :param source: the file's name, for errors.
    :raises PriceTableError: naming the file and field, when it is too large, not JSON, or a
        price is missing, not a number or negative.
    """
    if len(raw) > MAX_TABLE_BYTES:
        raise PriceTableError(f"{source}: {len(raw)} bytes is over the {MAX_TABLE_BYTES}-byte limit of a price table")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PriceTableError(f"{source}: not valid JSON ({e}); fix the file or reinstall gigafactory") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str) or not doc["version"]:
        raise PriceTableError(f"{source}: field 'version' must be a non-empty string (the table's version)")
    models_raw = doc.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise PriceTableError(f"{source}: field 'models' must map model names to their prices")
    models: dict[str, ModelPrice] = {}
    for name, prices in models_raw.items():
        if not isinstance(prices, dict):
            raise PriceTableError(f"{source}: models.{name} must be an object of prices per million tokens")
        unknown = set(prices) - set(_KINDS) - set(_META)
        if unknown:
            raise PriceTableError(f"{source}: models.{name} has unknown field(s) {sorted(unknown)}; "
                                  f"known: {', '.join(_KINDS + _META)}")
        _check_meta(prices, f"models.{name}", source)
        for kind in ("input", "cache_read", "output", "cache_write"):
            if kind not in prices and kind != "cache_write":
                raise PriceTableError(f"{source}: models.{name}.{kind} is missing (USD per million tokens)")
            v = prices.get(kind)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise PriceTableError(f"{source}: models.{name}.{kind} must be a number >= 0, got {v!r}")
        models[name.lower()] = ModelPrice(input=float(prices["input"]), cache_read=float(prices["cache_read"]),
                                          output=float(prices["output"]),
                                          cache_write=None if prices.get("cache_write") is None else float(prices["cache_write"]),
                                          source=prices.get("source"), as_of=prices.get("as_of"))
    aliases_raw = doc.get("aliases", {})
    if not isinstance(aliases_raw, dict):
        raise PriceTableError(f"{source}: field 'aliases' must map model names to names in 'models'")
    aliases: dict[str, str] = {}
    for alias, target in aliases_raw.items():
        if not isinstance(target, str) or target.lower() not in models:
            raise PriceTableError(f"{source}: aliases.{alias} names {target!r}, which is not in 'models'")
        aliases[alias.lower()] = target.lower()
    requests_raw = doc.get("requests", {})
    if not isinstance(requests_raw, dict):
        raise PriceTableError(f"{source}: field 'requests' must map request kinds (copilot-premium-request) "
                              "to {usd, source, as_of}")
    requests: dict[str, RequestPrice] = {}
    for name, entry in requests_raw.items():
        where = f"requests.{name}"
        if not isinstance(entry, dict):
            raise PriceTableError(f"{source}: {where} must be an object {{usd, source, as_of}}")
        unknown = set(entry) - {"usd", *_META}
        if unknown:
            raise PriceTableError(f"{source}: {where} has unknown field(s) {sorted(unknown)}; known: usd, "
                                  f"{', '.join(_META)}")
        v = entry.get("usd")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise PriceTableError(f"{source}: {where}.usd must be a number >= 0 (USD per request), got {v!r}")
        _check_meta(entry, where, source)
        requests[name.lower()] = RequestPrice(usd=float(v), source=entry.get("source"), as_of=entry.get("as_of"))
    return PriceTable(version=doc["version"], models=models, aliases=aliases, requests=requests)


def _check_meta(entry: dict, where: str, source: str) -> None:
    """Refuse a ``source``/``as_of``/``note`` that is not a string of at most :data:`MAX_NOTE_CHARS`."""
    for key in _META:
        v = entry.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > MAX_NOTE_CHARS):
            raise PriceTableError(f"{source}: {where}.{key} must be a string of at most {MAX_NOTE_CHARS} "
                                  f"characters, got {str(v)[:60]!r}")


def load_table(path: str | Path | None = None) -> PriceTable:
    """Read a price table: the one shipped with gigafactory, or ``path``.

    :param path: a price table file of the same format; None for the shipped ``prices.json``.
    """
    if path is None:
        return _shipped_table()
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise PriceTableError(f"{p}: the price table cannot be read ({e.strerror}): give the path of a JSON "
                              "file in the format of the shipped prices.json, or unset price_table") from None
    return _read_table(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_table(path: str, mtime_ns: int, size: int) -> PriceTable:
    # Cached per file version (path, mtime, size): every run prices with it, an edited file is read again.
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TABLE_BYTES + 1)
    except OSError as e:
        raise PriceTableError(f"{path}: the price table cannot be read ({e.strerror})") from None
    return parse_table(raw, path)


def price_per_request(usage: Usage, kind: str, count: float | None, table: PriceTable | None = None) -> Usage:
    """``usage`` priced per request when it has no token counts to price (GitHub Copilot reports
    premium requests, not tokens): ``count`` times the table's ``requests.<kind>`` price,
    ``cost_source="priced"`` with ``cost_note`` saying so; unchanged (``unknown``) when the count
    or the price is unknown.

    :param usage: what the run consumed (kept; ``premium_requests`` is set to ``count``).
    :param kind: the request kind in the table (``copilot-premium-request``).
    :param count: how many such requests the CLI reported (None: it did not say).
    :param table: the price table; None for the shipped one.
    """
    usage = msgspec.structs.replace(usage, premium_requests=count)
    table = table or load_table()
    rp = (table.requests or {}).get(kind)
    if count is None or rp is None:
        return usage
    return msgspec.structs.replace(usage, cost_usd=round(count * rp.usd, 9), cost_source="priced",
                                   price_table=table.version,
                                   cost_note=f"priced per premium request: {count:g} x ${rp.usd:g} ({kind}), not per token")


@functools.lru_cache(maxsize=1)
def _shipped_table() -> PriceTable:
    res = resources.files("gigafactory.schemas").joinpath("prices.json")
    return parse_table(res.read_bytes(), "gigafactory/schemas/prices.json")


def cost_usd(usage: Usage, prices: ModelPrice) -> float | None:
    """What ``usage`` costs at ``prices``, or None when its input or output count is unknown.

    :param usage: the token counts (cache counts that are None count as none).
    :param prices: the model's prices.
    """
    if usage.input_tokens is None or usage.output_tokens is None:
        return None
    cache_write_price = prices.input if prices.cache_write is None else prices.cache_write
    total = (usage.input_tokens * prices.input + (usage.cache_read_tokens or 0) * prices.cache_read
             + (usage.cache_write_tokens or 0) * cache_write_price + usage.output_tokens * prices.output)
    return total / _TOKENS_PER_PRICE_UNIT


def price(usage: Usage, table: PriceTable | None = None) -> Usage:
    """``usage`` with its cost filled from the price table, when it can be.

    A cost the CLI reported (``cost_source: reported``) is kept as it is. Otherwise, when the
    table knows ``usage.model`` and the input and output counts are known: ``cost_usd``,
    ``cost_source="priced"`` and ``price_table=<version>``; else ``cost_source="unknown"`` and
    ``cost_usd`` None.

    :param usage: what the run consumed.
    :param table: the price table; None for the shipped one.
    """
    if usage.cost_source == "reported" and usage.cost_usd is not None:
        return usage
    table = table or load_table()
    prices = table.lookup(usage.model)
    cost = cost_usd(usage, prices) if prices is not None else None
    if cost is None:
        return msgspec.structs.replace(usage, cost_usd=None, cost_source="unknown", price_table=None)
    return msgspec.structs.replace(usage, cost_usd=round(cost, 9), cost_source="priced", price_table=table.version)


__all__ = ["MAX_TABLE_BYTES", "ModelPrice", "PriceTable", "PriceTableError", "RequestPrice", "cost_usd",
           "load_table", "parse_table", "price", "price_per_request"]
