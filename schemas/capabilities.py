"""Capability grammar: what a job requires and what a factory offers.

A *requirement* token is one of

- ``key``                presence: the factory offers ``key`` or any ``key:<value>``
- ``key:value``          the factory offers exactly ``key:value`` (``os:any`` matches every factory)
- ``key<op>version``     with ``op`` in ``>= > = <= <``: the factory offers ``key:<v>`` where ``v``
                         compares as a version (``node>=20`` matches ``node:20.11.1``). ``=``
                         matches on the components given (``node=20`` matches ``node:20.11.1``).

A factory *offers* tokens of the form ``key`` or ``key:value``. A job matches a factory iff
every requirement is satisfied. Keys and values are case-insensitive and stored lower-case.

A *pool* is the canonical form of a requirement set (sorted, deduplicated, ``os:any`` dropped):
jobs with the same requirements share one dispatch subject and one consumer, so pools never
overlap (a WorkQueue stream refuses overlapping consumer filters).
"""

from __future__ import annotations

import functools
import hashlib
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

_KEY = r"[a-z0-9][a-z0-9_.\-/]*"
_TOKEN_RE = re.compile(rf"^(?P<key>{_KEY})(?:(?P<op>>=|<=|>|<|=|:)(?P<value>[^\s]+))?$")
_VERSION_RE = re.compile(r"^v?(\d+(?:\.\d+)*)")

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class CapabilityError(ValueError):
    """A capability token does not follow the grammar."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str | None  # None (presence), ":" (exact value), or a version operator
    value: str | None

    def __str__(self) -> str:
        return self.key if self.op is None else f"{self.key}{self.op}{self.value}"


def parse_version(text: str) -> tuple[int, ...] | None:
    """``'20.11.1'`` -> ``(20, 11, 1)``; ``'v3.11.7+local'`` -> ``(3, 11, 7)``; not a version -> None."""
    m = _VERSION_RE.match(text.strip().lower())
    if not m:
        return None
    return tuple(int(p) for p in m.group(1).split("."))


def parse_requirement(token: str) -> Requirement:
    """Parse one requirement token, or raise :class:`CapabilityError` saying what is expected."""
    if not isinstance(token, str):
        raise CapabilityError(f"capability must be a string like 'os:linux' or 'node>=20', got {token!r}")
    return _parse_requirement(token)


@functools.lru_cache(maxsize=4096)
def _parse_requirement(token: str) -> Requirement:
    # Cached: the scheduler matches every job's pool against every live factory, and a fleet
    # uses a few dozen distinct tokens. Requirement is frozen, so sharing one is safe; a token
    # that does not parse raises every time (lru_cache keeps no exceptions).
    text = token.strip().lower()
    m = _TOKEN_RE.match(text)
    if not m:
        raise CapabilityError(
            f"{token!r} is not a capability: expected 'key', 'key:value' or 'key<op>version' "
            "with op one of >= > = <= < (for example 'has:git', 'os:mac', 'node>=20')"
        )
    key, op, value = m.group("key"), m.group("op"), m.group("value")
    if op is not None and op != ":" and parse_version(value) is None:
        raise CapabilityError(f"{token!r}: {value!r} is not a version (expected digits like 20 or 3.11)")
    return Requirement(key, op, value)


def parse_offer(token: str) -> tuple[str, str | None]:
    """Parse a token a factory offers: ``key`` or ``key:value``."""
    req = parse_requirement(token)
    if req.op not in (None, ":"):
        raise CapabilityError(f"factory capability {token!r} must be 'key' or 'key:value', not a comparison")
    return req.key, req.value


def _not_one_string(tokens: object, what: str) -> None:
    # A bare string is iterable too, and would be read one character at a time as tokens
    # ('node>=20' -> 'n', 'o', ...): a programmer error, refused loudly.
    if isinstance(tokens, str):
        raise TypeError(f"{what} must be a list of tokens, not one string: {tokens!r}")


class Offers:
    """A factory's capability set, indexed for matching."""

    __slots__ = ("tokens", "_by_key", "_missing")

    def __init__(self, tokens: Iterable[str]) -> None:
        _not_one_string(tokens, "a factory's capabilities")
        by_key: dict[str, set[str | None]] = {}
        norm: set[str] = set()
        for t in tokens:
            key, value = parse_offer(t)
            by_key.setdefault(key, set()).add(value)
            norm.add(key if value is None else f"{key}:{value}")
        self.tokens: frozenset[str] = frozenset(norm)
        self._by_key = by_key
        self._missing: dict[tuple, list[str]] = {}
        """missing() by requirement tuple: a factory's offers do not change, its pools' needs
        are a handful, and the scheduler asks each pass for every live factory."""

    def satisfies(self, req: Requirement) -> bool:
        values = self._by_key.get(req.key)
        if req.op is None:
            return values is not None
        if req.op == ":":
            if req.key == "os" and req.value == "any":
                return True
            return values is not None and req.value in values
        if values is None:
            return False
        want = parse_version(req.value or "")
        assert want is not None  # parse_requirement checked it
        for v in values:
            have = parse_version(v) if v else None
            if have is None:
                continue
            if req.op == "=":
                if have[: len(want)] == want:
                    return True
                continue
            width = max(len(have), len(want))
            if _OPS[req.op](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
                return True
        return False

    def missing(self, requirements: Iterable[str | Requirement]) -> list[str]:
        """The requirement tokens this factory does not satisfy (empty list: it matches), in
        their normalized form (lower case, no surrounding space)."""
        _not_one_string(requirements, "requirements")
        key = tuple(requirements)
        try:
            known = self._missing.get(key)
        except TypeError:  # an unhashable token: parse_requirement says what is wrong with it
            known, key = None, None
        if known is not None:
            return list(known)
        out = []
        for r in requirements:
            req = r if isinstance(r, Requirement) else parse_requirement(r)
            if not self.satisfies(req):
                out.append(str(req))
        if key is not None and len(self._missing) < 256:
            self._missing[key] = out
        return list(out)


def matches(requirements: Iterable[str], offers: Iterable[str] | Offers) -> bool:
    """True iff every requirement is satisfied by the offered tokens."""
    _not_one_string(requirements, "requirements")
    o = offers if isinstance(offers, Offers) else Offers(offers)
    return not o.missing(requirements)


def canonical(requirements: Iterable[str]) -> tuple[str, ...]:
    """Sorted, deduplicated, lower-cased requirement tokens; ``os:any`` is dropped (it matches all)."""
    _not_one_string(requirements, "requirements")
    out = {str(parse_requirement(r)) for r in requirements}
    out.discard("os:any")
    return tuple(sorted(out))


def pool_id(requirements: Iterable[str]) -> str:
    """The dispatch pool for a requirement set: a short stable hash of its canonical form.

    Used as the last token of ``gf.dispatch.<pool>`` and in the consumer name, so it is
    restricted to ``[a-z0-9]``.
    """
    canon = canonical(requirements)
    if not canon:
        return "any"
    return hashlib.sha256("\n".join(canon).encode()).hexdigest()[:16]
