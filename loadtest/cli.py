"""``gigafactory loadtest``: the load suite's commands (registered into the main group by
:mod:`gigafactory.cli`).

The workload names are read only when a command needs them (validation, help, shell
completion), so ``gigafactory --help`` does not import the suite.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
import orjson

from gigafactory.clitools import EXIT_FAILED, EXIT_OK, EXIT_USAGE, LazyChoice, emit_json, fail, log_options, setup_logging


def _workload_names() -> list[str]:
    from .workloads import WORKLOADS

    return ["all", *WORKLOADS]


@click.group()
def loadtest() -> None:
    """The load suite: our figures beside a minimal CAS work queue and a taskiq-style
    at-least-once queue on the same broker."""


@loadtest.command("workloads")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def loadtest_workloads(as_json: bool) -> None:
    """List the workloads."""
    from .workloads import WORKLOADS

    if as_json:
        emit_json({"workloads": [{"name": w.name, "summary": w.summary} for w in WORKLOADS.values()]})
        return
    width = max(len(n) for n in WORKLOADS)
    for w in WORKLOADS.values():
        click.echo(f"{w.name:<{width}}  {w.summary}")


@loadtest.command("run")
@click.option("--factories", type=click.IntRange(min=1), default=100, show_default=True, help="Connected factories.")
@click.option("--jobs", type=click.IntRange(min=1), default=1000, show_default=True, help="Jobs per workload phase.")
@click.option("--stations", type=click.IntRange(1, 256), default=2, show_default=True, help="Stations per factory.")
@click.option("--workload", "workload_names", multiple=True, default=("all",), show_default=True,
              type=LazyChoice(_workload_names, "workload"),
              help="A workload ('gigafactory loadtest workloads'), repeatable, or 'all'.")
@click.option("--idle-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Idle-fleet window (0 skips it).")
@click.option("--restart-jobs", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Records in gf_jobs for the coordinator restart (0 skips it).")
@click.option("--pace-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.4,
              show_default=True, help="Paced rate as a share of the slower saturated throughput.")
@click.option("--busy-job-s", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="How long each utilisation-phase job holds its station (at least).")
@click.option("--fleet-hosts", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes the bulk of the fleet is split over.")
@click.option("--batch", type=click.IntRange(1, 1000), default=100, show_default=True, help="Jobs per submit call.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Broker store and process logs (default: a temp folder, removed after a good run).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Write the JSON result here (default: $GIGAFACTORY_HOME/loadtest-results/<time>.json).")
@click.option("--no-auth", is_flag=True, help="Run the broker without authentication (identities, permissions): "
              "everything of the run connects without an identity.")
@click.option("--compare-security/--no-compare-security", default=True, show_default=True,
              help="Run the saturated noop phase a second time on a broker without authentication or "
                   "signatures (its own coordinator and fleet) and report what security costs per job.")
@click.option("--markdown", is_flag=True, help="Print the tables as markdown (the tables of docs/load-results.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of the table.")
@log_options("warning")
def loadtest_run(factories, jobs, stations, workload_names, idle_s, restart_jobs, pace_fraction, busy_job_s,
                 fleet_hosts, batch, workdir, out_file, no_auth, compare_security, markdown, as_json, log_level, log_format) -> None:
    """Run the load suite: its own broker, coordinator, fleet and baseline; prints the figures
    with the issue's targets (reported, never asserted) and writes the JSON result. Exits 1 only
    if the harness itself failed (a job did not complete, a process did not start) or the
    invariant checker found a violation in the run's records."""
    from gigafactory.config import Settings, home

    from .harness import LoadConfig
    from .runner import run_load
    from .workloads import WORKLOADS

    names_ = list(WORKLOADS) if "all" in workload_names else list(dict.fromkeys(workload_names))
    setup_logging(log_level, log_format, nats_level=logging.CRITICAL)
    temp = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="gigafactory-loadtest-")).resolve()
    cfg = LoadConfig(factories=factories, stations=stations, jobs=jobs, workloads=tuple(names_), idle_s=idle_s,
                     restart_jobs=restart_jobs, pace_fraction=pace_fraction, busy_job_s=busy_job_s,
                     fleet_hosts=fleet_hosts, batch=batch, workdir=root, settings=Settings.from_env(),
                     auth=not no_auth, compare_no_auth=compare_security)
    try:
        cfg.validate()
    except ValueError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)

    def progress(text: str) -> None:
        if not as_json:
            click.echo(f"# {text}", err=True)

    def interrupted(*_):
        raise KeyboardInterrupt  # as Ctrl-C: the run stops every process it started on the way out

    signal.signal(signal.SIGTERM, interrupted)
    try:
        result = asyncio.run(run_load(cfg, progress))
    except (RuntimeError, TimeoutError, OSError) as e:
        fail(f"the load run failed: {e} (logs in {root})", EXIT_FAILED, as_json=as_json)
    result["command"] = "gigafactory loadtest run " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    out = Path(out_file) if out_file else home() / "loadtest-results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if temp and result["ok"]:
        shutil.rmtree(root, ignore_errors=True)
        result["workdir"] = ""
    if as_json:
        emit_json(result)
    else:
        click.echo(result["markdown"] if markdown else result["text"])
        if result["incomplete"]:
            click.echo(f"NOT COMPLETED: {result['incomplete']} (logs in {root})", err=True)
        for why in result["failures"]:
            if not why.endswith("jobs not completed"):  # those were just listed
                click.echo(f"FAILED: {why} (logs in {root})", err=True)
        click.echo(f"result: {out}", err=True)
    sys.exit(EXIT_OK if result["ok"] else EXIT_FAILED)
