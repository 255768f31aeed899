"""The standard NATS context (``nats context save/select``: ``$XDG_CONFIG_HOME/nats``) is read
when a command is given no ``--nats``/``--creds`` (issue 12): its url, its creds or nkey file and
its TLS files; ``$NATS_CONTEXT`` picks another; a broken one is named."""

from __future__ import annotations

import json

import nats
import pytest
from helpers import run

from gigafactory.broker import auth_options
from gigafactory.config import Settings, resolve_url
from gigafactory.identity import resolve_creds
from gigafactory.natscontext import ContextError, selected


def _save(root, name: str, select: bool = True, **fields) -> None:
    d = root / "nats" / "context"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps({"description": "", **fields}))
    if select:
        (root / "nats" / "context.txt").write_text(name)


def test_the_selected_context_is_read_and_nats_context_picks_another(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert selected(env) is None  # nothing selected: no context, no error
    _save(tmp_path, "prod", url="nats://prod:4222", creds="/k/prod.creds", ca="/k/ca.pem")
    _save(tmp_path, "lab", select=False, url="nats://lab:4222", nkey="/k/lab.nk")
    got = selected(env)
    assert (got.name, got.url, got.creds, got.ca, got.nkey) == ("prod", "nats://prod:4222", "/k/prod.creds",
                                                                "/k/ca.pem", "")
    got = selected({**env, "NATS_CONTEXT": "lab"})
    assert (got.url, got.nkey) == ("nats://lab:4222", "/k/lab.nk")
    with pytest.raises(ContextError, match=r"context 'gone'.*gone\.json is missing"):
        selected({**env, "NATS_CONTEXT": "gone"})
    (tmp_path / "nats" / "context" / "prod.json").write_text("{not json")
    with pytest.raises(ContextError, match=r"prod\.json is not readable JSON"):
        selected(env)
    with pytest.raises(ContextError, match="not a context name"):
        selected({**env, "NATS_CONTEXT": "../../etc/passwd"})


def test_a_command_without_nats_or_creds_connects_with_the_selected_context(nats_server, tmp_path, monkeypatch):
    """A real broker with authentication on: with no --nats/--creds (and no home identity), the
    context's url and nkey file connect as that identity; without the context nothing does;
    --creds and GIGAFACTORY_NATS_URL still win over it."""
    nats_server.identities.create("submitter", "ctx-user")
    nats_server.reload(nats_server.identities.users())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GIGAFACTORY_HOME", str(tmp_path / "home"))  # no admin identity to fall back to
    for var in ("GIGAFACTORY_CREDS", "GIGAFACTORY_NATS_URL", "NATS_CONTEXT"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_creds(None) is None
    key = str(nats_server.identities.creds_path("ctx-user"))

    async def connect_as_resolved():
        nc = await nats.connect(resolve_url(None), allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=5, **auth_options(Settings.from_env()))
        try:
            await nc.request("$JS.API.INFO", b"", timeout=5)  # a submitter may; proves the session works
        finally:
            await nc.close()

    _save(tmp_path / "xdg", "fleet", url=nats_server.url)
    # The context's url, no credentials: refused by the server (nats-py reports the server's
    # -ERR, or the closed connection when the server's close arrives first).
    with pytest.raises(Exception, match="(?i)authorization|connection lost"):
        run(connect_as_resolved(), 30)
    _save(tmp_path / "xdg", "fleet", url=nats_server.url, nkey=key)
    assert resolve_url(None) == nats_server.url and resolve_creds(None) == key
    run(connect_as_resolved(), 30)
    monkeypatch.setenv("GIGAFACTORY_NATS_URL", "nats://elsewhere:1")
    monkeypatch.setenv("GIGAFACTORY_CREDS", "/explicit.creds")
    assert resolve_url(None) == "nats://elsewhere:1" and resolve_creds(None) == "/explicit.creds"
    assert resolve_url("nats://flag:2") == "nats://flag:2"
