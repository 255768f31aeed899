"""The ``claude`` engine: its stream-json parser on Claude Code's recorded output, its command
line and environment, and the REAL ``claude`` binary (pinned, scripts/install-agent-clis) run
as a station by a real factory against a real broker and the scripted model server: a file
edit that ships with the server's token counts, a 401, a lasting 429, a budget stop mid-run,
and ``yolo`` on and off. A missing ``claude`` FAILS with the install hint (never skips)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gigafactory import agent_clis
from gigafactory.factory import engines, shell
from gigafactory.factory.engines.base import EngineJob, SetupFailed
from gigafactory.factory.engines.claude import (
    CLI_MAX_RETRIES,
    MAX_PROMPT_BYTES,
    ClaudeEngine,
    ClaudeStream,
    classify_result,
    claude_environment,
)
from gigafactory.schemas.pricing import load_table
from gigafactory.model_server import parse_script, serve_in_thread, tokens_for
from gigafactory.schemas.manifest import FailureClass, parse_job_text
from gigafactory.schemas.records import Usage

from helpers import Fleet, eventually, run

FIXTURES = Path(__file__).parent / "fixtures" / "agent-transcripts" / "claude"
CONTENT = "hello from the scripted model\n"
WRITE_SCRIPT = {"turns": [
    {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
    {"text": "All done."},
]}
RUN_PYTHON = "python3 -c \"open('ran.txt', 'w').close()\""
# Claude Code refuses a bare long `sleep` (it suggests running it in the background instead).
SLOW_PYTHON = "python3 -c \"import time; time.sleep(30); open('slept.txt', 'w').close()\""


def _fixture(case: str) -> bytes:
    return (FIXTURES / f"{case}.stdout").read_bytes()


def _parse(data: bytes, chunk_bytes: int | None = None) -> tuple[ClaudeStream, list]:
    p = ClaudeStream()
    said = []
    step = chunk_bytes or len(data) or 1
    for i in range(0, len(data), step):
        said += p.feed(data[i:i + step])
    return p, said


def _result(case: str) -> dict:
    return [json.loads(line) for line in _fixture(case).splitlines() if b'"type":"result"' in line][-1]


def _proc(code: int | None = 0, *, timed_out: bool = False) -> shell.ProcessResult:
    return shell.ProcessResult(exit_code=code, timed_out=timed_out, cancelled=False, signal=None, duration_s=1.0)


# -- the parser on recorded output -------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [None, 1, 7, 4096])
def test_the_parser_reads_a_recorded_write_run_whatever_the_chunking(chunk_bytes):
    p, said = _parse(_fixture("write"), chunk_bytes)
    assert p.usage() == Usage(model="claude-sonnet-4-5", input_tokens=44264, output_tokens=44, cache_read_tokens=0,
                              cache_write_tokens=0, turns=2, tool_calls=1, cost_usd=0.13345200000000002,
                              cost_source="reported")
    progress = [s.data for s in said if s.kind == "progress"]
    assert {"text": "Writing the file."} in progress and {"text": "All done."} in progress
    assert [d["tool"] for d in progress if "tool" in d] == ["Write"]
    usages = [s.data for s in said if s.kind == "usage"]
    # Streamed while it ran, said only when it changed: the first message's usage (counted once
    # though the CLI repeats it on each of its content blocks: its tool call changes only the
    # tool count), both messages, then the result's (exact output tokens and cost).
    assert [(u["input_tokens"], u["output_tokens"], u["tool_calls"]) for u in usages] == [
        (22052, 1, 0), (22052, 1, 1), (44264, 2, 1), (44264, 44, 1)]
    assert usages[-1]["cost_source"] == "reported"
    # Before the result, the usage so far is priced from the table (Sonnet 4.5: $3 in, $15 out
    # per million), so budget.usd can stop a run mid-way.
    assert (usages[0]["cost_source"], usages[0]["price_table"]) == ("priced", load_table().version)
    assert usages[0]["cost_usd"] == pytest.approx((22052 * 3.0 + 1 * 15.0) / 1e6)


def test_streamed_usage_is_priced_before_the_result_and_the_reported_cost_wins_after_it():
    lines = _fixture("write").splitlines(keepends=True)
    before = b"".join(line for line in lines if b'"type":"result"' not in line)
    p, _ = _parse(before)
    u = p.usage()
    assert (u.cost_source, u.turns, u.input_tokens) == ("priced", 2, 44264)
    assert u.cost_usd == pytest.approx((44264 * 3.0 + u.output_tokens * 15.0) / 1e6)
    p.feed(next(line for line in lines if b'"type":"result"' in line))
    assert (p.usage().cost_source, p.usage().cost_usd) == ("reported", 0.13345200000000002)


def test_the_parser_counts_a_shell_tool_call_and_a_denial():
    p, said = _parse(_fixture("command_no_yolo"), 13)
    assert p.usage().tool_calls == 1
    assert {"denied": "Bash"} in [s.data for s in said]


def test_a_line_over_the_limit_is_dropped_and_the_next_one_is_read():
    p = ClaudeStream(max_line_bytes=100)
    huge = b'{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"' + b"x" * 500 + b'"}]}}\n'
    said = p.feed(huge[:60]) + p.feed(huge[60:300]) + p.feed(huge[300:])
    said += p.feed(b'{"type":"assistant","message":{"id":"m2","content":[{"type":"text","text":"ok"}]}}\n')
    assert [s.data for s in said] == [{"text": "ok"}] and p.dropped_lines == 1
    assert len(p.buf) == 0


def test_lines_that_are_not_json_are_ignored():
    p, said = _parse(b"warning: something\n[1,2]\n" + _fixture("write"))
    assert p.usage().turns == 2


# -- classification on recorded results --------------------------------------------------------


def _job(tmp_path: Path, text: str = "---\nengine: claude\ncwd: .\n---\nDo it.\n", **kw) -> EngineJob:
    import asyncio

    parsed = parse_job_text(text, "job.md")
    m, body = parsed.manifest, parsed.body
    return EngineJob(job="j1", epoch=1, attempt=1, factory="f1", station=0, manifest=m, body=body, cwd=tmp_path,
                     log_path=str(tmp_path / "log"), gf_env={"GF_JOB_ID": "j1"}, timeout_s=60,
                     timeout_class=FailureClass.TIMEOUT, header="", on_output=lambda c: None,
                     cancel=asyncio.Event(), fence=None, supervised=False, **kw)


@pytest.mark.parametrize("case, code, failure", [
    ("write", 0, None),
    ("auth_failed", 1, FailureClass.AUTH_FAILED),
    ("rate_limit_exhausted", 1, FailureClass.RATE_LIMITED),
])
def test_recorded_results_are_classified_by_is_error_and_status_not_subtype(tmp_path, case, code, failure):
    out = classify_result(_result(case), _proc(code), _job(tmp_path))
    assert out.failure == failure


def test_the_delay_of_the_clis_last_rate_limited_retry_is_read_as_the_retry_after():
    stream, _ = _parse(_fixture("rate_limit_exhausted"))
    assert stream.retry_delay_s == 1.246  # the second api_retry event's retry_delay_ms
    assert _parse(_fixture("write"))[0].retry_delay_s is None


def test_other_endings_are_classified(tmp_path):
    job = _job(tmp_path)
    overflow = {"is_error": True, "api_error_status": 400, "result": "API Error: 400 prompt is too long: 210000 tokens"}
    assert classify_result(overflow, _proc(1), job).failure == FailureClass.CONTEXT_OVERFLOW
    assert classify_result({"is_error": True, "result": "boom"}, _proc(1), job).failure == FailureClass.CRASH
    assert classify_result(None, _proc(0), job).failure == FailureClass.CRASH
    assert classify_result(_result("write"), _proc(None, timed_out=True), job).failure == FailureClass.TIMEOUT
    denied = classify_result(_result("command_no_yolo"), _proc(0), job)
    assert denied.failure is None and "denied: Bash" in denied.detail


# -- the command line and environment ----------------------------------------------------------


def _claude() -> str:
    found = agent_clis.find_cli("claude")
    if found is None:
        pytest.fail(agent_clis.missing_message("claude"))
    return found


def test_yolo_on_and_off_build_the_documented_flags(tmp_path, monkeypatch):
    _claude()
    monkeypatch.setenv("PATH", os.environ["PATH"] + os.pathsep + str(Path(_claude()).parent))
    eng = ClaudeEngine()
    safe = eng.prepare(_job(tmp_path, "---\nengine: claude\ncwd: .\nmodel: m-9\n---\nFix the bug.\n"))
    assert safe.argv[1:] == ["-p", "--output-format", "stream-json", "--verbose", "--model", "m-9",
                             "--permission-mode", "acceptEdits", "--", "Fix the bug.\n"]
    assert "IS_SANDBOX" not in safe.env
    yolo = eng.prepare(_job(tmp_path, "---\nengine: claude\ncwd: .\nyolo: true\n---\n--Fix the bug.\n"))
    assert yolo.argv[-3:] == ["--dangerously-skip-permissions", "--", "--Fix the bug.\n"]
    assert "--model" not in yolo.argv and "acceptEdits" not in yolo.argv
    assert ("IS_SANDBOX" in yolo.env) == (os.geteuid() == 0)


def test_a_prompt_too_long_for_one_argument_is_setup_failed_naming_the_limit(tmp_path):
    _claude()
    with pytest.raises(SetupFailed, match="over the 122880-byte prompt limit of the claude engine"):
        ClaudeEngine().prepare(_job(tmp_path, "---\nengine: claude\ncwd: .\n---\n" + "x" * (MAX_PROMPT_BYTES + 1)))


def test_the_environment_is_only_what_claude_needs():
    env = claude_environment({"PATH": "/usr/bin", "HOME": "/h", "ANTHROPIC_API_KEY": "k",
                              "ANTHROPIC_BASE_URL": "http://127.0.0.1:1", "OPENAI_API_KEY": "secret",
                              "AWS_SECRET_ACCESS_KEY": "x"}, {"GF_JOB_ID": "j"}, "/opt/cli/claude")
    assert env["ANTHROPIC_API_KEY"] == "k" and env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"
    assert env["PATH"] == "/opt/cli" + os.pathsep + "/usr/bin" and env["GF_JOB_ID"] == "j"
    assert "OPENAI_API_KEY" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "2" and env["DISABLE_AUTOUPDATER"] == "1"


def test_the_probe_needs_the_binary_and_the_credential(tmp_path):
    _claude()
    eng = ClaudeEngine()
    found = eng.probe(environ={"HOME": str(tmp_path), "ANTHROPIC_API_KEY": "k"}, path="", timeout_s=30)
    assert found.runnable and found.version == agent_clis.pinned_version("claude")
    assert eng.tokens(found) == ["engine:claude", f"claude:{found.version}"]
    no_key = eng.probe(environ={"HOME": str(tmp_path)}, path="", timeout_s=30)
    assert not no_key.runnable and "ANTHROPIC_API_KEY" in no_key.why
    assert no_key.credentials == {"ANTHROPIC_API_KEY": False}


def test_claude_is_registered_as_an_agentic_coder():
    assert engines.get("claude").engine_class == "agentic-coder"


# -- the real binary as a station --------------------------------------------------------------


@pytest.fixture
def claude_env(tmp_path, monkeypatch):
    """The factory's environment for Claude Code: a throwaway HOME, a key, and a function that
    points it at a scripted model server."""
    _claude()
    home = tmp_path / "home"
    home.mkdir()
    # The cache folder defaults to one under HOME: keep finding the installed CLIs there.
    monkeypatch.setenv("GIGAFACTORY_AGENT_CLIS", str(agent_clis.cache_dir()))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-scripted")

    def point_at(url: str) -> None:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", url)

    return point_at


def _git_repo(repo: Path) -> None:
    for args in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"],
                 ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True)


def _turns(exchanges) -> list[dict]:
    return [e for e in exchanges if e.get("kind") in ("turn", "final")]


def _output_tokens(exchanges) -> int:
    return sum(ev["usage"]["output_tokens"] for e in _turns(exchanges) for ev in e["response"]
               if ev.get("type") == "message_delta")


def _station_job(fleet: Fleet, claude_env, server, prompt: str = "Create hello.txt as scripted.", **manifest):
    claude_env(server.url)
    return fleet.job(prompt, engine="claude", review_policy="auto", model="claude-sonnet-4-5",
                     retry={"max": 0}, timeout="120s", **manifest)


def test_a_claude_job_edits_its_repo_ships_and_records_the_servers_token_counts(nats_server, tmp_path, claude_env):
    async def main():
        with serve_in_thread(parse_script(WRITE_SCRIPT)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                f = await fleet.add_factory("c-1", probe=True)
                assert "engine:claude" in f.record.capabilities
                job = await fleet.submit_one(_station_job(fleet, claude_env, server))
                rec = await fleet.wait_stage(job, "shipped", "failed", timeout_s=150)
                last = rec.attempts[-1]
                assert rec.stage == "shipped", last.detail
                assert (fleet.repo / "hello.txt").read_text() == CONTENT
                turns = _turns(server.exchanges)
                assert len(turns) == 2
                assert "Create hello.txt as scripted." in json.dumps(turns[0]["body"]["messages"])
                u = last.usage
                assert u.input_tokens == sum(tokens_for(e["request_bytes"]) for e in turns)
                assert u.output_tokens == _output_tokens(server.exchanges)
                assert (u.turns, u.tool_calls, u.model, u.cost_source) == (2, 1, "claude-sonnet-4-5", "reported")
                assert u.cost_usd > 0 and last.attribution.cost_usd == u.cost_usd
                assert last.attribution.cost_estimated is False
                status = await fleet.client.call("status", {"job": job})
                assert status["record"]["attempts"][-1]["usage"]["cost_source"] == "reported"

                async def streamed():
                    evs = await fleet.events(job)
                    return evs if [e for e in evs if e["kind"] == "usage"] else None

                evs = await eventually(streamed, 10, what="usage events of the claude run")
                assert any(e["kind"] == "progress" and e["data"].get("tool") == "Write" for e in evs)

    run(main(), timeout_s=200)


@pytest.mark.parametrize("script, failure", [
    ({"turns": [{"error": {"status": 401, "times": 50}}]}, FailureClass.AUTH_FAILED),
    ({"turns": [{"error": {"status": 429, "retry_after_s": 1, "times": 100}}]}, FailureClass.RATE_LIMITED),
])
def test_a_refused_key_and_a_lasting_rate_limit_end_in_their_classes(nats_server, tmp_path, claude_env, script,
                                                                     failure):
    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                await fleet.add_factory("c-2", probe=True)
                job = await fleet.submit_one(_station_job(fleet, claude_env, server))
                rec = await fleet.wait_stage(job, "failed", "dead_letter", "shipped", timeout_s=150)
                assert rec.attempts[-1].outcome == failure, rec.attempts[-1].detail
                assert not (fleet.repo / "hello.txt").exists()

    run(main(), timeout_s=200)


def test_budget_tokens_stops_a_claude_run_mid_way(nats_server, tmp_path, claude_env):
    # The first turn runs a 30 s command; its message alone reports ~22k input tokens, over the
    # budget of 10k: the run is stopped while the command runs, before a second request.
    script = {"turns": [{"text": "Waiting.", "tool_calls": [{"run_command": {"command": SLOW_PYTHON}}]},
                        {"text": "Done."}]}

    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                f = await fleet.add_factory("c-3", probe=True)
                job = await fleet.submit_one(_station_job(fleet, claude_env, server, yolo=True,
                                                          budget={"tokens": 10000}))
                rec = await fleet.wait_stage(job, "failed", "dead_letter", "shipped", timeout_s=150)
                last = rec.attempts[-1]
                assert last.outcome == FailureClass.BUDGET_EXCEEDED, last.detail
                assert "budget.tokens exceeded" in last.detail
                assert len(_turns(server.exchanges)) == 1
                assert not (fleet.repo / "slept.txt").exists()
                assert last.usage is not None and last.usage.input_tokens > 10000
                [log_file] = (tmp_path / "factories" / "c-3" / "logs").iterdir()
                assert '"type":"assistant"' in log_file.read_text()
                assert f.stats["finished"] == 1

    run(main(), timeout_s=200)


def test_budget_usd_stops_a_claude_run_mid_way_on_the_priced_stream(nats_server, tmp_path, claude_env):
    # The first message alone reports ~22k input tokens of claude-sonnet-4-5, ~$0.066 at the
    # table's price: over budget.usd 0.01 while its 30 s command runs, long before the CLI's own
    # cost (in the result event, at the end) could be judged.
    script = {"turns": [{"text": "Waiting.", "tool_calls": [{"run_command": {"command": SLOW_PYTHON}}]},
                        {"text": "Done."}]}

    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                await fleet.add_factory("c-usd", probe=True)
                job = await fleet.submit_one(_station_job(fleet, claude_env, server, yolo=True,
                                                          budget={"usd": 0.01}))
                rec = await fleet.wait_stage(job, "failed", "dead_letter", "shipped", timeout_s=150)
                last = rec.attempts[-1]
                assert last.outcome == FailureClass.BUDGET_EXCEEDED, last.detail
                assert "budget.usd exceeded" in last.detail
                assert len(_turns(server.exchanges)) == 1
                assert not (fleet.repo / "slept.txt").exists()
                assert last.usage.cost_source == "priced" and last.usage.cost_usd > 0.01

    run(main(), timeout_s=200)


def test_the_factorys_price_table_setting_prices_the_stream_and_decides_the_budget(nats_server, tmp_path, claude_env):
    # The operator's table (setting price_table, given to this factory only) prices Sonnet 4.5
    # at $1,000 per million input tokens: the first message's ~22k tokens are ~$22, over
    # budget.usd 1 (the shipped table would say ~$0.07, and the CLI's own cost ~$0.13).
    from helpers import fast_settings

    table = tmp_path / "ops-prices.json"
    table.write_text(json.dumps({"version": "ops-claude-1", "models": {
        "claude-sonnet-4-5": {"input": 1000.0, "cache_read": 1.0, "output": 1000.0}}}))
    script = {"turns": [{"text": "Waiting.", "tool_calls": [{"run_command": {"command": SLOW_PYTHON}}]},
                        {"text": "Done."}]}

    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                await fleet.add_factory("c-ops", probe=True, settings=fast_settings(price_table=str(table)))
                job = await fleet.submit_one(_station_job(fleet, claude_env, server, yolo=True, budget={"usd": 1}))
                rec = await fleet.wait_stage(job, "failed", "dead_letter", "shipped", timeout_s=150)
                last = rec.attempts[-1]
                assert last.outcome == FailureClass.BUDGET_EXCEEDED, last.detail
                assert (last.usage.cost_source, last.usage.price_table) == ("priced", "ops-claude-1")
                assert len(_turns(server.exchanges)) == 1

    run(main(), timeout_s=200)


@pytest.mark.parametrize("yolo", [False, True])
def test_yolo_decides_whether_a_non_file_shell_command_runs(nats_server, tmp_path, claude_env, yolo):
    script = {"turns": [{"tool_calls": [{"run_command": {"command": RUN_PYTHON}}]}, {"text": "Over."}]}

    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                await fleet.add_factory("c-4", probe=True)
                job = await fleet.submit_one(_station_job(fleet, claude_env, server, yolo=yolo))
                rec = await fleet.wait_stage(job, "shipped", "failed", timeout_s=150)
                last = rec.attempts[-1]
                assert rec.stage == "shipped", last.detail
                assert (fleet.repo / "ran.txt").exists() == yolo
                assert ("denied: Bash" in last.detail) == (not yolo)

    run(main(), timeout_s=200)


def test_a_refused_key_withdraws_claude_from_that_factory_until_the_key_changes(nats_server, tmp_path, claude_env,
                                                                                monkeypatch):
    """auth_failed: the factory stops offering engine:claude (its record says why), the job's
    retry is claimed by another factory, and a changed ANTHROPIC_API_KEY restores the engine."""
    async def main():
        refused = {"turns": [{"error": {"status": 401, "times": 50}}]}
        with serve_in_thread(parse_script(refused)) as bad, serve_in_thread(parse_script(WRITE_SCRIPT)) as good:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(bad.url)
                a = await fleet.add_factory("c-bad", probe=True)
                assert "engine:claude" in a.record.capabilities
                job = await fleet.submit_one(fleet.job(
                    "Create hello.txt as scripted.", engine="claude", review_policy="auto",
                    model="claude-sonnet-4-5", retry={"max": 1, "backoff": "1s"}, timeout="120s"))

                async def requeued():
                    rec, _ = await fleet.record(job)
                    return rec if rec.attempts and rec.attempts[0].outcome == "auth_failed" else None

                rec = await eventually(requeued, 150, what="the first attempt ends auth_failed")
                assert rec.stage in ("queued", "assigned", "building"), rec.reason  # retried, not failed
                assert rec.attempts[0].factory == "c-bad"
                assert "engine:claude" not in a.record.capabilities
                assert "claude" in a.record.withdrawn_engines and "auth_failed" in a.record.withdrawn_engines["claude"]
                listed = await fleet.client.call("factories")
                mine = next(f for f in listed["factories"] if f["id"] == "c-bad")
                assert "engine:claude" not in mine["capabilities"] and "claude" in mine["withdrawn_engines"]
                import asyncio

                from helpers import gigafactory_cmd
                cli = await asyncio.create_subprocess_exec(
                    *gigafactory_cmd(), "factories", "--nats", nats_server.url, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
                shown, err = await asyncio.wait_for(cli.communicate(), 60)
                assert cli.returncode == 0, err
                assert "withdrawn: engine:claude (auth_failed on job" in shown.decode(), shown.decode()

                # Another factory (same key, but pointed at a server that accepts it) takes the retry.
                claude_env(good.url)
                await fleet.add_factory("c-good", probe=True)
                rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=150)
                assert rec.stage == "shipped", rec.attempts[-1].detail
                assert [x.factory for x in rec.attempts] == ["c-bad", "c-good"]
                assert "engine:claude" not in a.record.capabilities  # the key did not change

                # Unsetting the key is a change, but to nothing: the engine stays withdrawn.
                monkeypatch.setenv("ANTHROPIC_API_KEY", "")
                await eventually(lambda: "now unset" in a.record.withdrawn_engines.get("claude", ""), 10,
                                 what="the withdrawal noting the unset key")
                assert "engine:claude" not in a.record.capabilities
                monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-rotated")
                await eventually(lambda: "engine:claude" in a.record.capabilities and not a.record.withdrawn_engines,
                                 10, what="engine:claude offered again after the key changed")
                await eventually(lambda: any(p.engine == "claude" and not p.gone for p in a.pools.values()), 10,
                                 what="the factory binds to the claude pool again")

    run(main(), timeout_s=400)


def test_the_credential_fingerprint_changes_with_the_key_only():
    from gigafactory.factory.engines import get
    from gigafactory.factory.engines.base import credential_fingerprint

    names = get("claude").credential_vars({})
    assert names == ("ANTHROPIC_API_KEY",)
    one = credential_fingerprint(names, {"ANTHROPIC_API_KEY": "sk-1", "OTHER": "x"})
    assert one == credential_fingerprint(names, {"ANTHROPIC_API_KEY": "sk-1", "OTHER": "y"})
    assert one != credential_fingerprint(names, {"ANTHROPIC_API_KEY": "sk-2"})
    assert "sk-1" not in one


def test_a_rate_limited_attempt_is_retried_after_the_providers_retry_after_not_the_policys_backoff(
        nats_server, tmp_path, claude_env):
    """The CLI gives up after its own retries (CLI_MAX_RETRIES + 1 requests, all 429 with
    retry-after 2s); the factory reports the delay the CLI read and the retry waits that long,
    not the policy's 30 minutes, and then ships."""
    script = {"turns": [{"error": {"status": 429, "retry_after_s": 2, "times": CLI_MAX_RETRIES + 1}},
                        *WRITE_SCRIPT["turns"]]}

    async def main():
        with serve_in_thread(parse_script(script)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                await fleet.add_factory("c-429", probe=True)
                job = await fleet.submit_one(fleet.job(
                    "Create hello.txt as scripted.", engine="claude", review_policy="auto",
                    model="claude-sonnet-4-5", retry={"max": 1, "backoff": "30m"}, timeout="120s"))

                async def requeued():
                    rec, _ = await fleet.record(job)
                    return rec if rec.attempts and rec.attempts[0].outcome == "rate_limited" else None

                rec = await eventually(requeued, 150, what="the first attempt ends rate_limited")
                assert rec.stage != "failed", (rec.stage, rec.reason)

                async def requeue_reason():
                    evs = await fleet.events(job)
                    return next((e["reason"] for e in evs if e.get("stage_to") == "queued"
                                 and "rate_limited" in (e.get("reason") or "")), None)

                reason = await eventually(requeue_reason, 10, what="the requeue event of the rate-limited attempt")
                assert "(the provider's retry-after)" in reason and "after 1800s" not in reason, reason
                rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=150)
                assert rec.stage == "shipped", rec.attempts[-1].detail
                assert [a.outcome for a in rec.attempts] == ["rate_limited", "passed"]

    run(main(), timeout_s=400)


def test_logs_follow_shows_a_claude_run_as_turns_tool_calls_and_usage_not_json(nats_server, tmp_path, claude_env):
    import asyncio

    from helpers import gigafactory_cmd

    async def main():
        with serve_in_thread(parse_script(WRITE_SCRIPT)) as server:
            async with Fleet(nats_server.url, tmp_path) as fleet:
                _git_repo(fleet.repo)
                claude_env(server.url)
                job = await fleet.submit_one(_station_job(fleet, claude_env, server))  # queued: no factory yet
                follower = await asyncio.create_subprocess_exec(
                    *gigafactory_cmd(), "logs", job, "--follow", "--nats", nats_server.url,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
                try:
                    said = await asyncio.wait_for(follower.stderr.readline(), 30)
                    assert b"# following" in said, said  # subscribed before any output exists
                    await fleet.add_factory("c-logs", probe=True)
                    rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=150)
                    assert rec.stage == "shipped", rec.attempts[-1].detail
                    out, err = await asyncio.wait_for(follower.communicate(), 30)
                finally:
                    if follower.returncode is None:
                        follower.kill()
                        await follower.wait()
                assert follower.returncode == 0, err
                lines = out.decode().splitlines()
                assert "text: Writing the file." in lines, lines
                assert any(x.startswith("tool Write: ") and "hello.txt" in x for x in lines), lines
                assert any(x.startswith("usage: ") and "(reported)" in x for x in lines), lines
                assert not any(x.startswith("{") for x in lines), lines  # no raw stream-json

    run(main(), timeout_s=250)


def test_a_progress_item_renders_as_one_line():
    from gigafactory.factory.engines.base import Progress, render_progress

    assert render_progress(Progress("progress", {"text": "two\nlines"})) == "text: two lines"
    assert render_progress(Progress("progress", {"tool": "Bash", "input": '{"command": "ls"}'})) == \
        'tool Bash: {"command": "ls"}'
    assert render_progress(Progress("usage", {"input_tokens": 10, "output_tokens": 5, "turns": 2, "cost_usd": 0.01,
                                              "cost_source": "reported", "model": "m"})) == \
        "usage: input 10, output 5, turns 2, $0.0100 (reported) [m]"
    assert render_progress(Progress("progress", {"retry": 1, "status": 429})) == "retry=1 status=429"
    assert len(render_progress(Progress("progress", {"text": "x" * 10_000}))) == 300
