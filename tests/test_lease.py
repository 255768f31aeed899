"""The holder's fenced write (factory/lease.py) as a plain state machine: every edge case is a
unit test over pure values, no broker and no clock (the drivers are tested by test_crash_fencing,
test_outbox and test_sim)."""

from __future__ import annotations

import pytest

from gigafactory.factory import lease
from gigafactory.schemas import protocol
from gigafactory.schemas.lifecycle import IllegalTransition, Stage
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.records import JobRecord, decode, encode

FACTORY = "f1"


def claimed(epoch_bumps: int = 1) -> JobRecord:
    rec = JobRecord(id="j1", manifest=Manifest(cwd="w", engine="shell"), body="true\n", source="t.md",
                    content_hash="h", submitted_at=0.0, pool="p", requirements=["engine:shell"])
    for _ in range(epoch_bumps - 1):
        rec = protocol.claim(rec, "other", 0, 0.0).record
        rec = protocol.expire(rec, 0.0, 100.0, 15.0).record
    return protocol.claim(rec, FACTORY, 0, 1.0).record


def start(rec: JobRecord) -> protocol.Outcome:
    return protocol.start(rec, FACTORY, rec.epoch, 2.0)


def machine(rec: JobRecord, decide=None, **kw) -> lease.FencedWrite:
    return lease.FencedWrite(rec, 5, decide or (lambda r: protocol.start(r, FACTORY, rec.epoch, 2.0)), **kw)


def test_a_write_that_is_stored_is_done_with_the_new_record_and_revision():
    rec = claimed()
    m = machine(rec)

    send = m.start()
    assert isinstance(send, lease.Send) and send.last == 5 and send.attempt == 0
    assert decode(send.data, JobRecord).stage == Stage.BUILDING
    done = m.stored(6)

    assert isinstance(done, lease.Done) and done.revision == 6 and not done.learned
    assert done.record.stage == Stage.BUILDING and done.outcome is not None and done.outcome.record == done.record
    assert m.state is lease.WriteState.OVER


def test_a_conflict_reads_and_decides_again_on_the_fresh_record_at_once():
    rec = claimed()
    renewed = protocol.renew(rec, FACTORY, rec.epoch, 1.5)  # a racing write of our own lease
    m = machine(rec)

    m.start()
    assert isinstance(m.conflict(), lease.Read)
    again = m.read(encode(renewed), 7)

    assert isinstance(again, lease.Send) and again.last == 7 and again.attempt == 1  # no back-off
    assert decode(again.data, JobRecord).stage == Stage.BUILDING


def test_a_conflict_with_a_newer_epoch_is_fenced_and_says_the_write_noticed_it():
    rec = claimed()
    reclaimed = protocol.claim(protocol.expire(rec, 0.0, 100.0, 15.0).record, "f2", 0, 3.0).record
    m = machine(rec)

    m.start()
    m.conflict()
    out = m.read(encode(reclaimed), 9)

    assert out == lease.Fenced(reclaimed, noticed=True)


def test_a_lost_reply_whose_write_landed_is_learned_from_the_read():
    rec = claimed()
    m = machine(rec)

    send = m.start()
    assert isinstance(m.no_answer(), lease.Read)
    out = m.read(send.data, 6)  # the record is what we wrote: it landed

    assert isinstance(out, lease.Done) and out.learned and out.revision == 6 and out.attempt == 0
    assert out.record == decode(send.data, JobRecord)


def test_a_lost_reply_whose_write_did_not_land_backs_off_then_retries_on_what_was_read():
    rec = claimed()
    m = machine(rec, jitter=lambda: 0.5)

    m.start()
    m.no_answer()
    back = m.read(encode(rec), 5)  # the record is still the old one: the write did not land (yet)

    assert back == lease.BackOff(0.75 * lease.WRITE_BACKOFF_BASE_S)
    again = m.backed_off()
    assert isinstance(again, lease.Send) and again.last == 5 and again.attempt == 1


def test_a_write_from_an_earlier_unanswered_try_that_lands_later_is_learned_too():
    rec = claimed()
    m = machine(rec, jitter=lambda: 0.0)

    first = m.start()
    m.no_answer()
    m.read(encode(rec), 5)  # overtook the write
    m.backed_off()
    m.conflict()  # the first write landed meanwhile, so the retry at revision 5 conflicts
    out = m.read(first.data, 6)

    assert isinstance(out, lease.Done) and out.learned and out.attempt == 0 and out.revision == 6


def test_back_off_doubles_per_try_and_is_capped():
    rec = claimed()
    m = machine(rec, jitter=lambda: 0.999999, max_tries=20)
    delays = []

    act = m.start()
    for _ in range(8):
        assert isinstance(act, lease.Send)
        m.no_answer()
        back = m.read(encode(rec), 5)  # never landed
        delays.append(back.delay_s)
        act = m.backed_off()

    assert delays[1] == pytest.approx(2 * delays[0], rel=1e-3)
    assert max(delays) <= lease.WRITE_BACKOFF_MAX_S
    assert delays[-1] == pytest.approx(lease.WRITE_BACKOFF_MAX_S, rel=1e-3)


def test_a_record_that_is_gone_fences_the_run():
    m = machine(claimed())

    m.start()
    m.conflict()

    assert m.read(None) == lease.Fenced(None, noticed=True)


def test_a_decision_that_raises_fenced_ends_the_write_without_sending():
    rec = claimed()
    m = machine(rec, decide=lambda r: protocol.start(r, FACTORY, rec.epoch + 1, 2.0))

    assert m.start() == lease.Fenced(rec, noticed=True)
    assert m.state is lease.WriteState.OVER


def test_a_run_stopped_by_another_path_is_fenced_without_deciding_and_without_noticing():
    decided = []
    stop = [False]
    m = machine(claimed(), decide=lambda r: decided.append(r) or start(r), stopped=lambda: stop[0])

    m.start()
    m.conflict()
    stop[0] = True  # a hand-back or a self-fence stopped the run while the read was out
    out = m.read(encode(claimed()), 6)

    assert isinstance(out, lease.Fenced) and not out.noticed
    assert len(decided) == 1


def test_retries_exhausted_give_up_after_max_tries_decisions():
    rec = claimed()
    m = machine(rec, max_tries=3)
    sends = []

    act = m.start()
    while isinstance(act, lease.Send):
        sends.append(act)
        m.conflict()
        act = m.read(encode(protocol.renew(rec, FACTORY, rec.epoch, 1.0 + len(sends))), 10 + len(sends))

    assert act == lease.GiveUp("conflicts")
    assert [s.attempt for s in sends] == [0, 1, 2]


def test_retries_are_exhausted_after_a_back_off_too():
    rec = claimed()
    m = machine(rec, max_tries=1, jitter=lambda: 0.0)

    m.start()
    m.no_answer()
    assert isinstance(m.read(encode(rec), 5), lease.BackOff)  # production sleeps, then gives up

    assert m.backed_off() == lease.GiveUp("conflicts")


def test_a_read_that_gets_no_answer_either_gives_up():
    m = machine(claimed())

    m.start()
    m.no_answer()

    assert m.read_unanswered() == lease.GiveUp("unanswered")


def test_nothing_to_write_is_done_with_the_record_held_and_no_revision():
    rec = claimed()
    m = machine(rec, decide=lambda r: None)

    assert m.start() == lease.Done(rec, None, None, None)


def test_a_plain_record_decision_has_no_outcome():
    rec = claimed()
    m = machine(rec, decide=lambda r: protocol.renew(r, FACTORY, rec.epoch, 3.0))

    m.start()
    done = m.stored(6)

    assert isinstance(done, lease.Done) and done.outcome is None and done.record.lease is not None


def test_an_illegal_transition_propagates():
    rec = claimed()
    m = machine(rec, decide=lambda r: protocol.ship(r, 1.0, "op"))

    with pytest.raises(IllegalTransition):
        m.start()


def test_events_out_of_order_are_a_driver_bug_named_with_the_state():
    m = machine(claimed())

    with pytest.raises(lease.LeaseProtocolError, match="stored fed in state idle"):
        m.stored(3)
    m.start()
    m.stored(6)
    with pytest.raises(lease.LeaseProtocolError, match="read fed in state over"):
        m.read(None)


# --- Factory._write drives the machine against a real broker ------------------------------------------


def _write_on_broker(url: str, tmp_path, race) -> tuple:
    """Claim a job as "f1", let ``race(b, job_id, claimed, revision)`` write behind the factory's
    back, then start the run through ``Factory._write``; returns what it returned, the run and
    the stored record."""
    import asyncio
    import time

    from gigafactory.broker import Broker
    from gigafactory.config import Settings
    from gigafactory.factory.agent import Factory, Run

    async def main():
        settings = Settings(request_timeout_s=2.0)
        b = await Broker.open(url, "lease-driver", settings)
        try:
            f = Factory(b, factory_id=FACTORY, probe=False, data_dir=str(tmp_path), settings=settings)
            queued = JobRecord(id="j1", manifest=Manifest(cwd="w", engine="shell"), body="true\n", source="t.md",
                               content_hash="h", submitted_at=time.time(), pool="p", requirements=["engine:shell"])
            await b.jobs.create("j1", encode(queued))
            claim = protocol.claim(queued, FACTORY, 0, time.time()).record
            rev = await b.jobs.update("j1", encode(claim), last=1)
            await race(b, claim, rev)
            run = Run("j1", claim.epoch, 0, rev, claim)
            got = await f._write(run, lambda r: protocol.start(r, FACTORY, run.epoch, time.time()))
            f.outbox.close()
            e = await b.jobs.get("j1")
            return got, run, None if e is None else decode(e.value, JobRecord)
        finally:
            await b.close()

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_the_factory_retries_a_conflict_with_its_own_lease_and_stores_the_start(nats_server, tmp_path):
    async def renew_behind(b, claim, rev):  # e.g. its own renewal that raced the start
        await b.jobs.update("j1", encode(protocol.renew(claim, FACTORY, claim.epoch, 5.0)), last=rev)

    got, run, stored = _write_on_broker(nats_server.url, tmp_path, renew_behind)

    assert got is not None and got.stage == Stage.BUILDING and got.lease.renewals == 1
    assert stored == got == run.record and not run.fenced


def test_the_factory_is_fenced_when_its_lease_was_taken_meanwhile(nats_server, tmp_path):
    async def reclaim(b, claim, rev):
        again = protocol.claim(protocol.expire(claim, 0.0, 1e12, 15.0).record, "f2", 0, 9.0).record
        await b.jobs.update("j1", encode(again), last=rev)

    got, run, stored = _write_on_broker(nats_server.url, tmp_path, reclaim)

    assert got is None and run.fenced and run.cancel.is_set()
    assert stored.lease.factory == "f2" and stored.stage == Stage.ASSIGNED


def test_the_factory_is_fenced_when_its_record_is_gone(nats_server, tmp_path):
    async def delete(b, claim, rev):
        await b.jobs.delete("j1")

    got, run, stored = _write_on_broker(nats_server.url, tmp_path, delete)

    assert got is None and run.fenced and stored is None
