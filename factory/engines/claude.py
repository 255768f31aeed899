"""The ``claude`` engine: Claude Code (``claude -p``) as an ``agentic-coder``.

- **probe**: ``claude`` on ``PATH``, else in the agent-CLI cache
  (:func:`gigafactory.agent_clis.find_cli`); its version from ``claude --version`` (bounded by
  the probe's timeout); it needs ``ANTHROPIC_API_KEY``.
- **prepare**: ``claude -p --output-format stream-json --verbose [--model M] <flags> -- <job
  body>`` (a body over :data:`MAX_PROMPT_BYTES` is ``setup_failed``);
  ``yolo: true`` adds ``--dangerously-skip-permissions`` (and ``IS_SANDBOX=1`` when the factory
  runs as root: the CLI refuses the flag as root otherwise); without it
  ``--permission-mode acceptEdits`` (file edits are approved, any other tool needing approval,
  such as a non-file shell command, is denied and listed in the result's
  ``permission_denials``). The environment is only what it needs: ``PATH``, ``HOME``, ``LANG``,
  the ``GF_*`` variables, the ``ANTHROPIC_*`` variables present in the factory's environment
  (``ANTHROPIC_BASE_URL`` included), and settings that keep a headless run quiet and bounded.
- **resume** (issue 10): an attempt that resumes a WIP checkpoint taken on this same factory,
  whose stream said a ``session_id``, gets ``--resume <session>`` (the transcript the earlier
  attempt left under ``$HOME/.claude/projects/<its worktree>`` is copied to the new worktree's
  folder: Claude Code looks sessions up by working directory); without it, only the resume note
  the factory puts at the head of the prompt.
- **parser** (:class:`ClaudeStream`): reads the stream-json lines; ``assistant`` events give
  progress (text, tool calls) and the usage so far (each message's ``usage``, counted once per
  message id: the CLI repeats a message's usage on every content block of it); the final
  ``result`` event gives the run's usage (tokens, ``num_turns``, the model, ``total_cost_usd``
  as ``cost_source: reported``).
- **classify**: ``is_error`` with ``api_error_status`` 429 / ``rate_limit_error`` is
  ``rate_limited``; 401, 403 / ``authentication_error`` / ``permission_error`` is
  ``auth_failed``; a prompt too long for the model is ``context_overflow``; any other error, a
  non-zero exit or no result at all is ``crash``. The result's ``subtype`` is not read: a lasting
  429 ends with ``subtype: success`` and ``is_error: true``.

What the stream carries while it runs: per-message input and cache token counts (and a
provisional output count of the first delta); the exact output tokens and the cost arrive only
with the final ``result`` event. So while it runs the usage so far is priced from the price table
(``cost_source: priced``, a lower bound: the output counts are provisional), and both
``budget.tokens`` and ``budget.usd`` stop a run mid-way on what the messages said so far; once the
``result`` event came, its cost is the record's (``cost_source: reported``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gigafactory import agent_clis
from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.records import Usage

from .. import shell
from . import agentcli, pricing
from .base import (
    Engine,
    EngineJob,
    Outcome,
    OutputParser,
    Prepared,
    ProbeResult,
    Progress,
    SetupFailed,
    classify_exit,
    require_cwd,
    run_prepared,
)

CREDENTIAL = "ANTHROPIC_API_KEY"
"""The credential the engine needs (checked by the probe; its value never leaves the env)."""
MAX_LINE_BYTES = 4 * 1024 * 1024
"""A stream-json line longer than this is dropped (its head is not parsed): a runaway line must
not grow the parser's buffer without bound. A tool result of a large file fits well under it."""
PROGRESS_TEXT_CHARS = 200
"""Progress events carry at most this much of a turn's text or a tool call's input."""
CLI_MAX_RETRIES = 2
"""``CLAUDE_CODE_MAX_RETRIES``: the CLI's default retries (ten, 401s included) take minutes
before a refused key is reported; the factory retries rate-limited attempts itself."""
MAX_PROMPT_BYTES = 120 * 1024
"""The prompt is one argument of the command line, and Linux refuses a single argument over
128 KiB (``MAX_ARG_STRLEN``); a body over this is ``setup_failed`` with this limit named, not an
exec error."""
VERSION_OUTPUT_BYTES = 4096
"""At most this much of ``claude --version``'s output is read."""


def _version(binary: str, env: Mapping[str, str], timeout_s: float) -> str | None:
    """``2.1.328`` from ``claude --version`` (``2.1.328 (Claude Code)``), or None."""
    try:
        out = subprocess.run([binary, "--version"], env=dict(env), capture_output=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    words = out.stdout[:VERSION_OUTPUT_BYTES].decode(errors="replace").split()
    return words[0] if words and words[0][:1].isdigit() else None


def _find(path: str) -> str | None:
    """The ``claude`` program: on ``path`` first, then the agent-CLI cache."""
    return shutil.which("claude", path=path) or agent_clis.find_cli("claude")


class ClaudeStream(OutputParser):
    """Reads Claude Code's ``--output-format stream-json`` output (one JSON object a line)."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.buf = bytearray()
        self.skipping = False
        """Inside a line over the limit: dropped up to its newline."""
        self.messages: dict[str, dict] = {}
        """Each assistant message's latest ``usage``, by message id."""
        self.tool_calls = 0
        self.model: str | None = None
        self.result: dict | None = None
        """The final ``result`` event, once seen."""
        self.dropped_lines = 0
        self.said_usage: Usage | None = None
        """The usage last said as a ``usage`` item."""
        self.table: pricing.PriceTable | None = None
        """The price table streamed usage is priced with (None: the shipped one); the engine's
        ``prepare`` sets the operator's (setting ``price_table``)."""
        self.retry_delay_s: float | None = None
        """The delay of the CLI's last retry after a 429 (``system/api_retry`` ``retry_delay_ms``):
        the CLI follows the provider's retry-after (plus jitter), and stream-json carries no
        other trace of it. None: no rate-limited retry seen."""
        self.session_id: str | None = None
        """The CLI's session id (every stream-json event carries it), once seen."""

    def feed(self, chunk: bytes) -> list[Progress]:
        out: list[Progress] = []
        self.buf += chunk
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > self.max_line_bytes:
                    self.buf.clear()
                    self.skipping = True
                    self.dropped_lines += 1
                break
            line = bytes(self.buf[:nl])
            del self.buf[:nl + 1]
            if self.skipping:
                self.skipping = False
                continue
            if len(line) > self.max_line_bytes:
                self.dropped_lines += 1
                continue
            out += self._line(line)
        return out

    def _line(self, line: bytes) -> list[Progress]:
        try:
            ev = json.loads(line)
        except ValueError:
            return []  # not stream-json (a warning the CLI printed): it stays in the log only
        if not isinstance(ev, dict):
            return []
        if isinstance(ev.get("session_id"), str) and len(ev["session_id"]) <= 200:
            self.session_id = ev["session_id"]  # recorded with each WIP checkpoint (resume)
        kind = ev.get("type")
        if kind == "assistant" and isinstance(ev.get("message"), dict):
            return self._assistant(ev["message"])
        if kind == "result":
            self.result = ev
            return self._usage_changed()
        if kind == "system" and ev.get("subtype") == "api_retry":
            delay_ms = ev.get("retry_delay_ms")
            if ev.get("error_status") == 429 and isinstance(delay_ms, (int, float)) and 0 <= delay_ms < 86_400_000:
                self.retry_delay_s = delay_ms / 1000.0
            return [Progress("progress", {"retry": ev.get("attempt"), "status": ev.get("error_status"),
                                          "error": str(ev.get("error"))[:PROGRESS_TEXT_CHARS]})]
        if kind == "system" and ev.get("subtype") == "permission_denied":
            return [Progress("progress", {"denied": str(ev.get("tool_name"))[:PROGRESS_TEXT_CHARS]})]
        return []

    def _assistant(self, msg: dict) -> list[Progress]:
        out: list[Progress] = []
        model = msg.get("model")
        if isinstance(model, str) and not model.startswith("<"):  # "<synthetic>": the CLI's own error
            self.model = model
        for block in msg.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and block.get("text"):
                out.append(Progress("progress", {"text": str(block["text"])[:PROGRESS_TEXT_CHARS]}))
            elif block.get("type") == "tool_use":
                self.tool_calls += 1
                args = json.dumps(block.get("input"), ensure_ascii=False)[:PROGRESS_TEXT_CHARS]
                out.append(Progress("progress", {"tool": str(block.get("name"))[:PROGRESS_TEXT_CHARS], "input": args}))
        usage = msg.get("usage")
        if isinstance(usage, dict) and msg.get("id"):
            self.messages[str(msg["id"])] = usage
        return out + self._usage_changed()

    def _usage_changed(self) -> list[Progress]:
        """A ``usage`` item when the usage differs from the last one said (the CLI repeats a
        message's usage on each of its content blocks: one audit event per change, not per line)."""
        now = self.usage()
        if now is None or now == self.said_usage:
            return []
        self.said_usage = now
        return [Progress("usage", msgspec.to_builtins(now))]

    def usage(self) -> Usage | None:
        """The final result's usage once it has come; before it, the sum over the messages so
        far (no cost yet: ``cost_source: unknown``); None before anything was said."""
        r = self.result
        if r is not None and isinstance(r.get("usage"), dict):
            u = r["usage"]
            models = [k for k in (r.get("modelUsage") or {})]
            cost = r.get("total_cost_usd")
            final = Usage(
                model=models[0] if len(models) == 1 else self.model,
                input_tokens=_int(u.get("input_tokens")), output_tokens=_int(u.get("output_tokens")),
                cache_read_tokens=_int(u.get("cache_read_input_tokens")),
                cache_write_tokens=_int(u.get("cache_creation_input_tokens")),
                turns=_int(r.get("num_turns")), tool_calls=self.tool_calls,
                cost_usd=float(cost) if isinstance(cost, (int, float)) else None,
                cost_source="reported" if isinstance(cost, (int, float)) else "unknown",
            )
            # The CLI's figure when it gave one (kept as it is); else priced from the table.
            return pricing.price(final, self.table)
        if not self.messages:
            return None
        total = lambda key: sum(_int(u.get(key)) or 0 for u in self.messages.values())  # noqa: E731
        # Priced from the table while it streams, so that budget.usd can stop the run mid-way
        # (the CLI's own cost comes only with the result, when the run is over). A lower bound:
        # a message's output count grows while it streams and the CLI says only what it had.
        return pricing.price(Usage(model=self.model, input_tokens=total("input_tokens"),
                                   output_tokens=total("output_tokens"),
                                   cache_read_tokens=total("cache_read_input_tokens"),
                                   cache_write_tokens=total("cache_creation_input_tokens"),
                                   turns=len(self.messages), tool_calls=self.tool_calls), self.table)


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def classify_result(result: dict | None, res: shell.ProcessResult, job: EngineJob) -> Outcome:
    """How a Claude Code run ended, from its final ``result`` event and its process.

    :param result: the ``result`` event (None: the CLI printed none).
    :param res: what its process did (self-fenced, cancelled, timed out come first).
    :param job: the attempt.
    """
    if res.fenced or res.cancelled or res.timed_out:
        return classify_exit(res, job)
    if result is None:
        out = classify_exit(res, job)
        if out.failure is None:
            return Outcome(FailureClass.CRASH, "claude exited 0 without a result event", res.exit_code)
        return Outcome(out.failure, f"{out.detail}, without a result event", res.exit_code)
    text = str(result.get("result") or "")[:300]
    if result.get("is_error"):
        status = result.get("api_error_status")
        etype = str(result.get("api_error_type") or "")
        lowered = text.lower()
        if status == 429 or etype == "rate_limit_error":
            return Outcome(FailureClass.RATE_LIMITED, f"rate limited: {text}", res.exit_code)
        if status in (401, 403) or etype in ("authentication_error", "permission_error"):
            return Outcome(FailureClass.AUTH_FAILED, f"credential refused: {text}", res.exit_code)
        if "prompt is too long" in lowered or "context window" in lowered or "context_length" in lowered:
            return Outcome(FailureClass.CONTEXT_OVERFLOW, f"context overflow: {text}", res.exit_code)
        return Outcome(FailureClass.CRASH, f"claude reported an error: {text}", res.exit_code)
    if res.exit_code != 0:
        return classify_exit(res, job)
    denied = [str(d.get("tool_name")) for d in result.get("permission_denials") or [] if isinstance(d, dict)]
    extra = f" ({len(denied)} tool calls denied: {', '.join(denied[:5])})" if denied else ""
    return Outcome(None, f"claude finished in {result.get('num_turns')} turns{extra}", 0)


class ClaudeEngine(Engine):
    """Claude Code in print mode (see the module's docstring)."""

    name = "claude"
    engine_class = "agentic-coder"

    def credential_vars(self, environ: Mapping[str, str]) -> tuple[str, ...]:
        """Only ``ANTHROPIC_API_KEY``: a change of it restores the engine after an ``auth_failed``.

        :param environ: unused (the variable's name is fixed).
        """
        return (CREDENTIAL,)

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Runnable when ``claude`` is found and ``ANTHROPIC_API_KEY`` is set.

        :param environ: the environment engines run with (the credential is looked up here).
        :param path: the search path for ``claude`` (then the agent-CLI cache).
        :param timeout_s: the bound on ``claude --version``.
        """
        creds = {CREDENTIAL: bool(environ.get(CREDENTIAL))}
        binary = _find(path)
        if binary is None:
            return ProbeResult(False, credentials=creds, why=agent_clis.missing_message("claude"))
        env = {"PATH": os.pathsep.join([os.path.dirname(binary), path]), "HOME": environ.get("HOME", "/"),
               "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        version = _version(binary, env, timeout_s)
        if version is None:
            return ProbeResult(False, credentials=creds, why=f"{binary} --version failed or timed out")
        if not creds[CREDENTIAL]:
            return ProbeResult(False, version, creds, why=f"{CREDENTIAL} is not set")
        return ProbeResult(True, version, creds)

    def prepare(self, job: EngineJob) -> Prepared:
        """The command line and the environment (only what the CLI needs, never the factory's
        whole environment).

        :param job: the attempt (its manifest's ``model`` and ``yolo``; its body is the prompt).
        """
        require_cwd(job)
        environ = os.environ
        binary = _find(environ.get("PATH", os.defpath))
        if binary is None:
            raise SetupFailed(agent_clis.missing_message("claude"))
        prompt_bytes = len(job.body.encode())
        if prompt_bytes > MAX_PROMPT_BYTES:
            raise SetupFailed(
                f"the job body ({prompt_bytes} bytes) is over the {MAX_PROMPT_BYTES}-byte prompt limit of the "
                "claude engine: shorten it, or put the long part in a file in the job's cwd and name it",
                f"job body of {prompt_bytes} bytes is over the claude engine's {MAX_PROMPT_BYTES}-byte prompt limit\n")
        argv = [binary, "-p", "--output-format", "stream-json", "--verbose"]
        if job.manifest.model:
            argv += ["--model", job.manifest.model]
        env = claude_environment(environ, job.gf_env, binary)
        if isinstance(job.parser, ClaudeStream):
            job.parser.table = agentcli.price_table(agentcli.settings_of(job))
        if job.manifest.yolo:
            argv.append("--dangerously-skip-permissions")
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                env["IS_SANDBOX"] = "1"  # the CLI refuses the flag as root unless told it is sandboxed
        else:
            argv += ["--permission-mode", "acceptEdits"]
        if job.resume is not None and job.resume.session:
            # The earlier attempt's conversation, when this factory still has it (a retry or a
            # reclaim here); else the resume note at the head of the prompt is all it gets.
            if resume_session(env["HOME"], job.resume.session, job.cwd):
                argv += ["--resume", job.resume.session]
        # After `--`: a body starting with `-` is the prompt, never an option of the CLI.
        argv += ["--", job.body]
        return Prepared(cwd=job.cwd, env=env, argv=argv)

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run the CLI (:func:`shell.run_argv`) and classify it from its ``result`` event.

        :param job: the attempt (``job.parser`` is the :class:`ClaudeStream` fed its output).
        :param prepared: what :meth:`prepare` built.
        """
        res = await run_prepared(job, prepared)
        if isinstance(res, Outcome):
            return res
        stream = job.parser if isinstance(job.parser, ClaudeStream) else None
        out = classify_result(stream.result if stream else None, res, job)
        usage = stream.usage() if stream else None
        retry_after_s = stream.retry_delay_s if stream and out.failure == FailureClass.RATE_LIMITED else None
        return Outcome(out.failure, out.detail, out.exit_code, self_fenced=out.self_fenced, usage=usage,
                       retry_after_s=retry_after_s)

    def parser(self) -> OutputParser:
        """A fresh :class:`ClaudeStream`."""
        return ClaudeStream()


SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
"""What a session id must look like to be looked up (Claude's are UUIDs): never a path."""
SESSION_MAX_BYTES = 64 * 1024 * 1024
"""A session transcript larger than this is not copied for a resume (the prompt note is used)."""


def project_dir(home: str, cwd: Path | str) -> Path:
    """Where Claude Code keeps the sessions of working directory ``cwd``:
    ``<home>/.claude/projects/<cwd, every character but letters and digits as ->``.

    :param home: the CLI's ``HOME``.
    :param cwd: the working directory (resolved).
    """
    real = os.path.realpath(str(cwd))
    return Path(home) / ".claude" / "projects" / "".join(c if c.isalnum() else "-" for c in real)


def resume_session(home: str, session: str, cwd: Path | str) -> bool:
    """Make session ``session`` resumable from ``cwd`` (the new attempt's worktree): Claude Code
    looks a session up under the project folder of the working directory, and each attempt has
    its own worktree, so the transcript the earlier attempt left (under its own worktree's
    folder, in the same ``HOME``) is copied there. True when the session can be resumed; False
    (nothing done) when its id is malformed or no transcript of it is found on this machine.

    :param home: the CLI's ``HOME`` (the factory's).
    :param session: the session id the earlier attempt's stream said.
    :param cwd: the new attempt's working directory.
    """
    if not SESSION_ID_RE.fullmatch(session):
        return False
    target = project_dir(home, cwd) / f"{session}.jsonl"
    if target.is_file():
        return True
    found = [p for p in (Path(home) / ".claude" / "projects").glob(f"*/{session}.jsonl") if p.is_file()]
    if not found or found[0].stat().st_size > SESSION_MAX_BYTES:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[0], target)
    return True


def claude_environment(environ: Mapping[str, str], gf_env: Mapping[str, str], binary: str) -> dict[str, str]:
    """The whole environment Claude Code runs with: ``PATH`` (the CLI's folder first: its npm
    shim runs ``node``), ``HOME``, ``LANG``, the ``GF_*`` variables, every ``ANTHROPIC_*``
    variable set in ``environ`` and the settings for a quiet, bounded headless run. Nothing else
    of ``environ`` (other credentials stay out).

    :param environ: the factory's environment.
    :param gf_env: the ``GF_*`` variables of the attempt.
    :param binary: the ``claude`` program found.
    """
    env = {
        "PATH": os.pathsep.join([os.path.dirname(binary), environ.get("PATH", os.defpath)]),
        "HOME": environ.get("HOME", "/"),
        "LANG": environ.get("LANG", "C.UTF-8"),
    }
    env.update({k: v for k, v in environ.items() if k.startswith("ANTHROPIC_")})
    env.update(gf_env)
    env.update(CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
               CLAUDE_CODE_MAX_RETRIES=str(CLI_MAX_RETRIES))
    return env

__all__ = ["ClaudeEngine", "ClaudeStream", "classify_result", "claude_environment"]
