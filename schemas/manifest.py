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
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import yaml

from .scope import validate_globs
from . import capabilities as caps
from .limits import Limits


class Priority(enum.StrEnum):
    """Dispatch order: among queued jobs a factory could take, the higher priority goes first."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    """The default."""
    LOW = "low"


PRIORITY_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.MEDIUM: 2, Priority.LOW: 3}
"""Lower runs first."""


class EngineClass(enum.StrEnum):
    """A kind of engine, for jobs that can run on any engine of that kind (``engine-class``)."""

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
    RATE_LIMITED = "rate_limited"
    """The engine's model provider refused it for its rate limit (HTTP 429) after the engine's
    own retries."""
    AUTH_FAILED = "auth_failed"
    """The engine's credential was refused (HTTP 401/403)."""
    CONTEXT_OVERFLOW = "context_overflow"
    """The conversation no longer fit the model's context window."""
    SCOPE_VIOLATION = "scope_violation"
    """The attempt changed paths outside the job's ``scope`` under ``scope-mode: enforce``, or
    paths the fleet protects (``protected_paths``) in any mode; nothing was pushed. Not
    retried by default: the same prompt tends to make the same change."""
    MERGE_CONFLICT = "merge_conflict"
    """``base`` moved and the job's branch no longer merges cleanly, after the one
    ``rebase-needed`` retry from the new base. Not retried by default."""


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
            # Retried elsewhere: the refusing factory withdraws the engine until its key changes.
            FailureClass.AUTH_FAILED,
            FailureClass.RATE_LIMITED,
        ]
    )


class Reviewers(msgspec.Struct, forbid_unknown_fields=True):
    """``{reviewers: ['@rita', '@sam'], quorum: 2}``: only a listed reviewer's identity ships
    (``@`` ignored), and the job ships once ``quorum`` distinct listed reviewers approved (a ship
    by a listed reviewer is an approval, recorded on the job); an admin ships at once."""

    reviewers: list[str]
    quorum: int = 1
    """Distinct listed reviewers whose ship it takes (1 to the number of distinct reviewers)."""

    def names(self) -> set[str]:
        """The distinct reviewer names, without ``@``."""
        return {r.lstrip("@") for r in self.reviewers}


ReviewPolicy = Literal["auto", "manual"] | Reviewers
"""``manual`` (default): verify pass -> ``testing``, then a human ``ship``. ``auto``: verify pass
ships at once. ``{reviewers: [...]}``: verify pass -> ``review`` until a reviewer ships it."""

ShipAs = Literal["branch", "pr-opened", "merged"]
"""What ``shipped`` means for a ``repo`` job (``ship-as``), whoever ships it (``review-policy``
``auto``: the factory after verify; ``manual`` or reviewers: the coordinator when a human runs
``gigafactory ship``):

- ``branch`` (default): the verified branch ``gf/<job>/e<epoch>`` is pushed; nothing more.
- ``pr-opened``: a pull request from that branch into ``base`` is opened on the job's forge.
- ``merged``: the pull request is merged once its checks are green, never past the forge's
  branch protection; a branch that no longer merges cleanly is retried once from the new base
  (``rebase-needed``), then the job fails ``merge_conflict``."""
SHIP_AS_VALUES: tuple[str, ...] = ("branch", "pr-opened", "merged")


class Manifest(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, omit_defaults=True):
    """The front matter of a job file. Field names are kebab-case in YAML."""

    cwd: str = "."
    """Working directory on the factory; a relative path is under the factory's workspace.
    Required unless ``repo`` is set; with ``repo`` it is a relative path inside the checkout
    (no ``..``), default ``.`` (the repository's root)."""
    engine: str | None = None
    """Concrete engine (``shell``, ``claude``, ``codex``, ...). Required unless ``engine-class`` is set."""
    model: str | None = None
    """The model the engine should use; default: the engine's own default."""
    product: str = "default"
    """Which product (funding line) this job belongs to; used for fairness and attribution."""
    engine_class: EngineClass | None = None
    """Any engine of this class will do (``agentic-coder``, ``chat-coder``, ``review-only``);
    ignored when ``engine`` is set."""
    profile: str | None = None
    """A profile from the catalog (``gigafactory profiles``): its persona is prepended to the
    prompt and its fields fill in what the job does not state. Resolved at submit."""
    yolo: bool = False
    """Let the engine act without asking (dangerous/auto-approve mode). Only ``true`` and
    ``false`` are booleans (YAML 1.2): ``yes`` and ``on`` are refused."""
    lock: str | None = None
    """Jobs sharing a lock never run at the same time anywhere in the fleet."""
    timeout: str = "30m"
    """Hard wall-clock limit for one attempt, as a duration with a unit (``90s``, ``5m``, ``1h30m``)."""
    verify: str | None = None
    """A shell command run in ``cwd`` after the engine; exit 0 passes the gate."""
    capabilities: list[str] = msgspec.field(default_factory=list)
    """Required factory capabilities: ``key``, ``key:value`` or ``key<op>version`` with op one of
    ``>= > = <= <`` (``has:git``, ``os:mac``, ``node>=20``)."""
    prefers: list[str] = msgspec.field(default_factory=list)
    """Engines in order of preference for an ``engine-class`` job (``claude``, ``codex``): a
    factory offering several of the class runs the first it offers. Never required."""
    priority: Priority = Priority.MEDIUM
    """``critical``, ``high``, ``medium`` (default) or ``low``; higher priorities are dispatched first."""
    budget: Budget = msgspec.field(default_factory=Budget)
    """Ceilings for one attempt: ``usd``, ``tokens``, ``wall`` (a duration). Default: none."""
    deps: list[str] = msgspec.field(default_factory=list)
    """Job ids or idempotency keys that must reach ``shipped`` (or ``testing`` if soft) first."""
    deps_mode: Literal["hard", "soft"] = "hard"
    """``hard`` (default): dependencies must be ``shipped``; ``soft``: ``testing`` is enough."""
    idempotency_key: str | None = None
    """Submitting the same key again returns the existing job (same content) or supersedes it
    while it still waits (changed content)."""
    retry: Retry = msgspec.field(default_factory=Retry)
    """``max`` retries (default 2), ``backoff`` (default ``5s``, doubled per retry, capped at one
    hour), ``on``: the failure classes retried (default timeout, verify_failed, crash, lease_expired)."""
    review_policy: ReviewPolicy = "manual"
    """``manual`` (default): verify pass -> ``testing``, then a human ``ship``; ``auto``: ships at
    once; ``{reviewers: [...]}``: waits in ``review`` for a reviewer."""
    artifacts: list[str] = msgspec.field(default_factory=list)
    """Paths under ``cwd`` to capture into the artifact store after the attempt."""
    tracker_item: str | None = None
    """The issue-tracker item this job works on, for attribution."""
    kind: Literal["leaf", "composite"] = "leaf"
    """``leaf`` (default) or ``composite`` (a job that other jobs name as their ``parent``)."""
    parent: str | None = None
    """The composite job this one belongs to."""
    # -- the workspace (issue 10) --
    repo: str | None = None
    """A git repository the job works on: a URL (``https://``, ``ssh://``, ``git://``,
    ``file://``, or ``user@host:path``) or a path on the factory (a relative one is under the
    factory's workspace). Each attempt gets a fresh worktree on branch ``gf/<job>/e<epoch>``
    from ``base``; what the engine changed is committed, verified and pushed (fenced)."""
    base: str | None = None
    """The branch the attempt's worktree starts from (needs ``repo``); default: the remote's HEAD."""
    scope: list[str] | None = None
    """Path globs (relative to the repository's root; ``**`` spans directories, ``*`` does not
    cross ``/``) the job may change (needs ``repo``); default: the profile's ``scope``, else
    anything."""
    scope_mode: Literal["warn", "enforce"] = "warn"
    """``warn`` (default): a change outside ``scope`` ships, with the violation in the events
    and status; ``enforce``: the attempt ends ``scope_violation`` and nothing is pushed."""
    ship_as: ShipAs = "branch"
    """What ``shipped`` means (needs ``repo``): ``branch`` (default: the verified branch is
    pushed), ``pr-opened`` (a pull request into ``base`` is opened) or ``merged`` (and merged
    when its checks are green). ``review-policy`` says who ships: ``auto`` the factory at once,
    ``manual``/reviewers the coordinator when a human runs ``gigafactory ship``."""
    # -- the spend ledger (issue 13, helper ledger) --
    lane_kind: Literal["live", "background", "hosted", "remote", "shadow"] | None = None
    """What kind of lane this job's spend is booked to (``live``, ``background``, ``hosted``,
    ``remote``, ``shadow``); default: the factory's ``lane_kind`` setting. Funding windows may
    fund only some kinds."""
    feature: bool = False
    """This job ships a feature: when it ships it is a ``pipeline_runs`` row (docs/economics.md,
    "Runs and routing"). A ``composite`` job is one without saying so."""
    cosmetic: bool = False
    """Cosmetic or hygiene work: never counted as a feature, whatever ``kind`` or ``feature`` say."""

    def requirements(self) -> tuple[str, ...]:
        """The canonical requirement set: capabilities plus the engine (or engine class)."""
        if self.engine:
            extra = [f"engine:{self.engine}"]
        elif self.engine_class is not None:
            extra = [f"engine-class:{self.engine_class}"]
        else:
            extra = []  # a profile job before :func:`profiles.resolve` (intake refuses it after)
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

DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*)+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float) -> float:
    """``'90s'``, ``'5m'``, ``'1h30m'`` (or ``'1h 30m'``), ``'250ms'`` or a number of seconds ->
    seconds. Raises ValueError saying what a duration looks like."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"{text!r} is not a duration: expected a finite number of seconds, 0 or more")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration: expected text like 90s, 5m, 1h30m")
    if not DURATION_RE.match(text):
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
    stated: frozenset[str] = frozenset()
    """The top-level fields the file wrote (a profile fills in only the others)."""
    profile: Any = None
    """The profile snapshot (:class:`profiles.ProfileSnapshot`) once :func:`profiles.resolve` ran."""

    @property
    def content_hash(self) -> str:
        """What idempotency compares: the normalized manifest and the body (and the profile's
        content hash, so a job resubmitted after its profile changed is new content)."""
        h = content_hash(self.manifest, self.body)
        if self.profile is not None:
            h = hashlib.sha256(f"{h}\0{self.profile.content_hash}".encode()).hexdigest()
        return h


def content_hash(manifest: Manifest, body: str) -> str:
    """SHA-256 of the manifest without its defaults (stated or not) and of the body: two
    submissions that mean the same job hash the same, whatever their key order."""
    h = hashlib.sha256(msgspec.json.encode(_without_defaults(manifest), order="sorted"))
    h.update(b"\0")
    h.update(body.encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _struct_fields(cls: type) -> tuple:
    # msgspec.structs.fields() evaluates the class's annotations on every call (a tenth of the
    # coordinator's CPU under load was spent there, hashing manifests at intake).
    return msgspec.structs.fields(cls)


def _without_defaults(obj: Any) -> Any:
    # Not ``omit_defaults`` encoding: msgspec omits a default by identity for some types, so a
    # stated ``timeout: 30m`` would hash differently from an omitted one. Compare by equality.
    if isinstance(obj, msgspec.Struct):
        out = {}
        for f in _struct_fields(type(obj)):
            value = getattr(obj, f.name)
            if f.default is not msgspec.NODEFAULT:
                default = f.default
            elif f.default_factory is not msgspec.NODEFAULT:
                default = f.default_factory()
            else:
                default = msgspec.NODEFAULT
            if default is msgspec.NODEFAULT or value != default:
                out[f.encode_name] = _without_defaults(value)
        return out
    if isinstance(obj, list):
        return [_without_defaults(v) for v in obj]
    return obj


_FRONT = re.compile(r"\A(?:\ufeff)?---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)
_OPENING = re.compile(r"\A(?:\ufeff)?---[ \t]*(?:\r?\n|\Z)")
_FRONT_FIRST_LINE = 2
"""The front matter's first line is the line after the opening ``---``."""

_STR_TAG = "tag:yaml.org,2002:str"


class _TooDeep(Exception):
    """The front matter nests deeper than the limit (raised while composing, with the mark)."""

    def __init__(self, mark) -> None:
        self.mark = mark


class _Yaml12Resolver(yaml.resolver.Resolver):
    """YAML 1.1 reads on/off/yes/no as booleans, which would turn ``retry: {on: [...]}`` into a
    ``True`` key and ``yolo: no`` into a silent ``False``. Job files follow YAML 1.2 here: only
    true/false are booleans, so ``yolo: yes`` is refused with a hint instead of guessed at."""


_Yaml12Resolver.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_Yaml12Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _DepthLimitedComposer(yaml.composer.Composer):
    """PyYAML's composer, refusing nesting deeper than ``max_depth``.

    It composes nested collections recursively (one Python frame group per level): 500
    levels of ``[[[...`` end in a RecursionError, which no caller expects from a parser and
    which once left a file in the inbox forever. Counting levels as they are composed stops
    at the limit, before the stack is at risk; scanning and parsing are iterative (in Python
    and in libyaml alike), and only reach as far as the composer asks."""

    max_depth = 16
    _depth = 0

    def compose_node(self, parent, index):
        # Levels are collections (a scalar or an alias is a leaf, never deeper). Both event
        # classes are named: libyaml's check_event matches the exact class, never a base class.
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class PyYamlLoader(
    _DepthLimitedComposer,
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.constructor.SafeConstructor,
    _Yaml12Resolver,
):
    """The loader in pure Python: ``yaml.SafeLoader`` with the depth limit and YAML 1.2
    booleans. Used where PyYAML was built without libyaml (see :data:`YamlLoader`)."""

    def __init__(self, stream: str) -> None:
        """:param stream: the front matter's text."""
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _DepthLimitedComposer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Yaml12Resolver.__init__(self)


if yaml.__with_libyaml__:

    class CYamlLoader(
        _DepthLimitedComposer,
        yaml.cyaml.CParser,
        yaml.constructor.SafeConstructor,
        _Yaml12Resolver,
    ):
        """libyaml scans and parses (in C, about a fifth of the coordinator's CPU at intake
        when it was Python); the Python composer above still builds the nodes, so the depth
        limit, the line of every field and the alias checks are the same as with
        :class:`PyYamlLoader`. The composer comes first in the MRO on purpose: ``CParser``
        has its own ``get_single_node``/``compose_*`` in C, recursive and without the limit."""

        def __init__(self, stream: str) -> None:
            """:param stream: the front matter's text."""
            yaml.cyaml.CParser.__init__(self, stream)
            _DepthLimitedComposer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            _Yaml12Resolver.__init__(self)

    YamlLoader: type = CYamlLoader
    """The loader of job files and profiles: libyaml's parser where PyYAML has it."""
else:  # pragma: no cover - PyYAML built without libyaml; tests run PyYamlLoader directly
    CYamlLoader = None
    YamlLoader = PyYamlLoader


_YAML11_BOOLEANS = frozenset({"yes", "no", "on", "off", "y", "n"})

# A field path as reported in errors: ``retry.on[1]``, ``budget.wall``, ``capabilities[0]``.
_PATH_PART = re.compile(r"\[\d+\]|[^.\[\]]+")
_LAST_PART = re.compile(r"(?:^|\.)[^.\[\]]+$|\[\d+\]$")


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _node_lines(node: yaml.Node, path: str, lines: dict[str, int], seen: set[int], file: str) -> None:
    """Record the 1-based line of every field and list item under ``node``, by field path, and
    refuse what the mapping constructor would silently accept (a repeated field) or what no
    field name can be (a number, a list). Aliases are walked once, so a recursive alias ends."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + _FRONT_FIRST_LINE
            if not isinstance(key_node, yaml.ScalarNode):
                raise ManifestError(
                    file, line, path or None, f"a field name must be text, like 'engine', not a {key_node.id}"
                )
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ManifestError(
                    file, line, _child(path, key_node.value),
                    "YAML merge keys are not supported in job files; write the fields out",
                )
            if key_node.tag != _STR_TAG or not key_node.value:
                raise ManifestError(
                    file, line, _child(path, key_node.value),
                    f"a field name must be text, like 'engine', not {key_node.value!r}",
                )
            key = key_node.value
            field = _child(path, key)
            if key in first_line:
                raise ManifestError(
                    file, line, field,
                    f"given twice (first on line {first_line[key]}); keep one of them",
                )
            first_line[key] = line
            lines[field] = line
            _node_lines(value_node, field, lines, seen, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            field = f"{path}[{i}]"
            lines[field] = item.start_mark.line + _FRONT_FIRST_LINE
            _node_lines(item, field, lines, seen, file)


def _limit_hint(lim: Limits, name: str) -> str:
    from .limits import hint

    return hint(name, getattr(lim, name))


def _expanded_size(node: yaml.Node, memo: dict[int, int], ceiling: int) -> int:
    """About how many bytes ``node`` stands for with every alias written out (scalars by their
    length, 2 for each item or entry). Shared nodes are sized once (``memo``), so this costs
    one pass over the document however often an alias repeats them; the sum stops growing
    past ``ceiling``. A node met again while being sized (a recursive alias) counts 0 here:
    the type checks refuse it with its field named."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 0
    if isinstance(node, yaml.ScalarNode):
        size = len(node.value) + 2
    else:
        size = 2
        children = node.value if isinstance(node, yaml.SequenceNode) else [c for kv in node.value for c in kv]
        for child in children:
            size += _expanded_size(child, memo, ceiling)
            if size > ceiling:
                break
    memo[key] = size
    return size


def _field_near(front: str, line: int) -> str | None:
    """Best guess at the field a YAML syntax error is in: the keys on the error's line and the
    less-indented keys above it (``retry.max``). Only used when the YAML cannot be parsed."""
    rows = front.splitlines()
    index = min(line - _FRONT_FIRST_LINE, len(rows) - 1)
    parts: list[str] = []
    indent_limit: int | None = None
    for row in reversed(rows[: index + 1]):
        m = re.match(r"^([ \t-]*)([A-Za-z0-9_][A-Za-z0-9_\-]*)[ \t]*:(?:[ \t]|$)", row)
        if not m:
            continue
        if "\t" in m.group(1) and not parts:
            return m.group(2)  # a tab-indented key: the indentation is the mistake, not the nesting
        indent = len(m.group(1).expandtabs(2))
        if indent_limit is None or indent < indent_limit:
            parts.append(m.group(2))
            indent_limit = indent
            if indent == 0:
                break
    return ".".join(reversed(parts)) or None


_LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"


def _too_deep_error(mark, front: str, path: str, lim: Limits) -> ManifestError:
    """The refusal of front matter nested deeper than ``lim.max_manifest_depth``, on the line
    of ``mark`` (where the first level too many opens)."""
    line = mark.line + _FRONT_FIRST_LINE
    return ManifestError(path, line, _field_near(front, line), (
        f"nested more than {lim.max_manifest_depth} levels deep {_limit_hint(lim, 'max_manifest_depth')}; "
        "a manifest needs 3 at most (retry.on is a list in a mapping)"))


_STREAM_END = re.compile(r", but (?:got|found) '<stream end>'$")
_UNSTARTABLE = "found character that cannot start any token"


def yaml_syntax_error(e: yaml.MarkedYAMLError, front: str, path: str) -> ManifestError:
    """The refusal of front matter that is not YAML: the line and the field near it, and the
    problem in the words of PyYAML's pure-Python parser whichever parser found it (libyaml
    words a few the same problems differently), with a hint where one helps.

    :param e: the parser's (or composer's) error; its marks count characters of ``front``
        from 0, as both parsers do.
    :param front: the front matter's text.
    :param path: the job file, for the error.
    """
    mark = e.problem_mark or e.context_mark
    at_end = mark is not None and mark.index >= len(front)
    if mark is e.problem_mark and e.context_mark is not None and at_end:
        # "got <stream end>": the closing '---' line is not where the mistake is.
        mark = e.context_mark
    line = mark.line + _FRONT_FIRST_LINE if mark else None
    field = _field_near(front, line) if line is not None else None
    problem = e.problem or str(e)
    # libyaml's words, as PyYAML's own parser says the same.
    if problem.startswith("did not find expected "):
        problem = problem.removeprefix("did not find ")
    problem = problem.replace("are not allowed in this context", "are not allowed here")
    if problem == _UNSTARTABLE and e.problem_mark is not None and e.problem_mark.index < len(front):
        problem = f"found character {front[e.problem_mark.index]!r} that cannot start any token"
    if at_end and problem.startswith("expected "):
        problem = _STREAM_END.sub("", problem) + " before the front matter ended"
    if "'\\t'" in problem or "tab character" in problem:
        # The tab is the mistake; libyaml's context (the scalar on the line above) would mislead.
        problem += "; indent with spaces, YAML does not allow tabs"
    elif (e.context and e.context_mark and e.context_mark is not mark
            and e.context != "while scanning for the next token"):  # libyaml's; says nothing more
        problem = f"{problem} ({e.context} on line {e.context_mark.line + _FRONT_FIRST_LINE})"
    return ManifestError(path, line, field, f"invalid YAML: {problem}")


_NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE


def yaml_unprintable_error(e: yaml.reader.ReaderError, front: str, path: str) -> ManifestError:
    """The refusal of front matter holding a character YAML does not allow (a control
    character, say), on its line. Found again here: the two parsers report its position
    differently (characters or UTF-8 bytes), and libyaml not in its words.

    :param e: the reader's error.
    :param front: the front matter's text.
    :param path: the job file, for the error.
    """
    found = _NON_PRINTABLE.search(front)
    if found is None:  # libyaml refused what PyYAML's own check allows: say what it said
        return ManifestError(path, None, None, f"invalid YAML: {e}")
    line = front.count("\n", 0, found.start()) + _FRONT_FIRST_LINE
    code = ord(found.group())
    return ManifestError(path, line, _field_near(front, line), (
        f"invalid YAML: the character U+{code:04X} is not allowed in YAML (only printable characters "
        f"are); remove it, or inside double quotes write it as the escape \"\\u{code:04x}\""))


def _suggest(name: str, choices: tuple[str, ...]) -> str:
    kebab = name.replace("_", "-").lower()
    if kebab != name and kebab in choices:
        return f"did you mean '{kebab}'? (field names are kebab-case)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known fields: " + ", ".join(choices)


def parse_job_text(text: str, path: str = "<job>", limits: Limits | None = None) -> JobFile:
    """Parse and validate one job file's text (``path`` only names it in errors) within
    ``limits`` (default: :class:`~gigafactory.schemas.limits.Limits` defaults).

    Raises :class:`ManifestError` naming the file, the line and the field; nothing is
    guessed: unknown fields, YAML 1.1 booleans (``yes``/``on``) and durations without a unit
    are refused with the fix in the message, and so is anything over a limit, naming it.
    """
    lim = limits or Limits()
    # Sizes first, before any parsing: the cheapest refusal, and the parser never sees a
    # file it could spend seconds on.
    if len(text) > lim.max_job_file_bytes:
        raise ManifestError(path, None, None, lim.refusal(
            "max_job_file_bytes", "the job file", len(text), "characters (at least as many bytes)",
            "keep large inputs in the repository and name them in the prompt"))
    try:
        size_bytes = len(text.encode())
    except UnicodeEncodeError as e:
        # A lone surrogate (an API body with a broken "\ud800" escape, a file read with
        # surrogateescape) is no text at all: refuse it here, named, not deep in a writer.
        raise ManifestError(path, text.count("\n", 0, e.start) + 1, None,
                            f"character {e.start + 1} is U+{ord(text[e.start]):04X}, a lone surrogate, which is "
                            "not valid Unicode: send the job file as UTF-8 text") from None
    if size_bytes > lim.max_job_file_bytes:
        raise ManifestError(path, None, None, lim.refusal(
            "max_job_file_bytes", "the job file", size_bytes, "bytes",
            "keep large inputs in the repository and name them in the prompt"))
    m = _FRONT.match(text)
    if not m:
        if _OPENING.match(text):
            raise ManifestError(
                path, 1, None,
                "the front matter opened on line 1 is never closed: add a line '---' after the "
                "manifest, before the prompt",
            )
        raise ManifestError(
            path, 1, None,
            "no YAML front matter: a job file starts with a line '---', the manifest "
            "(at least 'engine' and 'cwd'), and another line '---', then the prompt",
        )
    front = m.group(1) or ""
    body = text[m.end():]
    front_bytes = len(front.encode())
    if front_bytes > lim.max_manifest_bytes:
        raise ManifestError(path, _FRONT_FIRST_LINE, None, lim.refusal(
            "max_manifest_bytes", "the front matter", front_bytes, "bytes",
            "a manifest needs a few lines; move long text into the prompt"))
    body_bytes = len(body.encode())
    if body_bytes > lim.max_body_bytes:
        body_line = text.count("\n", 0, m.end()) + 1
        raise ManifestError(path, body_line, None, lim.refusal(
            "max_body_bytes", "the prompt (everything after the closing '---')", body_bytes, "bytes",
            "keep large inputs in the repository and name them in the prompt"))

    lines: dict[str, int] = {}
    loader = None
    try:
        # Built inside the try: the pure-Python reader refuses a non-printable character as
        # soon as it is given the text (libyaml only when it reaches it).
        loader = YamlLoader(front)
        loader.max_depth = lim.max_manifest_depth
        node = loader.get_single_node()
        if node is not None:
            _node_lines(node, "", lines, set(), path)
            expanded = _expanded_size(node, {}, lim.max_manifest_bytes)
            if expanded > lim.max_manifest_bytes:
                raise ManifestError(path, _FRONT_FIRST_LINE, None, lim.refusal(
                    "max_manifest_bytes", "the front matter with its YAML aliases written out", expanded,
                    "bytes (at least)", "write the values out instead of repeating an alias"))
        raw = loader.construct_document(node) if node is not None else None
    except _TooDeep as e:
        raise _too_deep_error(e.mark, front, path, lim) from None
    except yaml.MarkedYAMLError as e:
        if e.problem == _LIBYAML_TOO_DEEP and e.problem_mark is not None:
            # libyaml's own ceiling (1,000 levels), met first when they are all on one line:
            # its scanner looks that far ahead before the composer counts a level.
            raise _too_deep_error(e.problem_mark, front, path, lim) from None
        raise yaml_syntax_error(e, front, path) from None
    except yaml.reader.ReaderError as e:
        raise yaml_unprintable_error(e, front, path) from None
    except yaml.YAMLError as e:
        raise ManifestError(path, None, None, f"invalid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()

    def line_of(field: str | None) -> int | None:
        """The line of ``field``, or of the nearest enclosing field that has one."""
        while field:
            if field in lines:
                return lines[field]
            field = _LAST_PART.sub("", field)
        return None

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ManifestError(
            path, _FRONT_FIRST_LINE, None,
            "the front matter must be a mapping of fields, like 'engine: shell', "
            f"not {_describe_value(raw)}",
        )

    for key in raw:
        if key not in FIELD_NAMES:
            raise ManifestError(path, line_of(key), key, f"unknown field; {_suggest(key, FIELD_NAMES)}")
    for parent, names in _NESTED.items():
        sub = raw.get(parent)
        if isinstance(sub, dict):
            for key in sub:
                if key not in names:
                    field = f"{parent}.{key}"
                    raise ManifestError(path, line_of(field), field, f"unknown field; {_suggest(key, names)}")

    cwd = raw.get("cwd")
    if (cwd is None and raw.get("repo") is None) or (isinstance(cwd, str) and not cwd.strip()):
        raise ManifestError(
            path, line_of("cwd"), "cwd",
            "'cwd' is required: the directory the job runs in, like 'cwd: my-repo' "
            "(or name a git repository with 'repo: URL', and 'cwd' defaults to its root)",
        )
    if not raw.get("engine") and not raw.get("engine-class") and not raw.get("profile"):
        raise ManifestError(
            path, line_of("engine") or line_of("engine-class"), "engine",
            "'engine' is required (for example 'engine: shell'), unless 'engine-class' names a class "
            f"({', '.join(c.value for c in EngineClass)}) or 'profile' names a profile that has one",
        )
    try:
        manifest = msgspec.convert(raw, Manifest, strict=True)
    except msgspec.ValidationError as e:
        field, msg = _explain_validation_error(str(e), raw)
        raise ManifestError(path, line_of(field), field, msg) from None

    _check_semantics(manifest, path, line_of, lim)
    return JobFile(path=path, manifest=manifest, body=body, stated=frozenset(raw))


_MANIFEST_INFO = msgspec.inspect.type_info(Manifest)

_NOUNS = {"retry.on": "failure class"}
"""How an enum error names what the value is not, where the field name reads badly."""


def _type_at(field: str) -> msgspec.inspect.Type | None:
    """The msgspec type of the manifest field at ``field`` (``retry.on[1]`` -> FailureClass)."""
    t: msgspec.inspect.Type | None = _MANIFEST_INFO
    for part in _PATH_PART.findall(field):
        options = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
        nxt = None
        for option in options:
            if part.startswith("[") and isinstance(option, msgspec.inspect.ListType):
                nxt = option.item_type
            elif isinstance(option, msgspec.inspect.StructType):
                nxt = next((f.type for f in option.fields if f.encode_name == part), None)
            if nxt is not None:
                break
        t = nxt
        if t is None:
            return None
    return t


def _allowed_values(t: msgspec.inspect.Type | None) -> tuple[list[str], list[str]]:
    """The literal values a field accepts, and the mapping shapes it also accepts."""
    values: list[str] = []
    shapes: list[str] = []
    options = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
    for option in options:
        if isinstance(option, msgspec.inspect.EnumType):
            values += [str(member.value) for member in option.cls]
        elif isinstance(option, msgspec.inspect.LiteralType):
            values += [str(v) for v in option.values]
        elif isinstance(option, msgspec.inspect.StructType):
            required = [f for f in option.fields if f.required]
            inner = ", ".join(
                f.encode_name + (": [...]" if isinstance(f.type, msgspec.inspect.ListType) else ": ...")
                for f in required
            )
            shapes.append("{" + inner + "}")
    return values, shapes


def _expected_choices(values: list[str], shapes: list[str]) -> str:
    text = "one of " + ", ".join(values)
    if shapes:
        text += " or a mapping " + " or ".join(shapes)
    return text


def _value_at(data: Any, field: str | None) -> Any:
    for part in _PATH_PART.findall(field or ""):
        try:
            data = data[int(part[1:-1])] if part.startswith("[") else data[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return data


def _describe_value(value: Any) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


_TYPE_WORDS = {
    "str": "text",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
}
_DURATION_FIELDS = ("timeout", "budget.wall", "retry.backoff")


def _explain_validation_error(text: str, data: Any) -> tuple[str | None, str]:
    """Turn a msgspec validation error into (field path, message a user can act on)."""
    # msgspec: "Expected `int`, got `str` - at `$.retry.max`"
    m = re.match(r"^(.*?)(?: - at `\$(.*)`)?$", text, re.S)
    assert m is not None
    msg, at = m.group(1), m.group(2)
    field = (at or "").lstrip(".") or None
    value = _value_at(data, field)
    t = _type_at(field) if field else None
    values, shapes = _allowed_values(t)

    if msg.startswith("Invalid enum value") and field:
        base = re.sub(r"\[\d+\]$", "", field)
        noun = _NOUNS.get(base, base)
        article = "an" if noun[0] in "aeiou" else "a"
        hint = ""
        if base == "review-policy" and value in SHIP_AS_VALUES:
            hint = (f" ('{value}' is a ship-as: write 'ship-as: {value}' for what shipped means, and keep "
                    "review-policy for who ships: auto, manual or reviewers)")
        return field, f"{value!r} is not {article} {noun}; expected {_expected_choices(values, shapes)}{hint}"

    unknown = re.match(r"^Object contains unknown field `(.*)`$", msg)
    if unknown:
        names = tuple(
            f.encode_name
            for option in (t.types if isinstance(t, msgspec.inspect.UnionType) else (t,))
            if isinstance(option, msgspec.inspect.StructType)
            for f in option.fields
        )
        key = unknown.group(1)
        return _child(field or "", key), f"unknown field; {_suggest(key, names)}"

    missing = re.match(r"^Object missing required field `(.*)`$", msg)
    if missing:
        key = missing.group(1)
        return _child(field or "", key), f"'{key}' is required here; expected {_expected_choices(values, shapes)}"

    wrong = re.match(r"^Expected `(.*)`, got `(.*)`$", msg)
    if wrong:
        got = _describe_value(value)
        if field in _DURATION_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            return field, f"{value!r} has no unit; write a duration like '{value}s', '5m' or '1h30m'"
        if values:
            return field, f"expected {_expected_choices(values, shapes)}, got {got}"
        wanted = [w for w in wrong.group(1).split(" | ") if w != "null"]
        expected = " or ".join(_TYPE_WORDS.get(w, w) for w in wanted) or "nothing"
        hint = ""
        if "bool" in wanted and isinstance(value, str) and value.lower() in _YAML11_BOOLEANS:
            hint = " (job files use YAML 1.2: write true or false, not yes/no/on/off)"
        return field, f"expected {expected}, got {got}{hint}"

    return field, msg.replace("`", "'")


def _check_semantics(m: Manifest, path: str, line_of, lim: Limits) -> None:
    """Checks the types alone cannot express. Raises :class:`ManifestError` for the first."""
    problem = _first_semantic_problem(m) or _first_limit_problem(m, lim)
    if problem is not None:
        field, message = problem
        raise ManifestError(path, line_of(field), field, message)


def _first_semantic_problem(m: Manifest) -> tuple[str, str] | None:
    problem = workspace_problem(m)
    if problem is not None:
        return problem
    if m.engine is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", m.engine):
        return "engine", f"{m.engine!r} is not an engine name (lower-case letters, digits, '-' and '_')"
    if m.profile is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,63}", m.profile):
        return "profile", f"{m.profile!r} is not a profile name (lower-case letters, digits, '-' and '_')"
    for field, value in (("timeout", m.timeout), ("budget.wall", m.budget.wall), ("retry.backoff", m.retry.backoff)):
        if value is None:
            continue
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            return field, str(e)
        if field != "retry.backoff" and seconds <= 0:
            return field, f"{value!r} must be longer than zero"
    if m.retry.max < 0 or m.retry.max > 100:
        return "retry.max", f"{m.retry.max} is out of range: expected 0 to 100 retries"
    if m.budget.usd is not None and not (m.budget.usd >= 0 and math.isfinite(m.budget.usd)):
        return "budget.usd", f"{m.budget.usd:g} is not a spend limit: expected a number of dollars, 0 or more"
    if m.budget.tokens is not None and m.budget.tokens < 0:
        return "budget.tokens", f"{m.budget.tokens} must not be negative; leave it out for no limit"
    for i, token in enumerate(m.capabilities):
        try:
            caps.parse_requirement(token)
        except caps.CapabilityError as e:
            return f"capabilities[{i}]", str(e)
    for i, dep in enumerate(m.deps):
        if not dep.strip():
            return f"deps[{i}]", "a dependency is a job id or an idempotency key, not empty text"
    if m.lock is not None and not m.lock.strip():
        return "lock", "must not be empty; leave it out for no lock"
    if m.idempotency_key is not None and not m.idempotency_key.strip():
        return "idempotency-key", "must not be empty; leave it out for no deduplication"
    if isinstance(m.review_policy, Reviewers) and not m.review_policy.reviewers:
        return "review-policy.reviewers", "needs at least one name, like {reviewers: ['@alice']}"
    if isinstance(m.review_policy, Reviewers) and not 1 <= m.review_policy.quorum <= len(m.review_policy.names()):
        return ("review-policy.quorum", f"is {m.review_policy.quorum}: it must be 1 to the number of distinct "
                                        f"reviewers listed ({len(m.review_policy.names())})")
    return None


def _first_limit_problem(m: Manifest, lim: Limits) -> tuple[str, str] | None:
    if len(m.deps) > lim.max_deps:
        return "deps", lim.refusal("max_deps", "the list", len(m.deps), "entries",
                                   "depend on a few composite jobs instead of every job")
    keyed = [("idempotency-key", m.idempotency_key), ("lock", m.lock)]
    keyed += [(f"deps[{i}]", dep) for i, dep in enumerate(m.deps)]
    for field, value in keyed:
        if value is not None and len(value) > lim.max_key_chars:
            return field, lim.refusal("max_key_chars", "this key", len(value), "characters", "use a shorter name")
    return None


# -- the workspace fields (issue 10) -------------------------------------------------------------

MAX_REPO_CHARS = 2048
"""Longest ``repo`` (a URL or a path)."""
MAX_BRANCH_CHARS = 200
"""Longest ``base`` branch name (the job's own branch ``gf/<job>/e<epoch>`` must fit a ref too)."""
MAX_CWD_CHARS = 1024
"""Longest ``cwd`` inside a checkout."""
MAX_SCOPE_GLOBS = 200
"""Most entries in ``scope``."""
MAX_GLOB_CHARS = 512
"""Longest ``scope`` glob."""

_URL_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def repo_problem(repo: str) -> str | None:
    """What is wrong with a ``repo`` value, or None. Refused: empty, control characters or
    spaces, a leading ``-`` (git would read it as an option), a ``transport::address`` remote
    helper (``ext::`` runs commands), and schemes other than https, http, ssh, git, file."""
    if not repo.strip():
        return "must not be empty; name a git URL or a path, or leave 'repo' out"
    if len(repo) > MAX_REPO_CHARS:
        return f"is {len(repo):,} characters, more than {MAX_REPO_CHARS:,} (MAX_REPO_CHARS); use a shorter URL"
    if _CONTROL.search(repo):
        return f"{repo[:80]!r} contains a space or a control character; a git URL or path has none"
    if repo.startswith("-"):
        return f"{repo[:80]!r} starts with '-', which git would read as an option"
    if "://" in repo:
        if not repo.lower().startswith(_URL_SCHEMES):
            return (f"{repo[:80]!r} has a scheme git jobs do not use; expected one of "
                    f"{', '.join(s[:-3] for s in _URL_SCHEMES)}")
        return None
    if "::" in repo:
        return f"{repo[:80]!r} names a git remote helper ('transport::address'), which jobs may not use"
    return None


def branch_problem(name: str) -> str | None:
    """What is wrong with a branch name (``git check-ref-format --branch`` rules), or None."""
    if not name.strip():
        return "must not be empty; leave 'base' out for the remote's default branch"
    if len(name) > MAX_BRANCH_CHARS:
        return f"is {len(name):,} characters, more than {MAX_BRANCH_CHARS} (MAX_BRANCH_CHARS)"
    if (_BAD_REF.search(name) or name.startswith(("-", "/", ".")) or name.endswith(("/", ".", ".lock"))
            or "/." in name or name == "@"):
        return (f"{name!r} is not a branch name: no spaces, '..', '~^:?*[\\', '@{{', '//', and no leading "
                "'-', '/' or '.', nor a trailing '/', '.' or '.lock'")
    return None


def relative_path_problem(path: str, what: str) -> str | None:
    """What is wrong with a path that must stay inside a checkout, or None: relative, no ``..``."""
    if re.search(r"[\x00-\x1f\x7f]", path):
        return f"{path[:80]!r} contains a control character"
    if path.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:", path):
        return f"{path[:80]!r} is not relative; {what} is a path inside the repository, like 'src/app'"
    if ".." in re.split(r"[/\\]", path):
        return f"{path[:80]!r} leaves the repository ('..'); {what} is a path inside it"
    return None


def workspace_problem(m: Manifest) -> tuple[str, str] | None:
    """The first problem of the workspace fields (``repo``, ``base``, ``scope``,
    ``scope-mode``, and ``cwd`` with a repo), as (field, message), or None."""
    if m.repo is None:
        if m.base is not None:
            return "base", "needs 'repo': it is the branch of that repository the job starts from"
        if m.scope is not None:
            return "scope", "needs 'repo': it limits the paths the job may change in that repository"
        if m.scope_mode == "enforce":
            return "scope-mode", "needs 'repo': only a repository's changes can be checked against a scope"
        if m.ship_as != "branch":
            return "ship-as", (f"{m.ship_as!r} needs 'repo': only a repository's branch can become a pull "
                               "request; leave 'ship-as' out for a job without a repository")
        return None
    problem = repo_problem(m.repo)
    if problem:
        return "repo", problem
    if m.base is not None and (problem := branch_problem(m.base)):
        return "base", problem
    if len(m.cwd) > MAX_CWD_CHARS:
        return "cwd", f"is {len(m.cwd):,} characters, more than {MAX_CWD_CHARS:,} (MAX_CWD_CHARS)"
    if problem := relative_path_problem(m.cwd, "'cwd' (with 'repo')"):
        return "cwd", problem
    if m.scope is not None:
        if len(m.scope) > MAX_SCOPE_GLOBS:
            return "scope", (f"has {len(m.scope):,} globs, more than {MAX_SCOPE_GLOBS} (MAX_SCOPE_GLOBS); "
                             "use '**' to cover a folder")
        for i, g in enumerate(m.scope):
            if not g.strip():
                return f"scope[{i}]", "a glob must not be empty, like 'src/**'"
            if len(g) > MAX_GLOB_CHARS:
                return f"scope[{i}]", f"is {len(g):,} characters, more than {MAX_GLOB_CHARS} (MAX_GLOB_CHARS)"
            if problem := relative_path_problem(g, "a scope glob"):
                return f"scope[{i}]", problem
        # The glob grammar the factory judges by (a glob it could not compile would refuse the
        # job's every attempt there: refuse it here, where the file and field can be named).
        for err in validate_globs(m.scope, "scope")[:1]:
            field, _, why = err.partition(": ")
            return field, why
    return None


def effective_scope(m: Manifest, profile_scope: list[str] | None) -> list[str] | None:
    """The globs a job's changes are checked against: its own ``scope`` if it states one, else
    its profile's (a non-empty list), else None (anything may change).

    :param m: the resolved manifest.
    :param profile_scope: the scope of the record's profile snapshot, or None.
    """
    if m.scope is not None:
        return list(m.scope)
    return list(profile_scope) if profile_scope else None


def parse_job_file(path: str) -> JobFile:
    """Read and parse one job file from disk. Raises :class:`ManifestError`, also when the
    file cannot be read or is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ManifestError(path, None, None, f"cannot read the job file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ManifestError(
            path, line, None,
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the job file as UTF-8",
        ) from None
    return parse_job_text(text, path)


_FENCE_LINE = re.compile(r"^```([^\n]*)(\n?)", re.M)
"""A line that starts with three backticks, up to its newline: matched anchored at line
starts, each line at most once, so one pass over the body in C."""
_SHELL_INFO = re.compile(r"[ \t]*(?:sh|bash|shell|zsh)[ \t]*\r?")
_CLOSING_INFO = re.compile(r"[ \t]*\r?")


def shell_script(body: str) -> str:
    """The script the ``shell`` engine runs: the fenced ``sh``/``bash``/``shell``/``zsh`` blocks
    of the body if it has any (so a job file can carry prose around its code), else the whole
    body. A block opens with a line like ```` ```sh ```` and ends at the next line that is only
    ```` ``` ````; an opening never closed is not a block.

    Linear: only fence lines are looked at, each once. A regular expression searching for
    "opening, anything, closing" rescanned the rest of the body from every unclosed opening,
    and a body of 8,000 of them took 5.6 s, long enough to stall a factory's event loop past
    its leases."""
    blocks: list[str] = []
    start: int | None = None  # where the open block's content begins
    for m in _FENCE_LINE.finditer(body):
        info = m.group(1)
        if start is None:
            # An opening needs its newline: the content starts on the next line.
            if m.group(2) and _SHELL_INFO.fullmatch(info):
                start = m.end()
        elif _CLOSING_INFO.fullmatch(info):
            blocks.append(body[start:m.start()])
            start = None
    return "\n".join(blocks) if blocks else body
