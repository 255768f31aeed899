"""The ``copilot`` engine: GitHub Copilot CLI (``copilot -p … --output-format json``), an
``agentic-coder``.

Command line: ``copilot --prompt=PROMPT --output-format json <tools>`` in the job's ``cwd``,
stdin closed, with a private per-attempt ``HOME`` (:func:`.agentcli.attempt_home`).

Provider and credential, from the factory's environment:

- ``COPILOT_PROVIDER_BASE_URL`` set (an OpenAI-compatible Chat Completions endpoint such as
  ``http://127.0.0.1:8080/v1``, or ``gigafactory model-server``'s ``/v1``): the CLI's
  bring-your-own-key mode, ``COPILOT_OFFLINE=true`` (no GitHub login), the key in
  ``COPILOT_PROVIDER_API_KEY``;
- else GitHub's service with a token in ``COPILOT_GITHUB_TOKEN``, ``GH_TOKEN`` or ``GITHUB_TOKEN``.

The model: the manifest's ``model``, else setting ``copilot_model`` (``GIGAFACTORY_COPILOT_MODEL``),
else ``COPILOT_MODEL``
(passed as ``COPILOT_MODEL``), else the CLI's default; with ``COPILOT_PROVIDER_BASE_URL`` a model
is required (the CLI refuses to start without one), so its absence is ``setup_failed`` at prepare.

``yolo: true`` -> ``--allow-all-tools`` and ``COPILOT_ALLOW_ALL=true`` (every tool, shell
commands included); without it ``--allow-tool write`` (file edits only: any other tool is
denied, the run still exits 0, and the denials are named in the attempt's detail).

Output: JSONL events. ``assistant.message`` (text and tool requests), ``tool.execution_complete``
and ``assistant.turn_retry`` become progress; the final ``result`` event has premium requests,
durations and lines changed but NO token counts, and no other event has them (checked with
1.0.102: ``model.call_*``, ``assistant.*`` and ``session.*`` carry none either): usage is the
model, the turns (model replies) and tool calls it shows, and the result's premium requests
(``premium_requests``). On GitHub's service the cost is priced per premium request from the price
table's ``requests.copilot-premium-request`` (``cost_source: priced``, ``cost_note`` says it is
per request, not per token); in bring-your-own-key mode it is ``unknown`` (the provider bills
tokens the CLI does not report). ``session.error`` {errorType ``rate_limit`` | ``authentication``,
statusCode} says how a failed run ended (exit code 1): ``rate_limited`` (with the provider's
retry-after when its message, quoted after "Last error:", says one: "try again in 7s") /
``auth_failed``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gigafactory.schemas.records import Usage

from . import agentcli, pricing, sessions
from .base import Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed, require_cwd

MIN_VERSION = (1, 0, 102)
BELOW_VERSION = (2, 0, 0)
BASE_URL_VAR = "COPILOT_PROVIDER_BASE_URL"
KEY_VAR = "COPILOT_PROVIDER_API_KEY"
MODEL_VAR = "GIGAFACTORY_COPILOT_MODEL"
GITHUB_TOKEN_VARS = ("COPILOT_GITHUB_TOKEN", "GH_TOKEN", "GITHUB_TOKEN")
OWN_VARS = (BASE_URL_VAR, KEY_VAR, "COPILOT_PROVIDER_TYPE", "COPILOT_MODEL", *GITHUB_TOKEN_VARS)
PREMIUM_REQUEST = "copilot-premium-request"
"""The price-table entry (``requests``) a premium request is priced with."""
MAX_OPEN_TOOL_CALLS = 1000
"""Tool calls started and not yet completed whose names are kept (to name a denied one)."""
_ERROR_TYPES = {"rate_limit": "429 rate limit", "authentication": "401 authentication"}


def _credentials(environ: Mapping[str, str]) -> dict[str, bool]:
    """The credential the mode in use needs: the provider key in BYOK mode, else a GitHub token."""
    if environ.get(BASE_URL_VAR):
        return {KEY_VAR: bool(environ.get(KEY_VAR))}
    for var in GITHUB_TOKEN_VARS:
        if environ.get(var):
            return {var: True}
    return {"/".join(GITHUB_TOKEN_VARS): False}


class CopilotParser(agentcli.LineParser):
    """Reads ``copilot -p --output-format json`` output: progress, the usage it shows, and how a
    failed run ended."""

    def __init__(self) -> None:
        self._lines = agentcli.LineSplitter()
        self.session_id: str | None = None
        """The run's session id (:meth:`CopilotEngine.prepare` chose it or resumed it), recorded
        with each WIP checkpoint."""
        self.byok = True
        """Bring-your-own-key mode (``COPILOT_PROVIDER_BASE_URL``): the provider bills tokens the
        CLI does not report, so premium requests are recorded but not priced. Set by
        :meth:`CopilotEngine.prepare`; True until then (never price what may not be GitHub's)."""
        self.table: pricing.PriceTable | None = None
        """The price table (None: the shipped one)."""
        self.model: str | None = None
        self.turns = 0
        self.tool_calls = 0
        self.denied: list[str] = []
        """Tools the CLI did not run (denied: not allowed without ``yolo``)."""
        self.error: dict | None = None
        """The last ``session.error`` event's data, if the session failed."""
        self.result: dict | None = None
        """The final ``result`` event, once read."""
        self._tool_names: dict[str, str] = {}

    def _line(self, line: str) -> list[Progress]:
        line = line.strip()
        if not line.startswith("{"):
            return []
        try:
            ev = json.loads(line)
        except ValueError:
            return []
        if not isinstance(ev, dict):
            return []
        kind = ev.get("type")
        data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
        if kind == "session.tools_updated" and isinstance(data.get("model"), str):
            self.model = self.model or data["model"]
            return []
        if kind == "assistant.message":
            self.turns += 1
            if isinstance(data.get("model"), str):
                self.model = data["model"]
            tools = [t.get("name") for t in data.get("toolRequests") or [] if isinstance(t, dict)]
            progress = {"event": kind, "text": str(data.get("content") or "")[:2000], "tools": tools}
            return [Progress("progress", progress), *self._usage_event()]
        if kind == "tool.execution_complete":
            result = data.get("result") if isinstance(data.get("result"), dict) else {}
            tool = self._tool_names.pop(str(data.get("toolCallId")), "a tool")
            if data.get("success") is True:
                self.tool_calls += 1
            else:
                err = data.get("error")
                why = err.get("message") if isinstance(err, dict) else (err or result.get("content") or "not run")
                self.denied.append(f"{tool}: {why}"[:300])
            return [Progress("progress", {"event": kind, "success": data.get("success") is True,
                                          "message": str(result.get("content") or "")[:2000]}),
                    *self._usage_event()]
        if kind == "tool.execution_start":
            if len(self._tool_names) < MAX_OPEN_TOOL_CALLS:
                self._tool_names[str(data.get("toolCallId"))] = str(data.get("toolName"))[:100]
            return [Progress("progress", {"event": kind, "tool": str(data.get("toolName"))[:100]})]
        if kind == "assistant.turn_retry":
            return [Progress("progress", {"event": "retry", "reason": str(data.get("reason"))})]
        if kind == "session.error":
            self.error = data
            return [Progress("progress", {"event": "error", "type": str(data.get("errorType")),
                                          "status": data.get("statusCode"),
                                          "message": str(data.get("message"))[:2000]})]
        if kind == "result":
            self.result = ev
            usage = ev.get("usage") if isinstance(ev.get("usage"), dict) else {}
            changes = usage.get("codeChanges") if isinstance(usage.get("codeChanges"), dict) else {}
            return [Progress("progress", {"event": "result", "exit_code": ev.get("exitCode"),
                                          "premium_requests": usage.get("premiumRequests"),
                                          "lines_added": changes.get("linesAdded"),
                                          "lines_removed": changes.get("linesRemoved")}),
                    *self._usage_event()]
        return []

    def _usage_event(self) -> list[Progress]:
        u = self.usage()
        return [] if u is None else [agentcli.usage_progress(u)]

    def premium_requests(self) -> float | None:
        """The premium requests the final ``result`` event reports (None: no result yet, or
        none said)."""
        usage = self.result.get("usage") if self.result is not None else None
        n = usage.get("premiumRequests") if isinstance(usage, dict) else None
        return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0 else None

    def usage(self) -> Usage | None:
        """What the run showed so far: model, turns, tool calls, and once the result came its
        premium requests. No tokens (the CLI reports none), so the cost is priced per premium
        request on GitHub's service (``priced``, with ``cost_note`` saying so) and ``unknown`` in
        bring-your-own-key mode (the provider bills tokens nobody reported). None before the
        first model reply."""
        if self.turns == 0:
            return None
        usage = Usage(model=self.model, turns=self.turns, tool_calls=self.tool_calls, cost_source="unknown")
        requests = self.premium_requests()
        if self.byok:
            return msgspec.structs.replace(usage, premium_requests=requests)
        return pricing.price_per_request(usage, PREMIUM_REQUEST, requests, self.table)

    def error_text(self) -> str | None:
        """The failed session's error as one line (``429 rate limit: …``), or None."""
        if self.error is None:
            return None
        kind = str(self.error.get("errorType"))
        return f"{self.error.get('statusCode', '')} {_ERROR_TYPES.get(kind, kind)}: {self.error.get('message')}".strip()


class CopilotEngine(Engine):
    """Runs GitHub Copilot CLI (see the module's docstring)."""

    name = "copilot"
    engine_class = "agentic-coder"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Installed, a version in [1.0.102, 2.0.0), and its credential set (the provider key
        with ``COPILOT_PROVIDER_BASE_URL``, else a GitHub token).

        :param environ: the factory's environment (the credential is looked up here).
        :param path: the search path.
        :param timeout_s: limit for ``copilot --version``.
        """
        return agentcli.probe_cli("copilot", path=path, timeout_s=timeout_s, min_version=MIN_VERSION,
                                  below_version=BELOW_VERSION, credentials=_credentials(environ))

    def prepare(self, job: EngineJob) -> Prepared:
        """The argv, the minimal environment and a fresh CLI home (see the module's docstring).

        :param job: the attempt.
        """
        require_cwd(job)
        factory_env = os.environ
        binary = agentcli.require_binary("copilot")
        prompt = agentcli.require_prompt(job)
        base_url = factory_env.get(BASE_URL_VAR)
        if base_url and not base_url.startswith(("http://", "https://")):
            msg = (f"{BASE_URL_VAR}={base_url!r} is not an http(s) URL: set it to the provider's Chat Completions "
                   "root, e.g. http://127.0.0.1:8080/v1, or unset it for GitHub's service")
            raise SetupFailed(msg, msg + "\n")
        home = agentcli.attempt_home(job, self.name)
        env = agentcli.base_environment(job, binary, home, factory_env, OWN_VARS)
        if base_url:
            env["COPILOT_OFFLINE"] = "true"  # bring-your-own-key: no GitHub login, no telemetry
        settings = agentcli.settings_of(job)
        if isinstance(job.parser, CopilotParser):
            job.parser.byok, job.parser.table = bool(base_url), agentcli.price_table(settings)
        model = job.manifest.model or settings.copilot_model or factory_env.get("COPILOT_MODEL")
        if base_url and not model:
            # The CLI would exit 1 with "BYOK providers require an explicit model", before any call.
            msg = (f"copilot with {BASE_URL_VAR} needs a model: set the job's `model:`, or "
                   f"{MODEL_VAR} (or COPILOT_MODEL) in the factory's environment")
            shutil.rmtree(home, ignore_errors=True)
            raise SetupFailed(msg, msg + "\n")
        if model:
            env["COPILOT_MODEL"] = model
        # --prompt=TEXT, one argument: a body starting with "-" (a markdown list) is not an option.
        argv = [binary, f"--prompt={prompt}", "--output-format", "json"]
        if job.manifest.yolo:
            env["COPILOT_ALLOW_ALL"] = "true"
            argv.append("--allow-all-tools")
        else:
            # Without any allow flag -p denies every tool (and exits 0): allow file edits only.
            argv += ["--allow-tool", "write"]
        # The session id is chosen here (its JSON names it only in the final `result`: a
        # checkpoint taken mid-run must know it); `--session-id` of a session whose state is in
        # the home resumes it (the earlier attempt's, kept on this factory: :mod:`.sessions`).
        session = self._resumable(job, home) or str(uuid.uuid4())
        argv += ["--session-id", session]
        if isinstance(job.parser, CopilotParser):
            job.parser.session_id = session
        return Prepared(cwd=job.cwd, env=env, argv=argv)

    def _resumable(self, job: EngineJob, home: Path) -> str | None:
        """The earlier attempt's session id when its state was kept on this factory and is now in
        the new home (``~/.copilot/session-state/<id>/``); else None (the note is all it gets)."""
        sid = job.resume.session if job.resume is not None else None
        if sid and sessions.restore(sessions.store_dir(job.log_path, self.name), sid, home / ".copilot"):
            return sid
        return None

    def _keep_session(self, job: EngineJob, session: str | None):
        """What runs before the attempt's home is removed: keep the session's state folder
        (its events and checkpoints, not its lock files) for a later attempt."""
        def keep(prepared: Prepared) -> None:
            root = Path(prepared.env.get("HOME", "/nonexistent"), ".copilot")
            if session and sessions.SESSION_ID_RE.fullmatch(session):
                files = [p for p in (root / "session-state" / session).rglob("*")
                         if p.is_file() and not p.name.endswith(".lock")]
                sessions.keep(files, root, sessions.store_dir(job.log_path, self.name), session)
        return keep

    def parser(self) -> OutputParser:
        """A fresh :class:`CopilotParser`."""
        return CopilotParser()

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run it, reading its events as they stream, and classify how it ended.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` built.
        """
        reader = CopilotParser()
        reader.byok = bool(prepared.env.get("COPILOT_OFFLINE"))
        reader.table = agentcli.price_table(agentcli.settings_of(job))
        argv = prepared.argv
        session = argv[argv.index("--session-id") + 1] if "--session-id" in argv else None
        res = await agentcli.run_reading(job, prepared, reader.feed, self._keep_session(job, session))
        if isinstance(res, Outcome):
            return res
        reader.finish()
        out = agentcli.classify_run(res, job, reader.usage(), reader.error_text())
        if out.failure is None and reader.denied:
            # It exits 0 when tools were denied: say so (the verify gate judges the work).
            return Outcome(None, f"{out.detail}; {len(reader.denied)} tool call(s) denied (yolo is off): "
                                 f"{reader.denied[0]}", out.exit_code, usage=out.usage,
                           retry_after_s=out.retry_after_s)
        return out


__all__ = ["CopilotEngine", "CopilotParser"]
