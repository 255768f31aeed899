"""Where the agent CLIs are, and how to run each one non-interactively against a base URL.

`find_cli(name)` looks on PATH first, then in the cache folder that `scripts/install-agent-clis`
fills (`$GIGAFACTORY_AGENT_CLIS`, default `~/.cache/gigafactory/agent-clis`). `scripted_run(...)`
builds the exact argv and environment that were proven against `gigafactory model-server` for
each CLI (tests/test_agent_clis_real.py); the engine adapters start from these recipes.

The environment is built from nothing but PATH, HOME, the CLI's own variables and the ones
named by the caller: an agent never inherits the factory's whole environment (API keys included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

INSTALL_SCRIPT = "scripts/install-agent-clis"
CLIS = ("claude", "codex", "gemini", "copilot", "aider")
# name -> (path under the cache folder, package, pinned version); keep in step with the script.
CACHE_PATHS = {
    "claude": ("npm/node_modules/.bin/claude", "@anthropic-ai/claude-code", "2.1.328"),
    "codex": ("npm/node_modules/.bin/codex", "@openai/codex", "0.169.0"),
    "gemini": ("npm/node_modules/.bin/gemini", "@google/gemini-cli", "0.61.0"),
    "copilot": ("npm/node_modules/.bin/copilot", "@github/copilot", "1.0.102"),
    "aider": ("aider-venv/bin/aider", "aider-chat", "0.86.2"),
}


def cache_dir() -> Path:
    """The agent-CLI cache folder (`GIGAFACTORY_AGENT_CLIS`, default ~/.cache/gigafactory/agent-clis)."""
    env = os.environ.get("GIGAFACTORY_AGENT_CLIS")
    return Path(env) if env else Path.home() / ".cache" / "gigafactory" / "agent-clis"


def pinned_version(name: str) -> str:
    """The version `scripts/install-agent-clis` installs for CLI `name`."""
    return CACHE_PATHS[name][2]


def find_cli(name: str) -> str | None:
    """The path of agent CLI `name` (PATH first, then the cache folder), or None.

    Parameters: `name` one of CLIS.
    """
    if name not in CACHE_PATHS:
        raise ValueError(f"unknown agent CLI {name!r}; known: {', '.join(CLIS)}")
    on_path = shutil.which(name)
    if on_path:
        return on_path
    cached = cache_dir() / CACHE_PATHS[name][0]
    return str(cached) if cached.is_file() and os.access(cached, os.X_OK) else None


def missing_message(name: str) -> str:
    """What to tell a user whose machine lacks CLI `name`."""
    rel, package, version = CACHE_PATHS[name]
    return (f"agent CLI {name!r} ({package} {version}) is not installed: not on PATH and not at "
            f"{cache_dir() / rel}. Run {INSTALL_SCRIPT} (installs the pinned CLIs into the cache folder, "
            f"GIGAFACTORY_AGENT_CLIS).")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A process to start: argv, its whole environment, and text for stdin (None: /dev/null)."""

    argv: list[str]
    env: dict[str, str]
    stdin: str | None = None


def _base_env(binary: str, home: Path) -> dict[str, str]:
    # The CLI's own folder first on PATH: npm's bin shims run `node`, and codex/copilot find
    # their native helpers next to the shim.
    path = os.pathsep.join([str(Path(binary).parent), os.environ.get("PATH", "/usr/bin:/bin")])
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1"}
    return env


def codex_bundled_bwrap_dir(binary: str) -> Path | None:
    """The folder of the bubblewrap that ships with this Codex installation, or None.

    Codex's Linux sandbox (every run without yolo) prefers a ``bwrap`` found on PATH over its
    own, and runs it with ``--argv0``, which bubblewrap added in 0.9: Debian 12's 0.8.0 then
    fails every sandboxed command (``execvp codex-linux-sandbox: No such file or directory``)
    and the agent edits nothing. Putting the bundled one first on the CLI's PATH makes Codex use
    the bubblewrap it was built and tested with, whatever the machine has installed.

    :param binary: the ``codex`` the factory runs (the npm shim or a link to it).
    """
    package = Path(os.path.realpath(binary)).parent.parent  # .../@openai/codex/bin/codex.js
    for root in (package, *sorted(package.parent.glob("codex-*"))):  # the platform package beside it
        for found in sorted(root.glob("vendor/*/codex-resources/bwrap")):
            if os.access(found, os.X_OK):
                return found.parent
    return None


def scripted_run(name: str, *, prompt: str, base_url: str, home: Path, api_key: str = "sk-scripted",
                 model: str | None = None, yolo: bool = True) -> RunSpec:
    """The argv and environment that run CLI `name` once, non-interactively, against `base_url`.

    Parameters: `name` one of CLIS; `prompt` the task; `base_url` the model server's root URL
    (http://127.0.0.1:PORT, no /v1); `home` an empty folder used as HOME (the CLIs keep state and
    settings there); `api_key` the credential to send; `model` the model name to ask for (a
    default per CLI); `yolo` pass the CLI's auto-approve flag.
    Raises FileNotFoundError (with the install hint) when the CLI is not installed.
    """
    binary = find_cli(name)
    if binary is None:
        raise FileNotFoundError(missing_message(name))
    env = _base_env(binary, home)
    if name == "claude":
        env.update(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY=api_key,
                   # As root, --dangerously-skip-permissions is refused unless the CLI is told it
                   # runs in a sandbox.
                   IS_SANDBOX="1",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
                   # Its default is 10 retries with exponential back-off, 401s included: about
                   # three minutes before a bad key is reported. Gigafactory retries rate-limited
                   # attempts itself (honouring retry-after), so the CLI needs only a couple.
                   CLAUDE_CODE_MAX_RETRIES="2")
        argv = [binary, "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--model", model or "claude-sonnet-4-5"]
        # Without the flag, -p mode denies every tool that needs permission (Write, Bash) and
        # the run ends with `permission_denials` in its result event.
        argv += ["--dangerously-skip-permissions"] if yolo else ["--permission-mode", "acceptEdits"]
        return RunSpec(argv, env)
    if name == "codex":
        env.update(CODEX_HOME=str(home / ".codex"), GIGAFACTORY_SCRIPTED_KEY=api_key)
        (home / ".codex").mkdir(parents=True, exist_ok=True)
        # stream_max_retries bounds its retries of a failed streaming request (429s included;
        # with 0 a single 429 ends the run with "exceeded retry limit").
        provider = (f'model_providers.scripted={{name="scripted", base_url="{base_url}/v1", '
                    f'env_key="GIGAFACTORY_SCRIPTED_KEY", wire_api="responses", '
                    f'stream_max_retries=2}}')
        argv = [binary, "exec", "--json", "--skip-git-repo-check", "-m", model or "scripted-model",
                "-c", "model_provider=scripted", "-c", provider]
        # Without yolo: the workspace-write sandbox (exec never asks for approval), run by the
        # bubblewrap Codex ships (see codex_bundled_bwrap_dir).
        argv += ["--dangerously-bypass-approvals-and-sandbox"] if yolo else ["--sandbox", "workspace-write"]
        if not yolo and (bundled := codex_bundled_bwrap_dir(binary)) is not None:
            env["PATH"] = os.pathsep.join([str(bundled), env["PATH"]])
        argv.append(prompt)
        return RunSpec(argv, env)
    if name == "gemini":
        settings_dir = home / ".gemini"
        settings_dir.mkdir(parents=True, exist_ok=True)
        # API-key auth must be selected in the settings file, or the CLI asks interactively.
        (settings_dir / "settings.json").write_text(json.dumps({
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            "general": {"disableAutoUpdate": True},
            "privacy": {"usageStatisticsEnabled": False}}))
        env.update(GOOGLE_GEMINI_BASE_URL=base_url, GEMINI_API_KEY=api_key, GEMINI_CLI_TRUST_WORKSPACE="true")
        # An explicit -m: without it the model router calls generateContent to classify first.
        argv = [binary, "-p", prompt, "--output-format", "json", "-m", model or "gemini-2.5-flash"]
        argv += ["--yolo"] if yolo else ["--approval-mode", "auto_edit"]
        return RunSpec(argv, env)
    if name == "copilot":
        env.update(COPILOT_OFFLINE="true", COPILOT_PROVIDER_BASE_URL=f"{base_url}/v1",
                   COPILOT_PROVIDER_API_KEY=api_key, COPILOT_MODEL=model or "scripted-model")
        argv = [binary, "-p", prompt, "--output-format", "json"]
        if yolo:
            env["COPILOT_ALLOW_ALL"] = "true"
            argv.append("--allow-all-tools")
        else:
            # File edits only: without any allow flag, -p denies every tool ("no interactive user
            # response was available") and still exits 0.
            argv += ["--allow-tool", "write"]
        return RunSpec(argv, env)
    if name == "aider":
        env.update(OPENAI_API_KEY=api_key, OPENAI_API_BASE=f"{base_url}/v1", LITELLM_LOCAL_MODEL_COST_MAP="True")
        argv = [binary, "--model", f"openai/{model or 'scripted-model'}", "--edit-format", "diff",
                "--message", prompt, "--no-check-update", "--no-analytics", "--no-show-release-notes",
                "--no-gitignore", "--no-auto-commits", "--no-pretty", "--no-show-model-warnings",
                # Streaming requests carry no stream_options.include_usage, so aider counts the
                # reply's tokens with its own tokenizer; unary replies give the provider's usage.
                "--no-stream"]
        if yolo:
            argv.append("--yes-always")
        return RunSpec(argv, env)
    raise ValueError(f"unknown agent CLI {name!r}; known: {', '.join(CLIS)}")
