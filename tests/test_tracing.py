"""Traces across real processes: a ``gigafactory submit``, a coordinator and factories, each its
own process exporting OTLP/HTTP to a receiver run by the test (a loopback HTTP server decoding
the protobuf ``ExportTraceServiceRequest``, as a collector does). One job is one trace: the
factory's claim and run are children, across processes, of the spans started at submit; a
reclaimed job's trace holds both attempts. Without an OTLP endpoint nothing is set up."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import nats
from gigafactory.broker import auth_options
import pytest
from helpers import Proc, fast_env, gigafactory_cmd, kill_group, wait_until, write_job
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from nats.js import api

from gigafactory import tracing
from gigafactory.schemas import names

pytestmark = pytest.mark.timeout(180)


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1: every span exported to it, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 -- http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver.add(req, self.path)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, req: ExportTraceServiceRequest, path: str) -> None:
        assert path == "/v1/traces", path
        got = []
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        v = a.value
                        attrs[a.key] = v.string_value if v.HasField("string_value") else v.int_value
                    got.append({"name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(), "service": res.get("service.name"),
                                "attrs": attrs, "start_ns": s.start_time_unix_nano})
        with self.lock:
            self.spans.extend(got)

    def named(self, name: str, **attrs) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name
                    and all(s["attrs"].get(f"gigafactory.{k}") == v for k, v in attrs.items())]

    def __enter__(self) -> "OtlpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class TracedFleet:
    """A coordinator and factories as real processes, exporting to ``receiver``."""

    def __init__(self, url: str, root: Path, receiver: OtlpReceiver) -> None:
        self.url, self.root = url, root
        self.env = fast_env()
        self.env.update({"GIGAFACTORY_HOME": str(root / "home"), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                         # Export each span within 0.1 s: a factory killed later has sent its claim.
                         "OTEL_BSP_SCHEDULE_DELAY": "100"})
        self.env.pop("GIGAFACTORY_NATS_URL", None)
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, *args: str) -> Proc:
        p = Proc([*gigafactory_cmd(), *args, "--nats", self.url], self.root / f"{name}.log", self.env)
        self.procs[name] = p
        return p

    def coordinator(self) -> Proc:
        return self.start("coordinator", "coordinator")

    def factory(self, fid: str) -> Proc:
        p = self.start(fid, "factory", "--id", fid, "--no-probe", "--stations", "1",
                       "--data-dir", str(self.root / "data"), "--workspace", str(self.root / "work"))
        wait_until(lambda: fid in self.live_factories(), 60, what=f"factory {fid} live\n{self.logs()}")
        return p

    def cli(self, *args: str) -> dict:
        r = subprocess.run([*gigafactory_cmd(), *args, "--json", "--nats", self.url], env=self.env,
                           capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
        assert r.returncode in (0, 1), f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}\n{self.logs()}"
        return json.loads(r.stdout)

    def live_factories(self) -> set[str]:
        r = subprocess.run([*gigafactory_cmd(), "factories", "--json", "--nats", self.url], env=self.env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        return {f["id"] for f in json.loads(r.stdout)["factories"] if f["live"]} if r.returncode == 0 else set()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.output()[-2000:]}" for n, p in self.procs.items())

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.close()


@pytest.fixture
def traced(nats_server, tmp_path):
    with OtlpReceiver() as receiver:
        fleet = TracedFleet(nats_server.url, tmp_path, receiver)
        try:
            yield fleet, receiver
        finally:
            fleet.stop()


def one(spans: list[dict], what: str) -> dict:
    assert len(spans) == 1, f"{what}: {spans}"
    return spans[0]


def test_one_job_is_one_trace_from_submit_through_the_factory(traced):
    fleet, rx = traced
    fleet.coordinator()
    fleet.factory("tf1")
    job_file = write_job(fleet.root / "jobs", "traced.md", "echo traced", cwd=str(fleet.root),
                         review_policy="auto", verify="true")
    out = fleet.cli("submit", str(job_file), "--wait", "--timeout", "60")
    [j] = out["jobs"]
    job = j["job"]
    assert out["final"][job]["stage"] == "shipped", out

    names = ("submit", "api submit", "intake", "dispatch", "claim", "attempt", "engine", "verify", "report")
    wait_until(lambda: all(rx.named(n) for n in names), 30,
               what=f"every step's span exported; got {[s['name'] for s in rx.spans]}")
    submit = one(rx.named("submit"), "submit")
    api = one(rx.named("api submit"), "api submit")
    intake = one(rx.named("intake", job=job), "intake")
    dispatch = rx.named("dispatch", job=job)[0]
    claim = one(rx.named("claim", job=job), "claim")
    attempt = one(rx.named("attempt", job=job), "attempt")
    engine, verify, report = (one(rx.named(n), n) for n in ("engine", "verify", "report"))

    # Which process made each span: the submit command, the coordinator, the factory.
    assert submit["service"] == "gigafactory-cli"
    assert {s["service"] for s in (api, intake, dispatch)} == {"gigafactory-coordinator"}
    assert {s["service"] for s in (claim, attempt, engine, verify, report)} == {"gigafactory-factory"}
    # One trace, and every link a parent/child edge, across the three processes.
    everything = [submit, api, intake, dispatch, claim, attempt, engine, verify, report]
    assert {s["trace"] for s in everything} == {submit["trace"]}
    assert submit["parent"] == ""  # the root: the trace started at submit
    assert api["parent"] == submit["id"]  # request headers: CLI -> coordinator
    assert intake["parent"] == api["id"]
    assert dispatch["parent"] == intake["id"]  # through the job record's trace
    assert claim["parent"] == dispatch["id"]  # dispatch message headers: coordinator -> factory
    assert attempt["parent"] == claim["id"]
    assert engine["parent"] == verify["parent"] == report["parent"] == attempt["id"]
    assert claim["attrs"]["gigafactory.factory"] == "tf1" and claim["attrs"]["gigafactory.epoch"] == 1
    # The record carries the intake span's context, for the writes that are not messages.
    status = fleet.cli("status", job)
    assert status["record"]["trace"].startswith(f"00-{submit['trace']}-{intake['id']}-")
    assert not [s for s in rx.spans if s["trace"] != submit["trace"] and s["attrs"].get("gigafactory.job") == job]
    # The audit events carry the trace of the step that published them, in their headers.
    headers = asyncio.run(event_headers(fleet.url, job))
    kinds = {kind: h.get("traceparent", "") for kind, h in headers}
    assert kinds["submitted"].startswith(f"00-{submit['trace']}-{intake['id']}-"), kinds
    assert kinds["claimed"].startswith(f"00-{submit['trace']}-{claim['id']}-"), kinds
    assert kinds["finished"].startswith(f"00-{submit['trace']}-{report['id']}-"), kinds


async def event_headers(url: str, job: str) -> list[tuple[str, dict]]:
    """(kind, headers) of every GF_EVENTS message about ``job``, oldest first."""
    nc = await nats.connect(url, **auth_options())
    try:
        psub = await nc.jetstream().pull_subscribe(
            f"{names.EVENTS_PREFIX}.{job}.>", stream=names.EVENTS_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL))
        msgs = await psub.fetch(100, timeout=5)
        return [(m.subject.rsplit(".", 1)[1], dict(m.headers or {})) for m in msgs]
    finally:
        await nc.close()


def test_a_reclaimed_job_shows_both_attempts_in_its_trace(traced):
    fleet, rx = traced
    fleet.coordinator()
    first = fleet.factory("tfa")
    # The first attempt hangs (its factory is killed under it); the second one passes.
    job_file = write_job(fleet.root / "jobs", "reclaimed.md",
                         'if [ "$GF_ATTEMPT" = 1 ]; then sleep 60; fi\necho second', cwd=str(fleet.root),
                         review_policy="auto", retry={"max": 2, "backoff": "1s"})
    [j] = fleet.cli("submit", str(job_file))["jobs"]
    job = j["job"]
    wait_until(lambda: rx.named("claim", job=job, factory="tfa"), 30, what=f"tfa's claim exported\n{fleet.logs()}")
    first.p.kill()
    first.wait(10)
    kill_group(first.pid)
    fleet.factory("tfb")
    wait_until(lambda: fleet.cli("status", job)["job"]["stage"] == "shipped", 60,
               what=f"{job} shipped by tfb\n{fleet.logs()}")
    wait_until(lambda: rx.named("report", job=job, factory="tfb"), 30, what="tfb's report exported")

    submit = one(rx.named("submit"), "submit")
    claim_a = one(rx.named("claim", job=job, factory="tfa"), "tfa's claim")
    claim_b = one(rx.named("claim", job=job, factory="tfb"), "tfb's claim")
    reclaim = one(rx.named("reclaim", job=job), "reclaim")
    intake = one(rx.named("intake", job=job), "intake")
    # Both attempts, and the reaper's reclaim between them, in the trace started at submit.
    assert {s["trace"] for s in (submit, claim_a, claim_b, reclaim)} == {submit["trace"]}
    assert claim_a["attrs"]["gigafactory.attempt"] == 1 and claim_b["attrs"]["gigafactory.attempt"] == 2
    assert claim_a["attrs"]["gigafactory.epoch"] < reclaim["attrs"]["gigafactory.epoch"] \
        <= claim_b["attrs"]["gigafactory.epoch"]
    assert reclaim["service"] == "gigafactory-coordinator" and reclaim["attrs"]["gigafactory.factory"] == "tfa"
    assert reclaim["parent"] == intake["id"]
    by_id = {s["id"]: s for s in rx.spans}
    dispatch_b = by_id[claim_b["parent"]]
    assert dispatch_b["name"] == "dispatch" and dispatch_b["parent"] == intake["id"]
    attempt_b = one(rx.named("attempt", job=job, factory="tfb"), "tfb's attempt")
    assert attempt_b["parent"] == claim_b["id"] and attempt_b["trace"] == submit["trace"]


def test_without_an_otlp_endpoint_nothing_is_installed(monkeypatch):
    """No endpoint: no SDK provider, the no-op tracer, no spans recorded; a context handed in
    (a record's trace) still passes through, so a process without export does not cut a trace."""
    for v in tracing.ENDPOINT_VARS:
        monkeypatch.delenv(v, raising=False)
    assert not tracing.setup("gigafactory-test") and not tracing.enabled()
    with tracing.span("claim", job="j1") as s:
        assert not s.is_recording()
        assert tracing.trace_id() is None and tracing.inject() is None and tracing.traceparent() == ""
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.span("claim", parent=parent) as s:
        assert not s.is_recording()
        assert tracing.trace_id() == "0af7651916cd43dd8448eb211c80319c"
        assert tracing.inject({"Nats-Msg-Id": "x"}) == {"Nats-Msg-Id": "x", "traceparent": parent}
    # The SDK is not even imported by a process that does not export.
    r = subprocess.run([sys.executable, "-c", "import sys, gigafactory.tracing as t; t.setup('x'); "
                        "print('opentelemetry.sdk' in sys.modules)"], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in fast_env().items() if k not in tracing.ENDPOINT_VARS})
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("bad", ["", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "00-" + "a" * 4000])
def test_a_bad_trace_context_is_ignored_not_an_error(bad):
    assert tracing.extract(bad) is None
    assert tracing.extract({"traceparent": bad}) is None
    with tracing.span("claim", parent=bad) as s:
        assert not s.get_span_context().is_valid or tracing.trace_id() != "0" * 32
