"""Declared engines: another agent CLI run as a station from a declaration file, no Python.

An operator puts one file per CLI in the engines folder (setting ``engines_dir``,
``GIGAFACTORY_ENGINES_DIR``): ``<name>.yaml`` (or ``.yml``, or ``.toml``), at most
:data:`MAX_DECLARATION_BYTES` each and :data:`MAX_DECLARATIONS` in all. Each file declares how to
start the CLI (binary, argument template, how the prompt is passed, yolo and safe flags), what it
needs (credential variables, a base-URL variable), and how to read its output (plain text or JSON
lines: which events are usage, tool calls, text and errors, where the token counts and the cost
are, which error messages mean ``rate_limited``, ``auth_failed`` or ``context_overflow``).

Every field is checked when the folder is loaded (:func:`load_dir`): an unknown field, a wrong
type, a regex that does not compile, a placeholder that does not exist, a name that a built-in
engine or a capability key already has, or a file over its size limit is a
:class:`DeclarationError` naming the file, the field and what to do. A bad file is skipped and
reported (the factory logs it); it never stops the factory or the other declarations.

A declared engine runs through the same machinery as the built-in agent CLIs
(:mod:`.agentcli`): its own process group under the supervisor, the job's timeout and
``budget.wall``, the self-fencing deadline, output streamed to the log and to ``logs --follow``,
``budget.tokens``/``budget.usd`` checked against the usage its parser reads as it streams, and an
environment built from nothing: ``PATH``, a private per-attempt ``HOME``, the locale, the proxy and
CA variables, the ``GF_*`` variables, its declared credentials, base-URL and passthrough variables
when set, the ``cred:`` credentials the job requires and the operator's
``engine_env_passthrough``, then its fixed ``env``. Never the factory's whole environment.

The file format is documented field by field on :class:`Declaration` and in the README's
engine chapter; ``examples/engines/`` ships an example.

Pure apart from :func:`load_dir` (reads the folder), :meth:`DeclaredEngine.probe` (runs the
version command) and the run itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gigafactory import osproc
from gigafactory.schemas.capabilities import CapabilityError, parse_offer
from gigafactory.schemas.capabilities import parse_version as parse_cap_version
from gigafactory.schemas.manifest import EngineClass, FailureClass
from gigafactory.schemas.records import Usage

from . import agentcli, pricing
from .base import (
    Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed, classify_exit, require_cwd,
)

MAX_DECLARATION_BYTES = 64 * 1024
"""A declaration file larger than this is refused (a real one is a few kilobytes)."""
MAX_DECLARATIONS = 64
"""At most this many declaration files are read from the engines folder; the rest are refused."""
MAX_LIST_ITEMS = 64
"""Longest list in a declaration (``args``, ``yolo-args``, ``credentials``, ...)."""
MAX_STRING_CHARS = 2048
"""Longest string in a declaration (an argument, an environment value, a path)."""
MAX_PATTERN_CHARS = 512
"""Longest regular expression in a declaration."""
MAX_ERROR_PATTERNS = 32
"""Most error patterns in all classes together."""
MAX_PATH_SEGMENTS = 8
"""Most segments in a dotted JSON path (``usage.input_tokens`` has two)."""
MAX_TAIL_LINES = 20
"""How many of the last non-JSON output lines are kept to explain a failed run."""
VERSION_OUTPUT_CHARS = 4096
"""Only this much of the version command's output is searched for the version."""

SUFFIXES = (".yaml", ".yml", ".toml")
"""The file names read from the engines folder."""

PROMPT_MODES = ("argv", "stdin", "file")
ERROR_CLASSES = ("rate_limited", "auth_failed", "context_overflow", "crash")
PLACEHOLDERS = ("prompt", "prompt_file", "model", "cwd", "home", "job", "epoch", "attempt", "branch", "base_url")
"""What ``{...}`` may name inside an argument or an ``env`` value."""
SPLICES = ("{model_args}", "{mode_args}", "{base_url_args}")
"""Whole elements of ``args`` replaced by a list: ``model-args`` (only when a model is known),
``yolo-args`` or ``safe-args`` (by the job's ``yolo``), and ``base-url-args`` (only when the
``base-url-env`` variable is set)."""
USAGE_FIELDS = ("input-tokens", "output-tokens", "cache-read-tokens", "cache-write-tokens", "cost-usd", "model", "turns")
"""Where a usage event carries each count (a dotted path for ``jsonl``, a regex for ``text``)."""

# Capability keys the probe offers itself: an engine named so would offer `<name>:<version>`
# tokens that collide with them (`python:1.0` is not a Python version).
_RESERVED_NAMES = frozenset({"os", "arch", "has", "cred", "engine", "engine-class", "factory", "gpu", "gpu-count",
                             "node", "python", "git", "go", "any", "declared"})
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_\-]*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH_SEGMENT_RE = re.compile(r"[A-Za-z0-9_\-@$]+")
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_VERSION_TOKEN_RE = re.compile(r"[0-9a-z][0-9a-z._\-]*")
_INT_RE = re.compile(r"\d[\d,]*")

_FIELDS = ("name", "engine-class", "description", "binary", "version-args", "version-regex", "min-version",
           "below-version", "args", "prompt", "model-args", "default-model", "yolo-args", "safe-args", "env",
           "yolo-env", "safe-env",
           "credentials", "credentials-required", "base-url-env", "base-url-args", "passthrough-env", "home", "output",
           "error-patterns", "error-patterns-on-success", "retry-after-pattern")
_REQUIRED = ("name", "engine-class", "binary", "args")
_OUTPUT_FIELDS = ("format", "event-type", "usage-events", "usage-counts", *USAGE_FIELDS, "input-includes-cache",
                  "ignore-zero-cost", "usage-events-are-turns",
                  "tool-events", "tool-name", "tool-input", "tool-pattern", "text-events", "text", "error-events",
                  "error")
_JSONL_ONLY = ("event-type", "usage-events", "usage-events-are-turns", "tool-events", "tool-name", "tool-input", "text-events", "text",
               "error-events", "error")
_DEFAULT_VERSION_RE = r"(\d+(?:\.\d+)+)"


class DeclarationError(ValueError):
    """A declaration cannot be used; the message names the file, the field and what to do.

    :param source: the declaration's file.
    :param field: the field (dotted for nested ones: ``output.input-tokens``), or None for the file.
    :param message: what is wrong and what to do.
    """

    def __init__(self, source: str, field: str | None, message: str) -> None:
        where = f"{source}: field '{field}'" if field else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.field = field


# ---------------------------------------------------------------------------------------------
# The declaration, parsed


@dataclass(frozen=True)
class OutputSpec:
    """How a declared CLI's output is read (``output:`` in the file)."""

    format: str = "text"
    """``text`` (lines; usage by regex) or ``jsonl`` (one JSON object a line)."""
    event_type: tuple[tuple[str, ...], ...] = (("type",),)
    """The paths of an event's kind (``jsonl``): the kind is the text values found at them,
    joined by ``/`` (``[type, item.type]`` gives ``item.completed/command_execution``)."""
    usage_events: frozenset[str] = frozenset()
    """Event kinds that carry usage (``jsonl``; empty: every event that has a usage field)."""
    usage_counts: str = "add"
    """``add``: each usage event reports one turn's counts (they are summed); ``total``: each
    reports the run's totals so far (the last one counts)."""
    extract: Mapping[str, Any] = field(default_factory=dict)
    """Usage field (``input_tokens``, ``cost_usd``, ...) -> a tuple of paths whose values are
    summed (``jsonl``; the model: the first one present) or a compiled regex with one group
    (``text``)."""
    ignore_zero_cost: bool = False
    """A reported cost of exactly 0 means "not known" (a CLI that prints 0 for a model it has no
    price for): the cost is then priced from the table instead of recorded as a reported zero."""
    usage_events_are_turns: bool = False
    """Each usage event is one model request: ``turns`` counts them (``jsonl``)."""
    input_includes_cache: bool = False
    """The CLI's input count includes cache reads and writes (OpenAI's convention): they are
    taken out, so ``input_tokens`` is the uncached input."""
    tool_events: frozenset[str] = frozenset()
    tool_name: tuple[tuple[str, ...], ...] | None = None
    """Where a tool event names its tool (paths: the first one present)."""
    tool_input: tuple[tuple[str, ...], ...] | None = None
    tool_pattern: re.Pattern[str] | None = None
    """``text``: a line matching it is a tool call (its first group, if any, the tool's name)."""
    text_events: frozenset[str] = frozenset()
    text: tuple[tuple[str, ...], ...] | None = None
    error_events: frozenset[str] = frozenset()
    error: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class Declaration:
    """One declared engine, checked and built by :func:`parse_declaration`.

    The file's fields (``name``, ``engine-class``, ``binary`` and ``args`` are required):

    - ``name``: the ``engine:`` jobs name; lower-case letters, digits, ``-``, ``_``; the file's
      stem; never a built-in engine's name or a capability key the probe offers itself.
    - ``engine-class``: ``agentic-coder``, ``chat-coder`` or ``review-only``.
    - ``description``: one line for operators.
    - ``binary``: the program, looked up on the factory's ``PATH`` (or an absolute path).
    - ``version-args`` (default ``["--version"]``), ``version-regex`` (default: the first dotted
      number; one group), ``min-version``, ``below-version``: the probe runs
      ``binary version-args`` and offers ``<name>:<version>``; outside ``[min, below)`` the
      engine is not offered.
    - ``args``: the arguments after the binary, each a template with ``{prompt}``,
      ``{prompt_file}``, ``{model}``, ``{cwd}``, ``{home}``, ``{job}``, ``{epoch}``,
      ``{attempt}``, ``{branch}`` (``{{``/``}}`` for a literal brace); an element that is exactly
      ``{model_args}``, ``{mode_args}`` or ``{base_url_args}`` is replaced by ``model-args``
      (only when a model is known), by ``yolo-args``/``safe-args``, or by ``base-url-args``
      (only when the base URL is set).
    - ``prompt``: ``argv`` (``{prompt}`` in ``args``; at most
      :data:`.agentcli.MAX_PROMPT_BYTES`), ``stdin`` (written to the CLI's standard input) or
      ``file`` (written to a file, ``{prompt_file}`` in ``args``).
    - ``model-args``, ``default-model``: how a model is passed; the job's ``model`` wins over
      ``default-model``.
    - ``yolo-args`` / ``safe-args``: what ``yolo: true`` / ``false`` add (at ``{mode_args}``).
    - ``env``: fixed variables (values are templates like ``args``; never ``GF_*``, ``PATH``,
      ``HOME``); ``yolo-env`` / ``safe-env``: further variables by the job's ``yolo``.
    - ``credentials``: variables holding its credential, passed through when set;
      ``credentials-required``: ``any`` (default: the probe offers it only when one is set),
      ``all``, or ``none``.
    - ``base-url-env``: the CLI's base-URL variable, passed through when set; ``base-url-args``:
      what ``{base_url_args}`` in ``args`` becomes when it is set (``{base_url}``: its value),
      for CLIs that take the base URL as a flag;
      ``passthrough-env``: further non-secret variables passed through when set.
    - ``home``: ``private`` (default: a fresh folder per attempt, removed afterwards) or
      ``inherit`` (the factory's ``HOME``: the CLI's own login and settings).
    - ``output``: see :class:`OutputSpec` (``format``, ``event-type`` (a path, or a list of
      paths whose values joined by ``/`` are the event's kind), ``usage-events``,
      ``usage-counts``, ``input-tokens``, ``output-tokens``, ``cache-read-tokens``,
      ``cache-write-tokens``, ``cost-usd``, ``model``, ``turns`` (for ``jsonl`` each a dotted
      path or a list of paths that are summed), ``input-includes-cache``, ``ignore-zero-cost``,
      ``usage-events-are-turns``,
      ``tool-events``, ``tool-name``, ``tool-input``, ``tool-pattern``, ``text-events``,
      ``text``, ``error-events``, ``error``; ``tool-name``, ``tool-input``, ``text`` and
      ``error`` are a path or a list of paths, the first one present is taken).
    - ``error-patterns``: failure class (``rate_limited``, ``auth_failed``,
      ``context_overflow``, ``crash``) -> regexes matched against its error messages and
      plain-text lines; ``error-patterns-on-success``: a match fails even a run that exited 0;
      ``retry-after-pattern``: one group, the seconds a rate-limit message asks to wait.
    """

    source: str
    name: str
    engine_class: str
    binary: str
    args: tuple[str, ...]
    prompt: str = "argv"
    description: str = ""
    version_args: tuple[str, ...] = ("--version",)
    version_regex: re.Pattern[str] = re.compile(_DEFAULT_VERSION_RE)
    min_version: str | None = None
    below_version: str | None = None
    model_args: tuple[str, ...] = ()
    default_model: str | None = None
    yolo_args: tuple[str, ...] = ()
    safe_args: tuple[str, ...] = ()
    base_url_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    yolo_env: Mapping[str, str] = field(default_factory=dict)
    safe_env: Mapping[str, str] = field(default_factory=dict)
    credentials: tuple[str, ...] = ()
    credentials_required: str = "any"
    base_url_env: str | None = None
    passthrough_env: tuple[str, ...] = ()
    home: str = "private"
    output: OutputSpec = OutputSpec()
    error_patterns: tuple[tuple[re.Pattern[str], str], ...] = ()
    error_patterns_on_success: bool = False
    retry_after_pattern: re.Pattern[str] | None = None


def parse_declaration(doc: object, source: str, *, reserved: Sequence[str] = ()) -> Declaration:
    """Check a declaration's fields (the file format: :class:`Declaration`) and build it.

    :param doc: the parsed file (a mapping).
    :param source: the file's name, for errors.
    :param reserved: names the declaration may not take (the built-in engines).
    :raises DeclarationError: naming the file and the field.
    """
    if not isinstance(doc, dict):
        raise DeclarationError(source, None, "a declaration must be a mapping of fields such as 'name: mycli'")
    _refuse_unknown(doc, _FIELDS, source, "")
    for k in _REQUIRED:
        if k not in doc or doc[k] in (None, "", []):
            raise DeclarationError(source, k, "is required (see the example in examples/engines/)")
    name = _name_field(doc, source, reserved)
    engine_class, binary, prompt = _program_fields(doc, source)
    args = _strings(doc, "args", source, splices=True)
    model_args = _strings(doc, "model-args", source)
    base_url_args = _strings(doc, "base-url-args", source)
    yolo_args = _strings(doc, "yolo-args", source)
    safe_args = _strings(doc, "safe-args", source)
    used = _check_arg_templates(source, prompt, args, model_args, base_url_args, yolo_args, safe_args)
    env = _env(doc, "env", source)
    yolo_env = _env(doc, "yolo-env", source)
    safe_env = _env(doc, "safe-env", source)
    credentials, required, base_url_env = _credential_fields(doc, source, used, (*args, *model_args, *yolo_args,
                                                                                    *safe_args))
    home = _string(doc, "home", source, default="private")
    if home not in ("private", "inherit"):
        raise DeclarationError(source, "home", f"{home!r}: use private (a fresh HOME per attempt) or inherit")
    version_regex, min_version, below_version = _version_fields(doc, source)
    patterns, on_success, retry_after = _error_fields(doc, source)
    default_model = doc.get("default-model")
    if default_model is not None:
        default_model = _string(doc, "default-model", source)
    return Declaration(
        source=source, name=name, engine_class=engine_class, binary=binary, args=args, prompt=prompt,
        description=_string(doc, "description", source, default=""),
        version_args=_strings(doc, "version-args", source, default=("--version",)), version_regex=version_regex,
        min_version=min_version, below_version=below_version, model_args=model_args, default_model=default_model,
        yolo_args=yolo_args, safe_args=safe_args, base_url_args=base_url_args, env=env, yolo_env=yolo_env, safe_env=safe_env, credentials=credentials, credentials_required=required,
        base_url_env=base_url_env, passthrough_env=_env_names(doc, "passthrough-env", source), home=home,
        output=_output(doc.get("output"), source), error_patterns=patterns,
        error_patterns_on_success=on_success, retry_after_pattern=retry_after,
    )


def _name_field(doc: dict, source: str, reserved: Sequence[str]) -> str:
    """``name``, checked: an engine name, not a built-in engine's or a capability key's, the file's stem.

    :param doc: the declaration.
    :param source: its file.
    :param reserved: the built-in engines' names.
    """
    name = _string(doc, "name", source)
    if not _NAME_RE.fullmatch(name):
        raise DeclarationError(source, "name", f"{name!r} is not an engine name: use lower-case letters, digits, "
                                               "'-' and '_', starting with a letter or digit")
    if name in reserved:
        raise DeclarationError(source, "name", f"{name!r} is a built-in engine: a declaration may not replace it; "
                                               "give yours another name (e.g. 'my-" + name + "')")
    if name in _RESERVED_NAMES:
        raise DeclarationError(source, "name", f"{name!r} is a capability key the probe offers itself: "
                                               "give the engine another name")
    stem = Path(source).stem
    if stem != name:
        raise DeclarationError(source, "name", f"{name!r} differs from the file's name {stem!r}: "
                                               f"rename the file to {name}{Path(source).suffix} or the engine to {stem!r}")
    return name


def _program_fields(doc: dict, source: str) -> tuple[str, str, str]:
    """``engine-class``, ``binary`` and ``prompt``, checked.

    :param doc: the declaration.
    :param source: its file.
    """
    engine_class = _string(doc, "engine-class", source)
    classes = [c.value for c in EngineClass]
    if engine_class not in classes:
        raise DeclarationError(source, "engine-class", f"{engine_class!r} is not an engine class: use one of "
                                                       f"{', '.join(classes)}")
    binary = _string(doc, "binary", source)
    if os.path.dirname(binary) and not os.path.isabs(binary):
        raise DeclarationError(source, "binary", f"{binary!r} is a relative path: give a program name "
                                                 "(looked up on PATH) or an absolute path")
    prompt = _string(doc, "prompt", source, default="argv")
    if prompt not in PROMPT_MODES:
        raise DeclarationError(source, "prompt", f"{prompt!r} is not a prompt mode: use argv, stdin or file")
    return engine_class, binary, prompt


def _check_arg_templates(source: str, prompt: str, args: tuple[str, ...], model_args: tuple[str, ...],
                         base_url_args: tuple[str, ...], yolo_args: tuple[str, ...],
                         safe_args: tuple[str, ...]) -> set[str]:
    """Check that the argument lists fit together and with the prompt mode; the placeholders they use.

    :param source: the declaration's file.
    :param prompt: its prompt mode.
    :param args: ``args``; the others are the lists of the same names.
    """
    used = _placeholders_in((*args, *model_args, *yolo_args, *safe_args, *base_url_args))
    if prompt == "argv" and "prompt" not in used:
        raise DeclarationError(source, "args", "prompt is 'argv' but no argument holds '{prompt}': add it "
                                               "(e.g. '{prompt}' or '--message={prompt}'), or use prompt: stdin")
    if prompt == "file" and "prompt_file" not in used:
        raise DeclarationError(source, "args", "prompt is 'file' but no argument holds '{prompt_file}': add it")
    if prompt != "argv" and "prompt" in used:
        raise DeclarationError(source, "args", f"'{{prompt}}' is used but prompt is {prompt!r}: use prompt: argv, "
                                               "or pass the prompt only through stdin or '{prompt_file}'")
    if (yolo_args or safe_args) and "{mode_args}" not in args:
        raise DeclarationError(source, "args", "yolo-args/safe-args are declared but 'args' has no '{mode_args}' "
                                               "element: add it where those flags go")
    if model_args and "{model_args}" not in args:
        raise DeclarationError(source, "args", "model-args is declared but 'args' has no '{model_args}' element: "
                                               "add it where the model flags go")
    if base_url_args and "{base_url_args}" not in args:
        raise DeclarationError(source, "args", "base-url-args is declared but 'args' has no '{base_url_args}' "
                                               "element: add it where the base-URL flags go")
    if "{base_url_args}" in args and not base_url_args:
        raise DeclarationError(source, "base-url-args", "'args' has '{base_url_args}' but base-url-args is empty")
    if "{model_args}" in args and not model_args:
        raise DeclarationError(source, "model-args", "'args' has '{model_args}' but model-args is empty: "
                                                     "declare it (e.g. ['-m', '{model}'])")
    return used


def _credential_fields(doc: dict, source: str, used: set[str],
                       always_added: tuple[str, ...]) -> tuple[tuple[str, ...], str, str | None]:
    """``credentials``, ``credentials-required`` and ``base-url-env``, checked.

    :param doc: the declaration.
    :param source: its file.
    :param used: the placeholders the argument lists use.
    :param always_added: the arguments added whether the base URL is set or not (all but
        ``base-url-args``): they may not use ``{base_url}``.
    """
    credentials = _env_names(doc, "credentials", source)
    required = _string(doc, "credentials-required", source, default="any")
    if required not in ("any", "all", "none"):
        raise DeclarationError(source, "credentials-required", f"{required!r}: use any, all or none")
    if required != "none" and not credentials and "credentials-required" in doc:
        raise DeclarationError(source, "credentials-required", f"is {required!r} but no credentials are declared")
    base_url_env = doc.get("base-url-env")
    if base_url_env is not None:
        base_url_env = _string(doc, "base-url-env", source)
        if not _ENV_NAME_RE.fullmatch(base_url_env):
            raise DeclarationError(source, "base-url-env", f"{base_url_env!r} is not an environment variable name")
    if "base_url" in used and base_url_env is None:
        raise DeclarationError(source, "base-url-env", "'{base_url}' is used but base-url-env does not say which "
                                                       "variable holds the base URL: declare it")
    if "base_url" in _placeholders_in(always_added):
        raise DeclarationError(source, "args", "'{base_url}' may only be used in base-url-args (added only when "
                                               "the base URL is set)")
    return credentials, required, base_url_env


def _version_fields(doc: dict, source: str) -> tuple[re.Pattern[str], str | None, str | None]:
    """``version-regex``, ``min-version`` and ``below-version``, checked.

    :param doc: the declaration.
    :param source: its file.
    """
    version_regex = _regex(doc, "version-regex", source, default=_DEFAULT_VERSION_RE, groups=1)
    min_version = _version(doc, "min-version", source)
    below_version = _version(doc, "below-version", source)
    if min_version and below_version and _vcmp(parse_cap_version(min_version), below_version) >= 0:
        raise DeclarationError(source, "below-version", f"{below_version} is not above min-version {min_version}")
    return version_regex, min_version, below_version


def _error_fields(doc: dict, source: str) -> tuple[tuple[tuple[re.Pattern[str], str], ...], bool, re.Pattern[str] | None]:
    """``error-patterns`` (compiled, with their failure class), ``error-patterns-on-success`` and
    ``retry-after-pattern``, checked.

    :param doc: the declaration.
    :param source: its file.
    """
    patterns: list[tuple[re.Pattern[str], str]] = []
    ep = doc.get("error-patterns", {}) or {}
    if not isinstance(ep, dict):
        raise DeclarationError(source, "error-patterns", "must map a failure class (rate_limited, auth_failed, "
                                                         "context_overflow, crash) to a list of regexes")
    for cls, regexes in ep.items():
        if cls not in ERROR_CLASSES:
            raise DeclarationError(source, "error-patterns", f"{cls!r} is not a failure class an error message can "
                                                             f"name: use {', '.join(ERROR_CLASSES)}")
        if isinstance(regexes, str):
            regexes = [regexes]
        if not isinstance(regexes, list):
            raise DeclarationError(source, f"error-patterns.{cls}", "must be a regex or a list of regexes")
        for i, r in enumerate(regexes):
            patterns.append((_compile(r, source, f"error-patterns.{cls}[{i}]"), cls))
    if len(patterns) > MAX_ERROR_PATTERNS:
        raise DeclarationError(source, "error-patterns", f"has {len(patterns)} patterns; at most {MAX_ERROR_PATTERNS}")
    on_success = doc.get("error-patterns-on-success", False)
    if not isinstance(on_success, bool):
        raise DeclarationError(source, "error-patterns-on-success", "must be true or false")
    return tuple(patterns), on_success, _regex(doc, "retry-after-pattern", source, default=None, groups=1)


def _output(raw: object, source: str) -> OutputSpec:
    if raw is None:
        return OutputSpec()
    if not isinstance(raw, dict):
        raise DeclarationError(source, "output", "must be a mapping (format: text or jsonl, and how to read usage)")
    _refuse_unknown(raw, _OUTPUT_FIELDS, source, "output.")
    fmt = _string(raw, "format", source, default="text", prefix="output.")
    if fmt not in ("text", "jsonl"):
        raise DeclarationError(source, "output.format", f"{fmt!r}: use text or jsonl")
    if fmt == "text":
        for k in _JSONL_ONLY:
            if k in raw:
                raise DeclarationError(source, f"output.{k}", "applies to format: jsonl only; with text output, "
                                                              "give regexes for the usage fields and tool-pattern")
        extract: dict[str, Any] = {k.replace("-", "_"): _compile(raw[k], source, f"output.{k}", groups=1)
                                   for k in USAGE_FIELDS if k in raw}
    else:
        if "tool-pattern" in raw:
            raise DeclarationError(source, "output.tool-pattern", "applies to format: text only; use tool-events")
        extract = {k.replace("-", "_"): _paths(raw[k], source, f"output.{k}") for k in USAGE_FIELDS if k in raw}
        if raw.get("usage-events-are-turns") and "turns" in raw:
            raise DeclarationError(source, "output.usage-events-are-turns", "and output.turns both say how turns are "
                                                                             "counted: keep one")
    counts = _string(raw, "usage-counts", source, default="add", prefix="output.")
    if counts not in ("add", "total"):
        raise DeclarationError(source, "output.usage-counts", f"{counts!r}: use add (each usage event is one "
                                                              "turn's) or total (each is the run's so far)")
    includes, zero_cost, are_turns = (_bool(raw, k, source, "output.") for k in
                                      ("input-includes-cache", "ignore-zero-cost", "usage-events-are-turns"))

    def kinds(key: str) -> frozenset[str]:
        return frozenset(_strings(raw, key, source, prefix="output."))

    def opt_path(key: str) -> tuple[tuple[str, ...], ...] | None:
        return _paths(raw[key], source, f"output.{key}") if key in raw else None

    tool_pattern = raw.get("tool-pattern")
    return OutputSpec(
        format=fmt, event_type=_paths(raw.get("event-type", "type"), source, "output.event-type"),
        usage_events=kinds("usage-events"), usage_counts=counts, extract=extract, input_includes_cache=includes,
        ignore_zero_cost=zero_cost, usage_events_are_turns=are_turns,
        tool_events=kinds("tool-events"), tool_name=opt_path("tool-name"), tool_input=opt_path("tool-input"),
        tool_pattern=None if tool_pattern is None else _compile(tool_pattern, source, "output.tool-pattern"),
        text_events=kinds("text-events"), text=opt_path("text"), error_events=kinds("error-events"),
        error=opt_path("error"),
    )


def _bool(doc: dict, key: str, source: str, prefix: str = "") -> bool:
    v = doc.get(key, False)
    if not isinstance(v, bool):
        raise DeclarationError(source, prefix + key, "must be true or false")
    return v


def _paths(raw: object, source: str, where: str) -> tuple[tuple[str, ...], ...]:
    """One dotted path, or a list of them (their values are summed)."""
    if isinstance(raw, list):
        if not raw or len(raw) > MAX_PATH_SEGMENTS:
            raise DeclarationError(source, where, f"must be a path or a list of 1 to {MAX_PATH_SEGMENTS} paths")
        return tuple(_path(r, source, f"{where}[{i}]") for i, r in enumerate(raw))
    return (_path(raw, source, where),)


def _refuse_unknown(doc: dict, known: Sequence[str], source: str, prefix: str) -> None:
    import difflib

    for k in doc:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known fields: {', '.join(known)}"
            raise DeclarationError(source, f"{prefix}{k}", f"is not a field of a declaration; {hint}")


def _string(doc: dict, key: str, source: str, *, default: str | None = None, prefix: str = "") -> str:
    v = doc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, str):
        raise DeclarationError(source, prefix + key, f"must be text, not {type(v).__name__}")
    if len(v) > MAX_STRING_CHARS:
        raise DeclarationError(source, prefix + key, f"is {len(v)} characters; at most {MAX_STRING_CHARS}")
    return v


def _env(doc: dict, key: str, source: str) -> dict[str, str]:
    raw = doc.get(key, {}) or {}
    if not isinstance(raw, dict):
        raise DeclarationError(source, key, "must be a mapping of variable names to values")
    if len(raw) > MAX_LIST_ITEMS:
        raise DeclarationError(source, key, f"has {len(raw)} variables; at most {MAX_LIST_ITEMS}")
    env: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _ENV_NAME_RE.fullmatch(k):
            raise DeclarationError(source, key, f"{k!r} is not an environment variable name")
        if k.startswith("GF_") or k in ("PATH", "HOME", "GIGAFACTORY_NATS_URL"):
            raise DeclarationError(source, f"{key}.{k}", "is set by the factory for every engine: remove it")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise DeclarationError(source, f"{key}.{k}", f"must be text (quote it), not {type(v).__name__}")
        v = str(v)
        if len(v) > MAX_STRING_CHARS:
            raise DeclarationError(source, f"{key}.{k}", f"is {len(v)} characters; at most {MAX_STRING_CHARS}")
        _check_template(v, source, f"{key}.{k}")
        env[k] = v
    return env


def _strings(doc: dict, key: str, source: str, *, default: tuple[str, ...] = (), prefix: str = "",
             splices: bool = False) -> tuple[str, ...]:
    v = doc.get(key)
    if v is None:
        return default
    if not isinstance(v, list):
        raise DeclarationError(source, prefix + key, "must be a list of text (one element per argument)")
    if len(v) > MAX_LIST_ITEMS:
        raise DeclarationError(source, prefix + key, f"has {len(v)} elements; at most {MAX_LIST_ITEMS}")
    out = []
    for i, item in enumerate(v):
        where = f"{prefix}{key}[{i}]"
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise DeclarationError(source, where, f"must be text, not {type(item).__name__}")
        item = str(item)
        if len(item) > MAX_STRING_CHARS:
            raise DeclarationError(source, where, f"is {len(item)} characters; at most {MAX_STRING_CHARS}")
        if item in SPLICES:
            if not splices:
                raise DeclarationError(source, where, f"{item} may only be an element of 'args'")
        else:
            _check_template(item, source, where)
        out.append(item)
    return tuple(out)


def _env_names(doc: dict, key: str, source: str) -> tuple[str, ...]:
    names = _strings(doc, key, source)
    for i, n in enumerate(names):
        if not _ENV_NAME_RE.fullmatch(n):
            raise DeclarationError(source, f"{key}[{i}]", f"{n!r} is not an environment variable name")
    return names


def _check_template(text: str, source: str, where: str) -> None:
    for m in _PLACEHOLDER_RE.finditer(text):
        if m.group(1) is not None and m.group(1) not in PLACEHOLDERS:
            raise DeclarationError(source, where, f"'{{{m.group(1)}}}' is not a placeholder: use "
                                                  f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} "
                                                  "(write '{{' and '}}' for literal braces)")
    stripped = _PLACEHOLDER_RE.sub("", text)
    if "{" in stripped or "}" in stripped:
        raise DeclarationError(source, where, "has an unmatched brace: write '{{' and '}}' for literal braces")


def _placeholders_in(items: Sequence[str]) -> set[str]:
    return {m.group(1) for s in items for m in _PLACEHOLDER_RE.finditer(s) if m.group(1)}


def _compile(raw: object, source: str, where: str, *, groups: int | None = None) -> re.Pattern[str]:
    if not isinstance(raw, str) or not raw:
        raise DeclarationError(source, where, "must be a regular expression (text)")
    if len(raw) > MAX_PATTERN_CHARS:
        raise DeclarationError(source, where, f"is {len(raw)} characters; a pattern may have at most {MAX_PATTERN_CHARS}")
    try:
        rx = re.compile(raw)
    except re.error as e:
        raise DeclarationError(source, where, f"is not a valid regular expression ({e})") from None
    if groups is not None and rx.groups != groups:
        raise DeclarationError(source, where, f"must have exactly {groups} group '( )' around the value; "
                                              f"it has {rx.groups}")
    return rx


def _regex(doc: dict, key: str, source: str, *, default: str | None, groups: int) -> re.Pattern[str] | None:
    raw = doc.get(key, default)
    return None if raw is None else _compile(raw, source, key, groups=groups)


def _version(doc: dict, key: str, source: str) -> str | None:
    v = doc.get(key)
    if v is None:
        return None
    v = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if not isinstance(v, str) or not re.fullmatch(r"\d+(?:\.\d+)*", v):
        raise DeclarationError(source, key, f"{v!r} is not a version: write it as digits and dots, e.g. '1.2.0'")
    return v


def _path(raw: object, source: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, str) or not raw:
        raise DeclarationError(source, where, "must be a dotted path into the event, e.g. 'usage.input_tokens'")
    parts = tuple(raw.split("."))
    if len(parts) > MAX_PATH_SEGMENTS:
        raise DeclarationError(source, where, f"has {len(parts)} segments; at most {MAX_PATH_SEGMENTS}")
    for p in parts:
        if not _PATH_SEGMENT_RE.fullmatch(p):
            raise DeclarationError(source, where, f"segment {p!r} of {raw!r} is not a field name or list index "
                                                  "(letters, digits, '_', '-')")
    return parts


# ---------------------------------------------------------------------------------------------
# Loading the folder


@dataclass
class LoadReport:
    """What :func:`load_dir` found: the good declarations and, per refused file, why."""

    declarations: list[Declaration] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    """File -> why it was refused (a :class:`DeclarationError`'s message)."""


def read_declaration(path: Path, *, reserved: Sequence[str] = ()) -> Declaration:
    """Read and check one declaration file.

    :param path: a ``.yaml``/``.yml``/``.toml`` file.
    :param reserved: names it may not take (the built-in engines).
    :raises DeclarationError: naming the file and the field.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DECLARATION_BYTES + 1)
    except OSError as e:
        raise DeclarationError(source, None, f"cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_DECLARATION_BYTES:
        raise DeclarationError(source, None, f"is over the {MAX_DECLARATION_BYTES}-byte limit of a declaration: "
                                             "a declaration is a few fields; keep long text out of it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DeclarationError(source, None, f"is not UTF-8 text ({e})") from None
    try:
        doc = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        raise DeclarationError(source, None, f"is not valid {kind}: {' '.join(str(e).split())}") from None
    return parse_declaration(doc, source, reserved=reserved)


def load_dir(directory: str | Path, *, reserved: Sequence[str] = ()) -> LoadReport:
    """Read every declaration in ``directory`` (files ending in :data:`SUFFIXES`, in name order,
    at most :data:`MAX_DECLARATIONS`). Never raises: a file that cannot be used, a second file
    declaring a name already taken, or a missing folder is an entry of ``errors``.

    :param directory: the engines folder (``engines_dir``).
    :param reserved: names a declaration may not take (the built-in engines).
    """
    report = LoadReport()
    d = Path(directory).expanduser()
    if not d.is_dir():
        report.errors[str(d)] = (f"{d}: the engines folder (engines_dir, GIGAFACTORY_ENGINES_DIR) is not a directory: "
                                 "create it or correct the setting")
        return report
    try:
        # Regular files only: opening a FIFO named like a declaration would block the factory's start.
        files = sorted(p for p in d.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file())
    except OSError as e:
        report.errors[str(d)] = f"{d}: the engines folder cannot be listed ({e.strerror or e})"
        return report
    seen: dict[str, str] = {}
    for i, p in enumerate(files):
        if i >= MAX_DECLARATIONS:
            report.errors[str(p)] = (f"{p}: skipped: the engines folder holds more than {MAX_DECLARATIONS} "
                                     "declarations; remove the ones not in use")
            continue
        try:
            dec = read_declaration(p, reserved=reserved)
        except DeclarationError as e:
            report.errors[str(p)] = str(e)
            continue
        if dec.name in seen:
            report.errors[str(p)] = str(DeclarationError(str(p), "name", f"{dec.name!r} is declared already by "
                                                                         f"{seen[dec.name]}: keep one of the two files"))
            continue
        seen[dec.name] = str(p)
        report.declarations.append(dec)
    return report


# ---------------------------------------------------------------------------------------------
# Reading the output


def _get(obj: object, path: tuple[str, ...]) -> object:
    for p in path:
        if isinstance(obj, dict):
            obj = obj.get(p)
        elif isinstance(obj, list) and p.isdigit() and int(p) < len(obj):
            obj = obj[int(p)]
        else:
            return None
        if obj is None:
            return None
    return obj


def _pick(ev: dict, paths: tuple[tuple[str, ...], ...], first: bool) -> object:
    """The value at ``paths`` in ``ev``: the first present one (``first``), else their sum
    (numbers only; None when none is present)."""
    found = [v for v in (_get(ev, p) for p in paths) if v is not None]
    if not found:
        return None
    if first or len(found) == 1:
        return found[0]
    nums = [n for n in (_money(v) for v in found) if n is not None]
    return sum(nums) if nums else None


def _count(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, float) and v.is_integer() and v >= 0:
        return int(v)
    if isinstance(v, str) and len(v) <= 32 and _INT_RE.fullmatch(v.strip()):  # int() refuses 4,300+ digits
        return int(v.strip().replace(",", ""))
    return None


def _money(v: object) -> float | None:
    """A non-negative finite amount (a number, or text such as ``$0.02``), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        if len(v) > 32:
            return None
        try:
            f = float(v.strip().lstrip("$"))
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) and f >= 0 else None


_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "turns")


class DeclaredParser(agentcli.LineParser):
    """Reads a declared CLI's output as its ``output:`` says: progress, usage, and its errors.

    :param dec: the declaration.
    :param model: the model the run asked for (used for pricing when the output names none).
    """

    def __init__(self, dec: Declaration, model: str | None = None) -> None:
        self._lines = agentcli.LineSplitter()
        self.dec = dec
        self.model = model
        self.counts: dict[str, int | None] = dict.fromkeys(_COUNTS)
        self.reported_cost: float | None = None
        self.reported_model: str | None = None
        self.usage_events = 0
        self.tool_calls = 0
        self.error_message: str | None = None
        """The last error event's message (``jsonl``)."""
        self.matched: tuple[str, str] | None = None
        """(failure class, line) of the last output that matched an error pattern."""
        self.tail: list[str] = []
        """The last non-JSON lines (at most :data:`MAX_TAIL_LINES`), to explain a failure."""

    def _line(self, line: str) -> list[Progress]:
        out = self.dec.output
        s = line.strip()
        if not s:
            return []
        if out.format == "jsonl" and s.startswith("{"):
            try:
                ev = json.loads(s)
            except ValueError:
                ev = None
            if isinstance(ev, dict):
                return self._event(ev)
        self._remember(s)
        self._match_error(s)
        if out.format == "text":
            return self._text_line(s)
        return []

    def _remember(self, s: str) -> None:
        self.tail.append(s[:2000])
        del self.tail[:-MAX_TAIL_LINES]

    def _match_error(self, s: str) -> None:
        for rx, cls in self.dec.error_patterns:
            if rx.search(s):
                self.matched = (cls, s[:2000])
                return

    def _event(self, ev: dict) -> list[Progress]:
        out = self.dec.output
        kind = "/".join(v for v in (_get(ev, p) for p in out.event_type) if isinstance(v, str)) or None
        said: list[Progress] = []
        if kind is not None and kind in out.error_events:
            msg = _pick(ev, out.error, True) if out.error else None
            msg = ev if msg is None else msg
            self.error_message = (msg if isinstance(msg, str) else json.dumps(msg))[:2000]
            self._match_error(self.error_message)
            said.append(Progress("progress", {"event": kind, "message": self.error_message}))
        if kind is not None and kind in out.tool_events:
            self.tool_calls += 1
            data: dict[str, object] = {"tool": str((_pick(ev, out.tool_name, True) if out.tool_name else None) or kind)[:200]}
            if out.tool_input:
                inp = _pick(ev, out.tool_input, True)
                if inp is not None:
                    data["input"] = (inp if isinstance(inp, str) else json.dumps(inp))[:2000]
            said.append(Progress("progress", data))
        if kind is not None and kind in out.text_events and out.text:
            text = _pick(ev, out.text, True)
            if isinstance(text, str) and text:
                said.append(Progress("progress", {"text": text[:2000]}))
        if (kind in out.usage_events) if out.usage_events else self._has_usage(ev):
            values = {k: _pick(ev, paths, k == "model") for k, paths in out.extract.items()}
            if self._take_usage(values):
                said.append(self._usage_progress())
        return said

    def _has_usage(self, ev: dict) -> bool:
        return any(_get(ev, p) is not None for k in ("input_tokens", "output_tokens", "cost_usd")
                   for p in self.dec.output.extract.get(k, ()))

    def _text_line(self, s: str) -> list[Progress]:
        out = self.dec.output
        said: list[Progress] = []
        if out.tool_pattern is not None:
            m = out.tool_pattern.search(s)
            if m:
                self.tool_calls += 1
                said.append(Progress("progress", {"tool": (m.group(1) if m.groups() else "tool") or "tool"}))
        values: dict[str, object] = {}
        for k, rx in out.extract.items():
            m = rx.search(s)
            if m:
                values[k] = m.group(1)
        if values and self._take_usage(values):
            said.append(self._usage_progress())
        return said

    def _take_usage(self, values: Mapping[str, object]) -> bool:
        """Add (or set, for ``total``) the counts a usage event carries; False if it carried none."""
        took = False
        add = self.dec.output.usage_counts == "add"
        for k in _COUNTS:
            n = _count(values.get(k))
            if n is None:
                continue
            took = True
            prev = self.counts[k]
            self.counts[k] = n + (prev or 0) if add else n
        cost = _money(values.get("cost_usd"))
        if cost == 0.0 and self.dec.output.ignore_zero_cost:
            cost = None
        if cost is not None:
            took = True
            self.reported_cost = cost + (self.reported_cost or 0.0) if add else cost
        model = values.get("model")
        if isinstance(model, str) and model:
            self.reported_model = model[:200]
        if took:
            self.usage_events += 1
            if self.dec.output.usage_events_are_turns:
                self.counts["turns"] = self.usage_events
        return took

    def _usage_progress(self) -> Progress:
        u = self.usage()
        assert u is not None  # a usage event was just taken
        return Progress("usage", {k: v for k, v in {
            "model": u.model, "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "cache_read_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens, "turns": u.turns,
            "tool_calls": u.tool_calls, "cost_usd": u.cost_usd, "cost_source": u.cost_source,
        }.items() if v is not None})

    def usage(self) -> Usage | None:
        """What the run consumed so far: the cost the CLI reported (``reported``), else priced
        from the shipped table (``priced``), else ``unknown``; None before any usage event."""
        if self.usage_events == 0:
            return None
        c = self.counts
        inputs = c["input_tokens"]
        if inputs is not None and self.dec.output.input_includes_cache:
            inputs = max(0, inputs - (c["cache_read_tokens"] or 0) - (c["cache_write_tokens"] or 0))
        tools = self.tool_calls if (self.dec.output.tool_events or self.dec.output.tool_pattern) else None
        u = Usage(model=self.reported_model or self.model, input_tokens=inputs, output_tokens=c["output_tokens"],
                  cache_read_tokens=c["cache_read_tokens"], cache_write_tokens=c["cache_write_tokens"],
                  turns=c["turns"], tool_calls=tools)
        if self.reported_cost is not None:
            return msgspec.structs.replace(u, cost_usd=round(self.reported_cost, 9), cost_source="reported")
        return pricing.price(u)

    def failure(self) -> tuple[str, str] | None:
        """(failure class, message) an error pattern matched, else None."""
        return self.matched

    def error_text(self) -> str | None:
        """The CLI's own error: the last error event's message, else its last non-JSON line."""
        return self.error_message or (self.tail[-1] if self.tail else None)


# ---------------------------------------------------------------------------------------------
# The engine


@functools.lru_cache(maxsize=64)
def _version_output(argv: tuple[str, ...], mtime_ns: int, size: int, path: str, timeout_s: float) -> tuple[str, int]:
    """The version command's output and exit code. Cached per binary file (path, mtime, size):
    a reinstalled CLI is asked again. It runs in its own process group with a minimal
    environment; on timeout the whole group is killed and :class:`subprocess.TimeoutExpired`
    raised."""
    env = {"PATH": os.pathsep.join([str(Path(argv[0]).parent), path]), "HOME": os.environ.get("HOME", "/"),
           "LANG": "C.UTF-8", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, **osproc.new_group_popen_kwargs())
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Its whole group: a CLI's --version may start helpers (node shims) that hold the pipe.
        osproc.signal_group(proc.pid, osproc.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=2.0)
        raise
    return out.decode("utf-8", "replace")[:VERSION_OUTPUT_CHARS], proc.returncode


def _vcmp(v: tuple[int, ...], other: str) -> int:
    """-1, 0 or 1 as version ``v`` is below, at or above ``other`` (missing parts are 0:
    ``1.0`` is ``1.0.0``)."""
    o = parse_cap_version(other) or ()
    n = max(len(v), len(o))
    a, b = v + (0,) * (n - len(v)), o + (0,) * (n - len(o))
    return (a > b) - (a < b)


def expand(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{placeholder}`` replaced from ``values`` and ``{{``/``}}`` made
    single braces (one pass: a value's own braces are never expanded again).

    :param template: an argument or ``env`` value of a declaration.
    :param values: placeholder -> value.
    """
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        return values[m.group(1)]

    return _PLACEHOLDER_RE.sub(sub, template)


class DeclaredEngine(Engine):
    """An agent CLI run from its declaration (see the module's docstring).

    :param dec: the checked declaration (:func:`parse_declaration`).
    """

    declared = True

    def __init__(self, dec: Declaration) -> None:
        self.dec = dec
        self.name = dec.name
        self.engine_class = dec.engine_class

    # -- probe ------------------------------------------------------------------------------

    def credential_vars(self, environ: Mapping[str, str]) -> tuple[str, ...]:
        """Its declared credential variables (the base class's well-known ones if it declares
        none), whose change restores it after an ``auth_failed``.

        :param environ: the environment the engine runs with (unused: the names are declared).
        """
        return self.dec.credentials or super().credential_vars(environ)

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Installed (``binary`` on ``path``), its credentials set as ``credentials-required``
        says, and a version (matched by ``version-regex``) in ``[min-version, below-version)``.
        Never raises.

        :param environ: the factory's environment (credentials are looked up here).
        :param path: the search path.
        :param timeout_s: limit for the version command.
        """
        dec = self.dec
        creds = {k: bool(environ.get(k)) for k in dec.credentials}
        binary = shutil.which(dec.binary, path=path)
        if binary is None:
            return ProbeResult(False, credentials=creds,
                               why=f"{dec.name} (declared in {dec.source}): {dec.binary!r} is not on the factory's PATH")
        if dec.credentials_required == "all" and not all(creds.values()) \
                or dec.credentials_required == "any" and creds and not any(creds.values()):
            missing = [k for k, ok in creds.items() if not ok]
            need = "all of" if dec.credentials_required == "all" else "one of"
            return ProbeResult(False, credentials=creds,
                               why=f"{dec.name} (declared in {dec.source}) needs {need} {', '.join(dec.credentials)} "
                                   f"set in the factory's environment; not set: {', '.join(missing)}")
        try:
            st = os.stat(binary)
            text, code = _version_output((binary, *dec.version_args), st.st_mtime_ns, st.st_size, path, timeout_s)
        except (OSError, subprocess.SubprocessError) as e:
            return ProbeResult(False, credentials=creds, why=f"{dec.name}: {binary} {' '.join(dec.version_args)} "
                                                            f"failed: {e}")
        m = dec.version_regex.search(text)
        version = m.group(1).strip().lower() if m and m.group(1) else None
        if code != 0 or version is None:
            return ProbeResult(False, credentials=creds,
                               why=f"{dec.name}: {binary} {' '.join(dec.version_args)} exited {code} without a "
                                   f"version matching version-regex {dec.version_regex.pattern!r}")
        try:
            if not _VERSION_TOKEN_RE.fullmatch(version):
                raise CapabilityError(version)
            parse_offer(f"{dec.name}:{version}")
        except CapabilityError:
            return ProbeResult(False, credentials=creds,
                               why=f"{dec.name}: version {version!r} is not a capability value: make version-regex "
                                   "capture only the version (digits, letters, '.', '-')")
        v = parse_cap_version(version)
        if dec.min_version and (v is None or _vcmp(v, dec.min_version) < 0) \
                or dec.below_version and (v is None or _vcmp(v, dec.below_version) >= 0):
            return ProbeResult(False, version=version, credentials=creds,
                               why=f"{dec.name} {version} is outside the declared range "
                                   f"[{dec.min_version or 'any'}, {dec.below_version or 'any'})")
        return ProbeResult(True, version=version, credentials=creds)

    # -- prepare ----------------------------------------------------------------------------

    def model(self, job: EngineJob) -> str | None:
        """The model the attempt asks for: the job's ``model``, else ``default-model``."""
        return job.manifest.model or self.dec.default_model

    def prepare(self, job: EngineJob) -> Prepared:
        """The argv from the ``args`` template, the prompt passed as declared, a private HOME
        (unless ``home: inherit``), and the minimal environment (see the module's docstring).

        :param job: the attempt.
        :raises SetupFailed: no working directory, no binary, an empty or too long prompt, a
            ``{model}`` with no model known.
        """
        dec = self.dec
        require_cwd(job)
        factory_env = os.environ
        binary = shutil.which(dec.binary, path=factory_env.get("PATH", os.defpath))
        if binary is None:
            msg = f"{dec.name}: {dec.binary!r} is not on the factory's PATH (declared in {dec.source})"
            raise SetupFailed(msg, msg + "\n")
        if dec.prompt == "argv":
            prompt = agentcli.require_prompt(job)
        else:
            prompt = job.body.strip()
            if not prompt:
                raise SetupFailed("the job's body is empty: an agent engine needs a prompt",
                                  "the job's body is empty: write the task for the agent below the front matter\n")
        model = self.model(job)
        uses_model = "model" in _placeholders_in((*dec.args, *dec.yolo_args, *dec.safe_args, *dec.env.values(),
                                                  *dec.yolo_env.values(), *dec.safe_env.values()))
        if uses_model and not model:
            msg = (f"{dec.name} needs a model: set 'model:' in the job, or 'default-model' in {dec.source}")
            raise SetupFailed(msg, msg + "\n")
        scratch = agentcli.attempt_home(job, dec.name)
        values = {
            "prompt": prompt if dec.prompt == "argv" else "", "prompt_file": "", "model": model or "",
            "cwd": str(job.cwd), "home": str(scratch), "job": job.job, "epoch": str(job.epoch),
            "attempt": str(job.attempt), "branch": job.gf_env.get("GF_BRANCH", ""),
            "base_url": factory_env.get(dec.base_url_env, "") if dec.base_url_env else "",
        }
        if dec.prompt in ("stdin", "file"):
            pf = scratch / "prompt.md"
            pf.write_text(prompt, encoding="utf-8")
            values["prompt_file"] = str(pf)
        argv = [binary]
        for a in dec.args:
            if a == "{model_args}":
                if model:
                    argv += [expand(x, values) for x in dec.model_args]
            elif a == "{base_url_args}":
                if values["base_url"]:
                    argv += [expand(x, values) for x in dec.base_url_args]
            elif a == "{mode_args}":
                argv += [expand(x, values) for x in (dec.yolo_args if job.manifest.yolo else dec.safe_args)]
            else:
                argv.append(expand(a, values))
        own = (*dec.credentials, *((dec.base_url_env,) if dec.base_url_env else ()), *dec.passthrough_env,
               *job.env_passthrough)
        home = scratch if dec.home == "private" else Path(factory_env.get("HOME") or scratch)
        env = agentcli.base_environment(job, binary, home, factory_env, own)
        env.update({k: expand(v, values) for k, v in dec.env.items()})
        env.update({k: expand(v, values) for k, v in (dec.yolo_env if job.manifest.yolo else dec.safe_env).items()})
        env["GF_ENGINE_SCRATCH"] = str(scratch)
        if dec.prompt == "stdin":
            # run_argv closes stdin; a POSIX shell gives the prompt file as the CLI's stdin
            # instead (the CLI and its arguments are the shell's positional parameters: nothing
            # of them is parsed by the shell).
            argv = ["/bin/sh", "-c", 'exec "$@" < "$GF_PROMPT_FILE"', "sh", *argv]
            env["GF_PROMPT_FILE"] = values["prompt_file"]
        if self._wants_model_hint(job):
            job.parser.model = model  # type: ignore[union-attr]  # the factory's reader prices with it
        return Prepared(cwd=job.cwd, env=env, argv=argv)

    @staticmethod
    def _wants_model_hint(job: EngineJob) -> bool:
        return isinstance(job.parser, DeclaredParser)

    # -- run --------------------------------------------------------------------------------

    def parser(self) -> OutputParser:
        """A fresh :class:`DeclaredParser` (:meth:`prepare` tells it the model, for pricing)."""
        return DeclaredParser(self.dec)

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run it, reading its output as it streams, and classify how it ended: stopped by the
        factory (fenced, cancelled, timed out) as any engine; else an error pattern that matched
        (on a non-zero exit, or always with ``error-patterns-on-success``); else the built-in
        error words (:func:`.agentcli.classify_error_text`) on a non-zero exit; else by exit code.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` built.
        """
        scratch = prepared.env.get("GF_ENGINE_SCRATCH")
        model = getattr(job.parser, "model", None) if isinstance(job.parser, DeclaredParser) else None
        reader = DeclaredParser(self.dec, model or self.dec.default_model)
        try:
            res = await agentcli.run_reading(job, prepared, reader.feed)
        finally:
            if scratch and Path(scratch).parent.name == "cli-homes":
                shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(res, Outcome):
            return res
        reader.finish()
        usage = reader.usage()
        stopped = res.fenced or res.cancelled or res.timed_out
        matched = reader.failure()
        if not stopped and matched and (res.exit_code != 0 or self.dec.error_patterns_on_success):
            cls, line = matched
            retry_after = None
            if cls == "rate_limited" and self.dec.retry_after_pattern is not None:
                m = self.dec.retry_after_pattern.search(line)
                if m:
                    try:
                        retry_after = float(m.group(1))
                    except ValueError:
                        retry_after = None
            fc = agentcli.failure_class(cls)
            return Outcome(fc, f"{cls.replace('_', ' ')}: {line[:300]}", res.exit_code, usage=usage,
                           retry_after_s=retry_after if fc == FailureClass.RATE_LIMITED else None)
        if stopped or res.exit_code == 0:
            by_exit = classify_exit(res, job)
            return Outcome(by_exit.failure, by_exit.detail, by_exit.exit_code, self_fenced=by_exit.self_fenced,
                           usage=usage)
        return agentcli.classify_run(res, job, usage, reader.error_text())


__all__ = ["MAX_DECLARATIONS", "MAX_DECLARATION_BYTES", "Declaration", "DeclarationError", "DeclaredEngine",
           "DeclaredParser", "LoadReport", "OutputSpec", "expand", "load_dir", "parse_declaration",
           "read_declaration"]
