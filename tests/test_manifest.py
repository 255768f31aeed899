"""The job file: markdown with a YAML front-matter manifest (schemas/manifest.py)."""

from __future__ import annotations

import math

import pytest

from gigafactory.schemas.manifest import (
    FIELD_NAMES,
    Budget,
    EngineClass,
    FailureClass,
    JobFile,
    ManifestError,
    Priority,
    Retry,
    Reviewers,
    content_hash,
    parse_duration,
    parse_job_file,
    parse_job_text,
    shell_script,
)
from gigafactory.schemas.limits import (
    Limits,
)


def job(front: str, body: str = "echo hello\n") -> str:
    """A job file's text from its front-matter lines (the manifest starts on line 2)."""
    return f"---\n{front}---\n{body}"


def refused(text: str, path: str = "jobs/bad.md") -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse_job_text(text, path)
    return caught.value


# --- valid manifests -------------------------------------------------------------------------


def test_a_file_with_only_engine_and_cwd_is_valid_and_every_default_is_as_documented():
    parsed = parse_job_text(job("engine: shell\ncwd: scratch-repo\n"), "jobs/min.md")

    m = parsed.manifest
    assert isinstance(parsed, JobFile)
    assert parsed.path == "jobs/min.md"
    assert parsed.body == "echo hello\n"
    assert (m.engine, m.cwd) == ("shell", "scratch-repo")
    assert m.model is None
    assert m.product == "default"
    assert m.engine_class is None
    assert m.profile is None
    assert m.yolo is False
    assert m.lock is None
    assert m.timeout == "30m" and m.timeout_s() == 1800.0
    assert m.verify is None
    assert m.capabilities == [] and m.prefers == []
    assert m.priority is Priority.MEDIUM
    assert m.budget == Budget(usd=None, tokens=None, wall=None)
    assert m.deps == [] and m.deps_mode == "hard"
    assert m.idempotency_key is None
    assert m.retry == Retry(
        max=2,
        backoff="5s",
        on=[FailureClass.TIMEOUT, FailureClass.VERIFY_FAILED, FailureClass.CRASH, FailureClass.LEASE_EXPIRED,
            FailureClass.AUTH_FAILED, FailureClass.RATE_LIMITED],
    )
    assert FailureClass.BUDGET_EXCEEDED not in m.retry.on
    assert m.review_policy == "manual"
    assert m.artifacts == []
    assert m.tracker_item is None
    assert m.kind == "leaf"
    assert m.parent is None
    assert m.requirements() == ("engine:shell",)


FULL = """\
cwd: repos/web
engine: claude
model: opus-4
product: storefront
engine-class: agentic-coder
profile: careful
yolo: true
lock: repo:web
timeout: 1h30m
verify: make test
capabilities: [os:linux, node>=20, has:git]
prefers: [factory:mac-2]
priority: critical
budget:
  usd: 12.5
  tokens: 400000
  wall: 45m
deps: [job-a, release-key]
deps-mode: soft
idempotency-key: web-login-fix
retry:
  max: 5
  backoff: 10s
  on: [crash, timeout]
review-policy:
  reviewers: ['@alice', '@bob']
artifacts: [dist/report.html]
tracker-item: WEB-42
kind: composite
parent: epic-7
repo: https://git.example.com/web.git
base: release/2.1
scope: [src/**, '**/*.md']
scope-mode: enforce
ship-as: pr-opened
lane-kind: background
feature: true
cosmetic: true
"""


def test_a_manifest_with_every_field_parses_each_one():
    m = parse_job_text(job(FULL, "Fix the login form.\n"), "jobs/full.md").manifest

    assert m.cwd == "repos/web"
    assert m.engine == "claude"
    assert m.model == "opus-4"
    assert m.product == "storefront"
    assert m.engine_class is EngineClass.AGENTIC_CODER
    assert m.profile == "careful"
    assert m.yolo is True
    assert m.lock == "repo:web"
    assert m.timeout == "1h30m"
    assert m.verify == "make test"
    assert m.capabilities == ["os:linux", "node>=20", "has:git"]
    assert m.prefers == ["factory:mac-2"]
    assert m.priority is Priority.CRITICAL
    assert m.budget == Budget(usd=12.5, tokens=400000, wall="45m")
    assert m.deps == ["job-a", "release-key"]
    assert m.deps_mode == "soft"
    assert m.idempotency_key == "web-login-fix"
    assert m.retry == Retry(max=5, backoff="10s", on=[FailureClass.CRASH, FailureClass.TIMEOUT])
    assert m.review_policy == Reviewers(reviewers=["@alice", "@bob"])
    assert m.artifacts == ["dist/report.html"]
    assert m.tracker_item == "WEB-42"
    assert m.kind == "composite"
    assert m.parent == "epic-7"
    assert m.repo == "https://git.example.com/web.git"
    assert m.base == "release/2.1"
    assert m.scope == ["src/**", "**/*.md"]
    assert m.scope_mode == "enforce"
    assert m.ship_as == "pr-opened"
    assert m.lane_kind == "background"
    assert m.feature is True and m.cosmetic is True
    # the engine wins over the engine class; budget.wall is the tighter ceiling
    assert m.requirements() == ("engine:claude", "has:git", "node>=20", "os:linux")
    assert m.timeout_s() == 45 * 60.0


def test_the_full_manifest_in_these_tests_names_every_field_there_is():
    # A field added to Manifest without a test here makes this fail.
    named = {line.split(":", 1)[0] for line in FULL.splitlines() if line and not line.startswith(" ")}
    assert named == set(FIELD_NAMES)


def test_engine_class_alone_stands_in_for_engine():
    m = parse_job_text(job("engine-class: chat-coder\ncwd: x\n")).manifest

    assert m.engine is None
    assert m.engine_class is EngineClass.CHAT_CODER
    assert m.requirements() == ("engine-class:chat-coder",)


def test_the_body_is_everything_after_the_closing_line_and_crlf_files_parse():
    parsed = parse_job_text("---\r\nengine: shell\r\ncwd: x\r\n---\r\nline one\r\nline two\r\n")

    assert parsed.manifest.cwd == "x"
    assert parsed.body == "line one\r\nline two\r\n"


# --- invalid manifests: each names the file, the line and the field ---------------------------

INVALID = [
    # (id, front matter, line, field, words the message must contain)
    ("unknown field with a suggestion", "engine: shell\ncwd: x\nverfy: make test\n", 4, "verfy",
     "unknown field; did you mean 'verify'?"),
    ("snake_case field", "engine: shell\ncwd: x\nengine_class: chat-coder\n", 4, "engine_class",
     "did you mean 'engine-class'? (field names are kebab-case)"),
    ("wrong type", "engine: shell\ncwd: x\nretry:\n  max: three\n", 5, "retry.max",
     "expected a whole number, got the text 'three'"),
    ("list expected", "engine: shell\ncwd: x\ncapabilities: os:linux\n", 4, "capabilities",
     "expected a list, got the text 'os:linux'"),
    ("bad enum", "engine: shell\ncwd: x\npriority: urgent\n", 4, "priority",
     "'urgent' is not a priority; expected one of critical, high, medium, low"),
    ("missing cwd", "engine: shell\n", None, "cwd", "'cwd' is required"),
    ("blank cwd", "engine: shell\ncwd: '  '\n", 3, "cwd", "'cwd' is required"),
    ("missing engine", "cwd: x\npriority: high\n", None, "engine",
     "'engine' is required (for example 'engine: shell'), unless 'engine-class' names a class"),
    ("bad capability token", "engine: shell\ncwd: x\ncapabilities:\n  - os:linux\n  - node >= 20\n", 6,
     "capabilities[1]", "'node >= 20' is not a capability"),
    ("comparison with no version", "engine: shell\ncwd: x\ncapabilities: [node>=lts]\n", 4,
     "capabilities[0]", "'lts' is not a version"),
    ("bad duration", "engine: shell\ncwd: x\ntimeout: forever\n", 4, "timeout",
     "'forever' is not a duration: expected a number with a unit, like 90s, 5m, 1h30m"),
    ("duration without unit", "engine: shell\ncwd: x\nbudget:\n  wall: 90\n", 5, "budget.wall",
     "90 has no unit; write a duration like '90s'"),
    ("zero timeout", "engine: shell\ncwd: x\ntimeout: 0s\n", 4, "timeout", "must be longer than zero"),
    ("unknown nested field in budget", "engine: shell\ncwd: x\nbudget:\n  usd: 3\n  dollars: 5\n", 6,
     "budget.dollars", "unknown field; known fields: usd, tokens, wall"),
    ("unknown nested field in retry", "engine: shell\ncwd: x\nretry:\n  max: 1\n  backof: 5s\n", 6,
     "retry.backof", "did you mean 'backoff'?"),
    ("duplicate key", "engine: shell\ncwd: x\nengine: claude\n", 4, "engine",
     "given twice (first on line 2)"),
    ("duplicate nested key", "engine: shell\ncwd: x\nretry:\n  max: 1\n  max: 2\n", 6, "retry.max",
     "given twice (first on line 5)"),
    ("invalid YAML", "engine: shell\ncwd: [x\n", 3, "cwd", "invalid YAML: expected ',' or ']'"),
    ("tab indentation", "engine: shell\ncwd: x\n\tpriority: high\n", 4, "priority",
     "indent with spaces"),
    ("negative retry.max", "engine: shell\ncwd: x\nretry: {max: -1}\n", 4, "retry.max",
     "-1 is out of range: expected 0 to 100 retries"),
    ("negative budget", "engine: shell\ncwd: x\nbudget:\n  tokens: -5\n", 5, "budget.tokens",
     "must not be negative"),
    ("bad engine name", "engine: Claude Code\ncwd: x\n", 2, "engine", "'Claude Code' is not an engine name"),
    ("number as a field name", "engine: shell\ncwd: x\n1: 2\n", 4, "1", "a field name must be text"),
    ("merge key", "engine: shell\ncwd: x\n<<: {kind: leaf}\n", 4, "<<", "merge keys are not supported"),
    ("empty reviewers", "engine: shell\ncwd: x\nreview-policy: {reviewers: []}\n", 4,
     "review-policy.reviewers", "needs at least one name"),
    ("unknown field in reviewers", "engine: shell\ncwd: x\nreview-policy:\n  reviewer: ['@a']\n", 5,
     "review-policy.reviewer", "did you mean 'reviewers'?"),
    ("empty lock", "engine: shell\ncwd: x\nlock: ''\n", 4, "lock", "must not be empty"),
]


@pytest.mark.parametrize(("front", "line", "field", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_an_invalid_manifest_is_refused_naming_file_line_and_field(front, line, field, words):
    error = refused(job(front), "jobs/bad.md")

    assert (error.path, error.line, error.field) == ("jobs/bad.md", line, field)
    assert words in error.message
    where = "jobs/bad.md" if line is None else f"jobs/bad.md:{line}"
    assert str(error).startswith(f"{where}: field '{field}': ")
    assert error.to_dict() == {"file": "jobs/bad.md", "line": line, "field": field, "message": error.message}


ENUMS = [
    ("priority", "priority: urgent\n", 4, "'urgent' is not a priority; expected one of critical, high, medium, low"),
    ("engine-class", "engine-class: robot\n", 4,
     "'robot' is not an engine-class; expected one of agentic-coder, chat-coder, review-only"),
    ("deps-mode", "deps-mode: maybe\n", 4, "'maybe' is not a deps-mode; expected one of hard, soft"),
    ("kind", "kind: tree\n", 4, "'tree' is not a kind; expected one of composite, leaf"),
    ("retry.on[1]", "retry:\n  max: 1\n  on:\n    - crash\n    - meteor\n", 8,
     "'meteor' is not a failure class; expected one of timeout, verify_failed, crash, lease_expired, "
     "budget_exceeded, setup_failed, rate_limited, auth_failed, context_overflow, scope_violation, merge_conflict"),
    ("review-policy", "review-policy: sometimes\n", 4,
     "'sometimes' is not a review-policy; expected one of auto, manual or a mapping {reviewers: [...]}"),
]


@pytest.mark.parametrize(("field", "front", "line", "message"), ENUMS, ids=[e[0] for e in ENUMS])
def test_a_value_outside_an_enum_is_refused_listing_the_values_that_field_allows(field, front, line, message):
    error = refused(job("engine: shell\ncwd: x\n" + front))

    assert (error.line, error.field, error.message) == (line, field, message)


def test_a_wrong_type_for_an_enum_field_also_lists_the_allowed_values():
    error = refused(job("engine: shell\ncwd: x\nreview-policy: 3\n"))

    assert (error.line, error.field) == (4, "review-policy")
    assert error.message == "expected one of auto, manual or a mapping {reviewers: [...]}, got the number 3"


def test_yaml_1_1_booleans_are_refused_so_yolo_yes_is_an_error():
    error = refused(job("engine: shell\ncwd: x\nyolo: yes\n"))

    assert (error.line, error.field) == (4, "yolo")
    assert "expected true or false, got the text 'yes'" in error.message
    assert "YAML 1.2" in error.message
    assert parse_job_text(job("engine: shell\ncwd: x\nyolo: true\n")).manifest.yolo is True


def test_retry_on_is_a_field_name_not_a_boolean():
    m = parse_job_text(job("engine: shell\ncwd: x\nretry: {on: [crash]}\n")).manifest

    assert m.retry.on == [FailureClass.CRASH]
    assert m.retry.max == 2  # the rest of retry keeps its defaults


def test_a_file_without_front_matter_is_refused_on_line_1():
    error = refused("engine: shell\ncwd: x\n\necho hi\n")

    assert (error.line, error.field) == (1, None)
    assert "no YAML front matter" in error.message


def test_front_matter_that_is_never_closed_says_so():
    error = refused("---\nengine: shell\ncwd: x\necho hi\n")

    assert error.line == 1
    assert "never closed: add a line '---'" in error.message


def test_front_matter_that_is_not_a_mapping_is_refused():
    error = refused(job("- engine: shell\n"))

    assert error.line == 2
    assert "must be a mapping of fields" in error.message


def test_a_recursive_yaml_alias_is_refused_instead_of_looping():
    error = refused(job("engine: shell\ncwd: x\ncapabilities: &loop [*loop]\n"))

    assert (error.line, error.field) == (4, "capabilities[0]")


# --- reading files ---------------------------------------------------------------------------


def test_parse_job_file_reads_a_utf8_file(tmp_path):
    path = tmp_path / "hello.md"
    path.write_text(job("engine: shell\ncwd: x\n", "echo héllo\n"), encoding="utf-8")

    parsed = parse_job_file(str(path))

    assert parsed.path == str(path)
    assert parsed.body == "echo héllo\n"


def test_parse_job_file_refuses_a_non_utf8_file_naming_the_line_of_the_bad_byte(tmp_path):
    path = tmp_path / "latin1.md"
    path.write_bytes(job("engine: shell\ncwd: x\n", "echo h\xe9llo\n").encode("latin-1"))

    with pytest.raises(ManifestError) as caught:
        parse_job_file(str(path))

    assert caught.value.path == str(path)
    assert caught.value.line == 5
    assert "not UTF-8 text (byte 0xe9" in caught.value.message
    assert "save the job file as UTF-8" in caught.value.message


def test_parse_job_file_on_a_missing_file_says_it_cannot_be_read(tmp_path):
    path = tmp_path / "nope.md"

    with pytest.raises(ManifestError) as caught:
        parse_job_file(str(path))

    assert caught.value.path == str(path)
    assert caught.value.message == "cannot read the job file: No such file or directory"


# --- shell_script ----------------------------------------------------------------------------


def test_shell_script_runs_only_the_fenced_shell_blocks_of_a_body_with_prose():
    body = (
        "Make the greeting.\n\n"
        "```sh\necho hello > hello.txt\n```\n\n"
        "Some notes, and code that is not shell:\n\n"
        "```python\nprint('not run')\n```\n\n"
        "```bash\ncat hello.txt\n```\n"
    )

    script = shell_script(body)

    assert "echo hello > hello.txt" in script
    assert "cat hello.txt" in script
    assert script.index("echo hello") < script.index("cat hello.txt")
    assert "not run" not in script
    assert "Make the greeting" not in script


def test_shell_script_falls_back_to_the_whole_body_without_shell_blocks():
    body = "echo one\necho two\n"

    assert shell_script(body) == body
    assert shell_script("```python\nprint(1)\n```\n") == "```python\nprint(1)\n```\n"


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        (" 1m 30s ", 90.0),
        ("0s", 0.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_reads_units_and_plain_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["forever", "5", "m", "5 min", "-5s", "", "1h30", -1, math.inf, math.nan, True])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


# --- content hash ----------------------------------------------------------------------------


def test_content_hash_changes_with_the_body_and_the_manifest_but_not_with_key_order():
    base = parse_job_text(job("engine: shell\ncwd: x\npriority: high\n", "echo a\n"))
    reordered = parse_job_text(job("priority: high\ncwd: x\nengine: shell\n", "echo a\n"))
    other_body = parse_job_text(job("engine: shell\ncwd: x\npriority: high\n", "echo b\n"))
    other_manifest = parse_job_text(job("engine: shell\ncwd: x\npriority: low\n", "echo a\n"))

    assert base.content_hash == reordered.content_hash
    assert base.content_hash != other_body.content_hash
    assert base.content_hash != other_manifest.content_hash
    assert base.content_hash == content_hash(base.manifest, base.body)
    assert len(base.content_hash) == 64


def test_content_hash_treats_a_stated_default_like_an_omitted_one():
    implicit = parse_job_text(job("engine: shell\ncwd: x\n"))
    explicit = parse_job_text(job("engine: shell\ncwd: x\npriority: medium\ntimeout: 30m\n"))

    assert implicit.content_hash == explicit.content_hash


# --- limits: one bad file is a clean, named refusal ------------------------------------------


@pytest.mark.parametrize(
    ("nested", "line", "field"),
    [
        ("a: " + "[" * 500 + "]" * 500, 4, "a"),
        ("a: " + "{a: " * 500 + "1" + "}" * 500, 4, "a"),
        # 45 KB of indentation: under the size limit, so it reaches the parser. The 17th
        # mapping opens on the 17th line of the nest.
        ("a:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(300)) + " " * 301 + "b: 1\n", 20, ".".join(["a"] * 17)),
    ],
    ids=["flow-lists", "flow-mappings", "block-mappings"],
)
def test_front_matter_nested_hundreds_of_levels_deep_is_refused_naming_the_limit(nested, line, field):
    error = refused(job("engine: shell\ncwd: x\n" + nested + "\n"), "jobs/deep.md")

    assert isinstance(error, ManifestError)  # not a RecursionError
    assert (error.path, error.line, error.field) == ("jobs/deep.md", line, field)
    assert "nested more than 16 levels deep" in error.message
    assert "max_manifest_depth" in error.message and "GIGAFACTORY_MAX_MANIFEST_DEPTH" in error.message


def test_the_depth_limit_is_a_setting_and_a_manifest_within_it_parses():
    deep = "budget: {usd: 1}\nretry: {on: [crash]}\n"

    assert parse_job_text(job("engine: shell\ncwd: x\n" + deep), limits=Limits(max_manifest_depth=3)).manifest.retry.on == [
        FailureClass.CRASH]
    error = refused_with(job("engine: shell\ncwd: x\n" + deep), Limits(max_manifest_depth=2))
    assert error.field == "retry" and "nested more than 2 levels" in error.message


def refused_with(text: str, limits: Limits, path: str = "jobs/bad.md") -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse_job_text(text, path, limits)
    return caught.value


def test_a_depth_limit_past_what_the_parser_can_recurse_is_refused_as_a_setting():
    with pytest.raises(ValueError, match="max_manifest_depth = 500: at most 200"):
        Limits(max_manifest_depth=500)


def test_an_alias_repeated_into_gigabytes_is_refused_by_its_written_out_size():
    # 5,000 aliases of a 1 KB text: 6 KB of YAML that would be 5 MB in the record.
    front = 'engine: shell\ncwd: x\nmodel: &m "' + "y" * 1000 + '"\nprefers: [' + ", ".join(["*m"] * 5000) + "]\n"

    error = refused(job(front))

    assert error.line == 2 and "with its YAML aliases written out" in error.message
    assert "max_manifest_bytes" in error.message


def test_a_job_file_over_the_file_limit_is_refused_before_it_is_parsed():
    text = job("engine: shell\ncwd: x\n", "x" * 600_000)

    error = refused(text)

    assert (error.line, error.field) == (None, None)
    assert "the job file is 600," in error.message and "max_job_file_bytes = 524,288" in error.message


def test_a_body_and_a_front_matter_over_their_limits_are_refused_naming_each():
    small = Limits(max_body_bytes=100, max_manifest_bytes=60)

    body = refused_with(job("engine: shell\ncwd: x\n", "é" * 60), small)
    assert body.line == 5 and "the prompt (everything after the closing '---') is 120 bytes" in body.message
    assert "max_body_bytes = 100" in body.message
    front = refused_with(job("engine: shell\ncwd: x\nverify: " + "t" * 60 + "\n"), small)
    assert front.line == 2 and "the front matter is" in front.message and "max_manifest_bytes = 60" in front.message
    assert parse_job_text(job("engine: shell\ncwd: x\n", "é" * 50), limits=small).body == "é" * 50


def test_deps_over_the_limit_and_keys_over_their_length_are_refused_naming_the_field():
    deps = "deps: [" + ", ".join(f"d{i}" for i in range(1001)) + "]\n"
    error = refused(job("engine: shell\ncwd: x\n" + deps))
    assert (error.line, error.field) == (4, "deps")
    assert "1,001 entries" in error.message and "max_deps = 1,000" in error.message

    for field, front in (("idempotency-key", "idempotency-key: "), ("lock", "lock: "), ("deps[1]", "deps: [ok, ")):
        text = front + "k" * 257 + ("]" if front.startswith("deps") else "") + "\n"
        error = refused(job("engine: shell\ncwd: x\n" + text))
        assert error.field == field and "257 characters" in error.message and "max_key_chars = 256" in error.message


# --- shell_script on pathological bodies -------------------------------------------------------


def test_shell_script_on_thousands_of_unclosed_fences_returns_the_whole_body():
    # 20,000 openings and no closing: no block, so the whole body runs (as with one opening).
    body = "```sh\n" * 20_000 + "echo x\n"

    assert shell_script(body) == body


def test_shell_script_on_thousands_of_openings_closed_once_takes_the_first_block():
    body = "```bash\n" * 20_000 + "echo x\n```\nprose\n```sh\necho y\n```\n"

    assert shell_script(body) == "```bash\n" * 19_999 + "echo x\n" + "\n" + "echo y\n"


def test_shell_script_on_many_blocks_keeps_every_one_in_order():
    body = "".join(f"step {i}\n```sh\necho {i}\n```\n" for i in range(10_000))

    assert shell_script(body) == "\n".join(f"echo {i}\n" for i in range(10_000))


def test_shell_script_reads_blocks_of_a_crlf_file():
    body = "Prose.\r\n```sh\r\necho one\r\n```\r\nMore prose.\r\n```bash\r\necho two\r\n```\r\n"

    assert shell_script(body) == "echo one\r\n\necho two\r\n"
