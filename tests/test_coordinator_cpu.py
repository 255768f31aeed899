"""The coordinator's CPU per job: work it did once per job (or per queued job and pass) that
depends only on what rarely changes is done once. Each test checks the result is still the
same (the negative space too: a wrong key or signature is still refused)."""

from __future__ import annotations

import dataclasses

from gigafactory import identity
from gigafactory.economics import budget as B


def test_a_signature_check_decodes_each_holder_key_once_and_still_refuses_what_it_must():
    identity.verify_key.cache_clear()
    seed, public = identity.new_keypair()
    other_seed, other_public = identity.new_keypair()
    data = b"gigafactory-holder-write\njob\n1\nassigned\nabc"
    sig = identity.sign(seed, data)
    for _ in range(5):
        assert identity.verify(public, data, sig)
    assert identity.verify_key.cache_info().misses == 1  # decoded once for five checks
    assert not identity.verify(public, data + b"x", sig)  # content changed
    assert not identity.verify(other_public, data, sig)  # another holder's key
    assert not identity.verify(public, data, identity.sign(other_seed, data))  # signed by another
    assert not identity.verify(public[:-1] + ("A" if public[-1] != "A" else "B"), data, sig)  # CRC fails
    assert not identity.verify("N" + public[1:], data, sig)  # not a user key
    assert not identity.verify("not a key", data, sig)
    assert identity.verify_key("not a key") is None


def test_a_budgets_computation_id_is_computed_once_and_names_its_inputs():
    p = B.Policy(monthly_pipeline_budget_usd=3000, days_per_month=30)
    s = B.Signals(cash_balance_usd=300_000, monthly_burn_usd=40_000)
    budget = B.compute(s, p)
    cid = budget.computation_id
    assert budget.__dict__.get("computation_id") == cid  # kept on the (frozen) budget
    d1 = B.decide(budget, projected_usd=0.1, projection="t", spent_today_usd=0.0, enforcement=True)
    assert d1.computation_id == cid and cid in d1.reason
    # Another budget from other inputs has another id; the same inputs give the same id.
    other = B.compute(dataclasses.replace(s, cash_balance_usd=1_000), p)
    assert other.computation_id != cid
    assert B.compute(s, p).computation_id == cid
