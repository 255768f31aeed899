"""`gigafactory fence` from a job, through the attempt's fence socket (issue 12, "Secrets";
issue 8): the factory renews for the job, which holds no broker credential. Real broker with
authentication, real factory, real job scripts; the pure request rules without I/O."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
from helpers import Fleet, Proc, eventually, fast_env, fast_settings, kill_group, run

from gigafactory.factory import fence_socket as fs

pytestmark = pytest.mark.timeout(90)


# -- the request, pure ----------------------------------------------------------------------


def test_a_request_is_one_bounded_json_line_naming_its_fields():
    req = fs.parse_request(b'{"job": "j", "epoch": 3, "factory": "f", "min_remaining_s": 1.5}\n')
    assert (req.job, req.epoch, req.factory, req.min_remaining_s) == ("j", 3, "f", 1.5)
    assert fs.parse_request(b'{"job": "j", "epoch": 3, "factory": "f"}').min_remaining_s is None
    with pytest.raises(fs.FenceRequestError, match="more than 1024"):
        fs.parse_request(b'{"job": "' + b"x" * 1100 + b'"}')
    with pytest.raises(fs.FenceRequestError, match="epoch"):
        fs.parse_request(b'{"job": "j", "epoch": "three", "factory": "f"}')
    with pytest.raises(fs.FenceRequestError, match="JSON"):
        fs.parse_request(b"renew please")
    with pytest.raises(fs.FenceRequestError):
        fs.parse_request(b'{"job": "j", "epoch": 1, "factory": "f", "as": "admin"}')  # no other field


def test_a_socket_answers_only_for_its_own_job_epoch_and_factory():
    req = fs.FenceRequest(job="j", epoch=2, factory="f")
    assert fs.mismatch(req, "j", 2, "f") is None
    assert "stale epoch 2" in fs.mismatch(req, "j", 3, "f")
    assert "serves job k" in fs.mismatch(req, "k", 2, "f")
    assert "does not hold" in fs.mismatch(req, "j", 2, "g")


def test_the_socket_is_private_bounded_and_gone_when_closed(tmp_path):
    """Mode 0600 in a 0700 folder; an oversized request is answered ``usage`` without calling
    the renewal; a second request while one is in progress is answered ``unknown``, not queued;
    closed, the socket and its folder are gone."""
    calls: list[float | None] = []
    release = asyncio.Event()

    async def renew(want_s):
        calls.append(want_s)
        await release.wait()
        return {"outcome": "held", "reason": "ok"}

    async def main():
        sock = await fs.serve(renew, job="j", epoch=1, factory="f", renew_timeout_s=5.0, base=str(tmp_path))
        try:
            assert stat.S_IMODE(os.stat(sock.path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(sock.folder).st_mode) == 0o700
            reader, writer = await asyncio.open_unix_connection(sock.path)
            writer.write(b"x" * (fs.FENCE_REQUEST_MAX_BYTES * 4) + b"\n")
            await writer.drain()
            got = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert b'"usage"' in got and calls == []
            first = asyncio.create_task(fs.ask(sock.path, fs.FenceRequest(job="j", epoch=1, factory="f"), 5))
            await eventually(lambda: calls, 5, what="the first request reached the renewal")
            second = await fs.ask(sock.path, fs.FenceRequest(job="j", epoch=1, factory="f"), 5)
            assert second["outcome"] == "unknown" and "in progress" in second["reason"]
            release.set()
            assert (await first)["outcome"] == "held" and calls == [None]
        finally:
            await sock.close()
        assert not os.path.exists(sock.path) and not os.path.exists(sock.folder)
        with pytest.raises(OSError):
            await fs.ask(sock.path, fs.FenceRequest(job="j", epoch=1, factory="f"), 5)

    run(main())


# -- real jobs on a real factory ------------------------------------------------------------


def test_a_job_whose_lease_moved_is_refused_on_its_own_socket(nats_server, tmp_path):
    """The job is cancelled under it (the record moves to a new epoch); its fence on its own,
    still open socket exits 1 (fenced), never 0. Renewals are rare here, so the factory learns
    of the move from the fence's own compare-and-set, not before (the job also ignores SIGTERM,
    in case a renewal comes first: it runs on for the kill grace)."""
    d = tmp_path / "side"
    d.mkdir()
    script = (f'trap "" TERM\n'
              f'echo "$GF_FENCE_SOCKET" > {d}/sock\n'
              f'while [ ! -e {d}/gate ]; do sleep 0.05; done\n'
              f'gigafactory fence; echo "moved $?" > {d}/out.1; mv {d}/out.1 {d}/out\n'
              f'sleep 30\n')

    async def main():
        settings = fast_settings(lease_ttl_s=60.0, lease_renew_s=20.0)
        async with Fleet(nats_server.url, tmp_path, settings, server=nats_server) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job(script, retry={"max": 0}))
            await eventually(lambda: (d / "sock").exists(), 20, what="the job started")
            await fleet.client.cancel(job, reason="the lease moves")
            (d / "gate").write_text("go")
            await eventually(lambda: (d / "out").exists(), 20, what="the job's fence returned")
            assert (d / "out").read_text().split() == ["moved", "1"]
            await fleet.wait_stage(job, "failed", "cancelled", timeout_s=20)  # a cancel ends it failed
            sock = (d / "sock").read_text().strip()
            await eventually(lambda: not os.path.exists(sock), 20, what="the socket removed with its attempt")

    run(main(), 80)


def test_a_second_epoch_fences_on_its_own_socket_and_the_first_ones_is_gone(nats_server, tmp_path):
    """Attempt 1 (epoch 1) notes its socket and fails; attempt 2 fences as holder on its own
    socket (0), cannot use the first attempt's (removed: 4, cannot tell), and its own socket
    refuses epoch 1 (1)."""
    d = tmp_path / "side"
    d.mkdir()
    script = (f'if [ "$GF_ATTEMPT" = 1 ]; then echo "$GF_FENCE_SOCKET $GF_EPOCH" > {d}/first; exit 1; fi\n'
              f'echo "$GF_FENCE_SOCKET $GF_EPOCH" > {d}/second\n'
              f'gigafactory fence; echo "own $?" > {d}/out.1\n'
              f'GF_FENCE_SOCKET="$(cut -d" " -f1 {d}/first)" gigafactory fence --epoch "$(cut -d" " -f2 {d}/first)"'
              f'; echo "first-socket $?" >> {d}/out.1\n'
              f'gigafactory fence --epoch "$(cut -d" " -f2 {d}/first)"; echo "first-epoch $?" >> {d}/out.1\n'
              f'mv {d}/out.1 {d}/out\n')

    async def main():
        async with Fleet(nats_server.url, tmp_path, server=nats_server) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(fleet.job(script, retry={"max": 1, "backoff": "0s"}, review_policy="auto"))
            await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=40)
            first_sock, first_epoch = (d / "first").read_text().split()
            second_sock, second_epoch = (d / "second").read_text().split()
            assert first_sock != second_sock and int(second_epoch) > int(first_epoch)
            assert (d / "out").read_text().split("\n")[:-1] == ["own 0", "first-socket 4", "first-epoch 1"]
            assert not os.path.exists(first_sock)
            await eventually(lambda: not os.path.exists(second_sock), 10,
                             what="the socket removed with its attempt (after its result)")

    run(main(), 80)


def test_under_bwrap_a_job_fences_through_its_socket(nats_server, tmp_path):
    assert shutil.which("bwrap"), "bubblewrap is installed by .ci/run (apt-get install bubblewrap)"

    async def main():
        async with Fleet(nats_server.url, tmp_path, fast_settings(engine_sandbox="bwrap"), server=nats_server) as fleet:
            f = await fleet.add_factory("f1")
            assert f.sandbox is not None and f.sandbox.mode == "bwrap"
            job = await fleet.submit_one(fleet.job(
                'gigafactory fence; echo "fence $?" > fence.txt',
                review_policy="auto"))
            rec = await fleet.wait_stage(job, "shipped", "failed", "dead_letter", timeout_s=40)
            assert str(rec.stage) == "shipped", rec.attempts[-1].detail
            assert (fleet.repo / "fence.txt").read_text().split() == ["fence", "0"]

    run(main(), 80)


# -- folders left by killed factories -----------------------------------------------------------


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _refusing_socket(path) -> None:
    """A socket file nobody serves any more, as a SIGKILLed factory leaves it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


@pytest.fixture
def short_tmp():
    """A folder with a short path (a socket's path has at most 108 bytes; pytest's are long)."""
    d = tempfile.mkdtemp(prefix="gft-", dir="/tmp")
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_the_sweep_removes_only_folders_whose_process_is_gone_and_whose_socket_nobody_serves(short_tmp):
    tmp_path = short_tmp
    dead = _dead_pid()
    stale = tmp_path / f"gf-fence-{dead}-abcd1234"
    stale.mkdir()
    _refusing_socket(stale / "fence.sock")
    empty = tmp_path / f"gf-fence-{dead}-nosocket"  # killed between the folder and its socket
    empty.mkdir()
    alive = tmp_path / f"gf-fence-{os.getppid()}-efgh5678"  # a running process's: kept
    alive.mkdir()
    _refusing_socket(alive / "fence.sock")
    old_name = tmp_path / "gf-fence-k2j4h5g6"  # the older naming says nothing of its process: kept
    old_name.mkdir()
    other = tmp_path / f"gf-fenced-{dead}-x"  # not ours at all
    other.mkdir()
    served = tmp_path / f"gf-fence-{dead}-served00"  # another pid namespace's live factory: kept
    served.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(served / "fence.sock"))
    listener.listen(1)
    try:
        assert fs.sweep_stale_folders([str(tmp_path)]) == 2
    finally:
        listener.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, old_name.name, other.name, served.name])


def test_a_factory_sweeps_the_socket_folder_a_sigkilled_factory_left_behind(nats_server, tmp_path, short_tmp):
    """A factory killed mid-run cannot remove its attempt's socket folder; the next factory
    started with the same temporary folder does."""
    tmp = short_tmp
    d = tmp_path / "side"
    d.mkdir()

    def factory(name: str) -> Proc:
        return Proc([sys.executable, "-m", "gigafactory", "factory", "--nats", nats_server.url, "--id", name,
                     "--no-probe", "--stations", "1", "--data-dir", str(tmp_path / f"{name}-data"),
                     "--workspace", str(tmp_path / f"{name}-work")],
                    tmp_path / f"{name}.log", env={**fast_env(), "TMPDIR": str(tmp)})

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            victim = factory("victim")
            heir = None
            try:
                await eventually(lambda: "victim" in fleet.coordinator.view.factories, 30, what="victim registered")
                await fleet.submit_one(fleet.job(f'echo $$ > {d}/pid; echo "$GF_FENCE_SOCKET" > {d}/sock; '
                                                 'exec sleep 60', retry={"max": 0}))
                await eventually(lambda: (d / "sock").exists() and (d / "pid").exists(), 20, what="the job started")
                left = os.path.dirname((d / "sock").read_text().strip())
                assert os.path.dirname(left) == str(tmp) and os.path.basename(left).startswith(
                    f"gf-fence-{victim.p.pid}-")
                victim.signal(signal.SIGKILL)
                assert victim.wait(10) == -signal.SIGKILL
                kill_group(int((d / "pid").read_text()))
                assert os.path.isdir(left)  # nothing removed it
                heir = factory("heir")
                await eventually(lambda: not os.path.exists(left), 30, what="the heir swept the folder")
                # At least this one: the sweep also looks in /tmp, where other killed factories'
                # folders may be.
                swept = re.search(r"removed (\d+) fence socket folders", (tmp_path / "heir.log").read_text())
                assert swept and int(swept.group(1)) >= 1
            finally:
                victim.close()
                if heir is not None:
                    heir.close()

    run(main(), 80)
