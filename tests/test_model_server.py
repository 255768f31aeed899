"""The scripted model server over real HTTP: each wire format, errors, auxiliary calls, the log.

A plain HTTP client (urllib) talks to a real server on a loopback port; the real agent CLIs are
driven against it in tests/test_agent_clis_real.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from gigafactory.model_server import (
    MAX_SCRIPT_BYTES, ScriptError, load_script, parse_script, serve_in_thread, tokens_for)

WRITE = {"write_file": {"path": "hello.txt", "content": "hi\n"}}


def _post(url: str, body: dict, headers: dict | None = None):
    """(status, headers, raw body) of a POST; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read(), len(data)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read(), len(data)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def _sse(raw: bytes) -> list[tuple[str | None, object]]:
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


# ---------------------------------------------------------------------------------------------
# Anthropic Messages


def test_anthropic_stream_renders_write_file_as_claude_codes_write_tool(tmp_path):
    script = parse_script({"turns": [{"text": "Writing.", "tool_calls": [WRITE]}]})
    body = {"model": "claude-x", "stream": True, "max_tokens": 100,
            "system": "Primary working directory: /work/repo\n",
            "messages": [{"role": "user", "content": "go"}],
            "tools": [{"name": "Write", "input_schema": {"type": "object", "properties": {
                "file_path": {"type": "string"}, "content": {"type": "string"}}}}]}
    with serve_in_thread(script) as srv:
        status, headers, raw, sent = _post(f"{srv.url}/v1/messages?beta=true", body)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = _sse(raw)
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["model"] == "claude-x" and start["usage"]["input_tokens"] == math.ceil(sent / 4)
    tool_json = json.loads(events[5][1]["delta"]["partial_json"])
    assert events[4][1]["content_block"]["name"] == "Write"
    assert tool_json == {"file_path": "/work/repo/hello.txt", "content": "hi\n"}
    assert events[7][1]["delta"]["stop_reason"] == "tool_use"


def test_anthropic_count_tokens_and_tool_less_calls_do_not_consume_turns(tmp_path):
    script = parse_script({"turns": [{"text": "first"}, {"text": "second"}]})
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
    with serve_in_thread(script) as srv:
        status, _h, raw, sent = _post(f"{srv.url}/v1/messages/count_tokens", {"messages": []})
        assert status == 200 and json.loads(raw) == {"input_tokens": tokens_for(sent)}
        status, _h, raw, _ = _post(f"{srv.url}/v1/messages", {"messages": [{"role": "user", "content": "title?"}]})
        assert json.loads(raw)["content"] == [{"type": "text", "text": "ok"}]
        _s, _h, raw, _ = _post(f"{srv.url}/v1/messages", {"messages": [], "tools": tools})
        assert json.loads(raw)["content"][0]["text"] == "first"
        _s, _h, raw, _ = _post(f"{srv.url}/v1/messages", {"messages": [], "tools": tools})
        assert json.loads(raw)["content"][0]["text"] == "second"
        _s, _h, raw, _ = _post(f"{srv.url}/v1/messages", {"messages": [], "tools": tools})
        assert json.loads(raw)["content"][0]["text"] == "Done."  # after the script: end the turn
        assert [e["kind"] for e in srv.exchanges] == ["aux", "aux", "turn", "turn", "final"]


def test_errors_carry_retry_after_and_repeat_times_then_the_script_goes_on(tmp_path):
    script = parse_script({"turns": [{"error": {"status": 429, "retry_after_s": 2, "times": 2}},
                                     {"error": 401}, {"text": "after"}]})
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
    with serve_in_thread(script) as srv:
        results = [_post(f"{srv.url}/v1/messages", {"messages": [], "tools": tools}) for _ in range(4)]
    assert [r[0] for r in results] == [429, 429, 401, 200]
    assert results[0][1]["retry-after"] == "2" and results[0][1]["retry-after-ms"] == "2000"
    assert json.loads(results[0][2])["error"]["type"] == "rate_limit_error"
    assert json.loads(results[2][2])["error"]["type"] == "authentication_error"
    assert "retry-after" not in results[2][1]


# ---------------------------------------------------------------------------------------------
# OpenAI Responses


def test_responses_stream_renders_a_function_call_and_usage(tmp_path):
    script = parse_script({"turns": [{"text": "Running.", "tool_calls": [{"run_command": {"command": "ls"}}]}]})
    body = {"model": "m", "stream": True, "input": [],
            "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {
                "command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"]}}]}
    with serve_in_thread(script) as srv:
        status, _h, raw, sent = _post(f"{srv.url}/v1/responses", body)
    events = _sse(raw)
    names = [n for n, _ in events]
    assert status == 200 and names[0] == "response.created" and names[-1] == "response.completed"
    assert all(n == d["type"] for n, d in events)
    call = [d["item"] for n, d in events if n == "response.output_item.done" and d["item"]["type"] == "function_call"]
    assert json.loads(call[0]["arguments"]) == {"command": ["bash", "-lc", "ls"]}
    usage = events[-1][1]["response"]["usage"]
    assert usage["input_tokens"] == tokens_for(sent) and usage["output_tokens"] > 0


def test_responses_renders_write_file_through_a_custom_apply_patch_tool(tmp_path):
    script = parse_script({"turns": [{"tool_calls": [WRITE]}]})
    body = {"model": "m", "stream": True, "input": [], "tools": [{"type": "custom", "name": "apply_patch"}]}
    with serve_in_thread(script) as srv:
        _s, _h, raw, _ = _post(f"{srv.url}/v1/responses", body)
    items = [d["item"] for n, d in _sse(raw) if n == "response.output_item.done"]
    assert items == [{"id": "ctc_000001_0", "type": "custom_tool_call", "status": "completed",
                      "call_id": "call_000001_0", "name": "apply_patch",
                      "input": "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"}]


def test_write_file_falls_back_to_the_shell_when_no_write_tool_is_declared(tmp_path):
    script = parse_script({"turns": [{"tool_calls": [WRITE]}]})
    body = {"model": "m", "stream": False, "input": [],
            "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {
                "cmd": {"type": "string"}}}}]}
    with serve_in_thread(script) as srv:
        _s, _h, raw, _ = _post(f"{srv.url}/v1/responses", body)
    (item,) = json.loads(raw)["output"]
    cmd = json.loads(item["arguments"])["cmd"]
    # The rendered command really writes the file, byte for byte.
    subprocess.run(["bash", "-c", cmd], cwd=tmp_path, check=True)
    assert (tmp_path / "hello.txt").read_text() == "hi\n"


# ---------------------------------------------------------------------------------------------
# OpenAI Chat Completions


def test_chat_stream_carries_tool_call_deltas_and_usage_in_the_last_chunk(tmp_path):
    script = parse_script({"turns": [{"tool_calls": [WRITE]}]})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}],
            "tools": [{"type": "function", "function": {"name": "create", "parameters": {"type": "object", "properties": {
                "path": {"type": "string"}, "file_text": {"type": "string"}}}}}]}
    with serve_in_thread(script) as srv:
        status, _h, raw, sent = _post(f"{srv.url}/v1/chat/completions", body)
    events = _sse(raw)
    assert status == 200 and events[-1] == (None, "[DONE]")
    chunks = [d for _n, d in events[:-1]]
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and
              "tool_calls" in c["choices"][0]["delta"]]
    assert deltas[0]["function"]["name"] == "create"
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"path": "hello.txt", "file_text": "hi\n"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == tokens_for(sent)


def test_chat_without_tools_as_turns_renders_an_aider_search_replace_edit(tmp_path):
    script = parse_script({"tool_less_requests": "turn", "turns": [{"text": "Here.", "tool_calls": [WRITE]}]})
    with serve_in_thread(script) as srv:
        _s, _h, raw, _ = _post(f"{srv.url}/v1/chat/completions", {"model": "m", "messages": []})
    text = json.loads(raw)["choices"][0]["message"]["content"]
    assert text == "Here.\n\nhello.txt\n```\n<<<<<<< SEARCH\n=======\nhi\n>>>>>>> REPLACE\n```\n"


def test_model_listing_is_answered_and_logged_as_auxiliary(tmp_path):
    with serve_in_thread(parse_script({"turns": ["x"], "model": "my-model"})) as srv:
        status, listing = _get(f"{srv.url}/v1/models")
        assert status == 200 and listing["data"][0]["id"] == "my-model"
        status, listing = _get(f"{srv.url}/v1beta/models")
        assert listing["models"][0]["name"] == "models/my-model"
        assert [e["kind"] for e in srv.exchanges] == ["aux", "aux"]


# ---------------------------------------------------------------------------------------------
# Gemini


def test_gemini_stream_and_unary_and_count_tokens(tmp_path):
    script = parse_script({"turns": [{"tool_calls": [WRITE]}, {"text": "done"}]})
    tools = [{"functionDeclarations": [{"name": "write_file", "parametersJsonSchema": {"type": "object", "properties": {
        "file_path": {"type": "string"}, "content": {"type": "string"}}}}]}]
    body = {"contents": [{"role": "user", "parts": [{"text": "I'm currently working in the directory: /r"}]}],
            "tools": tools}
    with serve_in_thread(script) as srv:
        base = f"{srv.url}/v1beta/models/gemini-x"
        status, headers, raw, sent = _post(f"{base}:streamGenerateContent?alt=sse", body)
        assert status == 200 and headers["content-type"] == "text/event-stream"
        (_, chunk), = _sse(raw)
        assert chunk["candidates"][0]["content"]["parts"] == [
            {"functionCall": {"name": "write_file", "args": {"file_path": "/r/hello.txt", "content": "hi\n"}}}]
        assert chunk["candidates"][0]["finishReason"] == "STOP"
        assert chunk["usageMetadata"]["promptTokenCount"] == tokens_for(sent)
        _s, _h, raw, _ = _post(f"{base}:generateContent", body)
        assert json.loads(raw)["candidates"][0]["content"]["parts"] == [{"text": "done"}]
        _s, _h, raw, sent = _post(f"{base}:countTokens", body)
        assert json.loads(raw) == {"totalTokens": tokens_for(sent)}
        # The CLI's next-speaker check (JSON mode, no tools) gets a JSON answer, not a turn.
        _s, _h, raw, _ = _post(f"{base}:generateContent", {"contents": [], "generationConfig": {
            "responseMimeType": "application/json"}})
        text = json.loads(raw)["candidates"][0]["content"]["parts"][0]["text"]
        assert json.loads(text)["next_speaker"] == "user"


# ---------------------------------------------------------------------------------------------
# The log, the script file, the command


def test_every_exchange_is_logged_as_jsonl_with_credentials_reduced(tmp_path):
    log = tmp_path / "log.jsonl"
    with serve_in_thread(parse_script({"turns": ["x"]}), log_path=log) as srv:
        _post(f"{srv.url}/v1/messages", {"messages": []}, {"x-api-key": "sk-secret-value"})
        _post(f"{srv.url}/v1/nowhere", {})
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["path"], e["kind"], e["status"]) for e in entries] == [("/v1/messages", "aux", 200),
                                                                      ("/v1/nowhere", "unknown", 404)]
    assert entries[0]["headers"]["x-api-key"] == "<15 chars>"
    assert "sk-secret-value" not in log.read_text()
    assert entries[0]["body"] == {"messages": []} and entries[0]["response"][0]["type"] == "message"


def test_oversized_and_non_json_bodies_are_refused_without_consuming_a_turn(tmp_path):
    with serve_in_thread(parse_script({"turns": ["x"]}), max_request_body_bytes=1000) as srv:
        status, _h, raw, _ = _post(f"{srv.url}/v1/messages", {"pad": "x" * 2000})
        assert status == 413 and json.loads(raw)["error"]["message"] == "request body over 1000 bytes"
        req = urllib.request.Request(f"{srv.url}/v1/messages", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400
        assert [(e["kind"], e["status"]) for e in srv.exchanges] == [("refused", 413), ("bad_request", 400)]
        assert not srv.replay._next  # the script is untouched


@pytest.mark.parametrize("doc, message", [
    ({"turns": []}, "turns: expected a non-empty list"),
    ({"turns": [{"txt": "x"}]}, "turns[0].txt: unknown field"),
    ({"turns": [{"tool_calls": [{"delete_everything": {}}]}]}, "unknown intent 'delete_everything'"),
    ({"turns": [{"tool_calls": [{"write_file": {"path": "a"}}]}]}, "write_file.content: required string"),
    ({"turns": [{"error": {"status": 200}}]}, "turns[0].error: expected {status: 4xx|5xx"),
    ({"turns": [{"error": {"status": 429, "times": 0}}]}, "turns[0].error.times"),
    ({"turns": ["x"], "tool_less_requests": "sometimes"}, "tool_less_requests: expected `aux` or `turn`"),
])
def test_bad_scripts_are_refused_naming_the_file_and_field(doc, message):
    with pytest.raises(ScriptError, match="^s.yaml: ") as err:
        parse_script(doc, "s.yaml")
    assert message in str(err.value)


def test_a_script_over_the_size_limit_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("turns: [" + "'x', " * (MAX_SCRIPT_BYTES // 5) + "]")
    with pytest.raises(ScriptError, match=f"a script is at most {MAX_SCRIPT_BYTES} bytes"):
        load_script(big)


def test_model_server_command_serves_until_terminated_and_refuses_a_bad_script(tmp_path):
    script = tmp_path / "s.yaml"
    script.write_text("model: cmd-model\nturns:\n  - text: from the command\n")
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "gigafactory", "model-server", "--script", str(script),
                             "--log", str(log)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("model server listening on http://127.0.0.1:")
        url = line.split()[4]
        _s, _h, raw, _ = _post(f"{url}/v1/chat/completions", {"model": "m", "messages": [], "tools": [
            {"type": "function", "function": {"name": "bash", "parameters": {}}}]})
        assert json.loads(raw)["choices"][0]["message"]["content"] == "from the command"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert json.loads(log.read_text().splitlines()[0])["kind"] == "turn"
    script.write_text("turns:\n  - {text: x, bogus: 1}\n")
    bad = subprocess.run([sys.executable, "-m", "gigafactory", "model-server", "--script", str(script)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and f"{script}: turns[0].bogus: unknown field" in bad.stderr
