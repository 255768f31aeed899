"""The CLI's conventions, through real subprocesses of the installed command: ``--json`` means
something wherever it is offered, options with fixed values are choices (validated, completed
by the shell), every command's exit code means the same thing, and the suites' commands are
click commands of their own group."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from helpers import Proc, fast_env, gigafactory_cmd, wait_until

from gigafactory import clitools


def gf(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([*gigafactory_cmd(), *args], capture_output=True, text=True, env=env or fast_env(),
                          timeout=timeout_s)


def complete(*words: str) -> list[str]:
    """What bash completion offers for the last of ``words`` (click's ``bash_complete``)."""
    env = {**os.environ, "_GIGAFACTORY_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["gigafactory", *words]),
           "COMP_CWORD": str(len(words))}
    r = subprocess.run(gigafactory_cmd(), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if line]


# -- --json --------------------------------------------------------------------------------------------


def test_a_service_with_json_logs_one_json_object_per_line(nats_server, tmp_path):
    """``factory --json`` logs JSON lines a log shipper reads (it printed text before)."""
    env = {**fast_env(), "GIGAFACTORY_HOME": str(tmp_path / "home")}
    p = Proc([*gigafactory_cmd(), "factory", "--json", "--nats", nats_server.url, "--id", "jsonlog", "--no-probe",
              "--data-dir", str(tmp_path / "data"), "--workspace", str(tmp_path / "work")],
             tmp_path / "factory.log", env)
    try:
        wait_until(lambda: "factory jsonlog up" in p.output(), 60, what="the factory's start line")
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0, p.output()
    finally:
        p.close()
    lines = [line for line in p.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    up = [r for r in records if r["message"].startswith("factory jsonlog up")]
    assert len(up) == 1 and up[0]["level"] == "info" and up[0]["logger"] == "gigafactory.cli", records
    assert all(isinstance(r["at"], float) and r["level"] in ("debug", "info", "warning", "error", "critical")
               for r in records)


def test_logs_no_longer_offers_a_json_flag_that_did_nothing():
    r = gf("logs", "some-job", "--json", "--nats", "nats://127.0.0.1:1")
    assert r.returncode == clitools.EXIT_USAGE and "No such option" in r.stderr and "--json" in r.stderr, r.stderr


# -- choices -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, named, known", [
    (["jobs", "--stage", "done"], "'--stage'", "'dead_letter'"),
    (["coordinator", "--log-level", "loud"], "'--log-level'", "'warning'"),
    (["factory", "--log-level", "loud"], "'--log-level'", "'debug'"),
    (["chaos", "run", "partition-everything"], "'SCENARIO'", "factory-churn"),
    (["loadtest", "run", "--workload", "nope"], "'--workload'", "mixed-capabilities"),
    (["chaos", "sim", "--broken", "nothing"], "'--broken'", "no_fence"),
])
def test_fixed_values_are_choices_refused_before_anything_runs(args, named, known):
    r = gf(*args, "--nats", "nats://127.0.0.1:1") if args[0] in ("jobs", "coordinator", "factory") else gf(*args)
    assert r.returncode == clitools.EXIT_USAGE, r.stderr
    assert f"Invalid value for {named}" in r.stderr and known in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_shell_completes_stages_levels_scenarios_and_workloads():
    assert complete("jobs", "--stage", "s") == ["shipped"]
    assert complete("up", "--log-level", "w") == ["warning"]
    assert complete("chaos", "run", "b") == ["broker-crash"]
    from gigafactory.chaos.runner import registry

    assert complete("chaos", "run", "") == sorted(registry())  # every scenario, the newest included
    assert {"broker-crash", "cluster-failover", "factory-churn", "partition", "push-path-down", "resume",
            "thundering-herd", "total-outage"} <= set(complete("chaos", "run", ""))
    assert complete("loadtest", "run", "--workload", "m") == ["mixed-capabilities", "multi-product"]
    assert "chaos" in complete("ch") and "loadtest" in complete("lo")


def test_the_completion_script_is_click_s():
    env = {**os.environ, "_GIGAFACTORY_COMPLETE": "bash_source"}
    r = subprocess.run(gigafactory_cmd(), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "_GIGAFACTORY_COMPLETE=bash_complete" in r.stdout, r.stdout[:500]


# -- exit codes and the suites' groups ---------------------------------------------------------------


def test_the_exit_codes_are_listed_in_the_help_and_agree_with_fence():
    from gigafactory import cli

    text = gf("--help").stdout
    for code, meaning in clitools.EXIT_CODES.items():
        assert f"  {code}  {meaning}" in text, text
    assert "_GIGAFACTORY_COMPLETE=bash_source gigafactory" in text
    assert (cli.FENCE_HELD, cli.FENCE_FENCED, cli.FENCE_USAGE, cli.FENCE_TOO_LATE, cli.FENCE_UNKNOWN) == (
        clitools.EXIT_OK, clitools.EXIT_FAILED, clitools.EXIT_USAGE, clitools.EXIT_TIMEOUT, clitools.EXIT_UNAVAILABLE)


def test_no_broker_configured_is_usage_and_no_broker_answering_is_unavailable(tmp_path):
    env = {k: v for k, v in fast_env().items() if k != "GIGAFACTORY_NATS_URL"}
    env["GIGAFACTORY_HOME"] = str(tmp_path / "home")
    r = gf("jobs", env=env)
    assert r.returncode == clitools.EXIT_USAGE and "no broker" in r.stderr, r.stderr
    r = gf("jobs", "--nats", "nats://127.0.0.1:1", env=env)
    assert r.returncode == clitools.EXIT_UNAVAILABLE and "cannot connect" in r.stderr, r.stderr


@pytest.mark.parametrize("args, usage", [
    (["chaos", "sim", "--help"], "Usage: gigafactory chaos sim [OPTIONS]"),
    (["chaos", "run", "--help"], "Usage: gigafactory chaos run [OPTIONS] SCENARIO"),
    (["loadtest", "run", "--help"], "Usage: gigafactory loadtest run [OPTIONS]"),
])
def test_the_suites_commands_are_click_commands_of_their_group(args, usage):
    r = gf(*args)
    assert r.returncode == 0 and r.stdout.startswith(usage), r.stdout[:300]
    assert "python -m" not in r.stdout


@pytest.mark.parametrize("module", ["gigafactory.loadtest.fleet", "gigafactory.loadtest.baseline"])
def test_the_process_entry_points_parse_with_click_too(module):
    """Fleet hosts and the baseline are started as ``python -m`` by the load harness and the
    herd scenario: the same framework, the same usage errors."""
    import sys

    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"Usage: python -m {module} [OPTIONS]"), r.stdout[:300]
    r = subprocess.run([sys.executable, "-m", module, "--nats", "nats://127.0.0.1:1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == clitools.EXIT_USAGE and "Missing option" in r.stderr, r.stderr
