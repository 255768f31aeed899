"""Profiles: who the agent is, as a markdown file with a YAML front matter.

    ---
    summary: Writes and changes code across the stack.
    engine-class: agentic-coder
    prefers: [claude, codex]
    capabilities: [has:git]
    verify: make test
    budget: {usd: 5, wall: 45m}
    review-policy: manual
    scope: ["**"]
    ---
    You are a careful software developer...

The body is the *persona*, prepended to the prompt an agent engine receives. A job names a
profile with ``profile: NAME``; at submit its fields are resolved: a field the job states wins
over the profile's, which wins over the default (``capabilities`` and ``prefers`` are merged,
the job's first). The profile's content hash, the persona and the resolved manifest are
stored in the job record at intake, so editing a profile never changes a submitted job, and
factories never read profile files.

Pure: parsing and resolution only; reading the catalog folders is :func:`load_catalog`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Collection, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import yaml

from .scope import validate_globs
from . import capabilities as caps
from .manifest import (
    Budget,
    EngineClass,
    JobFile,
    Manifest,
    ManifestError,
    ReviewPolicy,
    ShipAs,
    YamlLoader,
    yaml_syntax_error,
    yaml_unprintable_error,
    parse_duration,
)

MAX_PROFILE_BYTES = 64 * 1024
"""Largest profile file (front matter and persona), in UTF-8 bytes."""
MAX_PERSONA_BYTES = 16 * 1024
"""Largest persona (the body), in UTF-8 bytes: it is prepended to every prompt of the job."""
MAX_PROFILES = 200
"""Most profiles in one catalog (the shipped ones and an operator's folder together)."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]{0,63}")
_FRONT = re.compile(r"\A(?:\ufeff)?---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)


class ProfileError(ValueError):
    """A profile is invalid or unknown. ``str()`` names the file, the field and the fix."""

    def __init__(self, path: str, field: str | None, message: str, line: int | None = None) -> None:
        self.path, self.field, self.message, self.line = path, field, message, line
        where = path if line is None else f"{path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ProfileFields(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, omit_defaults=True):
    """The front matter of a profile. Every field but ``summary`` is optional."""

    summary: str
    """One line saying what the profile is for (shown by ``gigafactory profiles``)."""
    engine_class: EngineClass | None = None
    """The class of engine the profile runs on, unless the job names an ``engine``."""
    engine: str | None = None
    """A concrete engine (rarely wanted: ``engine-class`` and ``prefers`` let any fit station run it)."""
    prefers: list[str] = msgspec.field(default_factory=list)
    """Engines in order of preference (``claude``, ``codex``); merged after the job's own."""
    model: str | None = None
    capabilities: list[str] = msgspec.field(default_factory=list)
    """Required factory capabilities, added to the job's."""
    verify: str | None = None
    budget: Budget = msgspec.field(default_factory=Budget)
    review_policy: ReviewPolicy | None = None
    ship_as: ShipAs | None = None
    """What ``shipped`` means for the profile's ``repo`` jobs that state no ``ship-as``
    (``branch``, ``pr-opened``, ``merged``); ignored for a job without ``repo``."""
    timeout: str | None = None
    scope: list[str] = msgspec.field(default_factory=list)
    """Path globs (repository-relative, :mod:`~gigafactory.schemas.scope` grammar) the profile's
    agent may change in a ``repo`` job that states no ``scope`` of its own; judged after each
    attempt by the scope guardrail (the job's ``scope-mode`` decides warn or enforce)."""
    yolo: bool = False
    """Whether the profile's jobs may ask for ``yolo: true`` (the agent CLI's auto-approve mode:
    every tool and shell command without asking). Off by default: a job that asks for it under
    a profile that does not permit it is refused at intake (issue 12)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """A parsed profile."""

    name: str
    path: str
    fields: ProfileFields
    persona: str
    content_hash: str
    """SHA-256 of the file's bytes: what the job record snapshots."""


class ProfileSnapshot(msgspec.Struct, omit_defaults=True):
    """What a job record keeps of its profile (the factory reads only this)."""

    name: str
    content_hash: str
    persona: str = ""
    scope: list[str] = msgspec.field(default_factory=list)


_FIELD_NAMES = tuple(f.encode_name for f in msgspec.structs.fields(ProfileFields))


def parse_profile(text: str, path: str, name: str | None = None) -> Profile:
    """Parse one profile file's text. Raises :class:`ProfileError` naming ``path`` and the field.

    :param text: the file's text.
    :param path: where it came from (for errors).
    :param name: the profile's name (default: the file's stem).
    """
    name = name if name is not None else Path(path).stem
    if not _NAME.fullmatch(name):
        raise ProfileError(path, None, f"{name!r} is not a profile name: lower-case letters, digits, '-' and "
                                       "'_', at most 64 characters; rename the file")
    size = len(text.encode())
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(path, None, f"{size:,} bytes, more than the {MAX_PROFILE_BYTES:,} a profile may have; "
                                       "shorten the persona")
    m = _FRONT.match(text)
    if not m:
        raise ProfileError(path, None, "a profile starts with a '---' line, its fields, and a closing '---' line")
    front, persona = m.group(1) or "", text[m.end():].strip()
    if len(persona.encode()) > MAX_PERSONA_BYTES:
        raise ProfileError(path, None, f"the persona is {len(persona.encode()):,} bytes, more than "
                                       f"{MAX_PERSONA_BYTES:,}; it is prepended to every prompt, shorten it")
    loader = None
    try:
        # Built inside the try: the pure-Python reader refuses a control character at once.
        loader = YamlLoader(front)
        raw = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        # Worded and placed as a job file's: the line counts from the start of the file.
        found = yaml_syntax_error(e, front, path)
        raise ProfileError(path, found.field, found.message, found.line) from None
    except yaml.reader.ReaderError as e:
        found = yaml_unprintable_error(e, front, path)
        raise ProfileError(path, found.field, found.message, found.line) from None
    except yaml.YAMLError as e:
        raise ProfileError(path, None, f"invalid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(raw, dict):
        raise ProfileError(path, None, "the front matter must be a mapping of fields, like 'summary: ...'")
    for key in raw:
        if key not in _FIELD_NAMES:
            raise ProfileError(path, str(key), f"unknown field; expected one of {', '.join(_FIELD_NAMES)}")
    if "summary" not in raw:
        raise ProfileError(path, "summary", "'summary' is required: one line saying what the profile is for")
    try:
        fields = msgspec.convert(raw, ProfileFields, strict=True)
    except msgspec.ValidationError as e:
        msg, _, at = str(e).partition(" - at `$")
        raise ProfileError(path, at.rstrip("`").lstrip(".") or None, msg.replace("`", "'")) from None
    problem = _problem(fields)
    if problem:
        raise ProfileError(path, *problem)
    return Profile(name=name, path=path, fields=fields, persona=persona,
                   content_hash=hashlib.sha256(text.encode()).hexdigest())


def _problem(f: ProfileFields) -> tuple[str, str] | None:
    for i, token in enumerate(f.capabilities):
        try:
            caps.parse_requirement(token)
        except caps.CapabilityError as e:
            return f"capabilities[{i}]", str(e)
    for field, value in (("timeout", f.timeout), ("budget.wall", f.budget.wall)):
        if value is not None:
            try:
                parse_duration(value)
            except ValueError as e:
                return field, str(e)
    for field, names in (("prefers", f.prefers), ("engine", [f.engine] if f.engine else [])):
        for i, n in enumerate(names):
            if not re.fullmatch(r"[a-z0-9][a-z0-9_\-:]*", n):
                return f"{field}[{i}]" if field == "prefers" else field, f"{n!r} is not an engine name"
    for err in validate_globs(f.scope, "scope")[:1]:
        field, _, why = err.partition(": ")
        return field, why
    return None


def _shipped() -> list[tuple[str, str]]:
    folder = resources.files("gigafactory.profiles")
    return sorted((str(p), p.read_text(encoding="utf-8")) for p in folder.iterdir() if p.name.endswith(".md"))


def load_catalog(profiles_dir: str | None = None) -> dict[str, Profile]:
    """The shipped profiles, then the operator's folder (a profile there of a shipped name
    replaces it). Raises :class:`ProfileError` for the first invalid file.

    :param profiles_dir: the operator's profiles folder (setting ``profiles_dir``), or None.
    """
    files = _shipped()
    if profiles_dir:
        d = Path(profiles_dir)
        if not d.is_dir():
            raise ProfileError(profiles_dir, None, "the profiles folder (GIGAFACTORY_PROFILES_DIR) does not exist")
        for p in sorted(d.glob("*.md")):
            if p.stat().st_size > MAX_PROFILE_BYTES:
                raise ProfileError(str(p), None, f"more than the {MAX_PROFILE_BYTES:,} bytes a profile may have")
            try:
                files.append((str(p), p.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as e:
                raise ProfileError(str(p), None, f"cannot read it as UTF-8 text: {e}") from None
    out: dict[str, Profile] = {}
    for path, text in files:
        prof = parse_profile(text, path)
        out[prof.name] = prof
        if len(out) > MAX_PROFILES:
            raise ProfileError(path, None, f"more than {MAX_PROFILES} profiles in the catalog")
    return out


def resolve(jf: JobFile, catalog: Mapping[str, Profile]) -> JobFile:
    """The job file with its profile applied: fields the job states win over the profile's,
    which win over the defaults; ``capabilities`` and ``prefers`` are merged (the job's first).
    A job without ``profile`` is returned unchanged. Raises :class:`ManifestError` naming the
    job file for an unknown profile (with the known ones) or a job left without an engine.

    :param jf: the parsed job file (its ``stated`` says which fields the job wrote).
    :param catalog: the known profiles by name.
    """
    m = jf.manifest
    if m.profile is None:
        return jf
    prof = catalog.get(m.profile)
    if prof is None:
        raise ManifestError(jf.path, None, "profile", f"unknown profile {m.profile!r}; known profiles: "
                                                      f"{', '.join(sorted(catalog)) or 'none'}")
    p = prof.fields
    stated = jf.stated
    changes: dict[str, Any] = {}

    def take(field: str, attr: str, value: Any) -> None:
        if field not in stated and value is not None:
            changes[attr] = value

    if "engine" not in stated and "engine-class" not in stated:
        take("engine", "engine", p.engine)
        take("engine-class", "engine_class", p.engine_class)
    take("model", "model", p.model)
    take("verify", "verify", p.verify)
    take("review-policy", "review_policy", p.review_policy)
    if m.repo is not None:  # a job without a repository has nothing to open or merge
        take("ship-as", "ship_as", p.ship_as)
    take("timeout", "timeout", p.timeout)
    budget = msgspec.structs.replace(
        m.budget, **{k: v for k in ("usd", "tokens", "wall")
                     if getattr(m.budget, k) is None and (v := getattr(p.budget, k)) is not None})
    changes["budget"] = budget
    changes["capabilities"] = list(dict.fromkeys([*m.capabilities, *p.capabilities]))
    changes["prefers"] = list(dict.fromkeys([*m.prefers, *p.prefers]))
    resolved = msgspec.structs.replace(m, **changes)
    if resolved.yolo and not p.yolo:
        raise ManifestError(jf.path, None, "yolo", f"profile {prof.name!r} does not permit yolo (auto-approve of "
                                                   "every tool and command): drop 'yolo: true' from the job, or use "
                                                   "a profile whose front matter says 'yolo: true'")
    if resolved.engine is None and resolved.engine_class is None:
        raise ManifestError(jf.path, None, "engine", f"profile {prof.name!r} names no engine-class; "
                                                     "the job must name 'engine' or 'engine-class'")
    snap = ProfileSnapshot(name=prof.name, content_hash=prof.content_hash, persona=prof.persona,
                           scope=list(p.scope))
    return dataclasses.replace(jf, manifest=resolved, profile=snap)


def engine_prompt(profile: ProfileSnapshot | None, body: str, engine_class: str) -> str:
    """The prompt an engine receives: the persona, a blank line, then the job's body. Script
    engines (``shell``, ``noop``) run the body as a program and get it unchanged.

    :param profile: the record's profile snapshot, or None.
    :param body: the job's body.
    :param engine_class: the class of the engine that runs it.
    """
    if profile is None or not profile.persona or engine_class == "script":
        return body
    return f"{profile.persona}\n\n{body}"


def resolve_engine(manifest: Manifest, offered: Mapping[str, str]) -> str | None:
    """Which engine runs a job on a factory, seats aside: ``engine`` if the job names one; else,
    for an ``engine-class`` job, the first of ``prefers`` (bare names or ``engine:<name>``) that
    the factory offers in that class, else the first offered engine of the class (by name, so
    the choice is stable); None if none fits. :func:`choose_engine` with no seat full.

    :param manifest: the resolved manifest.
    :param offered: the engines the factory offers, name -> engine class.
    """
    return choose_engine(manifest, offered, ()).engine


@dataclasses.dataclass(frozen=True, slots=True)
class EngineChoice:
    """What :func:`choose_engine` decided for one job on one factory."""

    engine: str | None
    """The engine to run, whose seat the factory takes before it claims; None: this factory
    cannot run the job now (no engine of its class offered, or every such engine's seats taken)."""
    preferred: bool
    """True when ``engine`` is what the job asked for: the engine it names, the first engine of
    its ``prefers`` with a free seat here, or any engine of the class when it prefers none.
    False for a fallback (the job prefers engines that have no free seat here): such a claim
    waits until the job has been claimable for ``prefers_grace_s`` (:func:`prefers_wait_s`)."""
    reason: str
    """Why, in words an operator can act on."""


def prefers_names(prefers: Iterable[str]) -> list[str]:
    """The engine names of a ``prefers`` list, in order, without repeats (``engine:claude`` and
    ``claude`` both name ``claude``).

    :param prefers: the manifest's ``prefers`` (the job's entries, then its profile's).
    """
    return list(dict.fromkeys(p.split(":", 1)[1] if p.startswith("engine:") else p for p in prefers))


def choose_engine(manifest: Manifest, offered: Mapping[str, str], full: Collection[str]) -> EngineChoice:
    """Which engine a factory runs a job on, given the engines it offers and which of them have
    every seat taken. Decided before the claim, so the factory takes that engine's seat first.

    - ``engine`` named: that engine, unless its seats are all taken (then None).
    - ``engine-class``: among the offered engines of the class with a free seat, the first one
      in ``prefers`` (``preferred``); if none of the preferred engines has a free seat here (or
      the factory offers none of them), the free engine of the class first by name, marked not
      ``preferred`` (the caller lets a factory with a preferred engine win first); a job that
      prefers nothing takes that one as ``preferred``. None when no engine of the class has a
      free seat.

    :param manifest: the resolved manifest (``engine``, ``engine-class``, ``prefers``).
    :param offered: the engines the factory offers now, name -> engine class.
    :param full: the engines whose seats are all taken on the factory.
    """
    if manifest.engine:
        if manifest.engine in full:
            return EngineChoice(None, True, f"every seat of engine {manifest.engine!r} is taken")
        return EngineChoice(manifest.engine, True, f"the job names engine {manifest.engine!r}")
    if manifest.engine_class is None:
        return EngineChoice(None, True, "the job names neither an engine nor an engine-class")
    want = str(manifest.engine_class)
    of_class = sorted(n for n, c in offered.items() if c == want)
    fits = [n for n in of_class if n not in full]
    if not fits:
        if of_class:
            return EngineChoice(None, True, f"every seat of the {want} engines here ({', '.join(of_class)}) is taken")
        return EngineChoice(None, True, f"no engine of class {want!r} is offered here")
    prefers = prefers_names(manifest.prefers)
    for name in prefers:
        if name in fits:
            return EngineChoice(name, True, f"{name} is the first engine of prefers [{', '.join(prefers)}] "
                                            "with a free seat")
    if not prefers:
        return EngineChoice(fits[0], True, f"{fits[0]} is the first {want} engine with a free seat (no prefers)")
    return EngineChoice(fits[0], False, f"no engine of prefers [{', '.join(prefers)}] has a free seat here; "
                                        f"{fits[0]} is the first {want} engine that has one")


def prefers_wait_s(choice: EngineChoice, claimable_for_s: float, grace_s: float) -> float:
    """How long a factory holds back its claim so that a factory with a preferred engine free
    can win the job first: 0 for a preferred choice (or none), else what is left of
    ``grace_s`` since the job became claimable. After the grace anyone may claim it, so a job
    whose preferred engines are busy or absent fleet-wide waits at most ``grace_s``.

    :param choice: what :func:`choose_engine` decided here.
    :param claimable_for_s: how long the job has been claimable (broker time since its record
        was last written, plus its retry back-off).
    :param grace_s: the ``prefers_grace_s`` setting (0: never hold back).
    """
    if choice.engine is None or choice.preferred:
        return 0.0
    return max(0.0, grace_s - claimable_for_s)


def summaries(catalog: Mapping[str, Profile]) -> list[dict[str, Any]]:
    """One row per profile for ``gigafactory profiles``: name, engine-class, prefers, summary."""
    return [{"name": p.name, "engine-class": str(p.fields.engine_class or ""), "prefers": list(p.fields.prefers),
             "summary": p.fields.summary, "path": p.path, "content_hash": p.content_hash}
            for p in sorted(catalog.values(), key=lambda p: p.name)]


def known_names(catalog: Iterable[str]) -> str:
    return ", ".join(sorted(catalog))
