"""Declared engines: an agent CLI added by a declaration file, no Python.

The CLI under test is real: a small Python program written into the test's folder and put on
PATH (``fakecli``). It reads its prompt (argv, stdin or a file, as declared), edits a file in its
working directory, prints JSON-lines events with usage, and fails on request with the messages a
provider's errors give. It is declared, probed, prepared and run through the engine (its own
process group under the supervisor) and, once, through a whole factory on a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from helpers import Fleet, fast_settings, run

from gigafactory.factory import engines, probe
from gigafactory.factory.engines import declared
from gigafactory.factory.engines.base import EngineJob, SetupFailed
from gigafactory.factory.engines.declared import DeclarationError, DeclaredEngine, DeclaredParser, read_declaration
from gigafactory.schemas.pricing import load_table
from gigafactory.schemas.manifest import Budget, FailureClass, Manifest

pytestmark = pytest.mark.timeout(120)

FAKECLI = r'''#!{python}
"""A tiny agent CLI for the declared-engine tests (see tests/test_engines_declared.py)."""
import json, os, sys, time

args = sys.argv[1:]
if args == ["--version"]:
    print("fakecli version 1.4.2")
    sys.exit(0)
def opt(name):
    return args[args.index(name) + 1] if name in args else None
if "--prompt-file" in args:
    prompt = open(opt("--prompt-file"), encoding="utf-8").read()
elif "--prompt" in args:
    prompt = opt("--prompt")
else:
    prompt = sys.stdin.read()
with open(".fakecli-trace.json", "w") as f:
    json.dump({"argv": args, "prompt": prompt, "env": dict(os.environ)}, f)
def say(ev):
    print(json.dumps(ev), flush=True)
model = opt("--model") or "unnamed"
if "FAIL-RATE" in prompt:
    print("Error: 429 Too Many Requests, retry after 7 s", file=sys.stderr, flush=True)
    sys.exit(1)
if "FAIL-AUTH" in prompt:
    say({"type": "error", "message": "request failed: 401 invalid api key"})
    sys.exit(2)
if "SOFT-FAIL" in prompt:
    # Some CLIs exit 0 after giving up on an error (Aider does): only the words say it failed.
    print("litellm.RateLimitError: quota exhausted", file=sys.stderr, flush=True)
    sys.exit(0)
if "LOOP" in prompt:
    # Reports usage every few milliseconds for up to 60 s: only a budget stop ends it early.
    for i in range(1200):
        say({"type": "usage", "model": model, "usage": {"input": 50, "output": 10}})
        time.sleep(0.05)
    open("loop-finished.txt", "w").close()
    sys.exit(0)
say({"type": "text", "text": "Writing hello.txt."})
with open("hello.txt", "w") as f:
    f.write("edited by fakecli\n")
say({"type": "tool", "name": "write_file", "input": {"path": "hello.txt"}})
print("a plain line on stderr", file=sys.stderr, flush=True)
say({"type": "usage", "model": model, "usage": {"input": 1200, "output": 300, "cached": 200}})
say({"type": "usage", "model": model, "usage": {"input": 800, "output": 100, "cached": 0}})
if "REPORT-COST" in prompt:
    say({"type": "result", "cost": 0.0421})
say({"type": "text", "text": "Done."})
'''

DECLARATION = {
    "name": "fakecli",
    "engine-class": "agentic-coder",
    "description": "the test's own agent CLI",
    "binary": "fakecli",
    "version-regex": r"version (\d+\.\d+\.\d+)",
    "min-version": "1.0",
    "below-version": "2.0",
    "args": ["run", "{model_args}", "{mode_args}", "--prompt-file", "{prompt_file}"],
    "prompt": "file",
    "model-args": ["--model", "{model}"],
    "default-model": "gpt-4.1",
    "yolo-args": ["--yolo"],
    "safe-args": ["--safe"],
    "env": {"FAKECLI_MODE": "scripted", "FAKECLI_JOB": "{job}-e{epoch}"},
    "credentials": ["FAKECLI_API_KEY"],
    "base-url-env": "FAKECLI_BASE_URL",
    "output": {
        "format": "jsonl", "event-type": "type", "usage-events": ["usage", "result"],
        "input-tokens": "usage.input", "output-tokens": "usage.output", "cache-read-tokens": "usage.cached",
        "input-includes-cache": True, "cost-usd": "cost", "model": "model",
        "tool-events": ["tool"], "tool-name": "name", "tool-input": "input",
        "text-events": ["text"], "text": "text", "error-events": ["error"], "error": "message",
    },
    "error-patterns": {"rate_limited": ["429 Too Many Requests"], "auth_failed": ["\\b401\\b"]},
    "retry-after-pattern": r"retry after (\d+) s",
}


@pytest.fixture
def declared_cli(tmp_path, monkeypatch):
    """``fakecli`` on PATH, its credential set, and a folder declaring it; yields that folder.
    The declared engine is removed from the registry afterwards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "fakecli"
    exe.write_text(FAKECLI.replace("{python}", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKECLI_API_KEY", "sk-fake")
    monkeypatch.setenv("FAKECLI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("GIGAFACTORY_TEST_SECRET", "must-not-leak")
    d = tmp_path / "engines"
    d.mkdir()
    write_decl(d, DECLARATION)
    yield d
    engines.unregister("fakecli")


def write_decl(d: Path, doc: dict, name: str | None = None, suffix: str = ".yaml") -> Path:
    p = d / f"{name or doc['name']}{suffix}"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def engine_from(d: Path, **changes) -> DeclaredEngine:
    doc = {**DECLARATION, **changes}
    doc = {k: v for k, v in doc.items() if v is not None}
    return DeclaredEngine(read_declaration(write_decl(d, doc)))


def make_job(tmp_path: Path, *, body: str = "Create hello.txt.", model: str | None = None, yolo: bool = False,
             budget: Budget | None = None, outputs: list | None = None) -> EngineJob:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    logs = tmp_path / "factory" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return EngineJob(
        job="j1", epoch=3, attempt=1, factory="fx", station=0,
        manifest=Manifest(engine="fakecli", cwd=str(repo), model=model, yolo=yolo, budget=budget or Budget()),
        body=body, cwd=repo, log_path=str(logs / "attempt.log"),
        gf_env={"GF_JOB_ID": "j1", "GF_EPOCH": "3", "GF_BRANCH": "gf/j1/e3"}, timeout_s=60.0,
        timeout_class=FailureClass.TIMEOUT, header="# test\n",
        on_output=(outputs.append if outputs is not None else (lambda _c: None)),
        cancel=asyncio.Event(), fence=None, supervised=True,
    )


async def run_engine(eng: DeclaredEngine, job: EngineJob):
    job.parser = eng.parser()
    prepared = await asyncio.to_thread(eng.prepare, job)
    return prepared, await eng.run(job, prepared)


def trace(job: EngineJob) -> dict:
    return json.loads((job.cwd / ".fakecli-trace.json").read_text())


# ---------------------------------------------------------------------------------------------
# Running the declared CLI through the engine


@pytest.mark.parametrize("mode,args", [
    ("file", ["run", "{model_args}", "{mode_args}", "--prompt-file", "{prompt_file}"]),
    ("argv", ["run", "{model_args}", "{mode_args}", "--prompt", "{prompt}"]),
    ("stdin", ["run", "{model_args}", "{mode_args}"]),
])
def test_a_declared_cli_edits_the_file_and_reports_priced_usage(declared_cli, tmp_path, mode, args):
    eng = engine_from(declared_cli, prompt=mode, args=args)
    job = make_job(tmp_path, body="- Create hello.txt.\n- Then stop.")
    prepared, out = asyncio.run(run_engine(eng, job))
    assert out.failure is None, out
    assert (job.cwd / "hello.txt").read_text() == "edited by fakecli\n"
    t = trace(job)
    # The prompt arrived whole, whichever way it was declared to be passed.
    assert t["prompt"] == "- Create hello.txt.\n- Then stop."
    assert t["argv"][:3] == ["run", "--model", "gpt-4.1"] and "--safe" in t["argv"] and "--yolo" not in t["argv"]
    u = out.usage
    # Input includes cache (declared): the uncached input is 2000 - 200.
    assert (u.model, u.input_tokens, u.output_tokens, u.cache_read_tokens, u.tool_calls) == ("gpt-4.1", 1800, 400, 200, 1)
    assert u.cost_source == "priced" and u.price_table == load_table().version
    assert u.cost_usd == pytest.approx((1800 * 2.0 + 200 * 0.5 + 400 * 8.0) / 1e6)
    # The private HOME of the attempt is gone after the run.
    assert not Path(prepared.env["HOME"]).exists()


def test_the_engine_sees_only_its_declared_environment(declared_cli, tmp_path):
    eng = engine_from(declared_cli)
    job = make_job(tmp_path, yolo=True, model="gpt-4.1-mini")
    _, out = asyncio.run(run_engine(eng, job))
    assert out.failure is None, out
    t = trace(job)
    env = t["env"]
    assert env["FAKECLI_API_KEY"] == "sk-fake" and env["FAKECLI_BASE_URL"] == "http://127.0.0.1:9/v1"
    assert env["FAKECLI_MODE"] == "scripted" and env["FAKECLI_JOB"] == "j1-e3"  # fixed env, templated
    assert env["GF_JOB_ID"] == "j1" and env["GF_BRANCH"] == "gf/j1/e3"
    assert "GIGAFACTORY_TEST_SECRET" not in env  # never the factory's whole environment
    assert env["HOME"] != os.environ.get("HOME")
    assert "--yolo" in t["argv"] and "--safe" not in t["argv"]
    assert t["argv"][t["argv"].index("--model") + 1] == "gpt-4.1-mini"  # the job's model wins


def test_a_reported_cost_is_kept_as_reported(declared_cli, tmp_path):
    eng = engine_from(declared_cli)
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, body="REPORT-COST please")))
    assert out.failure is None, out
    assert (out.usage.cost_usd, out.usage.cost_source) == (0.0421, "reported")


def test_an_unknown_model_is_never_priced_as_zero(declared_cli, tmp_path):
    eng = engine_from(declared_cli)
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, model="no-such-model")))
    assert out.failure is None
    assert (out.usage.model, out.usage.cost_usd, out.usage.cost_source) == ("no-such-model", None, "unknown")


def test_error_patterns_name_the_failure_class(declared_cli, tmp_path):
    eng = engine_from(declared_cli)
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, body="FAIL-RATE")))
    assert out.failure == FailureClass.RATE_LIMITED and out.exit_code == 1, out
    assert out.retry_after_s == 7.0 and "429 Too Many Requests" in out.detail
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, body="FAIL-AUTH")))
    assert out.failure == FailureClass.AUTH_FAILED and out.exit_code == 2, out
    assert "invalid api key" in out.detail


def test_without_a_declared_pattern_a_failure_is_a_crash_with_its_message(declared_cli, tmp_path):
    eng = engine_from(declared_cli, **{"error-patterns": {"context_overflow": ["context window"]}})
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, body="FAIL-RATE")))
    # The built-in words still know a 429; a declaration only adds to them.
    assert out.failure == FailureClass.RATE_LIMITED, out
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, body="FAIL-AUTH")))
    assert out.failure == FailureClass.AUTH_FAILED, out


@pytest.mark.parametrize("on_success,failure", [(True, FailureClass.RATE_LIMITED), (False, None)])
def test_error_patterns_on_success_fail_a_run_that_exited_0(declared_cli, tmp_path, on_success, failure):
    eng = engine_from(declared_cli, **{"error-patterns": {"rate_limited": ["RateLimitError"]},
                                  "error-patterns-on-success": on_success})
    _, out = asyncio.run(run_engine(eng, make_job(tmp_path, body="SOFT-FAIL")))
    assert out.exit_code == 0 and out.failure == failure, out


def test_a_missing_model_is_refused_at_prepare(declared_cli, tmp_path):
    eng = engine_from(declared_cli, args=["run", "--model", "{model}", "--prompt-file", "{prompt_file}"],
                      **{"default-model": None, "model-args": None, "yolo-args": None, "safe-args": None})
    with pytest.raises(SetupFailed, match="needs a model: set 'model:' in the job, or 'default-model'"):
        eng.prepare(make_job(tmp_path))


def test_the_parser_reads_usage_in_any_chunking(declared_cli):
    eng = engine_from(declared_cli)
    stream = (b'{"type":"text","text":"hi"}\nnot json\n{"type":"usage","model":"gpt-4.1","usage":{"input":10,'
              b'"output":5}}\n{"type":"tool","name":"edit","input":{"path":"a"}}\n{"type":"usage","usage":{"input":1,"output":1}}')
    for size in (1, 7, 1000):
        p = eng.parser()
        said = []
        for i in range(0, len(stream), size):
            said += p.feed(stream[i:i + size])
        said += p.finish()
        u = p.usage()
        assert (u.input_tokens, u.output_tokens, u.tool_calls, u.model) == (11, 6, 1, "gpt-4.1")
        assert [s.kind for s in said] == ["progress", "usage", "progress", "usage"]
        assert said[2].data == {"tool": "edit", "input": '{"path": "a"}'}
    assert DeclaredParser(eng.dec).usage() is None  # nothing read: no usage, not zeros


def test_a_text_output_reads_usage_by_regex(declared_cli):
    eng = engine_from(declared_cli, output={
        "format": "text", "input-tokens": r"Tokens: (\d[\d,]*) sent", "output-tokens": r"(\d+) received",
        "cost-usd": r"Cost: \$(\d+\.\d+)", "tool-pattern": r"^Applied edit to (\S+)"})
    p = eng.parser()
    said = p.feed(b"Applied edit to a.py\nTokens: 1,200 sent, 30 received.\nTokens: 100 sent, 3 received. Cost: $0.02\n")
    u = p.usage()
    assert (u.input_tokens, u.output_tokens, u.tool_calls, u.cost_usd, u.cost_source) == (1300, 33, 1, 0.02, "reported")
    assert [s.kind for s in said] == ["progress", "usage", "usage"]


def test_total_counts_take_the_last_event(declared_cli):
    eng = engine_from(declared_cli, output={**DECLARATION["output"], "usage-counts": "total"})
    p = eng.parser()
    p.feed(b'{"type":"usage","usage":{"input":10,"output":5}}\n{"type":"usage","usage":{"input":30,"output":9}}\n')
    assert (p.usage().input_tokens, p.usage().output_tokens) == (30, 9)


# ---------------------------------------------------------------------------------------------
# The probe


def test_the_probe_offers_an_installed_credentialed_declared_engine(declared_cli, monkeypatch):
    assert engines.load_declared(declared_cli) == {}
    eng = engines.get("fakecli")
    assert isinstance(eng, DeclaredEngine)
    toks = probe.engine_tokens(environ=os.environ, path=os.environ["PATH"], timeout_s=10)
    assert "engine:fakecli" in toks and "fakecli:1.4.2" in toks and "engine-class:agentic-coder" in toks
    # Without its credential it is not offered, and the probe says why.
    env = {k: v for k, v in os.environ.items() if k != "FAKECLI_API_KEY"}
    found = eng.probe(environ=env, path=env["PATH"], timeout_s=10)
    assert not found.runnable and "FAKECLI_API_KEY" in found.why and found.credentials == {"FAKECLI_API_KEY": False}
    assert "engine:fakecli" not in probe.engine_tokens(environ=env, path=env["PATH"], timeout_s=10)


def test_the_probe_refuses_a_version_outside_the_declared_range(declared_cli):
    eng = engine_from(declared_cli, **{"min-version": "1.5"})
    found = eng.probe(environ=os.environ, path=os.environ["PATH"], timeout_s=10)
    assert not found.runnable and found.version == "1.4.2" and "outside the declared range [1.5" in found.why


def test_the_probe_says_when_the_binary_is_missing(declared_cli):
    eng = engine_from(declared_cli, binary="no-such-cli-here")
    found = eng.probe(environ=os.environ, path=os.environ["PATH"], timeout_s=10)
    assert not found.runnable and "'no-such-cli-here' is not on the factory's PATH" in found.why


def test_credentials_required_none_runs_without_any(declared_cli, monkeypatch):
    monkeypatch.delenv("FAKECLI_API_KEY")
    eng = engine_from(declared_cli, **{"credentials-required": "none"})
    assert eng.probe(environ=os.environ, path=os.environ["PATH"], timeout_s=10).runnable


# ---------------------------------------------------------------------------------------------
# Bad declarations: named errors, skipped, never fatal


@pytest.mark.parametrize("change,field,words", [
    ({"nmae": "x"}, "nmae", "did you mean 'name'"),
    ({"binary": None}, "binary", "is required"),
    ({"engine-class": "wizard"}, "engine-class", "use one of agentic-coder"),
    ({"prompt": "pigeon"}, "prompt", "use argv, stdin or file"),
    ({"args": ["run", "{promt_file}"]}, "args[1]", "'{promt_file}' is not a placeholder"),
    ({"args": ["run", "{prompt_file}"]}, "args", "'{mode_args}'"),
    ({"version-regex": "version (\\d+"}, "version-regex", "not a valid regular expression"),
    ({"version-regex": "version \\d+"}, "version-regex", "exactly 1 group"),
    ({"error-patterns": {"on_fire": ["x"]}}, "error-patterns", "'on_fire' is not a failure class"),
    ({"credentials": ["NOT-A-VAR"]}, "credentials[0]", "not an environment variable name"),
    ({"env": {"GF_JOB_ID": "x"}}, "env.GF_JOB_ID", "set by the factory"),
    ({"output": {"format": "jsonl", "inputtokens": "a"}}, "output.inputtokens", "did you mean 'output.input-tokens'"),
    ({"output": {"format": "text", "event-type": "kind"}}, "output.event-type", "format: jsonl only"),
    ({"output": {"format": "jsonl", "input-tokens": "usage..in"}}, "output.input-tokens", "not a field name"),
    ({"args": ["x"] * 65}, "args", "at most 64"),
])
def test_a_bad_declaration_is_refused_naming_file_and_field(declared_cli, change, field, words):
    doc = {**DECLARATION, **change}
    doc = {k: v for k, v in doc.items() if v is not None}
    p = write_decl(declared_cli, doc, name="fakecli")
    with pytest.raises(DeclarationError) as e:
        read_declaration(p)
    assert e.value.field == field and str(p) in str(e.value) and words in str(e.value), str(e.value)


def test_a_declaration_never_shadows_a_built_in_engine(declared_cli):
    p = write_decl(declared_cli, {**DECLARATION, "name": "claude"})
    errors = engines.load_declared(declared_cli)
    assert "a declaration may not replace it" in errors[str(p)] and "field 'name'" in errors[str(p)]
    assert not isinstance(engines.get("claude"), DeclaredEngine)
    assert isinstance(engines.get("fakecli"), DeclaredEngine)  # the good file beside it still loads
    assert engines.declaration_errors()[str(p)] == errors[str(p)]


def test_size_limits_and_broken_files_are_named_and_skipped(declared_cli):
    big = declared_cli / "huge.yaml"
    big.write_text("name: huge\n# " + "x" * declared.MAX_DECLARATION_BYTES + "\n")
    broken = declared_cli / "broken.toml"
    broken.write_text("name = [unclosed\n")
    other = declared_cli / "mismatch.yaml"
    other.write_text(yaml.safe_dump({**DECLARATION, "name": "fakecli2"}))
    errors = engines.load_declared(declared_cli)
    assert f"over the {declared.MAX_DECLARATION_BYTES}-byte limit" in errors[str(big)]
    assert "is not valid TOML" in errors[str(broken)]
    assert "differs from the file's name 'mismatch'" in errors[str(other)]
    assert isinstance(engines.get("fakecli"), DeclaredEngine)


def test_a_toml_declaration_loads(declared_cli):
    doc = {k: v for k, v in DECLARATION.items()}
    lines = []
    for k, v in doc.items():
        if isinstance(v, dict):
            continue
        lines.append(f"{json.dumps(k)} = {json.dumps(v)}")
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{json.dumps(k)}]")
            lines += [f"{json.dumps(kk)} = {json.dumps(vv)}" for kk, vv in v.items()]
    (declared_cli / "fakecli.yaml").unlink()
    p = declared_cli / "fakecli.toml"
    p.write_text("\n".join(lines) + "\n")
    dec = read_declaration(p)
    assert dec.name == "fakecli" and dec.output.format == "jsonl" and dec.credentials == ("FAKECLI_API_KEY",)


def test_a_missing_engines_folder_is_reported_not_fatal(tmp_path):
    errors = engines.load_declared(tmp_path / "nope")
    assert "is not a directory" in errors[str(tmp_path / "nope")]


def test_the_shipped_example_is_a_valid_declaration():
    root = Path(__file__).resolve().parent.parent / "examples" / "engines"
    files = sorted(root.glob("*.yaml"))
    assert files, "no example declaration shipped"
    for f in files:
        dec = read_declaration(f, reserved=sorted(engines.builtin_names()))
        assert dec.name == f.stem


# ---------------------------------------------------------------------------------------------
# Through a whole factory on a real broker


def test_a_declared_engine_ships_a_job_and_is_stopped_by_its_budget(declared_cli, nats_server, tmp_path):
    settings = fast_settings(engines_dir=str(declared_cli))
    # A bad declaration beside the good one: reported and skipped, the factory starts anyway.
    (declared_cli / "broken.yaml").write_text("name: broken\nengine-class: agentic-coder\nbinary: x\nargs: [oops\n")

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("decl-1", probe=True)
            assert "engine:fakecli" in f.offers.tokens and "fakecli:1.4.2" in f.offers.tokens
            assert "is not valid YAML" in engines.declaration_errors()[str(declared_cli / "broken.yaml")]
            job = await fleet.submit_one(fleet.job("Create hello.txt.", engine="fakecli", verify="test -f hello.txt",
                                                   review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=60)
            assert str(rec.stage) == "shipped", rec.attempts
            assert (fleet.repo / "hello.txt").read_text() == "edited by fakecli\n"
            usage = rec.attempts[-1].usage
            assert (usage.input_tokens, usage.output_tokens, usage.cost_source) == (1800, 400, "priced"), usage
            evs = [e for e in await fleet.events(job) if e["kind"] == "usage"]
            assert evs and evs[-1]["data"]["input_tokens"] == 1800

            # A budget stop mid-run: each usage event is 60 tokens; 200 are allowed.
            job2 = await fleet.submit_one(fleet.job("LOOP until stopped", engine="fakecli", budget={"tokens": 200},
                                                    retry={"max": 0}), path="loop.md")
            rec2 = await fleet.wait_stage(job2, "failed", "dead_letter", "shipped", timeout_s=60)
            a = rec2.attempts[-1]
            assert a.outcome == "budget_exceeded" and "budget.tokens exceeded" in a.detail, rec2.attempts
            assert a.usage.input_tokens + a.usage.output_tokens > 200
            assert not (fleet.repo / "loop-finished.txt").exists()  # stopped, not finished

    run(main(), timeout_s=110)


def test_the_opencode_example_reads_its_documented_event_stream():
    """The shipped example against a stream written from OpenCode's documented ``run --format
    json`` events (step_finish carries tokens and cost; a 0 cost means no price known)."""
    f = Path(__file__).resolve().parent.parent / "examples" / "engines" / "opencode.yaml"
    eng = DeclaredEngine(read_declaration(f, reserved=sorted(engines.builtin_names())))
    events = [
        {"type": "step_start", "part": {"type": "step-start"}},
        {"type": "text", "part": {"type": "text", "text": "Editing hello.txt"}},
        {"type": "tool_use", "part": {"type": "tool", "tool": "write", "state": {"status": "completed",
                                                                                 "input": {"filePath": "hello.txt"}}}},
        {"type": "step_finish", "part": {"reason": "tool-calls", "cost": 0, "tokens": {
            "input": 1000, "output": 50, "reasoning": 10, "cache": {"read": 200, "write": 0}}}},
        {"type": "step_finish", "part": {"reason": "stop", "cost": 0, "tokens": {
            "input": 100, "output": 20, "reasoning": 0, "cache": {"read": 1200, "write": 0}}}},
    ]
    p = eng.parser()
    p.model = "anthropic/claude-sonnet-4-5"
    said = p.feed("".join(json.dumps(e) + "\n" for e in events).encode())
    u = p.usage()
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.turns, u.tool_calls) == \
        (1100, 80, 1400, 0, 2, 1)
    assert u.cost_source == "priced" and u.cost_usd > 0  # a printed 0 is not a reported zero
    assert {"tool": "write", "input": '{"filePath": "hello.txt"}'} in [s.data for s in said]
    p.feed(b'{"type":"error","error":{"name":"APIError","data":{"message":"401 invalid x-api-key"}}}\n')
    assert p.failure()[0] == "auth_failed"
    # Its safe-mode configuration is valid JSON once its doubled braces are expanded.
    safe = json.loads(declared.expand(eng.dec.safe_env["OPENCODE_CONFIG_CONTENT"], {}))
    assert safe["permission"]["bash"] == "deny"


# ---------------------------------------------------------------------------------------------
# A declaration drives a real agent CLI: Codex, against the scripted model server

CODEX_DECLARATION = {
    "name": "codex-declared",
    "engine-class": "agentic-coder",
    "binary": "codex",
    "args": ["exec", "--json", "--skip-git-repo-check", "{model_args}", "{base_url_args}", "{mode_args}", "--",
             "{prompt}"],
    "model-args": ["-m", "{model}"],
    "default-model": "gpt-5",
    "base-url-env": "GF_TEST_CODEX_BASE_URL",
    "base-url-args": ["-c", "model_provider=gf", "-c",
                      'model_providers.gf={{name="gf", base_url="{base_url}", env_key="OPENAI_API_KEY", '
                      'wire_api="responses", stream_max_retries=0}}'],
    "yolo-args": ["--dangerously-bypass-approvals-and-sandbox"],
    "safe-args": ["--sandbox", "workspace-write"],
    "credentials": ["OPENAI_API_KEY"],
    "env": {"CODEX_HOME": "{home}"},
    "output": {
        "format": "jsonl", "event-type": ["type", "item.type"], "usage-events": ["turn.completed"],
        "input-tokens": "usage.input_tokens", "cache-read-tokens": "usage.cached_input_tokens",
        "output-tokens": "usage.output_tokens", "input-includes-cache": True,
        "tool-events": ["item.completed/command_execution", "item.completed/file_change"],
        "tool-name": "item.type", "tool-input": "item.command",
        "text-events": ["item.completed/agent_message"], "text": "item.text",
        "error-events": ["turn.failed", "error"], "error": ["message", "error.message"],
    },
}


def test_a_declaration_drives_the_real_codex_cli(tmp_path, monkeypatch):
    from gigafactory import agent_clis
    from gigafactory.model_server import parse_script, serve_in_thread

    cli = agent_clis.find_cli("codex")
    if cli is None:
        pytest.fail(agent_clis.missing_message("codex"))
    monkeypatch.setenv("PATH", f"{Path(cli).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-scripted")
    monkeypatch.setenv("GIGAFACTORY_TEST_SECRET", "must-not-leak")
    d = tmp_path / "engines"
    d.mkdir()
    eng = DeclaredEngine(read_declaration(write_decl(d, CODEX_DECLARATION), reserved=sorted(engines.builtin_names())))
    found = eng.probe(environ=os.environ, path=os.environ["PATH"], timeout_s=30)
    assert found.runnable and found.version, found
    script = {"turns": [{"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt",
                                                                                    "content": "hi from codex\n"}}]},
                        {"text": "All done."}]}
    with serve_in_thread(parse_script(script), log_path=tmp_path / "server.jsonl") as server:
        monkeypatch.setenv("GF_TEST_CODEX_BASE_URL", f"{server.url}/v1")
        outputs: list[bytes] = []
        job = make_job(tmp_path, yolo=True, body="Create hello.txt as scripted.", outputs=outputs)
        prepared, out = asyncio.run(run_engine(eng, job))
    assert out.failure is None, (out, b"".join(outputs)[-2000:])
    assert (job.cwd / "hello.txt").read_text() == "hi from codex\n"
    u = out.usage
    assert u.model == "gpt-5" and u.input_tokens > 0 and u.output_tokens > 0 and u.tool_calls == 1
    assert u.cost_source == "priced" and u.cost_usd > 0
    assert "OPENAI_API_KEY" in prepared.env and "GIGAFACTORY_TEST_SECRET" not in prepared.env

    with serve_in_thread(parse_script({"turns": [{"error": {"status": 401, "times": 50}}]})) as server:
        monkeypatch.setenv("GF_TEST_CODEX_BASE_URL", f"{server.url}/v1")
        _, out = asyncio.run(run_engine(eng, make_job(tmp_path, yolo=True, body="Create hello.txt.")))
    assert out.failure == FailureClass.AUTH_FAILED, out


def test_the_parser_takes_no_garbage_for_usage(declared_cli):
    p = engine_from(declared_cli).parser()
    p.feed(b'{"type":"usage","usage":{"input":"1e400","output":-5},"cost":"inf"}\n[1,2]\n"text"\n'
           b'{"type":"usage","usage":{"input":"' + b"9" * 5000 + b'","output":true}}\n{"type":"usage","usage":7}\n')
    assert p.usage() is None  # no count, no cost: nothing made up


def test_version_bounds_compare_missing_parts_as_zero(declared_cli):
    assert engine_from(declared_cli, **{"min-version": "1.4.2.0", "below-version": "1.4.3"}).probe(
        environ=os.environ, path=os.environ["PATH"], timeout_s=10).runnable
    found = engine_from(declared_cli, **{"min-version": "1.0", "below-version": "1.4.2.0"}).probe(
        environ=os.environ, path=os.environ["PATH"], timeout_s=10)
    assert not found.runnable and "outside the declared range" in found.why


SLOW_VERSION = r'''#!{python}
"""`--version` that answers only once the other engine's `--version` has started too."""
import pathlib, sys, time
here = pathlib.Path({marks!r})
(here / "{me}.started").touch()
deadline = time.monotonic() + 20
while not (here / "{other}.started").exists():
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.02)
print("{me} version 1.0.0")
'''


def test_engines_are_probed_in_parallel(tmp_path, monkeypatch):
    """Each engine's version command waits for the other's to have started: probed one after
    the other, the first misses its time limit and is not offered (an agent CLI's `--version`
    takes seconds on a busy machine, so the sum of them once cost a factory its Gemini CLI)."""
    bin_dir, marks, d = tmp_path / "bin", tmp_path / "marks", tmp_path / "engines"
    for p in (bin_dir, marks, d):
        p.mkdir()
    for me, other in (("slowa", "slowb"), ("slowb", "slowa")):
        exe = bin_dir / me
        exe.write_text(SLOW_VERSION.replace("{python}", sys.executable).replace("{marks!r}", repr(str(marks)))
                       .replace("{me}", me).replace("{other}", other))
        exe.chmod(0o755)
        write_decl(d, {**DECLARATION, "name": me, "binary": me, "credentials-required": "none",
                       "version-regex": r"version (\d+\.\d+\.\d+)"})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        assert engines.load_declared(d) == {}
        toks = probe.engine_tokens(environ=os.environ, path=os.environ["PATH"], timeout_s=5)
        assert "engine:slowa" in toks and "engine:slowb" in toks, toks
    finally:
        engines.unregister("slowa")
        engines.unregister("slowb")


@pytest.mark.parametrize("value", ["0", "-1", "601"])
def test_probe_timeout_s_out_of_range_is_refused_by_name(value):
    from gigafactory.config import Settings, SettingsError

    with pytest.raises(SettingsError, match="GIGAFACTORY_PROBE_TIMEOUT_S"):
        Settings.from_env({"GIGAFACTORY_PROBE_TIMEOUT_S": value}).validate()
