"""Key and job-id naming (schemas/names.py): injective KV keys, ids that do not collide."""

from __future__ import annotations

import random
import re

import pytest

from gigafactory.schemas import names

KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")
"""What NATS accepts as a KV key."""


def test_safe_key_gives_two_texts_that_used_to_share_a_key_two_keys():
    assert names.safe_key("x/y") != names.safe_key("x_2fy")
    assert names.safe_key("a.b") != names.safe_key("a_2eb")
    # The old variable-width unicode escape made U+41B and "A" + "b" ambiguous as well.
    assert names.safe_key("\u041b") != names.safe_key("\u0041b")


def test_safe_key_is_reversible_and_always_a_valid_kv_key():
    rng = random.Random(8)
    alphabet = "ab_-=./ :*>x2f\u00e9\u65e5\U0001f600"
    texts = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20_000)}
    keys = {names.safe_key(t) for t in texts}

    assert len(keys) == len(texts), "two different texts share a key"
    for t in texts:
        k = names.safe_key(t)
        assert KV_KEY.fullmatch(k) and not k.startswith(".") and "." not in k, k
        assert names.unsafe_key(k) == t


def test_safe_key_keeps_plain_names_readable():
    assert names.safe_key("nightly-build") == "nightly-build"
    assert names.safe_key("team/web login") == "team_2fweb_20login"


def test_fresh_job_ids_of_one_file_name_do_not_collide_and_stay_readable():
    ids = [names.new_job_id("lt-0") for _ in range(100_000)]

    assert len(set(ids)) == len(ids)
    for job in ids[:1000]:
        assert names.is_job_id(job) and job.startswith("lt-0-")
        assert len(job) == len("lt-0-") + names.JOB_ID_SUFFIX_CHARS


def test_a_long_or_odd_stem_still_makes_a_valid_job_id():
    for hint in ("x" * 200, "Ünïcödé only", "...", "a.b/c d", ""):
        job = names.new_job_id(hint)
        assert names.is_job_id(job) and len(job) <= names.JOB_ID_MAX_CHARS, job


def test_a_derived_job_id_is_the_same_for_one_identity_and_differs_across_namespaces():
    a = names.derived_job_id("nightly", "idempotency-key", "nightly")

    assert a == names.derived_job_id("nightly", "idempotency-key", "nightly")
    assert a != names.derived_job_id("nightly", "inbox", "nightly")
    assert a != names.derived_job_id("nightly", "idempotency-key", "nightly ")
    assert names.is_job_id(a) and a.startswith("nightly-")


@pytest.mark.parametrize("text", ["abc\n", "a.b", "-abc", "ABC", "a" * 65, ""])
def test_is_job_id_refuses_what_cannot_be_a_job_id(text):
    assert not names.is_job_id(text)
