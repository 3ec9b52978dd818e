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


# ------------------------------------------------------------------------------ models tracing cannot follow
def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one dimension (as Hugging Face's apply_tf_padding)."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


class _SamePadConv2d(nn.Conv2d):
    """A conv subclass whose forward pads from the input's size (int() of a shape: a Proxy under torch.fx)."""

    def forward(self, x):
        (top, bottom), (left, right) = (_same_padding(int(x.shape[d]), self.kernel_size[i], self.stride[i])
                                        for i, d in enumerate((-2, -1)))
        return super().forward(torch.nn.functional.pad(x, (left, right, top, bottom)))


class _TFConvLayer(nn.Module):
    """Hugging Face MobileNetV2's conv layer: the padding computed in the block's own forward, then conv, BN,
    ReLU6 (its BN momentum is Keras's 0.997)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, conv=nn.Conv2d):
        super().__init__()
        self.convolution = conv(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        self.normalization = nn.BatchNorm2d(cout, momentum=0.997)
        self.activation = nn.ReLU6()

    def forward(self, x):
        if not isinstance(self.convolution, _SamePadConv2d):
            k, s = self.convolution.kernel_size[0], self.convolution.stride[0]
            (top, bottom), (left, right) = _same_padding(int(x.shape[-2]), k, s), _same_padding(int(x.shape[-1]), k, s)
            x = torch.nn.functional.pad(x, (left, right, top, bottom))
        return self.activation(self.normalization(self.convolution(x)))


class _InvertedResidual(nn.Module):
    def __init__(self, c, expand=2):
        super().__init__()
        self.expand_1x1 = _TFConvLayer(c, c * expand, 1)
        self.conv_3x3 = _TFConvLayer(c * expand, c * expand, 3, groups=c * expand, conv=_SamePadConv2d)
        self.reduce_1x1 = nn.Conv2d(c * expand, c, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.reduce_bn(self.reduce_1x1(self.conv_3x3(self.expand_1x1(x))))


class _TFPaddingNet(nn.Module):
    """The structure of Hugging Face's MobileNetV2 with tf_padding=True, small: 7 batch norms, each after
    the conv whose output it alone uses, none of them reachable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.stem = _TFConvLayer(3, 4, 3, stride=2)
        self.blocks = nn.ModuleList([_InvertedResidual(4), _InvertedResidual(4)])

    def forward(self, pixel_values):
        h = self.stem(pixel_values)
        for block in self.blocks:
            h = block(h)
        return {"last_hidden_state": h, "pooler_output": h.mean((2, 3))}


def _bn_count(model):
    return sum(FZ.is_batch_norm(m) for m in model.modules())


def test_fold_matches_by_running_the_model_where_tracing_fails():
    """Issue 21 item 9: Hugging Face's MobileNetV2 folded 0 of its 52 batch norms (tf_padding defeats torch.fx).
    Folded in float64, the folded model equals the eval model to float64 rounding."""
    torch.manual_seed(0)
    model = _randomize_bn(_TFPaddingNet()).double().eval()
    x = torch.randn(3, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    folded, report = fold_bn(model, probe=x)
    assert len(report.folded) == _bn_count(model) == 7 and report.skipped == [], str(report)
    assert report.method == "fx+hooks" and ("stem.normalization", "stem.convolution") in report.folded
    assert _bn_count(folded) == 0
    with torch.no_grad():
        out = folded(x)
    for key in reference:
        torch.testing.assert_close(out[key], reference[key], rtol=1e-12, atol=1e-12)
    assert report.max_rel_error < 1e-12
    # keyword inputs (a Hugging Face batch) as the probe, float32 as trained: the same pairs
    _, report32 = fold_bn(_randomize_bn(_TFPaddingNet()).eval(), probe={"pixel_values": x.float()})
    assert sorted(report32.folded) == sorted(report.folded) and report32.max_rel_error < 1e-5
    # without a probe only the layers tracing reaches fold (a conv subclass is one call to torch.fx, whatever
    # its forward does); the reason for the others says how to get them matched
    _, unprobed = fold_bn(model)
    assert sorted(b for b, _ in unprobed.folded) == ["blocks.0.conv_3x3.normalization",
                                                     "blocks.1.conv_3x3.normalization"]
    assert len(unprobed.skipped) == 5 and all("probe=" in why and "pairs=" in why for _, why in unprobed.skipped)


class _Tricky(nn.Module):
    """Untraceable (int() of a shape); bn1 after a functional ReLU, bn2 after a conv whose output the
    shortcut also adds, bn3 after a conv whose output was changed in place, bn4 after a conv whose shape
    alone is read (foldable), bn5 never called."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv3, self.bn3 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv4, self.bn4 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn5 = nn.BatchNorm2d(3)

    def forward(self, x):
        if int(x.shape[-1]) > 1000:
            return self.bn5(x)
        h = self.bn1(torch.relu(self.conv1(x)))
        c2 = self.conv2(h)
        h = self.bn2(c2) + c2
        c3 = self.conv3(h)
        c3.mul_(2.0)
        h = self.bn3(c3)
        c4 = self.conv4(h)
        assert c4.shape == h.shape and c4.dim() == 4 and c4.size(1) == 3
        return self.bn4(c4)


def test_fold_by_running_the_model_refuses_what_would_change_the_output():
    torch.manual_seed(0)
    model = _randomize_bn(_Tricky()).eval()
    x = torch.randn(2, 3, 5, 5)
    folded, report = _check_equal(model, x, 1)
    why = dict(report.skipped)
    assert report.folded == [("bn4", "conv4")], str(report)
    assert "not from a conv/linear layer" in why["bn1"]
    assert "output of 'conv2' is also used by add" in why["bn2"]
    assert "output of 'conv3' is also used by mul_" in why["bn3"]
    assert "not called" in why["bn5"]
    assert _bn_count(folded) == 4


def test_fold_explicit_pairs():
    torch.manual_seed(0)
    model = _randomize_bn(_TFPaddingNet()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)["last_hidden_state"]
    pairs = [("stem.convolution", "stem.normalization"), ("blocks.1.reduce_1x1", "blocks.1.reduce_bn")]
    folded, report = fold_bn(model, pairs=pairs)          # no probe: the pairs are taken as given
    assert sorted(report.folded) == sorted((b, c) for c, b in pairs) and report.method == "pairs"
    assert len(report.skipped) == 5 and all(why == "not in the given pairs" for _, why in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(folded(x)["last_hidden_state"], reference, rtol=1e-12, atol=1e-12)
    # with a probe each pair is confirmed first: a wrong one is kept, with the reason
    wrong = [("blocks.1.reduce_1x1", "stem.normalization"), ("blocks.0.reduce_1x1", "blocks.0.reduce_bn")]
    _, report = fold_bn(model, probe=x, pairs=wrong)
    assert report.folded == [("blocks.0.reduce_bn", "blocks.0.reduce_1x1")] and report.method == "pairs+hooks"
    assert "output of 'stem.convolution', not of 'blocks.1.reduce_1x1'" in dict(report.skipped)["stem.normalization"]
    for bad, message in (([("stem", "stem.normalization")], "'stem' is a _TFConvLayer, expected a conv/linear"),
                         ([("stem.convolution", "stem.activation")], "expected a batch-norm layer"),
                         ([("nowhere", "stem.normalization")], "no submodule 'nowhere'"),
                         ([("stem.convolution", "stem.normalization")] * 2, "more than one pair"),
                         (["stem.convolution"], "pairs must hold")):
        with pytest.raises(ValueError, match=message):
            fold_bn(model, pairs=bad)


def test_fold_report_shows_no_error_for_a_model_it_folds():
    """Issue 21 item 9: resnet8 folded completely, yet its report printed "torch.fx could not trace"."""
    from bnlab import models
    torch.manual_seed(0)
    net = models.create("resnet8", norm="bn", in_channels=3, num_classes=10).eval()
    for probe in (None, torch.randn(2, 3, 8, 8)):
        _, report = fold_bn(net, probe=probe)
        assert len(report.folded) == _bn_count(net) and not report.skipped
        assert "could not trace" not in str(report) and "Error" not in str(report), str(report)
