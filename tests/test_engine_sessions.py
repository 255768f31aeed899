"""Session resume for the agent CLIs other than Claude, against the real pinned binaries and the
scripted model server (no keys, no spend): the first attempt's session id is read from the CLI's
output, its transcript is kept past the attempt's home (factory/engines/sessions.py), and the
next attempt on the same factory starts the CLI with its resume flag, so its first request
carries the earlier conversation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gigafactory.factory import engines
from gigafactory.factory.engines import sessions
from gigafactory.factory.engines.base import Resume
from gigafactory.model_server import parse_script, serve_in_thread

from test_engines_codex_gemini import _codex_env, _gemini_env, _job, _repo, _require

CONTENT = "hello from the scripted model\n"
FIRST = {"turns": [
    {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
    {"text": "First attempt done."},
]}
SECOND = {"turns": [{"text": "Resumed; all done."}]}


def _attempt(engine: str, job, script: dict, tmp_path: Path, monkeypatch, env):
    """One attempt through the engine (prepare, run), the way the factory runs it; returns
    (outcome, prepared, the factory's reader, the server's exchanges)."""
    eng = engines.get(engine)
    with serve_in_thread(parse_script(script), log_path=tmp_path / f"server-{job.epoch}.jsonl") as server:
        env(monkeypatch, server.url)
        job.parser = eng.parser()
        job.on_output = job.parser.feed
        prepared = eng.prepare(job)
        out = asyncio.run(eng.run(job, prepared))
        return out, prepared, job.parser, list(server.exchanges)


def test_a_codex_attempt_resumes_the_earlier_attempts_session_with_exec_resume(tmp_path, monkeypatch):
    _require("codex")
    repo = _repo(tmp_path)
    first = _job(tmp_path, repo, "codex", model="gpt-5")
    out, prepared, reader, _ = _attempt("codex", first, FIRST, tmp_path, monkeypatch, _codex_env)
    assert out.failure is None, out.detail
    sid = reader.session_id
    assert sid and sessions.SESSION_ID_RE.fullmatch(sid), sid  # thread.started's thread_id
    assert not Path(prepared.env["HOME"]).exists()  # the home went, the session stayed
    kept = sessions.store_dir(first.log_path, "codex") / sid
    assert list(kept.glob(f"sessions/**/rollout-*{sid}.jsonl")), list(kept.rglob("*"))

    second = _job(tmp_path, repo, "codex", model="gpt-5")
    second.epoch, second.attempt = 5, 2
    second.resume = Resume(commit="a" * 40, from_epoch=3, from_attempt=1, seq=1, session=sid)
    out, prepared, reader, exchanges = _attempt("codex", second, SECOND, tmp_path, monkeypatch, _codex_env)
    assert out.failure is None, out.detail
    i = prepared.argv.index("resume")
    assert prepared.argv[1:i + 1] == ["exec", "resume"] and prepared.argv[-2:] == [sid, second.body]
    assert "--sandbox" not in prepared.argv  # exec resume has none: yolo here, else -c sandbox_mode
    asked = json.dumps([e["body"] for e in exchanges if e.get("kind") in ("turn", "final")])
    assert "Writing the file." in asked and "First attempt done." in asked  # the earlier conversation
    assert reader.session_id == sid  # the same thread continues


def test_a_session_not_kept_here_is_not_resumed_and_ids_are_never_paths(tmp_path):
    store = tmp_path / "store"
    (tmp_path / "home" / "sessions").mkdir(parents=True)
    f = tmp_path / "home" / "sessions" / "rollout-x-abc.jsonl"
    f.write_text("{}\n")
    assert not sessions.keep([f], tmp_path / "home", store, "../evil")
    assert not sessions.keep([f], tmp_path / "home", store, None)
    assert sessions.keep([f], tmp_path / "home", store, "abc")
    assert not sessions.restore(store, "other", tmp_path / "new")
    assert not sessions.restore(store, "../store", tmp_path / "new")
    assert sessions.restore(store, "abc", tmp_path / "new")
    assert (tmp_path / "new" / "sessions" / "rollout-x-abc.jsonl").read_text() == "{}\n"


def test_a_gemini_attempt_resumes_the_earlier_attempts_session_by_its_id(tmp_path, monkeypatch):
    _require("gemini")
    repo = _repo(tmp_path)
    first = _job(tmp_path, repo, "gemini", model="gemini-2.5-flash")
    out, prepared, reader, _ = _attempt("gemini", first, FIRST, tmp_path, monkeypatch, _gemini_env)
    assert out.failure is None, out.detail
    sid = reader.session_id  # chosen before the run (--session-id): a mid-run checkpoint has it
    assert sid and prepared.argv[prepared.argv.index("--session-id") + 1] == sid
    assert f'"session_id": "{sid}"' in Path(first.log_path).read_text()  # the CLI used it
    assert list((sessions.store_dir(first.log_path, "gemini") / sid).glob(f"session-*-{sid[:8]}.json*"))

    # The next attempt runs in another worktree (another project for Gemini), as the factory's do.
    (tmp_path / "e5").mkdir()
    other = _repo(tmp_path / "e5")
    second = _job(tmp_path, other, "gemini", model="gemini-2.5-flash")
    second.epoch, second.attempt = 5, 2
    second.resume = Resume(commit="a" * 40, from_epoch=3, from_attempt=1, seq=1, session=sid)
    out, prepared, reader, exchanges = _attempt("gemini", second, SECOND, tmp_path, monkeypatch, _gemini_env)
    assert out.failure is None, out.detail
    assert prepared.argv[prepared.argv.index("--resume") + 1] == sid and "--session-id" not in prepared.argv
    asked = json.dumps([e["body"] for e in exchanges if e.get("kind") in ("turn", "final")])
    assert "Writing the file." in asked and "First attempt done." in asked  # the earlier conversation


def _copilot_env(monkeypatch, url: str) -> None:
    from test_engines_copilot_aider import _env
    _env(monkeypatch, "copilot", url)


def test_a_copilot_attempt_resumes_the_earlier_attempts_session_by_its_id(tmp_path, monkeypatch):
    _require("copilot")
    repo = _repo(tmp_path)
    first = _job(tmp_path, repo, "copilot", model="scripted-model")
    out, prepared, reader, _ = _attempt("copilot", first, FIRST, tmp_path, monkeypatch, _copilot_env)
    assert out.failure is None, out.detail
    sid = reader.session_id  # chosen before the run (--session-id): a mid-run checkpoint has it
    assert sid and prepared.argv[prepared.argv.index("--session-id") + 1] == sid
    assert f'"sessionId":"{sid}"' in Path(first.log_path).read_text()  # the CLI used it
    assert (sessions.store_dir(first.log_path, "copilot") / sid / "session-state" / sid / "events.jsonl").is_file()

    (tmp_path / "e5").mkdir()
    other = _repo(tmp_path / "e5")
    second = _job(tmp_path, other, "copilot", model="scripted-model")
    second.epoch, second.attempt = 5, 2
    second.resume = Resume(commit="a" * 40, from_epoch=3, from_attempt=1, seq=1, session=sid)
    out, prepared, reader, exchanges = _attempt("copilot", second, SECOND, tmp_path, monkeypatch, _copilot_env)
    assert out.failure is None, out.detail
    assert prepared.argv[prepared.argv.index("--session-id") + 1] == sid
    asked = json.dumps([e["body"] for e in exchanges if e.get("kind") in ("turn", "final")])
    assert "Writing the file." in asked and "First attempt done." in asked  # the earlier conversation
