"""Log lines: ``--log-format text|json`` on every long-running command, through one set-up
(:func:`gigafactory.clitools.setup_logging`). In JSON, each line is one object with time, level,
logger, message, and the job, factory, epoch and trace it is about, so a log shipper can follow
one job across the fleet (and jump from a line to the job's trace)."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
from helpers import fast_env, gigafactory_cmd, popen_tied, wait_until, write_job
from test_tracing import OtlpReceiver

from gigafactory import clitools, logcontext, tracing

pytestmark = pytest.mark.timeout(180)

FIELDS = {"time", "at", "level", "logger", "message", "job", "factory", "epoch", "trace_id"}
LONG_RUNNING = [["coordinator"], ["factory"], ["up"], ["server"], ["model-server"], ["chaos", "run"],
                ["loadtest", "run"]]


def json_lines(path: Path) -> list[dict]:
    """Every line of ``path`` as JSON (a line that is not JSON fails the test, naming it)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path.name}:{n} is not a JSON object: {line!r}") from None
    return out


def test_a_factorys_json_log_lines_name_the_job_factory_epoch_and_trace(nats_server, tmp_path):
    """A real coordinator and factory, JSON logs, a job run: every stderr line of both is one
    JSON object with every field, and the factory's lines about the job carry its id, the
    factory, the epoch of the attempt and the job's trace id."""
    env = {**fast_env(), "GIGAFACTORY_HOME": str(tmp_path / "home")}
    env.pop("GIGAFACTORY_NATS_URL", None)
    procs = []
    with OtlpReceiver() as rx:
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": rx.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})

        def start(name: str, *args: str):
            with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
                procs.append(popen_tied([*gigafactory_cmd(), *args, "--nats", nats_server.url], stdout=out,
                                        stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True))

        def cli(*args: str, check: bool = True) -> dict:
            r = subprocess.run([*gigafactory_cmd(), *args, "--json", "--nats", nats_server.url], env=env,
                               capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
            assert r.returncode == 0 or not check, f"{args}: {r.stdout}\n{r.stderr}"
            return json.loads(r.stdout) if r.returncode == 0 else {}

        try:
            start("coordinator", "coordinator", "--json", "--log-level", "debug")  # --json: the services' alias
            start("factory", "factory", "--log-format", "json", "--id", "logf", "--no-probe",
                  "--data-dir", str(tmp_path / "data"), "--workspace", str(tmp_path / "work"))
            wait_until(lambda: any(f["id"] == "logf" and f["live"] for f in cli("factories", check=False).get("factories", [])),
                       60,
                       what="factory logf live")
            job_file = write_job(tmp_path / "jobs", "logged.md", "echo logged", cwd=str(tmp_path),
                                 review_policy="auto")
            out = cli("submit", str(job_file), "--wait", "--timeout", "60")
            [job] = out["final"]
            assert out["final"][job]["stage"] == "shipped", out
            record = cli("status", job)["record"]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    assert [p.returncode for p in procs] == [0, 0]
    factory_lines = json_lines(tmp_path / "factory.err")
    coordinator_lines = json_lines(tmp_path / "coordinator.err")
    for r in factory_lines + coordinator_lines:
        assert set(r) >= FIELDS, r
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["time"]) and isinstance(r["at"], float), r
        assert r["level"] in ("debug", "info", "warning", "error", "critical"), r
    assert any(r["level"] == "debug" for r in coordinator_lines)  # --log-level applies with --json
    about_job = [r for r in factory_lines if r["job"] == job]
    assert any(r["message"].startswith(f"logf: claimed {job}") for r in about_job), about_job
    assert any(r["message"].startswith(f"logf: {job} attempt 1 passed") for r in about_job), about_job
    trace_id = record["trace"].split("-")[1]
    for r in about_job:
        assert (r["factory"], r["epoch"], r["trace_id"]) == ("logf", 1, trace_id), r
        assert r["logger"].startswith("gigafactory.factory."), r  # the module that logged it (its __name__)
    # Lines about no job say so (null), rather than a job's fields left over from another line.
    assert [r for r in factory_lines if r["job"] is None and "up:" in r["message"]], factory_lines


@pytest.mark.parametrize("command", LONG_RUNNING, ids=" ".join)
def test_every_long_running_command_offers_the_same_log_options(command):
    r = subprocess.run([*gigafactory_cmd(), *command, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"--log-format \[text\|json\]", r.stdout), r.stdout
    assert re.search(r"--log-level \[debug\|info\|warning\|error\]", r.stdout), r.stdout


def test_a_bad_log_format_is_a_usage_error_naming_the_choices():
    r = subprocess.run([*gigafactory_cmd(), "factory", "--log-format", "xml"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == clitools.EXIT_USAGE and "'xml' is not one of 'text', 'json'" in r.stderr, r.stderr


def test_no_other_logging_set_up_in_the_package():
    """One set-up for every command: nothing else configures the root logger."""
    root = Path(__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(root)}:{n}" for folder in ("gigafactory", "coordinator", "factory", "chaos",
                                                              "loadtest", "schemas")
                 for p in (root / folder).rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "basicConfig(" in line]
    assert not offenders, offenders


LOGGER_NAME = re.compile(r"getLogger\((?!\)|__name__\)|__spec__\.name if __spec__ else __name__\))")
"""A ``getLogger`` call that names its logger other than from its module (the root logger,
``getLogger()``, is allowed: the one set-up configures it)."""


def test_every_logger_is_named_after_its_module():
    """``logging.getLogger(__name__)`` everywhere (``__spec__.name`` in a module also run with
    ``python -m``), so a log line says which module wrote it and an operator can set levels per
    package (``gigafactory.factory``, ``gigafactory.coordinator.retention``)."""
    root = Path(__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(root)}:{n}: {line.strip()}"
                 for folder in ("gigafactory", "coordinator", "factory", "chaos", "loadtest", "schemas", "economics")
                 for p in (root / folder).rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if LOGGER_NAME.search(line) and 'getLogger("nats")' not in line]
    assert not offenders, offenders
    assert LOGGER_NAME.search('log = logging.getLogger("gigafactory.factory")'), "the check sees a literal name"


def test_the_context_of_a_step_is_on_its_lines_and_gone_after_it():
    """In process: the JSON formatter and the context filter, as setup_logging installs them."""
    stream = io.StringIO()
    clitools.setup_logging("info", "json")
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)
    log = logging.getLogger("gigafactory.test")
    try:
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        with logcontext.bound(factory="f1"):
            with tracing.span("claim", parent=parent, job="j1", epoch=3):
                log.info("inside")
            log.warning("after")
        log.error("outside")
    finally:
        clitools.setup_logging("warning", "text")
    inside, after, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["job"], inside["factory"], inside["epoch"], inside["trace_id"]) == \
        ("j1", "f1", 3, "0af7651916cd43dd8448eb211c80319c")
    assert (after["job"], after["factory"], after["epoch"], after["trace_id"]) == (None, "f1", None, None)
    assert (outside["job"], outside["factory"], outside["level"]) == (None, None, "error")
    with pytest.raises(ValueError, match="log format 'xml'"):
        clitools.setup_logging("info", "xml")
