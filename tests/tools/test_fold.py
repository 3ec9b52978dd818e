"""bnlab.tools.fold: folded models equal the unfolded model in eval mode (1e-5 relative) on random models, and
every case that cannot be folded is refused with its reason."""

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ
from bnlab.tools.fold import find_conv_bn_pairs, fold_bn


def _randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if FZ.is_batch_norm(m):   # FrozenBatchNorm* included
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=gen))
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model


def _check_equal(model, x, expect_folded):
    model = _randomize_bn(model)
    with torch.no_grad():
        reference = model.eval()(x)
    folded, report = fold_bn(model, probe=x)
    assert len(report.folded) == expect_folded, str(report)
    assert not any(FZ.is_batch_norm(m) for m in folded.modules()) or report.skipped
    with torch.no_grad():
        out = folded(x)
    rel = (out - reference).abs().max() / reference.abs().max()
    assert rel < 1e-5, f"relative error {rel}"
    assert report.max_rel_error == pytest.approx(float(rel.detach()), rel=1e-3, abs=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)   # the original is untouched
    return folded, report


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnn.BatchNorm2d, V.GhostBatchNorm2d])
@pytest.mark.parametrize("groups,conv_bias", [(1, True), (1, False), (3, False), (6, True)])
def test_fold_conv2d(bn_cls, groups, conv_bias):
    torch.manual_seed(groups)
    model = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1, groups=groups, bias=conv_bias), bn_cls(12), nn.ReLU(),
                          nn.Conv2d(12, 6, 1, bias=False), bn_cls(6))
    _check_equal(model, torch.randn(4, 6, 7, 5), 2)


@pytest.mark.parametrize("groups,conv_bias", [(1, True), (2, False), (4, True)])
def test_fold_transposed_conv(groups, conv_bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, stride=2, groups=groups, bias=conv_bias), nn.BatchNorm2d(8))
    _check_equal(model, torch.randn(3, 4, 5, 5), 1)


def test_fold_linear_conv1d_conv3d_and_transposed_1d():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), bnn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3, bias=False), nn.BatchNorm1d(3))
    _check_equal(mlp, torch.randn(6, 5), 2)
    seq = nn.Sequential(nn.Conv1d(3, 6, 3, groups=3), nn.BatchNorm1d(6), nn.ConvTranspose1d(6, 4, 2, groups=2),
                        bnn.BatchNorm1d(4))
    _check_equal(seq, torch.randn(2, 3, 9), 2)
    vol = nn.Sequential(nn.Conv3d(2, 4, 2), bnn.BatchNorm3d(4, affine=False))
    _check_equal(vol, torch.randn(2, 2, 4, 4, 4), 1)


class _Residual(nn.Module):
    """conv1's output feeds bn1 and the shortcut; bn2 follows an addition; bn3 follows conv3 in forward()."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.bn2 = bnn.BatchNorm2d(3)
        self.conv3, self.bn3 = nn.Conv2d(3, 5, 1, bias=False), bnn.BatchNorm2d(5)

    def forward(self, x):
        h = self.conv1(x)
        h = self.bn2(self.bn1(h) + h)
        return self.bn3(self.conv3(torch.relu(h)))


def test_fold_refuses_with_reasons_and_folds_the_rest():
    torch.manual_seed(0)
    folded, report = _check_equal(_Residual(), torch.randn(2, 3, 6, 6), 1)
    reasons = dict(report.skipped)
    assert report.folded == [("bn3", "conv3")]
    assert "also used by" in reasons["bn1"]
    assert "not from a conv/linear" in reasons["bn2"] and "add" in reasons["bn2"]
    with pytest.raises(ValueError, match="bn1: the output of 'conv1' is also used"):
        fold_bn(_Residual(), strict=True)


def test_fold_refuses_batch_norm_without_running_stats_and_shared_layers():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    _, report = fold_bn(model)
    assert report.folded == [] and "no running statistics" in report.skipped[0][1]

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), bn

        def forward(self, x):
            return self.bn(self.fc(self.bn(self.fc(x))))

    _, report = fold_bn(Shared())
    assert report.folded == [] and all("called 2 times" in why for _, why in report.skipped)


def test_fold_refuses_batch_norm_subclasses_that_do_more():
    from bnlab.nn import fused
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), fused.BatchNormReLU2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    folded, report = _check_equal(model, torch.randn(2, 2, 4, 4), 1)
    assert report.folded == [("3", "2")] and "overrides forward" in dict(report.skipped)["1"]
    with pytest.raises(TypeError, match="freeze_bn: layer 1 .*overrides forward"):
        FZ.freeze_bn(model)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.loose = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:           # data-dependent control flow: torch.fx cannot trace this
            h = self.loose(h)
        return h


def test_fold_falls_back_to_sequential_adjacency_when_tracing_fails():
    torch.manual_seed(0)
    model = _Untraceable()
    pairs, skipped, method, error = find_conv_bn_pairs(model)
    assert method == "fx+sequential" and "TraceError" in error and pairs == [("body.0", "body.1")]
    assert skipped[0][0] == "loose" and "nn.Sequential" in skipped[0][1]
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), _Untraceable())   # adjacency in a Sequential
    pairs, skipped, method, _ = find_conv_bn_pairs(seq)
    assert pairs == [("0", "1"), ("2.body.0", "2.body.1")] and [n for n, _ in skipped] == ["2.loose"]
    _check_equal(model, torch.randn(2, 3, 6, 6), 1)


def test_fold_frozen_batch_norm_and_rtol_check():
    torch.manual_seed(0)
    model = FZ.freeze_bn(_randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))))
    _check_equal(model, torch.randn(2, 2, 3, 3), 1)
    with pytest.raises(RuntimeError, match="rtol"):
        fold_bn(model, probe=torch.randn(2, 2, 3, 3) * 1e6, rtol=0.0)


def test_fold_resnet_from_the_model_zoo():
    from bnlab import models
    torch.manual_seed(0)
    net = models.create("resnet8", norm="bn", in_channels=3, num_classes=10)
    folded, report = _check_equal(net, torch.randn(4, 3, 16, 16), sum(FZ.is_batch_norm(m) for m in net.modules()))
    assert not report.skipped
