"""Long-running services start in any order: a factory or a coordinator started before its
broker waits for it (jittered back-off, bounded tries, logged), stops on SIGTERM while waiting,
and gives up only when told to (--connect-timeout-s). Real processes, a real nats-server that
comes up after them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
from pathlib import Path

import msgspec
import pytest
from helpers import Proc, fast_env, fast_settings, gigafactory_cmd, wait_until

from gigafactory.broker import Broker, check_connect_settings, connect_backoff_s
from gigafactory.config import Settings
from gigafactory.embedded import EmbeddedServer, free_port

pytestmark = pytest.mark.timeout(120)


def _env(home: Path) -> dict[str, str]:
    env = fast_env()
    env["GIGAFACTORY_HOME"] = str(home)
    env["GIGAFACTORY_CONNECT_BACKOFF_MAX_S"] = "0.5"  # the broker comes up soon: keep tries close
    env.pop("GIGAFACTORY_NATS_URL", None)
    return env


def _registered(url: str, factory_id: str, home: Path | None = None) -> bool:
    """Whether ``factory_id`` is registered on the broker at ``url``; with ``home``, read as that
    home's admin (its embedded broker runs with authentication on)."""
    async def look() -> bool:
        settings = fast_settings()
        if home is not None:
            settings = msgspec.structs.replace(settings, creds=str(home / "identities" / "admin.creds"))
        b = await asyncio.wait_for(Broker.open(url, "test-services-reader", settings, ensure=False), 10)
        try:
            return await b.factories.get(factory_id) is not None
        finally:
            await b.close()

    try:  # on a thread of its own: wait_until runs this inside its own event loop
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, look()).result()
    except Exception:  # the layout may not exist yet: not registered
        return False


def _factory_args(tmp_path: Path, fid: str, *extra: str) -> list[str]:
    return [*gigafactory_cmd(), "factory", "--id", fid, "--no-probe", "--data-dir", str(tmp_path / f"{fid}-data"),
            "--workspace", str(tmp_path / "work"), *extra]


def test_a_factory_and_a_coordinator_started_before_their_broker_wait_for_it(tmp_path):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = _env(tmp_path / "home")
    factory = Proc(_factory_args(tmp_path, "early", "--nats", url), tmp_path / "factory.log", env)
    coord = Proc([*gigafactory_cmd(), "coordinator", "--nats", url], tmp_path / "coord.log", env)
    srv = None
    try:
        for p in (factory, coord):
            wait_until(lambda p=p: f"waiting for the broker at {url}" in p.output(), 30,
                       what=f"{p.log.name} says what it waits for")
            assert p.alive(), p.output()
        srv = EmbeddedServer(store_dir=str(tmp_path / "store"), port=port).start()
        wait_until(lambda: _registered(url, "early"), 60, what="the factory registered once the broker came up")

        def api_answers() -> bool:
            r = subprocess.run([*gigafactory_cmd(), "factories", "--json", "--nats", url], env=env,
                               capture_output=True, text=True, timeout=30)
            return r.returncode == 0 and "early" in [f["id"] for f in json.loads(r.stdout)["factories"]]

        wait_until(api_answers, 60, what="the coordinator serves its API and sees the factory")
        assert "answered after" in factory.output() and "answered after" in coord.output()
    finally:
        factory.close()
        coord.close()
        if srv is not None:
            srv.stop()
    assert "Traceback" not in factory.output() + coord.output()


def test_a_factory_with_no_broker_configured_waits_for_the_embedded_one(tmp_path):
    """No --nats, no GIGAFACTORY_NATS_URL, no embedded broker yet: the factory waits for
    'gigafactory server' on the same home instead of exiting with "no broker"."""
    home = tmp_path / "home"
    env = _env(home)
    factory = Proc(_factory_args(tmp_path, "local"), tmp_path / "factory.log", env)
    server = None
    try:
        wait_until(lambda: "waiting for 'gigafactory server' or 'gigafactory up'" in factory.output(), 30,
                   what="the factory says what it waits for")
        assert factory.alive(), factory.output()
        server = Proc([*gigafactory_cmd(), "server", "--port", "0"], tmp_path / "server.log", env)
        state = home / "server.json"
        wait_until(state.exists, 30, what="the embedded broker is up")
        url = json.loads(state.read_text())["url"]
        wait_until(lambda: _registered(url, "local", home), 60, what="the factory registered on the embedded broker")
    finally:
        factory.close()
        if server is not None:
            server.close()


def test_sigterm_while_waiting_for_the_broker_ends_a_factory_at_once(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    factory = Proc(_factory_args(tmp_path, "waiting", "--nats", url), tmp_path / "factory.log", _env(tmp_path / "home"))
    try:
        wait_until(lambda: f"waiting for the broker at {url}" in factory.output(), 30, what="the factory waits")
        factory.signal(signal.SIGTERM)
        assert factory.wait(15) == 0, factory.output()
    finally:
        factory.close()


def test_connect_timeout_ends_the_wait_with_a_clear_error(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    r = subprocess.run(_factory_args(tmp_path, "impatient", "--nats", url, "--connect-timeout-s", "1"),
                       env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr  # unavailable, not a usage error
    assert f"no broker answered at {url} within 1s (connect_timeout_s" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_connect_backoff_doubles_is_capped_and_jittered():
    assert connect_backoff_s(1, 10.0, 1.0) == pytest.approx(0.1)
    assert connect_backoff_s(2, 10.0, 1.0) == pytest.approx(0.2)
    assert connect_backoff_s(5, 10.0, 1.0) == pytest.approx(1.6)
    assert connect_backoff_s(40, 10.0, 1.0) == 10.0
    assert connect_backoff_s(40, 10.0, 0.0) == 5.0  # jitter spreads each pause over [half, whole]
    assert connect_backoff_s(10_000, 2.5, 0.5) == pytest.approx(1.875)  # no overflow on a long wait
    with pytest.raises(AssertionError):
        connect_backoff_s(0, 10.0, 0.5)


@pytest.mark.parametrize("field, value, env_name", [
    ("connect_timeout_s", -1.0, "GIGAFACTORY_CONNECT_TIMEOUT_S"),
    ("connect_backoff_max_s", 0.0, "GIGAFACTORY_CONNECT_BACKOFF_MAX_S"),
    ("connect_backoff_max_s", float("nan"), "GIGAFACTORY_CONNECT_BACKOFF_MAX_S"),
])
def test_invalid_connect_settings_are_refused_naming_the_variable(field, value, env_name):
    with pytest.raises(ValueError, match=env_name):
        check_connect_settings(Settings(**{field: value}))
    check_connect_settings(Settings())  # the defaults are valid
