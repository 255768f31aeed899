"""The shipped price table and pricing a run's usage: priced when the model is known, else
unknown (never a fabricated zero)."""

from __future__ import annotations

import json

import pytest

from gigafactory.schemas import pricing
from gigafactory.schemas.pricing import PriceTableError, load_table, parse_table, price
from gigafactory.schemas.records import Usage

DEFAULT_MODELS = ["claude-sonnet-4-5", "claude-opus-4-5", "claude-opus-4-1", "claude-haiku-4-5", "gpt-5",
                  "gpt-5-codex", "gpt-5.1", "gpt-4.1", "o4-mini", "gemini-2.5-pro", "gemini-2.5-flash"]


def test_the_shipped_table_has_a_version_and_every_default_model():
    table = load_table()
    assert table.version == json.loads(
        (pricing.Path(pricing.__file__).parent / "prices.json").read_text())["version"]
    for model in DEFAULT_MODELS:
        assert table.lookup(model) is not None, model


def test_a_known_model_is_priced_with_the_tables_version():
    u = price(Usage(model="gpt-5", input_tokens=1_000_000, cache_read_tokens=2_000_000, output_tokens=100_000))
    # 1M * 1.25 + 2M * 0.125 + 0.1M * 10
    assert u.cost_usd == pytest.approx(1.25 + 0.25 + 1.0)
    assert u.cost_source == "priced" and u.price_table == load_table().version
    assert u.input_tokens == 1_000_000  # the counts are kept


def test_cache_writes_are_priced_at_the_write_rate_or_as_input():
    claude = price(Usage(model="claude-sonnet-4-5", input_tokens=0, cache_write_tokens=1_000_000, output_tokens=0))
    assert claude.cost_usd == pytest.approx(3.75)
    gemini = price(Usage(model="gemini-2.5-flash", input_tokens=0, cache_write_tokens=1_000_000, output_tokens=0))
    assert gemini.cost_usd == pytest.approx(0.30)


def test_an_unknown_model_stays_unknown_with_no_cost():
    u = price(Usage(model="scripted-model", input_tokens=10, output_tokens=5))
    assert (u.cost_usd, u.cost_source, u.price_table) == (None, "unknown", None)
    assert price(Usage(input_tokens=10, output_tokens=5)).cost_source == "unknown"  # no model at all


def test_unknown_counts_are_never_priced_as_zero():
    u = price(Usage(model="gpt-5", input_tokens=10))
    assert (u.cost_usd, u.cost_source) == (None, "unknown")


def test_a_reported_cost_is_kept():
    u = Usage(model="claude-sonnet-4-5", input_tokens=10, output_tokens=5, cost_usd=0.5, cost_source="reported")
    assert price(u) == u


@pytest.mark.parametrize("spelling,expected", [
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("openai/gpt-4.1-2025-04-14", "gpt-4.1"),
    ("models/gemini-2.5-pro", "gemini-2.5-pro"),
    ("GPT-5", "gpt-5"),
    ("claude-sonnet-4-5-latest", "claude-sonnet-4-5"),
])
def test_dated_prefixed_and_aliased_names_find_their_model(spelling, expected):
    table = load_table()
    assert table.lookup(spelling) == table.lookup(expected) is not None


def test_no_loose_matching_between_model_families():
    table = load_table()
    assert table.lookup("gpt-5-nano") is None  # not priced as gpt-5
    assert table.lookup("gemini-2.5") is None
    assert table.lookup("gpt-5-mini") != table.lookup("gpt-5")


@pytest.mark.parametrize("doc,field", [
    ({"models": {"m": {"input": 1, "cache_read": 1, "output": 1}}}, "version"),
    ({"version": "v", "models": {"m": {"input": 1, "output": 1}}}, "models.m.cache_read"),
    ({"version": "v", "models": {"m": {"input": -1, "cache_read": 1, "output": 1}}}, "models.m.input"),
    ({"version": "v", "models": {"m": {"input": "1", "cache_read": 1, "output": 1}}}, "models.m.input"),
    ({"version": "v", "models": {"m": {"input": 1, "cache_read": 1, "output": 1, "outptu": 2}}}, "outptu"),
    ({"version": "v", "models": {"m": {"input": 1, "cache_read": 1, "output": 1}}, "aliases": {"a": "b"}}, "aliases.a"),
])
def test_a_bad_table_is_refused_naming_the_file_and_field(doc, field):
    with pytest.raises(PriceTableError) as e:
        parse_table(json.dumps(doc).encode(), "my-prices.json")
    assert "my-prices.json" in str(e.value) and field in str(e.value)


def test_a_table_over_the_size_limit_is_refused(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * (pricing.MAX_TABLE_BYTES + 1))
    with pytest.raises(PriceTableError, match="limit"):
        load_table(p)


def test_an_operator_table_prices_with_its_own_version(tmp_path):
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"version": "ops-1", "models": {"scripted-model": {"input": 1, "cache_read": 0, "output": 2}}}))
    u = price(Usage(model="scripted-model", input_tokens=1_000_000, output_tokens=1_000_000), load_table(p))
    assert (u.cost_usd, u.cost_source, u.price_table) == (3.0, "priced", "ops-1")


def test_every_shipped_price_says_where_it_comes_from_and_when():
    table = load_table()
    for name, p in table.models.items():
        assert p.source and p.source.startswith("https://"), name
        assert p.as_of and p.as_of[:4].isdigit(), name
    raw = json.loads((pricing.Path(pricing.__file__).parent / "prices.json").read_text())
    # The notes are honest about what was checked: none claims more than "checked" or "from memory".
    assert all(("memory" in m["note"]) or ("Checked" in m["note"]) for m in raw["models"].values())
    premium = table.requests["copilot-premium-request"]
    assert premium.usd > 0 and premium.source.startswith("https://") and premium.as_of


@pytest.mark.parametrize("doc,field", [
    ({"version": "v", "models": {"m": {"input": 1, "cache_read": 1, "output": 1, "source": 3}}}, "models.m.source"),
    ({"version": "v", "models": {"m": {"input": 1, "cache_read": 1, "output": 1, "as_of": "x" * 600}}},
     "models.m.as_of"),
    ({"version": "v", "models": {"m": {"input": 1, "cache_read": 1, "output": 1}},
      "requests": {"copilot-premium-request": {"usd": -1}}}, "requests.copilot-premium-request.usd"),
    ({"version": "v", "models": {"m": {"input": 1, "cache_read": 1, "output": 1}},
      "requests": {"copilot-premium-request": {"usd": 1, "cost": 2}}}, "requests.copilot-premium-request"),
])
def test_bad_provenance_or_request_prices_are_refused_naming_the_field(doc, field):
    with pytest.raises(PriceTableError) as e:
        parse_table(json.dumps(doc).encode(), "ops-prices.json")
    assert "ops-prices.json" in str(e.value) and field in str(e.value)


def test_a_missing_operator_table_is_a_named_error(tmp_path):
    with pytest.raises(PriceTableError, match="nope.json.*cannot be read"):
        load_table(tmp_path / "nope.json")


def test_an_edited_operator_table_is_read_again(tmp_path):
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"version": "ops-1", "models": {"m": {"input": 1, "cache_read": 0, "output": 1}}}))
    assert load_table(p).version == "ops-1"
    p.write_text(json.dumps({"version": "ops-22", "models": {"m": {"input": 1, "cache_read": 0, "output": 1}}}))
    assert load_table(p).version == "ops-22"


# -- settings: the engines' own and the operator's price table ------------------------------------


def test_engine_settings_keep_their_environment_names():
    from gigafactory.config import Settings

    s = Settings.from_env({"GIGAFACTORY_CODEX_BASE_URL": "http://127.0.0.1:1/v1",
                           "GIGAFACTORY_CODEX_API_KEY_VAR": "MY_KEY", "GIGAFACTORY_CODEX_MODEL": "gpt-5",
                           "GIGAFACTORY_GEMINI_MODEL": "gemini-2.5-flash", "GIGAFACTORY_COPILOT_MODEL": "gpt-4.1",
                           "GIGAFACTORY_AIDER_MODEL": "o4-mini", "GIGAFACTORY_PRICE_TABLE": "/etc/prices.json"})
    assert (s.codex_base_url, s.codex_api_key_var, s.codex_model, s.gemini_model, s.copilot_model, s.aider_model,
            s.price_table) == ("http://127.0.0.1:1/v1", "MY_KEY", "gpt-5", "gemini-2.5-flash", "gpt-4.1", "o4-mini",
                               "/etc/prices.json")
    d = Settings.from_env({})
    assert (d.codex_api_key_var, d.codex_base_url, d.price_table) == ("OPENAI_API_KEY", None, None)


@pytest.mark.parametrize("env,words", [
    ({"GIGAFACTORY_PRICE_TABLE": "/no/such/prices.json"}, ["GIGAFACTORY_PRICE_TABLE", "/no/such/prices.json"]),
    ({"GIGAFACTORY_CODEX_API_KEY_VAR": "not a name"}, ["GIGAFACTORY_CODEX_API_KEY_VAR", "variable name"]),
    ({"GIGAFACTORY_CODEX_BASE_URL": "127.0.0.1:8080"}, ["GIGAFACTORY_CODEX_BASE_URL", "http"]),
])
def test_bad_engine_settings_are_refused_at_factory_start_naming_them(env, words):
    from gigafactory.config import Settings, SettingsError

    with pytest.raises(SettingsError) as e:
        Settings.from_env(env).validate()
    for w in words:
        assert w in str(e.value)


def test_a_malformed_operator_table_is_refused_at_start_naming_its_field(tmp_path):
    from gigafactory.config import Settings, SettingsError

    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"version": "ops-1", "models": {"m": {"input": 1, "output": 1}}}))
    with pytest.raises(SettingsError, match=r"price_table .*prices.json: models.m.cache_read is missing"):
        Settings.from_env({"GIGAFACTORY_PRICE_TABLE": str(p)}).validate()
