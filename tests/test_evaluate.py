"""The diversity of a student's own samples (potstill.evaluate): distinct-n over all samples and
repetition within each, on crafted sample sets whose values are known."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from potstill.evaluate import distinct_n, repetition

COLLAPSED = [[5, 6] * 10, [6, 5] * 10]  # a student stuck on one token pair ("ededed…")
VARIED = [list(range(0, 20)), list(range(20, 40))]  # no token twice


def test_a_collapsed_student_scores_low_diversity_and_high_repetition():
    # 2 × 19 pairs, two distinct ones; per sample 17 4-grams, two distinct ones
    assert distinct_n(COLLAPSED, 2) == 2 / 38
    assert repetition(COLLAPSED, 4) == 1 - 2 / 17
    assert distinct_n(VARIED, 2) == 1.0 and repetition(VARIED, 4) == 0.0


def test_a_student_that_always_says_the_same_shows_in_distinct_not_in_repetition():
    same = [VARIED[0], VARIED[0]]
    assert distinct_n(same, 2) == 0.5 and repetition(same, 4) == 0.0


def test_samples_too_short_to_hold_an_ngram_give_nan_not_a_score():
    assert math.isnan(distinct_n([[1], []], 2)) and math.isnan(repetition([[1, 2, 3]], 4))
    # a short sample among long ones does not count towards repetition
    assert repetition([[1, 2, 3], [1, 2, 3, 4, 1, 2, 3, 4]], 4) == 1 - 4 / 5


samples = st.lists(st.lists(st.integers(0, 5), min_size=4, max_size=30), min_size=1, max_size=6)


@given(samples)
def test_both_are_shares_and_order_free(drawn):
    d, r = distinct_n(drawn, 2), repetition(drawn, 4)
    assert 0 < d <= 1 and 0 <= r < 1
    assert distinct_n(drawn[::-1], 2) == d and repetition(drawn[::-1], 4) == r
    # repeating the whole set never adds a distinct pair
    assert distinct_n(drawn * 2, 2) <= d
