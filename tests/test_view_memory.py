"""The coordinator's memory per record: a finished job's record is not held decoded by the
view (it is held packed, a few hundred bytes instead of a tree of Python objects), and every
path that needs a finished job still works: status, list, requeue, the ship of a review job,
the dependencies of a job on a shipped one. Pure view tests, then a real broker and fleet."""

from __future__ import annotations

import gc

from helpers import Fleet, eventually, fast_settings, run

from gigafactory.coordinator.view import FleetView, JobState
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import JobRecord, encode


def _record(jid: str, stage: Stage, deps: tuple[str, ...] = (), **manifest) -> JobRecord:
    front = "".join(f"{k}: {v}\n" for k, v in {"engine": "shell", "cwd": "repo", **manifest}.items())
    jf = parse_job_text(f"---\n{front}---\necho ok\n", f"{jid}.md")
    return JobRecord(id=jid, manifest=jf.manifest, body=jf.body, source="t", content_hash=jf.content_hash,
                     submitted_at=10.0, pool="p", requirements=[], deps=list(deps), stage=stage)


def _holds_a_record(st: JobState) -> bool:
    """Whether ``st`` references a decoded job record (what the view must not keep for a finished job)."""
    return any(isinstance(o, JobRecord) for o in gc.get_referents(st))


# -- pure: the view -------------------------------------------------------------------------------


def test_a_finished_jobs_record_is_held_packed_and_decodes_to_the_same_record():
    view = FleetView()
    told: list[tuple] = []
    view.job_listeners.append(lambda old, new: told.append((old, new and new.record.stage)))
    shipped = _record("a", Stage.SHIPPED, product="web")
    view.apply_job("a", encode(shipped), 3, 100.0)
    st = view.jobs["a"]
    assert st.packed and not _holds_a_record(st)
    assert st.record == shipped  # decoded from its packed form, field for field
    assert st.record is not st.record  # decoded on each read, never kept
    assert (st.stage, st.product, st.submitted_at, st.revision, st.ts) == (Stage.SHIPPED, "web", 10.0, 3, 100.0)
    assert told == [(None, Stage.SHIPPED)]  # listeners are told with the decoded record
    assert view.by_stage[Stage.SHIPPED] == {"a"}


def test_a_live_job_is_held_decoded_and_a_requeued_finished_job_is_decoded_again():
    view = FleetView()
    view.apply_job("dep", encode(_record("dep", Stage.FAILED)), 1, 1.0)
    view.apply_job("b", encode(_record("b", Stage.BLOCKED, deps=("dep",))), 1, 1.0)
    assert view.jobs["dep"].packed and not view.jobs["b"].packed and _holds_a_record(view.jobs["b"])
    assert view.jobs["b"].deps == ("dep",) and view.dependents == {"dep": {"b"}}
    # A requeue of the failed job: live again, held decoded; its old packed state leaves every index.
    view.apply_job("dep", encode(_record("dep", Stage.QUEUED)), 2, 2.0)
    st = view.jobs["dep"]
    assert not st.packed and _holds_a_record(st) and st.revision == 2
    assert view.by_stage[Stage.FAILED] == set() and view.by_stage[Stage.QUEUED] == {"dep"}
    # A finished job with deps: the dependents map follows it out when it is deleted (archived).
    view.apply_job("b", encode(_record("b", Stage.SHIPPED, deps=("dep",))), 2, 3.0)
    assert view.jobs["b"].packed and view.dependents == {"dep": {"b"}}
    view.apply_job("b", None, 3, 4.0)
    assert "b" not in view.jobs and view.dependents == {}


# -- a real broker: every path that needs a finished job ------------------------------------------


def test_every_path_that_needs_a_finished_job_reads_it_while_the_view_holds_it_packed(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings()) as fleet:
            coord = fleet.coordinator
            assert coord is not None
            view = coord.view
            await fleet.add_factory("f1", stations=2)
            done = await fleet.submit_one(fleet.job("echo done", review_policy="auto"), "done.md")
            await fleet.wait_stage(done, "shipped")
            await eventually(lambda: (st := view.jobs.get(done)) is not None and st.stage == Stage.SHIPPED,
                             what="the view sees the job shipped")
            st = view.jobs[done]
            assert st.packed and not _holds_a_record(st)

            status = await fleet.client.call("status", {"job": done})
            assert status["job"]["stage"] == "shipped" and status["record"]["id"] == done
            listed = await fleet.client.call("list", {"stage": "shipped", "limit": 10})
            assert [j["id"] for j in listed["jobs"]] == [done] and listed["counts"]["shipped"] == 1
            assert listed["jobs"][0]["stage"] == "shipped"

            # A job submitted on a shipped dependency runs (the scheduler reads its stage).
            child = await fleet.submit_one(fleet.job("echo child", deps=[done], review_policy="auto"), "child.md")
            await fleet.wait_stage(child, "shipped")

            # A job waiting for a human's ship (review policy manual): the ship finds it, and once
            # shipped the view holds it packed too.
            reviewed = await fleet.submit_one(fleet.job("echo reviewed", review_policy="manual"), "reviewed.md")
            await fleet.wait_stage(reviewed, "testing")
            assert (await fleet.client.call("ship", {"job": reviewed}))["job"]["stage"] == "shipped"
            await eventually(lambda: (s := view.jobs.get(reviewed)) is not None and s.packed,
                             what="the shipped review job held packed")

            # A requeue of a finished (cancelled) job: live again, held decoded at the new revision.
            cancelled = await fleet.submit_one(fleet.job("echo never", capabilities=["nobody-has-this"]), "c.md")
            await fleet.client.call("cancel", {"job": cancelled, "reason": "test"})
            await fleet.wait_stage(cancelled, "failed")
            await eventually(lambda: (s := view.jobs.get(cancelled)) is not None and s.packed,
                             what="the cancelled job held packed")
            failed = view.jobs[cancelled]
            assert (await fleet.client.call("requeue", {"job": cancelled}))["job"]["stage"] == "queued"
            await eventually(lambda: view.jobs[cancelled].revision > failed.revision, what="the view sees the requeue")
            assert view.jobs[cancelled].stage == Stage.QUEUED and not view.jobs[cancelled].packed
            assert view.jobs[cancelled].record.epoch > failed.record.epoch
            stats = await fleet.client.call("stats", {})
            assert stats["jobs"] == len(view.jobs) == 4

    run(main(), 90)


def test_a_restart_writes_only_the_ended_jobs_without_rows_in_bounded_chunks_decoding_only_those(tmp_path, monkeypatch):
    """The replay after a restart passes every finished job to the runs recorder again: those
    with rows already are skipped before their packed records are decoded, and the rest are
    written WRITE_CHUNK_JOBS at a time (a restart with 100,000 finished jobs built every row
    at once)."""
    from gigafactory.coordinator import view as view_mod
    from gigafactory.economics import runs as runs_mod

    settings = fast_settings(runs_db=str(tmp_path / "runs.sqlite"))
    n = runs_mod.WRITE_CHUNK_JOBS * 2 + 5
    values = [(f"j{i:05d}", encode(_record(f"j{i:05d}", Stage.SHIPPED))) for i in range(n)]

    def replay(values) -> tuple[FleetView, runs_mod.RunsRecorder, list[int]]:
        view = FleetView()
        rec = runs_mod.RunsRecorder(None, view, settings)  # no broker: the ledger falls back to the records
        view.job_listeners.append(rec.on_job)
        for i, (k, v) in enumerate(values):
            view.apply_job(k, v, i + 1, 1.0)
        sizes: list[int] = []
        real_db = runs_mod.RunsDB(settings.runs_db)
        real_write = real_db.write
        rec.db = real_db
        monkeypatch.setattr(real_db, "write", lambda runs, outcomes: (sizes.append(len(outcomes)),
                                                                      real_write(runs, outcomes))[1])
        return view, rec, sizes

    _view, first, sizes = replay(values)
    run(first.flush(), 30)
    assert sizes == [runs_mod.WRITE_CHUNK_JOBS, runs_mod.WRITE_CHUNK_JOBS, 5]
    assert {o["job"] for o in runs_mod.RunsDB(settings.runs_db).outcomes()} == {k for k, _ in values}

    # The restart: the same jobs replayed, and one that ended while no coordinator ran.
    decoded: list[bytes] = []
    real_unpack = view_mod.RecordPacker.unpack
    monkeypatch.setattr(view_mod.RecordPacker, "unpack", lambda self, b: (decoded.append(b), real_unpack(self, b))[1])
    late = ("late", encode(_record("late", Stage.FAILED)))
    _view, second, sizes = replay(values + [late])
    decoded.clear()
    run(second.flush(), 30)
    assert sizes == [1] and len(decoded) == 1  # only the late job's record was decoded and written
    assert len(runs_mod.RunsDB(settings.runs_db).outcomes()) == n + 1


def test_a_replay_defers_packing_until_it_is_done_and_every_record_reads_the_same_meanwhile():
    """While a watch replays gf_jobs, finished records are held as stored (the view is ready
    sooner); once the replay is done they are packed in the background, slice by slice."""
    from gigafactory.coordinator import view as view_mod

    async def main():
        view = FleetView()
        view.defer_packing = True
        recs = {f"j{i}": _record(f"j{i}", Stage.SHIPPED) for i in range(view_mod.PACK_SLICE + 3)}
        for i, (k, r) in enumerate(recs.items()):
            view.apply_job(k, encode(r), i + 1, 1.0)
        view.apply_job("live", encode(_record("live", Stage.QUEUED)), 1, 1.0)
        st = view.jobs["j0"]
        assert st.packed and not _holds_a_record(st) and st._packed is None  # held as stored, not yet packed
        assert st.record == recs["j0"]
        view.replay_done()
        assert not view.defer_packing
        await view._packing
        assert all(s._raw is None and s._packed is not None for k, s in view.jobs.items() if k != "live")
        assert all(view.jobs[k].record == r for k, r in recs.items())
        assert not view.jobs["live"].packed
        # After the replay, a finished record is packed as it arrives.
        view.apply_job("late", encode(_record("late", Stage.FAILED)), 1, 2.0)
        assert view.jobs["late"]._packed is not None and view.jobs["late"]._raw is None

    run(main(), 30)
