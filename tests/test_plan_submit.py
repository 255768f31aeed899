"""Intake's planner (coordinator/plan_submit.py), sans-I/O: a batch of job files and what the
broker holds in, the job ids, actions, refusals, records and write order out.

Pure values only: what the broker "holds" here is a dict handed to the planner as the reads
intake would make. ``test_intake.py`` and ``test_inbox.py`` run the same planner through
``intake.submit`` over a real broker (concurrent submitters, retried batches).
"""

from __future__ import annotations

import msgspec
import pytest
from helpers import job_text

from gigafactory.coordinator import plan_submit as ps
from gigafactory.schemas import capabilities as caps
from gigafactory.schemas.lifecycle import Stage
from gigafactory.schemas.limits import Limits
from gigafactory.schemas.manifest import parse_job_text
from gigafactory.schemas.records import JobRecord

T0 = 1_000.0
LIM = Limits()
BIG = 1 << 20
"""A broker max payload no test record comes near."""


def jf(path: str, script: str = "echo ok", **manifest):
    manifest.setdefault("cwd", "x")
    return parse_job_text(job_text(script, **manifest), path, LIM)


def stored(f, job_id: str, stage: Stage = Stage.QUEUED, deps=()) -> JobRecord:
    reqs = list(f.manifest.requirements())
    return JobRecord(id=job_id, manifest=f.manifest, body=f.body, source=f"api:{f.path}",
                     content_hash=f.content_hash, submitted_at=T0, pool=caps.pool_id(reqs), requirements=reqs,
                     deps=list(deps), stage=stage)


def fresh_ids():
    n = iter(range(10**6))
    return lambda hint: f"{hint}-{next(n)}"


def planner(files, identities=None):
    return ps.SubmitPlanner(files, identities, source="api", lim=LIM, new_id=fresh_ids())


def assign(p, held: dict[str, JobRecord] | None = None):
    """Feed ``p`` the reads of its keys and identities from ``held`` (job id -> record)."""
    held = held or {}
    key_found = {}
    for k in p.keys:
        jid = ps.key_job_id(k)
        key_found[k] = (jid, held.get(jid), 3 if jid in held else 0)
    ident_found = {i: ((held[j], 5, T0) if j in held else None) for i, j in p.ident_ids.items()}
    p.assign(key_found, ident_found)


def resolve(p, held: dict[str, JobRecord] | None = None):
    held = held or {}
    out = {}
    for dep in p.deps_to_resolve():
        jid = ps.key_job_id(dep)
        if jid in held:
            out[dep] = (jid, held[jid])
        elif dep in held:
            out[dep] = (dep, held[dep])
        elif dep in p.batch_ids:
            out[dep] = (dep, None)
        else:
            out[dep] = None
    p.link(out)


def full(files, held=None, identities=None):
    p = planner(files, identities)
    assign(p, held)
    resolve(p, held)
    graph, _follow = p.cycle_graph()
    p.check_cycles(graph)
    return p, p.build(T0 + 1, BIG)


# -- the request ---------------------------------------------------------------------------------


def test_an_empty_batch_and_a_batch_over_the_limit_are_refused_naming_the_setting():
    with pytest.raises(ps.SubmitError, match="no job files given"):
        ps.parse_batch([], None, LIM)
    with pytest.raises(ps.SubmitError, match="max_batch_files") as ei:
        ps.parse_batch([("a.md", job_text())] * 3, None, Limits(max_batch_files=2))
    assert ei.value.errors[0]["file"] == "<batch>"


def test_every_invalid_file_of_a_batch_is_named_and_identities_must_match_the_files():
    files = [("a.md", job_text(cwd="x")), ("b.md", "no front matter"), ("c.md", "---\nengine: 7\n---\nx\n")]
    with pytest.raises(ps.SubmitError) as ei:
        ps.parse_batch(files, None, LIM)
    assert [e["file"] for e in ei.value.errors] == ["b.md", "c.md"]
    with pytest.raises(ValueError, match="identities"):
        ps.parse_batch(files[:1], [None, None], LIM)


def test_one_key_used_twice_in_a_batch_with_other_content_is_refused_naming_both_files():
    p = planner([jf("a.md", "echo 1", idempotency_key="k"), jf("b.md", "echo 2", idempotency_key="k")])

    assert p.keys == ["k"]
    assert len(p.errors) == 1 and p.errors[0]["file"] == "b.md" and "a.md" in p.errors[0]["message"]
    assert planner([jf("a.md", idempotency_key="k"), jf("b.md", idempotency_key="k")]).errors == []


# -- ids and actions -----------------------------------------------------------------------------


def test_a_new_key_creates_the_job_at_the_id_derived_from_the_key_and_its_twin_in_the_batch_is_existing():
    p, plan = full([jf("a.md", idempotency_key="k"), jf("b.md", idempotency_key="k"), jf("dir/c.md")])

    assert [(x.job_id, x.action) for x in plan.plans] == [
        (ps.key_job_id("k"), "create"), (ps.key_job_id("k"), "existing"), ("c-0", "create")]
    results = {id(plan.plans[0]): ps.SubmitResult("a.md", ps.key_job_id("k"), "created", "queued")}
    out = ps.answers(plan, results)
    assert [(r.file, r.status, r.stage) for r in out[:2]] == [("a.md", "created", "queued"), ("b.md", "existing", "queued")], \
        "the twin answers with the stage its first file was written at"


def test_a_stored_key_with_the_same_content_is_existing_and_its_record_is_replayed():
    f = jf("a.md", idempotency_key="k")
    rec = stored(f, ps.key_job_id("k"))

    p, plan = full([f], held={rec.id: rec})

    assert plan.plans[0].action == "existing" and plan.waves == [] and plan.found == [rec]
    assert ps.answers(plan, {})[0] == ps.SubmitResult("a.md", rec.id, "existing", "queued")


def test_a_stored_key_with_other_content_is_superseded_while_waiting_and_refused_once_claimed():
    old = stored(jf("a.md", "echo v1", idempotency_key="k"), ps.key_job_id("k"))
    new = jf("a.md", "echo v2", idempotency_key="k")

    _p, plan = full([new], held={old.id: old})
    assert plan.plans[0].action == "supersede" and plan.plans[0].prior_rev == 3

    building = msgspec.structs.replace(old, stage=Stage.BUILDING)
    p, _plan = full([new], held={old.id: building})
    assert p.errors and p.errors[0]["field"] == "idempotency-key"
    assert "gigafactory requeue" in p.errors[0]["message"]


def test_a_key_whose_derived_id_holds_another_keys_job_is_refused():
    other = stored(jf("o.md", idempotency_key="other"), ps.key_job_id("k"))

    p, _plan = full([jf("a.md", idempotency_key="k")], held={other.id: other})

    assert "held by a job with another key" in p.errors[0]["message"]


def test_an_identified_file_found_with_its_content_is_existing_and_with_other_content_a_collision():
    f = jf("drop/a.md")
    jid = ps.identity_ids([f], ["ident-1"])["ident-1"]

    _p, plan = full([f], held={jid: stored(f, jid)}, identities=["ident-1"])
    assert plan.plans[0].action == "existing" and plan.plans[0].job_id == jid

    p, _plan = full([f], held={jid: stored(jf("drop/a.md", "echo other"), jid)}, identities=["ident-1"])
    assert "id collision" in p.errors[0]["message"]

    _p, plan = full([f], identities=["ident-1"])
    assert plan.plans[0].action == "create" and plan.plans[0].job_id == jid, "a retry finds the same id"


# -- dependencies and cycles --------------------------------------------------------------------


def test_deps_resolve_to_batch_keys_and_stored_jobs_and_decide_blocked_or_queued():
    shipped = stored(jf("s.md"), "shipped-1", Stage.SHIPPED)
    waiting = stored(jf("w.md"), "waiting-1", Stage.QUEUED)
    files = [jf("a.md", idempotency_key="base"), jf("b.md", deps=["base", "shipped-1"]),
             jf("c.md", deps=["shipped-1"]), jf("d.md", deps=["waiting-1"])]

    p, plan = full(files, held={shipped.id: shipped, waiting.id: waiting})

    assert p.errors == []
    a, b, c, d = plan.plans
    assert b.deps == [a.job_id, "shipped-1"] and b.record.stage == Stage.BLOCKED
    assert b.record.reason == f"waiting for {a.job_id}", "an in-batch dependency is never met yet"
    assert c.record.stage == Stage.QUEUED and c.record.reason == "waiting for a factory"
    assert d.record.stage == Stage.BLOCKED and d.waiting == ["waiting-1"]
    assert [[x.jf.path for x in w] for w in plan.waves] == [["a.md", "c.md", "d.md"], ["b.md"]]


def test_an_unknown_dependency_and_a_job_depending_on_itself_are_refused_naming_the_entry():
    p, _plan = full([jf("a.md", deps=["nobody"]), jf("b.md", idempotency_key="me", deps=["me"])])

    assert [(e["file"], e["field"]) for e in p.errors] == [("a.md", "deps[0]"), ("b.md", "deps[0]")]
    assert "is this job itself" in p.errors[1]["message"]


def test_a_cycle_through_the_batch_is_refused_naming_it_by_keys():
    files = [jf("a.md", idempotency_key="a", deps=["b"]), jf("b.md", idempotency_key="b", deps=["a"]),
             jf("c.md", deps=["a"])]

    p, plan = full(files)

    assert [e["file"] for e in p.errors] == ["a.md", "b.md"], "c.md depends on the cycle but is not on it"
    assert p.errors[0]["message"].endswith("a -> b -> a") and plan.waves == []


def test_only_a_superseding_batch_follows_stored_jobs_for_cycles():
    old = stored(jf("a.md", "echo v1", idempotency_key="k"), ps.key_job_id("k"))
    p = planner([jf("a.md", "echo v2", idempotency_key="k")])
    assign(p, {old.id: old})
    resolve(p)
    assert p.cycle_graph() == ({old.id: []}, True)

    q = planner([jf("b.md")])
    assign(q)
    resolve(q)
    assert q.cycle_graph()[1] is False


def test_cycle_search_and_write_waves_are_iterative_on_a_chain_of_ten_thousand():
    chain = {f"j{i}": [f"j{i + 1}"] for i in range(10_000)}
    assert ps.strongly_connected(chain) == {}
    chain["j10000"] = ["j0"]
    assert len(ps.strongly_connected(chain)) == 10_001
    assert ps.path_back("j0", {"j0": ["j1"], "j1": ["j0"]}, frozenset({"j0", "j1"})) == ["j0", "j1", "j0"]


# -- records -------------------------------------------------------------------------------------


def test_a_record_that_would_not_leave_the_headroom_is_refused_naming_the_setting():
    p = planner([jf("a.md", "x" * 5000)])
    assign(p)
    resolve(p)
    p.build(T0, 5000 + LIM.record_headroom_bytes)

    assert len(p.errors) == 1 and "record_headroom_bytes" in p.errors[0]["message"]


def test_the_plan_names_each_pool_its_writes_go_to_once():
    files = [jf("a.md"), jf("b.md"), jf("g.md", capabilities=["has:gpu"])]

    _p, plan = full(files)

    want = [caps.pool_id(list(f.manifest.requirements())) for f in (files[0], files[2])]
    assert [name for name, _reqs in plan.pools] == want and want[0] != want[1]


def test_a_superseding_record_bumps_the_epoch_and_keeps_the_job_id():
    old = stored(jf("a.md", "echo v1", idempotency_key="k"), ps.key_job_id("k"))
    plan = ps.JobPlan(jf("b.md", "echo v2", idempotency_key="k"), old.id, "supersede", prior=old)

    new = ps.superseding_record(old, plan, T0 + 5, "inbox", LIM)

    assert (new.id, new.epoch, new.superseded) == (old.id, old.epoch + 1, 1)
    assert new.body.strip() == "echo v2" and new.source == "inbox:b.md" and new.stage == Stage.QUEUED
    plan.waiting = ["dep-1"]
    assert ps.superseding_record(old, plan, T0 + 5, "inbox", LIM).stage == Stage.BLOCKED
