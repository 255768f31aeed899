"""The typed Python API: ``from gigafactory import Client``, whose requests and replies are the
structures the coordinator's service decodes and encodes (schemas/api.py). Round trips run
against a real nats-server and an in-process coordinator and factory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import typing

import msgspec
import pytest
from helpers import Fleet, run

import gigafactory
from gigafactory.client import Client, NoCoordinator
from gigafactory.coordinator.api import Api
from gigafactory.schemas import api
from gigafactory.schemas.api import (
    REPLIES, REQUESTS, ApiError, FactoriesReply, JobFile, JobReply, JobSummary, ListReply, ShipReply, StatusReply,
    SubmittedJob, decode_reply, decode_request,
)
from gigafactory.schemas.lifecycle import Stage

pytestmark = pytest.mark.timeout(90)


# -- the contract, pure -----------------------------------------------------------------------------


def test_the_package_exports_the_client_without_loading_it_for_other_imports():
    assert gigafactory.Client is Client and gigafactory.ApiError is ApiError and gigafactory.JobSummary is JobSummary
    with pytest.raises(AttributeError, match="no attribute 'Clientt'"):
        gigafactory.Clientt  # noqa: B018
    # A part of the package that has no use for the client (a schema, the factory) does not load it.
    probe = ("import sys, gigafactory.schemas.records; "
             "assert 'gigafactory.client' not in sys.modules and 'nats' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


def test_the_service_and_the_client_use_the_same_structure_for_every_typed_endpoint():
    """Each endpoint of schemas/api.py has a handler in the coordinator's service that takes
    its request structure and returns its reply structure, and a client method that returns
    the same reply structure: a field renamed in one place is renamed for both."""
    assert set(REQUESTS) == set(REPLIES)
    for name, request in REQUESTS.items():
        handler = typing.get_type_hints(getattr(Api, name))
        assert handler["req"] is request, (name, handler)
        assert handler["return"] == REPLIES[name] or (name == "stats" and handler["return"] is dict), (name, handler)
        method = typing.get_type_hints(getattr(Client, name))
        wanted = list[SubmittedJob] if name == "submit" else REPLIES[name]
        assert method["return"] == wanted, (name, method)


def test_a_reply_the_client_cannot_read_is_a_named_error_not_a_silent_default():
    reply = StatusReply(job=JobSummary(id="j", stage="queued", priority="medium", product="p", attempt=0, epoch=0,
                                       holder=None, reason="", submitted_at=1.0, source="t", idempotency_key=None,
                                       lock=None, deps=[], requirements=[]),
                        why="queued", info={}, record={}, revision=3, events=[])
    wire = msgspec.to_builtins(reply)
    assert decode_reply("status", msgspec.json.encode(wire)) == reply
    wire["because"] = wire.pop("why")  # the coordinator renamed a field the client needs
    with pytest.raises(ApiError) as ei:
        decode_reply("status", msgspec.json.encode(wire))
    assert ei.value.code == 502 and "`why`" in ei.value.message and "version" in ei.value.message
    # A newer coordinator's extra field is read past.
    wire["why"], wire["new_field"] = "queued", 1
    assert decode_reply("status", msgspec.json.encode(wire)) == reply


@pytest.mark.parametrize("endpoint, body, says", [
    ("status", b'{"jobb": "x"}', "unknown field `jobb`"),
    ("status", b'{"job": 5}', "Expected `str`, got `int` - at `$.job`"),
    ("status", b'{"job": ""}', "at `$.job`"),
    ("status", b'{"job": "x", "events": 100000}', "at `$.events`"),
    ("cancel", b"{}", "missing required field `job`"),
    ("list", b'{"limit": 0}', "at `$.limit`"),
    ("list", b'{"stage": "nowhere"}', "at `$.stage`"),
    ("submit", b'{"files": [{"path": "a.md"}]}', "missing required field `text` - at `$.files[0]`"),
    ("submit", b"[1, 2]", "Expected `object`, got `array`"),
    ("submit", b"{not json", "not a JSON object"),
])
def test_a_bad_request_is_refused_naming_the_field(endpoint, body, says):
    with pytest.raises(ApiError) as ei:
        decode_request(endpoint, body)
    assert ei.value.code == 400 and says in ei.value.message and ei.value.message.startswith(f"bad {endpoint} request")


def test_an_endpoint_without_a_structure_takes_a_plain_object():
    assert decode_request("halt", b'{"reason": "x"}') == {"reason": "x"}
    assert decode_request("halt", b"") == {}
    with pytest.raises(ApiError, match="Expected `object`"):
        decode_request("halt", b'"text"')


# -- round trips against a real broker and coordinator --------------------------------------------


def test_each_method_round_trips_through_the_coordinator(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            client = fleet.client
            assert isinstance(client, gigafactory.Client)

            [sub] = await client.submit_text(fleet.job("echo ready", verify="true", review_policy="manual"),
                                             path="gated.md")
            assert isinstance(sub, SubmittedJob) and sub.file == "gated.md" and sub.status == "created"
            job = sub.job
            final = await client.wait([job], timeout_s=30)
            assert final[job].stage == "testing", final

            st = await client.status(job)
            assert isinstance(st, StatusReply) and st.job.id == job and st.record["id"] == job and st.revision > 0
            assert "waiting for ship" in st.why and st.events and all("kind" in e for e in st.events)
            assert (await client.status(job, events=0)).events == []

            listed = await client.list(stage=Stage.TESTING)
            assert isinstance(listed, ListReply) and [j.id for j in listed.jobs] == [job]
            assert listed.counts["testing"] == 1 and listed.total == 1
            assert (await client.list(stage="shipped")).jobs == []

            shipped = await client.ship(job, actor="alice")
            assert isinstance(shipped, ShipReply) and shipped.job.stage == "shipped"
            assert shipped.job.reason == "shipped by alice"

            files = [tmp_path / "a.md", tmp_path / "b.md"]
            for f in files:
                f.write_text(fleet.job("echo later", capabilities=["has:unobtainium"]))
            held = await client.submit_files([str(f) for f in files], source="test")
            assert [(s.file, s.stage) for s in held] == [(str(f), "queued") for f in files]

            cancelled = await client.cancel(held[0].job, reason="not needed", actor="bob")
            assert isinstance(cancelled, JobReply) and cancelled.job.stage == "failed"
            assert "not needed" in cancelled.job.reason
            requeued = await client.requeue(held[0].job, actor="bob")
            assert requeued.job.stage == "queued" and requeued.job.id == held[0].job

            fl = await client.factories()
            assert isinstance(fl, FactoriesReply) and [f["id"] for f in fl.factories] == ["f1"]
            assert fl.factories[0]["live"] is True
            stats = await client.stats()
            assert stats["jobs"] == 3 and stats["coordinator"]

            # The untyped escape hatch reads the same reply as builtins.
            raw = await client.call("status", {"job": job, "events": 0})
            assert raw["job"] == msgspec.to_builtins((await client.status(job, events=0)).job)

    run(main(), 80)


def test_errors_come_back_as_one_api_error_with_a_code(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            client = fleet.client
            with pytest.raises(ApiError) as ei:
                await client.status("no-such-job")
            assert ei.value.code == 404 and "no job 'no-such-job'" in ei.value.message
            with pytest.raises(ApiError) as ei:
                await client.call("cancel", {"job": "x", "resaon": "typo"})
            assert ei.value.code == 400 and "unknown field `resaon`" in ei.value.message
            assert ei.value.is_client_error
            raw = await client.nc.request("gf.api.list", b"[]", timeout=10)
            assert raw.headers["Nats-Service-Error-Code"] == "400"
            assert msgspec.json.decode(raw.data, type=api.ErrorReply).error.startswith("bad list request")
            with pytest.raises(ApiError) as ei:
                await client.list(stage="nowhere")
            assert ei.value.code == 400 and "queued" in ei.value.message
            with pytest.raises(ApiError) as ei:
                await client.submit_text("---\nengine: shell\n---\necho no cwd\n", path="bad.md")
            assert ei.value.code == 400 and ei.value.errors and ei.value.errors[0]["file"] == "bad.md"
            assert ei.value.errors[0]["field"] == "cwd"
            with pytest.raises(ApiError) as ei:
                await client.submit([JobFile(text="x" * 10, path=f"{i}.md") for i in range(3)],
                                    limits=api_limits(max_batch_files=2))
            assert ei.value.code == 400 and "3 files in one batch" in ei.value.message

    run(main(), 60)


def api_limits(**overrides):
    from gigafactory.config import Settings
    from gigafactory.schemas.limits import Limits

    return Limits.from_settings(Settings(**overrides))


def test_no_coordinator_is_a_named_error(nats_server):
    async def main():
        async with await Client.connect(nats_server.url) as client:
            with pytest.raises(NoCoordinator) as ei:
                await client.status("anything")
            assert ei.value.code == 503 and "gigafactory coordinator" in ei.value.message

    run(main(), 30)


def test_watch_follows_one_job_from_queued_to_shipped(nats_server, tmp_path):
    """The watch yields the job as it is (queued: no factory can take it yet), then each change
    as the broker pushes it, and ends with the job shipped; it lists no jobs on the way."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            [sub] = await fleet.client.submit_text(fleet.job("echo shipped", capabilities=["has:later"],
                                                             review_policy="auto"))
            seen: list[JobSummary] = []
            first = asyncio.Event()

            async def follow() -> None:
                async for summary in fleet.client.watch(sub.job, timeout_s=60):
                    seen.append(summary)
                    first.set()

            watching = asyncio.create_task(follow())
            await asyncio.wait_for(first.wait(), 20)
            # Queued, and maybe queued again: the scheduler's hold reason is a change of the record.
            assert {s.stage for s in seen} == {"queued"}
            await fleet.add_factory("f1", caps=["has:later"])
            await asyncio.wait_for(watching, 60)
            stages = [s.stage for s in seen]
            assert stages[0] == "queued" and stages[-1] == "shipped", stages
            assert len(stages) >= 3, f"followed the job through its stages, not only its end: {stages}"
            assert all(isinstance(s, JobSummary) and s.id == sub.job for s in seen)
            assert seen[-1].holder is None and seen[-1].attempt == 1
            order = [s.value for s in Stage]
            assert all(order.index(a) <= order.index(b) for a, b in zip(stages, stages[1:])), stages
            assert all(a != b or x.reason != y.reason for a, b, x, y in zip(stages, stages[1:], seen, seen[1:])), \
                "a summary is yielded only when it changed"
            # The watch read the job's record: no request went to list (or status) on the way.
            served = {e.name: e.num_requests for e in fleet.coordinator.api.service.stats().endpoints}
            assert served["list"] == 0 and served["status"] == 0, served

    run(main(), 80)


def test_watch_ends_at_its_timeout_having_yielded_the_job_as_it_is(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            [sub] = await fleet.client.submit_text(fleet.job("echo never", capabilities=["has:unobtainium"]))
            seen = [s async for s in fleet.client.watch(sub.job, timeout_s=1.0)]
            assert seen and {s.stage for s in seen} == {"queued"}, seen  # the hold reason may change
            assert all(a != b for a, b in zip(seen, seen[1:])), "a summary is yielded only when it changed"

    run(main(), 30)


def test_the_design_docs_client_example_runs(nats_server, tmp_path, capsys):
    """docs/design.md's "Python client" example, run as written against a real fleet (only the
    broker URL and the job's folder changed): it follows the job to testing, ships it, and
    prints the 404 of an unknown job."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    code = doc.split("## Python client", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "asyncio.run(main())" in code
    code = (code.replace("nats://127.0.0.1:4222", nats_server.url).replace("/srv/repo", str(tmp_path / "repo"))
            .replace("make test", "echo tested").replace("asyncio.run(main())", ""))
    example: dict = {}
    exec(compile(code, "docs/design.md", "exec"), example)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            await example["main"]()
            [job] = (await fleet.client.list()).jobs
            assert job.stage == "shipped" and job.reason == "shipped by alice"

    run(main(), 60)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] in ("queued", "assigned", "building", "testing"), out
    assert [line for line in out if line.startswith("testing")] == [out[-2]], out
    assert out[-1].startswith("404 no job 'no-such-job'"), out
