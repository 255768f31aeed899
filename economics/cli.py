"""``gigafactory report`` and ``gigafactory invoices``: the economics commands (registered into
the main group by :mod:`gigafactory.cli`)."""

from __future__ import annotations

import click


@click.group()
def report() -> None:
    """Reports on the fleet's money and time: spend, idle, lanes, invoices, budget, runs, routing."""


@click.group()
def invoices() -> None:
    """Provider invoices: import them and reconcile them against the spend ledger."""


# -- the spend ledger and invoices (issue 13, helper ledger) ---------------------------------
from .ledger_cli import invoices_import, report_invoices, report_spend  # noqa: E402

report.add_command(report_spend)
report.add_command(report_invoices)
invoices.add_command(invoices_import)

# -- the budget helper's reports (issue 13): idle, lanes, budget, runs, routing --------------------
from .reports import budget_cmd, idle_cmd, lanes_cmd, routing_cmd, runs_cmd  # noqa: E402

for _cmd in (idle_cmd, lanes_cmd, budget_cmd, runs_cmd, routing_cmd):
    report.add_command(_cmd)
