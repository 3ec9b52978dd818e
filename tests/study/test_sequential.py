"""The sequential design: its intervals, its checks, and its error rates under optional stopping by simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from bnlab.study.sequential import (Design, every_look, false_decision_rate, of_profile, part_look, repeated_95,
                                    simulate, single, t_interval_at)


def test_design_checks_its_looks_and_its_budget():
    with pytest.raises(ValueError, match="one alpha per look"):
        Design((6, 10), (0.05,))
    with pytest.raises(ValueError, match="increasing"):
        Design((10, 6), (0.02, 0.03))
    with pytest.raises(ValueError, match="more than the 0.05 budget"):
        Design((6, 10), (0.05, 0.05))


def test_design_levels_and_next_look():
    d = Design((6, 10, 14), (0.01, 0.015, 0.025))
    assert [d.look(n) for n in (3, 6, 9, 10, 14, 20)] == [0, 0, 0, 1, 2, 2]
    assert d.confidence(6) == pytest.approx(0.99) and d.confidence(12) == pytest.approx(0.985)
    assert [d.next_seeds(n) for n in (6, 10, 14)] == [10, 14, 14]
    assert single(6).confidence(6) == pytest.approx(0.95)


def test_the_interval_is_students_t():
    values = [0.3, 1.1, -0.2, 0.8, 0.5]
    mean, low, high = t_interval_at(values, 0.98)
    x = np.array(values)
    expected = stats.t.interval(0.98, df=4, loc=x.mean(), scale=x.std(ddof=1) / math.sqrt(5))
    assert mean == pytest.approx(x.mean()) and (low, high) == pytest.approx(expected)


def test_one_look_holds_falsely_at_the_nominal_rate():
    # a true effect exactly at the threshold: the interval's low end exceeds it in 2.5% of studies
    r = simulate(single(6), threshold=1.0, margin=0.3, effect=1.0, studies=40_000, seed=3)
    assert 0.022 < r["holds"] < 0.028        # 2.5% ± 3 Monte-Carlo standard errors


@pytest.mark.parametrize("noise", ["normal", "t3"])
def test_split_budget_keeps_false_decisions_under_five_percent_with_optional_stopping(noise):
    design = Design((6, 10, 14), (0.015, 0.015, 0.02))
    r = false_decision_rate(design, threshold=1.0, margin=0.3, noise=noise, studies=20_000, seed=11)
    assert r["false_holds"] <= 0.025 + 0.003 and r["false_refuted"] <= 0.025 + 0.003
    assert r["false_decision"] <= 0.05


def test_recomputing_a_95_percent_interval_at_every_look_is_caught():
    """The simulation can fail: four looks that each use a fresh 95% interval hold falsely far more than 2.5%."""
    r = false_decision_rate(repeated_95((6, 10, 14, 18)), threshold=1.0, margin=0.3, studies=20_000, seed=5)
    assert r["false_holds"] > 0.045


def test_a_clear_effect_stops_at_the_first_look():
    design = Design((6, 10), (0.02, 0.03))
    r = simulate(design, threshold=1.0, margin=0.3, effect=4.0, sd=1.0, studies=4_000, seed=2)
    assert r["holds"] > 0.99 and r["mean_seeds"] < 6.1
    near = simulate(design, threshold=1.0, margin=0.3, effect=2.0, sd=1.0, studies=4_000, seed=2)
    assert 6 < near["mean_seeds"] < 10 and near["holds"] > r["holds"] - 0.5   # some need the second look


def test_power_against_the_noncentral_t():
    """One look at n normal seeds: the chance the 95% interval's low end clears the threshold, for a true
    effect δ above it, is P(T > t₀.₉₇₅) with T noncentral t (n − 1 degrees of freedom, noncentrality
    (δ − threshold)·√n/sd) — checked against the simulation to 1 point."""
    from bnlab.study.sequential import power
    n, sd, delta = 10, 1.0, 1.8
    got = power(single(n), threshold=1.0, margin=0.3, effect=delta, sd=sd, studies=40_000, seed=9)["power"]
    t = stats.t.ppf(0.975, n - 1)
    expected = stats.nct.sf(t, n - 1, (delta - 1.0) * math.sqrt(n) / sd)   # the exact noncentral-t answer
    assert got == pytest.approx(expected, abs=0.01)
    between = power(single(n), threshold=1.0, margin=0.3, effect=0.6, sd=sd, studies=4_000)
    assert between["power"] == pytest.approx(between["undecided"])


def test_looks_reached_and_the_profile_or_section_design():
    d = Design((10, 20, 40), (0.01, 0.01, 0.03))
    assert d.reached(20) == [(10, 0.01), (20, 0.01)] and d.reached(45) == d.reached(40)
    assert d.reached(4) == [(4, 0.01)]   # fewer seeds than the first look: that count, at the first alpha
    profile = {"seeds": list(range(40)), "looks": [6, 10], "look_alphas": [0.02, 0.03],
               "regularize": {"looks": [10, 20, 40], "look_alphas": [0.01, 0.01, 0.03]}, "speed": {}}
    assert of_profile(profile, "regularize") == d
    assert of_profile(profile, "speed") == Design((6, 10), (0.02, 0.03)) == of_profile(profile)
    assert of_profile({"seeds": [0, 1, 2]}, "regularize") == single(3)


def test_a_part_stops_at_the_first_look_that_decides_it_or_waits_for_its_runs():
    d = Design((10, 20, 40), (0.01, 0.01, 0.03))
    asked = []

    def judge(outcomes):
        def at(n, level):
            asked.append((n, round(level, 4)))
            return outcomes[n]
        return at

    # undecided at 10, decided at 20: judged at 20 (at 99%) even when 40 seeds have run; 40 is never looked at
    assert part_look(d, 40, judge({10: False, 20: True, 40: False})) == (20, pytest.approx(0.99))
    assert asked == [(10, 0.99), (20, 0.99)]
    # undecided everywhere: the last look reached, at its level
    assert part_look(d, 40, judge({10: False, 20: False, 40: False})) == (40, pytest.approx(0.97))
    assert part_look(d, 20, judge({10: False, 20: False})) == (20, pytest.approx(0.99))
    # a look whose runs have not all finished (None) is where the part stands
    assert part_look(d, 40, judge({10: None, 20: True, 40: True})) == (10, pytest.approx(0.99))
    # counting the most runs: every part at the current look, nothing judged
    asked.clear()
    with every_look():
        assert part_look(d, 40, judge({10: True, 20: True, 40: True})) == (40, pytest.approx(0.97))
    assert asked == []
