"""The load suite's harness: one run starts its own broker, coordinator, fleet and baseline,
drives the workloads through the API, measures, and stops everything it started.

A run (:func:`gigafactory.loadtest.runner.run_load`), in order:

1. an embedded ``nats-server`` with its monitoring port (``/varz``) on loopback;
2. the baseline (:mod:`gigafactory.loadtest.baseline`) as a process of its own with as many
   workers as the fleet has stations: its saturated phase, then it stops (so its idle pulls
   do not count in the idle fleet's traffic); then the at-least-once workers
   (:mod:`gigafactory.loadtest.atleastonce`, one per factory) likewise;
3. with authentication on and the ``noop`` workload, the saturated noop phase on a second
   broker without authentication, with its own coordinator and fleet and no identities, all
   stopped before step 4 (:func:`gigafactory.loadtest.workloads.no_auth_saturated`);
4. ``python -m gigafactory coordinator`` and fleet hosts (:mod:`gigafactory.loadtest.fleet`,
   N real factories in a few processes, with ``engine:noop``; a bulk pool, a pool of a fifth
   of the fleet with ``gpu``, and one factory with the rare ``hsm``), each factory connecting
   as its own ``factory`` identity;
5. the workloads (:mod:`gigafactory.loadtest.workloads`), each submitting through the API;
6. the baseline again for its paced phase, at the rate our paced phase ran;
7. the idle fleet over ``idle_s``: CPU of the fleet and the coordinator, broker messages/s;
8. the restart: a single ``gigafactory factory`` process for memory, ``restart_jobs``
   shipped records written straight into ``gf_jobs``, the coordinator restarted and timed
   until it dispatches again.

Every job's timeline comes from the broker, not from the harness's clock: the KV history
of ``gf_jobs`` (and of the baseline's bucket) carries the server's timestamp of each
revision, so "submitted", "claimed" and "shipped" are when those writes were stored, and
ours and the baseline's are measured the same way. The at-least-once tasks have no record:
their submission is the broker's timestamp of the message, their start and end the workers'
clock (the same host's). CPU and memory come from :mod:`gigafactory.osproc` (psutil).

Processes: every one runs in a session of its own with ``GF_LOADTEST_RUN=<run id>`` in its
environment; :meth:`LoadRun.close` stops them (SIGTERM, then SIGKILL) and kills anything
left that carries the marker, whatever ended the run.
"""

from __future__ import annotations

import asyncio
import copy
import contextlib
import logging
import os
import re
import secrets
import signal
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson
from nats.js import api

from gigafactory import osproc
from gigafactory.broker import Broker
from gigafactory.testing.procs import LabProc, wait_for
from gigafactory.client import ApiError, Client
from gigafactory.config import Settings, env_text
from gigafactory.metrics import FACTORY_STATS
from gigafactory.testing import lab_identities
from gigafactory.embedded import EmbeddedServer
from gigafactory.schemas import names
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas.records import FactoryRecord, JobRecord, PoolRecord, decode, encode

from . import atleastonce as alo
from . import baseline as bl
from .fleet import read_stats

log = logging.getLogger(__name__)

RUN_ENV = "GF_LOADTEST_RUN"
HOST = "127.0.0.1"
DONE_STAGES = frozenset({"shipped", "testing", "review", "failed", "dead_letter"})
"""Where a job of the load suite comes to rest (every workload ships with review-policy auto)."""
READY_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 15.0
"""Bound on a fleet host answering SIGUSR1 with fresh figures, or a scrape of its /metrics (its
loop may be busy)."""
FLEET_COUNTERS = {name[:-len("_total")]: key for name, key in FACTORY_STATS.items()}
"""Factory counters a phase reports: /metrics family name -> the phase's key (claims, claim_conflicts, ...)."""
INVARIANTS_TIMEOUT_S = 300.0
"""Bound on the invariant checker reading and judging a run's records."""
FILL_IN_FLIGHT = 64
"""Publishes in flight while filling ``gf_jobs`` for the restart measurement."""


# -- configuration ----------------------------------------------------------------------------


@dataclass
class LoadConfig:
    """What one run does. ``jobs`` is per workload phase; ``idle_s`` the idle window;
    ``restart_jobs`` the records in ``gf_jobs`` for the restart (0 skips it);
    ``pace_fraction`` the paced rate as a share of the slower saturated throughput (ours or
    the baseline's), so the paced phase runs below saturation for both; ``busy_job_s`` how
    long each job of the utilisation phase holds its station."""

    factories: int = 100
    stations: int = 2
    jobs: int = 1000
    workloads: tuple[str, ...] = ("noop",)
    idle_s: float = 60.0
    restart_jobs: int = 100_000
    pace_fraction: float = 0.4
    busy_job_s: float = 1.0
    fleet_hosts: int = 2
    batch: int = 100
    workdir: Path = Path("loadtest-run")
    settings: Settings = field(default_factory=Settings)
    auth: bool = True
    """Run the broker with authentication on (the default, as every deployment runs): nkey
    identities, per-role subject permissions, the coordinator as ``coordinator``, each factory
    as its own ``factory`` identity. False (``--no-auth``) runs everything without them."""
    compare_no_auth: bool = True
    """With ``auth`` and the ``noop`` workload: run the saturated noop phase a second time on a
    broker without authentication (its own coordinator and fleet, no identities, no signed
    writes), so one run reports what security costs per job (``--no-compare-security`` skips it)."""

    def validate(self) -> None:
        """Refuse settings no run could honour, naming the option."""
        bad = []
        if self.factories < 1:
            bad.append("--factories must be at least 1")
        if self.stations < 1:
            bad.append("--stations must be at least 1")
        if self.jobs < 1:
            bad.append("--jobs must be at least 1")
        if self.idle_s < 0:
            bad.append("--idle-s must not be negative")
        if self.restart_jobs < 0:
            bad.append("--restart-jobs must not be negative")
        if not 0 < self.pace_fraction < 1:
            bad.append("--pace-fraction must be between 0 and 1 (a share of the saturated throughput)")
        if self.busy_job_s <= 0:
            bad.append("--busy-job-s must be positive")
        if not 1 <= self.batch <= 1000:
            bad.append("--batch must be between 1 and 1000 (the API's batch limit)")
        if self.fleet_hosts < 1:
            bad.append("--fleet-hosts must be at least 1")
        if bad:
            raise ValueError("; ".join(bad))

    @property
    def total_stations(self) -> int:
        return self.factories * self.stations

    def to_dict(self) -> dict:
        return {"factories": self.factories, "stations": self.stations, "jobs": self.jobs,
                "workloads": list(self.workloads), "idle_s": self.idle_s, "restart_jobs": self.restart_jobs,
                "pace_fraction": self.pace_fraction, "busy_job_s": self.busy_job_s,
                "fleet_hosts": self.fleet_hosts, "batch": self.batch, "auth": self.auth,
                "compare_no_auth": self.compare_no_auth,
                "settings": {f.name: getattr(self.settings, f.name) for f in msgspec.structs.fields(Settings)}}


@dataclass(frozen=True)
class HostSpec:
    """One fleet host process: ``count`` factories ``<prefix><index>`` offering ``caps``."""

    name: str
    prefix: str
    count: int
    caps: tuple[str, ...]


BASE_CAPS = ("engine:noop", "tier:common")
GPU_CAP = "gpu"
RARE_CAP = "hsm"


def fleet_layout(factories: int, hosts: int) -> list[HostSpec]:
    """The fleet: a bulk pool split over ``hosts`` processes, a fifth of the fleet also
    offering ``gpu``, and exactly one factory also offering the rare ``hsm`` (fleets of
    fewer than three factories are all bulk)."""
    out: list[HostSpec] = []
    rare = 1 if factories >= 3 else 0
    gpu = max(1, factories // 5) if factories >= 3 else 0
    bulk = factories - rare - gpu
    k = max(1, min(hosts, bulk))
    for i in range(k):
        n = bulk // k + (1 if i < bulk % k else 0)
        out.append(HostSpec(f"bulk{i}", f"lt-b{i}-", n, BASE_CAPS))
    if gpu:
        out.append(HostSpec("gpu", "lt-gpu-", gpu, BASE_CAPS + (GPU_CAP,)))
    if rare:
        out.append(HostSpec("rare", "lt-rare-", rare, BASE_CAPS + (GPU_CAP, RARE_CAP)))
    return out


def factory_ids(layout: list[HostSpec]) -> list[str]:
    """Every factory id of the fleet, as the fleet hosts name them (``<prefix><index:04d>``)."""
    return [f"{h.prefix}{i:04d}" for h in layout for i in range(h.count)]


SINGLE_FACTORY = "lt-single"
"""The id (and identity) of the lone ``gigafactory factory`` process of the restart phase."""


def enroll_factories(store, ids: list[str]) -> None:
    """Give every factory of the run its own ``factory`` identity in ``store`` (idempotent), as
    ``gigafactory creds create factory <id>`` does for a real machine: the figures then include
    the broker's permission checks and each factory's own signatures, as a real fleet pays them."""
    for fid in ids:
        if store.get(fid) is None:
            store.create("factory", fid)


# -- processes -----------------------------------------------------------------------------------


def proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid``, None if it is gone (or no pid).

    :param pid: the process id.
    """
    return osproc.cpu_seconds(pid) if pid else None


def proc_rss_bytes(pid: int | None) -> int | None:
    """Resident memory of process ``pid`` in bytes, None if it is gone (or no pid).

    :param pid: the process id.
    """
    return osproc.rss_bytes(pid) if pid else None


# -- timelines ------------------------------------------------------------------------------------


class _Stage(msgspec.Struct):
    """Only the stage of a record (ours and the baseline's): decoding skips the rest."""

    stage: str


@dataclass
class Timeline:
    """Broker timestamps of one job's transitions (None when not reached)."""

    submitted: float
    queued: float | None = None
    claimed: float | None = None
    done: float | None = None
    stage: str = ""
    revisions: int = 0
    dispatched: float | None = None
    """Ours only: the broker timestamp of the coordinator's first ``dispatched`` event."""


def timelines_from(history: dict[str, list[tuple[float, str]]]) -> dict[str, Timeline]:
    """Turn each key's (timestamp, stage) revisions, oldest first, into a :class:`Timeline`.
    A key whose first stored revision is neither ``queued`` nor ``blocked`` lost its first
    revisions to the bucket's history limit and is left out (the caller counts them)."""
    out: dict[str, Timeline] = {}
    for key, revs in history.items():
        if not revs or revs[0][1] not in ("queued", "blocked"):
            continue
        t = Timeline(submitted=revs[0][0], revisions=len(revs))
        for ts, stage in revs:
            if stage == "queued" and t.queued is None:
                t.queued = ts
            elif stage in ("assigned", "building") and t.claimed is None:  # a claim may start the run
                t.claimed = ts
            if stage in DONE_STAGES and t.done is None:
                t.done = ts
            t.stage = stage
        out[key] = t
    return out


async def read_history(js, stream: str, subject: str) -> dict[str, list[tuple[float, str]]]:
    """Every stored revision of a KV bucket's keys (the bucket's stream, ``subject`` filter),
    as (broker timestamp, stage) per key, oldest first."""
    prefix = subject.rstrip(">")
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    psub = await js.pull_subscribe(subject, stream=stream, config=api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL, inactive_threshold=60.0,
        mem_storage=True, num_replicas=1))
    try:
        info = await psub.consumer_info()
        want, got = info.num_pending, 0
        while got < want:
            msgs = await asyncio.wait_for(psub.fetch(min(1000, want - got), timeout=10), 30)
            for m in msgs:
                got += 1
                if m.headers and m.headers.get("KV-Operation") in ("DEL", "PURGE"):
                    continue
                try:
                    stage = msgspec.json.decode(m.data, type=_Stage).stage
                except msgspec.DecodeError:
                    continue
                out[m.subject[len(prefix):]].append((m.metadata.timestamp.timestamp(), stage))
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return out


async def read_first_events(js, kind: str) -> dict[str, float]:
    """Broker timestamp of the first ``GF_EVENTS`` event of ``kind`` per job."""
    out: dict[str, float] = {}
    subject = f"{names.EVENTS_PREFIX}.*.{kind}"
    psub = await js.pull_subscribe(subject, stream=names.EVENTS_STREAM, config=api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL, inactive_threshold=60.0,
        mem_storage=True, num_replicas=1))
    try:
        info = await psub.consumer_info()
        want, got = info.num_pending, 0
        while got < want:
            msgs = await asyncio.wait_for(psub.fetch(min(1000, want - got), timeout=10), 30)
            for m in msgs:
                got += 1
                job = m.subject.split(".")[2]
                out.setdefault(job, m.metadata.timestamp.timestamp())
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return out


# -- phases ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One measured stretch of a run: the jobs it submitted and what it cost."""

    name: str
    side: str
    """``ours`` or ``baseline``."""
    ids: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds spent during the phase: ``coordinator``, ``factories``, ``broker``, ``baseline``."""
    counters: dict[str, int] = field(default_factory=dict)
    """Claim counters during the phase (fleet hosts' or the baseline's)."""
    missing: list[str] = field(default_factory=list)
    """Jobs that did not come to rest within the bound."""
    extra: dict[str, Any] = field(default_factory=dict)


# -- the run ----------------------------------------------------------------------------------------


class LoadRun:
    """Everything one run starts. Use as ``async with LoadRun(config) as run:``."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.id = secrets.token_hex(4)
        self.dir = Path(cfg.workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.repo = self.dir / "repo"
        self.repo.mkdir(exist_ok=True)
        self.settings = cfg.settings
        if not cfg.auth and self.settings.creds:
            # Without authentication nothing of the run may carry an identity: a factory with
            # one would sign its writes, and the figures would still include the signatures.
            self.settings = copy.copy(self.settings)
            self.settings.creds = None
        # With auth (the default) the run's processes share its home's identity store: anything
        # started without credentials acts as the run's admin; the coordinator is `coordinator`.
        self.identities = lab_identities(self.dir / "home") if cfg.auth else None
        self.layout = fleet_layout(cfg.factories, cfg.fleet_hosts)
        if self.identities is not None:
            self.settings = copy.copy(self.settings)
            self.settings.creds = str(self.identities.creds_path("admin"))
            enroll_factories(self.identities, [*factory_ids(self.layout), SINGLE_FACTORY])
        self.server = EmbeddedServer(store_dir=str(self.dir / "nats-store"), host=HOST, http_port=0,
                                     sync_interval=self.settings.sync_interval,
                                     log_file=str(self.dir / "nats-server.log"),
                                     users=self.identities.users() if self.identities is not None else None)
        self.coordinator: LabProc | None = None
        self.hosts: dict[str, LabProc] = {}
        self.metrics_urls: dict[str, str] = {}
        """Fleet host name -> its /metrics URL (printed by the host at start)."""
        self.baseline: LabProc | None = None
        self.atleastonce: LabProc | None = None
        self.single: LabProc | None = None
        self.admin: Broker | None = None
        self.client: Client | None = None
        self.stages: dict[str, str] = {}
        """Latest stage of every job (ours and the baseline's), from core subscriptions on the
        buckets' subjects: how the harness waits, without polling the API."""
        self._changed = asyncio.Event()
        self._subs: list = []
        self.baseline_kv = None
        self.phases: list[Phase] = []
        self.notes: list[str] = []

    # -- setup and teardown ---------------------------------------------------------------------

    async def __aenter__(self) -> "LoadRun":
        try:
            await asyncio.to_thread(self.server.start)
            self.admin = await Broker.open(self.url, "loadtest-admin", self.settings)
            self.client = Client(self.admin.nc, timeout_s=60.0)
            for subject in (f"$KV.{names.JOBS_BUCKET}.>", f"$KV.{bl.BUCKET}.>"):
                self._subs.append(await self.admin.nc.subscribe(subject, cb=self._on_record))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self.server.url

    def env(self, identity: str = "admin") -> dict[str, str]:
        """The environment of a process of the run, connecting as ``identity`` (with auth): a
        name in the run's identity store (``admin``, ``coordinator``, a factory id)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIGAFACTORY_")}
        for f in msgspec.structs.fields(Settings):
            v = getattr(self.settings, f.name)
            if v is not None:
                env[f"GIGAFACTORY_{f.name.upper()}"] = env_text(v)
        env["GIGAFACTORY_NATS_URL"] = self.url
        env["GIGAFACTORY_HOME"] = str(self.dir / "home")
        env["PYTHONUNBUFFERED"] = "1"
        env[RUN_ENV] = self.id
        if self.identities is not None:
            env["GIGAFACTORY_CREDS"] = str(self.identities.creds_path(identity))
        return env

    async def close(self) -> None:
        procs = [self.single, self.baseline, self.atleastonce, *self.hosts.values(), self.coordinator]
        await asyncio.gather(*(p.terminate(timeout_s=20.0) for p in procs if p is not None),
                             return_exceptions=True)
        if self.admin is not None:
            for s in self._subs:
                with contextlib.suppress(Exception):
                    await s.unsubscribe()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.admin.close(), 10)
        self.admin = self.client = None
        await asyncio.to_thread(self.server.stop)
        for pid in osproc.pids_with_env(RUN_ENV, self.id):
            osproc.kill(pid, osproc.SIGKILL)

    async def _on_record(self, msg) -> None:
        key = msg.subject.split(".", 2)[2]
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return
        try:
            self.stages[key] = msgspec.json.decode(msg.data, type=_Stage).stage
        except msgspec.DecodeError:
            return
        self._changed.set()

    async def wait_done(self, ids: list[str], timeout_s: float) -> list[str]:
        """Wait (bounded) until every job in ``ids`` is at rest; returns those that are not."""
        deadline = time.monotonic() + timeout_s
        pending = [j for j in ids if self.stages.get(j) not in DONE_STAGES]
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            pending = [j for j in pending if self.stages.get(j) not in DONE_STAGES]
            if not pending:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
        return [j for j in ids if self.stages.get(j) not in DONE_STAGES]

    async def wait_until(self, pred, timeout_s: float, what: str, proc: LabProc | None = None,
                         interval_s: float = 0.05):
        return await wait_for(pred, timeout_s, what=what, proc=proc, interval_s=interval_s)

    # -- processes ----------------------------------------------------------------------------

    async def start_coordinator(self) -> float:
        """Start (or restart) the coordinator; returns seconds until its API answered."""
        if self.coordinator is None:
            self.coordinator = LabProc("coordinator", [sys.executable, "-m", "gigafactory", "coordinator",
                                                       "--nats", self.url, "--log-level", "info"],
                                       self.dir / "coordinator.log", self.env(identity="coordinator"))
        t0 = time.monotonic()
        self.coordinator.start()
        await self.wait_until(self.api_answers, READY_TIMEOUT_S, "the coordinator's API answers",
                              proc=self.coordinator, interval_s=0.01)
        return time.monotonic() - t0

    async def api_answers(self) -> bool:
        assert self.client is not None
        try:
            await self.client.call("status", {"job": "lt-ping"}, timeout_s=1.0)
            return True
        except ApiError as e:
            return e.code == 404  # answered: there is no such job
        except Exception:
            return False

    def coordinator_ready_count(self) -> int:
        """How many times the coordinator logged ``ready`` (once per start)."""
        assert self.coordinator is not None
        try:
            return len(re.findall(r" ready: \d+ jobs", self.coordinator.log.read_text(errors="replace")))
        except OSError:
            return 0

    async def start_fleet(self) -> None:
        for spec in self.layout:
            args = [sys.executable, "-m", "gigafactory.loadtest.fleet", "--nats", self.url, "--count",
                    str(spec.count), "--prefix", spec.prefix, "--stations", str(self.cfg.stations),
                    "--data-dir", str(self.dir / "factories"), "--workspace", str(self.dir / "work"),
                    "--metrics-port", "0"]
            if self.identities is not None:
                args += ["--creds-dir", str(self.identities.root)]  # each factory as itself
            for c in spec.caps:
                args += ["--cap", c]
            proc = LabProc(f"fleet host {spec.name}", args, self.dir / f"fleet-{spec.name}.log", self.env())
            self.hosts[spec.name] = proc
            proc.start()
        bound = READY_TIMEOUT_S + 0.2 * self.cfg.factories
        for spec in self.layout:
            proc = self.hosts[spec.name]
            await self.wait_until(lambda p=proc: "fleet ready:" in p.tail(2000), bound,
                                  f"{proc.name} ready", proc=proc, interval_s=0.1)
            m = re.search(r"metrics on (http://\S+)/metrics", proc.tail(100_000))
            if m is None:
                raise RuntimeError(f"{proc.name} did not print its metrics address; see {proc.log}")
            self.metrics_urls[spec.name] = m.group(1) + "/metrics"

        async def all_live() -> bool:
            assert self.client is not None
            fs = (await self.client.call("factories", {}))["factories"]
            return sum(1 for f in fs if f["live"] and f["id"].startswith("lt-")) >= self.cfg.factories

        await self.wait_until(all_live, bound, f"the coordinator counts {self.cfg.factories} factories live",
                              interval_s=0.5)

    async def fleet_counters(self) -> dict[str, int]:
        """The factories' counters summed over every fleet host, scraped from their /metrics
        (the registry operators scrape; see FLEET_COUNTERS for the names)."""
        from prometheus_client.parser import text_string_to_metric_families

        def get(url: str) -> str:
            with urllib.request.urlopen(url, timeout=STATS_TIMEOUT_S) as r:
                return r.read().decode()

        total: dict[str, int] = defaultdict(int)
        for url in self.metrics_urls.values():
            for fam in text_string_to_metric_families(await asyncio.to_thread(get, url)):
                key = FLEET_COUNTERS.get(fam.name)
                if key is not None:
                    total[key] += int(sum(smp.value for smp in fam.samples if smp.name == fam.name + "_total"))
        return dict(total)

    async def baseline_stats(self) -> dict:
        assert self.baseline is not None
        sent = time.time()
        self.baseline.signal(signal.SIGUSR1)
        path = self.dir / "baseline.json"
        return await self.wait_until(lambda: (s := read_stats(path)) and s.get("at", 0) >= sent and s,
                                     STATS_TIMEOUT_S, "fresh figures from the baseline")

    async def start_baseline(self) -> None:
        assert self.admin is not None
        await bl.ensure_layout(self.admin.js, workers=self.cfg.total_stations, replicas=self.settings.replicas)
        self.baseline_kv = await self.admin.js.key_value(bl.BUCKET)
        self.baseline = LabProc("baseline", [
            sys.executable, "-m", "gigafactory.loadtest.baseline", "--nats", self.url,
            "--connections", str(self.cfg.factories), "--workers", str(self.cfg.stations),
            "--long-poll-s", str(self.settings.long_poll_s), "--stats-file", str(self.dir / "baseline.json"),
        ], self.dir / "baseline.log", self.env())
        before = self._log_count(self.dir / "baseline.log", "baseline ready:")
        self.baseline.start()
        await self.wait_until(lambda: self._log_count(self.dir / "baseline.log", "baseline ready:") > before,
                              READY_TIMEOUT_S + 0.05 * self.cfg.factories, "the baseline ready", proc=self.baseline)

    @staticmethod
    def _log_count(path: Path, text: str) -> int:
        """How often ``text`` is in a log appended across starts (a restart's line is new)."""
        try:
            return path.read_text(errors="replace").count(text)
        except OSError:
            return 0

    async def stop_baseline(self) -> None:
        if self.baseline is not None:
            await self.baseline.terminate(timeout_s=20.0)

    # -- the at-least-once baseline ------------------------------------------------------------------

    async def start_atleastonce(self) -> None:
        """Start the taskiq-style workers (:mod:`atleastonce`), one per factory of the fleet."""
        assert self.admin is not None
        await alo.ensure_layout(self.admin.js, workers=self.cfg.factories, replicas=self.settings.replicas)
        log_path = self.dir / "atleastonce.log"
        self.atleastonce = LabProc("at-least-once workers", [
            sys.executable, "-m", "gigafactory.loadtest.atleastonce", "--nats", self.url,
            "--connections", str(self.cfg.factories), "--stats-file", str(self.dir / "atleastonce.json"),
        ], log_path, self.env())
        before = self._log_count(log_path, "at-least-once ready:")
        self.atleastonce.start()
        await self.wait_until(lambda: self._log_count(log_path, "at-least-once ready:") > before,
                              READY_TIMEOUT_S + 0.05 * self.cfg.factories, "the at-least-once workers ready",
                              proc=self.atleastonce)

    async def stop_atleastonce(self) -> None:
        if self.atleastonce is not None:
            await self.atleastonce.terminate(timeout_s=20.0)

    async def atleastonce_stats(self) -> dict:
        """The workers' figures, fresh (asked with SIGUSR1, bounded)."""
        assert self.atleastonce is not None
        sent = time.time()
        self.atleastonce.signal(signal.SIGUSR1)
        path = self.dir / "atleastonce.json"
        return await self.wait_until(lambda: (s := read_stats(path)) and s.get("at", 0) >= sent and s,
                                     STATS_TIMEOUT_S, "fresh figures from the at-least-once workers")

    async def atleastonce_submit(self, ids: list[str]) -> None:
        """The at-least-once submitter: one publish per task, each acked by the stream, a
        bounded number in flight (:data:`atleastonce.SUBMIT_IN_FLIGHT`)."""
        await alo.submit(self.admin_().js, ids)

    async def atleastonce_wait(self, timeout_s: float) -> bool:
        """Wait (bounded) until the workers have acked every task; False if they did not."""
        js = self.admin_().js
        try:
            await self.wait_until(lambda: alo.drained(js), timeout_s, "the at-least-once tasks acked",
                                  proc=self.atleastonce, interval_s=0.02)
        except TimeoutError:
            return False
        return True

    def pause_fleet(self) -> None:
        """SIGSTOP every fleet host: no claims, so a backlog forms by construction."""
        for p in self.hosts.values():
            p.pause()

    def resume_fleet(self) -> None:
        for p in self.hosts.values():
            p.resume()

    # -- submitting ------------------------------------------------------------------------------

    def job(self, *, priority: str = "medium", product: str = "default", caps: tuple[str, ...] = (),
            key: str | None = None, deps: list[str] | None = None, engine: str = "noop",
            script: str = "noop") -> str:
        """A job file of the load suite: ``review-policy: auto`` so it ships, the noop engine
        unless told otherwise."""
        front: dict[str, Any] = {"engine": engine, "cwd": str(self.repo), "review-policy": "auto",
                                 "priority": priority, "product": product}
        if caps:
            front["capabilities"] = list(caps)
        if key:
            front["idempotency-key"] = key
        if deps:
            front["deps"] = deps
        body = "\n".join(f"{k}: {orjson.dumps(v).decode()}" for k, v in front.items())
        return f"---\n{body}\n---\n{script}\n"

    async def submit(self, texts: list[str], batch: int | None = None) -> list[str]:
        """Submit as fast as the API takes them, in batches; returns the job ids in order."""
        assert self.client is not None
        n = batch or self.cfg.batch
        ids: list[str] = []
        for i in range(0, len(texts), n):
            files = [{"path": f"lt-{i + k}.md", "text": t} for k, t in enumerate(texts[i:i + n])]
            resp = await self.client.call("submit", {"files": files, "source": "loadtest"}, timeout_s=120.0)
            ids += [j["job"] for j in resp["jobs"]]
        return ids

    async def submit_paced(self, texts: list[str], rate_per_s: float) -> list[str]:
        """Open-loop: job ``i`` is submitted (alone) at ``i / rate_per_s`` from the start,
        whether or not earlier submissions have been answered."""
        t0 = time.monotonic()
        tasks = []
        for i, t in enumerate(texts):
            delay = t0 + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the pacing schedule itself
            tasks.append(asyncio.create_task(self.submit([t], batch=1)))
        return [j for ids in await asyncio.gather(*tasks) for j in ids]

    async def baseline_submit(self, keys: list[str], rate_per_s: float | None = None) -> None:
        """The baseline's submitter: each job's record, then its pointer; paced like ours."""
        assert self.admin is not None and self.baseline_kv is not None
        js, kv = self.admin.js, self.baseline_kv
        if rate_per_s is None:
            for k in keys:
                await bl.submit_one(js, kv, k)
            return
        t0 = time.monotonic()
        tasks = []
        for i, k in enumerate(keys):
            delay = t0 + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(bl.submit_one(js, kv, k)))
        await asyncio.gather(*tasks)

    # -- measuring -------------------------------------------------------------------------------

    def _cpu(self) -> dict[str, float]:
        out = {"broker": proc_cpu_s(self.server.proc.pid if self.server.proc else None) or 0.0}
        if self.coordinator is not None and self.coordinator.alive():
            out["coordinator"] = proc_cpu_s(self.coordinator.pid) or 0.0
        if self.hosts:  # not before the fleet starts: the baselines' phases have no factories
            out["factories"] = sum(proc_cpu_s(p.pid) or 0.0 for p in self.hosts.values() if p.alive())
        if self.baseline is not None and self.baseline.alive():
            out["baseline"] = proc_cpu_s(self.baseline.pid) or 0.0
        if self.atleastonce is not None and self.atleastonce.alive():
            out["atleastonce"] = proc_cpu_s(self.atleastonce.pid) or 0.0
        return out

    async def _counters(self, side: str) -> dict[str, int]:
        if side == "baseline":
            return dict((await self.baseline_stats())["totals"])
        if side == "atleastonce":
            return dict((await self.atleastonce_stats())["totals"])
        return await self.fleet_counters()

    @contextlib.asynccontextmanager
    async def phase(self, name: str, side: str = "ours"):
        """Measure a stretch: CPU and claim counters before and after; the body fills ``ids``."""
        ph = Phase(name, side)
        c0, k0 = self._cpu(), await self._counters(side)
        t0 = time.monotonic()
        yield ph
        ph.wall_s = time.monotonic() - t0
        c1, k1 = self._cpu(), await self._counters(side)
        ph.cpu_s = {k: round(c1[k] - c0.get(k, 0.0), 4) for k in c1}
        ph.counters = {k: v - k0.get(k, 0) for k, v in k1.items()}
        self.phases.append(ph)
        log.info("phase %s (%s): %d jobs in %.1fs", name, side, len(ph.ids), ph.wall_s)

    def done_timeout_s(self, jobs: int) -> float:
        """A generous bound on a phase draining: only a stall reaches it."""
        return 120.0 + jobs * 0.2

    async def varz(self) -> dict:
        def get() -> dict:
            with urllib.request.urlopen(self.server.monitor_url + "/varz", timeout=10) as r:
                return orjson.loads(r.read())

        return await asyncio.to_thread(get)

    # -- the idle fleet ---------------------------------------------------------------------------

    async def measure_idle(self, window_s: float) -> dict:
        """CPU of the fleet and the coordinator, and broker messages, over ``window_s`` of an
        idle fleet (nothing queued, nothing running)."""
        v0, c0, t0 = await self.varz(), self._cpu(), time.monotonic()
        await asyncio.sleep(window_s)  # the measurement window itself
        v1, c1, dt = await self.varz(), self._cpu(), time.monotonic() - t0
        pools = await self.admin_().pools.keys()
        requirements = []
        for key in pools:
            e = await self.admin_().pools.get(key)
            with contextlib.suppress(msgspec.DecodeError):
                requirements.append(decode(e.value, PoolRecord).requirements if e is not None and e.value else None)
        polling = served = 0
        async for e in self.admin_().factories.scan():
            if not e.key.startswith("lt-"):
                continue
            with contextlib.suppress(msgspec.DecodeError):
                rec = decode(e.value, FactoryRecord)
                polling += rec.dispatch_mode == "poll"
                # Each pool a factory serves (its offers meet the pool's requirements, as the
                # factory itself decides) has a long poll of its own.
                offers = caps.Offers(rec.capabilities)
                served += sum(1 for req in requirements if req is not None and not offers.missing(req))
        return {
            "factories_polling": polling,
            "window_s": round(dt, 3),
            "cpu_s": {k: round(c1[k] - c0.get(k, 0.0), 4) for k in c1},
            "in_msgs_per_s": (v1["in_msgs"] - v0["in_msgs"]) / dt,
            "out_msgs_per_s": (v1["out_msgs"] - v0["out_msgs"]) / dt,
            "in_bytes_per_s": (v1["in_bytes"] - v0["in_bytes"]) / dt,
            "connections": v1.get("connections"),
            "pools": len(pools),
            "served": served,
        }

    async def check_invariants(self) -> dict:
        """Judge the run's records (``gf_jobs`` and ``GF_EVENTS``) with the chaos suite's
        invariant checker, run as a process of its own (the load suite does not import the chaos
        suite), with the fleet's keys to judge holder signatures: its report (``ok``,
        ``by_invariant``, the first violations, ``counts``), or ``error`` if it could not judge."""
        out = self.dir / "invariants.json"
        out.unlink(missing_ok=True)
        args = [sys.executable, "-m", "gigafactory.chaos.checkrecords", "--nats", self.url, "--out", str(out)]
        if self.identities is not None:
            args += ["--identities", str(self.identities.root)]
        proc = await asyncio.create_subprocess_exec(*args, env=self.env(), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            text, _ = await asyncio.wait_for(proc.communicate(), INVARIANTS_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return {"error": f"the invariant checker did not finish within {INVARIANTS_TIMEOUT_S:g}s"}
        (self.dir / "invariants.log").write_bytes(text)
        if proc.returncode not in (0, 1) or not out.exists():
            return {"error": f"the invariant checker exited {proc.returncode}: {text.decode(errors='replace')[-1000:]}"}
        rep = orjson.loads(out.read_bytes())
        return {"ok": rep["ok"], "by_invariant": rep["by_invariant"], "violations": rep["violations"][:20],
                "counts": rep["counts"]}

    def admin_(self) -> Broker:
        assert self.admin is not None
        return self.admin

    # -- the restart -------------------------------------------------------------------------------

    async def start_single_factory(self) -> LabProc:
        """One ``gigafactory factory`` process, as an operator runs it, for its memory."""
        fid = SINGLE_FACTORY
        args = [sys.executable, "-m", "gigafactory", "factory", "--nats", self.url, "--id", fid, "--no-probe",
                "--stations", str(self.cfg.stations), "--data-dir", str(self.dir / "single"),
                "--workspace", str(self.dir / "work"), "--log-level", "warning"]
        for c in BASE_CAPS:
            args += ["--cap", c]
        self.single = LabProc("single factory", args, self.dir / "single-factory.log", self.env(identity=fid))
        self.single.start()
        want = len(await self.admin_().pools.keys())

        async def bound() -> bool:
            # Registered, and a heartbeat has named the pools it serves: it is fully up.
            e = await self.admin_().factories.get(fid)
            if e is None:
                return False
            rec = decode(e.value, FactoryRecord)
            return rec.pid == self.single.pid and len(rec.pools) >= min(want, 1)

        await self.wait_until(bound, READY_TIMEOUT_S + 3 * self.settings.heartbeat_s, "the single factory bound",
                              proc=self.single, interval_s=0.1)
        return self.single

    async def fill_jobs(self, count: int, template: JobRecord) -> float:
        """Write ``count`` shipped records into ``gf_jobs`` straight through the broker
        (concurrent publishes in chunks); returns the seconds it took. The chunk is small
        enough to leave the broker answering the live fleet meanwhile: a fill that starves
        it makes factories time out and fall back to polling, which measures something else."""
        js = self.admin_().js
        t0 = time.monotonic()
        chunk = FILL_IN_FLIGHT
        for start in range(0, count, chunk):
            futs = []
            for i in range(start, min(count, start + chunk)):
                jid = f"lt-fill-{self.id}-{i:07d}"
                rec = msgspec.structs.replace(template, id=jid)
                futs.append(js.publish(f"$KV.{names.JOBS_BUCKET}.{jid}", encode(rec), timeout=30))
            await asyncio.gather(*futs)
        return time.monotonic() - t0
