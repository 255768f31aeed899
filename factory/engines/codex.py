"""The ``codex`` engine: OpenAI's Codex CLI (``codex exec --json``), an ``agentic-coder``.

Command line: ``codex exec --json --skip-git-repo-check [-m MODEL] [provider] <sandbox> -- PROMPT``
in the job's ``cwd``, stdin closed, with a private per-attempt ``CODEX_HOME``/``HOME``
(:func:`.agentcli.attempt_home`).

Provider and credential, from the factory's environment:

- setting ``codex_base_url`` (``GIGAFACTORY_CODEX_BASE_URL``) set (an OpenAI-compatible Responses endpoint such as
  ``http://127.0.0.1:8080/v1``, or ``gigafactory model-server``'s ``/v1``): a custom provider
  ``gigafactory`` with that base URL whose key is read from the variable named by setting
  ``codex_api_key_var`` (``GIGAFACTORY_CODEX_API_KEY_VAR``, default ``OPENAI_API_KEY``), with at most
  ``stream_max_retries=2`` retries of a failed stream (Gigafactory retries rate-limited attempts
  itself);
- else Codex's built-in OpenAI provider with ``OPENAI_API_KEY`` (and ``OPENAI_BASE_URL`` when set).

The model: the manifest's ``model``, else setting ``codex_model`` (``GIGAFACTORY_CODEX_MODEL``),
else the CLI's own default (then the cost is ``unknown``: Codex's events do not name the model).

``yolo: true`` -> ``--dangerously-bypass-approvals-and-sandbox`` (no sandbox, no approvals);
without it ``--sandbox workspace-write`` (exec mode never asks for approval; writes are confined
to the working directory, which needs Landlock/seccomp or bubblewrap on the host).

Output: JSONL events. ``item.started``/``item.completed`` (agent messages, command executions,
file changes, tool calls) become progress; ``turn.completed.usage`` {input_tokens,
cached_input_tokens, cache_write_input_tokens, output_tokens, reasoning_output_tokens} becomes
usage (priced from the price table, the shipped one or setting ``price_table``: Codex reports no
cost), with ``turns`` = the ``turn.completed`` events (Codex's own turns: one per ``exec`` prompt;
its events do not show the model requests inside a turn) and ``tool_calls`` = completed command,
file-change, MCP and web-search items; ``turn.failed`` and ``error``
events say how a failed run ended (429 / "exceeded retry limit" -> ``rate_limited``, 401 ->
``auth_failed``, context window -> ``context_overflow``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from gigafactory import agent_clis
from gigafactory.config import Settings
from gigafactory.schemas.records import Usage

from . import agentcli, pricing, sessions
from .base import Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed, require_cwd

MIN_VERSION = (0, 169, 0)
BELOW_VERSION = (1, 0, 0)
BASE_URL_VAR = "GIGAFACTORY_CODEX_BASE_URL"
KEY_VAR_VAR = "GIGAFACTORY_CODEX_API_KEY_VAR"
MODEL_VAR = "GIGAFACTORY_CODEX_MODEL"
DEFAULT_KEY_VAR = "OPENAI_API_KEY"
STREAM_MAX_RETRIES = 2
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOOL_ITEMS = ("command_execution", "file_change", "mcp_tool_call", "web_search")


def _key_var(settings: Settings) -> str:
    name = settings.codex_api_key_var or DEFAULT_KEY_VAR
    if not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(f"{KEY_VAR_VAR}={name!r} is not an environment variable name: name the variable "
                         "that holds the provider's API key (e.g. OPENAI_API_KEY)")
    return name


class CodexParser(agentcli.LineParser):
    """Reads ``codex exec --json`` output: progress, usage, and how a failed run ended.

    :param model: the model the run asked for (Codex's events do not name it), for pricing.
    """

    def __init__(self, model: str | None = None) -> None:
        self._lines = agentcli.LineSplitter()
        self.model = model
        self.table: pricing.PriceTable | None = None
        """The price table (None: the shipped one); :meth:`CodexEngine.prepare` sets the operator's."""
        self.input_tokens: int | None = None
        self.cached_input_tokens: int | None = None
        self.cache_write_tokens: int | None = None
        self.output_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.tool_calls = 0
        self.turns_completed = 0
        self.failed: str | None = None
        """The message of ``turn.failed`` (else of the last ``error`` event), if the run failed."""
        self.last_error: str | None = None
        self.session_id: str | None = None
        """The thread id of ``thread.started`` (Codex's session: ``codex exec resume <id>``);
        recorded with each WIP checkpoint."""

    def _line(self, line: str) -> list[Progress]:
        line = line.strip()
        if not line.startswith("{"):
            return []  # stderr's warnings share the stream
        try:
            ev = json.loads(line)
        except ValueError:
            return []
        if not isinstance(ev, dict):
            return []
        kind = ev.get("type")
        if kind == "thread.started" and isinstance(ev.get("thread_id"), str):
            self.session_id = ev["thread_id"][:128]
            return []
        if kind in ("item.started", "item.completed") and isinstance(ev.get("item"), dict):
            item = ev["item"]
            itype = item.get("type")
            if kind == "item.completed" and itype in _TOOL_ITEMS:
                self.tool_calls += 1
            data: dict[str, object] = {"event": kind, "item": itype}
            for k in ("text", "command", "exit_code", "status", "message"):
                if k in item and item[k] is not None:
                    data[k] = item[k] if not isinstance(item[k], str) else item[k][:2000]
            return [Progress("progress", data)]
        if kind == "turn.completed" and isinstance(ev.get("usage"), dict):
            self.turns_completed += 1
            u = ev["usage"]
            self.input_tokens = _add(self.input_tokens, u.get("input_tokens"))
            self.cached_input_tokens = _add(self.cached_input_tokens, u.get("cached_input_tokens"))
            self.cache_write_tokens = _add(self.cache_write_tokens, u.get("cache_write_input_tokens"))
            self.output_tokens = _add(self.output_tokens, u.get("output_tokens"))
            self.reasoning_tokens = _add(self.reasoning_tokens, u.get("reasoning_output_tokens"))
            return [agentcli.usage_progress(self.usage())]
        if kind == "turn.failed":
            err = ev.get("error")
            self.failed = str(err.get("message") if isinstance(err, dict) else err)[:2000]
            return [Progress("progress", {"event": kind, "message": self.failed})]
        if kind == "error":
            self.last_error = str(ev.get("message"))[:2000]
            return [Progress("progress", {"event": kind, "message": self.last_error})]
        return []

    def usage(self) -> Usage | None:
        """What the run consumed so far, priced (None: no ``turn.completed`` yet).

        Codex counts cached input inside ``input_tokens`` (OpenAI's convention); the record's
        ``input_tokens`` are the uncached ones, so the cached are taken out. Reasoning tokens
        are inside ``output_tokens`` already.
        """
        if self.turns_completed == 0:
            return None
        cached = self.cached_input_tokens or 0
        writes = self.cache_write_tokens or 0
        inputs = None if self.input_tokens is None else max(0, self.input_tokens - cached - writes)
        return pricing.price(Usage(
            model=self.model, input_tokens=inputs, output_tokens=self.output_tokens,
            cache_read_tokens=self.cached_input_tokens, cache_write_tokens=self.cache_write_tokens,
            # Codex's own turns (``turn.completed``: one per prompt, so 1 for ``codex exec``); its
            # events carry no count of the model requests inside a turn.
            turns=self.turns_completed, tool_calls=self.tool_calls,
        ), self.table)


def _add(total: int | None, v: object) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return total
    return v if total is None else total + v


class CodexEngine(Engine):
    """Runs Codex CLI (see the module's docstring)."""

    name = "codex"
    engine_class = "agentic-coder"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Installed, a version in [0.169.0, 1.0.0), and its key variable set.

        :param environ: the factory's environment (the key is looked up here).
        :param path: the search path.
        :param timeout_s: limit for ``codex --version``.
        """
        try:
            key = _key_var(Settings.from_env(dict(environ)))
        except ValueError as e:  # SettingsError too
            return ProbeResult(False, why=str(e))
        return agentcli.probe_cli("codex", path=path, timeout_s=timeout_s, min_version=MIN_VERSION,
                                  below_version=BELOW_VERSION, credentials={key: bool(environ.get(key))})

    def model(self, job: EngineJob, settings: Settings | None = None) -> str | None:
        """The model the attempt asks for: the manifest's, else setting ``codex_model``
        (``GIGAFACTORY_CODEX_MODEL``).

        :param job: the attempt.
        :param settings: the factory's settings (None: :func:`.agentcli.settings_of`).
        """
        s = settings or agentcli.settings_of(job)
        return job.manifest.model or s.codex_model or None

    def prepare(self, job: EngineJob) -> Prepared:
        """The argv, the minimal environment and a fresh CLI home (see the module's docstring).

        :param job: the attempt.
        """
        require_cwd(job)
        factory_env = os.environ  # only for the variables passed to the CLI (its key)
        settings = agentcli.settings_of(job)
        binary = agentcli.require_binary("codex")
        prompt = agentcli.require_prompt(job)
        try:
            key_var = _key_var(settings)
        except ValueError as e:
            raise SetupFailed(str(e), f"{e}\n") from None
        base_url = settings.codex_base_url
        if base_url and not base_url.startswith(("http://", "https://")):
            msg = (f"{BASE_URL_VAR}={base_url!r} is not an http(s) URL: set it to the provider's Responses API "
                   "root, e.g. http://127.0.0.1:8080/v1, or unset it for OpenAI")
            raise SetupFailed(msg, msg + "\n")
        home = agentcli.attempt_home(job, self.name)
        (home / ".codex").mkdir()
        env = agentcli.base_environment(job, binary, home, factory_env,
                                        (key_var, "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"))
        env["CODEX_HOME"] = str(home / ".codex")
        if not job.manifest.yolo and (bundled := agent_clis.codex_bundled_bwrap_dir(binary)) is not None:
            env["PATH"] = os.pathsep.join([str(bundled), env["PATH"]])
        argv = [binary, "exec", "--json", "--skip-git-repo-check"]
        model = self.model(job, settings)
        if isinstance(job.parser, CodexParser):
            # The factory's reader (its usage events, the budget) prices what it reads: it must
            # know the model (Codex's events do not name it) and the operator's table.
            job.parser.model, job.parser.table = model, agentcli.price_table(settings)
        if model:
            argv += ["-m", model]
        if base_url:
            # json.dumps gives a TOML basic string (same escapes for what a URL can hold).
            provider = (f"model_providers.gigafactory={{name=\"gigafactory\", base_url={json.dumps(base_url)}, "
                        f"env_key=\"{key_var}\", wire_api=\"responses\", stream_max_retries={STREAM_MAX_RETRIES}}}")
            argv += ["-c", "model_provider=gigafactory", "-c", provider]
        session = self._resumable(job, home)
        if job.manifest.yolo:
            argv += ["--dangerously-bypass-approvals-and-sandbox"]
        else:  # `exec resume` has no --sandbox: the same policy as a config value
            argv += ["-c", 'sandbox_mode="workspace-write"'] if session else ["--sandbox", "workspace-write"]
        if session:
            # `codex exec resume [OPTIONS] SESSION_ID PROMPT`: the earlier attempt's conversation.
            argv.insert(2, "resume")
        # After "--": a body starting with "-" (a markdown list) is the prompt, not an option.
        argv += ["--", *([session] if session else []), prompt]
        return Prepared(cwd=job.cwd, env=env, argv=argv)

    def _resumable(self, job: EngineJob, home) -> str | None:
        """The earlier attempt's session id when its transcript was kept on this factory and is
        now in the new home (:mod:`.sessions`); else None (the resume note is all it gets)."""
        sid = job.resume.session if job.resume is not None else None
        if sid and sessions.restore(sessions.store_dir(job.log_path, self.name), sid, home / ".codex"):
            return sid
        return None

    def _keep_session(self, job: EngineJob, reader: "CodexParser"):
        """What runs before the attempt's home is removed: keep the session's transcript
        (``$CODEX_HOME/sessions/**/rollout-*-<thread id>.jsonl``) for a later attempt."""
        def keep(prepared: Prepared) -> None:
            sid = reader.session_id
            root = Path(prepared.env.get("CODEX_HOME", "/nonexistent"))
            if sid and sessions.SESSION_ID_RE.fullmatch(sid):
                files = [p for p in (root / "sessions").glob(f"**/rollout-*{sid}.jsonl") if p.is_file()]
                sessions.keep(files, root, sessions.store_dir(job.log_path, self.name), sid)
        return keep

    def parser(self) -> OutputParser:
        """A fresh :class:`CodexParser` (the model unknown to it: progress and token counts)."""
        return CodexParser()

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run it, reading its events as they stream, and classify how it ended.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` built.
        """
        model = prepared.argv[prepared.argv.index("-m") + 1] if "-m" in prepared.argv else None
        reader = CodexParser(model)
        reader.table = agentcli.price_table(agentcli.settings_of(job))
        res = await agentcli.run_reading(job, prepared, reader.feed, self._keep_session(job, reader))
        if isinstance(res, Outcome):
            return res
        reader.finish()
        return agentcli.classify_run(res, job, reader.usage(), reader.failed or (reader.last_error if res.exit_code else None))


__all__ = ["CodexEngine", "CodexParser"]
