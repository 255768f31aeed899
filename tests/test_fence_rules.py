"""The pure rules behind `gigafactory fence`: the minimum lease it demands, and the lease it can
be sure is left after a renewal it sent some time ago."""

from __future__ import annotations

import pytest

from gigafactory.schemas.protocol import FENCE_MIN_REMAINING_SHARE, fence_min_remaining_s, fence_remaining_s


def test_default_minimum_is_a_share_of_the_ttl_and_an_explicit_one_wins():
    assert fence_min_remaining_s(15.0, None) == 15.0 * FENCE_MIN_REMAINING_SHARE
    assert fence_min_remaining_s(15.0, 0.0) == 0.0
    assert fence_min_remaining_s(15.0, 14.5) == 14.5


@pytest.mark.parametrize("ttl_s, want_s, named", [
    (15.0, 15.0, "--min-remaining-s"),   # the whole TTL can never be left: time passes after the write
    (15.0, 20.0, "--min-remaining-s"),
    (15.0, -1.0, "--min-remaining-s"),
    (15.0, float("nan"), "--min-remaining-s"),
    (0.0, None, "--lease-ttl-s"),
    (-3.0, 1.0, "--lease-ttl-s"),
])
def test_a_minimum_that_cannot_be_met_or_a_bad_ttl_is_refused_naming_the_option(ttl_s, want_s, named):
    with pytest.raises(ValueError, match=named):
        fence_min_remaining_s(ttl_s, want_s)


def test_remaining_lease_counts_from_when_the_write_was_sent():
    assert fence_remaining_s(15.0, 0.25) == 14.75
    assert fence_remaining_s(2.0, 2.5) == -0.5  # renewed, but the lease may be gone already
    with pytest.raises(AssertionError):
        fence_remaining_s(2.0, -0.1)
