"""Helpers for the tests that cross a real broker.

- :func:`eventually` awaits a condition with a bounded poll: tests never sleep to wait for
  an event, they wait for its visible outcome and fail with the last value seen.
- :class:`Fleet` runs a coordinator and factories in-process as asyncio tasks, each on its
  own connection, with the short timings of :func:`fast_settings`.
- :func:`job_text` writes a job file (YAML front matter + script) from keyword fields.
- :class:`Proc` runs ``python -m gigafactory ...`` as a real process, its output in a file.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gigafactory.procs import pid_alive, popen_tied  # noqa: F401 (tests import pid_alive from here)
from gigafactory.broker import Broker
from gigafactory.client import SUBMIT_TIMEOUT_MIN_S, Client
from gigafactory.config import Settings, env_text
from gigafactory.coordinator.api import read_events
from gigafactory.coordinator.service import Coordinator
from gigafactory.factory.agent import Factory
from gigafactory.schemas.records import JobRecord, decode

FAST = dict(
    heartbeat_s=0.5,
    lease_ttl_s=2.0,
    lease_renew_s=0.5,
    reaper_interval_s=0.25,
    long_poll_s=1.0,
    drain_timeout_s=1.0,
    request_timeout_s=5.0,
    reconnect_wait_s=0.2,
    reconnect_jitter_s=0.2,
)
"""Timings short enough that a lease expires in two seconds and an idle pull renews every second."""


def fast_settings(**overrides: Any) -> Settings:
    return Settings(**{**FAST, **overrides})


def fast_env(**overrides: Any) -> dict[str, str]:
    """The same timings as ``GIGAFACTORY_<FIELD>`` variables, for real processes."""
    s = fast_settings(**overrides)
    env = dict(os.environ)
    for f in msgspec.structs.fields(Settings):
        v = getattr(s, f.name)
        if v is not None:
            env[f"GIGAFACTORY_{f.name.upper()}"] = env_text(v)
    return env


# -- waiting ----------------------------------------------------------------------------------


async def eventually(pred: Callable[[], Any], timeout_s: float = 10.0, *, interval_s: float = 0.05,
                     what: str | None = None) -> Any:
    """Poll ``pred`` (sync or async) until it returns something truthy, and return that.
    Raises AssertionError after ``timeout_s`` naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = pred()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s:g}s: {what or getattr(pred, '__name__', pred)}; "
                                 f"last value: {last!r}")
        await asyncio.sleep(interval_s)


def wait_until(pred: Callable[[], Any], timeout_s: float = 10.0, *, interval_s: float = 0.1,
               what: str | None = None) -> Any:
    """:func:`eventually` for synchronous tests (bounded poll, never a bare sleep)."""
    return asyncio.run(eventually(pred, timeout_s, interval_s=interval_s, what=what))


def run(coro, timeout_s: float = 60.0) -> Any:
    """Run an async test body with a bound, so a hang fails the test instead of the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# -- job files -------------------------------------------------------------------------------


def job_text(script: str = "echo ok", **manifest: Any) -> str:
    """A job file. Keyword names are the manifest's fields with ``_`` for ``-``
    (``review_policy='auto'``); ``engine`` defaults to ``shell``."""
    front = {"engine": "shell"}
    front.update({k.replace("_", "-"): v for k, v in manifest.items()})
    return "---\n" + yaml.safe_dump(front, sort_keys=False, default_flow_style=False) + "---\n" + script.rstrip() + "\n"


def write_job(directory: Path, name: str, script: str = "echo ok", **manifest: Any) -> Path:
    p = Path(directory) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(job_text(script, **manifest), encoding="utf-8")
    return p


# -- an in-process fleet ---------------------------------------------------------------------


@dataclass
class _Member:
    broker: Broker
    stop: asyncio.Event
    task: asyncio.Task


class Fleet:
    """A coordinator and any number of factories, in-process, against a real broker.

    ``repo`` is a folder every job may use as ``cwd`` (absolute, so it is the same on every
    factory). ``client`` calls the coordinator's API; ``admin`` is a broker connection of the
    test's own for reading records and events."""

    def __init__(self, url: str, root: Path, settings: Settings | None = None, *, server: Any = None) -> None:
        """:param server: the test's :class:`EmbeddedServer` with its ``identities`` (the
            ``nats_server`` fixture): then the coordinator connects as ``coordinator``, each
            factory as its own ``factory`` identity (enrolled and loaded by a server reload),
            the client as ``admin``: least privilege, as a deployment runs. None: every
            connection uses the test's credentials (``GIGAFACTORY_CREDS``, the lab's admin)."""
        self.server = server if getattr(server, "identities", None) is not None else None
        self.url = url
        self.root = Path(root)
        self.settings = settings or fast_settings()
        if self.settings.runs_db is None:  # the coordinator's pipeline_runs database, in the test's folder
            self.settings = msgspec.structs.replace(self.settings, runs_db=str(self.root / "runs.sqlite"))
        self.repo = self.root / "repo"
        self.repo.mkdir(parents=True, exist_ok=True)
        self.factories: dict[str, Factory] = {}
        self._members: dict[str, _Member] = {}
        self.coordinator: Coordinator | None = None
        self.client: Client
        self.admin: Broker

    async def __aenter__(self) -> "Fleet":
        self.admin = await Broker.open(self.url, "test-admin", self.settings)
        cs = self._as("coordinator", self.settings)
        cb = await Broker.open(self.url, "test-coordinator", cs)
        self.coordinator = Coordinator(cb, cs)
        stop = asyncio.Event()
        task = asyncio.create_task(self.coordinator.run(stop), name="coordinator")
        self._members["<coordinator>"] = _Member(cb, stop, task)
        await self._ready(self.coordinator.ready, task, "coordinator")
        self.client = await Client.connect(self.url)
        return self

    async def __aexit__(self, *exc) -> None:
        for name in [n for n in self._members if n != "<coordinator>"] + ["<coordinator>"]:
            if name in self._members:
                await self.stop(name)
        await self.client.close()
        await self.admin.close()

    def _as(self, identity: str, settings: Settings) -> Settings:
        """``settings`` connecting as ``identity`` (with a server's identities), else as they are."""
        if self.server is None:
            return settings
        import copy

        out = copy.copy(settings)
        out.creds = str(self.server.identities.creds_path(identity))
        return out

    @staticmethod
    async def _ready(ev: asyncio.Event, task: asyncio.Task, what: str) -> None:
        waiter = asyncio.ensure_future(ev.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if task.done():
                task.result()  # raises what killed it
            raise AssertionError(f"{what} not ready within 30s")

    async def add_factory(self, factory_id: str, *, stations: int = 1, caps: list[str] | tuple[str, ...] = (),
                          settings: Settings | None = None, seats: dict[str, int] | None = None,
                          probe: bool = False) -> Factory:
        """Start a factory and wait until it is registered and the coordinator counts it live.
        ``probe``: probe this machine (tools, versions, engines) instead of offering only
        ``caps`` and ``engine:shell``."""
        s = settings or self.settings
        if self.server is not None and self.server.identities.get(factory_id) is None:
            self.server.identities.create("factory", factory_id)
            self.server.reload(self.server.identities.users())
        s = self._as(factory_id, s)
        b = await Broker.open(self.url, f"test-factory-{factory_id}", s)
        f = Factory(b, factory_id=factory_id, stations=stations, extra_capabilities=list(caps), probe=probe, seats=seats,
                    workspace=str(self.root / "work"), data_dir=str(self.root / "factories"), settings=s)
        stop = asyncio.Event()
        task = asyncio.create_task(f.run(stop), name=f"factory-{factory_id}")
        self._members[factory_id] = _Member(b, stop, task)
        self.factories[factory_id] = f
        await self._ready(f.ready, task, f"factory {factory_id}")
        assert self.coordinator is not None
        view = self.coordinator.view
        await eventually(lambda: factory_id in view.factories, 10, what=f"coordinator sees factory {factory_id}")
        return f

    async def stop(self, name: str, timeout_s: float = 20.0) -> None:
        """Set the member's stop event (what SIGTERM does) and wait for it to finish draining."""
        m = self._members.pop(name)
        m.stop.set()
        try:
            await asyncio.wait_for(m.task, timeout_s)
        finally:
            await m.broker.close()

    # -- the API and the records ---------------------------------------------------------------

    def job(self, script: str = "echo ok", **manifest: Any) -> str:
        manifest.setdefault("cwd", str(self.repo))
        return job_text(script, **manifest)

    async def submit(self, *texts: str | tuple[str, str], timeout_s: float | None = None) -> list[dict]:
        """Submit one batch; each item is a job text or ``(path, text)``. Returns the API's jobs.
        ``timeout_s``: the API call's bound (default the client's), for batches whose intake
        writes take longer than one request's worth."""
        files = []
        for i, t in enumerate(texts):
            path, text = t if isinstance(t, tuple) else (f"job-{i}.md", t)
            files.append({"path": path, "text": text})
        # A batch writes a record per file: bound it like the client's own submit does (at least
        # SUBMIT_TIMEOUT_MIN_S), not by one request's 10 s, which a loaded CI machine can miss.
        wait_s = timeout_s or max(self.client.timeout_s, SUBMIT_TIMEOUT_MIN_S)
        return (await self.client.call("submit", {"files": files}, timeout_s=wait_s))["jobs"]

    async def submit_one(self, text: str, path: str = "job.md") -> str:
        return (await self.submit((path, text)))[0]["job"]

    async def record(self, job: str) -> tuple[JobRecord, int]:
        e = await self.admin.jobs.get(job)
        assert e is not None, f"no record for job {job}"
        return decode(e.value, JobRecord), e.revision

    async def wait_stage(self, job: str, *stages: str, timeout_s: float = 15.0) -> JobRecord:
        async def reached():
            rec, _ = await self.record(job)
            return rec if str(rec.stage) in stages else None

        try:
            return await eventually(reached, timeout_s, what=f"job {job} in {stages}")
        except AssertionError:
            rec, _ = await self.record(job)
            raise AssertionError(f"job {job} did not reach {stages} within {timeout_s:g}s; it is "
                                 f"{rec.stage}: {rec.reason}; attempts {rec.attempts}") from None

    async def events(self, job: str) -> list[dict]:
        return await read_events(self.admin, job, limit=1000)


# -- real processes --------------------------------------------------------------------------


class Proc:
    """A real subprocess with its stdout and stderr in ``log``; killed on :meth:`close`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = Path(log)
        with open(self.log, "wb") as out:
            # Tied to the test run: a pytest killed by any signal takes its processes with it.
            self.p = popen_tied(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.p.send_signal(sig)

    def wait(self, timeout_s: float = 20.0) -> int:
        return self.p.wait(timeout=timeout_s)

    def close(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (a clean drain), then SIGKILL if it does not end in time."""
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)


def gigafactory_cmd() -> list[str]:
    """The installed ``gigafactory`` console script (next to this Python), else ``python -m``."""
    script = Path(sys.executable).parent / "gigafactory"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gigafactory"]


def kill_group(pid: int) -> None:
    """SIGKILL a process group left behind by a factory that was itself SIGKILLed."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- overlap probes ---------------------------------------------------------------------------


def rendezvous_script(log: Path) -> str:
    """Record start and end times; after starting, give a partner job up to 1.5s to start
    too. Two jobs that may run together therefore overlap; two that may not, do not."""
    return (
        f'log="{log}"\n'
        'echo "start $(date +%s.%N) $GF_JOB_ID" >> "$log"\n'
        'for i in $(seq 1 30); do [ "$(grep -c ^start "$log")" -ge 2 ] && break; sleep 0.05; done\n'
        'echo "end $(date +%s.%N) $GF_JOB_ID" >> "$log"\n'
    )


def intervals(log: Path) -> dict[str, tuple[float, float]]:
    start, end = {}, {}
    for line in log.read_text().splitlines():
        what, t, job = line.split()
        (start if what == "start" else end)[job] = float(t)
    assert start.keys() == end.keys(), log.read_text()
    return {j: (start[j], end[j]) for j in start}


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
