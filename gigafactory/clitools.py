"""What every command group of the ``gigafactory`` CLI shares: exit codes, errors, JSON output,
logging, and choices whose values are only known once a suite is imported.

The main group (:mod:`gigafactory.cli`) and the suites' groups (:mod:`gigafactory.chaos.cli`,
:mod:`gigafactory.loadtest.cli`) import this module; it imports none of them.
"""

from __future__ import annotations

import datetime
import functools
import logging
import sys
from collections.abc import Callable, Iterable

import click
import orjson

# -- exit codes: the same meaning in every command ---------------------------------------------

EXIT_OK = 0
"""Done, and the outcome is the one asked for (every job shipped, the scenario passed, ...)."""
EXIT_FAILED = 1
"""Done, and the outcome is a failure: a job failed or was dead-lettered, a scenario found a
violation, the coordinator refused the request (unknown job, wrong stage, invalid job file), a
fence found the job held by another epoch, the load harness could not complete a run."""
EXIT_USAGE = 2
"""Not started: an invalid option or argument (click's own usage errors exit 2 too), an invalid
``GIGAFACTORY_*`` setting, no broker configured, a store already served by another broker."""
EXIT_TIMEOUT = 3
"""Ran out of time: ``submit --wait`` reached ``--timeout`` before every job came to rest;
``fence`` renewed the lease but less than ``--min-remaining-s`` of it is left."""
EXIT_UNAVAILABLE = 4
"""Cannot tell: the broker did not answer (unreachable, ``connect_timeout_s`` passed), no
coordinator answered the request, or it failed on the coordinator's side. Trying again later
may succeed; a script must not take it as success or as a definite failure."""

EXIT_CODES: dict[int, str] = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_USAGE: "usage",
                              EXIT_TIMEOUT: "timed out", EXIT_UNAVAILABLE: "unavailable"}


def emit_json(obj) -> None:
    """Print ``obj`` as indented JSON with sorted keys on stdout.

    :param obj: anything orjson encodes.
    """
    click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())


def fail(message: str, code: int = EXIT_FAILED, *, as_json: bool = False, errors: list | None = None) -> None:
    """End the command with ``code``: the message (and per-file ``errors``) on stderr, or as a
    JSON object ``{"error", "errors"}`` on stdout with ``as_json``.

    :param message: one line saying what went wrong and what to do.
    :param code: one of the ``EXIT_*`` codes.
    :param as_json: print JSON on stdout instead of text on stderr.
    :param errors: per-file details ``{file, line, field, message}``.
    """
    if as_json:
        emit_json({"error": message, "errors": errors or []})
    else:
        click.secho(f"error: {message}", fg="red", err=True)
        for e in errors or []:
            where = e.get("file", "") + (f":{e['line']}" if e.get("line") else "")
            field = f" field '{e['field']}':" if e.get("field") else ""
            click.echo(f"  {where}:{field} {e.get('message')}", err=True)
    sys.exit(code)


# -- logging -------------------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")
"""The ``--log-level`` choices of the long-running commands."""
LOG_FORMATS = ("text", "json")
"""The ``--log-format`` choices of the long-running commands."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, what a log shipper reads: ``time`` (UTC, ISO 8601 with
    microseconds), ``at`` (the same instant in Unix seconds), ``level``, ``logger``, ``message``,
    ``job``, ``factory``, ``epoch`` and ``trace_id`` (null when the line is about no job or no
    trace: see :mod:`gigafactory.logcontext`), and ``exception`` (the formatted traceback) when
    there is one."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out = {"time": at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
               "at": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage(), "job": getattr(record, "job", None),
               "factory": getattr(record, "factory", None), "epoch": getattr(record, "epoch", None),
               "trace_id": getattr(record, "trace_id", None)}
        if record.exc_info or record.exc_text:
            # exc_text first: it may have been rendered and redacted already (factory/redact.py).
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info", log_format: str = "text", *, nats_level: int = logging.WARNING) -> None:
    """The one logging set-up of every command: log to stderr at ``level``, as text lines or
    JSON lines (:class:`JsonLogFormatter`), each record carrying the job, factory, epoch and
    trace it is about (:class:`gigafactory.logcontext.ContextFilter`). Replaces any handler set
    up before (a command calls it once, first).

    :param level: one of :data:`LOG_LEVELS` (any case).
    :param log_format: one of :data:`LOG_FORMATS`.
    :param nats_level: the level of nats-py's own logger (its reconnect chatter).
    """
    from gigafactory.logcontext import ContextFilter

    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("nats").setLevel(nats_level)


def log_options(default_level: str = "info", *, json_alias: bool = False):
    """``--log-level`` and ``--log-format`` (and, with ``json_alias``, ``--json`` meaning
    ``--log-format json``, as the services had it) on a long-running command; the command gets
    ``log_level`` and ``log_format`` (``--json`` folded into it).

    :param default_level: the ``--log-level`` default.
    :param json_alias: also offer ``--json`` (a command whose ``--json`` means something else
        must not).
    """

    def decorate(fn):
        @click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=default_level,
                      show_default=True, help="Log lines at this level and above, on stderr.")
        @click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
                      help="text: one readable line per record; json: one JSON object per line (time, at, level, "
                           "logger, message, job, factory, epoch, trace_id, exception), for a log shipper.")
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if kwargs.pop("json_logs", False):
                kwargs["log_format"] = "json"
            return fn(*args, **kwargs)

        if json_alias:
            wrapper = click.option("--json", "json_logs", is_flag=True,
                                   help="Same as --log-format json.")(wrapper)
        return wrapper

    return decorate


# -- choices known once a suite is imported --------------------------------------------------------


class LazyChoice(click.Choice):
    """A :class:`click.Choice` whose values are read on first use (validation, help, shell
    completion), so that ``gigafactory --help`` does not import every suite to list them.

    :param load: returns the valid values.
    :param what: names the values in the error (``scenario``, ``workload``).
    """

    def __init__(self, load: Callable[[], Iterable[str]], what: str) -> None:
        self._load = load
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True
        self.what = what

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices

    def get_invalid_choice_message(self, value, ctx) -> str:
        return f"no {self.what} {value!r}; known: {', '.join(self.choices)}"

