"""Identities and least privilege on the broker (issue 12): the role x API endpoint x subject
matrix against a real ``nats-server`` with authentication on. Every allowed action is shown to
work by its effect (a reply, a JetStream ack, a delivered message); every denied one is shown to
be refused by the SERVER: the client gets nats' ``Permissions Violation`` and the server's log
names the identity's key and the subject."""

from __future__ import annotations

import asyncio
import re
import time

import nats
import pytest
from helpers import Fleet, eventually, run

from gigafactory.broker import Broker
from gigafactory.identity import (
    ADMIN_ENDPOINTS,
    ALL_ENDPOINTS,
    GATE_ENDPOINTS,
    READ_ENDPOINTS,
    SUBMITTER_OWN_ENDPOINTS,
    IdentityError,
    IdentityStore,
    parse_creds,
    permissions,
    read_creds,
)
from gigafactory.natsconf import NatsConfError, replace_authorization
from gigafactory.schemas import names

ALLOWED_ENDPOINTS = {
    "admin": set(ALL_ENDPOINTS),
    "coordinator": set(),
    "factory": set(),
    # submit, list and status only on its own subject, naming its products: see the products test
    "submitter": {e for e in READ_ENDPOINTS if e not in SUBMITTER_OWN_ENDPOINTS},
    "reviewer": set(READ_ENDPOINTS),  # the gate only on its own subject: see the gate tests
}
"""The API matrix: which role may call which endpoint (everything else is refused)."""


class Conn:
    """A raw connection as one identity, collecting the errors the server sends it."""

    def __init__(self, nc, errors: list[str], key: str) -> None:
        self.nc, self.errors, self.key = nc, errors, key

    @classmethod
    async def open(cls, url: str, store: IdentityStore, name: str) -> "Conn":
        errors: list[str] = []

        async def on_error(e):
            errors.append(str(e))

        creds = read_creds(store.creds_path(name))
        nc = await nats.connect(url, nkeys_seed_str=creds.seed, error_cb=on_error, allow_reconnect=False,
                                max_reconnect_attempts=1, name=f"matrix-{name}")
        return cls(nc, errors, store.get(name).public_key)

    async def refused_publish(self, subject: str) -> bool:
        """Publish to ``subject``; True once the server answered with a permissions violation
        naming it (bounded wait: the violation is asynchronous, it may follow the PONG)."""
        self.errors.clear()
        await self.nc.publish(subject, b"{}", reply=self.nc.new_inbox())
        await self.nc.flush(timeout=5)
        return await self._violation("publish", subject)

    async def refused_subscribe(self, subject: str) -> bool:
        self.errors.clear()
        sub = await self.nc.subscribe(subject)
        await self.nc.flush(timeout=5)
        try:
            return await self._violation("subscription", subject)
        finally:
            await sub.unsubscribe()

    async def _violation(self, kind: str, subject: str) -> bool:
        want = f'permissions violation for {kind} to "{subject.lower()}"'
        try:
            await eventually(lambda: any(want in e.lower() for e in self.errors), 5, what=want)
            return True
        except AssertionError:
            return False


def server_refused(log_file: str, key: str, kind: str, subject: str) -> bool:
    """The server's own log line for a refusal: ``"$G/nkey:<key>" - Publish Violation - Subject "<s>"``."""
    text = open(log_file, encoding="utf-8", errors="replace").read()
    return re.search(re.escape(f"nkey:{key}") + r'" - ' + kind + r' Violation - Subject "' + re.escape(subject) + '"',
                     text) is not None


def server_logged_refusal(log_file: str, key: str, kind: str, subject: str, within_s: float = 10.0) -> bool:
    """:func:`server_refused`, waiting up to ``within_s`` for the line: the client can see the
    refusal before the server has written its log line (a loaded CI machine showed it)."""
    deadline = time.monotonic() + within_s
    while not server_refused(log_file, key, kind, subject):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def enrol(srv, *entries) -> None:
    for role, name, kw in entries:
        srv.identities.create(role, name, **kw)
    srv.reload(srv.identities.users())


# -- pure -------------------------------------------------------------------------------------------


def test_permissions_of_each_role_name_what_it_may_publish():
    fa = permissions("factory", "fa")
    assert f"$KV.{names.FACTORIES_BUCKET}.fa" in fa["publish"]["allow"]
    assert not any(s.startswith(f"$KV.{names.FACTORIES_BUCKET}") and s != f"$KV.{names.FACTORIES_BUCKET}.fa"
                   for s in fa["publish"]["allow"])
    assert "$JS.API.STREAM.CREATE.>" in fa["publish"]["deny"]
    pooled = permissions("factory", "fa", pools=("p1",))
    assert "$JS.API.CONSUMER.MSG.NEXT.GF_DISPATCH.pool-p1" in pooled["publish"]["allow"]
    assert "$JS.API.CONSUMER.MSG.NEXT.GF_DISPATCH.*" not in pooled["publish"]["allow"]
    assert permissions("admin", "root") == {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    with pytest.raises(IdentityError, match="role 'root'"):
        permissions("root", "x")
    with pytest.raises(IdentityError, match="identity name 'a.b'"):
        permissions("factory", "a.b")


def test_a_credentials_file_never_shows_its_seed_and_a_bad_one_is_named(tmp_path):
    store = IdentityStore(tmp_path / "ids")
    ident, path = store.create("factory", "fa")
    creds = read_creds(path)
    assert (creds.name, creds.role) == ("fa", "factory") and creds.seed.startswith("SU")
    assert creds.seed not in repr(creds)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(IdentityError, match="exists already"):
        store.create("factory", "fa")
    with pytest.raises(IdentityError, match=r"bad\.creds: no nkey seed"):
        parse_creds("# nothing here\n", "bad.creds")
    store.revoke("fa")
    assert not path.exists() and not store.get("fa").active
    assert store.users() == []


def test_replace_authorization_swaps_only_the_users_and_refuses_a_server_without_auth():
    from gigafactory.natsconf import NodeConf, render

    store_users = ({"nkey": "U" + "A" * 55, "permissions": {"publish": {"allow": [">"]}}},)
    text = render(NodeConf(server_name="s", host="127.0.0.1", port=4222, store_dir="/d", users=store_users))
    out = replace_authorization(text, ())
    assert "U" + "A" * 55 not in out and "jetstream {" in out and "authorization {" in out
    with pytest.raises(NatsConfError, match="no authorization block"):
        replace_authorization(render(NodeConf(server_name="s", host="h", port=1, store_dir="/d")), ())


# -- against the server -------------------------------------------------------------------------------


def test_a_connection_without_credentials_is_refused(nats_server):
    async def body():
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=1)
    run(body(), 30)


def test_role_by_endpoint_matrix_every_refusal_comes_from_the_server(nats_server, tmp_path):
    """Each role calls each API endpoint of a running coordinator (itself connected as
    ``coordinator``): allowed calls get the coordinator's answer, refused ones a permissions
    violation from the server, logged by the server with the caller's key."""
    enrol(nats_server, ("submitter", "alice", {"products": ["p1"]}), ("reviewer", "rita", {}),
          ("factory", "fa", {}))
    roles = {"admin": "admin", "coordinator": "coordinator", "factory": "fa", "submitter": "alice",
             "reviewer": "rita"}

    async def body():
        async with Fleet(nats_server.url, tmp_path, server=nats_server):
            for role, name in roles.items():
                c = await Conn.open(nats_server.url, nats_server.identities, name)
                try:
                    for endpoint in ALL_ENDPOINTS:
                        subject = f"{names.API_PREFIX}.{endpoint}"
                        if endpoint not in ALLOWED_ENDPOINTS[role]:
                            assert await c.refused_publish(subject), (role, endpoint, c.errors)
                            assert server_logged_refusal(nats_server.log_file, c.key, "Publish", subject), (role, endpoint)
                        elif endpoint not in ADMIN_ENDPOINTS:  # halt/resume: guard's endpoints
                            c.errors.clear()
                            msg = await c.nc.request(subject, b'{"job": "no-such-job"}', timeout=10)
                            assert msg.data and not c.errors, (role, endpoint, c.errors)  # the coordinator answered
                        else:
                            c.errors.clear()
                            await c.nc.publish(subject, b"{}")
                            await c.nc.request("$JS.API.INFO", b"", timeout=5)
                            assert not server_refused(nats_server.log_file, c.key, "Publish", subject), (role, endpoint)
                finally:
                    await c.nc.close()
    run(body(), 120)


def test_factory_subjects_matrix(nats_server):
    """A factory may write its own descriptor, job records (compare-and-set), events, live logs,
    and pull its pool's dispatch; it may not write another factory's descriptor, touch the
    layout (streams, buckets, consumers on the dispatch stream, pools), call the API or serve it."""
    enrol(nats_server, ("factory", "fa", {}), ("factory", "fb", {}), ("factory", "fp", {"pools": ["p1"]}))

    async def body():
        admin = await Broker.open(nats_server.url, "matrix-admin")
        for pool in ("p1", "p2"):
            await admin.js.add_consumer(names.DISPATCH_STREAM, durable_name=names.pool_consumer(pool),
                                        filter_subject=names.dispatch_subject(pool), ack_policy="explicit")
        rev = await admin.jobs.create("j1", b'{"stage": "queued"}')
        got_logs: list[bytes] = []

        async def on_log(m):
            got_logs.append(m.data)

        logs_sub = await admin.nc.subscribe(names.logs_subject("j1", 1), cb=on_log)
        fa = await Conn.open(nats_server.url, nats_server.identities, "fa")
        fp = await Conn.open(nats_server.url, nats_server.identities, "fp")
        try:
            js = fa.nc.jetstream(timeout=5)
            # Allowed, shown by their effect.
            assert (await js.publish(f"$KV.{names.FACTORIES_BUCKET}.fa", b"{}")).seq
            kv = await js.key_value(names.JOBS_BUCKET)
            assert await kv.update("j1", b'{"stage": "assigned"}', last=rev) > rev
            assert (await js.publish(names.events_subject("j1", "claimed"), b"{}")).seq
            # Its attempts' spend records, and the local forge's pull requests it opens (the
            # bucket made by the layout: a factory writes it, never creates it).
            assert (await js.publish(names.spend_subject("j1", 1), b"{}")).seq
            pulls = await js.key_value(names.PULLS_BUCKET)
            assert await pulls.put("r.next", b"1")
            await fa.nc.publish(names.logs_subject("j1", 1), b"line")
            await fa.nc.flush()
            await eventually(lambda: got_logs == [b"line"], 10, what="the factory's live log line")
            await admin.js.publish(names.dispatch_subject("p1"), b"j1")
            psub = await fp.nc.jetstream(timeout=5).pull_subscribe_bind(
                durable=names.pool_consumer("p1"), stream=names.DISPATCH_STREAM)
            msgs = await psub.fetch(1, timeout=5)
            assert [m.data for m in msgs] == [b"j1"]
            await msgs[0].ack()
            # Refused by the server.
            denied = [
                f"$KV.{names.FACTORIES_BUCKET}.fb",
                f"$KV.{names.POOLS_BUCKET}.p1",
                f"$KV.{names.IDEMPOTENCY_BUCKET}.k",
                "$JS.API.STREAM.CREATE.EVIL",
                f"$JS.API.STREAM.CREATE.KV_{names.JOBS_BUCKET}",
                f"$JS.API.STREAM.CREATE.KV_{names.PULLS_BUCKET}",
                f"$JS.API.STREAM.DELETE.KV_{names.JOBS_BUCKET}",
                f"$JS.API.STREAM.UPDATE.{names.EVENTS_STREAM}",
                f"$JS.API.STREAM.PURGE.{names.EVENTS_STREAM}",
                f"$JS.API.STREAM.MSG.DELETE.{names.EVENTS_STREAM}",
                f"$JS.API.STREAM.DELETE.{names.DISPATCH_STREAM}",
                f"$JS.API.CONSUMER.CREATE.{names.DISPATCH_STREAM}.steal",
                f"$JS.API.CONSUMER.DELETE.{names.DISPATCH_STREAM}.{names.pool_consumer('p1')}",
                *(f"{names.API_PREFIX}.{e}" for e in ALL_ENDPOINTS),
            ]
            for subject in denied:
                assert await fa.refused_publish(subject), (subject, fa.errors)
                assert server_logged_refusal(nats_server.log_file, fa.key, "Publish", subject), subject
            for subject in (f"{names.API_PREFIX}.>", names.logs_subject("j1"), "$SRV.>"):
                assert await fa.refused_subscribe(subject), subject
                assert server_logged_refusal(nats_server.log_file, fa.key, "Subscription", subject), subject
            # An idle pool's stall check listens to the pool's queue index (factory/pools.py).
            assert not await fa.refused_subscribe(f"$KV.{names.QUEUE_BUCKET}.p1.>"), fa.errors
            # A factory enrolled for pool p1 pulls from p1 only.
            nxt = f"$JS.API.CONSUMER.MSG.NEXT.{names.DISPATCH_STREAM}.{names.pool_consumer('p2')}"
            assert await fp.refused_publish(nxt)
            assert server_logged_refusal(nats_server.log_file, fp.key, "Publish", nxt)
        finally:
            await logs_sub.unsubscribe()
            await fa.nc.close()
            await fp.nc.close()
            await admin.close()
    run(body(), 120)


@pytest.mark.parametrize("role", ["submitter", "reviewer"])
def test_people_read_but_never_write_the_broker_directly(nats_server, role):
    enrol(nats_server, (role, "pat", {}))

    async def body():
        admin = await Broker.open(nats_server.url, "matrix-admin")
        await admin.jobs.create("j1", b'{"stage": "queued"}')
        c = await Conn.open(nats_server.url, nats_server.identities, "pat")
        try:
            kv = await c.nc.jetstream(timeout=5).key_value(names.JOBS_BUCKET)
            assert (await kv.get("j1")).value == b'{"stage": "queued"}'  # reads records
            assert not await c.refused_subscribe(names.logs_subject("j1"))  # follows live logs
            for subject in (f"$KV.{names.JOBS_BUCKET}.j1", names.events_subject("j1", "x"),
                            names.logs_subject("j1", 1), "$JS.API.STREAM.CREATE.EVIL",
                            f"$JS.API.STREAM.PURGE.{names.EVENTS_STREAM}", f"$KV.{names.FACTORIES_BUCKET}.x"):
                assert await c.refused_publish(subject), subject
                assert server_logged_refusal(nats_server.log_file, c.key, "Publish", subject), subject
        finally:
            await c.nc.close()
            await admin.close()
    run(body(), 60)


def test_the_coordinator_creates_the_layout_but_calls_no_endpoint(nats_server):
    async def body():
        c = await Conn.open(nats_server.url, nats_server.identities, "coordinator")
        try:
            assert (await c.nc.jetstream(timeout=5).add_stream(name="COORD_OK", subjects=["coord.ok"])).config
            for e in GATE_ENDPOINTS:
                assert await c.refused_publish(f"{names.API_PREFIX}.{e}")
        finally:
            await c.nc.close()
    run(body(), 30)


def test_revoking_a_factory_closes_its_connection_and_refuses_it_from_then_on(nats_server):
    enrol(nats_server, ("factory", "fr", {}))

    async def body():
        creds = read_creds(nats_server.identities.creds_path("fr"))
        closed = asyncio.Event()

        async def on_closed():
            closed.set()

        async def quiet(_e):
            pass

        _nc = await nats.connect(nats_server.url, nkeys_seed_str=creds.seed, closed_cb=on_closed, error_cb=quiet,
                                max_reconnect_attempts=2, reconnect_time_wait=0.1)
        nats_server.identities.revoke("fr")
        nats_server.reload(nats_server.identities.users())
        await asyncio.wait_for(closed.wait(), 20)  # the server dropped it, and its reconnects were refused
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(nats_server.url, nkeys_seed_str=creds.seed, allow_reconnect=False,
                               max_reconnect_attempts=1, error_cb=quiet)
    run(body(), 60)


# -- TLS ----------------------------------------------------------------------------------------------


def _pki(d) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    import subprocess

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
        "-subj", "/CN=gf-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-out", "server.pem", "-extfile", "ext.cnf")
    return {k: str(d / f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


def test_tls_clients_with_the_ca_connect_and_clients_without_it_are_refused(tmp_path):
    from gigafactory.config import Settings
    from gigafactory.embedded import EmbeddedServer
    from gigafactory.natsconf import TlsConf
    from gigafactory.testing import lab_identities

    pki = _pki(tmp_path)
    ids = lab_identities(tmp_path)
    srv = EmbeddedServer(store_dir=str(tmp_path / "store"), users=ids.users(), log_file=str(tmp_path / "nats.log"),
                         tls=TlsConf(cert_file=pki["cert"], key_file=pki["key"])).start()
    admin = str(ids.creds_path("admin"))

    async def body():
        assert srv.url.startswith("tls://")
        b = await Broker.open(srv.url, "tls-admin", Settings(creds=admin, tls_ca=pki["ca"], request_timeout_s=5))
        try:
            assert (await b.jobs.create("j1", b"{}")) > 0
        finally:
            await b.close()

        async def quiet(_e):
            pass

        # Without the CA the client cannot verify the broker: the handshake fails.
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await nats.connect(srv.url, nkeys_seed_str=read_creds(admin).seed, allow_reconnect=False,
                               max_reconnect_attempts=1, error_cb=quiet, connect_timeout=5)
    try:
        run(body(), 60)
    finally:
        srv.stop()


# -- the human gate --------------------------------------------------------------------------------


def test_the_gate_takes_the_actor_from_the_identity_and_only_a_listed_reviewer_ships(nats_server, tmp_path):
    """A reviewer calls ship on its own subject (the server refuses it any other, and the plain
    one); the coordinator takes the actor from that subject, not from the body; a reviewer not
    named by the job's review-policy is refused (403); the audit event carries the identity."""
    from gigafactory.client import ApiError, Client
    from gigafactory.identity import gate_subject

    enrol(nats_server, ("reviewer", "rita", {}), ("reviewer", "mallory", {}))

    async def body():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("echo ok", review_policy={"reviewers": ["@rita"]}))
            await fleet.wait_stage(job, "review", timeout_s=30)
            rita = await Conn.open(nats_server.url, nats_server.identities, "rita")
            mal = await Conn.open(nats_server.url, nats_server.identities, "mallory")
            try:
                # Mallory can neither use the plain subject nor Rita's.
                for subject in (f"{names.API_PREFIX}.ship", gate_subject("ship", "reviewer", "rita")):
                    assert await mal.refused_publish(subject), subject
                    assert server_logged_refusal(nats_server.log_file, mal.key, "Publish", subject), subject
                with pytest.raises(ApiError) as refused:
                    await Client(mal.nc, 10, identity=("reviewer", "mallory")).call(
                        "ship", {"job": job, "actor": "rita"})
                assert refused.value.code == 403 and "mallory is not a reviewer" in refused.value.message
                reply = await Client(rita.nc, 10, identity=("reviewer", "rita")).call(
                    "ship", {"job": job, "actor": "someone-else"})
                assert reply["job"]["stage"] == "shipped"
                rec = await fleet.wait_stage(job, "shipped")
                assert "rita" in rec.reason and "someone-else" not in rec.reason
                shipped = [e for e in await fleet.events(job) if e.get("stage_to") == "shipped"]
                assert shipped and shipped[-1]["data"]["identity"] == "rita"
                assert shipped[-1]["data"]["authenticated"] is True
            finally:
                await rita.nc.close()
                await mal.nc.close()
    run(body(), 120)


def test_gate_actor_rules_pure():
    from gigafactory.coordinator import gate
    from gigafactory.identity import caller_of, gate_subject
    from gigafactory.schemas.manifest import Reviewers

    assert caller_of(gate_subject("ship", "reviewer", "rita")) == ("reviewer", "rita")
    assert caller_of("gf.api.ship") is None and caller_of("gf.api.status.reviewer.rita") is None
    assert gate.actor("x", ("reviewer", "rita")).name == "rita"
    assert gate.actor("alice", ("admin", "admin")) == gate.Actor("alice", "admin", "admin")
    assert gate.actor("bob") == gate.Actor("bob")
    assert gate.actor(None) == gate.Actor("operator")
    token = gate.CALLER.set(("reviewer", "rita"))  # what the API wrapper sets from the subject
    try:
        assert gate.actor("x") == gate.Actor("rita", "rita", "reviewer")
    finally:
        gate.CALLER.reset(token)
    gate.check_ship(Reviewers(reviewers=["@rita"]), gate.Actor("rita", "rita", "reviewer"))
    gate.check_ship(Reviewers(reviewers=["@rita"]), gate.Actor("admin", "admin", "admin"))  # operators: all
    with pytest.raises(gate.GateRefused, match="mallory is not a reviewer"):
        gate.check_ship(Reviewers(reviewers=["@rita"]), gate.Actor("mallory", "mallory", "reviewer"))


# -- signed holder writes ------------------------------------------------------------------------------


def test_a_job_record_written_by_an_identity_not_holding_the_lease_is_quarantined_within_one_reaper_pass(
        nats_server, tmp_path):
    """Factory fb (its own valid credential) rewrites the record of a job factory fa holds: the
    broker allows it (subject permissions cannot narrow gf_jobs to keys), but the write is not
    signed by fa's key, so the coordinator's next reaper pass quarantines that revision with a
    ``poisoned`` event and counts it (gigafactory_forged_writes_total). fa's own signed writes
    (claim, start, renewals) are never flagged."""
    import msgspec

    from gigafactory.identity import holder_signer
    from gigafactory.schemas.records import JobRecord, decode, encode

    async def body():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            await fleet.add_factory("fa")
            await fleet.add_factory("fb")
            job = await fleet.submit_one(fleet.job("sleep 30", timeout="2m"))
            rec = await fleet.wait_stage(job, "building", timeout_s=30)
            sched = fleet.coordinator.sched
            rounds = sched.reap_rounds
            await eventually(lambda: sched.reap_rounds >= rounds + 2, 10, what="two reaper passes")
            assert sched.forged_total == 0 and rec.sig and rec.sig.startswith(
                nats_server.identities.get(rec.lease.factory).public_key)
            other = "fb" if rec.lease.factory == "fa" else "fa"
            c = await Conn.open(nats_server.url, nats_server.identities, other)
            try:
                kv = await c.nc.jetstream(timeout=5).key_value(names.JOBS_BUCKET)
                e = await kv.get(job)
                held = decode(e.value, JobRecord)
                forged = msgspec.structs.replace(held, reason="all good, nothing to see")
                signer = holder_signer(fleet._as(other, fleet.settings))  # signed, but by the wrong key
                rev = await kv.update(job, encode(signer.sign_record(forged)), last=e.revision)
            finally:
                await c.nc.close()
            await eventually(lambda: sched.forged_total == 1, 10, what="the forged write detected")
            # The holder's next renewal may overwrite the forged revision before the pass: then
            # the pass reports it with a forged_write event, else it quarantines it (poisoned).
            events = await eventually(lambda: _forged_events(fleet, job), 10, what="the forged write's event")
            assert "forged holder write" in events[-1]["reason"] and str(rev) in events[-1]["reason"] + str(
                sched.poison.get(job).revision if job in sched.poison else "")
            assert f"not by the lease holder {rec.lease.factory}" in events[-1]["reason"]
    run(body(), 120)


async def _forged_events(fleet, job):
    return [e for e in await fleet.events(job) if e.get("kind") in ("poisoned", "forged_write")]


def test_holder_verdict_pure():
    from gigafactory.identity import new_keypair, sign, verify_holder
    from gigafactory.schemas import signing
    from gigafactory.schemas.records import JobRecord, Lease
    import msgspec

    seed, pub = new_keypair()
    seed2, pub2 = new_keypair()
    base = msgspec.json.decode(msgspec.json.encode({
        "id": "j1", "manifest": {}, "body": "", "source": "t", "content_hash": "h", "submitted_at": 0.0,
        "pool": "p", "requirements": [], "stage": "building", "epoch": 3,
        "lease": {"factory": "fa", "station": 0, "epoch": 3}}), type=JobRecord)
    assert isinstance(base.lease, Lease)
    good = signing.signed(base, pub, lambda d: sign(seed, d))
    assert signing.holder_verdict(good, pub, verify_holder) is None
    assert "unsigned" in signing.holder_verdict(base, pub, verify_holder)
    assert "not by the lease holder fa" in signing.holder_verdict(
        signing.signed(base, pub2, lambda d: sign(seed2, d)), pub, verify_holder)
    tampered = msgspec.structs.replace(good, epoch=4)
    assert "does not match" in signing.holder_verdict(tampered, pub, verify_holder)
    assert signing.holder_verdict(base, None, verify_holder) is None  # holder without identity: nothing to check
    assert signing.holder_verdict(msgspec.structs.replace(base, stage="queued"), pub, verify_holder) is None


def test_auth_settings_refuse_a_key_without_its_certificate_and_missing_files(tmp_path):
    from gigafactory.config import Settings, SettingsError

    with pytest.raises(SettingsError, match=r"tls_key \(GIGAFACTORY_TLS_KEY\) is set without tls_cert"):
        Settings(tls_key=str(tmp_path / "k.pem")).validate()
    with pytest.raises(SettingsError, match=r"creds \(GIGAFACTORY_CREDS\) names .*not a file"):
        Settings(creds=str(tmp_path / "missing.creds")).validate()
    (tmp_path / "ok.creds").write_text("x")
    assert Settings(creds=str(tmp_path / "ok.creds")).validate().creds.endswith("ok.creds")


def test_a_review_quorum_ships_only_when_enough_distinct_listed_reviewers_approved(nats_server, tmp_path):
    """``review-policy: {reviewers: [...], quorum: 2}``: a listed reviewer's ship (on its own gate
    subject) is an approval recorded on the job by identity, the same reviewer twice counts once,
    the job ships on the second distinct reviewer's; an admin ships another such job at once."""
    from gigafactory.client import Client
    from gigafactory.schemas.records import JobRecord, decode

    enrol(nats_server, ("reviewer", "rita", {}), ("reviewer", "sam", {}))

    async def body():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            await fleet.add_factory("f1")
            policy = {"reviewers": ["@rita", "@sam", "@tom"], "quorum": 2}
            job = await fleet.submit_one(fleet.job("echo ok", review_policy=policy))
            other = await fleet.submit_one(fleet.job("echo ok", review_policy=policy), path="other.md")
            await fleet.wait_stage(job, "review", timeout_s=30)
            await fleet.wait_stage(other, "review", timeout_s=30)
            rita = await Conn.open(nats_server.url, nats_server.identities, "rita")
            sam = await Conn.open(nats_server.url, nats_server.identities, "sam")
            try:
                as_rita = Client(rita.nc, 10, identity=("reviewer", "rita"))
                first = await as_rita.call("ship", {"job": job})
                assert first["job"]["stage"] == "review" and first["approved"] == ["rita"] and first["quorum"] == 2
                again = await as_rita.call("ship", {"job": job})
                assert again["job"]["stage"] == "review" and again["approved"] == ["rita"]
                rec = decode((await fleet.admin.jobs.get(job)).value, JobRecord)
                assert [(a.identity, a.epoch) for a in rec.approvals] == [("rita", rec.epoch)]
                approved = [e for e in await fleet.events(job) if e["kind"] == "approved"]
                assert len(approved) == 1 and approved[0]["data"]["identity"] == "rita"
                done = await Client(sam.nc, 10, identity=("reviewer", "sam")).call("ship", {"job": job})
                assert done["job"]["stage"] == "shipped"
                shipped = [e for e in await fleet.events(job) if e.get("stage_to") == "shipped"]
                assert shipped[-1]["data"]["identity"] == "sam"
                # An admin ships at once, without approvals.
                assert (await fleet.client.call("ship", {"job": other}))["job"]["stage"] == "shipped"
            finally:
                await rita.nc.close()
                await sam.nc.close()
    run(body(), 120)


def test_review_quorum_rules_pure():
    from gigafactory.coordinator import gate
    from gigafactory.schemas.manifest import Reviewers
    from gigafactory.schemas.records import Approval

    policy = Reviewers(reviewers=["@a", "b", "@c"], quorum=2)
    a, b, x = (gate.Actor(n, n, "reviewer") for n in ("a", "b", "x"))
    assert gate.quorum(policy, a, [], 3) == gate.Quorum(False, ("a",), True, 2)
    mine = [Approval("a", 3, 0.0)]
    assert gate.quorum(policy, a, mine, 3) == gate.Quorum(False, ("a",), False, 2)  # no double count
    assert gate.quorum(policy, b, mine, 3).ships
    assert not gate.quorum(policy, b, [Approval("a", 2, 0.0)], 3).ships  # another epoch's approval
    assert not gate.quorum(policy, b, [Approval("x", 3, 0.0)], 3).ships  # not a listed reviewer
    assert gate.quorum(policy, gate.Actor("op", "admin", "admin"), [], 3).ships
    assert gate.quorum(Reviewers(reviewers=["a"]), a, [], 1).ships
    with pytest.raises(gate.GateRefused):
        gate.check_ship(policy, x)


@pytest.mark.parametrize("quorum, ok", [(0, False), (1, True), (2, True), (3, False)])
def test_review_quorum_is_validated(quorum, ok):
    from gigafactory.schemas.manifest import ManifestError, parse_job_text

    text = f"---\nengine: shell\ncwd: /tmp\nreview-policy: {{reviewers: ['@a', 'b', '@b'], quorum: {quorum}}}\n---\necho\n"
    if ok:
        assert parse_job_text(text, "j.md").manifest.review_policy.quorum == quorum
    else:
        with pytest.raises(ManifestError, match="review-policy.quorum"):
            parse_job_text(text, "j.md")


def test_a_submitter_submits_lists_and_sees_only_its_products(nats_server, tmp_path):
    """A submitter enrolled with ``--products web`` calls submit/list/status on its own subject,
    which names its products (the server refuses it every other, another submitter's, and its own
    with other products); the coordinator refuses (403, naming the product) a job of another
    product, leaves other products' jobs out of ``list`` and refuses their ``status``."""
    from gigafactory.client import ApiError, Client
    from gigafactory.identity import submitter_subject

    enrol(nats_server, ("submitter", "alice", {"products": ["web"]}), ("submitter", "bob", {}))

    async def body():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            theirs = await fleet.submit_one(fleet.job("echo theirs", product="api"), path="api.md")
            creds = read_creds(nats_server.identities.creds_path("alice"))
            assert creds.products == ("web",)
            alice = await Conn.open(nats_server.url, nats_server.identities, "alice")
            try:
                for subject in (f"{names.API_PREFIX}.submit", f"{names.API_PREFIX}.list", f"{names.API_PREFIX}.status",
                                submitter_subject("submit", "bob"), submitter_subject("submit", "alice"),
                                submitter_subject("list", "alice", ["web", "api"])):
                    assert await alice.refused_publish(subject), subject
                    assert server_logged_refusal(nats_server.log_file, alice.key, "Publish", subject), subject
                client = Client(alice.nc, 10, identity=("submitter", "alice"), products=creds.products)
                mine = (await client.call("submit", {"files": [
                    {"path": "web.md", "text": fleet.job("echo mine", product="web")}]}))["jobs"][0]["job"]
                with pytest.raises(ApiError) as refused:
                    await client.call("submit", {"files": [
                        {"path": "ok.md", "text": fleet.job("echo a", product="web")},
                        {"path": "other.md", "text": fleet.job("echo b", product="api")}]})
                assert refused.value.code == 403 and "other.md: product 'api'" in refused.value.message
                listed = {j["id"] for j in (await client.call("list", {"limit": 100}))["jobs"]}
                assert listed == {mine}, listed  # the refused batch wrote nothing; api's job not shown
                assert {j["id"] for j in (await fleet.client.call("list", {"limit": 100}))["jobs"]} == {mine, theirs}
                assert (await client.call("status", {"job": mine}))["job"]["id"] == mine
                with pytest.raises(ApiError) as hidden:
                    await client.call("status", {"job": theirs})
                assert hidden.value.code == 403 and "'api'" in hidden.value.message
            finally:
                await alice.nc.close()
    run(body(), 120)


def test_products_subject_tokens_pure():
    from gigafactory.identity import parse_products_token, products_token, submitter_of, submitter_subject

    assert products_token([]) == "all" and parse_products_token("all") is None
    tok = products_token(["web", "a.b", "web"])
    assert "." not in tok and parse_products_token(tok) == ("a.b", "web")
    assert submitter_of(submitter_subject("status", "alice", ["web"])) == ("alice", ("web",))
    assert submitter_of(submitter_subject("ship", "alice", ["web"])) is None
    assert submitter_of(f"{names.API_PREFIX}.submit.submitter.alice.pGARBAGE!") is None
    with pytest.raises(IdentityError, match="product"):
        IdentityStore("/nonexistent").create("submitter", "x", products=["no spaces"])


def test_a_submitter_limited_to_products_reads_only_their_logs_and_nothing_around_the_api(nats_server, tmp_path):
    """``--products web``: the stored log of a web job comes through its own ``logs`` subject;
    another product's is refused by the coordinator (403); every direct read of the broker
    (records, events, the object store) is refused by the server; live logs only of its products
    (the product is in the subject)."""
    from gigafactory.client import ApiError, Client

    enrol(nats_server, ("submitter", "alice", {"products": ["web"]}))

    async def body():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            await fleet.add_factory("f1")
            # Longer than one page of the logs API (256 KiB): read in three pages.
            mine = await fleet.submit_one(fleet.job("head -c 600000 /dev/zero | tr '\\0' a; echo; echo web-output-line",
                                                    product="web", review_policy="auto"), path="web.md")
            theirs = await fleet.submit_one(fleet.job("echo api-output-line", product="api", review_policy="auto"),
                                            path="api.md")
            await fleet.wait_stage(mine, "shipped", timeout_s=30)
            await fleet.wait_stage(theirs, "shipped", timeout_s=30)
            creds = read_creds(nats_server.identities.creds_path("alice"))
            alice = await Conn.open(nats_server.url, nats_server.identities, "alice")
            try:
                client = Client(alice.nc, 10, identity=("submitter", "alice"), products=creds.products)
                pages = [p async for p in client.log_pages(mine, 1)]
                log = b"".join(pages)
                assert len(pages) == 3 and b"a" * 600000 in log and b"web-output-line" in log
                rec = await fleet.wait_stage(mine, "shipped", timeout_s=5)
                store = await fleet.admin.js.object_store(names.ARTIFACTS_STORE)
                assert log == (await store.get(rec.attempts[-1].log)).data  # the whole log, in order
                with pytest.raises(ApiError) as refused:
                    [p async for p in client.log_pages(theirs, 1)]
                assert refused.value.code == 403 and "'api'" in refused.value.message
                for subject in (f"$JS.API.STREAM.INFO.KV_{names.JOBS_BUCKET}",
                                f"$JS.API.DIRECT.GET.KV_{names.JOBS_BUCKET}.$KV.{names.JOBS_BUCKET}.{theirs}",
                                f"$JS.API.STREAM.INFO.OBJ_{names.ARTIFACTS_STORE}",
                                f"$JS.API.CONSUMER.CREATE.{names.EVENTS_STREAM}",
                                f"{names.API_PREFIX}.logs"):
                    assert await alice.refused_publish(subject), subject
                    assert server_logged_refusal(nats_server.log_file, alice.key, "Publish", subject), subject
                assert not await alice.refused_subscribe(names.logs_subject("*", product="web"))
                for subject in (names.logs_subject(theirs, product="api"), names.logs_subject("*")):
                    assert await alice.refused_subscribe(subject), subject
                    assert server_logged_refusal(nats_server.log_file, alice.key, "Subscription", subject), subject
                # Its wait still works, through status (the watch on gf_jobs is refused).
                got = await client.wait([mine], timeout_s=10)
                assert got[mine].stage == "shipped"
            finally:
                await alice.nc.close()
    run(body(), 120)


def test_product_tokens_in_log_subjects_are_one_token_and_injective():
    assert names.product_token("web") == "web"
    odd = [names.product_token(p) for p in ("a.b", "a b", "~web", "web*", "ü", "x" * 65)]
    assert all("." not in t and "*" not in t and ">" not in t and " " not in t for t in odd)
    assert len(set(odd + ["web"])) == 7
    assert names.logs_subject("j1", 2, "a.b") == f"{names.LOGS_PREFIX}.{names.product_token('a.b')}.j1.2"
