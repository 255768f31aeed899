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
