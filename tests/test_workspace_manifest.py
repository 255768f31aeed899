"""The workspace fields of a job file (``repo``, ``base``, ``scope``, ``scope-mode``): what is
accepted, and what is refused with the field named and the fix said."""

from __future__ import annotations

import pytest

from gigafactory.schemas.manifest import (
    MAX_GLOB_CHARS,
    MAX_REPO_CHARS,
    MAX_SCOPE_GLOBS,
    ManifestError,
    effective_scope,
    parse_job_text,
)


def parse(front: str):
    return parse_job_text(f"---\nengine: shell\n{front}---\necho hi\n", "jobs/ws.md").manifest


def refused(front: str) -> ManifestError:
    with pytest.raises(ManifestError) as e:
        parse(front)
    return e.value


def test_a_repo_job_needs_no_cwd_and_runs_at_the_checkouts_root():
    m = parse("repo: https://git.example.com/web.git\n")
    assert (m.repo, m.cwd, m.base, m.scope, m.scope_mode) == ("https://git.example.com/web.git", ".", None, None, "warn")


@pytest.mark.parametrize("repo", [
    "https://git.example.com/web.git", "ssh://git@host:22/web.git", "git@github.com:acme/web.git",
    "file:///srv/git/web.git", "/srv/git/web.git", "repos/web.git",
])
def test_urls_and_paths_are_accepted_as_repo(repo):
    assert parse(f"repo: {repo}\n").repo == repo


def test_a_job_without_repo_still_needs_cwd():
    e = refused("")
    assert e.field == "cwd" and "repo" in e.message


@pytest.mark.parametrize("front, field, words", [
    ("repo: ''\n", "repo", "must not be empty"),
    ("repo: '-uevil'\n", "repo", "read as an option"),
    ("repo: 'ext::sh'\n", "repo", "remote helper"),
    ("repo: 'ftp://host/x.git'\n", "repo", "scheme"),
    ("repo: 'https://host/a b'\n", "repo", "space"),
    ("repo: /r\nbase: 'a..b'\n", "base", "not a branch name"),
    ("repo: /r\nbase: 'feature/'\n", "base", "not a branch name"),
    ("repo: /r\nbase: '-x'\n", "base", "not a branch name"),
    ("repo: /r\ncwd: ../elsewhere\n", "cwd", "leaves the repository"),
    ("repo: /r\ncwd: /etc\n", "cwd", "not relative"),
    ("repo: /r\ncwd: '~/x'\n", "cwd", "not relative"),
    ("repo: /r\nscope: ['src/**', '']\n", "scope[1]", "must not be empty"),
    ("repo: /r\nscope: ['../x/**']\n", "scope[0]", "leaves the repository"),
    ("repo: /r\nscope: ['/abs/**']\n", "scope[0]", "not relative"),
    ("repo: /r\nscope: src/**\n", "scope", "expected a list"),
    ("repo: /r\nscope-mode: strict\n", "scope-mode", "enforce, warn"),
    ("base: main\ncwd: x\n", "base", "needs 'repo'"),
    ("scope: [src/**]\ncwd: x\n", "scope", "needs 'repo'"),
    ("scope-mode: enforce\ncwd: x\n", "scope-mode", "needs 'repo'"),
])
def test_bad_workspace_values_are_refused_naming_the_field(front, field, words):
    e = refused(front)
    assert e.field == field, e
    assert words in e.message, e
    assert e.path == "jobs/ws.md" and e.line is not None


def test_every_workspace_field_has_a_size_limit_named_in_its_refusal():
    assert "MAX_REPO_CHARS" in refused(f"repo: /{'r' * MAX_REPO_CHARS}\n").message
    assert "MAX_BRANCH_CHARS" in refused(f"repo: /r\nbase: {'b' * 201}\n").message
    assert "MAX_CWD_CHARS" in refused(f"repo: /r\ncwd: {'c' * 1025}\n").message
    globs = ", ".join(f"d{i}/**" for i in range(MAX_SCOPE_GLOBS + 1))
    assert "MAX_SCOPE_GLOBS" in refused(f"repo: /r\nscope: [{globs}]\n").message
    e = refused(f"repo: /r\nscope: [{'g' * (MAX_GLOB_CHARS + 1)}]\n")
    assert e.field == "scope[0]" and "MAX_GLOB_CHARS" in e.message


def test_the_jobs_scope_wins_over_the_profiles_and_none_means_anything():
    m = parse("repo: /r\nscope: [src/**]\n")
    assert effective_scope(m, ["docs/**"]) == ["src/**"]
    bare = parse("repo: /r\n")
    assert effective_scope(bare, ["docs/**"]) == ["docs/**"]
    assert effective_scope(bare, []) is None and effective_scope(bare, None) is None
    # An explicit empty scope is the job's own: nothing may change.
    assert effective_scope(parse("repo: /r\nscope: []\n"), ["**"]) == []
