"""The fault-injecting proxy against a real ``nats-server``: a nats-py client connected through
it works in ``pass``, is partitioned by ``blackhole`` (while a direct client is not), pays at
least the configured latency under ``delay``, and reconnects after ``reset`` and ``drop``.
The same proxy as a process is steered through its control port.

Every wait is bounded. The only fixed waits are the faults' own clocks: a client's ping
timeout, and the window in which a blackholed or dropped client must *not* get through.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import nats
from gigafactory.broker import auth_options
import pytest
from helpers import run

from gigafactory.chaos.proxy import FaultProxy, Mode, ProxyControl, ProxyControlError, parse_command


def target_of(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname, u.port


class Watch:
    """Connection callbacks of one nats-py client, as counters and events."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.reconnects = 0
        self.disconnected = asyncio.Event()
        self.reconnected = asyncio.Event()

    async def on_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def on_reconnect(self) -> None:
        self.reconnects += 1
        self.reconnected.set()

    async def wait(self, event: asyncio.Event, what: str, timeout_s: float = 10.0) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise AssertionError(f"{what} not within {timeout_s:g}s") from None


async def _quiet(_e) -> None:
    """nats-py logs every failed reconnect with a traceback; these tests cause them on purpose."""


async def through(proxy: FaultProxy, watch: Watch, **kw) -> nats.NATS:
    """A nats-py client whose only server is the proxy, reconnecting quickly and forever."""
    opts = dict(reconnect_time_wait=0.1, max_reconnect_attempts=-1, connect_timeout=1.0,
                ping_interval=60, max_outstanding_pings=2)
    opts.update(kw)
    return await nats.connect(**auth_options(), servers=[proxy.url], disconnected_cb=watch.on_disconnect,
                              reconnected_cb=watch.on_reconnect, error_cb=_quiet, **opts)


async def echo_service(url: str) -> nats.NATS:
    """A direct (unproxied) client answering requests on ``echo`` with the request's data."""
    nc = await nats.connect(url, error_cb=_quiet, **auth_options())

    async def echo(msg):
        await msg.respond(msg.data)

    await nc.subscribe("echo", cb=echo)
    await nc.flush(timeout=5)
    return nc


# -- the command grammar (pure) ----------------------------------------------------------------


def test_control_commands_parse_to_modes_and_bad_ones_say_what_is_wrong():
    assert parse_command("pass") == ("pass", Mode())
    assert parse_command(" heal \n") == ("heal", Mode())
    assert parse_command("delay 200 50") == ("delay", Mode("delay", delay_ms=200, jitter_ms=50))
    assert parse_command("delay 5") == ("delay", Mode("delay", delay_ms=5))
    assert parse_command("drop 0.25 7") == ("drop", Mode("drop", drop_p=0.25, seed=7))
    assert parse_command("BLACKHOLE") == ("blackhole", Mode("blackhole"))
    assert parse_command("reset") == ("reset", None)
    assert parse_command("stats") == ("stats", None)
    assert str(Mode("delay", delay_ms=200, jitter_ms=50)) == "delay 200 50"
    for bad, says in [("", "empty"), ("delay", "takes 1..2"), ("delay x", "not a number"),
                      ("delay -1", ">= 0"), ("drop 1.5", "between 0 and 1"), ("drop 0.5 1.5", "integer"),
                      ("blackhole now", "takes 0..0"), ("partition", "unknown command")]:
        with pytest.raises(ValueError, match=says):
            parse_command(bad)


# -- in-process, against a real nats-server ----------------------------------------------------


def test_pass_mode_forwards_publish_and_request_and_counts_bytes_both_ways(nats_server):
    async def main():
        direct = await echo_service(nats_server.url)
        async with FaultProxy(*target_of(nats_server.url)) as proxy:
            assert proxy.url.startswith("nats://127.0.0.1:") and proxy.port != target_of(nats_server.url)[1]
            watch = Watch()
            nc = await through(proxy, watch)
            got = await direct.subscribe("seen")
            await direct.flush(timeout=5)
            await nc.publish("seen", b"via proxy")
            assert (await got.next_msg(timeout=5)).data == b"via proxy"
            assert (await nc.request("echo", b"ping", timeout=5)).data == b"ping"
            s = proxy.stats
            assert s.connections_accepted == 1 and s.connections_active == 1
            assert s.bytes_client_to_target > 0 and s.bytes_target_to_client > 0
            assert (s.connections_dropped, s.connections_reset, watch.disconnects) == (0, 0, 0)
            await nc.close()
            # The client's close reaches the proxy, which closes its side to the server.
            for _ in range(100):
                if proxy.stats.connections_active == 0:
                    break
                await asyncio.sleep(0.05)
            assert proxy.stats.connections_active == 0
        await direct.close()

    run(main(), 30)


def test_blackhole_stalls_the_proxied_client_only_and_heal_then_reset_restores_it(nats_server):
    async def main():
        direct = await echo_service(nats_server.url)
        async with FaultProxy(*target_of(nats_server.url)) as proxy:
            watch = Watch()
            nc = await through(proxy, watch)  # pings every 60 s: it will not notice on its own
            assert (await nc.request("echo", b"before", timeout=5)).data == b"before"
            up, down = proxy.stats.bytes_client_to_target, proxy.stats.bytes_target_to_client

            proxy.blackhole()
            t0 = time.monotonic()
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request("echo", b"lost", timeout=0.5)
            assert time.monotonic() - t0 < 5, "a request into a blackhole must time out on its own bound"
            assert (await direct.request("echo", b"direct", timeout=5)).data == b"direct"
            # Nothing crossed, either way, and the TCP connection is still up (no reconnect).
            assert (proxy.stats.bytes_client_to_target, proxy.stats.bytes_target_to_client) == (up, down)
            assert proxy.stats.connections_active == 1 and nc.is_connected and watch.disconnects == 0

            # Heal: the held bytes flow on over the same connection, as TCP would deliver them.
            proxy.heal()
            assert (await nc.request("echo", b"healed", timeout=5)).data == b"healed"
            assert proxy.stats.bytes_client_to_target > up and watch.reconnects == 0

            # Reset: the client sees its connection cut and reconnects through the proxy.
            assert proxy.reset() == 1
            await watch.wait(watch.reconnected, "reconnect after reset")
            assert (await nc.request("echo", b"after", timeout=5)).data == b"after"
            assert (watch.disconnects, watch.reconnects) == (1, 1)
            assert proxy.stats.connections_reset == 1 and proxy.stats.connections_accepted == 2
            await nc.close()
        await direct.close()

    run(main(), 30)


def test_blackhole_is_noticed_only_through_client_pings_and_reconnect_waits_for_heal(nats_server):
    async def main():
        direct = await echo_service(nats_server.url)
        async with FaultProxy(*target_of(nats_server.url)) as proxy:
            watch = Watch()
            nc = await through(proxy, watch, ping_interval=0.2, max_outstanding_pings=2, connect_timeout=0.5)
            assert (await nc.request("echo", b"x", timeout=5)).data == b"x"

            proxy.blackhole()
            t0 = time.monotonic()
            await watch.wait(watch.disconnected, "stale connection detected by client pings", 10)
            detect_s = time.monotonic() - t0
            assert detect_s >= 0.2, f"the client cannot notice a blackhole before its first ping ({detect_s:.2f}s)"
            # While the partition lasts, reconnect attempts are accepted and held, never served.
            await asyncio.sleep(1.5)  # the fault's own clock: several connect timeouts
            assert watch.reconnects == 0 and not nc.is_connected
            assert proxy.stats.connections_accepted > 1, "the client should have retried through the proxy"

            proxy.heal()
            await watch.wait(watch.reconnected, "reconnect after heal")
            assert (await nc.request("echo", b"back", timeout=5)).data == b"back"
            assert watch.reconnects == 1
            await nc.close()
        await direct.close()

    run(main(), 30)


def test_delay_adds_at_least_the_configured_latency_each_way_and_keeps_order(nats_server):
    async def main():
        direct = await echo_service(nats_server.url)
        async with FaultProxy(*target_of(nats_server.url)) as proxy:
            watch = Watch()
            nc = await through(proxy, watch)
            assert (await nc.request("echo", b"warm", timeout=5)).data == b"warm"

            proxy.delay(150, 50)
            for _ in range(3):
                t0 = time.monotonic()
                assert (await nc.request("echo", b"slow", timeout=5)).data == b"slow"
                rtt_s = time.monotonic() - t0
                assert rtt_s >= 2 * 0.150, f"round trip {rtt_s * 1000:.0f} ms under 2 x 150 ms of delay"

            # Jittered chunks never overtake each other: a burst arrives in order.
            sub = await direct.subscribe("seq")
            await direct.flush(timeout=5)
            proxy.delay(5, 40)
            for i in range(200):
                await nc.publish("seq", str(i).encode())
                if i % 20 == 0:
                    await nc.flush(timeout=5)  # many chunks, each with its own jittered hold
            await nc.flush(timeout=5)
            got = [int((await sub.next_msg(timeout=5)).data) for _ in range(200)]
            assert got == list(range(200))

            proxy.heal()
            assert (await nc.request("echo", b"fast", timeout=5)).data == b"fast"
            assert watch.disconnects == 0
            await nc.close()
        await direct.close()

    run(main(), 30)


def test_reset_and_drop_make_the_client_reconnect_and_drop_is_seeded(nats_server):
    async def main():
        direct = await echo_service(nats_server.url)
        async with FaultProxy(*target_of(nats_server.url)) as proxy:
            watch = Watch()
            nc = await through(proxy, watch)
            assert proxy.reset() == 1
            await watch.wait(watch.reconnected, "reconnect after reset")
            assert watch.reconnects == 1

            # drop 1.0 then reset: every reconnect attempt is accepted and closed at once.
            watch.reconnected.clear()
            watch.disconnected.clear()
            proxy.drop(1.0)
            proxy.reset()
            await watch.wait(watch.disconnected, "disconnect")
            await asyncio.sleep(1.0)  # the fault's own clock: ~10 reconnect attempts at 0.1 s
            assert watch.reconnects == 1 and not nc.is_connected
            assert proxy.stats.connections_dropped >= 2
            proxy.heal()
            await watch.wait(watch.reconnected, "reconnect after drop is healed")
            assert watch.reconnects == 2
            assert (await nc.request("echo", b"ok", timeout=5)).data == b"ok"
            await nc.close()

            # drop P SEED replays the same decisions: connection i is served (INFO) or closed.
            def outcomes(n: int) -> list[bool]:
                served = []
                for _ in range(n):
                    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                        served.append(s.recv(4) == b"INFO")
                return served

            async def pattern(seed: int) -> list[bool]:
                proxy.drop(0.5, seed)
                before = proxy.stats.connections_dropped
                served = await asyncio.to_thread(outcomes, 24)
                assert proxy.stats.connections_dropped - before == served.count(False)
                return served

            first = await pattern(7)
            assert True in first and False in first, first
            assert await pattern(7) == first
            assert await pattern(8) != first
        await direct.close()

    run(main(), 60)


def test_buffers_are_bounded_a_stalled_target_pushes_back_on_the_sender():
    """A target that never reads: the proxy stops reading too, so a sender is blocked after
    kernel buffers and a bounded queue fill, instead of the proxy swallowing everything."""
    cap_bytes = 256 * 1024 * 1024

    async def main():
        stalled: list[asyncio.StreamWriter] = []

        async def never_read(_r, w):
            stalled.append(w)

        target = await asyncio.start_server(never_read, "127.0.0.1", 0)
        port = target.sockets[0].getsockname()[1]
        async with FaultProxy("127.0.0.1", port, chunk_bytes=16 * 1024, queue_chunks=4) as proxy:

            def push() -> int:
                sent = 0
                block = b"x" * (1 << 20)
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                    s.settimeout(1.0)  # blocked this long = backpressure reached the sender
                    try:
                        while sent < cap_bytes:
                            sent += s.send(block)
                    except TimeoutError:
                        pass
                return sent

            sent = await asyncio.to_thread(push)
            written = proxy.stats.bytes_client_to_target
        target.close()
        return sent, written

    sent, written = run(main(), 60)
    assert sent < cap_bytes / 4, f"the sender pushed {sent >> 20} MiB into a stalled path: unbounded buffering"
    assert written < sent


# -- as a process, steered through the control port ---------------------------------------------


def test_proxy_process_is_steered_through_its_control_port(nats_server):
    host, port = target_of(nats_server.url)

    async def main():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gigafactory.chaos.proxy", "--listen", "0", "--target", f"{host}:{port}",
            "--control", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        direct = None
        try:
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
            assert ready["target"] == f"{host}:{port}" and ready["mode"] == "pass" and ready["pid"] == proc.pid
            ctl = ProxyControl(ready["control"])
            direct = await echo_service(nats_server.url)
            watch = Watch()
            nc = await nats.connect(**auth_options(), servers=[f"nats://127.0.0.1:{ready['listen']}"], reconnect_time_wait=0.1,
                                    max_reconnect_attempts=-1, connect_timeout=1.0, error_cb=_quiet,
                                    reconnected_cb=watch.on_reconnect)
            assert (await nc.request("echo", b"1", timeout=5)).data == b"1"

            assert (await ctl.send("blackhole"))["mode"] == "blackhole"
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request("echo", b"2", timeout=0.5)
            assert (await direct.request("echo", b"d", timeout=5)).data == b"d"

            healed = await ctl.send("heal")
            assert healed["mode"] == "pass" and healed["connections_active"] == 1
            cut = await ctl.send("reset")
            assert cut["cut"] == 1 and cut["connections_reset"] == 1
            await watch.wait(watch.reconnected, "reconnect after a reset over the control port")
            assert (await nc.request("echo", b"3", timeout=5)).data == b"3"

            assert ctl.send_sync("delay 100 20")["mode"] == "delay 100 20"
            t0 = time.monotonic()
            assert (await nc.request("echo", b"4", timeout=5)).data == b"4"
            assert time.monotonic() - t0 >= 0.2

            with pytest.raises(ProxyControlError, match="unknown command 'partition'"):
                await ctl.send("partition")
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gigafactory.chaos.proxy", "--control", str(ready["control"]), "--send", "stats",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(cli.communicate(), 20)
            assert cli.returncode == 0
            stats = json.loads(out)
            assert stats["mode"] == "delay 100 20" and stats["bytes_client_to_target"] > 0
            assert stats["connections_accepted"] == 2
            await nc.close()
        finally:
            if direct is not None:
                await direct.close()
            if proc.returncode is None:
                proc.terminate()
            rc = await asyncio.wait_for(proc.wait(), 10)
        assert rc == 0, (await proc.stderr.read()).decode()

    run(main(), 60)


def test_proxy_cli_says_what_is_wrong():
    bad_target = subprocess.run([sys.executable, "-m", "gigafactory.chaos.proxy", "--target", "nohost"],
                                capture_output=True, text=True, timeout=20)
    assert bad_target.returncode != 0 and "HOST:PORT" in bad_target.stderr
    no_control = subprocess.run([sys.executable, "-m", "gigafactory.chaos.proxy", "--send", "stats"],
                                capture_output=True, text=True, timeout=20)
    assert no_control.returncode != 0 and "--control" in no_control.stderr
