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


def test_a_verdict_names_where_a_run_is_better_and_where_worse_with_the_figures():
    from potstill.metrics import verdict

    kd = {"teacher_kl": 1.79, "top1_agreement": 0.412, "perplexity": 20.1, "own_distinct_2": 0.8}
    ce = {"teacher_kl": 2.22, "top1_agreement": 0.38, "perplexity": 18.3}
    assert verdict("the KD student", kd, "the CE baseline", ce) == (
        "the KD student is better than the CE baseline on held-out teacher KL (1.790 vs 2.220) "
        "and top-1 agreement (41.2% vs 38.0%) but worse on perplexity (20.10 vs 18.30)"
    )  # distinct-2: only one side has it
    assert verdict("the CE baseline", ce, "the KD student", kd).startswith(
        "the CE baseline is better than the KD student on perplexity (18.30 vs 20.10) but worse "
        "on held-out teacher KL (2.220 vs 1.790)"
    )
    same = verdict("a", {"teacher_kl": 1.0, "perplexity": 3.0}, "b", {"teacher_kl": 1.0004,
                   "perplexity": 2.0})  # fmt: skip
    assert (
        same
        == "a is worse than b on perplexity (3.00 vs 2.00) and level on held-out teacher KL (1.000 vs 1.000)"
    )
    assert verdict("a", {"perplexity": math.nan}, "b", {"perplexity": 2.0}) == (
        "a and b share no held-out metric"
    )


def test_a_verdict_names_more_than_two_ties_without_figures():
    from potstill.metrics import verdict

    a = {"teacher_kl": 1.0, "top1_agreement": 0.5, "perplexity": 3.0, "bits_per_byte": 1.0}
    b = {"teacher_kl": 2.0, "top1_agreement": 0.5, "perplexity": 3.0, "bits_per_byte": 1.0}
    assert verdict("a", a, "b", b) == (
        "a is better than b on held-out teacher KL (1.000 vs 2.000) and level on top-1 "
        "agreement, perplexity and bits per byte"
    )
