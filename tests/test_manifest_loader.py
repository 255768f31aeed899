"""The YAML loader of job files and profiles (schemas/manifest.py): libyaml's scanner and
parser where PyYAML has them, PyYAML's own composer either way, and the same refusals (file,
line, field, message) whichever parser read the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gigafactory.schemas import manifest, profiles
from gigafactory.schemas.limits import Limits
from gigafactory.schemas.manifest import CYamlLoader, ManifestError, PyYamlLoader, parse_job_text

from test_manifest import INVALID, job

LOADERS = [PyYamlLoader] + ([CYamlLoader] if CYamlLoader is not None else [])
"""Every loader this PyYAML can run: the pure-Python one always, libyaml's where it is built in."""

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(params=LOADERS, ids=lambda cls: cls.__name__)
def loader(request, monkeypatch) -> type:
    """Job files and profiles are read with this loader for the test."""
    monkeypatch.setattr(manifest, "YamlLoader", request.param)
    monkeypatch.setattr(profiles, "YamlLoader", request.param)
    return request.param


def refused(text: str, limits: Limits | None = None) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        parse_job_text(text, "jobs/bad.md", limits)
    return caught.value


def test_the_loader_is_libyaml_s_parser_under_the_python_composer_where_pyyaml_has_libyaml():
    if not yaml.__with_libyaml__:  # a PyYAML built without libyaml: the pure-Python loader
        assert manifest.YamlLoader is PyYamlLoader and CYamlLoader is None
        return
    assert manifest.YamlLoader is CYamlLoader and profiles.YamlLoader is CYamlLoader
    mro = CYamlLoader.__mro__
    assert yaml.cyaml.CParser in mro
    assert yaml.parser.Parser not in mro and yaml.scanner.Scanner not in mro and yaml.reader.Reader not in mro
    # Events come from C; nodes from the Python composer (CParser's own composing is recursive
    # in C, with no depth limit), so the composer must come first.
    for name in ("check_event", "peek_event", "get_event"):
        assert getattr(CYamlLoader, name) is getattr(yaml.cyaml.CParser, name)
    assert mro.index(yaml.composer.Composer) < mro.index(yaml.cyaml.CParser)
    for name in ("get_single_node", "compose_document", "check_node", "get_node"):
        assert getattr(CYamlLoader, name) is getattr(yaml.composer.Composer, name)


HUNDRED_THOUSAND_LEVELS = [
    # (id, nested value of field ``a`` on line 4, the line where the 17th level opens)
    ("flow lists", "a: " + "[" * 100_000 + "]" * 100_000, 4),
    ("flow lists never closed", "a: " + "[" * 100_000, 4),
    ("flow mappings", "a: " + "{a: " * 50_000 + "1" + "}" * 50_000, 4),
    ("block lists", "a:\n" + "- " * 100_000 + "x", 5),
    ("flow lists one per line", "a: " + "[\n" * 50_000, 19),
]


@pytest.mark.parametrize(("nested", "line"), [c[1:] for c in HUNDRED_THOUSAND_LEVELS],
                         ids=[c[0] for c in HUNDRED_THOUSAND_LEVELS])
def test_100_000_levels_are_refused_with_the_depth_limit_not_a_crash(loader, nested, line):
    # Up to 200 KB: limits raised so that the parser, not a size check, meets them. libyaml has
    # a ceiling of its own (1,000 levels), met before the composer counts when they are on one line.
    roomy = Limits(max_job_file_bytes=1_000_000, max_manifest_bytes=400_000)

    error = refused(job("engine: shell\ncwd: x\n" + nested + "\n"), roomy)

    assert (error.path, error.line, error.field) == ("jobs/bad.md", line, "a")
    assert error.message.startswith("nested more than 16 levels deep (limit max_manifest_depth = 16, ")
    assert "GIGAFACTORY_MAX_MANIFEST_DEPTH" in error.message


@pytest.mark.parametrize("depth", [1, 2, 16, 200])
def test_the_loader_composes_max_depth_levels_and_refuses_one_more(loader, depth):
    # The document itself is a level: ``depth`` levels are a mapping around depth - 1 lists.
    ok = loader("a: " + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "\n")
    ok.max_depth = depth
    try:
        data = ok.get_single_data()
    finally:
        ok.dispose()
    expected = 1
    for _ in range(depth - 1):
        expected = [expected]
    assert data == {"a": expected}

    too_deep = loader("a: " + "[" * depth + "1" + "]" * depth + "\n")
    too_deep.max_depth = depth
    with pytest.raises(manifest._TooDeep) as caught:
        too_deep.get_single_data()
    too_deep.dispose()
    assert (caught.value.mark.line, caught.value.mark.column) == (0, 3 + depth - 1)


@pytest.mark.parametrize(("front", "line", "field", "words"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_every_invalid_manifest_is_refused_alike_by_either_parser(loader, front, line, field, words):
    error = refused(job(front))

    assert (error.path, error.line, error.field) == ("jobs/bad.md", line, field)
    assert words in error.message


YAML_ERRORS = [
    # (id, front matter, line, field, the message); the text before the error is not ASCII on
    # purpose: both parsers count marks in characters, and a message names the character at one.
    ("unterminated flow list", "engine: shell\nmodel: héllo wörld 😀\ncwd: [x\n", 4, "cwd",
     "invalid YAML: expected ',' or ']' before the front matter ended"),
    ("unterminated flow mapping", "engine: shell\nmodel: ünï\ncwd: {a: 1\n", 4, "cwd",
     "invalid YAML: expected ',' or '}' before the front matter ended"),
    ("unterminated quotes", "engine: shéll\ncwd: \"x\n", 3, "cwd", "invalid YAML: found unexpected end of stream"),
    ("tab before a key", "engine: shéll\ncwd: x\nretry:\n\tmax: 1\n", 5, "max",
     "invalid YAML: found character '\\t' that cannot start any token; indent with spaces, YAML does not allow tabs"),
    ("character that starts no token", "model: 😀😀😀\nengine: shell\ncwd: @x\n", 4, "cwd",
     "invalid YAML: found character '@' that cannot start any token"),
    ("mapping in a value", "model: ✓\nengine: shell\ncwd: a: b\n", 4, "cwd",
     "invalid YAML: mapping values are not allowed here"),
    ("undefined alias", "engine: shell\ncwd: *nope\n", 3, "cwd", "invalid YAML: found undefined alias 'nope'"),
    ("control character", "engine: shéll\ncwd: x\x1b[0m\n", 3, "cwd",
     "invalid YAML: the character U+001B is not allowed in YAML (only printable characters are); remove it, "
     "or inside double quotes write it as the escape \"\\u001b\""),
    ("null byte", "engine: shell\ncwd: x\nverify: \x00\n", 4, "verify", "the character U+0000 is not allowed"),
    ("yaml 1.1 boolean", "engine: shell\ncwd: x\nyolo: on\n", 4, "yolo", "YAML 1.2"),
    ("duplicate key after non-ASCII", "engine: ünï\ncwd: x\nengine: shell\n", 4, "engine",
     "given twice (first on line 2)"),
    ("recursive alias", "engine: shell\ncwd: x\ncapabilities: &loop [*loop]\n", 4, "capabilities[0]", "expected text"),
    ("alias bomb", 'engine: shell\ncwd: x\nmodel: &m "' + "y" * 1000 + '"\nprefers: ['
     + ", ".join(["*m"] * 5000) + "]\n", 2, None, "with its YAML aliases written out"),
    ("deep flow lists", "engine: shell\ncwd: x\na: " + "[" * 500 + "]" * 500 + "\n", 4, "a",
     "nested more than 16 levels deep"),
    ("deep block mappings", "engine: shell\ncwd: x\na:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(300))
     + " " * 301 + "b: 1\n", 20, ".".join(["a"] * 17), "nested more than 16 levels deep"),
]


@pytest.mark.parametrize(("front", "line", "field", "words"), [c[1:] for c in YAML_ERRORS],
                         ids=[c[0] for c in YAML_ERRORS])
def test_yaml_errors_name_the_same_line_field_and_problem_with_either_parser(loader, front, line, field, words):
    error = refused(job(front))

    assert (error.path, error.line, error.field) == ("jobs/bad.md", line, field)
    assert words in error.message


def test_a_tab_in_the_indentation_gets_the_hint_whichever_way_the_parser_words_it(loader):
    # libyaml says "found a tab character that violates indentation" where PyYAML names '\t'.
    for front, line, field in (("engine: shell\ncwd: x\n\tpriority: high\n", 4, "priority"),
                               ("engine: shéll\nretry:\n  max: 1\n\t  on: [crash]\n", 5, "on")):
        error = refused(job(front))

        assert (error.line, error.field) == (line, field)
        assert error.message.startswith("invalid YAML: found ")
        assert error.message.endswith("; indent with spaces, YAML does not allow tabs")


def test_a_control_character_in_a_profile_is_a_profile_error(loader):
    with pytest.raises(profiles.ProfileError) as caught:
        profiles.parse_profile("---\nsummary: a \x07 bell\n---\nYou are careful.\n", "p/bell.md")

    assert caught.value.path == "p/bell.md" and "invalid YAML" in caught.value.message


def test_both_parsers_read_every_example_and_every_shipped_profile_alike(monkeypatch):
    files = sorted(EXAMPLES.glob("*.md"))
    assert len(files) >= 10
    shipped = profiles._shipped()
    assert len(shipped) >= 8
    results: dict[type, tuple] = {}
    for cls in LOADERS:
        monkeypatch.setattr(manifest, "YamlLoader", cls)
        monkeypatch.setattr(profiles, "YamlLoader", cls)
        jobs = [parse_job_text(p.read_text(encoding="utf-8"), str(p)) for p in files]
        profs = [profiles.parse_profile(text, path) for path, text in shipped]
        results[cls] = (jobs, profs)
    assert len(results) == (2 if yaml.__with_libyaml__ else 1)
    first = results[PyYamlLoader]
    assert all(r == first for r in results.values())


def test_without_libyaml_the_module_falls_back_to_the_pure_python_loader():
    # A fresh interpreter that sees PyYAML as built without libyaml (as on a platform with no
    # wheel): the module imports, picks the pure-Python loader, and reads and refuses as ever.
    program = (
        "import yaml; yaml.__with_libyaml__ = False\n"
        "from gigafactory.schemas import manifest, profiles\n"
        "assert manifest.YamlLoader is manifest.PyYamlLoader and manifest.CYamlLoader is None\n"
        "assert profiles.YamlLoader is manifest.PyYamlLoader\n"
        "ok = manifest.parse_job_text('---\\nengine: shell\\ncwd: x\\n---\\necho\\n')\n"
        "assert (ok.manifest.engine, ok.manifest.cwd) == ('shell', 'x')\n"
        "try:\n"
        "    manifest.parse_job_text('---\\nengine: shell\\ncwd: [x\\n---\\necho\\n', 'j.md')\n"
        "except manifest.ManifestError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "j.md:3: field 'cwd': invalid YAML: expected ',' or ']' before the front matter ended"


@pytest.mark.parametrize("where, text, line", [
    ("the prompt", "---\nengine: shell\ncwd: .\n---\nfix \ud800 this\n", 5),
    ("a field", "---\nengine: shell\ncwd: \"a\udc80\"\n---\nhello\n", 3),
])
def test_a_lone_surrogate_is_a_manifest_error_naming_its_line_not_a_unicode_crash(where, text, line):
    # A JSON body with a broken "\ud800" escape decodes to such a string; it is no text,
    # and it used to escape as UnicodeEncodeError from the size check.
    with pytest.raises(ManifestError) as e:
        parse_job_text(text, "api/bad.md")
    assert e.value.line == line, where
    assert "lone surrogate" in str(e.value) and "api/bad.md" in str(e.value)


@pytest.mark.parametrize("front, line, field, words", [
    ("summary: ok\nbad: [unclosed\n", 3, "bad", "expected ',' or ']'"),
    ("summary: ok\nmodel: x\n  effort: high\n", 4, "model.effort", "mapping values are not allowed here"),
    ("summary: a \x07 bell\n", 2, "summary", "U+0007 is not allowed"),
])
def test_a_profile_s_yaml_error_names_its_line_in_the_file_and_the_field_as_a_job_file_s_does(loader, front, line,
                                                                                             field, words):
    # The front matter starts on the file's line 2: a line counted from the front matter
    # was one too small.
    with pytest.raises(profiles.ProfileError) as caught:
        profiles.parse_profile(f"---\n{front}---\nYou are careful.\n", "p/careful.md")
    e = caught.value
    assert (e.line, e.field) == (line, field)
    assert words in e.message and str(e).startswith(f"p/careful.md:{line}: field '{field}':")
