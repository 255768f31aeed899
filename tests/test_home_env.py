"""Configuration from the environment: one data folder that follows ``GIGAFACTORY_HOME``
everywhere, and one prefix (``GIGAFACTORY_``) for every variable an operator sets."""

from __future__ import annotations

import re
from pathlib import Path

from gigafactory.config import Settings, factories_dir, home
from gigafactory.factory.agent import Factory

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("gigafactory", "schemas", "coordinator", "factory", "chaos", "loadtest", "profiles", "examples")


def test_home_follows_gigafactory_home(tmp_path):
    assert home({"GIGAFACTORY_HOME": str(tmp_path)}) == tmp_path
    assert factories_dir({"GIGAFACTORY_HOME": str(tmp_path)}) == tmp_path / "factories"
    assert home({}) == Path.home() / ".gigafactory"
    assert home({"GIGAFACTORY_HOME": "  "}) == Path.home() / ".gigafactory", "blank means unset"
    assert home({"GIGAFACTORY_HOME": "~/gf-data"}) == Path.home() / "gf-data", "a ~ from a config file, unexpanded"


def test_a_factory_without_data_dir_keeps_its_folder_under_gigafactory_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GIGAFACTORY_HOME", str(tmp_path))
    f = Factory(None, factory_id="f-home", settings=Settings(), probe=False)
    assert f.dir == tmp_path / "factories" / "f-home"
    assert (f.dir / "outbox").is_dir() and (f.dir / "logs").is_dir()


def test_nothing_else_names_the_default_data_folder():
    """``~/.gigafactory`` is spelled once, in :func:`gigafactory.config.home`."""
    hits = []
    for d in PACKAGE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if re.search(r"""["']\.gigafactory["']""", text):
                hits.append(str(path.relative_to(ROOT)))
    assert hits == ["gigafactory/config.py"]


# Variables the project reads that are not its own: standard ones, and the agent CLIs' (which
# the CLIs themselves define). ``GF_*`` are the variables the factory gives to engines (and the
# labs' markers, which engines inherit as GF_* so that leftovers can be found).
NOT_OURS = {"PATH", "HOME", "USER", "LANG", "TERM", "NO_COLOR", "PYTHONUNBUFFERED",
            "OPENAI_API_KEY", "OPENAI_API_BASE", "OPENAI_ORGANIZATION", "GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL",
            "COPILOT_PROVIDER_BASE_URL", "COPILOT_PROVIDER_API_KEY", "COPILOT_MODEL", "COPILOT_OFFLINE",
            "COPILOT_ALLOW_ALL", "CODEX_HOME", "IS_SANDBOX", "GEMINI_CLI_TRUST_WORKSPACE",
            "LITELLM_LOCAL_MODEL_COST_MAP", "ANTHROPIC_API_KEY", "GIT_TERMINAL_PROMPT",
            # OpenTelemetry's standard variables (its specification defines them).
            "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_SERVICE_NAME", "GITHUB_TOKEN", "GH_TOKEN",
            # The nats CLI's context selection and the XDG base-directory specification (where
            # the nats CLI keeps its contexts): read to honour the operator's NATS context.
            "NATS_CONTEXT", "XDG_CONFIG_HOME",
            # sudo's: compose/setup run under sudo leaves the operator's files to the operator.
            "SUDO_UID"}

_READ = re.compile(r"""(?:environ|env|getenv|factory_env)(?:\.get\(|\[|\()\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
                   r"""|envvar=["']([A-Za-z_][A-Za-z0-9_]*)["']"""
                   r"""|^[A-Z_]*(?:_VAR|_ENV)\s*=\s*["']([A-Za-z_][A-Za-z0-9_]*)["']""", re.M)


def env_names_read() -> dict[str, set[str]]:
    """Every environment variable named literally where the package reads one (or names one in
    a ``*_VAR`` / ``*_ENV`` constant), with the files that do."""
    out: dict[str, set[str]] = {}
    for d in PACKAGE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            for m in _READ.finditer(path.read_text(encoding="utf-8")):
                name = next(g for g in m.groups() if g)
                out.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_variable_an_operator_sets_starts_with_gigafactory():
    names = env_names_read()
    assert "GIGAFACTORY_NATS_URL" in names and "GIGAFACTORY_HOME" in names, "the scan finds reads at all"
    stray = {n: sorted(f) for n, f in names.items()
             if not n.startswith(("GIGAFACTORY_", "GF_")) and n not in NOT_OURS}
    assert stray == {}, ("environment variables without the GIGAFACTORY_ prefix: rename them (keep the old "
                         "name working with a deprecation warning) or, if another program defines them, "
                         "add them to NOT_OURS")
