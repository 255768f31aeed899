"""Engines: what runs in a station, each behind the one :class:`~.base.Engine` interface.

The registry maps an engine's name (the ``engine:`` a job names) to the engine. The factory
looks engines up here to run them (:func:`get`), and its probe offers ``engine:<name>`` for
every registered engine whose :meth:`~.base.Engine.probe` says it can run here, except the
opt-in ones (``noop``), which only ``--cap engine:<name>`` offers. Adding an engine is a module
in this package and one line in :func:`_builtin`; nothing outside this package changes.

Operators add engines without Python through declaration files (:mod:`.declared`):
:func:`load_declared` reads the engines folder (setting ``engines_dir``) and registers each good
declaration; a bad one is logged and skipped (:func:`declaration_errors`), and none may take a
built-in engine's name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from gigafactory.schemas.capabilities import parse_offer

from .base import Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Engine] = {}
_BUILTIN_NAMES: frozenset[str] = frozenset()
"""The engines that ship with gigafactory (set by :func:`_builtin`); a declaration never replaces one."""
_DECLARATION_ERRORS: dict[str, str] = {}
"""Declaration file -> why it was refused, from the last :func:`load_declared`."""
_ENGINE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_\-]*")


def register(engine: Engine, *, replace: bool = False) -> Engine:
    """Add ``engine`` to the registry; returns it.

    :param engine: the engine; its ``name`` must be one a job's ``engine:`` can say (lower-case
        letters, digits, ``-`` and ``_``), its ``engine_class`` non-empty.
    :param replace: replace an engine of the same name (else that is a :class:`ValueError`).
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"an engine must be an Engine, not {type(engine).__name__}")
    name = getattr(engine, "name", None)
    # What a job's `engine:` may say (schemas/manifest.py checks the same), so jobs can name it.
    if not isinstance(name, str) or not _ENGINE_NAME_RE.fullmatch(name):
        raise ValueError(f"engine name {name!r} is not one a job can name: use lower-case letters, digits, "
                         "'-' and '_', starting with a letter or digit")
    parse_offer(f"engine:{name}")  # and a valid capability token (raises CapabilityError naming it)
    if not getattr(engine, "engine_class", ""):
        raise ValueError(f"engine {engine.name!r} has no engine_class")
    if engine.name in _REGISTRY and not replace:
        raise ValueError(f"an engine named {engine.name!r} is registered already")
    _REGISTRY[engine.name] = engine
    return engine


def unregister(name: str) -> Engine | None:
    """Remove the engine ``name`` from the registry; returns it (None if there was none).

    :param name: the engine's name.
    """
    return _REGISTRY.pop(name, None)


def registry() -> Mapping[str, Engine]:
    """Every registered engine by name (a read-only view)."""
    return MappingProxyType(_REGISTRY)


def get(name: str) -> Engine | None:
    """The engine named ``name``, or None if none is registered.

    :param name: the ``engine:`` a job names.
    """
    return _REGISTRY.get(name)


def _builtin() -> None:
    from .aider import AiderEngine
    from .claude import ClaudeEngine
    from .copilot import CopilotEngine
    from .codex import CodexEngine
    from .gemini import GeminiEngine
    from .noop import NoopEngine
    from .shell import ShellEngine

    register(ShellEngine())
    register(NoopEngine())
    register(ClaudeEngine())
    register(CodexEngine())
    register(GeminiEngine())
    register(CopilotEngine())
    register(AiderEngine())


def builtin_names() -> frozenset[str]:
    """The names of the engines that ship with gigafactory (a declaration may not take one)."""
    return _BUILTIN_NAMES


def load_declared(directory: str | Path | None) -> dict[str, str]:
    """Register the engines declared in ``directory`` (:func:`.declared.load_dir`), replacing the
    declared engines a previous load registered under the same names (never a built-in one).
    Never raises: each file that cannot be used is logged as an error and skipped; returns those
    (file -> why), which :func:`declaration_errors` also keeps for the probe to report.

    :param directory: the engines folder (setting ``engines_dir``); None: nothing is loaded.
    """
    from .declared import DeclaredEngine, load_dir

    if directory is None or str(directory) == "":
        return {}
    report = load_dir(directory, reserved=sorted(_BUILTIN_NAMES))
    for dec in report.declarations:
        old = _REGISTRY.get(dec.name)
        if old is not None and not isinstance(old, DeclaredEngine):
            # Registered from Python by another module: not ours to replace either.
            report.errors[dec.source] = (f"{dec.source}: field 'name': an engine named {dec.name!r} is registered "
                                         "already; give the declared one another name")
            continue
        try:
            register(DeclaredEngine(dec), replace=True)
        except (TypeError, ValueError) as e:
            report.errors[dec.source] = f"{dec.source}: {e}"
    _DECLARATION_ERRORS.clear()
    _DECLARATION_ERRORS.update(report.errors)
    for why in report.errors.values():
        log.error("declared engine skipped: %s", why)
    loaded = [d.name for d in report.declarations if d.source not in report.errors]
    if loaded:
        log.info("declared engines loaded from %s: %s", directory, ", ".join(loaded))
    return dict(report.errors)


def declaration_errors() -> Mapping[str, str]:
    """The declaration files the last :func:`load_declared` refused, and why (read-only)."""
    return MappingProxyType(_DECLARATION_ERRORS)


_builtin()
_BUILTIN_NAMES = frozenset(_REGISTRY)

__all__ = ["Engine", "EngineJob", "Outcome", "OutputParser", "Prepared", "ProbeResult", "Progress", "SetupFailed",
           "builtin_names", "declaration_errors", "get", "load_declared", "register", "registry", "unregister"]
