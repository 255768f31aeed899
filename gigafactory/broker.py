"""The shared JetStream layer: connection, the broker layout, and a KV wrapper whose reads
carry the broker's timestamp and whose writes are compare-and-set.

Client pitfalls handled here, once (docs/design.md names them):
- ``update(last=None)`` means "must not exist": :meth:`Bucket.update` refuses a None revision.
- every request, publish ack and fetch is bounded by ``settings.request_timeout_s``.
- nats-py has no reconnect jitter: :func:`connect` supplies it through
  ``reconnect_to_server_handler``.
- ``keys()`` filters on the client: :meth:`Bucket.keys` uses a server-side subject filter.
"""

from __future__ import annotations

import asyncio
import io
import datetime
import logging
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import nats
import nats.errors
import orjson
import nats.js.errors
from nats.js import api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from gigafactory import tracing
from gigafactory.identity import LAYOUT_ROLES
from gigafactory.config import Settings, SettingsError
from gigafactory.schemas import names
from gigafactory.schemas.records import EventRecord, encode

log = logging.getLogger(__name__)


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


class ReplicasError(Exception):
    """A bucket or stream of the layout has fewer replicas than ``replicas`` asks for, and
    the server refused to raise them (or to create it with that many)."""

    def __init__(self, stream: str, current: int | None, wanted: int, server_says: str) -> None:
        self.stream, self.current, self.wanted = stream, current, wanted
        have = f"has R{current}" if current else "does not exist and cannot be created"
        super().__init__(
            f"{stream} {have} but replicas={wanted} (GIGAFACTORY_REPLICAS) asks for R{wanted}, and the server "
            f"refused: {server_says}. R{wanted} needs a JetStream cluster of at least {wanted} nodes: connect "
            f"to one (--nats with every node's URL), or set GIGAFACTORY_REPLICAS to {current or 1} to use the "
            f"layout as it is. Replicas are raised in place on a cluster (nats stream edit {stream} "
            f"--replicas {wanted} does the same by hand) and never lowered automatically."
        )


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
PING_MAX_S = 20.0
"""Client pings never come less often than this, whatever the heartbeat: with
``MAX_OUTSTANDING_PINGS`` it bounds how long a silent connection goes unnoticed (about a
minute), which a longer heartbeat period must not stretch."""
PING_HEARTBEATS = 2
"""A connection pings its server once every this many heartbeats (within the bounds above)."""
MAX_OUTSTANDING_PINGS = 3
"""Pings without a reply before the client drops the connection as stale and reconnects."""


def ping_interval_s(settings: Settings) -> float:
    """How often a connection pings its server, derived from ``heartbeat_s``.

    Pings are the only way a client notices a connection that went silent without closing
    (a partition, a blackholed route), after ``MAX_OUTSTANDING_PINGS`` unanswered ones. They
    are also traffic that is neither a heartbeat nor a long poll, so an idle fleet's traffic
    scales with the setting an operator tunes for it, up to a ping every ``PING_MAX_S`` (20 s,
    at the default 20 s heartbeat): a silent connection is noticed within about a minute."""
    return min(PING_MAX_S, max(PING_MIN_S, PING_HEARTBEATS * settings.heartbeat_s))


PINGS_OFF_S = 10 * 365 * 24 * 3600.0
"""The client's own ping period once :func:`take_over_pings` gave the pings to their caller."""
PING_PROTO = b"PING\r\n"


def take_over_pings(nc) -> None:
    """Stop ``nc``'s own ping timer: from now on its caller pings with :func:`queue_ping`.

    nats-py pings on a timer of its own: per connection, one task wake-up, one socket write
    and one flusher wake-up every ``ping_interval_s``, apart from everything else the
    connection writes. An idle factory writes its heartbeat on a timer anyway: its ping rides
    in the same write (the profile of a 1,000-factory fleet host had the ping timer at a
    third of the fleet's idle CPU). A reconnect starts nats-py's timer again with the period
    set here, so it stays quiet.

    :param nc: the connection (``Broker.nc``)."""
    nc.options["ping_interval"] = PINGS_OFF_S
    task = getattr(nc, "_ping_interval_task", None)
    if task is not None and not task.done():
        task.cancel()


async def queue_ping(nc) -> bool:
    """Put a PING in ``nc``'s write buffer, to go out with the next flush (the caller's next
    write, or its own flush); exactly what nats-py's ping timer does, except the write of its
    own. Returns False, and has told the client its connection is stale (it drops it and
    reconnects), when more than ``max_outstanding_pings`` pings went unanswered; True
    otherwise (also while disconnected: nothing is sent then, as nats-py does).

    :param nc: the connection, after :func:`take_over_pings`."""
    if not nc.is_connected:
        return True
    nc._pings_outstanding += 1
    if nc._pings_outstanding > nc.options["max_outstanding_pings"]:
        from nats.aio.errors import ErrStaleConnection  # what nats-py's own ping timer raises

        await nc._process_op_err(ErrStaleConnection())
        return False
    nc._pongs.append(asyncio.get_running_loop().create_future())
    nc._pending.append(PING_PROTO)
    nc._pending_data_size += len(PING_PROTO)
    return True


def _jittered(settings: Settings) -> Callable:
    def handler(servers, _info):
        # Pick any server (a cluster spreads load), and wait a random share of the window.
        return random.choice(servers), settings.reconnect_wait_s + random.uniform(0, settings.reconnect_jitter_s)

    return handler


def auth_options(settings: Settings | None = None) -> dict:
    """The identity and TLS options of every connection (``nats.connect`` keyword arguments):
    the nkey seed of the credentials file :func:`gigafactory.identity.resolve_creds` picks, and
    an SSL context when ``tls_ca``/``tls_cert`` is set. Raises
    :class:`gigafactory.identity.IdentityError` for an unreadable credentials file. The seed
    never leaves this dict (never logged)."""
    from gigafactory.identity import read_creds, resolve_creds

    from gigafactory.config import nats_context_field

    settings = settings or Settings.from_env()
    out: dict = {}
    path = resolve_creds(settings.creds)
    if path:
        creds = read_creds(path)
        if creds.jwt:
            # A standard NATS .creds file (decentralised JWT auth, from a NATS context): nats-py
            # reads the JWT and the seed itself.
            out["user_credentials"] = str(path)
        else:
            out["nkeys_seed_str"] = creds.seed
    # TLS files: --tls-* / GIGAFACTORY_TLS_*, else the selected NATS context's.
    ca = settings.tls_ca or nats_context_field("ca")
    cert = settings.tls_cert or nats_context_field("cert")
    key = settings.tls_key or (nats_context_field("key") if not settings.tls_cert else "")
    if ca or cert:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
        out["tls"] = ctx
    return out


def connected_role(settings: Settings) -> str | None:
    """The role of the identity this process connects as (None: no credentials)."""
    from gigafactory.identity import read_creds, resolve_creds

    path = resolve_creds(settings.creds)
    return read_creds(path).role if path else None


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
        **auth_options(settings),
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
        raise SettingsError(f"connect_timeout_s (GIGAFACTORY_CONNECT_TIMEOUT_S) must be 0 (wait forever) or a "
                         f"positive number of seconds, not {settings.connect_timeout_s!r}")
    if not settings.connect_backoff_max_s > 0:
        raise SettingsError(f"connect_backoff_max_s (GIGAFACTORY_CONNECT_BACKOFF_MAX_S) must be a positive number "
                         f"of seconds, not {settings.connect_backoff_max_s!r}")


START_RETRIED = (OSError, asyncio.TimeoutError, nats.errors.Error, nats.js.errors.APIError)
"""What a try to reach the broker at start fails with while the broker is not (yet) there or
not (yet) serving JetStream: retried. Anything else is a bug and raises."""


async def probe_broker(servers: list[str], settings: Settings) -> None:
    """One bounded connection attempt to any of ``servers`` (nats-py's own connect retries a
    missing server forever, silently): raises if none answers."""
    async def quiet(_e):  # every failed try is reported by wait_for_broker, once
        pass

    nc = await nats.connect(servers=servers, connect_timeout=settings.request_timeout_s, allow_reconnect=False,
                            max_reconnect_attempts=1, reconnect_time_wait=0, error_cb=quiet,
                            **auth_options(settings))
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
        await asyncio.wait_for(probe_broker(servers, settings), timeout=settings.request_timeout_s * 2 * len(servers))
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
    ("archive", names.ARCHIVE_BUCKET, {"description": "finished jobs moved out of gf_jobs (coordinator/retention.py)"}),
    ("queue", names.QUEUE_BUCKET, {"description": "queued jobs by pool (poll fallback index)"}),
    ("factories", names.FACTORIES_BUCKET, {"description": "factory descriptors and heartbeats"}),
    ("pools", names.POOLS_BUCKET, {"description": "dispatch pools"}),
    ("locks", names.LOCKS_BUCKET, {"description": "distributed job locks"}),
    ("idempotency", names.IDEMPOTENCY_BUCKET, {"description": "idempotency keys"}),
    ("clock", names.CLOCK_BUCKET, {"ttl": 3600, "description": "broker time probes"}),
    ("control", names.CONTROL_BUCKET, {"history": 10, "description": "operator controls: the kill switch (halt)"}),
)
"""Every KV bucket of the layout: the Broker attribute, the bucket name, its create options."""


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_server_time(text: str) -> float:
    """Unix seconds of a server timestamp (RFC 3339, up to nanoseconds, as Go writes it)."""
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"not a server timestamp: {text!r}")
    base = datetime.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    return base.timestamp() + (int(m.group(2)) / 10 ** len(m.group(2)) if m.group(2) else 0.0)


def _same_limit(current, wanted) -> bool:
    """Whether a stream's limit is already what is wanted (ages are float seconds)."""
    if isinstance(wanted, float) or isinstance(current, float):
        return current is not None and abs(float(current) - float(wanted)) < 1e-3
    return current == wanted


class KnownPools:
    """Pools this process made sure exist (their consumer and ``gf_pools`` entry), each
    trusted for ``ttl_s`` after it was added; used like a set (``in``, ``add``, ``discard``).

    A pool idle for ``pool_idle_gc_s`` may be deleted by any coordinator's retention pass.
    A pool added here had a job at that moment, so no pass can delete it sooner than
    ``pool_idle_gc_s`` later: an entry younger than half that cannot name a deleted pool,
    and an older one is checked again (the ensure is idempotent). Bounded: expired entries
    are dropped as they are looked up and whenever the set doubles."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._at: dict[str, float] = {}
        self._prune_at = 64

    def __contains__(self, pool: object) -> bool:
        at = self._at.get(pool)  # type: ignore[arg-type]
        if at is None:
            return False
        if time.monotonic() - at >= self.ttl_s:
            del self._at[pool]  # type: ignore[arg-type]
            return False
        return True

    def add(self, pool: str) -> None:
        self._at[pool] = time.monotonic()
        if len(self._at) >= self._prune_at:
            now = time.monotonic()
            self._at = {p: t for p, t in self._at.items() if now - t < self.ttl_s}
            self._prune_at = max(64, 2 * len(self._at))

    def discard(self, pool: str) -> None:
        self._at.pop(pool, None)

    def clear(self) -> None:
        self._at.clear()

    def __rsub__(self, other: set[str]) -> set[str]:
        """``pools - known``: those of ``pools`` not (or no longer) known."""
        return {p for p in other if p not in self}

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self):
        return iter([p for p in list(self._at) if p in self])


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
        self.archive: Bucket | None = None
        self.control: Bucket | None = None
        """The kill switch's state (:mod:`gigafactory.schemas.halt`); None: a layout older than it."""
        self.artifacts = None
        self.pools_known = KnownPools(settings.pool_idle_gc_s / 2)
        """Dispatch pools this process has made sure exist (intake skips re-creating them),
        each trusted for half the pool GC's idle time (see :class:`KnownPools`)."""
        self.clock_source: tuple[str, str] = ("", "")
        """(stream, server) whose clock the latest :meth:`broker_now` read."""

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
            # Only the roles allowed to create streams and buckets create the layout; the others
            # bind to it (a denied create would wait out its timeout, bucket after bucket).
            if ensure and connected_role(settings) in (None, "unknown", *LAYOUT_ROLES):
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

    async def _kv(self, bucket: str, *, history: int = 1, ttl: float | None = None, description: str = "",
                  max_bytes: int | None = None) -> Bucket:
        cfg = api.KeyValueConfig(
            bucket=bucket,
            description=description,
            history=history,
            ttl=ttl,
            max_bytes=max_bytes,
            storage=api.StorageType.FILE,
            replicas=self.settings.replicas,
            direct=True,
        )
        try:
            kv = await self.js.create_key_value(cfg)
        except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as e:
            # Exists with a different config (an older version's, other limits, other
            # replicas): raise its replicas if it has fewer, keep the rest as it is.
            await self._reconcile(f"KV_{bucket}", e)
            kv = await self.js.key_value(bucket)
        return Bucket(self.js, kv, bucket, self.settings.request_timeout_s)

    async def _reconcile(self, stream: str, refused: Exception) -> None:
        """Bring an existing ``stream``'s replicas up to ``settings.replicas`` after a create
        was ``refused`` (it exists with another config); never down (a tool run with the
        default replicas=1 against an R3 cluster must not scale the cluster's layout down).
        Raises :class:`ReplicasError` when the stream does not exist (the create was refused
        for another reason, e.g. R3 on a single server) or the server refuses to raise its
        replicas. Limits are not touched here: see :meth:`apply_limits`."""
        wanted = self.settings.replicas
        try:
            info = await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise ReplicasError(stream, None, wanted, getattr(refused, "description", None) or str(refused)) from refused
        cfg = info.config
        current = cfg.num_replicas or 1
        if current >= wanted:
            if current > wanted:
                log.debug("%s has R%d; keeping it (this process asks for R%d)", stream, current, wanted)
            return
        cfg.num_replicas = wanted
        try:
            await self.js.update_stream(cfg)
        except nats.js.errors.APIError as e:
            raise ReplicasError(stream, current, wanted, e.description or str(e)) from e
        log.warning("%s migrated from R%d to R%d (replicas=%d)", stream, current, wanted, wanted)

    def limits(self) -> dict[str, dict]:
        """Stream -> the StreamConfig limits the retention settings give it."""
        s = self.settings
        return {
            names.EVENTS_STREAM: {"max_bytes": s.events_max_bytes, "max_age": s.events_max_age_s},
            names.SPEND_STREAM: {"max_bytes": s.spend_max_bytes, "max_age": s.spend_max_age_s},
            f"OBJ_{names.ARTIFACTS_STORE}": {"max_bytes": s.artifacts_max_bytes, "max_age": s.artifacts_max_age_s},
            f"KV_{names.ARCHIVE_BUCKET}": {"max_bytes": s.archive_max_bytes, "max_age": s.archive_max_age_s},
            # A key is kept as long as its job can be found (in gf_jobs, then the archive),
            # counted from the key's last write (its submission): then it is free again.
            f"KV_{names.IDEMPOTENCY_BUCKET}": {"max_age": s.archive_after_s + s.archive_max_age_s},
        }

    async def apply_limits(self) -> dict[str, dict]:
        """Set this process's retention limits on the existing streams (raising or lowering
        them); returns stream -> the changes made. Only the coordinator calls it (its
        retention pass): factories and CLI tools open the layout with whatever settings
        their environment has, and must not shrink a cap the coordinator was given (a
        lowered ``GF_EVENTS`` cap drops the oldest events at once)."""
        done: dict[str, dict] = {}
        for stream, want in self.limits().items():
            cfg = (await self.js.stream_info(stream)).config
            changes = {k: v for k, v in want.items() if not _same_limit(getattr(cfg, k), v)}
            if not changes:
                continue
            for k, v in changes.items():
                setattr(cfg, k, v)
            await self.js.update_stream(cfg)
            done[stream] = changes
            log.info("%s: limits set: %s", stream, ", ".join(f"{k}={v}" for k, v in changes.items()))
        return done

    async def ensure_layout(self) -> None:
        """Create (idempotently) every bucket, stream and store, with explicit options; an
        existing one gets ``replicas`` if it has fewer (see :meth:`_reconcile`)."""
        r = self.settings.replicas
        s = self.settings
        # A layout created now gets this process's limits; an existing one keeps its own
        # until a coordinator applies its settings (apply_limits).
        limits = {
            names.ARCHIVE_BUCKET: {"max_bytes": s.archive_max_bytes, "ttl": s.archive_max_age_s},
            names.IDEMPOTENCY_BUCKET: {"ttl": s.archive_after_s + s.archive_max_age_s},
        }
        for attr, bucket, opts in BUCKETS:
            setattr(self, attr, await self._kv(bucket, **opts, **limits.get(bucket, {})))
        # The local forge's pull requests: created here because a factory (which opens them) may
        # write the bucket but not create it.
        await self._kv(names.PULLS_BUCKET, history=names.PULLS_HISTORY, description="local forge pull requests")
        await self.ensure_dispatch_stream()
        await self._stream(
            api.StreamConfig(
                name=names.EVENTS_STREAM,
                subjects=[f"{names.EVENTS_PREFIX}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=r,
                max_age=s.events_max_age_s,
                max_bytes=s.events_max_bytes,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=120,
                description="append-only audit of every transition and decision",
            ),
        )
        await self.ensure_spend_stream()
        try:
            self.artifacts = await self.js.create_object_store(
                names.ARTIFACTS_STORE,
                config=api.ObjectStoreConfig(
                    bucket=names.ARTIFACTS_STORE, storage=api.StorageType.FILE, replicas=r,
                    description="run logs and artifacts", max_bytes=s.artifacts_max_bytes,
                    ttl=s.artifacts_max_age_s,
                ),
            )
        except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as e:
            await self._reconcile(f"OBJ_{names.ARTIFACTS_STORE}", e)
            self.artifacts = await self.js.object_store(names.ARTIFACTS_STORE)

    async def ensure_spend_stream(self) -> None:
        """``GF_SPEND``, the spend ledger (schemas/spend.py): append-only, bounded like
        ``GF_EVENTS`` (``spend_max_bytes``/``spend_max_age_s``), with a long duplicate window
        so a record retried or replayed from a factory's outbox is stored once (readers
        count one record per id anyway)."""
        s = self.settings
        await self._stream(
            api.StreamConfig(
                name=names.SPEND_STREAM,
                subjects=[f"{names.SPEND_PREFIX}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=s.replicas,
                max_age=s.spend_max_age_s,
                max_bytes=s.spend_max_bytes,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=s.spend_duplicate_window_s,
                description="the spend ledger: usage, final and fixed-cost records with full attribution",
            ),
        )

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
        """Create ``cfg``'s stream; if it exists with another config, raise its replicas if
        it has fewer (see :meth:`_reconcile`) and keep the rest as it is."""
        try:
            await self.js.add_stream(cfg)
        except (nats.js.errors.BadRequestError, nats.js.errors.ServerError) as e:
            assert cfg.name
            await self._reconcile(cfg.name, e)

    async def bind_layout(self) -> None:
        """Bind to an existing layout without creating anything (read-only tools)."""

        for attr, bucket, _ in BUCKETS:
            try:
                kv = await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                if bucket in (names.ARCHIVE_BUCKET, names.CONTROL_BUCKET):
                    continue  # a layout made before retention (or the kill switch) existed
                raise
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

    async def broker_now(self, stream: str | None = None) -> float:
        """The clock of the server that leads ``stream`` (default ``KV_gf_jobs``), now.

        Lease expiry compares this with the timestamps of job records, and those are stamped
        by the leader of the job bucket's stream when it stores them. On a cluster the
        leaders of two streams are often two servers, with two wall clocks: so "now" is read
        from the same leader, as the ``ts`` of a stream info reply (only the stream's leader
        answers one). A read: nothing is written. Only a leader change between the record's
        write and this read mixes two clocks (the skew between the nodes; see the README).
        A server too old to put ``ts`` in the reply (before 2.10) falls back to writing a
        ``gf_clock`` probe key and reading its stamp (that stream's leader's clock)."""
        stream = stream or f"KV_{names.JOBS_BUCKET}"
        resp = await self.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=self.settings.request_timeout_s)
        info = orjson.loads(resp.data or b"{}")
        if "error" in info:
            err = info["error"]
            raise nats.js.errors.APIError(code=err.get("code"), err_code=err.get("err_code"),
                                          description=f"clock probe on {stream}: {err.get('description')}")
        cluster = info.get("cluster") or {}
        if info.get("ts") is None:
            key = names.safe_key(self.client_id)
            await self.clock.put(key, b"")
            e = await self.clock.get(key)
            assert e is not None
            self.clock_source = (self.clock.stream, "")
            return e.ts
        if cluster.get("replicas") and not cluster.get("leader"):
            # A member of a leaderless group answers with its own clock: not the one that
            # stamps the writes. Nothing is written meanwhile anyway.
            # ServiceUnavailable: a TRANSIENT error, retried like an election's other refusals.
            raise nats.js.errors.ServiceUnavailableError(
                code=503, description=f"{stream} has no leader; its clock cannot be read")
        self.clock_source = (stream, cluster.get("leader") or "")
        return parse_server_time(info["ts"])

    async def leader_clocks(self, streams: list[str]) -> dict[str, tuple[float, float]]:
        """How far each server's clock is from ours: server name -> (offset_s, rtt_s), where
        ``offset_s`` is its ``ts`` minus the midpoint of our request and ``rtt_s`` the round
        trip (the offset is known to within half of it). Read through the leaders of
        ``streams`` (on a cluster they are spread over the nodes); the best round trip per
        server wins. A stream that does not answer is skipped."""
        out: dict[str, tuple[float, float]] = {}
        for stream in streams:
            t0 = time.time()
            try:
                now = await self.broker_now(stream)
            except Exception:  # noqa: BLE001 -- a leaderless stream says nothing about clocks
                continue
            t1 = time.time()
            server = self.clock_source[1] or "?"
            if server not in out or t1 - t0 < out[server][1]:
                out[server] = (now - (t0 + t1) / 2, t1 - t0)
        return out

    async def publish_event(self, ev: EventRecord, *, msg_id: str | None = None, trace: str | None = None) -> None:
        """Store ``ev`` in ``GF_EVENTS`` (once per ``msg_id`` within the stream's duplicate window),
        its headers carrying ``trace`` (a ``traceparent``) or else the current trace context."""
        subject = names.events_subject(ev.job, ev.kind) if ev.job else names.fleet_events_subject(ev.kind)
        # The current trace (the step that says it) travels with the event, for a reader of GF_EVENTS.
        headers = tracing.inject({"Nats-Msg-Id": msg_id} if msg_id else None, trace)
        await self.js.publish(subject, encode(ev), headers=headers, timeout=self.settings.request_timeout_s)

    # -- object store (gf_artifacts) ------------------------------------------------------------

    async def put_object(self, name: str, data: bytes | io.RawIOBase, *, description: str = "",
                         headers: dict[str, str] | None = None) -> api.ObjectInfo:
        """Store ``data`` as object ``name`` in ``gf_artifacts`` (replacing an object of that
        name). ``data`` may be bytes or a reader with ``readinto``: nats-py reads a reader in
        chunks of ``OBJECT_CHUNK_BYTES`` on a worker thread and publishes each chunk as one
        message (each bounded by ``request_timeout_s``), so a large file never sits in
        memory whole and its disk reads never block the event loop. ``description`` and
        ``headers`` show in ``nats object info gf_artifacts <name>``."""
        # Headers as lists of values: Go clients (the nats CLI) read them as http.Header-style
        # map[string][]string, and a plain string there would make the object unreadable to them.
        meta = api.ObjectMeta(name=name, description=description or None,
                              headers={k: [v] for k, v in headers.items()} if headers else None,
                              options=api.ObjectMetaOptions(max_chunk_size=OBJECT_CHUNK_BYTES))
        return await self.artifacts.put(name, data, meta=meta)

    async def object_exists(self, name: str) -> bool:
        """Whether ``gf_artifacts`` holds a (not deleted) object ``name``."""
        try:
            info = await self.artifacts.get_info(name)
        except nats.js.errors.NotFoundError:
            return False
        return not info.deleted

    async def quarantine_record(self, bucket: str, key: str, revision: int, value: bytes, reason: str,
                                *, found_by: str) -> tuple[str, bool]:
        """Keep the exact bytes of a poison record (one a coordinator could not decode or
        write) in ``gf_artifacts`` as ``poison/<bucket>/<key>/rev-<revision>``, with the
        reason in its description and headers. Returns ``(object name, stored now)``:
        ``stored now`` is False when that revision was quarantined already (by this or
        another coordinator, or before a restart), so the caller reports it once."""
        name = poison_object_name(bucket, key, revision)
        if await self.object_exists(name):
            return name, False
        await self.put_object(name, value, description=f"poison record {bucket}/{key} revision {revision}: {reason}"[:1000],
                              headers={"Gf-Bucket": bucket, "Gf-Key": key, "Gf-Revision": str(revision),
                                       "Gf-Found-By": found_by, "Gf-Reason": reason[:500]})
        return name, True


OBJECT_CHUNK_BYTES = 128 * 1024
"""Chunk size of objects written to ``gf_artifacts`` (nats-py's default, stated explicitly):
the most a log upload holds in memory at once, and the size of each published message."""

POISON_PREFIX = "poison"


def poison_object_name(bucket: str, key: str, revision: int) -> str:
    """Where :meth:`Broker.quarantine_record` keeps a poison record's bytes
    (``nats object ls gf_artifacts`` lists them; ``nats object get`` fetches one)."""
    return f"{POISON_PREFIX}/{bucket}/{key}/rev-{revision}"
