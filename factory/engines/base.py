"""The one interface every engine implements, and what the factory hands an engine to run.

An engine is what runs inside a station: a shell script, an agent CLI, nothing at all. The
factory knows engines only through :class:`Engine`:

- ``name`` and ``engine_class``: the ``engine:`` a job names, and the ``engine-class`` it
  belongs to (``shell`` is a ``script``; an agent CLI is an ``agentic-coder``).
- :meth:`Engine.probe`: is it installed, which version, which credentials it needs and whether
  they are set. The factory's probe (:mod:`gigafactory.factory.probe`) turns a runnable result
  into the capability tokens ``engine:<name>`` and ``<name>:<version>`` (:meth:`Engine.tokens`).
- :meth:`Engine.prepare`: the command line, environment and working directory, from the
  resolved manifest and only what the engine needs (:class:`EngineJob`); refuses with
  :class:`SetupFailed` when the job cannot start here.
- :meth:`Engine.run`: run what was prepared through :mod:`gigafactory.factory.shell` (its own
  process group under the supervisor, the timeout, cancel, the self-fencing deadline, output
  appended to the log and streamed), and classify how it ended (:class:`Outcome`, with a
  :class:`FailureClass`). The default runs ``Prepared.argv``; an engine overrides it only if it
  runs differently (the shell engine runs a script file).
- :meth:`Engine.parser`: turns the output stream into progress and usage (:class:`Progress`);
  the default reads nothing from it (the shell engine's output is only a log).

What an engine does not do: claim, renew, fence, verify, report. The factory holds the lease
(:mod:`gigafactory.factory.holder`), runs the ``verify`` gate after any engine that passed
(:mod:`.verify`), and reports (:mod:`gigafactory.factory.reporting`). An engine's code is pure
apart from the process it starts, so adding one touches only this package: a module with an
:class:`Engine` subclass and one line in :func:`gigafactory.factory.engines._builtin`.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gigafactory.config import Settings
from gigafactory.schemas.manifest import Budget, FailureClass, Manifest
from gigafactory.schemas.records import Usage, usage_tokens

from .. import shell
from ..credentials import CREDENTIAL_VARS
from ..redact import Redactor
from ..sandbox import Sandbox


@dataclass(frozen=True)
class ProbeResult:
    """What :meth:`Engine.probe` found on this machine."""

    runnable: bool
    """Installed and with every credential it needs: the factory offers ``engine:<name>``."""
    version: str | None = None
    """The engine's version (``2.1.3``), offered as ``<name>:<version>``; None if it has none."""
    credentials: Mapping[str, bool] = field(default_factory=dict)
    """Each credential variable the engine needs, and whether it is set (never its value)."""
    why: str = ""
    """Why it is not runnable (not installed, a credential missing), for logs and operators."""


@dataclass
class EngineJob:
    """One attempt, as an engine sees it: only what it needs to run, nothing of the lease.

    :param job: the job id.
    :param epoch: the epoch of the attempt (the fencing token; for names such as the branch).
    :param attempt: the attempt number.
    :param factory: this factory's id.
    :param station: the station the attempt runs on.
    :param manifest: the resolved manifest (``engine``, ``model``, ``verify``, ``budget``, ...).
    :param body: the job's markdown body (the prompt; for ``shell``, where the script is).
    :param cwd: the working directory, resolved (``~`` and variables expanded, relative to the
        factory's workspace); it may not exist (:meth:`Engine.prepare` checks).
    :param log_path: the attempt's log file; output is appended to it.
    :param gf_env: the ``GF_*`` variables (``GF_FENCE_SOCKET`` for ``gigafactory fence``, and
        the broker's address without credentials) the factory gives every engine.
    :param timeout_s: the wall-clock limit of the engine and the verify gate together.
    :param timeout_class: how running past ``timeout_s`` is classed: ``budget_exceeded`` when
        ``budget.wall`` is what binds, else ``timeout``.
    :param header: the line written to the log before the engine's output.
    :param on_output: called with each chunk of output, in order, on the event loop.
    :param cancel: set when the engine must stop (the lease was lost, the factory drains).
    :param fence: the self-fencing deadline (None with ``unsafe_unfenced_engines``).
    :param supervised: run under the supervisor (False only with ``unsafe_unfenced_engines``).
    :param kill_grace_s: SIGTERM to SIGKILL when the engine is stopped.
    :param parser: the reader of this run's output, set by the factory.
    """

    job: str
    epoch: int
    attempt: int
    factory: str
    station: int
    manifest: Manifest
    body: str
    cwd: Path
    log_path: str
    gf_env: Mapping[str, str]
    timeout_s: float
    timeout_class: FailureClass
    header: str
    on_output: Callable[[bytes], None]
    cancel: asyncio.Event
    fence: shell.FenceDeadline | None
    supervised: bool
    kill_grace_s: float = 5.0
    parser: "OutputParser | None" = None
    """The reader the factory feeds this run's output to (:meth:`Engine.parser`), so that
    :meth:`Engine.run` can classify from what it read (None: no reader, or it raised and was
    dropped)."""
    env_passthrough: tuple[str, ...] = ()
    """Names of the factory's variables this run may see beyond the base set
    (:func:`engine_environment`): the credential variables of the ``cred:`` capabilities the
    job requires, and the operator's ``engine_env_passthrough``."""
    settings: "Settings | None" = None
    """The factory's settings (the engines' own: ``codex_base_url``, ``*_model``,
    ``price_table``, ...); None (a test's job): read from the environment when needed."""
    resume: "Resume | None" = None
    """Set when this attempt resumes an earlier one's WIP checkpoint (its worktree starts
    there): what was done, for the engine to be told. None: a fresh start."""
    redactor: "Redactor | None" = None
    """Replaces the factory's secrets and token shapes in the output before it reaches the log
    or the live subject (:mod:`~gigafactory.factory.redact`); None: output as it is."""
    sandbox: "Sandbox | None" = None
    """Confines the engine and the verify gate (:mod:`~gigafactory.factory.sandbox`); None: not."""


RESUME_NOTE_PATHS_MAX = 20
"""Changed paths a resume note names (the rest are counted)."""


@dataclass(frozen=True)
class Resume:
    """An attempt that resumes an earlier one's WIP checkpoint (issue 10)."""

    commit: str
    """The checkpoint commit the worktree starts from."""
    from_epoch: int
    from_attempt: int
    seq: int
    files_changed: int = 0
    lines_added: int = 0
    lines_deleted: int = 0
    paths: tuple[str, ...] = ()
    """Paths changed since base as of the checkpoint (at most 50)."""
    session: str | None = None
    """The earlier run's agent session id, when it was said and taken on this same factory."""
    rebased_onto: str | None = None
    """After ``rebase-needed``: the new base commit the earlier work (``commit``) was merged
    onto (None: a plain resume)."""
    conflicts: tuple[str, ...] = ()
    """Paths that merge left conflicted, for the agent to resolve (empty: it merged cleanly)."""


def resume_env(resume: Resume) -> dict[str, str]:
    """The variables a resuming attempt's engine gets: ``GF_RESUMING=1`` and
    ``GF_RESUME_COMMIT`` (the checkpoint commit its worktree starts from)."""
    return {"GF_RESUMING": "1", "GF_RESUME_COMMIT": resume.commit}


def resume_note(resume: Resume) -> str:
    """A short note an agent's prompt starts with when it resumes: the work so far is in the
    worktree; what it changed. Plain text, bounded (:data:`RESUME_NOTE_PATHS_MAX` paths).

    :param resume: what the attempt resumes.
    """
    if resume.rebased_onto is not None:
        return _rebase_note(resume)
    shown = list(resume.paths[:RESUME_NOTE_PATHS_MAX])
    more = resume.files_changed - len(shown)
    lines = [
        f"Note: you are resuming this task. An earlier attempt (attempt {resume.from_attempt}) was "
        f"interrupted; its work in progress (checkpoint {resume.seq}, commit {resume.commit[:12]}) is already "
        f"in this working tree: {resume.files_changed} files changed, +{resume.lines_added} "
        f"-{resume.lines_deleted} lines. Review it and continue from there rather than starting over.",
    ]
    if shown:
        lines.append("Changed so far: " + ", ".join(shown) + (f" and {more} more" if more > 0 else "") + ".")
    return "\n".join(lines) + "\n\n"


def _rebase_note(resume: Resume) -> str:
    """The note of an attempt after ``rebase-needed``: the earlier work is merged onto the new
    base, cleanly or with the conflicts it must resolve."""
    lines = [
        f"Note: you are resuming this task. An earlier attempt (attempt {resume.from_attempt}) did it on an older "
        f"base; the base branch has moved (now {resume.rebased_onto[:12]}) and its branch no longer merged. Its "
        f"work (commit {resume.commit[:12]}: {resume.files_changed} files changed, +{resume.lines_added} "
        f"-{resume.lines_deleted} lines) has been merged onto the new base in this working tree.",
    ]
    if resume.conflicts:
        shown = list(resume.conflicts[:RESUME_NOTE_PATHS_MAX])
        more = len(resume.conflicts) - len(shown)
        lines.append("That merge has CONFLICTS, left for you to resolve first: " + ", ".join(shown)
                     + (f" and {more} more" if more > 0 else "") + ". Edit each file to keep both the new base's "
                     "changes and the task's, remove every conflict marker (<<<<<<<, =======, >>>>>>>), then "
                     "continue the task. Do not abort the merge; the factory commits your result.")
    else:
        lines.append("It merged cleanly. Check that it still fits the new base and continue from there.")
    return "\n".join(lines) + "\n\n"


@dataclass
class Prepared:
    """What :meth:`Engine.prepare` built: how to start the engine."""

    cwd: Path
    """Where it runs (checked to exist)."""
    env: dict[str, str]
    """Its complete environment; the verify gate runs with the same one."""
    argv: list[str] = field(default_factory=list)
    """The command line, for engines that are programs (the default :meth:`Engine.run`)."""
    script: str | None = None
    """A script to run with bash (or sh), for the shell engine."""


@dataclass(frozen=True)
class Outcome:
    """How an engine's run ended."""

    failure: FailureClass | None
    """None: it passed (the verify gate decides next); else why it failed."""
    detail: str
    """One line for the attempt's record."""
    exit_code: int | None = None
    """The engine's exit code (None: it never ran, or a signal ended it)."""
    verify_exit_code: int | None = None
    """The ``verify`` command's exit code, when the gate ran."""
    self_fenced: bool = False
    """Its self-fencing deadline stopped it: the factory appends why (``detail: why``) and
    quarantines the result."""
    usage: Usage | None = None
    """What the run consumed, parsed from its output (None: the engine reports nothing, as
    ``shell``)."""
    retry_after_s: float | None = None
    """For ``rate_limited``: how long the provider asked to wait, when the engine could read it
    from its output (None: unknown; the retry policy's back-off applies). The retry is queued
    after this instead of the policy's back-off (:func:`gigafactory.schemas.protocol.finish`)."""


@dataclass(frozen=True)
class Progress:
    """Something an engine's output said while it ran (a turn, a tool call, token usage)."""

    kind: str
    """``progress`` or ``usage``."""
    data: Mapping[str, object]


class OutputParser:
    """Reads an engine's output stream as it arrives; the default reads nothing from it."""

    def feed(self, chunk: bytes) -> list[Progress]:
        """Take the next chunk of output; returns what it said (a line may span chunks)."""
        return []

    def usage(self) -> Usage | None:
        """What the run has consumed so far, from what was fed (None: nothing said). The
        factory compares it with ``budget.tokens`` and ``budget.usd`` after every ``usage``
        item, and records it on the attempt when the engine's :class:`Outcome` has none."""
        return None


PROGRESS_LINE_CHARS = 300
"""A rendered progress line is cut to this many characters."""


def render_progress(p: Progress) -> str:
    """One readable line for something an engine's output said (``gigafactory logs --follow``):
    a turn's text, a tool call with its input, token usage and cost, or the item's fields.

    :param p: the item (:meth:`OutputParser.feed`).
    """
    d = dict(p.data)
    if p.kind == "usage":
        parts = [f"{k.removesuffix('_tokens').replace('_', '-')} {d[k]}" for k in
                 ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens") if d.get(k)]
        parts += [f"{k.replace('_', ' ')} {d[k]}" for k in ("turns", "tool_calls") if d.get(k)]
        if d.get("cost_usd") is not None:
            parts.append(f"${float(d['cost_usd']):.4f} ({d.get('cost_source') or 'unknown'})")
        line = "usage: " + (", ".join(parts) or "none yet") + (f" [{d['model']}]" if d.get("model") else "")
    elif "tool" in d:
        line = f"tool {d['tool']}: {d.get('input', '')}".rstrip(": ")
    elif "text" in d and len(d) == 1:
        line = "text: " + str(d["text"])
    else:
        line = " ".join(f"{k}={v}" for k, v in d.items())
    line = " ".join(line.split())  # one line: an agent's text has newlines
    return line[:PROGRESS_LINE_CHARS]


class SetupFailed(Exception):
    """The job cannot start on this factory (``setup_failed``); the message says why.

    :param detail: the attempt's detail (one line).
    :param log_line: written to the attempt's log, if given (so ``gigafactory logs`` says it too).
    """

    def __init__(self, detail: str, log_line: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.log_line = log_line


class Engine(abc.ABC):
    """One kind of engine. Instances are stateless and shared by every run of the factory."""

    name: str
    """The ``engine:`` value jobs name (``shell``); a valid capability value."""
    engine_class: str
    """The class it belongs to (``script``, ``agentic-coder``)."""
    opt_in: bool = False
    """Offered only when the operator names ``engine:<name>`` (``--cap``), never by the probe,
    and run only where offered (``noop``: it could swallow real work)."""
    verifies: bool = True
    """Whether the ``verify`` gate runs after this engine passed (``noop`` ran nothing)."""
    starts_process: bool = True
    """Whether a run starts a process (the engine's or the verify gate's): only then does the
    attempt get a fence socket (``noop`` starts none, so its runs skip the socket's folder,
    listener and clean-up)."""

    @abc.abstractmethod
    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        """Whether this engine can run here. Never raises (a broken tool is simply not runnable).

        :param environ: the environment engines will run with (credentials are looked up here).
        :param path: the search path for the engine's program.
        :param timeout_s: hard limit for any command run to learn the version.
        """

    def credential_vars(self, environ: Mapping[str, str]) -> tuple[str, ...]:
        """The environment variables whose values are this engine's credential. After an
        ``auth_failed`` the factory withdraws the engine until a hash of these values changes
        (:func:`credential_fingerprint`). The default is every well-known credential variable
        (:data:`gigafactory.factory.credentials.CREDENTIAL_VARS`): wider than needed, so a change of
        any of them restores the engine (at worst one more refused attempt, never a stuck one).

        :param environ: the environment the engine runs with.
        """
        return CREDENTIAL_VARS

    def tokens(self, found: ProbeResult) -> list[str]:
        """The capability tokens a runnable probe result offers: ``engine:<name>``, and
        ``<name>:<version>`` when the engine has a version.

        :param found: what :meth:`probe` returned (runnable).
        """
        out = [f"engine:{self.name}"]
        if found.version:
            out.append(f"{self.name}:{found.version}")
        return out

    def prepare(self, job: EngineJob) -> Prepared:
        """Build the command line, environment and working directory for ``job``; raise
        :class:`SetupFailed` if it cannot start here. Called on a worker thread (never on the
        factory's event loop), so it may block briefly. The default checks the working directory
        and gives the engine :func:`engine_environment`; an engine that is a program overrides
        it to set ``argv``.

        :param job: the attempt (:class:`EngineJob`).
        """
        require_cwd(job)
        return Prepared(cwd=job.cwd, env=engine_environment(job))

    async def run(self, job: EngineJob, prepared: Prepared) -> Outcome:
        """Run what :meth:`prepare` built and say how it ended. The default runs
        ``prepared.argv`` with :func:`shell.run_argv` and classifies it with
        :func:`classify_exit`.

        :param job: the attempt.
        :param prepared: what :meth:`prepare` returned for it.
        """
        res = await run_prepared(job, prepared)
        return res if isinstance(res, Outcome) else classify_exit(res, job)

    def parser(self) -> OutputParser:
        """A fresh reader of one run's output stream (:class:`OutputParser`)."""
        return OutputParser()


def budget_crossed(budget: Budget, usage: Usage | None) -> str | None:
    """Why a run's streamed ``usage`` has crossed its spend budget (``budget.tokens``: every
    token processed, :func:`usage_tokens`; ``budget.usd``: the cost so far, when known), or
    None while it has not. The limit is crossed when the usage exceeds it, not when it equals it.

    :param budget: the manifest's budget.
    :param usage: what the run has reported so far (None: nothing yet).
    """
    if usage is None:
        return None
    if budget.tokens is not None and usage_tokens(usage) > budget.tokens:
        return f"budget.tokens exceeded: {usage_tokens(usage)} tokens used > {budget.tokens}"
    if budget.usd is not None and usage.cost_usd is not None and usage.cost_usd > budget.usd:
        return f"budget.usd exceeded: ${usage.cost_usd:.4f} spent > ${budget.usd:g}"
    return None


def credential_fingerprint(names: Iterable[str], environ: Mapping[str, str]) -> str:
    """A hash of the values of the variables ``names`` in ``environ`` (an unset variable and
    an empty one hash alike), so a credential's change can be noticed without keeping it. Cheap
    enough for every heartbeat.

    :param names: the credential variables (:meth:`Engine.credential_vars`).
    :param environ: the environment to read them from.
    """
    h = hashlib.sha256()
    for name in sorted(set(names)):
        h.update(name.encode() + b"\0" + environ.get(name, "").encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def require_cwd(job: EngineJob) -> None:
    """Raise :class:`SetupFailed` when the job's working directory does not exist here."""
    if not job.cwd.is_dir():
        raise SetupFailed(f"cwd {job.cwd} does not exist on {job.factory}",
                          f"cwd {job.cwd} does not exist on factory {job.factory}\n")


BASE_ENV_VARS: frozenset[str] = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "LANG", "LANGUAGE", "TERM", "TZ",
    # Proxies and certificate authorities: a machine behind a proxy needs them to reach anything.
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
})
"""Variables of the factory's environment every engine gets (none is a secret), with the
``LC_*`` and ``GF_*`` ones (:func:`base_environment`)."""


FACTORY_ONLY_PREFIXES: tuple[str, ...] = ("GIGAFACTORY_", "NATS_")
"""Variables that are the factory's own and never reach an engine, even when named in
``passthrough``: its settings (``GIGAFACTORY_NATS_URL`` with any password in it,
``GIGAFACTORY_CREDS``, the credentials path, its identity) and the NATS tools' context
(``NATS_URL``, ``NATS_CREDS``, ``NATS_NKEY``, ``NATS_PASSWORD``...). A job that runs
``gigafactory fence`` asks its attempt's fence socket (``GF_FENCE_SOCKET``,
:mod:`~gigafactory.factory.fence_socket`): the factory renews for it, so the job never holds the
factory's credentials; it gets the broker's address without userinfo only
(:func:`strip_url_credentials`)."""


def base_environment(environ: Mapping[str, str], passthrough: Iterable[str] = ()) -> dict[str, str]:
    """The variables of ``environ`` an engine may see: :data:`BASE_ENV_VARS`, ``LC_*``,
    ``GF_*``, and the names in ``passthrough``. Nothing else (API keys and other secrets of the
    factory stay out unless named), and never the factory's own (:data:`FACTORY_ONLY_PREFIXES`).

    :param environ: the factory's environment.
    :param passthrough: further names to pass (credential variables, the operator's allowlist).
    """
    extra = set(passthrough)
    return {k: v for k, v in environ.items()
            if (k in BASE_ENV_VARS or k in extra or k.startswith(("LC_", "GF_")))
            and not k.startswith(FACTORY_ONLY_PREFIXES)}


def strip_url_credentials(urls: str) -> str:
    """``urls`` (one NATS URL or a comma-separated list) without any ``user:password@`` or
    token userinfo: the broker's address a job may know, never the factory's secret.

    :param urls: the URLs the factory connected with.
    """
    out = []
    for u in (x.strip() for x in urls.split(",")):
        if not u:
            continue
        scheme, sep, rest = u.partition("://")
        if not sep:
            scheme, rest = "", u
        host = rest.rpartition("@")[2] if "@" in rest.split("/", 1)[0] else rest
        out.append(f"{scheme}{sep}{host}")
    return ",".join(out)


def cred_variables(requirements: Iterable[str], known: Iterable[str]) -> list[str]:
    """The variable names behind the ``cred:<name>`` tokens among ``requirements``: the probe
    offers ``cred:<variable lower-case>`` for each variable in ``known`` that is set, so each
    such token maps back to that variable.

    :param requirements: the job's requirement tokens (``cred:github_token``, ``os:linux``, ...).
    :param known: the credential variables the probe reports (``CREDENTIAL_VARS``).
    """
    by_token = {f"cred:{v.lower()}": v for v in known}
    return [by_token[r] for r in requirements if r in by_token]


def engine_environment(job: EngineJob) -> dict[str, str]:
    """The environment an engine runs with: :func:`base_environment` of the factory's (with the
    job's ``env_passthrough``), the ``GF_*`` variables of the attempt, and this installation's
    ``gigafactory`` first on ``PATH`` (so a script can call ``gigafactory fence``).

    :param job: the attempt.
    """
    env = base_environment(os.environ, job.env_passthrough)
    env.update(job.gf_env)
    # This installation's `gigafactory` first on PATH, so scripts can call `gigafactory fence`.
    env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", "")])
    return env


def classify_exit(res: shell.ProcessResult, job: EngineJob) -> Outcome:
    """How a process engine ended, from its :class:`shell.ProcessResult`: self-fenced, cancelled,
    past its time (``job.timeout_class``), a non-zero exit or a signal (``crash``), or passed.

    :param res: what the engine's process did.
    :param job: the attempt (its limit and timeout class).
    """
    if res.fenced:
        return Outcome(FailureClass.CRASH, "self-fenced", res.exit_code, self_fenced=True)
    if res.cancelled:
        return Outcome(FailureClass.CRASH, "cancelled (lease lost or factory draining)", res.exit_code)
    if res.timed_out:
        return Outcome(job.timeout_class, f"engine ran past {job.timeout_s:g}s and was killed", res.exit_code)
    if res.exit_code != 0:
        why = f"signal {res.signal}" if res.signal else f"exit code {res.exit_code}"
        return Outcome(FailureClass.CRASH, f"engine ended with {why}", res.exit_code)
    return Outcome(None, "engine exited 0", 0)


async def run_prepared(job: EngineJob, prepared: Prepared,
                       on_output: Callable[[bytes], None] | None = None) -> "shell.ProcessResult | Outcome":
    """Run ``prepared.argv`` as :meth:`Engine.prepare` built it, bounded and fenced as the job
    says. Returns the process result, or a ``setup_failed`` :class:`Outcome` when the program
    is missing.

    :param job: the attempt.
    :param prepared: what ``prepare`` built.
    :param on_output: the output callback (default: the job's).
    """
    try:
        return await shell.run_argv(
            prepared.argv, cwd=str(prepared.cwd), env=prepared.env, timeout_s=job.timeout_s,
            log_path=job.log_path, on_output=on_output or job.on_output, cancel=job.cancel,
            kill_grace_s=job.kill_grace_s, header=job.header, fence=job.fence, supervised=job.supervised,
            redactor=job.redactor, sandbox=job.sandbox,
        )
    except FileNotFoundError as e:
        return Outcome(FailureClass.SETUP_FAILED, str(e))
