"""Gradient-accumulation-aware running statistics (bnlab.tools.accumulate)."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ
from bnlab.tools.accumulate import accumulate_bn_stats


# --------------------------------------------------------------------------------------------------
# gradient accumulation and AMP safety
# --------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(3), lambda: bnn.BatchNorm2d(3),
                                  lambda: V.GhostBatchNorm2d(3, virtual_batch_size=2),
                                  lambda: bnn.BatchNorm2d(3, momentum=None)])
def test_accumulated_running_stats_equal_full_batch(make):
    torch.manual_seed(0)
    layer, full = make().double(), make().double()
    micro = [torch.randn(n, 3, 4, 4, dtype=torch.float64) * s + s for n, s in ((4, 1.0), (2, 3.0), (6, 0.5))]
    for step in range(2):                     # two optimizer steps of three micro-batches each
        with accumulate_bn_stats(layer):
            outputs = [layer(x + step) for x in micro]
        full(torch.cat(micro) + step)
    torch.testing.assert_close(layer.running_mean, full.running_mean)
    torch.testing.assert_close(layer.running_var, full.running_var)
    assert int(layer.num_batches_tracked) == int(full.num_batches_tracked) == 2
    # the forward is unchanged: each micro-batch normalized by its own statistics
    x = micro[1] + 1
    torch.testing.assert_close(outputs[1], TF.batch_norm(x, None, None, layer.weight, layer.bias, True, eps=layer.eps))


def test_accumulation_leaves_non_updating_layers_and_discards_on_error():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), bnn.BatchNorm1d(4))
    FZ.freeze_stats(net[2])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(KeyError):
        with accumulate_bn_stats(net):
            net(torch.randn(5, 3))
            raise KeyError("boom")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with accumulate_bn_stats(net):
        net(torch.randn(5, 3))
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    torch.testing.assert_close(net[2].running_mean, before["2.running_mean"])    # frozen stays frozen
    with pytest.raises(ValueError, match="no batch-norm layer"):
        accumulate_bn_stats(nn.Linear(2, 2))
