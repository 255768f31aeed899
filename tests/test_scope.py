"""The scope guardrail (schemas/scope.py): the glob grammar, its refusals, and the verdict."""

from __future__ import annotations

import pytest

from gigafactory.config import Settings, SettingsError
from gigafactory.schemas.manifest import FailureClass
from gigafactory.schemas.scope import (
    DETAIL_PATHS,
    MAX_GLOB_CHARS,
    MAX_GLOBS,
    GlobError,
    ScopeVerdict,
    check_scope,
    compile_glob,
    glob_matches,
    validate_globs,
)

# (glob, path, matches)
MATCHES = [
    # ** spans directories, zero of them included
    ("docs/**", "docs/a.md", True),
    ("docs/**", "docs/x/y.md", True),
    ("docs/**", "docs", False),
    ("docs/**", "docsx/a.md", False),
    ("docs/**", "other/docs/a.md", False),
    ("**/*.md", "a.md", True),
    ("**/*.md", "x/y/a.md", True),
    ("**/*.md", "x/y/a.mdx", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/xb", False),
    ("a/**/b", "ab", False),
    ("**", "anything/at/all.txt", True),
    ("**", "top", True),
    ("**/test_*.py", "tests/unit/test_x.py", True),
    ("src/**/__init__.py", "src/__init__.py", True),
    ("**/node_modules/**", "web/node_modules/x/y.js", True),
    ("**/node_modules/**", "node_modules/y.js", True),
    # a trailing / means /**
    ("docs/", "docs/a.md", True),
    ("docs/", "docs/x/y.md", True),
    # globs are anchored at the root: no gitignore-style matching at any depth
    ("*.md", "a.md", True),
    ("*.md", "x/a.md", False),
    ("README.md", "docs/README.md", False),
    ("README.md", "README.md", True),
    # * and ? stay inside one segment
    ("src/*", "src/a.py", True),
    ("src/*", "src/x/a.py", False),
    ("src/*.py", "src/.py", True),
    ("*", ".env", True),
    ("src/?.py", "src/a.py", True),
    ("src/?.py", "src/ab.py", False),
    ("a?b", "a/b", False),
    ("a*b", "a/b", False),
    ("*/*", "a/b", True),
    ("*/*", "a/b/c", False),
    # dotfiles are ordinary names (a protected glob must not be dodged by a leading dot)
    (".github/workflows/**", ".github/workflows/ci.yml", True),
    (".github/workflows/**", ".github/workflows/sub/ci.yml", True),
    (".github/workflows/**", ".github/dependabot.yml", False),
    ("**/.env*", "svc/.env.local", True),
    # character classes: one character, never /
    ("[abc].txt", "b.txt", True),
    ("[abc].txt", "d.txt", False),
    ("[a-c].txt", "b.txt", True),
    ("[!a-c].txt", "d.txt", True),
    ("[!a-c].txt", "a.txt", False),
    ("[^a-c].txt", "a.txt", False),
    ("[!a].txt", "/.txt", False),
    ("x[+-0]y", "x/y", False),  # the range + .. 0 spans '/', which a class never matches
    ("x[+-0]y", "x.y", True),
    ("[]]x", "]x", True),
    ("[!]]x", "ax", True),
    ("[!]]x", "]x", False),
    ("[*]", "*", True),
    ("[*]", "a", False),
    ("[?]", "?", True),
    ("[[]x", "[x", True),
    ("[a&&b]", "&", True),
    ("[a^]", "^", True),
    # regex metacharacters are literal outside classes
    ("a.b", "axb", False),
    ("a+b(c)", "a+b(c)", True),
    ("$x{1}", "$x{1}", True),
    ("a|b", "a", False),
    # case-sensitive, whole-path match
    ("Docs/**", "docs/a.md", False),
    ("src", "src/a.py", False),
    ("src", "src", True),
]


@pytest.mark.parametrize(("glob", "path", "matches"), MATCHES, ids=[f"{g} ~ {p}" for g, p, _ in MATCHES])
def test_glob_matches_exactly_the_paths_the_grammar_names(glob, path, matches):
    assert glob_matches(glob, path) is matches


# (glob, a fragment of the error that says why and what to do)
REFUSED = [
    ("", "is empty"),
    ("/etc/**", "is absolute: globs are relative to the repository root (write etc/** instead)"),
    ("/", "is absolute"),
    ("C:/src/**", "is absolute"),
    ("../other/**", "'..' segment"),
    ("src/../../etc", "'..' segment"),
    ("./src/**", "'.' segment: write the path without ./"),
    ("src//a", "empty path segment"),
    ("src\\a.py", "backslash"),
    ("src/**.py", "write for example src/**/*.py"),
    ("**foo", "** must be a whole path segment"),
    ("a/b**/c", "** must be a whole path segment"),
    ("[abc", "unclosed ["),
    ("a/[!]", "unclosed ["),
    ("a[/]b", "a character class cannot match /"),
    ("a[x/y]b", "a character class cannot match /"),
    ("a\x00b", "NUL"),
    ("x" * (MAX_GLOB_CHARS + 1), f"at most {MAX_GLOB_CHARS}"),
]


@pytest.mark.parametrize(("glob", "why"), REFUSED, ids=[repr(g[:20]) for g, _ in REFUSED])
def test_a_refused_glob_is_named_with_its_field_and_index_and_what_to_write(glob, why):
    errors = validate_globs(["src/**", glob], "scope")
    assert len(errors) == 1, errors
    assert errors[0].startswith("scope[1]: glob ")
    assert why in errors[0]
    with pytest.raises(GlobError, match="glob "):
        compile_glob(glob)


def test_every_valid_glob_of_the_tables_passes_validation():
    assert validate_globs([g for g, _, _ in MATCHES], "scope") == []


@pytest.mark.parametrize(("value", "why"), [
    ("src/**", "expected a list of path globs"),
    ({"src": 1}, "expected a list of path globs"),
    (["ok/**"] * (MAX_GLOBS + 1), f"at most {MAX_GLOBS} are allowed"),
    ([3], "is not a string"),
])
def test_a_glob_list_of_the_wrong_shape_is_refused_naming_the_field(value, why):
    errors = validate_globs(value, "profiles/x.md: scope")
    assert errors and errors[0].startswith("profiles/x.md: scope")
    assert why in errors[0]


def test_no_scope_validates_and_allows_every_unprotected_path():
    assert validate_globs(None, "scope") == []
    v = check_scope(["a.py", "deep/x/y.txt"], None, [".github/workflows/**"], "enforce")
    assert v == ScopeVerdict(ok=True, outside=[], protected=[], detail=v.detail)
    assert "no scope" in v.detail


# (changed, allowed, protected, mode, ok, outside, protected hits)
VERDICTS = [
    (["src/a.py", "tests/test_a.py"], ["src/**", "tests/**"], [], "enforce", True, [], []),
    (["src/a.py", "README.md"], ["src/**"], [], "warn", True, ["README.md"], []),
    (["src/a.py", "README.md"], ["src/**"], [], "enforce", False, ["README.md"], []),
    # an empty scope allows nothing (None is "no scope")
    (["src/a.py"], [], [], "warn", True, ["src/a.py"], []),
    (["src/a.py"], [], [], "enforce", False, ["src/a.py"], []),
    # protected wins over the scope and over warn
    ([".github/workflows/ci.yml"], ["**"], [".github/workflows/**"], "warn", False, [],
     [".github/workflows/ci.yml"]),
    ([".github/workflows/ci.yml"], None, [".github/workflows/**"], "warn", False, [], [".github/workflows/ci.yml"]),
    # a rename counts both paths: moving a protected file out of its folder is refused
    ([".github/workflows/ci.yml", "ci.yml"], None, [".github/workflows/**"], "warn", False, [],
     [".github/workflows/ci.yml"]),
    # a rename out of scope into scope still touched the old path
    (["legacy/a.py", "src/a.py"], ["src/**"], [], "enforce", False, ["legacy/a.py"], []),
    # duplicates are judged once, in the caller's order
    (["b.md", "a.md", "b.md"], ["src/**"], [], "warn", True, ["b.md", "a.md"], []),
    # nothing changed: nothing to refuse
    ([], ["src/**"], [".github/workflows/**"], "enforce", True, [], []),
]


@pytest.mark.parametrize(("changed", "allowed", "protected", "mode", "ok", "outside", "hits"), VERDICTS)
def test_the_verdict_refuses_protected_paths_always_and_outside_paths_only_when_enforced(
        changed, allowed, protected, mode, ok, outside, hits):
    v = check_scope(changed, allowed, protected, mode)
    assert (v.ok, v.outside, v.protected) == (ok, outside, hits)
    for p in outside + hits:
        assert p in v.detail


def test_the_detail_says_what_happened_to_the_change():
    warned = check_scope(["README.md"], ["src/**"], [], "warn")
    assert warned.detail == "1 path outside the scope (src/**): README.md; shipped anyway (scope-mode warn)"
    enforced = check_scope(["README.md", "x.txt"], ["src/**"], [], "enforce")
    assert enforced.detail == "2 paths outside the scope (src/**): README.md, x.txt; refused (scope-mode enforce)"
    both = check_scope([".github/workflows/ci.yml", "README.md"], ["src/**"], [".github/workflows/**"], "warn")
    assert both.detail.startswith("1 path protected by the fleet (.github/workflows/**): .github/workflows/ci.yml; "
                                  "refused whatever the scope mode; ")
    assert "shipped anyway" not in both.detail
    clean = check_scope(["src/a.py"], ["src/**"], [".github/workflows/**"], "enforce")
    assert clean.detail == "1 path changed, all within scope src/** and none protected"


def test_the_detail_names_a_bounded_number_of_paths():
    many = [f"out/{i}.txt" for i in range(DETAIL_PATHS + 5)]
    v = check_scope(many, ["src/**"], [], "enforce")
    assert len(v.outside) == DETAIL_PATHS + 5  # the verdict keeps them all
    assert "and 5 more" in v.detail and f"out/{DETAIL_PATHS}.txt" not in v.detail


@pytest.mark.parametrize(("changed", "why"), [
    (["/etc/passwd"], "not a repository-relative POSIX path"),
    (["../x"], "not a normalised"),
    (["a//b"], "not a normalised"),
    (["./a"], "not a normalised"),
    ([""], "is empty"),
    (["a\\b"], "not a repository-relative POSIX path"),
])
def test_a_changed_path_that_is_not_repository_relative_is_an_error_not_a_pass(changed, why):
    with pytest.raises(ValueError, match=why):
        check_scope(changed, None, [], "warn")


def test_bad_mode_and_bad_globs_raise_instead_of_judging():
    with pytest.raises(ValueError, match="expected one of warn, enforce"):
        check_scope(["a"], None, [], "strict")  # type: ignore[arg-type]
    with pytest.raises(GlobError, match=r"scope\[0\]: glob '/src/\*\*' is absolute"):
        check_scope(["a"], ["/src/**"], [], "warn")
    with pytest.raises(GlobError, match=r"protected_paths\[0\]: glob '\.\./x' has a '\.\.' segment"):
        check_scope(["a"], None, ["../x"], "warn")


def test_failure_classes_for_the_guardrail_and_conflicts_exist():
    assert FailureClass("scope_violation") is FailureClass.SCOPE_VIOLATION
    assert FailureClass("merge_conflict") is FailureClass.MERGE_CONFLICT


def test_protected_paths_default_to_workflows_and_read_a_comma_separated_variable():
    assert Settings().protected_paths == [".github/workflows/**"]
    s = Settings.from_env({"GIGAFACTORY_PROTECTED_PATHS": ".github/workflows/**, deploy/**"})
    assert s.protected_paths == [".github/workflows/**", "deploy/**"]
    assert Settings.from_env({"GIGAFACTORY_PROTECTED_PATHS": ""}).protected_paths == []
    with pytest.raises(SettingsError, match=r"protected_paths \(GIGAFACTORY_PROTECTED_PATHS\)\[1\]: glob "
                                            r"'/etc/\*\*' is absolute"):
        Settings.from_env({"GIGAFACTORY_PROTECTED_PATHS": "ok/**,/etc/**"})


def test_settings_handed_to_a_child_process_read_back_the_same_protected_paths():
    from helpers import fast_env

    env = fast_env(protected_paths=["a/**", ".github/workflows/**"])
    assert env["GIGAFACTORY_PROTECTED_PATHS"] == "a/**,.github/workflows/**"
    assert Settings.from_env(env).protected_paths == ["a/**", ".github/workflows/**"]
