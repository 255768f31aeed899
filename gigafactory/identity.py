"""Identities on the broker: who connects, and what the server lets each one do.

Every process connects with its own NATS nkey (an Ed25519 key pair): the server knows each
identity's public key and enforces its subject permissions; the process holds the seed in a
credentials file (mode 0600). No password crosses the wire: the server sends a nonce, the
client signs it.

- :func:`permissions` (pure): a role -> the ``publish``/``subscribe`` allow and deny lists that
  ``nats-server`` enforces (rendered by :mod:`gigafactory.natsconf`).
- :class:`IdentityStore`: the identities of one deployment, under ``$GIGAFACTORY_HOME/identities``:
  ``<name>.json`` (public: role, public key, products, pools, revoked) and ``<name>.creds`` (the
  seed). ``gigafactory up``/``server`` create ``admin``, ``coordinator`` and ``factory-local`` on
  first start (:meth:`IdentityStore.ensure_defaults`).
- :func:`read_creds`: a credentials file -> its identity (name, role) and seed; what
  :func:`gigafactory.broker.connect` uses.

Roles (see docs/security.md for the threat model):

- ``admin``: operators; everything.
- ``coordinator``: everything on the broker (it creates the layout, serves the API, reaps and
  requeues any job); it publishes to no API subject it serves.
- ``factory``: one per machine. Compare-and-set on job records (subject permissions cannot
  narrow a KV bucket to the keys of the jobs it holds: holder writes are signed instead, see
  docs/security.md), its own descriptor/heartbeat key only, job events, live logs, artifacts,
  locks, clock probes; pulls only from its pools' consumers (all pools when enrolled without
  ``--pools``: pools are created by the coordinator as jobs arrive); no API call, no stream or
  bucket create/update/delete/purge, no message delete, no consumer on the dispatch stream.
- ``submitter``: ``submit``, ``list``, ``status``, ``logs``, ``factories``, ``stats``; reads events,
  logs and artifacts (read-only JetStream). One limited to some products (``--products``) reads
  nothing around the API: no JetStream at all, live logs only of its products.
- ``reviewer``: ``ship``, ``cancel``, ``requeue`` and the read-only calls, reads like a submitter.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

from gigafactory.schemas import names

ROLES = ("admin", "coordinator", "factory", "submitter", "reviewer")
"""Every role an identity can have."""
LAYOUT_ROLES = ("admin", "coordinator")
"""Roles allowed to create and change streams and buckets (they open the layout with ``ensure``)."""
IDENTITY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]{0,62}")
"""An identity name is one subject token (a factory's name is its factory id and its key in
``gf_factories``): letters, digits, ``-``; at most 63 characters."""
CREDS_MAX_BYTES = 8192
"""A credentials file larger than this is not one: refused unread."""
CREDS_ENV = "GIGAFACTORY_CREDS"
"""The credentials file every command and service connects with (``--creds`` wins)."""
MAX_IDENTITIES = 10_000
"""Most identities one store holds (the server's configuration lists every one of them)."""
DEFAULT_FACTORY = "factory-local"
"""The identity of the factory that ``gigafactory up`` runs on the broker's own machine."""

READ_ENDPOINTS = ("list", "status", "factories", "stats", "logs")
"""API endpoints that only read."""
SUBMIT_ENDPOINTS = ("submit",)
GATE_ENDPOINTS = ("ship", "cancel", "requeue")
"""The human gate: only reviewers (and admins) may call these."""
ADMIN_ENDPOINTS = ("halt", "resume")
"""The kill switch: admin only."""
ALL_ENDPOINTS = READ_ENDPOINTS + SUBMIT_ENDPOINTS + GATE_ENDPOINTS + ADMIN_ENDPOINTS
SUBMITTER_OWN_ENDPOINTS = ("submit", "list", "status", "logs")
"""Endpoints a submitter calls only on its own subject (:func:`submitter_subject`), which names
its products: the coordinator refuses jobs of other products there, and filters what it shows."""
MAX_PRODUCTS = 32
"""Most products one identity may be limited to (they travel in its API subjects)."""
PRODUCT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,62}")
"""A product name on an identity: 1-63 letters, digits, '.', '_' or '-'."""

# Read-only JetStream: what a client needs to read events (an ephemeral consumer on GF_EVENTS),
# records (direct gets) and stored logs (the object store's stream), and nothing that writes.
_JS_READ = (
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.INFO.*.*",
    "$JS.FC.>",
)
_JS_READER_CONSUMERS = (
    f"$JS.API.CONSUMER.CREATE.{names.EVENTS_STREAM}.>",
    f"$JS.API.CONSUMER.CREATE.{names.EVENTS_STREAM}",
    f"$JS.API.CONSUMER.CREATE.OBJ_{names.ARTIFACTS_STORE}.>",
    f"$JS.API.CONSUMER.CREATE.OBJ_{names.ARTIFACTS_STORE}",
    f"$JS.API.CONSUMER.CREATE.KV_{names.JOBS_BUCKET}.>",
    f"$JS.API.CONSUMER.CREATE.KV_{names.FACTORIES_BUCKET}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{names.EVENTS_STREAM}.*",
    f"$JS.API.CONSUMER.DELETE.{names.EVENTS_STREAM}.*",
)
# What no one but admin and the coordinator may do, listed as denies too so a broad allow added
# later cannot open it by accident (a deny wins over an allow in nats-server).
_LAYOUT_WRITES = (
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.ACCOUNT.PURGE.>",
    f"$JS.API.CONSUMER.DELETE.{names.DISPATCH_STREAM}.>",
    f"$JS.API.CONSUMER.CREATE.{names.DISPATCH_STREAM}.>",
    f"$JS.API.CONSUMER.CREATE.{names.DISPATCH_STREAM}",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{names.DISPATCH_STREAM}.>",
    "$SRV.>",
)


class IdentityError(ValueError):
    """A bad identity name, role, store entry or credentials file; the message names it."""


def api_subject(endpoint: str) -> str:
    """The subject of an API endpoint (the coordinator's ``nats.micro`` group ``gf.api``)."""
    return f"{names.API_PREFIX}.{endpoint}"


def gate_subject(endpoint: str, role: str, name: str) -> str:
    """The subject a caller with ``role`` and ``name`` calls a human-gate endpoint on:
    ``gf.api.<endpoint>.<role>.<name>``. The server lets a reviewer publish only to its own
    (:func:`permissions`), so the subject names the caller as authenticated by the broker: the
    coordinator takes the actor from it (:func:`caller_of`), not from the request body."""
    return f"{names.API_PREFIX}.{endpoint}.{role}.{name}"


def products_token(products) -> str:
    """The subject token naming a submitter's products (pure): ``all`` for none (every product),
    else ``p`` and the base32 of the sorted names (any product name is then one valid token)."""
    import base64

    wanted = sorted(set(products))
    if not wanted:
        return "all"
    return "p" + base64.b32encode(json.dumps(wanted, separators=(",", ":")).encode()).decode().rstrip("=")


def parse_products_token(token: str) -> tuple[str, ...] | None:
    """The products a :func:`products_token` names; None for ``all`` (pure). Raises
    :class:`IdentityError` on a token that is neither."""
    import base64

    if token == "all":
        return None
    try:
        if not token.startswith("p"):
            raise ValueError(token)
        raw = token[1:]
        got = json.loads(base64.b32decode(raw + "=" * (-len(raw) % 8)))
        if not isinstance(got, list) or not got or not all(isinstance(p, str) for p in got):
            raise ValueError(token)
        return tuple(got)
    except (ValueError, UnicodeError):
        raise IdentityError(f"subject token {token[:80]!r} names no products") from None


def submitter_subject(endpoint: str, name: str, products=()) -> str:
    """The subject submitter ``name`` calls ``submit``/``list``/``status`` on:
    ``gf.api.<endpoint>.submitter.<name>.<products token>``. The server lets identity ``name``
    publish only there (:func:`permissions`), so the coordinator learns from the subject who
    asks and which products it may touch (:func:`submitter_of`)."""
    return f"{names.API_PREFIX}.{endpoint}.submitter.{name}.{products_token(products)}"


def submitter_of(subject: str) -> tuple[str, tuple[str, ...] | None] | None:
    """(name, products: None for every product) named by a :func:`submitter_subject`; None for
    any other subject (pure)."""
    parts = subject.split(".")
    prefix = names.API_PREFIX.split(".")
    n = len(prefix)
    if (len(parts) != n + 4 or parts[:n] != prefix or parts[n] not in SUBMITTER_OWN_ENDPOINTS
            or parts[n + 1] != "submitter" or not IDENTITY_NAME_RE.fullmatch(parts[n + 2])):
        return None
    try:
        return parts[n + 2], parse_products_token(parts[n + 3])
    except IdentityError:
        return None


def check_products(products) -> list[str]:
    """Validate an identity's ``--products`` (names, count); returns them as a list."""
    products = list(products)
    if len(products) > MAX_PRODUCTS:
        raise IdentityError(f"--products names {len(products)} products, more than {MAX_PRODUCTS}; use a "
                            "submitter per group of products")
    for p in products:
        if not isinstance(p, str) or not PRODUCT_NAME_RE.fullmatch(p):
            raise IdentityError(f"product {p!r}: use 1-63 letters, digits, '.', '_' or '-'")
    return products


def caller_of(subject: str) -> tuple[str, str] | None:
    """(role, name) named by a :func:`gate_subject`, None for any other subject (pure)."""
    parts = subject.split(".")
    prefix = names.API_PREFIX.split(".")
    if len(parts) != len(prefix) + 3 or parts[:len(prefix)] != prefix or parts[len(prefix)] not in GATE_ENDPOINTS:
        return None
    role, name = parts[-2], parts[-1]
    return (role, name) if role in ROLES and IDENTITY_NAME_RE.fullmatch(name) else None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not IDENTITY_NAME_RE.fullmatch(name):
        raise IdentityError(f"identity name {name!r}: use 1-63 letters, digits or '-', starting with a letter "
                            "or digit (it is one subject token and a factory's id)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise IdentityError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def permissions(role: str, name: str, *, pools: tuple[str, ...] = (), products: tuple[str, ...] = ()) -> dict:
    """The subject permissions of identity ``name`` with ``role`` (pure), as nats-server's
    ``permissions`` block: ``{"publish": {"allow": [...], "deny": [...]}, "subscribe": {...}}``
    (an absent list: no restriction of that kind).

    :param role: one of :data:`ROLES`.
    :param name: the identity's name (a factory's name is its factory id).
    :param pools: a factory's dispatch pools; empty: every pool (pools are created by the
        coordinator as jobs arrive, so an enrolment cannot always know them).
    :param products: a submitter's products (empty: every product); named in its own subjects."""
    check_role(role)
    check_name(name)
    api = api_subject
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if role == "coordinator":
        # The coordinator serves the API (subscribes gf.api.>, $SRV.>) and answers on the
        # callers' inboxes; it calls no endpoint itself.
        return {"publish": {"allow": [">"], "deny": [api(e) for e in ALL_ENDPOINTS]},
                "subscribe": {"allow": [">"]}}
    if role == "factory":
        pulls = ([f"$JS.API.CONSUMER.MSG.NEXT.{names.DISPATCH_STREAM}.{names.pool_consumer(p)}" for p in pools]
                 or [f"$JS.API.CONSUMER.MSG.NEXT.{names.DISPATCH_STREAM}.*"])
        allow = [
            *_JS_READ,
            # Ordered consumers for its KV watches (queue index, records, pools, locks).
            "$JS.API.CONSUMER.CREATE.*.>", "$JS.API.CONSUMER.CREATE.*", "$JS.API.CONSUMER.DELETE.*.*",
            *pulls,
            f"$JS.ACK.{names.DISPATCH_STREAM}.>",
            f"$KV.{names.JOBS_BUCKET}.>",  # compare-and-set on the jobs it claims: signed (see module doc)
            f"$KV.{names.QUEUE_BUCKET}.>",
            f"$KV.{names.LOCKS_BUCKET}.>",
            f"$KV.{names.CLOCK_BUCKET}.>",
            f"$KV.{names.FACTORIES_BUCKET}.{name}",  # its own descriptor and heartbeat only
            f"{names.EVENTS_PREFIX}.>",
            f"{names.LOGS_PREFIX}.>",
            f"{names.SPEND_PREFIX}.>",  # its attempts' spend records (GF_SPEND)
            f"$KV.{names.PULLS_BUCKET}.>",  # the local forge's pull requests it opens
            f"$O.{names.ARTIFACTS_STORE}.>",
        ]
        deny = [*(api(e) for e in ALL_ENDPOINTS), f"{names.API_PREFIX}.>", *_LAYOUT_WRITES,
                f"$KV.{names.POOLS_BUCKET}.>", f"$KV.{names.IDEMPOTENCY_BUCKET}.>",
                f"$KV.{names.ARCHIVE_BUCKET}.>"]
        return {"publish": {"allow": allow, "deny": deny},
                # The pools bucket (new pools as they are written) and the queue index (an idle
                # pool's stall check hears a write instead of asking for one: factory/pools.py);
                # both are readable by a factory anyway.
                "subscribe": {"allow": ["_INBOX.>", f"$KV.{names.POOLS_BUCKET}.>", f"$KV.{names.QUEUE_BUCKET}.>"],
                              "deny": [f"{names.API_PREFIX}.>", "$SRV.>"]}}
    # A reviewer calls the gate only on its own subject (gf.api.ship.reviewer.<name>): the
    # subject tells the coordinator who called, and the server vouches for it.
    # A submitter calls submit, list and status only on its own subject, which names its products
    # (gf.api.submit.submitter.<name>.<products>): the coordinator enforces them from it.
    if role == "submitter":
        endpoints = tuple(e for e in READ_ENDPOINTS if e not in SUBMITTER_OWN_ENDPOINTS)
        own = [submitter_subject(e, name, products) for e in SUBMITTER_OWN_ENDPOINTS]
    else:
        endpoints = READ_ENDPOINTS
        own = [gate_subject(e, role, name) for e in GATE_ENDPOINTS]
    denied = [api(e) for e in ALL_ENDPOINTS if e not in endpoints]
    if role == "submitter" and products:
        # Limited to some products: no direct JetStream read at all (records, events, stored
        # logs and artifacts are read through its own API subject, where the coordinator checks
        # the product), and live logs only of its products (the product is in the subject).
        return {"publish": {"allow": [*(api(e) for e in endpoints), *own],
                            "deny": [*denied, *_LAYOUT_WRITES, "$JS.>", "$KV.>", "$O.>"]},
                "subscribe": {"allow": ["_INBOX.>",
                                        *(f"{names.LOGS_PREFIX}.{names.product_token(p)}.>" for p in sorted(products))]}}
    return {"publish": {"allow": [*(api(e) for e in endpoints), *own, *_JS_READ, *_JS_READER_CONSUMERS],
                        "deny": [*denied, *_LAYOUT_WRITES]},
            "subscribe": {"allow": ["_INBOX.>", f"{names.LOGS_PREFIX}.>"]}}


# -- credentials files --------------------------------------------------------------------------

_META_PREFIX = "# gigafactory-identity: "


@dataclass(frozen=True)
class Creds:
    """What a credentials file holds: the identity's name and role, and its nkey seed (secret:
    never printed, never logged; ``repr`` hides it)."""

    name: str
    role: str
    seed: str = field(repr=False)
    path: str = ""
    products: tuple[str, ...] = ()
    """A submitter's products (empty: every product)."""
    jwt: bool = False
    """A standard NATS ``.creds`` file (a user JWT with its seed: decentralised auth)."""


def creds_text(name: str, role: str, seed: str, products=()) -> str:
    """The text of a credentials file (pure): a header, a metadata line (name, role, products:
    a submitter's client names them in its API subjects), the seed."""
    meta = json.dumps({"name": name, "role": role, **({"products": sorted(products)} if products else {})},
                      sort_keys=True)
    return ("# Gigafactory credentials (a NATS nkey seed). SECRET: whoever holds this file is\n"
            f"# identity {name!r} (role {role}). Keep it mode 0600; revoke with `gigafactory creds revoke {name}`.\n"
            f"{_META_PREFIX}{meta}\n{seed}\n")


def parse_creds(text: str, path: str = "<creds>") -> Creds:
    """A credentials file's text -> :class:`Creds`. Raises :class:`IdentityError` naming the file."""
    meta, seed = None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(_META_PREFIX):
            try:
                meta = json.loads(line[len(_META_PREFIX):])
            except ValueError:
                raise IdentityError(f"{path}: the identity line is not JSON; recreate the file with "
                                    "`gigafactory creds create`") from None
        elif line.startswith("SU"):
            seed = line
    if seed is None:
        raise IdentityError(f"{path}: no nkey seed (a line starting with 'SU'); recreate the file with "
                            "`gigafactory creds create`")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or "unknown")
    role = str(meta.get("role") or "unknown")
    jwt = "-----BEGIN NATS USER JWT-----" in text
    products = meta.get("products") or []
    products = tuple(str(p) for p in products) if isinstance(products, list) else ()
    return Creds(name=name, role=role, seed=seed, path=path, products=products, jwt=jwt)


def read_creds(path: str | os.PathLike) -> Creds:
    """Read a credentials file (at most :data:`CREDS_MAX_BYTES`)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise IdentityError(f"credentials file {p}: {e.strerror}; pass --creds FILE or set {CREDS_ENV}") from None
    if size > CREDS_MAX_BYTES:
        raise IdentityError(f"credentials file {p} is {size} bytes, more than {CREDS_MAX_BYTES}: not a "
                            "credentials file")
    return parse_creds(p.read_text(encoding="utf-8"), str(p))


def new_keypair() -> tuple[str, str]:
    """A fresh user nkey: (seed, public key)."""
    import nkeys
    from nacl.signing import SigningKey

    raw = bytes(SigningKey.generate())
    seed = nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER).decode()
    kp = nkeys.from_seed(bytearray(seed.encode()))
    return seed, kp.public_key.decode()


def sign(seed: str, data: bytes) -> bytes:
    """Sign ``data`` with the nkey ``seed`` (Ed25519): the raw 64-byte signature."""
    import nkeys

    kp = nkeys.from_seed(bytearray(seed.encode()))
    try:
        return kp.sign(data)
    finally:
        kp.wipe()


VERIFY_KEYS_CACHED = 4096
"""Public nkeys whose decoded verify key is kept (one per factory identity; beyond, the least
recently used is decoded again when next needed)."""


@functools.lru_cache(maxsize=VERIFY_KEYS_CACHED)
def verify_key(public_key: str):
    """The Ed25519 verify key of the user nkey ``public_key``, or None when it is not one.
    Cached: the coordinator checks every leased record's signature, two per job, against the
    same few hundred factory keys, and decoding the key (base32, CRC, key set-up) each time
    was a third of the check's cost.

    :param public_key: a public user nkey (``U...``).
    """
    import base64

    import nkeys
    from nacl.signing import VerifyKey

    try:
        # A public nkey is base32(prefix byte, 32-byte Ed25519 key, CRC-16): the nkeys package
        # has no reader for a bare public key, so decode it here and check the prefix and CRC.
        text = public_key.encode("ascii")
        raw = base64.b32decode(text + b"=" * (-len(text) % 8))
        if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER or bytes(nkeys.crc16_checksum(raw[:33])) != raw[33:]:
            return None
        return VerifyKey(raw[1:33])
    except (ValueError, UnicodeError):
        return None


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s over ``data``."""
    from nacl.exceptions import BadSignatureError

    key = verify_key(public_key)
    if key is None:
        return False
    try:
        key.verify(data, signature)
        return True
    except (BadSignatureError, ValueError):
        return False


def public_key_of(seed: str) -> str:
    import nkeys

    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


# -- the identity store ---------------------------------------------------------------------------


@dataclass
class Identity:
    """One identity's public entry (``<name>.json``).

    :param name: see :func:`check_name`.
    :param role: one of :data:`ROLES`.
    :param public_key: the nkey's public key (``U...``): what the server checks signatures with.
    :param products: a submitter's products, enforced by the coordinator from its API subjects
        (:func:`submitter_subject`); recorded only on a reviewer (docs/security.md).
    :param pools: a factory's dispatch pools (empty: every pool).
    :param created_at: seconds since the epoch.
    :param revoked_at: when revoked (None: active). A revoked identity stays listed, refused.
    """

    name: str
    role: str
    public_key: str
    products: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class IdentityStore:
    """The identities of one deployment, in ``root`` (``$GIGAFACTORY_HOME/identities``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def at_home(cls) -> "IdentityStore":
        from gigafactory.config import home

        return cls(Path(home()) / "identities")

    def _json(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.json"

    def creds_path(self, name: str) -> Path:
        """Where the store keeps ``name``'s credentials file (created with the identity)."""
        return self.root / f"{check_name(name)}.creds"

    def get(self, name: str) -> Identity | None:
        p = self._json(name)
        if not p.exists():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            return Identity(**d)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"identity file {p} is unreadable ({e}); remove it and create the identity again") from None

    def list(self) -> list[Identity]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.glob("*.json"))[:MAX_IDENTITIES]:
            got = self.get(p.stem)
            if got is not None:
                out.append(got)
        return out

    def create(self, role: str, name: str, *, products: list[str] | tuple[str, ...] = (),
               pools: list[str] | tuple[str, ...] = (), out: str | os.PathLike | None = None) -> tuple[Identity, Path]:
        """Create identity ``name`` with ``role``; write its credentials file (mode 0600) into the
        store and, if given, to ``out`` as well. Returns the identity and the credentials path
        (``out`` or the store's). Refuses a name in use (revoked ones included: a name is one
        factory's history)."""
        check_role(role)
        if self._json(name).exists():
            raise IdentityError(f"identity {name!r} exists already ({self._json(name)}); pick another name")
        # Count the entries, not parse them: a lab that enrolls a thousand factories (the load
        # suite) would otherwise read every identity file once per new one.
        if self.root.is_dir() and sum(1 for _ in self.root.glob("*.json")) >= MAX_IDENTITIES:
            raise IdentityError(f"the identity store {self.root} holds {MAX_IDENTITIES} identities already")
        products = check_products(products)
        permissions(role, name, pools=tuple(pools), products=tuple(products))  # validates before writing
        seed, pub = new_keypair()
        ident = Identity(name=name, role=role, public_key=pub, products=list(products), pools=list(pools),
                         created_at=time.time())
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_secret(self.creds_path(name), creds_text(name, role, seed, products))
        if out is not None:
            _write_secret(Path(out), creds_text(name, role, seed, products))
        tmp = self._json(name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(ident), indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self._json(name))
        return ident, Path(out) if out is not None else self.creds_path(name)

    def revoke(self, name: str) -> Identity:
        """Mark ``name`` revoked and delete its credentials file from the store. The server
        refuses it once it reloads its configuration (see :meth:`EmbeddedServer.reload`)."""
        ident = self.get(name)
        if ident is None:
            raise IdentityError(f"no identity {name!r} in {self.root}; `gigafactory creds list` shows them")
        if ident.revoked_at is None:
            ident.revoked_at = time.time()
            p = self._json(name)
            tmp = p.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(asdict(ident), indent=2, sort_keys=True), encoding="utf-8")
            os.replace(tmp, p)
        self.creds_path(name).unlink(missing_ok=True)
        return ident

    def ensure_defaults(self) -> None:
        """On first start: ``admin``, ``coordinator`` and the local factory (idempotent)."""
        for role, name in (("admin", "admin"), ("coordinator", "coordinator"), ("factory", DEFAULT_FACTORY)):
            if self.get(name) is None:
                self.create(role, name)

    def users(self) -> list[dict]:
        """The active identities as nats-server ``authorization.users`` entries (nkey and
        permissions), sorted by name."""
        return [{"nkey": i.public_key, "permissions": permissions(i.role, i.name, pools=tuple(i.pools),
                                                                   products=tuple(i.products))}
                for i in self.list() if i.active]

    def by_public_key(self) -> dict[str, Identity]:
        """Public key -> identity, revoked ones included (for verifying signed writes)."""
        return {i.public_key: i for i in self.list()}


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def resolve_creds(explicit: str | None = None) -> str | None:
    """The credentials file to connect with: ``explicit`` (``--creds``/``Settings.creds``), else
    ``$GIGAFACTORY_CREDS``, else the selected NATS context's ``creds`` or ``nkey`` file
    (:mod:`gigafactory.natscontext`), else the home's ``admin`` identity if the store has one (the embedded
    default: the CLI on the broker's machine acts as its admin), else None (no credentials)."""
    if explicit:
        return explicit
    env = os.environ.get(CREDS_ENV)
    if env:
        return env
    from gigafactory.config import nats_context_field

    ctx = nats_context_field("creds") or nats_context_field("nkey")
    if ctx:
        return ctx
    try:
        p = IdentityStore.at_home().creds_path("admin")
    except Exception:
        return None
    return str(p) if p.exists() else None


@dataclass
class HolderSigner:
    """Signs the job records a factory writes (schemas/signing.py) with its identity's nkey;
    with no identity (``public_key`` None) it leaves records unsigned."""

    public_key: str | None = None
    seed: str | None = field(default=None, repr=False)
    _key: Any = field(default=None, repr=False, compare=False)
    """The key pair derived from ``seed`` once (deriving it is an Ed25519 scalar multiplication,
    as costly as the signature itself; a noop run's profile showed it on every write). It holds
    nothing the seed beside it does not."""

    def sign_record(self, rec):
        if self.seed is None or self.public_key is None:
            return rec
        from gigafactory.schemas import signing

        if self._key is None:
            import nkeys

            self._key = nkeys.from_seed(bytearray(self.seed.encode()))
        return signing.signed(rec, self.public_key, self._key.sign)


_SIGNERS: dict[str, HolderSigner] = {}
"""Credentials path -> its signer (the file is read once per process)."""


def holder_signer(settings) -> HolderSigner:
    """The signer of the identity ``settings`` connect with (:func:`resolve_creds`); an unsigned
    one when there is none or the file is unreadable (the connection then fails on its own)."""
    path = resolve_creds(settings.creds)
    if not path:
        return HolderSigner()
    if path not in _SIGNERS:
        try:
            creds = read_creds(path)
            _SIGNERS[path] = HolderSigner(public_key_of(creds.seed), creds.seed)
        except (IdentityError, ValueError):
            return HolderSigner()
    return _SIGNERS[path]


def verify_holder(public_key: str, data: bytes, signature: bytes) -> bool:
    """:func:`verify` with the argument order :func:`gigafactory.schemas.signing.holder_verdict` uses."""
    return verify(public_key, data, signature)
