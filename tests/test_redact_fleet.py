"""Redaction at the source, end to end (issue 12 "done"): a job prints the factory's
credentials in several ways, and nothing on the broker (every stream, so every KV bucket and
object store too, the live log subject, and the broker's files) nor on the factory's disk
outside the job's folder holds them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import Fleet, run

from gigafactory.schemas import names

pytestmark = pytest.mark.timeout(90)

KEY = "anthropic-literal-value-0123456789abcdef"
"""Not token-shaped: only the factory knowing it as its credential can redact it."""
GH = "ghp_" + "Zq" * 18
"""Token-shaped, and not a credential of the factory: the shape alone must catch it."""

PRINTS = r"""```sh
echo "plain: $ANTHROPIC_API_KEY"
printf 'split: %s' "${ANTHROPIC_API_KEY:0:13}"; sleep 0.3
printf '%s' "${ANTHROPIC_API_KEY:13:9}"; sleep 0.3
printf '%s end\n' "${ANTHROPIC_API_KEY:22}"
echo "noise>>>${ANTHROPIC_API_KEY}<<<noise" >&2
for i in 1 2 3; do printf 'line %s %s\n' "$i" "$(head -c 3000 /dev/zero | tr '\0' x)"; done
printf 'token: ghp_'; sleep 0.3; printf '%s\n' "$(printf 'Zq%.0s' $(seq 18))"
```
"""


def _scan_tree(root: Path, skip: Path, needles: list[bytes]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and skip not in p.parents:
            data = p.read_bytes()
            found += [f"{p}: {n[:12]!r}" for n in needles if n in data]
    return found


async def _scan_broker(admin, needles: list[bytes]) -> tuple[list[str], int]:
    """Every message of every stream, concatenated per stream (a secret split across two
    messages, two object chunks, is still found)."""
    found, seen = [], 0
    for info in await admin.js.streams_info():
        st = info.state
        blob = bytearray()
        for seq in range(st.first_seq, st.last_seq + 1) if st.messages else ():
            try:
                m = await admin.js.get_msg(info.config.name, seq)
            except Exception:  # a deleted message (KV history, purges)
                continue
            blob += (m.data or b"") + b"\0" + str(m.headers or {}).encode() + b"\0"
            seen += 1
        found += [f"stream {info.config.name}: {n[:12]!r}" for n in needles if n in blob]
    return found, seen


def test_a_job_printing_credentials_leaves_none_on_the_broker_or_the_factory_disk(nats_server, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    needles = [KEY.encode(), GH.encode(), KEY[:20].encode(), KEY[13:].encode()]

    # The factory's own log lines (its stderr, or the file `up` sends them to) are redacted
    # too: a handler like that one, on the root logger before the factory starts.
    stderr_log = tmp_path / "factory-stderr.log"
    handler = logging.FileHandler(stderr_log)
    logging.getLogger().addHandler(handler)

    async def main():
        live = bytearray()
        async with Fleet(nats_server.url, tmp_path) as fleet:
            async def heard(m):
                live.extend(m.data)

            sub = await fleet.admin.nc.subscribe(names.logs_subject("*"), cb=heard)
            await fleet.add_factory("f1", caps=["cred:anthropic_api_key"])
            # What a failing git push to a token-bearing remote makes the factory log.
            logging.getLogger("gigafactory.factory.workspace").warning(
                "push failed: fatal: unable to access 'https://x:%s@github.com/o/r'", KEY)
            ok = await fleet.submit_one(fleet.job(PRINTS, review_policy="auto",
                                                  capabilities=["cred:anthropic_api_key"]))
            bad = await fleet.submit_one(fleet.job(
                PRINTS, review_policy="auto", capabilities=["cred:anthropic_api_key"], retry={"max": 0},
                verify='echo "verify says $ANTHROPIC_API_KEY"; false'), path="bad.md")
            rec = await fleet.wait_stage(ok, "shipped", timeout_s=30)
            await fleet.wait_stage(bad, "failed", "dead_letter", timeout_s=30)
            await fleet.admin.nc.flush()
            await sub.unsubscribe()

            # The job did print them (the control): its own log shows where they were.
            logs = b"".join(p.read_bytes() for p in (tmp_path / "factories").rglob("*.log"))
            assert logs.count(b"[REDACTED:ANTHROPIC_API_KEY]") >= 3 * 2 + 1, logs[:2000]
            assert b"split: [REDACTED:ANTHROPIC_API_KEY] end" in logs
            assert b"noise>>>[REDACTED:ANTHROPIC_API_KEY]<<<noise" in logs
            assert b"token: [REDACTED:github]" in logs
            assert b"[REDACTED:ANTHROPIC_API_KEY]" in live, "the live subject carried the output, redacted"
            assert rec.attempts[-1].log, "the log was stored in gf_artifacts"

            found, seen = await _scan_broker(fleet.admin, needles)
            assert seen > 20 and not found, found
            assert not [n for n in needles if n in live]
        # The broker's own files and the factory's (logs, outbox, git): everything but the
        # job's folder, where the job may write what it likes.
        assert not _scan_tree(tmp_path, fleet.repo, needles)

    try:
        run(main(), 80)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert b"https://x:[REDACTED:ANTHROPIC_API_KEY]@github.com" in stderr_log.read_bytes()
