"""Prometheus metrics and the health endpoints, scraped over HTTP from live processes on a
real broker: a coordinator and factories run real jobs (a shell job that ships, one that
crashes and is retried, one no factory can serve, one whose engine reports usage), then
``/metrics`` must say so with exactly those figures; ``/healthz`` and ``/readyz`` answer with
the status codes an orchestrator acts on; and no label ever carries a job id."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from helpers import Fleet, Proc, eventually, fast_env, gigafactory_cmd, job_text, run
from prometheus_client.parser import text_string_to_metric_families

from gigafactory import metrics
from gigafactory.client import Client
from gigafactory.config import Settings, SettingsError
from gigafactory.factory import engines
from gigafactory.factory.engines.base import Engine

from test_usage import UsageEngine

pytestmark = pytest.mark.timeout(180)


# -- scraping --------------------------------------------------------------------------------------


def _get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _aget(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, url)


class Scrape:
    """One /metrics answer: ``value(name, **labels)`` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


async def _scrape(base: str) -> Scrape:
    status, text = await _aget(base + "/metrics")
    assert status == 200, text
    return Scrape(text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_catalogue_exactly(scrape: Scrape) -> None:
    """Every family exported is in the catalogue with its type, and every catalogue entry is exported."""
    got = {name: f.type for name, f in scrape.families.items()}
    want = {s.base: s.kind for s in metrics.CATALOGUE}
    assert got == want


def _assert_no_job_ids(scrape: Scrape, job_ids: list[str]) -> None:
    for s in scrape.samples:
        assert "job" not in s.labels, s
        for v in s.labels.values():
            assert not any(j in v for j in job_ids), (s, job_ids)


# -- a test engine that reports usage ------------------------------------------------------------


class MeteredEngine(UsageEngine):
    """The job's body is a Python program that prints its usage (``usage: {json}`` lines)."""

    name = "metered"


@pytest.fixture
def metered_engine() -> Iterator[Engine]:
    e = engines.register(MeteredEngine())
    yield e
    engines.unregister(e.name)


@pytest.fixture
def fresh_registry(monkeypatch) -> metrics.Metrics:
    """This test's own process registry (other tests' coordinators and factories stay out)."""
    monkeypatch.setattr(metrics, "_PROCESS", None)
    return metrics.process_metrics()


USAGE = dict(model="m-1", input_tokens=300, output_tokens=40, cache_read_tokens=50, cache_write_tokens=20,
             cost_usd=0.0125, cost_source="reported")


# -- the tests -------------------------------------------------------------------------------------


def test_a_fleets_jobs_show_in_metrics_with_exact_figures_and_bounded_labels(
        nats_server, tmp_path, metered_engine, fresh_registry):
    async def main():
        async with metrics.MetricsServer(fresh_registry, "127.0.0.1", 0) as srv:
            base = srv.url
            status, body = await _aget(base + "/readyz")
            assert status == 503 and json.loads(body)["ok"] is False, "nothing is running yet: not ready"
            async with Fleet(nats_server.url, tmp_path) as fleet:
                await fleet.add_factory("m-1", caps=["engine:metered"])
                program = "print(" + repr("usage: " + json.dumps(USAGE)) + ", flush=True)"
                shell = await fleet.submit_one(fleet.job("echo ok", review_policy="auto"), "shell.md")
                metered = await fleet.submit_one(fleet.job(program, engine="metered", review_policy="auto"),
                                                 "metered.md")
                crash = await fleet.submit_one(fleet.job("exit 3", review_policy="auto",
                                                         retry={"max": 1, "backoff": "0.1s"}), "crash.md")
                gpu = await fleet.submit_one(fleet.job("echo ok", capabilities=["gpu"]), "gpu.md")
                await fleet.wait_stage(shell, "shipped")
                await fleet.wait_stage(metered, "shipped")
                await fleet.wait_stage(crash, "dead_letter")
                gpu_rec = await fleet.wait_stage(gpu, "queued")
                await eventually(lambda: gpu in fleet.coordinator.sched.held, 10, what="the gpu job held")

                async def settled():
                    s = await _scrape(base)
                    done = s.value("gigafactory_attempts_finished_total", factory="m-1") == 4
                    return s if done and s.value("gigafactory_jobs", stage="dead_letter") == 1 else None

                s = await eventually(settled, 10, what="the coordinator's view caught up")
                # jobs by stage and product (from the view)
                assert s.value("gigafactory_jobs", stage="shipped", product="default") == 2
                assert s.value("gigafactory_jobs", stage="queued", product="default") == 1
                assert s.value("gigafactory_view_jobs") == 4
                # the counters of what happened while the coordinator watched
                assert s.value("gigafactory_jobs_submitted_total", product="default") == 4
                assert s.value("gigafactory_jobs_shipped_total", product="default") == 2
                assert s.value("gigafactory_attempt_failures_total", product="default", **{"class": "crash"}) == 2
                assert s.value("gigafactory_dead_letters_total", product="default", **{"class": "crash"}) == 1
                assert s.value("gigafactory_retries_total", product="default") == 1
                assert s.value("gigafactory_jobs_failed_total") == 0 and s.value("gigafactory_requeues_total") == 0
                assert s.value("gigafactory_claims_total", factory="m-1") == 4  # shell, metered, crash twice
                assert s.value("gigafactory_attempts_finished_total", factory="m-1") == 4
                # usage: the metered engine's, none for the shell engine
                assert s.value("gigafactory_cost_usd_total", engine="metered", model="m-1", product="default") \
                    == pytest.approx(0.0125)
                assert s.value("gigafactory_tokens_total", engine="metered", kind="input") == 300
                assert s.value("gigafactory_tokens_total", engine="metered", kind="cache_read") == 50
                assert all(lb["engine"] == "metered" for lb in s.series("gigafactory_tokens_total"))
                assert all(lb["engine"] == "metered" for lb in s.series("gigafactory_cost_usd_total"))
                # the held job: its pool's depth, its reason class
                assert s.value("gigafactory_queue_depth", pool=gpu_rec.pool) == 1
                assert s.value("gigafactory_queue_oldest_age_seconds", pool=gpu_rec.pool) >= 0
                assert s.value("gigafactory_jobs_held", pool=gpu_rec.pool, reason="capability") == 1
                assert s.value("gigafactory_jobs_held", reason="lock") == 0
                assert s.series("gigafactory_pool_live_factories") == [{"pool": gpu_rec.pool}]
                assert s.value("gigafactory_pool_live_factories", pool=gpu_rec.pool) == 0
                # latency and durations: one first claim per job that was claimed
                assert s.value("gigafactory_dispatch_latency_seconds_count") == 3
                assert s.value("gigafactory_stage_duration_seconds_count", stage="queued") >= 3
                # factories, stations, seats
                assert s.value("gigafactory_factories_live", mode="push") == 1
                assert s.value("gigafactory_factories_live", mode="poll") == 0
                assert s.value("gigafactory_stations", factory="m-1") == 1
                assert s.value("gigafactory_fleet_stations") == 1
                assert s.value("gigafactory_outbox_depth", factory="m-1") == 0
                assert s.value("gigafactory_fenced_writes_refused_total", factory="m-1") == 0
                assert s.value("gigafactory_ready", role="coordinator") == 1
                assert s.value("gigafactory_ready", role="factory", factory="m-1") == 1
                assert s.value("gigafactory_broker_connected", role="factory", factory="m-1") == 1
                assert s.value("gigafactory_view_replay_seconds") > 0
                assert s.value("gigafactory_jetstream_storage_bytes") > 0  # the fleet's streams and buckets
                assert s.value("gigafactory_jetstream_storage_limit_bytes") == -1  # the test broker sets none
                _assert_catalogue_exactly(s)
                _assert_no_job_ids(s, [shell, metered, crash, gpu])

                assert (await _aget(base + "/healthz"))[0] == 200
                status, body = await _aget(base + "/readyz")
                assert status == 200 and json.loads(body)["ok"] is True
                assert (await _aget(base + "/nothing"))[0] == 404

    run(main(), timeout_s=150)


def test_real_coordinator_and_factory_processes_serve_metrics_health_and_readiness(nats_server, tmp_path):
    (tmp_path / "work").mkdir()
    env = fast_env()
    cport, fport = _free_port(), _free_port()
    coord = Proc([*gigafactory_cmd(), "coordinator", "--nats", nats_server.url, "--metrics-port", str(cport)],
                 tmp_path / "coordinator.log", env=env)
    fac = Proc([*gigafactory_cmd(), "factory", "--nats", nats_server.url, "--id", "mp-1", "--no-probe",
                "--stations", "1", "--workspace", str(tmp_path / "work"), "--data-dir", str(tmp_path / "data"),
                "--metrics-port", str(fport)], tmp_path / "factory.log", env=env)
    # A factory whose broker does not answer: alive (healthz 200), not ready (readyz 503); port 0 is logged.
    lonely = Proc([*gigafactory_cmd(), "factory", "--nats", f"nats://127.0.0.1:{_free_port()}", "--id", "mp-2",
                   "--no-probe", "--data-dir", str(tmp_path / "data2"), "--metrics-port", "0"],
                  tmp_path / "lonely.log", env=env)
    cbase, fbase = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{fport}"
    try:
        async def main():
            m = await eventually(lambda: re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", lonely.output()),
                                 30, what="the lonely factory logs its metrics port")
            lbase = m.group(1)
            assert (await _aget(lbase + "/healthz"))[0] == 200
            status, body = await _aget(lbase + "/readyz")
            assert status == 503 and json.loads(body)["ok"] is False

            async def ready(base):
                try:
                    return (await _aget(base + "/readyz"))[0] == 200
                except OSError:
                    return False

            await eventually(lambda: ready(cbase), 60, what="the coordinator ready")
            await eventually(lambda: ready(fbase), 60, what="the factory ready")
            client = await Client.connect(nats_server.url)
            try:
                resp = await client.call("submit", {"files": [{"path": "a.md", "text": job_text(
                    "echo ok", cwd=str(tmp_path / "work"), review_policy="auto")}]})
                job = resp["jobs"][0]["job"]

                async def shipped():
                    s = await _scrape(cbase)
                    return s if s.value("gigafactory_jobs_shipped_total") == 1 else None

                s = await eventually(shipped, 60, what="the coordinator's metrics count the ship")
                assert s.value("gigafactory_jobs", stage="shipped", product="default") == 1
                assert s.value("gigafactory_jobs_submitted_total", product="default") == 1
                assert s.value("gigafactory_factories_live", mode="push") == 1
                assert s.value("gigafactory_ready", role="coordinator") == 1
                assert s.value("gigafactory_broker_connected", role="coordinator") == 1
                assert s.value("gigafactory_claims_total") == 0, "the coordinator process holds no factory"
                async def idle_again():
                    f = await _scrape(fbase)
                    return f if f.value("gigafactory_stations", factory="mp-1", state="idle") == 1 else None

                f = await eventually(idle_again, 30, what="the factory's station idle again")
                assert f.value("gigafactory_claims_total", factory="mp-1") == 1
                assert f.value("gigafactory_attempts_finished_total", factory="mp-1") == 1
                assert f.value("gigafactory_outbox_depth", factory="mp-1") == 0
                assert f.value("gigafactory_jobs") == 0, "the factory process holds no view"
                for scrape in (s, f):
                    _assert_catalogue_exactly(scrape)
                    _assert_no_job_ids(scrape, [job])
            finally:
                await client.close()

        run(main(), timeout_s=150)
    finally:
        for p in (lonely, fac, coord):
            p.close()


def test_the_metrics_port_setting_is_checked():
    assert Settings.from_env({"GIGAFACTORY_METRICS_PORT": "9464"}).metrics_port == 9464
    assert Settings.from_env({}).metrics_port is None
    for bad in ("70000", "-1", "94.5"):
        with pytest.raises(SettingsError, match="GIGAFACTORY_METRICS_PORT"):
            Settings.from_env({"GIGAFACTORY_METRICS_PORT": bad})


def test_hold_reasons_fold_into_their_bounded_classes():
    assert metrics.hold_class("waiting for lock 'db' held by job 20260101-abc") == "lock"
    assert metrics.hold_class("no live factory offers gpu") == "capability"
    assert metrics.hold_class("no single live factory offers all of a, b (closest: x, missing b)") == "capability"
    assert metrics.hold_class("no live factory is connected") == "capability"
    assert metrics.hold_class("something new") == "other"
    assert set(metrics.HOLD_REASONS) >= {"capability", "lock", "deps", "backoff", "budget", "other"}


def test_a_fleet_hosts_factories_share_one_registry_labelled_by_factory(nats_server, tmp_path):
    (tmp_path / "work").mkdir()
    env = fast_env()
    coord = Proc([*gigafactory_cmd(), "coordinator", "--nats", nats_server.url], tmp_path / "coordinator.log", env=env)
    host = Proc([sys.executable, "-m", "gigafactory.loadtest.fleet", "--nats", nats_server.url, "--count", "3",
                 "--prefix", "mh-", "--data-dir", str(tmp_path / "data"), "--workspace", str(tmp_path / "work"),
                 "--metrics-port", "0"], tmp_path / "fleet.log", env=env)
    ids = ["mh-0000", "mh-0001", "mh-0002"]
    try:
        async def main():
            m = await eventually(lambda: re.search(r"metrics on (http://\S+)/metrics", host.output()), 30,
                                 what="the fleet host prints its metrics address")
            base = m.group(1)
            await eventually(lambda: "fleet ready: 3 factories" in host.output(), 60, what="the fleet ready")
            status, body = await _aget(base + "/readyz")
            assert status == 200, body
            assert sorted(p.split()[1] for p in json.loads(body)["parts"]) == ids
            client = await Client.connect(nats_server.url)
            try:
                async def api_answers():
                    try:
                        await client.call("factories", {})
                        return True
                    except Exception:
                        return False

                await eventually(api_answers, 30, what="the coordinator answers")
                resp = await client.call("submit", {"files": [{"path": "p.md", "text": job_text(
                    "echo ok", cwd=str(tmp_path / "work"), review_policy="auto", capabilities=["factory:mh-0001"])}]})
                job = resp["jobs"][0]["job"]

                async def claimed():
                    s = await _scrape(base)
                    done = s.value("gigafactory_attempts_finished_total", factory="mh-0001") == 1
                    return s if done and s.value("gigafactory_stations", state="idle") == 3 else None

                s = await eventually(claimed, 60, what="the pinned factory's metrics count its job")
                assert {lb["factory"] for lb in s.series("gigafactory_claims_total")} == set(ids)
                assert s.value("gigafactory_claims_total", factory="mh-0001") == 1
                assert s.value("gigafactory_claims_total") == 1, "only the pinned factory claimed"
                assert s.value("gigafactory_ready", role="factory") == 3
                assert s.value("gigafactory_broker_connected", role="factory") == 3
                assert s.value("gigafactory_stations", state="busy") == 0
                _assert_catalogue_exactly(s)
                _assert_no_job_ids(s, [job])
            finally:
                await client.close()

        run(main(), timeout_s=150)
    finally:
        host.close()
        coord.close()


def test_up_serves_one_registry_for_its_coordinator_and_factory(nats_server, tmp_path):
    env = fast_env(metrics_port=_free_port())
    env["GIGAFACTORY_HOME"] = str(tmp_path / "home")
    env.pop("GIGAFACTORY_NATS_URL", None)
    base = f"http://127.0.0.1:{env['GIGAFACTORY_METRICS_PORT']}"
    up = Proc([*gigafactory_cmd(), "up", "--nats", nats_server.url, "--stations", "1"],
              tmp_path / "up.log", env)
    try:
        async def main():
            async def ready():
                try:
                    status, body = await _aget(base + "/readyz")
                except OSError:
                    return None
                return json.loads(body) if status == 200 else None

            body = await eventually(ready, 60, what="up ready (from GIGAFACTORY_METRICS_PORT)")
            kinds = sorted(p.split()[0] for p in body["parts"])
            assert kinds == ["coordinator", "factory"]
            s = await _scrape(base)
            assert s.value("gigafactory_ready", role="coordinator") == 1
            assert s.value("gigafactory_ready", role="factory") == 1
            assert s.value("gigafactory_view_factories") == 1
            _assert_catalogue_exactly(s)

        run(main(), timeout_s=90)
    finally:
        up.close()
    assert "Traceback" not in up.output(), up.output()


def test_health_says_stalled_when_the_event_loop_has_not_woken_its_probe():
    m = metrics.Metrics()
    assert m.health()[0] is True
    m.loop_tick_at -= metrics.LOOP_STALL_S + 1
    ok, body = m.health()
    assert ok is False and body["loop_tick_age_s"] > metrics.LOOP_STALL_S


def test_the_endpoint_refuses_oversized_requests_and_other_methods():
    async def main():
        async with metrics.MetricsServer(metrics.Metrics(), "127.0.0.1", 0) as srv:
            async def raw(data: bytes) -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", srv.port)
                w.write(data)
                await w.drain()
                out = await r.read()
                w.close()
                return out

            big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (metrics.REQUEST_MAX_BYTES * 2) + b"\r\n\r\n"
            assert (await raw(big)).startswith(b"HTTP/1.1 413 ")
            assert (await raw(b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
            ok = await raw(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 ") and b"gigafactory_event_loop_lag_seconds" in ok
            # Nothing registered in this registry: not ready.
            assert (await raw(b"GET /readyz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503 ")

    run(main())


def test_a_running_job_shows_busy_stations_seats_and_a_lock_hold(nats_server, tmp_path, fresh_registry):
    async def main():
        async with metrics.MetricsServer(fresh_registry, "127.0.0.1", 0) as srv:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                await fleet.add_factory("l-1", stations=2)
                gate = tmp_path / "gate"
                holder = await fleet.submit_one(fleet.job(f'while [ ! -e "{gate}" ]; do sleep 0.05; done',
                                                          lock="db", review_policy="auto"), "holder.md")
                await fleet.wait_stage(holder, "building")
                waiter = await fleet.submit_one(fleet.job("echo ok", lock="db", review_policy="auto"), "waiter.md")

                async def held():
                    s = await _scrape(srv.url)
                    return s if s.value("gigafactory_jobs_held", reason="lock") == 1 else None

                s = await eventually(held, 15, what="the second job held for the lock")
                assert s.value("gigafactory_jobs", stage="building") == 1
                assert s.value("gigafactory_stations", factory="l-1", state="busy") == 1
                assert s.value("gigafactory_stations", factory="l-1", state="idle", idle_reason="no-work") == 1
                assert s.value("gigafactory_seats_in_use", factory="l-1", engine="shell") == 1
                assert s.value("gigafactory_jobs_held", reason="capability") == 0
                _assert_no_job_ids(s, [holder, waiter])
                gate.touch()
                await fleet.wait_stage(waiter, "shipped")
                s = await _scrape(srv.url)
                assert s.value("gigafactory_jobs_held") == 0 and s.value("gigafactory_jobs_shipped_total") == 2

    run(main(), timeout_s=90)
