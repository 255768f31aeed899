"""Engines behind one interface: the registry, the probe's offers, and an engine that exists only
in this test, registered here and run end to end by a real factory against a real broker, which
is what shows that adding an engine needs no change outside ``factory/engines/``."""

from __future__ import annotations

import asyncio
import platform
import sys
from collections.abc import Iterator, Mapping

import pytest

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
from gigafactory.factory.probe import probe
from gigafactory.schemas import names
from gigafactory.schemas.manifest import FailureClass

from helpers import Fleet, eventually, run

PY_VERSION = platform.python_version()


class ProgressLines(OutputParser):
    """Reads ``progress: <n>`` lines (split across chunks or not) as progress."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[Progress]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [Progress("progress", {"step": int(line.split(b":", 1)[1])})
                for line in lines if line.startswith(b"progress:")]


class PythonEngine(Engine):
    """A test engine: the job's body is a Python program, run by this interpreter."""

    engine_class = "script"

    def __init__(self, name: str = "pyrun", *, runnable: bool = True) -> None:
        self.name = name
        self.runnable = runnable

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        if not self.runnable:
            return ProbeResult(False, why="switched off by the test")
        return ProbeResult(True, version=PY_VERSION, credentials={"PYRUN_TOKEN": "PYRUN_TOKEN" in environ})

    def prepare(self, job: EngineJob) -> Prepared:
        require_cwd(job)
        return Prepared(cwd=job.cwd, env=engine_environment(job), argv=[sys.executable, "-c", job.body])

    def parser(self) -> OutputParser:
        return ProgressLines()


class BrokenProbe(Engine):
    name = "broken-probe"
    engine_class = "script"

    def probe(self, *, environ: Mapping[str, str], path: str, timeout_s: float) -> ProbeResult:
        raise RuntimeError("the probe of this engine is broken")


@pytest.fixture
def registered() -> Iterator[list[Engine]]:
    """Engines a test registers; unregistered afterwards, whatever the test did."""
    added: list[Engine] = []
    yield added
    for e in added:
        engines.unregister(e.name)


def _register(added: list[Engine], engine: Engine) -> Engine:
    added.append(engines.register(engine))
    return engine


# -- the registry ------------------------------------------------------------------------------


def test_the_built_in_engines_are_registered_with_their_class():
    reg = engines.registry()
    assert set(reg) >= {"shell", "noop"}
    assert engines.get("shell").engine_class == "script"
    assert engines.get("noop").opt_in and not engines.get("noop").verifies
    assert not engines.get("shell").opt_in and engines.get("shell").verifies
    assert engines.get("claude").engine_class == "agentic-coder"


def test_the_registry_view_is_read_only():
    with pytest.raises(TypeError):
        engines.registry()["x"] = PythonEngine("x")  # type: ignore[index]


@pytest.mark.parametrize("bad", ["Py", "py run", "-py", "py.run", "", "py:run"])
def test_a_name_no_job_could_name_is_refused_at_register(bad, registered):
    with pytest.raises(ValueError, match="not one a job can name"):
        _register(registered, PythonEngine(bad))
    assert bad not in engines.registry()


def test_a_second_engine_of_one_name_is_refused_unless_it_replaces(registered):
    first = _register(registered, PythonEngine("pyrun"))
    with pytest.raises(ValueError, match="registered already"):
        engines.register(PythonEngine("pyrun"))
    second = engines.register(PythonEngine("pyrun"), replace=True)
    assert engines.get("pyrun") is second is not first
    assert engines.unregister("pyrun") is second
    assert engines.get("pyrun") is None and engines.unregister("pyrun") is None


def test_something_that_is_not_an_engine_is_refused():
    with pytest.raises(TypeError, match="must be an Engine"):
        engines.register(object())  # type: ignore[arg-type]


# -- the probe offers what the engines say ----------------------------------------------------


def test_the_probe_offers_a_registered_engine_that_can_run_with_its_version(registered):
    assert "engine:pyrun" not in probe()
    _register(registered, PythonEngine("pyrun"))
    tokens = probe()
    assert "engine:pyrun" in tokens and f"pyrun:{PY_VERSION}" in tokens
    assert "engine:shell" in tokens


def test_the_probe_does_not_offer_an_engine_that_cannot_run_or_whose_probe_raises(registered):
    _register(registered, PythonEngine("pyoff", runnable=False))
    _register(registered, BrokenProbe())
    tokens = probe()
    assert not any(t.startswith(("engine:pyoff", "pyoff:", "engine:broken-probe")) for t in tokens)
    assert "engine:shell" in tokens  # one broken engine does not break the probe


def test_noop_stays_opt_in_the_probe_never_offers_it_and_cap_does():
    assert "engine:noop" not in probe()
    assert "engine:noop" in probe(["engine:noop"])


def test_the_default_tokens_are_the_engine_and_its_version():
    eng = PythonEngine("pyrun")
    assert eng.tokens(ProbeResult(True, version="3.11.7")) == ["engine:pyrun", "pyrun:3.11.7"]
    assert eng.tokens(ProbeResult(True)) == ["engine:pyrun"]


# -- a test engine runs a job end to end --------------------------------------------------------


def test_an_engine_registered_in_a_test_is_offered_and_ships_a_job_with_the_shared_verify_gate(
        nats_server, tmp_path, registered):
    _register(registered, PythonEngine("pyrun"))
    program = ("import pathlib, os\n"
               "print('progress: 1', flush=True)\n"
               "pathlib.Path('made-by-pyrun.txt').write_text(os.environ['GF_JOB_ID'])\n"
               "print('progress: 2', flush=True)\n")

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("py-1", probe=True)
            assert "engine:pyrun" in f.record.capabilities and f"pyrun:{PY_VERSION}" in f.record.capabilities
            job = await fleet.submit_one(fleet.job(program, engine="pyrun", review_policy="auto",
                                                   verify="test -s made-by-pyrun.txt"))
            rec = await fleet.wait_stage(job, "shipped")
            assert (fleet.repo / "made-by-pyrun.txt").read_text() == job
            last = rec.attempts[-1]
            assert last.exit_code == 0 and last.verify_exit_code == 0
            assert "verify passed: test -s made-by-pyrun.txt" in last.detail

            # The same engine failing its verify gate: the gate is the factory's, not the engine's.
            bad = await fleet.submit_one(fleet.job("print('no file')", engine="pyrun", review_policy="auto",
                                                   verify="test -e never-made.txt", retry={"max": 0}), path="bad.md")
            rec = await fleet.wait_stage(bad, "failed", "dead_letter")
            assert rec.attempts[-1].outcome == FailureClass.VERIFY_FAILED
            assert rec.attempts[-1].verify_exit_code not in (None, 0)

            async def progress():
                evs = [e for e in await fleet.events(job) if e["kind"] == "progress"]
                return evs if len(evs) >= 2 else None

            evs = await eventually(progress, 10, what="the engine's progress events in the audit")
            assert [e["data"]["step"] for e in evs] == [1, 2]
            assert all(e["factory"] == "py-1" for e in evs)

    run(main())


class BrokenParser(OutputParser):
    def feed(self, chunk: bytes) -> list[Progress]:
        raise ValueError("this parser cannot read anything")


class PythonEngineWithABrokenParser(PythonEngine):
    def parser(self) -> OutputParser:
        return BrokenParser()


def test_an_engine_whose_output_parser_raises_still_runs_its_job_to_the_end(nats_server, tmp_path, registered):
    """A parser that raises costs the run's progress events, never the run: the job ships, its
    whole output is in the log, and the live log stream goes on after the parser failed (the
    output is written in two chunks, apart in time)."""
    _register(registered, PythonEngineWithABrokenParser("pyparse"))
    program = "import time\nprint('progress: 1', flush=True)\ntime.sleep(0.3)\nprint('all done', flush=True)"

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("py-3", probe=True)
            live: list[bytes] = []

            async def heard(msg) -> None:
                live.append(msg.data)

            sub = await fleet.admin.nc.subscribe(f"{names.LOGS_PREFIX}.>", cb=heard)
            job = await fleet.submit_one(fleet.job(program, engine="pyparse", review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped")
            assert rec.attempts[-1].detail == "engine exited 0; no verify command"
            [log_file] = (tmp_path / "factories" / "py-3" / "logs").iterdir()
            assert "all done" in log_file.read_text()
            await eventually(lambda: b"all done" in b"".join(live), 10, what="the live log after the parser failed")
            await sub.unsubscribe()
            assert not [e for e in await fleet.events(job) if e["kind"] == "progress"]
            assert f.stats["finished"] == 1

    run(main())


def test_a_job_for_an_engine_no_factory_offers_is_never_claimed(nats_server, tmp_path, registered):
    _register(registered, PythonEngine("pyoff", runnable=False))

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            f = await fleet.add_factory("py-2", probe=True)
            assert "engine:pyoff" not in f.record.capabilities
            job = await fleet.submit_one(fleet.job("print(1)", engine="pyoff", review_policy="auto"))
            control = await fleet.submit_one(fleet.job("echo ok", review_policy="auto"), path="control.md")
            await fleet.wait_stage(control, "shipped")
            rec, _ = await fleet.record(job)
            assert str(rec.stage) == "queued" and not rec.attempts
            assert f.stats["claims"] == 1

    run(main())


def test_an_engine_whose_program_is_missing_fails_setup_naming_it(tmp_path):
    """The default :meth:`Engine.run` (a program run by argv) classes a program that is not on
    the engine's PATH as ``setup_failed``, naming it, before anything starts."""

    class Missing(PythonEngine):
        def prepare(self, job):
            p = super().prepare(job)
            p.argv = ["gf-no-such-program-here", "x"]
            return p

    async def main():
        job = _engine_job(tmp_path)
        eng = Missing("missing")
        out = await eng.run(job, eng.prepare(job))
        assert out.failure == FailureClass.SETUP_FAILED and "gf-no-such-program-here" in out.detail
        assert not (tmp_path / "attempt.log").exists()

    asyncio.run(main())


def test_a_missing_cwd_is_setup_failed_with_a_line_for_the_log(tmp_path):
    from gigafactory.factory.engines.base import SetupFailed

    job = _engine_job(tmp_path, cwd=tmp_path / "not-here")
    with pytest.raises(SetupFailed) as e:
        engines.get("shell").prepare(job)
    assert e.value.detail == f"cwd {tmp_path / 'not-here'} does not exist on fx"
    assert "does not exist on factory fx" in e.value.log_line


def _engine_job(tmp_path, cwd=None) -> EngineJob:
    from gigafactory.schemas.manifest import Manifest

    return EngineJob(
        job="j1", epoch=1, attempt=1, factory="fx", station=0, manifest=Manifest(engine="pyrun", cwd=str(tmp_path)),
        body="print(1)", cwd=cwd or tmp_path, log_path=str(tmp_path / "attempt.log"), gf_env={"GF_JOB_ID": "j1"},
        timeout_s=10.0, timeout_class=FailureClass.TIMEOUT, header="# test\n", on_output=lambda _c: None,
        cancel=asyncio.Event(), fence=None, supervised=True,
    )


# -- what environment an engine gets ------------------------------------------------------------

ENV_PROBE_SCRIPT = """```sh
printf '%s|%s|%s|%s\\n' "${GF_TEST_SECRET_KEY-unset}" "${GF_TEST_ALLOWED-unset}" "${GITHUB_TOKEN-unset}" \\
  "${GF_JOB_ID-unset}" > "env-$GF_JOB_ID.txt"
```
"""


def test_a_shell_job_sees_no_factory_secret_unless_allowed_and_a_cred_job_gets_its_credential(
        nats_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_FACTORY_SECRET_KEY", "hunter2")
    monkeypatch.setenv("OPERATOR_ALLOWED", "passed")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-scripted")
    script = ENV_PROBE_SCRIPT.replace("GF_TEST_SECRET_KEY", "MY_FACTORY_SECRET_KEY").replace(
        "GF_TEST_ALLOWED", "OPERATOR_ALLOWED")
    from helpers import fast_settings

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(engine_env_passthrough="OPERATOR_ALLOWED")) as fleet:
            await fleet.add_factory("env-1", caps=["cred:github_token"])
            plain = await fleet.submit_one(fleet.job(script, engine="shell", review_policy="auto"))
            cred = await fleet.submit_one(fleet.job(script, engine="shell", review_policy="auto",
                                                    capabilities=["cred:github_token"]), path="cred.md")
            for job in (plain, cred):
                rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter")
                assert rec.stage == "shipped", rec.attempts[-1].detail
            assert (fleet.repo / f"env-{plain}.txt").read_text() == f"unset|passed|unset|{plain}\n"
            assert (fleet.repo / f"env-{cred}.txt").read_text() == f"unset|passed|ghp-scripted|{cred}\n"

    run(main())


def test_the_base_environment_keeps_only_what_is_not_secret():
    from gigafactory.factory.engines.base import base_environment, cred_variables

    environ = {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "HTTPS_PROXY": "http://p", "GF_X": "1",
               "GIGAFACTORY_NATS_URL": "nats://x", "ANTHROPIC_API_KEY": "sk", "AWS_SECRET_ACCESS_KEY": "s",
               "NPM_TOKEN": "n"}
    assert base_environment(environ) == {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "HTTPS_PROXY": "http://p",
                                         "GF_X": "1"}
    assert base_environment(environ, ["NPM_TOKEN"])["NPM_TOKEN"] == "n"
    assert cred_variables(["os:linux", "cred:github_token", "cred:nope"], ["GITHUB_TOKEN", "GH_TOKEN"]) == \
        ["GITHUB_TOKEN"]


def test_engine_env_passthrough_is_read_from_the_environment_and_checked():
    from gigafactory.config import Settings, SettingsError

    s = Settings.from_env({"GIGAFACTORY_ENGINE_ENV_PASSTHROUGH": "NPM_TOKEN, PIP_INDEX_URL"})
    assert s.engine_env_passthrough_names == ("NPM_TOKEN", "PIP_INDEX_URL")
    with pytest.raises(SettingsError, match="GIGAFACTORY_ENGINE_ENV_PASSTHROUGH.*'BAD-NAME'"):
        Settings.from_env({"GIGAFACTORY_ENGINE_ENV_PASSTHROUGH": "OK,BAD-NAME"}).validate()
