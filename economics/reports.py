"""``gigafactory report idle|lanes|budget|runs|routing``: the budget helper's reports (registered
on the ``report`` group in :mod:`economics.cli`)."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from pathlib import Path

import click

from gigafactory.clitools import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, emit_json, fail

from . import idle as idle_mod
from . import routing as routing_mod
from .runs import RunsDB, default_db_path


def parse_since(text: str | None, default_s: float, now_s: float | None = None) -> float:
    """``--since``: a duration back from now (``90m``, ``24h``, ``7d``) or an ISO date/time (UTC
    when it names no zone). Raises :class:`click.BadParameter` saying what is accepted.

    :param text: the option's value (None: ``default_s`` back from now).
    :param default_s: seconds back when not given.
    """
    from gigafactory.schemas.manifest import parse_duration

    now = time.time() if now_s is None else now_s
    if not text:
        return now - default_s
    if len(text) > 64:
        raise click.BadParameter("at most 64 characters", param_hint="--since")
    try:
        return now - parse_duration(text)
    except Exception:
        pass
    try:
        dt = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a duration back from now (90m, 24h, 7d) nor an ISO date "
                                 "(2026-12-01 or 2026-12-01T08:00)", param_hint="--since") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=datetime.UTC)).timestamp()


def _opts(default_since: str):
    def deco(fn):
        fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
        fn = click.option("--since", default=None, metavar="WHEN",
                          help=f"From when: a duration back (90m, 24h, 7d) or an ISO date [default: {default_since}].")(fn)
        return fn
    return deco


def _nats(fn):
    return click.option("--nats", "nats_url", envvar="GIGAFACTORY_NATS_URL", default=None, metavar="URL",
                        help="NATS URL (default: $GIGAFACTORY_NATS_URL, else the embedded broker).")(fn)


def _url(nats_url: str | None, as_json: bool) -> str:
    from gigafactory.config import resolve_url

    url = resolve_url(nats_url)
    if not url:
        fail("no broker: pass --nats URL, set GIGAFACTORY_NATS_URL, or start one with 'gigafactory up'",
             EXIT_USAGE, as_json=as_json)
    return url  # type: ignore[return-value]


async def idle_figures(url: str, since_s: float, until_s: float, by: str | None) -> dict:
    """The idle figures of the window (opens and closes its own broker connection)."""
    from gigafactory.broker import Broker

    # A report gives up on a broker that does not answer, as the other client commands do.
    b = await Broker.open(url, "gigafactory-report", ensure=False, max_reconnect_attempts=3, connect_timeout_s=5.0)
    try:
        evs = await idle_mod.read_station_events(b, since_s, until_s)
    finally:
        await b.close()
    ivs = idle_mod.intervals(idle_mod.transitions_from_events(evs), since_s, until_s)
    out = {"fleet": idle_mod.summarise(ivs)[""].to_dict()}
    if by:
        out["groups"] = {k: s.to_dict() for k, s in idle_mod.summarise(ivs, by).items()}
    return out


def _idle_data(nats_url, as_json, since, by) -> tuple[float, dict]:
    since_s = parse_since(since, 86400)
    try:
        figures = asyncio.run(idle_figures(_url(nats_url, as_json), since_s, time.time(), by))
    except idle_mod.TooManyEvents as e:
        fail(str(e), EXIT_FAILED, as_json=as_json)
    except ValueError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)
    except Exception as e:  # the broker did not answer (no servers, a timeout, a refused read)
        fail(f"cannot read the events: {type(e).__name__}: {e}", EXIT_UNAVAILABLE, as_json=as_json)
    return since_s, figures


@click.command("idle")
@_nats
@_opts("24h")
@click.option("--by", type=click.Choice(["factory", "station"]), default=None, help="Group the figures.")
def idle_cmd(nats_url, since, as_json, by) -> None:
    """Idle time by class (no dark idle): every non-working station-second and its class, and
    the idle classification coverage (classified / non-working seconds; the floor is 100%)."""
    since_s, figures = _idle_data(nats_url, as_json, since, by)
    if as_json:
        emit_json({"since_s": since_s, **figures})
        return
    for key, f in [("", figures["fleet"]), *sorted(figures.get("groups", {}).items())]:
        click.echo(f"{key or 'fleet'}: idle {f['idle_s']:.0f}s of {f['available_s']:.0f}s station time; "
                   f"coverage {f['idle_coverage']:.1%} (floor 100%)")
        for cls, secs in sorted(f["by_class_s"].items(), key=lambda kv: -kv[1]):
            click.echo(f"  {cls:<18} {secs:>10.0f}s  {secs / f['idle_s']:.1%}" if f["idle_s"] else f"  {cls}")


@click.command("lanes")
@_nats
@_opts("24h")
@click.option("--by", type=click.Choice(["factory", "station"]), default="factory", show_default=True)
def lanes_cmd(nats_url, since, as_json, by) -> None:
    """Sustained logical lane allocation: busy station-seconds over available ones (floor 50%)."""
    since_s, figures = _idle_data(nats_url, as_json, since, by)
    if as_json:
        emit_json({"since_s": since_s, **figures})
        return
    f, grouped = figures["fleet"], figures["groups"]
    flag = "" if f["lane_allocation"] >= idle_mod.LANE_ALLOCATION_FLOOR else "  BELOW THE 50% FLOOR"
    click.echo(f"fleet: lane allocation {f['lane_allocation']:.1%} ({f['busy_s']:.0f}s busy of "
               f"{f['available_s']:.0f}s, {f['stations']} stations){flag}")
    for key, g in sorted(grouped.items()):
        click.echo(f"  {key:<24} {g['lane_allocation']:>7.1%}  busy {g['busy_s']:.0f}s of {g['available_s']:.0f}s")


@click.command("budget")
@_nats
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def budget_cmd(nats_url, as_json) -> None:
    """Today's budget as the coordinator computed it: the signals reading, the factors, the daily
    and per-feature budget, spend today and the residual, and the enforcement state."""
    from gigafactory.client import ApiError, Client

    async def call():
        c = await Client.connect(_url(nats_url, as_json))
        try:
            return await c.call("budget", {"refresh": True})
        finally:
            await c.close()

    try:
        out = asyncio.run(call())
    except ApiError as e:
        fail(e.message, EXIT_UNAVAILABLE, as_json=as_json)
    except Exception as e:  # no broker or no coordinator answered
        fail(f"no coordinator answered: {type(e).__name__}: {e}", EXIT_UNAVAILABLE, as_json=as_json)
    if as_json:
        emit_json(out)
        return
    click.echo(out["line"])
    b = out.get("budget")
    if not b:
        click.echo("no budget computed yet (the coordinator computes one before its first kickoff)")
        return
    s = b["signals"]
    click.echo(f"daily ${b['daily_pipeline_budget_usd']:.2f} = monthly ${b['policy']['monthly_pipeline_budget_usd']:g}"
               f" / {b['policy']['days_per_month']:g} x runway {b['cash_runway_factor']:.3f} x growth "
               f"{b['revenue_growth_factor']:.3f}   [computation {b['computation_id']}]")
    click.echo(f"per feature ${b['per_feature_budget_usd']:.2f} (expected features today "
               f"{b['policy']['expected_features_today']:g}); spent today ${out['spent_today_usd']:.4f}; "
               f"residual ${out['residual_usd']:.4f}")
    click.echo(f"signals from {s['source']} (sha256 {s['digest'][:12] or '-'}): " + ", ".join(
        f"{k} {s[k]:g}" for k in ("cash_balance_usd", "monthly_burn_usd", "revenue_usd", "revenue_prev_usd")
        if s.get(k) is not None) + "; " + "; ".join(b["notes"]))
    if out.get("signals_error"):
        click.echo(f"last signals read failed: {out['signals_error']}")


def _db(db_path: str | None) -> RunsDB:
    from gigafactory.config import Settings

    path = Path(db_path) if db_path else default_db_path(Settings.from_env())
    if not path.exists():
        fail(f"no runs database at {path}: the coordinator writes it (GIGAFACTORY_RUNS_DB), or pass --db", EXIT_USAGE)
    return RunsDB(path)


@click.command("runs")
@_opts("7d")
@click.option("--db", "db_path", default=None, metavar="PATH", help="The pipeline_runs database [default: the "
              "coordinator's, GIGAFACTORY_RUNS_DB or <GIGAFACTORY_HOME>/coordinator/runs.sqlite].")
@click.option("--by", type=click.Choice(["product", "role"]), default=None, help="Sum by product or by role (profile).")
def runs_cmd(since, as_json, db_path, by) -> None:
    """Shipped features (pipeline_runs) with tokens, cost and features per second per token, and
    throughput per funded dollar (features shipped per dollar spent)."""
    rows = _db(db_path).runs(parse_since(since, 7 * 86400))
    cost = sum(r["cost_usd"] or 0 for r in rows)
    groups: dict[str, dict] = {}
    for r in rows:
        keys = [r["product"]] if by == "product" else list(json.loads(r["per_role_breakdown"] or "{}")) if by else []
        for k in keys:
            g = groups.setdefault(k, {"features": 0, "cost_usd": 0.0})
            g["features"] += 1
            g["cost_usd"] += (r["cost_usd"] or 0) if by == "product" else json.loads(r["per_role_breakdown"])[k]["cost_usd"]
    summary = {"features": len(rows), "cost_usd": round(cost, 6),
               "features_per_usd": (len(rows) / cost) if cost > 0 else None, "groups": groups}
    if as_json:
        emit_json({"runs": rows, "summary": summary})
        return
    for r in rows:
        fpst = r["features_per_second_per_token"]
        click.echo(f"{r['merged_at']}  {r['feature_slug']:<24} PR {r['pr_number'] or '-':<5} {r['elapsed_seconds']:>6}s "
                   f"{r['tokens_total']:>9} tok  ${r['cost_usd']:.4f}  fpst {fpst:.3e}" if fpst else
                   f"{r['merged_at']}  {r['feature_slug']:<24} PR {r['pr_number'] or '-':<5} {r['elapsed_seconds']:>6}s "
                   f"{r['tokens_total']:>9} tok  ${r['cost_usd']:.4f}  fpst -")
    per = f"{summary['features_per_usd']:.3f} features per dollar" if summary["features_per_usd"] else "no spend recorded"
    click.echo(f"{len(rows)} features, ${cost:.4f}: {per}")
    for k, g in sorted(groups.items()):
        click.echo(f"  {k:<20} {g['features']:>4} features  ${g['cost_usd']:.4f}")


@click.command("routing")
@_nats
@_opts("28d")
@click.option("--db", "db_path", default=None, metavar="PATH", help="The runs database (as for 'report runs').")
@click.option("--out", "out_path", default="routing-proposal.json", show_default=True,
              help="Where the proposal is written (a file to read and apply by hand).")
@click.option("--min-jobs", default=routing_mod.MIN_JOBS, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--per-feature-budget-usd", type=float, default=None,
              help="The ceiling to respect [default: the coordinator's per-feature budget now].")
def routing_cmd(nats_url, since, as_json, db_path, out_path, min_jobs, per_feature_budget_usd) -> None:
    """Propose which engine and model to prefer per profile (pass rate, cost per shipped job, p95
    latency), never one whose cost per shipped job exceeds the per-feature budget. Writes a
    proposal file; changes nothing."""
    since_s = parse_since(since, 28 * 86400)
    outcomes = _db(db_path).outcomes(since_s)
    budget = _routing_budget(nats_url, as_json, per_feature_budget_usd)
    doc = routing_mod.proposal(outcomes, budget, since_s=since_s, generated_at_s=time.time(), min_jobs=min_jobs)
    Path(out_path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if as_json:
        emit_json({**doc, "written": out_path})
        return
    click.echo(f"{len(outcomes)} ended jobs read; per-feature budget "
               f"{'$%.4f' % doc['per_feature_budget_usd'] if doc['per_feature_budget_usd'] is not None else 'none'}")
    for profile, p in doc["profiles"].items():
        pick = f"{p['prefer']['engine']}/{p['prefer']['model']}" if p["prefer"] else "no proposal"
        click.echo(f"  {profile:<16} {pick:<28} {p['why']}")
        for e in p["excluded"]:
            click.echo(f"    excluded {e['engine']}/{e['model']}: {e['why']}")
    click.echo(f"written to {out_path} (apply by hand: set the profile's prefers line)")


def _routing_budget(nats_url, as_json, per_feature: float | None) -> dict | None:
    if per_feature is not None:
        return {"per_feature_budget_usd": per_feature, "computation_id": "given on the command line"}
    from gigafactory.client import Client

    async def call():
        c = await Client.connect(_url(nats_url, as_json))
        try:
            return await c.call("budget", {})
        finally:
            await c.close()

    try:
        return asyncio.run(call()).get("budget")
    except Exception as e:
        fail(f"no coordinator answered for the budget ({e}); pass --per-feature-budget-usd", EXIT_UNAVAILABLE,
             as_json=as_json)
    return None


@click.group("budget")
def budget_group() -> None:
    """Budget enforcement: let a job held for its budget start."""


@budget_group.command("override")
@_nats
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--actor", default=None, help="Who overrides [default: $USER].")
@click.option("--reason", default="", help="Why (kept on the budget_override event).")
@click.argument("job")
def override_cmd(nats_url, as_json, actor, reason, job) -> None:
    """Let JOB start although its projected cost exceeds the budget (it was held with reason
    ``budget``); recorded on the job and as a ``budget_override`` event."""
    import os

    from gigafactory.client import ApiError, Client

    async def call():
        c = await Client.connect(_url(nats_url, as_json))
        try:
            return await c.call("budget_override", {"job": job, "actor": actor or os.environ.get("USER", "operator"),
                                                    "reason": reason})
        finally:
            await c.close()

    try:
        out = asyncio.run(call())
    except ApiError as e:
        fail(e.message, EXIT_FAILED if e.is_client_error else EXIT_UNAVAILABLE, as_json=as_json)
    except Exception as e:  # no broker or no coordinator answered
        fail(f"no coordinator answered: {type(e).__name__}: {e}", EXIT_UNAVAILABLE, as_json=as_json)
    if as_json:
        emit_json(out)
        return
    click.echo(f"job {out['job']}: budget overridden by {out['budget_override']}; it starts at the next dispatch pass")
