"""The ``codex`` and ``gemini`` engines: their stream parsers on the recorded transcripts, and
the engines themselves driving the REAL pinned CLIs against the scripted model server (no keys,
no spend). A missing CLI FAILS with the install hint: CI must not go green without them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gigafactory import agent_clis
from gigafactory.factory import engines
from gigafactory.factory.engines import agentcli
from gigafactory.factory.engines.base import EngineJob, SetupFailed
from gigafactory.factory.engines.codex import CodexParser
from gigafactory.factory.engines.gemini import GeminiParser
from gigafactory.schemas.pricing import load_table
from gigafactory.model_server import parse_script, serve_in_thread, tokens_for
from gigafactory.schemas.manifest import FailureClass, Manifest

FIXTURES = Path(__file__).parent / "fixtures" / "agent-transcripts"
CONTENT = "hello from the scripted model\n"
WRITE_SCRIPT = {"turns": [
    {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
    {"text": "All done."},
]}
AUTH_FAILED_SCRIPT = {"turns": [{"error": {"status": 401, "times": 50}}]}
RATE_LIMIT_FOREVER = {"turns": [{"error": {"status": 429, "retry_after_s": 1, "times": 100}}]}
RUN_PYTHON = "python3 -c \"open('ran.txt', 'w').close()\""
COMMAND_SCRIPT = {"turns": [{"tool_calls": [{"run_command": {"command": RUN_PYTHON}}]}, {"text": "Ran it."}]}


def _transcript(cli: str, case: str) -> bytes:
    """The recorded output as the engine sees it: stderr and stdout in one stream."""
    return (FIXTURES / cli / f"{case}.stderr").read_bytes() + (FIXTURES / cli / f"{case}.stdout").read_bytes()


def _feed_in_chunks(parser, data: bytes, size: int) -> list:
    said = []
    for i in range(0, len(data), size):
        said += parser.feed(data[i:i + size])
    return said + parser.finish()


# ---------------------------------------------------------------------------------------------
# Codex parser (recorded transcripts)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 20])
def test_codex_parser_reads_usage_from_turn_completed_whatever_the_chunking(chunk):
    p = CodexParser(model="gpt-5")
    said = _feed_in_chunks(p, _transcript("codex", "write"), chunk)
    u = p.usage()
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) == (20083, 44, 0, 0)
    assert (u.tool_calls, u.turns, u.model) == (1, 1, "gpt-5")
    assert u.cost_source == "priced" and u.price_table == load_table().version
    [live] = [s.data for s in said if s.kind == "usage"]
    assert (live["cost_source"], live["price_table"], live["turns"]) == ("priced", load_table().version, 1)
    assert u.cost_usd == pytest.approx((20083 * 1.25 + 44 * 10) / 1e6)
    assert [s.kind for s in said].count("usage") == 1
    texts = [s.data.get("text") for s in said if s.kind == "progress"]
    assert "All done." in texts and p.failed is None


def test_codex_parser_takes_cached_input_out_of_input_tokens():
    p = CodexParser(model="gpt-5")
    p.feed(b'{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":600,'
           b'"output_tokens":50,"reasoning_output_tokens":20}}\n')
    u = p.usage()
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens) == (400, 600, 50)
    assert u.cost_usd == pytest.approx((400 * 1.25 + 600 * 0.125 + 50 * 10) / 1e6)


def test_codex_parser_leaves_an_unknown_model_unpriced():
    p = CodexParser(model="scripted-model")
    p.feed(_transcript("codex", "write"))
    assert (p.usage().cost_usd, p.usage().cost_source) == (None, "unknown")
    assert CodexParser().usage() is None  # nothing read: no usage, not zeros


@pytest.mark.parametrize("case,cls", [("auth_failed", "auth_failed"), ("rate_limit_exhausted", "rate_limited")])
def test_codex_parser_reads_why_a_turn_failed(case, cls):
    p = CodexParser()
    _feed_in_chunks(p, _transcript("codex", case), 13)
    assert p.failed is not None and agentcli.classify_error_text(p.failed) == cls
    assert p.usage() is None


def test_codex_parser_ignores_non_json_and_oversized_lines():
    p = CodexParser(model="gpt-5")
    p.feed(b"WARNING: not json\n{broken\n")
    p.feed(b"{" + b"x" * (agentcli.MAX_LINE_BYTES + 10))
    p.feed(b"\n" + (FIXTURES / "codex" / "write.stdout").read_bytes())
    assert p.usage().input_tokens == 20083


# ---------------------------------------------------------------------------------------------
# Gemini parser (recorded transcripts)


@pytest.mark.parametrize("chunk", [1, 13, 4096, 1 << 20])
def test_gemini_parser_reads_the_final_stats_whatever_the_chunking(chunk):
    p = GeminiParser()
    said = _feed_in_chunks(p, _transcript("gemini", "write"), chunk)
    u = p.usage()
    assert (u.model, u.input_tokens, u.output_tokens, u.cache_read_tokens) == ("gemini-2.5-flash", 24634, 28, 0)
    assert (u.turns, u.tool_calls) == (2, 1)
    assert u.cost_source == "priced" and u.cost_usd == pytest.approx((24634 * 0.30 + 28 * 2.50) / 1e6)
    assert [s.kind for s in said] == ["progress", "usage"]


def test_gemini_parser_counts_turns_without_the_failed_requests():
    p = GeminiParser()
    said = p.feed(_transcript("gemini", "rate_limited"))
    assert p.usage().turns == 2  # 3 requests, 1 of them a 429
    assert p.retried_status == 429
    assert {"event": "retry", "attempt": 1, "status": 429} in [dict(s.data) for s in said]


def test_gemini_parser_reads_the_error_document_after_a_stack_trace():
    p = GeminiParser()
    _feed_in_chunks(p, _transcript("gemini", "auth_failed"), 5)
    assert p.error["code"] == 401 and p.usage() is None
    assert agentcli.classify_error_text(f"{p.error['code']} {p.error['message']}") == "auth_failed"


def test_gemini_parser_prices_each_model_and_refuses_to_guess_an_unknown_one():
    stats = {"models": {
        "gemini-2.5-pro": {"api": {"totalRequests": 1, "totalErrors": 0},
                           "tokens": {"input": 900, "prompt": 1000, "cached": 100, "candidates": 10, "thoughts": 5, "tool": 0}},
        "gemini-2.5-flash-lite": {"api": {"totalRequests": 1}, "tokens": {"prompt": 50, "candidates": 1}}},
        "tools": {"totalCalls": 0}}
    p = GeminiParser()
    p.feed(("{\n" + json.dumps({"session_id": "s", "stats": stats})[1:-1] + "\n}\n").encode())
    u = p.usage()
    assert (u.model, u.input_tokens, u.cache_read_tokens, u.output_tokens, u.turns) == ("gemini-2.5-pro", 950, 100, 16, 2)
    assert u.cost_usd == pytest.approx((900 * 1.25 + 100 * 0.125 + 15 * 10 + 50 * 0.10 + 1 * 0.40) / 1e6)
    stats["models"]["mystery-model"] = stats["models"].pop("gemini-2.5-flash-lite")
    p = GeminiParser()
    p.feed(("{\n" + json.dumps({"session_id": "s", "stats": stats})[1:-1] + "\n}\n").encode())
    assert (p.usage().cost_usd, p.usage().cost_source) == (None, "unknown")


# ---------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize("text,cls", [
    ("exceeded retry limit, last status: 429 Too Many Requests", "rate_limited"),
    ("unexpected status 401 Unauthorized: Invalid API key", "auth_failed"),
    ("Your input exceeds the context window of this model", "context_overflow"),
    ("stream disconnected before completion", None),
    # A status-like number inside a port, an address or an id is not a status (CI once hit a
    # model server on port 45429 and called a 401 a rate limit).
    ("unexpected status 401 Unauthorized: Invalid API key, url: http://127.0.0.1:45429/v1/responses",
     "auth_failed"),
    ("stream disconnected, url: http://127.0.0.1:40429/v1/responses", None),
    ("request req-429abc failed after 1429 bytes from 10.0.429.1", None),
    ("server said 429.", "rate_limited"),
    ("HTTP 403 Forbidden", "auth_failed"),
])
def test_error_messages_are_classified_by_their_words(text, cls):
    assert agentcli.classify_error_text(text) == cls


def test_failure_classes_beyond_exit_codes_exist_or_have_a_stand_in():
    for name in ("rate_limited", "auth_failed", "context_overflow"):
        assert isinstance(agentcli.failure_class(name), FailureClass)
    with pytest.raises(KeyError):
        agentcli.failure_class("no_such_class")


def test_both_engines_are_registered_as_agentic_coders():
    for name in ("codex", "gemini"):
        assert engines.get(name).name == name and engines.get(name).engine_class == "agentic-coder"


# ---------------------------------------------------------------------------------------------
# The engines, driving the real CLIs against the scripted model server


def _require(cli: str) -> None:
    if agent_clis.find_cli(cli) is None:
        pytest.fail(agent_clis.missing_message(cli))


def _repo(tmp_path: Path) -> Path:
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"],
                 ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    return repo


def _job(tmp_path: Path, repo: Path, engine: str, *, model: str | None, yolo: bool = True,
         timeout_s: float = 180.0, outputs: list | None = None) -> EngineJob:
    if model is None and engine == "codex":
        # Codex 0.169's own default model sends no tools the scripted server recognises (it is
        # answered as an auxiliary call); name one, as an operator would to get a priced cost.
        model = "gpt-5"
    logs = tmp_path / "factory" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return EngineJob(
        job="j1", epoch=3, attempt=1, factory="fx", station=0,
        manifest=Manifest(engine=engine, cwd=str(repo), model=model, yolo=yolo),
        # A body starting with "-" (a markdown list) must reach the CLI as the prompt, not an option.
        body="- Create hello.txt as scripted.\n- Then stop.", cwd=repo, log_path=str(logs / "attempt.log"),
        gf_env={"GF_JOB_ID": "j1", "GF_EPOCH": "3"}, timeout_s=timeout_s, timeout_class=FailureClass.TIMEOUT,
        header="# test\n", on_output=(outputs.append if outputs is not None else (lambda _c: None)),
        cancel=asyncio.Event(), fence=None, supervised=True,
    )


def _server_tokens(exchanges) -> tuple[int, int]:
    """(input, output) tokens the server reported for the turns it answered."""
    inputs = sum(tokens_for(e["request_bytes"]) for e in exchanges if e.get("kind") in ("turn", "final"))
    outputs = 0
    for e in exchanges:
        if e.get("kind") not in ("turn", "final"):
            continue
        for ev in e["response"]:
            if ev.get("type") == "response.completed":
                outputs += ev["response"]["usage"]["output_tokens"]
            elif "usageMetadata" in ev:
                outputs += ev["usageMetadata"]["candidatesTokenCount"]
    return inputs, outputs


def _codex_env(monkeypatch, url: str, key: str = "sk-scripted") -> None:
    for var in ("OPENAI_BASE_URL", "GIGAFACTORY_CODEX_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIGAFACTORY_CODEX_BASE_URL", f"{url}/v1")
    monkeypatch.setenv("GIGAFACTORY_CODEX_API_KEY_VAR", "GF_TEST_CODEX_KEY")
    monkeypatch.setenv("GF_TEST_CODEX_KEY", key)
    monkeypatch.setenv("GIGAFACTORY_TEST_SECRET", "must-not-leak")


def _gemini_env(monkeypatch, url: str) -> None:
    monkeypatch.delenv("GIGAFACTORY_GEMINI_MODEL", raising=False)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", url)
    monkeypatch.setenv("GEMINI_API_KEY", "sk-scripted")
    monkeypatch.setenv("GIGAFACTORY_TEST_SECRET", "must-not-leak")


def _run(engine: str, job: EngineJob, script: dict, tmp_path: Path, monkeypatch, *, key: str = "sk-scripted"):
    _require(engine)
    with serve_in_thread(parse_script(script), log_path=tmp_path / "server.jsonl") as server:
        (_codex_env if engine == "codex" else _gemini_env)(monkeypatch, server.url, *([key] if engine == "codex" else []))
        eng = engines.get(engine)
        prepared = eng.prepare(job)
        out = asyncio.run(eng.run(job, prepared))
        exchanges = list(server.exchanges)
    return out, prepared, exchanges


def test_the_factorys_codex_reader_prices_the_live_usage_events_with_the_jobs_model(tmp_path, monkeypatch):
    """The factory feeds its own reader (``engine.parser()``, made before the job is known): the
    engine's prepare tells it the model, so the usage events that stream (and budget.usd) are
    priced, not only the final record."""
    _require("codex")
    repo = _repo(tmp_path)
    seen: list = []
    job = _job(tmp_path, repo, "codex", model="gpt-5")
    job.parser = engines.get("codex").parser()
    job.on_output = lambda chunk: seen.extend(job.parser.feed(chunk))
    out, _, exchanges = _run("codex", job, WRITE_SCRIPT, tmp_path, monkeypatch)
    assert out.failure is None, out.detail
    live = [p.data for p in seen if p.kind == "usage"]
    assert live, "no usage event streamed"
    assert (live[-1]["cost_source"], live[-1]["price_table"], live[-1]["model"]) == (
        "priced", load_table().version, "gpt-5")
    assert live[-1]["turns"] == 1 and live[-1]["tool_calls"] >= 1
    assert live[-1]["cost_usd"] == pytest.approx(out.usage.cost_usd)


@pytest.mark.parametrize("engine,model", [("codex", "gpt-5"), ("gemini", "gemini-2.5-flash")])
def test_engine_edits_the_repo_through_the_real_cli_and_reports_priced_usage(engine, model, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    outputs: list[bytes] = []
    job = _job(tmp_path, repo, engine, model=model, outputs=outputs)
    out, prepared, exchanges = _run(engine, job, WRITE_SCRIPT, tmp_path, monkeypatch)
    log = Path(job.log_path).read_text()
    assert out.failure is None, f"{out.detail}\n{log[-3000:]}"
    assert (repo / "hello.txt").read_text() == CONTENT
    inputs, outputs_n = _server_tokens(exchanges)
    assert (out.usage.input_tokens, out.usage.output_tokens) == (inputs, outputs_n)
    assert out.usage.model == model and out.usage.tool_calls == 1
    assert out.usage.cost_source == "priced" and out.usage.cost_usd > 0
    assert out.usage.price_table == load_table().version
    assert b"".join(outputs) and log.startswith("# test\n")  # streamed and logged
    # Only what the CLI needs: no stray factory variable, the GF_* ones, a private home (removed).
    assert "GIGAFACTORY_TEST_SECRET" not in prepared.env and prepared.env["GF_JOB_ID"] == "j1"
    assert Path(prepared.env["HOME"]).parent == tmp_path / "factory" / "cli-homes"
    assert not Path(prepared.env["HOME"]).exists()


@pytest.mark.parametrize("engine", ["codex", "gemini"])
def test_engine_ends_a_401_as_auth_failed(engine, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, engine, model=None)
    out, _prepared, exchanges = _run(engine, job, AUTH_FAILED_SCRIPT, tmp_path, monkeypatch)
    assert out.failure == agentcli.failure_class("auth_failed"), out.detail
    assert out.detail.startswith("auth failed") and "401" in out.detail
    assert 401 in [e["status"] for e in exchanges]
    assert not (repo / "hello.txt").exists()


def test_codex_ends_a_lasting_429_as_rate_limited(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "codex", model="gpt-5")
    out, _prepared, exchanges = _run("codex", job, RATE_LIMIT_FOREVER, tmp_path, monkeypatch)
    assert out.failure == agentcli.failure_class("rate_limited"), out.detail
    assert out.detail.startswith("rate limited") and "429" in out.detail
    assert len(exchanges) == 3  # stream_max_retries=2: the CLI's retries are bounded
    assert out.usage is None  # it consumed nothing it reported: no made-up zeros


def test_gemini_lasting_429_is_bounded_by_the_jobs_timeout(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "gemini", model="gemini-2.5-flash", timeout_s=15.0)
    job.kill_grace_s = 1.0
    out, _prepared, exchanges = _run("gemini", job, RATE_LIMIT_FOREVER, tmp_path, monkeypatch)
    assert out.failure == FailureClass.TIMEOUT, out.detail
    assert "429" in out.detail
    assert exchanges and all(e["status"] == 429 for e in exchanges)


@pytest.mark.parametrize("engine,yolo,flags", [
    ("codex", True, ["--dangerously-bypass-approvals-and-sandbox"]),
    ("codex", False, ["--sandbox", "workspace-write"]),
    ("gemini", True, ["--yolo"]),
    ("gemini", False, ["--approval-mode", "auto_edit"]),
])
def test_yolo_maps_to_the_clis_own_flags_and_both_modes_edit_files(engine, yolo, flags, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, engine, model=None, yolo=yolo)
    out, prepared, _exchanges = _run(engine, job, WRITE_SCRIPT, tmp_path, monkeypatch)
    i = prepared.argv.index(flags[0])
    assert prepared.argv[i:i + len(flags)] == flags
    other = {"--dangerously-bypass-approvals-and-sandbox", "--sandbox", "--yolo", "--approval-mode"} - {flags[0]}
    assert not other & set(prepared.argv)
    assert out.failure is None, out.detail
    assert (repo / "hello.txt").read_text() == CONTENT


def test_gemini_without_yolo_refuses_a_shell_command(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "gemini", model="gemini-2.5-flash", yolo=False)
    _out, _prepared, _exchanges = _run("gemini", job, COMMAND_SCRIPT, tmp_path, monkeypatch)
    assert not (repo / "ran.txt").exists()


def test_an_unknown_model_runs_but_its_cost_stays_unknown(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "codex", model="scripted-model")
    out, _prepared, _exchanges = _run("codex", job, WRITE_SCRIPT, tmp_path, monkeypatch)
    assert out.failure is None and out.usage.input_tokens > 0
    assert (out.usage.cost_usd, out.usage.cost_source) == (None, "unknown")


def test_a_prompt_over_the_argument_limit_is_refused_at_prepare(tmp_path, monkeypatch):
    _require("codex")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    job = _job(tmp_path, _repo(tmp_path), "codex", model=None)
    job.body = "x" * (agentcli.MAX_PROMPT_BYTES + 1)
    with pytest.raises(SetupFailed, match="limit"):
        engines.get("codex").prepare(job)


def test_probe_offers_the_engine_only_with_its_credential(monkeypatch):
    import os

    _require("codex")
    _require("gemini")
    path = os.environ.get("PATH", "")
    found = engines.get("codex").probe(environ={"OPENAI_API_KEY": "k"}, path=path, timeout_s=30)
    assert found.runnable and found.version == agent_clis.pinned_version("codex")
    assert engines.get("codex").tokens(found) == ["engine:codex", f"codex:{found.version}"]
    missing = engines.get("gemini").probe(environ={}, path=path, timeout_s=30)
    assert not missing.runnable and "GEMINI_API_KEY" in missing.why
    assert missing.credentials == {"GEMINI_API_KEY": False}


def _fake_cli(tmp_path: Path, name: str, version_line: str) -> str:
    """A real executable named like the CLI that prints ``version_line`` for ``--version``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    exe.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("engine,line,runnable", [
    ("codex", "codex-cli 0.12.0", False),
    ("codex", "codex-cli 1.0.0", False),
    ("codex", "codex-cli 0.170.3", True),
    ("gemini", "0.60.9", False),
    ("gemini", "0.62.0", True),
])
def test_probe_bounds_the_version(engine, line, runnable, tmp_path):
    path = _fake_cli(tmp_path, engine, line)
    creds = {"OPENAI_API_KEY": "k", "GEMINI_API_KEY": "k"}
    found = engines.get(engine).probe(environ=creds, path=path, timeout_s=10)
    assert found.runnable is runnable, found.why
    if not runnable:
        assert "outside the tested range" in found.why and agent_clis.INSTALL_SCRIPT in found.why


@pytest.mark.parametrize("engine", ["codex", "gemini"])
def test_a_missing_cli_is_not_offered_and_fails_prepare_with_the_install_hint(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("GIGAFACTORY_AGENT_CLIS", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    found = engines.get(engine).probe(environ={"OPENAI_API_KEY": "k", "GEMINI_API_KEY": "k"},
                                      path=str(tmp_path / "nothing-here"), timeout_s=10)
    assert not found.runnable and agent_clis.INSTALL_SCRIPT in found.why
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(SetupFailed) as e:
        engines.get(engine).prepare(_job(tmp_path, repo, engine, model=None))
    assert agent_clis.INSTALL_SCRIPT in e.value.detail and agent_clis.INSTALL_SCRIPT in e.value.log_line


def test_a_codex_base_url_that_is_not_http_is_refused_naming_the_variable(tmp_path, monkeypatch):
    _require("codex")
    monkeypatch.setenv("GIGAFACTORY_CODEX_BASE_URL", "127.0.0.1:8080/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.delenv("GIGAFACTORY_CODEX_API_KEY_VAR", raising=False)
    with pytest.raises(SetupFailed, match="GIGAFACTORY_CODEX_BASE_URL"):
        engines.get("codex").prepare(_job(tmp_path, _repo(tmp_path), "codex", model=None))


def test_codex_runs_with_the_factorys_settings_and_prices_with_the_operators_table(tmp_path, monkeypatch):
    """The settings reach the engine through the job (no GIGAFACTORY_CODEX_* variable is set),
    and setting price_table replaces the shipped table: a model only the operator's table knows
    is priced with its version, live and in the record."""
    from gigafactory.config import Settings

    _require("codex")
    for var in ("GIGAFACTORY_CODEX_BASE_URL", "GIGAFACTORY_CODEX_API_KEY_VAR", "GIGAFACTORY_CODEX_MODEL",
                "OPENAI_BASE_URL", "GIGAFACTORY_PRICE_TABLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GF_TEST_CODEX_KEY", "sk-scripted")
    table = tmp_path / "ops-prices.json"
    table.write_text(json.dumps({"version": "ops-7", "models": {
        "scripted-model": {"input": 2.0, "cache_read": 0.5, "output": 8.0, "source": "our invoice", "as_of": "2026-12"}}}))
    repo = _repo(tmp_path)
    seen: list = []
    job = _job(tmp_path, repo, "codex", model="scripted-model")
    job.parser = engines.get("codex").parser()
    job.on_output = lambda chunk: seen.extend(job.parser.feed(chunk))
    with serve_in_thread(parse_script(WRITE_SCRIPT)) as server:
        job.settings = Settings(codex_base_url=f"{server.url}/v1", codex_api_key_var="GF_TEST_CODEX_KEY",
                                price_table=str(table))
        eng = engines.get("codex")
        prepared = eng.prepare(job)
        out = asyncio.run(eng.run(job, prepared))
    assert out.failure is None, out.detail
    assert (out.usage.cost_source, out.usage.price_table) == ("priced", "ops-7")
    assert out.usage.cost_usd == pytest.approx((out.usage.input_tokens * 2.0 + out.usage.output_tokens * 8.0) / 1e6)
    live = [p.data for p in seen if p.kind == "usage"]
    assert live and (live[-1]["cost_source"], live[-1]["price_table"]) == ("priced", "ops-7")
