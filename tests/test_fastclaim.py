"""The claim's round trips (issue 14): a dispatch message carries the record and its revision,
so a factory claims with one compare-and-set and no read; a job with no lock is claimed straight
into ``building`` (one write instead of two); a stale carried revision, a pointer-only message
(an older coordinator) and a job with a lock still go the long way, and still claim."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from helpers import Fleet, eventually, fast_settings, run

from gigafactory.chaos import invariants
from gigafactory.coordinator import intake
from gigafactory.coordinator.intake import ensure_pool
from gigafactory.schemas import names, protocol
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.lifecycle import Event, IllegalTransition, Stage, transition
from gigafactory.schemas.records import DispatchMessage, JobRecord, decode, dispatch_message, encode

DONE = ("testing", "review", "shipped")


async def _stages(fleet: Fleet, job: str) -> list[str]:
    """Every stored revision's stage of ``job``'s record, oldest first."""
    return [str(decode(e.value, JobRecord).stage) for e in await fleet.admin.jobs.kv.history(job)]


# -- pure: the lifecycle shortcut and the message ---------------------------------------------------


def test_the_claim_started_shortcut_is_legal_only_from_queued_and_lands_in_building():
    assert transition(Stage.QUEUED, Event.CLAIM_STARTED) == Stage.BUILDING
    for stage in Stage:
        if stage is not Stage.QUEUED:
            with pytest.raises(IllegalTransition):
                transition(stage, Event.CLAIM_STARTED)


def _queued(job: str = "j1", body: str = "echo ok") -> JobRecord:
    return JobRecord(id=job, manifest=Manifest(cwd="w", engine="shell"), body=body, source="test",
                     content_hash="h", submitted_at=1.0, pool="p1", requirements=["engine:shell"])


def test_a_started_claim_is_the_claim_and_the_start_in_one_record():
    rec = _queued()
    two = protocol.claim(rec, "f1", 0, 5.0)
    started = protocol.start(two.record, "f1", two.record.epoch, 5.0)
    one = protocol.claim(rec, "f1", 0, 5.0, start=True)
    assert one.event is Event.CLAIM_STARTED and one.stage_from is Stage.QUEUED
    assert one.record.stage == started.record.stage == Stage.BUILDING
    # The same lease, epoch, attempt and attempt history as the two writes make.
    assert (one.record.epoch, one.record.attempt, one.record.lease) == \
        (started.record.epoch, started.record.attempt, started.record.lease)
    assert one.record.attempts == started.record.attempts
    # The holder's later writes are fenced exactly as after a start.
    assert protocol.renew(one.record, "f1", one.record.epoch, 6.0).lease.renewals == 1
    with pytest.raises(protocol.Fenced):
        protocol.renew(one.record, "f2", one.record.epoch, 6.0)
    with pytest.raises(protocol.NotClaimable):
        protocol.claim(one.record, "f2", 0, 6.0, start=True)


def test_the_dispatch_message_carries_the_record_only_within_its_size_limit():
    rec = _queued(body="echo " + "x" * 4000)
    size = len(encode(rec))
    msg = decode(encode(dispatch_message(rec, 7, size)), DispatchMessage)
    assert msg.revision == 7 and msg.carried() == rec
    over = decode(encode(dispatch_message(rec, 7, size - 1)), DispatchMessage)
    assert over.revision == 7 and over.carried() is None and not over.record
    off = decode(encode(dispatch_message(rec, 7, 0)), DispatchMessage)
    assert off.carried() is None and off.revision is None
    # A pointer-only message (an older coordinator's) decodes, and carries nothing.
    old = decode(encode(DispatchMessage(job=rec.id, epoch=rec.epoch, pool=rec.pool)), DispatchMessage)
    assert old.carried() is None
    # An older factory reads the new message as a pointer (unknown fields are ignored).

    class OldDispatchMessage(msgspec.Struct):
        job: str
        epoch: int
        pool: str

    assert decode(encode(msg), OldDispatchMessage) == OldDispatchMessage(rec.id, rec.epoch, rec.pool)


def test_a_carried_record_that_does_not_match_its_pointer_or_does_not_decode_is_not_used():
    rec = _queued()
    good = dispatch_message(rec, 3, 1 << 16)
    assert good.carried() == rec
    assert msgspec.structs.replace(good, job="other").carried() is None
    assert msgspec.structs.replace(good, epoch=rec.epoch + 1).carried() is None
    assert msgspec.structs.replace(good, revision=None).carried() is None
    assert msgspec.structs.replace(good, record=msgspec.Raw(b'{"id": 5}')).carried() is None


# -- against a real broker: the factory's claim paths ---------------------------------------------


def _kinds(evs: list[dict], kind: str) -> list[dict]:
    return [e for e in evs if e["kind"] == kind]


async def _audit(fleet: Fleet, job: str, *kinds: str) -> list[dict]:
    """``job``'s events, once every kind in ``kinds`` is among them (the audit queue publishes
    after the write it describes)."""
    async def got():
        evs = await fleet.events(job)
        return evs if all(_kinds(evs, k) for k in kinds) else None

    return await eventually(got, 15, what=f"events {kinds} of {job}")


@pytest.mark.timeout(90)
def test_a_job_offered_with_its_record_is_claimed_into_building_with_one_write_and_no_read(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("echo ok", review_policy="auto"))
            rec = await fleet.wait_stage(job, *DONE, timeout_s=30)
            assert rec.attempt == 1 and rec.attempts[-1].factory == "f1"
            # The claim used the record the dispatch message carried: one CAS, no read.
            assert (f.stats["claims"], f.stats["claims_unread"], f.stats["claim_reads"],
                    f.stats["claim_rereads"], f.stats["claim_conflicts"]) == (1, 1, 0, 0, 0), dict(f.stats)
            # That one write took the job from queued to building: no assigned revision between.
            stages = await _stages(fleet, job)
            assert "assigned" not in stages, stages
            first_building = stages.index("building")
            assert stages[first_building - 1] == "queued", stages
            # One write, one event: the claim says it started the run, and no `started` follows
            # (each job's events are published in order, so once `finished` is on GF_EVENTS a
            # `started` before it would be there too).
            evs = await _audit(fleet, job, "claimed", "finished")
            [claimed], [finished] = _kinds(evs, "claimed"), _kinds(evs, "finished")
            assert (claimed["stage_from"], claimed["stage_to"], claimed["data"].get("started")) == \
                ("queued", "building", True)
            assert _kinds(evs, "started") == [], [e["kind"] for e in evs]
            assert evs.index(claimed) < evs.index(finished)
            # The invariant checker reads that claim as the run's start.
            jobs, events = await invariants.collect(fleet.admin)
            report = invariants.check(jobs, events, submitted={job}, allow_in_flight=True)
            assert report.ok, report.to_text()
            assert (report.counts["claims"], report.counts["started"], report.counts["finished"]) == (1, 1, 1)

    run(main(), 90)


@pytest.mark.timeout(90)
def test_a_job_with_a_lock_still_goes_through_assigned(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job("echo ok", review_policy="auto", lock="db"))
            await fleet.wait_stage(job, *DONE, timeout_s=30)
            stages = await _stages(fleet, job)
            i = stages.index("assigned")
            assert stages[i - 1:i + 2] == ["queued", "assigned", "building"], stages
            assert f.stats["claims"] == 1 and f.stats["claim_reads"] == 0  # the carried record still served
            evs = await _audit(fleet, job, "claimed", "started")
            [claimed], [started] = _kinds(evs, "claimed"), _kinds(evs, "started")
            assert (claimed["stage_from"], claimed["stage_to"]) == ("queued", "assigned")
            assert "started" not in claimed["data"]
            assert (started["stage_from"], started["stage_to"]) == ("assigned", "building")

    run(main(), 90)


@pytest.mark.timeout(90)
def test_a_stale_carried_revision_falls_back_to_a_read_and_still_claims(nats_server, tmp_path):
    """A dispatch message whose record changed since it was offered loses its CAS; the factory
    reads the record and claims what is there. A pointer-only message (an older coordinator's)
    is read and claimed as before."""
    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings()) as fleet:
            f = await fleet.add_factory("f1", stations=2)
            # No coordinator from here on: only the messages this test publishes offer the jobs.
            await fleet.stop("<coordinator>")
            res = await intake.submit(fleet.admin, [("a.md", fleet.job("echo a")), ("b.md", fleet.job("echo b"))])
            stale_job, pointer_job = res[0].job, res[1].job
            offered, offered_rev = await fleet.record(stale_job)
            # The record moves on after the offer was made (as a coordinator's hold note would).
            moved = msgspec.structs.replace(offered, superseded=1)  # a field the claim keeps as it finds it
            await fleet.admin.jobs.update(stale_job, encode(moved), last=offered_rev)
            assert await ensure_pool(fleet.admin, offered.pool, offered.requirements)
            await eventually(lambda: offered.pool in f.pools, 15, what="the factory bound the pool")
            subject = names.dispatch_subject(offered.pool)
            await fleet.admin.js.publish(subject, encode(dispatch_message(offered, offered_rev, 1 << 16)))
            await eventually(lambda: f.stats["claims"] >= 2, 15, what="the stale offer claimed after a read")
            rec, _ = await fleet.record(stale_job)
            assert [(a.factory, a.epoch) for a in rec.attempts] == [("f1", 1)]
            assert rec.stage in (Stage.BUILDING, Stage.TESTING, Stage.REVIEW, Stage.SHIPPED)
            assert rec.superseded == 1  # claimed on the record as read, not as offered
            assert (f.stats["claims_unread"], f.stats["claim_conflicts"], f.stats["claim_rereads"],
                    f.stats["claim_reads"]) == (1, 1, 1, 1), dict(f.stats)

            pointer, _ = await fleet.record(pointer_job)
            await fleet.admin.js.publish(subject, encode(DispatchMessage(job=pointer_job, epoch=pointer.epoch,
                                                                         pool=pointer.pool)))
            await eventually(lambda: f.stats["claims"] >= 3, 15, what="the pointer-only offer claimed")
            rec, _ = await fleet.record(pointer_job)
            assert [(a.factory, a.epoch) for a in rec.attempts] == [("f1", 1)]
            assert (f.stats["claims_unread"], f.stats["claim_reads"]) == (1, 2), dict(f.stats)

    run(main(), 90)


# -- the spend outbox off the event loop ----------------------------------------------------------


def test_published_spend_records_are_removed_together_and_only_those(tmp_path):
    from gigafactory.factory.outbox import Outbox

    box = Outbox(str(tmp_path / "o"))
    ids = [box.put("spend", "j", 1, f"r{i}".encode()) for i in range(5)]
    box.mark_done_many([ids[0], ids[2], ids[4], 10_000])  # an unknown id is ignored
    assert [i.payload for i in box.pending(10)] == [b"r1", b"r3"]
    box.mark_done_many([])
    assert box.count() == 2
    with pytest.raises(ValueError, match="at most"):
        box.mark_done_many(list(range(10_001)))
    box.close()


def test_the_spend_outbox_removes_published_records_without_an_fsync_and_keeps_every_put_durable(
        nats_server, tmp_path):
    """The removal of published spend records was an fsync of its own (most of a removal's
    cost); a removal a power loss undoes only publishes records again under their ids, which
    count once. The writer removes them with ``synchronous = NORMAL``, and every other commit
    (each record's put) stays ``FULL``. SQLite's own trace says which setting each ran under."""
    from gigafactory.broker import Broker
    from gigafactory.factory.spend import SpendWriter
    from gigafactory.schemas.spend import SpendRecord

    async def main():
        b = await Broker.open(nats_server.url, "t", fast_settings())
        try:
            await b.ensure_layout()
            w = SpendWriter(b, tmp_path, "f1", 1, b.settings, [], {})
            assert w.outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2, "opened FULL"
            statements: list[str] = []
            w.outbox._db.set_trace_callback(statements.append)
            rec = SpendRecord(id="j.1.1", kind="final", at=1.0, lane="f1/0", lane_kind="live", funding_window="w",
                              product="p", engine="shell", provider="local", job="j", epoch=1, seq=1,
                              cost_source="local")
            w._write(rec, 0.0)
            assert await asyncio.wait_for(w.publish_pending(), 10) and w.outbox.count() == 0
            w.outbox._db.set_trace_callback(None)
            assert w.outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2, "FULL again"
            w.outbox.close()
        finally:
            await b.close()
        return statements

    statements = [s.strip() for s in run(main()) if not s.startswith("SELECT")]
    put = next(i for i, s in enumerate(statements) if s.startswith("INSERT"))
    delete = next(i for i, s in enumerate(statements) if s.startswith("DELETE"))

    def setting_at(i):
        pragmas = [s for s in statements[:i] if s.startswith("PRAGMA synchronous")]
        return pragmas[-1] if pragmas else None
    assert setting_at(put) is None, "the put ran FULL, as the outbox was opened"
    assert setting_at(delete) == "PRAGMA synchronous = NORMAL", statements
    assert statements[-1] == "PRAGMA synchronous = FULL", "restored after the removal"
    # The default stays durable (the results outbox's removals).
    from gigafactory.factory.outbox import Outbox

    box = Outbox(str(tmp_path / "o"))
    seen: list[str] = []
    box._db.set_trace_callback(seen.append)
    box.mark_done_many([box.put("event", "j", 1, b"x")])
    assert not any("synchronous" in s for s in seen) and box.count() == 0
    box.close()


def test_an_attempts_final_spend_record_is_durable_when_written_and_committed_off_the_event_loop(tmp_path):
    """``final`` returns once the record is committed (another process opening the folder sees
    it), and the commit (an fsync) ran on a worker thread: the event loop, which serves every
    other run of the process, never waited for the disk."""
    import threading

    from gigafactory.factory.holder import Run
    from gigafactory.factory.outbox import Outbox
    from gigafactory.factory.spend import SpendWriter
    from gigafactory.schemas.records import Usage

    rec = protocol.claim(_queued("j-final"), "s-1", 0, 2.0, start=True).record
    w = SpendWriter(None, tmp_path / "s-1", "s-1", 1, fast_settings(), [], {})
    threads: list[int] = []
    put = w.outbox.put

    def seen_put(*args):
        threads.append(threading.get_ident())
        return put(*args)

    w.outbox.put = seen_put

    async def main():
        a = w.begin(Run("j-final", rec.epoch, 0, 1, rec), "shell")
        await w.final(a, Usage(cost_usd=0.25, cost_source="reported"), "passed")
        await w.final(a, None, "passed")  # once per attempt
        return threading.get_ident()

    loop_thread = run(main())
    assert len(threads) == 1 and threads[0] != loop_thread
    other = Outbox(str(tmp_path / "s-1" / "spend-outbox"))
    try:
        [item] = other.pending(10)
        assert item.kind == "spend" and item.job == "j-final" and b'"final"' in item.payload
    finally:
        other.close()
        w.outbox.close()


# -- audit events: one round trip per window, each job's events in order -----------------------------


def _ev(job: str | None, kind: str, factory: str = "f1"):
    from gigafactory.schemas.records import EventRecord

    return (EventRecord(kind=kind, at=0.0, job=job, factory=factory), (f"{job}-{kind}", ""))


def test_an_event_window_holds_at_most_one_event_per_job_and_keeps_the_queue_order():
    from gigafactory.factory.audit import event_window

    q = [_ev("a", "claimed"), _ev("b", "claimed"), _ev(None, "station"), _ev("a", "started"), _ev("c", "claimed")]
    assert [(e.job, e.kind) for e, _ in event_window(q, 16)] == [("a", "claimed"), ("b", "claimed"), (None, "station")]
    assert [(e.job, e.kind) for e, _ in event_window(q, 2)] == [("a", "claimed"), ("b", "claimed")]
    assert [(e.job, e.kind) for e, _ in event_window(q[3:], 16)] == [("a", "started"), ("c", "claimed")]
    # Two fleet events of one factory are ordered too; of two factories, not.
    fleet = [_ev(None, "up", "f1"), _ev(None, "up", "f2"), _ev(None, "down", "f1")]
    assert len(event_window(fleet, 16)) == 2
    assert event_window([], 16) == []
    assert len(event_window(q, 1)) == 1


class _Audit:
    """A factory's audit queue on its own (the :class:`AuditQueue` mixin with the state it uses),
    against a real broker."""

    def __init__(self, broker, factory_id: str) -> None:
        import collections

        from gigafactory.factory.redact import Redactor

        self.broker, self.id = broker, factory_id
        self.redactor = Redactor.build({})
        self.stats = collections.Counter()
        self._events = collections.deque()
        self._events_waiting = asyncio.Event()


@pytest.mark.timeout(60)
def test_queued_events_of_several_jobs_go_out_together_and_each_jobs_stay_in_order(nats_server):
    """Events of four jobs queued at once are stored in windows of several jobs (not one round
    trip per event), every event once, each job's in the order it was queued."""
    from gigafactory.broker import Broker
    from gigafactory.coordinator.api import read_events
    from gigafactory.factory.audit import AuditQueue

    class Audit(_Audit, AuditQueue):
        pass

    async def main():
        b = await Broker.open(nats_server.url, "audit-test", fast_settings())
        try:
            q = Audit(b, "f-audit")
            jobs = [f"audit-job-{i}" for i in range(4)]
            for kind in ("claimed", "started", "finished"):
                for job in jobs:
                    await q._event(kind, job=job, epoch=1)
            await q._event("factory_up")
            assert len(q._events) == 13
            assert await q._publish_events(None)
            assert not q._events and q.stats["events_published"] == 13
            # Four jobs (and the fleet event) at once: four windows, not thirteen round trips.
            assert q.stats["events_window_max"] == 5
            for job in jobs:
                kinds = [e["kind"] for e in await read_events(b, job)]
                assert kinds == ["claimed", "started", "finished"], (job, kinds)
        finally:
            await b.close()

    run(main(), 60)


def test_a_holder_signer_derives_its_key_once_and_its_signatures_verify():
    from gigafactory.identity import HolderSigner, new_keypair, verify_holder
    from gigafactory.schemas import signing

    seed, public = new_keypair()
    signer = HolderSigner(public, seed)
    a = signer.sign_record(_queued("j-a"))
    key = signer._key
    b = signer.sign_record(protocol.claim(_queued("j-b"), "f1", 0, 2.0, start=True).record)
    assert key is not None and signer._key is key  # derived at the first signature, kept
    assert a.sig and b.sig and a.sig != b.sig
    assert signing.holder_verdict(b, public, verify_holder) is None
    forged = msgspec.structs.replace(b, body="rm -rf /")
    assert signing.holder_verdict(forged, public, verify_holder) is not None
    assert HolderSigner().sign_record(_queued()) == _queued()  # no identity: unsigned


def test_event_message_ids_are_unique_without_random_draws_per_event():
    from gigafactory.factory import audit

    async def main():
        q = _Audit(None, "f-ids")
        q.__class__ = type("A", (_Audit, audit.AuditQueue), {})
        for i in range(1000):
            await q._event("x", job=f"j{i % 7}")
        return [msg_id for _ev, (msg_id, _t) in q._events]

    ids = run(main())
    assert len(set(ids)) == 1000 and all(i.startswith(f"f-ids-{audit._EVENT_NONCE}-") for i in ids)


def test_an_attempts_fence_socket_folder_is_made_and_removed_off_the_event_loop(tmp_path, monkeypatch):
    import os
    import threading

    from gigafactory.factory import fence_socket

    seen: dict[str, int] = {}
    make = fence_socket.socket_folder
    monkeypatch.setattr(fence_socket, "socket_folder",
                        lambda base: seen.setdefault("make", threading.get_ident()) and make(base))
    remove = fence_socket._remove_folder
    monkeypatch.setattr(fence_socket, "_remove_folder",
                        lambda p, d: seen.setdefault("remove", threading.get_ident()) and remove(p, d))

    async def renew(_want_s):
        return {"outcome": "held", "reason": "test"}

    async def main():
        sock = await fence_socket.serve(renew, job="j", epoch=1, factory="f", renew_timeout_s=1.0,
                                        base=str(tmp_path))
        assert os.path.exists(sock.path)
        await sock.close()
        assert not os.path.exists(sock.folder)
        return threading.get_ident()

    loop_thread = run(main())
    assert set(seen) == {"make", "remove"} and loop_thread not in seen.values()
    # Something else left in the folder (an engine wrote there): the whole folder still goes.
    folder = tmp_path / "gf-fence-x"
    folder.mkdir()
    (folder / "fence.sock").write_text("")
    (folder / "left-behind").write_text("x")
    remove(str(folder / "fence.sock"), str(folder))
    assert not folder.exists()


@pytest.mark.timeout(90)
def test_a_small_log_is_handed_to_the_store_as_bytes_and_stored_redacted_byte_for_byte(nats_server, tmp_path):
    """A log under ``LOG_INLINE_MAX_BYTES`` is read at once (no worker thread per chunk); what
    is stored is what a chunked upload stores: the whole log, with the factory's redaction."""
    from gigafactory.factory.reporting import LOG_INLINE_MAX_BYTES

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            given: list[object] = []
            real_put = f.broker.artifacts.put

            async def observed_put(name, data, meta=None):
                given.append(data)
                return await real_put(name, data, meta=meta)

            f.broker.artifacts.put = observed_put  # observes what the factory hands the real store
            job = await fleet.submit_one(fleet.job("seq 1 2000"))
            rec = await fleet.wait_stage(job, *DONE, timeout_s=30)
            stored = (await fleet.admin.artifacts.get(rec.attempts[-1].log)).data
            local = next((tmp_path / "factories").rglob(f"{job}-attempt-1-epoch-1.log")).read_bytes()
            assert 8_000 < len(local) <= LOG_INLINE_MAX_BYTES and stored == local
            assert len(given) == 1 and isinstance(given[0], bytes), given
            assert f.stats["log_uploads_inline"] == 1

    run(main(), 90)


@pytest.mark.timeout(90)
def test_a_carried_record_of_a_halted_product_is_refused_as_a_read_one_is(nats_server, tmp_path):
    """The kill switch holds for the shortcut too: a dispatch message already out for a halted
    job, carrying its record, is not claimed (the factory checks the carried record as it
    checks one it reads)."""
    from gigafactory.schemas import halt as H

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("f1")
            await fleet.client.call("halt", {"product": "web", "mode": "drain"})
            job = await fleet.submit_one(fleet.job("echo ran > ran.txt", review_policy="auto", product="web"))
            await eventually(lambda: H.covering(f.halt_state, "web") is not None, 10, what="the factory read the halt")
            rec, rev = await fleet.record(job)
            assert await ensure_pool(fleet.admin, rec.pool, rec.requirements)
            skipped = f.stats["claim_skipped"]
            await fleet.admin.js.publish(names.dispatch_subject(rec.pool), encode(dispatch_message(rec, rev, 1 << 16)))
            await eventually(lambda: f.stats["claim_skipped"] > skipped, 15, what="the factory looked at the offer")
            rec, _ = await fleet.record(job)
            assert str(rec.stage) == "queued" and not rec.attempts, (rec.stage, rec.attempts)
            assert f.stats["claims"] == 0 and f.stats["claim_reads"] == 0
            assert not (fleet.repo / "ran.txt").exists()

    run(main(), 90)


def test_the_carried_record_limit_is_bounded_and_named_when_refused():
    from gigafactory.config import Settings, SettingsError

    assert Settings().dispatch_record_max_bytes == 64 * 1024
    assert Settings.from_env({"GIGAFACTORY_DISPATCH_RECORD_MAX_BYTES": "0"}).dispatch_record_max_bytes == 0
    for bad in ("999999999", "-1"):
        with pytest.raises(SettingsError, match="dispatch_record_max_bytes"):
            Settings.from_env({"GIGAFACTORY_DISPATCH_RECORD_MAX_BYTES": bad})


@pytest.mark.timeout(90)
def test_only_an_attempt_that_starts_a_process_gets_a_fence_socket(nats_server, tmp_path, monkeypatch):
    """The fence socket is how a job's process asks for a renewal; the noop engine starts no
    process, so its attempts skip the socket (a folder, a listener and their clean-up were a
    tenth of a saturated factory's CPU). A shell job still gets one and sees it in its
    environment."""
    from gigafactory.factory import fence_socket

    served: list[str] = []
    real = fence_socket.serve

    async def counting(*a, **kw):
        served.append(kw["job"])
        return await real(*a, **kw)

    monkeypatch.setattr(fence_socket, "serve", counting)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1", caps=["engine:noop"])
            noop = await fleet.submit_one(fleet.job("noop", engine="noop", review_policy="auto"), "noop.md")
            assert (await fleet.wait_stage(noop, *DONE, timeout_s=30)).stage == "shipped"
            shell = await fleet.submit_one(fleet.job('test -S "$GF_FENCE_SOCKET"', review_policy="auto"), "sh.md")
            assert (await fleet.wait_stage(shell, *DONE, timeout_s=30)).stage == "shipped", \
                "the shell job found its fence socket"
            assert served == [shell], served

    run(main(), 90)
