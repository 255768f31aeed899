"""``python -m gigafactory.chaos.checkrecords``: the invariant checker over a live broker's records.

The chaos suite judges every scenario with :func:`gigafactory.chaos.invariants.check`; the load
suite must judge every load run's records the same way, but may not import the chaos suite (the
layers go chaos -> loadtest, never back). So the check is also a process of its own: it reads
``gf_jobs`` and ``GF_EVENTS`` (:func:`~gigafactory.chaos.invariants.collect_timed`), judges
them, writes the report as JSON to ``--out`` and prints its verdict::

    python -m gigafactory.chaos.checkrecords --nats URL --identities DIR --out report.json

With ``--identities`` (an identity store's folder) every record in a leased stage held by one
of its factories must carry that factory's valid signature (``holder_signed``). It connects with
the usual credentials (``GIGAFACTORY_CREDS``). Exit 0: no violation; 1: violations (listed);
2: the records could not be read.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from gigafactory.broker import Broker
from gigafactory.chaos import invariants
from gigafactory.config import Settings

READ_TIMEOUT_S = 30.0
"""Bound on each fetch of the audit (a loaded broker after a load run answers slowly)."""


async def check_broker(url: str, identities: str | None, allow_in_flight: bool) -> invariants.Report:
    """Read and judge the records of the broker at ``url``.

    :param url: the broker's URL.
    :param identities: an identity store's folder whose factories' keys judge signatures, or None.
    :param allow_in_flight: accept ``assigned``/``building`` jobs (the fleet is still live).
    """
    from gigafactory.identity import IdentityStore

    keys = None
    if identities:
        keys = {i.name: i.public_key for i in IdentityStore(identities).list() if i.role == "factory"}
    broker = await Broker.open(url, "gigafactory-checkrecords", Settings.from_env(), ensure=False)
    try:
        jobs, events, _stamps = await invariants.collect_timed(broker, timeout_s=READ_TIMEOUT_S)
    finally:
        await broker.close()
    return invariants.check(jobs, events, allow_in_flight=allow_in_flight, holder_keys=keys)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats", "url", required=True, help="Broker URL.")
@click.option("--identities", type=click.Path(file_okay=False, exists=True), default=None,
              help="Identity store folder: judge holder signatures with its factories' keys.")
@click.option("--allow-in-flight", is_flag=True, help="Accept jobs still assigned or building.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON here.")
def command(url: str, identities: str | None, allow_in_flight: bool, out: str | None) -> None:
    """Judge a broker's job records and audit with the invariant checker."""
    try:
        report = asyncio.run(check_broker(url, identities, allow_in_flight))
    except Exception as e:  # any failure to read is one line and exit 2, never a traceback
        click.echo(f"checkrecords: could not read the records of {url}: {type(e).__name__}: {e}", err=True)
        sys.exit(2)
    if out:
        Path(out).write_text(report.to_json())
    click.echo(report.to_text(limit=20))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    command(prog_name="python -m gigafactory.chaos.checkrecords")
