"""Triton kernels (bnlab.kernels) against the float64 NumPy oracle, torch.nn.BatchNorm* and gradcheck.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before Triton is imported). Every buffer a kernel writes is filled with NaN before the launch, so an element a
kernel forgot to write fails the comparison. Each kernel path (single-read, tiled with one program per
channel block, tiled with the reduction split across programs) is forced in turn on odd and prime shapes.
"""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot run")

from bnlab import functional as F  # noqa: E402   (after the skip: launch imports Triton)
from bnlab import kernels, reference  # noqa: E402
from bnlab import nn as bnn  # noqa: E402
from bnlab.kernels import launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not launch.INTERPRETED:
    pytest.skip("no CUDA device and Triton was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _np(t):
    return t.detach().cpu().double().numpy()


def _layout(x, channels_last):
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if channels_last and x.dim() == 3:  # (N, C, L) with channels fastest: a transposed (N, L, C)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


def _inputs(shape, channels_last=False, affine="both", residual=False, scale=1.0, offset=0.0, seed=0):
    """The one builder of float64 test inputs: ``(x, w, b, r, dy)`` with x (``scale·N(0,1) + offset``) in the
    layout asked, γ and β per ``affine`` (``"both"``, ``"weight"``, ``"none"``), a residual of x's shape when
    asked (else ``None``) and an upstream gradient; x, γ, β and r require gradients."""
    torch.manual_seed(seed)
    C = shape[1]

    def leaf(*size):
        return torch.randn(size, dtype=torch.float64, device=DEVICE, requires_grad=True)

    x = _layout(torch.randn(shape, dtype=torch.float64, device=DEVICE) * scale + offset,
                channels_last).requires_grad_()
    w = leaf(C) if affine != "none" else None
    b = leaf(C) if affine == "both" else None
    r = leaf(*shape) if residual else None
    return x, w, b, r, torch.randn(shape, dtype=torch.float64, device=DEVICE)


# plans that force each path ('auto', the launcher's own choice, is what the module tests below use)
def _plan(kind, layout):
    if kind == "auto":
        return launch.choose_plan(layout, torch.device(DEVICE))
    if kind == "single":  # whole channels in registers, two channels per program (C = 7: a partial block)
        return launch.Plan(2, 1 << (layout.count - 1).bit_length(), single_read=True)
    if kind == "tiled":   # one program per channel block, looping over tiles (S = 65: a partial tile)
        return launch.Plan(4, 16, reduce_splits=1, elementwise_splits=1)
    if kind == "split":   # each channel block's tiles split across 3 (reductions) and 2 (elementwise) programs
        return launch.Plan(4, 8, reduce_splits=3, elementwise_splits=2)
    raise AssertionError(kind)


def _force_plan(monkeypatch, kind):
    real = launch.choose_plan
    monkeypatch.setattr(launch, "choose_plan",
                        lambda layout, device: real(layout, device) if kind == "auto" else _plan(kind, layout))
    return kind


@pytest.fixture(params=["single", "tiled", "split"])
def plan_kind(request, monkeypatch):
    return _force_plan(monkeypatch, request.param)


@pytest.fixture(params=["tiled", "split"])
def tiled_plan_kind(request, monkeypatch):
    """Evaluation and the elementwise passes always tile (a single-read plan is turned into a tiled one)."""
    return _force_plan(monkeypatch, request.param)


SHAPES = [  # (shape, channels_last)
    ((3, 7, 13, 5), False),
    ((3, 7, 13, 5), True),
    ((5, 1, 3, 3), False),       # C = 1
    ((2, 3), False),             # (N, C), two values per channel
    ((11, 7), False),
    ((4, 3, 11), False),         # 1-D with length
    ((4, 3, 11), True),
    ((2, 3, 2, 3, 5), False),    # 3-D
    ((2, 3, 2, 3, 5), True),
]


def _tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def _assert_close(actual, expected, dtype, what, scale=None):
    actual = _np(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert np.isfinite(actual).all(), f"{what}: non-finite values (an unwritten output?)"
    scale = np.abs(expected).max() + 1.0 if scale is None else scale
    err = np.abs(actual - expected).max() / scale
    assert err <= _tolerance(dtype), f"{what}: relative error {err:.3g} > {_tolerance(dtype)}"


# --------------------------------------------------------------------------------------------------
# training forward and backward against the float64 oracle, every path
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_train_matches_reference(plan_kind, shape, channels_last):
    _check_train(shape, channels_last, "both")


@pytest.mark.parametrize("affine", ["weight", "none"])
def test_train_without_bias_or_affine(plan_kind, affine):
    _check_train((3, 7, 13, 5), True, affine)


def _check_train(shape, channels_last, affine):
    x, w, b, _, dy = _inputs(shape, channels_last, affine, scale=2, offset=3, seed=sum(shape))
    y, mean, var = kernels.batch_norm_train(x, w, b, 1e-5)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)

    y_ref, cache = reference.forward(_np(x), None if w is None else _np(w), None if b is None else _np(b), 1e-5)
    dx_ref, dw_ref, db_ref = reference.backward(_np(dy), cache)
    _assert_close(y, y_ref, torch.float64, "y")
    _assert_close(mean, cache["mean"], torch.float64, "mean")
    _assert_close(var, cache["var"], torch.float64, "var")
    _assert_close(grads[0], dx_ref, torch.float64, "dx")
    if w is not None:
        _assert_close(grads[1], dw_ref, torch.float64, "dweight")
    if b is not None:
        _assert_close(grads[2], db_ref, torch.float64, "dbias")
    assert y.stride() == x.stride() and y.dtype == x.dtype
    assert grads[0].stride() == x.stride()
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reduced_precision_storage_accumulates_in_float32(plan_kind, dtype, channels_last):
    torch.manual_seed(1)
    shape = (4, 7, 5, 3)
    x = _layout(torch.randn(shape, device=DEVICE) * 3 + 1, channels_last).to(dtype).requires_grad_()
    w = torch.randn(7, device=DEVICE, requires_grad=True)
    b = torch.randn(7, device=DEVICE, requires_grad=True)
    y, mean, var = kernels.batch_norm_train(x, w, b, 1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)
    assert dx.dtype == dtype and dw.dtype == torch.float32

    # the oracle sees exactly the stored values, in float64
    y_ref, cache = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    dx_ref, dw_ref, db_ref = reference.backward(_np(dy), cache)
    _assert_close(mean, cache["mean"], torch.float32, "mean")
    _assert_close(var, cache["var"], torch.float32, "var")
    _assert_close(dw, dw_ref, torch.float32, "dweight", scale=np.abs(dw_ref).max() + 10)
    _assert_close(db, db_ref, torch.float32, "dbias", scale=np.abs(db_ref).max() + 10)
    _assert_close(y, y_ref, dtype, "y")
    _assert_close(dx, dx_ref, dtype, "dx")


def test_large_mean_does_not_cancel_the_variance(plan_kind):
    """|μ| ≫ σ in float32: the naive E[x²] − E[x]² subtracts numbers near μ² = 1e8, whose spacing (8)
    exceeds σ² = 1; shifted sums keep σ² to float32 precision."""
    torch.manual_seed(2)
    x = (1e4 + torch.randn(6, 5, 9, 7, dtype=torch.float64, device=DEVICE)).float()
    y, mean, var = kernels.batch_norm_train(x)
    y_ref, cache = reference.forward(_np(x), eps=1e-5)
    assert np.abs(_np(var) / cache["var"] - 1).max() < 1e-4
    assert np.abs(_np(y) - y_ref).max() < 1e-2


@pytest.mark.parametrize("kind,shape,channels_last", [("single", (4, 3, 5), False),
                                                     ("split", (3, 5, 2, 3), True)])
def test_gradcheck(monkeypatch, kind, shape, channels_last):
    _force_plan(monkeypatch, kind)
    x, w, b, _, _ = _inputs(shape, channels_last, seed=3)
    assert torch.autograd.gradcheck(lambda *a: kernels.batch_norm_train(*a)[0], (x, w, b), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("odd_strides", [False, True])
def test_double_backward_matches_torch(odd_strides):
    """Second derivatives through the ReLU-fused op (recomputed with PyTorch ops); with odd strides the
    kernels see a copy of x, and the second derivative must still reach x itself."""
    torch.manual_seed(4)
    base = torch.randn(3, 4, 5, dtype=torch.float64, device=DEVICE).permute(1, 0, 2)   # (4, 3, 5)
    x = (base if odd_strides else base.contiguous()).requires_grad_()
    assert (launch.layout_of(x) is None) == odd_strides
    w = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    v = torch.randn_like(x)

    def hvp(fn):
        (gx,) = torch.autograd.grad((fn(x, w, b) ** 3).sum(), [x], create_graph=True)
        return torch.autograd.grad((gx * v).sum(), [x, w, b])

    ours = hvp(lambda *a: kernels.batch_norm_train_relu(*a)[0])
    theirs = hvp(lambda *a: torch.relu(torch.nn.functional.batch_norm(a[0], None, None, a[1], a[2], True)))
    for a, t in zip(ours, theirs):
        _assert_close(a, _np(t), torch.float64, "second derivative")


@pytest.mark.parametrize("channels_last", [False, True])
def test_reads_stay_inside_the_tensors(plan_kind, channels_last):
    """x, the residual and dy are views into NaN-filled buffers: reading one element outside them (a
    missing mask, a wrong stride) would turn the results into NaN."""
    torch.manual_seed(14)
    shape = (3, 7, 13, 5)

    def padded(values):
        big = torch.full((shape[0] + 2,) + shape[1:], float("nan"), dtype=torch.float64, device=DEVICE)
        big = _layout(big, channels_last)
        big[1:-1] = values
        return big[1:-1]

    x = padded(torch.randn(shape, dtype=torch.float64, device=DEVICE)).requires_grad_()
    r = padded(torch.randn(shape, dtype=torch.float64, device=DEVICE)).requires_grad_()
    dy = padded(torch.randn(shape, dtype=torch.float64, device=DEVICE))
    assert launch.layout_of(x) is not None  # the kernels see the views themselves, not copies
    y, mean, var = kernels.batch_norm_train_add_relu(x, r)
    dx, dr = torch.autograd.grad(y, [x, r], dy)
    bn_ref, cache = reference.forward(_np(x))
    dz = _np(dy) * ((bn_ref + _np(r)) > 0)
    _assert_close(y, np.maximum(bn_ref + _np(r), 0), torch.float64, "y")
    _assert_close(dx, reference.backward(dz, cache)[0], torch.float64, "dx")
    _assert_close(dr, dz, torch.float64, "dresidual")


# --------------------------------------------------------------------------------------------------
# fused ReLU and add+ReLU
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,channels_last", [((3, 7, 13, 5), False), ((3, 7, 13, 5), True),
                                                  ((11, 7), False), ((2, 3, 2, 3, 5), True)])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_relu_matches_composition(plan_kind, shape, channels_last, residual):
    x, w, b, r, dy = _inputs(shape, channels_last, residual=residual, seed=5)
    inputs = [x, w, b] + ([r] if residual else [])
    if residual:
        y, mean, var = kernels.batch_norm_train_add_relu(x, r, w, b)
    else:
        y, mean, var = kernels.batch_norm_train_relu(x, w, b)
    grads = torch.autograd.grad(y, inputs, dy)

    bn_ref, cache = reference.forward(_np(x), _np(w), _np(b), 1e-5)
    pre = bn_ref + (_np(r) if residual else 0)
    mask = pre > 0
    dz = _np(dy) * mask
    dx_ref, dw_ref, db_ref = reference.backward(dz, cache)
    _assert_close(y, np.maximum(pre, 0), torch.float64, "y")
    for g, ref, name in zip(grads, [dx_ref, dw_ref, db_ref, dz], ["dx", "dweight", "dbias", "dresidual"]):
        _assert_close(g, ref, torch.float64, name)
    assert y.stride() == x.stride()


def test_fused_residual_with_another_layout_and_expanded_gradient():
    """A contiguous residual for a channels-last x, and dy = ones expanded (stride 0) from .sum()."""
    torch.manual_seed(6)
    x = torch.randn(3, 5, 4, 7, dtype=torch.float64, device=DEVICE).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(3, 5, 4, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y, _, _ = kernels.batch_norm_train_add_relu(x, r)
    dx, dr = torch.autograd.grad(y.sum(), [x, r])
    xt, rt = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    yt = torch.relu(torch.nn.functional.batch_norm(xt, None, None, training=True) + rt)
    dxt, drt = torch.autograd.grad(yt.sum(), [xt, rt])
    _assert_close(y, _np(yt), torch.float64, "y")
    _assert_close(dx, _np(dxt), torch.float64, "dx")
    _assert_close(dr, _np(drt), torch.float64, "dresidual")


def test_only_some_inputs_need_gradients():
    torch.manual_seed(7)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y, _, _ = kernels.batch_norm_train_add_relu(x, r, w, None)
    dy = torch.randn_like(y)
    dw, dr = torch.autograd.grad(y, [w, r], dy)
    bn_ref, cache = reference.forward(_np(x), _np(w), None, 1e-5)
    dz = _np(dy) * ((bn_ref + _np(r)) > 0)
    _assert_close(dw, reference.backward(dz, cache)[1], torch.float64, "dweight")
    _assert_close(dr, dz, torch.float64, "dresidual")


def test_only_the_residual_needs_a_gradient():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    r = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y, _, _ = kernels.batch_norm_train_add_relu(x, r)
    dy = torch.randn_like(y)
    (dr,) = torch.autograd.grad(y, [r], dy)
    _assert_close(dr, _np(dy) * ((reference.forward(_np(x))[0] + _np(r)) > 0), torch.float64, "dresidual")


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 5), c=st.integers(1, 9), spatial=st.lists(st.integers(1, 7), max_size=3),
       channels_last=st.booleans(), kind=st.sampled_from(["single", "tiled", "split"]),
       fused=st.sampled_from(["none", "relu", "add_relu"]))
def test_random_shapes_match_torch(n, c, spatial, channels_last, kind, fused):
    real = launch.choose_plan
    launch.choose_plan = lambda layout, device: _plan(kind, layout)
    launch.POISON = True
    try:
        shape = (n, c, *spatial)
        x, w, b, r, dy = _inputs(shape, channels_last, residual=True, seed=len(shape) + n * c)
        if fused == "add_relu":
            y = kernels.batch_norm_train_add_relu(x, r, w, b)[0]
        else:
            y = kernels.batch_norm_train(x, w, b, relu=fused == "relu")[0]
        yt = torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
        yt = torch.relu(yt + r) if fused == "add_relu" else torch.relu(yt) if fused == "relu" else yt
        inputs = [x, w, b] + ([r] if fused == "add_relu" else [])
        for a, t in zip([y, *torch.autograd.grad(y, inputs, dy)], [yt, *torch.autograd.grad(yt, inputs, dy)]):
            _assert_close(a, _np(t), torch.float64, f"{shape} {kind} {fused}")
    finally:
        launch.choose_plan = real
        launch.POISON = False


# --------------------------------------------------------------------------------------------------
# evaluation mode
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,channels_last", [((3, 7, 13, 5), False), ((3, 7, 13, 5), True),
                                                  ((11, 7), False), ((4, 3, 11), True)])
@pytest.mark.parametrize("fused", ["none", "relu", "add_relu"])
def test_eval_matches_reference(tiled_plan_kind, shape, channels_last, fused):
    x, w, b, r, dy = _inputs(shape, channels_last, residual=fused == "add_relu", seed=8)
    C = shape[1]
    rm = torch.randn(C, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(C, dtype=torch.float64, device=DEVICE) + 0.5
    y = kernels.batch_norm_eval(x, rm, rv, w, b, 1e-5, residual=r, relu=fused != "none")
    inputs = [x, w, b] + ([r] if r is not None else [])
    grads = torch.autograd.grad(y, inputs, dy)

    bn_ref, cache = reference.forward(_np(x), _np(w), _np(b), 1e-5, training=False,
                                      running_mean=_np(rm), running_var=_np(rv))
    pre = bn_ref + (_np(r) if r is not None else 0)
    dz = _np(dy) * (pre > 0) if fused != "none" else _np(dy)
    _assert_close(y, np.maximum(pre, 0) if fused != "none" else pre, torch.float64, "y")
    refs = list(reference.backward(dz, cache)) + [dz]
    for g, ref, name in zip(grads, refs, ["dx", "dweight", "dbias", "dresidual"]):
        _assert_close(g, ref, torch.float64, name)
    assert y.stride() == x.stride()


@pytest.mark.parametrize("fused", ["none", "add_relu"])
def test_eval_input_gradient_alone(fused):
    """No affine gradients wanted: dx is one elementwise pass, without the reductions."""
    torch.manual_seed(9)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w, b = torch.randn(5, dtype=torch.float64, device=DEVICE), torch.randn(5, dtype=torch.float64, device=DEVICE)
    rm, rv = torch.randn(5, dtype=torch.float64, device=DEVICE), torch.rand(5, dtype=torch.float64, device=DEVICE) + .5
    r = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True) if fused != "none" else None
    y = kernels.batch_norm_eval(x, rm, rv, w, b, residual=r, relu=r is not None)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + ([r] if r is not None else []), dy)
    bn_ref, cache = reference.forward(_np(x), _np(w), _np(b), training=False, running_mean=_np(rm),
                                      running_var=_np(rv))
    dz = _np(dy) * ((bn_ref + _np(r)) > 0) if r is not None else _np(dy)
    _assert_close(grads[0], reference.backward(dz, cache)[0], torch.float64, "dx")
    if r is not None:
        _assert_close(grads[1], dz, torch.float64, "dresidual")


def test_eval_gradcheck():
    torch.manual_seed(10)
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64, device=DEVICE), torch.rand(4, dtype=torch.float64, device=DEVICE) + .5
    assert torch.autograd.gradcheck(lambda *a: kernels.batch_norm_eval(a[0], rm, rv, a[1], a[2]), (x, w, b),
                                    fast_mode=True)


# --------------------------------------------------------------------------------------------------
# through bnlab.functional and bnlab.nn, against torch.nn.BatchNorm*
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,shape,channels_last", [
    ("BatchNorm1d", (9, 5), False), ("BatchNorm1d", (4, 5, 7), False),
    ("BatchNorm2d", (3, 7, 13, 5), True), ("BatchNorm2d", (3, 7, 13, 5), False),
    ("BatchNorm3d", (2, 3, 2, 3, 5), True)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_modules_match_torch_in_train_and_eval(cls, shape, channels_last, momentum):
    torch.manual_seed(11)
    ours = getattr(bnn, cls)(shape[1], momentum=momentum, backend="triton").to(DEVICE)
    theirs = getattr(torch.nn, cls)(shape[1], momentum=momentum).to(DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    for step in range(3):
        x = _layout(torch.randn(shape, device=DEVICE) * (step + 1) + step, channels_last)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        dy = torch.randn(shape, device=DEVICE)
        go = torch.autograd.grad(yo, [xo, ours.weight, ours.bias], dy)
        gt = torch.autograd.grad(yt, [xt, theirs.weight, theirs.bias], dy)
        torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
        for a, t in zip(go, gt):
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)

    ours.eval()
    theirs.eval()
    x = _layout(torch.randn(shape, device=DEVICE), channels_last)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
    dy = torch.randn(shape, device=DEVICE)
    for a, t in zip(torch.autograd.grad(yo, [xo, ours.weight, ours.bias], dy),
                    torch.autograd.grad(yt, [xt, theirs.weight, theirs.bias], dy)):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)


def test_functional_triton_backend_matches_torch_backend():
    torch.manual_seed(12)
    x = torch.randn(6, 4, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    stats = {k: (torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)) for k in ("torch", "triton")}
    out = {k: F.batch_norm(x, *stats[k], w, b, training=True, momentum=0.3, backend=k) for k in stats}
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-5)
    for a, t in zip(stats["triton"], stats["torch"]):
        torch.testing.assert_close(a, t)
    evals = {k: F.batch_norm(x, *stats[k], w, b, training=False, backend=k) for k in stats}
    torch.testing.assert_close(evals["triton"], evals["torch"], rtol=1e-5, atol=1e-5)
    assert out["triton"].is_contiguous(memory_format=torch.channels_last)


def test_nonfinite_batch_leaves_running_stats_alone():
    x = torch.randn(4, 3, 5, device=DEVICE)
    x[1, 2, 3] = float("nan")
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    F.batch_norm(x, rm, rv, training=True, backend="triton")
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))


def test_odd_strides_are_copied_not_misread():
    """A permuted tensor fits neither layout: the kernels see a contiguous copy, results are unchanged."""
    torch.manual_seed(13)
    base = torch.randn(5, 3, 4, 6, dtype=torch.float64, device=DEVICE)
    x = base.permute(0, 1, 3, 2).requires_grad_()   # (5, 3, 6, 4), strides fit no layout
    assert launch.layout_of(x) is None
    y, _, _ = kernels.batch_norm_train(x)
    y_ref, cache = reference.forward(_np(x))
    _assert_close(y, y_ref, torch.float64, "y")
    (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y) + x.detach())
    _assert_close(dx, reference.backward(_np(torch.ones_like(y) + x.detach()), cache)[0], torch.float64, "dx")


@pytest.mark.parametrize("C,dtype", [(7, torch.float32), (1500, torch.float32), (5, torch.float16),
                                     (3, torch.float64)])
def test_running_stats_update_matches_reference(C, dtype):
    """C = 1500 spans two of the kernel's channel blocks; float16 running statistics are updated in
    float32 and rounded once."""
    torch.manual_seed(15)
    x = torch.randn(6, C, dtype=torch.float64) * 2 + 1
    _, cache = reference.forward(x.numpy())
    mean = torch.tensor(cache["mean"], dtype=torch.float32, device=DEVICE)
    var = torch.tensor(cache["var"], dtype=torch.float32, device=DEVICE)
    rm = torch.randn(C, dtype=dtype, device=DEVICE)
    rv = (torch.rand(C, dtype=dtype, device=DEVICE) + 0.5)
    expected_mean, expected_var = reference.update_running(_np(rm), _np(rv), cache, momentum=0.3)
    finite = kernels.update_running_stats(mean, var, rm, rv, 6, 0.3)
    assert finite.dtype == torch.bool and finite.dim() == 0
    assert finite.view(torch.uint8).item() == 1
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    np.testing.assert_allclose(_np(rm), expected_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(_np(rv), expected_var, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_running_stats_update_skips_a_nonfinite_batch(bad):
    mean, var = torch.randn(1100, device=DEVICE), torch.rand(1100, device=DEVICE)
    var[1050] = bad  # in the second channel block: the decision covers every channel
    rm, rv = torch.randn(1100, device=DEVICE), torch.rand(1100, device=DEVICE)
    before = rm.clone(), rv.clone()
    finite = kernels.update_running_stats(mean, var, rm, rv, 10, 0.1)
    assert finite.view(torch.uint8).item() == 0
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_running_stats_update_errors():
    z = torch.zeros(3, device=DEVICE)
    with pytest.raises(ValueError, match="running_var must be a"):
        kernels.update_running_stats(z, z, z.clone(), torch.zeros(4, device=DEVICE), 5, 0.1)
    with pytest.raises(ValueError, match="count must be at least 2"):
        kernels.update_running_stats(z, z, z.clone(), z.clone(), 1, 0.1)


# --------------------------------------------------------------------------------------------------
# plumbing: supports(), errors, the poison switch
# --------------------------------------------------------------------------------------------------

def test_supports():
    assert kernels.supports(torch.randn(4, 3, device=DEVICE))
    assert kernels.supports(torch.randn(2, 3, 4, 5, 6, device=DEVICE, dtype=torch.bfloat16))
    assert not kernels.supports(torch.randn(4, device=DEVICE))                    # 1-D
    assert not kernels.supports(torch.randn(1, 2, 3, 4, 5, 6, device=DEVICE))     # 6-D
    assert not kernels.supports(torch.zeros(4, 3, dtype=torch.int32, device=DEVICE))
    assert not kernels.supports(torch.empty(0, 3, device=DEVICE))
    assert F.backend_for(torch.randn(4, 3, device=DEVICE), "triton") == "triton"


@pytest.mark.parametrize("call,error,text", [
    (lambda: kernels.batch_norm_train(torch.randn(4, 3, device=DEVICE), torch.ones(4, device=DEVICE)),
     ValueError, "weight must have shape (3,)"),
    (lambda: kernels.batch_norm_train(torch.ones(4, 3, dtype=torch.int64, device=DEVICE)), TypeError, "float16"),
    (lambda: kernels.batch_norm_train(torch.randn(4, device=DEVICE)), ValueError, "expected 2D to 5D"),
    (lambda: kernels.batch_norm_train_add_relu(torch.randn(4, 3, device=DEVICE), torch.randn(4, 1, device=DEVICE)),
     ValueError, "residual must have x's shape"),
    (lambda: kernels.batch_norm_train_add_relu(torch.randn(4, 3, device=DEVICE),
                                         torch.randn(4, 3, device=DEVICE, dtype=torch.float64)),
     TypeError, "residual must have x's dtype"),
    (lambda: kernels.batch_norm_train(torch.randn(4, 3, device=DEVICE), residual=torch.randn(4, 3, device=DEVICE)),
     ValueError, "only fused together with relu=True"),
    (lambda: kernels.batch_norm_eval(torch.randn(4, 3, device=DEVICE), torch.zeros(2, device=DEVICE),
                                     torch.ones(3, device=DEVICE)), ValueError, "running_mean must be a (3,)"),
    (lambda: kernels.batch_norm_train(torch.empty(0, 3, device=DEVICE)), ValueError, "empty"),
])
def test_errors_name_the_argument(call, error, text):
    with pytest.raises(error, match=None) as info:
        call()
    assert text in str(info.value)


def test_poison_switch_fills_outputs_with_nan():
    assert torch.isnan(launch._alloc((3,), torch.float32, DEVICE)).all()
    assert torch.isnan(launch._alloc_like(torch.zeros(2, 3, device=DEVICE, dtype=torch.bfloat16))).all()


def test_plans_cover_both_regimes():
    """Many channels and few values: one program per channel block suffices; few channels and many
    values: the reduction is split across programs (the GPU would otherwise starve)."""
    few_channels = launch.Layout(1, 16, 512 * 32 * 32, 0, 1, 16)
    plan = launch.choose_plan(few_channels, torch.device("cpu"))
    grid = launch._grid(few_channels, plan, 0, torch.device("cpu"), per_sm=4)
    assert not plan.single_read and grid.splits > 1 and grid.c_blocks == 1
    small = launch.Layout(1, 64, 32, 0, 1, 64)
    assert launch.choose_plan(small, torch.device("cpu")).single_read


def test_auto_dispatch_heuristic(monkeypatch):
    """backend="auto" keeps tensors below AUTO_MIN_NUMEL on PyTorch; "triton" still honours them."""
    monkeypatch.setattr(kernels, "AUTO_MIN_NUMEL", 100)
    small, large = torch.randn(4, 3, device=DEVICE), torch.randn(10, 3, 2, 2, device=DEVICE)
    assert not kernels.preferred(small) and kernels.preferred(large)
    assert F.backend_for(small, "triton") == "triton"
    if small.is_cuda:
        assert F.backend_for(small, "auto") == "torch" and F.backend_for(large, "auto") == "triton"
    else:
        assert F.backend_for(large, "auto") == "torch"  # auto never runs the interpreter


# --------------------------------------------------------------------------------------------------
# the GPU compiler, without a GPU: every kernel compiles for sm_90, with 16-byte loads and stores
# --------------------------------------------------------------------------------------------------

_COMPILE_FOR_HOPPER = r'''
import json, os, re, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bnlab.kernels import bn_kernels as K

target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)
out = {}

def build(label, fn, args, consts, num_warps=8):
    """What the JIT compiles for a launch: pointers and sizes divisible by 16, unit strides constant."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = args.get(name, "i32")
        if name in args.get("div16", ()) or sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                            options=backend.parse_options({"num_warps": num_warps}).__dict__)
    ptx = kernel.asm["ptx"]
    out[label] = {"loads": sorted(set(re.findall(r"ld\.global[.a-z0-9]*", ptx))),
                  "stores": sorted(set(re.findall(r"st\.global[.a-z0-9]*", ptx)))}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
        if found:
            out[label]["registers"], out[label]["stack"], out[label]["local"] = map(int, found.groups())

bf16, f32, f64 = "*bf16", "*fp32", "*fp64"
acc = dict(ACC=tl.float32)
# channels-last (128, 64, 56, 56): strides (0, 1, 64); contiguous: strides (200704, 3136, 1)
cl = dict(div16=("stride_b", "stride_s", "C", "S"))
ct = dict(div16=("stride_b", "stride_c", "C", "S"))
build("stats cl", K._stats_partial_kernel, dict(X=bf16, PART=f32, **cl),
      dict(stride_c=1, BLOCK_C=64, BLOCK_S=64, **acc))
build("normalize+add+relu cl", K._normalize_kernel,
      dict(X=bf16, Y=bf16, RES=bf16, MEAN=f32, VAR=f32, W=f32, BIAS=f32, eps="fp32", **cl),
      dict(stride_c=1, HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True, BLOCK_C=64, BLOCK_S=64,
           **acc))
build("backward partial relu cl", K._backward_partial_kernel,
      dict(X=bf16, DY=bf16, Y=bf16, DZ=bf16, MEAN=f32, PART=f32, **cl),
      dict(stride_c=1, RELU=True, STORE_DZ=True, BLOCK_C=64, BLOCK_S=64, **acc))
build("dx contiguous", K._backward_dx_kernel, dict(X=bf16, DY=bf16, Y=bf16, DX=bf16, MEAN=f32, COEF=f32, **ct),
      dict(stride_s=1, RELU=True, TRAINING=True, BLOCK_C=4, BLOCK_S=1024, **acc))
build("stats contiguous", K._stats_partial_kernel, dict(X=bf16, PART=f32, **ct),
      dict(stride_s=1, BLOCK_C=4, BLOCK_S=1024, **acc))
build("stats finalize", K._stats_finalize_kernel, dict(PART=f32, MEAN=f32, VAR=f32), dict(BLOCK_C=256), 4)
build("backward finalize fp64", K._backward_finalize_kernel,
      dict(PART=f64, VAR=f64, W=f64, DW=f64, DB=f64, COEF=f64, eps="fp32"),
      dict(ACC=tl.float64, HAS_WEIGHT=True, STORE_DW=True, STORE_DB=True, TRAINING=True, BLOCK_C=256), 4)
build("running stats", K._running_stats_kernel, dict(MEAN=f32, VAR=f32, RUNNING_MEAN=f32, RUNNING_VAR=f32,
                                                     FINITE="*u8", momentum="fp32"),
      dict(BLOCK_C=1024, **acc), 4)
build("small forward", K._small_forward_kernel,
      dict(X=bf16, Y=bf16, RES=bf16, W=f32, BIAS=f32, MEAN=f32, VAR=f32, eps="fp32"),
      dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True, BLOCK_C=16, BLOCK_R=256, **acc))
build("small backward", K._small_backward_kernel,
      dict(X=bf16, DY=bf16, Y=bf16, DX=bf16, DZ=bf16, MEAN=f32, VAR=f32, W=f32, DW=f32, DB=f32, eps="fp32"),
      dict(HAS_WEIGHT=True, RELU=True, STORE_DX=True, STORE_DZ=True, STORE_DW=True, STORE_DB=True,
           BLOCK_C=16, BLOCK_R=256, **acc))
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper_with_wide_accesses():
    """The interpreter accepts programs the GPU compiler may reject; this compiles each kernel for sm_90
    (no GPU needed) with the launcher's tile sizes, and checks that the tiled passes move 16 bytes per
    load and store in both layouts (what lets a memory-bound kernel approach the bandwidth floor) and that
    no kernel spills registers."""
    import json
    import subprocess
    import sys
    try:
        from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("ptxas is not available")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result) == 10
    for label in ("stats cl", "normalize+add+relu cl", "backward partial relu cl", "dx contiguous",
                  "stats contiguous"):
        assert any(".v4." in op for op in result[label]["loads"]), (label, result[label])
    for label in ("normalize+add+relu cl", "dx contiguous"):
        assert any(".v4." in op for op in result[label]["stores"]), (label, result[label])
    # the launcher's tile sizes (16 values per thread) fit in registers: nothing spills to local memory
    for label, info in result.items():
        if "stack" in info:
            assert info["stack"] == 0 and info["local"] == 0, (label, info)
