"""``gigafactory report spend``, ``report invoices`` and ``invoices import``: thin commands over
:mod:`.ledger` and :mod:`.invoices` (registered on the groups of :mod:`.cli`). They read the
broker directly (the ledger is a stream, the invoices a bucket): no coordinator is needed."""

from __future__ import annotations

import asyncio
import datetime
import time
from pathlib import Path

import click

from gigafactory.clitools import EXIT_UNAVAILABLE, EXIT_USAGE, emit_json, fail

from .invoices import FILE_MAX_BYTES, InvoiceError, load_lines, parse_invoice, reconcile, store_lines
from .ledger import BY_KEYS, read_spend, summarize

SOURCES = ("reported", "priced", "estimated", "unknown", "fixed")


def parse_since(text: str | None, now_s: float) -> float | None:
    """``--since`` as the other reports read it (:func:`.reports.parse_since`), None when not
    given (the whole ledger).

    :param text: the option's value.
    :param now_s: now (Unix seconds).
    :raises click.BadParameter: neither a duration nor an ISO date.
    """
    from .reports import parse_since as since_of

    return since_of(text, 0.0, now_s) if text else None


def _with_broker(nats_url: str | None, as_json: bool, fn):
    """Connect (read-only use of the layout), run ``fn(broker)``, close."""
    from gigafactory.broker import Broker
    from gigafactory.config import Settings, resolve_url

    url = resolve_url(nats_url)
    if url is None:
        fail("no broker: pass --nats URL, set GIGAFACTORY_NATS_URL, or start the embedded one "
             "with 'gigafactory up' (or 'gigafactory server')", EXIT_USAGE, as_json=as_json)

    async def run():
        try:
            b = await Broker.open(url, "gigafactory-report", Settings.from_env())
        except Exception as e:  # noqa: BLE001 -- said to the user with the URL
            fail(f"cannot connect to {url}: {e}", EXIT_UNAVAILABLE, as_json=as_json)
        try:
            return await fn(b)
        finally:
            await b.close()

    return asyncio.run(run())


_nats = click.option("--nats", "nats_url", envvar="GIGAFACTORY_NATS_URL", default=None, metavar="URL",
                     help="NATS URL (default: $GIGAFACTORY_NATS_URL, else the embedded broker).")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.command("spend")
@click.option("--since", default=None, metavar="WHEN", help="A duration back (24h, 7d) or an ISO date.")
@click.option("--by", "by", type=click.Choice(BY_KEYS), default="provider", show_default=True,
              help="What to group the spend by.")
@_nats
@_json
def report_spend(since, by, nats_url, as_json) -> None:
    """Spend from the ledger (GF_SPEND), grouped, with attribution coverage: every dollar's owner."""
    since_s = parse_since(since, time.time())
    windows = _windows(as_json) if by == "window" else []
    everything = _with_broker(nats_url, as_json, read_spend)
    out = summarize([r for r in everything if since_s is None or r.at >= since_s], by)
    out["since"] = since_s
    if windows:
        out["windows"] = window_balances(windows, everything)
    if as_json:
        emit_json(out)
        return
    click.echo(render_spend(out))


def _windows(as_json: bool) -> list:
    """The configured funding windows ([] when no file is set); a bad file ends the command."""
    from gigafactory.config import Settings

    from .funding import FundingFileError, load_funding_windows

    path = Settings.from_env().funding_windows_file
    if not path:
        return []
    try:
        return load_funding_windows(path)
    except FundingFileError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)
    return []


def window_balances(windows: list, records: list) -> list[dict]:
    """Per configured window: its amount, what the whole ledger drew from it, what is left.

    :param windows: the funding windows.
    :param records: the whole ledger (amounts as deltas), not only the report's period.
    """
    drawn: dict[str, float] = {}
    for r in records:
        drawn[r.funding_window] = drawn.get(r.funding_window, 0.0) + r.cost_usd
    return [{"window": w.name, "amount_usd": w.amount_usd, "drawn_usd": round(drawn.get(w.name, 0.0), 6),
             "remaining_usd": round(w.amount_usd - drawn.get(w.name, 0.0), 6),
             "start": w.start, "end": w.end} for w in sorted(windows, key=lambda w: (w.end, w.name))]


def render_spend(out: dict) -> str:
    """The text form of a spend report (:func:`~.ledger.summarize` plus ``since``)."""
    since = out.get("since")
    when = "all recorded" if since is None else "since " + datetime.datetime.fromtimestamp(
        since, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"spend {when}, by {out['by']}: ${out['cost_usd']:.4f} in {out['records']} records",
             f"  {out['by']:<28} {'records':>7} {'tokens in':>10} {'out':>9} {'cached':>9} {'cost USD':>11}  by source"]
    for g in out["groups"]:
        src = " ".join(f"{k} {v:.4f}" for k, v in g["by_source"].items())
        lines.append(f"  {g['key'][:28]:<28} {g['records']:>7} {g['tokens_input'] + g['tokens_cache_write']:>10} "
                     f"{g['tokens_output']:>9} {g['tokens_cache_read']:>9} {g['cost_usd']:>11.4f}  {src}")
    if out["groups_total"] > len(out["groups"]):
        lines.append(f"  ... {out['groups_total'] - len(out['groups'])} more groups (see --json)")
    for w in out.get("windows", ()):
        lines.append(f"  window {w['window']}: ${w['drawn_usd']:.4f} drawn of ${w['amount_usd']:.2f}, "
                     f"${w['remaining_usd']:.4f} left")
    c = out["coverage"]
    lines.append(f"attribution coverage: {100 * c['ratio']:.1f}% ({c['attributed_records']} of {c['records']} "
                 f"records; ${c['unfunded_cost_usd']:.4f} drawn from the 'unfunded' window)")
    for b in c["broken"]:
        lines.append(f"  breaks attribution: {b['id']} (missing {', '.join(b['missing'])})")
    return "\n".join(lines)


@click.command("invoices")
@click.option("--since", default=None, metavar="WHEN", help="Only ledger spend since then (24h, 7d, a date).")
@_nats
@_json
def report_invoices(since, nats_url, as_json) -> None:
    """Imported invoices against the ledger: drift per provider and model, unmatched lines."""
    since_s = parse_since(since, time.time())

    async def both(b):
        return await load_lines(b), await read_spend(b, since_s=since_s)

    lines, records = _with_broker(nats_url, as_json, both)
    import msgspec

    out = msgspec.to_builtins(reconcile(lines, records))
    out["lines"] = len(lines)
    if as_json:
        emit_json(out)
        return
    click.echo(render_invoices(out))


def render_invoices(out: dict) -> str:
    """The text form of a reconciliation."""
    lines = [f"{out['lines']} invoice lines; ledger matched ${out['matched_usd']:.4f} in {out['matched_records']} "
             "records (each at most once)",
             f"  {'provider':<12} {'model':<28} {'billed USD':>11} {'ledger USD':>11} {'drift USD':>10} {'drift':>8}"]
    for d in out["drift"]:
        ratio = "-" if d["drift_ratio"] is None else f"{100 * d['drift_ratio']:+.1f}%"
        lines.append(f"  {d['provider']:<12} {d['model'][:28]:<28} {d['billed_usd']:>11.4f} {d['ledger_usd']:>11.4f} "
                     f"{d['drift_usd']:>+10.4f} {ratio:>8}")
    lines.append(f"invoice lines with no ledger spend: {out['unmatched_lines_count']} "
                 f"(${out['unmatched_lines_usd']:.4f})")
    for x in out["unmatched_lines"]:
        lines.append(f"  {x['source']}: {x['provider']} {x['model']} {x['period']} ${x['amount_usd']:.4f}")
    lines.append(f"ledger spend no invoice line covers: ${out['unmatched_ledger_usd']:.4f}")
    for x in out["unmatched_ledger"]:
        lines.append(f"  {x['provider']} {x['model']}: {x['records']} records, ${x['cost_usd']:.4f}")
    return "\n".join(lines)


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--provider", default=None, help="The provider of every line (else a provider column).")
@_nats
@_json
def invoices_import(file: Path, provider, nats_url, as_json) -> None:
    """Import a provider invoice (CSV or JSON: period, model, tokens, amount); re-importing the
    same file adds nothing."""
    try:
        size = file.stat().st_size
        if size > FILE_MAX_BYTES:
            fail(f"{file}: {size} bytes; an invoice file may have at most {FILE_MAX_BYTES}", EXIT_USAGE,
                 as_json=as_json)
        lines = parse_invoice(file.read_bytes(), str(file), provider)
    except OSError as e:
        fail(f"{file}: cannot read it ({e.strerror or e})", EXIT_USAGE, as_json=as_json)
    except InvoiceError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)
    added, kept = _with_broker(nats_url, as_json, lambda b: store_lines(b, lines))
    out = {"file": str(file), "lines": len(lines), "added": added, "already_imported": kept,
           "billed_usd": round(sum(x.amount_usd for x in lines), 6)}
    if as_json:
        emit_json(out)
        return
    click.echo(f"{file}: {len(lines)} lines, {added} added, {kept} already imported "
               f"(${out['billed_usd']:.4f} billed)")
