"""Budgets from business signals, as tables: the factors, today's budget, the projection and the
decision (held, allowed, overridden, the pilot), the signals document's errors, the settings'."""

from __future__ import annotations

import pytest

from gigafactory.config import Settings, SettingsError
from gigafactory.economics import budget as B

P = B.Policy(monthly_pipeline_budget_usd=3000, days_per_month=30, runway_floor_months=3, runway_target_months=12,
             runway_factor_max=1.5, growth_sensitivity=1.0, growth_factor_min=0.5, growth_factor_max=1.5,
             expected_features_today=4, max_cost_per_run_usd=5.0, default_projected_usd=1.0)


@pytest.mark.parametrize("cash,burn,factor", [
    (None, None, 1.0),          # no cash signal: neutral
    (100_000, 0, 1.5),          # no burn: the cap
    (120_000, 40_000, 0.0),     # 3 months = the floor: nothing discretionary
    (300_000, 40_000, 0.5),     # 7.5 months: half way from floor to target
    (480_000, 40_000, 1.0),     # 12 months: the target
    (2_000_000, 40_000, 1.5),   # 50 months: capped
])
def test_cash_runway_factor(cash, burn, factor):
    assert B.cash_runway_factor(B.Signals(cash_balance_usd=cash, monthly_burn_usd=burn), P)[0] == pytest.approx(factor)


@pytest.mark.parametrize("rev,prev,factor", [
    (None, None, 1.0), (0, 0, 1.0),      # the pilot: no revenue yet does not zero the budget
    (110, 100, 1.1), (50, 100, 0.5), (10, 100, 0.5), (300, 100, 1.5),
])
def test_revenue_growth_factor(rev, prev, factor):
    assert B.revenue_growth_factor(B.Signals(revenue_usd=rev, revenue_prev_usd=prev), P)[0] == pytest.approx(factor)


def test_daily_and_per_feature_budget_are_the_product_of_the_share_and_the_factors():
    s = B.Signals(cash_balance_usd=300_000, monthly_burn_usd=40_000, revenue_usd=110, revenue_prev_usd=100)
    b = B.compute(s, P)
    assert b.daily_pipeline_budget_usd == pytest.approx(3000 / 30 * 0.5 * 1.1)
    assert b.per_feature_budget_usd == pytest.approx(b.daily_pipeline_budget_usd / 4)
    assert b.to_dict()["computation_id"] == b.computation_id and len(b.computation_id) == 16
    assert B.compute(s, P).computation_id == b.computation_id, "the same inputs give the same trail id"
    other = B.compute(B.Signals(cash_balance_usd=1), P)
    assert other.computation_id != b.computation_id


@pytest.mark.parametrize("budget_usd,recent,projected", [
    (2.0, [9.0], 2.0), (None, [1.0, 3.0], 2.0), (None, [], 1.0)])
def test_projection_order(budget_usd, recent, projected):
    assert B.project_cost(budget_usd, recent, 1.0)[0] == projected


NEUTRAL = B.compute(B.Signals(), P)  # daily 100


@pytest.mark.parametrize("projected,spent,enforce,override,allowed,would_hold,why", [
    (1.0, 0.0, True, "", True, False, "within budget"),
    (6.0, 0.0, True, "", False, True, "per-run cap"),
    (2.0, 99.0, True, "", False, True, "residual daily budget $1.0000"),
    (2.0, 99.0, True, "alice", True, True, "overridden by alice"),
    (2.0, 99.0, False, "", True, True, "residual daily budget"),   # the pilot: runs, the trail says why it would not
    (1.0, 150.0, True, "", False, True, "residual daily budget $0.0000"),
])
def test_decision(projected, spent, enforce, override, allowed, would_hold, why):
    d = B.decide(NEUTRAL, projected_usd=projected, projection="x", spent_today_usd=spent, enforcement=enforce,
                 override=override)
    assert (d.allowed, d.would_hold) == (allowed, would_hold)
    assert why in d.reason and d.reason.endswith(f"[budget {NEUTRAL.computation_id}]")
    if not allowed:
        assert d.reason.startswith("budget: ")


def test_enforcement_line_and_cap():
    assert B.enforcement_line(True) == "budget enforcement ON"
    assert B.enforcement_line(False) == "budget enforcement OFF (pilot mode)"
    assert B.cap_crossed(0.5, 0.4).startswith("per-run cap exceeded: $0.5000")
    assert B.cap_crossed(0.4, 0.4) is None and B.cap_crossed(None, 0.1) is None and B.cap_crossed(9, None) is None


@pytest.mark.parametrize("raw,err", [
    (b"{", "not JSON"), (b"[]", "expected a JSON object"), (b'{"cash": 1}', "unknown signal 'cash'"),
    (b'{"cash_balance_usd": "lots"}', "cash_balance_usd = 'lots' is not a number"),
    (b'{"monthly_burn_usd": true}', "monthly_burn_usd"), (b'{"funnel": [1]}', "funnel must be")])
def test_bad_signals_name_the_source_and_field(raw, err):
    with pytest.raises(B.SignalsError, match="file:/s.json") as e:
        B.parse_signals(raw, "file:/s.json", 0)
    assert err in str(e.value)


def test_signals_parse_and_digest():
    s = B.parse_signals(b'{"cash_balance_usd": 5, "funnel": {"signups": 3}}', "file:x", 7.0)
    assert s.cash_balance_usd == 5.0 and s.funnel == {"signups": 3.0} and s.read_at_s == 7.0 and len(s.digest) == 64


@pytest.mark.parametrize("kw,var", [
    ({"max_cost_per_run_usd": -1}, "GIGAFACTORY_MAX_COST_PER_RUN_USD"),
    ({"expected_features_today": 0}, "GIGAFACTORY_EXPECTED_FEATURES_TODAY"),
    ({"budget_runway_floor_months": 12}, "runway_target_months > runway_floor_months"),
    ({"budget_growth_factor_min": 2}, "GROWTH_FACTOR_MIN"),
    ({"budget_signals_timeout_s": 0}, "GIGAFACTORY_BUDGET_SIGNALS_TIMEOUT_S"),
])
def test_bad_budget_settings_are_refused(kw, var):
    with pytest.raises(SettingsError, match=var):
        Settings(**kw).validate()


def test_the_settings_checks_and_the_policy_check_agree():
    with pytest.raises(ValueError, match="expected_features_today"):
        B.Policy(monthly_pipeline_budget_usd=1, expected_features_today=0).check()
    with pytest.raises(ValueError, match="runway"):
        B.Policy(monthly_pipeline_budget_usd=1, runway_floor_months=12).check()
    B.policy_from_settings(Settings()).check()
