"""Claim 1 (internal covariate shift): noise placement and statistics, clean re-estimation of BN statistics,
the gradient-ICS measurement, the run design and every verdict outcome from synthetic results."""

import copy
import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pydantic
import pytest
import torch
from torch import nn

import bnlab.models
from bnlab.models.norms import is_batch_norm
from bnlab.study import claim_ics, metrics
from bnlab.study.ics_loop import NoisyBatchNorm, clean_statistics, gradients_after_earlier_steps, noisy_layers
from bnlab.study.specs import spec_key
from bnlab.study.verdict import (HOLDS, INCONCLUSIVE, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED, SUPPORTED,
                                 UNDECIDED)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")  # analyze() draws the report's figures


# --------------------------------------------------------------------------------------------------
# where the noise goes, and what it is
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dims, shape", [("resnet", 2, (4, 3, 8, 8)), ("resnet1d", 1, (4, 1, 40))])
def test_noise_goes_on_each_residual_branch_first_bn_only(name, dims, shape):
    model = bnlab.models.create(name, depth=8 if name == "resnet" else 14, norm="bn", in_channels=shape[1],
                                num_classes=10, width=0.25, fused=False)
    # the oracle, from the architecture: a BasicBlock's branch is conv, BN, ReLU, conv, BN
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    expected = [f"{n}.branch.bn1" for n, _ in blocks]
    assert [n for n, _ in noisy_layers(model)] == expected
    NoisyBatchNorm(model, strength=1.0, seed=0)
    hooked = [n for n, m in model.named_modules() if is_batch_norm(m) and m._forward_hooks]
    assert hooked == expected
    assert not model.stem[1]._forward_hooks                          # the stem feeds the residual stream
    assert all(not b.branch[4]._forward_hooks for _, b in blocks)     # so does each branch's last BN
    model(torch.randn(shape))


def test_noise_placement_needs_a_following_bn():
    model = bnlab.models.create("resnet1d", depth=8, norm="none", in_channels=1, num_classes=10, width=0.25)
    with pytest.raises(ValueError, match="renormalizes"):
        noisy_layers(model)


def _probe(strength=1.0, seed=0):
    """A module whose output the noise hook perturbs, without BN in the way (so the noise is all we see)."""
    layer = nn.Identity()
    return layer, NoisyBatchNorm(nn.Sequential(layer), strength=strength, seed=seed, layers=[layer])


def test_noise_is_per_activation_and_follows_the_drawn_distribution():
    layer, noise = _probe(strength=1.0)
    zeros = torch.zeros(400, 4, 250, dtype=torch.float64)       # y = 0: only the additive part, N(μ, σ²)
    out = layer(zeros)
    mu, sigma, nu, tau = noise.params[id(layer)]
    assert float(out.mean()) == pytest.approx(mu, abs=5 * sigma / math.sqrt(out.numel()) + 1e-9)
    assert float(out.std()) == pytest.approx(sigma, rel=0.02)
    channel = out[:, 0, :]                                      # one channel: differs across samples and positions
    assert float(channel.std(dim=0).min()) > 0 and float(channel.std(dim=1).min()) > 0
    ones = torch.ones(400, 4, 250, dtype=torch.float64)        # y = 1: E = exp(ν + τ²/2) + μ (log-normal scale)
    assert float(layer(ones).mean()) == pytest.approx(math.exp(nu + tau ** 2 / 2) + mu, abs=0.02)


def test_noise_distribution_changes_every_step_and_is_seeded():
    layer, noise = _probe(strength=2.0, seed=3)
    zeros = torch.zeros(200, 4, 100, dtype=torch.float64)
    first_params, first = noise.params[id(layer)], layer(zeros)
    noise.resample()
    second_params, second = noise.params[id(layer)], layer(zeros)
    assert first_params != second_params
    assert abs(float(first.mean()) - float(second.mean())) > 0.05 or \
        abs(float(first.std()) - float(second.std())) > 0.05     # mean or variance moved between steps
    twin_layer, twin = _probe(strength=2.0, seed=3)
    torch.testing.assert_close(twin_layer(zeros), first)        # same seed: the same noise
    other_layer, _ = _probe(strength=2.0, seed=4)
    assert not torch.allclose(other_layer(zeros), first)


def test_noise_only_in_training_mode_and_removable():
    layer, noise = _probe()
    x = torch.randn(8, 4, 5)
    assert not torch.allclose(layer(x), x)
    layer.eval()
    torch.testing.assert_close(layer(x), x)
    layer.train()
    noise.enabled = False
    torch.testing.assert_close(layer(x), x)
    noise.enabled = True
    noise.remove()
    torch.testing.assert_close(layer(x), x)
    with pytest.raises(ValueError, match="strength"):
        NoisyBatchNorm(nn.Sequential(layer), strength=0.0, layers=[layer])


def test_recalibration_removes_the_noise_from_running_statistics():
    torch.manual_seed(0)
    model = bnlab.models.create("resnet1d", depth=8, norm="bn", in_channels=1, num_classes=10, width=0.5,
                                fused=False)
    x, y = torch.randn(96, 1, 40), torch.randint(0, 10, (96,))
    data = SimpleNamespace(train_x=x, train_y=y)
    noise = NoisyBatchNorm(model, strength=2.0, seed=0)
    for _ in range(5):  # noisy training steps pollute the running statistics
        noise.resample()
        model(x[:32])
    bns = {n: m for n, m in model.named_modules() if is_batch_norm(m)}

    # the oracle: each BN layer's input on the whole (clean) training set, float64 mean and unbiased variance
    clean = copy.deepcopy(model)
    for m in clean.modules():
        m._forward_hooks.clear()
    inputs = {}
    for name, m in clean.named_modules():
        if name in bns:
            m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].double()))
    with torch.no_grad():
        clean.train()
        clean(x)
    polluted = {n: m.running_var.clone() for n, m in bns.items()}

    clean_statistics(model, noise, data, batch_size=96, num_batches=1, seed=0)  # one batch: all 96 examples
    for name, m in bns.items():
        var, mean = torch.var_mean(inputs[name], dim=(0, 2), correction=1)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-4, atol=1e-5)
    after_noise = "blocks.1.branch.bn2"  # the BN that renormalizes a noisy layer saw the noise before
    assert not torch.allclose(polluted[after_noise].double(), torch.var_mean(inputs[after_noise], dim=(0, 2))[0],
                              rtol=0.05)
    assert noise.enabled  # training may go on with the noise after an evaluation


def test_gradient_ics_on_a_two_layer_linear_net_matches_the_hand_derivation():
    # f(x) = w2·(w1·x), L = ½(f(x) − y)². Layer 2's G′ is its gradient after layer 1 stepped:
    # w1' = w1 − lr·∂L/∂w1 = w1 − lr·(w2 w1 x − y)·w2 x;  G′ = (w2 w1' x − y)·w1' x.
    w1, w2, x, y, lr = 0.5, 2.0, 3.0, 1.0, 0.1
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(w1)
        model[1].weight.fill_(w2)
    xb, yb = torch.tensor([[x]], dtype=torch.float64), torch.tensor([[y]], dtype=torch.float64)
    loss = 0.5 * ((model(xb) - yb) ** 2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    residual = w2 * w1 * x - y
    assert grads["1.weight"].item() == pytest.approx(residual * w1 * x)
    w1_after = w1 - lr * residual * w2 * x
    expected = (w2 * w1_after * x - y) * w1_after * x

    def mse(model_, params, buffers, xb_, yb_):  # the same loss through functional_call
        from torch.func import functional_call
        return 0.5 * ((functional_call(model_, params, (xb_,)) - yb_) ** 2).sum()

    g_after = gradients_after_earlier_steps(model, xb, yb, grads, lr, "1.weight", loss_fn=mse)
    assert g_after.item() == pytest.approx(expected)
    distance, cosine = metrics.gradient_ics(grads["1.weight"], g_after)
    assert distance == pytest.approx(abs(residual * w1 * x - expected))
    assert cosine == pytest.approx(math.copysign(1.0, residual * w1 * x * expected))
    # the first layer has no earlier layer: G′ = G
    g_first = gradients_after_earlier_steps(model, xb, yb, grads, lr, "0.weight", loss_fn=mse)
    assert g_first.item() == pytest.approx(grads["0.weight"].item())


# --------------------------------------------------------------------------------------------------
# the design: runs, learning rates, profile section
# --------------------------------------------------------------------------------------------------

SEEDS = [0, 1, 2, 3, 4, 5]
PROFILE = {"name": "synthetic", "dataset": "synthetic", "seeds": SEEDS, "width": 0.25, "depth": 8, "val_size": 64,
           "ics": {**claim_ics.PRESETS["tiny"], "lrs": {"bn": [0.1, 0.3], "none": [0.03, 0.1],
                                                        "noisy_bn": [0.1, 0.3]}, "ics_lr": 0.1}}


def test_gradient_ics_is_measured_for_bn_and_none_at_one_common_learning_rate():
    specs = claim_ics.measure(PROFILE)
    measured = [s for s in specs if s["measure_every"] > 0]
    assert {s["arm"] for s in measured} == {"bn", "none"}
    assert {s["lr"] for s in measured} == {0.1}
    for seed in SEEDS:  # paired: each seed has both arms, same lr, same steps and batch size
        pair = [s for s in measured if s["seed"] == seed]
        assert len(pair) == 2 and len({(s["lr"], s["steps"], s["batch_size"]) for s in pair}) == 1
    # every arm runs over its whole grid for every seed; a common lr outside a grid adds its own runs
    assert len(specs) == len(SEEDS) * 2 * 5
    off_grid = copy.deepcopy(PROFILE)
    off_grid["ics"]["ics_lr"] = 0.05
    extra = [s for s in claim_ics.measure(off_grid) if s["lr"] == 0.05]
    assert {s["arm"] for s in extra} == {"bn", "none"} and all(s["measure_every"] > 0 for s in extra)


def test_noisy_arms_share_bn_and_differ_only_in_noise():
    bn, noisy = claim_ics._spec(PROFILE, "bn", 0.1, 0), claim_ics._spec(PROFILE, "noisy_bn:2", 0.1, 0)
    assert noisy["norm"] == "bn" and noisy["noise"] == 2.0 and bn["noise"] == 0.0
    differing = {k for k in bn if bn[k] != noisy[k]}
    assert differing == {"arm", "noise", "measure_every"}


def test_presets_validate_and_bad_sections_are_rejected():
    for name, preset in claim_ics.PRESETS.items():
        claim_ics.Config(**preset)
        assert len(claim_ics.noise_arms(preset["arms"])) >= 3, name
    good = claim_ics.PRESETS["quick"]
    for change, message in [({"arms": ["bn", "none", "noisy_bn:1"]}, "at least 3"),
                            ({"arms": ["bn", "none", "noisy_bn:1", "noisy_bn:2", "groupnorm"]}, "unknown arm"),
                            ({"ics_lr": -0.1}, "positive"),
                            ({"steps": 0}, "greater than or equal to 1"),
                            ({"lrs": {**good["lrs"], "none": [0.1, -1.0]}}, "positive"),
                            ({"speed": 3}, "Extra inputs")]:
        with pytest.raises(pydantic.ValidationError, match=message):
            claim_ics.Config(**{**good, **change})


# --------------------------------------------------------------------------------------------------
# verdicts from synthetic results
# --------------------------------------------------------------------------------------------------

def _run(cos: float, val: float, test: float) -> dict:
    steps = [0, 2, 4]
    ema = [2.3, 1.5, 1.0]
    return {"ics": {"step": steps, "ema_loss": ema, "cosine": [[cos, cos]] * 3, "distance": [[0.1, 0.1]] * 3},
            "smooth": {"step": steps, "ema_loss": ema, "loss_range": [0.1] * 3, "grad_change": [0.1] * 3,
                       "beta": [1.0] * 3},
            "dist": {"step": steps, "p15": [0.0] * 3, "p50": [0.0, 0.1, 0.0], "p85": [1.0] * 3},
            "curve": {"step": [3, 6], "val_acc": [val / 2, val], "val_loss": [1.0, 0.5]},
            "final": {"val_acc": val, "test_acc": test, "chance": 0.25}, "layers": ["a.weight", "b.weight"]}


def _results(cos: dict, test: dict, cost_by_seed=None, val_bonus=None, failed=()) -> dict:
    """Every run of PROFILE: cos[arm] (BN and none, at ics_lr), test accuracy test[arm] (fraction) with a small
    per-seed wiggle; noisy arms' accuracy is BN's minus ``cost_by_seed[seed]`` points when given. Validation
    accuracy equals test accuracy plus ``val_bonus[(arm, lr)]``."""
    results = {}
    for spec in claim_ics.measure(PROFILE):
        arm, lr, seed = spec["arm"], spec["lr"], spec["seed"]
        acc = test.get("noisy" if arm.startswith("noisy") else arm, test["bn"]) + 0.001 * seed
        if cost_by_seed is not None and arm.startswith("noisy"):
            acc = test["bn"] + 0.001 * seed - cost_by_seed[seed] / 100
        val = acc + (val_bonus or {}).get((arm, lr), 0.0)
        status = "failed" if (arm, lr, seed) in failed else "done"
        results[spec_key(spec)] = {"status": status, "result": _run(cos.get(arm, 0.0) + 0.002 * seed, val, acc)
                                   if status == "done" else {}}
    return results


def test_supported_when_bn_lowers_ics_and_noise_costs_accuracy():
    result = claim_ics.analyze(PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8, "noisy": 0.85}))
    assert [p.outcome for p in result.verdict.parts] == [HOLDS, HOLDS]
    assert result.verdict.verdict == SUPPORTED and result.agrees_with_literature is False
    assert result.verdict.parts[0].effect.interval.mean == pytest.approx(0.4)
    assert result.verdict.parts[1].effect.interval.mean == pytest.approx(10.0)


def test_not_supported_through_equivalence():
    # BN's cosine equals none's within 0.01 and the noise costs 0.3 points: both effects absent
    result = claim_ics.analyze(PROFILE, _results({"bn": 0.7, "none": 0.695}, {"bn": 0.95, "none": 0.8},
                                                 cost_by_seed=[0.3, 0.2, 0.4, 0.3, 0.25, 0.35]))
    assert [p.outcome for p in result.verdict.parts] == [REFUTED, REFUTED]
    assert not result.verdict.parts[0].reversed
    assert result.verdict.verdict == NOT_SUPPORTED and result.agrees_with_literature is True


def test_partly_supported_and_inconclusive():
    partly = claim_ics.analyze(PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8},
                                                 cost_by_seed=[0.1] * 6))
    assert partly.verdict.verdict == PARTLY
    # the cost straddles the threshold: mean 2.5, spread over seeds from −1 to 6 points
    straddle = claim_ics.analyze(PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8},
                                                   cost_by_seed=[-1.0, 6.0, 0.5, 4.5, 1.0, 4.0]))
    assert [p.outcome for p in straddle.verdict.parts] == [HOLDS, UNDECIDED]
    assert straddle.verdict.verdict == INCONCLUSIVE and straddle.agrees_with_literature is None
    assert "injected shift costs accuracy is undecided" in straddle.verdict.explanation


def test_a_failed_run_means_no_verdict():
    results = _results({"bn": 0.7, "none": 0.695}, {"bn": 0.95, "none": 0.8}, cost_by_seed=[0.3] * 6,
                       failed={("noisy_bn:2", 0.3, 4)})
    result = claim_ics.analyze(PROFILE, results)
    assert result.failed_runs == 1 and result.verdict.verdict == NO_VERDICT
    assert result.agrees_with_literature is None and "failed" in result.verdict.explanation


def test_learning_rates_are_chosen_on_validation_and_reported_on_test():
    # BN at lr 0.3 is better on validation (+5 points) while test accuracy is the same at both rates:
    # the choice must be 0.3, and the noisy arm at 0.1 wins its validation by 3 points
    bonus = {("bn", 0.3): 0.05, ("noisy_bn:1", 0.1): 0.03}
    parts, facts = claim_ics.decide(PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8,
                                                                                 "noisy": 0.9}, val_bonus=bonus))
    assert facts["chosen_lr"]["bn"] == 0.3 and facts["chosen_lr"]["noisy_bn:1"] == 0.1
    assert facts["rule_arm"] == "noisy_bn:1"  # the middle of strengths 0.5, 1, 2
    assert facts["test_acc"]["bn"][0] == pytest.approx(95.0)  # test accuracy, not the validation number


def test_loss_levels_come_from_bn_and_none_only():
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8, "noisy": 0.85})
    result = claim_ics.analyze(PROFILE, results)
    # all BN/none runs start at 2.3 and bottom out at 1.0: three levels between, whatever the noisy arms did
    assert result.numbers["loss_levels"] == pytest.approx(list(np.linspace(2.3, 1.0, 4)[1:]))


def test_the_report_says_when_bn_is_still_rising_at_the_end():
    """Part 2 compares accuracy after the budget; when BN's validation accuracy still rises by more than the
    part's margin over the last third, the explanation says the comparison is not at convergence."""
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8, "noisy": 0.9})
    rising = claim_ics.analyze(PROFILE, results).verdict.explanation  # _run's curve doubles: val/2 → val
    assert "still rising" in rising and "not at convergence" in rising
    for row in results.values():
        if row["status"] == "done":
            curve = row["result"]["curve"]
            curve["val_acc"] = [curve["val_acc"][-1] - 0.005 * i for i in (1, 0)]  # +0.5 points: a plateau
    flat = claim_ics.analyze(PROFILE, results).verdict.explanation
    assert "Convergence: BN's validation accuracy changed by" in flat and "still rising" not in flat
