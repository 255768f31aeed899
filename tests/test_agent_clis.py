"""Finding the agent CLIs: PATH first, then the cache folder of scripts/install-agent-clis."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gigafactory import agent_clis

ROOT = Path(__file__).resolve().parent.parent


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_cli_prefers_path_then_the_cache_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GIGAFACTORY_AGENT_CLIS", str(cache))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert agent_clis.find_cli("codex") is None
    cached = _exe(cache / "npm" / "node_modules" / ".bin" / "codex")
    assert agent_clis.find_cli("codex") == str(cached)
    on_path = _exe(tmp_path / "bin" / "codex")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert agent_clis.find_cli("codex") == str(on_path)
    assert agent_clis.find_cli("aider") is None
    assert agent_clis.find_cli("aider") is None and agent_clis.cache_dir() == cache
    cached_aider = _exe(cache / "aider-venv" / "bin" / "aider")
    assert agent_clis.find_cli("aider") == str(cached_aider)


def test_a_missing_cli_names_the_install_script(tmp_path, monkeypatch):
    monkeypatch.setenv("GIGAFACTORY_AGENT_CLIS", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FileNotFoundError, match="Run scripts/install-agent-clis"):
        agent_clis.scripted_run("gemini", prompt="p", base_url="http://127.0.0.1:1", home=tmp_path)
    with pytest.raises(ValueError, match="unknown agent CLI 'vim'"):
        agent_clis.find_cli("vim")


def test_pinned_versions_match_the_install_script():
    script = (ROOT / "scripts" / "install-agent-clis").read_text()
    for name, var in [("claude", "CLAUDE_CODE_VERSION"), ("codex", "CODEX_VERSION"),
                      ("gemini", "GEMINI_CLI_VERSION"), ("copilot", "COPILOT_VERSION"), ("aider", "AIDER_VERSION")]:
        assert f"{var}={agent_clis.pinned_version(name)}\n" in script, name


def test_the_run_environment_is_built_from_nothing(tmp_path, monkeypatch):
    _exe(tmp_path / "bin" / "claude")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("FACTORY_SECRET_TOKEN", "leak")
    spec = agent_clis.scripted_run("claude", prompt="p", base_url="http://127.0.0.1:9", home=tmp_path)
    assert "FACTORY_SECRET_TOKEN" not in spec.env
    assert spec.env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9" and spec.env["HOME"] == str(tmp_path)
    assert "--dangerously-skip-permissions" in spec.argv
    no_yolo = agent_clis.scripted_run("claude", prompt="p", base_url="u", home=tmp_path, yolo=False)
    assert "--dangerously-skip-permissions" not in no_yolo.argv
    assert os.environ["PATH"] == str(tmp_path / "bin")


def test_install_script_is_idempotent_and_prints_each_binary(tmp_path):
    # Runs the real script against the developer/CI cache: everything is already installed at the
    # pinned version (CI runs the script before the tests), so this only checks and prints.
    import subprocess
    out = subprocess.run([str(ROOT / "scripts" / "install-agent-clis")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
    for name in agent_clis.CLIS:
        assert lines[name][1] == agent_clis.pinned_version(name)
        assert lines[name][2] == agent_clis.find_cli(name) or Path(lines[name][2]).is_file()
    assert "added" not in out.stderr  # nothing was (re)installed
