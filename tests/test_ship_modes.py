"""``ship-as`` end to end: real git (a bare "remote" in a temporary folder), a real broker,
real factories running the ``shell`` engine, the local forge's ``gf_pulls`` records, and the
loopback GitHub. What ``shipped`` means: a pull request opened, a real merge into ``base``, a
human's ship that opens or merges, a stale holder that never opens, and a moved ``base``
that conflicts: ``rebase-needed`` once, then ``merge_conflict``."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from pathlib import Path

import msgspec
from nats.js.errors import BucketNotFoundError, NoKeysError
from click.testing import CliRunner

from gigafactory.cli import main as cli
from gigafactory.factory import engines
from gigafactory.factory.engines.base import Engine, EngineJob, Prepared, ProbeResult, engine_environment, require_cwd
from gigafactory.forges.local import LocalPull, PULLS_BUCKET, repo_key

from helpers import Fleet, eventually, fast_settings, run
from test_workspace import branches, make_remote, repo_job, sh_git


async def pulls(fleet: Fleet, remote: Path) -> dict[str, LocalPull]:
    """The local forge's records for ``remote``, by head branch."""
    try:
        kv = await fleet.admin.js.key_value(PULLS_BUCKET)
    except BucketNotFoundError:  # made on the first pull request: none was opened
        return {}
    out = {}
    prefix = repo_key(remote) + "."
    try:
        keys = await kv.keys()
    except NoKeysError:  # the layout makes the bucket; no pull request was opened yet
        return {}
    for key in keys:
        if key.startswith(prefix) and not key.endswith(".next"):
            rec = msgspec.json.decode((await kv.get(key)).value, type=LocalPull)
            out[rec.pr.head] = rec
    return out


async def status(url: str, job: str, *json_flag: str):
    res = await asyncio.to_thread(CliRunner().invoke, cli, ["status", job, *json_flag, "--nats", url])
    assert res.exit_code == 0, res.output
    return json.loads(res.output) if json_flag else res.output


def test_an_auto_pr_opened_job_opens_a_local_pull_request_that_says_what_ran(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(
                "# Add the greeting\necho hi > greeting.txt", repo=str(remote), review_policy="auto",
                ship_as="pr-opened", verify="echo verify-said-ok && test -f greeting.txt"))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=40)
            w = rec.attempts[-1].workspace
            assert w.pushed and w.shipped_as == "pr-opened" and w.pull_number == 1 and w.pull_state == "open", w
            assert "pull request #1 opened" in rec.reason
            prs = await pulls(fleet, remote)
            pr = prs[w.branch].pr
            assert (pr.number, pr.base, pr.head_sha, pr.state) == (1, "main", w.head, "open")
            assert pr.title == "Add the greeting (gigafactory %s)" % job
            for words in (f"`{job}`", "| Engine | shell |", "| Attempts | 1 (epoch 1) |", "| Cost | unknown |",
                          "**passed**", "verify-said-ok", f"gigafactory logs {job}", "1 files, +1"):
                assert words in pr.body, (words, pr.body)
            assert branches(remote)["main"] == w.base_commit  # opened, not merged
            kinds = [e["kind"] for e in await fleet.events(job)]
            assert kinds.index("pushed") < kinds.index("pull_request_opened") < kinds.index("finished"), kinds
            shown = (await status(nats_server.url, job, "--json"))["record"]["attempts"][-1]["workspace"]
            assert (shown["pull_number"], shown["pull_state"], shown["merged_commit"]) == (1, "open", None)
            text = await status(nats_server.url, job)
            assert "shipped as pr-opened: pull request #1 open" in text, text
            # The local forge's pull requests, listed.
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["pulls", "--json", "--nats", nats_server.url])
            assert res.exit_code == 0, res.output
            listed = json.loads(res.output)["pulls"]
            assert [(p["number"], p["head"], p["base"], p["state"]) for p in listed] == [(1, w.branch, "main", "open")]
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["pulls", "--nats", nats_server.url])
            assert res.exit_code == 0 and f"#1     open   {w.branch} -> main  checks none" in res.output, res.output

    run(main(), 90)


def test_an_auto_merged_job_really_merges_into_base_in_the_bare_remote(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo merged > merged.txt", repo=str(remote), review_policy="auto",
                                                  ship_as="merged", verify="test -f merged.txt"))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=40)
            w = rec.attempts[-1].workspace
            assert w.shipped_as == "merged" and w.pull_state == "merged" and w.merged_commit, w
            main_now = branches(remote)["main"]
            assert main_now == w.merged_commit
            parents = sh_git("rev-list", "--parents", "-n", "1", main_now, cwd=remote).split()
            assert parents[1:] == [w.base_commit, w.head]  # a real two-parent merge of the verified head
            assert "merged.txt" in sh_git("ls-tree", "--name-only", "main", cwd=remote).split()
            pr = (await pulls(fleet, remote))[w.branch]
            assert pr.pr.state == "merged" and pr.checks == "success" and pr.checks_sha == w.head
            text = await status(nats_server.url, job)
            assert f"merged at {w.merged_commit[:12]}" in text, text

            # Without verify nothing checked it: the local forge's gate stays shut, the job waits
            # in testing with the pull request open, and base is untouched.
            before = branches(remote)["main"]
            unchecked = await fleet.submit_one(repo_job("echo u > u.txt", repo=str(remote), review_policy="auto",
                                                        ship_as="merged"), path="unchecked.md")
            rec = await fleet.wait_stage(unchecked, "testing", timeout_s=40)
            w = rec.attempts[-1].workspace
            assert w.pull_number is not None and w.pull_state == "open" and w.merged_commit is None
            assert "not shipped as merged" in rec.reason and "checks are none" in rec.reason, rec.reason
            assert branches(remote)["main"] == before

    run(main(), 90)


def test_a_manual_job_is_opened_and_merged_by_the_coordinator_when_a_human_ships_it(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            opened, merged = [j["job"] for j in await fleet.submit(
                ("pr.md", repo_job("echo a > a.txt", repo=str(remote), ship_as="pr-opened", verify="true")),
                ("merge.md", repo_job("echo b > b.txt", repo=str(remote), review_policy={"reviewers": ["@ann"]},
                                      ship_as="merged", verify="true")))]
            rec = await fleet.wait_stage(opened, "testing", timeout_s=40)
            await fleet.wait_stage(merged, "review", timeout_s=40)
            # The human gate is in front: pushed, but nothing opened before the ship.
            assert rec.attempts[-1].workspace.pushed and rec.attempts[-1].workspace.pull_number is None
            assert await pulls(fleet, remote) == {}

            reply = await fleet.client.call("ship", {"job": opened, "actor": "alice"})
            assert reply["job"]["stage"] == "shipped" and reply["workspace"]["pull_number"] is not None
            rec, _ = await fleet.record(opened)
            w = rec.attempts[-1].workspace
            assert rec.stage == "shipped" and w.shipped_as == "pr-opened" and "shipped by alice" in rec.reason
            pr = (await pulls(fleet, remote))[w.branch].pr
            assert pr.number == w.pull_number and pr.state == "open" and f"gigafactory logs {opened}" in pr.body

            base_before = branches(remote)["main"]
            reply = await fleet.client.call("ship", {"job": merged, "actor": "ann"})
            rec, _ = await fleet.record(merged)
            w = rec.attempts[-1].workspace
            assert rec.stage == "shipped" and w.pull_state == "merged" and w.merged_commit, (rec.reason, w)
            assert branches(remote)["main"] == w.merged_commit != base_before
            ship_events = [e for e in await fleet.events(merged) if e["kind"] == "ship"]
            assert ship_events and ship_events[-1]["data"]["merged_commit"] == w.merged_commit

    run(main(), 90)


def _blocking_hook(remote: Path, gate: Path) -> None:
    """A pre-receive hook in the remote that, on the first push only, says so and waits
    (bounded) for the test: the push lands after the job's epoch has moved on."""
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(f'#!/bin/sh\ncat > /dev/null\n[ -f "{gate}/held" ] && exit 0\ntouch "{gate}/held"\n'
                    f'for i in $(seq 1200); do [ -f "{gate}/go" ] && exit 0; sleep 0.05; done\nexit 0\n')
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)


def test_a_stale_holder_pushes_before_the_requeue_but_never_opens_the_pull_request(nats_server, tmp_path):
    remote = make_remote(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    _blocking_hook(remote, gate)
    # Renewals rare enough that the holder cannot learn of the requeue during its push: the
    # compare-and-set right before opening is what must refuse it.
    slow = fast_settings(lease_ttl_s=60.0, lease_renew_s=20.0)

    async def main():
        async with Fleet(nats_server.url, tmp_path, settings=slow) as fleet:
            f1 = await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo $GF_EPOCH > e.txt", repo=str(remote), review_policy="auto",
                                                  ship_as="pr-opened"))
            await eventually(lambda: (gate / "held").exists(), 30, what="epoch 1 pushing")
            await fleet.client.call("requeue", {"job": job})  # the epoch moves on mid-push
            (gate / "go").touch()
            rec = await fleet.wait_stage(job, "shipped", timeout_s=60)
            refused = [e for e in await fleet.events(job) if e["kind"] == "pull_request_refused"]
            assert refused and refused[0]["epoch"] == 1 and "stale" in refused[0]["reason"], refused
            assert f1.stats.get("pull_requests_fenced") == 1
            assert f"gf/{job}/e1" in branches(remote)  # its push had been fenced in time, and landed
            prs = await pulls(fleet, remote)
            assert f"gf/{job}/e1" not in prs, prs  # but it opened nothing
            w = rec.attempts[-1].workspace
            assert rec.attempts[-1].epoch > 1 and set(prs) == {w.branch} and prs[w.branch].pr.number == w.pull_number

    run(main(), 120)


def _moves_base(remote: Path, tmp_path: Path, *, once: bool) -> str:
    """A script that (once, or every attempt) pushes a conflicting README.md onto main before
    changing README.md itself: the attempt's branch then no longer merges into main."""
    mark = tmp_path / "moved-once"
    move = (f'tmp=$(mktemp -d) && git clone -q "{remote}" "$tmp/c" && '
            f'echo "base moved by $GF_EPOCH" > "$tmp/c/README.md" && '
            f'git -C "$tmp/c" -c user.name=t -c user.email=t@e commit -qam moved && '
            f'git -C "$tmp/c" push -q origin HEAD:main && rm -rf "$tmp"')
    guard = f'if [ ! -f "{mark}" ]; then touch "{mark}"; {move}; fi' if once else move
    return f'{guard}\necho "job $GF_EPOCH" > README.md\n'


def test_base_moved_with_a_conflict_requeues_rebase_needed_once_and_the_next_attempt_merges(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(_moves_base(remote, tmp_path, once=True), repo=str(remote),
                                                  review_policy="auto", ship_as="merged", verify="true",
                                                  retry={"max": 0}))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=60)
            first, last = rec.attempts[0], rec.attempts[-1]
            assert first.outcome == "merge_conflict" and "README.md" in first.detail, first
            assert rec.rebases_used == 1 and rec.retries_used == 0 and len(rec.attempts) == 2
            events = await fleet.events(job)
            requeued = [e for e in events if e["kind"] == "finished" and e["stage_to"] == "queued"]
            assert requeued and requeued[0]["reason"].startswith("rebase-needed: "), requeued
            assert any(e["kind"] == "merge_conflict" and e["epoch"] == first.epoch for e in events)
            # The new attempt started from the moved base, and its merge is in main.
            moved = sh_git("rev-parse", f"{last.workspace.merged_commit}^1", cwd=remote).strip()
            assert last.workspace.base_commit == moved != first.workspace.base_commit
            assert sh_git("show", "main:README.md", cwd=remote).strip() == f"job {last.epoch}"

    run(main(), 120)


def _checkpoints_then_conflicts(remote: Path, tmp_path: Path) -> str:
    """Epoch 1 writes a.txt, waits (bounded) until a WIP checkpoint of it is on the remote, then
    moves main and changes README.md (its branch then conflicts); every later epoch writes down
    what it was told and changes README.md on the new base."""
    move = _moves_base(remote, tmp_path, once=True).splitlines()[0]
    seen = tmp_path / "seen"
    return (f'if [ "$GF_EPOCH" = 1 ]; then\n'
            f'  echo "work of e1" > a.txt\n'
            f'  for i in $(seq 400); do git ls-remote --exit-code "{remote}" "refs/heads/gf/$GF_JOB_ID/wip" '
            f'>/dev/null && break; sleep 0.05; done\n'
            f'  {move}\n'
            f'else\n'
            f'  echo "$GF_RESUMING $GF_RESUME_COMMIT $(cat a.txt)" > "{seen}"\n'
            f'fi\n'
            f'echo "job $GF_EPOCH" > README.md\n')


async def _refs_cleaned(fleet: Fleet, job: str) -> str:
    rec, _ = await fleet.record(job)
    return rec.refs_cleaned


def test_after_rebase_needed_the_new_attempt_carries_the_last_checkpoint_onto_the_new_base(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path,
                         settings=fast_settings(checkpoint_s=0.5, ref_cleanup_after_s=0)) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(_checkpoints_then_conflicts(remote, tmp_path), repo=str(remote),
                                                  review_policy="auto", ship_as="merged", verify="true",
                                                  retry={"max": 0}))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=60)
            first, last = rec.attempts[0], rec.attempts[-1]
            assert [a.outcome for a in rec.attempts] == ["merge_conflict", "passed"], rec.attempts
            cp = rec.checkpoint
            assert cp is not None and cp.epoch == first.epoch, cp
            events = await fleet.events(job)
            rebased = [e for e in events if e["kind"] == "rebased"]
            # The whole branch conflicts (README.md) on the new base; its checkpoint (a.txt) does not.
            assert len(rebased) == 1 and rebased[0]["data"]["commit"] == cp.commit, rebased
            assert "conflicts in README.md" in rebased[0]["data"]["tried"][0], rebased
            moved = sh_git("rev-parse", f"{last.workspace.merged_commit}^1", cwd=remote).strip()
            assert last.workspace.base_commit == moved != first.workspace.base_commit
            assert f"checkpoint {cp.seq} of attempt 1 merged onto the new main" in last.workspace.carried
            # What shipped holds the earlier epoch's checkpoint on top of the new base.
            for ancestor in (cp.commit, moved):
                sh_git("merge-base", "--is-ancestor", ancestor, "main", cwd=remote)
            assert sh_git("show", "main:a.txt", cwd=remote) == "work of e1\n"
            assert sh_git("show", "main:README.md", cwd=remote).strip() == f"job {last.epoch}"
            assert (tmp_path / "seen").read_text().split() == ["1", cp.commit, "work", "of", "e1"]

            # Once shipped, the coordinator deletes the superseded epoch's branch and the WIP
            # branch, and closes the superseded pull request; the shipped ones stay. (With
            # ref_cleanup_after_s=0 it may have done so already: the refs_cleaned event below
            # names both as deleted, so they existed.)
            cleaned = await eventually(lambda: _refs_cleaned(fleet, job), 20, what="refs cleaned")
            assert set(branches(remote)) == {"main", last.workspace.branch}, branches(remote)
            prs = await pulls(fleet, remote)
            assert prs[first.workspace.branch].pr.state == "closed"
            assert prs[last.workspace.branch].pr.state == "merged"
            assert f"gf/{job}/e{first.epoch}" in cleaned and f"gf/{job}/wip" in cleaned, cleaned
            assert f"kept {last.workspace.branch}" in cleaned and f"#{first.workspace.pull_number}" in cleaned
            ev = [e for e in await fleet.events(job) if e["kind"] == "refs_cleaned"]
            assert len(ev) == 1 and ev[0]["data"]["closed"] == [first.workspace.pull_number], ev

    run(main(), 120)


def test_a_script_whose_earlier_work_conflicts_with_the_new_base_starts_from_it_and_says_so(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(_moves_base(remote, tmp_path, once=True), repo=str(remote),
                                                  review_policy="auto", ship_as="merged", verify="true",
                                                  retry={"max": 0}))
            rec = await fleet.wait_stage(job, "shipped", timeout_s=60)
            first, last = rec.attempts
            dropped = [e for e in await fleet.events(job) if e["kind"] == "rebase_dropped"]
            assert len(dropped) == 1 and dropped[0]["epoch"] == last.epoch, dropped
            assert f"{first.workspace.head[:12]}: conflicts in README.md" in dropped[0]["data"]["tried"]
            assert last.workspace.carried.startswith("started from the new main"), last.workspace
            # Nothing of the conflicting head is in what shipped: the script redid its work.
            assert subprocess.run(["git", "merge-base", "--is-ancestor", first.workspace.head, "main"],
                                  cwd=remote).returncode == 1

    run(main(), 120)


def test_a_branch_that_conflicts_again_after_its_rebase_fails_merge_conflict(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job(_moves_base(remote, tmp_path, once=False), repo=str(remote),
                                                  review_policy="auto", ship_as="merged", verify="true"))
            rec = await fleet.wait_stage(job, "failed", timeout_s=60)
            assert [a.outcome for a in rec.attempts] == ["merge_conflict", "merge_conflict"]
            assert rec.last_failure == "merge_conflict" and rec.rebases_used == 1
            assert rec.reason.startswith("merge_conflict: ") and "rebase-needed retries" in rec.reason
            assert sh_git("show", "main:README.md", cwd=remote).strip().startswith("base moved by")

    run(main(), 120)


def test_github_mode_opens_with_the_right_head_and_base_and_never_merges_past_a_blocked_state(
        nats_server, tmp_path, monkeypatch):
    from gigafactory.github_server import GitHubServer

    remote = make_remote(tmp_path)
    url = "https://github.com/acme/app"
    # The fleet's git reaches "github.com" in the bare remote (what an operator's credential
    # helper and network do for real); the API calls go to the loopback GitHub.
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.{remote}.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", url)
    monkeypatch.setenv("GITHUB_TOKEN", "gh-test-token")

    async def main(gh: GitHubServer):
        gh.add_repo("acme", "app", git_dir=str(remote), required_checks=["ci"])
        s = fast_settings(github_api_url=gh.api_url, ship_checks_wait_s=0.0)
        async with Fleet(nats_server.url, tmp_path, settings=s) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo gh > gh.txt", repo=url + ".git", review_policy="auto",
                                                  ship_as="merged", verify="true"))
            # Branch protection wants the "ci" check: GitHub says blocked, nothing is merged, the
            # job waits in testing with its pull request open.
            rec = await fleet.wait_stage(job, "testing", timeout_s=40)
            w = rec.attempts[-1].workspace
            assert w.pull_number == 1 and w.pull_url == "https://github.com/acme/app/pull/1", w
            assert w.pull_state == "open" and w.merged_commit is None and "merge blocked" in w.ship_detail, w
            posts = [r for r in gh.requests if r["method"] == "POST" and r["path"].endswith("/pulls")]
            assert len(posts) == 1 and posts[0]["authorised"]
            assert (posts[0]["body"]["head"], posts[0]["body"]["base"]) == (f"gf/{job}/e1", "main")
            assert f"gigafactory logs {job}" in posts[0]["body"]["body"]
            assert not [r for r in gh.requests if r["method"] == "PUT"]  # blocked: no merge request sent
            assert gh.repos[("acme", "app")].pulls[1]["state"] == "open"

            # A human ships before CI is green: still blocked, in GitHub's words, 409.
            try:
                await fleet.client.call("ship", {"job": job, "actor": "alice"})
                raise AssertionError("shipped past branch protection")
            except Exception as e:
                assert "merge blocked" in str(e) or "not mergeable" in str(e), e
            assert (await fleet.record(job))[0].stage == "testing"
            # CI goes green on the pushed head: the human's ship merges it (the coordinator).
            gh.add_check_run("acme", "app", w.head, "ci")
            reply = await fleet.client.call("ship", {"job": job, "actor": "alice"})
            assert reply["job"]["stage"] == "shipped", reply
            rec, _ = await fleet.record(job)
            w = rec.attempts[-1].workspace
            assert w.pull_state == "merged" and w.merged_commit == gh.repos[("acme", "app")].branches["main"]
            puts = [r for r in gh.requests if r["method"] == "PUT"]
            assert len(puts) == 1 and puts[0]["body"]["sha"] == w.head  # pinned to the verified head

    with GitHubServer("gh-test-token") as gh:
        run(main(gh), 120)


def test_a_merged_job_waits_bounded_for_pending_ci_and_merges_once_it_is_green(nats_server, tmp_path, monkeypatch):
    from gigafactory.github_server import GitHubServer

    remote = make_remote(tmp_path)
    url = "https://github.com/acme/app"
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.{remote}.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", url)
    monkeypatch.setenv("GITHUB_TOKEN", "gh-test-token")

    async def main(gh: GitHubServer):
        repo = gh.add_repo("acme", "app", git_dir=str(remote), required_checks=["ci"], checks_on_push=["ci"])
        s = fast_settings(github_api_url=gh.api_url, ship_checks_wait_s=120.0, ship_checks_poll_s=0.1)
        async with Fleet(nats_server.url, tmp_path, settings=s) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo ci > ci.txt", repo=url, review_policy="auto",
                                                  ship_as="merged", verify="true"))
            await eventually(lambda: 1 in repo.pulls, 40, what="pull request opened")
            head = repo.pulls[1]["head"]["sha"]
            # CI runs: the factory keeps reading the checks and sends no merge meanwhile.
            await eventually(lambda: sum(r["method"] == "GET" and r["path"].endswith("/check-runs")
                                         for r in gh.requests) >= 3, 30, what="checks read while pending")
            assert not [r for r in gh.requests if r["method"] == "PUT"]
            assert (await fleet.record(job))[0].stage == "building"  # the station waits, the lease is renewed
            gh.complete_check("acme", "app", head, "ci")
            rec = await fleet.wait_stage(job, "shipped", timeout_s=40)
            w = rec.attempts[-1].workspace
            assert w.pull_state == "merged" and w.merged_commit == repo.branches["main"] and w.head == head

    with GitHubServer("gh-test-token") as gh:
        run(main(gh), 120)


def test_a_humans_ship_on_a_record_that_moved_opens_nothing(nats_server, tmp_path):
    from gigafactory.coordinator import shipping
    from gigafactory.schemas import protocol

    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo a > a.txt", repo=str(remote), ship_as="pr-opened",
                                                  verify="true"))
            await fleet.wait_stage(job, "testing", timeout_s=40)
            rec, rev = await fleet.record(job)
            a = protocol.shipped_attempt(rec)
            await fleet.client.call("cancel", {"job": job, "reason": "changed my mind"})  # after the read
            try:
                await shipping.carry_out(fleet.admin, rec, rev, a.epoch, a.workspace)
                raise AssertionError("shipped a record that had moved")
            except shipping.ShipStopped as e:
                assert "changed while it was being shipped" in str(e)
            assert await pulls(fleet, remote) == {}  # the fence came before the forge
            assert (await fleet.record(job))[0].stage == "failed"

    run(main(), 90)


def test_a_holder_made_stale_while_it_waits_for_ci_never_merges(nats_server, tmp_path, monkeypatch):
    from gigafactory.github_server import GitHubServer

    remote = make_remote(tmp_path)
    url = "https://github.com/acme/app"
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.{remote}.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", url)
    monkeypatch.setenv("GITHUB_TOKEN", "gh-test-token")

    async def main(gh: GitHubServer):
        repo = gh.add_repo("acme", "app", git_dir=str(remote), required_checks=["ci"], checks_on_push=["ci"])
        # Renewals rare enough that the holder does not learn of the requeue while it waits: the
        # compare-and-set right before the merge is what must refuse it.
        s = fast_settings(github_api_url=gh.api_url, ship_checks_wait_s=120.0, ship_checks_poll_s=0.1,
                          lease_ttl_s=60.0, lease_renew_s=20.0)
        async with Fleet(nats_server.url, tmp_path, settings=s) as fleet:
            f1 = await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo x > x.txt", repo=url, review_policy="auto",
                                                  ship_as="merged", verify="true"))
            await eventually(lambda: 1 in repo.pulls, 40, what="pull request #1 opened")
            await fleet.client.call("requeue", {"job": job})  # epoch 1 is stale from here on
            gh.complete_check("acme", "app", repo.pulls[1]["head"]["sha"], "ci")
            await eventually(lambda: f1.stats.get("merges_fenced") == 1, 40, what="the stale merge refused")
            assert not [r for r in gh.requests if r["method"] == "PUT"]  # no merge request went out
            assert repo.pulls[1]["state"] == "open"
            refused = [e for e in await fleet.events(job) if e["kind"] == "merge_refused"]
            assert refused and refused[0]["epoch"] == 1 and "stale" in refused[0]["reason"]
            # The next holder opens its own pull request, and merges it once its CI is green.
            await eventually(lambda: 2 in repo.pulls, 40, what="pull request #2 opened")
            gh.complete_check("acme", "app", repo.pulls[2]["head"]["sha"], "ci")
            rec = await fleet.wait_stage(job, "shipped", timeout_s=40)
            w = rec.attempts[-1].workspace
            assert w.pull_number == 2 and w.pull_state == "merged" and rec.attempts[-1].epoch > 1

    with GitHubServer("gh-test-token") as gh:
        run(main(gh), 150)


def test_a_humans_ship_that_conflicts_requeues_rebase_needed_and_the_new_attempt_is_shipped(nats_server, tmp_path):
    remote = make_remote(tmp_path)

    def move_base() -> None:
        clone = tmp_path / "mover"
        sh_git("clone", "-q", str(remote), str(clone))
        (clone / "README.md").write_text("moved by a human\n")
        sh_git("commit", "-qam", "moved", cwd=clone)
        sh_git("push", "-q", "origin", "HEAD:main", cwd=clone)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job('echo "job $GF_EPOCH" > README.md', repo=str(remote),
                                                  ship_as="merged", verify="true"))
            await fleet.wait_stage(job, "testing", timeout_s=40)
            await asyncio.to_thread(move_base)  # main moves under the waiting branch
            reply = await fleet.client.call("ship", {"job": job, "actor": "alice"})
            assert reply["job"]["stage"] == "queued" and reply["job"]["reason"].startswith("rebase-needed: ")
            assert "README.md" in reply["job"]["reason"] and "ship by alice" in reply["job"]["reason"]
            rec = await fleet.wait_stage(job, "testing", timeout_s=40)  # the new attempt, from the new base
            assert rec.rebases_used == 1 and len(rec.attempts) == 2
            assert rec.attempts[-1].workspace.base_commit == branches(remote)["main"]
            reply = await fleet.client.call("ship", {"job": job, "actor": "alice"})
            assert reply["job"]["stage"] == "shipped", reply
            assert sh_git("show", "main:README.md", cwd=remote).strip() == f"job {rec.attempts[-1].epoch}"

    run(main(), 120)


class PromptedAgent(Engine):
    """An agent engine of this test: it runs ``script`` with bash and keeps each attempt's
    prompt (the resume note included) in ``prompts/<epoch>.txt`` for the test to read."""

    engine_class = "agentic-coder"
    opt_in = True
    name = "prompted-agent"

    def __init__(self, script: str, prompts: Path) -> None:
        self.script, self.prompts = script, prompts

    def probe(self, *, environ, path, timeout_s) -> ProbeResult:
        return ProbeResult(True)

    def prepare(self, job: EngineJob) -> Prepared:
        require_cwd(job)
        (self.prompts / f"{job.epoch}.txt").write_text(job.body)
        return Prepared(cwd=job.cwd, env=engine_environment(job), argv=["bash", "-c", self.script])


def test_an_agent_gets_the_conflicting_merge_onto_the_new_base_to_resolve_and_its_resolution_ships(
        nats_server, tmp_path):
    remote = make_remote(tmp_path)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    # Epoch 1 moves main and changes README.md (its branch conflicts); later, the "agent"
    # resolves the conflict left in its worktree by writing README.md without markers.
    script = (f'if [ "$GF_EPOCH" = 1 ]; then {_moves_base(remote, tmp_path, once=True).splitlines()[0]}; '
              f'echo "job 1" > README.md; echo "e1 work" > e1.txt\n'
              f'else grep -q "^<<<<<<<" README.md && echo resolved > README.md; fi\n')
    engines.register(PromptedAgent(script, prompts))
    try:
        async def main():
            async with Fleet(nats_server.url, tmp_path) as fleet:
                await fleet.add_factory("f1", caps=["engine:prompted-agent"])
                job = await fleet.submit_one(repo_job("Change the README", engine="prompted-agent",
                                                      repo=str(remote), review_policy="auto", ship_as="merged",
                                                      verify="! grep -rq '^<<<<<<<' .", retry={"max": 0}))
                rec = await fleet.wait_stage(job, "shipped", timeout_s=60)
                first, last = rec.attempts
                assert (first.outcome, last.outcome) == ("merge_conflict", "passed"), rec.attempts
                left = [e for e in await fleet.events(job) if e["kind"] == "rebase_conflict"]
                assert len(left) == 1 and left[0]["data"]["conflicts"] == ["README.md"], left
                assert left[0]["data"]["commit"] == first.workspace.head
                prompt = (prompts / f"{last.epoch}.txt").read_text()
                assert "CONFLICTS" in prompt and "README.md" in prompt and prompt.endswith("Change the README\n")
                assert "CONFLICTS" not in (prompts / f"{first.epoch}.txt").read_text()
                assert "conflicts left for the engine in README.md" in last.workspace.carried
                # The resolution shipped, on the new base, with the earlier epoch's commit in its history.
                sh_git("merge-base", "--is-ancestor", first.workspace.head, "main", cwd=remote)
                assert sh_git("show", "main:README.md", cwd=remote) == "resolved\n"
                assert sh_git("show", "main:e1.txt", cwd=remote) == "e1 work\n"

        run(main(), 120)
    finally:
        engines.unregister("prompted-agent")


def test_a_station_waiting_on_the_forges_checks_and_merge_reads_waiting_merge(nats_server, tmp_path):
    """While an attempt only waits on the forge (checks, the merge) its station is held but not
    working: the station events say ``waiting-merge`` for that job, then ``busy`` again, and every
    non-working second stays classified (issue 13)."""
    import time

    from gigafactory.economics import idle

    remote = make_remote(tmp_path)

    async def main():
        async with Fleet(nats_server.url, tmp_path) as fleet:
            since = time.time() - 1
            await fleet.add_factory("f1")
            job = await fleet.submit_one(repo_job("echo m > m.txt", repo=str(remote), review_policy="auto",
                                                  ship_as="merged", verify="test -f m.txt"))
            await fleet.wait_stage(job, "shipped", timeout_s=40)

            async def said():
                # The job's own events (``claimed``, ``finished``) and the station events naming it.
                evs = await idle.read_station_events(fleet.admin, since)
                mine = [e for e in evs if job in (e.get("job"), (e.get("data") or {}).get("job"))]
                seq = [t.cls for t in idle.transitions_from_events(sorted(mine, key=lambda e: e["at"]))]
                return (seq, evs) if "waiting-merge" in seq and seq[-1] != "waiting-merge" else None

            seq, evs = await eventually(said, 15, what="a waiting-merge station event for the job")
            assert seq.index("busy") < seq.index("waiting-merge"), seq
            ivs = idle.intervals(idle.transitions_from_events(evs), since, time.time())
            s = idle.summarise(ivs)[""]
            assert s.coverage == 1.0 and s.by_class_s.get("waiting-merge", 0) > 0, s.to_dict()

    run(main())
