"""``gigafactory halt`` and ``gigafactory resume``: the kill switch (issue 12).

``halt`` stops dispatch fleet-wide (or for one ``--product``) within one heartbeat: queued
jobs stay queued, held ``halted``; running jobs finish (``--drain``, the default) or are
stopped and handed back (``--stop``). ``resume`` undoes it. The state is on the broker
(``gf_control``/``halt``): it survives coordinator restarts, and ``status``, ``factories`` and
``top`` show it. Only an ``admin`` identity may call them (the broker refuses others).
"""

from __future__ import annotations

import asyncio
import os

import click

from gigafactory.clitools import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, emit_json, fail
from gigafactory.config import resolve_url


def _call(nats_url: str | None, as_json: bool, endpoint: str, body: dict) -> dict:
    """Call the coordinator's ``endpoint`` with ``body``; fail clearly on an error."""
    from gigafactory.client import ApiError, Client

    url = resolve_url(nats_url)
    if not url:
        fail("no broker: pass --nats URL, set GIGAFACTORY_NATS_URL, or start the embedded one with "
             "'gigafactory up'", EXIT_USAGE, as_json=as_json)

    async def run() -> dict:
        try:
            client = await Client.connect(url)
        except Exception as e:
            fail(f"cannot connect to {url}: {e}", EXIT_UNAVAILABLE, as_json=as_json)
        try:
            return await client.call(endpoint, body)
        except ApiError as e:
            fail(e.message, EXIT_FAILED if e.is_client_error else EXIT_UNAVAILABLE, as_json=as_json,
                 errors=e.errors)
        finally:
            await client.close()

    return asyncio.run(run())


def _show(out: dict, as_json: bool) -> None:
    if as_json:
        emit_json(out)
        return
    h = out["halt"]
    click.echo(h["summary"])


_nats = click.option("--nats", "nats_url", envvar="GIGAFACTORY_NATS_URL", default=None, metavar="URL",
                     help="NATS URL or comma-separated cluster URLs (default: $GIGAFACTORY_NATS_URL, else the "
                          "embedded broker).")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_product = click.option("--product", default=None, metavar="P", help="Only this product's jobs (default: the fleet).")


@click.command()
@_nats
@_json
@_product
@click.option("--drain", "mode", flag_value="drain", default=True,
              help="Running jobs finish (default); nothing new starts.")
@click.option("--stop", "mode", flag_value="stop", help="Running jobs are stopped and handed back to the queue.")
@click.option("--reason", default="", help="Why (shown by status and in the audit).")
def halt(nats_url, as_json, product, mode, reason) -> None:
    """Stop dispatching: the fleet, or one --product (the kill switch)."""
    _show(_call(nats_url, as_json, "halt", {"product": product, "mode": mode, "reason": reason,
                                            "actor": os.environ.get("USER", "operator")}), as_json)


@click.command()
@_nats
@_json
@_product
def resume(nats_url, as_json, product) -> None:
    """Undo 'gigafactory halt' (of the fleet, or of one --product)."""
    _show(_call(nats_url, as_json, "resume", {"product": product, "actor": os.environ.get("USER", "operator")}),
          as_json)
