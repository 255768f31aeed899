"""The chaos lab: a real broker, a real coordinator and real factories on loopback, and the
registry of scenarios that torment them.

A :class:`Lab` runs one ``nats-server`` (:class:`~gigafactory.embedded.EmbeddedServer`), one
``python -m gigafactory coordinator`` and N ``python -m gigafactory factory`` processes, all
bound to 127.0.0.1, with short timings passed as ``GIGAFACTORY_*`` variables. It can SIGKILL,
SIGTERM, pause (SIGSTOP) and restart any of them, kill -9 and restart the broker on the same
store and the same port (so clients reconnect to where they were), submit jobs through the
API (a submission counts as *acknowledged* once the API replied), wait, boundedly, for the
fleet to settle, and judge the broker's records with the one invariant checker
(:func:`gigafactory.chaos.invariants.check`).

Rules every scenario keeps, and the lab enforces where it can:

- Real processes and a real ``nats-server``; nothing is mocked.
- Every wait is bounded and fails with what it last saw; waiting is for an observable
  outcome (a record, an event, a file), never a bare sleep. Sleeping is only ever the chaos
  *schedule* itself ("kill a factory every 2 s"), which is the workload, not synchronization.
- Every chaos decision is drawn from ``random.Random`` streams seeded by the run's seed
  (:meth:`Lab.random`), so a run's schedule is reproducible (which factory is hit still
  depends on what the fleet is doing at that moment).
- Every job a scenario submits appends ``<job> <epoch> <phase> <time>`` lines (``start``,
  ``progress`` while it works, ``END``) to the lab's side-effect ledger (:attr:`Lab.ledger`,
  see :func:`ledger_prelude`), and :meth:`Lab.check` judges them against the broker's
  records: no side effect of an epoch after that epoch lost its lease, the lab's own pauses
  being the one allowance, counted apart.
- An engine that outlives its factory is a finding, not a mess to hide: every factory runs
  with ``GF_CHAOS_LAB=<lab id>`` in its environment, which its engines inherit, and
  :meth:`Lab.check` counts the marked processes whose factory is dead (each a
  ``no_leftover_engine`` violation) before anything is cleaned up. Only then does
  :meth:`Lab.close` kill whatever carries the marker, so nothing is left on the machine.

A scenario is an ``async def`` registered with :func:`scenario`; it takes a
:class:`ScenarioConfig` and returns a :class:`ScenarioResult`.
:func:`gigafactory.chaos.runner.run_scenario` runs one by name under an overall time limit
(``gigafactory chaos run NAME``); the scenarios import this module, never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import shlex
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gigafactory import osproc
from gigafactory.broker import Broker
from gigafactory.client import ApiError, Client
from gigafactory.config import Settings
from gigafactory.embedded import EmbeddedServer, free_ports
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import LEASED, TERMINAL
from gigafactory.schemas.records import EventRecord, FactoryRecord, JobRecord, decode
from gigafactory.testing import lab_identities
from gigafactory.testing.procs import LabProc, wait_for

from . import invariants
from .proxy import ProxyControl, ProxyControlError

log = logging.getLogger(__name__)

LAB_ENV = "GF_CHAOS_LAB"
"""Set in every factory's environment (and so in every engine's): how cleanup finds them."""

HOST = "127.0.0.1"
"""The lab runs on loopback only."""

LAB_TIMINGS: dict[str, float] = dict(
    heartbeat_s=0.5,
    lease_ttl_s=2.0,
    lease_renew_s=0.5,
    reaper_interval_s=0.25,
    long_poll_s=1.0,
    # A dispatch message taken by a factory that is then SIGKILLed is redelivered only after
    # the consumer's ack wait (30 s); a short redispatch period republishes it sooner.
    redispatch_s=3.0,
    drain_timeout_s=1.0,
    request_timeout_s=2.0,
    reconnect_wait_s=0.2,
    reconnect_jitter_s=0.3,
)
"""Short timings, so a lease expires in seconds and a scenario fits in well under a minute."""

UNFENCED_ENGINES_ENV: dict[str, str] = {"GIGAFACTORY_UNSAFE_UNFENCED_ENGINES": "1"}
"""A factory environment that turns off both guards against zombie engines (the parent-death
kill and self-fencing): the broken-on-purpose variant the side-effect invariant must catch."""

LEDGER_NAME = "ledger.txt"
"""The side-effect ledger's file name in the lab's workdir."""
PROGRESS_EVERY_S = 0.25
"""How often a job of the lab writes a ``progress`` line while it works: often enough that an
engine outliving its lease by a lease TTL leaves several lines after the loss."""

READY_TIMEOUT_S = 30.0
"""Bound on a process becoming ready (a factory registered, the coordinator's API answering)."""


# -- scenarios: configuration, result, registry ---------------------------------------------------


@dataclass(frozen=True)
class ScenarioConfig:
    """How to run one scenario.

    ``seed``: draws every chaos decision. ``duration_s``: how long the full form applies its
    chaos (ignored by the bounded form). ``bounded``: the short form CI runs, well under a
    minute on two cores. ``workdir``: where the broker store, factory data dirs, the
    side-effect ledger and every process's log go (kept after the run). ``factory_env``: see
    below."""

    seed: int = 0
    duration_s: float = 60.0
    bounded: bool = True
    workdir: Path = Path(".")
    factory_env: Mapping[str, str] = field(default_factory=dict)
    """Added to every factory's environment: how a broken-on-purpose variant is run (say
    :data:`UNFENCED_ENGINES_ENV`, engines that neither die with their factory nor are fenced)."""


@dataclass
class ScenarioResult:
    """What a scenario found. ``ok`` is True only if the invariant check passed *and* every
    expectation of the scenario held (``failures`` lists those that did not). ``figures`` are
    measurements (reclaim times, fenced counts, ...); ``notes`` say what happened."""

    name: str
    seed: int
    ok: bool
    report: invariants.Report | None
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    workdir: str = ""

    def to_dict(self) -> dict:
        return {
            "scenario": self.name, "seed": self.seed, "ok": self.ok, "elapsed_s": round(self.elapsed_s, 3),
            "failures": self.failures, "figures": self.figures, "notes": self.notes, "workdir": self.workdir,
            "report": None if self.report is None else msgspec.json.decode(self.report.to_json()),
        }

    def to_text(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        lines = [f"scenario {self.name} (seed {self.seed}): {verdict} in {self.elapsed_s:.1f}s"]
        for f in self.failures:
            lines.append(f"  expectation failed: {f}")
        if self.figures:
            lines.append("figures:")
            width = max(len(k) for k in self.figures)
            for k, v in self.figures.items():
                lines.append(f"  {k:<{width}}  {_fmt_figure(v)}")
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        lines.append(self.report.to_text() if self.report is not None else "invariants: not checked (see failures)")
        if self.workdir:
            lines.append(f"workdir: {self.workdir}")
        return "\n".join(lines)


def _fmt_figure(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_figure(x) for x in v) + "]"
    return str(v)


ScenarioFn = Callable[[ScenarioConfig], Awaitable[ScenarioResult]]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    fn: ScenarioFn


SCENARIOS: dict[str, Scenario] = {}
"""Registered scenarios by name (filled by importing ``gigafactory.chaos.scenarios``; read
them with :func:`gigafactory.chaos.runner.registry`)."""


def scenario(name: str, summary: str) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register ``async def fn(config) -> ScenarioResult`` as scenario ``name``."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        assert name not in SCENARIOS, f"scenario {name!r} registered twice"
        SCENARIOS[name] = Scenario(name, summary, fn)
        return fn

    return register


SIDE_EFFECT_FIGURES = ("ledger_lines", "ledger_epochs", "side_effects_after_lease_lost",
                       "side_effects_overlapping_epochs", "side_effects_in_pause_window", "pause_windows",
                       "leftover_engines", "leftover_processes")
"""Counts of the invariant report copied into every scenario's figures."""


class Expectations:
    """A scenario's own claims beside the invariant check (reclaim time, nothing left in an
    outbox, ...): each :meth:`expect` that fails is kept, with its message, for the result."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok


# -- job files --------------------------------------------------------------------------------------


def job_text(script: str, **manifest: Any) -> str:
    """A job file: YAML front matter (keyword names with ``_`` for ``-``) and the script."""
    front = {"engine": "shell"}
    front.update({k.replace("_", "-"): v for k, v in manifest.items()})
    return "---\n" + yaml.safe_dump(front, sort_keys=False, default_flow_style=False) + "---\n" + script.rstrip() + "\n"


def ledger_prelude(ledger: Path) -> str:
    """Shell that defines ``gf_ledger PHASE``: append ``$GF_JOB_ID $GF_EPOCH PHASE <time>`` to
    the side-effect ledger ``ledger``. The time is the machine's wall clock (bash's
    ``$EPOCHREALTIME``; ``date +%s.%N`` under another sh), the clock the broker stamps with
    too. The file is opened with ``O_APPEND`` (``>>``) and the builtin ``printf`` writes the
    short line in one ``write``, so lines of concurrent jobs never interleave."""
    return (
        f"GF_LEDGER={shlex.quote(str(ledger))}\n"
        "gf_ledger() {\n"
        '  t=$EPOCHREALTIME; [ -n "$t" ] || t=$(date +%s.%N)\n'
        '  printf \'%s %s %s %s\\n\' "$GF_JOB_ID" "$GF_EPOCH" "$1" "$t" >> "$GF_LEDGER"\n'
        "}\n"
    )


def ledger_script(ledger: Path, work_s: float, *, gate: Path | str | None = None, then: str = "",
                  every_s: float = PROGRESS_EVERY_S) -> str:
    """A job script whose side effects go to ``ledger``: ``start``; then, with ``gate``, a
    wait (at most a minute) for that file to exist; then ``work_s`` seconds of work; then
    ``END`` and the shell lines ``then``. It writes a ``progress`` line every ``every_s``
    while it waits and while it works, so that an engine still running after its lease was
    lost shows in the ledger. ``gate`` may name ``$GF_FACTORY`` (expanded by the shell)."""
    out = [ledger_prelude(ledger), "gf_ledger start"]
    if gate is not None:
        polls = max(1, round(every_s / 0.1))  # poll the gate every 0.1 s, write progress every every_s
        out.append(f'i=0; while [ ! -e "{gate}" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); '
                   f'[ $((i % {polls})) -eq 0 ] && gf_ledger progress; done')
    if work_s > 0:
        steps = max(1, math.ceil(work_s / every_s))
        out.append(f"for _ in $(seq 1 {steps}); do sleep {work_s / steps:.3f}; gf_ledger progress; done")
    out.append("gf_ledger END")
    if then:
        out.append(then.rstrip())
    return "\n".join(out) + "\n"


# -- processes --------------------------------------------------------------------------------------




MAX_ANCESTRY = 64
"""Bound on the parent chain walked to find a process's factory."""


def _processes_with_marker(marker: str) -> list[int]:
    """Pids of our processes whose environment carries ``GF_CHAOS_LAB=<marker>``."""
    return osproc.pids_with_env(LAB_ENV, marker)


@dataclass
class LabProxy:
    """A fault-injecting proxy process (``chaos/proxy.py``) between some clients and a broker
    node: clients connect to :attr:`url`, the lab steers it through :attr:`control`."""

    proc: LabProc
    port: int
    control: ProxyControl
    target: str

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    async def send(self, command: str) -> dict:
        """One control command (``blackhole``, ``delay 200 50``, ``drop 0.7 3``, ``reset``,
        ``heal``, ``stats``); the reply carries the mode and the proxy's counters."""
        return await self.control.send(command)


# -- what a chaos action saw ------------------------------------------------------------------------


@dataclass
class Hit:
    """One chaos action against a factory: what it was, when (broker time), and the leases
    the factory held at that moment (read from ``gf_jobs`` after the signal)."""

    action: str
    factory: str
    at_broker: float
    held: list[tuple[str, int]]
    ended_at_broker: float | None = None
    """For a pause: when it was resumed."""


@dataclass
class AuditEntry:
    ts: float
    """The broker's timestamp of the stored event (server time, not the publisher's clock)."""
    event: EventRecord


# -- the lab ----------------------------------------------------------------------------------------


class Lab:
    """A broker, a coordinator and factories as real processes on loopback. Use as
    ``async with Lab(workdir, seed=...) as lab:``; everything is stopped on exit.

    ``timings`` override :data:`LAB_TIMINGS` (every process gets them as ``GIGAFACTORY_*``
    variables, and the lab's own connections use them too). ``sync_interval`` is passed to the
    embedded broker (``always``: fsync before every acknowledgement).

    ``factory_env`` is added to every factory's environment (a broken-on-purpose variant).

    The broker is one :class:`EmbeddedServer`; everything else reaches it through :attr:`url`
    and the ``*_broker`` methods, so a lab on a cluster overrides those (with
    :class:`gigafactory.testing.Cluster` and ``replicas`` in ``timings``), and a factory behind
    a fault-injecting proxy is started with ``start_factory(..., url=proxy_url)``."""

    def __init__(self, workdir: Path, *, seed: int, timings: dict[str, float] | None = None,
                 sync_interval: str | None = None, factory_env: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.id = secrets.token_hex(6)
        self.timings = {**LAB_TIMINGS, **(timings or {})}
        # Authentication on, as every deployment runs: the lab's identity store is its
        # processes' home's (GIGAFACTORY_HOME), so a process started without credentials acts
        # as the lab's admin; the coordinator and each factory connect as their own identity.
        self.identities = lab_identities(self.workdir / "home")
        self.settings = Settings(**self.timings, creds=str(self.identities.creds_path("admin")))
        self.sync_interval = sync_interval
        self.repo = self.workdir / "repo"
        self.repo.mkdir(exist_ok=True)
        (self.repo / "out").mkdir(exist_ok=True)
        self.server = EmbeddedServer(store_dir=str(self.workdir / "nats-store"), host=HOST,
                                     sync_interval=sync_interval, log_file=str(self.workdir / "nats-server.log"),
                                     users=self.identities.users())
        self.coordinator: LabProc | None = None
        self.factories: dict[str, LabProc] = {}
        self.factory_data: dict[str, Path] = {}
        self.admin: Broker | None = None
        self.client: Client | None = None
        self.acknowledged: set[str] = set()
        """Job ids whose submission the API acknowledged."""
        self.unacknowledged_submits = 0
        """Submissions that got no reply (the broker or the coordinator was down)."""
        self.hits: list[Hit] = []
        self.broker_restarts = 0
        self.proxies: list[LabProxy] = []
        self.factory_env: dict[str, str] = dict(factory_env or {})
        """Added to every factory's environment (see :attr:`ScenarioConfig.factory_env`)."""
        self.hosts: list[LabProc] = []
        """Processes a scenario started that run factories in-process (fleet hosts), marked
        like factories: what they start is theirs while they live (see :meth:`leftover_engines`)."""
        self.ledger = self.workdir / LEDGER_NAME
        """The side-effect ledger every job of the lab appends to (see :func:`ledger_script`)."""
        self.ledger.touch()
        self.factory_starts: dict[str, list[float]] = {}
        """Wall-clock time of every start of each factory (its incarnations)."""
        self.leftovers: list[invariants.LeftoverProcess] = []
        """Processes that outlived their factory, as the latest :meth:`check` found them."""
        self.leftovers_killed = 0
        """Marked processes :meth:`close` had to kill (counted in :meth:`check` first, if it ran)."""

    # -- setup and teardown -------------------------------------------------------------------

    async def __aenter__(self) -> "Lab":
        try:
            await self.start_broker()
            self.admin = await Broker.open(self.url, "chaos-lab-admin", self.settings)
            nc = await self._connect_client()
            self.client = Client(nc, timeout_s=10.0)
            await self.start_coordinator()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _connect_client(self):
        from gigafactory.broker import connect

        # The lab's API client reconnects forever, like every other client: a broker restart
        # must not end the scenario's submissions.
        return await connect(self.url, "chaos-lab-client", self.settings)

    @property
    def url(self) -> str:
        return self.server.url

    def random(self, concern: str) -> random.Random:
        """The seeded stream of chaos decisions for one concern ("load", "chaos", ...). One
        stream per concern, so the draws of one (say the load, running concurrently) never
        shift another's: the schedule of a seed stays the same from run to run."""
        return random.Random(f"{self.seed}:{concern}")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIGAFACTORY_")}
        for k, v in self.timings.items():
            env[f"GIGAFACTORY_{k.upper()}"] = str(v)
        env["GIGAFACTORY_NATS_URL"] = self.url
        env["GIGAFACTORY_HOME"] = str(self.workdir / "home")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    async def close(self) -> None:
        """Stop everything the lab started: factories (drain, then SIGKILL), the coordinator,
        the lab's connections, the broker, and any engine left behind."""
        for fid, proc in list(self.factories.items()):
            try:
                await proc.terminate(timeout_s=5.0)
            except Exception as e:
                log.warning("stopping factory %s: %s", fid, e)
        for proxy in self.proxies:
            await proxy.proc.kill()
        if self.coordinator is not None:
            try:
                await self.coordinator.terminate(timeout_s=5.0)
            except Exception as e:
                log.warning("stopping the coordinator: %s", e)
        for conn in (self.client, self.admin):
            if conn is None:
                continue
            try:
                await asyncio.wait_for(conn.close(), timeout=5.0)
            except Exception:
                pass
        self.client = self.admin = None
        await self.stop_broker()
        # Cleanup, not a verdict: check() counted (and reported) what outlived its factory
        # before this; every factory is stopped now, so whatever still carries the marker goes.
        self.leftovers_killed = self.kill_leftovers()
        if self.leftovers_killed:
            log.warning("lab %s: killed %d process group(s) left running after their factory stopped",
                        self.id, self.leftovers_killed)

    def kill_leftovers(self) -> int:
        """SIGKILL every process group that carries this lab's marker: engines whose factory
        was SIGKILLed (they run in process groups of their own) and anything they started."""
        n = 0
        for pid in _processes_with_marker(self.id):
            pgid = osproc.process_group(pid)
            if pgid is None:
                continue
            if pgid == osproc.process_group(0):
                osproc.kill(pid, osproc.SIGKILL)  # never our own group: kill only that process
            else:
                osproc.signal_group(pgid, osproc.SIGKILL)
            n += 1
        return n

    # -- the broker ---------------------------------------------------------------------------

    async def start_broker(self) -> None:
        """Start (or restart, on the same store and the same port) the nats-server."""
        await asyncio.to_thread(self.server.start)

    async def kill_broker(self) -> None:
        """``kill -9`` the nats-server; its store stays for :meth:`start_broker`."""
        await asyncio.to_thread(self.server.kill)
        self.server.stop()  # removes its config file; the process is already gone

    async def stop_broker(self) -> None:
        """Stop the nats-server cleanly (SIGTERM)."""
        await asyncio.to_thread(self.server.stop)

    async def restart_broker(self) -> float:
        """Start the broker again on the same port and store; returns how long until the lab's
        own connection could write again (s)."""
        t0 = time.monotonic()
        await self.start_broker()
        self.broker_restarts += 1
        await self.wait_for(self._broker_answers, 30.0, what="the lab's connection writes to the restarted broker")
        return time.monotonic() - t0

    async def _broker_answers(self) -> bool:
        try:
            await asyncio.wait_for(self.admin_().broker_now(), timeout=1.0)
            return True
        except Exception:
            return False

    def admin_(self) -> Broker:
        assert self.admin is not None, "the lab is not started"
        return self.admin

    async def broker_now(self) -> float:
        return await self.admin_().broker_now()

    # -- the coordinator ----------------------------------------------------------------------

    async def start_coordinator(self) -> None:
        if self.coordinator is None:
            self.coordinator = LabProc(
                "coordinator",
                [sys.executable, "-m", "gigafactory", "coordinator", "--nats", self.url, "--log-level", "info"],
                self.workdir / "coordinator.log",
                self.env(GIGAFACTORY_CREDS=str(self.identities.creds_path("coordinator"))),
            )
        self.coordinator.start()
        await self.wait_for(self._api_answers, READY_TIMEOUT_S, what="the coordinator's API answers",
                            proc=self.coordinator)

    async def _api_answers(self) -> bool:
        assert self.client is not None
        try:
            await self.client.call("list", {"limit": 1}, timeout_s=1.0)
            return True
        except (ApiError, Exception):
            return False

    # -- fault proxies ------------------------------------------------------------------------

    async def start_proxy(self, name: str, target_url: str | None = None) -> LabProxy:
        """Start a fault-injecting proxy process in front of ``target_url`` (default: the
        lab's broker; on a cluster, name one node) and wait until its control port answers.
        Connect a factory through it with ``start_factory(..., url=proxy.url)``."""
        target = (target_url or self.url).split(",")[0].removeprefix("nats://")
        port, control = free_ports(2, HOST)
        proc = LabProc(f"proxy {name}", [sys.executable, "-m", "gigafactory.chaos.proxy", "--listen", str(port),
                                         "--listen-host", HOST, "--target", target, "--control", str(control)],
                       self.workdir / f"proxy-{name}.log", self.env())
        proc.start()
        lp = LabProxy(proc, port, ProxyControl(control, timeout_s=5.0), target)
        self.proxies.append(lp)

        async def answers() -> bool:
            try:
                return bool(await lp.send("stats"))
            except ProxyControlError:
                return False

        await self.wait_for(answers, READY_TIMEOUT_S, what=f"proxy {name} answers on its control port {control}",
                            proc=proc, interval_s=0.1)
        return lp

    # -- factories ----------------------------------------------------------------------------

    async def start_factory(self, fid: str, *, stations: int = 2, caps: list[str] | tuple[str, ...] = (),
                            env: dict[str, str] | None = None, url: str | None = None) -> LabProc:
        """Start factory ``fid`` (its own data dir, so its outbox survives a restart) and wait
        until its record on the broker names this process. ``url`` connects it elsewhere than
        the broker (through a fault-injecting proxy, say); ``env`` adds to its environment."""
        data = self.workdir / "factories" / fid
        self.factory_data[fid] = data
        if self.identities.get(fid) is None:  # enrol it: its own identity, loaded by a reload
            self.identities.create("factory", fid)
            if self.server is not None and self.server.alive:
                self.server.reload(self.identities.users())
            elif self.server is not None:  # down now (an outage): loaded at its restart
                self.server.users = self.identities.users()
        args = [sys.executable, "-m", "gigafactory", "factory", "--nats", url or self.url, "--id", fid, "--no-probe",
                "--stations", str(stations), "--data-dir", str(data), "--workspace", str(self.workdir / "work"),
                "--log-level", "info"]
        for c in caps:
            args += ["--cap", c]
        proc = LabProc(f"factory {fid}", args, self.workdir / f"factory-{fid}.log",
                       self.env(**{**self.factory_env, LAB_ENV: self.id, "GIGAFACTORY_NATS_URL": url or self.url,
                                   "GIGAFACTORY_CREDS": str(self.identities.creds_path(fid)), **(env or {})}))
        self.factories[fid] = proc
        self.factory_starts.setdefault(fid, []).append(time.time())
        proc.start()
        await self.wait_registered(fid)
        return proc

    async def wait_registered(self, fid: str) -> None:
        proc = self.factories[fid]

        async def registered() -> bool:
            e = await self.admin_().factories.get(fid)
            if e is None:
                return False
            rec = decode(e.value, FactoryRecord)
            return rec.pid == proc.pid and rec.status == "up"

        await self.wait_for(registered, READY_TIMEOUT_S, what=f"factory {fid} registered", proc=proc)

    async def restart_factory(self, fid: str) -> None:
        """Start a stopped or killed factory again with the same id and data dir."""
        proc = self.factories[fid]
        if proc.alive():
            raise RuntimeError(f"factory {fid} is still running (pid {proc.pid})")
        self.factory_starts.setdefault(fid, []).append(time.time())
        proc.start()
        await self.wait_registered(fid)

    async def leases_of(self, fid: str) -> list[tuple[str, int]]:
        """(job, epoch) of every job whose record names ``fid`` as lease holder now."""
        out = []
        for jid, (rec, _rev, _ts) in (await self.records()).items():
            if rec.stage in LEASED and rec.lease is not None and rec.lease.factory == fid:
                out.append((jid, rec.epoch))
        return sorted(out)

    async def kill_factory(self, fid: str) -> Hit:
        """SIGKILL factory ``fid``; the hit says when (broker time) and which leases it held."""
        await self.factories[fid].kill()
        hit = Hit("kill", fid, await self.broker_now(), await self.leases_of(fid))
        self.hits.append(hit)
        return hit

    async def pause_factory(self, fid: str) -> Hit:
        """SIGSTOP factory ``fid`` (it becomes a zombie holding leases it cannot renew)."""
        self.factories[fid].pause()
        hit = Hit("pause", fid, await self.broker_now(), await self.leases_of(fid))
        self.hits.append(hit)
        return hit

    async def resume_factory(self, hit: Hit) -> None:
        self.factories[hit.factory].resume()
        hit.ended_at_broker = await self.broker_now()

    async def factories_with_work(self) -> list[str]:
        """Live, unpaused factories that hold a lease now, sorted (for seeded choices)."""
        busy = set()
        for rec, _rev, _ts in (await self.records()).values():
            if rec.stage in LEASED and rec.lease is not None:
                busy.add(rec.lease.factory)
        return sorted(f for f in busy if f in self.factories and self.factories[f].alive()
                      and not self.factories[f].paused)

    def outbox_path(self, fid: str) -> Path:
        return self.factory_data[fid] / fid / "outbox"

    def outbox_items(self, fid: str) -> list[tuple[str, int]]:
        """(job, epoch) of the items pending in factory ``fid``'s durable outbox, read straight
        from its SQLite file (works while the broker, or the factory, is down)."""
        db = self.outbox_path(fid) / "outbox.sqlite3"
        if not db.exists():
            return []
        conn = sqlite3.connect(str(db), timeout=5.0)
        try:
            return [(r[0], int(r[1])) for r in conn.execute("SELECT job, epoch FROM outbox ORDER BY id")]
        except sqlite3.OperationalError:  # the factory has not created its table yet
            return []
        finally:
            conn.close()

    def quarantined(self, fid: str) -> list[str]:
        """Names of factory ``fid``'s quarantine folders (``<job>-epoch-<epoch>-<id>``)."""
        q = self.outbox_path(fid) / "quarantine"
        if not q.is_dir():
            return []
        return sorted(p.name for p in q.iterdir() if p.is_dir() and not p.name.startswith("."))

    # -- jobs ---------------------------------------------------------------------------------

    def job(self, script: str, **manifest: Any) -> str:
        """A job file whose ``cwd`` is the lab's shared repo folder."""
        manifest.setdefault("cwd", str(self.repo))
        return job_text(script, **manifest)

    async def submit(self, texts: list[str], timeout_s: float = 10.0) -> list[str]:
        """Submit one batch through the API. Returns the acknowledged job ids; a batch that got
        no reply (broker or coordinator down) returns [] and is counted as unacknowledged."""
        assert self.client is not None
        files = [{"path": f"chaos-{i}.md", "text": t} for i, t in enumerate(texts)]
        try:
            resp = await asyncio.wait_for(self.client.call("submit", {"files": files, "source": "chaos"},
                                                           timeout_s=timeout_s), timeout=timeout_s + 1)
        except ApiError as e:
            if e.is_client_error:
                raise  # a job file the scenario wrote is wrong: that is a bug, not chaos
            self.unacknowledged_submits += len(texts)
            return []
        except Exception:
            self.unacknowledged_submits += len(texts)
            return []
        ids = [j["job"] for j in resp["jobs"]]
        self.acknowledged.update(ids)
        return ids

    async def records(self) -> dict[str, tuple[JobRecord, int, float]]:
        """Every job record: (record, revision, broker timestamp)."""
        out = {}
        async for e in self.admin_().jobs.scan():
            out[e.key] = (decode(e.value, JobRecord), e.revision, e.ts)
        return out

    async def stages(self) -> dict[str, str]:
        return {j: str(r[0].stage) for j, r in (await self.records()).items()}

    async def settle(self, timeout_s: float, *, until: frozenset = frozenset(str(s) for s in TERMINAL)) -> dict[str, str]:
        """Wait (bounded) until every job on record, and every acknowledged one, is in a stage of
        ``until``. Returns the jobs that are not, with their stage ({} when settled)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                stages = await self.stages()
            except Exception as e:  # the broker may be coming back
                log.info("settle: reading records failed (%s)", e)
                stages = None
            if stages is not None:
                pending = {j: s for j, s in stages.items() if s not in until}
                pending.update({j: "missing" for j in self.acknowledged if j not in stages})
                if not pending:
                    return {}
            if time.monotonic() > deadline:
                return pending if stages is not None else {"?": "broker not answering"}
            await asyncio.sleep(0.25)

    async def wait_for(self, pred: Callable[[], Any], timeout_s: float, *, what: str,
                       proc: LabProc | None = None, interval_s: float = 0.05) -> Any:
        """Poll ``pred`` (sync or async) until it returns something truthy, and return that.
        Raises TimeoutError naming ``what`` after ``timeout_s``, or at once if ``proc`` died."""
        return await wait_for(pred, timeout_s, what=what, proc=proc, interval_s=interval_s)

    # -- the audit and the check --------------------------------------------------------------

    async def audit(self, subject: str = f"{names.EVENTS_PREFIX}.>", max_events: int = 1_000_000) -> list[AuditEntry]:
        """Events of ``GF_EVENTS`` matching ``subject`` with the broker's timestamps, in stream order."""
        from nats.js import api

        b = self.admin_()
        wait_s = b.settings.request_timeout_s
        out: list[AuditEntry] = []
        psub = await b.js.pull_subscribe(
            subject, stream=names.EVENTS_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                      inactive_threshold=30.0, mem_storage=True, num_replicas=1),
        )
        try:
            # The consumer's pending count says how much matches the filter (maybe nothing), so
            # the read ends when it has that many, without a fetch waiting out its timeout.
            info = await asyncio.wait_for(psub.consumer_info(), timeout=wait_s * 2)
            want = min(info.num_pending, max_events)
            while len(out) < want:
                try:
                    msgs = await asyncio.wait_for(psub.fetch(min(256, want - len(out)), timeout=wait_s),
                                                  timeout=2 * wait_s + 1)
                except TimeoutError as e:
                    raise TimeoutError(f"reading {names.EVENTS_STREAM} ({subject}) stalled after {len(out)} of "
                                       f"{want} events; is the broker answering?") from e
                for m in msgs:
                    out.append(AuditEntry(m.metadata.timestamp.timestamp(), decode(m.data, EventRecord)))
        finally:
            try:
                await asyncio.wait_for(psub.unsubscribe(), timeout=wait_s)
            except Exception:
                pass
        return out

    async def check(self, *, allow_in_flight: bool = False) -> invariants.Report:
        """The invariant check over the broker's records, with the acknowledged submissions,
        the side-effect ledger, the lab's pauses and the processes that outlived their factory
        (counted now, before any cleanup; kept in :attr:`leftovers`)."""
        jobs, events, stamps = await invariants.collect_timed(self.admin_())
        self.leftovers = self.leftover_engines()
        lines, problems = self.read_ledger()
        effects = invariants.SideEffects(ledger=lines, event_ts=stamps, pauses=self.pause_windows(),
                                         pause_grace_s=self.pause_grace_s, leftovers=self.leftovers,
                                         problems=problems)
        keys = {i.name: i.public_key for i in self.identities.list() if i.role == "factory"}
        return invariants.check(jobs, events, acknowledged=set(self.acknowledged), allow_in_flight=allow_in_flight,
                                side_effects=effects, holder_keys=keys)

    # -- side effects -------------------------------------------------------------------------

    @property
    def pause_grace_s(self) -> float:
        """How long after the lab resumes a paused factory its engines may still act on a lease
        it lost while stopped: up to one renewal period until it tries to renew (or checks
        its self-fence), one request timeout for that write's answer, and half a second for
        the engine's process group to die of the SIGTERM on a loaded machine."""
        return self.settings.lease_renew_s + self.settings.request_timeout_s + 0.5

    def pause_windows(self) -> list[invariants.PauseWindow]:
        """Every SIGSTOP the lab sent a factory, with the start of the incarnation it stopped."""
        out = []
        for fid, proc in self.factories.items():
            starts = self.factory_starts.get(fid, [])
            for stopped, continued in proc.pauses:
                assert stopped is not None
                since = max((t for t in starts if t <= stopped), default=0.0)
                out.append(invariants.PauseWindow(fid, since, stopped, continued))
        return out

    def read_ledger(self) -> tuple[list[invariants.LedgerLine], list[str]]:
        """The side-effect ledger's lines and its problems (see :func:`invariants.parse_ledger`);
        a ledger over :data:`invariants.LEDGER_MAX_BYTES` is read up to it and says so."""
        problems = []
        with open(self.ledger, "rb") as f:
            data = f.read(invariants.LEDGER_MAX_BYTES + 1)
        if len(data) > invariants.LEDGER_MAX_BYTES:
            problems.append(f"{self.ledger}: longer than LEDGER_MAX_BYTES ({invariants.LEDGER_MAX_BYTES}); "
                            "only the beginning was judged")
            data = data[: data.rfind(b"\n", 0, invariants.LEDGER_MAX_BYTES) + 1]
        lines, bad = invariants.parse_ledger(data.decode("utf-8", "replace"), str(self.ledger))
        return lines, problems + bad

    def leftover_engines(self) -> list[invariants.LeftoverProcess]:
        """The processes carrying this lab's marker whose factory is dead: neither a factory
        of the lab nor descended from a live one. A paused factory is alive; a factory
        restarted with the same id is a new process, so its predecessor's engines count."""
        live = {p.pid for p in [*self.factories.values(), *self.hosts] if p.alive()}
        out = []
        for pid in _processes_with_marker(self.id):
            if pid in live:
                continue
            chain, cur = 0, osproc.parent_pid(pid)
            while cur is not None and cur > 1 and cur not in live and chain < MAX_ANCESTRY:
                cur, chain = osproc.parent_pid(cur), chain + 1
            if cur is not None and cur in live:
                continue
            env = osproc.environ(pid)
            if not env:
                continue  # gone meanwhile, or a zombie (dead; its parent has not reaped it yet)
            pgid = osproc.process_group(pid)
            if pgid is None:
                continue
            epoch = env.get("GF_EPOCH", "")
            cmd = " ".join(osproc.cmdline(pid) or []).strip()
            out.append(invariants.LeftoverProcess(
                pid=pid, pgid=pgid, cmd=cmd, job=env.get("GF_JOB_ID"),
                epoch=int(epoch) if epoch.isdigit() else None, factory=env.get("GF_FACTORY")))
        return sorted(out, key=lambda p: p.pid)

    # -- reclaims -----------------------------------------------------------------------------

    async def reclaims(self) -> dict[tuple[str, int], AuditEntry]:
        """The reaper's events that ended an expired lease, by (job, the epoch it took away)."""
        out: dict[tuple[str, int], AuditEntry] = {}
        for a in await self.audit():
            old = a.event.data.get("old_epoch")
            if a.event.kind in invariants.LEASE_ENDERS and a.event.job and isinstance(old, int):
                out.setdefault((a.event.job, old), a)
        return out
