"""``gigafactory chaos``: the chaos suite's commands (registered into the main group by
:mod:`gigafactory.cli`).

The scenario names are read from the registry only when a command needs them (validation,
help, shell completion), so ``gigafactory --help`` does not import the suite.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import click

from gigafactory.clitools import EXIT_FAILED, EXIT_OK, LazyChoice, emit_json, log_options, setup_logging


def _scenario_names() -> list[str]:
    from .runner import registry

    return sorted(registry())


def _broken_variants() -> tuple[str, ...]:
    from .sim import BROKEN

    return BROKEN


@click.group()
def chaos() -> None:
    """Chaos scenarios on real processes (loopback only), and the deterministic simulation."""


@chaos.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def chaos_list(as_json: bool) -> None:
    """List the implemented scenarios."""
    from .runner import registry

    scenarios = sorted(registry().values(), key=lambda s: s.name)
    if as_json:
        emit_json({"scenarios": [{"name": s.name, "summary": s.summary} for s in scenarios]})
        return
    width = max(len(s.name) for s in scenarios)
    for s in scenarios:
        click.echo(f"{s.name:<{width}}  {s.summary}")


@chaos.command("run")
@click.argument("scenario_name", metavar="SCENARIO", type=LazyChoice(_scenario_names, "scenario"))
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds every chaos decision (a run's schedule).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1.0), default=None, metavar="S",
              help="Run the full form, applying chaos for S seconds (default: the bounded form CI runs).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the broker store, factory data and process logs here (default: a temp folder, "
                   "kept only if the scenario fails).")
@click.option("--unsafe-unfenced-engines", "unfenced", is_flag=True,
              help="Broken on purpose: start the lab's factories with GIGAFACTORY_UNSAFE_UNFENCED_ENGINES=1 "
                   "(engines neither die with their factory nor stop when the lease is lost). The side-effect "
                   "invariants must then fail: this shows the checker sees that class of bug.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@log_options("warning")
def chaos_run(scenario_name: str, seed: int, duration_s: float | None, workdir: str | None, unfenced: bool,
              as_json: bool, log_level: str, log_format: str) -> None:
    """Run one scenario and check the invariants; exit 1 on any violation or failed expectation."""
    from .harness import UNFENCED_ENGINES_ENV, ScenarioConfig
    from .runner import run_scenario

    setup_logging(log_level, log_format, nats_level=logging.CRITICAL)
    temp = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix=f"gigafactory-chaos-{scenario_name}-")).resolve()
    cfg = ScenarioConfig(seed=seed, duration_s=duration_s or 0.0, bounded=duration_s is None, workdir=root,
                         factory_env=dict(UNFENCED_ENGINES_ENV) if unfenced else {})
    if not as_json:
        form = f"full form, {duration_s:g}s" if duration_s else "bounded form"
        click.echo(f"running {scenario_name} ({form}, seed {seed}) in {root}", err=True)

    def interrupted(*_):
        raise KeyboardInterrupt  # as Ctrl-C: the lab stops every process it started on the way out

    signal.signal(signal.SIGTERM, interrupted)
    res = asyncio.run(run_scenario(scenario_name, cfg))
    if temp and res.ok:
        shutil.rmtree(root, ignore_errors=True)
        res.workdir = ""
    if as_json:
        emit_json(res.to_dict())
    else:
        click.echo(res.to_text())
    sys.exit(EXIT_OK if res.ok else EXIT_FAILED)


class _SeedRange(click.ParamType):
    name = "START:STOP"

    def convert(self, value, param, ctx) -> range:
        if isinstance(value, range):
            return value
        from .sim import parse_seed_range

        try:
            return parse_seed_range(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class _FaultSetting(click.ParamType):
    name = "NAME=VALUE"

    def convert(self, value, param, ctx) -> tuple[str, object]:
        if isinstance(value, tuple):
            return value
        from .sim import parse_fault_setting

        try:
            return parse_fault_setting(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@chaos.command("sim")
@click.option("--seeds", type=_SeedRange(), default="0:200", show_default=True, help="START:STOP or one seed.")
@click.option("--jobs", type=click.IntRange(min=1), default=20, show_default=True, help="Jobs per simulated run.")
@click.option("--factories", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--stations", type=click.IntRange(min=1), default=2, show_default=True, help="Stations per factory.")
@click.option("--coordinators", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--no-faults", is_flag=True, help="A healthy fleet (then --fault turns single faults on).")
@click.option("--fault", "faults", type=_FaultSetting(), multiple=True,
              help="Set one FaultConfig field, e.g. --fault slow_report=0.3 --fault slow_report_s=5:20 (repeatable).")
@click.option("--broken", type=LazyChoice(_broken_variants, "broken variant"), default=None,
              help="Break the protocol on purpose (the checker must object).")
@click.option("--strict-audit", is_flag=True,
              help="Also require every record's stage to be audited (see invariants.audit_matches_record).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--trace", "trace_rows", type=click.IntRange(min=0), default=0, metavar="N",
              help="Print the first N trace rows of the first failing seed.")
def chaos_sim(seeds: range, jobs: int, factories: int, stations: int, coordinators: int, no_faults: bool,
              faults: tuple[tuple[str, object], ...], broken: str | None, strict_audit: bool, as_json: bool,
              trace_rows: int) -> None:
    """Run seeded deterministic simulations of the claim protocol and check the invariants after
    each; exit 1 on any violation (a failing seed is printed with the command that reproduces it)."""
    from .sim import run_report

    text, code = run_report(seeds, sizes={"jobs": jobs, "factories": factories, "stations": stations,
                                          "coordinators": coordinators},
                            no_faults=no_faults, faults=list(faults), broken=broken, strict_audit=strict_audit,
                            as_json=as_json, trace_rows=trace_rows)
    click.echo(text)
    click.get_current_context().exit(code)
