"""The norm registry: every name builds, matches an independent computation, and trains a step."""

import functools

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn
from bnlab import models
from bnlab.models.norms import available, get_norm_layer, group_count


def test_registry_names():
    assert set(available()) == {"bn", "torch_bn", "none", "groupnorm", "layernorm", "skipinit", "fixup"}


@pytest.mark.parametrize("dims,cls_ours,cls_torch", [(1, bnlab.nn.BatchNorm1d, nn.BatchNorm1d),
                                                     (2, bnlab.nn.BatchNorm2d, nn.BatchNorm2d)])
def test_bn_is_ours_and_torch_bn_is_torchs(dims, cls_ours, cls_torch):
    ours, theirs = get_norm_layer("bn")(6, dims=dims), get_norm_layer("torch_bn")(6, dims=dims)
    assert type(ours) is cls_ours and type(theirs) is cls_torch
    x = torch.randn(5, 6, *([7] * dims), dtype=torch.float64)
    ours.double(), theirs.double()
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("channels,groups", [(64, 32), (16, 16), (48, 24), (24, 24), (7, 7), (96, 32), (40, 20)])
def test_group_count_is_largest_divisor_up_to_32(channels, groups):
    assert group_count(channels) == groups
    assert get_norm_layer("groupnorm")(channels).num_groups == groups


def test_layernorm_normalizes_each_sample_over_c_h_w():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 3 + 2
    layer = get_norm_layer("layernorm")(4).double()
    a = x.numpy()
    mean = a.mean(axis=(1, 2, 3), keepdims=True)
    var = a.var(axis=(1, 2, 3), keepdims=True)
    expected = (a - mean) / np.sqrt(var + layer.eps)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["none", "skipinit", "fixup"])
def test_normless_schemes_are_identities(name):
    factory = get_norm_layer(name)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(factory(3)(x), x)
    assert factory.scheme == {"none": "norm"}.get(name, name)


def test_class_and_partial_accepted_and_follow_dims():
    partial = functools.partial(nn.BatchNorm2d, momentum=0.01, eps=1e-3)
    layer2, layer1 = get_norm_layer(partial)(8), get_norm_layer(partial)(8, dims=1)
    assert type(layer2) is nn.BatchNorm2d and type(layer1) is nn.BatchNorm1d
    assert layer1.momentum == 0.01 and layer1.eps == 1e-3
    assert type(get_norm_layer(bnlab.nn.BatchNorm2d)(4, dims=1)) is bnlab.nn.BatchNorm1d
    assert type(get_norm_layer(nn.InstanceNorm2d)(4)) is nn.InstanceNorm2d


def test_bad_norm_arguments_raise_clearly():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*groupnorm"):
        get_norm_layer("batchnorm")
    with pytest.raises(TypeError, match="norm must be"):
        get_norm_layer(3)
    with pytest.raises(ValueError, match="dims must be 1"):
        get_norm_layer("bn")(4, dims=3)


@pytest.mark.parametrize("norm", available())
@pytest.mark.parametrize("name", ["resnet8", "preact_resnet8"])
def test_each_norm_builds_and_trains_a_step(norm, name):
    torch.manual_seed(0)
    model = models.create(name, norm=norm, in_channels=1, num_classes=4, width=0.5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > 0
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("channels, k, groups", [(8, 4, 2), (16, 4, 4), (32, 4, 8), (64, 2, 32), (6, 4, 1),
                                                 (12, 5, 2), (3, 4, 1)])
def test_groupnorm_with_k_channels_per_group(channels, k, groups):
    layer = get_norm_layer(f"groupnorm:{k}")(channels)
    assert isinstance(layer, torch.nn.GroupNorm) and layer.num_groups == groups
    assert channels % layer.num_groups == 0
    assert channels // layer.num_groups >= min(k, channels)       # at least K per group where C allows
    # the plain name would give a narrow layer one channel per group (InstanceNorm)
    assert get_norm_layer("groupnorm")(8).num_groups == 8


def test_groupnorm_k_must_be_a_positive_integer():
    for bad in ("groupnorm:0", "groupnorm:x", "groupnorm:"):
        with pytest.raises(ValueError, match="channels per group"):
            get_norm_layer(bad)
