"""The secrets of compose/docker-compose.yml: a CA, one certificate per NATS node, one identity per
service, each service's folder holding only its own (``compose/setup`` runs this).

``python -m gigafactory.composesecrets compose/secrets [--factories N] [--owner-uid UID]``
writes, into that folder (mode 0700)::

    ca.pem  ca.key                 the deployment's CA (its key never leaves this folder: no
                                   service mounts it)
    identities/                    the identity store (``GIGAFACTORY_HOME=compose/secrets``:
                                   ``gigafactory creds list|create|revoke`` work on it)
    admin.creds                    the operators' identity, for the CLI on this host
    n1/ n2/ n3/                    mounted at /etc/nats/secrets of node n<i>: server.pem and
                                   server.key (names n<i>, localhost, 127.0.0.1), ca.pem,
                                   users.conf (the ``authorization`` block the node includes)
    coordinator1/ coordinator2/    mounted at /run/gigafactory: <name>.creds, ca.pem
    factories/                     mounted at /run/gigafactory of every factory replica:
                                   factory-<i>.creds (one identity per replica: each claims a
                                   free one, see compose/README.md), ca.pem
    cli/                           mounted at /run/gigafactory of ``cli`` and ``nats-box``:
                                   admin.creds, ca.pem

It is idempotent: what exists and is still valid stays (the CA, certificates signed by it with
the names they need and more than :data:`RENEW_BEFORE_S` left, every identity); what is missing
is created; the ``users.conf`` files and the service folders are rewritten from the identity
store, so a revoked identity (``gigafactory creds revoke``) disappears from them. It says what
changed and whether the running nodes must reload (``docker-compose kill -s HUP n1 n2 n3``).
It never prints a seed or a key.

Certificates are made with the ``openssl`` command (as the project's TLS tests do): ECDSA P-256,
the CA for :data:`CA_DAYS` days, a node for :data:`CERT_DAYS` days.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gigafactory import natsconf
from gigafactory.identity import IdentityError, IdentityStore

COORDINATORS = ("coordinator1", "coordinator2")
"""The coordinator services of compose/docker-compose.yml, each its own identity."""
ADMIN = "admin"
"""The operators' identity (``cli`` and ``nats-box`` services, and the CLI on the Docker host)."""
FACTORY_PREFIX = "factory-"
"""Factory identities made here are ``factory-1`` .. ``factory-N``."""
DEFAULT_FACTORIES = 3
"""Factory identities made by default: one per replica of ``up --scale factory=3``."""
MAX_FACTORIES = 256
"""Most factory identities one run makes (each replica needs one; the nodes list every one)."""
IMAGE_UID = 10001
"""The user the gigafactory image runs as (Dockerfile: ``useradd --uid 10001``): the owner its
services' folders need, since a credentials file is readable by its owner only."""
CA_DAYS = 3650
CERT_DAYS = 825
RENEW_BEFORE_S = 30 * 86400
"""A node certificate with less validity left than this is made again (30 days)."""
OPENSSL_TIMEOUT_S = 60.0
"""Bound on each ``openssl`` call."""
SERVICE_DIR = "/run/gigafactory"
"""Where a gigafactory service (and nats-box) finds its folder in its container."""
RELOAD_HINT = "docker-compose -f compose/docker-compose.yml kill -s HUP n1 n2 n3"


class SetupError(RuntimeError):
    """What stops the set-up; the message names the file and what to do."""


@dataclass
class Report:
    """What a run did: lines of ``created``/``kept``/``removed``, and whether a node must reload
    its users (``users.conf`` changed) or restart (a certificate changed)."""

    lines: list[str] = field(default_factory=list)
    users_changed: bool = False
    certs_changed: bool = False

    def add(self, line: str) -> None:
        self.lines.append(line)


def node_names(node: str) -> list[str]:
    """The names a node's certificate holds (pure): its service name (clients and the other
    nodes dial it by that name, and it advertises it), and ``localhost``/``127.0.0.1`` for the
    port published on the Docker host."""
    return [f"DNS:{node}", "DNS:localhost", "IP:127.0.0.1"]


def factory_names(count: int) -> list[str]:
    """``factory-1`` .. ``factory-<count>`` (pure). Raises :class:`SetupError` beyond the limit."""
    if not 1 <= count <= MAX_FACTORIES:
        raise SetupError(f"--factories {count}: use 1 to {MAX_FACTORIES} (one identity per factory replica)")
    return [f"{FACTORY_PREFIX}{i}" for i in range(1, count + 1)]


def _openssl(folder: Path, *args: str) -> None:
    try:
        got = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True,
                             timeout=OPENSSL_TIMEOUT_S)
    except FileNotFoundError:
        raise SetupError("the openssl command is not installed: install it (Debian: apt-get install openssl)") from None
    if got.returncode != 0:
        raise SetupError(f"openssl {args[0]} failed in {folder}: {got.stderr.strip()[-500:]}")


def _openssl_ok(folder: Path, *args: str) -> bool:
    got = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S)
    return got.returncode == 0


def _write(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` with ``mode`` unless it holds exactly that already; whether it
    changed. Written beside and renamed: a reader never sees half a file."""
    if path.exists() and path.read_bytes() == data:
        os.chmod(path, mode)
        return False
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def ensure_ca(root: Path, report: Report) -> None:
    """The CA (``ca.pem``, ``ca.key``): kept if both exist, made if neither does."""
    cert, key = root / "ca.pem", root / "ca.key"
    if cert.exists() and key.exists():
        os.chmod(cert, 0o644)
        report.add("kept CA ca.pem")
        return
    if cert.exists() or key.exists():
        have, missing = (cert, key) if cert.exists() else (key, cert)
        raise SetupError(f"{have} exists but {missing} does not: restore it, or remove {have} to make a new CA "
                         "(every certificate is then made again and every node must restart)")
    _openssl(root, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", str(CA_DAYS), "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=gigafactory-compose-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    os.chmod(key, 0o600)
    os.chmod(cert, 0o644)  # public: the operator's CLI on the host verifies the nodes with it
    report.add("created CA ca.pem")
    report.certs_changed = True


def _cert_valid(folder: Path, node: str) -> bool:
    """Whether ``folder``'s server.pem is signed by ``folder``'s ca.pem, holds the names
    :func:`node_names` gives, and has more than :data:`RENEW_BEFORE_S` left."""
    if not ((folder / "server.pem").exists() and (folder / "server.key").exists()):
        return False
    if not (_openssl_ok(folder, "verify", "-CAfile", "ca.pem", "server.pem")
            and _openssl_ok(folder, "x509", "-in", "server.pem", "-noout", "-checkend", str(RENEW_BEFORE_S))):
        return False
    got = subprocess.run(["openssl", "x509", "-in", "server.pem", "-noout", "-ext", "subjectAltName"], cwd=folder,
                         capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S).stdout
    # openssl prints "DNS:n1, DNS:localhost, IP Address:127.0.0.1".
    have = {x.strip().replace("IP Address:", "IP:") for x in got.splitlines()[-1].split(",")} if got else set()
    return set(node_names(node)) <= have


def ensure_node(root: Path, node: str, users_conf: bytes, report: Report) -> None:
    """Node ``node``'s folder: the CA's certificate, its own certificate and key (made again
    when :func:`_cert_valid` says so), and ``users.conf``."""
    folder = root / node
    folder.mkdir(mode=0o700, exist_ok=True)
    _write(folder / "ca.pem", (root / "ca.pem").read_bytes(), 0o644)
    if _cert_valid(folder, node):
        report.add(f"kept {node}/server.pem")
    else:
        _openssl(folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={node}")
        (folder / "ext.cnf").write_text(
            f"subjectAltName={','.join(node_names(node))}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            # serverAuth for clients and the routes it accepts; clientAuth for the routes it
            # dials (the other node verifies it: TlsConf.verify_routes).
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        _openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", str(root / "ca.pem"), "-CAkey",
                 str(root / "ca.key"), "-CAcreateserial", "-CAserial", str(root / "ca.srl"), "-days", str(CERT_DAYS),
                 "-out", "server.pem", "-extfile", "ext.cnf")
        (folder / "server.csr").unlink()
        (folder / "ext.cnf").unlink()
        os.chmod(folder / "server.key", 0o600)
        report.add(f"created {node}/server.pem ({', '.join(node_names(node))})")
        report.certs_changed = True
    if _write(folder / "users.conf", users_conf, 0o600):
        report.add(f"wrote {node}/users.conf")
        report.users_changed = True


def ensure_identities(store: IdentityStore, factories: list[str], report: Report) -> None:
    """Every identity compose needs exists (a revoked one stays revoked: its name is not reused)."""
    wanted = [("admin", ADMIN), *(("coordinator", c) for c in COORDINATORS), *(("factory", f) for f in factories)]
    for role, name in wanted:
        ident = store.get(name)
        if ident is None:
            store.create(role, name)
            report.add(f"created identity {name} ({role})")
        elif ident.role != role:
            raise SetupError(f"identity {name!r} in {store.root} has role {ident.role}, compose needs {role}: "
                             f"revoke it and remove {store.root / (name + '.json')}, then run this again")
        elif not ident.active:
            report.add(f"skipped identity {name} (revoked)")


def _service_folder(root: Path, folder: str, creds: dict[str, bytes], report: Report, owner_uid: int) -> None:
    """``root/folder`` holds exactly ``creds`` (file name -> text) and ca.pem, owned by
    ``owner_uid``; any other credentials file there is removed (a revoked identity)."""
    d = root / folder
    d.mkdir(mode=0o700, exist_ok=True)
    for name, text in creds.items():
        if _write(d / name, text, 0o600):
            report.add(f"wrote {folder}/{name}")
    for stale in sorted(d.glob("*.creds")):
        if stale.name not in creds:
            stale.unlink()
            report.add(f"removed {folder}/{stale.name} (revoked or not in the store)")
    _write(d / "ca.pem", (root / "ca.pem").read_bytes(), 0o644)
    for p in [d, *d.iterdir()]:
        if p.stat().st_uid != owner_uid:
            os.chown(p, owner_uid, -1)


def setup(root: str | os.PathLike, *, factories: int = DEFAULT_FACTORIES, owner_uid: int = IMAGE_UID,
          host_uid: int | None = None) -> Report:
    """Make or bring up to date the secrets of compose/docker-compose.yml in ``root``.

    :param root: the secrets folder (``compose/secrets``); created mode 0700.
    :param factories: how many factory identities to have at least (``factory-1`` ..).
    :param owner_uid: the owner of the gigafactory services' folders: the uid their containers
        run as (:data:`IMAGE_UID`). Changing an owner needs root; a run that is not root and asks
        for another uid than its own is refused before anything is written.
    :param host_uid: the owner of ``admin.creds`` in ``root`` (the operator on the Docker host;
        default: ``$SUDO_UID`` under sudo, else this process's uid).
    """
    root = Path(root)
    names = factory_names(factories)
    if os.geteuid() != 0 and owner_uid != os.geteuid():
        raise SetupError(f"the containers' user (uid {owner_uid}) must own its credentials (mode 0600), and only "
                         f"root can give them away: run this as root (sudo compose/setup), or pass --owner-uid "
                         f"{os.geteuid()} and run the gigafactory services as that user")
    if host_uid is None:
        host_uid = int(os.environ.get("SUDO_UID") or os.geteuid())
    old_umask = os.umask(0o077)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The operator (not root) reaches admin.creds and ca.pem in it; the CA's key and the
        # identity store stay root's (mode 0600/0700) when run with sudo.
        if root.stat().st_uid != host_uid:
            os.chown(root, host_uid, -1)
        report = Report()
        ensure_ca(root, report)
        store = IdentityStore(root / "identities")
        try:
            ensure_identities(store, names, report)
            users = store.users()
        except IdentityError as e:
            raise SetupError(str(e)) from None
        users_conf = natsconf.authorization_text(users)
        for node in natsconf.COMPOSE_NODES:
            ensure_node(root, node, users_conf.encode(), report)
        active = {i.name: i for i in store.list() if i.active}

        def creds_of(name: str) -> bytes:
            return store.creds_path(name).read_bytes()

        for c in COORDINATORS:
            _service_folder(root, c, {f"{c}.creds": creds_of(c)} if c in active else {}, report, owner_uid)
        _service_folder(root, "factories", {f"{n}.creds": creds_of(n) for n, i in sorted(active.items())
                                            if i.role == "factory"}, report, owner_uid)
        _service_folder(root, "cli", {f"{ADMIN}.creds": creds_of(ADMIN)} if ADMIN in active else {}, report,
                        owner_uid)
        if ADMIN in active:
            if _write(root / "admin.creds", creds_of(ADMIN), 0o600):
                report.add("wrote admin.creds (the operators' identity, for the CLI on this host)")
            if (root / "admin.creds").stat().st_uid != host_uid:
                os.chown(root / "admin.creds", host_uid, -1)
        else:
            (root / "admin.creds").unlink(missing_ok=True)
        return report
    finally:
        os.umask(old_umask)


def main(argv: list[str] | None = None) -> int:
    """``python -m gigafactory.composesecrets FOLDER [--factories N] [--owner-uid UID]``."""
    ap = argparse.ArgumentParser(prog="python -m gigafactory.composesecrets",
                                 description="Make or update compose/docker-compose.yml's CA, node certificates and "
                                             "identities (idempotent; prints no secret).")
    ap.add_argument("folder", help="the secrets folder (compose/secrets)")
    ap.add_argument("--factories", type=int, default=DEFAULT_FACTORIES,
                    help=f"factory identities to have at least, one per replica (default {DEFAULT_FACTORIES}, "
                         f"at most {MAX_FACTORIES})")
    ap.add_argument("--owner-uid", type=int, default=IMAGE_UID,
                    help=f"uid the gigafactory containers run as (default {IMAGE_UID}, the image's user)")
    args = ap.parse_args(argv)
    try:
        report = setup(args.folder, factories=args.factories, owner_uid=args.owner_uid)
    except (SetupError, OSError) as e:
        print(f"compose secrets: {e}", file=sys.stderr)
        return 2
    for line in report.lines:
        print(line)
    if report.certs_changed:
        print("certificates changed: (re)start the nodes and services (docker-compose up -d --force-recreate)")
    elif report.users_changed:
        print(f"users changed: make the running nodes reload them ({RELOAD_HINT})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
