"""The fused CPU kernel (bnlab.kernels.cpu) against the float64 NumPy oracle and torch.nn.functional.batch_norm,
its fallbacks to the composed math, and its on-disk build cache."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bnlab import reference
from bnlab.errors import UserError
from bnlab.functional import batch_norm, batch_norm_stats
from bnlab.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"no C compiler: {cpu.load_error()}")

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _np(t):
    return t.detach().double().numpy()


@pytest.fixture
def calls(monkeypatch):
    """Count the kernel's forward and backward calls (the real ones still run)."""
    counts = {"forward": 0, "backward": 0}
    for name in counts:
        real = getattr(cpu, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(cpu, name, spy)
    return counts


@pytest.fixture
def fresh_state():
    """Let a test rebuild or fail to build; afterwards the next call loads the library again (lazily, once
    monkeypatch has restored the environment — loading here would still see the test's CC)."""
    cpu.reset()
    yield
    cpu.reset()


def _input(shape, dtype, layout, mean=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=CHANNELS_LAST[len(shape)])
    if layout == "channels_last_1d":  # (N, C, L) stored as (N, L, C)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


CASES = [((3, 7, 13, 5), "contiguous"), ((3, 7, 13, 5), "channels_last"), ((5, 3), "contiguous"),
         ((4, 6, 11), "contiguous"), ((2, 3, 4, 5, 6), "contiguous"), ((2, 3, 4, 5, 6), "channels_last"),
         ((16, 40, 3, 3), "channels_last"), ((2, 5, 700), "contiguous"), ((7, 2, 1, 1), "contiguous"),
         ((4, 6, 11), "channels_last_1d")]


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, layout", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference_and_torch(shape, layout, dtype, affine, kernel, calls, monkeypatch):
    """Output, batch statistics, running statistics and every gradient vs the float64 oracle and torch, on
    both paths: the kernel and (BNLAB_CPU_KERNEL=0) the composed math."""
    if not kernel:
        monkeypatch.setenv("BNLAB_CPU_KERNEL", "0")
    c = shape[1]
    x = _input(shape, dtype, layout)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(c, generator=g, dtype=dtype) + 1).requires_grad_() if affine else None
    bias = torch.randn(c, generator=g, dtype=dtype).requires_grad_() if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    params = [p for p in (weight, bias) if p is not None]

    xo = x.clone().requires_grad_()
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    out = batch_norm_stats(xo, rm, rv, weight, bias, training=True, momentum=0.3)
    grads = torch.autograd.grad(out.output, [xo] + params, dy)
    assert calls == ({"forward": 1, "backward": 1} if kernel else {"forward": 0, "backward": 0})

    y_ref, cache = reference.forward(_np(x), None if weight is None else _np(weight),
                                     None if bias is None else _np(bias))
    grads_ref = reference.backward(_np(dy), cache)
    rm_ref, rv_ref = reference.update_running(np.zeros(c), np.ones(c), cache, 0.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, ref in [(out.output, y_ref), (out.batch_mean, cache["mean"]), (out.batch_var, cache["var"]),
                      (out.running_mean, rm_ref), (out.running_var, rv_ref), (grads[0], grads_ref[0])] \
            + list(zip(grads[1:], grads_ref[1:])):
        np.testing.assert_allclose(_np(ours), ref, atol=tol * max(1, np.abs(ref).max()), rtol=0)

    xt = x.clone().requires_grad_()
    rm_t, rv_t = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    y_t = torch.nn.functional.batch_norm(xt, rm_t, rv_t, weight, bias, training=True, momentum=0.3)
    grads_t = torch.autograd.grad(y_t, [xt] + params, dy)
    for ours, theirs in zip((out.output, out.running_mean, out.running_var) + grads, (y_t, rm_t, rv_t) + grads_t):
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * 10)
    if layout == "channels_last_1d":  # torch returns these contiguous; ours, like the composed math, keeps x's
        assert out.output.stride() == x.stride() and grads[0].stride() == x.stride()
    else:
        assert out.output.stride() == y_t.stride() and grads[0].stride() == grads_t[0].stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_both_paths_agree_and_the_switch_turns_the_kernel_off(layout, monkeypatch, calls):
    x = _input((6, 5, 7, 3), torch.float64, layout).requires_grad_()
    w, b = torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    fused = torch.autograd.grad(batch_norm(x, None, None, w, b, training=True), (x, w), dy)
    monkeypatch.setenv("BNLAB_CPU_KERNEL", "0")
    composed = torch.autograd.grad(batch_norm(x, None, None, w, b, training=True), (x, w), dy)
    assert calls == {"forward": 1, "backward": 1}          # only the first pass used the kernel
    for a, b_ in zip(fused, composed):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("1", True), ("", True)])
def test_switch_values(value, on, monkeypatch):
    monkeypatch.setenv("BNLAB_CPU_KERNEL", value)
    assert cpu.enabled() is on and cpu.usable(torch.randn(4, 3, 2)) is on


def test_a_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("BNLAB_CPU_KERNEL", "maybe")
    with pytest.raises(UserError, match=r"BNLAB_CPU_KERNEL='maybe': expected 1 .* or 0"):
        batch_norm(torch.randn(4, 3, 2), None, None, training=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_small_std_within_1e6_of_float64(layout, calls):
    """Mean 1e4, std 1e-2 in float32: the shifted-data statistics keep the output within 1e-6 of float64."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8) * 1e-2 + 1e4
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xd = x.double()
    ref = (xd - xd.mean((0, 2, 3), keepdim=True)) / torch.sqrt(xd.var((0, 2, 3), unbiased=False, keepdim=True)
                                                               + 1e-5)
    out = batch_norm_stats(x, torch.zeros(4), torch.ones(4), training=True, momentum=1.0)
    assert calls["forward"] == 1
    assert (out.output.double() - ref).abs().max().item() < 1e-6
    torch.testing.assert_close(out.running_var.double(), xd.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.batch_mean.double(), xd.mean((0, 2, 3)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_two_threads_give_the_same_result(layout):
    x = _input((64, 24, 5, 7), torch.float64, layout)
    y_ref, _ = reference.forward(_np(x))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = batch_norm(x, None, None, training=True)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(_np(y), y_ref, atol=1e-12, rtol=0)


def test_expanded_gradient_and_weight_only():
    """dy from .sum().backward() is an expanded (stride-0) tensor: the kernel copies it to x's layout."""
    x = _input((4, 3, 5, 2), torch.float64, "channels_last").requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (batch_norm(x, None, None, w, None, training=True) * 3).sum().backward()
    _, cache = reference.forward(_np(x), _np(w))
    dx_ref, dw_ref, _ = reference.backward(np.full(x.shape, 3.0), cache)
    np.testing.assert_allclose(_np(x.grad), dx_ref, atol=1e-12)
    np.testing.assert_allclose(_np(w.grad), dw_ref, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: _input((4, 6, 5, 8), torch.float32, "contiguous")[:, :, :, ::2],          # strided view
    lambda: _input((4, 6, 5, 8), torch.float32, "contiguous").transpose(2, 3),        # permuted spatial dims
    lambda: _input((4, 6, 5, 8), torch.float16, "contiguous"),                        # half
    lambda: _input((4, 6, 5, 8), torch.bfloat16, "channels_last"),
])
def test_unsupported_inputs_fall_back_to_the_composed_math(make, calls):
    x = make().requires_grad_()
    assert not cpu.usable(x)
    y = batch_norm(x, None, None, training=True)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y) + torch.arange(y.shape[-1], dtype=y.dtype))
    assert calls == {"forward": 0, "backward": 0}
    y_t = torch.nn.functional.batch_norm(x.float(), None, None, training=True)
    tol = 1e-5 if x.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), y_t, rtol=tol, atol=tol)


def test_double_backward_uses_the_composed_math(calls):
    """create_graph=True: the forward may use the kernel, the differentiable backward must not."""
    x = _input((4, 3, 5), torch.float64, "contiguous").requires_grad_()
    w, b = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                 requires_grad=True)
    fn = lambda x, w, b: batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert calls["forward"] > 0


def test_under_torch_func_and_compile_the_kernel_stands_aside(monkeypatch):
    x = _input((6, 3, 4), torch.float64, "contiguous")
    assert cpu.usable(x)
    seen = []
    torch.func.vmap(lambda xi: seen.append(cpu.usable(xi)) or xi)(x)
    torch.func.grad(lambda xi: seen.append(cpu.usable(xi)) or xi.sum())(x)
    assert seen == [False, False]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not cpu.usable(x)


def test_torch_compile_fullgraph_traces_the_composed_math(calls):
    """Dynamo traces the training path in one graph; the traced math is the composed one, not the C call."""
    x = _input((4, 3, 5, 5), torch.float32, "channels_last").requires_grad_()
    w = torch.randn(3, requires_grad=True)
    compiled = torch.compile(lambda x, w: batch_norm(x, None, None, w, None, training=True), backend="eager",
                             fullgraph=True)
    y = compiled(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), torch.cos(y))
    assert calls == {"forward": 0, "backward": 0}
    y_t = torch.nn.functional.batch_norm(x, None, None, w, None, training=True)
    dx_t, dw_t = torch.autograd.grad(y_t, (x, w), torch.cos(y_t))
    for ours, theirs in ((y, y_t), (dx, dx_t), (dw, dw_t)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_empty_batch_is_left_to_the_composed_math(calls):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w, b = torch.randn(3), torch.randn(3)
    y = batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=True)
    assert y.shape == x.shape and calls["forward"] == 0


def test_missing_compiler_falls_back_and_says_so_once(monkeypatch, tmp_path, caplog, fresh_state, calls):
    """A machine without a C compiler: the composed math, one logged warning, and the kernel path back
    once a compiler is there again."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))
    x = _input((5, 4, 3, 3), torch.float32, "channels_last")
    with caplog.at_level(logging.WARNING, logger="bnlab.kernels.cpu"):
        ys = [batch_norm(x, None, None, training=True) for _ in range(3)]
    warnings = [r for r in caplog.records if "fused CPU batch-norm kernel is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no-such-cc" in warnings[0].getMessage()
    assert calls["forward"] == 0 and not cpu.usable(x) and "no-such-cc" in cpu.load_error()
    y_ref, _ = reference.forward(_np(x))
    for y in ys:
        np.testing.assert_allclose(_np(y), y_ref, atol=1e-5)


def test_failed_build_falls_back(monkeypatch, tmp_path, caplog, fresh_state):
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\necho 'badcc 1.0'; [ \"$1\" = --version ] && exit 0; echo broken >&2; exit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="bnlab.kernels.cpu"):
        assert cpu.library() is None
    assert "exit 3" in cpu.load_error() and "broken" in cpu.load_error()
    assert not list((tmp_path / "cache").glob("*.so"))


_CHILD = textwrap.dedent("""
    import torch
    from bnlab.kernels import cpu
    from bnlab.functional import batch_norm
    assert cpu.library() is not None, cpu.load_error()
    x = torch.randn(8, 5, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch_norm(x, None, None, training=True),
                               torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_concurrent_first_builds_share_one_cache_entry(tmp_path):
    """Two processes building into an empty cache at once: both load a working library, one file results."""
    env = dict(os.environ, BNLAB_CACHE_DIR=str(tmp_path),
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and out.strip() == "ok", err
    assert len(list(tmp_path.glob("bn_cpu-*.so"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temporary build folder left behind


def test_the_kernel_is_back_after_the_fallback_tests():
    """The fallback tests leave no lasting state: later tests in the same process get the kernel."""
    assert cpu.usable(torch.randn(4, 3, 2, 2))


def test_layout_decisions_follow_each_call_not_the_first(calls):
    """The layout decision is cached per (shape, strides): one layer fed the same shape as contiguous,
    channels-last, a non-dense permutation, float64 and in eval mode, call after call, matches
    torch.nn.BatchNorm2d fed the same sequence (outputs, gradients, running statistics)."""
    from bnlab.nn import BatchNorm2d
    ours, theirs = BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    shape = (4, 6, 5, 8)
    sequence = [("contiguous", torch.float32, True, True), ("channels_last", torch.float32, True, True),
                ("permuted", torch.float32, True, False), ("contiguous", torch.float64, True, True),
                ("channels_last", torch.float64, False, True), ("contiguous", torch.float32, True, True)]
    for step, (layout, dtype, training, kernel) in enumerate(sequence):
        for layer in (ours, theirs):
            layer.to(dtype).train(training)
        if layout == "permuted":   # shape (4, 6, 5, 8) stored as (N, C, W, H): no layout the kernel takes
            x = _input((4, 6, 8, 5), dtype, "contiguous", seed=step).transpose(2, 3)
        else:
            x = _input(shape, dtype, layout, seed=step)
        assert x.shape == shape and cpu.usable(x) is kernel
        before = dict(calls)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=dtype)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_t = ours(xo), theirs(xt)
        grads = (y,) + torch.autograd.grad(y, (xo, ours.weight, ours.bias), dy)
        grads_t = (y_t,) + torch.autograd.grad(y_t, (xt, theirs.weight, theirs.bias), dy)
        used = calls["forward"] - before["forward"], calls["backward"] - before["backward"]
        assert used == ((1, 1) if kernel and training else (0, 0)), (step, layout)
        # (eval mode normalizes with running statistics that float32 steps rounded)
        tol = 1e-12 if dtype == torch.float64 and training else 1e-5
        for a, b in zip(grads, grads_t):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10)
        for name in ("running_mean", "running_var", "num_batches_tracked"):  # (float32 steps in their history)
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-5)


def test_an_absent_output_gradient_is_a_zero_gradient():
    """A backward reached with no gradient for y (a later op returns none) gives zero gradients, as when
    autograd materialised zeros, on the kernel and on the composed math."""
    class Cut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    x = _input((4, 3, 5), torch.float64, "contiguous").requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for create_graph in (False, True):
        y = batch_norm(x, None, None, w, None, training=True)
        loss = Cut.apply(y).sum() + (x * 0).sum() + (w * 0).sum()
        dx, dw = torch.autograd.grad(loss, (x, w), create_graph=create_graph)
        assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dw, torch.zeros_like(w))
