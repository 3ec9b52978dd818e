"""The verdict vocabulary on hand-built effects: every outcome reachable, equivalence included."""

import math

import pytest
from scipy import stats

from bnlab.study.verdict import (HOLDS, INCONCLUSIVE, NO_DATA, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED,
                                 SUPPORTED, UNDECIDED, Part, Rule, Verdict, agrees, combine, paired_effect,
                                 seeds_to_decide, t_interval)

RULE = Rule("faster", "steps saved", threshold=1.0, margin=0.25, unit="points")


def _effect(diffs):
    return paired_effect({i: d for i, d in enumerate(diffs)}, {i: 0.0 for i in range(len(diffs))})


def test_t_interval_matches_textbook_formula():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, low, high = t_interval(values)
    sd = math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) from tables
    assert mean == pytest.approx(3.5) and low == pytest.approx(3.5 - half) and high == pytest.approx(3.5 + half)
    assert t_interval([50.0, 99.0, 100.0], bounds=(0, 100))[2] == 100.0  # clipped to the range
    assert all(math.isnan(v) for v in t_interval([]))


def test_paired_effect_pairs_by_seed_and_drops_missing():
    effect = paired_effect({0: 5.0, 1: 7.0, 2: None, 3: 9.0}, {0: 1.0, 1: 2.0, 2: 3.0, 4: 0.0})
    assert effect.seeds == [0, 1] and effect.values == [4.0, 5.0]


@pytest.mark.parametrize("diffs, outcome", [
    ([2.0, 2.2, 1.9, 2.1], HOLDS),               # clearly above the threshold
    ([0.0, 0.1, -0.1, 0.05], REFUTED),           # equivalence: within the margin → absent
    ([-3.0, -2.8, -3.3, -3.1], REFUTED),         # reversed
    ([0.2, 2.5, -1.0, 1.5], UNDECIDED),          # straddles
    ([2.0, 2.1], NO_DATA),                       # fewer than 3 seeds
])
def test_rule_outcomes(diffs, outcome):
    assert RULE.decide(_effect(diffs)) == outcome


def test_reversed_is_reported_as_such():
    assert Part(RULE, _effect([-3.0, -2.8, -3.3])).reversed
    assert not Part(RULE, _effect([0.0, 0.1, -0.1])).reversed
    assert "reversed" in Part(RULE, _effect([-3.0, -2.8, -3.3])).text()


def test_combine_table():
    assert combine([HOLDS, HOLDS]) == SUPPORTED
    assert combine([HOLDS, REFUTED]) == PARTLY and combine([REFUTED, HOLDS]) == PARTLY
    assert combine([REFUTED, REFUTED]) == NOT_SUPPORTED and combine([REFUTED, UNDECIDED]) == NOT_SUPPORTED
    assert combine([HOLDS, UNDECIDED]) == INCONCLUSIVE and combine([UNDECIDED, UNDECIDED]) == INCONCLUSIVE
    assert combine([HOLDS, NO_DATA]) == NO_VERDICT
    with pytest.raises(ValueError):
        combine([])


def test_agreement_is_strict():
    assert agrees(SUPPORTED, SUPPORTED) is True
    assert agrees(PARTLY, SUPPORTED) is False
    assert agrees(INCONCLUSIVE, NOT_SUPPORTED) is None and agrees(NO_VERDICT, SUPPORTED) is None
    with pytest.raises(ValueError):
        agrees(SUPPORTED, "maybe")


def test_seeds_to_decide_from_the_observed_spread():
    effect = _effect([0.5, 3.5, 1.0, 3.0])           # mean 2, sd ≈ 1.47: undecided at n = 4
    assert RULE.decide(effect) == UNDECIDED
    n = seeds_to_decide(RULE, effect)
    sd = effect.sd
    # an independent check: the returned n is the first whose t half-width clears the gap of 1.0
    assert stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < 1.0
    assert stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) >= 1.0
    assert seeds_to_decide(RULE, _effect([0.2, 0.9, 0.4, 0.8])) is None  # mean between margin and threshold


def test_rule_and_verdict_validation():
    with pytest.raises(ValueError, match="margin"):
        Rule("x", "y", threshold=0.1, margin=0.5)
    with pytest.raises(ValueError, match="verdict"):
        Verdict("maybe", "", None, "")
    v = Verdict.from_parts([Part(RULE, _effect([2.0, 2.2, 1.9])), Part(RULE, _effect([0.0, 0.1, -0.1]))], "k", "e")
    assert v.verdict == PARTLY and v.key_interval.low > 1.0


def test_combine_with_premise():
    from bnlab.study.verdict import (HOLDS, NO_DATA, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED, SUPPORTED,
                                     UNDECIDED, INCONCLUSIVE, combine, combine_with_premise)
    assert combine([REFUTED, HOLDS]) == PARTLY and combine_with_premise([REFUTED, HOLDS]) == NOT_SUPPORTED
    assert combine_with_premise([HOLDS, REFUTED]) == PARTLY
    assert combine_with_premise([REFUTED, UNDECIDED]) == NOT_SUPPORTED
    assert combine_with_premise([HOLDS, HOLDS]) == SUPPORTED
    assert combine_with_premise([UNDECIDED, HOLDS]) == INCONCLUSIVE
    assert combine_with_premise([REFUTED, NO_DATA]) == NO_VERDICT
