"""``gigafactory demo --agents`` as a user runs it: a subprocess that starts the scripted model
servers, a broker, a coordinator and a probing factory, and ships one job per installed agent CLI
through the real CLI; and, on a machine without any agent CLI, exit 1 with the install hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gigafactory import agent_clis

pytestmark = pytest.mark.timeout(420)


def test_every_installed_agent_cli_ships_a_job_with_usage(tmp_path):
    installed = [n for n in agent_clis.CLIS if agent_clis.find_cli(n)]
    missing = [agent_clis.missing_message(n) for n in agent_clis.CLIS if n not in installed]
    if missing:
        pytest.fail("this test needs all five agent CLIs: " + "; ".join(missing))
    p = subprocess.run([sys.executable, "-m", "gigafactory", "demo", "--agents", "--dir", str(tmp_path / "demo"),
                        "--json", "--timeout", "300"], capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    out = json.loads(p.stdout)
    assert out["ok"] is True
    rows = {r["engine"]: r for r in out["jobs"]}
    assert sorted(rows) == sorted(installed)
    for engine, r in rows.items():
        assert r["stage"] == "shipped", r
        assert r["edited"], f"{engine} did not write hello.txt: {r}"
        assert r["version"] == agent_clis.pinned_version(engine), r
        u = r["usage"]
        if engine == "copilot":
            # Copilot prints no token counts: its usage is the turns and tool calls it shows.
            assert (u["turns"], u["tool_calls"]) == (2, 1), u
        else:
            assert u["input_tokens"] > 0 and u["output_tokens"] > 0, r
    assert rows["claude"]["usage"]["cost_source"] == "reported"


def test_without_any_agent_cli_it_exits_1_saying_how_to_install(tmp_path):
    empty = tmp_path / "no-clis"
    empty.mkdir()
    env = dict(os.environ, PATH="/usr/bin:/bin", GIGAFACTORY_AGENT_CLIS=str(empty))
    assert not any(subprocess.run(["sh", "-c", f"command -v {n}"], env=env, capture_output=True).returncode == 0
                   for n in agent_clis.CLIS), "an agent CLI is in /usr/bin or /bin: this test cannot hide it"
    p = subprocess.run([sys.executable, "-m", "gigafactory", "demo", "--agents", "--dir", str(tmp_path / "demo"),
                        "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "no agent CLI is installed" in p.stderr
    assert agent_clis.INSTALL_SCRIPT in p.stderr
    assert "@anthropic-ai/claude-code@2.1.328" in p.stderr and "aider-chat@0.86.2" in p.stderr
    assert not (tmp_path / "demo").exists(), "it started a demo with nothing to run"


def test_agents_refuses_the_plain_demos_broker_and_examples_options(tmp_path):
    for extra in (["--nats", "nats://127.0.0.1:1"], ["--examples", str(tmp_path)]):
        p = subprocess.run([sys.executable, "-m", "gigafactory", "demo", "--agents", *extra], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "drop --examples and --nats" in p.stderr
