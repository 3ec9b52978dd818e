"""bnlab.functional against the float64 NumPy oracle (bnlab.reference) and torch.nn.functional.batch_norm."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnlab import functional as F
from bnlab import reference
from bnlab.functional import batch_norm, batch_norm_stats, check_input

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# tolerance on O(1) outputs and gradients: the final rounding to the storage dtype dominates
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 8e-2}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _np(t):
    return t.detach().double().cpu().numpy().copy()


@st.composite
def bn_cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    n = draw(st.integers(2, 5))
    c = draw(st.sampled_from([1, 2, 3, 5, 7]))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(ndim - 2))
    return dict(
        shape=(n, c) + spatial,
        dtype=draw(st.sampled_from(DTYPES)),
        channels_last=ndim >= 4 and draw(st.booleans()),
        affine=draw(st.sampled_from(["both", "weight_only", "none"])),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.9])),
        mean=draw(st.sampled_from([0.0, 3.0, -50.0])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(bn_cases())
def test_train_steps_match_reference(case):
    """Several consecutive training steps: output, dx, dγ, dβ and running statistics vs the float64 oracle."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype, c = case["shape"], case["dtype"], case["shape"][1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # parameters stay float32 for half inputs
    weight = torch.randn(c, generator=g, dtype=pdt) + 1 if case["affine"] != "none" else None
    bias = torch.randn(c, generator=g, dtype=pdt) if case["affine"] == "both" else None
    running = ((torch.randn(c, generator=g, dtype=pdt), torch.rand(c, generator=g, dtype=pdt) + 0.5)
               if case["track"] else (None, None))
    ref_running = tuple(None if r is None else _np(r) for r in running)
    atol = ATOL[dtype]
    for _ in range(3):
        x = (torch.randn(shape, generator=g) * 2 + case["mean"]).to(dtype)
        if case["channels_last"]:
            x = x.contiguous(memory_format=CHANNELS_LAST[len(shape)])
        x.requires_grad_(True)
        params = [p.requires_grad_(True) for p in (weight, bias) if p is not None]
        y = batch_norm(x, *running, weight, bias, training=True, momentum=case["momentum"])
        dy = torch.randn(shape, generator=g).to(dtype)
        grads = torch.autograd.grad(y, [x] + params, dy)

        y_ref, cache = reference.forward(_np(x), None if weight is None else _np(weight),
                                         None if bias is None else _np(bias), eps=1e-5)
        dx_ref, dgamma_ref, dbeta_ref = reference.backward(_np(dy), cache)
        assert y.dtype == dtype and y.shape == x.shape
        if case["channels_last"]:
            assert y.is_contiguous(memory_format=CHANNELS_LAST[len(shape)])
        # scale tolerances by the size of the quantity (large dγ sums over many values)
        np.testing.assert_allclose(_np(y), y_ref, atol=atol * max(1, np.abs(y_ref).max()), rtol=0)
        np.testing.assert_allclose(_np(grads[0]), dx_ref, atol=atol * max(1, np.abs(dx_ref).max()) * 4, rtol=0)
        if weight is not None:
            np.testing.assert_allclose(_np(grads[1]), dgamma_ref,
                                       atol=atol * max(1, np.abs(dgamma_ref).max()) * 4, rtol=0)
        if bias is not None:
            np.testing.assert_allclose(_np(grads[2]), dbeta_ref, atol=atol * max(1, np.abs(dbeta_ref).max()) * 4,
                                       rtol=0)
        if case["track"]:
            ref_running = reference.update_running(*ref_running, cache, case["momentum"])
            np.testing.assert_allclose(_np(running[0]), ref_running[0], rtol=1e-5, atol=atol)
            np.testing.assert_allclose(_np(running[1]), ref_running[1], rtol=1e-4, atol=atol)


@given(bn_cases())
def test_eval_matches_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype, c = case["shape"], case["dtype"], case["shape"][1]
    weight, bias = torch.randn(c, generator=g) + 1, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=CHANNELS_LAST[len(shape)])
    x.requires_grad_(True)
    y = batch_norm(x, rm, rv, weight, bias, training=False)
    dy = torch.randn(shape, generator=g).to(dtype)
    if case["channels_last"]:
        dy = dy.contiguous(memory_format=CHANNELS_LAST[len(shape)])
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref, cache = reference.forward(_np(x), _np(weight), _np(bias), training=False,
                                     running_mean=_np(rm), running_var=_np(rv))
    dx_ref, _, _ = reference.backward(_np(dy), cache)
    np.testing.assert_allclose(_np(y), y_ref, atol=ATOL[dtype] * max(1, np.abs(y_ref).max()), rtol=0)
    np.testing.assert_allclose(_np(dx), dx_ref, atol=ATOL[dtype] * max(1, np.abs(dx_ref).max()), rtol=0)
    if case["channels_last"]:
        assert y.is_contiguous(memory_format=CHANNELS_LAST[len(shape)])
        assert dx.is_contiguous(memory_format=CHANNELS_LAST[len(shape)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_torch_functional(dtype, layout):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 7, 3, dtype=dtype) * 4 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype)
    ours_stats, torch_stats = (torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype)), \
        (torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype))
    outs = []
    for impl, stats in ((batch_norm, ours_stats), (torch.nn.functional.batch_norm, torch_stats)):
        xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = impl(xi, *stats, wi, bi, training=True, momentum=0.3, eps=1e-3)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=dtype)).reshape(y.shape))
        outs.append((y, xi.grad, wi.grad, bi.grad) + stats)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, **tol)
    assert outs[0][1].stride() == outs[1][1].stride()  # dx in the same memory format as torch's


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(training, affine):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    params = (torch.randn(3, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True)) if affine else (None, None)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x, *p):
        w, b = p if affine else (None, None)
        return batch_norm(x, None if training else rm, None if training else rv, w, b, training=training)

    inputs = (x,) + (params if affine else ())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_hessian_vector_product_matches_torch():
    """The study needs Hessian-vector products through BN: compare with PyTorch's BN."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64)
    v = torch.randn(3, 3, dtype=torch.float64)

    def hvp(impl):
        wr = w.clone().requires_grad_(True)
        h = torch.einsum("ncl,dc->ndl", x, wr)
        loss = (impl(h, None, None, training=True) ** 3).sum()
        (g,) = torch.autograd.grad(loss, wr, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), wr)
        return hv

    torch.testing.assert_close(hvp(batch_norm), hvp(torch.nn.functional.batch_norm), rtol=1e-9, atol=1e-9)


def test_saves_only_the_input_full_size():
    """Memory: the autograd graph keeps the input and per-channel vectors, no other full-size tensor."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        batch_norm(x, None, None, w, b, training=True)
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()
    assert all(t.numel() <= 3 for t in saved if t.numel() != x.numel())


def test_large_mean_small_std_is_accurate():
    """Mean 1e4, std 1e-2 in float32: our error against float64 is no worse than PyTorch's."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8) * 1e-2 + 1e4
    xd = x.double()
    ref = (xd - xd.mean((0, 2, 3), keepdim=True)) / torch.sqrt(xd.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    ours = (batch_norm(x, None, None, training=True).double() - ref).abs().max().item()
    theirs = (torch.nn.functional.batch_norm(x, None, None, training=True).double() - ref).abs().max().item()
    assert ours <= theirs
    assert ours < 1e-3
    # the running variance too (unbiased, EMA from 1.0 with momentum 1 = the batch's variance)
    rm, rv = torch.zeros(4), torch.ones(4)
    batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv.double(), xd.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=0)
    torch.testing.assert_close(rm.double(), xd.mean((0, 2, 3)), rtol=1e-7, atol=0)


def test_constant_channel_gives_bias_and_finite_gradients():
    x = torch.full((6, 2, 3, 3), 7.25, requires_grad=True)
    w, b = torch.tensor([2.0, 3.0], requires_grad=True), torch.tensor([0.5, -1.0], requires_grad=True)
    y = batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(y, b.detach().reshape(1, 2, 1, 1).expand_as(y).contiguous())
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad, torch.zeros(2))  # x̂ = 0 everywhere


def test_float16_large_magnitudes_do_not_overflow():
    """Values near float16's range: squares overflow float16, so statistics must be taken in float32."""
    torch.manual_seed(0)
    x = (torch.randn(16, 3, 4, 4) * 2e4).clamp(-6e4, 6e4).half()
    y = batch_norm(x, None, None, training=True)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    y_ref, _ = reference.forward(_np(x))
    np.testing.assert_allclose(_np(y), y_ref, atol=1e-2)


def test_half_input_keeps_float32_running_stats():
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(8, 3, 4).bfloat16()
    y = batch_norm(x, rm, rv, training=True)
    assert y.dtype == torch.bfloat16 and rm.dtype == torch.float32
    _, cache = reference.forward(_np(x))
    np.testing.assert_allclose(rv.numpy(), 0.9 + 0.1 * cache["var_unbiased"], rtol=1e-5)


def test_empty_batch_behaves_like_torch():
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, w, b, training=True)
    y_torch = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
    assert y.shape == y_torch.shape == x.shape
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    y.sum().backward()  # still part of the graph
    assert w.grad is not None and torch.equal(w.grad, torch.zeros(3))


def test_nonfinite_batch_does_not_poison_running_stats():
    rm, rv = torch.zeros(2), torch.ones(2)
    x = torch.randn(4, 2, 3)
    x[1, 0, 2] = float("nan")
    out = batch_norm_stats(x, rm, rv, training=True)
    assert not bool(out.finite)
    assert torch.equal(out.running_mean, rm) and torch.equal(out.running_var, rv)
    assert torch.isnan(out.output[:, 0]).all()        # the caller still sees the NaNs
    y = batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y).any() and torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))


def test_pure_form_does_not_mutate_and_matches_in_place_form():
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(5, 3, 2) + 2
    out = batch_norm_stats(x, rm, rv, training=True, momentum=0.2)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    y = batch_norm(x, rm, rv, training=True, momentum=0.2)
    torch.testing.assert_close(y, out.output)
    torch.testing.assert_close(rm, out.running_mean)
    torch.testing.assert_close(rv, out.running_var)


def test_vmap_over_an_ensemble_equals_a_loop():
    """torch.func.vmap over models: each member normalizes its own batch with its own statistics."""
    torch.manual_seed(0)
    xs = torch.randn(4, 6, 3, 5) * 3 + 1
    ws, bs = torch.randn(4, 3), torch.randn(4, 3)
    rms, rvs = torch.zeros(4, 3), torch.ones(4, 3)

    def member(x, w, b, rm, rv):
        out = batch_norm_stats(x, rm, rv, w, b, training=True)
        return out.output, out.running_mean, out.running_var

    ys, new_rm, new_rv = torch.func.vmap(member)(xs, ws, bs, rms, rvs)
    for i in range(4):
        rm, rv = torch.zeros(3), torch.ones(3)
        y = torch.nn.functional.batch_norm(xs[i], rm, rv, ws[i], bs[i], training=True)
        torch.testing.assert_close(ys[i], y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_rm[i], rm)
        torch.testing.assert_close(new_rv[i], rv)


def test_func_grad_and_per_sample_vmap_of_grad():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)

    def loss(w, x):
        return (batch_norm(x, None, None, w, None, training=True) ** 2 * torch.arange(4.0, dtype=x.dtype)).sum()

    g = torch.func.grad(loss)(w, x)
    w_ref = w.clone().requires_grad_(True)
    (torch.nn.functional.batch_norm(x, None, None, w_ref, None, training=True) ** 2
     * torch.arange(4.0, dtype=x.dtype)).sum().backward()
    torch.testing.assert_close(g, w_ref.grad)
    xs = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    gs = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xs)
    for i in range(2):
        torch.testing.assert_close(gs[i], torch.func.grad(loss)(w, xs[i]))


@pytest.mark.parametrize("bad, error, text", [
    (torch.randn(3), ValueError, r"expected at least 2D input \(N, C, \*\) \(got 1D input\)"),
    (torch.ones(4, 3, dtype=torch.long), TypeError, "expected a floating-point input"),
    (torch.randn(4, 5, 2), ValueError, r"expected input with 3 channels in dimension 1 \(got 5 channels"),
    (torch.randn(1, 3), ValueError, "expected more than 1 value per channel when training, got 1 value"),
])
def test_functional_errors(bad, error, text):
    with pytest.raises(error, match=text):
        batch_norm(bad, None, None, torch.ones(3), torch.zeros(3), training=True)


def test_error_suggests_drop_last_or_eval():
    with pytest.raises(ValueError, match=r"drop_last=True.*\.eval\(\)"):
        check_input(torch.randn(1, 4, 1, 1), 4, training=True, name="BatchNorm2d(4)")


def test_eval_requires_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        batch_norm(torch.randn(4, 3), None, None, training=True, backend="cudnn")


def test_no_call_into_torch_batch_norm(monkeypatch):
    """Ours is ours: fail loudly if any path reaches PyTorch's batch_norm."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.batch_norm was called")
    monkeypatch.setattr(torch, "batch_norm", forbidden)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", forbidden)
    x = torch.randn(4, 3, 2, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True).sum().backward()
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False).sum().backward()


# --------------------------------------------------------------------------------------------------
# the statistics core: moments, merge, normalize, the running-statistics update (float64 NumPy oracle)
# --------------------------------------------------------------------------------------------------

from bnlab import functional as BF  # noqa: E402


def _np_moments(x: np.ndarray):
    per_channel = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)          # (C, values)
    mean = per_channel.mean(1)
    return per_channel.shape[1], mean, ((per_channel - mean[:, None]) ** 2).sum(1)


@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 6), (3, 4, 5, 2)])
def test_moments_match_float64_numpy_with_a_large_mean(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 1e-2 + 1e4).float()   # float32, |μ|/σ = 1e6
    count, mean, m2 = _np_moments(x.double().numpy())                     # the oracle sees the same values
    got = BF.moments(x)
    assert got.count == count and got.mean.dtype == torch.float32
    np.testing.assert_allclose(got.mean.double().numpy(), mean, rtol=1e-7)
    np.testing.assert_allclose(got.var.double().numpy(), m2 / count, rtol=1e-4)
    empty = BF.moments(torch.empty(0, 3))
    assert empty.count == 0 and empty.mean.shape == (3,)


def test_merge_moments_equals_moments_of_the_union():
    torch.manual_seed(1)
    parts = [torch.randn(n, 4, 3, dtype=torch.float64) * (i + 1) + 3 * i for i, n in enumerate((2, 5, 1, 9))]
    count, mean, m2 = _np_moments(torch.cat(parts).numpy())
    merged = BF.merge_moments(*(BF.moments(p) for p in parts), BF.moments(torch.empty(0, 4, 3, dtype=torch.float64)))
    assert merged.count == count
    np.testing.assert_allclose(merged.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2.numpy(), m2, rtol=1e-12)


def test_normalize_matches_torch_and_keeps_the_memory_format():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    mean, var, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3)
    y = BF.normalize(x, mean, var, w, b, eps=1e-3)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, mean, var, w, b, False, 0.0, 1e-3))


def test_update_running_stats_by_hand_and_skips_nonfinite_or_overflowing_updates():
    rm, rv = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5])
    mean, var = torch.tensor([3.0, 0.0]), torch.tensor([2.0, 1.0])
    new_mean, new_var, finite = BF.update_running_stats(rm, rv, mean, var, 5, 0.25)
    torch.testing.assert_close(new_mean, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0]))
    torch.testing.assert_close(new_var, torch.tensor([0.75 * 4 + 0.25 * 2 * 5 / 4, 0.75 * 0.5 + 0.25 * 5 / 4]))
    assert bool(finite)
    for bad_mean, bad_var, buffers in ((torch.tensor([float("nan"), 0.0]), var, (rm, rv)),
                                       (mean, torch.tensor([1e6, 1.0]), (rm.half(), rv.half()))):  # fp16 overflow
        same_mean, same_var, finite = BF.update_running_stats(*buffers, bad_mean, bad_var, 5, 0.25)
        assert not bool(finite)
        torch.testing.assert_close(same_mean, buffers[0]) and torch.testing.assert_close(same_var, buffers[1])


# --------------------------------------------------------------------------------------------------
# batch_norm_backward: the closed form for given statistics, and its distributed form
# --------------------------------------------------------------------------------------------------

def _autograd_reference(x, weight, bias, dy, eps):
    """dx, dγ, dβ of plain float64 ops (batch mean and biased variance) by autograd: the oracle."""
    x, weight, bias = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    return torch.autograd.grad(y, (x, weight, bias), dy.double())


@pytest.mark.parametrize("shape", [(6, 3), (5, 4, 7), (3, 2, 5, 4)])
def test_batch_norm_backward_matches_autograd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    weight, bias = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    dy = torch.randn_like(x)
    dims = [0] + list(range(2, x.dim()))
    got = F.batch_norm_backward(dy, x, x.mean(dims), x.var(dims, unbiased=False), weight, 1e-5)
    for g, e in zip(got, _autograd_reference(x, weight, bias, dy, 1e-5)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_batch_norm_backward_of_a_batch_split_across_shards_is_the_full_batch_backward():
    """Three 'processes' hold shards of one batch: with the global statistics, the global count and
    ``reduce`` summing the shards' sums, each shard's dx is its slice of the full batch's dx, and the dγ,
    dβ of the shards add up to the full batch's (as DDP's gradient reduction would)."""
    torch.manual_seed(1)
    x = torch.randn(9, 4, 5, dtype=torch.float64) * 2 - 3
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    dy = torch.randn_like(x)
    shards = [slice(0, 2), slice(2, 7), slice(7, 9)]
    mean, var = x.mean((0, 2)), x.var((0, 2), unbiased=False)
    # what an all_reduce of each shard's (Σdy, Σdy·x̂) would give every process
    xhat = (x - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + 1e-5)
    totals = (dy.sum((0, 2)), (dy * xhat).sum((0, 2)))
    calls = []

    def reduce(sum_dy, sum_dy_xhat):
        calls.append((sum_dy.shape, sum_dy_xhat.shape))
        return totals

    parts = [F.batch_norm_backward(dy[s], x[s], mean, var, weight, 1e-5, count=9 * 5, reduce=reduce)
             for s in shards]
    dx_ref, dw_ref, db_ref = _autograd_reference(x, weight, bias, dy, 1e-5)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), dx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(p[1] for p in parts), dw_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(p[2] for p in parts), db_ref, rtol=1e-10, atol=1e-10)
    assert calls == [((4,), (4,))] * 3


def test_batch_norm_backward_keeps_the_memory_format_and_skips_what_is_not_needed():
    x = torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last)
    dx, dw, db = F.batch_norm_backward(torch.randn_like(x), x, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False),
                                       None, needs_input_grad=(True, False, False), has_bias=False)
    assert dx.is_contiguous(memory_format=torch.channels_last) and dw is None and db is None
