"""The ``gigafactory`` command line as a user runs it: real processes for the coordinator,
the factory and every CLI call, against the test's own broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import Proc, fast_env, gigafactory_cmd, wait_until, write_job

pytestmark = pytest.mark.timeout(120)

FACTORY = "cli-f1"


class CliFleet:
    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.repo = root / "repo"
        self.repo.mkdir()
        self.env = fast_env()
        self.env["GIGAFACTORY_HOME"] = str(root / "home")  # never the user's ~/.gigafactory
        self.env.pop("GIGAFACTORY_NATS_URL", None)
        self.procs: list[Proc] = []

    def start(self) -> None:
        base = gigafactory_cmd()
        self.procs.append(Proc([*base, "coordinator", "--nats", self.url], self.root / "coordinator.log", self.env))
        self.procs.append(Proc(
            [*base, "factory", "--nats", self.url, "--id", FACTORY, "--no-probe", "--stations", "2",
             "--data-dir", str(self.root / "factory-data"), "--workspace", str(self.root / "work")],
            self.root / "factory.log", self.env,
        ))

        def factory_live():
            r = self.cli("factories", "--json", check=False)
            if r.returncode != 0:
                return None
            return any(f["id"] == FACTORY and f["live"] for f in json.loads(r.stdout)["factories"])

        try:
            wait_until(factory_live, 30, what="coordinator answers and the factory process is live")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.output()[-3000:]}" for p in self.procs)

    def cli(self, *args: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run([*gigafactory_cmd(), *args, "--nats", self.url], env=self.env, capture_output=True,
                           text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"gigafactory {' '.join(args)} exited {r.returncode}\nstdout: {r.stdout}\n"
                                 f"stderr: {r.stderr}\n{self.logs()}")
        return r

    def cli_json(self, *args: str) -> dict:
        return json.loads(self.cli(*args, "--json").stdout)

    def job_file(self, name: str, script: str = "echo ok", **manifest) -> Path:
        manifest.setdefault("cwd", str(self.repo))
        return write_job(self.root / "jobs", name, script, **manifest)


@pytest.fixture(scope="module")
def cli_fleet(module_nats_server, tmp_path_factory):
    fleet = CliFleet(module_nats_server.url, tmp_path_factory.mktemp("cli"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def test_submit_wait_json_exits_zero_and_reports_the_final_stage(cli_fleet):
    f = cli_fleet.job_file("hello.md", 'echo "hello from $GF_FACTORY" > hello.txt', verify="test -f hello.txt",
                           review_policy="auto")
    out = cli_fleet.cli_json("submit", "--wait", "--timeout", "30", str(f))
    [job] = out["jobs"]
    assert job["file"] == str(f) and job["status"] == "created"
    assert out["final"][job["job"]]["stage"] == "shipped"
    assert (cli_fleet.repo / "hello.txt").read_text().strip() == f"hello from {FACTORY}"


def test_submit_of_an_invalid_file_exits_nonzero_naming_file_line_and_field(cli_fleet):
    before = cli_fleet.cli_json("jobs")["total"]
    good = cli_fleet.job_file("fine.md", "echo fine")
    bad = cli_fleet.job_file("typo.md", "echo typo", prioirty="high")
    assert bad.read_text().splitlines()[2] == "prioirty: high"  # line 3 of the file
    r = cli_fleet.cli("submit", str(good), str(bad), check=False)
    assert r.returncode != 0
    assert f"{bad}:3" in r.stderr and "prioirty" in r.stderr and "priority" in r.stderr, r.stderr
    assert str(good) not in r.stderr
    assert cli_fleet.cli_json("jobs")["total"] == before, "one invalid file submits none"


def test_jobs_status_factories_and_logs_show_a_finished_job(cli_fleet):
    f = cli_fleet.job_file("marker.md", 'echo "marker-7f3a on $GF_FACTORY attempt $GF_ATTEMPT"',
                           review_policy="auto")
    out = cli_fleet.cli_json("submit", "--wait", "--timeout", "30", str(f))
    job = out["jobs"][0]["job"]
    assert out["final"][job]["stage"] == "shipped"

    listed = {j["id"]: j for j in cli_fleet.cli_json("jobs")["jobs"]}
    assert listed[job]["stage"] == "shipped" and listed[job]["attempt"] == 1

    st = cli_fleet.cli_json("status", job)
    assert st["job"]["id"] == job and st["job"]["stage"] == "shipped"
    assert [a["factory"] for a in st["record"]["attempts"]] == [FACTORY]
    assert st["record"]["attempts"][0]["usage"] is None  # a shell run reports no usage: null, not zeros
    kinds = [e["kind"] for e in st["events"]]
    assert kinds[0] == "submitted" and "claimed" in kinds and "finished" in kinds

    facs = {x["id"]: x for x in cli_fleet.cli_json("factories")["factories"]}
    assert facs[FACTORY]["live"] and len(facs[FACTORY]["stations"]) == 2
    assert "engine:shell" in facs[FACTORY]["capabilities"]

    # The human-readable forms, as an operator reads them.
    text = cli_fleet.cli("factories").stdout
    assert f"{FACTORY}  up (live, push)" in text
    # Every station is either busy with a job or idle with a reason (no dark idle).
    stations = re.findall(r"station (\d+): (busy \S+ e\d+|idle: [a-z-]+)", text)
    assert sorted(i for i, _ in stations) == ["0", "1"], text
    assert "idle: None" not in text
    text = cli_fleet.cli("jobs").stdout
    assert job in text and "shipped" in text
    text = cli_fleet.cli("status", job).stdout
    assert f"job {job}  stage shipped" in text and "claimed" in text and "why:" in text

    r = cli_fleet.cli("logs", job)
    assert f"marker-7f3a on {FACTORY} attempt 1" in r.stdout

    r = cli_fleet.cli("status", "no-such-job", check=False)
    assert r.returncode != 0 and "no-such-job" in r.stderr


def test_cancel_requeue_and_ship(cli_fleet):
    stuck = cli_fleet.job_file("stuck.md", "echo never", capabilities=["has:unobtainium"])
    job = cli_fleet.cli_json("submit", str(stuck))["jobs"][0]["job"]

    cancelled = cli_fleet.cli_json("cancel", job)["job"]
    assert cancelled["stage"] == "failed" and cancelled["epoch"] == 1
    requeued = cli_fleet.cli_json("requeue", job)["job"]
    assert requeued["stage"] == "queued" and requeued["epoch"] == 2
    r = cli_fleet.cli("ship", job, check=False)
    assert r.returncode == 1 and "queued" in r.stderr, r.stderr
    assert cli_fleet.cli_json("status", job)["job"]["stage"] == "queued"

    gated = cli_fleet.job_file("gated.md", "echo gated", verify="true", review_policy="manual")
    out = cli_fleet.cli_json("submit", "--wait", "--timeout", "30", str(gated))
    gjob = out["jobs"][0]["job"]
    assert out["final"][gjob]["stage"] == "testing"
    r = cli_fleet.cli("ship", gjob)
    assert f"{gjob} shipped: now shipped" in r.stdout
    assert cli_fleet.cli_json("status", gjob)["job"]["stage"] == "shipped"
    assert os.path.isdir(cli_fleet.root / "factory-data" / FACTORY)


def test_logs_follow_streams_live_output_until_the_job_comes_to_rest(cli_fleet):
    gate = cli_fleet.root / "follow.gate"
    job = cli_fleet.cli_json("submit", str(cli_fleet.job_file(
        "follow.md", f'echo first-line\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\necho second-line',
        review_policy="auto")))["jobs"][0]["job"]
    wait_until(lambda: cli_fleet.cli_json("status", job)["job"]["stage"] == "building", 20, what="job building")
    follower = subprocess.Popen([*gigafactory_cmd(), "logs", job, "--follow", "--nats", cli_fleet.url],
                                env=cli_fleet.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The follower is subscribed once it is waiting; release the job and collect everything.
        wait_until(lambda: follower.poll() is None, 5)
        gate.write_text("go")
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    assert "second-line" in out, f"live or stored output missing: {out!r}"
    assert cli_fleet.cli_json("status", job)["job"]["stage"] == "shipped"


def test_up_with_an_inbox_runs_a_dropped_job_file(module_nats_server, tmp_path):
    env = fast_env()
    env["GIGAFACTORY_HOME"] = str(tmp_path / "home")
    env.pop("GIGAFACTORY_NATS_URL", None)
    inbox = tmp_path / "inbox"
    repo = tmp_path / "repo"
    repo.mkdir()
    up = Proc([*gigafactory_cmd(), "up", "--nats", module_nats_server.url, "--inbox", str(inbox),
               "--cap", "up-test:yes"], tmp_path / "up.log", env)
    try:
        wait_until(lambda: inbox.is_dir(), 30, what="the inbox folder exists")
        write_job(inbox, "dropped.md", f'echo dropped > "{repo}/dropped.txt"', cwd=str(repo),
                  capabilities=["up-test:yes"], review_policy="auto")
        job_file = inbox / ".submitted" / "dropped.md.job"
        wait_until(job_file.exists, 30, what="the inbox picked the file up")
        job = job_file.read_text().strip()

        def shipped():
            r = subprocess.run([*gigafactory_cmd(), "status", job, "--json", "--nats", module_nats_server.url],
                               env=env, capture_output=True, text=True, timeout=30)
            return r.returncode == 0 and json.loads(r.stdout)["job"]["stage"] == "shipped"

        wait_until(shipped, 30, what="the dropped job shipped")
        assert (repo / "dropped.txt").read_text().strip() == "dropped"
    finally:
        up.close()
    assert "Traceback" not in up.output(), up.output()


def test_fence_lets_a_script_push_only_while_it_holds_the_lease(cli_fleet):
    f = cli_fleet.job_file("fenced-push.md", 'gigafactory fence && echo "fence-ok $GF_EPOCH" > fence.txt',
                           review_policy="auto", verify="grep -q fence-ok fence.txt")
    out = cli_fleet.cli_json("submit", "--wait", "--timeout", "30", str(f))
    job = out["jobs"][0]["job"]
    assert out["final"][job]["stage"] == "shipped"
    assert (cli_fleet.repo / "fence.txt").read_text().strip() == "fence-ok 1"
    # Once the job has moved on, the same question gets a no: a late push must not go out.
    r = cli_fleet.cli("fence", "--job", job, "--epoch", "1", "--factory", FACTORY, check=False)
    assert r.returncode == 1 and "stale epoch 1" in r.stderr
    r = cli_fleet.cli("fence", "--job", "no-such-job", "--epoch", "1", "--factory", FACTORY, check=False)
    assert r.returncode == 1


def test_fence_renews_the_lease_by_compare_and_set_and_demands_lease_left(cli_fleet):
    """`gigafactory fence` in a real job on a real factory: a renewal of the lease by the holder
    (the record's revision moves, written by the fence itself), exit 3 when less than
    --min-remaining-s is left after it, exit 1 for another epoch or another factory; and the
    factory's own renewal loop goes on beside it: the job ships without a fenced write."""
    import asyncio

    from gigafactory.broker import Broker
    from gigafactory.schemas import names
    from gigafactory.schemas.records import JobRecord, decode
    from helpers import fast_settings

    ttl_s = fast_settings().lease_ttl_s  # the factory's engines inherit it ($GIGAFACTORY_LEASE_TTL_S)
    out = cli_fleet.root / "fence-cas.out"
    gate = cli_fleet.root / "fence-cas.gate"
    script = (
        f'out="{out}"\n'
        'gigafactory fence --json > "$out.good.json"; echo "good $?" > "$out.1"\n'
        f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'
        # A minimum of (nearly) the whole TTL: some microseconds always pass after the write.
        f'gigafactory fence --json --min-remaining-s {ttl_s * (1 - 1e-6)!r} > "$out.short.json"; echo "short $?" >> "$out.1"\n'
        'gigafactory fence --epoch $((GF_EPOCH + 7)); echo "other-epoch $?" >> "$out.1"\n'
        'gigafactory fence --factory someone-else; echo "other-factory $?" >> "$out.1"\n'
        'mv "$out.1" "$out"\n'
    )
    f = cli_fleet.job_file("fence-cas.md", script, review_policy="auto", verify=f'test -f "{out}"')
    job = cli_fleet.cli_json("submit", str(f))["jobs"][0]["job"]
    good_json = Path(f"{out}.good.json")
    wait_until(lambda: Path(f"{out}.1").exists(), 30, what="the job's first fence returned")
    good = json.loads(good_json.read_text())
    assert good["code"] == 0 and good["held"] is True, good
    assert good["remaining_s"] >= good["min_remaining_s"] == ttl_s / 2, good
    assert good["revision"] > good["read_revision"] > 0, good

    async def written_by_the_fence():
        b = await Broker.open(cli_fleet.url, "test-fence-reader", fast_settings(), ensure=False)
        try:
            got = []
            for seq in (good["read_revision"], good["revision"]):
                m = await b.js.get_msg(b.jobs.stream, seq=seq)
                assert m.subject == f"$KV.{names.JOBS_BUCKET}.{job}", m.subject
                got.append(decode(m.data, JobRecord))
            return got
        finally:
            await b.close()

    before, after = asyncio.run(written_by_the_fence())
    assert after.lease.factory == FACTORY and after.lease.epoch == after.epoch == 1
    assert after.lease.renewals == before.lease.renewals + 1, (before.lease, after.lease)
    gate.write_text("go")

    wait_until(out.exists, 60, what="the job's fences all returned")
    assert out.read_text().split("\n")[:-1] == ["good 0", "short 3", "other-epoch 1", "other-factory 1"], out.read_text()
    short = json.loads(Path(f"{out}.short.json").read_text())
    assert short["code"] == 3 and short["held"] is False and short["remaining_s"] < short["min_remaining_s"], short
    assert short["revision"] > short["read_revision"], "a lease too short to use was still renewed, by CAS"

    def at_rest():
        st = cli_fleet.cli_json("status", job)
        return st if st["job"]["stage"] in ("shipped", "failed", "dead_letter") else None

    st = wait_until(at_rest, 30, what="the job came to rest")
    assert st["job"]["stage"] == "shipped", st["job"]
    assert [(a["factory"], a["epoch"]) for a in st["record"]["attempts"]] == [(FACTORY, 1)]
    assert "fenced" not in [e["kind"] for e in st["events"]], "the factory's renewals lost to the fence's"


def test_fence_exit_codes_without_a_lease_to_renew(tmp_path):
    """Usage errors exit 2 naming the option; an unreachable broker exits 4 (cannot tell), never 0."""
    from gigafactory.embedded import free_port

    env = fast_env()
    env["GIGAFACTORY_HOME"] = str(tmp_path / "home")
    base = [*gigafactory_cmd(), "fence", "--job", "j", "--epoch", "1", "--factory", "f"]
    r = subprocess.run([*base, "--nats", "nats://127.0.0.1:1", "--min-remaining-s", "2.0"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--min-remaining-s" in r.stderr and "less than the lease TTL (2s)" in r.stderr, r.stderr
    r = subprocess.run([*base, "--nats", f"nats://127.0.0.1:{free_port()}", "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, (r.returncode, r.stderr)
    out = json.loads(r.stdout)
    assert out["held"] is False and out["code"] == 4 and "treat as fenced" in out["reason"]
    assert r.stderr.strip().count("\n") == 0 and "treat as fenced" in r.stderr


@pytest.mark.parametrize("env, named", [
    ({"GIGAFACTORY_FENCE_MARGIN_S": "0.01"}, "GIGAFACTORY_FENCE_MARGIN_S"),
    ({"GIGAFACTORY_LEASE_TTL_S": "fifteen"}, "GIGAFACTORY_LEASE_TTL_S"),
    ({"GIGAFACTORY_UNSAFE_UNFENCED_ENGINES": "maybe"}, "GIGAFACTORY_UNSAFE_UNFENCED_ENGINES"),
])
def test_a_bad_setting_stops_a_factory_at_once_with_one_line_naming_it(tmp_path, env, named):
    """Refused before the factory waits for any broker (it would wait forever), and as an
    error a person reads, not a traceback."""
    full = {**os.environ, "GIGAFACTORY_HOME": str(tmp_path), **env}
    r = subprocess.run([*gigafactory_cmd(), "factory", "--nats", "nats://127.0.0.1:1"], env=full,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "invalid setting" in r.stderr and named in r.stderr
    assert "waiting for the broker" not in r.stderr


def test_an_attempts_usage_reads_as_one_line_without_made_up_counts():
    from gigafactory.cli import format_usage

    assert format_usage({"model": "claude-sonnet-4-5", "input_tokens": 44264, "output_tokens": 44,
                         "cache_read_tokens": 0, "turns": 2, "tool_calls": 1, "cost_usd": 0.133452,
                         "cost_source": "reported"}) == (
        "claude-sonnet-4-5, in 44264, out 44, cache-read 0, turns 2, tool calls 1, $0.1335 (reported)")
    assert format_usage({"input_tokens": 5, "cost_source": "unknown"}) == "in 5, cost unknown"
    assert format_usage({"output_tokens": 1, "cost_usd": 0.5, "cost_source": "priced", "price_table": "2026-11"}) == (
        "out 1, $0.5000 (priced 2026-11)")


@pytest.mark.parametrize("args", [["jobs", "--json"], ["jobs"], ["status", "some-job", "--json"]])
def test_an_unreachable_broker_is_one_clean_error_not_tracebacks(args):
    """Every API command connects through one path: no nats-py traceback reaches the user,
    the error names the URL, and --json stays JSON. Exit 4: unavailable (cannot tell), as fence."""
    r = subprocess.run([*gigafactory_cmd(), *args, "--nats", "nats://127.0.0.1:1"], env=fast_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "cannot connect to nats://127.0.0.1:1" in r.stderr + r.stdout
    if "--json" in args:
        assert "cannot connect" in json.loads(r.stdout)["error"]
