"""Engines: what runs in a station, each behind the one :class:`~.base.Engine` interface.

The registry maps an engine's name (the ``engine:`` a job names) to the engine. The factory
looks engines up here to run them (:func:`get`), and its probe offers ``engine:<name>`` for
every registered engine whose :meth:`~.base.Engine.probe` says it can run here, except the
opt-in ones (``noop``), which only ``--cap engine:<name>`` offers. Adding an engine is a module
in this package and one line in :func:`_builtin`; nothing outside this package changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from gigafactory.schemas.capabilities import parse_offer

from .base import Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed

_REGISTRY: dict[str, Engine] = {}
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


_builtin()

__all__ = ["Engine", "EngineJob", "Outcome", "OutputParser", "Prepared", "ProbeResult", "Progress", "SetupFailed",
           "get", "register", "registry", "unregister"]
