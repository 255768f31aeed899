"""The GitHub forge against a loopback server speaking GitHub's REST shapes
(gigafactory/github_server.py): opening, checks, merging, and GitHub's error answers.
Not run against github.com."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from gigafactory.forges import ForgeAuthError, ForgeError, ForgeNotFound, PullRequest
from gigafactory.forges import github as gh_mod
from gigafactory.forges.github import GitHubForge, check_api_url, parse_remote, summarise_checks
from gigafactory.github_server import GitHubServer, fake_sha
from helpers import run

TOKEN = "ghp_secret_value_123"
HEAD = "gf/job1/e1"


@pytest.fixture
def gh():
    with GitHubServer(TOKEN) as server:
        server.add_repo("acme", "app")
        server.push("acme", "app", HEAD, fake_sha("head1"), contains=(fake_sha("acme/app:main"),))
        yield server


def forge(gh: GitHubServer, token: str = TOKEN, repo: str = "app") -> GitHubForge:
    return GitHubForge(gh.api_url, token, "acme", repo, http_timeout_s=5.0, mergeable_poll_s=0.01)


def calls(gh: GitHubServer, method: str, suffix: str = "") -> list[dict]:
    return [r for r in gh.requests if r["method"] == method and r["path"].endswith(suffix)]


def test_opening_posts_githubs_shape_with_the_token_and_reopening_returns_the_same_pull_request(gh):
    async def body():
        f = forge(gh)
        pr = await f.open_pull_request("https://github.com/acme/app", HEAD, "main", "Add a", "the body")
        assert (pr.number, pr.state, pr.head, pr.base, pr.head_sha) == (1, "open", HEAD, "main", fake_sha("head1"))
        assert pr.url == "https://github.com/acme/app/pull/1" and pr.repo == "https://github.com/acme/app"
        again = await f.open_pull_request("https://github.com/acme/app", HEAD, "main", "Add a", "the body")
        assert again.number == pr.number
        posts = calls(gh, "POST", "/repos/acme/app/pulls")
        assert len(posts) == 1
        assert posts[0]["body"] == {"title": "Add a", "head": HEAD, "base": "main", "body": "the body",
                                    "maintainer_can_modify": False}
        lookups = calls(gh, "GET", "/repos/acme/app/pulls")
        assert lookups[0]["query"] == {"head": f"acme:{HEAD}", "state": "open", "per_page": "10", "base": "main"}
        assert all(r["authorised"] and r["api_version"] == "2022-11-28"
                   and r["accept"] == "application/vnd.github+json" for r in gh.requests)

    run(body())


def test_a_pull_request_opened_by_someone_else_meanwhile_is_returned_after_githubs_422(gh):
    async def body():
        f = forge(gh)
        first = await f.open_pull_request("r", HEAD, "main", "t", "")
        gh.fail_next("GET", r"/pulls$", 200, [])  # our lookup misses it; GitHub's POST does not
        again = await f.open_pull_request("r", HEAD, "main", "t", "")
        assert again.number == first.number
        assert len(calls(gh, "POST", "/pulls")) == 2  # the second one got 422 "already exists"

    run(body())


def test_other_validation_failures_are_errors_with_githubs_words(gh):
    async def body():
        gh.push("acme", "app", "gf/empty/e1", fake_sha("acme/app:main"))
        with pytest.raises(ForgeError, match="422 Validation Failed; No commits between main and gf/empty/e1"):
            await forge(gh).open_pull_request("r", "gf/empty/e1", "main", "t", "")

    run(body())


def test_a_refused_token_is_an_auth_error_that_never_shows_the_token(gh):
    async def body():
        f = forge(gh, token="ghp_wrong_token_456")
        with pytest.raises(ForgeAuthError) as e:
            await f.open_pull_request("r", HEAD, "main", "t", "")
        assert "401 Bad credentials" in str(e.value) and "ghp_wrong" not in str(e.value)
        assert "ghp_wrong" not in repr(f) and "***" in repr(f)
        gh.fail_next("GET", r"/pulls$", 403, {"message": "Resource not accessible by integration"})
        with pytest.raises(ForgeAuthError, match="403 Resource not accessible by integration: the token lacks"):
            await forge(gh).open_pull_request("r", HEAD, "main", "t", "")

    run(body())


def test_an_unknown_repository_is_not_found(gh):
    async def body():
        with pytest.raises(ForgeNotFound, match="404 Not Found: the repository or pull request does not exist"):
            await forge(gh, repo="nope").open_pull_request("r", HEAD, "main", "t", "")

    run(body())


def test_checks_combine_check_runs_across_pages_and_commit_statuses(gh):
    async def body():
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        sha = fake_sha("head1")
        assert await f.checks(pr) == "none"
        gh.add_status("acme", "app", sha, "ci/legacy", "pending")
        assert await f.checks(pr) == "pending"
        for i in range(130):  # two pages of check runs
            gh.add_check_run("acme", "app", sha, f"check-{i}")
        gh.add_status("acme", "app", sha, "ci/other", "success")
        assert await f.checks(pr) == "pending"  # ci/legacy still pending
        gh.repos[("acme", "app")].statuses[sha] = [s for s in gh.repos[("acme", "app")].statuses[sha]
                                                   if s["context"] != "ci/legacy"]
        assert await f.checks(pr) == "success"
        gh.add_check_run("acme", "app", sha, "late", conclusion="timed_out")  # on page 2
        assert await f.checks(pr) == "failure"
        pages = [r["query"].get("page") for r in calls(gh, "GET", "/check-runs")][-2:]
        assert pages == ["1", "2"]

    run(body())


def test_a_green_clean_pull_request_is_merged_pinned_to_its_head(gh):
    async def body():
        gh.repos[("acme", "app")].required_checks = ["verify"]
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        gh.add_check_run("acme", "app", fake_sha("head1"), "verify")
        res = await f.merge(pr)
        assert res.outcome == "merged" and res.reason == "Pull Request successfully merged"
        assert res.sha == gh.repos[("acme", "app")].branches["main"]
        put = calls(gh, "PUT", "/pulls/1/merge")
        assert [p["body"] for p in put] == [{"sha": fake_sha("head1"), "merge_method": "merge",
                                             "commit_title": f"Merge pull request #1 from {HEAD}"}]
        again = await f.merge(pr)
        assert (again.outcome, again.sha) == ("merged", res.sha) and len(calls(gh, "PUT", "/merge")) == 1

    run(body())


def test_branch_protection_is_never_bypassed(gh):
    async def body():
        repo = gh.repos[("acme", "app")]
        repo.required_reviews = 1
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        gh.add_check_run("acme", "app", fake_sha("head1"), "verify")
        res = await f.merge(pr)
        assert res.outcome == "blocked" and "mergeable_state blocked" in res.reason
        assert calls(gh, "PUT", "/merge") == []  # an admin token would have merged: we never ask
        repo.required_reviews = 0
        gh.add_check_run("acme", "app", fake_sha("head1"), "lint", status="in_progress")
        res = await f.merge(pr)
        assert (res.outcome, res.reason) == ("blocked", f"checks are pending on {fake_sha('head1')[:12]}")
        assert calls(gh, "PUT", "/merge") == []

    run(body())


def test_githubs_405_is_blocked_and_409_is_a_conflict_in_githubs_words(gh):
    async def body():
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        gh.fail_next("PUT", r"/pulls/1/merge$", 405, {"message": "Pull Request is not mergeable"})
        res = await f.merge(pr)
        assert (res.outcome, res.reason) == ("blocked", "GitHub: Pull Request is not mergeable")
        gh.move_head_before_merge("acme", "app", 1, fake_sha("head2"))
        res = await f.merge(pr)
        assert res.outcome == "conflict"
        assert res.reason == ("the head moved since it was checked (GitHub: Head branch was modified. "
                              "Review and try the merge again.)")
        assert gh.repos[("acme", "app")].pulls[1]["merged"] is False

    run(body())


def test_a_dirty_or_behind_pull_request_is_a_conflict_without_a_merge_request(gh):
    async def body():
        repo = gh.repos[("acme", "app")]
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        repo.conflicts.add(HEAD)
        res = await f.merge(pr)
        assert res.outcome == "conflict" and "does not merge cleanly into main" in res.reason
        repo.conflicts.clear()
        repo.strict = True
        gh.push("acme", "app", "main", fake_sha("main2"))
        res = await f.merge(pr)
        assert res.outcome == "conflict" and "behind main" in res.reason
        assert calls(gh, "PUT", "/merge") == []

    run(body())


def test_merge_waits_a_bounded_number_of_reads_for_mergeability_and_retries_base_modified(gh):
    async def body():
        gh.repos[("acme", "app")].mergeable_after_reads = 4  # the POST's answer is the first read
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        gh.fail_next("PUT", r"/merge$", 422, {"message": "Base branch was modified. Review and try the merge again."})
        res = await f.merge(pr)
        assert res.outcome == "merged"
        assert len(calls(gh, "PUT", "/merge")) == 2
        assert len(calls(gh, "GET", "/pulls/1")) == 3  # two answered mergeable: null

        gh.repos[("acme", "app")].mergeable_after_reads = 10 ** 6
        gh.push("acme", "app", "gf/job2/e1", fake_sha("other"))
        pr2 = await f.open_pull_request("r", "gf/job2/e1", "main", "t", "")
        res = await f.merge(pr2)
        assert (res.outcome, res.reason) == ("blocked", "GitHub has not computed whether #2 is mergeable yet")
        assert len(calls(gh, "GET", "/pulls/2")) == gh_mod.MERGEABLE_POLLS

    run(body())


def test_responses_are_bounded_in_size_and_time(gh, monkeypatch):
    async def body():
        monkeypatch.setattr(gh_mod, "MAX_RESPONSE_BYTES", 1000)
        gh.fail_next("GET", r"/pulls$", 200, [{"title": "x" * 2000}])
        with pytest.raises(ForgeError, match="response larger than 1000 bytes"):
            await forge(gh).open_pull_request("r", HEAD, "main", "t", "")

        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts connections, never answers
        try:
            f = GitHubForge(f"http://127.0.0.1:{silent.getsockname()[1]}", TOKEN, "acme", "app", http_timeout_s=0.3)
            with pytest.raises(ForgeError, match="no answer from .* within 0.3s"):
                await asyncio.wait_for(f.checks(PullRequest(number=1, repo="r", head=HEAD, base="main", title="")), 10)
        finally:
            silent.close()

    run(body())


def test_the_api_url_must_not_carry_the_token_in_clear_text():
    assert check_api_url("https://api.github.com/") == "https://api.github.com"
    assert check_api_url("http://127.0.0.1:9999") == "http://127.0.0.1:9999"
    with pytest.raises(ForgeError, match="must be https://"):
        GitHubForge("http://api.example.com", TOKEN, "acme", "app")
    with pytest.raises(ForgeError, match="is not a GitHub name"):
        GitHubForge("https://api.github.com", TOKEN, "acme", "../x")


SUMMARIES = [
    ([], None, "none"),
    ([], {"state": "pending", "total_count": 0, "statuses": []}, "none"),  # GitHub's "pending" for nothing
    ([], {"state": "pending", "total_count": 1}, "pending"),
    ([], {"state": "success", "total_count": 1}, "success"),
    ([], {"state": "error", "total_count": 1}, "failure"),
    ([{"status": "completed", "conclusion": "success"}], None, "success"),
    ([{"status": "completed", "conclusion": "neutral"}, {"status": "completed", "conclusion": "skipped"}],
     None, "success"),
    ([{"status": "queued", "conclusion": None}], None, "pending"),
    ([{"status": "waiting", "conclusion": None}, {"status": "completed", "conclusion": "failure"}], None, "failure"),
    ([{"status": "completed", "conclusion": "cancelled"}], None, "failure"),
    ([{"status": "completed", "conclusion": "action_required"}], None, "failure"),
    ([{"status": "completed", "conclusion": "success"}], {"state": "pending", "total_count": 2}, "pending"),
]


@pytest.mark.parametrize(("runs", "combined", "state"), SUMMARIES)
def test_check_summary_failure_beats_pending_beats_success(runs, combined, state):
    assert summarise_checks(runs, combined) == state


@pytest.mark.parametrize(("remote", "parsed"), [
    ("https://github.com/acme/app.git", ("acme", "app")),
    ("https://x-access-token@github.com/acme/app", ("acme", "app")),
    ("git@github.com:acme/my.repo.git", ("acme", "my.repo")),
    ("ssh://git@github.com:22/acme/app.git", ("acme", "app")),
    ("https://gitlab.com/acme/app.git", None),
    ("https://github.com/acme", None),
    ("/srv/git/app.git", None),
])
def test_github_remotes_are_read_as_owner_and_repo(remote, parsed):
    assert parse_remote(remote) == parsed


def test_redirects_are_refused_so_the_token_is_never_resent_elsewhere(gh):
    async def body():
        gh.fail_next("GET", r"/pulls$", 301, {"message": "Moved Permanently"},
                     headers={"Location": "https://evil.example.com/repos/acme/app/pulls"})
        with pytest.raises(ForgeError, match="redirected to https://evil.example.com/.*point the job's repo"):
            await forge(gh).open_pull_request("r", HEAD, "main", "t", "")
        assert len(gh.requests) == 1  # nothing followed the redirect

    run(body())


def test_a_rate_limit_is_named_with_its_reset_time_not_as_a_permission_problem(gh):
    async def body():
        gh.fail_next("GET", r"/pulls$", 403, {"message": "API rate limit exceeded"},
                     headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1767225600"})
        with pytest.raises(ForgeError, match="API rate limit exceeded: rate limited until 1767225600") as e:
            await forge(gh).open_pull_request("r", HEAD, "main", "t", "")
        assert not isinstance(e.value, ForgeAuthError)

    run(body())


def test_the_token_appears_in_no_log_line(gh, caplog):
    async def body():
        f = forge(gh)
        pr = await f.open_pull_request("r", HEAD, "main", "t", "")
        await f.merge(pr)

    with caplog.at_level(logging.DEBUG):
        run(body())
    assert any("github" in r.name for r in caplog.records)  # the forge did log
    assert TOKEN not in caplog.text


def test_the_context_reads_the_token_from_the_factorys_credential_variables():
    from gigafactory.config import Settings
    from gigafactory.forges.base import context_from

    s = Settings(github_api_url="https://ghe.example.com/api/v3", forge_http_timeout_s=7.0)
    ctx = context_from(s, store="broker", environ={"GH_TOKEN": "b", "GITHUB_TOKEN": "a"})
    assert (ctx.github_token, ctx.github_api_url, ctx.http_timeout_s, ctx.store) == (
        "a", "https://ghe.example.com/api/v3", 7.0, "broker")
    assert context_from(s, environ={"GH_TOKEN": "b"}).github_token == "b"
    assert context_from(s, environ={}).github_token is None
    assert "'a'" not in repr(ctx)


def test_a_superseded_pull_request_is_closed_with_a_patch_and_a_merged_one_is_left_merged(gh):
    async def body():
        f = forge(gh)
        pr = await f.open_pull_request("https://github.com/acme/app", HEAD, "main", "Add a", "b")
        assert await f.close_pull_request(pr) == "closed"
        patches = calls(gh, "PATCH", "/repos/acme/app/pulls/1")
        assert [p["body"] for p in patches] == [{"state": "closed"}] and patches[0]["authorised"]
        assert (await f._get_pull(pr))["state"] == "closed"
        assert await f.close_pull_request(pr) == "closed"  # idempotent: no second PATCH
        assert len(calls(gh, "PATCH")) == 1
        gh.push("acme", "app", "gf/job1/e2", fake_sha("head2"), contains=(fake_sha("acme/app:main"),))
        shipped = await f.open_pull_request("https://github.com/acme/app", "gf/job1/e2", "main", "Add b", "b")
        assert (await f.merge(shipped)).merged
        assert await f.close_pull_request(shipped) == "merged" and len(calls(gh, "PATCH")) == 1

    run(body())


def test_a_jobs_branches_are_listed_by_prefix_and_deleted_only_at_the_head_read(gh):
    async def body():
        f = forge(gh)
        gh.push("acme", "app", "gf/job1/wip", fake_sha("wip"))
        gh.push("acme", "app", "gf/job10/e1", fake_sha("other job"))
        heads = await f.branches("gf/job1/")
        assert heads == {HEAD: fake_sha("head1"), "gf/job1/wip": fake_sha("wip")}
        assert not await f.delete_branch("gf/job1/wip", fake_sha("not its head"))  # moved: kept
        assert await f.delete_branch("gf/job1/wip", fake_sha("wip"))
        assert calls(gh, "DELETE", "/repos/acme/app/git/refs/heads/gf/job1/wip")
        assert not await f.delete_branch("gf/job1/wip", fake_sha("wip"))  # gone already
        assert await f.branches("gf/job1/") == {HEAD: fake_sha("head1")}
        assert "gf/job10/e1" in gh.repos[("acme", "app")].branches

    run(body())
