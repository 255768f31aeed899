"""A scripted model server: real agent CLIs, no keys, no spend.

`gigafactory model-server --script FILE` listens on loopback and answers the streaming wire
formats the agent CLIs speak, replaying a script of turns instead of calling a model:

- Anthropic Messages (`POST /v1/messages`, SSE `message_start` / `content_block_*` /
  `message_delta` / `message_stop`), plus `/v1/messages/count_tokens` (Claude Code);
- OpenAI Responses (`POST /v1/responses`, SSE `response.created` ... `response.completed`)
  (Codex CLI);
- OpenAI Chat Completions (`POST /v1/chat/completions`, SSE chunks, `usage` in the last chunk)
  (Copilot CLI's bring-your-own-key mode, Aider);
- Gemini `:streamGenerateContent?alt=sse`, `:generateContent` and `:countTokens` (Gemini CLI);
- model listings (`GET /v1/models`, `GET /v1beta/models`).

The script (YAML or JSON) is a list of turns; each *main* request consumes the next one:

    model: scripted-model          # optional: the model name the server reports
    tool_less_requests: aux        # aux (default) | turn: see "Auxiliary calls" below
    turns:
      - text: "Writing the file."
        tool_calls:
          - write_file: {path: hello.txt, content: "hello\\n"}
          - run_command: {command: "ls -la"}
          - tool: {name: SomeTool, arguments: {any: thing}}   # passed through as is
      - error: {status: 429, retry_after_s: 1, times: 2}      # the next 2 requests get a 429
      - text: "Done."

Intents (`write_file`, `run_command`) are rendered as the tool call the calling CLI understands,
chosen from the tools the CLI declares in its request (Claude Code's `Write`/`Bash`, Gemini's
`write_file`/`run_shell_command`, Codex's `apply_patch`/`shell`, ...; unknown CLIs are matched by
argument names, and `write_file` falls back to a shell command). A relative path is joined to the
working directory the CLI states in its prompt when one is found. A request that declares no
tools at all is answered as an edit in Aider's SEARCH/REPLACE text format.

Auxiliary calls (model listings, token counting, and with `tool_less_requests: aux` every
generation request that declares no tools: title generation, quota probes, Gemini's
next-speaker check) are answered without consuming a turn and logged with `kind: aux`.
After the last turn, every main request gets the text `Done.` and ends the CLI's turn.

Token counts are deterministic, by this rule: input tokens = ceil(request body bytes / 4),
output tokens = ceil(bytes of the rendered assistant content (texts, tool names and argument
JSON) / 4); cache-read and cache-write tokens are 0 unless a turn sets `usage: {...}`.

Every request and response is appended to a JSONL log (`--log FILE`): method, path, the parsed
body, the headers (credentials reduced to their length), the turn consumed, status and the
response events, so tests can assert what a CLI sent.

The protocol logic (script parsing, rendering, events) is pure; `ModelServer` is the thin
asyncio-streams HTTP layer around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

# Limits: a script is written by hand, a request by a CLI (Claude Code sends ~100 KiB of tool
# schemas per call; 32 MiB leaves room for long conversations and refuses runaway bodies).
MAX_SCRIPT_BYTES = 1024 * 1024
MAX_TURNS = 1000
MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_ERROR_TIMES = 1000
# Idle keep-alive connections are closed after this long so a crashed CLI cannot pin a task.
IDLE_CONNECTION_TIMEOUT_S = 120.0
DEFAULT_MODEL = "scripted-model"
FINAL_TEXT = "Done."
AUX_TEXT = "ok"

_INTENTS = ("write_file", "run_command", "tool")
_ERROR_KINDS = {
    400: ("invalid_request_error", "Bad request (scripted)."),
    401: ("authentication_error", "Invalid API key (scripted)."),
    403: ("permission_error", "Forbidden (scripted)."),
    404: ("not_found_error", "Not found (scripted)."),
    413: ("request_too_large", "Request too large (scripted)."),
    429: ("rate_limit_error", "Rate limit exceeded (scripted)."),
    500: ("api_error", "Internal server error (scripted)."),
    503: ("overloaded_error", "Overloaded (scripted)."),
    529: ("overloaded_error", "Overloaded (scripted)."),
}


class ScriptError(ValueError):
    """A script file that cannot be replayed; the message names the file, the field and the fix."""


# --------------------------------------------------------------------------------------------
# The script (pure)


@dataclasses.dataclass(frozen=True)
class ToolIntent:
    """One scripted tool call: `kind` is write_file, run_command or tool; `args` its fields."""

    kind: str
    args: dict


@dataclasses.dataclass(frozen=True)
class ScriptedError:
    """An HTTP error answered to `times` consecutive main requests."""

    status: int
    message: str
    retry_after_s: float | None
    times: int


@dataclasses.dataclass(frozen=True)
class Turn:
    """One scripted answer: text and/or tool calls, or an error."""

    text: str = ""
    tool_calls: tuple[ToolIntent, ...] = ()
    error: ScriptedError | None = None
    usage: dict | None = None


@dataclasses.dataclass(frozen=True)
class Script:
    """A parsed script: turns, the reported model name, and how tool-less requests count."""

    turns: tuple[Turn, ...]
    model: str = DEFAULT_MODEL
    tool_less_requests: str = "aux"


def _err(source: str, where: str, what: str) -> ScriptError:
    return ScriptError(f"{source}: {where}: {what}")


def parse_script(data: Any, source: str = "<script>") -> Script:
    """Validate a decoded script document.

    Parameters: `data` the decoded YAML/JSON value; `source` the file name used in errors.
    """
    if isinstance(data, list):
        data = {"turns": data}
    if not isinstance(data, dict):
        raise _err(source, "top level", "expected a mapping with a `turns` list")
    unknown = set(data) - {"turns", "model", "tool_less_requests"}
    if unknown:
        raise _err(source, f"field {sorted(unknown)[0]!r}", "unknown; known: turns, model, tool_less_requests")
    raw_turns = data.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise _err(source, "turns", "expected a non-empty list of turns")
    if len(raw_turns) > MAX_TURNS:
        raise _err(source, "turns", f"{len(raw_turns)} turns; at most {MAX_TURNS}")
    model = data.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise _err(source, "model", "expected a non-empty string")
    tool_less = data.get("tool_less_requests", "aux")
    if tool_less not in ("aux", "turn"):
        raise _err(source, "tool_less_requests", "expected `aux` or `turn`")
    turns = tuple(_parse_turn(t, source, f"turns[{i}]") for i, t in enumerate(raw_turns))
    return Script(turns=turns, model=model, tool_less_requests=tool_less)


def _parse_turn(raw: Any, source: str, where: str) -> Turn:
    if isinstance(raw, str):
        return Turn(text=raw)
    if not isinstance(raw, dict):
        raise _err(source, where, "expected a mapping (text, tool_calls, error, usage) or a string")
    unknown = set(raw) - {"text", "tool_calls", "error", "usage"}
    if unknown:
        raise _err(source, f"{where}.{sorted(unknown)[0]}", "unknown field; known: text, tool_calls, error, usage")
    text = raw.get("text", "")
    if not isinstance(text, str):
        raise _err(source, f"{where}.text", "expected a string")
    usage = raw.get("usage")
    if usage is not None and not (isinstance(usage, dict) and all(isinstance(v, int) and v >= 0 for v in usage.values())):
        raise _err(source, f"{where}.usage", "expected a mapping of token counts (non-negative integers)")
    if "error" in raw:
        if text or raw.get("tool_calls"):
            raise _err(source, where, "an error turn carries no text or tool_calls")
        return Turn(error=_parse_error(raw["error"], source, f"{where}.error"))
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _err(source, f"{where}.tool_calls", "expected a list")
    intents = tuple(_parse_intent(c, source, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
    if not text and not intents:
        raise _err(source, where, "empty turn: give text, tool_calls or error")
    return Turn(text=text, tool_calls=intents, usage=usage)


def _parse_error(raw: Any, source: str, where: str) -> ScriptedError:
    if isinstance(raw, int):
        raw = {"status": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("status"), int) or not 400 <= raw["status"] <= 599:
        raise _err(source, where, "expected {status: 4xx|5xx, retry_after_s?, message?, times?}")
    times = raw.get("times", 1)
    if not isinstance(times, int) or not 1 <= times <= MAX_ERROR_TIMES:
        raise _err(source, f"{where}.times", f"expected an integer from 1 to {MAX_ERROR_TIMES}")
    retry = raw.get("retry_after_s")
    if retry is not None and (not isinstance(retry, (int, float)) or retry < 0):
        raise _err(source, f"{where}.retry_after_s", "expected a non-negative number of seconds")
    default_message = _ERROR_KINDS.get(raw["status"], ("api_error", "Error (scripted)."))[1]
    return ScriptedError(status=raw["status"], message=str(raw.get("message", default_message)),
                         retry_after_s=retry, times=times)


def _parse_intent(raw: Any, source: str, where: str) -> ToolIntent:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise _err(source, where, f"expected one of {', '.join(_INTENTS)} as a single key")
    (kind, args), = raw.items()
    if kind not in _INTENTS:
        raise _err(source, where, f"unknown intent {kind!r}; known: {', '.join(_INTENTS)}")
    if not isinstance(args, dict):
        raise _err(source, f"{where}.{kind}", "expected a mapping")
    need = {"write_file": ("path", "content"), "run_command": ("command",), "tool": ("name",)}[kind]
    for key in need:
        if not isinstance(args.get(key), str):
            raise _err(source, f"{where}.{kind}.{key}", "required string")
    if kind == "tool" and not isinstance(args.get("arguments", {}), dict):
        raise _err(source, f"{where}.tool.arguments", "expected a mapping")
    return ToolIntent(kind=kind, args=dict(args))


def load_script(path: str | Path) -> Script:
    """Read and validate a script file (YAML or JSON, at most MAX_SCRIPT_BYTES).

    Parameters: `path` the script file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ScriptError(f"{p}: cannot read the script: {exc.strerror}") from None
    if size > MAX_SCRIPT_BYTES:
        raise ScriptError(f"{p}: {size} bytes; a script is at most {MAX_SCRIPT_BYTES} bytes")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark else "parse"
        raise ScriptError(f"{p}: {at}: not valid YAML/JSON: {getattr(exc, 'problem', exc)}") from None
    return parse_script(data, str(p))


# --------------------------------------------------------------------------------------------
# Tool rendering (pure): intent + the tools a CLI declared -> (tool name, arguments | raw input)


@dataclasses.dataclass(frozen=True)
class DeclaredTool:
    """A tool as the CLI declared it: `kind` function or custom (freeform input)."""

    name: str
    kind: str
    properties: dict
    required: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RenderedCall:
    """A tool call to send: `arguments` for function tools, `raw_input` for custom tools."""

    name: str
    arguments: dict | None
    raw_input: str | None = None

    def content_bytes(self) -> int:
        body = self.raw_input if self.raw_input is not None else json.dumps(self.arguments)
        return len(self.name.encode()) + len(body.encode())


_WRITE_NAMES = ("Write", "write_file", "create", "write", "str_replace_based_edit_tool", "str_replace_editor",
                "apply_patch")
_SHELL_NAMES = ("Bash", "run_shell_command", "shell_command", "shell", "exec_command", "bash", "powershell")
_PATH_KEYS = ("file_path", "path", "filename", "file", "absolute_path")
_CONTENT_KEYS = ("content", "file_text", "contents", "text")
_COMMAND_KEYS = ("command", "cmd", "commandLine", "script")

# Where CLIs state their working directory in the prompt (Claude Code, Codex, Gemini, Copilot).
_CWD_PATTERNS = (
    re.compile(r"[Ww]orking directory: (/[^\s<>\"'\\]+)"),
    re.compile(r"<cwd>(/[^<]+)</cwd>"),
    re.compile(r"working in the directory:?\s+(/[^\s<>\"']+)"),
    re.compile(r"[Cc]urrent working directory[^/\n]{0,20}(/[^\s<>\"'`]+)"),
)


def find_cwd(body_text: str) -> str | None:
    """The working directory a CLI stated in its request, or None."""
    for pattern in _CWD_PATTERNS:
        m = pattern.search(body_text)
        if m:
            return m.group(1).rstrip(".,;:)")
    return None


def _fill_required(tool: DeclaredTool, args: dict) -> dict:
    # A CLI may require fields the script does not name (e.g. a `description`): fill them with
    # neutral values of the declared type so the CLI's argument validation passes.
    for key in tool.required:
        if key in args:
            continue
        typ = (tool.properties.get(key) or {}).get("type")
        args[key] = {"boolean": False, "integer": 0, "number": 0, "array": [], "object": {}}.get(typ, "scripted")
    return args


def _shell_call(tool: DeclaredTool, command: str) -> RenderedCall:
    if tool.kind == "custom":
        return RenderedCall(tool.name, None, raw_input=command)
    key = next((k for k in _COMMAND_KEYS if k in tool.properties), "command")
    if (tool.properties.get(key) or {}).get("type") == "array":
        value: Any = ["bash", "-lc", command]
    else:
        value = command
    args = {key: value}
    if "description" in tool.properties:
        args["description"] = "Run a scripted command"
    return RenderedCall(tool.name, _fill_required(tool, args))


def _add_file_patch(path: str, content: str) -> str:
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    body = "".join(f"+{line}\n" for line in lines)
    return f"*** Begin Patch\n*** Add File: {path}\n{body}*** End Patch\n"


def render_intent(intent: ToolIntent, tools: list[DeclaredTool], cwd: str | None) -> RenderedCall:
    """The tool call that performs `intent` with the tools the CLI declared.

    Parameters: `intent` the scripted intent; `tools` the CLI's declared tools; `cwd` the working
    directory the CLI stated (relative paths are joined to it), or None.
    Raises ScriptError when no declared tool can perform the intent.
    """
    by_name = {t.name: t for t in tools}
    if intent.kind == "tool":
        return RenderedCall(intent.args["name"], dict(intent.args.get("arguments", {})))
    if intent.kind == "run_command":
        for name in _SHELL_NAMES:
            if name in by_name:
                return _shell_call(by_name[name], intent.args["command"])
        for tool in tools:
            if any(k in tool.properties for k in ("command", "cmd")) and tool.kind == "function":
                return _shell_call(tool, intent.args["command"])
        raise ScriptError(f"run_command: the CLI declared no shell tool (declared: {sorted(by_name)})")
    path, content = intent.args["path"], intent.args["content"]
    abs_path = path if path.startswith("/") or not cwd else f"{cwd.rstrip('/')}/{path}"
    for name in _WRITE_NAMES:
        tool = by_name.get(name)
        if tool is None:
            continue
        if name == "apply_patch":
            patch = _add_file_patch(path, content)
            if tool.kind == "custom":
                return RenderedCall(name, None, raw_input=patch)
            key = "input" if "input" in tool.properties or not tool.properties else next(iter(tool.properties))
            return RenderedCall(name, {key: patch})
        if name in ("str_replace_based_edit_tool", "str_replace_editor"):
            return RenderedCall(name, {"command": "create", "path": abs_path, "file_text": content})
        pkey = next((k for k in _PATH_KEYS if k in tool.properties), None)
        ckey = next((k for k in _CONTENT_KEYS if k in tool.properties), None)
        if pkey and ckey:
            return RenderedCall(name, _fill_required(tool, {pkey: abs_path, ckey: content}))
    # No file-writing tool: write it through the shell (the here-document's quoted delimiter
    # keeps the content literal).
    delimiter = "GIGAFACTORY_EOF"
    command = f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}' <<'{delimiter}'\n{content}"
    if not content.endswith("\n"):
        command += "\n"
    command += delimiter
    for name in _SHELL_NAMES:
        if name in by_name:
            return _shell_call(by_name[name], command)
    raise ScriptError(f"write_file: the CLI declared no file-writing or shell tool (declared: {sorted(by_name)})")


def render_text_edit(intent: ToolIntent) -> str:
    """An intent as text for a CLI that edits through its reply (Aider's SEARCH/REPLACE format)."""
    if intent.kind == "write_file":
        content = intent.args["content"]
        if not content.endswith("\n"):
            content += "\n"
        return f"{intent.args['path']}\n```\n<<<<<<< SEARCH\n=======\n{content}>>>>>>> REPLACE\n```\n"
    if intent.kind == "run_command":
        return f"```bash\n{intent.args['command']}\n```\n"
    return json.dumps({intent.args["name"]: intent.args.get("arguments", {})}) + "\n"


def tokens_for(n_bytes: int) -> int:
    """The documented token rule: one token per 4 bytes, rounded up."""
    return math.ceil(n_bytes / 4)


# --------------------------------------------------------------------------------------------
# Declared tools per wire format (pure)


def _schema_props(schema: Any) -> tuple[dict, tuple[str, ...]]:
    if not isinstance(schema, dict):
        return {}, ()
    props = schema.get("properties") or {}
    required = tuple(schema.get("required") or ())
    return (props if isinstance(props, dict) else {}), required


def tools_anthropic(body: dict) -> list[DeclaredTool]:
    out = []
    for t in body.get("tools") or []:
        if isinstance(t, dict) and "name" in t:
            props, req = _schema_props(t.get("input_schema"))
            out.append(DeclaredTool(t["name"], "function", props, req))
    return out


def tools_responses(body: dict) -> list[DeclaredTool]:
    out = []
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "function" and "name" in t:
            props, req = _schema_props(t.get("parameters"))
            out.append(DeclaredTool(t["name"], "function", props, req))
        elif t.get("type") == "custom" and "name" in t:
            out.append(DeclaredTool(t["name"], "custom", {}, ()))
    return out


def tools_chat(body: dict) -> list[DeclaredTool]:
    out = []
    for t in body.get("tools") or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and "name" in fn:
            props, req = _schema_props(fn.get("parameters"))
            out.append(DeclaredTool(fn["name"], "function", props, req))
    return out


def tools_gemini(body: dict) -> list[DeclaredTool]:
    out = []
    for group in body.get("tools") or []:
        for fn in (group or {}).get("functionDeclarations") or []:
            if isinstance(fn, dict) and "name" in fn:
                props, req = _schema_props(fn.get("parametersJsonSchema") or fn.get("parameters"))
                out.append(DeclaredTool(fn["name"], "function", props, req))
    return out


# --------------------------------------------------------------------------------------------
# The replay state (pure apart from the lock the HTTP layer holds around it)


@dataclasses.dataclass
class Reply:
    """What a main or auxiliary request is answered with."""

    kind: str  # turn | aux | error | final
    turn_index: int | None
    text: str = ""
    calls: tuple[RenderedCall, ...] = ()
    error: ScriptedError | None = None
    usage: dict | None = None


class Replay:
    """Hands out the script's turns in order; errors with `times` answer that many requests."""

    def __init__(self, script: Script):
        self.script = script
        self._next = 0
        self._error_left = 0

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self.script.turns)

    def take(self) -> tuple[int | None, Turn | None]:
        if self._error_left:
            self._error_left -= 1
            idx = self._next - 1
            return idx, self.script.turns[idx]
        if self.exhausted:
            return None, None
        idx = self._next
        turn = self.script.turns[idx]
        self._next += 1
        if turn.error is not None:
            self._error_left = turn.error.times - 1
        return idx, turn


def _ids() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield f"{n:06d}"


# --------------------------------------------------------------------------------------------
# Wire formats (pure): Reply -> (status, headers, body bytes)


def _sse(events: list[tuple[str | None, dict | str]]) -> bytes:
    chunks = []
    for name, data in events:
        payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        chunks.append((f"event: {name}\n" if name else "") + f"data: {payload}\n\n")
    return "".join(chunks).encode()


def _usage_numbers(reply: Reply, request_bytes: int) -> dict:
    out_bytes = len(reply.text.encode()) + sum(c.content_bytes() for c in reply.calls)
    usage = {"input_tokens": tokens_for(request_bytes), "output_tokens": tokens_for(out_bytes),
             "cache_read_tokens": 0, "cache_write_tokens": 0}
    usage.update(reply.usage or {})
    return usage


def anthropic_response(reply: Reply, model: str, request_bytes: int, stream: bool, msg_id: str) -> tuple[bytes, list]:
    u = _usage_numbers(reply, request_bytes)
    usage = {"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
             "cache_creation_input_tokens": u["cache_write_tokens"], "cache_read_input_tokens": u["cache_read_tokens"]}
    content: list[dict] = []
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    for i, call in enumerate(reply.calls):
        content.append({"type": "tool_use", "id": f"toolu_{msg_id}_{i}", "name": call.name,
                        "input": call.arguments if call.arguments is not None else {"input": call.raw_input}})
    stop = "tool_use" if reply.calls else "end_turn"
    message = {"id": f"msg_{msg_id}", "type": "message", "role": "assistant", "model": model,
               "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}
    if not stream:
        return json.dumps(message).encode(), [message]
    start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    events: list[tuple[str | None, dict | str]] = [("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(content):
        if block["type"] == "text":
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}}))
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": block["text"]}}))
        else:
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": dict(block, input={})}))
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "input_json_delta",
                                                             "partial_json": json.dumps(block["input"])}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return _sse(events), [e[1] for e in events]


def responses_response(reply: Reply, model: str, request_bytes: int, stream: bool, rid: str) -> tuple[bytes, list]:
    u = _usage_numbers(reply, request_bytes)
    usage = {"input_tokens": u["input_tokens"], "input_tokens_details": {"cached_tokens": u["cache_read_tokens"]},
             "output_tokens": u["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": u["input_tokens"] + u["output_tokens"]}
    created = int(time.time())
    base = {"id": f"resp_{rid}", "object": "response", "created_at": created, "model": model}
    items: list[dict] = []
    events: list[tuple[str | None, dict | str]] = []
    seq = 0

    def ev(name: str, data: dict) -> None:
        nonlocal seq
        events.append((name, dict(data, type=name, sequence_number=seq)))
        seq += 1

    ev("response.created", {"response": dict(base, status="in_progress", output=[])})
    ev("response.in_progress", {"response": dict(base, status="in_progress", output=[])})
    if reply.text:
        idx = len(items)
        item_id = f"msg_{rid}"
        ev("response.output_item.added", {"output_index": idx, "item": {"id": item_id, "type": "message",
                                          "role": "assistant", "status": "in_progress", "content": []}})
        part = {"type": "output_text", "text": "", "annotations": []}
        ev("response.content_part.added", {"item_id": item_id, "output_index": idx, "content_index": 0, "part": part})
        ev("response.output_text.delta", {"item_id": item_id, "output_index": idx, "content_index": 0,
                                          "delta": reply.text})
        ev("response.output_text.done", {"item_id": item_id, "output_index": idx, "content_index": 0,
                                         "text": reply.text})
        done_part = dict(part, text=reply.text)
        ev("response.content_part.done", {"item_id": item_id, "output_index": idx, "content_index": 0,
                                          "part": done_part})
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [done_part]}
        ev("response.output_item.done", {"output_index": idx, "item": item})
        items.append(item)
    for i, call in enumerate(reply.calls):
        idx = len(items)
        if call.raw_input is not None:
            item = {"id": f"ctc_{rid}_{i}", "type": "custom_tool_call", "status": "completed",
                    "call_id": f"call_{rid}_{i}", "name": call.name, "input": call.raw_input}
            ev("response.output_item.added", {"output_index": idx, "item": dict(item, input="", status="in_progress")})
            ev("response.custom_tool_call_input.delta", {"item_id": item["id"], "output_index": idx,
                                                         "delta": call.raw_input})
            ev("response.custom_tool_call_input.done", {"item_id": item["id"], "output_index": idx,
                                                        "input": call.raw_input})
        else:
            args = json.dumps(call.arguments)
            item = {"id": f"fc_{rid}_{i}", "type": "function_call", "status": "completed",
                    "call_id": f"call_{rid}_{i}", "name": call.name, "arguments": args}
            ev("response.output_item.added", {"output_index": idx,
                                              "item": dict(item, arguments="", status="in_progress")})
            ev("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": idx, "delta": args})
            ev("response.function_call_arguments.done", {"item_id": item["id"], "output_index": idx,
                                                         "arguments": args})
        ev("response.output_item.done", {"output_index": idx, "item": item})
        items.append(item)
    final = dict(base, status="completed", output=items, usage=usage)
    ev("response.completed", {"response": final})
    if not stream:
        return json.dumps(final).encode(), [final]
    return _sse(events), [e[1] for e in events]


def chat_response(reply: Reply, model: str, request_bytes: int, stream: bool, cid: str) -> tuple[bytes, list]:
    u = _usage_numbers(reply, request_bytes)
    usage = {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
             "total_tokens": u["input_tokens"] + u["output_tokens"],
             "prompt_tokens_details": {"cached_tokens": u["cache_read_tokens"]}}
    created = int(time.time())
    base = {"id": f"chatcmpl-{cid}", "object": "chat.completion.chunk", "created": created, "model": model}
    finish = "tool_calls" if reply.calls else "stop"
    tool_calls = [{"index": i, "id": f"call_{cid}_{i}", "type": "function",
                   "function": {"name": c.name, "arguments": json.dumps(c.arguments if c.arguments is not None
                                                                        else {"input": c.raw_input})}}
                  for i, c in enumerate(reply.calls)]
    if not stream:
        message: dict = {"role": "assistant", "content": reply.text or None}
        if tool_calls:
            message["tool_calls"] = [{k: v for k, v in tc.items() if k != "index"} for tc in tool_calls]
        body = dict(base, object="chat.completion",
                    choices=[{"index": 0, "message": message, "finish_reason": finish}], usage=usage)
        return json.dumps(body).encode(), [body]
    chunks: list[dict] = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}])]
    if reply.text:
        chunks.append(dict(base, choices=[{"index": 0, "delta": {"content": reply.text}, "finish_reason": None}]))
    for tc in tool_calls:
        head = {"index": tc["index"], "id": tc["id"], "type": "function",
                "function": {"name": tc["function"]["name"], "arguments": ""}}
        chunks.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [head]}, "finish_reason": None}]))
        chunks.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [
            {"index": tc["index"], "function": {"arguments": tc["function"]["arguments"]}}]}, "finish_reason": None}]))
    chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
    # Usage rides in a last chunk with no choices, as OpenAI sends it with include_usage.
    chunks.append(dict(base, choices=[], usage=usage))
    events: list[tuple[str | None, dict | str]] = [(None, c) for c in chunks] + [(None, "[DONE]")]
    return _sse(events), chunks


def gemini_response(reply: Reply, model: str, request_bytes: int, stream: bool) -> tuple[bytes, list]:
    u = _usage_numbers(reply, request_bytes)
    usage = {"promptTokenCount": u["input_tokens"], "candidatesTokenCount": u["output_tokens"],
             "totalTokenCount": u["input_tokens"] + u["output_tokens"],
             "cachedContentTokenCount": u["cache_read_tokens"]}
    parts: list[dict] = []
    if reply.text:
        parts.append({"text": reply.text})
    for c in reply.calls:
        parts.append({"functionCall": {"name": c.name,
                                       "args": c.arguments if c.arguments is not None else {"input": c.raw_input}}})
    whole = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
             "usageMetadata": usage, "modelVersion": model}
    if not stream:
        return json.dumps(whole).encode(), [whole]
    # One chunk per part, usage and finishReason on the last, as the API streams them.
    chunks = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        cand = {"content": {"role": "model", "parts": [part]}, "index": 0}
        chunk: dict = {"candidates": [dict(cand, finishReason="STOP") if last else cand], "modelVersion": model}
        if last:
            chunk["usageMetadata"] = usage
        chunks.append(chunk)
    return "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks).encode(), chunks


def error_response(api: str, err: ScriptedError) -> tuple[bytes, dict, dict]:
    """(body, headers, logged body) for a scripted error in the caller's API dialect."""
    etype = _ERROR_KINDS.get(err.status, ("api_error", ""))[0]
    if api == "anthropic":
        body = {"type": "error", "error": {"type": etype, "message": err.message}}
    elif api == "gemini":
        status = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED",
                  400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}.get(err.status, "INTERNAL")
        body = {"error": {"code": err.status, "message": err.message, "status": status}}
    else:
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(err.status, etype)
        body = {"error": {"message": err.message, "type": etype, "param": None, "code": code}}
    headers = {}
    if err.retry_after_s is not None:
        headers["retry-after"] = str(math.ceil(err.retry_after_s))
        headers["retry-after-ms"] = str(int(err.retry_after_s * 1000))
    return json.dumps(body).encode(), headers, body


# --------------------------------------------------------------------------------------------
# The HTTP layer (thin I/O)

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable", 529: "Overloaded"}
_SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie")
_GEMINI_PATH = re.compile(r"^/(?:v1beta|v1|v1alpha)/models/([^/:]+):(streamGenerateContent|generateContent|countTokens)$")


class ModelServer:
    """The scripted model server on 127.0.0.1.

    Parameters: `script` the parsed script; `port` the port (0: any free port); `log_path` the JSONL
    log to append every exchange to (None: keep in memory only, see `exchanges`);
    `max_request_body_bytes` larger bodies are answered 413 and the connection closed.
    """

    def __init__(self, script: Script, port: int = 0, log_path: str | Path | None = None,
                 max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES):
        self.max_request_body_bytes = max_request_body_bytes
        self.script = script
        self.replay = Replay(script)
        self.port = port
        self.log_path = Path(log_path) if log_path else None
        self.exchanges: list[dict] = []
        self._ids = _ids()
        self._lock = threading.Lock()
        self._server: asyncio.base_events.Server | None = None
        # Open connections' handler tasks: stop() cancels them (keep-alive clients hold them).
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, limit=MAX_HEADER_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- connection loop

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(self._read_request(reader), IDLE_CONNECTION_TIMEOUT_S)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                if request is None:
                    return
                method, target, headers, body_or_error = request
                if isinstance(body_or_error, tuple):
                    status, message = body_or_error
                    self._log({"seq": int(next(self._ids)), "time": time.time(), "method": method,
                               "path": target.partition("?")[0], "query": target.partition("?")[2],
                               "headers": {}, "request_bytes": int(headers.get("content-length") or 0),
                               "body": None, "kind": "refused", "status": status,
                               "response": {"error": {"message": message}}})
                    await self._write(writer, status, {"content-type": "application/json"},
                                      json.dumps({"error": {"message": message}}).encode(), close=True)
                    return
                status, out_headers, payload = self._dispatch(method, target, headers, body_or_error)
                close = headers.get("connection", "").lower() == "close"
                await self._write(writer, status, out_headers, payload, close=close)
                if close:
                    return
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return "GET", "/", {}, (431, f"request headers over {MAX_HEADER_BYTES} bytes")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            return "GET", "/", {}, (400, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                if len(body) + size > self.max_request_body_bytes:
                    return method, target, headers, (413, f"request body over {self.max_request_body_bytes} bytes")
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            raw = bytes(body)
        else:
            length = int(headers.get("content-length", "0") or 0)
            if length > self.max_request_body_bytes:
                return method, target, headers, (413, f"request body over {self.max_request_body_bytes} bytes")
            raw = await reader.readexactly(length) if length else b""
        if headers.get("content-encoding", "").lower() == "gzip":
            raw = gzip.decompress(raw)
        return method, target, headers, raw

    async def _write(self, writer, status: int, headers: dict, payload: bytes, *, close: bool) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        headers = dict(headers, **{"content-length": str(len(payload)),
                                   "connection": "close" if close else "keep-alive"})
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()

    # -- dispatch (takes the lock: the replay order is the arrival order)

    def _dispatch(self, method: str, target: str, headers: dict, raw: bytes) -> tuple[int, dict, bytes]:
        path, _, query = target.partition("?")
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        with self._lock:
            seq = next(self._ids)
            entry: dict = {"seq": int(seq), "time": time.time(), "method": method, "path": path, "query": query,
                           "headers": {k: (f"<{len(v)} chars>" if k in _SECRET_HEADERS else v)
                                       for k, v in headers.items()},
                           "request_bytes": len(raw), "body": body}
            try:
                status, out_headers, payload, logged = self._answer(method, path, query, body, len(raw), seq, entry)
            except ScriptError as exc:
                status, out_headers = 500, {"content-type": "application/json"}
                logged = {"error": {"type": "script_error", "message": str(exc)}}
                payload = json.dumps(logged).encode()
                entry["kind"] = "script_error"
            entry.update(status=status, response_headers=out_headers, response=logged)
            self._log(entry)
        return status, out_headers, payload

    def _log(self, entry: dict) -> None:
        self.exchanges.append(entry)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def _answer(self, method, path, query, body, request_bytes, seq, entry):
        json_headers = {"content-type": "application/json"}
        sse_headers = {"content-type": "text/event-stream", "cache-control": "no-cache"}
        model = self.script.model
        if body is None:
            entry["kind"] = "bad_request"
            err = {"error": {"message": "request body is not JSON"}}
            return 400, json_headers, json.dumps(err).encode(), err
        # Model listings: every dialect's shape in one answer is not possible; pick by path.
        if method == "GET" and path.rstrip("/") in ("/v1/models", "/models"):
            entry["kind"] = "aux"
            listing = {"object": "list", "data": [{"id": model, "object": "model", "type": "model",
                                                   "display_name": model, "created": 0, "owned_by": "gigafactory",
                                                   "created_at": "2026-01-01T00:00:00Z"}],
                       "has_more": False, "first_id": model, "last_id": model}
            return 200, json_headers, json.dumps(listing).encode(), listing
        if method == "GET" and path.rstrip("/") in ("/v1beta/models", "/v1/models"):
            entry["kind"] = "aux"
            listing = {"models": [{"name": f"models/{model}", "displayName": model,
                                   "supportedGenerationMethods": ["generateContent", "countTokens"]}]}
            return 200, json_headers, json.dumps(listing).encode(), listing
        if method != "POST":
            entry["kind"] = "unknown"
            err = {"error": {"message": f"no route {method} {path}"}}
            return 404, json_headers, json.dumps(err).encode(), err
        if path.endswith("/messages/count_tokens"):
            entry["kind"] = "aux"
            counted = {"input_tokens": tokens_for(request_bytes)}
            return 200, json_headers, json.dumps(counted).encode(), counted
        gm = _GEMINI_PATH.match(path)
        if gm and gm.group(2) == "countTokens":
            entry["kind"] = "aux"
            counted = {"totalTokens": tokens_for(request_bytes)}
            return 200, json_headers, json.dumps(counted).encode(), counted
        if path.endswith("/messages"):
            api, tools, stream = "anthropic", tools_anthropic(body), bool(body.get("stream"))
        elif path.endswith("/responses"):
            api, tools, stream = "responses", tools_responses(body), body.get("stream", False) is not False
        elif path.endswith("/chat/completions"):
            api, tools, stream = "chat", tools_chat(body), bool(body.get("stream"))
        elif gm:
            api, tools, stream = "gemini", tools_gemini(body), gm.group(2) == "streamGenerateContent"
        else:
            entry["kind"] = "unknown"
            err = {"error": {"message": f"no route {method} {path}"}}
            return 404, json_headers, json.dumps(err).encode(), err
        entry["api"] = api
        reported_model = body.get("model") or (gm.group(1) if gm else None) or model
        if not tools and self.script.tool_less_requests == "aux":
            entry["kind"] = "aux"
            reply = Reply(kind="aux", turn_index=None, text=self._aux_text(api, body))
        else:
            idx, turn = self.replay.take()
            entry["turn"] = idx
            if turn is None:
                entry["kind"] = "final"
                reply = Reply(kind="final", turn_index=None, text=FINAL_TEXT)
            elif turn.error is not None:
                entry["kind"] = "error"
                payload, headers, logged = error_response(api, turn.error)
                return turn.error.status, dict(json_headers, **headers), payload, logged
            else:
                entry["kind"] = "turn"
                if tools:
                    cwd = find_cwd(json.dumps(body))
                    entry["cwd_seen"] = cwd
                    calls = tuple(render_intent(i, tools, cwd) for i in turn.tool_calls)
                    reply = Reply("turn", idx, text=turn.text, calls=calls, usage=turn.usage)
                else:
                    text = turn.text + ("\n\n" if turn.text and turn.tool_calls else "")
                    text += "".join(render_text_edit(i) for i in turn.tool_calls)
                    reply = Reply("turn", idx, text=text, usage=turn.usage)
        if api == "anthropic":
            payload, events = anthropic_response(reply, reported_model, request_bytes, stream, seq)
        elif api == "responses":
            payload, events = responses_response(reply, reported_model, request_bytes, stream, seq)
        elif api == "chat":
            payload, events = chat_response(reply, reported_model, request_bytes, stream, seq)
        else:
            payload, events = gemini_response(reply, reported_model, request_bytes, stream)
        return 200, (sse_headers if stream else json_headers), payload, events

    @staticmethod
    def _aux_text(api: str, body: dict) -> str:
        # Gemini CLI's next-speaker check asks for JSON; answering "user" ends its turn cleanly.
        config = body.get("generationConfig") or {}
        if api == "gemini" and config.get("responseMimeType") == "application/json":
            return json.dumps({"reasoning": "scripted", "next_speaker": "user"})
        return AUX_TEXT


@contextlib.contextmanager
def serve_in_thread(script: Script, log_path: str | Path | None = None, port: int = 0, **options):
    """Run a ModelServer on its own event loop in a thread; yields the started server.

    Parameters: `script` the parsed script; `log_path` the JSONL log (optional); `port` (0: any);
    `options` further ModelServer keyword arguments.
    """
    server = ModelServer(script, port=port, log_path=log_path, **options)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())
        loop.close()

    thread = threading.Thread(target=run, name="model-server", daemon=True)
    thread.start()
    if not started.wait(10.0):
        raise RuntimeError("model server did not start within 10 s")
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)


async def serve_forever(script_path: str, port: int, log_path: str | None, stop: asyncio.Event) -> None:
    """The `gigafactory model-server` command: serve until `stop` is set.

    Parameters: `script_path` the script file; `port` (0: any free port); `log_path` JSONL log or None;
    `stop` set on SIGINT/SIGTERM.
    """
    server = ModelServer(load_script(script_path), port=port, log_path=log_path)
    await server.start()
    print(f"model server listening on {server.url} (script {script_path})", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


__all__ = ["ModelServer", "Script", "ScriptError", "load_script", "parse_script", "render_intent",
           "serve_in_thread", "serve_forever", "tokens_for"]
