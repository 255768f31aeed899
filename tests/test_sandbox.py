"""The engine sandbox (factory/sandbox.py): under bubblewrap a job writes its worktree and
nothing else, and cannot read the factory's data folder; it still ships."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import Fleet, fast_settings, run

from gigafactory.config import Settings, SettingsError
from gigafactory.factory.sandbox import Sandbox, SandboxUnavailable, bwrap_args, make_sandbox

pytestmark = pytest.mark.timeout(90)


def test_bwrap_arguments_hide_then_show_then_bind_the_worktree(tmp_path):
    data, git, wt = tmp_path / "data", tmp_path / "data" / "git", tmp_path / "wt"
    for d in (data, git, wt):
        d.mkdir(parents=True, exist_ok=True)
    creds = tmp_path / "f.creds"
    creds.write_text("x")
    args = bwrap_args(str(wt), [str(data), str(creds), str(tmp_path / "missing")], ["/s.sh"], [str(git)])
    assert args[:9] == ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    order = [args.index(x) for x in (str(data), str(creds), str(git), str(wt), "/s.sh")]
    assert order == sorted(order), "hidden first, then shown, then the worktree, then readable files"
    assert args[args.index(str(creds)) - 2:args.index(str(creds))] == ["--ro-bind", "/dev/null"]
    assert str(tmp_path / "missing") not in args
    assert args[-2:] == ["--chdir", str(wt)]
    box = Sandbox("bwrap", (str(data),), "/usr/bin/bwrap")
    assert box.wrap(["bash", "x"], cwd=str(wt))[-3:] == ["--", "bash", "x"]
    assert Sandbox("none").wrap(["a"], cwd="/") == ["a"]


def test_the_sandbox_setting_is_checked():
    with pytest.raises(SettingsError, match="GIGAFACTORY_ENGINE_SANDBOX"):
        Settings(engine_sandbox="docker").validate()
    with pytest.raises(SettingsError, match="GIGAFACTORY_ENGINE_SANDBOX_USER"):
        Settings(engine_sandbox="user").validate()
    with pytest.raises(SandboxUnavailable, match="one of"):
        make_sandbox("chroot", hidden=[])
    assert make_sandbox("none", hidden=[]) is None


INSIDE = """```sh
echo inside > inside.txt && cat inside.txt
```
"""


@pytest.fixture
def outside():
    """A writable folder outside /tmp (the sandbox's /tmp is private anyway)."""
    d = Path(tempfile.mkdtemp(prefix="gf-sandbox-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_bwrap_hides_a_data_folder_and_keeps_the_rest_read_only(outside):
    assert shutil.which("bwrap"), "bubblewrap is installed by .ci/run (apt-get install bubblewrap)"
    data, wt = outside / "data", outside / "wt"
    (data / "git").mkdir(parents=True)
    wt.mkdir()
    (data / "secret").write_text("factory-private")
    (data / "git" / "mirror").write_text("objects")
    box = make_sandbox("bwrap", hidden=[str(data)], shown=[str(data / "git")])
    script = (f"cat {data}/secret; cat {data}/git/mirror; echo in > {wt}/in.txt; echo out > {outside}/out.txt; "
              f"echo t > /tmp/t.txt; cat /tmp/t.txt")
    res = subprocess.run(box.wrap(["bash", "-c", script], cwd=str(wt)), capture_output=True, text=True, timeout=30)
    assert "factory-private" not in res.stdout and "No such file" in res.stderr
    assert "objects" in res.stdout, "the git mirrors are shown again, read-only"
    assert (wt / "in.txt").read_text() == "in\n" and not (outside / "out.txt").exists()
    assert "Read-only file system" in res.stderr and "t\n" in res.stdout
    assert not Path("/tmp/t.txt").exists() or Path("/tmp/t.txt").read_text() != "t\n"


def test_under_bwrap_a_job_writes_only_its_worktree_cannot_read_the_factory_and_still_ships(nats_server, tmp_path,
                                                                                            outside):
    assert shutil.which("bwrap"), "bubblewrap is installed by .ci/run (apt-get install bubblewrap)"

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(engine_sandbox="bwrap")) as fleet:
            f = await fleet.add_factory("f1")
            secret = f.dir / "secret.txt"  # stands for the factory's logs, outbox, credentials
            secret.write_text("factory-private\n")
            ok = await fleet.submit_one(fleet.job(INSIDE, review_policy="auto"))
            rec = await fleet.wait_stage(ok, "shipped", "failed", "dead_letter", timeout_s=30)
            assert str(rec.stage) == "shipped", rec.attempts[-1].detail
            assert (fleet.repo / "inside.txt").read_text() == "inside\n"

            write_out = await fleet.submit_one(fleet.job(
                f'echo escaped > {outside}/x.txt', review_policy="auto", retry={"max": 0}), path="w.md")
            read_factory = await fleet.submit_one(fleet.job(
                f'cat {secret} > leaked.txt', review_policy="auto", retry={"max": 0}), path="r.md")
            for job in (write_out, read_factory):
                rec = await fleet.wait_stage(job, "failed", "dead_letter", "shipped", timeout_s=30)
                assert str(rec.stage) in ("failed", "dead_letter"), (job, rec.stage)
            assert not (outside / "x.txt").exists()
            assert not (fleet.repo / "leaked.txt").exists() or "factory-private" not in (
                fleet.repo / "leaked.txt").read_text()
            logs = b"".join(p.read_bytes() for p in (f.dir / "logs").glob("*.log"))
            assert b"Read-only file system" in logs and b"No such file or directory" in logs, logs[-2000:]

    run(main(), 80)


def test_without_the_sandbox_the_same_write_outside_succeeds(nats_server, tmp_path, outside):
    """The control: the refusal above is the sandbox's doing."""

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job(f'echo escaped > {outside}/x.txt', review_policy="auto"))
            await fleet.wait_stage(job, "shipped", timeout_s=30)
            assert (outside / "x.txt").read_text() == "escaped\n"

    run(main(), 60)


def test_user_mode_runs_the_engine_as_an_unprivileged_user(outside):
    """As root here: ``nobody`` stands for the dedicated user (no system change needed)."""
    import os

    assert os.geteuid() == 0, "the user mode is tested where the tests run as root (CI's container)"
    with pytest.raises(SandboxUnavailable, match="not a user here"):
        make_sandbox("user", hidden=[], user="no-such-user-gf")
    with pytest.raises(SandboxUnavailable, match="is root"):
        make_sandbox("user", hidden=[], user="root")
    box = make_sandbox("user", hidden=[], user="nobody")
    outside.chmod(0o711)  # mkdtemp's 0700 would keep the user out of everything
    shared, private = outside / "shared", outside / "private"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    private.mkdir(mode=0o700)
    (private / "secret").write_text("factory-private")
    script = f"id -u; echo in > {shared}/in.txt; echo out > {private}/out.txt; cat {private}/secret"
    res = subprocess.run(box.wrap(["bash", "-c", script], cwd=str(shared)), capture_output=True, text=True,
                         timeout=30, cwd=str(shared))
    assert res.stdout.splitlines()[0] == "65534"
    assert (shared / "in.txt").read_text() == "in\n" and (shared / "in.txt").stat().st_uid == 65534
    assert not (private / "out.txt").exists() and "factory-private" not in res.stdout
    assert res.stderr.count("Permission denied") == 2, res.stderr


def test_under_bwrap_a_repo_job_edits_its_worktree_runs_git_status_and_ships_its_branch(nats_server, tmp_path):
    """A git worktree under the sandbox: the engine edits files and reads git (its worktree's
    own git metadata is writable, the shared mirror read-only, so its own `git add` fails);
    the factory commits and pushes."""
    from test_workspace import branches, make_remote, repo_job

    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(engine_sandbox="bwrap")) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(
                "echo sandboxed > sandboxed.txt && git status --porcelain > status.txt && "
                "if git add sandboxed.txt; then echo added; else echo 'git add refused'; fi && rm status.txt",
                repo=str(remote), review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=40)
            assert str(rec.stage) == "shipped", rec.attempts[-1].detail
            w = rec.attempts[-1].workspace
            assert w is not None and w.pushed and branches(remote)[w.branch] == w.head
            assert w.files_changed == 1
            log = "".join(p.read_text() for p in (tmp_path / "factories" / "f1" / "logs").glob(f"{job}-*.log"))
            assert "git add refused" in log and "Read-only file system" in log, log

    run(main(), 80)
