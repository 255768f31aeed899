"""The shared JetStream layer: connection, the broker layout, and a KV wrapper whose reads
carry the broker's timestamp and whose writes are compare-and-set.

Client pitfalls handled here, once (see DESIGN.md):
- ``update(last=None)`` means "must not exist": :meth:`Bucket.update` refuses a None revision.
- every request, publish ack and fetch is bounded by ``settings.request_timeout_s``.
- nats-py has no reconnect jitter: :func:`connect` supplies it through
  ``reconnect_to_server_handler``.
- ``keys()`` filters on the client: :meth:`Bucket.keys` uses a server-side subject filter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import nats
import nats.errors
import orjson
import nats.js.errors
from nats.js import api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from gigafactory.config import Settings
from gigafactory.schemas import names
from gigafactory.schemas.records import EventRecord, encode

log = logging.getLogger("gigafactory.broker")


SCAN_INACTIVE_S = 15.0
"""A scan's consumer is deleted when the scan ends; should that fail, the server drops it after
this long without interest (nats-py's default for a watcher is five minutes)."""
DIRECT_GET_PREFIX = "$JS.API.DIRECT.GET"
"""Direct gets are answered by the stream's own subscription: no JetStream API request (and
no API advisory), the cheapest read the broker offers."""
CONNECTED_POLL_S = 0.1
"""How often :meth:`Broker.wait_connected` looks when it has no callback to wait on."""


class Conflict(Exception):
    """A compare-and-set lost: the key changed since it was read (or exists, for create)."""


class BrokerUnavailable(Exception):
    """The broker did not answer within the bound; the caller decides (retry, outbox, poll)."""


TRANSIENT = (
    asyncio.TimeoutError,
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    # What a write gets while a clustered stream elects a leader: a 503 "no responders" that
    # is neither a timeout nor a ServiceUnavailableError.
    nats.js.errors.NoStreamResponseError,
)
"""Errors that mean "the broker is not answering right now", not "your request is wrong"."""


@dataclass(slots=True, frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int
    ts: float
    """Broker timestamp (unix seconds) of this revision: the server's clock, not ours."""


def caught_up(num_pending: int, delivered: int, consumed: int) -> bool:
    """Whether a KV watch has read everything its consumer had to deliver: nothing pending on
    the server, and at least as many messages read (deletes included) as the server says it
    delivered. nats-py's "caught up" marker (a None from ``updates()``) only checks the first
    half, when nothing was received yet; but the server counts messages as delivered before
    they reach the client (seen after a broker restart: the marker came first and every entry
    after it), so the marker alone can end an initial load that has not started."""
    return num_pending == 0 and consumed >= delivered


class WatchProgress:
    """Counts what a KV watcher delivered (``consumed``, every message, deletes included) and
    asks its consumer whether that is everything (:func:`caught_up`)."""

    __slots__ = ("w", "consumed")

    def __init__(self, watcher) -> None:
        self.w = watcher
        self.consumed = 0

    async def caught_up(self) -> bool:
        info = await self.w._sub.consumer_info()  # nats-py's subscription under the watcher
        return caught_up(info.num_pending, info.delivered.consumer_seq, self.consumed)


class Bucket:
    """A KV bucket with compare-and-set writes and broker-timestamped reads."""

    def __init__(self, js, kv: KeyValue, name: str, timeout_s: float) -> None:
        self._js = js
        self.kv = kv
        self.name = name
        self.stream = f"KV_{name}"
        self._timeout = timeout_s

    async def get(self, key: str) -> Entry | None:
        """The latest value of ``key`` with its revision and broker timestamp; None if absent or deleted."""
        try:
            msg = await self._js.get_msg(self.stream, subject=f"$KV.{self.name}.{key}", direct=True)
        except nats.js.errors.NotFoundError:
            return None
        if msg.headers and msg.headers.get(KV_OP) in (KV_DEL, KV_PURGE):
            return None
        ts = msg.time.timestamp() if msg.time else 0.0
        return Entry(key=key, value=msg.data or b"", revision=msg.seq or 0, ts=ts)

    async def newest_seq(self, pattern: str = ">") -> int:
        """The stream sequence of the newest message (a put or a delete) on the keys matching
        ``pattern``; 0 if there is none. One direct get, no consumer."""
        msg = await self._direct_get({"last_by_subj": f"$KV.{self.name}.{pattern}"})
        return int(msg.headers.get("Nats-Sequence", 0)) if msg is not None and msg.headers else 0

    async def written_after(self, pattern: str, seq: int) -> bool:
        """Whether any key matching ``pattern`` was written (put, deleted or purged) after the
        stream sequence ``seq``. One direct get, no consumer: the cheap question "did
        anything change since I last looked" (the answer to it costs a reply of one message
        or a 404 status, whatever the bucket holds)."""
        return await self._direct_get({"seq": seq + 1, "next_by_subj": f"$KV.{self.name}.{pattern}"}) is not None

    async def _direct_get(self, body: dict):
        """A direct get with a JSON request body (wildcard subjects need one); the reply
        message, or None for "no such message". Other errors raise as nats-py's do."""
        resp = await self._js._nc.request(f"{DIRECT_GET_PREFIX}.{self.stream}", orjson.dumps(body),
                                          timeout=self._timeout)
        status = resp.headers.get("Status") if resp.headers else None
        if status == "404":
            return None
        if status:
            raise nats.js.errors.APIError.from_msg(resp)
        return resp

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if it does not exist (or was deleted). Raises :class:`Conflict`."""
        try:
            return await self.kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise Conflict(f"{self.name}/{key} exists") from e

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write ``key`` only if its latest revision is ``last``. Raises :class:`Conflict`."""
        assert last, "update(last=None) would mean 'must not exist'; use create()"
        try:
            return await self.kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise Conflict(f"{self.name}/{key} changed since revision {last}") from e

    async def put(self, key: str, value: bytes) -> int:
        return await self.kv.put(key, value)

    async def delete(self, key: str, last: int | None = None) -> None:
        """Delete ``key``; with ``last``, only if it is still at that revision (raises Conflict)."""
        try:
            await self.kv.delete(key, last=last)
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise Conflict(f"{self.name}/{key} changed since revision {last}") from e

    async def watch(self, pattern: str = ">", *, include_history: bool = False, meta_only: bool = False):
        return await self.kv.watch(pattern, include_history=include_history, meta_only=meta_only)

    async def scan(self, pattern: str = ">", *, meta_only: bool = False) -> AsyncIterator[Entry]:
        """Every live key matching ``pattern`` once (latest values), filtered by the server."""
        # Deletes are read too (and skipped here), so that every message the server delivers
        # is counted: see caught_up().
        w = await self.kv.watch(pattern, meta_only=meta_only, inactive_threshold=SCAN_INACTIVE_S)
        # The watcher's "caught up" marker comes once nothing is pending, so a key written
        # while the scan runs is delivered again before it: yield each key only once.
        seen: set[str] = set()
        progress = WatchProgress(w)
        trailing = False
        try:
            while True:
                try:
                    e = await w.updates(timeout=self._timeout * 4)
                except TimeoutError:
                    if trailing and await progress.caught_up():
                        return
                    raise
                if e is None:
                    if await progress.caught_up():
                        return
                    trailing = True
                    continue
                progress.consumed += 1
                if e.operation not in (KV_DEL, KV_PURGE) and e.key not in seen:
                    seen.add(e.key)
                    ts = e.created.timestamp() if e.created else 0.0
                    yield Entry(key=e.key, value=e.value or b"", revision=e.revision or 0, ts=ts)
                if trailing and e.delta == 0 and await progress.caught_up():
                    return
        finally:
            try:
                await w.stop()
            except Exception:  # the connection may be gone; the watcher dies with it
                pass
            # Stopping a watcher leaves its consumer on the server until it has been inactive
            # for the threshold, and the server refuses new consumers on a stream past its
            # limit (1000): a fleet that scans often (the polling fallback, the stall check)
            # would exhaust it, and every later scan and watch of the bucket would fail with
            # "maximum consumers limit reached". Delete it now; the short threshold is the
            # backstop for when that fails.
            consumer = getattr(w._sub, "_consumer", None)
            if consumer:
                try:
                    await asyncio.wait_for(self._js.delete_consumer(self.stream, consumer), timeout=self._timeout)
                except Exception:  # gone already, or the broker is not answering: the threshold takes it
                    pass

    async def keys(self, pattern: str = ">") -> list[str]:
        return [e.key async for e in self.scan(pattern, meta_only=True)]


PING_MIN_S = 10.0
"""Client pings never come more often than this (nats-py's own default is 2 minutes): a
loaded machine that answers a ping late must not be mistaken for a dead connection."""
PING_HEARTBEATS = 2
"""A connection pings its server once every this many heartbeats."""
MAX_OUTSTANDING_PINGS = 3
"""Pings without a reply before the client drops the connection as stale and reconnects."""


def ping_interval_s(settings: Settings) -> float:
    """How often a connection pings its server, derived from ``heartbeat_s``.

    Pings are the only way a client notices a connection that went silent without closing
    (a partition, a blackholed route), after ``MAX_OUTSTANDING_PINGS`` unanswered ones. They
    are also traffic that is neither a heartbeat nor a long poll, so an idle fleet's traffic
    scales with the two settings an operator tunes for it: at the default 10 s heartbeat, a
    ping every 20 s and a silent connection noticed within about a minute."""
    return max(PING_MIN_S, PING_HEARTBEATS * settings.heartbeat_s)


def _jittered(settings: Settings) -> Callable:
    def handler(servers, _info):
        # Pick any server (a cluster spreads load), and wait a random share of the window.
        return random.choice(servers), settings.reconnect_wait_s + random.uniform(0, settings.reconnect_jitter_s)

    return handler


async def connect(
    urls: str | list[str],
    name: str,
    settings: Settings,
    *,
    on_disconnect: Callable | None = None,
    on_reconnect: Callable | None = None,
    max_reconnect_attempts: int = -1,
    connect_timeout_s: float = 5.0,
):
    """A nats-py connection with jittered reconnects that never gives up by default."""
    if isinstance(urls, str):
        urls = [u.strip() for u in urls.split(",") if u.strip()]

    async def _disc():
        if on_disconnect:
            await on_disconnect()

    async def _rec():
        if on_reconnect:
            await on_reconnect()

    async def _err(e):
        log.debug("nats client error: %s", e)

    return await nats.connect(
        servers=urls,
        name=name,
        connect_timeout=connect_timeout_s,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=settings.reconnect_wait_s,
        reconnect_to_server_handler=_jittered(settings),
        disconnected_cb=_disc,
        reconnected_cb=_rec,
        error_cb=_err,
        allow_reconnect=True,
        ping_interval=ping_interval_s(settings),
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        pending_size=16 * 1024 * 1024,
    )


CONNECT_BACKOFF_MIN_S = 0.1
"""First pause after a failed try while waiting for the broker at start; doubles per try."""
OPEN_TRY_REQUESTS = 12
"""One try of :meth:`Broker.open` (connect, then create or bind the layout: a dozen requests) is
bounded by this many ``request_timeout_s``: a broker that accepts the connection and then stops
answering costs one bounded try, not a hung start."""
WAIT_LOG_EVERY_S = 30.0
"""While waiting for the broker at start: the first failure is logged, then at most this often."""


def connect_backoff_s(tries: int, cap_s: float, jitter: float) -> float:
    """The pause after ``tries`` failed tries (1 or more) while waiting for the broker at start:
    ``CONNECT_BACKOFF_MIN_S`` doubled per try, capped at ``cap_s``, scaled by ``0.5 + jitter / 2``
    (``jitter`` uniform in [0, 1)) so a fleet started together spreads its tries. Pure."""
    assert tries >= 1 and cap_s > 0 and 0 <= jitter <= 1, (tries, cap_s, jitter)
    return min(cap_s, CONNECT_BACKOFF_MIN_S * 2 ** min(tries - 1, 30)) * (0.5 + jitter / 2)


def check_connect_settings(settings: Settings) -> None:
    """Refuse values that would make the wait for the broker spin or end at once: ValueError
    naming the setting and its environment variable."""
    if not settings.connect_timeout_s >= 0:
        raise ValueError(f"connect_timeout_s (GIGAFACTORY_CONNECT_TIMEOUT_S) must be 0 (wait forever) or a "
                         f"positive number of seconds, not {settings.connect_timeout_s!r}")
    if not settings.connect_backoff_max_s > 0:
        raise ValueError(f"connect_backoff_max_s (GIGAFACTORY_CONNECT_BACKOFF_MAX_S) must be a positive number "
                         f"of seconds, not {settings.connect_backoff_max_s!r}")


START_RETRIED = (OSError, asyncio.TimeoutError, nats.errors.Error, nats.js.errors.APIError)
"""What a try to reach the broker at start fails with while the broker is not (yet) there or
not (yet) serving JetStream: retried. Anything else is a bug and raises."""


async def _probe(servers: list[str], settings: Settings) -> None:
    """One bounded connection attempt to any of ``servers`` (nats-py's own connect retries a
    missing server forever, silently): raises if none answers."""
    async def quiet(_e):  # every failed try is reported by wait_for_broker, once
        pass

    nc = await nats.connect(servers=servers, connect_timeout=settings.request_timeout_s, allow_reconnect=False,
                            max_reconnect_attempts=1, reconnect_time_wait=0, error_cb=quiet)
    await nc.close()


async def wait_for_broker(
    urls: str | list[str], name: str, settings: Settings, *, stop: asyncio.Event | None = None, **kw,
) -> "Broker | None":
    """:meth:`Broker.open`, waiting as long as it takes for the broker to answer, as a service
    started before its broker must: each try bounded (a probe connection, then the open within
    ``OPEN_TRY_REQUESTS * request_timeout_s``), jittered back-off between tries (up to
    ``settings.connect_backoff_max_s``), logged when the wait starts and then every
    ``WAIT_LOG_EVERY_S``. Returns None if ``stop`` is set meanwhile; raises
    :class:`BrokerUnavailable` once ``settings.connect_timeout_s`` (0: never) has passed.
    ``name`` and ``kw`` are :meth:`Broker.open`'s."""
    check_connect_settings(settings)
    servers = [u.strip() for u in urls.split(",") if u.strip()] if isinstance(urls, str) else list(urls)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tries, logged_at = 0, float("-inf")

    async def one_try() -> Broker:
        await asyncio.wait_for(_probe(servers, settings), timeout=settings.request_timeout_s * 2 * len(servers))
        return await asyncio.wait_for(Broker.open(urls, name, settings, **kw),
                                      timeout=OPEN_TRY_REQUESTS * settings.request_timeout_s)

    while True:
        try:
            attempt = asyncio.ensure_future(one_try())
            if stop is not None:
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if stop.is_set():  # a SIGTERM while waiting ends the wait, at once
                    attempt.cancel()
                    got = (await asyncio.gather(attempt, return_exceptions=True))[0]
                    if isinstance(got, Broker):
                        await got.close()
                    return None
            b = await attempt
            if tries:
                log.info("%s: the broker at %s answered after %d failed tries (%.1fs)", name, ",".join(servers),
                         tries, loop.time() - t0)
            return b
        except START_RETRIED as e:
            tries += 1
            waited_s = loop.time() - t0
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if settings.connect_timeout_s and waited_s >= settings.connect_timeout_s:
                raise BrokerUnavailable(
                    f"no broker answered at {','.join(servers)} within {settings.connect_timeout_s:g}s "
                    f"(connect_timeout_s; {tries} tries); last: {why}") from e
            pause_s = connect_backoff_s(tries, settings.connect_backoff_max_s, random.random())
            if settings.connect_timeout_s:
                pause_s = min(pause_s, max(0.0, settings.connect_timeout_s - waited_s))
            if loop.time() - logged_at >= WAIT_LOG_EVERY_S:
                logged_at = loop.time()
                log.warning("%s: waiting for the broker at %s (%s; try %d, %.0fs so far%s); next try in %.1fs",
                            name, ",".join(servers), why, tries, waited_s,
                            f", giving up after {settings.connect_timeout_s:g}s" if settings.connect_timeout_s else "",
                            pause_s)
        if stop is None:
            await asyncio.sleep(pause_s)
            continue
        try:
            await asyncio.wait_for(stop.wait(), timeout=pause_s)
            return None
        except asyncio.TimeoutError:
            pass


BUCKETS: tuple[tuple[str, str, dict], ...] = (
    ("jobs", names.JOBS_BUCKET, {"history": 5, "description": "job records"}),
    ("queue", names.QUEUE_BUCKET, {"description": "queued jobs by pool (poll fallback index)"}),
    ("factories", names.FACTORIES_BUCKET, {"description": "factory descriptors and heartbeats"}),
    ("pools", names.POOLS_BUCKET, {"description": "dispatch pools"}),
    ("locks", names.LOCKS_BUCKET, {"description": "distributed job locks"}),
    ("idempotency", names.IDEMPOTENCY_BUCKET, {"description": "idempotency keys"}),
    ("clock", names.CLOCK_BUCKET, {"ttl": 3600, "description": "broker time probes"}),
)
"""Every KV bucket of the layout: the Broker attribute, the bucket name, its create options."""


class Broker:
    """One connection plus handles on every bucket and stream of the layout."""

    def __init__(self, nc, settings: Settings) -> None:
        self.nc = nc
        self.settings = settings
        self.js = nc.jetstream(timeout=settings.request_timeout_s)
        self.client_id = f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(24):06x}"
        self.urls = ""
        """The URL(s) this connection was opened with (handed to job scripts for ``gigafactory fence``)."""
        self._up = asyncio.Event()
        """Set while connected, by the connection's own callbacks (see :meth:`open`)."""
        self._up.set()
        self.jobs: Bucket
        self.queue: Bucket
        self.factories: Bucket
        self.pools: Bucket
        self.locks: Bucket
        self.idempotency: Bucket
        self.clock: Bucket
        self.artifacts = None
        self.pools_known: set[str] = set()
        """Dispatch pools this process has made sure exist (intake skips re-creating them)."""

    @classmethod
    async def open(
        cls, urls: str | list[str], name: str, settings: Settings | None = None, *, ensure: bool = True, **kw
    ) -> "Broker":
        settings = settings or Settings.from_env()
        opened: list[Broker] = []
        on_disconnect, on_reconnect = kw.pop("on_disconnect", None), kw.pop("on_reconnect", None)

        async def disconnected() -> None:
            if opened:
                opened[0]._up.clear()
            if on_disconnect:
                await on_disconnect()

        async def reconnected() -> None:
            if opened:
                opened[0]._up.set()
            if on_reconnect:
                await on_reconnect()

        nc = await connect(urls, name, settings, on_disconnect=disconnected, on_reconnect=reconnected, **kw)
        b = cls(nc, settings)
        opened.append(b)
        b.urls = urls if isinstance(urls, str) else ",".join(urls)
        try:
            if ensure:
                await b.ensure_layout()
            else:
                await b.bind_layout()
        except BaseException:
            await nc.close()
            raise
        return b

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=self.settings.request_timeout_s)
        except Exception:
            await self.nc.close()

    # -- layout ---------------------------------------------------------------------------

    async def _kv(self, bucket: str, *, history: int = 1, ttl: float | None = None, description: str = "") -> Bucket:
        cfg = api.KeyValueConfig(
            bucket=bucket,
            description=description,
            history=history,
            ttl=ttl,
            storage=api.StorageType.FILE,
            replicas=self.settings.replicas,
            direct=True,
        )
        try:
            kv = await self.js.create_key_value(cfg)
        except nats.js.errors.BadRequestError:
            # Exists with a different config (e.g. created by an older version): use it as is.
            kv = await self.js.key_value(bucket)
        return Bucket(self.js, kv, bucket, self.settings.request_timeout_s)

    async def ensure_layout(self) -> None:
        """Create (idempotently) every bucket, stream and store, with explicit options."""
        r = self.settings.replicas
        for attr, bucket, opts in BUCKETS:
            setattr(self, attr, await self._kv(bucket, **opts))
        await self.ensure_dispatch_stream()
        await self._stream(
            api.StreamConfig(
                name=names.EVENTS_STREAM,
                subjects=[f"{names.EVENTS_PREFIX}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=r,
                max_age=self.settings.events_max_age_s,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=120,
                description="append-only audit of every transition and decision",
            )
        )
        try:
            self.artifacts = await self.js.create_object_store(
                names.ARTIFACTS_STORE,
                config=api.ObjectStoreConfig(
                    bucket=names.ARTIFACTS_STORE, storage=api.StorageType.FILE, replicas=r,
                    description="run logs and artifacts",
                ),
            )
        except nats.js.errors.BadRequestError:
            self.artifacts = await self.js.object_store(names.ARTIFACTS_STORE)

    async def ensure_dispatch_stream(self) -> None:
        await self._stream(
            api.StreamConfig(
                name=names.DISPATCH_STREAM,
                subjects=[f"{names.DISPATCH_PREFIX}.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                num_replicas=self.settings.replicas,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=120,
                max_age=86400,
                description="dispatch pointers by capability pool; the job record is the truth",
            )
        )

    async def _stream(self, cfg: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(cfg)

    async def bind_layout(self) -> None:
        """Bind to an existing layout without creating anything (read-only tools)."""

        for attr, bucket, _ in BUCKETS:
            kv = await self.js.key_value(bucket)
            setattr(self, attr, Bucket(self.js, kv, bucket, self.settings.request_timeout_s))
        self.artifacts = await self.js.object_store(names.ARTIFACTS_STORE)

    # -- helpers ----------------------------------------------------------------------------

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait, at most ``timeout_s``, until the connection is up; True if it is.

        For a caller about to send something that is only worth sending to a live server: a
        request sent while reconnecting waits in the client's buffer and reaches the server on
        reconnect, stale, together with every other one sent meanwhile."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.nc.is_connected:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or self.nc.is_closed:
                return False
            if self._up.is_set():
                # Between the drop and its callback, or a connection not made by open():
                # no event to wait on yet; look again shortly.
                await asyncio.sleep(min(remaining, CONNECTED_POLL_S))
                continue
            try:
                await asyncio.wait_for(self._up.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return False
        return True

    async def broker_now(self) -> float:
        """The broker's clock: write a probe key and read back the server's timestamp of it."""
        key = names.safe_key(self.client_id)
        await self.clock.put(key, b"")
        e = await self.clock.get(key)
        assert e is not None
        return e.ts

    async def publish_event(self, ev: EventRecord, *, msg_id: str | None = None) -> None:
        subject = names.events_subject(ev.job, ev.kind) if ev.job else names.fleet_events_subject(ev.kind)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(subject, encode(ev), headers=headers, timeout=self.settings.request_timeout_s)
