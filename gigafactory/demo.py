"""``gigafactory demo``: the whole system on one machine, as separate processes.

An embedded nats-server, one coordinator process and two factory processes with different
capability sets run the example jobs (``examples/``). Live progress is shown; the demo prints
a summary and exits 0 only if every job ended in the stage its example says it should.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import click
import orjson
import yaml

from gigafactory.client import RESTING, Client
from gigafactory.embedded import EmbeddedServer
from gigafactory.procs import popen_tied

DEMO_SETTINGS = {
    # Short enough that the demo's retries and reclaims happen while you watch.
    "GIGAFACTORY_HEARTBEAT_S": "1",
    "GIGAFACTORY_LEASE_TTL_S": "10",
    "GIGAFACTORY_LEASE_RENEW_S": "2",
    "GIGAFACTORY_LONG_POLL_S": "2",
    "GIGAFACTORY_DRAIN_TIMEOUT_S": "10",
    # A WIP checkpoint every second, so the job the demo kills mid-run has one to resume from.
    "GIGAFACTORY_CHECKPOINT_S": "1",
}


def bundled_examples() -> Path:
    return Path(str(resources.files("gigafactory.examples")))


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_scratch_repo(path: Path) -> None:
    """A small git repository for the example jobs to change."""
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q")
    _git(path, "checkout", "-q", "-B", "main")
    (path / "README.md").write_text("# scratch repo for the gigafactory demo\n")
    _git(path, "add", "README.md")
    _git(path, "-c", "user.name=gigafactory", "-c", "user.email=demo@gigafactory.local", "commit", "-q", "-m", "init")


def make_demo_remote(path: Path) -> None:
    """A bare repository (the "remote" the ``repo:`` examples name) with one commit on
    ``main``: a README, a small package and its test."""
    src = path.with_name(path.name + ".src")
    make_scratch_repo(src)
    (src / "app").mkdir()
    (src / "app" / "greet.py").write_text('def greet(name):\n    return "hello " + name\n')
    (src / "tests").mkdir()
    (src / "tests" / "test_greet.sh").write_text('grep -q "hello" app/greet.py\n')
    _git(src, "add", "-A")
    _git(src, "-c", "user.name=gigafactory", "-c", "user.email=demo@gigafactory.local", "commit", "-q", "-m",
         "a small app")
    _git(path.parent, "clone", "-q", "--bare", str(src), str(path))
    shutil.rmtree(src)


class Procs:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.specs: dict[str, tuple[list[str], dict, Path]] = {}

    def kill_and_restart(self, name: str) -> bool:
        """SIGKILL the process named ``name`` (its engines die with it: the supervisor) and start
        it again with the same arguments; False if there is none running."""
        for i, (n, p) in enumerate(self.procs):
            if n == name and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
                del self.procs[i]
                self.start(name, *self.specs[name])
                return True
        return False

    def start(self, name: str, args: list[str], env: dict, log: Path) -> None:
        self.specs[name] = (args, env, log)
        out = open(log, "ab")
        # Tied to the demo: a demo killed by any signal SIGTERMs them, so they drain and exit
        # instead of running on as orphans holding the demo's broker connection.
        p = popen_tied([sys.executable, "-m", "gigafactory", *args], death_signal=signal.SIGTERM, env=env,
                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs.append((name, p))

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p in self.procs if p.poll() is not None]

    def stop(self, timeout_s: float = 20.0) -> None:
        # Factories first (they drain and deregister), then the coordinator.
        for n, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def demo_identities(root: Path, factory_ids: list[str]) -> tuple[list[dict], dict[str, str]]:
    """The demo's identity store (``root/identities``), as secure as ``gigafactory up``'s:
    ``admin`` (the demo's own client), ``coordinator`` and one ``factory`` identity per factory
    id (its identity's name is its factory id, the one descriptor key it may write).

    :param root: the demo's data folder.
    :param factory_ids: the factories the demo runs.
    Returns (the broker's nkey users, name -> credentials file path)."""
    from gigafactory.identity import IdentityStore

    store = IdentityStore(root / "identities")
    store.ensure_defaults()
    for fid in factory_ids:
        if store.get(fid) is None:
            store.create("factory", fid)
    names = ["admin", "coordinator", *factory_ids]
    return store.users(), {n: str(store.creds_path(n)) for n in names}


def demo_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment of the demo's processes: this one's, with the demo's settings, and no
    broker URL or credentials of the caller's (each process gets its own ``--creds``)."""
    env = dict(os.environ, **settings)
    for var in ("GIGAFACTORY_NATS_URL", "GIGAFACTORY_CREDS"):
        env.pop(var, None)
    return env


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_demo(*, examples_dir: str | None, workdir: str | None, timeout_s: float, as_json: bool,
             nats_url: str | None) -> int:
    ex = Path(examples_dir) if examples_dir else bundled_examples()
    spec_path = ex / "demo.yaml"
    if not spec_path.is_file():
        click.secho(f"error: {spec_path} is missing: it lists each example's expected end stage", fg="red", err=True)
        return 2
    spec = yaml.safe_load(spec_path.read_text())
    expect: dict[str, str] = spec["expect"]
    missing = [f for f in expect if not (ex / f).is_file()]
    if missing:
        click.secho(f"error: {spec_path} names files that are not there: {', '.join(missing)}", fg="red", err=True)
        return 2
    if shutil.which("git") is None:
        click.secho("error: the demo's example jobs change a git repository: install git", fg="red", err=True)
        return 2

    temp = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="gigafactory-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    workspace = root / "workspace"
    make_scratch_repo(workspace / "scratch-repo")
    make_demo_remote(workspace / "demo-remote.git")
    say = (lambda *a, **k: None) if as_json else (lambda m: click.echo(m, err=True))

    srv = None
    procs = Procs()
    factories = spec.get("factories") or [{"id": "alpha", "stations": 2, "caps": []}]
    # Authentication on, as `gigafactory up`: every process its own identity (none on a broker
    # given with --nats: the caller's credentials apply there, GIGAFACTORY_CREDS or --creds).
    creds: dict[str, str] = {}
    try:
        if nats_url:
            url = nats_url
            env = dict(os.environ, **DEMO_SETTINGS)
            env.pop("GIGAFACTORY_NATS_URL", None)
        else:
            users, creds = demo_identities(root, [f["id"] for f in factories])
            srv = EmbeddedServer(store_dir=str(root / "nats"), log_file=str(root / "nats-server.log"),
                                 users=users).start()
            url = srv.url
            env = demo_env(DEMO_SETTINGS)
        say(f"broker   {url}  (data in {root}{', authentication on' if creds else ''})")
        as_ = (lambda n: ["--creds", creds[n]] if n in creds else [])
        procs.start("coordinator", ["coordinator", "--nats", url, *as_("coordinator"), "--log-level", "warning"], env,
                    root / "coordinator.log")
        for f in factories:
            args = ["factory", "--nats", url, *as_(f["id"]), "--id", f["id"], "--stations", str(f.get("stations", 2)),
                    "--no-probe", "--workspace", str(workspace), "--data-dir", str(root / "factories"),
                    "--log-level", "warning"]
            for c in f.get("caps", []):
                args += ["--cap", c]
            procs.start(f["id"], args, env, root / f"factory-{f['id']}.log")
            say(f"factory  {f['id']}: {f.get('stations', 2)} stations, capabilities {' '.join(f.get('caps', [])) or '-'}")
        kills = {k["example"]: k.get("after", "checkpointed") for k in spec.get("kill") or []}
        result = asyncio.run(_drive(url, ex, expect, len(factories), timeout_s, as_json, procs, kills,
                                    creds=creds.get("admin")))
    finally:
        procs.stop()
        if srv:
            srv.stop()
    ok = all(r["ok"] for r in result["jobs"])
    if as_json:
        click.echo(orjson.dumps({**result, "ok": ok, "dir": str(root)}, option=orjson.OPT_INDENT_2).decode())
    else:
        rows = [["example", "job", "expected", "ended", "attempts", ""]]
        for r in result["jobs"]:
            rows.append([r["file"], r["job"], r["expected"], r["stage"], str(r["attempt"]), "ok" if r["ok"] else "MISMATCH"])
        click.echo("\n" + text_table(rows))
        for r in result["jobs"]:
            if r["stage"] in ("queued", "blocked", "testing", "review", "dead_letter", "failed"):
                click.echo(f"  {r['job']}: {r['why']}")
            elif (w := r.get("workspace")) and w.get("pushed"):
                pr = f"; pull request #{w['pull_number']} {w.get('pull_state', '')}" if w.get("pull_number") else ""
                click.echo(f"  {r['job']}: pushed {w['branch']} at {(w.get('head') or '')[:12]} "
                           f"({w.get('files_changed', 0)} files +{w.get('lines_added', 0)} -{w.get('lines_deleted', 0)}){pr}")
            if "killed" in r:
                click.echo(f"  {r['job']}: its factory {r['killed'] or '(never killed)'} was SIGKILLed mid-run; "
                           f"{r['resumed'] or 'NOT resumed from a checkpoint'}")
        if result.get("error"):
            click.secho(f"\n{result['error']}", fg="red")
        click.secho(f"\n{'all' if ok else 'NOT all'} {len(result['jobs'])} jobs ended where expected "
                    f"in {result['elapsed_s']:.1f}s", fg="green" if ok else "red")
        if not ok:
            click.echo(f"logs: {root}/coordinator.log, {root}/factory-*.log")
    if ok and temp:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


async def _kill_after(client: Client, procs: Procs, kills: dict[str, str], by_job: dict[str, str],
                      killed: dict[str, str], say) -> None:
    """SIGKILL the factory holding each job of ``kills`` once the job's event named there was
    published and that factory holds no other job (the other examples must end as they say),
    and start that factory again: the job must then be resumed elsewhere."""
    for job, f in by_job.items():
        if f not in kills or job in killed:
            continue
        st = await client.call("status", {"job": job, "events": 100})
        holder = st["job"].get("holder")
        if not holder or not any(e.get("kind") == kills[f] for e in st.get("events") or []):
            continue
        held = [j["id"] for j in (await client.call("list", {"limit": 100000}))["jobs"]
                if j.get("holder") == holder and j["stage"] in ("assigned", "building")]
        if held == [job]:
            if procs.kill_and_restart(holder):
                killed[job] = holder
                say(f"killed factory {holder} (SIGKILL) while it ran {f} after its {kills[f]} event; started it again")


async def _drive(url: str, ex: Path, expect: dict[str, str], n_factories: int, timeout_s: float, as_json: bool,
                 procs: Procs, kills: dict[str, str] | None = None, creds: str | None = None) -> dict:
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    client = None
    while client is None:
        try:
            client = await Client.connect(url, creds=creds)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        # Wait for the coordinator's API and both factories.
        while True:
            if procs.dead():
                return {"jobs": [], "elapsed_s": time.monotonic() - t0, "error": "died: " + ", ".join(procs.dead())}
            try:
                fl = await client.call("factories", timeout_s=2)
                if sum(1 for f in fl["factories"] if f["live"]) >= n_factories:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                return {"jobs": [], "elapsed_s": time.monotonic() - t0, "error": "fleet did not come up"}
            await asyncio.sleep(0.2)

        files = [str(ex / f) for f in sorted(expect)]
        submitted = await client.submit_files(files, source="demo")
        by_job = {s.job: Path(s.file).name for s in submitted}
        if not as_json:
            click.echo(f"submitted {len(submitted)} example jobs", err=True)
        tty = sys.stderr.isatty() and not as_json
        last = ""
        killed: dict[str, str] = {}
        kills = kills or {}
        say = (lambda m: None) if as_json else (lambda m: click.echo(("\n" if tty else "") + m, err=True))
        while True:
            await _kill_after(client, procs, kills, by_job, killed, say)
            resp = await client.call("list", {"limit": 100000})
            jobs = {j["id"]: j for j in resp["jobs"] if j["id"] in by_job}
            # Done when every job expected at rest is at rest, and every job expected to wait
            # (queued/blocked) is waiting there.
            done = len(jobs) == len(by_job) and all(
                (jobs[j]["stage"] in RESTING) if expect[f] in RESTING else (jobs[j]["stage"] == expect[f])
                for j, f in by_job.items()
            )
            counts: dict[str, int] = {}
            for j in jobs.values():
                counts[j["stage"]] = counts.get(j["stage"], 0) + 1
            line = f"[{time.monotonic() - t0:5.1f}s] " + " · ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            if not as_json:
                if tty:
                    click.echo("\r" + line.ljust(len(last)), nl=False, err=True)
                elif line.split("] ")[1] != last.split("] ")[-1]:
                    click.echo(line, err=True)
            last = line
            settled = done and time.monotonic() - t0 > 1.0
            if settled or time.monotonic() > deadline or procs.dead():
                break
            await asyncio.sleep(0.25)
        if tty:
            click.echo("", err=True)
        out = []
        for job, f in sorted(by_job.items(), key=lambda kv: kv[1]):
            st = await client.call("status", {"job": job, "events": 0})
            stage = st["job"]["stage"]
            attempts = (st.get("record") or {}).get("attempts") or []
            ok = stage == expect[f]
            resumed = None
            if f in kills:
                # Killed mid-run: it must have been resumed from its checkpoint, not started over.
                st = await client.call("status", {"job": job, "events": 200})
                resumed = next((e for e in st.get("events") or [] if e.get("kind") == "resumed"), None)
                ok = ok and job in killed and resumed is not None
            out.append({"file": f, "job": job, "expected": expect[f], "stage": stage,
                        "attempt": st["job"]["attempt"], "ok": ok, "why": st["why"],
                        "info": st["info"], "workspace": attempts[-1].get("workspace") if attempts else None,
                        **({"killed": killed.get(job), "resumed": (resumed or {}).get("reason")} if f in kills else {})})
        err = ("died: " + ", ".join(procs.dead())) if procs.dead() else None
        return {"jobs": out, "elapsed_s": time.monotonic() - t0, **({"error": err} if err else {})}
    finally:
        await client.close()
