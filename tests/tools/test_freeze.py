"""Frozen statistics: switches that survive train()/eval(), FrozenBatchNorm (bnlab.tools.freeze)."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ


# --------------------------------------------------------------------------------------------------
# frozen statistics
# --------------------------------------------------------------------------------------------------

def _net(bn_cls):
    torch.manual_seed(1)
    bn1d = nn.BatchNorm1d if bn_cls.__module__.startswith("torch.") else bnn.BatchNorm1d
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), bn1d(5))
    net.train()
    for _ in range(2):
        net(torch.randn(8, 3, 6, 6))   # non-trivial running statistics
    return net


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnn.BatchNorm2d, V.GhostBatchNorm2d])
def test_freeze_stats_uses_running_stats_survives_train_and_trains_affine(bn_cls):
    net = _net(bn_cls)
    reference = copy.deepcopy(net).eval()
    FZ.freeze_stats(net)
    net.train()                       # must not undo the freeze
    x = torch.randn(6, 3, 6, 6)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    y = net(x)
    torch.testing.assert_close(y, reference(x))                       # running statistics used
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, buffers[k])                     # and not updated
    assert net[1].training                                            # the mode itself is left alone
    y.sum().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0

    FZ.unfreeze_stats(net)
    net.train()
    net(x)
    assert not torch.equal(net[1].running_mean, buffers["1.running_mean"])  # updates again


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnn.BatchNorm2d])
def test_switches_batch_stats_without_update_and_affine(bn_cls):
    net = _net(bn_cls)
    FZ.set_bn_switches(net, use_batch_stats=True, update_running_stats=False, train_affine=False)
    net.eval()
    x = torch.randn(6, 3, 6, 6)
    before = net[1].running_mean.clone()
    h = net[0](x)
    torch.testing.assert_close(net[1](h), TF.batch_norm(h, None, None, net[1].weight, net[1].bias, True,
                                                         eps=net[1].eps))
    torch.testing.assert_close(net[1].running_mean, before)
    assert not net[1].weight.requires_grad and not net[1].bias.requires_grad


def test_freeze_refuses_layers_without_running_stats():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="1 \\(BatchNorm1d\\(3\\)\\).*running statistics"):
        FZ.freeze_stats(net)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        FZ.freeze_stats(nn.Linear(2, 2))


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnn.BatchNorm2d])
def test_freeze_bn_makes_buffers_and_matches_eval(bn_cls):
    net = _net(bn_cls)
    reference = copy.deepcopy(net).eval()
    keys = set(net.state_dict())
    FZ.freeze_bn(net)
    assert isinstance(net[1], FZ.FrozenBatchNorm2d) and isinstance(net[5], FZ.FrozenBatchNorm1d)
    assert set(net.state_dict()) == keys                          # same checkpoint format
    assert all("1." not in n for n, _ in net.named_parameters())  # γ/β are no longer parameters
    net.train()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(net(x), reference(x))
    FZ.unfreeze_bn(net)
    assert isinstance(net[1], bnn.BatchNorm2d) and net[1].weight.requires_grad
    torch.testing.assert_close(net.eval()(x), reference(x))
