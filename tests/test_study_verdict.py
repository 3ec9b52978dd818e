"""Verdict rules on synthetic results: each rule must be able to give each of the three verdicts."""

import math

import matplotlib.pyplot as plt
import pytest

from bnlab.study import claim_lr, claim_speed
from bnlab.study.specs import spec_key
from bnlab.study.verdict import CAVEATS, NOT_SUPPORTED, SUPPORTED, Interval, Verdict, clears, combine

@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")  # analyze() draws the report's figures; nothing here shows them


PROFILE = {"name": "synthetic", "dataset": "synthetic", "seeds": [0, 1, 2], "width": 0.25, "depth": 8,
           "eval_every": 1, "lr": {"arms": ["bn", "none", "skipinit", "fixup"], "lrs": [0.01, 0.1, 1.0],
                                   "batch_sizes": [32], "max_steps": 10}}


def test_clears_and_combine():
    assert clears(Interval(2.0, 1.5, 2.5), 1.0) is True
    assert clears(Interval(0.5, 0.2, 0.9), 1.0) is False
    assert clears(Interval(1.0, 0.5, 1.5), 1.0) is None
    assert clears(Interval(math.nan, math.nan, math.nan), 0.0) is None
    assert combine(True, True) == SUPPORTED
    assert combine(True, False) == CAVEATS
    assert combine(True, None) == CAVEATS
    assert combine(None, True) == CAVEATS
    assert combine(False, True) == NOT_SUPPORTED
    assert combine(None, False) == NOT_SUPPORTED
    with pytest.raises(ValueError, match="verdict"):
        Verdict("maybe", "", Interval(0, 0, 0), "")


def _row(status, losses, accs, steps=None):
    steps = steps or list(range(1, len(accs) + 1))
    return {"status": status, "result": {"losses": losses, "initial_loss": losses[0] if losses else None,
                                         "chance": 0.1, "curve": {"step": steps, "test_acc": accs,
                                                                  "seconds": [0.1 * s for s in steps]}}}


def _sweep(stable_up_to: dict, accuracy: dict, curve_speed: dict = None) -> dict:
    """Synthetic claim-4 results: each arm is stable up to its lr, with final accuracy accuracy[arm] (plus
    a little seed jitter) at its best (lowest unstable-free) rate; curve_speed[arm] = steps to its plateau."""
    results = {}
    cfg = PROFILE["lr"]
    for arm in cfg["arms"]:
        for lr in cfg["lrs"]:
            for seed in PROFILE["seeds"]:
                spec = claim_lr.sweep_spec(PROFILE, arm, lr, cfg["batch_sizes"][0], seed)
                if lr > stable_up_to[arm]:
                    row = _row("diverged", [2.3, 50.0, float("nan")], [0.1])
                else:
                    final = accuracy[arm] + 0.01 * seed - (0.05 if lr < stable_up_to[arm] else 0.0)
                    speed = (curve_speed or {}).get(arm, 5)
                    accs = [min(final, final * step / speed) for step in range(1, 11)]
                    losses = [2.3 - 0.1 * step / speed * 10 for step in range(10)]
                    row = _row("done", losses, accs)
                results[spec_key(spec)] = row
    return results


def test_claim_lr_supported_when_bn_is_stable_higher_and_better():
    results = _sweep({"bn": 1.0, "none": 0.01, "skipinit": 0.1, "fixup": 0.1},
                     {"bn": 0.9, "none": 0.5, "skipinit": 0.7, "fixup": 0.7})
    result = claim_lr.analyze(PROFILE, results)
    assert result.verdict.verdict == SUPPORTED
    assert result.verdict.key_interval.mean == pytest.approx(2.0)  # 1.0 / 0.01: two decades


def test_claim_lr_caveats_when_higher_rates_do_not_give_better_models():
    results = _sweep({"bn": 1.0, "none": 0.01, "skipinit": 0.1, "fixup": 0.1},
                     {"bn": 0.6, "none": 0.6, "skipinit": 0.6, "fixup": 0.6})
    result = claim_lr.analyze(PROFILE, results)
    assert result.verdict.verdict == CAVEATS
    assert result.numbers["half_a"] is True and result.numbers["half_b"] is False


def test_claim_lr_not_supported_when_bn_allows_no_higher_rate():
    results = _sweep({"bn": 0.1, "none": 0.1, "skipinit": 0.1, "fixup": 0.1},
                     {"bn": 0.9, "none": 0.5, "skipinit": 0.5, "fixup": 0.5})
    assert claim_lr.analyze(PROFILE, results).verdict.verdict == NOT_SUPPORTED


def test_claim_speed_verdicts_follow_the_speedup():
    stable = {"bn": 1.0, "none": 1.0, "skipinit": 1.0, "fixup": 1.0}
    accuracy = {"bn": 0.8, "none": 0.8, "skipinit": 0.8, "fixup": 0.8}
    fast = claim_speed.analyze(PROFILE, _sweep(stable, accuracy, {"bn": 2, "none": 8}))
    assert fast.verdict.verdict == SUPPORTED
    assert fast.verdict.key_interval.mean == pytest.approx(4.0, rel=0.3)
    same = claim_speed.analyze(PROFILE, _sweep(stable, accuracy, {"bn": 8, "none": 8}))
    assert same.verdict.verdict == NOT_SUPPORTED
    # fewer steps to the target, but the loss curve is no lower overall → caveats
    mixed = _sweep(stable, accuracy, {"bn": 2, "none": 8})
    for key, row in mixed.items():
        row["result"]["losses"] = [2.0] * 10
    assert claim_speed.analyze(PROFILE, mixed).verdict.verdict == CAVEATS


REG_PROFILE = {"name": "synthetic", "dataset": "synthetic", "seeds": [0, 1, 2], "width": 0.25, "depth": 8,
               "eval_every": 1, "regularize": {"dataset": None, "subset": 100, "batch_size": 32,
                                               "ghost_sizes": [8, 32], "max_steps": 4, "lr": 0.1,
                                               "weight_decay": 5e-4, "freeze_after": 2}}


def _regularize_results(gaps: dict, slow: tuple = ()) -> dict:
    """Every arm follows the same training curve except the ``slow`` ones (which only get half-way);
    test accuracy sits ``gaps[arm]`` below training accuracy."""
    from bnlab.study import claim_regularize
    results = {}
    for key, norm, wd in claim_regularize.arms(REG_PROFILE):
        for seed in REG_PROFILE["seeds"]:
            train_loss = [2.0, 1.5, 1.0, 0.5] if key not in slow else [2.0, 1.8, 1.6, 1.5]
            train_acc = [0.3, 0.5, 0.7, 0.9] if key not in slow else [0.3, 0.35, 0.4, 0.5]
            test_acc = [a - gaps.get(key, 0.1) - 0.001 * seed for a in train_acc]
            curve = {"step": [1, 2, 3, 4], "train_loss": train_loss, "train_acc": train_acc,
                     "test_acc": test_acc, "test_loss": [v + 0.1 for v in train_loss], "seconds": [0, 0, 0, 0]}
            spec = claim_regularize._spec(REG_PROFILE, norm, wd, seed)
            results[spec_key(spec)] = {"status": "done", "result": {"curve": curve, "losses": train_loss}}
    return results


def test_claim_regularize_verdicts():
    from bnlab.study import claim_regularize
    supported = claim_regularize.analyze(REG_PROFILE, _regularize_results(
        {"none": 0.2, "ghost:32": 0.1, "ghost:8": 0.05}))
    assert supported.verdict.verdict == SUPPORTED
    assert supported.verdict.key_interval.mean == pytest.approx(10.0)  # points
    caveats = claim_regularize.analyze(REG_PROFILE, _regularize_results(
        {"none": 0.2, "ghost:32": 0.1, "ghost:8": 0.15}))
    assert caveats.verdict.verdict == CAVEATS
    none = claim_regularize.analyze(REG_PROFILE, _regularize_results({"none": 0.1, "ghost:32": 0.1}))
    assert none.verdict.verdict == NOT_SUPPORTED


def test_claim_regularize_compares_at_the_loss_both_arms_reach():
    from bnlab.study import claim_regularize
    # "none" fits slowly (lowest loss 1.5): BN must be judged where it, too, had loss ≤ 1.5 — its second
    # evaluation (accuracy 0.5, gap 0.1) — not at its end
    result = claim_regularize.analyze(REG_PROFILE, _regularize_results(
        {"none": 0.2, "ghost:32": 0.1, "ghost:8": 0.05}, slow=("none",)))
    assert result.numbers["gap_reduction"]["mean"] == pytest.approx(10.0)
    table = {row[0]: row for row in result.tables[0]["rows"]}
    assert table["no norm (He init)"][1].startswith("1.500")


RES_PROFILE = {"name": "synthetic", "dataset": "synthetic", "seeds": [0, 1, 2], "width": 0.25, "depth": 8,
               "eval_every": 1, "lr": {"arms": ["bn", "none", "skipinit", "fixup"], "lrs": [0.1],
                                       "batch_sizes": [32], "max_steps": 4},
               "residual": {"signal_depths": [8, 14], "train_depths": [8, 14], "signal_batch": 16, "lrs": [0.1]}}


def _residual_results(accuracy: dict, bn_exponent: float) -> dict:
    """accuracy[(norm, plain)] at every depth; BN's branch/skip ratio ∝ ℓ^bn_exponent, the others' flat."""
    from bnlab.study import claim_residual
    cfg = RES_PROFILE["residual"]
    results = {}
    for norm, plain in claim_residual.ARMS:
        for seed in RES_PROFILE["seeds"]:
            for depth in cfg["signal_depths"]:
                n_blocks = (depth - 2) // 2
                exponent = bn_exponent if norm == "bn" and not plain else 0.0
                blocks = [{"stream_sq_mean": 0.01, "stream_var": 1.0, "branch_var": 1.0,
                           "ratio": None if plain else (i + 1) ** exponent} for i in range(n_blocks)]
                spec = claim_residual._signal_spec(RES_PROFILE, depth, norm, plain, seed)
                results[spec_key(spec)] = {"status": "done", "result": {"blocks": blocks, "grad_norms": [1.0, 1.0]}}
            for depth in cfg["train_depths"]:
                for lr in cfg["lrs"]:
                    acc = accuracy[(norm, plain)] + 0.001 * seed
                    spec = claim_residual._train_spec(RES_PROFILE, depth, norm, plain, lr, seed)
                    results[spec_key(spec)] = _row("done", [2.3, 1.0], [acc])
    return results


def test_claim_residual_verdicts():
    from bnlab.study import claim_residual
    base = {("bn", False): 0.9, ("bn", True): 0.6, ("none", False): 0.5, ("none", True): 0.2,
            ("skipinit", False): 0.85, ("fixup", False): 0.85}
    supported = claim_residual.analyze(RES_PROFILE, _residual_results(base, -1.0))
    assert supported.verdict.verdict == SUPPORTED
    assert supported.verdict.key_interval.mean == pytest.approx(30.0)  # 90% − 60% (BN-plain)
    assert supported.numbers["bn_ratio_exponent"]["mean"] == pytest.approx(-1.0)
    flat = claim_residual.analyze(RES_PROFILE, _residual_results(base, 0.0))
    assert flat.verdict.verdict == CAVEATS  # it trains better, but not through identity-biased blocks
    no_gain = claim_residual.analyze(RES_PROFILE, _residual_results({**base, ("bn", True): 0.9}, -1.0))
    assert no_gain.verdict.verdict == NOT_SUPPORTED
