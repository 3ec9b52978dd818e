"""Claim 4 (higher learning rates): every outcome of its rules on synthetic results, reached through the
claim's own measure → decide → render, with the numbers derived by hand from the synthetic data; its
grid extensions; its "ours | paper" table beside Bjorck et al."""

import json

import pytest

from bnlab.study import claim_lr, sweep
from bnlab.study.report import analyze
from bnlab.study.verdict import INCONCLUSIVE, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED, SUPPORTED, UNDECIDED
from synthetic import LR4, SEEDS, make_profile, make_row, paper_rows, simulate


def _sweep_fake(limit, accuracy):
    """An arm is stable up to ``limit(arm, seed)`` (diverged above) and its validation = test accuracy is
    ``accuracy(arm, seed)`` at its largest stable rate, 5 points less below it."""
    def fake(spec):
        arm, seed, lr = spec["norm"], spec["seed"], spec["lr"]
        if lr > limit(arm, seed) * 1.001:
            return make_row("diverged", val=None, losses=(2.4, 80.0))
        acc = accuracy(arm, seed) - (0.0 if lr >= limit(arm, seed) * 0.999 else 0.05)
        return make_row(val=acc, test=acc)
    return fake


def _claim4(limit, accuracy, **cfg):
    profile = make_profile(lr={**LR4, **cfg})
    results = simulate(profile, [4], _sweep_fake(limit, accuracy))
    return analyze(claim_lr, profile, results), profile, results


def test_claim4_supported_with_the_decades_and_points_of_the_data():
    result, _, _ = _claim4(lambda a, s: {"bn": 1.0, "none": 0.01}.get(a, 0.1),
                           lambda a, s: {"bn": 0.9, "none": 0.5}.get(a, 0.7) + 0.01 * s)
    assert result.verdict.verdict == SUPPORTED and result.agrees_with_literature is True
    assert result.numbers["log10_lr_ratio"]["mean"] == pytest.approx(2.0)   # log10(1.0 / 0.01)
    assert result.numbers["accuracy_gain"]["mean"] == pytest.approx(40.0)   # 90% − 50%, paired by seed


def test_claim4_equivalence_is_not_supported():
    result, _, _ = _claim4(lambda a, s: 0.1, lambda a, s: 0.7 + 0.01 * s)
    assert [p["outcome"] for p in result.numbers["parts"]] == [REFUTED, REFUTED]
    assert result.verdict.verdict == NOT_SUPPORTED and result.agrees_with_literature is False


def test_claim4_partly_when_higher_rates_do_not_give_better_models():
    result, _, _ = _claim4(lambda a, s: {"bn": 1.0, "none": 0.01}.get(a, 0.1), lambda a, s: 0.7 + 0.01 * s)
    assert result.verdict.verdict == PARTLY


def test_claim4_straddle_is_inconclusive_and_says_how_many_seeds():
    bn_limits = {0: 1.0, 1: 0.01, 2: 1.0, 3: 0.01, 4: 1.0, 5: 0.1}  # decades 2, 0, 2, 0, 2, 1: mean 7/6
    result, _, _ = _claim4(lambda a, s: bn_limits[s] if a == "bn" else 0.01,
                           lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s)
    higher = result.numbers["parts"][0]
    assert higher["outcome"] == UNDECIDED and higher["interval"]["mean"] == pytest.approx(7 / 6)
    assert result.verdict.verdict == INCONCLUSIVE
    assert "seeds would decide it" in result.verdict.explanation


def test_claim4_extends_its_grid_until_the_limit_is_interior():
    result, profile, results = _claim4(lambda a, s: {"bn": 10.0}.get(a, 0.01),
                                       lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s)
    lrs, final = sweep.grid(profile, results, 32, "bn")
    assert lrs == [0.01, 0.1, 1.0, 10.0, 100.0] and final  # 10 stable → 100 tried, diverged: interior
    assert result.numbers["log10_lr_ratio"]["mean"] == pytest.approx(3.0)
    assert result.numbers["censoring"] == []
    assert sweep.grid(profile, results, 32, "none")[0] == [0.01, 0.1, 1.0]


def test_claim4_censored_limit_leaves_the_part_undecided():
    # both arms stable at every rate, even after the extensions: neither limit is known
    result, _, _ = _claim4(lambda a, s: 1e9, lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s, max_extensions=1)
    assert result.numbers["parts"][0]["outcome"] == UNDECIDED
    assert "bn:above" in result.numbers["censoring"] and "none:above" in result.numbers["censoring"]
    assert result.verdict.verdict == INCONCLUSIVE


def test_claim4_a_chance_level_run_is_not_stable():
    # none "trains" at every rate (its loss falls below half) but sits at chance above 0.01
    def fake(spec):
        if spec["norm"] == "none" and spec["lr"] > 0.011:
            return make_row(val=0.105, test=0.105)
        return make_row(val=0.8 + 0.01 * spec["seed"], test=0.8)
    profile = make_profile(lr=LR4)
    results = simulate(profile, [4], fake)
    assert sweep.table(profile, results, 32, "none").max_stable_lr == [0.01] * len(SEEDS)
    assert analyze(claim_lr, profile, results).numbers["log10_lr_ratio"]["mean"] == pytest.approx(4.0)


def test_claim4_fewer_than_three_seeds_is_no_verdict():
    profile = make_profile(lr=LR4)
    profile["seeds"] = [0, 1]
    fake = _sweep_fake(lambda a, s: {"bn": 1.0}.get(a, 0.01), lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s)
    result = analyze(claim_lr, profile, simulate(profile, [4], fake))
    assert result.verdict.verdict == NO_VERDICT and result.failed_runs == 0


def test_claim4_failed_runs_give_no_verdict_and_are_counted():
    good = _sweep_fake(lambda a, s: {"bn": 1.0}.get(a, 0.01), lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s)

    def fake(spec):
        if spec["norm"] == "fixup" and spec["lr"] == 1.0:
            return {"status": "failed", "result": {}}
        return good(spec)
    profile = make_profile(lr=LR4)
    result = analyze(claim_lr, profile, simulate(profile, [4], fake))
    assert result.verdict.verdict == NO_VERDICT and result.failed_runs == len(SEEDS)
    assert result.agrees_with_literature is None


def test_every_claim_number_is_json_safe():
    profile = make_profile(lr=LR4)
    profile["seeds"] = [0]  # one seed: NaN intervals everywhere
    fake = _sweep_fake(lambda a, s: 0.1, lambda a, s: 0.5)
    result = analyze(claim_lr, profile, simulate(profile, [4], fake))
    assert result.verdict.verdict == NO_VERDICT
    json.dumps(result.numbers, allow_nan=False)


def test_claim4_paper_table_beside_bjorck():
    result, _, _ = _claim4(lambda a, s: {"bn": 1.0, "none": 0.01}.get(a, 0.1),
                           lambda a, s: {"bn": 0.9, "none": 0.5}.get(a, 0.7) + 0.01 * s)
    rows = paper_rows(result)
    # accuracy 90 + seed (BN) and 50 + seed (none) points: means 92.5 and 52.5 at each arm's limit
    assert rows["test accuracy % with BN, at its rate"][1].startswith("92.5") and \
        rows["test accuracy % with BN, at its rate"][1].endswith("at lr 1")
    none = rows["test accuracy % without normalization, at its best rate"][1]
    assert none.startswith("52.5") and none.endswith("at lr 0.01")  # rates as given, however small
    assert rows["test accuracy % with BN, at its rate"][2].startswith("≈ 93 at lr 0.1")
    decades = rows["log10(rate with BN / rate without), decades"]
    assert decades[1].startswith("2.00") and "largest stable" in decades[3]   # log10(1.0 / 0.01)
