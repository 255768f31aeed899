"""Capability grammar: what a job requires and what a factory offers (schemas/capabilities.py)."""

from __future__ import annotations

import re

import pytest

from gigafactory.schemas.capabilities import (
    CapabilityError,
    Offers,
    Requirement,
    canonical,
    matches,
    parse_offer,
    parse_requirement,
    parse_version,
    pool_id,
)

LINUX_BOX = ["os:linux", "arch:x86_64", "has:git", "node:20.11.1", "python:3.11.7", "gpu"]


# --- presence and exact values ---------------------------------------------------------------


def test_a_bare_key_requires_presence_with_or_without_a_value():
    assert matches(["gpu"], LINUX_BOX)
    assert matches(["has"], LINUX_BOX)  # offered as has:git
    assert not matches(["docker"], LINUX_BOX)


def test_key_value_requires_exactly_that_value():
    assert matches(["os:linux", "has:git"], LINUX_BOX)
    assert not matches(["os:mac"], LINUX_BOX)
    assert not matches(["has:docker"], LINUX_BOX)
    assert not matches(["node:20"], LINUX_BOX)  # ':' is an exact value, not a version match


def test_os_any_matches_every_factory_even_one_that_names_no_os():
    assert matches(["os:any"], LINUX_BOX)
    assert matches(["os:any"], ["gpu"])
    assert matches(["os:any"], [])


def test_keys_and_values_are_case_insensitive():
    assert matches(["OS:Linux", " has:GIT "], ["os:LINUX", "Has:Git"])


def test_no_requirements_match_every_factory():
    assert matches([], [])
    assert matches([], LINUX_BOX)


# --- versions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requirement", "offered", "expected"),
    [
        ("node>=20", "node:20.11.1", True),
        ("node>=20", "node:19.9.0", False),
        ("node>=20.11.1", "node:20.11.1", True),
        ("node>20", "node:20.11.1", True),  # 20.11.1 > 20.0.0
        ("node>20.11.1", "node:20.11.1", False),
        ("node=20", "node:20.11.1", True),  # '=' compares only the components given
        ("node=20.11", "node:20.11.1", True),
        ("node=20.1", "node:20.11.1", False),
        ("node=21", "node:20.11.1", False),
        ("node<=20.11.1", "node:20.11.1", True),
        ("node<=20", "node:20.11.1", False),  # 20.11.1 > 20.0.0
        ("node<21", "node:20.11.1", True),
        ("node<20", "node:20.11.1", False),
        ("python>=3.11", "python:v3.11.7+local", True),
    ],
)
def test_version_operators_compare_as_versions(requirement, offered, expected):
    assert matches([requirement], [offered]) is expected


def test_node_20_or_later_matches_node_20_11_1():
    assert matches(["node>=20"], LINUX_BOX)
    assert not matches(["node>=21"], LINUX_BOX)


def test_values_that_are_not_versions_are_ignored_for_comparisons():
    assert matches(["node>=20"], ["node:lts", "node:20.1"])  # 'lts' is skipped, 20.1 counts
    assert not matches(["node>=20"], ["node:lts"])
    assert not matches(["node>=1"], ["node"])  # presence alone offers no version


def test_a_version_comparison_needs_the_key_offered():
    assert not matches(["ruby>=3"], LINUX_BOX)


def test_parse_version_reads_leading_numeric_components():
    assert parse_version("20.11.1") == (20, 11, 1)
    assert parse_version("v3.11.7+local") == (3, 11, 7)
    assert parse_version("lts") is None


# --- invalid tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["", "   ", "node >= 20", "os:", ":linux", "-node", "node>=", "node=>20", "node>=lts", "a b", "ñ"]
)
def test_invalid_requirement_tokens_are_refused(token):
    with pytest.raises(CapabilityError, match=re.escape(repr(token))):
        parse_requirement(token)


def test_a_requirement_that_is_not_text_is_refused():
    with pytest.raises(CapabilityError, match="must be a string"):
        parse_requirement(20)  # type: ignore[arg-type]


def test_a_factory_cannot_offer_a_comparison():
    with pytest.raises(CapabilityError, match="must be 'key' or 'key:value'"):
        Offers(["node>=20"])
    assert parse_offer("Node:20.11.1") == ("node", "20.11.1")


def test_one_string_instead_of_a_list_is_a_programmer_error():
    with pytest.raises(TypeError, match="not one string"):
        matches("node>=20", LINUX_BOX)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one string"):
        Offers("gpu")


def test_parse_requirement_returns_key_operator_and_value():
    assert parse_requirement("Node>=20") == Requirement("node", ">=", "20")
    assert parse_requirement("os:mac") == Requirement("os", ":", "mac")
    assert parse_requirement("gpu") == Requirement("gpu", None, None)
    assert str(parse_requirement(" Node>=20 ")) == "node>=20"


# --- canonical form and pools ----------------------------------------------------------------


def test_canonical_form_is_sorted_deduplicated_lower_case_without_os_any():
    assert canonical(["os:linux", "Has:Git", "os:any", "has:git", "node>=20"]) == ("has:git", "node>=20", "os:linux")
    assert canonical([]) == ()
    assert canonical(["os:any"]) == ()


def test_pool_id_is_stable_and_ignores_order_case_and_duplicates():
    a = pool_id(["os:linux", "has:git", "node>=20"])
    b = pool_id(["NODE>=20", "has:git", "os:linux", "has:git", "os:any"])

    assert a == b
    assert re.fullmatch(r"[a-z0-9]{16}", a)
    assert pool_id(["os:linux", "has:git"]) != a


def test_pool_id_does_not_change_between_runs():
    # Pools name durable consumers on the broker: the id of a requirement set must not drift.
    import hashlib

    expected = hashlib.sha256("has:git\nnode>=20\nos:linux".encode()).hexdigest()[:16]
    assert pool_id(["os:linux", "has:git", "node>=20"]) == expected


def test_a_job_without_requirements_is_in_the_any_pool():
    assert pool_id([]) == "any"
    assert pool_id(["os:any"]) == "any"


# --- Offers.missing --------------------------------------------------------------------------


def test_offers_missing_lists_exactly_the_unmet_tokens_in_order():
    offers = Offers(LINUX_BOX)

    assert offers.missing(["os:linux", "os:mac", "node>=20", "node>=22", "gpu", "docker"]) == [
        "os:mac",
        "node>=22",
        "docker",
    ]
    assert offers.missing(["os:linux", "node>=20"]) == []
    assert offers.missing([parse_requirement("has:svn")]) == ["has:svn"]


def test_offers_normalizes_the_offered_tokens():
    assert Offers(["OS:Linux", "gpu", "gpu"]).tokens == frozenset({"os:linux", "gpu"})


def test_matches_accepts_a_prebuilt_offers_index():
    offers = Offers(LINUX_BOX)

    assert matches(["has:git"], offers)
    assert not matches(["has:svn"], offers)


def test_missing_answers_the_same_from_its_cache_and_a_caller_cannot_change_it():
    o = Offers(["os:linux", "node:20"])

    first = o.missing(["os:mac", "node>=18"])
    first.append("scribbled")

    assert o.missing(["os:mac", "node>=18"]) == ["os:mac"]
    assert o.missing(["os:linux"]) == []
    with pytest.raises(CapabilityError):
        o.missing([{"not": "a token"}])
