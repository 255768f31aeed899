"""The ``aider`` engine: Aider (``aider --message …``), an ``agentic-coder`` that edits files
through SEARCH/REPLACE blocks in its replies (it declares no tools to the model).

Command line: ``aider --model openai/M --edit-format diff --message=PROMPT --no-check-update
--no-analytics --no-show-release-notes --no-gitignore --no-auto-commits --no-dirty-commits
--no-pretty --no-show-model-warnings --no-stream --chat-history-file H --input-history-file H
<approval>`` in the job's ``cwd``, stdin closed, with a private per-attempt ``HOME``
(:func:`.agentcli.attempt_home`; the history files go there, not into the repository; the
repo-map cache it writes into the repository's root is removed after the run). Aider never
commits: the factory does. It runs from its own virtualenv (``scripts/install-agent-clis``).

Credential and base URL, from the factory's environment: ``OPENAI_API_KEY`` (required) and
``OPENAI_API_BASE`` when set (an OpenAI-compatible Chat Completions endpoint, e.g.
``gigafactory model-server``'s ``/v1``). ``LITELLM_LOCAL_MODEL_COST_MAP=True``: litellm reads its
bundled model map instead of fetching it from GitHub at every start.

The model: the manifest's ``model``, else setting ``aider_model`` (``GIGAFACTORY_AIDER_MODEL``),
else ``gpt-4.1``; a name
without a provider prefix is sent as ``openai/<name>`` (the OpenAI-compatible endpoint).
``--no-stream``: a unary reply carries the provider's own token counts.

``yolo: true`` -> ``--yes-always`` (every confirmation, shell commands included); without it
``--no-suggest-shell-commands`` (file edits only: with stdin closed its prompts take their
defaults, which create and edit files).

Output: plain text. After each model reply ``Tokens: 2.6k sent, 27 received.`` (with ``N cache
write`` / ``N cache hit`` when the provider reports them); counts of 1,000 and more are rounded
(``2.6k``), so a cost priced from them is ``estimated`` (else ``priced``) from the price table (the
shipped one, or setting ``price_table``).
``Applied edit to F`` counts as a tool call. Aider exits 0 on a 401 and after giving up on a
lasting 429 (about 95 s of retries): how it ended is read from its text, ``litellm.
AuthenticationError`` -> ``auth_failed``, ``litellm.RateLimitError`` -> ``rate_limited``,
``litellm.ContextWindowExceededError`` -> ``context_overflow``, another ``litellm.*Error`` -> ``crash``
(an error a later reply followed, a 429 retried away, is forgotten). The job's ``timeout`` bounds
its 429 retries; the attempt then ends ``timeout`` with the rate limit named in its detail.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping

import msgspec

from gigafactory.config import Settings
from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.records import Usage

from . import agentcli, pricing
from .base import Engine, EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed, require_cwd

MIN_VERSION = (0, 86, 0)
BELOW_VERSION = (0, 87, 0)
KEY_VAR = "OPENAI_API_KEY"
BASE_URL_VAR = "OPENAI_API_BASE"
MODEL_VAR = "GIGAFACTORY_AIDER_MODEL"
DEFAULT_MODEL = "gpt-4.1"
TAGS_CACHE_DIRS = (".aider.tags.cache.v4",)
"""Aider's repo-map cache folder(s) in the repository's root (0.86: v4), removed after the run."""
_TOKENS_RE = re.compile(r"^Tokens: (.*?)\.?\s*(?:Cost:.*)?$")
_COUNT_RE = re.compile(r"([\d.]+)(k?) (sent|cache write|cache hit|received)")
# At the start of a line, or after a confirmation prompt that took its default ("…[Yes]: Applied …").
_APPLIED_RE = re.compile(r"(?:^|\]: )Applied edit to (\S.*)$")
_ERROR_RE = re.compile(r"litellm\.(\w+Error)\b:?\s*(.*)$")
_ERROR_CLASSES = {"AuthenticationError": "auth_failed", "PermissionDeniedError": "auth_failed",
                  "RateLimitError": "rate_limited", "ContextWindowExceededError": "context_overflow"}


def _count(number: str, k: str) -> tuple[int, bool]:
    """A token count as aider prints it (``27``, ``2.6k``, ``15k``) and whether it was rounded."""
    if not k:
        return int(float(number)), False
    return round(float(number) * 1000), True


class AiderParser(agentcli.LineParser):
    """Reads aider's text output: token lines, applied edits, and litellm errors.

    :param model: the model the run asked for (aider's token lines do not name it), for pricing.
    """

    def __init__(self, model: str | None = None) -> None:
        self._lines = agentcli.LineSplitter()
        # The record names the model as the operator did, not litellm's route ("openai/").
        self.model = model.removeprefix("openai/") if model else model
        self.sent = 0
        self.received = 0
        self.cache_write = 0
        self.cache_hit = 0
        self.table: pricing.PriceTable | None = None
        """The price table (None: the shipped one); :meth:`AiderEngine.prepare` sets the operator's."""
        self.rounded = False
        """Some count was printed rounded (``2.6k``)."""
        self.turns = 0
        self.edits = 0
        self.error: tuple[str, str] | None = None
        """(litellm error class, the rest of the line and the next) of the last error printed."""
        self._error_open = False

    def _line(self, line: str) -> list[Progress]:
        line = line.rstrip()
        if self._error_open:
            # The message wraps onto the next line ("Invalid API \nkey (scripted)."): keep one more.
            self._error_open = False
            if line and self.error is not None:
                self.error = (self.error[0], f"{self.error[1]} {line.strip()}"[:2000])
        m = _TOKENS_RE.match(line)
        if m:
            counts = {label: _count(n, k) for n, k, label in _COUNT_RE.findall(m.group(1))}
            if "sent" not in counts or "received" not in counts:
                return []
            self.turns += 1
            self.error = None  # a reply came after it: the error was retried away (a passing 429)
            for label, attr in (("sent", "sent"), ("received", "received"), ("cache write", "cache_write"),
                                ("cache hit", "cache_hit")):
                if label in counts:
                    n, rounded = counts[label]
                    setattr(self, attr, getattr(self, attr) + n)
                    self.rounded = self.rounded or rounded
            u = self.usage()
            return [Progress("usage", {k: v for k, v in msgspec.structs.asdict(u).items() if v is not None})]
        m = _APPLIED_RE.search(line)
        if m:
            self.edits += 1
            return [Progress("progress", {"event": "edit", "file": m.group(1)[:500]})]
        m = _ERROR_RE.search(line)
        if m:
            self.error = (m.group(1), m.group(2)[:2000])
            self._error_open = True
            return [Progress("progress", {"event": "error", "error": m.group(1), "message": m.group(2)[:2000]})]
        return []

    def usage(self) -> Usage | None:
        """What the run consumed so far (None: no token line yet), priced; ``estimated`` when a
        count it was priced from was rounded.

        Aider's ``sent`` is the request's prompt tokens, cache hits and writes included (the
        OpenAI convention of the endpoint it talks to): the record's ``input_tokens`` are the rest.
        """
        if self.turns == 0:
            return None
        usage = pricing.price(Usage(
            model=self.model, input_tokens=max(0, self.sent - self.cache_hit - self.cache_write),
            output_tokens=self.received, cache_read_tokens=self.cache_hit or None,
            cache_write_tokens=self.cache_write or None, turns=self.turns, tool_calls=self.edits), self.table)
        if usage.cost_source == "priced" and self.rounded:
            usage = msgspec.structs.replace(usage, cost_source="estimated")
        return usage

    def error_text(self) -> str | None:
        """The last litellm error as one line, with the status its class stands for, or None."""
        if self.error is None:
            return None
        name, message = self.error
        # Words classify_error_text reads the same class from, whatever litellm's message says.
        said = {"auth_failed": "401", "rate_limited": "429",
                "context_overflow": "context window exceeded"}.get(_ERROR_CLASSES.get(name, ""), "")
        return f"{said} litellm.{name}: {message}".strip()

    def error_class(self) -> str | None:
        """The failure class of the last litellm error (``auth_failed``, ``rate_limited``,
        ``context_overflow``; ``crash`` for another), or None when it printed none."""
        if self.error is None:
            return None
        return _ERROR_CLASSES.get(self.error[0], "crash")


def _model(job: EngineJob, settings: Settings) -> str:
    model = job.manifest.model or settings.aider_model or DEFAULT_MODEL
    return model if "/" in model else f"openai/{model}"


class AiderEngine(Engine):
    """Runs Aider (see the module's docstring)."""

    name = "aider"
    engine_class = "agentic-coder"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Installed, a version in [0.86.0, 0.87.0), and ``OPENAI_API_KEY`` set.

        :param environ: the factory's environment (the key is looked up here).
        :param path: the search path.
        :param timeout_s: limit for ``aider --version``.
        """
        return agentcli.probe_cli("aider", path=path, timeout_s=timeout_s, min_version=MIN_VERSION,
                                  below_version=BELOW_VERSION, credentials={KEY_VAR: bool(environ.get(KEY_VAR))})

    def prepare(self, job: EngineJob) -> Prepared:
        """The argv, the minimal environment and a fresh home (see the module's docstring).

        :param job: the attempt.
        """
        require_cwd(job)
        factory_env = os.environ
        binary = agentcli.require_binary("aider")
        prompt = agentcli.require_prompt(job)
        base_url = factory_env.get(BASE_URL_VAR)
        if base_url and not base_url.startswith(("http://", "https://")):
            msg = (f"{BASE_URL_VAR}={base_url!r} is not an http(s) URL: set it to the provider's Chat Completions "
                   "root, e.g. http://127.0.0.1:8080/v1, or unset it for OpenAI")
            raise SetupFailed(msg, msg + "\n")
        home = agentcli.attempt_home(job, self.name)
        env = agentcli.base_environment(job, binary, home, factory_env, (KEY_VAR, BASE_URL_VAR, "OPENAI_ORGANIZATION"))
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        # --message=TEXT, one argument: a body starting with "-" (a markdown list) is not an option.
        settings = agentcli.settings_of(job)
        model = _model(job, settings)
        if isinstance(job.parser, AiderParser):
            # The factory's reader (usage events, the budget) prices what it reads: it must know
            # the model (aider's token lines do not name it) and the operator's table.
            job.parser.model, job.parser.table = model.removeprefix("openai/"), agentcli.price_table(settings)
        argv = [binary, "--model", model, "--edit-format", "diff", f"--message={prompt}",
                "--no-check-update", "--no-analytics", "--no-show-release-notes", "--no-gitignore",
                "--no-auto-commits", "--no-dirty-commits", "--no-pretty", "--no-show-model-warnings", "--no-stream",
                "--chat-history-file", str(home / "chat-history.md"),
                "--input-history-file", str(home / "input-history")]
        argv += ["--yes-always"] if job.manifest.yolo else ["--no-suggest-shell-commands"]
        return Prepared(cwd=job.cwd, env=env, argv=argv)

    def parser(self) -> OutputParser:
        """A fresh :class:`AiderParser` (the model unknown to it: progress and token counts)."""
        return AiderParser()

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run it, reading its text as it streams, and classify how it ended.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` built.
        """
        reader = AiderParser(prepared.argv[prepared.argv.index("--model") + 1])
        reader.table = agentcli.price_table(agentcli.settings_of(job))
        # Aider keeps its repo-map cache in the repository's root (no option moves it): remove
        # the one this run made, so it never ends up in the job's commit.
        made = [d for d in TAGS_CACHE_DIRS if not (prepared.cwd / d).exists()]
        try:
            res = await agentcli.run_reading(job, prepared, reader.feed)
        finally:
            for d in made:
                shutil.rmtree(prepared.cwd / d, ignore_errors=True)
        if isinstance(res, Outcome):
            return res
        reader.finish()
        out = agentcli.classify_run(res, job, reader.usage(), reader.error_text())
        if res.timed_out and reader.error_class() == "rate_limited":
            # It retries 429s for about 95 s: say why it ran out of time.
            return Outcome(out.failure, f"{out.detail} while the provider kept answering 429 (rate limited)",
                           out.exit_code, usage=out.usage)
        cls = reader.error_class()
        if out.failure is None and cls is not None and not (res.fenced or res.cancelled or res.timed_out):
            # Exit 0 after an API error the words did not classify: still a failed run.
            return Outcome(agentcli.failure_class(cls) if cls != "crash" else FailureClass.CRASH,
                           f"{cls.replace('_', ' ')}: {reader.error_text()[:300]}", out.exit_code, usage=out.usage)
        return out


__all__ = ["AiderEngine", "AiderParser"]
