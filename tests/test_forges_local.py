"""The local forge on real git repositories and a real nats-server: pull requests are broker
records, merges are real merges inside the bare remote, refused when not clean or not green."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import msgspec
import pytest

from gigafactory.broker import Broker
from gigafactory.forges import Forge, ForgeContext, ForgeError, ForgeNotFound, forge_for
from gigafactory.forges.github import GitHubForge
from gigafactory.forges.local import PULLS_BUCKET, LocalForge, LocalPull, repo_key
from helpers import fast_settings, run

IDENTITY = {"GIT_AUTHOR_NAME": "Agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
            "GIT_COMMITTER_NAME": "Agent", "GIT_COMMITTER_EMAIL": "agent@example.com"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **IDENTITY}).stdout.strip()


class Repo:
    """A bare remote and a clone to make commits in and push from."""

    def __init__(self, root: Path) -> None:
        self.remote = root / "remote.git"
        self.work = root / "work"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.remote)], check=True)
        subprocess.run(["git", "clone", "-q", str(self.remote), str(self.work)], check=True, capture_output=True)
        git(self.work, "checkout", "-q", "-b", "main")
        self.commit("README.md", "hello\n", "init")
        git(self.work, "push", "-q", "origin", "main")

    def commit(self, path: str, text: str, msg: str) -> str:
        (self.work / path).parent.mkdir(parents=True, exist_ok=True)
        (self.work / path).write_text(text)
        git(self.work, "add", path)
        git(self.work, "commit", "-q", "-m", msg)
        return git(self.work, "rev-parse", "HEAD")

    def branch(self, name: str, start: str = "origin/main", files: dict[str, str] | None = None) -> str:
        git(self.work, "fetch", "-q", "origin")
        git(self.work, "checkout", "-q", "-B", name, start)
        sha = ""
        for path, text in (files or {}).items():
            sha = self.commit(path, text, f"{name}: {path}")
        git(self.work, "push", "-q", "-f", "origin", f"{name}:{name}")
        return sha

    def ref(self, branch: str) -> str:
        return git(self.remote, "rev-parse", f"refs/heads/{branch}")

    def show(self, branch: str, path: str) -> str:
        return git(self.remote, "show", f"{branch}:{path}")


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path)


async def _broker(nats_server) -> Broker:
    return await Broker.open(nats_server.url, "forge-test", fast_settings())


def test_opening_is_idempotent_per_head_and_numbers_count_up(nats_server, repo):
    async def body():
        b = await _broker(nats_server)
        try:
            forge = LocalForge(repo.remote, b)
            assert isinstance(forge, Forge)
            head = repo.branch("gf/j1/e1", files={"a.txt": "a\n"})
            pr = await forge.open_pull_request(str(repo.remote), "gf/j1/e1", "main", "Add a", "body a")
            again = await forge.open_pull_request(str(repo.remote), "gf/j1/e1", "main", "other title", "other")
            assert again == pr
            assert (pr.number, pr.state, pr.head_sha, pr.title) == (1, "open", head, "Add a")
            repo.branch("gf/j2/e1", files={"b.txt": "b\n"})
            second = await forge.open_pull_request(str(repo.remote), "gf/j2/e1", "main", "Add b", "")
            assert second.number == 2
            # The record is plain JSON in gf_pulls, keyed by remote and branch.
            kv = await b.js.key_value(PULLS_BUCKET)
            entry = await kv.get(f"{repo_key(repo.remote)}.gf_2fj1_2fe1")
            stored = msgspec.json.decode(entry.value, type=LocalPull)
            assert stored.pr == pr and stored.remote == os.path.realpath(repo.remote)
            # Another spelling of the same folder shares the records.
            same = LocalForge(str(repo.remote) + "/", b)
            assert (await same.get("gf/j1/e1")) == pr
        finally:
            await b.close()

    run(body())


def test_concurrent_openers_on_two_connections_get_one_pull_request(nats_server, repo):
    async def body():
        b1, b2 = await _broker(nats_server), await _broker(nats_server)
        try:
            repo.branch("gf/race/e1", files={"r.txt": "r\n"})
            forges = [LocalForge(repo.remote, b1), LocalForge(repo.remote, b2)]
            prs = await asyncio.gather(*(forges[i % 2].open_pull_request("r", "gf/race/e1", "main", "t", "")
                                         for i in range(6)))
            assert len({p.number for p in prs}) == 1
        finally:
            await b1.close()
            await b2.close()

    run(body())


def test_merge_is_blocked_until_checks_are_green_on_the_current_head(nats_server, repo):
    async def body():
        b = await _broker(nats_server)
        try:
            forge = LocalForge(repo.remote, b)
            head = repo.branch("gf/j/e1", files={"a.txt": "a\n"})
            base_before = repo.ref("main")
            pr = await forge.open_pull_request("r", "gf/j/e1", "main", "t", "")
            assert await forge.checks(pr) == "none"
            res = await forge.merge(pr)
            assert (res.outcome, res.reason) == ("blocked", f"checks are none on {head[:12]}")
            await forge.set_checks(pr, "failure", head, "verify: exit 1")
            res = await forge.merge(pr)
            assert res.outcome == "blocked" and "checks are failure" in res.reason and "verify: exit 1" in res.reason
            await forge.set_checks(pr, "success", head)
            assert await forge.checks(pr) == "success"
            # A push after the checks ran: they no longer speak for the head.
            moved = repo.branch("gf/j/e1", start="gf/j/e1", files={"a2.txt": "more\n"})
            assert await forge.checks(pr) == "pending"
            res = await forge.merge(pr)
            assert res.outcome == "blocked" and f"checks are pending on {moved[:12]}" == res.reason
            assert repo.ref("main") == base_before  # nothing merged while blocked
        finally:
            await b.close()

    run(body())


def test_a_green_pull_request_is_really_merged_into_base_in_the_bare_remote(nats_server, repo):
    async def body():
        b = await _broker(nats_server)
        try:
            forge = LocalForge(repo.remote, b)
            head = repo.branch("gf/j/e2", files={"src/a.py": "print('a')\n"})
            # base moved meanwhile, without touching the same lines: still a clean merge
            git(repo.work, "checkout", "-q", "main")
            git(repo.work, "pull", "-q", "origin", "main")
            repo.commit("docs/b.md", "b\n", "docs on main")
            git(repo.work, "push", "-q", "origin", "main")
            base_before = repo.ref("main")
            pr = await forge.open_pull_request("r", "gf/j/e2", "main", "Add a.py", "")
            await forge.set_checks(pr, "success", head)
            res = await forge.merge(pr)
            assert res.outcome == "merged" and res.sha == repo.ref("main")
            parents = git(repo.remote, "rev-list", "--parents", "-n", "1", res.sha).split()[1:]
            assert parents == [base_before, head]
            assert repo.show("main", "src/a.py") == "print('a')" and repo.show("main", "docs/b.md") == "b"
            assert "Merge pull request #1 from gf/j/e2" in git(repo.remote, "log", "-1", "--format=%B", "main")
            assert (await forge.get("gf/j/e2")).state == "merged"
            again = await forge.merge(pr)  # idempotent
            assert (again.outcome, again.sha) == ("merged", res.sha)
            assert repo.ref("main") == res.sha
        finally:
            await b.close()

    run(body())


def test_a_pull_request_that_does_not_merge_cleanly_is_refused_and_base_is_untouched(nats_server, repo):
    async def body():
        b = await _broker(nats_server)
        try:
            forge = LocalForge(repo.remote, b)
            head = repo.branch("gf/c/e1", files={"README.md": "hello from the agent\n"})
            git(repo.work, "checkout", "-q", "main")
            git(repo.work, "pull", "-q", "origin", "main")
            repo.commit("README.md", "hello from a human\n", "human edit")
            git(repo.work, "push", "-q", "origin", "main")
            base_before = repo.ref("main")
            pr = await forge.open_pull_request("r", "gf/c/e1", "main", "t", "")
            await forge.set_checks(pr, "success", head)
            res = await forge.merge(pr)
            assert res.outcome == "conflict"
            assert "gf/c/e1 does not merge cleanly into main" in res.reason and "conflicts in README.md" in res.reason
            assert repo.ref("main") == base_before
            assert (await forge.get("gf/c/e1")).state == "open"
            # No leftovers: the bare remote has no index, no worktree and no extra refs.
            assert git(repo.remote, "for-each-ref", "--format=%(refname)").split() == [
                "refs/heads/gf/c/e1", "refs/heads/main"]
        finally:
            await b.close()

    run(body())


def test_two_merges_racing_on_one_base_both_land_by_compare_and_swap_on_the_ref(nats_server, repo):
    async def body():
        b1, b2 = await _broker(nats_server), await _broker(nats_server)
        try:
            f1, f2 = LocalForge(repo.remote, b1), LocalForge(repo.remote, b2)
            h1 = repo.branch("gf/x/e1", files={"x.txt": "x\n"})
            h2 = repo.branch("gf/y/e1", files={"y.txt": "y\n"})
            p1 = await f1.open_pull_request("r", "gf/x/e1", "main", "x", "")
            p2 = await f2.open_pull_request("r", "gf/y/e1", "main", "y", "")
            await f1.set_checks(p1, "success", h1)
            await f2.set_checks(p2, "success", h2)
            r1, r2 = await asyncio.gather(f1.merge(p1), f2.merge(p2))
            assert (r1.outcome, r2.outcome) == ("merged", "merged")
            main = repo.ref("main")
            for h in (h1, h2, r1.sha, r2.sha):
                subprocess.run(["git", "-C", str(repo.remote), "merge-base", "--is-ancestor", h, main], check=True)
            assert repo.show("main", "x.txt") == "x" and repo.show("main", "y.txt") == "y"
        finally:
            await b1.close()
            await b2.close()

    run(body())


def test_checks_none_merges_when_the_forge_does_not_require_checks(nats_server, repo):
    async def body():
        b = await _broker(nats_server)
        try:
            forge = LocalForge(repo.remote, b, require_checks=False)
            repo.branch("gf/n/e1", files={"n.txt": "n\n"})
            pr = await forge.open_pull_request("r", "gf/n/e1", "main", "t", "")
            assert (await forge.merge(pr)).outcome == "merged"
            assert repo.show("main", "n.txt") == "n"
        finally:
            await b.close()

    run(body())


def test_missing_branches_and_remotes_are_named(nats_server, repo, tmp_path):
    async def body():
        b = await _broker(nats_server)
        try:
            forge = LocalForge(repo.remote, b)
            with pytest.raises(ForgeNotFound, match="head branch 'gf/none/e1' does not exist"):
                await forge.open_pull_request("r", "gf/none/e1", "main", "t", "")
            repo.branch("gf/b/e1", files={"b.txt": "b\n"})
            with pytest.raises(ForgeNotFound, match="base branch 'develop' does not exist"):
                await forge.open_pull_request("r", "gf/b/e1", "develop", "t", "")
            with pytest.raises(ForgeError, match="not a valid branch name"):
                await forge.open_pull_request("r", "gf/b/e1..x", "main", "t", "")
            with pytest.raises(ForgeNotFound, match="does not exist"):
                await LocalForge(tmp_path / "nowhere.git", b).open_pull_request("r", "x", "main", "t", "")
        finally:
            await b.close()

    run(body())


@pytest.mark.parametrize(("remote", "kind"), [
    ("/srv/git/app.git", "local"),
    ("relative/app", "local"),
    ("file:///srv/git/app.git", "local"),
    ("https://github.com/acme/app.git", "github"),
    ("https://github.com/acme/app", "github"),
    ("git@github.com:acme/app.git", "github"),
    ("ssh://git@github.com/acme/app.git", "github"),
])
def test_forge_for_picks_the_forge_by_the_remote(remote, kind):
    ctx = ForgeContext(store=object(), github_token="t0ken")
    forge = forge_for(remote, ctx)
    assert forge.kind == kind
    if kind == "github":
        assert isinstance(forge, GitHubForge) and (forge.owner, forge.repo) == ("acme", "app")
    else:
        assert isinstance(forge, LocalForge) and forge.remote.endswith(remote.removeprefix("file://").split("/")[-1])


def test_forge_for_refuses_what_it_does_not_know_and_a_github_remote_without_a_token():
    with pytest.raises(ForgeError, match="no forge knows the repository 'https://gitlab.com/a/b.git'"):
        forge_for("https://gitlab.com/a/b.git", ForgeContext(store=object()))
    with pytest.raises(ForgeError, match="no token. Give the job cred:github_token"):
        forge_for("https://github.com/a/b", ForgeContext())
    with pytest.raises(ForgeError, match="forge 'gitlab' is not known"):
        forge_for("/x", ForgeContext(store=object()), kind="gitlab")
    ghe = forge_for("https://ghe.example.com/team/app.git",
                    ForgeContext(github_token="t", github_api_url="https://ghe.example.com/api/v3"), kind="github")
    assert (ghe.api_url, ghe.owner, ghe.repo) == ("https://ghe.example.com/api/v3", "team", "app")
