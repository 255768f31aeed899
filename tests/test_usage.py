"""Usage from an engine to the record: the engine's parser streams ``usage`` items, they are
published as ``usage`` events while it runs, the attempt's record and ``status --json`` carry
the final usage with the attribution filled from it, ``budget.tokens``/``budget.usd`` stop the
run (``budget_exceeded``, its log kept), and an engine that reports nothing (``shell``) has no
usage (None, never zeros). Run by a real factory against a real broker."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping

import msgspec
import pytest

from gigafactory.factory import engines
from gigafactory.factory.engines.base import (
    Engine,
    EngineJob,
    OutputParser,
    Prepared,
    ProbeResult,
    Progress,
    budget_crossed,
    engine_environment,
    require_cwd,
)
from gigafactory.schemas.manifest import Budget, FailureClass
from gigafactory.schemas.records import Attribution, Usage, attributed, usage_tokens

from helpers import Fleet, eventually, run


class UsageLines(OutputParser):
    """Reads ``usage: {json}`` lines: each one is the run's usage so far."""

    def __init__(self) -> None:
        self.buf = b""
        self.last: Usage | None = None

    def feed(self, chunk: bytes) -> list[Progress]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            if line.startswith(b"usage: "):
                self.last = msgspec.json.decode(line[7:], type=Usage)
                out.append(Progress("usage", msgspec.to_builtins(self.last)))
        return out

    def usage(self) -> Usage | None:
        return self.last


class UsageEngine(Engine):
    """A test engine: the job's body is a Python program that prints its usage as it goes."""

    name = "pyusage"
    engine_class = "script"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        return ProbeResult(True)

    def prepare(self, job: EngineJob) -> Prepared:
        require_cwd(job)
        return Prepared(cwd=job.cwd, env=engine_environment(job), argv=[sys.executable, "-c", job.body])

    def parser(self) -> OutputParser:
        return UsageLines()


@pytest.fixture
def usage_engine() -> Iterator[Engine]:
    e = engines.register(UsageEngine())
    yield e
    engines.unregister(e.name)


def _usage_line(**kw) -> str:
    return "usage: " + json.dumps(kw)


def _program(*usages: dict, then: str = "") -> str:
    lines = ["import sys, time"]
    for u in usages:
        lines.append(f"print({_usage_line(**u)!r}, flush=True)")
    lines.append(then)
    return "\n".join(lines) + "\n"


FIRST = dict(model="m-1", input_tokens=100, output_tokens=10, turns=1, tool_calls=0, cost_source="unknown")
FINAL = dict(model="m-1", input_tokens=300, output_tokens=40, cache_read_tokens=50, cache_write_tokens=20,
             turns=2, tool_calls=1, cost_usd=0.0123, cost_source="reported")


def test_an_engines_usage_streams_as_events_and_lands_on_the_attempt_and_its_attribution(
        nats_server, tmp_path, usage_engine):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("u-1", probe=True)
            job = await fleet.submit_one(fleet.job(_program(FIRST, FINAL), engine="pyusage", review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped")
            last = rec.attempts[-1]
            assert last.usage == Usage(**FINAL)
            a = last.attribution
            assert (a.tokens_in, a.tokens_out, a.tokens_cached) == (320, 40, 50)
            assert a.cost_usd == 0.0123 and a.cost_estimated is False and a.model == "m-1"

            status = await fleet.client.call("status", {"job": job})
            assert status["record"]["attempts"][-1]["usage"] == msgspec.to_builtins(Usage(**FINAL))

            async def usage_events():
                evs = [e for e in await fleet.events(job) if e["kind"] == "usage"]
                return evs if len(evs) >= 2 else None

            evs = await eventually(usage_events, 10, what="the engine's usage events in the audit")
            assert [e["data"]["input_tokens"] for e in evs] == [100, 300]
            finished = [e for e in await fleet.events(job) if e["kind"] == "finished"]
            assert finished[-1]["data"]["usage"]["cost_source"] == "reported"

    run(main())


def test_a_shell_run_has_no_usage_none_not_zeros(nats_server, tmp_path):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("u-2")
            job = await fleet.submit_one(fleet.job("echo hi", review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped")
            assert rec.attempts[-1].usage is None
            status = await fleet.client.call("status", {"job": job})
            attempt = status["record"]["attempts"][-1]
            assert "usage" in attempt and attempt["usage"] is None
            assert not [e for e in await fleet.events(job) if e["kind"] == "usage"]

    run(main())


def test_budget_tokens_stops_the_engine_mid_run_and_keeps_its_log(nats_server, tmp_path, usage_engine):
    # The program reports 110 tokens, then 340, then would sleep for a minute: the budget of 200
    # stops it at the second report, long before its own end (the test's bound would catch that).
    program = _program(FIRST, FINAL, then="print('still running', flush=True)\ntime.sleep(60)\n"
                                          "open('never-made.txt', 'w').write('x')")

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("u-3", probe=True)
            job = await fleet.submit_one(fleet.job(program, engine="pyusage", review_policy="auto",
                                                   budget={"tokens": 200}, retry={"max": 0}))
            rec = await fleet.wait_stage(job, "failed", "dead_letter", timeout_s=30)
            last = rec.attempts[-1]
            assert last.outcome == FailureClass.BUDGET_EXCEEDED
            assert "budget.tokens exceeded: 410 tokens used > 200" in last.detail
            assert last.usage == Usage(**FINAL)
            assert not (fleet.repo / "never-made.txt").exists()
            [log_file] = (tmp_path / "factories" / "u-3" / "logs").iterdir()
            assert "usage: " in log_file.read_text()
            assert f.stats["finished"] == 1

    run(main())


def test_budget_crossed_counts_every_token_kind_and_the_reported_cost():
    u = Usage(input_tokens=100, output_tokens=50, cache_read_tokens=30, cache_write_tokens=20, cost_usd=0.5)
    assert usage_tokens(u) == 200
    assert budget_crossed(Budget(tokens=200), u) is None
    assert budget_crossed(Budget(tokens=199), u) == "budget.tokens exceeded: 200 tokens used > 199"
    assert budget_crossed(Budget(usd=0.5), u) is None
    assert budget_crossed(Budget(usd=0.25), u) == "budget.usd exceeded: $0.5000 spent > $0.25"
    assert budget_crossed(Budget(usd=0.01), Usage(input_tokens=10)) is None  # no cost known: not crossed
    assert budget_crossed(Budget(tokens=1), None) is None


def test_the_attribution_takes_its_spend_from_usage_and_is_unchanged_without_it():
    base = Attribution(lane="f/0", job="j", model="asked-for")
    assert attributed(base, None) is base
    priced = attributed(base, Usage(input_tokens=5, output_tokens=7, cost_usd=0.1, cost_source="priced"))
    assert (priced.tokens_in, priced.tokens_out, priced.cost_usd, priced.cost_estimated) == (5, 7, 0.1, True)
    assert priced.model == "asked-for" and priced.lane == "f/0"
    reported = attributed(base, Usage(model="m", cost_usd=0.2, cost_source="reported"))
    assert reported.cost_estimated is False and reported.model == "m"


def test_finish_keeps_the_usage_on_the_attempt_and_it_survives_the_record_encoding():
    from gigafactory.schemas import protocol
    from gigafactory.schemas.manifest import parse_job_text
    from gigafactory.schemas.records import JobRecord, decode, encode

    jf = parse_job_text("---\nengine: shell\ncwd: .\nreview-policy: auto\n---\necho hi\n", "job.md")
    rec = JobRecord(id="j1", manifest=jf.manifest, body=jf.body, source="t", content_hash="h", submitted_at=1.0,
                    pool="p", requirements=[])
    rec = protocol.claim(rec, "f1", 0, 2.0).record
    rec = protocol.start(rec, "f1", rec.epoch, 3.0).record
    done = protocol.finish(rec, "f1", rec.epoch, 4.0, failure=None, usage=Usage(**FINAL)).record
    assert decode(encode(done), JobRecord).attempts[-1].usage == Usage(**FINAL)
    plain = protocol.finish(rec, "f1", rec.epoch, 4.0, failure=None).record
    assert b'"usage"' not in encode(plain) and decode(encode(plain), JobRecord).attempts[-1].usage is None


def test_a_result_kept_in_an_outbox_before_usage_existed_still_decodes():
    from gigafactory.factory.reporting import ResultPayload

    old = {"job": "j", "epoch": 1, "failure": None, "detail": "d", "exit_code": 0, "verify_exit_code": None,
           "log_path": "/l", "log_object": None, "attribution": {}, "finished_at": 1.0}
    assert msgspec.json.decode(json.dumps(old), type=ResultPayload).usage is None


def test_every_usage_record_carries_its_cost_source_even_when_unknown():
    # omit_defaults would drop "unknown" (the default) and every unknown count: a reader could
    # not tell an unknown cost from a record written before costs existed.
    encoded = json.loads(msgspec.json.encode(Usage(model="m", input_tokens=3)))
    assert encoded["cost_source"] == "unknown" and encoded["cost_usd"] is None
    assert {"model", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "turns",
            "tool_calls", "cost_usd", "cost_source"} <= set(encoded)


def test_status_json_shows_an_unknown_cost_source_explicitly(nats_server, tmp_path, usage_engine):
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("u-4", probe=True)
            job = await fleet.submit_one(fleet.job(_program(FIRST), engine="pyusage", review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped")
            assert rec.attempts[-1].usage.cost_source == "unknown"
            status = await fleet.client.call("status", {"job": job})
            usage = status["record"]["attempts"][-1]["usage"]
            assert usage["cost_source"] == "unknown" and usage["cost_usd"] is None, usage

    run(main())
