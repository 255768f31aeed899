"""A fleet host: many real factories in one process, each on a NATS connection of its own.

The load suite and the thundering-herd chaos scenario need hundreds to a thousand connected
factories on a two-core machine. A Python process per factory would spend the machine on
interpreters; a fleet host runs N :class:`~gigafactory.factory.agent.Factory` instances in one
event loop instead. Each is the real agent (its own connection, heartbeat, pools watch, pull
subscriptions, outbox and data dir), only the interpreter is shared::

    python -m gigafactory.loadtest.fleet --nats URL --count 200 --prefix herd- \\
        --data-dir DIR --workspace DIR --stats-file DIR/fleet.json --metrics-port 0 \\
        --creds-dir HOME/identities

With ``--creds-dir`` every factory connects as its own identity, ``<dir>/<factory id>.creds``
(``gigafactory creds create factory <id>``), as a real fleet does: the broker checks each
one's permissions and each signs its holder writes with its own key. Without it, every factory
connects with the process's credentials (``GIGAFACTORY_CREDS``).

With ``--metrics-port`` (or ``GIGAFACTORY_METRICS_PORT``) the host serves every factory's
figures on one ``/metrics`` (each labelled ``factory``), with ``/healthz`` and ``/readyz``, and
prints ``metrics on URL`` before it starts them: the load suite reads its claim counters there.

Timings come from ``GIGAFACTORY_*`` like every other process. Factories start with at most
``--concurrency`` connecting at once; the host prints ``fleet ready: N factories`` once every
one has registered, and writes its figures as JSON to ``--stats-file`` (atomically: a reader
never sees half a file) every ``--stats-interval-s``, on SIGUSR1, and once more at exit. The
figures: each factory's counters (claims, conflicts, fenced writes, ...), the connection
events with wall-clock times (disconnects, reconnects: how a reconnect storm spreads) and per
factory (did each come back, and once), the pools each factory serves and whether by push or
by polling, the
warnings and errors logged by kind (an error storm shows there), and the process's CPU
seconds and resident memory.

SIGTERM or SIGINT drains every factory as the single-factory process does, then exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import click
import msgspec
import orjson

from gigafactory import osproc
from gigafactory.broker import Broker
from gigafactory.clitools import log_options, setup_logging
from gigafactory.config import Settings, SettingsError
from gigafactory.factory.agent import Factory
from gigafactory.metrics import serve as serve_metrics

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # run with -m, __name__ is "__main__"

MAX_EVENT_TIMES = 100_000
"""Connection event times kept per kind (a bound on memory, far above any storm we make)."""


class LogCounter(logging.Handler):
    """Counts warnings and errors by logger and level; keeps the last few messages."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()
        self.last: collections.deque[str] = collections.deque(maxlen=20)

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname.lower()}:{record.name}"] += 1
        try:
            self.last.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])
        except Exception:  # a record whose message cannot be formatted is still counted
            pass


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes (0 if it cannot be read)."""
    return osproc.rss_bytes(os.getpid()) or 0


def cpu_seconds() -> float:
    """User + system CPU seconds this process has used."""
    return osproc.cpu_seconds(os.getpid()) or 0.0


class FleetHost:
    """``count`` factories named ``<prefix><index>`` (index from ``start``, four digits)."""

    def __init__(self, url: str, *, count: int, prefix: str, start: int = 0, stations: int = 1,
                 caps: list[str] | None = None, data_dir: str, workspace: str, settings: Settings,
                 concurrency: int = 32, creds_dir: str | None = None) -> None:
        self.url = url
        self.creds_dir = Path(creds_dir) if creds_dir else None
        self.ids = [f"{prefix}{i:04d}" for i in range(start, start + count)]
        self.stations = stations
        self.caps = list(caps or [])
        self.data_dir = data_dir
        self.workspace = workspace
        self.settings = settings
        self.concurrency = max(1, concurrency)
        self.factories: dict[str, Factory] = {}
        self.brokers: dict[str, Broker] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.events: dict[str, list[float]] = {"disconnect": [], "reconnect": []}
        self.conn: dict[str, dict[str, float | int | None]] = {}
        """Per factory: how many disconnects and reconnects it saw, and when the last of each was
        (wall clock): whether every factory came back, and exactly once, after a broker restart."""
        self.start_failures: list[str] = []
        self.logs = LogCounter()
        self.started_at = time.time()
        self.ready_at: float | None = None

    def _conn_event(self, kind: str, fid: str):
        async def cb() -> None:
            now = time.time()
            times = self.events[kind]
            if len(times) < MAX_EVENT_TIMES:
                times.append(now)
            c = self.conn.setdefault(fid, {"disconnects": 0, "reconnects": 0,
                                           "last_disconnect_at": None, "last_reconnect_at": None})
            c[f"{kind}s"] += 1
            c[f"last_{kind}_at"] = now

        return cb

    async def _start_one(self, fid: str, sem: asyncio.Semaphore, stop: asyncio.Event) -> None:
        async with sem:
            if stop.is_set():
                return
            settings = self.settings_of(fid)
            try:
                b = await Broker.open(self.url, f"gigafactory-factory-{fid}", settings,
                                      on_disconnect=self._conn_event("disconnect", fid),
                                      on_reconnect=self._conn_event("reconnect", fid))
            except Exception as e:
                self.start_failures.append(f"{fid}: {type(e).__name__}: {e}")
                log.error("factory %s could not connect: %s", fid, e)
                return
            f = Factory(b, factory_id=fid, stations=self.stations, extra_capabilities=self.caps, probe=False,
                        workspace=self.workspace, data_dir=self.data_dir, settings=settings)
            self.brokers[fid], self.factories[fid] = b, f
            self.tasks[fid] = asyncio.create_task(f.run(stop), name=f"factory {fid}")
            ready = asyncio.create_task(f.ready.wait())
            done, _ = await asyncio.wait({ready, self.tasks[fid]}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if self.tasks[fid] in done and not f.ready.is_set():
                exc = self.tasks[fid].exception()
                self.start_failures.append(f"{fid}: {type(exc).__name__}: {exc}")

    def settings_of(self, fid: str) -> Settings:
        """Factory ``fid``'s settings: the host's, with its own credentials file when the host
        has a ``creds_dir`` (a missing file fails that factory's start, naming the path)."""
        if self.creds_dir is None:
            return self.settings
        return msgspec.structs.replace(self.settings, creds=str(self.creds_dir / f"{fid}.creds"))

    async def run(self, stop: asyncio.Event, on_ready=None) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        await asyncio.gather(*(self._start_one(fid, sem, stop) for fid in self.ids))
        if not stop.is_set():
            self.ready_at = time.time()
            if on_ready is not None:
                on_ready()
            await stop.wait()
        # The factories saw ``stop`` too and drain; wait for them, then close the connections.
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await asyncio.gather(*(b.close() for b in self.brokers.values()), return_exceptions=True)

    def figures(self) -> dict:
        totals: collections.Counter[str] = collections.Counter()
        per: dict[str, dict] = {}
        for fid, f in self.factories.items():
            per[fid] = dict(f.stats)
            totals.update(f.stats)
        return {
            "pid": os.getpid(),
            "count": len(self.ids),
            "started": len(self.factories),
            "ready": sum(1 for f in self.factories.values() if f.ready.is_set()),
            "ready_at": self.ready_at,
            "started_at": self.started_at,
            "start_failures": self.start_failures,
            "connected": sum(1 for b in self.brokers.values() if b.nc.is_connected),
            "disconnects": len(self.events["disconnect"]),
            "reconnects": len(self.events["reconnect"]),
            "disconnect_times": self.events["disconnect"],
            "reconnect_times": self.events["reconnect"],
            "log_counts": dict(self.logs.counts),
            "log_last": list(self.logs.last),
            "totals": dict(totals),
            "factories": per,
            "factory_connection": {fid: dict(c) for fid, c in self.conn.items()},
            "factory_pools": {fid: {p.id: p.mode for p in f.pools.values()} for fid, f in self.factories.items()},
            "pools_polling": sum(1 for f in self.factories.values() for p in f.pools.values() if p.mode == "poll"),
            "cpu_s": cpu_seconds(),
            "rss_bytes": rss_bytes(),
            "at": time.time(),
        }


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


def read_stats(path: str | Path) -> dict | None:
    """A fleet host's last figures, or None before its first write."""
    try:
        return orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


async def amain(a: SimpleNamespace) -> int:
    """Run the fleet host until SIGTERM/SIGINT; 1 if a factory failed to start, else 0.

    :param a: the options of :func:`command`.
    """
    settings = Settings.from_env(metrics_port=a.metrics_port)
    host = FleetHost(a.nats, count=a.count, prefix=a.prefix, start=a.start, stations=a.stations, caps=a.cap,
                     data_dir=a.data_dir, workspace=a.workspace, settings=settings, concurrency=a.concurrency,
                     creds_dir=a.creds_dir)
    logging.getLogger().addHandler(host.logs)
    stats_path = Path(a.stats_file) if a.stats_file else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def dump() -> None:
        if stats_path is not None:
            write_json_atomic(stats_path, host.figures())

    loop.add_signal_handler(signal.SIGUSR1, dump)

    async def dumper() -> None:
        while not stop.is_set():
            dump()
            try:
                await asyncio.wait_for(stop.wait(), timeout=a.stats_interval_s)
            except asyncio.TimeoutError:
                pass

    def ready() -> None:
        dump()
        print(f"fleet ready: {len(host.factories)} factories"
              + (f", {len(host.start_failures)} failed to start" if host.start_failures else ""), flush=True)

    metrics = await serve_metrics(settings.metrics_host, settings.metrics_port)
    if metrics is not None:
        print(f"metrics on {metrics.url}/metrics", flush=True)
    d = asyncio.create_task(dumper()) if stats_path is not None and a.stats_interval_s > 0 else None
    try:
        await host.run(stop, on_ready=ready)
    finally:
        stop.set()
        if d is not None:
            await d
        dump()
        if metrics is not None:
            await metrics.close()
    return 1 if host.start_failures else 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", required=True, help="Broker URL(s), comma-separated.")
@click.option("--count", type=click.IntRange(min=1), required=True, help="How many factories.")
@click.option("--prefix", default="fleet-", show_default=True, help="Factory id prefix (ids are <prefix><index:04d>).")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, help="First index.")
@click.option("--stations", type=click.IntRange(1, 256), default=1, show_default=True, help="Stations per factory.")
@click.option("--cap", multiple=True, metavar="TOKEN", help="Extra capability (repeatable).")
@click.option("--data-dir", required=True, help="Parent of every factory's data dir (outbox, logs).")
@click.option("--workspace", required=True, help="Working directory for jobs without cwd.")
@click.option("--stats-file", default=None, help="Write the figures here as JSON.")
@click.option("--creds-dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="Each factory connects as <dir>/<factory id>.creds (default: the process's credentials).")
@click.option("--stats-interval-s", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="How often the figures are written (0: only when ready, on SIGUSR1 and at the end).")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="Factories connecting at once at start.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics, /healthz and /readyz for every factory here (0: a free port, printed; "
                   "default: $GIGAFACTORY_METRICS_PORT; unset: none).")
@log_options("warning")
def command(**kw) -> None:
    """A fleet host: N real factories in one process, on one broker connection each."""
    a = SimpleNamespace(**{**kw, "cap": list(kw["cap"])})
    setup_logging(a.log_level, a.log_format)
    try:
        Settings.from_env()  # a bad setting: one line and exit 2, as from the gigafactory command
    except SettingsError as e:
        raise click.UsageError(f"invalid setting: {e}") from None
    click.get_current_context().exit(asyncio.run(amain(a)))


if __name__ == "__main__":
    command(prog_name="python -m gigafactory.loadtest.fleet")
