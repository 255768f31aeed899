"""One bad record must not stall everyone (coordinator/scheduler.py ``reap``, ``resolve_deps``,
``dispatch``, ``_hold``; coordinator/view.py ``apply_job``).

Against a real broker, bad records sit in ``gf_jobs`` next to good jobs: a value that is not
JSON, records too large for their next write. The good jobs are reaped, unblocked and
dispatched; each bad record is quarantined once (its exact bytes kept in ``gf_artifacts``,
a ``poisoned`` event, listed by the coordinator's ``stats``), left as it is in ``gf_jobs``,
and not tried again every pass. An event whose publish fails is kept and published later.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import msgspec
import pytest
from helpers import Fleet, eventually, gigafactory_cmd, run

from gigafactory.broker import poison_object_name
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas import names
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import AttemptRecord, JobRecord, Lease, decode, encode

pytestmark = pytest.mark.timeout(120)

GARBAGE = b"\xff\xfe this is not a job record {"


def record(job_id: str, stage: Stage, *, cwd: str = "/tmp", deps: tuple[str, ...] = (), lease: bool = False,
           body: str = "echo ok\n", reason: str = "") -> JobRecord:
    parsed = parse_job_text(f"---\nengine: shell\ncwd: {cwd}\n---\necho ok\n", "jobs/t.md")
    reqs = list(parsed.manifest.requirements())
    rec = JobRecord(id=job_id, manifest=parsed.manifest, body=body, source="test", content_hash=parsed.content_hash,
                    submitted_at=time.time(), pool=caps.pool_id(reqs), requirements=reqs, deps=list(deps),
                    stage=stage, reason=reason)
    if lease:
        rec.epoch, rec.attempt = 1, 1
        rec.lease = Lease(factory="gone-factory", station=0, epoch=1)
        rec.attempts = [AttemptRecord(attempt=1, epoch=1, factory="gone-factory", station=0, started_at=time.time())]
    return rec


def sized(rec: JobRecord, size_bytes: int) -> bytes:
    """``rec`` encoded at exactly ``size_bytes``, its body padded."""
    base = len(encode(msgspec.structs.replace(rec, body="")))
    out = encode(msgspec.structs.replace(rec, body="x" * (size_bytes - base)))
    assert len(out) == size_bytes
    return out


async def poisoned_events(fleet: Fleet, job: str) -> list[dict]:
    return [e for e in await fleet.events(job) if e["kind"] == "poisoned"]


async def object_bytes(fleet: Fleet, name: str) -> bytes:
    return (await fleet.admin.artifacts.get(name)).data


def test_bad_records_are_quarantined_and_the_reaper_and_deps_go_on(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            coord = fleet.coordinator
            jobs = fleet.admin.jobs
            max_bytes = fleet.admin.nc.max_payload
            await jobs.put("dep-ok", encode(record("dep-ok", Stage.SHIPPED)))
            # Bad ones first: written before the good ones, they come first in the stream.
            await jobs.put("junk-1", GARBAGE)
            # Fits the broker, but no write of it (the reaper's, the unblock) fits any more.
            big_leased = sized(record("big-leased", Stage.BUILDING, lease=True), max_bytes - 100)
            big_blocked = sized(record("big-blocked", Stage.BLOCKED, deps=("dep-ok",)), max_bytes - 10)
            revs = {"junk-1": (await jobs.get("junk-1")).revision,
                    "big-leased": await jobs.put("big-leased", big_leased),
                    "big-blocked": await jobs.put("big-blocked", big_blocked)}
            leased = [f"lease-{i}" for i in range(6)]
            blocked = [f"blocked-{i}" for i in range(6)]
            for j in leased:
                await jobs.put(j, encode(record(j, Stage.BUILDING, lease=True)))
            for j in blocked:
                await jobs.put(j, encode(record(j, Stage.BLOCKED, deps=("dep-ok",))))

            async def moved():
                stages = {j: (await fleet.record(j))[0].stage for j in leased + blocked}
                return all(s == Stage.QUEUED for s in stages.values()) or None

            await eventually(moved, 20, what="every good leased job reaped and every good blocked job unblocked")
            for j in leased:
                rec, _ = await fleet.record(j)
                assert rec.epoch == 2 and rec.attempts[-1].outcome == "lease_expired", rec

            async def stats():
                return await fleet.client.call("stats")

            async def all_poisoned():
                st = await stats()
                got = {p["job"]: p for p in st["poisoned"] if p["stored"]}
                return got if set(got) == set(revs) else None

            got = await eventually(all_poisoned, 20, what="the three bad records quarantined and stored")
            assert {k: p["found_by"] for k, p in got.items()} == {"junk-1": "view", "big-leased": "reap",
                                                                  "big-blocked": "deps"}
            assert "not a job record" in got["junk-1"]["reason"]
            assert "maximum message size" in got["big-leased"]["reason"], got["big-leased"]
            assert "maximum message size" in got["big-blocked"]["reason"], got["big-blocked"]
            st = await stats()
            assert st["unreadable_records"] == 1 and st["poisoned_now"] == 3
            assert st["job_errors"] == {"reap": 1, "deps": 1}, st["job_errors"]
            # Their exact bytes are kept, and the records are left as they were.
            for key, raw in (("junk-1", GARBAGE), ("big-leased", big_leased), ("big-blocked", big_blocked)):
                name = poison_object_name(names.JOBS_BUCKET, key, revs[key])
                assert got[key]["object"] == name and got[key]["revision"] == revs[key]
                assert await object_bytes(fleet, name) == raw
                info = await fleet.admin.artifacts.get_info(name)
                assert info.headers["Gf-Key"] == [key] and info.headers["Gf-Revision"] == [str(revs[key])], \
                    "header values are lists, as Go clients (the nats CLI) read them"
                assert got[key]["reason"] in info.description
                e = await jobs.get(key)
                assert e.revision == revs[key] and e.value == raw, f"{key} was rewritten"
                evs = await eventually(lambda k=key: poisoned_events(fleet, k), 10, what=f"poisoned event of {key}")
                assert len(evs) == 1 and evs[0]["data"]["object"] == name and evs[0]["data"]["revision"] == revs[key]
            assert "big-leased" not in coord.view.by_stage[Stage.QUEUED]
            # `gigafactory status` says so, for a record it can read and for one it cannot.
            status = await fleet.client.call("status", {"job": "big-leased", "events": 0})
            assert status["why"].startswith("quarantined: ") and status["info"]["quarantined_as"] == got["big-leased"]["object"]
            with pytest.raises(Exception, match="not a job record.*quarantined.*nats kv del gf_jobs junk-1"):
                await fleet.client.call("status", {"job": "junk-1"})

            # Not a hot loop: more passes do not try them again.
            mark = coord.sched.reap_rounds
            await eventually(lambda: coord.sched.reap_rounds >= mark + 3, 10, what="three more reaper passes")
            after = await stats()
            assert after["job_errors"] == {"reap": 1, "deps": 1} and after["poisoned_total"] == 3, after

            # An operator fixes one: its new revision is judged afresh (and reaped, being expired).
            await jobs.put("big-leased", encode(record("big-leased", Stage.BUILDING, lease=True)))
            rec = await fleet.wait_stage("big-leased", "queued", timeout_s=20)
            assert rec.epoch == 2
            await eventually(lambda: "big-leased" not in coord.sched.poison, 10, what="the fixed record released")

    run(main(), 110)


def test_dispatch_offers_the_good_jobs_and_quarantines_one_no_factory_can_claim(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            jobs = fleet.admin.jobs
            max_bytes = fleet.admin.nc.max_payload
            big = sized(record("big-queued", Stage.QUEUED, cwd=str(fleet.repo)), max_bytes - 100)
            big_rev = await jobs.put("big-queued", big)
            await jobs.put("junk-q", GARBAGE)
            await fleet.add_factory("f1", stations=2)
            good = [j["job"] for j in await fleet.submit(*[fleet.job(f"echo good {i}") for i in range(4)])]
            for j in good:
                rec = await fleet.wait_stage(j, "testing", "shipped", timeout_s=30)
                assert rec.attempts[-1].outcome == "passed"

            async def quarantined():
                st = await fleet.client.call("stats")
                got = {p["job"]: p for p in st["poisoned"] if p["stored"]}
                return got if {"big-queued", "junk-q"} <= set(got) else None

            got = await eventually(quarantined, 20, what="the unclaimable record and the garbage quarantined")
            assert got["big-queued"]["found_by"] == "dispatch" and "no factory could ever claim it" in got["big-queued"]["reason"]
            assert got["junk-q"]["found_by"] == "view"
            e = await jobs.get("big-queued")
            assert e.revision == big_rev and decode(e.value, JobRecord).epoch == 0, "never offered, never claimed"
            assert fleet.factories["f1"].stats["claims"] == len(good)
            assert not [k for k in await fleet.admin.queue.keys() if k.endswith("big-queued")], \
                "no queue-index entry for the polling fallback to try forever"
            assert len(await poisoned_events(fleet, "big-queued")) == 1
            # The operator's view of it: `gigafactory stats`.
            out = await asyncio.to_thread(subprocess.run, [*gigafactory_cmd(), "stats", "--nats", nats_server.url],
                                          capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "quarantined records: 2 now" in out.stdout, out.stdout
            line = next(ln for ln in out.stdout.splitlines() if "big-queued" in ln)
            assert "found by dispatch" in line and poison_object_name(names.JOBS_BUCKET, "big-queued", big_rev) in line

    run(main(), 110)


def test_a_failed_event_publish_neither_stops_the_reaper_nor_loses_the_event(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            coord = fleet.coordinator
            await fleet.admin.js.delete_stream(names.EVENTS_STREAM)  # every event publish fails now
            leased = [f"lease-{i}" for i in range(5)]
            for j in leased:
                await fleet.admin.jobs.put(j, encode(record(j, Stage.BUILDING, lease=True)))

            async def reaped():
                stages = [(await fleet.record(j))[0].stage for j in leased]
                return all(s == Stage.QUEUED for s in stages) or None

            await eventually(reaped, 20, what="every expired lease reaped while events cannot be published")
            st = await fleet.client.call("stats")
            assert st["events_failed"] >= len(leased) and st["events_waiting"] >= len(leased), st
            assert st["events_dropped"] == 0
            await fleet.admin.ensure_layout()  # the audit stream is back
            await eventually(lambda: not coord.sched._event_retry, 20, what="the kept events published")
            for j in leased:
                kinds = [e["kind"] for e in await fleet.events(j)]
                assert "requeue" in kinds or "dead_letter" in kinds or "fail" in kinds, (j, kinds)
            assert (await fleet.client.call("stats"))["events_dropped"] == 0

    run(main(), 110)


def test_only_errors_that_are_the_records_own_fault_quarantine_it():
    import nats.errors
    import nats.js.errors

    from gigafactory.coordinator.scheduler import RecordTooLarge, poison_reason
    from gigafactory.schemas.lifecycle import Event, IllegalTransition

    assert "maximum message size" in poison_reason(RecordTooLarge("j", 2_000_000, 1_048_576))
    assert poison_reason(nats.errors.MaxPayloadError()) is not None
    assert poison_reason(nats.js.errors.APIError(err_code=10054, description="message size exceeds maximum allowed"))
    try:
        decode(GARBAGE, JobRecord)
    except msgspec.DecodeError as e:
        assert poison_reason(e).startswith("not a valid job record")
    assert poison_reason(IllegalTransition(Stage.SHIPPED, Event.REQUEUE, "j")) is not None
    # Not the record's fault: a full disk or a broker that does not answer would otherwise
    # quarantine every job that needed a write.
    assert poison_reason(nats.js.errors.APIError(err_code=10047, description="insufficient resources")) is None
    assert poison_reason(nats.errors.TimeoutError()) is None
    assert poison_reason(RuntimeError("a bug elsewhere")) is None


def test_the_view_leaves_out_a_bad_revision_and_takes_the_next_good_one():
    from gigafactory.coordinator.view import FleetView

    view = FleetView()
    good = encode(record("j1", Stage.QUEUED))
    view.apply_job("j1", good, 1, 10.0)
    assert "j1" in view.by_stage[Stage.QUEUED] and view.jobs["j1"].size_bytes == len(good)
    # A later revision that does not decode: the old record must not linger as if current.
    view.apply_job("j1", GARBAGE, 2, 11.0)
    assert "j1" not in view.jobs and "j1" not in view.by_stage[Stage.QUEUED]
    assert view.poison["j1"].revision == 2 and "not a job record" in view.poison["j1"].reason
    # A record stored under another job's key would make every write go to the wrong key.
    view.apply_job("j2", good, 3, 12.0)
    assert "j2" not in view.jobs and "is not its key" in view.poison["j2"].reason
    view.apply_job("j1", good, 4, 13.0)
    assert view.jobs["j1"].revision == 4 and "j1" not in view.poison


def test_a_record_a_consumer_of_the_view_refuses_is_left_out_not_fatal():
    from gigafactory.coordinator.view import FleetView

    view = FleetView()

    def picky(old, new):
        if new is not None and new.record.id == "bad":
            raise TypeError("cannot order it")

    view.job_listeners.append(picky)
    view.apply_job("bad", encode(record("bad", Stage.QUEUED)), 1, 10.0)
    view.apply_job("ok", encode(record("ok", Stage.QUEUED)), 2, 10.0)
    assert "bad" not in view.jobs and "refused by the coordinator" in view.poison["bad"].reason
    assert "ok" in view.jobs
