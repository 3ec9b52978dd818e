"""Each claim's verdict on synthetic results: every outcome a rule can give, reached through the claim's own
measure → decide → render, with the numbers derived by hand from the synthetic data."""

import math

import matplotlib.pyplot as plt
import pytest

from bnlab.study import claim_lr, claim_regularize, claim_residual, claim_speed, get_profile
from bnlab.study.claims import collect_specs
from bnlab.study.verdict import (HOLDS, INCONCLUSIVE, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED, SUPPORTED,
                                 UNDECIDED)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")  # render() draws the report's figures; nothing here shows them


SEEDS = [0, 1, 2, 3, 4, 5]


def _profile(**sections):
    profile = get_profile("tiny")
    profile["seeds"] = list(SEEDS)
    for name, values in sections.items():
        profile[name].update(values)
    return profile


def _row(status="done", val=0.5, test=None, train=None, losses=(2.4, 1.6, 0.8, 0.4), curve=None, chance=0.1,
         steps=None, **extra):
    result = {"losses": list(losses), "initial_loss": losses[0], "chance": chance, "steps": steps or len(losses),
              "final": {"val_acc": val, "test_acc": val if test is None else test, "train_acc": train},
              "curve": curve or {"step": [len(losses)], "val_acc": [val], "seconds": [0.0]}, **extra}
    return {"status": status, "result": result}


def _simulate(profile, claims, fake):
    """Run the collect → run rounds of the runner with ``fake(spec) -> row`` instead of training."""
    results = {}
    while True:
        specs = collect_specs(profile, claims, results)
        new = {k: s for k, s in specs.items() if k not in results}
        if not new:
            return results
        for key, spec in new.items():
            results[key] = fake(spec)


# ---------------------------------------------------------------------------------------------- claim 4

LR4 = {"lrs": [0.01, 0.1, 1.0], "batch_sizes": [32], "max_extensions": 2}


def _sweep_fake(limit, accuracy):
    """An arm is stable up to ``limit(arm, seed)`` (diverged above) and its validation = test accuracy is
    ``accuracy(arm, seed)`` at its largest stable rate, 5 points less below it."""
    def fake(spec):
        arm, seed, lr = spec["norm"], spec["seed"], spec["lr"]
        if lr > limit(arm, seed) * 1.001:
            return _row("diverged", val=None, losses=(2.4, 80.0))
        acc = accuracy(arm, seed) - (0.0 if lr >= limit(arm, seed) * 0.999 else 0.05)
        return _row(val=acc, test=acc)
    return fake


def _claim4(limit, accuracy, **cfg):
    profile = _profile(lr={**LR4, **cfg})
    results = _simulate(profile, [4], _sweep_fake(limit, accuracy))
    return claim_lr.analyze(profile, results), profile, results


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
    lrs, final = claim_lr.grid(profile, results, 32, "bn")
    assert lrs == [0.01, 0.1, 1.0, 10.0, 100.0] and final  # 10 stable → 100 tried, diverged: interior
    assert result.numbers["log10_lr_ratio"]["mean"] == pytest.approx(3.0)
    assert result.numbers["censoring"] == []
    assert claim_lr.grid(profile, results, 32, "none")[0] == [0.01, 0.1, 1.0]


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
            return _row(val=0.105, test=0.105)
        return _row(val=0.8 + 0.01 * spec["seed"], test=0.8)
    profile = _profile(lr=LR4)
    results = _simulate(profile, [4], fake)
    assert claim_lr.sweep_table(profile, results, 32, "none")["max_stable_lr"] == [0.01] * len(SEEDS)
    assert claim_lr.analyze(profile, results).numbers["log10_lr_ratio"]["mean"] == pytest.approx(4.0)
    # BN is stable everywhere: its grid is extended twice (to 10, 100), so it is 100 vs none's 0.01


def test_claim4_fewer_than_three_seeds_is_no_verdict():
    profile = _profile(lr=LR4)
    profile["seeds"] = [0, 1]
    fake = _sweep_fake(lambda a, s: {"bn": 1.0}.get(a, 0.01), lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s)
    result = claim_lr.analyze(profile, _simulate(profile, [4], fake))
    assert result.verdict.verdict == NO_VERDICT and result.failed_runs == 0


def test_claim4_failed_runs_give_no_verdict_and_are_counted():
    good = _sweep_fake(lambda a, s: {"bn": 1.0}.get(a, 0.01), lambda a, s: {"bn": 0.9}.get(a, 0.5) + 0.01 * s)

    def fake(spec):
        if spec["norm"] == "fixup" and spec["lr"] == 1.0:
            return {"status": "failed", "result": {}}
        return good(spec)
    profile = _profile(lr=LR4)
    result = claim_lr.analyze(profile, _simulate(profile, [4], fake))
    assert result.verdict.verdict == NO_VERDICT and result.failed_runs == len(SEEDS)
    assert result.agrees_with_literature is None


# ---------------------------------------------------------------------------------------------- claim 2

def _speed_fake(speed, loss_level):
    """Sweep runs: validation accuracy peaks at lr 0.1 for every arm. Speed runs (constant schedule): the
    validation curve climbs linearly to 0.8 at step ``speed(arm, seed)``; the training loss sits at
    ``loss_level(arm)``."""
    def fake(spec):
        if spec.get("schedule") != "constant":
            acc = 0.8 if spec["lr"] == 0.1 else 0.6
            return _row(val=acc, test=acc)
        k = speed(spec["norm"], spec["seed"])
        steps = list(range(1, 41))
        curve = {"step": steps, "val_acc": [0.8 * min(1.0, s / k) for s in steps], "seconds": [0.0] * 40}
        level = loss_level(spec["norm"])
        return _row(val=0.8, losses=[2.4] + [level] * 39, curve=curve, steps=40)
    return fake


def _claim2(speed, loss_level=lambda a: 1.0):
    profile = _profile(lr=LR4, speed={"target_fraction": 0.97})
    results = _simulate(profile, [2], _speed_fake(speed, loss_level))
    return claim_speed.analyze(profile, results), profile, results


def test_claim2_supported_and_recovery_fractions():
    # target = 0.97 × 0.8: reached at step ceil(0.97 k) = k for k in {2, 4, 8}
    result, profile, results = _claim2(lambda a, s: {"bn": 2, "none": 8, "skipinit": 4}.get(a, 8),
                                       lambda a: {"bn": 0.5}.get(a, 1.0))
    assert result.verdict.verdict == SUPPORTED
    assert result.numbers["log10_speedup"]["mean"] == pytest.approx(math.log10(4))
    assert result.numbers["recovery"]["skipinit"]["mean"] == pytest.approx(0.5)  # log(8/4) / log(8/2)
    assert result.numbers["recovery"]["fixup"]["mean"] == pytest.approx(0.0)
    # the longer runs are at each arm's validated rate (0.1), with a constant schedule
    speed_runs = [s for s in collect_specs(profile, [2], results).values() if s.get("schedule") == "constant"]
    assert len(speed_runs) == 4 * len(SEEDS) and {s["lr"] for s in speed_runs} == {0.1}


def test_claim2_steps_down_when_an_arm_diverges_at_a_constant_rate():
    base = _speed_fake(lambda a, s: {"bn": 2}.get(a, 8), lambda a: {"bn": 0.5}.get(a, 1.0))

    def fake(spec):
        if spec.get("schedule") == "constant" and spec["norm"] == "fixup" and spec["lr"] == 0.1 and spec["seed"] == 3:
            return _row("diverged", val=None, losses=(2.4, 90.0))
        return base(spec)
    profile = _profile(lr=LR4, speed={"target_fraction": 0.97})
    results = _simulate(profile, [2], fake)
    assert claim_speed._rates(profile, results, "fixup") == [0.1, 0.01]
    assert claim_speed._rates(profile, results, "bn") == [0.1]
    result = claim_speed.analyze(profile, results)
    assert result.tables[0]["rows"][3][:2] == ["Fixup", "0.01"]
    assert result.verdict.verdict == SUPPORTED


def test_claim2_equivalence_is_not_supported():
    result, _, _ = _claim2(lambda a, s: 8)
    assert result.verdict.verdict == NOT_SUPPORTED


def test_claim2_partly_when_faster_but_the_loss_is_no_lower():
    result, _, _ = _claim2(lambda a, s: {"bn": 2}.get(a, 8))
    assert [p["outcome"] for p in result.numbers["parts"]] == [HOLDS, REFUTED]
    assert result.verdict.verdict == PARTLY


def test_claim2_straddle_is_inconclusive():
    bn = {0: 2, 1: 8, 2: 3, 3: 8, 4: 2, 5: 9}
    result, _, _ = _claim2(lambda a, s: bn[s] if a == "bn" else 8, lambda a: {"bn": 0.5}.get(a, 1.0))
    assert result.numbers["parts"][0]["outcome"] == UNDECIDED
    assert result.verdict.verdict == INCONCLUSIVE


# ---------------------------------------------------------------------------------------------- claim 3

def _reg_fake(gap, train=lambda a, s: 1.0, status=lambda a, s: "done"):
    """Every arm fits (training accuracy ``train``); its test = validation accuracy is ``gap`` points lower
    (plus a per-seed jitter of 0.1 point), at every learning rate."""
    def fake(spec):
        arm = "none+wd" if spec["norm"] == "none" and spec["weight_decay"] > 0 else spec["norm"]
        tr = train(arm, spec["seed"])
        test = tr - gap(arm, spec["seed"]) / 100 - 0.001 * spec["seed"]
        return _row(status(arm, spec["seed"]), val=test, test=test, train=tr,
                    weight_norm={"initial": 10.0, "final": 8.0 if arm == "none+wd" else 12.0})
    return fake


def _claim3(gap, **kw):
    profile = _profile(regularize={"fit_threshold": 99.0})
    return claim_regularize.analyze(profile, _simulate(profile, [3], _reg_fake(gap, **kw)))


def test_claim3_supported_with_the_gap_reduction_of_the_data():
    gaps = {"none": 20, "bn": 10, "ghost:4": 5, "ghost:16": 8, "groupnorm": 12, "none+wd": 15}
    result = _claim3(lambda a, s: gaps[a])
    assert result.verdict.verdict == SUPPORTED
    assert result.numbers["gap_reduction"]["mean"] == pytest.approx(10.0)
    assert result.numbers["noise_effect"]["mean"] == pytest.approx(5.0)
    assert result.numbers["groupnorm_reduction"]["mean"] == pytest.approx(8.0)
    table = {row[0]: row for row in result.tables[0]["rows"]}
    assert table["no norm + weight decay"][5].startswith("-20.0")  # 10 → 8: the weights shrank by 20%


def test_claim3_equivalence_is_not_supported_and_disagrees_with_the_literature():
    result = _claim3(lambda a, s: 10)
    assert result.verdict.verdict == NOT_SUPPORTED and result.agrees_with_literature is False


def test_claim3_partly_when_bn_helps_but_batch_noise_does_not():
    result = _claim3(lambda a, s: {"none": 20}.get(a, 10))
    assert result.verdict.verdict == PARTLY


def test_claim3_straddle_is_inconclusive():
    jitter = {0: 0, 1: 4, 2: -2, 3: 3, 4: -1, 5: 2}
    result = _claim3(lambda a, s: {"none": 11 + jitter[s], "ghost:4": 5}.get(a, 10))
    assert result.numbers["parts"][0]["outcome"] == UNDECIDED and result.verdict.verdict == INCONCLUSIVE


def test_claim3_excludes_and_counts_diverged_and_unfitted_runs():
    gaps = {"none": 20, "bn": 10, "ghost:4": 5}
    result = _claim3(lambda a, s: gaps.get(a, 10), train=lambda a, s: 0.9 if a == "none" and s < 2 else 1.0,
                     status=lambda a, s: "diverged" if a == "bn" and s == 5 else "done")
    assert result.numbers["excluded"]["none"] == {"diverged": 0, "unfit": 2}
    assert result.numbers["excluded"]["bn"] == {"diverged": 1, "unfit": 0}
    assert result.numbers["parts"][0]["n"] == 3  # seeds 2, 3, 4: both runs fitted and finished
    # with three seeds unfitted, the part has too few pairs: no verdict
    result = _claim3(lambda a, s: gaps.get(a, 10), train=lambda a, s: 0.9 if a == "none" and s < 4 else 1.0)
    assert result.verdict.verdict == NO_VERDICT


# ---------------------------------------------------------------------------------------------- claim 5

def _res_fake(acc, exponent):
    """Train runs: test = validation accuracy ``acc[(norm, plain)]`` at lr 0.1 (5 points less elsewhere),
    at every depth; signal runs: Var(branch)/Var(skip) at block ℓ is ℓ^exponent(norm)."""
    def fake(spec):
        if spec["kind"] == "signal":
            blocks = [{"ratio": (i + 1) ** exponent(spec["norm"]), "stream_var": 1.0, "stream_sq_mean": 0.1}
                      for i in range((spec["depth"] - 2) // 2)]
            return {"status": "done", "result": {"blocks": blocks, "grad_norms": [1.0, 1.0, 1.0]}}
        a = acc[(spec["norm"], bool(spec.get("plain")))] + 0.002 * spec["seed"] - (0 if spec["lr"] == 0.1 else 0.05)
        return _row(val=a, test=a)
    return fake


def _claim5(acc, exponent):
    profile = _profile(residual={"lrs": [0.01, 0.1, 1.0]})
    return claim_residual.analyze(profile, _simulate(profile, [5], _res_fake(acc, exponent)))


COMPLEMENT = {("bn", False): 0.9, ("none", False): 0.6, ("bn", True): 0.6, ("none", True): 0.55}
ADDITIVE = {("bn", False): 0.9, ("none", False): 0.7, ("bn", True): 0.7, ("none", True): 0.5}


def test_claim5_supported_by_the_interaction_and_the_exponents():
    result = _claim5(COMPLEMENT, lambda n: -1.0 if n == "bn" else 0.0)
    assert result.verdict.verdict == SUPPORTED
    assert result.numbers["interaction"]["mean"] == pytest.approx(25.0)   # (90 − 60) − (60 − 55)
    assert result.numbers["exponent_gap"]["mean"] == pytest.approx(1.0)   # 0 − (−1)


def test_claim5_main_effects_without_interaction_are_not_supported():
    result = _claim5(ADDITIVE, lambda n: 0.0)
    assert result.numbers["interaction"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert result.verdict.verdict == NOT_SUPPORTED


def test_claim5_partly_when_the_mechanism_is_absent():
    result = _claim5(COMPLEMENT, lambda n: 0.0)
    assert result.verdict.verdict == PARTLY


def test_claim5_straddle_is_inconclusive():
    def exponent_by_seed(n):
        return -0.4 if n == "bn" else 0.0  # gap 0.4: between margin 0.2 and threshold 0.5, zero spread
    result = _claim5(COMPLEMENT, exponent_by_seed)
    assert result.numbers["parts"][1]["outcome"] == UNDECIDED and result.verdict.verdict == INCONCLUSIVE


def test_every_claim_number_is_json_safe():
    import json
    profile = _profile(lr=LR4)
    profile["seeds"] = [0]  # one seed: NaN intervals everywhere
    fake = _sweep_fake(lambda a, s: 0.1, lambda a, s: 0.5)
    result = claim_lr.analyze(profile, _simulate(profile, [4], fake))
    assert result.verdict.verdict == NO_VERDICT
    json.dumps(result.numbers, allow_nan=False)


# ------------------------------------------------------------------------------ tuning seeds (claims 1, 3, 5)

def test_rates_are_chosen_on_the_tuning_seeds_and_the_other_seeds_run_only_the_chosen_rate():
    # validation prefers lr 0.2 on the tuning seeds 0-1 and lr 0.05 on every other seed: the choice is
    # made on seeds 0-1 only, and seeds 2-5 never run the other rate
    profile = _profile(regularize={"fit_threshold": 99.0, "lrs": [0.05, 0.2]})
    profile["tune_seeds"] = 2

    def fake(spec):
        better = (spec["lr"] == 0.2) == (spec["seed"] < 2)
        acc = 0.7 if better else 0.6
        return _row(val=acc, test=acc, train=1.0, weight_norm={"initial": 1.0, "final": 1.0})
    first = collect_specs(profile, [3], {})
    assert {s["seed"] for s in first.values()} == {0, 1}  # round 1: the tuning seeds over the whole grid
    results = _simulate(profile, [3], fake)
    runs = [s for s in results.values() if s["status"] == "done"]
    specs = collect_specs(profile, [3], results).values()
    assert len(runs) == len(specs) == len(claim_regularize.arms(profile)) * (2 * 2 + 4)
    assert {(s["lr"], s["seed"]) for s in specs if s["seed"] >= 2} == {(0.2, s) for s in range(2, 6)}
    result = claim_regularize.analyze(profile, results)
    assert {row[1] for row in result.tables[0]["rows"]} == {"0.200"}
    assert "seeds 0, 1, which ran every rate" in result.caveats[0] and "other 4 seeds" in result.caveats[0]


def test_claim3_chooses_among_the_rates_at_which_the_arm_fits():
    # without normalization lr 0.2 validates better but leaves seed 1 at 90% training accuracy; lr 0.05
    # fits every tuning seed, so it is chosen and no seed is excluded
    profile = _profile(regularize={"fit_threshold": 99.0, "lrs": [0.05, 0.2]})
    profile["tune_seeds"] = 2

    def fake(spec):
        unfit = spec["norm"] == "none" and spec["lr"] == 0.2 and spec["seed"] == 1
        acc = 0.7 if spec["lr"] == 0.2 else 0.6
        return _row(val=acc, test=acc, train=0.9 if unfit else 1.0, weight_norm={"initial": 1.0, "final": 1.0})
    results = _simulate(profile, [3], fake)
    per_arm = claim_regularize.decide(profile, results)[1]["arms"]
    assert per_arm["none"]["lr"] == 0.05 and per_arm["none"]["unfit"] == 0 and len(per_arm["none"]["gap"]) == 6
    assert per_arm["bn"]["lr"] == 0.2


def test_claim2_target_comes_from_the_unnormalized_plateau_run_and_a_censored_arm_counts_its_budget():
    profile = _profile(lr=LR4, speed={"epochs": 2, "plateau_epochs": 6, "target_fraction": 0.9,
                                      "warmup_fraction": 0.1})
    none_spec, bn_spec = (claim_speed._spec(profile, a, 0.1, 0) for a in ("none", "bn"))
    assert (none_spec["epochs"], bn_spec["epochs"]) == (6, 2)
    # the same warm-up steps in both: 10% of the 2 epochs every arm runs
    assert none_spec["warmup_fraction"] * 6 == pytest.approx(0.2)
    assert bn_spec["warmup_fraction"] * 2 == pytest.approx(0.2)

    def fake(spec):
        if spec.get("schedule") != "constant":
            acc = 0.8 if spec["lr"] == 0.1 else 0.6
            return _row(val=acc, test=acc)
        n = 60 if spec["epochs"] == 6 else 20  # the plateau run is 3× longer
        steps = list(range(1, n + 1))
        if spec["norm"] == "none":  # climbs to 0.8 at step 40, then stays
            accs = [0.8 * min(1.0, s / 40) for s in steps]
        elif spec["norm"] == "bn" and spec["seed"] == 0:  # reaches 0.72 at step 45: not within its 20 steps
            accs = [0.8 * min(1.0, s / 50) for s in steps]
        elif spec["norm"] == "bn" and spec["seed"] == 1:  # never reaches 0.72, even when run longer
            accs = [0.5] * n
        else:
            accs = [0.8 * min(1.0, s / 10) for s in steps]
        return _row(val=accs[-1], losses=[2.4] + [1.0] * (n - 1), steps=n,
                    curve={"step": steps, "val_acc": accs, "seconds": [0.0] * n})
    results = _simulate(profile, [2], fake)
    parts, facts = claim_speed.decide(profile, results)
    assert facts["targets"] == pytest.approx([0.72] * 6)  # 0.9 × the plateau 0.8
    assert facts["steps"]["none"] == [36.0] * 6  # 0.8 × 36/40 = 0.72
    # seeds 0 and 1 had not reached the target after 2 epochs: both ran again for the plateau's 6 epochs;
    # seed 0 then reached it at step 45, seed 1 never did and counts the plateau run's 60 steps
    assert facts["extended"]["bn"] == [0, 1] and facts["extended"]["skipinit"] == []
    longer = [s for s in results.values() if s["status"] == "done" and s["result"]["steps"] == 60]
    assert len(longer) == 6 + 2  # none's six plateau runs and BN's two longer ones
    assert facts["steps"]["bn"] == [45.0, 60.0] + [9.0] * 4
    assert facts["censored"]["bn"] == 1 and facts["common_steps"] == 20  # never, even run longer
    assert parts[0].effect.values[1] == pytest.approx(math.log10(36 / 60))  # counts against BN
