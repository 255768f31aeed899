"""``gigafactory demo --agents``: every installed agent CLI edits a small git repo through a real
fleet, driven by the scripted model server (no keys, no spend).

One scripted model server per CLI (in-process threads: each replays its own script, so the CLIs'
turns never interleave), an embedded nats-server, a coordinator and one probing factory (separate
processes, as in the plain demo) whose environment points each CLI at its server. One job per
engine writes ``hello.txt`` in a fresh repo; each must end ``shipped`` (review-policy auto, verify
``test -f hello.txt``) with usage recorded. Exit 0 only if all do; 1 if none is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import click
import orjson
import yaml

from gigafactory import agent_clis
from gigafactory.client import Client
from gigafactory.demo import DEMO_SETTINGS, Procs, demo_env, demo_identities, make_scratch_repo, text_table
from gigafactory.embedded import EmbeddedServer
from gigafactory.model_server import parse_script, serve_in_thread

CONTENT = "hello from the scripted model\n"
# The model each engine asks for: codex, gemini, copilot and aider need an explicit one.
MODELS = {"claude": "claude-sonnet-4-5", "codex": "gpt-5", "gemini": "gemini-2.5-flash", "copilot": "gpt-4.1",
          "aider": "gpt-4.1"}
_WRITE = {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]}
TERMINAL = ("shipped", "failed", "dead_letter", "cancelled")
MAX_FLEET_UP_S = 60.0


def _script(engine: str) -> dict:
    # Aider edits through its reply text: its requests declare no tools, so each is a turn.
    if engine == "aider":
        return {"tool_less_requests": "turn", "turns": [_WRITE]}
    return {"turns": [_WRITE, {"text": "All done."}]}


def _engine_env(engine: str, url: str) -> dict[str, str]:
    """The variables that point ``engine`` at the scripted server at ``url`` (as the engine tests)."""
    key = "sk-scripted"
    return {
        "claude": {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": key},
        "codex": {"GIGAFACTORY_CODEX_BASE_URL": f"{url}/v1", "GIGAFACTORY_CODEX_API_KEY_VAR": "GIGAFACTORY_DEMO_CODEX_KEY",
                  "GIGAFACTORY_DEMO_CODEX_KEY": key},
        "gemini": {"GOOGLE_GEMINI_BASE_URL": url, "GEMINI_API_KEY": key},
        "copilot": {"COPILOT_PROVIDER_BASE_URL": f"{url}/v1", "COPILOT_PROVIDER_API_KEY": key},
        "aider": {"OPENAI_API_BASE": f"{url}/v1", "OPENAI_API_KEY": key},
    }[engine]


def install_hint() -> str:
    pkgs = ", ".join(f"{n}: {agent_clis.CACHE_PATHS[n][1]}@{agent_clis.pinned_version(n)}" for n in agent_clis.CLIS)
    return (f"no agent CLI is installed (looked on PATH and in {agent_clis.cache_dir()}). From a checkout run "
            f"{agent_clis.INSTALL_SCRIPT} (it installs the pinned CLIs into that folder, GIGAFACTORY_AGENT_CLIS), "
            f"or install them yourself: npm install -g for the npm ones, pip install for aider-chat ({pkgs}).")


def run_demo_agents(*, workdir: str | None, timeout_s: float, as_json: bool) -> int:
    """Run the agents demo. Parameters: ``workdir`` where it keeps everything (default a temp
    folder, removed on success); ``timeout_s`` bound on the whole run after the fleet is up;
    ``as_json`` print one JSON document instead of the table. Returns the exit code."""
    engines = [n for n in agent_clis.CLIS if agent_clis.find_cli(n)]
    if not engines:
        click.secho(f"error: {install_hint()}", fg="red", err=True)
        return 1
    if shutil.which("git") is None:
        click.secho("error: the demo's jobs change git repositories: install git", fg="red", err=True)
        return 2
    temp = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="gigafactory-demo-agents-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    workspace = root / "workspace"
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    repos = {}
    for e in engines:
        repos[e] = workspace / f"repo-{e}"
        if repos[e].exists():
            shutil.rmtree(repos[e])
        make_scratch_repo(repos[e])
    srv = None
    procs = Procs()
    with contextlib.ExitStack() as stack:
        servers = {e: stack.enter_context(serve_in_thread(parse_script(_script(e)), log_path=root / f"model-{e}.jsonl"))
                   for e in engines}
        try:
            # Authentication on, as `gigafactory up` (see demo.demo_identities).
            users, creds = demo_identities(root, ["agents"])
            srv = EmbeddedServer(store_dir=str(root / "nats"), log_file=str(root / "nats-server.log"),
                                 users=users).start()
            say(f"broker   {srv.url}  (data in {root}, authentication on)")
            env = demo_env(DEMO_SETTINGS)
            for e in engines:
                env.update(_engine_env(e, servers[e].url))
                say(f"model    {e}: scripted server at {servers[e].url}")
            procs.start("coordinator", ["coordinator", "--nats", srv.url, "--creds", creds["coordinator"],
                                        "--log-level", "warning"], env,
                        root / "coordinator.log")
            procs.start("agents", ["factory", "--nats", srv.url, "--creds", creds["agents"], "--id", "agents", "--stations", str(len(engines)),
                                   "--workspace", str(workspace), "--data-dir", str(root / "factories"),
                                   "--log-level", "warning"], env, root / "factory-agents.log")
            result = asyncio.run(_drive(srv.url, engines, repos, timeout_s, say, procs, creds["admin"]))
        finally:
            procs.stop()
            if srv:
                srv.stop()
    ok = bool(result["jobs"]) and all(r["ok"] for r in result["jobs"]) and not result.get("error")
    if as_json:
        click.echo(orjson.dumps({**result, "ok": ok, "dir": str(root)}, option=orjson.OPT_INDENT_2).decode())
    else:
        rows = [["engine", "version", "turns", "input", "output", "cost", "source", "stage"]]
        for r in result["jobs"]:
            u = r["usage"] or {}
            cost = u.get("cost_usd")
            shown = lambda k: "-" if u.get(k) is None else str(u[k])  # noqa: E731 - an unknown count is null
            rows.append([r["engine"], r["version"] or "?", shown("turns"), shown("input_tokens"),
                         shown("output_tokens"), "-" if cost is None else f"${cost:.4f}",
                         str(u.get("cost_source") or ("unknown" if u else "-")), r["stage"]])
        click.echo("\n" + text_table(rows))
        for r in result["jobs"]:
            if not r["ok"]:
                click.echo(f"  {r['engine']}: {r['why']}")
        if result.get("error"):
            click.secho(f"\n{result['error']}", fg="red")
        click.secho(f"\n{'all' if ok else 'NOT all'} {len(result['jobs'])} agent jobs shipped with usage "
                    f"in {result['elapsed_s']:.1f}s", fg="green" if ok else "red")
        if not ok:
            click.echo(f"logs: {root}/coordinator.log, {root}/factory-agents.log, {root}/model-*.jsonl")
    if ok and temp:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def _job_text(engine: str, repo: Path) -> str:
    front = {"engine": engine, "model": MODELS[engine], "yolo": True, "cwd": str(repo), "review-policy": "auto",
             "verify": "test -f hello.txt", "timeout": "5m"}
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\nCreate hello.txt as scripted.\n"


async def _drive(url: str, engines: list[str], repos: dict[str, Path], timeout_s: float, say, procs: Procs,
                 creds: str | None = None) -> dict:
    t0 = time.monotonic()
    up_deadline = t0 + MAX_FLEET_UP_S
    client = None
    while client is None:
        try:
            client = await Client.connect(url, creds=creds)
        except Exception:
            if time.monotonic() > up_deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        versions: dict[str, str] = {}
        while True:
            if procs.dead():
                return {"jobs": [], "elapsed_s": time.monotonic() - t0, "error": "died: " + ", ".join(procs.dead())}
            try:
                fl = await client.call("factories", timeout_s=2)
                live = [f for f in fl["factories"] if f["live"]]
                if live:
                    caps = set(live[0]["capabilities"])
                    for e in engines:
                        versions.update({e: c.split(":", 1)[1] for c in caps if c.startswith(f"{e}:")})
                    offered = [e for e in engines if f"engine:{e}" in caps]
                    break
            except Exception:
                pass
            if time.monotonic() > up_deadline:
                return {"jobs": [], "elapsed_s": time.monotonic() - t0, "error": "fleet did not come up"}
            await asyncio.sleep(0.2)
        # An engine the probe does not offer (its --version failed, say) would wait queued
        # until the timeout: report it at once instead of submitting its job.
        out: list[dict] = [{"engine": e, "job": None, "version": versions.get(e, ""), "stage": "not offered",
                            "usage": None, "ok": False, "edited": False,
                            "why": f"the factory's probe did not offer engine:{e} (see {e} in factory-agents.log)"}
                           for e in engines if e not in offered]
        if not offered:
            return {"jobs": out, "elapsed_s": time.monotonic() - t0}
        files = [{"path": f"demo-{e}.md", "text": _job_text(e, repos[e])} for e in offered]
        submitted = (await client.call("submit", {"files": files}))["jobs"]
        by_engine = {e: s["job"] for e, s in zip(offered, submitted)}
        say(f"submitted {len(by_engine)} agent jobs: {', '.join(offered)}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not procs.dead():
            resp = await client.call("list", {"limit": 100000})
            stages = {j["id"]: j["stage"] for j in resp["jobs"]}
            if all(stages.get(j) in TERMINAL for j in by_engine.values()):
                break
            await asyncio.sleep(0.5)
        for e, job in by_engine.items():
            st = await client.call("status", {"job": job, "events": 0})
            stage = st["job"]["stage"]
            attempts = (st.get("record") or {}).get("attempts") or []
            usage = attempts[-1].get("usage") if attempts else None
            # A usage record carries every field, an unknown count as null (Copilot reports no tokens).
            has_usage = bool(usage) and ((usage.get("input_tokens") or 0) > 0 and (usage.get("output_tokens") or 0) > 0
                                         or e == "copilot" and (usage.get("turns") or 0) > 0)
            why = st["why"] if stage != "shipped" else ("no usage recorded" if not has_usage else "")
            out.append({"engine": e, "job": job, "version": versions.get(e, ""), "stage": stage, "usage": usage,
                        "ok": stage == "shipped" and has_usage, "why": why,
                        "edited": (repos[e] / "hello.txt").is_file()})
        out.sort(key=lambda r: agent_clis.CLIS.index(r["engine"]))
        err = ("died: " + ", ".join(procs.dead())) if procs.dead() else None
        return {"jobs": out, "elapsed_s": time.monotonic() - t0, **({"error": err} if err else {})}
    finally:
        await client.close()
