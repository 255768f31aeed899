"""A job through the whole fleet on a real broker, run by a real agent CLI (codex, gemini, copilot, aider)
against the scripted model server: the factory's probe offers the engine because the CLI is
installed and its credential is set, the job is claimed, the CLI edits the repository, the
verify gate passes and the job ships; usage streams as events while it runs."""

from __future__ import annotations

import subprocess

import pytest
from helpers import Fleet, fast_settings, run

from gigafactory import agent_clis
from gigafactory.model_server import parse_script, serve_in_thread

pytestmark = pytest.mark.timeout(240)

CONTENT = "hello from the scripted model\n"
WRITE_SCRIPT = {"turns": [
    {"text": "Writing the file.", "tool_calls": [{"write_file": {"path": "hello.txt", "content": CONTENT}}]},
    {"text": "All done."},
]}


@pytest.mark.parametrize("engine,model", [("codex", "gpt-5"), ("gemini", "gemini-2.5-flash"), ("copilot", "gpt-4.1"),
                                          ("aider", "gpt-4.1")])
def test_an_agent_job_ships_through_the_fleet(engine, model, nats_server, tmp_path, monkeypatch):
    if agent_clis.find_cli(engine) is None:
        pytest.fail(agent_clis.missing_message(engine))
    # Aider edits through its reply text: its requests declare no tools, so each is a turn.
    script = {"tool_less_requests": "turn", "turns": WRITE_SCRIPT["turns"][:1]} if engine == "aider" else WRITE_SCRIPT
    with serve_in_thread(parse_script(script), log_path=tmp_path / "server.jsonl") as server:
        if engine == "codex":
            monkeypatch.delenv("GIGAFACTORY_CODEX_BASE_URL", raising=False)
            monkeypatch.setenv("OPENAI_API_KEY", "sk-scripted")
            monkeypatch.delenv("GIGAFACTORY_CODEX_API_KEY_VAR", raising=False)
        elif engine == "gemini":
            monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.url)
            monkeypatch.setenv("GEMINI_API_KEY", "sk-scripted")
        elif engine == "copilot":
            monkeypatch.setenv("COPILOT_PROVIDER_BASE_URL", f"{server.url}/v1")
            monkeypatch.setenv("COPILOT_PROVIDER_API_KEY", "sk-scripted")
        else:
            monkeypatch.setenv("OPENAI_API_BASE", f"{server.url}/v1")
            monkeypatch.setenv("OPENAI_API_KEY", "sk-scripted")

        async def main():
            async with Fleet(nats_server.url, tmp_path) as fleet:
                for args in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
                    subprocess.run(["git", *args], cwd=fleet.repo, check=True)
                # The factory's settings (not the test's environment) carry the engines' own: a
                # real factory reads them from GIGAFACTORY_* variables at start.
                settings = fast_settings(codex_base_url=f"{server.url}/v1") if engine == "codex" else None
                f = await fleet.add_factory("agents-1", probe=True, settings=settings)
                assert f"engine:{engine}" in f.offers.tokens
                job = await fleet.submit_one(fleet.job(
                    "Create hello.txt as scripted.", engine=engine, model=model, yolo=True,
                    verify="test -f hello.txt", review_policy="auto"))
                rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=180)
                assert str(rec.stage) == "shipped", rec.attempts
                assert [a.outcome for a in rec.attempts] == ["passed"]
                assert (fleet.repo / "hello.txt").read_text() == CONTENT
                usage = [e for e in await fleet.events(job) if e["kind"] == "usage"]
                assert usage, "no usage event streamed"
                data = usage[-1].get("data") or {}
                if engine == "copilot":
                    # Copilot prints no token counts: its usage is the turns and tool calls it shows.
                    assert (data.get("turns"), data.get("tool_calls"), data.get("cost_source")) == (2, 1, "unknown"), data
                else:
                    assert (data.get("input_tokens") or 0) > 0 and (data.get("output_tokens") or 0) > 0, usage[-1]

        run(main())
