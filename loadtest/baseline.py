"""The baseline: the least a safe claim protocol can do on this broker, run beside ours.

A JetStream WorkQueue stream with one shared durable pull consumer, and a KV bucket with one
record per job. The submitter writes the record (``queued``) and publishes a pointer carrying
its revision; a worker fetches one pointer, claims the job with one compare-and-set
(``queued -> assigned``, ``last=revision``), acks, and marks it done with a second
(``assigned -> shipped``). No coordinator, no events, no leases, no engines: this is the
ceiling for any protocol that claims with a CAS here, and the load suite reports our figures
as ratios to it. Records are small JSON objects with a ``stage`` field, so the harness reads
both KV histories with one decoder and measures both the same way.

The workers run in a process of their own (started by the harness, so in the same process
tree), ``--connections`` NATS connections with ``--workers`` pullers each (as many as the
fleet's factories and stations)::

    python -m gigafactory.loadtest.baseline --nats URL --connections 100 --workers 2 \\
        --stats-file DIR/baseline.json

It prints ``baseline ready: N workers`` and writes its counters (claims, conflicts, done),
CPU seconds and resident memory to ``--stats-file`` on SIGUSR1 and at exit; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import click
import nats
from gigafactory.broker import auth_options
import nats.errors
import nats.js.errors
import orjson
from nats.js import api

from gigafactory.clitools import log_options, setup_logging
from gigafactory.loadtest.fleet import cpu_seconds, rss_bytes, write_json_atomic

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # run with -m, __name__ is "__main__"

STREAM = "LT_BASELINE"
SUBJECT = "lt.baseline.jobs"
CONSUMER = "lt-baseline-workers"
BUCKET = "lt_baseline"
QUEUED = orjson.dumps({"stage": "queued"})
ASSIGNED = orjson.dumps({"stage": "assigned"})
SHIPPED = orjson.dumps({"stage": "shipped"})
ACK_WAIT_S = 30.0
"""As the pool consumers: a pointer taken by a worker that died is redelivered after this."""


async def ensure_layout(js, *, workers: int, replicas: int = 1) -> None:
    """Create (idempotently: a run starts the workers more than once, and every phase's keys
    are its own) the baseline's stream, consumer and bucket, with explicit options as close to
    the gf_* layout as the comparison needs (file storage, history 5, direct get)."""
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await js.add_stream(api.StreamConfig(
            name=STREAM, subjects=[SUBJECT], retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            num_replicas=replicas, discard=api.DiscardPolicy.OLD, max_age=86400,
        ))
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await js.add_consumer(STREAM, api.ConsumerConfig(
            durable_name=CONSUMER, ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S, max_deliver=-1, max_waiting=max(4096, 2 * workers), max_ack_pending=-1,
        ))
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await js.create_key_value(api.KeyValueConfig(
            bucket=BUCKET, history=5, storage=api.StorageType.FILE, replicas=replicas, direct=True,
        ))


async def submit_one(js, kv, key: str) -> None:
    """What the baseline's submitter does per job: write the record, publish its pointer."""
    rev = await kv.create(key, QUEUED)
    await js.publish(SUBJECT, orjson.dumps({"job": key, "rev": rev}))


class Workers:
    def __init__(self, url: str, connections: int, workers: int, long_poll_s: float) -> None:
        self.url = url
        self.connections = connections
        self.workers = workers
        self.long_poll_s = long_poll_s
        self.stats = {"fetched": 0, "claims": 0, "claim_conflicts": 0, "done": 0, "errors": 0}
        self.ncs: list = []

    async def _worker(self, js, kv, stop: asyncio.Event) -> None:
        psub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        while not stop.is_set():
            try:
                msgs = await asyncio.wait_for(psub.fetch(1, timeout=self.long_poll_s), self.long_poll_s + 5)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as e:
                if stop.is_set():
                    return
                self.stats["errors"] += 1
                log.info("fetch failed: %s", e)
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                self.stats["fetched"] += 1
                ptr = orjson.loads(msg.data)
                self.stats["claims"] += 1
                try:
                    rev = await kv.update(ptr["job"], ASSIGNED, last=ptr["rev"])
                except nats.js.errors.KeyWrongLastSequenceError:
                    self.stats["claim_conflicts"] += 1
                    await msg.ack()
                    continue
                await msg.ack()
                await kv.update(ptr["job"], SHIPPED, last=rev)
                self.stats["done"] += 1

    async def run(self, stop: asyncio.Event, on_ready) -> None:
        tasks = []
        for i in range(self.connections):
            nc = await nats.connect(self.url, name=f"lt-baseline-{i}", max_reconnect_attempts=-1, **auth_options())
            self.ncs.append(nc)
            js = nc.jetstream(timeout=10)
            kv = await js.key_value(BUCKET)
            tasks += [asyncio.create_task(self._worker(js, kv, stop)) for _ in range(self.workers)]
        on_ready()
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(nc.close() for nc in self.ncs), return_exceptions=True)

    def figures(self) -> dict:
        import os
        import time

        return {"pid": os.getpid(), "workers": self.connections * self.workers, "totals": dict(self.stats),
                "cpu_s": cpu_seconds(), "rss_bytes": rss_bytes(), "at": time.time()}


async def amain(a: SimpleNamespace) -> int:
    """Run the baseline's workers until SIGTERM/SIGINT.

    :param a: the options of :func:`command`.
    """
    w = Workers(a.nats, a.connections, a.workers, a.long_poll_s)
    return await serve_workers(w, a.stats_file, f"baseline ready: {a.connections * a.workers} workers")


async def serve_workers(w, stats_file: str | None, ready_line: str) -> int:
    """Run a baseline's workers ``w`` (``run(stop, ready)``, ``figures()``) until SIGTERM/SIGINT:
    their figures go to ``stats_file`` when ready, on SIGUSR1 and at exit, and ``ready_line``
    is printed once they are ready (the harness waits for it).

    :param w: the workers.
    :param stats_file: where the figures go as JSON (None: nowhere).
    :param ready_line: the line that says they are ready."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    path = Path(stats_file) if stats_file else None

    def dump() -> None:
        if path is not None:
            write_json_atomic(path, w.figures())

    loop.add_signal_handler(signal.SIGUSR1, dump)

    def ready() -> None:
        dump()
        print(ready_line, flush=True)

    try:
        await w.run(stop, ready)
    finally:
        dump()
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", required=True, help="Broker URL.")
@click.option("--connections", type=click.IntRange(min=1), required=True,
              help="Connections (as many as factories).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pullers per connection (as stations per factory).")
@click.option("--long-poll-s", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="How long one pull waits for work.")
@click.option("--stats-file", default=None, help="Write the figures here as JSON.")
@log_options("warning")
def command(**kw) -> None:
    """The baseline: a minimal compare-and-set work queue on the same broker."""
    setup_logging(kw.pop("log_level"), kw.pop("log_format"))
    click.get_current_context().exit(asyncio.run(amain(SimpleNamespace(**kw))))


if __name__ == "__main__":
    command(prog_name="python -m gigafactory.loadtest.baseline")
