"""The generated JSON Schema of the front matter (schemas/jsonschema.py, schemas/json/)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from gigafactory.schemas import jsonschema as gen
from gigafactory.schemas.manifest import FIELD_NAMES, ManifestError, parse_job_text

REGENERATE = "python -m gigafactory.schemas.jsonschema"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(gen.OUTPUT_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator: jsonschema.Draft202012Validator, instance: dict) -> list[str]:
    return [e.message for e in validator.iter_errors(instance)]


def test_the_committed_schema_is_what_the_generator_renders():
    committed = gen.OUTPUT_PATH.read_text(encoding="utf-8") if gen.OUTPUT_PATH.exists() else ""

    assert committed == gen.render(), (
        f"{gen.OUTPUT_PATH} is out of date with schemas/manifest.py; run `{REGENERATE}` and commit the result"
    )


def test_the_schema_is_written_next_to_the_module_in_schemas_json():
    assert gen.OUTPUT_PATH.parent.name == "json"
    assert gen.OUTPUT_PATH.parent.parent.resolve() == __import__("pathlib").Path(gen.__file__).resolve().parent
    assert gen.OUTPUT_PATH.name == "job-manifest.schema.json"


def test_render_is_stable_sorted_indented_and_ends_with_a_newline():
    text = gen.render()

    assert text == gen.render()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_main_writes_the_schema_and_leaves_an_unchanged_file_alone(tmp_path, capsys):
    out = tmp_path / "nested" / "schema.json"

    assert gen.main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == gen.render()
    assert gen.main([str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote: {out}", f"unchanged: {out}"]


def test_the_schema_is_draft_2020_12_with_a_title_and_the_manifest_at_the_root():
    schema = gen.generate()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "$id" not in schema
    assert schema["title"] == "Gigafactory job manifest"
    assert "front matter" in schema["description"]
    assert "$ref" not in schema  # draft-07 editors ignore siblings of a root $ref
    assert schema["type"] == "object"
    assert "required" not in schema  # 'cwd' or 'repo': see allOf
    assert {"anyOf": [{"required": ["cwd"]}, {"required": ["repo"]}]} in schema["allOf"]


def test_property_names_are_the_kebab_case_names_the_manifest_uses():
    props = gen.generate()["properties"]

    assert list(props) == list(FIELD_NAMES)
    assert {"engine-class", "deps-mode", "idempotency-key", "review-policy", "tracker-item"} <= set(props)
    assert not [name for name in props if "_" in name]


def test_every_object_in_the_schema_refuses_additional_properties():
    schema = gen.generate()
    objects = [schema, *[d for d in schema["$defs"].values() if d.get("type") == "object"]]

    assert len(objects) == 4  # the manifest, budget, retry, reviewers
    assert all(o["additionalProperties"] is False for o in objects)


def test_every_manifest_property_has_a_description_for_editors():
    props = gen.generate()["properties"]

    assert [name for name, prop in props.items() if not prop.get("description")] == []
    assert "``" not in json.dumps(gen.generate())  # reST markup is converted to Markdown


def test_enums_are_listed_in_declaration_order():
    defs = gen.generate()["$defs"]

    assert defs["Priority"]["enum"] == ["critical", "high", "medium", "low"]
    assert defs["Retry"]["properties"]["on"]["default"] == ["timeout", "verify_failed", "crash", "lease_expired",
                                                        "auth_failed", "rate_limited"]


def test_the_schema_accepts_a_good_manifest(validator):
    assert errors(validator, {"engine": "shell", "cwd": "scratch-repo"}) == []
    assert errors(validator, gen.EXAMPLE) == []
    full = {
        "cwd": "repos/web", "engine": "claude", "model": "opus-4", "product": "storefront",
        "engine-class": "agentic-coder", "profile": "careful", "yolo": True, "lock": "repo:web",
        "timeout": "1h30m", "verify": "make test", "capabilities": ["os:linux", "node>=20", "has:git"],
        "prefers": ["factory:mac-2"], "priority": "critical",
        "budget": {"usd": 12.5, "tokens": 400000, "wall": "45m"}, "deps": ["job-a"], "deps-mode": "soft",
        "idempotency-key": "k", "retry": {"max": 5, "backoff": "10s", "on": ["crash", "timeout"]},
        "review-policy": {"reviewers": ["@alice"]}, "artifacts": ["dist/report.html"],
        "tracker-item": "WEB-42", "kind": "composite", "parent": "epic-7",
        "repo": "https://git.example.com/web.git", "base": "main", "scope": ["src/**"], "scope-mode": "enforce",
            "ship-as": "merged", "lane-kind": "shadow", "feature": True, "cosmetic": False,
    }
    assert set(full) == set(FIELD_NAMES)
    assert errors(validator, full) == []


def test_the_schema_rejects_an_unknown_field(validator):
    assert errors(validator, {"engine": "shell", "cwd": "x", "verfy": "make test"}) == [
        "Additional properties are not allowed ('verfy' was unexpected)"
    ]
    assert errors(validator, {"engine": "shell", "cwd": "x", "retry": {"tries": 3}}) == [
        "Additional properties are not allowed ('tries' was unexpected)"
    ]


# The parser is the authority; the schema must agree with it on what is a valid manifest.
AGREEMENT = [
    "engine: shell\nrepo: /srv/git/web.git\n",
    "engine: shell\nrepo: /srv/git/web.git\nbase: main\nscope: [src/**]\nscope-mode: enforce\n",
    "engine: shell\nbase: main\ncwd: x\n",
    "engine: shell\nscope: [src/**]\ncwd: x\n",
    "engine: shell\nrepo: /r\nscope: ['/etc/**']\n",
    "engine: shell\nrepo: '-upload-pack=x'\n",
    "engine: shell\nrepo: /r\nscope-mode: strict\n",
    "engine: shell\ncwd: x\n",
    "engine-class: chat-coder\ncwd: x\n",
    "cwd: x\n",
    "engine: shell\n",
    "engine: shell\ncwd: ''\n",
    "engine: shell\ncwd: '  '\n",
    "engine: Shell\ncwd: x\n",
    "engine: shell\ncwd: x\npriority: urgent\n",
    "engine: shell\ncwd: x\ntimeout: 90s\n",
    "engine: shell\ncwd: x\ntimeout: 1h 30m\n",
    "engine: shell\ncwd: x\ntimeout: forever\n",
    "engine: shell\ncwd: x\nbudget: {wall: 5 min}\n",
    "engine: shell\ncwd: x\nretry: {max: -1}\n",
    "engine: shell\ncwd: x\nretry: {max: 101}\n",
    "engine: shell\ncwd: x\nretry: {on: [crash, meteor]}\n",
    "engine: shell\ncwd: x\nbudget: {usd: -1}\n",
    "engine: shell\ncwd: x\ncapabilities: [os:linux, Node>=20, has, python=3.11]\n",
    "engine: shell\ncwd: x\ncapabilities: ['node >= 20']\n",
    "engine: shell\ncwd: x\ncapabilities: [node>=lts]\n",
    "engine: shell\ncwd: x\ncapabilities: ['os:']\n",
    "engine: shell\ncwd: x\nreview-policy: auto\n",
    "engine: shell\ncwd: x\nreview-policy: {reviewers: []}\n",
    "engine: shell\ncwd: x\nreview-policy: {reviewers: ['@a'], extra: 1}\n",
    "engine: shell\ncwd: x\nkind: tree\n",
    "engine: shell\ncwd: x\nyolo: 1\n",
]


@pytest.mark.parametrize("front", AGREEMENT)
def test_the_schema_and_the_parser_agree_on_validity(validator, front):
    try:
        parse_job_text(f"---\n{front}---\n")
        parser_accepts = True
    except ManifestError:
        parser_accepts = False

    schema_accepts = not errors(validator, yaml.safe_load(front))

    assert schema_accepts == parser_accepts
