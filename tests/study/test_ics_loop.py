"""Claim 1's measuring loop (:mod:`bnlab.study.ics_loop`): noise placement and statistics, clean
re-estimation of BN statistics, and the gradient-ICS measurement against a hand derivation."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.models
from bnlab.models.norms import is_batch_norm
from bnlab.study import metrics
from bnlab.study.ics_loop import NoisyBatchNorm, clean_statistics, gradients_after_earlier_steps, noisy_layers


# ----------------------------------------------------------------------- where the noise goes, and what it is


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


def test_a_run_measures_gradient_ics_at_every_probe_step_on_the_same_checkpoints():
    """One claim-1 run with probe steps: per measurement, per η and layer, the relative change ‖G − G′‖/‖G‖
    and cos(G, G′); at the training step the probe's numbers are the run's own gradient ICS; and whether the
    probe step lowers the batch loss, checked here against the loss recomputed at θ − η·G by hand."""
    from bnlab.study import claim_ics, kinds, runs
    from bnlab.study.profiles import get_profile
    profile = get_profile("tiny")
    spec = claim_ics._spec(profile, "none", profile["ics"]["ics_lr"], 0)
    assert spec["probe_steps"] == [0.01, 0.1]
    status, result = kinds.ICS.run(spec)
    probe = result["ics"]["probe"]
    n = len(result["ics"]["step"])
    assert status == "done" and probe["step"] == result["ics"]["step"] and n >= 2
    assert [len(probe[k]) for k in ("relative", "cosine", "descent", "loss")] == [n] * 4
    assert all(len(m) == 2 and all(len(layer) == len(result["layers"]) for layer in m) for m in probe["relative"])
    at_lr = spec["probe_steps"].index(spec["lr"])
    assert [m[at_lr] for m in probe["cosine"]] == result["ics"]["cosine"]
    assert [m[at_lr] for m in probe["distance"]] == result["ics"]["distance"]
    assert all(0 < r < 10 for m in probe["relative"] for eta in m for r in eta)
    # smaller probe steps move the later layers' gradients less
    assert np.mean([np.mean(m[0]) for m in probe["relative"]]) < np.mean([np.mean(m[1]) for m in probe["relative"]])

    # the descent flag, recomputed: the first measurement (step 0) from the same initial weights and batch
    data = runs.load_data(spec)
    torch.manual_seed(spec["seed"])
    model = runs.build_model(spec, data).train()
    x, y = next(iter(__import__("bnlab.data", fromlist=["Loader"]).Loader(
        data.train_x, data.train_y, spec["batch_size"], shuffle=True, drop_last=True, seed=spec["seed"])))
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for k, eta in enumerate(spec["probe_steps"]):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), grads):
                p -= eta * g
            after = nn.functional.cross_entropy(moved(x), y).item()
        assert probe["descent"][0][k] == (after < loss.item())
    assert probe["loss"][0] == pytest.approx(loss.item())


def _records(result, prefix=""):
    """Every number of an ICS result, by its path."""
    if isinstance(result, dict):
        for key, value in result.items():
            yield from _records(value, f"{prefix}.{key}")
    elif isinstance(result, (list, tuple)):
        for i, value in enumerate(result):
            yield from _records(value, f"{prefix}[{i}]")
    else:
        yield prefix, result


@pytest.mark.parametrize("arm", ["bn", "noisy_bn", "none"])
def test_a_stack_of_ics_runs_records_what_each_run_alone_records(arm):
    """Three seeds of one claim-1 run trained as a stack, the middle one at half the rate: every record (the
    distribution, gradient ICS at each probe step, smoothness, validation curve, final accuracy) has the same
    shape as alone and the same value up to float rounding; the noisy arm draws each member's noise from its
    own generator in the same order as alone."""
    from bnlab.study import get_profile, runs
    from bnlab.study.ics_loop import run_ics, run_ics_stack
    from bnlab.study.plan import count_runs
    profile = get_profile("tiny")
    spec = next(s for c in count_runs(profile, [1]).values() for s in c.own.values()
                if s["kind"] == "ics" and s["arm"].startswith(arm))
    specs = [dict(spec, seed=s, lr=spec["lr"] * (0.5 if s == 1 else 1.0)) for s in (0, 1, 2)]
    data = runs.load_data(spec)
    alone = [run_ics(s, data, runs.build_model) for s in specs]
    stacked = run_ics_stack(specs, data, runs.build_model)
    for i, ((status, one), (status_s, member)) in enumerate(zip(alone, stacked)):
        assert status_s == status and member.pop("stack") == {"members": 3, "index": i}
        mine, theirs = dict(_records(member)), dict(_records(one))
        assert mine.keys() == theirs.keys()
        for path, value in theirs.items():
            if isinstance(value, float) and math.isfinite(value):
                # float32 rounding grows over the steps; values near zero (a BN output's mean) need a floor
                assert math.isclose(mine[path], value, rel_tol=1e-2, abs_tol=1e-3), (arm, i, path)
            elif not isinstance(value, float):
                assert mine[path] == value, (arm, i, path)


def test_a_diverging_ics_member_stops_alone_and_leaves_the_others():
    from bnlab.study import get_profile, runs
    from bnlab.study.ics_loop import run_ics, run_ics_stack
    from bnlab.study.plan import count_runs
    profile = get_profile("tiny")
    spec = next(s for c in count_runs(profile, [1]).values() for s in c.own.values()
                if s["kind"] == "ics" and s["arm"] == "none")
    specs = [dict(spec, seed=s, lr=40.0) for s in range(4)]
    data = runs.load_data(spec)
    alone = [run_ics(s, data, runs.build_model) for s in specs]
    stacked = run_ics_stack(specs, data, runs.build_model)
    assert "diverged" in [s for s, _ in alone], "the test needs a diverging member"
    for (status, one), (status_s, member) in zip(alone, stacked):
        assert status_s == status and len(member["losses"]) == len(one["losses"])
