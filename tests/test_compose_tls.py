"""compose/ with TLS and identities between nodes (issue 12), tested for real without Docker.

- the set-up (``compose/setup`` -> ``python -m gigafactory.composesecrets``) makes a CA, a
  certificate per node and one identity per service, gives each service a folder with only its
  own, and is idempotent (a second run changes no byte; a revoked identity leaves every folder
  and every node's users);
- ``docker-compose config``: every node mounts only its own secrets, every gigafactory service
  connects over TLS with the CA and its own identity, factory replicas each claim their own;
- the committed node configurations, placed on loopback (ports, folders, the TLS files' paths:
  nothing else), run as a real 3-node cluster whose routes are TLS with verified certificates
  (a node with a certificate of another CA is refused), and a real coordinator and factory,
  started with the compose services' own command lines and environments, connect through it
  with their generated identities and ship a job; a client without credentials, with a wrong
  CA, or without TLS is refused, and a revoked identity is refused after the nodes reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import nats
import pytest
from helpers import Proc, fast_env, gigafactory_cmd, wait_until
from test_compose import COMPOSE, compose_config, env_of, tool

from gigafactory import composesecrets, natsconf
from gigafactory.embedded import find_nats_server, free_ports
from gigafactory.identity import IdentityStore, read_creds

SECRETS_IN_CONTAINER = "/run/gigafactory"
"""Where compose mounts a gigafactory service's secrets folder."""
CLAIM = COMPOSE / "bin" / "claim-identity"
SETUP_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 90.0


def run_setup(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The set-up as an operator runs it (a real process), as this user (no chown to another)."""
    return subprocess.run([sys.executable, "-m", "gigafactory.composesecrets", str(folder),
                           "--owner-uid", str(os.geteuid()), *args],
                          capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and mode."""
    return {str(p.relative_to(folder)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def other_ca(folder: Path) -> dict[str, str]:
    """A CA that is not the deployment's, and a certificate of it for 127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=rogue-ca")
    openssl(folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=rogue")
    (folder / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "server.pem", "-extfile", "ext.cnf")
    return {k: str(folder / f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compose") / "secrets"
    got = run_setup(folder)
    assert got.returncode == 0, got.stderr
    return folder


# -- the set-up ---------------------------------------------------------------------------------


def test_setup_gives_each_service_only_its_own_identity_and_prints_no_secret(tmp_path):
    folder = tmp_path / "secrets"
    got = run_setup(folder, "--factories", "2")
    assert got.returncode == 0, got.stderr
    store = IdentityStore(folder / "identities")
    idents = {i.name: i for i in store.list()}
    assert {n: i.role for n, i in idents.items()} == {
        "admin": "admin", "coordinator1": "coordinator", "coordinator2": "coordinator",
        "factory-1": "factory", "factory-2": "factory"}
    # Each folder a container mounts holds its own identity and the CA, nothing else.
    listing = {d: sorted(p.name for p in (folder / d).iterdir())
               for d in ("coordinator1", "coordinator2", "factories", "cli", "n1", "n2", "n3")}
    assert listing == {
        "coordinator1": ["ca.pem", "coordinator1.creds"], "coordinator2": ["ca.pem", "coordinator2.creds"],
        "factories": ["ca.pem", "factory-1.creds", "factory-2.creds"], "cli": ["admin.creds", "ca.pem"],
        **{n: ["ca.pem", "server.key", "server.pem", "users.conf"] for n in natsconf.COMPOSE_NODES}}
    for d, names in (("coordinator1", ["coordinator1"]), ("factories", ["factory-1", "factory-2"]),
                     ("cli", ["admin"])):
        for name in names:
            creds = read_creds(folder / d / f"{name}.creds")
            assert (creds.name, creds.role) == (name, idents[name].role)
            assert stat.S_IMODE((folder / d / f"{name}.creds").stat().st_mode) == 0o600
    for n in natsconf.COMPOSE_NODES:
        assert stat.S_IMODE((folder / n / "server.key").stat().st_mode) == 0o600
        # The node lets in exactly the store's identities.
        users = (folder / n / "users.conf").read_text()
        assert sorted(i.public_key for i in idents.values() if i.public_key in users) == sorted(
            i.public_key for i in idents.values())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and (folder / "ca.key").exists()
    # No secret on the terminal: no seed, no key.
    seeds = [read_creds(store.creds_path(n)).seed for n in idents]
    printed = got.stdout + got.stderr
    assert not [s for s in seeds if s in printed] and "PRIVATE KEY" not in printed
    assert "created identity factory-2 (factory)" in got.stdout


def test_setup_gives_the_services_folders_to_the_containers_user_and_the_host_copy_to_the_operator(tmp_path):
    folder = tmp_path / "secrets"
    if os.geteuid() != 0:
        # Only root can give a file away: asked to, a plain user is refused before anything is written.
        with pytest.raises(composesecrets.SetupError, match="only root can give them away"):
            composesecrets.setup(folder, owner_uid=composesecrets.IMAGE_UID)
        assert not folder.exists()
        return
    operator_uid = 23456
    composesecrets.setup(folder, owner_uid=composesecrets.IMAGE_UID, host_uid=operator_uid)
    owners = {str(p.relative_to(folder)): p.stat().st_uid for p in [folder, *folder.rglob("*")]}
    for d in ("coordinator1", "coordinator2", "factories", "cli"):
        assert {o for p, o in owners.items() if p == d or p.startswith(d + "/")} == {composesecrets.IMAGE_UID}, d
    # The operator reaches the folder, the CA's certificate and its admin identity; not the CA's
    # key, the identity store or the nodes' keys.
    assert owners["."] == owners["admin.creds"] == operator_uid
    assert stat.S_IMODE((folder / "ca.pem").stat().st_mode) == 0o644
    assert owners["ca.key"] == owners["identities"] == owners["n1/server.key"] == 0
    assert stat.S_IMODE((folder / "ca.key").stat().st_mode) == 0o600


def test_setup_is_idempotent_and_a_revoked_identity_leaves_every_folder_and_node(tmp_path):
    folder = tmp_path / "secrets"
    assert run_setup(folder).returncode == 0
    before = snapshot(folder)
    again = run_setup(folder)
    assert again.returncode == 0, again.stderr
    assert snapshot(folder) == before, "a second run changes nothing"
    assert "created" not in again.stdout and "changed" not in again.stdout, again.stdout

    # Revoked with the CLI as documented (GIGAFACTORY_HOME=compose/secrets), then applied.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIGAFACTORY_")}
    revoked_key = IdentityStore(folder / "identities").get("factory-2").public_key
    r = subprocess.run([*gigafactory_cmd(), "creds", "revoke", "factory-2"],
                       env={**env, "GIGAFACTORY_HOME": str(folder)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    applied = run_setup(folder, "--factories", "4")
    assert applied.returncode == 0, applied.stderr
    assert "removed factories/factory-2.creds" in applied.stdout and "kill -s HUP n1 n2 n3" in applied.stdout
    assert "skipped identity factory-2 (revoked)" in applied.stdout
    assert sorted(p.name for p in (folder / "factories").glob("*.creds")) == [
        "factory-1.creds", "factory-3.creds", "factory-4.creds"]
    for n in natsconf.COMPOSE_NODES:
        assert revoked_key not in (folder / n / "users.conf").read_text()
    # The CA and the node certificates stay: only the users changed (a reload, not a restart).
    after = snapshot(folder)
    for f in ("ca.pem", "ca.key", *(f"{n}/server.pem" for n in natsconf.COMPOSE_NODES)):
        assert after[f] == before[f], f


def test_setup_remakes_a_certificate_the_ca_did_not_sign_and_refuses_a_half_ca(tmp_path):
    folder = tmp_path / "secrets"
    assert run_setup(folder).returncode == 0
    rogue = other_ca(tmp_path / "rogue")
    (folder / "n2" / "server.pem").write_bytes(Path(rogue["cert"]).read_bytes())
    got = run_setup(folder)
    assert got.returncode == 0 and "created n2/server.pem" in got.stdout, got.stdout
    assert "created n1/server.pem" not in got.stdout
    subprocess.run(["openssl", "verify", "-CAfile", str(folder / "ca.pem"), str(folder / "n2" / "server.pem")],
                   check=True, capture_output=True, timeout=60)
    (folder / "ca.key").unlink()
    got = run_setup(folder)
    assert got.returncode == 2 and "ca.key does not" in got.stderr and "remove" in got.stderr, got.stderr


def test_setup_refuses_bad_input_with_a_named_error(tmp_path):
    got = run_setup(tmp_path / "s", "--factories", "0")
    assert got.returncode == 2 and f"--factories 0: use 1 to {composesecrets.MAX_FACTORIES}" in got.stderr
    assert not (tmp_path / "s").exists(), "nothing written"
    if os.geteuid() != 0:
        got = subprocess.run([sys.executable, "-m", "gigafactory.composesecrets", str(tmp_path / "t")],
                             capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
        assert got.returncode == 2 and "uid 10001" in got.stderr and "sudo" in got.stderr
    # The shipped wrapper runs this module (prints its usage; writes nothing).
    got = subprocess.run(["sh", str(COMPOSE / "setup"), "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": sys.executable})
    assert got.returncode == 0 and "--factories" in got.stdout


# -- the compose file ---------------------------------------------------------------------------------


def test_every_service_connects_over_tls_with_its_own_identity_and_sees_only_its_own_secrets():
    config = compose_config()
    services = config["services"]
    urls = ",".join(f"tls://{n}:{natsconf.CLIENT_PORT}" for n in natsconf.COMPOSE_NODES)
    secrets_dir = COMPOSE / "secrets"
    for n in natsconf.COMPOSE_NODES:
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[n]["volumes"]}
        assert Path(mounts[natsconf.COMPOSE_SECRETS_DIR]) == secrets_dir / n, n
        assert all(not src.startswith(str(secrets_dir)) or Path(src) == secrets_dir / n for src in mounts.values())
    expected = {"coordinator1": ("coordinator1", "coordinator1.creds"),
                "coordinator2": ("coordinator2", "coordinator2.creds"),
                "cli": ("cli", "admin.creds"), "factory": ("factories", None)}
    for name, (folder, creds) in expected.items():
        s = services[name]
        env = env_of(s)
        assert env["GIGAFACTORY_NATS_URL"] == urls, name
        assert env["GIGAFACTORY_TLS_CA"] == f"{SECRETS_IN_CONTAINER}/ca.pem", name
        assert env.get("GIGAFACTORY_CREDS") == (creds and f"{SECRETS_IN_CONTAINER}/{creds}"), name
        secret_mounts = [v for v in s["volumes"] if v.startswith(str(secrets_dir))]
        assert secret_mounts == [f"{secrets_dir / folder}:{SECRETS_IN_CONTAINER}:ro"], name
    # Factory replicas each claim their own identity from their folder, then run the factory.
    cmd = services["factory"]["command"]
    assert cmd[:3] == ["sh", "/usr/local/bin/claim-identity", SECRETS_IN_CONTAINER]
    assert cmd[3:5] == ["gigafactory", "factory"]
    assert f"{CLAIM}:/usr/local/bin/claim-identity:ro" in services["factory"]["volumes"]
    box = env_of(services["nats-box"])
    assert box["NATS_URL"] == urls and box["NATS_CA"] == f"{SECRETS_IN_CONTAINER}/ca.pem"
    assert box["NATS_NKEY"] == f"{SECRETS_IN_CONTAINER}/admin.creds"
    # Nothing that holds the CA's key or the whole identity store is mounted anywhere.
    everything = [v for s in services.values() for v in s.get("volumes", [])]
    assert not [v for v in everything if v.split(":")[0] in (str(secrets_dir), str(secrets_dir / "identities"))]
    assert "secrets/" in (COMPOSE / ".gitignore").read_text().split()
    # ... nor copied into the image: its build context leaves compose/ (secrets included) out.
    ignored = [line.strip() for line in (COMPOSE.parent / ".dockerignore").read_text().splitlines()]
    assert "compose" in ignored


def test_the_compose_nodes_require_tls_and_include_the_generated_users():
    for node, text in zip(natsconf.compose_nodes(), natsconf.compose_files().values(), strict=True):
        assert node.tls == natsconf.compose_tls() and node.tls.verify_routes and not node.tls.verify
        assert node.users_include == natsconf.COMPOSE_USERS_INCLUDE and node.users is None
        assert node.client_advertise == f"{node.server_name}:{natsconf.CLIENT_PORT}"
        assert text.count("tls {") == 2 and 'include "secrets/users.conf"' in text
        cluster = text[text.index("cluster {"):]
        assert "verify: true" in cluster and "verify: true" not in text[:text.index("cluster {")]
    # A verify with no CA to verify against, an absolute include, or two authorization blocks: refused.
    node = natsconf.compose_nodes()[0]
    with pytest.raises(natsconf.NatsConfError, match="names no ca_file"):
        natsconf.render(dataclasses.replace(node, tls=dataclasses.replace(node.tls, ca_file=None)))
    with pytest.raises(natsconf.NatsConfError, match="must be a path inside"):
        natsconf.render(dataclasses.replace(node, users_include="/etc/nats/users.conf"))
    with pytest.raises(natsconf.NatsConfError, match="must be a path inside"):
        natsconf.render(dataclasses.replace(node, users_include="../users.conf"))
    with pytest.raises(natsconf.NatsConfError, match="one authorization block"):
        natsconf.render(dataclasses.replace(node, users=()))


def test_claim_identity_gives_each_replica_its_own_identity_and_refuses_one_too_many(secrets, tmp_path):
    folder = secrets / "factories"
    holders = [Proc(["sh", str(CLAIM), str(folder), "sh", "-c", f'echo "$GIGAFACTORY_CREDS" > {tmp_path}/{i}; '
                     "exec sleep 60"], tmp_path / f"claim-{i}.log") for i in range(3)]
    try:
        got = [wait_until(lambda i=i: (tmp_path / str(i)).exists() and (tmp_path / str(i)).read_text().strip(),
                          30, what=f"replica {i} claims") for i in range(3)]
        assert sorted(got) == sorted(str(p) for p in folder.glob("*.creds")), got
        extra = subprocess.run(["sh", str(CLAIM), str(folder), "true"], capture_output=True, text=True, timeout=30)
        assert extra.returncode == 3 and "all 3 identities" in extra.stderr and "--factories" in extra.stderr
        # A replica that ends releases its identity: the next one takes it.
        holders[1].close()
        again = subprocess.run(["sh", str(CLAIM), str(folder), "sh", "-c", 'echo "$GIGAFACTORY_CREDS"'],
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == 0 and again.stdout.strip() == got[1]
    finally:
        for h in holders:
            h.close()
    empty = subprocess.run(["sh", str(CLAIM), str(tmp_path / "none"), "true"], capture_output=True, text=True,
                           timeout=30)
    assert empty.returncode == 3 and "run compose/setup" in empty.stderr


# -- the cluster, for real --------------------------------------------------------------------------


class TlsCluster:
    """compose/nats/n1..n3.conf placed on loopback: each node's configuration is the compose
    node with its placement (addresses, ports, store) and its TLS files' paths replaced, read
    from a folder whose ``secrets/`` is that node's secrets folder (as /etc/nats is in compose)."""

    def __init__(self, root: Path, secrets: Path) -> None:
        self.root, self.secrets = root, secrets
        size = len(natsconf.COMPOSE_NODES)
        ports = free_ports(3 * size)
        self.client, self.route, self.http = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.procs: list[Proc] = []
        self.confs: list[natsconf.NodeConf] = []
        self.conf_paths: list[Path] = []

    def placed(self, i: int, node: natsconf.NodeConf) -> natsconf.NodeConf:
        d = self.root / node.server_name
        tls = dataclasses.replace(node.tls, **{f: str(d / "secrets" / Path(getattr(node.tls, f)).name)
                                              for f in ("cert_file", "key_file", "ca_file")})
        return dataclasses.replace(
            node, host="127.0.0.1", port=self.client[i], http_port=self.http[i], cluster_port=self.route[i],
            store_dir=str(d / "store"), client_advertise=f"localhost:{self.client[i]}", tls=tls,
            routes=tuple(f"nats-route://localhost:{self.route[j]}" for j in range(len(self.client)) if j != i))

    def start(self) -> "TlsCluster":
        for i, node in enumerate(natsconf.compose_nodes()):
            conf = self.placed(i, node)
            d = self.root / node.server_name
            d.mkdir(parents=True)
            (d / "secrets").symlink_to(self.secrets / node.server_name)
            path = d / "nats-server.conf"
            path.write_text(natsconf.render(conf))
            self.confs.append(conf)
            self.conf_paths.append(path)
            self.procs.append(Proc([find_nats_server(), "-c", str(path)], d / "nats-server.log"))
        for i in range(len(self.procs)):
            wait_until(lambda i=i: self.healthy(i), 60, what=f"node {i} has JetStream and both TLS routes")
        return self

    def monitor(self, i: int, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http[i]}{path}", timeout=5) as r:
            return json.load(r)

    def healthy(self, i: int) -> bool:
        try:
            js = self.monitor(i, "/jsz")
            routes = {r.get("remote_name") for r in self.monitor(i, "/routez").get("routes") or []}
            others = {c.server_name for j, c in enumerate(self.confs) if j != i}
            return (self.monitor(i, "/healthz?js-enabled-only=true").get("status") == "ok" and routes == others
                    and (js.get("meta_cluster") or {}).get("leader") is not None)
        except OSError:
            return False

    @property
    def urls(self) -> str:
        return ",".join(f"tls://localhost:{p}" for p in self.client)

    def log(self, i: int) -> str:
        return self.procs[i].output()

    def reload(self) -> None:
        for p in self.procs:
            p.signal(signal.SIGHUP)

    def stop(self) -> None:
        for p in self.procs:
            p.close()


@pytest.fixture(scope="module")
def tls_cluster(secrets, tmp_path_factory):
    c = TlsCluster(tmp_path_factory.mktemp("tls-cluster"), secrets)
    try:
        yield c.start()
    finally:
        c.stop()


def service_env(service: str, secrets: Path, cluster: TlsCluster, home: Path) -> dict[str, str]:
    """The compose service's environment as docker-compose resolves it, on loopback: the node
    URLs placed on the cluster's ports, the container's secrets folder at the test's, the
    short timings of the tests."""
    folder = {"coordinator1": "coordinator1", "coordinator2": "coordinator2", "cli": "cli",
              "factory": "factories"}[service]
    env = {k: v for k, v in fast_env().items() if k not in ("GIGAFACTORY_CREDS", "GIGAFACTORY_NATS_URL")}
    for k, v in env_of(compose_config()["services"][service]).items():
        env[k] = v.replace(SECRETS_IN_CONTAINER, str(secrets / folder))
    assert env["GIGAFACTORY_NATS_URL"] == ",".join(f"tls://{n}:4222" for n in natsconf.COMPOSE_NODES)
    env.update(GIGAFACTORY_NATS_URL=cluster.urls, GIGAFACTORY_HOME=str(home), GIGAFACTORY_METRICS_PORT="0")
    return env


def test_the_compose_nodes_run_on_loopback_with_tls_routes_and_refuse_a_node_of_another_ca(tls_cluster, tmp_path):
    # Placed, not changed: same shape, same identities include, same TLS policy.
    for conf, node in zip(tls_cluster.confs, natsconf.compose_nodes(), strict=True):
        assert natsconf.shape(conf) == natsconf.shape(node)
        assert conf.users_include == node.users_include
        assert dataclasses.replace(conf.tls, cert_file="", key_file="", ca_file="") == dataclasses.replace(
            node.tls, cert_file="", key_file="", ca_file="")
    assert tool(find_nats_server(), "-t", "-c", str(tls_cluster.conf_paths[0])).returncode == 0
    # A node with a certificate of another CA (which trusts the deployment's CA, so the refusal
    # is n1's) routes to n1: n1 refuses it at the TLS handshake and keeps its two peers only.
    rogue = other_ca(tmp_path / "rogue")
    port, route_port = free_ports(2)
    conf = natsconf.NodeConf(server_name="rogue", host="127.0.0.1", port=port, store_dir=str(tmp_path / "store"),
                             cluster_name=natsconf.CLUSTER_NAME, cluster_port=route_port,
                             routes=(f"nats-route://localhost:{tls_cluster.route[0]}",),
                             tls=natsconf.TlsConf(cert_file=rogue["cert"], key_file=rogue["key"], verify_routes=True,
                                                  ca_file=str(tls_cluster.secrets / "n1" / "ca.pem")))
    (tmp_path / "rogue.conf").write_text(natsconf.render(conf))
    seen = len(tls_cluster.log(0))
    p = Proc([find_nats_server(), "-c", str(tmp_path / "rogue.conf")], tmp_path / "rogue.log")
    try:
        refused = wait_until(lambda: [line for line in tls_cluster.log(0)[seen:].splitlines()
                                      if "TLS route handshake error" in line], 30,
                             what="n1 refuses the rogue node's certificate on its route port")
        # Go's TLS client offers no certificate the server's CA list does not name (TLS 1.3), so
        # n1 sees none; with an older client it would see one signed by an unknown authority.
        assert "didn't provide a certificate" in refused[0] or "unknown authority" in refused[0], refused
        routes = {r.get("remote_name") for r in tls_cluster.monitor(0, "/routez").get("routes") or []}
        assert routes == {"n2", "n3"}, routes
    finally:
        p.close()


async def _connect(urls: str, **kw):
    async def quiet(_e):
        pass

    return await nats.connect(servers=urls.split(","), connect_timeout=5, allow_reconnect=False,
                              max_reconnect_attempts=1, error_cb=quiet, **kw)


def test_clients_without_credentials_with_another_ca_or_without_tls_are_refused(tls_cluster, secrets, tmp_path):
    ca = str(secrets / "cli" / "ca.pem")
    seed = read_creds(secrets / "cli" / "admin.creds").seed
    good_tls = ssl.create_default_context(cafile=ca)
    wrong_tls = ssl.create_default_context(cafile=other_ca(tmp_path / "other")["ca"])
    url = f"tls://localhost:{tls_cluster.client[0]}"

    async def body():
        nc = await _connect(url, tls=good_tls, nkeys_seed_str=seed)
        assert nc.is_connected and nc.connected_url.hostname == "localhost"
        await nc.close()
        with pytest.raises(Exception, match="Authorization Violation"):
            await _connect(url, tls=good_tls)
        with pytest.raises(Exception) as e:
            await _connect(url, tls=wrong_tls, nkeys_seed_str=seed)
        assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value) or "certificate verify failed" in repr(e.value), e.value
        # nats-py upgrades a nats:// URL to TLS when the server demands it, and with the system's
        # CAs cannot verify the deployment's certificate.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _connect(f"nats://127.0.0.1:{tls_cluster.client[1]}", nkeys_seed_str=seed)

    asyncio.run(asyncio.wait_for(body(), 60))
    # Plain TCP, refused by the server itself: it demands TLS in its INFO and closes a connection
    # that answers in clear text, with no PONG.
    with socket.create_connection(("127.0.0.1", tls_cluster.client[1]), timeout=5) as s:
        s.settimeout(5)
        info = s.recv(4096)
        assert info.startswith(b"INFO ") and json.loads(info[5:].split(b"\r\n")[0])["tls_required"] is True
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
            assert len(reply) < 65536
        assert b"PONG" not in reply, reply
    wait_until(lambda: "authentication error" in tls_cluster.log(0), 10, what="n1 logs the refusal")


@pytest.mark.timeout(240)
def test_a_coordinator_and_a_factory_ship_a_job_through_the_tls_cluster_with_their_own_identities(
        tls_cluster, secrets, tmp_path):
    services = compose_config()["services"]
    seen = [len(tls_cluster.log(i)) for i in range(len(tls_cluster.procs))]
    procs = []
    try:
        # Both coordinators, each as its own identity (two may run at once: every transition is
        # a compare-and-set).
        for name in ("coordinator1", "coordinator2"):
            coord_cmd = services[name]["command"]
            assert coord_cmd[:2] == ["gigafactory", "coordinator"]
            coord_cmd = [*gigafactory_cmd(), *coord_cmd[1:]]
            coord_cmd[coord_cmd.index("--metrics-port") + 1] = "0"
            procs.append(Proc(coord_cmd, tmp_path / f"{name}.log",
                              env=service_env(name, secrets, tls_cluster, tmp_path / name)))
        # The factory service's own command: claim an identity, then run the factory with it.
        fcmd = services["factory"]["command"]
        _claim, folder, gf = fcmd[:2], fcmd[2], fcmd[3:]
        gf = [*gigafactory_cmd(), *gf[1:]]
        gf[gf.index("--metrics-port") + 1] = "0"
        assert folder == SECRETS_IN_CONTAINER
        workdir = tmp_path / "factory-cwd"
        workdir.mkdir()
        fenv = service_env("factory", secrets, tls_cluster, tmp_path / "f")
        procs.append(Proc(["sh", str(CLAIM), str(secrets / "factories"), *gf], tmp_path / "factory.log", env=fenv))

        cli_env = service_env("cli", secrets, tls_cluster, tmp_path / "cli")

        def cli(*args: str, timeout_s: float = 60.0) -> dict:
            r = subprocess.run([*gigafactory_cmd(), *args, "--json"], env=cli_env, capture_output=True, text=True,
                               timeout=timeout_s, cwd=workdir)
            assert r.returncode == 0, (r.stdout, r.stderr, *(p.output()[-3000:] for p in procs))
            return json.loads(r.stdout)

        def factories() -> list[dict]:
            return cli("factories")["factories"]

        [factory] = wait_until(factories, 60, what="the factory registers")
        # Its id is its identity's name (the first free one it claimed), and its descriptor
        # publishes that identity's key: what the coordinator checks its signed writes with.
        keys = {i.name: i.public_key for i in IdentityStore(secrets / "identities").list()}
        assert factory["id"] == "factory-1" and factory["nkey"] == keys["factory-1"], factory
        out = cli("submit", "--wait", "--timeout", str(int(JOB_TIMEOUT_S)), str(COMPOSE / "jobs" / "hello.md"),
                  timeout_s=JOB_TIMEOUT_S + 30)
        [job] = out["jobs"]
        assert out["final"][job["job"]]["stage"] == "shipped", out
        events = cli("status", job["job"])["events"]
        kinds = [(e["kind"], e.get("actor")) for e in events]
        assert ("claimed", "factory-1") in kinds and ("finished", "factory-1") in kinds, kinds
        # Every holder write verified: nothing quarantined as forged.
        assert not [e for e in events if e["kind"] in ("poisoned", "forged_write")], events
        # No service was refused anything on the way: each identity's permissions fit its role.
        logs = "".join(p.output() for p in procs)
        assert "Authorization Violation" not in logs and "Permissions Violation" not in logs, logs[-5000:]
        node_logs = "".join(tls_cluster.log(i)[seen[i]:] for i in range(len(seen)))
        assert "Violation" not in node_logs and "authentication error" not in node_logs, node_logs[-5000:]
    finally:
        for p in procs:
            p.close()


def test_a_revoked_identity_is_refused_once_the_nodes_reload(tls_cluster, secrets, tmp_path):
    ca = str(secrets / "cli" / "ca.pem")
    store = IdentityStore(secrets / "identities")
    store.create("submitter", "revoke-me")
    assert run_setup(secrets).returncode == 0
    tls_cluster.reload()
    seed = read_creds(store.creds_path("revoke-me")).seed
    url = f"tls://localhost:{tls_cluster.client[2]}"

    async def connects() -> bool:
        try:
            nc = await _connect(url, tls=ssl.create_default_context(cafile=ca), nkeys_seed_str=seed)
        except Exception:
            return False
        await nc.close()
        return True

    async def refused() -> bool:
        return not await connects()

    wait_until(connects, 30, what="the new identity is let in after the reload")
    store.revoke("revoke-me")
    applied = run_setup(secrets)
    assert applied.returncode == 0 and "users changed" in applied.stdout, applied.stdout
    tls_cluster.reload()
    wait_until(refused, 30, what="the revoked identity is refused after the reload")
