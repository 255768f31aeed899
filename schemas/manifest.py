"""The job file: markdown with a YAML front-matter manifest.

    ---
    engine: shell
    cwd: scratch-repo
    verify: test -f hello.txt
    ---
    echo hello > hello.txt

Only ``engine`` (or ``engine-class``) and ``cwd`` are required; every other field has the
default documented on :class:`Manifest`. Unknown fields are refused with a suggestion.
Every error names the file, the line and the field, and says what was expected, and a
batch of files is parsed completely before anything is submitted.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import yaml

from . import capabilities as caps


class Priority(enum.StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


PRIORITY_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.MEDIUM: 2, Priority.LOW: 3}
"""Lower runs first."""


class EngineClass(enum.StrEnum):
    AGENTIC_CODER = "agentic-coder"
    CHAT_CODER = "chat-coder"
    REVIEW_ONLY = "review-only"


ENGINE_CLASSES: dict[str, EngineClass] = {
    "claude": EngineClass.AGENTIC_CODER,
    "codex": EngineClass.AGENTIC_CODER,
    "aider": EngineClass.AGENTIC_CODER,
    "gemini": EngineClass.AGENTIC_CODER,
    "devin": EngineClass.AGENTIC_CODER,
    "copilot": EngineClass.CHAT_CODER,
}
"""Which class each known engine belongs to; an explicit ``engine`` always wins over ``engine-class``."""


class FailureClass(enum.StrEnum):
    """Why an attempt failed; ``retry.on`` lists the classes that are retried."""

    TIMEOUT = "timeout"
    """``timeout`` elapsed before the engine finished."""
    VERIFY_FAILED = "verify_failed"
    """The engine finished but the ``verify`` command failed."""
    CRASH = "crash"
    """The engine exited non-zero or was killed."""
    LEASE_EXPIRED = "lease_expired"
    """The lease holder stopped renewing (crashed, partitioned, or too slow)."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """``budget.wall`` (or a spend budget) ran out. Not retried by default."""
    SETUP_FAILED = "setup_failed"
    """The job could not start on the factory (``cwd`` missing, engine not runnable)."""


class Budget(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Ceilings for one attempt. ``wall`` is a hard wall-clock limit like ``timeout``."""

    usd: float | None = None
    tokens: int | None = None
    wall: str | None = None


class Retry(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How failed attempts are retried.

    ``max`` retries after the first attempt (so ``max + 1`` attempts in all); the n-th retry
    waits ``backoff * 2**(n-1)``, capped at one hour. Failure classes not in ``on`` end the
    job in ``failed``; running out of retries ends it in ``dead_letter``.
    """

    max: int = 2
    backoff: str = "5s"
    on: list[FailureClass] = msgspec.field(
        default_factory=lambda: [
            FailureClass.TIMEOUT,
            FailureClass.VERIFY_FAILED,
            FailureClass.CRASH,
            FailureClass.LEASE_EXPIRED,
        ]
    )


class Reviewers(msgspec.Struct, forbid_unknown_fields=True):
    reviewers: list[str]


ReviewPolicy = Literal["auto", "manual"] | Reviewers
"""``manual`` (default): verify pass -> ``testing``, then a human ``ship``. ``auto``: verify pass
ships at once. ``{reviewers: [...]}``: verify pass -> ``review`` until a reviewer ships it."""


class Manifest(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, omit_defaults=True):
    """The front matter of a job file. Field names are kebab-case in YAML."""

    cwd: str
    """Working directory on the factory; a relative path is under the factory's workspace."""
    engine: str | None = None
    """Concrete engine (``shell``, ``claude``, ``codex``, ...). Required unless ``engine-class`` is set."""
    model: str | None = None
    product: str = "default"
    """Which product (funding line) this job belongs to; used for fairness and attribution."""
    engine_class: EngineClass | None = None
    profile: str | None = None
    yolo: bool = False
    """Let the engine act without asking (dangerous/auto-approve mode)."""
    lock: str | None = None
    """Jobs sharing a lock never run at the same time anywhere in the fleet."""
    timeout: str = "30m"
    verify: str | None = None
    """A shell command run in ``cwd`` after the engine; exit 0 passes the gate."""
    capabilities: list[str] = msgspec.field(default_factory=list)
    prefers: list[str] = msgspec.field(default_factory=list)
    """Soft routing hints (``factory:mac-2``); never required."""
    priority: Priority = Priority.MEDIUM
    budget: Budget = msgspec.field(default_factory=Budget)
    deps: list[str] = msgspec.field(default_factory=list)
    """Job ids or idempotency keys that must reach ``shipped`` (or ``testing`` if soft) first."""
    deps_mode: Literal["hard", "soft"] = "hard"
    idempotency_key: str | None = None
    retry: Retry = msgspec.field(default_factory=Retry)
    review_policy: ReviewPolicy = "manual"
    artifacts: list[str] = msgspec.field(default_factory=list)
    tracker_item: str | None = None
    kind: Literal["leaf", "composite"] = "leaf"
    parent: str | None = None

    def requirements(self) -> tuple[str, ...]:
        """The canonical requirement set: capabilities plus the engine (or engine class)."""
        extra = [f"engine:{self.engine}"] if self.engine else [f"engine-class:{self.engine_class}"]
        return caps.canonical([*self.capabilities, *extra])

    def timeout_s(self) -> float:
        """The hard ceiling for one attempt: the smaller of ``timeout`` and ``budget.wall``."""
        t = parse_duration(self.timeout)
        if self.budget.wall is not None:
            t = min(t, parse_duration(self.budget.wall))
        return t


FIELD_NAMES: tuple[str, ...] = tuple(f.encode_name for f in msgspec.structs.fields(Manifest))
_NESTED = {
    "budget": tuple(f.encode_name for f in msgspec.structs.fields(Budget)),
    "retry": tuple(f.encode_name for f in msgspec.structs.fields(Retry)),
}

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h|d))+\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float) -> float:
    """``'90s'``, ``'5m'``, ``'1h30m'``, ``'250ms'`` or a number of seconds -> seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"{text!r} is negative")
        return float(text)
    if not _DURATION_RE.match(text):
        raise ValueError(f"{text!r} is not a duration: expected a number with a unit, like 90s, 5m, 1h30m")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))


class ManifestError(ValueError):
    """A job file is invalid. ``str()`` names the file, the line, the field and the fix."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path, self.line, self.field, self.message = path, line, field, message
        where = path if line is None else f"{path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class JobFile:
    """A parsed, validated job file."""

    path: str
    manifest: Manifest
    body: str

    @property
    def content_hash(self) -> str:
        """What idempotency compares: the normalized manifest and the body."""
        return content_hash(self.manifest, self.body)


def content_hash(manifest: Manifest, body: str) -> str:
    h = hashlib.sha256(msgspec.json.encode(manifest, order="sorted"))
    h.update(b"\0")
    h.update(body.encode())
    return h.hexdigest()


_FRONT = re.compile(r"\A(?:\ufeff)?---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the 1-based line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str) or not key:
            raise yaml.constructor.ConstructorError(
                None, None, f"field names must be text, got {key!r}", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"field '{key}' appears twice", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    mapping["\0lines"] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# YAML 1.1 reads on/off/yes/no as booleans, which would turn ``retry: {on: [...]}`` into a
# ``True`` key. Job files follow YAML 1.2 here: only true/false are booleans.
_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _strip_lines(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "\0lines"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def _suggest(name: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known fields: " + ", ".join(choices)


def parse_job_text(text: str, path: str = "<job>") -> JobFile:
    """Parse and validate one job file's text. Raises :class:`ManifestError`."""
    m = _FRONT.match(text)
    if not m:
        raise ManifestError(
            path, 1, None,
            "no YAML front matter: a job file starts with a line '---', the manifest "
            "(at least 'engine' and 'cwd'), and another line '---', then the prompt",
        )
    front = m.group(1) or ""
    body = text[m.end():]
    # Front matter starts on line 2 of the file.
    offset = 1
    try:
        raw = yaml.load(front, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        line = (e.problem_mark.line + 1 + offset) if e.problem_mark else None
        raise ManifestError(path, line, None, f"invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ManifestError(path, None, None, f"invalid YAML: {e}") from None
    if raw is None:
        raw = {"\0lines": {}}
    if not isinstance(raw, dict):
        raise ManifestError(path, 1 + offset, None, "the front matter must be a mapping of fields, like 'engine: shell'")
    lines: dict[str, int] = {k: v + offset for k, v in raw.get("\0lines", {}).items()}

    def line_of(field: str | None) -> int | None:
        return lines.get(field) if field else None

    for key in raw:
        if key == "\0lines":
            continue
        if key not in FIELD_NAMES:
            raise ManifestError(path, line_of(key), key, f"unknown field; {_suggest(key, FIELD_NAMES)}")
    for parent, names in _NESTED.items():
        sub = raw.get(parent)
        if isinstance(sub, dict):
            sub_lines = sub.get("\0lines", {})
            for key in sub:
                if key != "\0lines" and key not in names:
                    raise ManifestError(
                        path, sub_lines.get(key, 0) + offset if key in sub_lines else line_of(parent),
                        f"{parent}.{key}", f"unknown field; {_suggest(key, names)}",
                    )

    data = _strip_lines(raw)
    for required in ("cwd",):
        if required not in data or data[required] in (None, ""):
            raise ManifestError(path, None, required, f"'{required}' is required (the directory the job runs in)")
    if not data.get("engine") and not data.get("engine-class"):
        raise ManifestError(
            path, None, "engine",
            "'engine' is required (for example 'engine: shell'), unless 'engine-class' names a class "
            f"({', '.join(c.value for c in EngineClass)})",
        )
    try:
        manifest = msgspec.convert(data, Manifest, strict=True)
    except msgspec.ValidationError as e:
        field, msg = _field_of_validation_error(str(e))
        top = field.split(".")[0].split("[")[0] if field else None
        raise ManifestError(path, line_of(top), field, msg) from None

    _check_semantics(manifest, path, line_of)
    return JobFile(path=path, manifest=manifest, body=body)


def _field_of_validation_error(text: str) -> tuple[str | None, str]:
    # msgspec: "Expected `int`, got `str` - at `$.retry.max`"
    m = re.match(r"^(.*?)(?: - at `\$(.*)`)?$", text, re.S)
    assert m is not None
    msg, at = m.group(1), m.group(2)
    field = at.lstrip(".") if at else None
    msg = msg.replace("`", "'")
    if msg.startswith("Invalid enum value"):
        msg = f"{msg}; expected one of the documented values"
    return field or None, msg


def _check_semantics(m: Manifest, path: str, line_of) -> None:
    def fail(field: str, message: str) -> None:
        raise ManifestError(path, line_of(field.split(".")[0]), field, message)

    if m.engine is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", m.engine):
        fail("engine", f"{m.engine!r} is not an engine name (lower-case letters, digits, '-' and '_')")
    for field, value in (("timeout", m.timeout), ("budget.wall", m.budget.wall), ("retry.backoff", m.retry.backoff)):
        if value is None:
            continue
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            fail(field, str(e))
        if field != "retry.backoff" and seconds <= 0:
            fail(field, f"{value!r} must be longer than zero")
    if m.retry.max < 0 or m.retry.max > 100:
        fail("retry.max", f"{m.retry.max} is out of range: expected 0 to 100 retries")
    if m.budget.usd is not None and m.budget.usd < 0:
        fail("budget.usd", "must not be negative")
    if m.budget.tokens is not None and m.budget.tokens < 0:
        fail("budget.tokens", "must not be negative")
    for i, token in enumerate(m.capabilities):
        try:
            caps.parse_requirement(token)
        except caps.CapabilityError as e:
            fail(f"capabilities[{i}]", str(e))
    for i, dep in enumerate(m.deps):
        if not isinstance(dep, str) or not dep.strip():
            fail(f"deps[{i}]", "a dependency is a job id or an idempotency key")
    if m.lock is not None and not m.lock.strip():
        fail("lock", "must not be empty; leave it out for no lock")
    if m.idempotency_key is not None and not m.idempotency_key.strip():
        fail("idempotency-key", "must not be empty; leave it out for no deduplication")
    if isinstance(m.review_policy, Reviewers) and not m.review_policy.reviewers:
        fail("review-policy", "'reviewers' needs at least one name, like {reviewers: ['@alice']}")


def parse_job_file(path: str) -> JobFile:
    """Read and parse one job file from disk."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ManifestError(path, None, None, "not UTF-8 text; save the job file as UTF-8") from None
    except OSError as e:
        raise ManifestError(path, None, None, f"cannot read: {e.strerror}") from None
    return parse_job_text(text, path)


def shell_script(body: str) -> str:
    """The script the ``shell`` engine runs: the fenced ``sh``/``bash``/``shell`` blocks of the
    body if it has any (so a job file can carry prose around its code), else the whole body."""
    blocks = re.findall(r"^```[ \t]*(?:sh|bash|shell|zsh)[ \t]*\r?\n(.*?)^```[ \t]*$", body, re.S | re.M)
    return "\n".join(blocks) if blocks else body
