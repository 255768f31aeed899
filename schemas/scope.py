"""The scope guardrail: which changed paths a job may ship. Pure: no I/O, no git.

After an engine ends, the factory lists the paths its commit changed (a rename counts twice:
the caller passes both the old and the new path, so moving a protected file away is refused
like deleting it) and asks :func:`check_scope`:

- ``allowed`` is the job's ``scope`` (path globs the job may change; None: no scope, every
  path is allowed). A changed path that matches none of them is *outside*. With
  ``scope-mode: warn`` the work ships and the verdict says what was outside; with
  ``enforce`` the attempt ends ``scope_violation`` and nothing is pushed.
- ``protected`` is the fleet's ``protected_paths`` (a factory setting). A changed path that
  matches one of them is refused in either mode: a job's own scope cannot widen it.

Glob grammar (:func:`compile_glob`), over repository-relative POSIX paths:

- ``/`` separates segments; a glob is anchored at the repository root (``*.md`` is only
  the root's markdown files; ``**/*.md`` is every one of them, the root's included).
- ``*`` is any run of characters within one segment, ``?`` one character within a
  segment; both match a leading ``.`` too (``*`` matches ``.env``).
- ``[abc]``, ``[a-z]``, ``[!a-z]`` (or ``[^a-z]``) match one character, never ``/``; a
  ``]`` first in the class is literal. ``[*]``, ``[?]`` and ``[[]`` match those characters.
- ``**`` as a whole segment spans any number of directories, zero included:
  ``docs/**/*.md`` matches ``docs/a.md`` and ``docs/x/y/a.md``; a trailing ``**`` matches
  everything below (``docs/**`` matches ``docs/a.md`` and ``docs/x/y.md``, not ``docs``
  itself); ``**`` alone matches every path. A trailing ``/`` means the same as ``/**``.
- Refused, with a named error (:func:`validate_globs`): an empty glob, an absolute one
  (``/etc/**``, ``C:/x``), a ``..`` or ``.`` segment, an empty segment (``a//b``), a
  backslash (paths use ``/``; match a literal metacharacter with a class such as ``[*]``),
  ``**`` that is not a whole segment (``src/**.py``: write ``src/**/*.py``), an unclosed
  ``[``, a class that could match ``/``, a NUL, and more than ``MAX_GLOBS`` globs or a glob
  longer than ``MAX_GLOB_CHARS``.
Matching is case-sensitive, as git is on the platforms a fleet runs on.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Literal

import msgspec

MAX_GLOBS = 256
"""Most globs one list (a job's ``scope``, the fleet's ``protected_paths``) may hold."""
MAX_GLOB_CHARS = 1024
"""Longest glob accepted."""
MAX_CHANGED_PATHS = 100_000
"""Most changed paths one verdict judges (a commit touching more is refused, not truncated:
a path that is not looked at cannot be declared in scope)."""
MAX_PATH_CHARS = 4096
"""Longest changed path accepted (Linux's PATH_MAX)."""
DETAIL_PATHS = 10
"""How many paths of each kind the verdict's ``detail`` names before "and N more"."""

ScopeMode = Literal["warn", "enforce"]
SCOPE_MODES: tuple[str, ...] = ("warn", "enforce")


class GlobError(ValueError):
    """A glob the grammar refuses; the message says which glob, why, and what to write."""


class ScopeVerdict(msgspec.Struct, frozen=True):
    """What :func:`check_scope` decided about one set of changed paths."""

    ok: bool
    """False only when the change must be refused: a protected path was touched, or a path
    is outside ``allowed`` under ``enforce``. True with paths in ``outside`` is ``warn``."""
    outside: list[str]
    """Changed paths that match none of the allowed globs (empty when there is no scope)."""
    protected: list[str]
    """Changed paths that match a protected glob: always refused, whatever the mode."""
    detail: str
    """One human-readable line for events, status and the attempt's failure message."""


# -- the grammar -------------------------------------------------------------------------------


def _problem(glob: str) -> str | None:
    """Why ``glob`` is refused (one sentence saying what to write instead), or None."""
    if not isinstance(glob, str):
        return f"{glob!r} is not a string: write a path glob such as src/**"
    if not glob:
        return "'' is empty: write a path glob such as src/** (or remove the entry)"
    if len(glob) > MAX_GLOB_CHARS:
        return f"{glob[:40]!r}... is {len(glob)} characters long; at most {MAX_GLOB_CHARS} are allowed"
    if "\x00" in glob:
        return f"{glob!r} contains a NUL character"
    if "\\" in glob:
        return (f"{glob!r} contains a backslash: paths use / as the separator, and a literal *, ? or [ "
                "is matched with a class such as [*]")
    if glob.startswith("/"):
        return (f"{glob!r} is absolute: globs are relative to the repository root "
                f"(write {glob.lstrip('/') or '**'} instead)")
    if re.match(r"^[A-Za-z]:", glob):
        return f"{glob!r} is absolute: globs are relative to the repository root"
    body = glob[:-1] if glob.endswith("/") else glob
    for seg in body.split("/"):
        if seg == "":
            return f"{glob!r} has an empty path segment (//): remove the extra /"
        if seg == "..":
            return f"{glob!r} has a '..' segment: a scope cannot reach outside the repository"
        if seg == ".":
            return f"{glob!r} has a '.' segment: write the path without ./"
        if "**" in seg and seg != "**":
            return (f"{glob!r}: ** must be a whole path segment (it spans directories); "
                    f"write for example src/**/*.py instead of src/**.py")
    err = _class_problem(body)
    if err:
        return f"{glob!r}: {err}"
    return None


def _class_problem(seg: str) -> str | None:
    """Why the character classes of ``seg`` (a whole glob) are refused, or None."""
    i = 0
    while i < len(seg):
        if seg[i] == "[":
            end = _class_end(seg, i)
            if end < 0:
                return "unclosed [ (match a literal [ with [[])"
            if "/" in seg[i:end]:
                return "a character class cannot match /"
            i = end + 1
        else:
            i += 1
    return None


def _class_end(seg: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``seg[start]``, or -1."""
    j = start + 1
    if j < len(seg) and seg[j] in "!^":
        j += 1
    if j < len(seg) and seg[j] == "]":  # a ] first in the class is literal
        j += 1
    end = seg.find("]", j)
    return end


def _segment_regex(seg: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = _class_end(seg, i)
            inner = seg[i + 1:end]
            negate = inner[:1] in ("!", "^")
            if negate:
                inner = inner[1:]
            # Escape what re would read specially inside a class (], [, ^, set operators);
            # ranges (a-z) keep their '-'.
            inner = "".join(ch if ch == "-" else re.escape(ch) for ch in inner)
            # A range may span '/' ([+-0]): the lookahead keeps a class inside one segment.
            out.append(f"[^/{inner}]" if negate else f"(?!/)[{inner}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def compile_glob(glob: str) -> re.Pattern[str]:
    """The regular expression matching exactly the paths ``glob`` names (see the module's
    grammar). Raises :class:`GlobError` saying why a glob is refused. Cached: a fleet's
    protected globs are compiled once per process."""
    err = _problem(glob)
    if err:
        raise GlobError(f"glob {err}")
    if glob.endswith("/"):
        glob += "**"
    segs = glob.split("/")
    parts: list[str] = []
    last = len(segs) - 1
    for n, seg in enumerate(segs):
        if seg == "**":
            if n == last:
                # Everything below what came before (at least one more segment), or every path.
                parts.append(".+")
            else:
                # Zero or more whole directories; it owns the / that follows it.
                parts.append("(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(seg) + ("/" if n != last else ""))
    return re.compile("".join(parts))


def glob_matches(glob: str, path: str) -> bool:
    """Whether repository-relative ``path`` is one of the paths ``glob`` names."""
    return compile_glob(glob).fullmatch(path) is not None


def validate_globs(globs: object, field: str) -> list[str]:
    """Every problem of a glob list, each as ``"<field>[<i>]: <why and what to write>"``
    (``field`` alone for problems of the list itself); empty when all is well. ``field``
    names where the list came from (``scope``, ``GIGAFACTORY_PROTECTED_PATHS``), so the
    manifest validator and the settings can both use the messages as they are."""
    if globs is None:
        return []
    if isinstance(globs, str) or not isinstance(globs, Sequence):
        return [f"{field}: expected a list of path globs (such as [src/**, tests/**]), got {type(globs).__name__}"]
    if len(globs) > MAX_GLOBS:
        return [f"{field}: {len(globs)} globs; at most {MAX_GLOBS} are allowed (use ** to cover a tree)"]
    errors = []
    for i, g in enumerate(globs):
        err = _problem(g)
        if err:
            errors.append(f"{field}[{i}]: glob {err}")
    return errors


# -- the verdict ---------------------------------------------------------------------------------


def _path_problem(path: str) -> str | None:
    if not isinstance(path, str) or not path:
        return "is empty"
    if len(path) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    if path.startswith("/") or "\\" in path or "\x00" in path:
        return "is not a repository-relative POSIX path"
    if any(seg in ("", ".", "..") for seg in path.split("/")):
        return "is not a normalised repository-relative path (empty, '.' or '..' segment)"
    return None


def _named(paths: list[str]) -> str:
    shown = ", ".join(paths[:DETAIL_PATHS])
    more = len(paths) - DETAIL_PATHS
    return shown + (f" and {more} more" if more > 0 else "")


def _plural(n: int) -> str:
    return f"{n} path" + ("" if n == 1 else "s")


def check_scope(
    changed: Sequence[str],
    allowed: Sequence[str] | None,
    protected: Sequence[str],
    mode: ScopeMode,
) -> ScopeVerdict:
    """Judge the ``changed`` paths of one attempt.

    :param changed: repository-relative POSIX paths the attempt changed (added, modified,
        deleted; for a rename both the old and the new path). Duplicates are judged once.
    :param allowed: the job's scope globs; None means no scope (every path is allowed), an
        empty list means no path is.
    :param protected: the fleet's protected globs; a path matching one is always refused.
    :param mode: ``warn`` (outside paths are reported, the change ships) or ``enforce``
        (outside paths refuse the change).
    :returns: the verdict; ``ok`` is False only when the change must be refused.
    :raises GlobError: a glob is refused by the grammar (validate them first, with
        :func:`validate_globs`, where the user can be told the file and field).
    :raises ValueError: ``mode`` is not warn or enforce, a changed path is not a normalised
        repository-relative path, or there are more than ``MAX_CHANGED_PATHS`` of them.
    """
    if mode not in SCOPE_MODES:
        raise ValueError(f"scope mode {mode!r}: expected one of {', '.join(SCOPE_MODES)}")
    if len(changed) > MAX_CHANGED_PATHS:
        raise ValueError(f"{len(changed)} changed paths; a verdict judges at most {MAX_CHANGED_PATHS}")
    for field, globs in (("scope", allowed), ("protected_paths", protected)):
        errors = validate_globs(globs, field)
        if errors:
            raise GlobError("; ".join(errors))
    paths = list(dict.fromkeys(changed))  # once each, in the caller's order
    for p in paths:
        err = _path_problem(p)
        if err:
            raise ValueError(f"changed path {p!r} {err}")
    protected_rx = [compile_glob(g) for g in protected]
    allowed_rx = None if allowed is None else [compile_glob(g) for g in allowed]
    hit_protected = [p for p in paths if any(rx.fullmatch(p) for rx in protected_rx)]
    outside = [] if allowed_rx is None else [p for p in paths if not any(rx.fullmatch(p) for rx in allowed_rx)]
    ok = not hit_protected and not (mode == "enforce" and outside)

    notes: list[str] = []
    if hit_protected:
        notes.append(f"{_plural(len(hit_protected))} protected by the fleet ({', '.join(protected)}): "
                     f"{_named(hit_protected)}; refused whatever the scope mode")
    if outside:
        scope = ", ".join(allowed or ()) or "an empty scope"
        then = ("refused (scope-mode enforce)" if mode == "enforce"
                else "shipped anyway (scope-mode warn)" if ok else "allowed by scope-mode warn")
        notes.append(f"{_plural(len(outside))} outside the scope ({scope}): {_named(outside)}; {then}")
    if not notes:
        where = "no scope" if allowed is None else f"scope {', '.join(allowed) or '(empty)'}"
        notes.append(f"{_plural(len(paths))} changed, all within {where} and none protected")
    return ScopeVerdict(ok=ok, outside=outside, protected=hit_protected, detail="; ".join(notes))
