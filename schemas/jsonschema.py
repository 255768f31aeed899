"""The JSON Schema of a job file's front matter, generated from :class:`~.manifest.Manifest`.

The schema is for editors (YAML language servers validate and complete front matter with it)
and for other languages' clients; the parser in ``manifest.py`` stays the authority. It is
generated, never edited by hand, and committed as ``schemas/json/job-manifest.schema.json``
so that it can be referenced without installing the package::

    python -m gigafactory.schemas.jsonschema      # rewrite the committed file

A test fails when the committed file and :func:`render` drift apart.

What is added to ``msgspec.json.schema(Manifest)``, and why:

- the Manifest definition is the root, not a ``$ref`` to it: editors that read draft-07
  ignore keywords next to a root ``$ref``, and would lose the title and description;
- every property's description, taken from the attribute docstrings in ``manifest.py``, so
  hovering a field in an editor shows the same words the code documents;
- the checks the parser makes beyond types where JSON Schema can say them (durations,
  capability tokens, engine names, ranges, engine-or-engine-class), so the editor flags the
  mistake before ``gigafactory submit`` does;
- ``"additionalProperties": false`` on every object, as ``forbid_unknown_fields`` implies.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec

from . import manifest as m

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
OUTPUT_PATH = Path(__file__).resolve().parent / "json" / "job-manifest.schema.json"
"""Where :func:`main` writes the schema: ``schemas/json/`` next to this module."""

DURATION_PATTERN = m.DURATION_RE.pattern
"""The parser's own duration grammar (``90s``, ``5m``, ``1h30m``, ``250ms``)."""

CAPABILITY_PATTERN = r"^\s*[A-Za-z0-9][A-Za-z0-9_./-]*(?::\S+|(?:>=|<=|>|<|=)[vV]?[0-9]\S*)?\s*$"
"""The capability grammar of ``capabilities.py`` as a JSON Schema pattern: ``key``,
``key:value``, or ``key<op>version`` where the version starts with a digit. Case-insensitive
like the parser (which lower-cases), so both cases are allowed here."""

ENGINE_PATTERN = r"^[a-z0-9][a-z0-9_\-]*$"

EXAMPLE = {"engine": "shell", "cwd": "scratch-repo", "verify": "test -f hello.txt"}


def _prose(doc: str) -> str:
    """A docstring as editor hover text: reST ``code`` -> Markdown `code`, paragraphs unwrapped."""
    doc = inspect.cleandoc(doc).replace("``", "`")
    paragraphs = re.split(r"\n\s*\n", doc)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under an attribute) of a class, by Python name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, following in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign):
            target = stmt.target
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        else:
            continue
        if (
            isinstance(target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[target.id] = _prose(following.value.value)
    return docs


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a Struct's fields, by the name the manifest uses (kebab-case)."""
    docs = _attribute_docs(cls)
    return {f.encode_name: docs[f.name] for f in msgspec.structs.fields(cls) if f.name in docs}


def _enum_description(cls: type) -> str:
    """The enum's docstring, then each documented member as a Markdown list item."""
    docs = _attribute_docs(cls)
    head = _prose(cls.__doc__) if cls.__doc__ else ""
    items = [f"- `{member.value}`: {docs[member.name]}" for member in cls if member.name in docs]
    return "\n\n".join(part for part in (head, "\n".join(items)) if part)


def _string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The ``{"type": "string"}`` part of a property, also inside ``anyOf: [string, null]``."""
    if prop.get("type") == "string":
        return prop
    for option in prop.get("anyOf", []):
        if option.get("type") == "string":
            return option
    raise AssertionError(f"no string branch in {prop!r}")


def _number_branch(prop: dict[str, Any]) -> dict[str, Any]:
    if prop.get("type") in ("integer", "number"):
        return prop
    for option in prop.get("anyOf", []):
        if option.get("type") in ("integer", "number"):
            return option
    raise AssertionError(f"no number branch in {prop!r}")


def _forbid_additional(node: Any) -> None:
    """Every object schema refuses unknown properties, like the parser does."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
        for value in node.values():
            _forbid_additional(value)
    elif isinstance(node, list):
        for value in node:
            _forbid_additional(value)


def generate() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job file's front matter, as a dict."""
    raw = msgspec.json.schema(m.Manifest)
    defs: dict[str, Any] = copy.deepcopy(raw["$defs"])
    assert raw.get("$ref") == "#/$defs/Manifest", raw.get("$ref")
    root = defs.pop("Manifest")
    assert "#/$defs/Manifest" not in json.dumps(defs), "nothing may refer back to the root"

    for name, cls in (("Budget", m.Budget), ("Retry", m.Retry), ("Reviewers", m.Reviewers)):
        if cls.__doc__:
            defs[name]["description"] = _prose(cls.__doc__)
        for field, doc in _field_docs(cls).items():
            defs[name]["properties"][field]["description"] = doc
    for field, doc in _field_docs(m.Manifest).items():
        root["properties"][field]["description"] = doc
    for name, cls in (("Priority", m.Priority), ("EngineClass", m.EngineClass), ("FailureClass", m.FailureClass)):
        # Declaration order, not msgspec's alphabetical one: editors offer completions in this
        # order, and critical, high, medium, low reads better than critical, high, low, medium.
        defs[name]["enum"] = [member.value for member in cls]
        description = _enum_description(cls)
        if description:
            defs[name]["description"] = description
        else:
            defs[name].pop("description", None)

    props = root["properties"]
    _string_branch(props["cwd"]).update(minLength=1, pattern=r"\S")  # blank is refused too
    _string_branch(props["engine"])["pattern"] = ENGINE_PATTERN
    for duration in (props["timeout"], defs["Budget"]["properties"]["wall"], defs["Retry"]["properties"]["backoff"]):
        _string_branch(duration)["pattern"] = DURATION_PATTERN
    props["capabilities"]["items"]["pattern"] = CAPABILITY_PATTERN
    retry_max = defs["Retry"]["properties"]["max"]
    retry_max["minimum"], retry_max["maximum"] = 0, 100
    _number_branch(defs["Budget"]["properties"]["usd"])["minimum"] = 0
    _number_branch(defs["Budget"]["properties"]["tokens"])["minimum"] = 0
    # A lambda default_factory is invisible to msgspec's schema; state the default here.
    defs["Retry"]["properties"]["on"]["default"] = [str(c) for c in m.Retry().on]
    defs["Reviewers"]["properties"]["reviewers"]["minItems"] = 1
    # A profile may supply the engine class (profiles.resolve refuses the job at submit if not).
    engine_or_class = [{"required": ["engine"]}, {"required": ["engine-class"]}, {"required": ["profile"]}]
    # 'cwd' is required unless 'repo' names a repository (then it defaults to the checkout's root).
    root.pop("required", None)
    root["allOf"] = [{"anyOf": engine_or_class}, {"anyOf": [{"required": ["cwd"]}, {"required": ["repo"]}]}]
    root["dependentRequired"] = {"base": ["repo"], "scope": ["repo"]}
    _string_branch(props["repo"]).update(minLength=1, maxLength=m.MAX_REPO_CHARS, pattern=r"^[^-\s][^\s]*$")
    _string_branch(props["base"]).update(minLength=1, maxLength=m.MAX_BRANCH_CHARS)
    scope = next(o for o in props["scope"].get("anyOf", [props["scope"]]) if o.get("type") == "array")
    scope["maxItems"] = m.MAX_SCOPE_GLOBS
    scope["items"].update(minLength=1, maxLength=m.MAX_GLOB_CHARS, pattern=r"^[^/~\\]")

    schema: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        **root,
        "title": "Gigafactory job manifest",
        "description": (
            "The YAML front matter of a gigafactory job file: the lines between the opening and "
            "closing '---' above the prompt. Field names are kebab-case. Only 'cwd' (or 'repo') and "
            "'engine' (or 'engine-class', or a 'profile' that names one) are required; every other field has the "
            "default shown."
        ),
        "examples": [EXAMPLE],
        "$defs": defs,
    }
    _forbid_additional(schema)
    return schema


def render() -> str:
    """The schema as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(generate(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the schema to :data:`OUTPUT_PATH` (or to the path given as the only argument)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python -m gigafactory.schemas.jsonschema [OUTPUT]", file=sys.stderr)
        return 2
    out = Path(args[0]) if args else OUTPUT_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render()
    changed = not out.exists() or out.read_text(encoding="utf-8") != text
    if changed:
        out.write_text(text, encoding="utf-8")
    print(f"{'wrote' if changed else 'unchanged'}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
