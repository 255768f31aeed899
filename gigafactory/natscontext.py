"""The standard NATS context (what ``nats context save/select`` writes), read when a command is
given no ``--nats``/``--creds``.

The ``nats`` CLI keeps contexts under ``$XDG_CONFIG_HOME/nats`` (default ``~/.config/nats``):
``context/<name>.json`` (``url``, ``creds``, ``nkey``, ``cert``, ``key``, ``ca``, ...) and
``context.txt``, the selected context's name; ``$NATS_CONTEXT`` names one instead. Gigafactory
reads the selected one's ``url`` (after ``--nats`` and ``GIGAFACTORY_NATS_URL``, before a running
embedded broker), its ``creds`` or ``nkey`` file (after ``--creds`` and ``GIGAFACTORY_CREDS``,
before the home's admin identity) and its TLS files (after ``--tls-*``). Other fields (user and
password, token, JetStream domain, ...) are not used: say so rather than guess.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CONTEXT_ENV = "NATS_CONTEXT"
"""Names the context to use, instead of ``context.txt``'s (as the ``nats`` CLI does)."""
CONTEXT_MAX_BYTES = 64 * 1024
"""A context file larger than this is not one: refused unread."""
CONTEXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
"""A context name (a file name under ``context/``: no path separators)."""


class ContextError(ValueError):
    """An unreadable NATS context; the message names the file and what to do."""


@dataclass(frozen=True)
class NatsContext:
    """The fields of a NATS context Gigafactory uses (empty: not set).

    :param name: the context's name.
    :param path: its file.
    :param url: the server URL(s), comma-separated.
    :param creds: a credentials file (a NATS ``.creds`` file, or a Gigafactory one).
    :param nkey: an nkey seed file.
    :param cert: a client certificate (mutual TLS); ``key`` its key; ``ca`` the CA to verify the server."""

    name: str
    path: str
    url: str = ""
    creds: str = ""
    nkey: str = ""
    cert: str = ""
    key: str = ""
    ca: str = ""


def config_dir(env: dict | None = None) -> Path:
    """``$XDG_CONFIG_HOME/nats``, default ``~/.config/nats``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "nats"


def selected(env: dict | None = None) -> NatsContext | None:
    """The selected context (``$NATS_CONTEXT``, else ``context.txt``); None when none is selected.
    Raises :class:`ContextError` for a selected context that is missing or unreadable.

    :param env: the environment to read (default ``os.environ``)."""
    env = os.environ if env is None else env
    root = config_dir(env)
    name = (env.get(CONTEXT_ENV) or "").strip()
    where = f"${CONTEXT_ENV}"
    if not name:
        txt = root / "context.txt"
        try:
            name = txt.read_text(encoding="utf-8", errors="replace")[:256].strip()
        except OSError:
            return None
        where = str(txt)
        if not name:
            return None
    if not CONTEXT_NAME_RE.fullmatch(name):
        raise ContextError(f"{where} names context {name[:80]!r}, not a context name: select one with "
                           "`nats context select NAME`")
    path = root / "context" / f"{name}.json"
    try:
        size = path.stat().st_size
    except OSError:
        raise ContextError(f"{where} selects NATS context {name!r}, but {path} is missing: create it with "
                           f"`nats context save {name} --server URL` or select another") from None
    if size > CONTEXT_MAX_BYTES:
        raise ContextError(f"NATS context {path} is {size} bytes, more than {CONTEXT_MAX_BYTES}: not a context")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ContextError(f"NATS context {path} is not readable JSON ({e}); save it again with "
                           f"`nats context save {name}`") from None
    if not isinstance(data, dict):
        raise ContextError(f"NATS context {path} is not a JSON object; save it again with `nats context save {name}`")

    def field(key: str) -> str:
        v = data.get(key)
        if v is not None and not isinstance(v, str):
            raise ContextError(f"NATS context {path}: field {key!r} must be a string, not {type(v).__name__}")
        return os.path.expanduser(v) if v and key != "url" else (v or "")

    return NatsContext(name=name, path=str(path), url=field("url"), creds=field("creds"), nkey=field("nkey"),
                       cert=field("cert"), key=field("key"), ca=field("ca"))
