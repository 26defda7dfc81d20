"""harness.stats: the intervals and tests of the tables and experiments, against values worked by hand or
published (Newcombe 1998, Table II; McNemar's exact test as a binomial)."""

import math

import pytest

from harness.stats import holm, monotone_violations, paired_test, two_proportion_test, wilson


def test_wilson_matches_published_values():
    lo, hi = wilson(81 / 263, 263)  # Newcombe 1998, example (a) of the single proportion paper: 0.2553-0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson(0.0, 10)[0] == 0.0 and 0.0 < wilson(0.0, 10)[1] < 0.31  # never a zero-width interval at 0
    assert all(math.isnan(x) for x in wilson(0.5, 0))


def test_two_proportion_newcombe_interval():
    c = two_proportion_test(56 / 70, 70, 48 / 80, 80)  # Newcombe 1998 (differences), example (a): 0.0524-0.3339
    assert round(c.lo, 4) == 0.0524 and round(c.hi, 4) == 0.3339
    assert c.significant()
    assert not two_proportion_test(0.5, 20, 0.45, 20).significant()


def test_paired_test_counts_only_discordant_prompts():
    a = [1] * 50 + [0] * 50
    b = [1] * 50 + [0] * 50
    assert paired_test(a, b).p == 1.0 and paired_test(a, b).diff == 0.0
    b2 = [0] * 10 + [1] * 40 + [0] * 50  # a wins 10 discordant pairs, b none: p = 2 / 2^10
    c = paired_test(a, b2)
    assert c.diff == pytest.approx(0.1) and c.p == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="same prompts"):
        paired_test([1, 0], [1])


def test_holm_is_step_down_and_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


def test_monotone_violations_need_more_than_noise():
    n = 200
    # a dip at 0.5 that recovers at 0.75 by 0.3: far beyond noise at n=200
    pts = [(0.25, 0.9, n), (0.5, 0.5, n), (0.75, 0.8, n), (0.9, 0.4, n)]
    v = monotone_violations(pts)
    assert [(x.lo, x.hi) for x in v] == [(0.5, 0.75)] and v[0].diff == pytest.approx(0.3)
    # wiggles of one or two samples are noise, even over a fine grid of 18 ratios
    wiggle = [(r / 20, 0.8 + (0.01 if i % 2 else 0.0), n) for i, r in enumerate(range(2, 20))]
    assert monotone_violations(wiggle) == []
