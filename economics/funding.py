"""Funding windows from the operator's file (``funding_windows_file``): YAML or TOML.

YAML::

    windows:
      - name: q4-live
        start: 2026-10-01          # ISO date (midnight UTC) or date-time; included
        end: 2027-01-01            # excluded
        amount-usd: 5000
        products: [web]            # optional; empty or absent: any product
        providers: [anthropic]     # optional
        lane-kinds: [live]         # optional

TOML: the same keys under ``[[windows]]``. The choice of one window per run is
:func:`gigafactory.schemas.spend.choose_window`; this module only reads and checks the file.
Every error names the file, the window (its name, or its position) and the field.
"""

from __future__ import annotations

import datetime
import tomllib
from pathlib import Path
from typing import Any

import yaml

from gigafactory.schemas.spend import LaneKind, FundingWindow, UNFUNDED

FILE_MAX_BYTES = 256 * 1024
"""A funding windows file larger than this is refused (it is a short list of budgets)."""
WINDOWS_MAX = 1000
NAME_MAX_CHARS = 64
LIST_MAX_ITEMS = 100
_FIELDS = {"name", "start", "end", "amount-usd", "products", "providers", "lane-kinds"}


class FundingFileError(ValueError):
    """A funding windows file that cannot be used; the message names file, window and field."""


def load_funding_windows(path: str | Path) -> list[FundingWindow]:
    """The windows in ``path`` (YAML, or TOML when it ends in ``.toml``), checked.

    :param path: the file.
    :raises FundingFileError: unreadable, too large, not YAML/TOML, or a window that is wrong
        (the message names the file, the window and the field, and what to write).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > FILE_MAX_BYTES:
            raise FundingFileError(f"{p}: {size} bytes; a funding windows file may have at most {FILE_MAX_BYTES}")
        data = p.read_bytes()
    except OSError as e:
        raise FundingFileError(f"{p}: cannot read it ({e.strerror or e}); check GIGAFACTORY_FUNDING_WINDOWS_FILE") from e
    return parse_funding_windows(data, str(p))


def parse_funding_windows(data: bytes, where: str) -> list[FundingWindow]:
    """The windows in ``data`` (the text of ``where``, whose suffix says TOML or else YAML).

    :param data: the file's bytes.
    :param where: its path, for errors and the format.
    :raises FundingFileError: see :func:`load_funding_windows`.
    """
    if len(data) > FILE_MAX_BYTES:
        raise FundingFileError(f"{where}: {len(data)} bytes; a funding windows file may have at most {FILE_MAX_BYTES}")
    doc = _parse_document(data, where)
    items = doc.get("windows") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise FundingFileError(f"{where}: expected a top-level 'windows' list (see docs/economics.md)")
    if len(items) > WINDOWS_MAX:
        raise FundingFileError(f"{where}: {len(items)} windows; at most {WINDOWS_MAX}")
    out: list[FundingWindow] = []
    seen: set[str] = set()
    for i, item in enumerate(items, 1):
        w = _window(item, f"{where}: window #{i}")
        if w.name in seen:
            raise FundingFileError(f"{where}: window {w.name!r} (#{i}): field 'name': given twice; names are unique")
        seen.add(w.name)
        out.append(w)
    return out


def _parse_document(data: bytes, where: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FundingFileError(f"{where}: not UTF-8 text (byte {e.start})") from e
    if where.endswith(".toml"):
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FundingFileError(f"{where}: not TOML: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise FundingFileError(f"{where}: not YAML{at}: {getattr(e, 'problem', None) or e}") from e


def _window(item: Any, where: str) -> FundingWindow:
    if not isinstance(item, dict):
        raise FundingFileError(f"{where}: expected a mapping with name, start, end, amount-usd")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX_CHARS:
        raise FundingFileError(f"{where}: field 'name': a non-empty text of at most {NAME_MAX_CHARS} characters")
    if name == UNFUNDED:
        raise FundingFileError(f"{where}: field 'name': {UNFUNDED!r} is reserved for runs no window funds")
    where = f"{where.rsplit(': window', 1)[0]}: window {name!r}"
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise FundingFileError(f"{where}: field {unknown[0]!r} is not known; expected {', '.join(sorted(_FIELDS))}")
    for key in ("start", "end", "amount-usd"):
        if key not in item:
            raise FundingFileError(f"{where}: field {key!r} is missing")
    start, end = _time(item["start"], where, "start"), _time(item["end"], where, "end")
    if not end > start:
        raise FundingFileError(f"{where}: field 'end': must be after 'start'")
    amount = item["amount-usd"]
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
        raise FundingFileError(f"{where}: field 'amount-usd': a number of US dollars, 0 or more (got {amount!r})")
    lane_kinds = _names(item.get("lane-kinds"), where, "lane-kinds")
    bad = [k for k in lane_kinds if k not in LaneKind.__members__.values()]
    if bad:
        raise FundingFileError(f"{where}: field 'lane-kinds': {bad[0]!r} is not one of "
                               f"{', '.join(k.value for k in LaneKind)}")
    return FundingWindow(name=name, start=start, end=end, amount_usd=float(amount),
                         products=_names(item.get("products"), where, "products"),
                         providers=_names(item.get("providers"), where, "providers"), lane_kinds=lane_kinds)


def _names(value: Any, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > LIST_MAX_ITEMS or not all(
            isinstance(v, str) and v for v in value):
        raise FundingFileError(f"{where}: field {field!r}: a list of at most {LIST_MAX_ITEMS} names (got {value!r})")
    return tuple(value)


def _time(value: Any, where: str, field: str) -> float:
    """An ISO date (midnight UTC) or date-time (UTC unless it says its offset) as Unix seconds."""
    if isinstance(value, datetime.datetime):
        dt = value
    elif isinstance(value, datetime.date):
        dt = datetime.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            dt = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise FundingFileError(f"{where}: field {field!r}: {value!r} is not an ISO date "
                                   "(2026-10-01) or date-time (2026-10-01T00:00:00Z)") from None
    else:
        raise FundingFileError(f"{where}: field {field!r}: expected an ISO date or date-time, got {value!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()
