"""The ``gemini`` engine: Google's Gemini CLI (``gemini -p … --output-format json``), an
``agentic-coder``.

Command line: ``gemini --prompt=PROMPT --output-format json -m MODEL <approval>`` in the job's
``cwd``, stdin closed, with a private per-attempt HOME (:func:`.agentcli.attempt_home`) whose
``.gemini/settings.json`` selects API-key auth (else the CLI asks interactively) and turns off
auto-update and usage statistics; ``GEMINI_CLI_TRUST_WORKSPACE=true`` (a headless run cannot
answer the trust prompt).

Credential and base URL, from the factory's environment: ``GEMINI_API_KEY`` (required) and
``GOOGLE_GEMINI_BASE_URL`` when set (e.g. ``gigafactory model-server``'s root URL).

The model: the manifest's ``model``, else setting ``gemini_model`` (``GIGAFACTORY_GEMINI_MODEL``),
else ``gemini-2.5-pro``.
Always explicit: without ``-m`` the CLI's model router calls the model to classify the prompt
first (with the scripted model server, the run hung).

``yolo: true`` -> ``--yolo`` (every tool call approved); without it ``--approval-mode auto_edit``
(file edits approved, shell commands refused).

Output: one JSON document at the end on stdout, ``{session_id, response, stats: {models: {M:
{api, tokens: {input, prompt, candidates, cached, thoughts, tool}}}, tools, files}}``; on an API
error, ``{session_id, error: {type, message, code}}`` on stderr after a stack trace. stdout and
stderr share one stream here, so the parser takes a document as the lines from a line ``{`` to a
line ``}`` (both unindented; a stack trace never has them). Usage is priced per model (the CLI
may use more than one) from the price table (the shipped one, or setting ``price_table``). A 401 ends the run with exit code 145 (0.61.0)
and ``auth_failed``; a 429 is retried by the CLI with back-off, without end while the 429s last:
the job's ``timeout`` (or ``budget.wall``) is what bounds it, and the attempt then ends
``timeout``, with the rate limit named in its detail when the CLI printed one.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gigafactory.schemas.records import Usage

from . import agentcli, pricing, sessions
from .base import Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, require_cwd

MIN_VERSION = (0, 61, 0)
BELOW_VERSION = (1, 0, 0)
KEY_VAR = "GEMINI_API_KEY"
BASE_URL_VAR = "GOOGLE_GEMINI_BASE_URL"
MODEL_VAR = "GIGAFACTORY_GEMINI_MODEL"
DEFAULT_MODEL = "gemini-2.5-pro"
RESUME_PROJECT = "gigafactory-resumed"
"""The project name a resumed session is registered under in the new attempt's home."""
AUTH_EXIT_CODES = (41, 145)
"""Exit codes of an authentication failure: 41 (FatalAuthenticationError), 145 (a 401, 0.61.0)."""
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
"""A JSON document longer than this is dropped unread (the final stats are a few KiB)."""
_RETRY_RE = re.compile(r"Attempt (\d+) failed with status (\d+)")


class GeminiParser(agentcli.LineParser):
    """Reads ``gemini --output-format json`` output (stdout and stderr merged)."""

    def __init__(self) -> None:
        self._lines = agentcli.LineSplitter()
        self.session_id: str | None = None
        """The run's session id (:meth:`GeminiEngine.prepare` chose it or resumed it), recorded
        with each WIP checkpoint."""
        self._doc: list[str] | None = None
        self._doc_bytes = 0
        self.result: dict | None = None
        """The final document with ``stats``, once it was read."""
        self.error: dict | None = None
        """The ``error`` object of the error document, once it was read."""
        self.table: pricing.PriceTable | None = None
        """The price table (None: the shipped one); :meth:`GeminiEngine.prepare` sets the operator's."""
        self.retried_status: int | None = None
        """The status of the last request the CLI said it retries (``Attempt N failed with status 429``)."""

    def feed(self, chunk: bytes) -> list[Progress]:
        """Take the next chunk; returns progress (retries, the end) and usage.

        :param chunk: bytes of the merged stdout/stderr stream.
        """
        out: list[Progress] = []
        for line in self._lines.feed(chunk):
            out += self._line(line)
        # The document's closing brace is the CLI's last output, with no newline after it:
        # complete it now rather than when the stream ends (a reader may never be told).
        if self._doc is not None and self._lines.pending().rstrip() == "}":
            for line in self._lines.flush():
                out += self._line(line)
        return out

    def _line(self, line: str) -> list[Progress]:
        if self._doc is None:
            if line.rstrip() == "{":
                self._doc, self._doc_bytes = [line], len(line)
                return []
            m = _RETRY_RE.search(line)
            if m:
                self.retried_status = int(m.group(2))
                return [Progress("progress", {"event": "retry", "attempt": int(m.group(1)), "status": int(m.group(2))})]
            return []
        self._doc.append(line)
        self._doc_bytes += len(line) + 1
        if self._doc_bytes > MAX_DOCUMENT_BYTES:
            self._doc = None
            return []
        if line.rstrip() != "}":
            return []
        text, self._doc = "\n".join(self._doc), None
        try:
            doc = json.loads(text)
        except ValueError:
            return []
        if not isinstance(doc, dict):
            return []
        if isinstance(doc.get("error"), dict):
            self.error = doc["error"]
            return [Progress("progress", {"event": "error", "code": self.error.get("code"),
                                          "message": str(self.error.get("message"))[:2000]})]
        if isinstance(doc.get("stats"), dict):
            self.result = doc
            out = [Progress("progress", {"event": "result", "text": str(doc.get("response", ""))[:2000]})]
            usage = self.usage()
            if usage is not None:
                out.append(Progress("usage", {k: v for k, v in msgspec_to_dict(usage).items() if v is not None}))
            return out
        return []

    def usage(self) -> Usage | None:
        """What the run consumed, from the final stats, priced per model (None: no stats read).

        Per model: ``input`` (the uncached prompt; ``prompt - cached`` when absent) plus ``tool``
        (tool-use prompt tokens, billed as input) are the input tokens, ``cached`` the cache
        reads, ``candidates + thoughts`` the output. The record's model is the one with the most
        input; its cost is the sum over models, ``unknown`` if any model is not in the table.
        """
        if self.result is None:
            return None
        stats = self.result["stats"]
        models = stats.get("models") if isinstance(stats.get("models"), dict) else {}
        per_model: list[Usage] = []
        turns = 0
        for name, m in models.items():
            if not isinstance(m, dict) or not isinstance(m.get("tokens"), dict):
                continue
            t = m["tokens"]
            cached = _int(t.get("cached")) or 0
            prompt = _int(t.get("prompt"))
            uncached = _int(t.get("input"))
            if uncached is None and prompt is not None:
                uncached = max(0, prompt - cached)
            inputs = None if uncached is None else uncached + (_int(t.get("tool")) or 0)
            cand = _int(t.get("candidates"))
            outputs = None if cand is None else cand + (_int(t.get("thoughts")) or 0)
            per_model.append(pricing.price(Usage(model=name, input_tokens=inputs, output_tokens=outputs,
                                                 cache_read_tokens=cached), self.table))
            api = m.get("api") if isinstance(m.get("api"), dict) else {}
            turns += max(0, (_int(api.get("totalRequests")) or 0) - (_int(api.get("totalErrors")) or 0))
        if not per_model:
            return None
        tools = stats.get("tools") if isinstance(stats.get("tools"), dict) else {}
        main = max(per_model, key=lambda u: u.input_tokens or 0)
        priced = all(u.cost_source == "priced" for u in per_model)
        return Usage(
            model=main.model,
            input_tokens=_sum(u.input_tokens for u in per_model),
            output_tokens=_sum(u.output_tokens for u in per_model),
            cache_read_tokens=_sum(u.cache_read_tokens for u in per_model),
            turns=turns, tool_calls=_int(tools.get("totalCalls")),
            cost_usd=round(sum(u.cost_usd or 0.0 for u in per_model), 9) if priced else None,
            cost_source="priced" if priced else "unknown",
            price_table=main.price_table if priced else None,
        )


def msgspec_to_dict(usage: Usage) -> dict:
    """The usage's fields as a plain dict (for a ``usage`` event)."""
    return msgspec.structs.asdict(usage)


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _sum(values) -> int | None:
    vals = list(values)
    return None if any(v is None for v in vals) else sum(vals)


class GeminiEngine(Engine):
    """Runs Gemini CLI (see the module's docstring)."""

    name = "gemini"
    engine_class = "agentic-coder"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Installed, a version in [0.61.0, 1.0.0), and ``GEMINI_API_KEY`` set.

        :param environ: the factory's environment (the key is looked up here).
        :param path: the search path.
        :param timeout_s: limit for ``gemini --version``.
        """
        return agentcli.probe_cli("gemini", path=path, timeout_s=timeout_s, min_version=MIN_VERSION,
                                  below_version=BELOW_VERSION, credentials={KEY_VAR: bool(environ.get(KEY_VAR))})

    def prepare(self, job: EngineJob) -> Prepared:
        """The argv, the minimal environment and a fresh CLI home with its settings file.

        :param job: the attempt.
        """
        require_cwd(job)
        factory_env = os.environ
        binary = agentcli.require_binary("gemini")
        prompt = agentcli.require_prompt(job)
        home = agentcli.attempt_home(job, self.name)
        (home / ".gemini").mkdir()
        (home / ".gemini" / "settings.json").write_text(json.dumps({
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            "general": {"disableAutoUpdate": True},
            "privacy": {"usageStatisticsEnabled": False}}))
        env = agentcli.base_environment(job, binary, home, factory_env, (KEY_VAR, BASE_URL_VAR))
        env["GEMINI_CLI_TRUST_WORKSPACE"] = "true"
        settings = agentcli.settings_of(job)
        model = job.manifest.model or settings.gemini_model or DEFAULT_MODEL
        if isinstance(job.parser, GeminiParser):
            job.parser.table = agentcli.price_table(settings)
        # --prompt=TEXT, one argument: a body starting with "-" (a markdown list) is not an option.
        argv = [binary, f"--prompt={prompt}", "--output-format", "json", "-m", model]
        argv += ["--yolo"] if job.manifest.yolo else ["--approval-mode", "auto_edit"]
        # The session id is chosen here (its JSON names it only at the end: a checkpoint taken
        # mid-run must know it), or it is the earlier attempt's, resumed (:mod:`.sessions`).
        resumed = self._resumable(job, home)
        session = resumed or str(uuid.uuid4())
        argv += ["--resume", session] if resumed else ["--session-id", session]
        if isinstance(job.parser, GeminiParser):
            job.parser.session_id = session
        return Prepared(cwd=job.cwd, env=env, argv=argv)

    def _resumable(self, job: EngineJob, home: Path) -> str | None:
        """The earlier attempt's session id when its chat was kept on this factory and is now
        in the new home, registered for the new worktree; else None (the note is all it gets).
        Gemini looks sessions up per project (``~/.gemini/tmp/<project>/chats``, the project
        named in ``~/.gemini/projects.json`` by its folder), so the chat goes under a project
        registered for this attempt's working directory."""
        sid = job.resume.session if job.resume is not None else None
        chats = home / ".gemini" / "tmp" / RESUME_PROJECT / "chats"
        if not sid or not sessions.restore(sessions.store_dir(job.log_path, self.name), sid, chats):
            return None
        cwd = os.path.realpath(job.cwd)
        (home / ".gemini" / "projects.json").write_text(json.dumps({"projects": {cwd: RESUME_PROJECT}}))
        for where in ("tmp", "history"):
            (home / ".gemini" / where / RESUME_PROJECT).mkdir(parents=True, exist_ok=True)
            (home / ".gemini" / where / RESUME_PROJECT / ".project_root").write_text(cwd)
        return sid

    def _keep_session(self, job: EngineJob, session: str | None):
        """What runs before the attempt's home is removed: keep the session's chat file
        (``~/.gemini/tmp/*/chats/session-*-<first 8 of the id>.json[l]``) for a later attempt."""
        def keep(prepared: Prepared) -> None:
            if not session or not sessions.SESSION_ID_RE.fullmatch(session):
                return
            for chats in Path(prepared.env.get("HOME", "/nonexistent"), ".gemini", "tmp").glob("*/chats"):
                files = [p for p in chats.glob(f"session-*-{session[:8]}.json*") if p.is_file()]
                if files and sessions.keep(files, chats, sessions.store_dir(job.log_path, self.name), session):
                    return
        return keep

    def parser(self) -> OutputParser:
        """A fresh :class:`GeminiParser`."""
        return GeminiParser()

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run it, reading its output as it streams, and classify how it ended.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` built.
        """
        reader = GeminiParser()
        reader.table = agentcli.price_table(agentcli.settings_of(job))
        argv = prepared.argv
        flag = "--resume" if "--resume" in argv else "--session-id" if "--session-id" in argv else None
        session = argv[argv.index(flag) + 1] if flag else None
        res = await agentcli.run_reading(job, prepared, reader.feed, self._keep_session(job, session))
        if isinstance(res, Outcome):
            return res
        reader.finish()
        error = None
        if reader.error is not None:
            error = f"{reader.error.get('code', '')} {reader.error.get('message', '')}".strip()
        elif res.exit_code in AUTH_EXIT_CODES:
            error = f"401 authentication failed (exit code {res.exit_code})"
        out = agentcli.classify_run(res, job, reader.usage(), error)
        if res.timed_out and reader.retried_status == 429:
            # The CLI retries 429s without end: say why it ran out of time.
            return Outcome(out.failure, f"{out.detail} while the provider kept answering 429 (rate limited)",
                           out.exit_code, usage=out.usage)
        return out


__all__ = ["GeminiEngine", "GeminiParser"]
