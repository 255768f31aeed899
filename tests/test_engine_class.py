"""Engine-class resolution: which engine runs a job that names only ``engine-class``.

The rule is a pure function (:func:`choose_engine`: offered engines, full seats, ``prefers``;
:func:`prefers_wait_s`: how long a factory without a preferred engine free holds back), tested
directly; then real factories on a real broker show each part of it: the engine is chosen and
its seat taken before the claim, the same seat is released after, the attempt records the
engine (and its version) that ran, and ``prefers`` decides between factories.

The engines here exist only in this test: agent-like engines (class ``agentic-coder``) that
run the job's body with bash and write which engine ran it, offered with ``--cap`` as an
operator would offer an engine it installed."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import msgspec
import pytest

from gigafactory.config import Settings, SettingsError
from gigafactory.factory import engines
from gigafactory.factory.engines.base import (
    Engine,
    EngineJob,
    OutputParser,
    Prepared,
    ProbeResult,
    Progress,
    engine_environment,
    require_cwd,
)
from gigafactory.factory.pools import PREFERS_RECHECK_S, redelivery_delay_s
from gigafactory.schemas.manifest import Manifest
from gigafactory.schemas.profiles import EngineChoice, choose_engine, prefers_wait_s, resolve_engine
from gigafactory.schemas.records import Usage

from helpers import Fleet, eventually, fast_settings, gigafactory_cmd, run

pytestmark = pytest.mark.timeout(180)

CLASS = "agentic-coder"


def manifest(**kw) -> Manifest:
    return Manifest(cwd="/tmp", **kw)


# -- the rule, pure -----------------------------------------------------------------------------

OFFERED = {"claude": CLASS, "codex": CLASS, "aider": CLASS, "shell": "script"}


def test_a_named_engine_wins_and_needs_a_free_seat_of_its_own():
    m = manifest(engine="shell", engine_class=CLASS, prefers=["claude"])
    assert choose_engine(m, OFFERED, ()) == EngineChoice("shell", True, "the job names engine 'shell'")
    full = choose_engine(m, OFFERED, {"shell"})
    assert full.engine is None and "every seat of engine 'shell'" in full.reason


def test_an_engine_class_job_takes_the_first_preferred_engine_with_a_free_seat():
    m = manifest(engine_class=CLASS, prefers=["claude", "engine:codex"])
    assert choose_engine(m, OFFERED, ()).engine == "claude"
    # claude's seats are full here: codex, the next preferred one, is still what the job asked for.
    c = choose_engine(m, OFFERED, {"claude"})
    assert (c.engine, c.preferred) == ("codex", True)
    c = choose_engine(m, OFFERED, {"claude", "codex"})
    assert (c.engine, c.preferred) == ("aider", False), c
    assert "no engine of prefers [claude, codex] has a free seat here" in c.reason


def test_without_prefers_the_first_free_engine_of_the_class_by_name_is_taken():
    m = manifest(engine_class=CLASS)
    assert choose_engine(m, OFFERED, ()) == EngineChoice("aider", True, choose_engine(m, OFFERED, ()).reason)
    assert choose_engine(m, OFFERED, {"aider"}).engine == "claude"
    # Another class's engine never runs an agentic-coder job, seats or not.
    assert choose_engine(m, {"shell": "script"}, ()).engine is None


def test_no_engine_of_the_class_free_or_offered_is_no_choice_with_the_reason():
    m = manifest(engine_class=CLASS, prefers=["claude"])
    full = choose_engine(m, OFFERED, {"claude", "codex", "aider"})
    assert full.engine is None and "every seat of the agentic-coder engines here (aider, claude, codex)" in full.reason
    none = choose_engine(m, {"shell": "script"}, ())
    assert none.engine is None and "no engine of class 'agentic-coder' is offered here" in none.reason


def test_resolve_engine_is_the_choice_with_no_seat_full():
    m = manifest(engine_class=CLASS, prefers=["codex"])
    assert resolve_engine(m, OFFERED) == "codex"
    assert resolve_engine(manifest(engine="gemini"), OFFERED) == "gemini"
    assert resolve_engine(manifest(), OFFERED) is None


def test_a_fallback_claim_waits_out_the_grace_and_a_preferred_one_never_waits():
    fallback = EngineChoice("codex", False, "")
    assert prefers_wait_s(fallback, claimable_for_s=1.5, grace_s=5.0) == pytest.approx(3.5)
    assert prefers_wait_s(fallback, claimable_for_s=5.0, grace_s=5.0) == 0.0
    assert prefers_wait_s(fallback, claimable_for_s=60.0, grace_s=5.0) == 0.0
    assert prefers_wait_s(fallback, claimable_for_s=0.0, grace_s=0.0) == 0.0
    assert prefers_wait_s(EngineChoice("claude", True, ""), claimable_for_s=0.0, grace_s=5.0) == 0.0
    assert prefers_wait_s(EngineChoice(None, True, ""), claimable_for_s=0.0, grace_s=5.0) == 0.0


def test_a_message_given_back_goes_at_once_first_then_at_a_bounded_pace():
    assert redelivery_delay_s(4.0, deliveries=1) == 0.0
    assert redelivery_delay_s(4.0, deliveries=2) == PREFERS_RECHECK_S
    assert redelivery_delay_s(0.3, deliveries=5) == 0.3
    assert redelivery_delay_s(0.0, deliveries=5) == 0.0


@pytest.mark.parametrize("bad", [-1.0, 601.0])
def test_prefers_grace_s_out_of_range_is_refused_by_name(bad):
    with pytest.raises(SettingsError, match=r"prefers_grace_s=.*GIGAFACTORY_PREFERS_GRACE_S.*between 0 and 600"):
        Settings(prefers_grace_s=bad).validate()
    Settings(prefers_grace_s=0.0).validate()


# -- on real factories --------------------------------------------------------------------------


class UsageLines(OutputParser):
    """Reads ``tokens: <n>`` lines as usage, so the run streams ``usage`` events."""

    def __init__(self) -> None:
        self.buf, self.tokens = b"", None

    def feed(self, chunk: bytes) -> list[Progress]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            if line.startswith(b"tokens:"):
                self.tokens = int(line.split(b":", 1)[1])
                out.append(Progress("usage", {"input_tokens": self.tokens}))
        return out

    def usage(self) -> Usage | None:
        return None if self.tokens is None else Usage(input_tokens=self.tokens)


class FakeAgent(Engine):
    """An agentic-coder engine of this test: the body runs with bash, ``FAKE_ENGINE`` names it."""

    engine_class = CLASS
    opt_in = True  # offered only by --cap, as the test's factories do

    def __init__(self, name: str) -> None:
        self.name = name

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        return ProbeResult(True)

    def prepare(self, job: EngineJob) -> Prepared:
        require_cwd(job)
        env = {**engine_environment(job), "FAKE_ENGINE": self.name}
        return Prepared(cwd=job.cwd, env=env, argv=["bash", "-c", job.body])

    def parser(self) -> OutputParser:
        return UsageLines()


@pytest.fixture
def scripted_agents() -> Iterator[None]:
    added = [engines.register(FakeAgent("fake-claude")), engines.register(FakeAgent("fake-codex"))]
    yield
    for e in added:
        engines.unregister(e.name)


def caps(*names: str, version: str | None = None) -> list[str]:
    out = [f"engine:{n}" for n in names] + [f"engine-class:{CLASS}"]
    return out + ([f"fake-claude:{version}"] if version else [])


def held_body(root: Path) -> str:
    """Say which engine ran the job, report some tokens, then wait for the job's gate file."""
    return (f'echo "$FAKE_ENGINE" > "{root}/$GF_JOB_ID.engine"\n'
            'echo "tokens: 7"\n'
            f'for i in $(seq 1 600); do [ -f "{root}/$GF_JOB_ID.go" ] && exit 0; sleep 0.05; done\n'
            'exit 1\n')


def ran_on(root: Path, job: str) -> str | None:
    p = root / f"{job}.engine"
    return p.read_text().strip() if p.exists() else None


def test_an_engine_class_job_takes_a_free_seat_in_prefers_order_and_gives_back_that_seat(
        scripted_agents, nats_server, tmp_path):
    """One factory, three stations, one seat of each agent: the first job takes fake-claude
    (preferred), the second fake-codex (claude's seat is taken: codex is next in prefers), the
    third waits with a station free, and runs on fake-claude once the first job gives that seat
    back. The attempts record the engine (and the version the factory offers)."""
    marks = tmp_path / "marks"
    marks.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(prefers_grace_s=0.0)) as fleet:
            f = await fleet.add_factory("seats", stations=3, caps=caps("fake-claude", "fake-codex", version="2.1.7"),
                                        seats={"fake-claude": 1, "fake-codex": 1})

            def job(name: str) -> str:
                return fleet.job(held_body(marks), engine=None, engine_class=CLASS,
                                 prefers=["fake-claude", "fake-codex"], review_policy="auto", timeout="2m")

            a = await fleet.submit_one(job("a"), "a.md")
            await eventually(lambda: ran_on(marks, a), 20, what="job a runs")
            b = await fleet.submit_one(job("b"), "b.md")
            await eventually(lambda: ran_on(marks, b), 20, what="job b runs")
            assert (ran_on(marks, a), ran_on(marks, b)) == ("fake-claude", "fake-codex")
            assert f.engine_running == {"fake-claude": 1, "fake-codex": 1}

            c = await fleet.submit_one(job("c"), "c.md")
            # Offered to the pool, yet not taken: a station is free, no seat of the class is.
            await eventually(lambda: _has_event(fleet, c, "dispatched"), 20, what="job c dispatched")
            rec, _ = await fleet.record(c)
            assert str(rec.stage) == "queued" and not rec.attempts, rec
            assert len(f.free) == 1
            # The free station says why it is idle: no seat, not no work.
            await eventually(lambda: [str(st.idle_reason) for st in f.record.stations if st.job is None]
                             == ["seat-limit"], 10, what="the free station is idle for its seat limit")

            (marks / f"{a}.go").touch()  # a ends: its fake-claude seat is free again
            await eventually(lambda: ran_on(marks, c), 20, what="job c runs once a seat is free")
            assert ran_on(marks, c) == "fake-claude"
            assert f.engine_running == {"fake-claude": 1, "fake-codex": 1}  # b still on codex
            for j in (b, c):
                (marks / f"{j}.go").touch()
            recs = {j: await fleet.wait_stage(j, "shipped", "failed", timeout_s=30) for j in (a, b, c)}
            assert {j: str(r.stage) for j, r in recs.items()} == dict.fromkeys((a, b, c), "shipped")
            await eventually(lambda: f.engine_running == {"fake-claude": 0, "fake-codex": 0}, 10,
                             what="every seat given back")

            # The attempt says which engine ran, with the version the factory offers for it.
            got = {j: (r.attempts[-1].engine, r.attempts[-1].engine_version) for j, r in recs.items()}
            assert got == {a: ("fake-claude", "2.1.7"), b: ("fake-codex", None), c: ("fake-claude", "2.1.7")}
            assert recs[b].attempts[-1].attribution.engine == "fake-codex"
            events = await fleet.events(b)
            usage = [e for e in events if e["kind"] == "usage"]
            assert usage and all(e["data"]["engine"] == "fake-codex" for e in usage), usage
            finished = [e for e in events if e["kind"] == "finished"]
            assert finished[-1]["data"]["attribution"]["engine"] == "fake-codex"
            claimed = [e for e in events if e["kind"] == "claimed"]
            assert claimed[-1]["data"]["engine"] == "fake-codex"

            # status --json carries it, and the text says it, through the real CLI.
            st = json.loads((await _cli(nats_server.url, "status", a, "--json")).stdout)
            att = st["record"]["attempts"][-1]
            assert (att["engine"], att["engine_version"]) == ("fake-claude", "2.1.7")
            assert att["attribution"]["engine"] == "fake-claude"
            text = (await _cli(nats_server.url, "status", b)).stdout
            assert "on seats/" in text and " with fake-codex: passed" in text, text

    run(main(), 150)


def test_a_job_preferring_an_engine_goes_to_the_factory_that_has_it_free(scripted_agents, nats_server, tmp_path):
    """prefers between factories: a factory with only a non-preferred engine holds back
    (``claim_deferred``) while the job is younger than ``prefers_grace_s``, so the factory with
    the preferred engine, started later, wins it; with both up, the preferred one wins again."""
    marks = tmp_path / "marks"
    marks.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(prefers_grace_s=60.0)) as fleet:
            await fleet.add_factory("codex-only", caps=caps("fake-codex"))
            text = fleet.job(held_body(marks), engine=None, engine_class=CLASS, prefers=["fake-claude"],
                             review_policy="auto", timeout="2m")
            first = await fleet.submit_one(text, "first.md")
            await eventually(lambda: _has_event(fleet, first, "claim_deferred"), 20, what="codex-only holds back")
            rec, _ = await fleet.record(first)
            assert str(rec.stage) == "queued", rec
            await fleet.add_factory("claude-box", caps=caps("fake-claude"))
            await eventually(lambda: ran_on(marks, first), 30, what="the job runs")
            (marks / f"{first}.go").touch()
            rec = await fleet.wait_stage(first, "shipped", "failed", timeout_s=30)
            assert (rec.attempts[-1].factory, rec.attempts[-1].engine, ran_on(marks, first)) == (
                "claude-box", "fake-claude", "fake-claude"), rec.attempts
            deferred = [e for e in await fleet.events(first) if e["kind"] == "claim_deferred"]
            assert deferred and "prefers_grace_s=60" in deferred[0]["reason"], deferred
            assert deferred[0]["data"] == {"factory": "codex-only", "prefers": ["fake-claude"],
                                           "wait_s": deferred[0]["data"]["wait_s"]}

            # Both up and idle: still the preferred engine's factory, whoever gets the offer first.
            second = await fleet.submit_one(text, "second.md")
            await eventually(lambda: ran_on(marks, second), 30, what="the second job runs")
            (marks / f"{second}.go").touch()
            rec = await fleet.wait_stage(second, "shipped", "failed", timeout_s=30)
            assert (rec.attempts[-1].factory, rec.attempts[-1].engine) == ("claude-box", "fake-claude")

    run(main(), 150)


def test_after_the_grace_a_factory_without_the_preferred_engine_takes_the_job(scripted_agents, nats_server, tmp_path):
    """Nothing starves: no factory offers the preferred engine, so once the job has been
    claimable for ``prefers_grace_s`` the factory that held back runs it on what it has."""
    marks = tmp_path / "marks"
    marks.mkdir()

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(prefers_grace_s=1.5)) as fleet:
            f = await fleet.add_factory("codex-only", caps=caps("fake-codex"))
            job = await fleet.submit_one(fleet.job(held_body(marks), engine=None, engine_class=CLASS,
                                                   prefers=["fake-claude"], review_policy="auto", timeout="2m"))
            await eventually(lambda: ran_on(marks, job), 30, what="the job runs after the grace")
            (marks / f"{job}.go").touch()
            rec = await fleet.wait_stage(job, "shipped", "failed", timeout_s=30)
            assert (str(rec.stage), rec.attempts[-1].engine) == ("shipped", "fake-codex"), rec.attempts
            kinds = [e["kind"] for e in await fleet.events(job)]
            assert "claim_deferred" in kinds and kinds.index("claim_deferred") < kinds.index("claimed"), kinds
            assert kinds.count("claim_deferred") == 1  # said once, however often the offer came back
            assert f.stats["claims_deferred"] >= 1

    run(main(), 120)


async def _has_event(fleet: Fleet, job: str, kind: str) -> bool:
    return any(e["kind"] == kind for e in await fleet.events(job))


async def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, [*gigafactory_cmd(), *args, "--nats", url],
                                   capture_output=True, text=True, timeout=60, check=True)


def test_attempt_and_attribution_decode_without_the_engine_fields():
    """Records written before these fields still decode (the fields are optional)."""
    from gigafactory.schemas.records import AttemptRecord, Attribution

    a = msgspec.json.decode(b'{"attempt":1,"epoch":1,"factory":"f","station":0}', type=AttemptRecord)
    assert (a.engine, a.engine_version, a.attribution.engine) == (None, None, None)
    assert msgspec.json.decode(b'{"lane":"f/0"}', type=Attribution).engine is None


def test_a_job_held_back_for_prefers_is_no_stall_of_push_dispatch(scripted_agents, nats_server, tmp_path, monkeypatch):
    """A grace longer than the stall threshold: the job waits by design, so the factory that
    holds it back must not judge push broken and fall back to polling meanwhile."""
    from gigafactory.factory import agent

    monkeypatch.setattr(agent, "STALL_CHECKS_PER_REDISPATCH", 4.0)  # a stall check every 0.25 s
    marks = tmp_path / "marks"
    marks.mkdir()
    settings = fast_settings(prefers_grace_s=10.0, redispatch_s=2.0, long_poll_s=0.5)  # stall_after_s = 4.5 s

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("codex-only", caps=caps("fake-codex"))
            assert f.stall_after_s < settings.prefers_grace_s
            job = await fleet.submit_one(fleet.job(held_body(marks), engine=None, engine_class=CLASS,
                                                   prefers=["fake-claude"], review_policy="auto", timeout="2m"))
            await eventually(lambda: ran_on(marks, job), 30, what="the job runs after the grace")
            (marks / f"{job}.go").touch()
            rec = await fleet.wait_stage(job, "shipped", "failed", timeout_s=30)
            assert rec.attempts[-1].engine == "fake-codex"
            assert f.stats["stall_checks"] > 0  # the checks ran while the job was held back
            claimed = [e for e in await fleet.events(job) if e["kind"] == "claimed"]
            assert [e["data"]["via"] for e in claimed] == ["push"], claimed
            assert [p.mode for p in f.pools.values()] == ["push"] and f.stats["polled_claims"] == 0

    run(main(), 120)
