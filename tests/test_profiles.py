"""Profiles: the shipped catalog, parsing errors, resolution at submit (job > profile >
default), the snapshot in the record, the persona in the prompt, and engine-class routing run
end to end by real factories against a real broker with test engines registered here."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping

import pytest
from click.testing import CliRunner

from gigafactory.cli import main as cli_main
from gigafactory.config import Settings
from gigafactory.factory import engines
from gigafactory.factory.engines.base import (
    Engine,
    EngineJob,
    Outcome,
    Prepared,
    ProbeResult,
    engine_environment,
    require_cwd,
)
from gigafactory.schemas import profiles
from gigafactory.schemas.manifest import EngineClass, ManifestError, parse_job_text

from helpers import Fleet, eventually, fast_settings, job_text, run


class _PromptEcho(Engine):
    """An agentic-coder engine of this test that passes at once without running the prompt."""

    name = "prompt-echo"
    engine_class = "agentic-coder"
    opt_in = True
    verifies = False

    def probe(self, *, environ, path, timeout_s):
        return ProbeResult(True)

    async def run(self, job, prepared):
        return Outcome(None, "prompt read, nothing run", 0)


SHIPPED = ["backend-engineer", "developer", "docs-writer", "frontend-engineer", "planner", "qa", "reviewer",
           "ux-designer"]


def _job(front: str, body: str = "Do the task.") -> str:
    return f"---\n{front}---\n{body}\n"


# -- the catalog and its parser ----------------------------------------------------------------


def test_the_shipped_catalog_has_the_eight_profiles_each_with_a_persona_and_an_engine_class():
    cat = profiles.load_catalog()
    assert sorted(cat) == SHIPPED
    for p in cat.values():
        assert p.persona.startswith("You are"), p.name
        assert p.fields.engine_class == EngineClass.AGENTIC_CODER and p.fields.prefers, p.name
        assert p.fields.summary and p.fields.budget.usd is not None, p.name
        assert len(p.content_hash) == 64


@pytest.mark.parametrize("text, field, words", [
    ("no front matter", None, "starts with a '---'"),
    ("---\nengine-class: agentic-coder\n---\nhi\n", "summary", "'summary' is required"),
    ("---\nsummary: x\npersonality: y\n---\nhi\n", "personality", "unknown field"),
    ("---\nsummary: x\nengine-class: robot\n---\nhi\n", "engine-class", "Invalid enum value"),
    ("---\nsummary: x\ncapabilities: ['node>=abc']\n---\nhi\n", "capabilities[0]", "not a version"),
    ("---\nsummary: x\nbudget: {wall: soon}\n---\nhi\n", "budget.wall", "not a duration"),
    ("---\nsummary: x\nscope: ['../etc/*']\n---\nhi\n", "scope[0]", "'..' segment"),
    ("---\nsummary: x\n---\n" + "p" * (profiles.MAX_PERSONA_BYTES + 1), None, "persona is"),
    ("---\nsummary: x\n---\n" + "p" * (profiles.MAX_PROFILE_BYTES + 1), None, "more than the"),
])
def test_a_bad_profile_is_refused_naming_the_file_and_the_field(text, field, words):
    with pytest.raises(profiles.ProfileError) as e:
        profiles.parse_profile(text, "/ops/profiles/mine.md")
    assert e.value.field == field and words in str(e.value) and str(e.value).startswith("/ops/profiles/mine.md:")


def test_an_operator_folder_adds_and_replaces_profiles_and_a_broken_file_names_itself(tmp_path):
    (tmp_path / "qa.md").write_text("---\nsummary: our qa\nengine-class: agentic-coder\n---\nYou test.\n")
    (tmp_path / "sre.md").write_text("---\nsummary: keeps it up\n---\nYou are on call.\n")
    cat = profiles.load_catalog(str(tmp_path))
    assert cat["qa"].fields.summary == "our qa" and cat["sre"].persona == "You are on call."
    assert "developer" in cat
    (tmp_path / "bad.md").write_text("---\nsummary: [unclosed\n---\n")
    with pytest.raises(profiles.ProfileError, match="bad.md"):
        profiles.load_catalog(str(tmp_path))
    with pytest.raises(profiles.ProfileError, match="does not exist"):
        profiles.load_catalog(str(tmp_path / "missing"))


def test_profiles_dir_is_read_from_the_environment_as_text():
    assert Settings.from_env({"GIGAFACTORY_PROFILES_DIR": "/ops/profiles"}).profiles_dir == "/ops/profiles"
    assert Settings.from_env({"GIGAFACTORY_PROFILES_DIR": ""}).profiles_dir is None


# -- resolution --------------------------------------------------------------------------------


def test_job_fields_override_profile_fields_which_override_defaults():
    cat = profiles.load_catalog()
    jf = parse_job_text(_job("profile: qa\ncwd: repo\nmodel: m-1\nbudget: {usd: 9}\n"
                             "capabilities: [os:linux]\nprefers: [claude]\n"), "job.md")
    out = profiles.resolve(jf, cat)
    m = out.manifest
    assert m.engine is None and m.engine_class == EngineClass.AGENTIC_CODER  # from the profile
    assert m.model == "m-1"  # the job's
    assert m.budget.usd == 9 and m.budget.wall == "30m"  # job's usd, profile's wall
    assert m.capabilities == ["os:linux", "has:git"]  # merged, the job's first
    assert m.prefers == ["claude", "codex"]  # the job's first, then the profile's
    assert m.timeout == "30m" and m.retry.max == 2  # defaults where neither says
    assert m.requirements() == ("engine-class:agentic-coder", "has:git", "os:linux")
    assert out.profile.name == "qa" and out.profile.content_hash == cat["qa"].content_hash
    assert out.profile.persona.startswith("You are a QA engineer")
    # A stated default still wins: the job said manual, the profile cannot change it.
    cat2 = {"p": profiles.parse_profile("---\nsummary: s\nengine-class: agentic-coder\nreview-policy: auto\n---\n", "p.md")}
    stated = profiles.resolve(parse_job_text(_job("profile: p\ncwd: r\nreview-policy: manual\n"), "j.md"), cat2)
    assert stated.manifest.review_policy == "manual"
    assert profiles.resolve(parse_job_text(_job("profile: p\ncwd: r\n"), "j.md"), cat2).manifest.review_policy == "auto"
    # `engine:` wins over the profile's class.
    assert profiles.resolve(parse_job_text(_job("profile: qa\ncwd: r\nengine: shell\n"), "j.md"), cat).manifest.requirements() \
        == ("engine:shell", "has:git")


def test_the_content_hash_changes_when_the_profile_changes():
    jf = parse_job_text(_job("profile: p\ncwd: r\n"), "j.md")
    a = profiles.resolve(jf, {"p": profiles.parse_profile("---\nsummary: s\nengine-class: agentic-coder\n---\nA\n", "p.md")})
    b = profiles.resolve(jf, {"p": profiles.parse_profile("---\nsummary: s\nengine-class: agentic-coder\n---\nB\n", "p.md")})
    assert a.manifest == b.manifest and a.content_hash != b.content_hash


def test_an_unknown_profile_or_one_without_an_engine_is_refused_naming_the_known_ones():
    with pytest.raises(ManifestError) as e:
        profiles.resolve(parse_job_text(_job("profile: wizard\ncwd: r\n"), "j.md"), profiles.load_catalog())
    assert e.value.field == "profile" and "unknown profile 'wizard'" in str(e.value)
    assert ", ".join(SHIPPED) in str(e.value)
    bare = {"b": profiles.parse_profile("---\nsummary: s\n---\n", "b.md")}
    with pytest.raises(ManifestError, match="names no engine-class"):
        profiles.resolve(parse_job_text(_job("profile: b\ncwd: r\n"), "j.md"), bare)
    with pytest.raises(ManifestError, match="not a profile name"):
        parse_job_text(_job("profile: ../x\ncwd: r\n"), "j.md")


def test_resolve_engine_honours_engine_then_prefers_then_any_of_the_class():
    m = parse_job_text(_job("engine-class: agentic-coder\ncwd: r\nprefers: [codex, claude]\n"), "j.md").manifest
    offered = {"claude": "agentic-coder", "codex": "agentic-coder", "shell": "script"}
    assert profiles.resolve_engine(m, offered) == "codex"
    assert profiles.resolve_engine(m, {"claude": "agentic-coder"}) == "claude"
    assert profiles.resolve_engine(m, {"gemini": "agentic-coder", "aider": "agentic-coder"}) == "aider"
    assert profiles.resolve_engine(m, {"shell": "script"}) is None
    named = parse_job_text(_job("engine: gemini\ncwd: r\nprefers: [codex]\n"), "j.md").manifest
    assert profiles.resolve_engine(named, offered) == "gemini"


def test_the_persona_is_prepended_for_agents_and_never_to_a_script():
    snap = profiles.ProfileSnapshot(name="p", content_hash="h", persona="You are X.")
    assert profiles.engine_prompt(snap, "Fix it.", "agentic-coder") == "You are X.\n\nFix it."
    assert profiles.engine_prompt(snap, "echo hi", "script") == "echo hi"
    assert profiles.engine_prompt(None, "Fix it.", "agentic-coder") == "Fix it."


# -- the CLI -----------------------------------------------------------------------------------


def test_the_profiles_command_lists_the_catalog_and_an_operator_folder(tmp_path):
    r = CliRunner().invoke(cli_main, ["profiles", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [row["name"] for row in rows] == SHIPPED
    qa = next(row for row in rows if row["name"] == "qa")
    assert qa["engine-class"] == "agentic-coder" and qa["prefers"] == ["codex", "claude"] and qa["summary"]
    r = CliRunner().invoke(cli_main, ["profiles"])
    assert r.exit_code == 0 and "developer" in r.output and "agentic-coder" in r.output
    (tmp_path / "sre.md").write_text("---\nsummary: keeps it up\n---\nYou are on call.\n")
    r = CliRunner().invoke(cli_main, ["profiles"], env={"GIGAFACTORY_PROFILES_DIR": str(tmp_path)})
    assert r.exit_code == 0 and "keeps it up" in r.output
    (tmp_path / "bad.md").write_text("---\nsumary: typo\n---\n")
    r = CliRunner().invoke(cli_main, ["profiles"], env={"GIGAFACTORY_PROFILES_DIR": str(tmp_path)})
    assert r.exit_code != 0 and "bad.md" in r.output and "sumary" in r.output


# -- end to end: real broker, real factories, test engines -------------------------------------


class RecordingAgent(Engine):
    """A test agent of class ``agentic-coder``: writes the prompt it received to
    ``prompt-<name>.txt`` in the job's cwd (the prompt goes in as an argument, as real CLIs take it)."""

    engine_class = "agentic-coder"

    def __init__(self, name: str) -> None:
        self.name = name

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        return ProbeResult(True, version="1.0")

    def prepare(self, job: EngineJob) -> Prepared:
        require_cwd(job)
        program = f"import pathlib, sys; pathlib.Path('prompt-{self.name}.txt').write_text(sys.argv[1])"
        return Prepared(cwd=job.cwd, env=engine_environment(job), argv=[sys.executable, "-c", program, job.body])


@pytest.fixture
def agents() -> Iterator[None]:
    added = [engines.register(RecordingAgent(n)) for n in ("tagent-a", "tagent-b")]
    try:
        yield
    finally:
        for e in added:
            engines.unregister(e.name)


def test_a_profile_job_runs_on_an_engine_of_its_class_honouring_prefers_with_the_persona_snapshotted(
        nats_server, tmp_path, agents):
    ops = tmp_path / "ops-profiles"
    ops.mkdir()
    (ops / "tester.md").write_text("---\nsummary: t\nengine-class: agentic-coder\nprefers: [tagent-b, tagent-a]\n"
                                   "review-policy: auto\nverify: test -s prompt-tagent-b.txt\n---\nYou are Tess.\n")
    settings = fast_settings(profiles_dir=str(ops))

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings) as fleet:
            f = await fleet.add_factory("agents-1", probe=True)
            assert {"engine:tagent-a", "engine:tagent-b", "engine-class:agentic-coder"} <= set(f.record.capabilities)
            job = await fleet.submit_one(f"---\nprofile: tester\ncwd: {fleet.repo}\n---\nWrite the tests.\n")
            rec = await fleet.wait_stage(job, "shipped")
            # The profile's prefers chose tagent-b of the two agents the factory offers.
            assert (fleet.repo / "prompt-tagent-b.txt").read_text() == "You are Tess.\n\nWrite the tests.\n"
            assert not (fleet.repo / "prompt-tagent-a.txt").exists()
            assert rec.profile is not None and rec.profile.name == "tester" and rec.profile.persona == "You are Tess."
            assert rec.manifest.engine_class == EngineClass.AGENTIC_CODER and rec.manifest.review_policy == "auto"
            snap_hash = rec.profile.content_hash

            # Editing the profile changes nothing in the submitted job's record.
            (ops / "tester.md").write_text("---\nsummary: t\nengine-class: agentic-coder\n---\nYou are Zed.\n")
            rec, _ = await fleet.record(job)
            assert rec.profile.content_hash == snap_hash and rec.profile.persona == "You are Tess."

            # A job's own prefers comes first; `engine:` wins over everything.
            j2 = await fleet.submit_one(job_text("Second.", engine="tagent-a", profile="tester", review_policy="auto",
                                                 cwd=str(fleet.repo)), path="j2.md")
            await fleet.wait_stage(j2, "shipped")
            assert (fleet.repo / "prompt-tagent-a.txt").read_text() == "You are Zed.\n\nSecond.\n"

            # An unknown profile is refused at submit, naming the known ones; nothing is written.
            with pytest.raises(Exception) as e:
                await fleet.submit_one(f"---\nprofile: wizard\ncwd: {fleet.repo}\n---\nx\n", path="w.md")
            assert "unknown profile 'wizard'" in str(e.value) and "tester" in str(e.value)

    run(main())


def test_an_engine_class_job_on_a_factory_without_an_engine_of_that_class_is_never_claimed_nor_run_as_shell(
        nats_server, tmp_path):
    # The factory serves the pool (an operator's --cap says it serves the class) but has no such
    # engine: the prompt must not be run as a shell script (it was, before resolve_engine), and
    # the job is not claimed either (no engine of the class has a seat there), so a factory
    # that has one can run it, and no retry is spent on a factory that never could.
    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("plain-1", caps=["engine-class:agentic-coder"])
            job = await fleet.submit_one(f"---\nengine-class: agentic-coder\ncwd: {fleet.repo}\nretry: {{max: 0}}\n"
                                         "---\ntouch ran-as-shell\n")

            async def dispatched():
                return any(e["kind"] == "dispatched" for e in await fleet.events(job))

            await eventually(dispatched, 20, what="the job is offered to the pool")
            await eventually(lambda: f.pools, 10, what="plain-1 serves the pool")
            rec, _ = await fleet.record(job)
            assert str(rec.stage) == "queued" and rec.attempts == [], rec
            # A factory with an engine of the class takes it: plain-1 never did meanwhile.
            coder = engines.register(_PromptEcho())
            try:
                await fleet.add_factory("coder-1", caps=["engine:prompt-echo", "engine-class:agentic-coder"])
                rec = await fleet.wait_stage(job, "testing", "failed", "dead_letter")
            finally:
                engines.unregister(coder.name)
            assert (str(rec.stage), rec.attempts[-1].factory, rec.attempts[-1].engine) == (
                "testing", "coder-1", "prompt-echo"), rec.attempts
            assert f.stats["claims"] == 0
            assert not (fleet.repo / "ran-as-shell").exists()

    run(main())
