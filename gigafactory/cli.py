"""The ``gigafactory`` command line: the main group, the services and the client commands; the
suites bring their own groups (:mod:`gigafactory.chaos.cli`, :mod:`gigafactory.loadtest.cli`).

Every command that talks to a broker takes ``--nats URL`` (default ``$GIGAFACTORY_NATS_URL``,
else the embedded broker started by ``gigafactory up``/``server`` on this machine). ``--json``
means machine-readable output on the client commands; every long-running command takes
``--log-level`` and ``--log-format text|json`` (one logging set-up:
:func:`gigafactory.clitools.setup_logging`), and on the services (``coordinator``, ``factory``,
``up``) ``--json`` is an alias of ``--log-format json``. Exit codes mean the same in every command
(:mod:`gigafactory.clitools`: 0 ok, 1 failed, 2 usage, 3 timed out, 4 unavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import click
import msgspec

from gigafactory import __version__
from gigafactory.chaos.cli import chaos
from gigafactory.clitools import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    log_options,
    setup_logging,
)
from gigafactory.clitools import emit_json as _emit_json
from gigafactory.clitools import fail as _fail
from gigafactory.loadtest.cli import loadtest
from gigafactory.creds_cli import connection_options, creds
from gigafactory.economics.cli import invoices, report
from gigafactory.schemas.api import LIST_LIMIT_MAX
from gigafactory.economics.reports import budget_group
from gigafactory.halt_cli import halt, resume
from gigafactory.schemas.lifecycle import Stage
from gigafactory.config import (
    CONFIG_FILE_NAME,
    ENV_CONFIG,
    Settings,
    SettingsError,
    check_sync_interval,
    clear_server_state,
    home,
    resolve_url,
    write_server_state,
)

log = logging.getLogger(__name__)


def _nats_option(fn):
    fn = connection_options(fn)  # --creds and --tls-*: wherever --nats is
    return click.option("--nats", "nats_url", envvar="GIGAFACTORY_NATS_URL", default=None, metavar="URL",
                        help="NATS URL or comma-separated cluster URLs (default: $GIGAFACTORY_NATS_URL, "
                             "else the embedded broker).")(fn)


def common(fn):
    """--nats and --json (machine-readable output) on a client command."""

    @_nats_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def service(fn):
    """--nats, --log-level and --log-format (with --json as an alias of --log-format json) on a
    long-running service command."""

    @_nats_option
    @log_options(json_alias=True)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _setup_service(service_name: str, log_level: str, log_format: str) -> None:
    """The logging and tracing of a long-running command (:func:`setup_logging`,
    :func:`gigafactory.tracing.setup`: spans are exported only when OTEL_EXPORTER_OTLP_ENDPOINT is set)."""
    from gigafactory import tracing

    setup_logging(log_level, log_format)
    if tracing.setup(service_name):
        log.info("exporting traces over OTLP as %s", service_name)


def _need_url(nats_url: str | None, as_json: bool) -> str:
    url = resolve_url(nats_url)
    if not url:
        _fail("no broker: pass --nats URL, set GIGAFACTORY_NATS_URL, or start the embedded one "
              "with 'gigafactory up' (or 'gigafactory server')", EXIT_USAGE, as_json=as_json)
    return url  # type: ignore[return-value]


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C raises KeyboardInterrupt instead
            pass


STORE_WAIT_S = 20.0
"""How long a start waits for a broker found on its store that is still starting or exiting."""


@contextlib.contextmanager
def _url_or_embedded(nats_url: str | None, settings: Settings):
    """The configured broker's URL, else an embedded broker's: started here and stopped on
    exit, or, when one started by another live ``up``/``server`` already serves this home's
    store, that one's (left running on exit: it is not ours)."""
    url = resolve_url(nats_url)
    if url:
        yield url
        return
    srv = _start_embedded(home() / "nats", settings.sync_interval, reuse=True)
    if isinstance(srv, str):
        yield srv
        return
    log.info("started the embedded broker on %s", srv.url)
    try:
        yield srv.url
    finally:
        srv.stop()
        clear_server_state(srv.proc.pid if srv.proc else 0)


def _sync_interval_option(value: str | None) -> str | None:
    try:
        return check_sync_interval(value, "--sync-interval")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _embedded_security():
    """The embedded broker's users and TLS: authentication is on by default (the home's identity
    store, with ``admin``, ``coordinator`` and the local factory created on first start); TLS
    when ``GIGAFACTORY_TLS_CERT``/``_KEY`` are set (``--tls-cert``/``--tls-key``)."""
    from gigafactory.identity import IdentityError, IdentityStore
    from gigafactory.natsconf import TlsConf

    store = IdentityStore.at_home()
    try:
        store.ensure_defaults()
    except (IdentityError, OSError) as e:
        _fail(f"cannot create the identity store {store.root}: {e}", EXIT_USAGE)
    s = Settings.from_env()
    tls = None
    if s.tls_cert or s.tls_key:
        if not (s.tls_cert and s.tls_key):
            _fail("TLS needs both --tls-cert and --tls-key (GIGAFACTORY_TLS_CERT, GIGAFACTORY_TLS_KEY)", EXIT_USAGE)
        tls = TlsConf(cert_file=os.path.abspath(s.tls_cert), key_file=os.path.abspath(s.tls_key),
                      ca_file=os.path.abspath(s.tls_ca) if s.tls_ca else None, verify=False)
    return store.users(), tls


def _start_embedded(store_dir: Path, sync_interval: str | None, port: int = 0, *, reuse: bool):
    """Start the embedded broker on ``store_dir``; never a second one on the same store.

    If a broker already holds the store: its URL when its starter is alive and ``reuse``
    (an ``up`` beside a running ``server``), a clear exit when not ``reuse`` (``server``);
    an orphan (its starter gone) is stopped first, then ours starts."""
    from gigafactory.embedded import EmbeddedServer, StoreInUse, inspect_holder, stop_store_holder

    deadline = time.monotonic() + STORE_WAIT_S
    while True:
        try:
            users, tls = _embedded_security()
            srv = EmbeddedServer(store_dir=str(store_dir), port=port, sync_interval=sync_interval,
                                 log_file=str(store_dir.parent / "nats-server.log"), users=users, tls=tls).start()
        except StoreInUse as e:
            verdict = inspect_holder(e.holder)
            if verdict == "reuse" and reuse:
                log.info("%s; using it", e)
                return str(e.holder["url"])
            if verdict == "reuse":
                _fail(f"{e}: use it (--nats {e.holder['url']}), or stop its starter (pid "
                      f"{e.holder['starter_pid']}) first", EXIT_USAGE)
            if verdict == "stop":
                log.warning("%s, whose starter is gone (an orphan): stopping it", e)
                stop_store_holder(str(store_dir), e.holder)
                continue
            if time.monotonic() > deadline:
                _fail(f"{e}: still starting or exiting after {STORE_WAIT_S:g}s; look at it "
                      f"({store_dir / 'gigafactory-broker.lock'}) and stop it", EXIT_USAGE)
            time.sleep(0.1)
            continue
        write_server_state(srv.url, srv.proc.pid if srv.proc else 0)
        return srv


class _Main(click.Group):
    """The command group; a setting refused by its validation (a bad ``GIGAFACTORY_*`` value, a
    fencing margin that cannot fence) ends the command with its one-line message and exit 2,
    not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SettingsError as e:
            _fail(f"invalid setting: {e}", EXIT_USAGE)


EPILOG = """\b
Exit codes (every command):
  0  ok
  1  failed: a job failed, a scenario found a violation, the request was refused, fenced
  2  usage: invalid option, argument or setting; no broker configured
  3  timed out: submit --wait reached --timeout; fence: too little lease left
  4  unavailable: the broker or coordinator did not answer (cannot tell)

\b
Shell completion (bash; zsh and fish likewise with zsh_source, fish_source):
  eval "$(_GIGAFACTORY_COMPLETE=bash_source gigafactory)"
"""


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help=f"Read settings from this TOML file (default: ${ENV_CONFIG}, else {CONFIG_FILE_NAME} in "
                   "$GIGAFACTORY_HOME if it exists). GIGAFACTORY_* variables and options win over it.")
@click.version_option(__version__, prog_name="gigafactory")
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Gigafactory: job files in, fenced shipped work out, across a fleet of agent machines."""
    if config_file is not None:
        # Through the environment, so that every Settings.from_env() of this command reads it,
        # and the processes it starts (the demo's factories, the labs' services) too.
        os.environ[ENV_CONFIG] = str(Path(config_file).expanduser().absolute())
    if not ctx.resilient_parsing:
        Settings.from_env()  # a bad value or config file ends every command here: one line, exit 2


# -- services ---------------------------------------------------------------------------------


@main.command()
@click.option("--port", type=int, default=4222, show_default=True, help="Client port (0: any free port).")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="JetStream store folder.")
@click.option("--sync-interval", default=None, callback=lambda _c, _p, v: _sync_interval_option(v),
              help="When the store is fsynced. 'always' (the default; GIGAFACTORY_SYNC_INTERVAL): "
                   "before every write is acknowledged, so acknowledged submissions and revisions "
                   "survive an OS crash or power loss. A duration such as '2m' (nats-server's own "
                   "default) is faster but RISKS that: an OS crash or power loss can drop the "
                   "acknowledged writes of the last interval and roll revisions back, so a job can "
                   "vanish or an epoch be handed out twice.")
@log_options()
@connection_options
def server(port: int, store: str | None, sync_interval: str | None, log_level: str, log_format: str) -> None:
    """Run the embedded nats-server (JetStream on) in the foreground.

    The broker dies with this command, however it ends (SIGKILL included); a store already
    served by a live broker is refused, one left by a dead starter is stopped first."""
    setup_logging(log_level, log_format)
    store_dir = Path(store) if store else home() / "nats"

    def stopped(*_):
        raise KeyboardInterrupt  # SIGTERM as Ctrl-C: stop the broker cleanly on the way out

    signal.signal(signal.SIGTERM, stopped)
    srv = _start_embedded(store_dir, sync_interval or Settings.from_env().sync_interval, port, reuse=False)
    click.echo(f"nats-server listening on {srv.url} (store {store_dir}); Ctrl-C stops it")
    try:
        assert srv.proc is not None
        srv.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        clear_server_state(srv.proc.pid if srv.proc else 0)


async def _service_broker(url: str, name: str, settings: Settings, stop: asyncio.Event):
    """The service's broker connection, waiting as long as it takes (see
    :func:`gigafactory.broker.wait_for_broker`); None if stopped while waiting. Exits 2 when
    ``connect_timeout_s`` passes first, or a connect setting is invalid."""
    from gigafactory.broker import BrokerUnavailable, wait_for_broker

    try:
        return await wait_for_broker(url, name, settings, stop=stop)
    except BrokerUnavailable as e:
        _fail(str(e), EXIT_UNAVAILABLE)
    except ValueError as e:
        _fail(str(e), EXIT_USAGE)


async def _local_broker_url(settings: Settings, stop: asyncio.Event) -> str | None:
    """With no broker configured: wait for an embedded one on this machine (``gigafactory
    server`` or ``up`` on the same home) and return its URL; None if stopped meanwhile. Exits 2
    once ``connect_timeout_s`` (0: never) passes first."""
    from gigafactory.broker import check_connect_settings, connect_backoff_s

    try:
        check_connect_settings(settings)
    except ValueError as e:
        _fail(str(e), EXIT_USAGE)
    loop = asyncio.get_running_loop()
    t0, tries, logged_at = loop.time(), 0, float("-inf")
    while (url := resolve_url(None)) is None:
        tries += 1
        waited_s = loop.time() - t0
        what = (f"no broker configured (--nats, GIGAFACTORY_NATS_URL) and no embedded broker running for "
                f"{home()}")
        if settings.connect_timeout_s and waited_s >= settings.connect_timeout_s:
            _fail(f"{what} after {settings.connect_timeout_s:g}s (connect_timeout_s): start one with "
                  "'gigafactory up' or 'gigafactory server', or pass --nats URL", EXIT_UNAVAILABLE)
        if loop.time() - logged_at >= 30.0:
            logged_at = loop.time()
            log.warning("%s: waiting for 'gigafactory server' or 'gigafactory up' to start one (%.0fs so far)",
                        what, waited_s)
        try:
            await asyncio.wait_for(stop.wait(), timeout=connect_backoff_s(tries, settings.connect_backoff_max_s,
                                                                         random.random()))
            return None
        except asyncio.TimeoutError:
            pass
    return url


async def _run_coordinator(url: str, inbox: str | None, settings: Settings) -> None:
    from gigafactory.coordinator.service import Coordinator

    stop = asyncio.Event()
    _install_stop(stop)
    async with _metrics_endpoint(settings):
        broker = await _service_broker(url, "gigafactory-coordinator", settings, stop)
        if broker is None:
            return
        try:
            coord = Coordinator(broker, settings, inbox=inbox)
            await coord.run(stop)
        finally:
            await broker.close()


async def _run_factory(url: str | None, settings: Settings, **kw) -> None:
    from gigafactory import logcontext
    from gigafactory.factory.agent import Factory

    stop = asyncio.Event()
    _install_stop(stop)
    async with _metrics_endpoint(settings):
        url = url or await _local_broker_url(settings, stop)
        if url is None:
            return
        broker = await _service_broker(url, f"gigafactory-factory-{kw.get('factory_id') or ''}", settings, stop)
        if broker is None:
            return
        try:
            f = Factory(broker, settings=settings, **kw)
            logcontext.bind(factory=f.id)
            log.info(
                "factory %s up: %d stations, capabilities %s", f.id, len(f.record.stations),
                " ".join(f.record.capabilities))
            await f.run(stop)
        finally:
            await broker.close()


_connect_timeout_option = click.option(
    "--connect-timeout-s", type=click.FloatRange(min=0), default=None,
    help="Give up if the broker has not answered within this many seconds at start (default: the "
         "connect_timeout_s setting, $GIGAFACTORY_CONNECT_TIMEOUT_S; 0 waits forever).")

# -- metrics endpoint (issue 11, helper metrics) ------------------------------------------------
_metrics_port_option = click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None,
    help="Serve /metrics (Prometheus), /healthz and /readyz on this port (0: a free port, logged; "
         "default: the metrics_port setting, $GIGAFACTORY_METRICS_PORT; unset: no endpoint). "
         "Listens on $GIGAFACTORY_METRICS_HOST (default 127.0.0.1).")


@contextlib.asynccontextmanager
async def _metrics_endpoint(settings: Settings):
    """This process's metrics endpoint for the block, if ``metrics_port`` is set; started
    before the broker is reached, so /healthz answers (and /readyz says not ready) meanwhile."""
    from gigafactory.metrics import serve

    try:
        srv = await serve(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        _fail(f"metrics: cannot listen on {settings.metrics_host}:{settings.metrics_port} "
              f"(--metrics-port, GIGAFACTORY_METRICS_PORT): {exc.strerror or exc}", EXIT_USAGE)
    try:
        yield srv
    finally:
        if srv is not None:
            await srv.close()



@main.command("model-server")
@click.option("--script", "script_path", required=True, type=click.Path(dir_okay=False),
              help="YAML or JSON script of turns to replay (see gigafactory/model_server.py).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Loopback port (0: any free port; the URL is printed).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="Append every request and response to this JSONL file.")
@log_options()
def model_server(script_path: str, port: int, log_path: str | None, log_level: str, log_format: str) -> None:
    """Serve a scripted model on 127.0.0.1: agent CLIs run against it with no keys and no spend.

    Speaks Anthropic Messages, OpenAI Responses and Chat Completions, and Gemini
    generateContent (streaming and not); point a CLI at it with its own base-URL setting."""
    from gigafactory.model_server import ScriptError, load_script, serve_forever

    setup_logging(log_level, log_format)
    try:
        load_script(script_path)  # fail before binding a port, with the file and field named
    except ScriptError as exc:
        _fail(str(exc), EXIT_USAGE)

    async def run() -> None:
        stop = asyncio.Event()
        _install_stop(stop)
        await serve_forever(script_path, port, log_path, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        _fail(f"model-server: cannot listen on 127.0.0.1:{port}: {exc.strerror}", EXIT_FAILED)


@main.command()
@service
@click.option("--inbox", type=click.Path(file_okay=False), default=None, help="Watch this folder for job files.")
@_connect_timeout_option
@_metrics_port_option
def coordinator(nats_url, log_level, log_format, inbox, connect_timeout_s, metrics_port) -> None:
    """Run a coordinator: intake, dispatch, reaper and the gf.api service. Waits for its broker
    as long as it takes (or --connect-timeout-s), as a service started before it must."""
    _setup_service("gigafactory-coordinator", log_level, log_format)
    settings = Settings.from_env(connect_timeout_s=connect_timeout_s, metrics_port=metrics_port)
    with _url_or_embedded(nats_url, settings) as url:
        asyncio.run(_run_coordinator(url, inbox, settings))


def _parse_seats(seats: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for s in seats:
        engine, _, n = s.partition("=")
        if not engine or not n.isdigit():
            raise click.BadParameter(f"{s!r}: expected ENGINE=N, like claude=2", param_hint="--seat")
        out[engine] = int(n)
    return out


@main.command()
@service
@click.option("--id", "factory_id", default=None, help="Factory id (default: the host name).")
@click.option("--stations", type=click.IntRange(1, 256), default=2, show_default=True, help="Concurrent job slots.")
@click.option("--seat", "seats", multiple=True, metavar="ENGINE=N", help="Per-engine seat limit (repeatable).")
@click.option("--cap", "caps", multiple=True, metavar="TOKEN", help="Extra capability token (repeatable).")
@click.option("--no-probe", is_flag=True, help="Do not probe this machine; offer only --cap tokens and engine:shell.")
@click.option("--workspace", type=click.Path(file_okay=False), default=None, help="Where relative job cwds live.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Outbox, quarantine and logs.")
@_connect_timeout_option
@_metrics_port_option
def factory(nats_url, log_level, log_format, factory_id, stations, seats, caps, no_probe, workspace, data_dir,
            connect_timeout_s, metrics_port) -> None:
    """Run a factory on this machine: probe, register, claim and run jobs. Waits for its broker
    (or, with none configured, for 'gigafactory server'/'up' on this machine) as long as it
    takes, or --connect-timeout-s."""
    _setup_service("gigafactory-factory", log_level, log_format)
    url = resolve_url(nats_url)
    from gigafactory.schemas.capabilities import CapabilityError, parse_offer

    for c in caps:
        try:
            parse_offer(c)
        except CapabilityError as e:
            raise click.BadParameter(str(e), param_hint="--cap") from None
    settings = Settings.from_env(connect_timeout_s=connect_timeout_s, metrics_port=metrics_port).validate()
    asyncio.run(_run_factory(
        url, settings, factory_id=factory_id or _factory_identity_name(settings), stations=stations, seats=_parse_seats(seats),
        extra_capabilities=list(caps), probe=not no_probe, workspace=workspace, data_dir=data_dir,
    ))


def _factory_identity_name(settings: Settings) -> str | None:
    """A factory connecting with a ``factory`` identity is that identity (its id is the one
    descriptor key the broker lets it write); None for any other credentials."""
    from gigafactory.identity import IdentityError, read_creds, resolve_creds

    path = resolve_creds(settings.creds)
    try:
        got = read_creds(path) if path else None
    except IdentityError as e:
        _fail(str(e), EXIT_USAGE)
    return got.name if got is not None and got.role == "factory" else None


def _up_identities(settings: Settings) -> tuple[Settings, Settings, str | None]:
    """``up``'s coordinator and local factory each connect as their own identity (``coordinator``,
    ``factory-local`` of this home's store) unless credentials were given (``--creds``,
    ``GIGAFACTORY_CREDS``: then both use those). Returns (coordinator settings, factory settings,
    the factory id: its identity's name, which is the one descriptor key it may write)."""
    from gigafactory.identity import CREDS_ENV, DEFAULT_FACTORY, IdentityStore

    if settings.creds or os.environ.get(CREDS_ENV):
        return settings, settings, None
    store = IdentityStore.at_home()
    coord, fac = store.creds_path("coordinator"), store.creds_path(DEFAULT_FACTORY)
    if not (coord.exists() and fac.exists()):
        return settings, settings, None
    over = {"connect_timeout_s": settings.connect_timeout_s, "metrics_port": settings.metrics_port}
    return (Settings.from_env(**over, creds=str(coord)).validate(),
            Settings.from_env(**over, creds=str(fac)).validate(), DEFAULT_FACTORY)


@main.command()
@service
@click.option("--inbox", type=click.Path(file_okay=False), default=None, help="Watch this folder for job files.")
@click.option("--stations", type=click.IntRange(1, 256), default=2, show_default=True)
@click.option("--cap", "caps", multiple=True, metavar="TOKEN", help="Extra capability token for the local factory.")
@_connect_timeout_option
@_metrics_port_option
def up(nats_url, log_level, log_format, inbox, stations, caps, connect_timeout_s, metrics_port) -> None:
    """Broker (embedded unless --nats), a coordinator and a local factory, until Ctrl-C."""
    _setup_service("gigafactory-up", log_level, log_format)
    # Validated before anything starts: a factory refuses a fencing margin that cannot fence.
    settings = Settings.from_env(connect_timeout_s=connect_timeout_s, metrics_port=metrics_port).validate()

    async def run(url: str) -> None:
        from gigafactory.coordinator.service import Coordinator
        from gigafactory.factory.agent import Factory

        stop = asyncio.Event()
        _install_stop(stop)
        async with _metrics_endpoint(settings):
            c_settings, f_settings, factory_id = _up_identities(settings)
            cb = await _service_broker(url, "gigafactory-coordinator", c_settings, stop)
            if cb is None:
                return
            fb = await _service_broker(url, "gigafactory-factory", f_settings, stop)
            if fb is None:
                await cb.close()
                return
            try:
                coord = Coordinator(cb, c_settings, inbox=inbox)
                fac = Factory(fb, settings=f_settings, stations=stations, extra_capabilities=list(caps),
                              data_dir=str(home() / "factories"), factory_id=factory_id)
                await asyncio.gather(coord.run(stop), fac.run(stop))
            finally:
                await fb.close()
                await cb.close()

    with _url_or_embedded(nats_url, settings) as url:
        log.info("gigafactory up on %s%s", url, f", watching {inbox}" if inbox else "")
        asyncio.run(run(url))


# -- client commands --------------------------------------------------------------------------


def _client_call(nats_url, as_json, fn):
    """Connect, run ``fn(client)``, print API errors clearly, close."""
    from gigafactory import tracing
    from gigafactory.client import ApiError, Client

    url = _need_url(nats_url, as_json)
    tracing.setup("gigafactory-cli")  # a submit starts the job's trace (exported if OTEL_* asks)

    async def run():
        try:
            client = await Client.connect(url)
        except Exception as e:
            _fail(f"cannot connect to {url}: {e}", EXIT_UNAVAILABLE, as_json=as_json)
        try:
            return await fn(client)
        except ApiError as e:
            _fail(e.message, EXIT_FAILED if e.is_client_error else EXIT_UNAVAILABLE, as_json=as_json,
                  errors=e.errors)
        finally:
            await client.close()

    return asyncio.run(run())


async def _builtins(reply):
    """An API reply structure as builtins (what ``--json`` prints, and the commands read).

    :param reply: an awaitable of the reply.
    """
    return msgspec.to_builtins(await reply)


def _progress_line(counts: dict[str, int], elapsed_s: float) -> str:
    order = ["blocked", "queued", "assigned", "building", "review", "testing", "shipped", "failed", "dead_letter"]
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return f"[{elapsed_s:5.1f}s] " + " · ".join(parts)


def _progress_printer(as_json: bool, console=None):
    """``show(jobs)`` and ``done()`` for ``submit --wait``'s progress on stderr.

    On a terminal: a rich progress display (spinner, jobs at rest of all, a bar, the counts by
    stage, elapsed time), redrawn in place by rich, and left on screen as its last state.
    Otherwise (a file, a pipe, CI logs): one plain line each time the counts change, as
    before. With ``--json``: nothing.

    :param as_json: ``--json`` was given (stderr stays quiet).
    :param console: the rich console to draw on (tests pass one); default stderr's.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gigafactory.client import RESTING

    t0 = time.monotonic()
    console = console or Console(stderr=True)
    live = console.is_terminal and not as_json
    bar: list = []  # the Progress and its task, made on the first change
    last = [""]

    def show(jobs: dict[str, dict]) -> None:
        if as_json:
            return
        counts: dict[str, int] = {}
        for j in jobs.values():
            counts[j["stage"]] = counts.get(j["stage"], 0) + 1
        line = _progress_line(counts, time.monotonic() - t0)
        if live:
            rested = sum(n for stage, n in counts.items() if stage in RESTING)
            what = dict(total=max(1, len(jobs)), completed=rested, description=line.split("] ", 1)[1])
            if not bar:
                p = Progress(SpinnerColumn(), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                             TimeElapsedColumn(), console=console, transient=False)
                bar.extend([p, p.add_task(**what)])
                p.start()
            else:
                bar[0].update(bar[1], **what)
        elif line.split("] ", 1)[1] != last[0].split("] ", 1)[-1]:
            click.echo(line, err=True)
        last[0] = line

    def done() -> None:
        if bar:
            bar[0].stop()  # the last state stays on screen, the cursor on the next line

    return show, done


@main.command()
@common
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--wait", is_flag=True, help="Wait until every job is shipped, failed, dead-lettered or waits for a human.")
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True, help="With --wait: give up after this many seconds.")
def submit(nats_url, as_json, files, wait, timeout_s) -> None:
    """Submit job files (all or nothing: one invalid file submits none)."""

    async def fn(client):
        jobs = msgspec.to_builtins(await client.submit_files(list(files)))
        if not wait:
            return {"jobs": jobs}
        if not as_json:
            for j in jobs:
                click.echo(f"{j['file']}: {j['job']} ({j['status']}, {j['stage']})", err=True)
        show, done = _progress_printer(as_json)
        try:
            final = await client.wait([j["job"] for j in jobs], timeout_s=timeout_s,
                                      on_progress=lambda seen: show(msgspec.to_builtins(seen)))
        finally:
            done()  # stop the display's refresh thread whatever ended the wait
        return {"jobs": jobs, "final": msgspec.to_builtins(final)}

    out = _client_call(nats_url, as_json, fn)
    if as_json:
        _emit_json(out)
    else:
        if "final" not in out:
            for j in out["jobs"]:
                click.echo(f"{j['job']}\t{j['status']}\t{j['stage']}\t{j['file']}")
        else:
            for j in out["jobs"]:
                f = out["final"].get(j["job"], {})
                click.echo(f"{j['job']}\t{f.get('stage', '?')}\t{f.get('reason', '')}")
    if "final" in out:
        from gigafactory.client import RESTING

        stages = [out["final"].get(j["job"], {}).get("stage") for j in out["jobs"]]
        if any(s not in RESTING for s in stages):
            sys.exit(EXIT_TIMEOUT)
        if any(s in ("failed", "dead_letter") for s in stages):
            sys.exit(EXIT_FAILED)


@main.command()
@_nats_option
@click.option("--refresh-s", type=click.FloatRange(0.1, 60.0), default=0.5, show_default=True,
              help="Redraw at most this often (seconds).")
@click.option("--events", "events_max", type=click.IntRange(1, 10_000), default=200, show_default=True,
              help="How many of the newest events to keep and show.")
@click.option("--window-s", type=click.FloatRange(1.0, 3600.0), default=60.0, show_default=True,
              help="Ships per minute are averaged over this many seconds.")
def top(nats_url, refresh_s, events_max, window_s) -> None:
    """A full-screen live view: pools, factories, jobs by stage, events, throughput, spend (q quits).

    Watches the broker (gf_jobs, gf_factories, gf_pools and GF_EVENTS); never polls the API."""
    from gigafactory.broker import connect, probe_broker
    from gigafactory.top import TopApp

    url = _need_url(nats_url, False)
    try:
        settings = Settings.from_env()
    except ValueError:
        settings = Settings()

    async def run() -> None:
        try:
            # One bounded try first (nats-py retries a missing server forever, silently); once
            # connected, top rides out broker restarts with unlimited jittered reconnects.
            await probe_broker([u.strip() for u in url.split(",") if u.strip()], settings)
            nc = await connect(url, "gigafactory-top", settings, max_reconnect_attempts=-1, connect_timeout_s=5.0)
        except Exception as e:
            _fail(f"cannot connect to {url}: {e or type(e).__name__}", EXIT_UNAVAILABLE)
        try:
            await TopApp(nc, url=url, refresh_s=refresh_s, events_max=events_max,
                         throughput_window_s=window_s).run_async()
        finally:
            await nc.close()

    asyncio.run(run())


@main.command()
@common
@click.option("--stage", type=click.Choice([str(s) for s in Stage]), default=None, help="Only jobs in this stage.")
@click.option("--limit", type=click.IntRange(1, LIST_LIMIT_MAX), default=200, show_default=True)
def jobs(nats_url, as_json, stage, limit) -> None:
    """List jobs, newest first."""
    out = _client_call(nats_url, as_json, lambda c: _builtins(c.list(stage=stage, limit=limit)))
    if as_json:
        _emit_json(out)
        return
    counts = " · ".join(f"{v} {k}" for k, v in out["counts"].items() if v)
    click.echo(f"{out['total']} jobs: {counts or 'none'}")
    for j in out["jobs"]:
        holder = f" on {j['holder']}" if j["holder"] else ""
        click.echo(f"{j['id']:<32} {j['stage']:<11} {j['priority']:<8} a{j['attempt']} e{j['epoch']}{holder}  {j['reason']}")


def format_workspace(w: dict) -> str:
    """One line for a ``repo`` attempt's workspace: branch, head, diff stats, pushed or why not."""
    head = (w.get("head") or "")[:12] or "no commit"
    pushed = "pushed" if w.get("pushed") else "not pushed"
    why = f" ({w['detail']})" if w.get("detail") and not w.get("pushed") else ""
    scope = f"; scope: {w['scope']}" if w.get("outside_scope") or w.get("protected") else ""
    line = (f"branch {w['branch']} at {head} from {w.get('base') or '?'}: {w.get('files_changed', 0)} files "
            f"+{w.get('lines_added', 0)} -{w.get('lines_deleted', 0)}, {pushed}{why}{scope}")
    return line + format_pull(w)


def format_pull(w: dict) -> str:
    """What shipping did for a ``repo`` attempt (``ship-as``), as a second line, or nothing:
    the pull request (number, state, url), the merge commit, or why it stopped short."""
    if w.get("pull_number") is None and not w.get("ship_detail"):
        return ""
    parts = []
    if w.get("pull_number") is not None:
        state = w.get("pull_state") or "open"
        parts.append(f"pull request #{w['pull_number']} {state}" + (f" {w['pull_url']}" if w.get("pull_url") else ""))
    if w.get("merged_commit"):
        parts.append(f"merged at {w['merged_commit'][:12]}")
    if w.get("ship_detail") and w.get("pull_state") != "merged":
        parts.append(w["ship_detail"])
    return "\n    shipped as " + (w.get("shipped_as") or "nothing") + ": " + "; ".join(parts)


def format_usage(u: dict) -> str:
    """One line for an attempt's ``usage`` (as in ``status --json``): the counts the engine
    reported (a count it did not report is left out, never shown as 0) and the cost with its
    source.

    :param u: the attempt's usage.
    """
    parts = [u["model"]] if u.get("model") else []
    for key, label in (("input_tokens", "in"), ("output_tokens", "out"), ("cache_read_tokens", "cache-read"),
                       ("cache_write_tokens", "cache-write"), ("turns", "turns"), ("tool_calls", "tool calls")):
        if u.get(key) is not None:
            parts.append(f"{label} {u[key]}")
    source = u.get("cost_source", "unknown")
    if u.get("cost_usd") is not None:
        table = f" {u['price_table']}" if u.get("price_table") else ""
        parts.append(f"${u['cost_usd']:.4f} ({source}{table})")
    else:
        parts.append("cost unknown")
    return ", ".join(parts)


@main.command()
@common
@click.argument("job")
def status(nats_url, as_json, job) -> None:
    """Show one job: stage, why it is there, its attempts and its events."""
    out = _client_call(nats_url, as_json, lambda c: _builtins(c.status(job)))
    if as_json:
        _emit_json(out)
        return
    j, rec = out["job"], out["record"]
    click.echo(f"job {j['id']}  stage {j['stage']}  priority {j['priority']}  attempt {j['attempt']}  epoch {j['epoch']}")
    click.echo(f"  why: {out['why']}")
    for k, v in out["info"].items():
        click.echo(f"  {k}: {v}")
    click.echo(f"  source: {rec['source']}  pool: {rec['pool']}  requirements: {' '.join(rec['requirements'])}")
    if rec["deps"]:
        click.echo(f"  deps ({rec['manifest'].get('deps-mode', 'hard')}): {', '.join(rec['deps'])}")
    for a in rec["attempts"]:
        engine = " ".join(filter(None, (a.get("engine"), a.get("engine_version"))))
        click.echo(f"  attempt {a['attempt']} epoch {a['epoch']} on {a['factory']}/{a['station']}"
                   f"{f' with {engine}' if engine else ''}: {a.get('outcome', 'running')} {a.get('detail', '')}".rstrip())
        if a.get("usage"):
            click.echo(f"    usage: {format_usage(a['usage'])}")
        if a.get("workspace"):
            click.echo(f"    {format_workspace(a['workspace'])}")
    click.echo("  events:")
    for ev in out["events"][-20:]:
        t = time.strftime("%H:%M:%S", time.localtime(ev["at"]))
        move = f"{ev.get('stage_from', '')}->{ev.get('stage_to', '')}" if ev.get("stage_to") else ""
        click.echo(f"    {t} {ev['kind']:<13} {move:<22} {ev.get('actor', '')}: {ev.get('reason', '')}")


@main.command()
@common
def factories(nats_url, as_json) -> None:
    """List factories with their stations and idle reasons."""
    out = _client_call(nats_url, as_json, lambda c: _builtins(c.factories()))
    if as_json:
        _emit_json(out)
        return
    if (out.get("halt") or {}).get("halted"):
        click.echo(f"HALTED: {out['halt']['summary']}")  # the kill switch (gigafactory resume)
    for f in out["factories"]:
        live = "live" if f["live"] else f"silent {f['heartbeat_age_s']:.0f}s"
        click.echo(f"{f['id']}  {f['status']} ({live}, {f['dispatch_mode']})  {f['os']}/{f['arch']}  "
                   f"outbox {f.get('outbox_pending', 0)}")
        for st in f["stations"]:
            what = f"busy {st.get('job')} e{st.get('epoch')}" if st.get("state") == "busy" else f"idle: {st.get('idle_reason')}"
            click.echo(f"  station {st['index']}: {what}")
        click.echo(f"  capabilities: {' '.join(f['capabilities'])}")
        for name, why in sorted((f.get("withdrawn_engines") or {}).items()):
            click.echo(f"  withdrawn: engine:{name} ({why}); offered again when its credential changes")


@main.command()
@common
def stats(nats_url, as_json) -> None:
    """The coordinator's counters: per-job errors, failed events, quarantined records."""
    out = _client_call(nats_url, as_json, lambda c: c.stats())
    if as_json:
        _emit_json(out)
        return
    errors = " · ".join(f"{v} {k}" for k, v in out["job_errors"].items() if v) or "none"
    click.echo(f"{out['coordinator']}: {out['jobs']} jobs, reaper passes {out['reap_rounds']}, "
               f"dispatch passes {out['dispatch_passes']}")
    click.echo(f"  per-job errors: {errors}; events failed {out['events_failed']} "
               f"(waiting {out['events_waiting']}, dropped {out['events_dropped']})")
    click.echo(f"  quarantined records: {out['poisoned_now']} now, {out['poisoned_total']} since start")
    for p in out["poisoned"]:
        where = p["object"] or "not stored yet"
        click.echo(f"    {p['job']} rev {p['revision']} ({p['size_bytes']} bytes, found by {p['found_by']}): "
                   f"{p['reason']}  [{where}]")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def profiles(as_json) -> None:
    """List the profiles a job can name (``profile: NAME``): the shipped catalog and the folder
    in GIGAFACTORY_PROFILES_DIR, as read on this machine (the coordinator resolves jobs against
    its own setting)."""
    from gigafactory.schemas import profiles as prof

    try:
        catalog = prof.load_catalog(Settings.from_env().profiles_dir)
    except prof.ProfileError as e:
        _fail("a profile is invalid", EXIT_USAGE, as_json=as_json,
              errors=[{"file": e.path, "line": None, "field": e.field, "message": e.message}])
    rows = prof.summaries(catalog)
    if as_json:
        _emit_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        prefers = ",".join(r["prefers"]) or "-"
        click.echo(f"{r['name']:<{width}}  {r['engine-class'] or '-':<13}  {prefers:<14}  {r['summary']}")


def _simple(endpoint: str, verb: str):
    @common
    @click.argument("job")
    def cmd(nats_url, as_json, job) -> None:
        actor = os.environ.get("USER") or "operator"
        out = _client_call(nats_url, as_json, lambda c: _builtins(getattr(c, endpoint)(job, actor=actor)))
        if as_json:
            _emit_json(out)
        else:
            j = out["job"]
            click.echo(f"{j['id']} {verb}: now {j['stage']} (epoch {j['epoch']})")

    return cmd


main.command("cancel", help="Cancel a job; a running one is fenced and stopped.")(_simple("cancel", "cancelled"))
main.command("requeue", help="Requeue a job (any stage but shipped) with a fresh retry budget.")(_simple("requeue", "requeued"))
main.command("ship", help="The human gate: ship a job waiting in testing or review.")(_simple("ship", "shipped"))


FENCE_HELD = EXIT_OK
"""``gigafactory fence``: the renewal landed and at least ``--min-remaining-s`` of lease is left."""
FENCE_FENCED = EXIT_FAILED
"""The record does not name this factory as the holder at this epoch (or is gone): never push."""
FENCE_USAGE = EXIT_USAGE
"""A missing or invalid option, or no broker configured (click's own usage errors exit 2 too)."""
FENCE_TOO_LATE = EXIT_TIMEOUT
"""The renewal landed but less than ``--min-remaining-s`` of lease is left: do not push now."""
FENCE_UNKNOWN = EXIT_UNAVAILABLE
"""The broker did not answer, or the renewal kept losing to other writes: cannot tell, do not push."""
FENCE_CAS_TRIES = 5
"""Renewals tried before giving up (each lost one re-reads from the stream leader first). The
holder's own renewal loop writes every ``lease_renew_s``; two writers rarely collide twice."""


async def _fence_renew(url: str, settings: Settings, job: str, factory_id: str, epoch: int) -> dict:
    """One compare-and-set renewal of ``job``'s lease by its holder; returns what happened:
    ``outcome`` (``held``, ``fenced``, ``unknown``), ``since_sent_s`` (local monotonic seconds
    from sending the write that landed to its acknowledgement), the revisions read and written."""
    import nats.js.errors
    from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

    from gigafactory.broker import TRANSIENT, Bucket, Conflict, connect
    from gigafactory.identity import holder_signer
    from gigafactory.schemas import names, protocol
    from gigafactory.schemas.records import JobRecord, decode, encode

    nc = await connect(url, "gigafactory-fence", settings, max_reconnect_attempts=2,
                       connect_timeout_s=settings.request_timeout_s)
    try:
        js = nc.jetstream(timeout=settings.request_timeout_s)
        jobs = Bucket(js, await js.key_value(names.JOBS_BUCKET), names.JOBS_BUCKET, settings.request_timeout_s)

        async def leader_read():
            # Not a direct get: on a cluster a follower may answer one with an old revision.
            # The stream leader answers this; the compare-and-set below decides either way.
            try:
                m = await js.get_msg(jobs.stream, subject=f"$KV.{names.JOBS_BUCKET}.{job}", direct=False)
            except nats.js.errors.NotFoundError:
                return None, 0, b""
            if m.headers and m.headers.get(KV_OP) in (KV_DEL, KV_PURGE):
                return None, m.seq or 0, b""
            return decode(m.data or b"", JobRecord), m.seq or 0, m.data or b""

        rec, rev, _ = await leader_read()
        for _ in range(FENCE_CAS_TRIES):
            try:
                new = protocol.renew(protocol.check_fence(rec, job, factory_id, epoch), factory_id, epoch, time.time())
            except protocol.Fenced as f:
                return {"outcome": "fenced", "reason": str(f), "read_revision": rev}
            data = encode(holder_signer(settings).sign_record(new))  # a holder write: signed (schemas/signing.py)
            sent = time.monotonic()  # before the write goes out: the broker stamps it later
            try:
                written = await jobs.update(job, data, last=rev)
                return {"outcome": "held", "since_sent_s": time.monotonic() - sent,
                        "read_revision": rev, "revision": written}
            except Conflict:
                pass  # the holder's own renewal, most likely: read again, the fence decides
            except TRANSIENT as e:
                # The write may have landed, its reply lost: the leader's record says.
                _, fresh_rev, raw = await leader_read()
                if raw == data:  # our bytes: the renewal counter and our own timestamp
                    return {"outcome": "held", "since_sent_s": time.monotonic() - sent,
                            "read_revision": rev, "revision": fresh_rev}
                return {"outcome": "unknown", "reason": f"the renewal got no answer ({type(e).__name__})",
                        "read_revision": rev}
            rec, rev, _ = await leader_read()
        return {"outcome": "unknown", "reason": f"the renewal lost {FENCE_CAS_TRIES} compare-and-sets in a row",
                "read_revision": rev}
    finally:
        await nc.close()


def _fence_by_socket(path: str, settings: Settings, job: str, factory_id: str, epoch: int,
                     min_remaining_s: float | None) -> dict:
    """The verdict of the factory serving the fence socket at ``path`` (``GF_FENCE_SOCKET``);
    ``unknown`` when it cannot be asked (the attempt is over: the socket is gone)."""
    from gigafactory.factory import fence_socket as fs

    timeout_s = fs.FENCE_REQUEST_TIMEOUT_S + settings.request_timeout_s * 2 + 1.0  # the factory's bounds, then some
    try:
        return asyncio.run(fs.ask(path, fs.FenceRequest(job=job, epoch=epoch, factory=factory_id,
                                                        min_remaining_s=min_remaining_s), timeout_s))
    except Exception as e:  # cannot tell: a push must not go out on a guess
        return {"outcome": "unknown", "reason": f"cannot ask the fence socket {path} ({type(e).__name__}: {e})"}


@main.command()
@common
@click.option("--job", envvar="GF_JOB_ID", required=True, help="Default: $GF_JOB_ID (set for job scripts).")
@click.option("--epoch", envvar="GF_EPOCH", type=int, required=True, help="Default: $GF_EPOCH.")
@click.option("--factory", "factory_id", envvar="GF_FACTORY", required=True, help="Default: $GF_FACTORY.")
@click.option("--lease-ttl-s", type=float, envvar="GF_LEASE_TTL_S", default=None,
              help="The reaper's lease TTL (default: $GF_LEASE_TTL_S, else the lease_ttl_s setting, "
                   "$GIGAFACTORY_LEASE_TTL_S). Must match the coordinators'.")
@click.option("--min-remaining-s", type=float, default=None,
              help="Lease that must be left after the renewal (default: half the lease TTL).")
def fence(nats_url, as_json, job, epoch, factory_id, lease_ttl_s, min_remaining_s) -> None:
    """Renew this job's lease (compare-and-set, as its holder); exit 0 only if that landed and
    at least --min-remaining-s of lease is left.

    A job script calls it immediately before a side effect outside the broker (a push, a merge
    request): `gigafactory fence && git push origin "$GF_BRANCH"`. Exit codes: 0 held; 1 fenced
    (another epoch or holder owns the job); 2 usage; 3 renewed but too little lease left; 4
    cannot tell (broker unreachable, no answer). Only 0 means push. It proves the lease was held
    at that instant on the stream leader; it cannot stop a process paused after it returns, so
    the receiving end should check the epoch too (the branch gf/<job>/e<epoch> against the job).

    In a job (GF_FENCE_SOCKET set) it asks the attempt's fence socket: the factory renews for the
    job, which holds no broker credential. Elsewhere it renews through the broker with the
    caller's own credentials (an operator's)."""
    settings = Settings.from_env()
    ttl_s = settings.lease_ttl_s if lease_ttl_s is None else lease_ttl_s
    from gigafactory.schemas import protocol

    try:
        want_s = protocol.fence_min_remaining_s(ttl_s, min_remaining_s)
    except ValueError as e:
        _fail(str(e), FENCE_USAGE, as_json=as_json)
    sock = os.environ.get("GF_FENCE_SOCKET")
    if sock:
        # A job: its factory renews for it on the attempt's socket (factory/fence_socket.py);
        # the job holds no broker credential. The factory applies the same rules, on its TTL.
        got = _fence_by_socket(sock, settings, job, factory_id, epoch, min_remaining_s)
        out = {"job": job, "epoch": epoch, "factory": factory_id, "lease_ttl_s": ttl_s, "min_remaining_s": want_s,
               **got}
        code = {"held": FENCE_HELD, "too_late": FENCE_TOO_LATE, "fenced": FENCE_FENCED,
                "usage": FENCE_USAGE}.get(got["outcome"], FENCE_UNKNOWN)
        if code == FENCE_UNKNOWN:
            out["reason"] = f"{got.get('reason', 'no verdict')}; treat as fenced"
        _fence_exit(out, code, as_json)
    url = _need_url(nats_url, as_json)
    try:
        got = asyncio.run(_fence_renew(url, settings, job, factory_id, epoch))
    except Exception as e:  # cannot tell: a push must not go out on a guess
        got = {"outcome": "unknown", "reason": f"cannot reach the broker at {url} ({type(e).__name__}: {e})"}
    out = {"job": job, "epoch": epoch, "factory": factory_id, "lease_ttl_s": ttl_s, "min_remaining_s": want_s, **got}
    if got["outcome"] == "held":
        left_s = protocol.fence_remaining_s(ttl_s, got["since_sent_s"])
        out["remaining_s"] = left_s
        if left_s >= want_s:
            code, out["reason"] = FENCE_HELD, (f"{factory_id} holds {job} at epoch {epoch}: lease renewed "
                                               f"(revision {got['revision']}), at least {left_s:.3f}s left")
        else:
            code, out["reason"] = FENCE_TOO_LATE, (f"{factory_id} holds {job} at epoch {epoch}, but only "
                                                   f"{left_s:.3f}s of lease is sure to be left, less than "
                                                   f"--min-remaining-s {want_s:g}s: do not push now")
    elif got["outcome"] == "fenced":
        code = FENCE_FENCED
    else:
        code, out["reason"] = FENCE_UNKNOWN, f"{got['reason']}; treat as fenced"
    _fence_exit(out, code, as_json)


def _fence_exit(out: dict, code: int, as_json: bool) -> None:
    """End ``fence`` with its verdict: ``out`` (as JSON with ``--json``), the reason on stderr,
    and ``code`` as the exit code (the same for the socket and the broker path)."""
    out["held"] = code == FENCE_HELD
    out["code"] = code
    if as_json:
        _emit_json(out)
    click.echo(out["reason"], err=True)
    sys.exit(code)


PULLS_LISTED_MAX = 10_000
"""Most local pull request records ``gigafactory pulls`` reads (newest shown first)."""


@main.command()
@common
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, PULLS_LISTED_MAX),
              help="Show at most this many, newest first.")
def pulls(nats_url, as_json, limit) -> None:
    """List the local forge's pull requests (bucket gf_pulls): number, state, head -> base,
    checks, and the remote. A GitHub pull request is on GitHub; 'gigafactory status JOB' shows
    any job's pull request and merge."""
    async def fn(client):
        import msgspec as _msgspec
        from nats.js.errors import BucketNotFoundError, NoKeysError

        from gigafactory.forges.local import PULLS_BUCKET, LocalPull

        js = client.nc.jetstream(timeout=10)
        try:
            kv = await js.key_value(PULLS_BUCKET)
            keys = [k for k in await kv.keys() if not k.endswith(".next")]
        except (BucketNotFoundError, NoKeysError):
            keys = []
        rows = []
        for key in keys[:PULLS_LISTED_MAX]:
            e = await kv.get(key)
            try:
                rec = _msgspec.json.decode(e.value, type=LocalPull)
            except _msgspec.DecodeError:
                continue  # not a pull request record (written by hand): 'nats kv get' shows it
            pr = {f: getattr(rec.pr, f) for f in rec.pr.__struct_fields__}  # every field, defaults too
            rows.append({**pr, "remote": rec.remote, "checks": rec.checks,
                         "checks_sha": rec.checks_sha})
        rows.sort(key=lambda r: r.get("created_at", 0.0), reverse=True)
        rows = rows[:limit]
        if as_json:
            _emit_json({"pulls": rows, "total": len(keys)})
            return
        if not rows:
            click.echo("no local pull requests (a job with ship-as: pr-opened or merged on a local remote opens one)")
            return
        for r in rows:
            merged = f" at {r['merge_sha'][:12]}" if r.get("merge_sha") else ""
            click.echo(f"#{r['number']:<5} {r['state']:<6}{merged} {r['head']} -> {r['base']}  checks {r['checks']}  "
                       f"{r['remote']}  {r['title']}")

    _client_call(nats_url, as_json, fn)


@main.command()
@_nats_option
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Stream live output until the job comes to rest.")
@click.option("--raw", is_flag=True, help="With --follow: print an agent's output stream as it is (JSON lines), "
                                          "not one readable line per turn, tool call and usage.")
def logs(nats_url, job, follow, raw) -> None:
    """Print a job's captured logs (every attempt), optionally following live output. The
    stored log is the engine's raw output; following an agent engine shows it readably."""
    from gigafactory.client import RESTING, ApiError
    from gigafactory.factory import engines
    from gigafactory.factory.engines.base import render_progress
    from gigafactory.schemas import names

    async def fn(client):
        st = msgspec.to_builtins(await client.status(job, events=0))
        printed: set[str] = set()
        live_epochs: set[int] = set()

        async def print_stored(rec) -> None:
            """Stored logs of finished attempts not yet shown (stored or live), read through
            the API (a submitter limited to some products reads nothing around it)."""
            for a in rec["attempts"]:
                name = a.get("log")
                if not name or name in printed or a["epoch"] in live_epochs:
                    continue
                printed.add(name)
                try:
                    async for data in client.log_pages(job, a["epoch"]):
                        sys.stdout.write(data.decode(errors="replace"))
                        sys.stdout.flush()
                except ApiError as e:
                    if e.code != 404:
                        raise

        if not follow:
            await print_stored(st["record"])
            return
        name = (st["record"].get("manifest") or {}).get("engine") or "shell"
        if engines.get(name) is None:
            # A declared engine (engines_dir): read its declaration to show its output readably.
            from gigafactory.config import Settings, SettingsError

            try:
                engines.load_declared(Settings.from_env().engines_dir)
            except SettingsError:
                pass  # then its output is printed raw, as for any engine this CLI does not know
        eng = engines.get(name)
        readers: dict[int, object] = {}
        """The engine's output reader per live epoch (None: print raw: shell, --raw, or it raised)."""

        def show_live(epoch: int, data: bytes) -> None:
            if epoch not in readers:
                readers[epoch] = eng.parser() if eng is not None and eng.engine_class != "script" and not raw else None
            parser = readers[epoch]
            if parser is not None:
                try:
                    said = parser.feed(data)
                except Exception:
                    readers[epoch] = parser = None
                    click.echo("# cannot read this engine's output; printing it raw", err=True)
                else:
                    for p in said:
                        click.echo(render_progress(p))
                    return
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()

        q: asyncio.Queue = asyncio.Queue(maxsize=10000)

        async def on_msg(msg):
            if not q.full():
                q.put_nowait(msg)

        # Subscribe before reading what is stored, so no output falls between the two.
        product = (st["record"].get("manifest") or {}).get("product") or "default"
        sub = await client.nc.subscribe(names.logs_subject(job, product=product), cb=on_msg)
        await client.nc.flush()
        try:
            await print_stored(st["record"])
            if st["job"]["stage"] == "building":
                click.echo(f"# following {job} from now on; 'gigafactory logs {job}' shows the whole "
                           "log once the attempt ends", err=True)
            elif st["job"]["stage"] not in RESTING:
                click.echo(f"# following {job}: waiting for it to run", err=True)
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), timeout=1.0)
                    epoch = int(msg.subject.rsplit(".", 1)[1])
                    live_epochs.add(epoch)
                    show_live(epoch, msg.data)
                    continue
                except asyncio.TimeoutError:
                    pass
                st = msgspec.to_builtins(await client.status(job, events=0))
                await print_stored(st["record"])
                if st["job"]["stage"] in RESTING:
                    break
        finally:
            await sub.unsubscribe()

    _client_call(nats_url, False, fn)


@main.command()
@click.option("--examples", type=click.Path(file_okay=False, exists=True), default=None,
              help="Folder of example jobs with a demo.yaml of expected end stages (default: the bundled ones).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where the demo keeps its broker store, factories and scratch repos (default: a temp folder).")
@click.option("--timeout", "timeout_s", type=float, default=180.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--nats", "nats_url", default=None, help="Use this broker instead of starting the embedded one.")
@click.option("--agents", is_flag=True,
              help="Instead: one job per installed agent CLI edits a git repo through the real CLI, driven by "
                   "the scripted model server; exits 1 if no agent CLI is installed.")
def demo(examples, workdir, timeout_s, as_json, nats_url, agents) -> None:
    """Embedded broker, a coordinator and two factories run the example jobs; exits 0 only if
    every job ends where its example says it should."""
    if agents:
        if examples or nats_url:
            raise click.UsageError("--agents runs its own jobs on its own embedded broker: drop --examples and --nats")
        from gigafactory.demo_agents import run_demo_agents

        sys.exit(run_demo_agents(workdir=workdir, timeout_s=timeout_s, as_json=as_json))
    from gigafactory.demo import run_demo

    sys.exit(run_demo(examples_dir=examples, workdir=workdir, timeout_s=timeout_s, as_json=as_json, nats_url=nats_url))


# -- the suites' own groups ------------------------------------------------------------------------

main.add_command(chaos)
main.add_command(loadtest)
main.add_command(report)
main.add_command(invoices)
main.add_command(budget_group)
main.add_command(halt)
main.add_command(resume)
main.add_command(creds)


if __name__ == "__main__":
    main()
