"""``gigafactory up`` is secure without set-up, and ``gigafactory creds create|list|revoke``
enrol and revoke identities on its running broker: real processes, a real ``nats-server``."""

from __future__ import annotations

import asyncio
import json
import subprocess

import nats
import pytest
from helpers import Proc, fast_env, gigafactory_cmd, run, wait_until

from gigafactory.identity import read_creds

pytestmark = pytest.mark.timeout(180)


def _env(home) -> dict[str, str]:
    env = fast_env()
    env["GIGAFACTORY_HOME"] = str(home)
    for k in ("GIGAFACTORY_NATS_URL", "GIGAFACTORY_CREDS"):  # the home's own broker and identities
        env.pop(k, None)
    return env


def _gf(env, *args, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*gigafactory_cmd(), *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def test_up_runs_with_authentication_and_creds_enrol_and_revoke_a_machine(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    up = Proc([*gigafactory_cmd(), "up", "--stations", "1"], tmp_path / "up.log", env)
    try:
        state = wait_until(lambda: (home / "server.json").exists() and json.loads((home / "server.json").read_text()),
                           60, what="the embedded broker's state file")
        url = state["url"]
        # First start made the store: admin, coordinator, the local factory.
        listed = json.loads(_gf(env, "creds", "list", "--json").stdout)["identities"]
        assert {(i["name"], i["role"]) for i in listed} == {
            ("admin", "admin"), ("coordinator", "coordinator"), ("factory-local", "factory")}
        # The CLI acts as the home's admin by default: the coordinator (itself `coordinator`) answers.
        wait_until(lambda: _gf(env, "factories", "--json").returncode == 0, 60, what="factories answers as admin")
        assert "factory-local" in _gf(env, "factories", "--json").stdout

        made = _gf(env, "creds", "create", "factory", "box1", "--out", str(tmp_path / "box1.creds"), "--json")
        assert made.returncode == 0, made.stderr
        seed = read_creds(tmp_path / "box1.creds").seed
        assert seed not in made.stdout + made.stderr  # never printed
        assert json.loads(made.stdout)["reloaded"] is True

        async def body():
            async def quiet(_e):
                pass

            with pytest.raises(Exception, match="Authorization Violation"):  # no credentials: refused
                await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, error_cb=quiet)
            closed = asyncio.Event()

            async def on_closed():
                closed.set()

            nc = await nats.connect(url, nkeys_seed_str=seed, error_cb=quiet, closed_cb=on_closed,
                                    max_reconnect_attempts=2, reconnect_time_wait=0.1)
            assert (await nc.request("$JS.API.INFO", b"", timeout=5)).data  # enrolled: it works
            revoked = await asyncio.to_thread(_gf, env, "creds", "revoke", "box1", "--json")
            assert revoked.returncode == 0 and json.loads(revoked.stdout)["reloaded"] is True, revoked.stderr
            await asyncio.wait_for(closed.wait(), 30)  # the broker dropped it and refuses it now
            with pytest.raises(Exception, match="Authorization Violation"):
                await nats.connect(url, nkeys_seed_str=seed, allow_reconnect=False, max_reconnect_attempts=1,
                                   error_cb=quiet)
        run(body(), 90)
        listed = json.loads(_gf(env, "creds", "list", "--json").stdout)["identities"]
        assert [i["revoked"] for i in listed if i["name"] == "box1"] == [True]
    finally:
        up.close()


def test_revoking_a_factory_reclaims_its_leases_at_once_not_at_expiry(tmp_path):
    """A factory (its own identity, enrolled with creds create) runs a job with a 60 s lease; its
    revocation makes the coordinator reclaim the job at the next reaper pass, with a bumped
    epoch (the fence), long before the lease would expire."""
    from helpers import write_job

    home = tmp_path / "home"
    env = _env(home)
    env.update(GIGAFACTORY_LEASE_TTL_S="60", GIGAFACTORY_LEASE_RENEW_S="5")
    up = Proc([*gigafactory_cmd(), "up", "--stations", "1"], tmp_path / "up.log", env)
    box = None
    try:
        wait_until(lambda: (home / "server.json").exists() and json.loads((home / "server.json").read_text()),
                   60, what="the embedded broker")
        assert _gf(env, "creds", "create", "factory", "box1", "--out", str(tmp_path / "box1.creds")).returncode == 0
        box = Proc([*gigafactory_cmd(), "factory", "--creds", str(tmp_path / "box1.creds"), "--stations", "1",
                    "--cap", "tier:box1", "--no-probe", "--workspace", str(tmp_path / "w"),
                    "--data-dir", str(tmp_path / "d")], tmp_path / "box1.log", env)
        job_file = write_job(tmp_path / "jobs", "long.md", "sleep 120", capabilities=["tier:box1"], timeout="5m",
                         cwd=str(tmp_path))
        out = _gf(env, "submit", str(job_file), "--json")
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)["jobs"][0]["job"]

        def status():
            r = _gf(env, "status", job, "--json")
            return json.loads(r.stdout)["job"] if r.returncode == 0 else None

        held = wait_until(lambda: (s := status()) and s["stage"] == "building" and s, 60, what="box1 runs the job")
        assert held["holder"] == "box1", held
        revoked = _gf(env, "creds", "revoke", "box1", "--json")
        assert json.loads(revoked.stdout)["leases_reclaimed"] is True, revoked.stdout + revoked.stderr
        # Within a few reaper passes (well inside the 60 s lease): back in the queue, epoch bumped.
        after = wait_until(lambda: (s := status()) and s["stage"] == "queued" and s, 30,
                           what="the revoked factory's job reclaimed")
        assert after["epoch"] > held["epoch"] and after["holder"] is None
    finally:
        if box is not None:
            box.close()
        up.close()
