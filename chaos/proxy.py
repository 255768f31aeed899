"""A fault-injecting TCP proxy: put it between a client and ``nats-server`` to partition,
slow down or cut that one client while everything else talks to the broker directly.

Faults, switchable at runtime (one at a time; :meth:`FaultProxy.heal` goes back to ``pass``):

``pass``
    Forward bytes both ways.
``delay MS [JITTER_MS]``
    Every chunk is held ``MS + uniform(0, JITTER_MS)`` milliseconds before it is written on,
    in each direction, so a round trip costs at least ``2 * MS``. Order is preserved: a chunk
    never overtakes the one read before it.
``drop P [SEED]``
    A new connection is accepted, then closed at once with probability ``P`` (seeded, so a
    seed replays the same decisions). Connections already up are not touched.
``blackhole``
    The partition that hurts: TCP stays up and nothing flows either way, not even a close.
    A client notices only through its own ping timeout. New connections are accepted and
    held without dialing the target. On heal the held bytes flow on, as TCP retransmission
    would deliver them; nothing is dropped or reordered.
``reset`` (an action, not a mode)
    Cut every current connection with a TCP reset, both sides. The mode is unchanged.

Every buffer is bounded: a direction holds at most ``queue_chunks`` chunks of at most
``chunk_bytes`` each; beyond that the proxy stops reading, and TCP flow control pushes back on
the sender. (Under ``delay`` this caps throughput near ``queue_chunks * chunk_bytes`` per
delay period, as a TCP window caps a long fat link.) At most ``max_connections`` are proxied at once; more are refused (closed).

In-process::

    async with FaultProxy("127.0.0.1", server_port) as p:
        nc = await nats.connect(p.url)
        p.blackhole(); ...; p.heal(); p.reset()

As a process, for scenarios with real factories, steered over a line-based control port on
127.0.0.1 (``pass``, ``delay 200 50``, ``drop 0.5 7``, ``blackhole``, ``reset``, ``heal``,
``stats``; every reply is one JSON line)::

    python -m gigafactory.chaos.proxy --listen 0 --target 127.0.0.1:4222 --control 0
    # prints {"listen": 40123, "control": 40124, ...} once it is ready
    await ProxyControl(40124).send("blackhole")
    python -m gigafactory.chaos.proxy --control 40124 --send heal
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import struct
import sys
from dataclasses import asdict, dataclass

CONTROL_HOST = "127.0.0.1"
"""The control port has no authentication, so it only ever listens on loopback."""
CONTROL_LINE_MAX_BYTES = 1024
CONTROL_CONNECTIONS_MAX = 16


class ProxyControlError(RuntimeError):
    """The proxy refused a control command (the message says why), or did not answer."""


# -- modes and commands (pure) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mode:
    """The fault in force. ``kind`` is ``pass``, ``delay``, ``drop`` or ``blackhole``."""

    kind: str = "pass"
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    drop_p: float = 0.0
    seed: int | None = None

    def __str__(self) -> str:
        """The control command that sets this mode."""
        if self.kind == "delay":
            return f"delay {self.delay_ms:g} {self.jitter_ms:g}"
        if self.kind == "drop":
            return f"drop {self.drop_p:g}" + ("" if self.seed is None else f" {self.seed}")
        return self.kind


PASS = Mode()
BLACKHOLE = Mode("blackhole")

USAGE = "commands: pass | heal | delay MS [JITTER_MS] | drop P [SEED] | blackhole | reset | stats"


def delay_mode(ms: float, jitter_ms: float = 0.0) -> Mode:
    if not (math.isfinite(ms) and math.isfinite(jitter_ms) and ms >= 0 and jitter_ms >= 0):
        raise ValueError(f"delay needs finite milliseconds >= 0, got {ms!r} and jitter {jitter_ms!r}")
    return Mode("delay", delay_ms=float(ms), jitter_ms=float(jitter_ms))


def drop_mode(p: float, seed: int | None = None) -> Mode:
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"drop needs a probability between 0 and 1, got {p!r}")
    return Mode("drop", drop_p=float(p), seed=seed)


def parse_command(line: str) -> tuple[str, Mode | None]:
    """A control line -> ``(verb, mode)``: ``mode`` is the new mode for ``pass``, ``heal``,
    ``delay``, ``drop`` and ``blackhole``, None for ``reset`` and ``stats``.
    Raises ValueError naming what was wrong."""
    words = line.split()
    if not words:
        raise ValueError(f"empty command; {USAGE}")
    verb, args = words[0].lower(), words[1:]

    def numbers(low: int, high: int) -> list[float]:
        if not (low <= len(args) <= high):
            raise ValueError(f"{verb} takes {low}..{high} numbers, got {len(args)}: {line.strip()!r}; {USAGE}")
        try:
            return [float(a) for a in args]
        except ValueError:
            raise ValueError(f"{verb}: not a number in {line.strip()!r}; {USAGE}") from None

    if verb in ("pass", "heal", "blackhole", "reset", "stats"):
        numbers(0, 0)
        return verb, {"pass": PASS, "heal": PASS, "blackhole": BLACKHOLE}.get(verb)
    if verb == "delay":
        v = numbers(1, 2)
        return verb, delay_mode(v[0], v[1] if len(v) > 1 else 0.0)
    if verb == "drop":
        v = numbers(1, 2)
        if len(v) > 1 and not v[1].is_integer():
            raise ValueError(f"drop: the seed must be an integer, got {args[1]!r}")
        return verb, drop_mode(v[0], int(v[1]) if len(v) > 1 else None)
    raise ValueError(f"unknown command {verb!r}; {USAGE}")


@dataclass(slots=True)
class ProxyStats:
    connections_accepted: int = 0
    """Every TCP connection accepted, including the ones then dropped or refused."""
    connections_active: int = 0
    connections_dropped: int = 0
    """Closed at once by ``drop`` mode."""
    connections_reset: int = 0
    """Cut by :meth:`FaultProxy.reset` (or by closing the proxy)."""
    connections_refused: int = 0
    """Closed because ``max_connections`` were already proxied."""
    target_connect_failures: int = 0
    bytes_client_to_target: int = 0
    bytes_target_to_client: int = 0


# -- the proxy ---------------------------------------------------------------------------------


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a graceful FIN: what a cut cable looks like
    to the peer that next sends."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side, the target side once dialed, and its task."""

    __slots__ = ("client", "target", "task")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None

    def cut(self) -> None:
        _rst(self.client)
        _rst(self.target)
        if self.task is not None:
            self.task.cancel()



class FaultProxy:
    """A TCP proxy from ``host:port`` (port 0: a free one) to ``target_host:target_port`` with
    switchable faults; see the module docstring. ``control_port`` (0: a free one; None: none)
    opens the line-based control port on 127.0.0.1."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int | None = None,
        chunk_bytes: int = 64 * 1024,
        queue_chunks: int = 16,
        max_connections: int = 1024,
        connect_timeout_s: float = 5.0,
    ) -> None:
        assert chunk_bytes > 0 and queue_chunks > 0 and max_connections > 0 and connect_timeout_s > 0
        self.target_host = target_host
        self.target_port = int(target_port)
        self.host = host
        self.port = int(port)
        self.control_port = control_port
        self.chunk_bytes = chunk_bytes
        self.queue_chunks = queue_chunks
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.stats = ProxyStats()
        self._mode = PASS
        self._drop_rng = random.Random()
        self._jitter_rng = random.Random()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._control_clients = 0

    # -- addresses and state --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``nats://host:port`` of the proxy: what a client connects to instead of the server."""
        return f"nats://{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def snapshot(self) -> dict:
        """Mode and counters as plain values (what the control port's replies carry)."""
        return {"mode": str(self._mode), **asdict(self.stats)}

    # -- faults ---------------------------------------------------------------------------------

    def set_mode(self, mode: Mode) -> None:
        if mode.kind == "drop":
            # Re-seed on every switch, so the same seed replays the same decisions from here.
            self._drop_rng.seed(mode.seed)
        if mode.kind == "delay":
            self._jitter_rng.seed(mode.seed)
        self._mode = mode
        if mode.kind == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()

    def heal(self) -> None:
        """Back to ``pass``: held bytes flow on, new connections are forwarded. Connections
        are not cut; call :meth:`reset` for that."""
        self.set_mode(PASS)

    passthrough = heal

    def delay(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Hold every chunk ``ms + uniform(0, jitter_ms)`` milliseconds, in each direction."""
        self.set_mode(delay_mode(ms, jitter_ms))

    def drop(self, p: float, seed: int | None = None) -> None:
        """Close each new connection at once with probability ``p`` (seeded)."""
        self.set_mode(drop_mode(p, seed))

    def blackhole(self) -> None:
        """Keep every connection up and let nothing through, either way."""
        self.set_mode(BLACKHOLE)

    def reset(self) -> int:
        """Cut every current connection with a TCP reset; returns how many. Mode unchanged."""
        links = list(self._links)
        for link in links:
            link.cut()
        self.stats.connections_reset += len(links)
        return len(links)

    def command(self, line: str) -> dict:
        """Apply one control line; the reply (``ok``, ``mode``, counters, or ``error``)."""
        try:
            verb, mode = parse_command(line)
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        if mode is not None:
            self.set_mode(mode)
        reply: dict = {"ok": True}
        if verb == "reset":
            reply["cut"] = self.reset()
        return {**reply, **self.snapshot()}

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> "FaultProxy":
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=self.chunk_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.control_port is not None:
            self._control = await asyncio.start_server(
                self._control_session, CONTROL_HOST, self.control_port, limit=CONTROL_LINE_MAX_BYTES
            )
            self.control_port = self._control.sockets[0].getsockname()[1]
        return self

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, cut every connection, and wait (bounded) for their tasks."""
        for srv in (self._server, self._control):
            if srv is not None:
                srv.close()
        tasks = [link.task for link in self._links if link.task is not None]
        self.reset()
        self._flowing.set()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for srv in (self._server, self._control):
            if srv is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(srv.wait_closed(), timeout_s)

    async def __aenter__(self) -> "FaultProxy":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- forwarding -----------------------------------------------------------------------------

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.stats.connections_accepted += 1
        if len(self._links) >= self.max_connections:
            self.stats.connections_refused += 1
            _rst(cwriter)
            return
        mode = self._mode
        if mode.kind == "drop" and self._drop_rng.random() < mode.drop_p:
            self.stats.connections_dropped += 1
            cwriter.close()
            return
        link = _Link(cwriter)
        link.task = asyncio.current_task()
        self._links.add(link)
        self.stats.connections_active += 1
        try:
            await self._forward(link, creader, cwriter)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass  # cut by reset() or close(), or a peer went away: both sides are closed below
        except BaseExceptionGroup as group:  # from the pumps' task groups
            _, rest = group.split((ConnectionError, OSError))
            if rest is not None:
                raise rest
        finally:
            self._links.discard(link)
            self.stats.connections_active -= 1
            for w in (cwriter, link.target):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _forward(self, link: _Link, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        first = b""
        if not self._flowing.is_set():
            held = await self._hold(creader)
            if held is None:
                return  # the client gave up while held; nothing was dialed
            first = held
        try:
            treader, twriter = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port, limit=self.chunk_bytes),
                self.connect_timeout_s,
            )
        except (OSError, asyncio.TimeoutError):
            self.stats.target_connect_failures += 1
            return
        link.target = twriter
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pump(creader, twriter, "bytes_client_to_target", first))
            tg.create_task(self._pump(treader, cwriter, "bytes_target_to_client"))

    async def _hold(self, creader: asyncio.StreamReader) -> bytes | None:
        """A connection accepted in blackhole: wait for heal without dialing the target. Reads
        at most one chunk meanwhile, to notice a client that gives up (None) and to keep what
        it sent first (returned, forwarded after heal)."""
        first: bytes | None = None
        reading = asyncio.ensure_future(creader.read(self.chunk_bytes))
        gate = asyncio.ensure_future(self._flowing.wait())
        try:
            done, _ = await asyncio.wait({reading, gate}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                first = reading.result()
                if not first:
                    return None
                await gate
            else:
                reading.cancel()
                first = b""
            return first
        finally:
            for f in (reading, gate):
                f.cancel()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str, first: bytes = b"") -> None:
        """One direction. A reader fills a bounded queue with (deliver_at, chunk); one writer
        drains it in order, waiting for each chunk's time and for the gate. So delay adds
        latency without cutting throughput, and a chunk never overtakes an earlier one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=self.queue_chunks)

        def deliver_at() -> float:
            mode = self._mode
            hold_s = 0.0
            if mode.kind == "delay":
                hold_s = (mode.delay_ms + self._jitter_rng.uniform(0.0, mode.jitter_ms)) / 1000.0
            return loop.time() + hold_s

        async def read() -> None:
            if first:
                await queue.put((deliver_at(), first))
            while True:
                await self._flowing.wait()
                data = await src.read(self.chunk_bytes)
                await queue.put((deliver_at(), data))
                if not data:
                    return

        async def write() -> None:
            while True:
                at, data = await queue.get()
                while (wait_s := at - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                await self._flowing.wait()
                if not data:
                    # Half-close: the other direction may still have bytes to deliver.
                    if dst.can_write_eof() and not dst.transport.is_closing():
                        with contextlib.suppress(OSError):
                            dst.write_eof()
                    return
                dst.write(data)
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                await dst.drain()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(read())
            tg.create_task(write())

    # -- control port ---------------------------------------------------------------------------

    async def _control_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._control_clients >= CONTROL_CONNECTIONS_MAX:
            writer.close()
            return
        self._control_clients += 1
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    reply = {"ok": False, "error": f"command longer than {CONTROL_LINE_MAX_BYTES} bytes"}
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                reply = self.command(line.decode("utf-8", "replace"))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._control_clients -= 1
            writer.close()


# -- the control client ------------------------------------------------------------------------


class ProxyControl:
    """Steer a proxy process through its control port: ``await ProxyControl(port).send("blackhole")``
    (or :meth:`send_sync` from synchronous code). Each call is one short connection."""

    def __init__(self, port: int, host: str = CONTROL_HOST, timeout_s: float = 5.0) -> None:
        self.port = int(port)
        self.host = host
        self.timeout_s = timeout_s

    @staticmethod
    def _check(command: str, raw: bytes) -> dict:
        if not raw:
            raise ProxyControlError(f"proxy control: no reply to {command!r} (is the proxy still running?)")
        reply = json.loads(raw)
        if not reply.get("ok"):
            raise ProxyControlError(f"proxy refused {command!r}: {reply.get('error')}")
        return reply

    async def send(self, command: str) -> dict:
        """Send one command; its reply (mode and counters). Raises :class:`ProxyControlError`."""
        assert "\n" not in command, "one command per call"

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                return await reader.readline()
            finally:
                writer.close()

        try:
            raw = await asyncio.wait_for(exchange(), self.timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            raise ProxyControlError(f"proxy control at {self.host}:{self.port} did not answer {command!r}: {e!r}") from e
        return self._check(command, raw)

    def send_sync(self, command: str) -> dict:
        """:meth:`send` for synchronous callers (a blocking socket, bounded by ``timeout_s``)."""
        assert "\n" not in command, "one command per call"
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout_s) as s:
                s.sendall(command.encode() + b"\n")
                with s.makefile("rb") as f:
                    raw = f.readline(1 << 20)
        except OSError as e:
            raise ProxyControlError(f"proxy control at {self.host}:{self.port} did not answer {command!r}: {e!r}") from e
        return self._check(command, raw)


# -- the command line --------------------------------------------------------------------------


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--target must be HOST:PORT, got {target!r}")
    return host, int(port)


async def serve(listen_host: str, listen_port: int, target: str, control_port: int, initial: str | None) -> None:
    """Run a proxy until SIGTERM or SIGINT. Prints one JSON line with its ports when ready."""
    host, port = _split_target(target)
    proxy = FaultProxy(host, port, host=listen_host, port=listen_port, control_port=control_port)
    if initial:
        _, mode = parse_command(initial)
        if mode is None:
            raise ValueError(f"--mode must set a mode (pass, delay, drop, blackhole), got {initial!r}")
        proxy.set_mode(mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with proxy:
        print(json.dumps({"listen": proxy.port, "control": proxy.control_port, "target": f"{host}:{port}",
                          "mode": str(proxy.mode), "pid": os.getpid()}), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--listen", "listen_port", type=int, default=0, show_default=True,
                  help="Port to accept clients on (0: a free one, printed when ready).")
    @click.option("--listen-host", default="127.0.0.1", show_default=True)
    @click.option("--target", help="HOST:PORT to forward to (the nats-server).")
    @click.option("--control", "control_port", type=int, default=0, show_default=True,
                  help="Control port on 127.0.0.1 (0: a free one, printed when ready).")
    @click.option("--mode", "initial", help="Initial mode, as a control command, e.g. 'delay 200 50'.")
    @click.option("--send", "send", help="Instead of proxying: send this command to --control and print the reply.")
    def cli(listen_port, listen_host, target, control_port, initial, send):
        """A fault-injecting TCP proxy for chaos scenarios (pass, delay, drop, blackhole, reset)."""
        if send:
            if not control_port:
                raise click.UsageError("--send needs --control PORT of a running proxy")
            try:
                click.echo(json.dumps(ProxyControl(control_port).send_sync(send)))
            except ProxyControlError as e:
                raise click.ClickException(str(e)) from None
            return
        if not target:
            raise click.UsageError("--target HOST:PORT is required")
        try:
            asyncio.run(serve(listen_host, listen_port, target, control_port, initial))
        except ValueError as e:
            raise click.UsageError(str(e)) from None

    try:
        cli.main(args=argv, prog_name="python -m gigafactory.chaos.proxy", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
