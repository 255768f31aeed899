"""``gigafactory creds create|list|revoke``: enrol and revoke the identities of a deployment, and
the connection options (``--creds``, ``--tls-*``) every broker command takes.

The identity store is this machine's (``$GIGAFACTORY_HOME/identities``: the machine that runs
the broker). ``create`` writes a credentials file to hand to the new machine (mode 0600; copy it
over a secure channel); ``revoke`` marks the identity revoked and makes the running embedded
broker reload its configuration, which closes the identity's connections and refuses new ones.
No command prints a seed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from gigafactory.clitools import EXIT_USAGE, emit_json, fail
from gigafactory.identity import CREDS_ENV, ROLES, IdentityError, IdentityStore

_ENV_OF = {"creds": CREDS_ENV, "tls_ca": "GIGAFACTORY_TLS_CA", "tls_cert": "GIGAFACTORY_TLS_CERT",
           "tls_key": "GIGAFACTORY_TLS_KEY"}


def _to_env(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """An option of :func:`connection_options`: handed to the one connect path through its
    ``GIGAFACTORY_*`` variable (every connection reads it from the settings)."""
    if value:
        os.environ[_ENV_OF[param.name]] = value  # type: ignore[index]


def connection_options(fn):
    """``--creds``, ``--tls-ca``, ``--tls-cert``, ``--tls-key`` on a command (what
    ``--nats`` is on: every command that talks to a broker)."""
    path = click.Path(dir_okay=False)
    for name, helptext in (
        ("tls-key", "PEM private key of --tls-cert ($GIGAFACTORY_TLS_KEY)."),
        ("tls-cert", "PEM certificate: the broker's own for server/up, else this client's ($GIGAFACTORY_TLS_CERT)."),
        ("tls-ca", "PEM CA bundle to verify the broker (and, on the broker, clients) with ($GIGAFACTORY_TLS_CA)."),
        ("creds", f"Credentials file to connect with (${CREDS_ENV}; default: this home's admin identity)."),
    ):
        fn = click.option(f"--{name}", name.replace("-", "_"), type=path, default=None, expose_value=False,
                          is_eager=True, callback=_to_env, help=helptext)(fn)
    return fn


@click.group()
def creds() -> None:
    """Identities on the broker: create (enrol a machine or a person), list, revoke."""


@creds.command("create")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("name")
@click.option("--products", default="", help="Comma-separated products (submitter, reviewer).")
@click.option("--pools", default="", help="Comma-separated dispatch pools a factory may pull from (default: all).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the credentials file here (mode 0600), to hand to the new machine.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def create(role: str, name: str, products: str, pools: str, out: str | None, as_json: bool) -> None:
    """Create identity NAME with ROLE and write its credentials file (never printed)."""
    store = IdentityStore.at_home()
    try:
        ident, path = store.create(role, name, products=_split(products), pools=_split(pools), out=out)
    except IdentityError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)
    reloaded = _reload(store)
    if as_json:
        emit_json({"name": ident.name, "role": ident.role, "public_key": ident.public_key,
                   "creds": str(path), "reloaded": reloaded})
        return
    click.echo(f"created {ident.role} {ident.name} ({ident.public_key}); credentials: {path}")
    click.echo(f"on the new machine: GIGAFACTORY_CREDS={Path(path).name} (keep it mode 0600)"
               + ("" if reloaded else "; the broker loads it at its next start (no running embedded broker here)"))


@creds.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(as_json: bool) -> None:
    """The identities of this home's store (public keys only)."""
    try:
        idents = IdentityStore.at_home().list()
    except IdentityError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)
    rows = [{"name": i.name, "role": i.role, "public_key": i.public_key, "products": i.products,
             "pools": i.pools, "revoked": i.revoked_at is not None} for i in idents]
    if as_json:
        emit_json({"identities": rows})
        return
    for r in rows:
        state = "REVOKED" if r["revoked"] else "active"
        extra = "".join(f" {k}={','.join(r[k])}" for k in ("products", "pools") if r[k])
        click.echo(f"{r['name']:<24} {r['role']:<12} {state:<8} {r['public_key']}{extra}")


@creds.command("revoke")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def revoke(name: str, as_json: bool) -> None:
    """Revoke identity NAME: the running broker reloads and refuses it from then on."""
    store = IdentityStore.at_home()
    try:
        ident = store.revoke(name)
    except IdentityError as e:
        fail(str(e), EXIT_USAGE, as_json=as_json)
    reloaded = _reload(store)
    marked = _mark_revoked(ident.name) if ident.role == "factory" else False
    if as_json:
        emit_json({"name": ident.name, "role": ident.role, "revoked_at": ident.revoked_at, "reloaded": reloaded,
                   "leases_reclaimed": marked})
        return
    click.echo(f"revoked {ident.role} {ident.name} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ident.revoked_at))}"
               + ("; the broker reloaded its configuration" if reloaded else
                  "; no running embedded broker here: it is refused from the broker's next start"))


def _mark_revoked(name: str) -> bool:
    """Mark factory ``name``'s descriptor ``revoked`` on this home's broker (as its admin), so the
    coordinator's next reaper pass reclaims its leases at once (coordinator/signatures.py);
    whether it was marked (False: no broker here, or no descriptor)."""
    import asyncio

    from gigafactory.config import Settings, running_embedded_url

    url = os.environ.get("GIGAFACTORY_NATS_URL") or running_embedded_url()
    if not url:
        return False

    async def mark() -> bool:
        import msgspec

        from gigafactory.broker import Broker
        from gigafactory.coordinator.signatures import REVOKED
        from gigafactory.schemas.records import FactoryRecord, decode, encode

        b = await Broker.open(url, "gigafactory-creds", Settings.from_env(), ensure=False)
        try:
            e = await b.factories.get(name)
            if e is None:
                return False
            rec = msgspec.structs.replace(decode(e.value, FactoryRecord), status=REVOKED)
            await b.factories.put(name, encode(rec))
            return True
        finally:
            await b.close()

    try:
        return asyncio.run(asyncio.wait_for(mark(), 30))
    except Exception as e:  # revoked already; the leases then end at their expiry
        click.echo(f"warning: could not mark {name}'s descriptor revoked ({type(e).__name__}: {e}); its leases "
                   "are reclaimed when they expire", err=True)
        return False


def _reload(store: IdentityStore) -> bool:
    """Make the embedded broker of this home reload its users; whether one did."""
    from gigafactory.config import home
    from gigafactory.embedded import reload_users
    from gigafactory.natsconf import NatsConfError

    try:
        return reload_users(str(Path(home()) / "nats"), store.users()) is not None
    except (NatsConfError, OSError) as e:
        fail(f"the identity store changed, but the running broker could not reload: {e}", EXIT_USAGE)
    return False


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
