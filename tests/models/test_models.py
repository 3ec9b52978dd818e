"""Residual networks: sizes against the papers, the block contract, plain twins, Fixup/SkipInit at init."""

import math

import pytest
import torch
from torch import nn

import bnlab.nn.fused
from bnlab import models
from bnlab.models.resnet import Bottleneck


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# He et al. 2016 (https://arxiv.org/abs/1512.03385), Table 6: parameters of the CIFAR-10 ResNets, in millions
@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_counts_match_he_et_al(depth, millions):
    count = n_params(models.create(f"resnet{depth}", in_channels=3, num_classes=10))
    decimals = 1 if millions >= 1 else 2  # the table rounds 1.7M to one decimal
    assert round(count / 1e6, decimals) == millions


# torchvision's published totals for the ImageNet models (1000 classes, 7x7 stem, 3 input channels)
_TORCHVISION = {18: (11_689_512, 512), 34: (21_797_672, 512), 50: (25_557_032, 2048)}


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_imagenet_layout_parameter_counts_match_torchvision(depth):
    total, features = _TORCHVISION[depth]
    # our stem is 3x3 instead of 7x7 (64 filters over 3 channels) and the head has 10 classes, not 1000
    expected = total - (7 * 7 - 3 * 3) * 3 * 64 - (features + 1) * (1000 - 10)
    assert n_params(models.create(f"resnet{depth}")) == expected
    imagenet_stem = models.create(f"resnet{depth}", stem="imagenet", num_classes=1000)
    assert n_params(imagenet_stem) == total


@pytest.mark.parametrize("name,shape", [("resnet8", (2, 1, 28, 28)), ("resnet14", (2, 3, 32, 32)),
                                        ("preact_resnet20", (2, 1, 28, 28)), ("resnet18", (2, 3, 32, 32)),
                                        ("resnet50", (2, 1, 28, 28)), ("preact_resnet18", (2, 3, 28, 28)),
                                        ("resnet1d", (2, 1, 40)), ("airbench", (2, 1, 28, 28)),
                                        ("airbench", (2, 3, 32, 32))])
def test_output_shapes_for_any_channels_and_classes(name, shape):
    model = models.create(name, in_channels=shape[1], num_classes=7, width=0.25)
    assert model(torch.randn(shape)).shape == (shape[0], 7)


def test_every_listed_name_builds():
    for name in models.available():
        assert isinstance(models.create(name, width=0.125), nn.Module)


def test_any_6n_plus_2_depth_and_width_multiplier():
    model = models.create("resnet", depth=26, width=2)
    assert len(model.blocks) == 12
    assert [b.branch[0].out_channels for b in model.blocks[::4]] == [32, 64, 128]
    assert len(models.create("preact_resnet", depth=14).blocks) == 6


def test_bad_model_arguments_raise_clearly():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create("resnet", depth=21)
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        models.create("vgg16")
    with pytest.raises(ValueError, match="fused=True needs norm='bn'"):
        models.create("resnet8", norm="torch_bn", fused=True)
    with pytest.raises(ValueError, match="expected 4D input"):
        models.create("resnet8")(torch.randn(2, 3, 8))


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20", "resnet18", "resnet1d"])
def test_plain_twin_has_no_shortcut_and_the_same_layers(name):
    plain = models.create(name, plain=True, width=0.25)
    residual = models.create(name, width=0.25)
    assert all(block.shortcut is None for block in plain.blocks)
    assert any(isinstance(block.shortcut, nn.Identity) for block in residual.blocks)
    branch_params = lambda m: sum(n_params(b.branch) for b in m.blocks)  # noqa: E731
    assert branch_params(plain) == branch_params(residual)


def _capture(model, x):
    """Each block's input and output and its branch's output, seen by forward hooks."""
    seen = []
    for block in model.blocks:
        record = {}
        block.register_forward_hook(lambda m, i, o, r=record: r.update(x=i[0].detach().clone(), out=o.detach()))
        block.branch.register_forward_hook(lambda m, i, o, r=record: r.update(branch=o.detach()))
        seen.append((block, record))
    model(x)
    return seen


@pytest.mark.parametrize("name,act", [("resnet14", torch.relu), ("preact_resnet14", lambda t: t),
                                      ("resnet18", torch.relu)])
def test_blocks_compute_act_of_branch_plus_shortcut(name, act):
    torch.manual_seed(0)
    model = models.create(name, width=0.25, fused=False).eval()
    for block, record in _capture(model, torch.randn(3, 3, 16, 16)):
        expected = act(record["branch"] + block.shortcut(record["x"]))
        torch.testing.assert_close(record["out"], expected)


@pytest.mark.parametrize("norm", ["skipinit", "fixup"])
@pytest.mark.parametrize("name", ["resnet20", "preact_resnet14", "resnet50"])
def test_fixup_and_skipinit_branches_contribute_zero_at_init(norm, name):
    # SkipInit (De & Smith 2020): alpha = 0; Fixup (Zhang et al. 2019): last layer of each branch zero
    model = models.create(name, norm=norm, width=0.25)
    preact = name.startswith("preact")
    for block, record in _capture(model, torch.randn(2, 3, 16, 16)):
        assert torch.count_nonzero(record["branch"]) == 0
        expected = block.shortcut(record["x"])
        torch.testing.assert_close(record["out"], expected if preact else torch.relu(expected))
    if norm == "fixup":  # Fixup also starts the classifier at zero
        assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16))) == 0


@pytest.mark.parametrize("name,layers", [("resnet110", 2), ("resnet50", 3)])
def test_fixup_scales_branch_weights_by_depth(name, layers):
    model = models.create(name, norm="fixup")
    depth_factor = len(model.blocks) ** (-1 / (2 * layers - 2))   # L^(-1/(2m-2)), Zhang et al. 2019 Sec. 3
    for block in list(model.blocks)[:: max(1, len(model.blocks) // 4)]:
        convs = block.branch_convs()
        assert len(convs) == layers and isinstance(block, Bottleneck) == (layers == 3)
        assert torch.count_nonzero(convs[-1].weight) == 0
        for conv in convs[:-1]:
            he_std = math.sqrt(2 / (conv.weight.shape[0] * math.prod(conv.weight.shape[2:])))
            assert conv.weight.std().item() == pytest.approx(he_std * depth_factor, rel=0.1)


def test_zero_init_residual_zeroes_the_last_bn_gamma():
    torch.manual_seed(0)
    model = models.create("resnet14", zero_init_residual=True, fused=False)
    for block, record in _capture(model, torch.randn(4, 3, 12, 12)):
        assert torch.count_nonzero(block.branch[-1].weight) == 0
        assert torch.count_nonzero(record["branch"]) == 0
        torch.testing.assert_close(record["out"], torch.relu(block.shortcut(record["x"])))


def test_bn_and_torch_bn_models_agree_with_the_same_weights():
    torch.manual_seed(0)
    ours = models.create("resnet8", norm="bn", fused=False).double()
    theirs = models.create("resnet8", norm="torch_bn").double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_fused_path_calls_bnlab_fused_and_matches_unfused(monkeypatch):
    calls = []
    original = bnlab.nn.fused.batch_norm_add_relu
    monkeypatch.setattr(bnlab.nn.fused, "batch_norm_add_relu",
                        lambda bn, x, residual: calls.append(1) or original(bn, x, residual))
    torch.manual_seed(0)
    fused = models.create("resnet14", fused=True)
    unfused = models.create("resnet14", fused=False)
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(fused(x), unfused(x))
    assert len(calls) == len(fused.blocks)
    models.create("resnet14")(x)  # fused=None: only on CUDA
    assert len(calls) == len(fused.blocks)


def test_1d_resnet_uses_batchnorm1d():
    import bnlab.nn
    model = models.create("resnet1d", in_channels=1, depth=8)
    kinds = {type(m) for m in model.modules()}
    assert bnlab.nn.BatchNorm1d in kinds and bnlab.nn.BatchNorm2d not in kinds and nn.Conv1d in kinds


def test_airbench_gamma_frozen_and_whitening_whitens():
    torch.manual_seed(0)
    model = models.create("airbench", in_channels=1, width=0.25)
    gammas = [m.weight for m in model.modules() if type(m).__name__ == "BatchNorm2d"]
    assert gammas and not any(g.requires_grad for g in gammas)
    # correlated images: a smooth field plus noise
    x = torch.nn.functional.avg_pool2d(torch.randn(64, 1, 30, 30), 3, 1) + 0.1 * torch.randn(64, 1, 28, 28)
    model.init_whitening(x, eps=0.0)
    with torch.no_grad():
        out = nn.functional.conv2d(x.double(), model.whiten.weight.double()[:4])   # the + half of the filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    import numpy as np
    cov = np.cov(flat, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(4), atol=1e-6)


def test_norm_layer_is_accepted_wherever_norm_is():
    from bnlab.errors import UserError
    from bnlab.models.resnet import BasicBlock

    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    assert kinds(models.create("resnet8", norm_layer=nn.BatchNorm2d)) == {nn.BatchNorm2d}
    assert kinds(models.create("resnet8", norm="torch_bn")) == {nn.BatchNorm2d}
    assert kinds(BasicBlock(4, 4, norm_layer=nn.BatchNorm2d)) == {nn.BatchNorm2d}
    assert kinds(models.cifar_resnet(8, norm_layer="torch_bn")) == {nn.BatchNorm2d}
    with pytest.raises(UserError, match="both norm='groupnorm' and norm_layer"):
        models.create("resnet8", norm="groupnorm", norm_layer=nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------------
# named block parts (torchvision's names) and state_dicts saved with the earlier numbered keys
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, norm, parts", [
    ("resnet8", "bn", ["conv1", "bn1", "relu", "conv2", "bn2"]),
    ("resnet8", "none", ["conv1", "relu", "conv2"]),
    ("resnet8", "skipinit", ["conv1", "relu", "conv2", "alpha"]),
    ("resnet8", "fixup", ["bias1a", "conv1", "bias1b", "relu", "bias2a", "conv2", "scale", "bias2b"]),
    ("preact_resnet8", "bn", ["bn1", "relu1", "conv1", "bn2", "relu2", "conv2"]),
    ("resnet50", "bn", ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3"]),
])
def test_branch_parts_have_torchvision_names(name, norm, parts):
    model = models.create(name, norm=norm, in_channels=3, width=0.25)
    block = model.blocks[0]
    assert list(block.branch._modules) == parts
    for part in parts:
        assert getattr(block, part) is getattr(block.branch, part)     # block.bn2 is block.branch.bn2
    convs = [p for p in parts if p.startswith("conv")]
    assert all(isinstance(getattr(block, c), nn.Conv2d) for c in convs)
    assert all(getattr(block, p).__class__.__name__.startswith("BatchNorm") for p in parts if p.startswith("bn"))
    with pytest.raises(AttributeError):
        block.bn9


def _numbered(state: dict, model) -> dict:
    """The keys an earlier bnlab wrote: each branch part by its position instead of its name."""
    renames = {}
    for block_name, block in model.named_modules():
        if hasattr(block, "branch") and isinstance(block.branch, nn.Sequential):
            for i, part in enumerate(block.branch._modules):
                renames[f"{block_name}.branch.{part}."] = f"{block_name}.branch.{i}."
    out = {}
    for key, value in state.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[renames[prefix] + key[len(prefix):] if prefix else key] = value
    return out


@pytest.mark.parametrize("name, norm", [("resnet8", "bn"), ("resnet8", "fixup"), ("preact_resnet8", "bn"),
                                        ("resnet50", "bn")])
def test_a_state_dict_with_numbered_branch_keys_still_loads(name, norm):
    torch.manual_seed(0)
    source = models.create(name, norm=norm, in_channels=3, width=0.25)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)       # every value differs from a fresh model's
    old = _numbered(source.state_dict(), source)
    assert any(".branch.0." in k for k in old) and not any(".branch.conv1." in k for k in old)
    torch.manual_seed(1)
    target = models.create(name, norm=norm, in_channels=3, width=0.25)
    target.load_state_dict(old)                      # strict: no key missing or unexpected
    x = torch.randn(2, 3, 16, 16)
    source.eval(), target.eval()
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# paired initial weights: init_seed
# --------------------------------------------------------------------------------------------------

def _weights(model):
    return {k: v for k, v in model.state_dict().items()
            if k.endswith("weight") and ("conv" in k or k.startswith(("stem.0", "fc", "shortcut")))}


def test_without_init_seed_the_unnormalized_net_starts_from_other_weights():
    """The defect init_seed fixes: the same global seed gives BN and no-norm nets different conv weights,
    because the unnormalized net's conv biases draw random numbers before the weights are set."""
    torch.manual_seed(0)
    bn = models.create("resnet8", norm="bn", in_channels=1, width=0.5, dims=1)
    torch.manual_seed(0)
    none = models.create("resnet8", norm="none", in_channels=1, width=0.5, dims=1)
    assert not torch.equal(bn.blocks[0].conv1.weight, none.blocks[0].conv1.weight)


@pytest.mark.parametrize("dims", [1, 2])
def test_init_seed_gives_every_norm_the_same_initial_weights(dims):
    nets = {}
    for i, norm in enumerate(["bn", "none", "skipinit", "groupnorm", "torch_bn"]):
        torch.manual_seed(100 + i)             # the global generator's state no longer matters
        nets[norm] = models.create("resnet14", norm=norm, in_channels=2, width=0.5, dims=dims, init_seed=3)
    reference = _weights(nets["bn"])
    assert len(reference) > 10
    for norm, net in nets.items():
        weights = _weights(net)
        assert weights.keys() == reference.keys(), norm
        assert all(torch.equal(weights[k], reference[k]) for k in reference), norm
    other = _weights(models.create("resnet14", norm="bn", in_channels=2, width=0.5, dims=dims, init_seed=4))
    assert not torch.equal(other["blocks.0.branch.conv1.weight"], reference["blocks.0.branch.conv1.weight"])
    w = reference["blocks.0.branch.conv1.weight"]
    fan_out = w.shape[0] * math.prod(w.shape[2:])            # He et al. 2015's fan-out normal, std √(2/fan_out)
    assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.25)
