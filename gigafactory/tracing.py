"""OpenTelemetry traces: one job is one trace, across the coordinator and every factory that
touched it.

How the context travels (W3C Trace Context, the ``traceparent`` header):

- ``gigafactory submit`` opens the ``submit`` span and sends its context in the headers of the
  ``gf.api.submit`` request (:meth:`gigafactory.client.Client.call` injects it into every API
  request); the coordinator's API handler continues it (``api submit``), and each job of the
  batch gets an ``intake`` span.
- The job record carries the context on: ``JobRecord.trace`` is the ``traceparent`` of the
  job's ``intake`` span, written with the record at submit. Claims, renewals, results and
  reclaims are compare-and-set writes on that record, not messages, so every later span of the
  job (``dispatch``, ``reclaim``, ``claim``, ``attempt``, ``engine``, ``verify``, ``push``,
  ``ship``, ``report``) is a child of the record's context, read from the record itself.
- Where a message does go from one process to another, its headers carry the context too: the
  ``gf.dispatch.<pool>`` message (a factory's ``claim`` is a child of the ``dispatch`` span that
  offered the job) and the ``GF_EVENTS`` audit events (:meth:`Broker.publish_event`).
- A job submitted without a context (the inbox folder, an API caller that sends none) starts
  its trace at ``intake``. A reclaimed job keeps its record, so both attempts (each a ``claim``
  with its ``attempt`` below it, with the job's ``epoch`` as an attribute) are in one trace,
  with the coordinator's ``reclaim`` span between them.

Export: when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set
and ``OTEL_SDK_DISABLED`` is not ``true``, :func:`setup` installs the SDK's tracer provider with
a batch span processor and the OTLP/HTTP exporter; every other ``OTEL_*`` variable
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``...) means what the OpenTelemetry specification says.
Otherwise nothing is installed: the tracer is the API's no-op tracer, which records nothing and
exports nothing, but still passes on a context it was given (a process without an exporter
between two with one does not cut the trace).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gigafactory import logcontext

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
"""Either turns export on (the standard variables; the second names the traces endpoint only)."""
TRACEPARENT_MAX_CHARS = 55
"""A version-00 ``traceparent`` is exactly this long; a longer value is not one and is ignored
(so a record or header cannot make a process parse kilobytes)."""

_PROPAGATOR = TraceContextTextMapPropagator()
"""W3C ``traceparent``/``tracestate`` only, stated explicitly: ``OTEL_PROPAGATORS`` does not
change what goes in NATS headers or job records."""
_tracer: trace.Tracer = trace.NoOpTracer()
_provider = None


def enabled() -> bool:
    """Whether spans are recorded and exported in this process (:func:`setup` installed the SDK)."""
    return _provider is not None


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default: the process's) asks for export: an OTLP endpoint is set and the
    SDK is not disabled.

    :param env: the environment to read.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(v, "").strip() for v in ENDPOINT_VARS)


def setup(service_name: str) -> bool:
    """Install the SDK tracer provider with the OTLP/HTTP exporter if the environment asks for
    export (:func:`wanted`); do nothing otherwise. Idempotent; the provider is flushed and shut
    down at exit (:func:`shutdown`). Returns whether spans are exported.

    :param service_name: ``service.name`` of this process's spans unless ``OTEL_SERVICE_NAME``
        (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``) says otherwise.
    """
    global _tracer, _provider
    if _provider is not None:
        return True
    if not wanted():
        return False
    # Imported only when exporting: a process that does not trace never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from gigafactory.version import __version__

    # Resource.create gives its own attributes precedence over OTEL_SERVICE_NAME and
    # OTEL_RESOURCE_ATTRIBUTES: the name is only this process's default, so the environment's wins.
    env_resource = Resource.create({})
    named = env_resource.attributes.get(SERVICE_NAME, "")
    default = not named or str(named).startswith("unknown_service")
    resource = env_resource.merge(Resource({"service.version": __version__,
                                            **({SERVICE_NAME: service_name} if default else {})}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    _tracer = provider.get_tracer("gigafactory", __version__)
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Export what is buffered and stop exporting (bounded by the exporter's own timeout,
    ``OTEL_EXPORTER_OTLP_TIMEOUT``, default 10 s). Safe to call more than once."""
    global _tracer, _provider
    if _provider is None:
        return
    provider, _provider = _provider, None
    _tracer = trace.NoOpTracer()
    provider.shutdown()


# -- context in and out ---------------------------------------------------------------------------


def inject(headers: dict[str, str] | None = None, context: str | None = None) -> dict[str, str] | None:
    """``headers`` with a trace context added: ``context`` (a ``traceparent`` taken earlier, as
    :func:`traceparent` gave it) if it is a valid one, else the current context's
    ``traceparent`` (and ``tracestate``); the headers unchanged (None stays None) when there is
    neither.

    :param headers: the message's other headers (not modified; a copy is returned).
    :param context: a ``traceparent`` to send instead of the current context.
    """
    given = extract(context) if context else None
    if given is None and not trace.get_current_span().get_span_context().is_valid:
        return headers
    out = dict(headers or {})
    _PROPAGATOR.inject(out, context=given)
    return out


def extract(carrier: Mapping[str, str] | str | None) -> otel_context.Context | None:
    """The context carried by message headers or a ``traceparent`` string; None if there is
    none (or it is not a valid one: it is then ignored, never an error).

    :param carrier: NATS message headers, a job record's ``trace``, or None.
    """
    if not carrier:
        return None
    if isinstance(carrier, str):
        carrier = {"traceparent": carrier}
    tp = carrier.get("traceparent")
    if not isinstance(tp, str) or len(tp) > TRACEPARENT_MAX_CHARS:
        return None
    ctx = _PROPAGATOR.extract({k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent() -> str:
    """The current context as a ``traceparent`` string ("" when there is none): what a job
    record keeps in ``trace``."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def trace_id() -> str | None:
    """The current trace's id as 32 hex digits, or None when there is none (for log lines)."""
    sc = trace.get_current_span().get_span_context()
    return format(sc.trace_id, "032x") if sc.is_valid else None


# -- spans ----------------------------------------------------------------------------------------


_KINDS = {"internal": trace.SpanKind.INTERNAL, "client": trace.SpanKind.CLIENT, "server": trace.SpanKind.SERVER,
          "producer": trace.SpanKind.PRODUCER, "consumer": trace.SpanKind.CONSUMER}


@contextlib.contextmanager
def span(name: str, *, parent: Mapping[str, str] | str | otel_context.Context | None = None,
         kind: str = "internal", start_ns: int | None = None, job: str | None = None,
         epoch: int | None = None, factory: str | None = None, **attributes) -> Iterator[trace.Span]:
    """A span named ``name`` around the block, current inside it, and the job, epoch and
    factory in the log context (:mod:`gigafactory.logcontext`) for the block's log lines.

    Costs a context switch and nothing else when tracing is off. An exception leaving the block
    marks the span as an error and is re-raised unchanged.

    :param name: the step (``claim``, ``engine``...).
    :param parent: the parent context: message headers, a job record's ``trace``, or a context;
        None (or an invalid one): the current context.
    :param kind: ``internal``, ``client``, ``server``, ``producer`` or ``consumer``.
    :param start_ns: when the step began (Unix nanoseconds), if before the block.
    :param job: the job id (span attribute ``gigafactory.job``; also put in the log context).
        Default, as for ``epoch`` and ``factory``: the log context's (the enclosing step's).
    :param epoch: the job's epoch (``gigafactory.epoch``).
    :param factory: the factory (``gigafactory.factory``).
    :param attributes: more attributes, each named ``gigafactory.<key>``; None values are left out.
    """
    ctx = parent if isinstance(parent, otel_context.Context) else extract(parent)
    # A step inside a job's step is about the same job: the enclosing span's fields are the default.
    bound = logcontext.current()
    about = {"job": job if job is not None else bound.get("job"),
             "epoch": epoch if epoch is not None else bound.get("epoch"),
             "factory": factory if factory is not None else bound.get("factory")}
    attrs = {f"gigafactory.{k}": v for k, v in (*about.items(), *attributes.items()) if v is not None}
    with _tracer.start_as_current_span(name, context=ctx, kind=_KINDS[kind], attributes=attrs,
                                       start_time=start_ns) as s:
        with logcontext.bound(job=job, epoch=epoch, factory=factory):
            yield s
