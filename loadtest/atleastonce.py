"""The second baseline: a taskiq-style at-least-once worker on the same broker, run beside ours.

What a popular job queue does on JetStream (taskiq-nats' pull-based broker): the submitter
publishes one message per task to a WorkQueue stream; each worker process fetches up to
:data:`FETCH_BATCH` messages at a time (waiting at most :data:`FETCH_TIMEOUT_S`) from one
shared durable pull consumer, runs each task and acks it once it has run ("ack when executed"). No record, no claim, no lease, no fencing,
no events: a worker that stalls past the ack wait gets its task run a second time elsewhere,
and nothing stops both runs' side effects. The load suite reports our throughput as a ratio
to this too (issue 14 aims at 0.5x): the price of "never twice" against "at least once".

The workers run in a process of their own (started by the harness, so in the same process
tree), one NATS connection and one puller per ``--connections`` (as many as the fleet has
factories: one taskiq worker each)::

    python -m gigafactory.loadtest.atleastonce --nats URL --connections 100 \\
        --stats-file DIR/atleastonce.json

It prints ``at-least-once ready: N workers``, and writes its counters, CPU seconds, resident
memory and each task's times to ``--stats-file`` on SIGUSR1 and at exit; SIGTERM ends it.

There is no record to read a timeline from, so each task's times come from the worker: when
the broker stored the message (its JetStream timestamp: "submitted"), when the worker took it
("claimed") and when it had run it, right before its ack ("done"), the latter two on this machine's
wall clock, the same clock the broker stamps with (both processes share the host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from types import SimpleNamespace

import click
import nats
import nats.errors
import nats.js.errors
import orjson
from nats.js import api

from gigafactory.broker import auth_options
from gigafactory.clitools import log_options, setup_logging
from gigafactory.loadtest.fleet import cpu_seconds, rss_bytes
from gigafactory.loadtest.baseline import serve_workers

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # run with -m, __name__ is "__main__"

STREAM = "LT_ATLEASTONCE"
SUBJECT = "lt.atleastonce.tasks"
CONSUMER = "lt-atleastonce-workers"
FETCH_BATCH = 16
"""Messages one fetch asks for (the issue's taskiq-nats comparison ran with a batch of 16)."""
FETCH_TIMEOUT_S = 0.2
"""How long one fetch waits (taskiq-nats' ``pull_consume_timeout``, as its deployments set it).
With nats-py, a fetch that found the queue empty and then got its first message waits for the
rest of its batch until this timeout: a long one (nats-py's default 5 s, our 30 s long poll)
would hold up to 15 tasks that long at the end of a phase, and measure the timeout."""
SUBMIT_IN_FLIGHT = 64
"""Publishes the submitter keeps in flight (as an application calling ``kiq`` from many
coroutines; ours submits a hundred jobs per API call)."""
ACK_WAIT_S = 30.0
"""A task taken by a worker that died is delivered again after this (at least once)."""
MAX_TIMES = 200_000
"""Task timelines one worker process keeps (a bound on memory; beyond it, only counted)."""


async def ensure_layout(js, *, workers: int, replicas: int = 1) -> None:
    """Create (idempotently) the stream and its one durable pull consumer, with the options
    spelled out (file storage, explicit ack) as the gf_* layout does."""
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


def task_message(task_id: str) -> bytes:
    """A task as taskiq sends one: its id, the task's name, labels, arguments (JSON)."""
    return orjson.dumps({"task_id": task_id, "task_name": "loadtest:noop", "labels": {}, "args": [], "kwargs": {}})


async def submit_one(js, task_id: str) -> None:
    """What the submitter does per task (taskiq's ``kiq``): publish it, wait for the stream's ack."""
    await js.publish(SUBJECT, task_message(task_id))


async def submit(js, task_ids: list[str], in_flight: int = SUBMIT_IN_FLIGHT) -> None:
    """Submit every task, ``in_flight`` publishes at a time, in order of the list."""
    for start in range(0, len(task_ids), in_flight):
        await asyncio.gather(*(submit_one(js, t) for t in task_ids[start:start + in_flight]))


async def drained(js) -> bool:
    """True when every task published so far has been run and acked: the WorkQueue stream
    deletes a message on its ack, so an empty stream is the broker's word for it."""
    info = await js.stream_info(STREAM)
    return info.state.messages == 0


def noop_task(**_kw) -> None:
    """The task every message names: nothing (as our ``noop`` engine)."""


class Workers:
    """``connections`` taskiq-style workers: one connection and one pull loop each."""

    def __init__(self, url: str, connections: int, fetch_timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.url = url
        self.connections = connections
        self.fetch_timeout_s = fetch_timeout_s
        self.stats = {"fetched": 0, "done": 0, "errors": 0, "redelivered": 0, "largest_fetch": 0}
        self.times: dict[str, list[float]] = {}
        """Task id -> [broker timestamp of the message, taken, acked] (epoch seconds)."""
        self.ncs: list = []

    async def _worker(self, js, stop: asyncio.Event) -> None:
        psub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
        while not stop.is_set():
            try:
                msgs = await asyncio.wait_for(psub.fetch(FETCH_BATCH, timeout=self.fetch_timeout_s),
                                              self.fetch_timeout_s + 5)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as e:
                if stop.is_set():
                    return
                self.stats["errors"] += 1
                log.info("fetch failed: %s", e)
                await asyncio.sleep(0.2)  # back off a broken connection, bounded by the loop
                continue
            self.stats["largest_fetch"] = max(self.stats["largest_fetch"], len(msgs))
            for msg in msgs:
                taken = time.time()
                self.stats["fetched"] += 1
                task = orjson.loads(msg.data)
                noop_task(*task["args"], **task["kwargs"])
                # Recorded before the ack: once the stream is empty (how the harness knows the
                # phase is over) every task's times are in, even if the ack's publish yields.
                self.stats["done"] += 1
                meta = msg.metadata
                if meta.num_delivered > 1:
                    self.stats["redelivered"] += 1
                if len(self.times) < MAX_TIMES:
                    self.times[task["task_id"]] = [meta.timestamp.timestamp(), taken, time.time()]
                await msg.ack()

    async def run(self, stop: asyncio.Event, on_ready) -> None:
        tasks = []
        for i in range(self.connections):
            nc = await nats.connect(self.url, name=f"lt-atleastonce-{i}", max_reconnect_attempts=-1, **auth_options())
            self.ncs.append(nc)
            tasks.append(asyncio.create_task(self._worker(nc.jetstream(timeout=10), stop)))
        on_ready()
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(nc.close() for nc in self.ncs), return_exceptions=True)

    def figures(self) -> dict:
        return {"pid": os.getpid(), "workers": self.connections, "totals": dict(self.stats), "times": self.times,
                "cpu_s": cpu_seconds(), "rss_bytes": rss_bytes(), "at": time.time()}


async def amain(a: SimpleNamespace) -> int:
    """Run the workers until SIGTERM/SIGINT.

    :param a: the options of :func:`command`.
    """
    w = Workers(a.nats, a.connections, a.fetch_timeout_s)
    return await serve_workers(w, a.stats_file, f"at-least-once ready: {a.connections} workers")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", required=True, help="Broker URL.")
@click.option("--connections", type=click.IntRange(min=1), required=True,
              help="Workers, one connection each (as many as factories).")
@click.option("--fetch-timeout-s", type=click.FloatRange(min=0, min_open=True), default=FETCH_TIMEOUT_S,
              show_default=True, help="How long one fetch waits for its batch.")
@click.option("--stats-file", default=None, help="Write the figures here as JSON.")
@log_options("warning")
def command(**kw) -> None:
    """The at-least-once baseline: taskiq-style workers (fetch 16, run, ack) on the same broker."""
    setup_logging(kw.pop("log_level"), kw.pop("log_format"))
    click.get_current_context().exit(asyncio.run(amain(SimpleNamespace(**kw))))


if __name__ == "__main__":
    command(prog_name="python -m gigafactory.loadtest.atleastonce")
