"""What a log line is about: the job, factory and epoch (and the trace) of the code that logs it,
kept in a context variable so that no ``log.info`` call has to pass them.

A factory binds its id for everything it runs (:meth:`Factory.run`); each step of a job binds the
job and epoch around it (:func:`gigafactory.tracing.span` does it with the step's span). asyncio
copies the context into every task it starts, so the engine run, renewals and reporting of a job
all log with the job's fields. :class:`ContextFilter` puts them on every record; the JSON log
format (:func:`gigafactory.clitools.setup_logging`) prints them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

from opentelemetry import trace

FIELDS = ("job", "factory", "epoch")
"""The fields a log line may carry, besides ``trace_id``."""

_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("gigafactory_log_fields", default={})


def current() -> dict:
    """The fields bound here: a subset of :data:`FIELDS`, never None values."""
    return _fields.get()


def bind(**fields) -> contextvars.Token:
    """Bind ``fields`` (None values are skipped) for the rest of the current context (a task and
    the tasks it starts from now on); returns the token :func:`unbind` takes.

    :param fields: among :data:`FIELDS`.
    """
    assert set(fields) <= set(FIELDS), fields
    new = {k: v for k, v in fields.items() if v is not None}
    return _fields.set({**_fields.get(), **new}) if new else _fields.set(_fields.get())


def unbind(token: contextvars.Token) -> None:
    """Undo the :func:`bind` that returned ``token``."""
    _fields.reset(token)


@contextlib.contextmanager
def bound(**fields) -> Iterator[None]:
    """:func:`bind` for the block only.

    :param fields: among :data:`FIELDS`; None values leave the bound value as it is.
    """
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


class ContextFilter(logging.Filter):
    """Sets ``job``, ``factory``, ``epoch`` and ``trace_id`` on every record that passes (None
    where unknown): ``trace_id`` is the current span's trace, 32 hex digits. A record that has
    them already (``extra=``) keeps its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _fields.get()
        for k in FIELDS:
            if getattr(record, k, None) is None:
                setattr(record, k, fields.get(k))
        if getattr(record, "trace_id", None) is None:
            sc = trace.get_current_span().get_span_context()
            record.trace_id = format(sc.trace_id, "032x") if sc.is_valid else None
        return True
