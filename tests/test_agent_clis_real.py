"""The real agent CLIs, driven by the scripted model server: no keys, no spend.

Each test runs the pinned CLI binary (scripts/install-agent-clis) in a fresh git repository
against `gigafactory.model_server`, with a script that writes a file, and checks the file, the
exit code and the token usage the CLI reports (it must equal what the server reported, by the
server's documented token rule). A missing CLI FAILS with the install hint: CI must not go green
without having driven the real binaries.

`GIGAFACTORY_RECORD_TRANSCRIPTS=1 python -m pytest tests/test_agent_clis_real.py` rewrites the
transcripts under tests/fixtures/agent-transcripts/<cli>/ that the adapters' parsers test on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from gigafactory import agent_clis
from gigafactory.model_server import parse_script, serve_in_thread, tokens_for

FIXTURES = Path(__file__).parent / "fixtures" / "agent-transcripts"
RUN_TIMEOUT_S = 180
CONTENT = "hello from the scripted model\n"
WRITE_SCRIPT = {"turns": [
    {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
    {"text": "All done."},
]}
RATE_LIMITED_SCRIPT = {"turns": [{"error": {"status": 429, "retry_after_s": 1}}] + WRITE_SCRIPT["turns"]}
# Enough 401s that a CLI which retries them still ends on one.
AUTH_FAILED_SCRIPT = {"turns": [{"error": {"status": 401, "times": 50}}]}
RUN_PYTHON = "python3 -c \"open('ran.txt', 'w').close()\""
# Aider edits through its reply text: its requests declare no tools, so each one is a turn.
AIDER = {"tool_less_requests": "turn"}


def _run(cli: str, script: dict, tmp_path: Path, case: str, *, yolo: bool = True):
    """Run `cli` once against a server replaying `script`; returns (process, repo, exchanges)."""
    if agent_clis.find_cli(cli) is None:
        pytest.fail(agent_clis.missing_message(cli))
    if cli == "aider":
        script = dict(AIDER, **script)
    repo = tmp_path / "repo"
    home = tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"],
                 ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    with serve_in_thread(parse_script(script), log_path=tmp_path / "server.jsonl") as server:
        spec = agent_clis.scripted_run(cli, prompt="Create hello.txt as scripted.", base_url=server.url,
                                       home=home, yolo=yolo)
        proc = subprocess.run(spec.argv, env=spec.env, cwd=repo, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
        exchanges = list(server.exchanges)
    if os.environ.get("GIGAFACTORY_RECORD_TRANSCRIPTS"):
        _record(cli, case, spec, proc, exchanges, tmp_path)
    return proc, repo, exchanges


def _record(cli, case, spec, proc, exchanges, tmp_path) -> None:
    out = FIXTURES / cli
    out.mkdir(parents=True, exist_ok=True)
    scrub = lambda s: s.replace(str(tmp_path), "/TMP")  # noqa: E731 (stable fixtures across runs)
    (out / f"{case}.stdout").write_text(scrub(proc.stdout))
    (out / f"{case}.stderr").write_text(scrub(proc.stderr))
    meta = {"cli": cli, "version": agent_clis.pinned_version(cli), "exit_code": proc.returncode,
            "argv": [scrub(a) for a in spec.argv[1:]],
            "env": {k: scrub(v) for k, v in spec.env.items() if k not in ("PATH", "HOME")},
            "requests": [{"method": e["method"], "path": e["path"], "kind": e.get("kind"), "turn": e.get("turn"),
                          "status": e["status"], "request_bytes": e["request_bytes"],
                          "model": (e["body"] or {}).get("model")} for e in exchanges]}
    (out / f"{case}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _turn_tokens(exchanges) -> tuple[int, int]:
    """(input tokens the server reported for the scripted turns it answered, number of turns)."""
    inputs = sum(tokens_for(e["request_bytes"]) for e in exchanges if e.get("kind") in ("turn", "final"))
    return inputs, len([e for e in exchanges if e.get("kind") in ("turn", "final")])


def _output_tokens(exchanges) -> int:
    """Output tokens the server reported for the scripted turns, read back from its log."""
    total = 0
    for e in exchanges:
        if e.get("kind") not in ("turn", "final"):
            continue
        for ev in e["response"]:
            if ev.get("type") == "message_delta":
                total += ev["usage"]["output_tokens"]
            elif ev.get("type") == "response.completed":
                total += ev["response"]["usage"]["output_tokens"]
            elif ev.get("usage") and "completion_tokens" in ev["usage"]:
                total += ev["usage"]["completion_tokens"]
            elif "usageMetadata" in ev:
                total += ev["usageMetadata"]["candidatesTokenCount"]
    return total


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _assert_wrote(proc, repo: Path) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert (repo / "hello.txt").read_text() == CONTENT


def _statuses(exchanges) -> list[int]:
    return [e["status"] for e in exchanges if e.get("kind") in ("turn", "final", "error")]


# ---------------------------------------------------------------------------------------------
# Claude Code


def test_claude_writes_the_scripted_file_and_reports_usage_and_cost(tmp_path):
    proc, repo, exchanges = _run("claude", WRITE_SCRIPT, tmp_path, "write")
    _assert_wrote(proc, repo)
    result = [e for e in _jsonl(proc.stdout) if e.get("type") == "result"][-1]
    inputs, n = _turn_tokens(exchanges)
    assert n == 2 and result["num_turns"] == 2
    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["usage"]["input_tokens"] == inputs
    assert result["usage"]["output_tokens"] == _output_tokens(exchanges)
    assert result["total_cost_usd"] > 0  # priced by the CLI itself from its own table


def test_claude_retries_a_429_and_then_succeeds(tmp_path):
    proc, repo, exchanges = _run("claude", RATE_LIMITED_SCRIPT, tmp_path, "rate_limited")
    _assert_wrote(proc, repo)
    assert _statuses(exchanges)[:2] == [429, 200]


def test_claude_ends_a_401_with_an_authentication_error(tmp_path):
    proc, repo, exchanges = _run("claude", AUTH_FAILED_SCRIPT, tmp_path, "auth_failed")
    assert proc.returncode == 1
    result = [e for e in _jsonl(proc.stdout) if e.get("type") == "result"][-1]
    assert result["is_error"] is True
    assert 401 in _statuses(exchanges)
    assert not (repo / "hello.txt").exists()


# ---------------------------------------------------------------------------------------------
# Codex CLI


def test_codex_writes_the_scripted_file_and_reports_usage(tmp_path):
    proc, repo, exchanges = _run("codex", WRITE_SCRIPT, tmp_path, "write")
    _assert_wrote(proc, repo)
    events = _jsonl(proc.stdout)
    done = [e for e in events if e.get("type") == "turn.completed"][-1]
    inputs, n = _turn_tokens(exchanges)
    assert n == 2
    assert done["usage"]["input_tokens"] == inputs
    assert done["usage"]["output_tokens"] == _output_tokens(exchanges)
    assert {"cached_input_tokens", "output_tokens", "reasoning_output_tokens"} <= set(done["usage"])


def test_codex_retries_a_429_and_then_succeeds(tmp_path):
    proc, repo, exchanges = _run("codex", RATE_LIMITED_SCRIPT, tmp_path, "rate_limited")
    _assert_wrote(proc, repo)
    assert _statuses(exchanges)[:2] == [429, 200]


def test_codex_ends_a_401_with_turn_failed(tmp_path):
    proc, repo, exchanges = _run("codex", AUTH_FAILED_SCRIPT, tmp_path, "auth_failed")
    assert proc.returncode == 1
    events = _jsonl(proc.stdout)
    assert any(e.get("type") == "turn.failed" for e in events), proc.stdout[-2000:]
    assert 401 in _statuses(exchanges)


# ---------------------------------------------------------------------------------------------
# Gemini CLI


def test_gemini_writes_the_scripted_file_and_reports_usage(tmp_path):
    proc, repo, exchanges = _run("gemini", WRITE_SCRIPT, tmp_path, "write")
    _assert_wrote(proc, repo)
    out = json.loads(proc.stdout)
    inputs, n = _turn_tokens(exchanges)
    assert n == 2
    (model_stats,) = out["stats"]["models"].values()
    assert model_stats["tokens"]["prompt"] == inputs
    assert model_stats["tokens"]["candidates"] == _output_tokens(exchanges)
    assert out["stats"]["tools"]["byName"]["write_file"]["success"] == 1


def test_gemini_retries_a_429_and_then_succeeds(tmp_path):
    proc, repo, exchanges = _run("gemini", RATE_LIMITED_SCRIPT, tmp_path, "rate_limited")
    _assert_wrote(proc, repo)
    assert _statuses(exchanges)[:2] == [429, 200]


def test_gemini_ends_a_401_with_an_error(tmp_path):
    proc, repo, exchanges = _run("gemini", AUTH_FAILED_SCRIPT, tmp_path, "auth_failed")
    assert proc.returncode != 0  # 145 with 0.61.0
    # The error JSON goes to stderr, after a stack trace: read it from its last "{" line.
    tail = proc.stderr[proc.stderr.rindex("\n{\n") + 1:]
    assert json.loads(tail)["error"]["code"] == 401
    assert _statuses(exchanges) == [401]  # not retried


# ---------------------------------------------------------------------------------------------
# GitHub Copilot CLI (bring-your-own-key mode: Chat Completions)


def test_copilot_writes_the_scripted_file_and_reports_its_result(tmp_path):
    proc, repo, exchanges = _run("copilot", WRITE_SCRIPT, tmp_path, "write")
    _assert_wrote(proc, repo)
    events = _jsonl(proc.stdout)
    result = [e for e in events if e.get("type") == "result"][-1]
    _inputs, n = _turn_tokens(exchanges)
    assert n == 2
    assert result["exitCode"] == 0
    assert result["usage"]["codeChanges"]["linesAdded"] == 1
    assert "premiumRequests" in result["usage"]


def test_copilot_retries_a_429_and_then_succeeds(tmp_path):
    proc, repo, exchanges = _run("copilot", RATE_LIMITED_SCRIPT, tmp_path, "rate_limited")
    _assert_wrote(proc, repo)
    assert _statuses(exchanges)[:2] == [429, 200]


def test_copilot_ends_a_401_with_an_error(tmp_path):
    proc, repo, exchanges = _run("copilot", AUTH_FAILED_SCRIPT, tmp_path, "auth_failed")
    assert proc.returncode == 1
    events = _jsonl(proc.stdout)
    errors = [e["data"] for e in events if e.get("type") == "session.error"]
    assert errors and errors[-1]["errorType"] == "authentication" and errors[-1]["statusCode"] == 401
    assert [e for e in events if e.get("type") == "result"][-1]["exitCode"] == 1


# ---------------------------------------------------------------------------------------------
# Aider (OpenAI-compatible Chat Completions through litellm; edits in its SEARCH/REPLACE text)


def test_aider_writes_the_scripted_file_and_reports_tokens(tmp_path):
    proc, repo, exchanges = _run("aider", {"turns": WRITE_SCRIPT["turns"][:1]}, tmp_path, "write")
    _assert_wrote(proc, repo)
    m = re.search(r"Tokens: (\S+) sent, (\S+) received", proc.stdout)
    assert m, proc.stdout[-2000:]
    _inputs, n = _turn_tokens(exchanges)
    assert n == 1
    assert int(m.group(2)) == _output_tokens(exchanges)  # "2.6k sent": the input is abbreviated


def test_aider_retries_a_429_and_then_succeeds(tmp_path):
    proc, repo, exchanges = _run("aider", {"turns": RATE_LIMITED_SCRIPT["turns"][:2]}, tmp_path, "rate_limited")
    _assert_wrote(proc, repo)
    assert _statuses(exchanges)[:2] == [429, 200]


def test_aider_ends_a_401_with_an_error_but_exit_code_0(tmp_path):
    proc, repo, exchanges = _run("aider", AUTH_FAILED_SCRIPT, tmp_path, "auth_failed")
    # Aider reports the failure only in its text; an adapter must read it from the output.
    assert proc.returncode == 0
    assert "litellm.AuthenticationError" in proc.stdout
    assert 401 in _statuses(exchanges)
    assert not (repo / "hello.txt").exists()


# ---------------------------------------------------------------------------------------------
# Without yolo: each CLI's safest non-interactive mode that can still edit files


@pytest.mark.parametrize("cli", ["claude", "codex", "gemini", "copilot", "aider"])
def test_without_yolo_each_cli_still_edits_files(cli, tmp_path):
    script = WRITE_SCRIPT if cli != "aider" else {"turns": WRITE_SCRIPT["turns"][:1]}
    proc, repo, _exchanges = _run(cli, script, tmp_path, "write_no_yolo", yolo=False)
    _assert_wrote(proc, repo)


def test_claude_without_yolo_denies_a_shell_command(tmp_path):
    # acceptEdits auto-approves file-system commands (touch, mkdir, ...): run something else.
    script = {"turns": [{"tool_calls": [{"run_command": {"command": RUN_PYTHON}}]}, {"text": "Gave up."}]}
    proc, repo, _exchanges = _run("claude", script, tmp_path, "command_no_yolo", yolo=False)
    assert proc.returncode == 0
    result = [e for e in _jsonl(proc.stdout) if e.get("type") == "result"][-1]
    assert [d["tool_name"] for d in result["permission_denials"]] == ["Bash"]
    assert not (repo / "ran.txt").exists()


@pytest.mark.parametrize("cli", ["codex", "gemini", "copilot"])
def test_with_yolo_each_cli_runs_a_scripted_shell_command(cli, tmp_path):
    script = {"turns": [{"tool_calls": [{"run_command": {"command": RUN_PYTHON}}]}, {"text": "Ran it."}]}
    proc, repo, exchanges = _run(cli, script, tmp_path, "command")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (repo / "ran.txt").exists()


def test_claude_with_yolo_runs_a_shell_command(tmp_path):
    script = {"turns": [{"tool_calls": [{"run_command": {"command": RUN_PYTHON}}]}, {"text": "Ran it."}]}
    proc, repo, _exchanges = _run("claude", script, tmp_path, "command")
    assert proc.returncode == 0
    assert (repo / "ran.txt").exists()



# ---------------------------------------------------------------------------------------------
# A 429 that never clears: how each CLI gives up (gemini retries for minutes and aider for about
# 95 s before exiting 0: an adapter bounds them with its own timeout; not run here for CI time)

RATE_LIMIT_FOREVER = {"turns": [{"error": {"status": 429, "retry_after_s": 1, "times": 100}}]}


def test_claude_gives_up_on_a_lasting_429_with_a_rate_limit_result(tmp_path):
    proc, _repo, exchanges = _run("claude", RATE_LIMIT_FOREVER, tmp_path, "rate_limit_exhausted")
    assert proc.returncode == 1
    result = [e for e in _jsonl(proc.stdout) if e.get("type") == "result"][-1]
    assert (result["is_error"], result["api_error_status"], result["api_error_type"]) == (True, 429, "rate_limit_error")
    assert len(exchanges) == 3  # CLAUDE_CODE_MAX_RETRIES=2


def test_codex_gives_up_on_a_lasting_429_with_turn_failed(tmp_path):
    proc, _repo, exchanges = _run("codex", RATE_LIMIT_FOREVER, tmp_path, "rate_limit_exhausted")
    assert proc.returncode == 1
    failed = [e for e in _jsonl(proc.stdout) if e.get("type") == "turn.failed"][-1]
    assert "429" in failed["error"]["message"]
    assert len(exchanges) == 3  # stream_max_retries=2


def test_copilot_gives_up_on_a_lasting_429_with_a_rate_limit_error(tmp_path):
    proc, _repo, _exchanges = _run("copilot", RATE_LIMIT_FOREVER, tmp_path, "rate_limit_exhausted")
    assert proc.returncode == 1
    errors = [e["data"] for e in _jsonl(proc.stdout) if e.get("type") == "session.error"]
    assert (errors[-1]["errorType"], errors[-1]["statusCode"]) == ("rate_limit", 429)
