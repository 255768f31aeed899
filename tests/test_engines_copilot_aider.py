"""The ``copilot`` and ``aider`` engines: their stream parsers on the recorded transcripts, and
the engines themselves driving the REAL pinned CLIs against the scripted model server (no keys,
no spend). A missing CLI FAILS with the install hint: CI must not go green without them."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import msgspec
import pytest
from test_engines_codex_gemini import _fake_cli, _feed_in_chunks, _job, _repo

from gigafactory import agent_clis
from gigafactory.factory import engines
from gigafactory.factory.engines import agentcli
from gigafactory.factory.engines.aider import AiderParser
from gigafactory.factory.engines.base import SetupFailed
from gigafactory.factory.engines.copilot import CopilotParser
from gigafactory.schemas.pricing import load_table
from gigafactory.model_server import parse_script, serve_in_thread, tokens_for
from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.records import Usage

FIXTURES = Path(__file__).parent / "fixtures" / "agent-transcripts"
CONTENT = "hello from the scripted model\n"
WRITE_SCRIPT = {"turns": [
    {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
    {"text": "All done."},
]}
AUTH_FAILED_SCRIPT = {"turns": [{"error": {"status": 401, "times": 50}}]}
RUN_PYTHON = "python3 -c \"open('ran.txt', 'w').close()\""
COMMAND_SCRIPT = {"turns": [{"tool_calls": [{"run_command": {"command": RUN_PYTHON}}]}, {"text": "Ran it."}]}


def _transcript(cli: str, case: str) -> bytes:
    """The recorded output as the engine sees it: stderr and stdout in one stream."""
    return (FIXTURES / cli / f"{case}.stderr").read_bytes() + (FIXTURES / cli / f"{case}.stdout").read_bytes()


# ---------------------------------------------------------------------------------------------
# Copilot parser (recorded transcripts)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 20])
def test_copilot_parser_reads_turns_and_tool_calls_and_leaves_the_cost_unknown(chunk):
    p = CopilotParser()
    said = _feed_in_chunks(p, _transcript("copilot", "write"), chunk)
    u = p.usage()
    assert (u.model, u.turns, u.tool_calls) == ("scripted-model", 2, 1)
    # Copilot prints no token counts anywhere: none are made up, and no cost either.
    assert (u.input_tokens, u.output_tokens, u.cost_usd, u.cost_source) == (None, None, None, "unknown")
    usage_events = [s.data for s in said if s.kind == "usage"]
    # Every field, cost_source explicit; the result's premium requests (0 in BYOK mode) recorded.
    assert usage_events[-1] == msgspec.to_builtins(Usage(model="scripted-model", turns=2, tool_calls=1,
                                                        cost_source="unknown", premium_requests=0))
    assert u.premium_requests == 0
    texts = [s.data.get("text") for s in said if s.kind == "progress"]
    assert "Writing the file." in texts and "All done." in texts
    result = [s.data for s in said if s.data.get("event") == "result"]
    assert result == [{"event": "result", "exit_code": 0, "premium_requests": 0, "lines_added": 1, "lines_removed": 0}]
    assert p.error is None and p.denied == []


@pytest.mark.parametrize("case,cls,status", [("auth_failed", "auth_failed", 401),
                                             ("rate_limit_exhausted", "rate_limited", 429)])
def test_copilot_parser_reads_the_session_error(case, cls, status):
    p = CopilotParser()
    said = _feed_in_chunks(p, _transcript("copilot", case), 13)
    assert p.error["statusCode"] == status
    assert agentcli.classify_error_text(p.error_text()) == cls
    assert p.usage() is None  # no model reply: no usage, not zeros
    if cls == "rate_limited":
        assert [s.data["reason"] for s in said if s.data.get("event") == "retry"] == ["rate_limit"] * 5


def _copilot_result(premium_requests) -> bytes:
    return (b'{"type":"assistant.message","data":{"model":"gpt-5","content":"ok","toolRequests":[]}}\n'
            + json.dumps({"type": "result", "exitCode": 0,
                          "usage": {"premiumRequests": premium_requests}}).encode() + b"\n")


def test_copilot_on_githubs_service_is_priced_per_premium_request_and_says_so():
    p = CopilotParser()
    p.byok = False  # GitHub's service: premium requests are what it bills
    said = p.feed(_copilot_result(3))
    u = p.usage()
    per_request = load_table().requests["copilot-premium-request"].usd
    assert (u.premium_requests, u.cost_source, u.price_table) == (3, "priced", load_table().version)
    assert u.cost_usd == pytest.approx(3 * per_request)
    assert "per premium request" in u.cost_note and u.input_tokens is None
    assert [s.data for s in said if s.kind == "usage"][-1]["cost_note"] == u.cost_note


def test_copilot_in_byok_mode_records_premium_requests_but_leaves_the_cost_unknown():
    p = CopilotParser()
    p.feed(_copilot_result(0))
    u = p.usage()
    # The provider bills tokens the CLI never reports: 0 premium requests is not a cost of $0.
    assert (u.premium_requests, u.cost_usd, u.cost_source, u.cost_note) == (0, None, "unknown", None)


def test_copilot_parser_counts_a_passing_429_as_no_error():
    p = CopilotParser()
    p.feed(_transcript("copilot", "rate_limited"))
    assert p.error is None and p.usage().turns == 2


def test_copilot_parser_names_a_denied_tool():
    p = CopilotParser()
    # As 1.0.102 prints a tool that -p denied (no interactive user to ask).
    p.feed(b'{"type":"tool.execution_start","data":{"toolCallId":"c1","toolName":"bash"}}\n'
           b'{"type":"tool.execution_complete","data":{"toolCallId":"c1","success":false,'
           b'"error":{"message":"Permission denied because no interactive user response was available.",'
           b'"code":"denied"}}}\n')
    assert p.denied == ["bash: Permission denied because no interactive user response was available."]
    assert p.tool_calls == 0


# ---------------------------------------------------------------------------------------------
# Aider parser (recorded transcripts)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 20])
def test_aider_parser_reads_rounded_tokens_and_marks_the_cost_estimated(chunk):
    p = AiderParser(model="openai/gpt-4.1")
    said = _feed_in_chunks(p, _transcript("aider", "write"), chunk)
    u = p.usage()
    assert (u.model, u.input_tokens, u.output_tokens, u.turns, u.tool_calls) == ("gpt-4.1", 2600, 27, 1, 1)
    # "2.6k sent" is rounded: a cost priced from it is an estimate, never "priced".
    assert u.cost_source == "estimated" and u.price_table == load_table().version
    assert u.cost_usd == pytest.approx((2600 * 2.0 + 27 * 8.0) / 1e6)
    assert [s.kind for s in said] == ["usage", "progress"]
    assert p.error is None


def test_aider_parser_prices_exact_counts_and_takes_cache_hits_out_of_sent():
    p = AiderParser(model="openai/gpt-4.1")
    p.feed(b"Tokens: 900 sent, 300 cache hit, 27 received. Cost: $0.0012 message, $0.0012 session.\n")
    u = p.usage()
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens) == (600, 300, 27)
    assert u.cost_source == "priced" and u.cost_usd == pytest.approx((600 * 2.0 + 300 * 0.5 + 27 * 8.0) / 1e6)
    p.feed(b"Tokens: 15k sent, 1.2k received.\n")
    assert (p.usage().turns, p.usage().input_tokens, p.usage().output_tokens) == (2, 15600, 1227)
    assert p.usage().cost_source == "estimated"
    assert AiderParser(model="scripted-model").usage() is None  # nothing read: no usage, not zeros


def test_aider_parser_counts_an_edit_applied_after_a_confirmation_prompt():
    p = AiderParser(model="openai/scripted-model")
    p.feed(_transcript("aider", "write_no_yolo"))
    assert p.usage().tool_calls == 1
    assert (p.usage().cost_usd, p.usage().cost_source) == (None, "unknown")  # not in the table


@pytest.mark.parametrize("text,cls", [
    (b"litellm.AuthenticationError: AuthenticationError: OpenAIException - Invalid API \nkey (scripted).\n", "auth_failed"),
    # As litellm words it (aider's 95 s give-up was not recorded: too long for CI).
    (b"litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit exceeded\n", "rate_limited"),
    (b"litellm.ContextWindowExceededError: too many tokens\n", "context_overflow"),
    (b"litellm.APIConnectionError: Connection refused\n", "crash"),
])
def test_aider_parser_classes_litellm_errors_from_its_text(text, cls):
    p = AiderParser()
    p.feed(text)
    assert p.error_class() == cls
    if cls != "crash":
        assert agentcli.classify_error_text(p.error_text()) == cls


def test_aider_parser_reads_the_recorded_401_and_forgets_an_error_a_reply_followed():
    p = AiderParser()
    _feed_in_chunks(p, _transcript("aider", "auth_failed"), 11)
    assert p.error_class() == "auth_failed" and "Invalid API key (scripted)." in p.error_text()
    p.feed(b"Tokens: 10 sent, 2 received.\n")
    assert p.error_class() is None


def test_both_engines_are_registered_as_agentic_coders():
    for name in ("copilot", "aider"):
        assert engines.get(name).name == name and engines.get(name).engine_class == "agentic-coder"


# ---------------------------------------------------------------------------------------------
# The engines, driving the real CLIs against the scripted model server


def _require(cli: str) -> None:
    if agent_clis.find_cli(cli) is None:
        pytest.fail(agent_clis.missing_message(cli))


def _env(monkeypatch, engine: str, url: str) -> None:
    for var in ("GIGAFACTORY_COPILOT_MODEL", "GIGAFACTORY_AIDER_MODEL", "COPILOT_MODEL", "GH_TOKEN", "GITHUB_TOKEN",
                "COPILOT_GITHUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    if engine == "copilot":
        monkeypatch.setenv("COPILOT_PROVIDER_BASE_URL", f"{url}/v1")
        monkeypatch.setenv("COPILOT_PROVIDER_API_KEY", "sk-scripted")
    else:
        monkeypatch.setenv("OPENAI_API_BASE", f"{url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-scripted")
    monkeypatch.setenv("GIGAFACTORY_TEST_SECRET", "must-not-leak")


def _script(engine: str, script: dict) -> dict:
    # Aider edits through its reply text: its requests declare no tools, so each one is a turn,
    # and one reply with the edit is the whole run.
    if engine == "aider":
        return {"tool_less_requests": "turn", "turns": script["turns"][:1]}
    return script


def _run(engine: str, job, script: dict, tmp_path: Path, monkeypatch):
    _require(engine)
    with serve_in_thread(parse_script(_script(engine, script)), log_path=tmp_path / "server.jsonl") as server:
        _env(monkeypatch, engine, server.url)
        eng = engines.get(engine)
        prepared = eng.prepare(job)
        out = asyncio.run(eng.run(job, prepared))
        exchanges = list(server.exchanges)
    return out, prepared, exchanges


def _completion_tokens(exchanges) -> int:
    total = 0
    for e in exchanges:
        if e.get("kind") in ("turn", "final"):
            for ev in e["response"]:
                if isinstance(ev.get("usage"), dict) and "completion_tokens" in ev["usage"]:
                    total += ev["usage"]["completion_tokens"]
    return total


@pytest.mark.parametrize("engine", ["copilot", "aider"])
def test_engine_edits_the_repo_through_the_real_cli_and_reports_usage(engine, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    outputs: list[bytes] = []
    job = _job(tmp_path, repo, engine, model="gpt-4.1", outputs=outputs)
    out, prepared, exchanges = _run(engine, job, WRITE_SCRIPT, tmp_path, monkeypatch)
    log = Path(job.log_path).read_text()
    assert out.failure is None, f"{out.detail}\n{log[-3000:]}"
    assert (repo / "hello.txt").read_text() == CONTENT
    turns = [e for e in exchanges if e.get("kind") in ("turn", "final")]
    assert out.usage.model == "gpt-4.1" and out.usage.tool_calls == 1 and out.usage.turns == len(turns)
    if engine == "copilot":
        assert (out.usage.input_tokens, out.usage.cost_usd, out.usage.cost_source) == (None, None, "unknown")
    else:
        inputs = sum(tokens_for(e["request_bytes"]) for e in turns)
        assert out.usage.output_tokens == _completion_tokens(exchanges)
        assert abs(out.usage.input_tokens - inputs) <= 50  # "2.6k sent": rounded to 100
        assert out.usage.cost_source == "estimated" and out.usage.cost_usd > 0
        assert out.usage.price_table == load_table().version
        # Its history files went to the private home, not into the repository.
        assert not list(repo.glob(".aider*")), list(repo.glob(".aider*"))
    assert b"".join(outputs) and log.startswith("# test\n")  # streamed and logged
    assert "GIGAFACTORY_TEST_SECRET" not in prepared.env and prepared.env["GF_JOB_ID"] == "j1"
    assert Path(prepared.env["HOME"]).parent == tmp_path / "factory" / "cli-homes"
    assert not Path(prepared.env["HOME"]).exists()


@pytest.mark.parametrize("engine", ["copilot", "aider"])
def test_engine_ends_a_401_as_auth_failed(engine, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, engine, model="scripted-model")
    out, _prepared, exchanges = _run(engine, job, AUTH_FAILED_SCRIPT, tmp_path, monkeypatch)
    assert out.failure == agentcli.failure_class("auth_failed"), out.detail
    assert out.detail.startswith("auth failed") and "401" in out.detail
    assert 401 in [e["status"] for e in exchanges]
    assert not (repo / "hello.txt").exists()


@pytest.mark.parametrize("engine,yolo,flags", [
    ("copilot", True, ["--allow-all-tools"]),
    ("copilot", False, ["--allow-tool", "write"]),
    ("aider", True, ["--yes-always"]),
    ("aider", False, ["--no-suggest-shell-commands"]),
])
def test_yolo_maps_to_the_clis_own_flags_and_both_modes_edit_files(engine, yolo, flags, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, engine, model="scripted-model", yolo=yolo)
    out, prepared, _exchanges = _run(engine, job, WRITE_SCRIPT, tmp_path, monkeypatch)
    i = prepared.argv.index(flags[0])
    assert prepared.argv[i:i + len(flags)] == flags
    other = {"--allow-all-tools", "--allow-tool", "--yes-always", "--no-suggest-shell-commands"} - {flags[0]}
    assert not other & set(prepared.argv)
    assert (prepared.env.get("COPILOT_ALLOW_ALL") == "true") is (engine == "copilot" and yolo)
    assert out.failure is None, out.detail
    assert (repo / "hello.txt").read_text() == CONTENT


@pytest.mark.parametrize("yolo", [True, False])
def test_copilot_runs_a_shell_command_only_with_yolo(yolo, tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "copilot", model="scripted-model", yolo=yolo)
    out, _prepared, _exchanges = _run("copilot", job, COMMAND_SCRIPT, tmp_path, monkeypatch)
    assert (repo / "ran.txt").exists() is yolo
    # It exits 0 either way; without yolo the attempt's detail names the denial.
    assert out.failure is None, out.detail
    assert ("denied" in out.detail) is (not yolo), out.detail
    assert ("bash: Permission denied" in out.detail) is (not yolo), out.detail


@pytest.mark.parametrize("engine", ["copilot", "aider"])
def test_a_missing_cli_is_not_offered_and_fails_prepare_with_the_install_hint(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("GIGAFACTORY_AGENT_CLIS", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    creds = {"OPENAI_API_KEY": "k", "COPILOT_PROVIDER_BASE_URL": "http://x/v1", "COPILOT_PROVIDER_API_KEY": "k"}
    found = engines.get(engine).probe(environ=creds, path=str(tmp_path / "nothing-here"), timeout_s=10)
    assert not found.runnable and agent_clis.INSTALL_SCRIPT in found.why
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(SetupFailed) as e:
        engines.get(engine).prepare(_job(tmp_path, repo, engine, model=None))
    assert agent_clis.INSTALL_SCRIPT in e.value.detail and agent_clis.INSTALL_SCRIPT in e.value.log_line


def test_probe_offers_each_engine_only_with_its_credential():
    _require("copilot")
    _require("aider")
    path = os.environ.get("PATH", "")
    copilot = engines.get("copilot")
    found = copilot.probe(environ={"COPILOT_PROVIDER_BASE_URL": "http://127.0.0.1:1/v1",
                                   "COPILOT_PROVIDER_API_KEY": "k"}, path=path, timeout_s=60)
    assert found.runnable, found.why
    assert copilot.tokens(found) == ["engine:copilot", f"copilot:{agent_clis.pinned_version('copilot')}"]
    byok_without_key = copilot.probe(environ={"COPILOT_PROVIDER_BASE_URL": "http://127.0.0.1:1/v1"}, path=path,
                                     timeout_s=60)
    assert not byok_without_key.runnable and "COPILOT_PROVIDER_API_KEY" in byok_without_key.why
    assert copilot.probe(environ={"GH_TOKEN": "t"}, path=path, timeout_s=60).runnable
    assert "GH_TOKEN" in copilot.probe(environ={}, path=path, timeout_s=60).why
    aider = engines.get("aider")
    found = aider.probe(environ={"OPENAI_API_KEY": "k"}, path=path, timeout_s=60)
    assert found.runnable and found.version == agent_clis.pinned_version("aider"), found.why
    missing = aider.probe(environ={}, path=path, timeout_s=60)
    assert not missing.runnable and missing.credentials == {"OPENAI_API_KEY": False}


@pytest.mark.parametrize("engine,line,runnable", [
    ("copilot", "GitHub Copilot CLI 1.0.101.", False),
    ("copilot", "GitHub Copilot CLI 1.0.140.", True),
    ("copilot", "GitHub Copilot CLI 2.0.0.", False),
    ("aider", "aider 0.85.9", False),
    ("aider", "aider 0.86.5", True),
    ("aider", "aider 0.87.0", False),
])
def test_probe_bounds_the_version(engine, line, runnable, tmp_path):
    path = _fake_cli(tmp_path, engine, line)
    creds = {"OPENAI_API_KEY": "k", "GH_TOKEN": "t"}
    found = engines.get(engine).probe(environ=creds, path=path, timeout_s=10)
    assert found.runnable is runnable, found.why
    if not runnable:
        assert "outside the tested range" in found.why and agent_clis.INSTALL_SCRIPT in found.why


@pytest.mark.parametrize("engine,var", [("copilot", "COPILOT_PROVIDER_BASE_URL"), ("aider", "OPENAI_API_BASE")])
def test_a_base_url_that_is_not_http_is_refused_naming_the_variable(engine, var, tmp_path, monkeypatch):
    _require(engine)
    monkeypatch.setenv(var, "127.0.0.1:8080/v1")
    with pytest.raises(SetupFailed, match=var):
        engines.get(engine).prepare(_job(tmp_path, _repo(tmp_path), engine, model=None))


def test_the_aider_model_gets_the_openai_route_unless_it_names_a_provider(tmp_path, monkeypatch):
    _require("aider")
    monkeypatch.delenv("GIGAFACTORY_AIDER_MODEL", raising=False)
    repo = _repo(tmp_path)
    for model, sent in (("gpt-4.1", "openai/gpt-4.1"), ("anthropic/claude-sonnet-4-5", "anthropic/claude-sonnet-4-5"),
                        (None, "openai/gpt-4.1")):
        prepared = engines.get("aider").prepare(_job(tmp_path, repo, "aider", model=model))
        assert prepared.argv[prepared.argv.index("--model") + 1] == sent
        # One argument: a body starting with "-" (a markdown list) is not read as an option.
        assert any(a.startswith("--message=- Create hello.txt") for a in prepared.argv)


def test_copilot_byok_without_a_model_is_refused_at_prepare_naming_the_settings(tmp_path, monkeypatch):
    _require("copilot")
    _env(monkeypatch, "copilot", "http://127.0.0.1:9")
    with pytest.raises(SetupFailed, match="GIGAFACTORY_COPILOT_MODEL"):
        engines.get("copilot").prepare(_job(tmp_path, _repo(tmp_path), "copilot", model=None))
    assert not list((tmp_path / "factory" / "cli-homes").iterdir())  # its home is not left behind


def test_copilot_ends_a_lasting_429_as_rate_limited(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "copilot", model="scripted-model")
    script = {"turns": [{"error": {"status": 429, "retry_after_s": 1, "times": 100}}]}
    out, _prepared, exchanges = _run("copilot", job, script, tmp_path, monkeypatch)
    assert out.failure == agentcli.failure_class("rate_limited"), out.detail
    assert out.detail.startswith("rate limited") and "429" in out.detail
    assert exchanges and all(e["status"] == 429 for e in exchanges)
    assert out.usage is None  # no model reply: nothing reported, no made-up zeros


def test_aider_lasting_429_is_bounded_by_the_jobs_timeout_and_named(tmp_path, monkeypatch):
    # Aider retries a 429 for about 95 s and then exits 0: the job's timeout bounds it here.
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "aider", model="scripted-model", timeout_s=20.0)
    job.kill_grace_s = 1.0
    script = {"turns": [{"error": {"status": 429, "retry_after_s": 1, "times": 100}}]}
    out, _prepared, exchanges = _run("aider", job, script, tmp_path, monkeypatch)
    assert out.failure == FailureClass.TIMEOUT, out.detail
    assert "429" in out.detail, out.detail
    assert exchanges and all(e["status"] == 429 for e in exchanges)


def test_copilot_reports_the_providers_retry_after_quoted_in_its_error(tmp_path, monkeypatch):
    """Copilot's events carry no retry-after of their own, but its session.error quotes the
    provider's last message ("Last error: 429 …"): an OpenAI-style "try again in 7s" in it is
    the attempt's retry_after_s (the retry waits that long, not the policy's back-off)."""
    repo = _repo(tmp_path)
    job = _job(tmp_path, repo, "copilot", model="scripted-model")
    script = {"turns": [{"error": {"status": 429, "retry_after_s": 1, "times": 100,
                                   "message": "Rate limit reached for requests. Please try again in 7s."}}]}
    out, _prepared, _exchanges = _run("copilot", job, script, tmp_path, monkeypatch)
    assert out.failure == agentcli.failure_class("rate_limited"), out.detail
    assert out.retry_after_s == 7.0, out.detail


@pytest.mark.parametrize("text,seconds", [
    ("429 Rate limit reached for gpt-5. Please try again in 7s.", 7.0),
    ("Rate limit reached. Please try again in 350ms.", 0.35),
    ('litellm.RateLimitError: {"error": {"code": 429, "details": [{"retryDelay": "31s"}]}}', 31.0),
    ("429 Too Many Requests; retry-after: 12", 12.0),
    ("exceeded retry limit, last status: 429 Too Many Requests", None),  # Codex: no delay said
    ("Please try again in 999999s", None),  # over a day: not believed
])
def test_a_retry_after_is_read_from_the_words_providers_use(text, seconds):
    assert agentcli.retry_after_from_text(text) == seconds


def test_aider_rate_limit_error_carries_the_providers_retry_after(tmp_path):
    from gigafactory.factory import shell

    p = AiderParser("gpt-4.1")
    p.feed(b"litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached. "
           b"Please try again in 20s.\n\n")
    res = shell.ProcessResult(exit_code=0, timed_out=False, cancelled=False, signal=None, duration_s=1.0)
    job = _job(tmp_path, _repo(tmp_path), "aider", model="gpt-4.1")
    out = agentcli.classify_run(res, job, p.usage(), p.error_text())
    assert out.failure == agentcli.failure_class("rate_limited") and out.retry_after_s == 20.0


def test_the_factorys_aider_reader_learns_the_model_and_prices_the_live_usage(tmp_path, monkeypatch):
    """The factory's reader (``engine.parser()``, made before the job is known) is told the
    model at prepare: aider's token lines do not name it, and without it the usage events that
    stream (and budget.usd) would stay unpriced."""
    _require("aider")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-scripted")
    monkeypatch.delenv("GIGAFACTORY_AIDER_MODEL", raising=False)
    job = _job(tmp_path, _repo(tmp_path), "aider", model="gpt-4.1")
    job.parser = engines.get("aider").parser()
    engines.get("aider").prepare(job)
    [said] = [p for p in job.parser.feed(b"Tokens: 1000 sent, 20 received.\n") if p.kind == "usage"]
    assert (said.data["model"], said.data["cost_source"], said.data["price_table"]) == (
        "gpt-4.1", "priced", load_table().version)
    assert said.data["cost_usd"] == pytest.approx((1000 * 2.0 + 20 * 8.0) / 1e6)
