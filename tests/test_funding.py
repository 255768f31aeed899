"""Funding windows: the file (YAML or TOML, errors naming file, window and field) and the one
ordered rule that picks exactly one window per run (a table)."""

from __future__ import annotations

import datetime

import pytest

from gigafactory.economics.funding import FundingFileError, load_funding_windows, parse_funding_windows
from gigafactory.schemas.spend import UNFUNDED, FundingWindow, choose_window, provider_for


def ts(day: str) -> float:
    return datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.timezone.utc).timestamp()


Q4 = FundingWindow("q4-all", ts("2026-10-01"), ts("2027-01-01"), 10_000)
DEC = FundingWindow("dec-all", ts("2026-12-01"), ts("2027-01-01"), 1_000)
DEC_EARLY = FundingWindow("dec-early", ts("2026-12-01"), ts("2026-12-16"), 500)
WEB = FundingWindow("web-anthropic", ts("2026-10-01"), ts("2027-01-01"), 3_000, products=("web",),
                    providers=("anthropic",))
WEB_B = FundingWindow("web-anthropic-b", ts("2026-10-01"), ts("2027-01-01"), 3_000, products=("web",),
                      providers=("anthropic",))
SHADOW = FundingWindow("shadow", ts("2026-10-01"), ts("2027-01-01"), 100, lane_kinds=("shadow",))


@pytest.mark.parametrize("windows, at, product, provider, lane, want", [
    ([], "2026-12-10", "web", "anthropic", "live", UNFUNDED),                      # nothing configured
    ([Q4], "2027-01-01", "web", "anthropic", "live", UNFUNDED),                    # end is excluded
    ([Q4], "2026-10-01", "web", "anthropic", "live", "q4-all"),                    # start is included
    ([Q4, WEB], "2026-12-10", "web", "anthropic", "live", "web-anthropic"),        # most specific first
    ([Q4, WEB], "2026-12-10", "web", "openai", "live", "q4-all"),                  # WEB does not fund openai
    ([Q4, DEC, DEC_EARLY], "2026-12-10", "api", "openai", "live", "dec-early"),    # then earliest end
    ([Q4, DEC, DEC_EARLY], "2026-12-20", "api", "openai", "live", "dec-all"),
    ([WEB_B, WEB], "2026-12-10", "web", "anthropic", "live", "web-anthropic"),     # then name, not file order
    ([SHADOW], "2026-12-10", "web", "anthropic", "live", UNFUNDED),                # lane kind not funded
    ([SHADOW, Q4], "2026-12-10", "web", "anthropic", "shadow", "shadow"),
])
def test_a_run_draws_from_exactly_one_window_by_the_ordered_rule(windows, at, product, provider, lane, want):
    assert choose_window(windows, ts(at), product, provider, lane) == want
    assert choose_window(list(reversed(windows)), ts(at), product, provider, lane) == want


@pytest.mark.parametrize("engine, model, want", [
    ("claude", None, "anthropic"), ("codex", "gpt-5", "openai"), ("aider", "claude-sonnet-4", "anthropic"),
    ("aider", "openai/gpt-5", "openai"), ("aider", None, "aider"), ("shell", None, "local"), (None, None, "unknown"),
])
def test_provider_for(engine, model, want):
    assert provider_for(engine, model) == want


YAML = b"""
windows:
  - name: q4-live
    start: 2026-10-01
    end: 2027-01-01
    amount-usd: 5000
    products: [web]
    lane-kinds: [live, background]
  - name: dec
    start: "2026-12-01T00:00:00+00:00"
    end: 2027-01-01
    amount-usd: 100.5
"""

TOML = b"""
[[windows]]
name = "q4-live"
start = 2026-10-01
end = 2027-01-01
amount-usd = 5000
products = ["web"]
lane-kinds = ["live", "background"]

[[windows]]
name = "dec"
start = "2026-12-01T00:00:00+00:00"
end = "2027-01-01"
amount-usd = 100.5
"""


def test_yaml_and_toml_files_give_the_same_windows(tmp_path):
    (tmp_path / "w.yaml").write_bytes(YAML)
    (tmp_path / "w.toml").write_bytes(TOML)
    a, b = load_funding_windows(tmp_path / "w.yaml"), load_funding_windows(tmp_path / "w.toml")
    assert a == b
    assert a[0] == FundingWindow("q4-live", ts("2026-10-01"), ts("2027-01-01"), 5000.0, products=("web",),
                                 lane_kinds=("live", "background"))
    assert a[1].start == ts("2026-12-01") and a[1].amount_usd == 100.5


@pytest.mark.parametrize("text, says", [
    (b"windows: 3", "top-level 'windows' list"),
    (b"windows:\n  - {name: a, start: 2026-01-01, end: 2025-01-01, amount-usd: 1}", "window 'a': field 'end'"),
    (b"windows:\n  - {name: a, start: 2026-01-01, amount-usd: 1}", "window 'a': field 'end' is missing"),
    (b"windows:\n  - {name: a, start: 2026-01-01, end: 2027-01-01, amount-usd: -1}", "field 'amount-usd'"),
    (b"windows:\n  - {name: a, start: 2026-01-01, end: 2027-01-01, amount-usd: 1, lane-kinds: [x]}",
     "window 'a': field 'lane-kinds': 'x'"),
    (b"windows:\n  - {name: a, start: 2026-01-01, end: 2027-01-01, amount-usd: 1, product: [x]}",
     "window 'a': field 'product' is not known"),
    (b"windows:\n  - {name: a, start: soon, end: 2027-01-01, amount-usd: 1}", "window 'a': field 'start'"),
    (b"windows:\n  - {start: 2026-01-01, end: 2027-01-01, amount-usd: 1}", "window #1: field 'name'"),
    (b"windows:\n  - {name: unfunded, start: 2026-01-01, end: 2027-01-01, amount-usd: 1}", "reserved"),
    (b"windows:\n  - {name: a, start: 2026-01-01, end: 2027-01-01, amount-usd: 1}\n"
     b"  - {name: a, start: 2026-01-01, end: 2027-01-01, amount-usd: 1}", "window 'a' (#2): field 'name': given twice"),
    (b"windows: [\n", "not YAML (line"),
    (b"x" * (256 * 1024 + 1), "at most 262144"),
])
def test_a_bad_file_is_refused_naming_file_window_and_field(text, says):
    with pytest.raises(FundingFileError, match="^w.yaml: ") as e:
        parse_funding_windows(text, "w.yaml")
    assert says in str(e.value)


def test_a_missing_file_names_the_setting(tmp_path):
    with pytest.raises(FundingFileError, match="GIGAFACTORY_FUNDING_WINDOWS_FILE"):
        load_funding_windows(tmp_path / "nope.yaml")
