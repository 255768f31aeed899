"""``gigafactory demo`` runs with authentication on, as ``gigafactory up`` (issue 12): an
identity store in its data folder, the coordinator and each factory as their own identity, the
demo's client as admin; every job still ends where its example says, and the broker refused
nothing any part of the fleet needed (no permission violation in its log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nats
import pytest
from helpers import run

from gigafactory.embedded import EmbeddedServer
from gigafactory.identity import IdentityStore, read_creds
from gigafactory.schemas import names


def test_the_demo_runs_every_part_as_its_own_identity_and_nothing_is_refused(tmp_path):
    root = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("GIGAFACTORY_CREDS", "GIGAFACTORY_NATS_URL")}
    out = subprocess.run([sys.executable, "-m", "gigafactory", "demo", "--dir", str(root), "--json"],
                         capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    result = json.loads(out.stdout)
    assert result["ok"], [j for j in result["jobs"] if not j["ok"]]
    store = IdentityStore(root / "identities")
    roles = {i.name: i.role for i in store.list()}
    assert roles == {"admin": "admin", "coordinator": "coordinator", "alpha": "factory", "beta": "factory",
                     "factory-local": "factory"}
    log = (root / "nats-server.log").read_text(encoding="utf-8", errors="replace")
    assert "Violation" not in log, [ln for ln in log.splitlines() if "Violation" in ln][:5]
    # The demo's broker store, served again with the demo's identities: it refuses a client
    # without credentials, and the job records carry holder signatures by each factory's own key.
    srv = EmbeddedServer(store_dir=str(root / "nats"), log_file=str(tmp_path / "again.log"), users=store.users()).start()
    try:
        signers = run(_signers(srv.url, read_creds(store.creds_path("admin")).seed), 60)
    finally:
        srv.stop()
    assert {store.get("alpha").public_key, store.get("beta").public_key} <= signers, signers


async def _signers(url: str, admin_seed: str) -> set[str]:
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    nc = await nats.connect(url, nkeys_seed_str=admin_seed, allow_reconnect=False, connect_timeout=5)
    try:
        kv = await nc.jetstream(timeout=10).key_value(names.JOBS_BUCKET)
        out: set[str] = set()
        for key in await kv.keys():
            for e in await kv.history(key):
                sig = json.loads(e.value or b"{}").get("sig") if e.value else None
                if sig:
                    out.add(sig.split(":", 1)[0])
        return out
    finally:
        await nc.close()
