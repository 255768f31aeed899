"""What the agent-CLI engines (Codex, Gemini) share: finding and bounding the CLI, the minimal
environment, a per-attempt CLI home, the prompt, reading output line by line, and the failure
classes beyond exit codes.

Pure helpers apart from :func:`probe_cli` (runs ``<cli> --version``) and :func:`attempt_home`
(creates a folder).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Mapping
from pathlib import Path

import msgspec

from gigafactory import agent_clis
from gigafactory.config import Settings
from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.records import Usage

from .. import shell
from . import pricing
from .base import (EngineJob, Outcome, OutputParser, Prepared, ProbeResult, Progress, SetupFailed, classify_exit,
                   run_prepared)

MAX_PROMPT_BYTES = 120 * 1024
"""The prompt is passed as one argument (stdin is closed): Linux refuses a single argument over
128 KiB (MAX_ARG_STRLEN), so a longer body is refused at prepare with this limit named."""
MAX_LINE_BYTES = 8 * 1024 * 1024
"""An output line longer than this (a huge command output echoed in a JSON event) is dropped
unread rather than buffered without bound."""
VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")
# Variables an agent CLI may need to reach its provider through a corporate proxy or CA; passed
# through when the factory has them, nothing else of the factory's environment is.
PASSTHROUGH_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
                    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "TZ")

# The failure classes agent runs end in beyond exit codes. Until schemas/manifest.py has them,
# each maps to the nearest existing class (the attempt's detail names the real cause):
# rate_limited -> crash (retried like any crash), auth_failed -> setup_failed (this factory
# cannot run it), context_overflow -> crash.
_FALLBACK_CLASSES = {"rate_limited": "crash", "auth_failed": "setup_failed", "context_overflow": "crash"}


def failure_class(name: str) -> FailureClass:
    """The :class:`FailureClass` named ``name`` (``rate_limited``, ``auth_failed``,
    ``context_overflow``), or its stand-in while the enum lacks it.

    :param name: the failure class's value.
    """
    try:
        return FailureClass(name)
    except ValueError:
        return FailureClass(_FALLBACK_CLASSES[name])


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The first ``X.Y.Z`` in ``text`` (``codex-cli 0.169.0``), or None."""
    m = VERSION_RE.search(text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def probe_cli(cli: str, *, path: str, timeout_s: float, min_version: tuple[int, int, int],
              below_version: tuple[int, int, int], credentials: Mapping[str, bool]) -> ProbeResult:
    """Whether agent CLI ``cli`` can run here: installed (``path`` first, then the agent-CLI
    cache), a version in ``[min_version, below_version)``, and every credential set. Never raises.

    :param cli: the CLI's name in :mod:`gigafactory.agent_clis`.
    :param path: the search path.
    :param timeout_s: limit for ``<cli> --version``.
    :param min_version: the oldest version this adapter was tested with.
    :param below_version: the first version it is not known to work with.
    :param credentials: each credential variable it needs and whether it is set.
    """
    binary = shutil.which(cli, path=path) or agent_clis.find_cli(cli)
    if binary is None:
        return ProbeResult(False, credentials=credentials, why=agent_clis.missing_message(cli))
    missing = [k for k, ok in credentials.items() if not ok]
    if missing:
        # Checked before the version: starting a node CLI costs seconds (gemini: ~2 s), which
        # every factory start would pay for an engine it cannot offer anyway.
        return ProbeResult(False, credentials=credentials,
                           why=f"{cli}: credential variable(s) {', '.join(missing)} not set in the factory's environment")
    try:
        st = os.stat(binary)
        out_text, code = _version_output(binary, st.st_mtime_ns, st.st_size, timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        return ProbeResult(False, credentials=credentials, why=f"{binary} --version failed: {e}")
    version = parse_version(out_text)
    if code != 0 or version is None:
        return ProbeResult(False, credentials=credentials,
                           why=f"{binary} --version exited {code} without a version")
    shown = ".".join(map(str, version))
    if not min_version <= version < below_version:
        return ProbeResult(False, version=shown, credentials=credentials,
                           why=f"{cli} {shown} is outside the tested range "
                               f"[{'.'.join(map(str, min_version))}, {'.'.join(map(str, below_version))}): "
                               f"install the pinned one with {agent_clis.INSTALL_SCRIPT}")
    return ProbeResult(True, version=shown, credentials=credentials)


@functools.lru_cache(maxsize=32)
def _version_output(binary: str, mtime_ns: int, size: int, timeout_s: float) -> tuple[str, int]:
    # Cached per binary file (path, mtime, size): a reinstalled CLI is asked again.
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=timeout_s,
                         stdin=subprocess.DEVNULL, env=_version_env(binary))
    return out.stdout + out.stderr, out.returncode


def _version_env(binary: str) -> dict[str, str]:
    # npm shims run `node`: the shim's folder first (node may live next to it).
    return {"PATH": os.pathsep.join([str(Path(binary).parent), os.environ.get("PATH", os.defpath)]),
            "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8", "NO_COLOR": "1"}


def require_binary(cli: str) -> str:
    """The CLI's path, or :class:`SetupFailed` with the install hint."""
    binary = agent_clis.find_cli(cli)
    if binary is None:
        msg = agent_clis.missing_message(cli)
        raise SetupFailed(msg, msg + "\n")
    return binary


def require_prompt(job: EngineJob) -> str:
    """The job's body as the prompt, refused over :data:`MAX_PROMPT_BYTES` or when empty."""
    prompt = job.body.strip()
    if not prompt:
        raise SetupFailed("the job's body is empty: an agent engine needs a prompt",
                          "the job's body is empty: write the task for the agent below the front matter\n")
    n = len(prompt.encode("utf-8"))
    if n > MAX_PROMPT_BYTES:
        msg = (f"the prompt is {n} bytes, over the {MAX_PROMPT_BYTES}-byte limit of a prompt passed as one "
               "argument: move the material into files in the repository and refer to them")
        raise SetupFailed(msg, msg + "\n")
    return prompt


def attempt_home(job: EngineJob, engine: str) -> Path:
    """A fresh, private HOME for one attempt of an agent CLI, under the factory's data folder
    (``<factory dir>/cli-homes/<engine>-<job>-a<attempt>-e<epoch>``, next to ``logs/``): the CLI
    keeps its settings, sessions and caches there, never in the operator's home, and two
    attempts never share one. The engine removes it when the run ends.

    :param job: the attempt.
    :param engine: the engine's name.
    """
    base = Path(job.log_path).resolve().parent.parent / "cli-homes"
    home = base / f"{engine}-{job.job}-a{job.attempt}-e{job.epoch}"
    if home.exists():
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, mode=0o700)
    return home


def base_environment(job: EngineJob, binary: str, home: Path, factory_env: Mapping[str, str],
                     own_vars: tuple[str, ...]) -> dict[str, str]:
    """The whole environment of an agent CLI: PATH (the CLI's folder, this installation's
    ``gigafactory``, the factory's PATH), the per-attempt HOME, a plain terminal, the ``GF_*``
    variables, the proxy/CA variables, and of the factory's environment only ``own_vars`` (the
    CLI's credential and base-URL variables) that are set. Never the factory's whole environment.

    :param job: the attempt (its ``gf_env``).
    :param binary: the CLI's path.
    :param home: the attempt's HOME (:func:`attempt_home`).
    :param factory_env: the factory's environment.
    :param own_vars: the CLI's own variables to pass when set.
    """
    path = os.pathsep.join([str(Path(binary).parent), sysconfig.get_path("scripts"),
                            factory_env.get("PATH", os.defpath)])
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1"}
    for k in (*PASSTHROUGH_VARS, *own_vars):
        v = factory_env.get(k)
        if v:
            env[k] = v
    env.update(job.gf_env)
    return env


class LineSplitter:
    """Splits a byte stream into lines across chunks, dropping lines over :data:`MAX_LINE_BYTES`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False
        self.dropped_lines = 0

    def feed(self, chunk: bytes) -> list[str]:
        """The complete lines in ``chunk`` and what came before it (without the newline)."""
        out: list[str] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._buf += chunk[start:nl]
                out.append(self._buf.decode("utf-8", "replace"))
            self._buf.clear()
            start = nl + 1
        if not self._skipping:
            self._buf += chunk[start:]
            if len(self._buf) > MAX_LINE_BYTES:
                self._buf.clear()
                self._skipping = True
                self.dropped_lines += 1
        return out

    def pending(self) -> str:
        """The incomplete last line so far (not consumed)."""
        return "" if self._skipping else self._buf.decode("utf-8", "replace")

    def flush(self) -> list[str]:
        """The last line, if the stream ended without a newline."""
        if self._skipping or not self._buf:
            return []
        line = self._buf.decode("utf-8", "replace")
        self._buf.clear()
        return [line]


# A three-digit number standing alone (not part of a port, a byte count or an id).
_STATUS_CODE = re.compile(r"(?<![\w.:/-])(\d{3})(?!\w|\.\d)")


def classify_error_text(text: str) -> str | None:
    """The failure class an agent CLI's error message says, by its words, or None.

    ``rate_limited`` for 429s and exhausted retries, ``auth_failed`` for 401/403 and invalid
    keys, ``context_overflow`` for a prompt over the model's context window.

    :param text: the error message.
    """
    t = text.lower()
    # Status codes count as whole numbers only: "http://127.0.0.1:45429/v1" is not a 429.
    codes = set(_STATUS_CODE.findall(t))
    if "429" in codes or "rate limit" in t or "rate_limit" in t or "too many requests" in t \
            or "resource_exhausted" in t or "exceeded retry limit" in t or "quota" in t:
        return "rate_limited"
    if "401" in codes or "unauthorized" in t or "unauthenticated" in t or "invalid api key" in t \
            or "authentication" in t or "403" in codes and "forbidden" in t:
        return "auth_failed"
    if "context_length_exceeded" in t or "context window" in t or "maximum context length" in t \
            or "prompt is too long" in t or "input token count" in t and "exceeds" in t:
        return "context_overflow"
    return None


def settings_of(job: EngineJob) -> Settings:
    """The settings an engine runs ``job`` with: the factory's (``job.settings``), else (a job
    built without them, as in a test) read from the environment.

    :param job: the attempt.
    """
    return job.settings if job.settings is not None else Settings.from_env()


def price_table(settings: Settings) -> pricing.PriceTable | None:
    """The operator's price table (setting ``price_table``), or None for the shipped one.

    :param settings: the factory's settings.
    :raises SetupFailed: naming the file and the field, when the table cannot be used (a factory
        checks it at start; this is for one edited since).
    """
    if not settings.price_table:
        return None
    try:
        return pricing.load_table(settings.price_table)
    except pricing.PriceTableError as e:
        msg = f"price_table (GIGAFACTORY_PRICE_TABLE): {e}"
        raise SetupFailed(msg, msg + "\n") from None


def usage_progress(usage: Usage) -> Progress:
    """A ``usage`` progress item with every field of ``usage`` (an unknown count as None, the
    ``cost_source`` always), as the attempt's record has it.

    :param usage: what the run consumed so far.
    """
    return Progress("usage", msgspec.to_builtins(usage))


MAX_RETRY_AFTER_S = 86_400.0
"""A retry-after read from an error message is believed up to a day; a longer one is ignored
(the retry policy's back-off applies)."""
# How providers say it in an error body that CLIs echo: OpenAI "Please try again in 7s" / "in
# 350ms", a "Retry-After: 7" header quoted, Google's RetryInfo "retryDelay": "7s".
_RETRY_AFTER_RES = (
    re.compile(r"try again in\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|seconds?)\b", re.IGNORECASE),
    re.compile(r"retry[-_ ]after(?:[-_ ]ms)?[\"']?\s*[:=]?\s*[\"']?(\d+(?:\.\d+)?)\s*(ms|s|seconds?)?\b", re.IGNORECASE),
    re.compile(r"[\"']?retryDelay[\"']?\s*:\s*[\"'](\d+(?:\.\d+)?)(s)[\"']"),
)


def retry_after_from_text(text: str | None) -> float | None:
    """The delay a rate-limited provider asked for, in seconds, as an agent CLI's error message
    quotes it (``Please try again in 7s``, ``retry-after: 7``, ``"retryDelay": "7s"``), or None
    when the message says none (or one over :data:`MAX_RETRY_AFTER_S`).

    :param text: the CLI's error message.
    """
    if not text:
        return None
    for rx in _RETRY_AFTER_RES:
        m = rx.search(text[:20_000])
        if m:
            n = float(m.group(1))
            unit = (m.group(2) or "s").lower()
            if unit == "ms" or "retry-after-ms" in m.group(0).lower() or "retry_after_ms" in m.group(0).lower():
                n /= 1000.0
            return n if 0 <= n <= MAX_RETRY_AFTER_S else None
    return None


def remove_home(prepared: Prepared) -> None:
    """Remove the attempt's CLI home (:func:`attempt_home`) once the run ended; only a folder
    under ``cli-homes`` is ever removed."""
    home = prepared.env.get("HOME", "")
    if home and Path(home).parent.name == "cli-homes":
        shutil.rmtree(home, ignore_errors=True)


async def run_reading(job: EngineJob, prepared: Prepared, feed, before_removal=None) -> shell.ProcessResult | Outcome:
    """Run the CLI as :meth:`prepare` built it, giving every chunk of its output to ``feed``
    (the engine's own reader, for how the run ended) before the factory's callback, and
    remove the attempt's private home afterwards. Returns the process result, or a
    ``setup_failed`` :class:`Outcome` when the program is missing.

    :param job: the attempt.
    :param prepared: what ``prepare`` built.
    :param feed: called with each chunk, in order; if it raises, the factory still gets the chunk.
    :param before_removal: called with ``prepared`` once the run ended, before the home is
        removed (an engine keeps its session there: :mod:`.sessions`); must not raise.
    """

    def on_output(chunk: bytes) -> None:
        try:
            feed(chunk)
        finally:
            job.on_output(chunk)

    try:
        return await run_prepared(job, prepared, on_output)
    finally:
        if before_removal is not None:
            before_removal(prepared)
        remove_home(prepared)


def classify_run(res: shell.ProcessResult, job: EngineJob, usage: Usage | None, error: str | None) -> Outcome:
    """How an agent CLI's run ended: stopped by us (fenced, cancelled, timed out) as
    :func:`classify_exit` says; else the class its error message names (``rate_limited``, with
    the provider's retry-after when the message quotes one, :func:`retry_after_from_text`;
    ``auth_failed``, ``context_overflow``); else by exit code. ``usage`` is kept in every case.

    :param res: what the process did.
    :param job: the attempt.
    :param usage: what it consumed (None: it reported nothing).
    :param error: the CLI's own error message, if it reported one.
    """
    by_exit = classify_exit(res, job)
    stopped = res.fenced or res.cancelled or res.timed_out
    if not stopped and error:
        cls = classify_error_text(error)
        if cls is not None:
            return Outcome(failure_class(cls), f"{cls.replace('_', ' ')}: {error[:300]}",
                           res.exit_code, usage=usage,
                           retry_after_s=retry_after_from_text(error) if cls == "rate_limited" else None)
        if res.exit_code != 0:
            return Outcome(FailureClass.CRASH, f"{by_exit.detail}: {error[:300]}", res.exit_code, usage=usage)
    return Outcome(by_exit.failure, by_exit.detail, by_exit.exit_code, self_fenced=by_exit.self_fenced, usage=usage)


__all__ = ["MAX_LINE_BYTES", "MAX_PROMPT_BYTES", "LineSplitter", "attempt_home", "base_environment",
           "classify_error_text", "classify_run", "failure_class", "parse_version", "probe_cli", "remove_home", "price_table", "require_binary",
           "require_prompt", "retry_after_from_text", "settings_of", "usage_progress"]


class LineParser(OutputParser):
    """An output parser that reads the stream a line at a time: a subclass sets ``_lines`` (a
    :class:`LineSplitter`) and reads each complete line in ``_line``."""

    _lines: LineSplitter

    def feed(self, chunk: bytes) -> list[Progress]:
        """Take the next chunk; returns the progress and usage it completed.

        :param chunk: bytes of the merged stdout/stderr stream.
        """
        out: list[Progress] = []
        for line in self._lines.feed(chunk):
            out += self._line(line)
        return out

    def finish(self) -> list[Progress]:
        """Read a last line that had no newline."""
        out: list[Progress] = []
        for line in self._lines.flush():
            out += self._line(line)
        return out

    def _line(self, line: str) -> list[Progress]:
        raise NotImplementedError
