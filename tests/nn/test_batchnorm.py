"""bnlab.nn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: the drop-in contract."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnlab.nn
import bnlab.nn as bnn

PAIRS = {1: (bnn.BatchNorm1d, nn.BatchNorm1d), 2: (bnn.BatchNorm2d, nn.BatchNorm2d), 3: (bnn.BatchNorm3d, nn.BatchNorm3d)}
SHAPES = {1: [(6, 5), (4, 5, 7)], 2: [(4, 5, 3, 7)], 3: [(3, 5, 2, 3, 5)]}


def _pair(kind, **kwargs):
    ours_cls, torch_cls = PAIRS[kind]
    ours, theirs = ours_cls(5, **kwargs).double(), torch_cls(5, **kwargs).double()
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            if ours.bias is not None:
                ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@given(kind=st.sampled_from([1, 2, 3]), momentum=st.sampled_from([0.1, 0.9, None]),
       affine=st.booleans(), bias=st.booleans(), track=st.booleans(), seed=st.integers(0, 1000),
       shape_index=st.integers(0, 1))
def test_module_matches_torch_over_steps(kind, momentum, affine, bias, track, seed, shape_index):
    torch.manual_seed(seed)
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, bias=bias)
    ours, theirs = _pair(kind, **kwargs)
    shape = SHAPES[kind][shape_index % len(SHAPES[kind])]
    for step in range(4):
        train = step < 3
        ours.train(train)
        theirs.train(train)
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
        for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_state_dict_round_trips_both_ways(kind):
    ours, theirs = _pair(kind)
    x = torch.randn(SHAPES[kind][0], dtype=torch.float64)
    ours(x)  # move the running statistics away from their initial values
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fresh = PAIRS[kind][0](5).double()
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_state_dict_without_num_batches_tracked_loads():
    """Checkpoints saved before the buffer existed (version 1) still load, as in PyTorch."""
    state = nn.BatchNorm2d(4).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    layer = bnn.BatchNorm2d(4)
    layer.num_batches_tracked.fill_(7)
    layer.load_state_dict(state, strict=True)
    assert int(layer.num_batches_tracked) == 0
    state._metadata = {"": {"version": 2}}
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        layer.load_state_dict(state, strict=True)


@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(bias=False), dict(track_running_stats=False),
                                    dict(momentum=None, eps=1e-3)])
def test_repr_parameters_and_buffers_match_torch(kwargs):
    ours, theirs = bnn.BatchNorm2d(7, **kwargs), nn.BatchNorm2d(7, **kwargs)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
    assert {n: (b.shape, b.dtype) for n, b in ours.named_buffers()} == \
        {n: (b.shape, b.dtype) for n, b in theirs.named_buffers()}


def test_device_and_dtype_arguments():
    layer = bnn.BatchNorm1d(3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.running_var.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long


def test_reset_running_stats_and_parameters():
    layer = bnn.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2) + 5)
    with torch.no_grad():
        layer.weight.fill_(3)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.weight, torch.full((3,), 3.0))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))


def _resnet_like(norm=nn.BatchNorm2d):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), Block(), Block(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))


def test_convert_gives_identical_outputs_and_round_trips():
    torch.manual_seed(0)
    model = _resnet_like()
    x = torch.randn(6, 3, 8, 8)
    model(x)  # give the running statistics some history
    reference = _resnet_like()
    reference.load_state_dict(model.state_dict())

    bnlab.nn.convert(model, to="bnlab")
    kinds = {type(m) for m in model.modules()}
    assert bnn.BatchNorm2d in kinds and bnn.BatchNorm1d in kinds
    assert nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    for mode in ("train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=1e-5, atol=1e-6)

    bnlab.nn.convert(model, to="torch")
    assert not any(isinstance(m, bnn.BatchNorm) for m in model.modules())
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_convert_keeps_mode_and_requires_grad():
    layer = nn.BatchNorm2d(3, momentum=0.3, eps=1e-3).eval()
    layer.weight.requires_grad_(False)
    ours = bnlab.nn.convert(layer)
    assert isinstance(ours, bnn.BatchNorm2d) and not ours.training and not ours.weight.requires_grad
    assert ours.momentum == 0.3 and ours.eps == 1e-3
    with pytest.raises(ValueError, match="to must be 'bnlab' or 'torch'"):
        bnlab.nn.convert(layer, to="keras")


@pytest.mark.parametrize("layer, x, error, text", [
    (bnn.BatchNorm2d(64), torch.randn(2, 64, 3), ValueError, r"^BatchNorm2d\(64\): expected 4D input \(got 3D input\)$"),
    (bnn.BatchNorm1d(8), torch.randn(2, 8, 3, 3), ValueError, r"^BatchNorm1d\(8\): expected 2D or 3D input \(got 4D input\)$"),
    (bnn.BatchNorm3d(2), torch.randn(2, 2, 3, 3), ValueError, r"^BatchNorm3d\(2\): expected 5D input \(got 4D input\)$"),
    (bnn.BatchNorm2d(64), torch.randn(2, 32, 3, 3), ValueError,
     r"^BatchNorm2d\(64\): expected input with 64 channels in dimension 1 \(got 32 channels"),
    (bnn.BatchNorm2d(4), torch.ones(2, 4, 3, 3, dtype=torch.int32), TypeError,
     r"^BatchNorm2d\(4\): expected a floating-point input .* got torch.int32"),
    (bnn.BatchNorm1d(16), torch.randn(1, 16), ValueError,
     r"^BatchNorm1d\(16\): expected more than 1 value per channel when training, got 1 value per channel "
     r"\(input shape \(1, 16\)\).*drop_last=True.*\.eval\(\)"),
])
def test_module_errors_name_the_layer(layer, x, error, text):
    with pytest.raises(error, match=text):
        layer(x)


def test_single_value_per_channel_is_fine_in_eval():
    layer = bnn.BatchNorm1d(16).eval()
    assert layer(torch.randn(1, 16)).shape == (1, 16)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnn.BatchNorm2d(0)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\): momentum must be in \[0, 1\].*0.99"):
        bnn.BatchNorm2d(4, momentum=1.5)


def test_nonfinite_batch_is_skipped_with_a_warning_naming_the_layer():
    layer = bnn.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"BatchNorm2d\(3\): the batch statistics are not finite"):
        y = layer(x)
    assert not torch.isfinite(y).all()  # the caller sees the problem
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert layer.skipped_updates == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 3, 2, 2))  # a healthy batch updates again, silently
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("warn", [None, True, False])
def test_nonfinite_batch_never_reaches_the_running_statistics_whoever_decides(warn):
    """On the host (warn_nonfinite None or True on CPU: checked, warned, counted) or on the device (False:
    silent), a batch with an Inf leaves the running statistics as torch.nn.BatchNorm2d has them after the
    healthy batches alone."""
    layer, theirs = bnn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    layer.warn_nonfinite = warn
    g = torch.Generator().manual_seed(0)
    healthy = [torch.randn(4, 3, 2, 2, generator=g) * 2 + 1 for _ in range(2)]
    bad = torch.randn(4, 3, 2, 2, generator=g)
    bad[1, 2, 1, 0] = float("-inf")
    layer(healthy[0])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layer(bad)
    assert [str(w.message).startswith("BatchNorm2d(3): the batch statistics are not finite") for w in seen] \
        == ([] if warn is False else [True])
    assert layer.skipped_updates == (0 if warn is False else 1)
    layer(healthy[1])
    for x in healthy:
        theirs(x)
    torch.testing.assert_close(layer.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, theirs.running_var, rtol=1e-6, atol=1e-6)


def test_switches_survive_train_and_eval():
    layer = bnn.BatchNorm2d(3)
    layer.update_running_stats = False
    layer.train()
    layer(torch.randn(4, 3, 2, 2) + 3)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0
    layer.use_batch_stats = False  # use the running statistics even in training mode
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), x / (1 + 1e-5) ** 0.5)
