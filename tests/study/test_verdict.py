"""The verdict vocabulary on hand-built effects: every outcome reachable, equivalence included."""

import math

import numpy as np
import pytest
from scipy import stats

from bnlab.study.verdict import (HOLDS, INCONCLUSIVE, NO_DATA, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED,
                                 SUPPORTED, UNDECIDED, Part, Rule, Verdict, across, agrees, combine, paired_effect,
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


# ---------------------------------------------------------------- a part claimed at every setting of a knob


def test_across_holds_only_when_it_holds_at_every_setting():
    clear, straddle = _effect([2.0, 2.2, 1.9, 2.1]), _effect([0.2, 2.5, -1.0, 1.5])
    decided = across(RULE, [clear, clear])
    assert (decided.outcome, decided.index, decided.level) == (HOLDS, 1, 0.95)
    assert across(RULE, [clear, straddle]).outcome == UNDECIDED


def test_across_refutes_on_one_setting_at_the_bonferroni_level():
    # mean 0, sd 0.219 over 6 seeds: the 95% interval (±0.23) lies inside the margin 0.25, the 97.5% one
    # (two settings: 1 − 0.05/2) does not (±0.32)
    near = [-0.2, 0.2] * 3
    sd, n = stats.tstd(near), len(near)
    assert stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < RULE.margin < stats.t.ppf(1 - 0.025 / 2, n - 1) * sd / math.sqrt(n)
    straddle = _effect([0.2, 2.5, -1.0, 1.5])
    assert RULE.decide(_effect(near)) == REFUTED                       # alone, at 95%
    assert across(RULE, [_effect(near), straddle]).outcome == UNDECIDED  # one of two settings: 97.5%
    far = [0.0, 0.05, -0.05, 0.02, -0.02, 0.01]
    decided = across(RULE, [_effect(far), straddle])
    assert (decided.outcome, decided.index, decided.level) == (REFUTED, 0, 0.975)
    half = stats.t.ppf(1 - 0.025 / 2, n - 1) * stats.tstd(far) / math.sqrt(n)
    assert decided.effect.interval.high == pytest.approx(sum(far) / n + half)
    assert across(RULE, [_effect([5.0] * 2), _effect(far)]).level == 0.95  # a setting without data does not count


def test_across_holding_at_one_setting_and_refuted_at_another_is_undecided():
    decided = across(RULE, [_effect([2.0, 2.2, 1.9, 2.1]), _effect([0.0, 0.05, -0.05, 0.02])])
    assert decided.outcome == UNDECIDED and decided.changes
    assert across(RULE, [_effect([2.0, 2.1])]).outcome == NO_DATA


def _simulated_outcomes(effect: float, naive: bool, studies: int = 3000, settings: int = 4, seeds: int = 6,
                        rho: float = 0.5) -> dict:
    """How often ``across`` (or a plain 95% interval at each setting, ``naive``) ends holding or refuted, for
    a true effect equal at every setting; per-seed noise correlated ``rho`` between settings."""
    rng = np.random.default_rng(1)
    cov = np.full((settings, settings), rho) + (1 - rho) * np.eye(settings)
    counts = {HOLDS: 0, REFUTED: 0, UNDECIDED: 0}
    for _ in range(studies):
        draws = effect + rng.multivariate_normal(np.zeros(settings), cov, size=seeds)
        effects = [_effect(list(draws[:, k])) for k in range(settings)]
        if naive:
            outcomes = [RULE.decide(e) for e in effects]
            outcome = (HOLDS if all(o == HOLDS for o in outcomes) else
                       REFUTED if REFUTED in outcomes and HOLDS not in outcomes else UNDECIDED)
        else:
            outcome = across(RULE, effects).outcome
        counts[outcome] += 1
    return {k: v / studies for k, v in counts.items()}


def test_across_keeps_the_false_decision_rate_of_one_interval_in_simulation():
    """The true effect at the margin at all four settings: a "refuted" is false. A 95% interval at each
    setting refutes falsely in about 6% of studies; the Bonferroni level keeps it within 2.5% (plus the
    simulation's error, ±0.6% at 3000 studies). At the threshold a "holds" is false: every setting must hold,
    so it stays within 2.5% without adjustment."""
    at_margin = _simulated_outcomes(RULE.margin, naive=False)
    assert at_margin[REFUTED] <= 0.031
    assert _simulated_outcomes(RULE.margin, naive=True)[REFUTED] > 0.04
    assert _simulated_outcomes(RULE.threshold, naive=False)[HOLDS] <= 0.031
