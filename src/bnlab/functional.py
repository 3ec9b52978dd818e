r"""Batch normalization, the math: statistics, normalization and a hand-derived backward.

For ``x`` of shape ``(N, C, *)``, per channel over its ``m = N·prod(*)`` values:

.. math::
    \mu = \tfrac1m \textstyle\sum x, \quad \sigma^2 = \tfrac1m \sum (x-\mu)^2, \quad
    \hat x = (x-\mu)/\sqrt{\sigma^2+\epsilon}, \quad y = \gamma \hat x + \beta

and the backward (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167)

.. math::
    d\beta = \textstyle\sum dy, \quad d\gamma = \sum dy\,\hat x, \quad
    dx = \frac{\gamma}{m\sqrt{\sigma^2+\epsilon}}\,(m\,dy - \textstyle\sum dy - \hat x \sum dy\,\hat x)

Two public forms:

* :func:`batch_norm` mirrors :func:`torch.nn.functional.batch_norm` (running statistics updated in place);
* :func:`batch_norm_stats` is pure: it **returns** the new running statistics, so it composes with
  ``torch.func`` (``vmap``, ``grad``, ``functional_call``).

Numerics: statistics are reduced in float32 (float64 stays float64) whatever the storage dtype, with
Welford's one-pass algorithm (``torch.var_mean``) so a large mean does not cancel the variance; the
variance is clipped at 0; ε sits inside the square root; the output keeps the input's dtype and memory
format. Neither ``torch.batch_norm`` nor cuDNN is called.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from bnlab.kernels import cpu as _cpu_kernel

__all__ = ["batch_norm", "batch_norm_stats", "BatchNormOutput", "check_input", "backend_for"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) is reduced in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) vector shaped (1, C, 1, ...) to broadcast against x."""
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def check_input(x: Tensor, num_features: Optional[int] = None, training: bool = False,
                name: str = "batch_norm", expected_dims: Optional[tuple[int, ...]] = None) -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``name`` when ``x`` cannot be batch-normalized.

    Checks the number of dimensions, floating dtype, channel count, and (in training) that each
    channel has more than one value, since a single value has no variance.
    """
    if expected_dims is not None and x.dim() not in expected_dims:
        want = " or ".join(f"{d}D" for d in expected_dims)
        raise ValueError(f"{name}: expected {want} input (got {x.dim()}D input)")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected at least 2D input (N, C, *) (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}; convert it first, e.g. x.float()")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(f"{name}: expected input with {num_features} channels in dimension 1 "
                         f"(got {x.shape[1]} channels, input shape {tuple(x.shape)})")
    if training and x.numel() > 0:
        values_per_channel = x.numel() // x.shape[1]
        if values_per_channel <= 1:
            raise ValueError(
                f"{name}: expected more than 1 value per channel when training, got {values_per_channel} "
                f"value per channel (input shape {tuple(x.shape)}); a single value has no variance. "
                f"Use a larger batch, drop the last incomplete batch (DataLoader(drop_last=True)), "
                f"or call .eval() to use the running statistics")


def backend_for(x: Tensor, backend: str = "auto") -> str:
    """The implementation :func:`batch_norm` uses for ``x``: ``"triton"`` (fused GPU kernels) or
    ``"torch"`` (this module's PyTorch implementation)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"batch_norm: backend must be 'auto', 'triton' or 'torch' (got {backend!r})")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return "torch"
    try:
        from bnlab import kernels
        supported = kernels.supports(x)
    except ImportError:  # Triton not installed
        supported = False
    if backend == "auto" and supported:
        supported = kernels.preferred(x)  # shapes where the kernels do not win stay on PyTorch
    if backend == "triton" and not supported:
        raise ValueError(f"batch_norm: backend='triton' is not available for this input "
                         f"(device={x.device}, dtype={x.dtype}, dim={x.dim()}); it needs Triton and a "
                         f"CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
    return "triton" if supported else "torch"


# --------------------------------------------------------------------------------------------------
# training mode: an autograd.Function with the closed-form backward
# --------------------------------------------------------------------------------------------------

# Values per chunk in _channel_sums: about 1 MiB of float32, so a chunk read for the first sum is still in
# cache for the second and the elementwise product never exists at full size (a full-size temporary costs
# an allocation and a pass through memory).
_CHUNK_VALUES = 1 << 18


def _channel_sums(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``Σa`` and ``Σa·b`` over every dimension but 1, computed in chunks of samples."""
    dims = _reduce_dims(a)
    rows = max(1, _CHUNK_VALUES // max(1, a[0].numel()))
    if rows >= a.shape[0]:
        return a.sum(dims), (a * b).sum(dims)
    sum_a = sum_ab = None
    for start in range(0, a.shape[0], rows):
        a_rows, b_rows = a[start:start + rows], b[start:start + rows]
        part_a, part_ab = a_rows.sum(dims), (a_rows * b_rows).sum(dims)
        sum_a = part_a if sum_a is None else sum_a + part_a
        sum_ab = part_ab if sum_ab is None else sum_ab + part_ab
    return sum_a, sum_ab


def _shift(x: Tensor) -> Tensor:
    """A per-channel reference value near the channel mean: the first sample's mean.

    Statistics are taken of ``d = x − shift`` ("shifted data", Chan, Golub & LeVeque 1983), whose values are
    of the order of σ, so neither the mean of d nor ``E[d²] − E[d]²`` cancels when |μ| ≫ σ. The shift is a
    constant for differentiation: the statistics of x do not depend on it.
    """
    first = x[:1].detach().to(_compute_dtype(x))
    return first.reshape(first.shape[1], -1).mean(1) if x.dim() > 2 else first[0]


def _shifted_moments(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``d = x − shift``, ``δ = E[d]`` (so μ = shift + δ) and the biased variance ``E[d²] − δ²`` (≥ 0)."""
    count = x.numel() // x.shape[1]
    d = x.to(shift.dtype) - _per_channel(shift, x)
    sum_d, sum_d2 = _channel_sums(d, d)
    delta = sum_d / count
    var = (sum_d2 / count - delta * delta).clamp_min(0)
    return d, delta, var


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm with the closed-form backward.

    Saves the input and four per-channel vectors (shift, δ, σ², γ) — nothing full-size beyond the input,
    which the caller keeps anyway. Returns ``(y, shift, δ, σ²)``; the batch mean is ``shift + δ``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        if _cpu_kernel.usable(x, weight, bias):  # fused CPU kernel (bnlab.kernels.cpu): same outputs
            return _cpu_kernel.forward(x, weight, bias, eps)
        shift = _shift(x)
        d, delta, var = _shifted_moments(x, shift)                     # d: (N, C, *)
        scale = torch.rsqrt(var + eps)                                 # (C,) 1/σ, then γ/σ
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        offset = -delta * scale if bias is None else bias.to(scale.dtype) - delta * scale
        y = d.mul_(_per_channel(scale, x)).add_(_per_channel(offset, x))   # (x − μ)·γ/σ + β, in d's memory
        return y.to(x.dtype), shift, delta, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, shift, delta, var = output
        ctx.eps = eps
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x, weight, shift, delta, var)
        ctx.mark_non_differentiable(shift, delta, var)
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx, dy: Tensor, _dshift, _ddelta, _dvar):
        x, weight, shift, delta, var = ctx.saved_tensors
        if not torch.is_grad_enabled() and _cpu_kernel.usable(x, dy, weight):  # fused CPU kernel, single backward
            return _cpu_kernel.backward(dy, x, weight, shift, delta, var, ctx.eps, ctx.needs_input_grad,
                                        ctx.has_weight, ctx.has_bias) + (None,)
        if torch.is_grad_enabled():
            # create_graph=True: recompute δ and σ² from x with differentiable ops, so the gradient we
            # return is itself a differentiable function of x, γ and dy (double backward).
            d, delta, var = _shifted_moments(x, shift)
        else:
            d = x.to(shift.dtype) - _per_channel(shift, x)
        return _backward(dy, d, weight, delta, torch.rsqrt(var + ctx.eps), ctx.needs_input_grad,
                         ctx.has_weight, ctx.has_bias) + (None,)


def _backward(dy, d, weight, delta, inv_std, needs_grad, has_weight, has_bias):
    """dx, dγ, dβ from the closed form, given the shifted input ``d = x − shift`` (x̂ = (d − δ)/σ).

    The two reductions are Σdy and Σdy·d; then per channel
    ``dx = A·dy + B·d + C`` with ``A = γ/σ``, ``B = −A/σ · Σdy·x̂/m``, ``C = −A·Σdy/m − B·δ``.
    Writes into ``d`` when autograd is not recording (single backward).
    """
    count = d.numel() // d.shape[1]
    dy_c = dy.to(inv_std.dtype)
    sum_dy, sum_dy_d = _channel_sums(dy_c, d)                  # Σ dy, Σ dy·d   (C,)
    sum_dy_xhat = (sum_dy_d - delta * sum_dy) * inv_std         # Σ dy·x̂         (C,)

    dx = dweight = dbias = None
    if needs_grad[0]:
        coef_dy = inv_std if weight is None else weight.to(inv_std.dtype) * inv_std
        coef_d = -coef_dy * inv_std * sum_dy_xhat / count
        const = -coef_dy * sum_dy / count - coef_d * delta
        if torch.is_grad_enabled():
            dx = d * _per_channel(coef_d, d) + dy_c * _per_channel(coef_dy, d) + _per_channel(const, d)
        else:
            dx = d.mul_(_per_channel(coef_d, d)).add_(_per_channel(const, d))
            dx = dx.addcmul_(dy_c, _per_channel(coef_dy, d))
        dx = dx.to(dy.dtype)
    if has_weight and needs_grad[1]:
        dweight = sum_dy_xhat.to(weight.dtype)
    if has_bias and needs_grad[2]:
        dbias = sum_dy.to(dy.dtype if weight is None else weight.dtype)
    return dx, dweight, dbias


def _normalize(x: Tensor, mean: Tensor, inv_std: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor]) -> Tensor:
    """y = (x − μ)·γ/σ + β in inv_std's dtype, centred before scaling; output in x's dtype and layout.
    Plain differentiable ops: the evaluation path here and the batch-norm variants use it."""
    scale = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
    y = (x.to(inv_std.dtype) - _per_channel(mean.to(inv_std.dtype), x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(inv_std.dtype), x)
    y = y.to(x.dtype)
    return y.contiguous(memory_format=_memory_format(x)) if y.dim() >= 4 else y


def _normalize_eval(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tensor:
    """Evaluation: the running statistics in place of the batch's."""
    return _normalize(x, mean, torch.rsqrt(var.to(_compute_dtype(x)) + eps), weight, bias)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------

class BatchNormOutput(NamedTuple):
    """What :func:`batch_norm_stats` returns."""
    output: Tensor
    running_mean: Optional[Tensor]   # the new running mean (None when none was given)
    running_var: Optional[Tensor]    # the new running variance (None when none was given)
    batch_mean: Optional[Tensor]     # this batch's mean (training only)
    batch_var: Optional[Tensor]      # this batch's biased variance (training only)
    finite: Optional[Tensor]         # bool scalar: were this batch's statistics finite (training only)


def batch_norm_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                     backend: str = "auto") -> BatchNormOutput:
    """Batch norm that returns the new running statistics instead of writing them.

    The pure form of :func:`batch_norm`, for ``torch.func`` transforms. ``momentum`` follows PyTorch:
    ``new = (1 − momentum)·old + momentum·batch`` with the batch variance taken unbiased (``m/(m−1)``).
    When the batch statistics are not finite the running statistics come back unchanged and
    ``finite`` is ``False`` (no host synchronisation is needed to decide this).
    """
    check_input(x, None if weight is None else weight.shape[0], training)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: running_mean and running_var are required when training=False")
        if x.numel() > 0 and backend_for(x, backend) == "triton":
            from bnlab.kernels import batch_norm_eval as _triton_eval
            y = _triton_eval(x, running_mean, running_var, weight, bias, eps)
        else:
            y = _normalize_eval(x, running_mean, running_var, weight, bias, eps)
        return BatchNormOutput(y, running_mean, running_var, None, None, None)

    if x.numel() == 0:  # as PyTorch: an empty batch leaves the statistics alone and keeps the graph
        y = x.clone()
        if weight is not None:
            y = y * weight[0]
        if bias is not None:
            y = y + bias[0]
        return BatchNormOutput(y, running_mean, running_var, None, None, None)

    if backend_for(x, backend) == "triton":
        from bnlab.kernels import batch_norm_train as _triton_train
        y, mean, var = _triton_train(x, weight, bias, eps)
    else:
        y, shift, delta, var = _BatchNormTrain.apply(x, weight, bias, eps)
        mean = shift + delta
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    new_mean, new_var = running_mean, running_var
    if running_mean is not None and running_var is not None:
        m = x.numel() // x.shape[1]
        unbiased = var * (m / (m - 1)) if m > 1 else var
        new_mean = torch.where(finite, torch.lerp(running_mean, mean.to(running_mean.dtype), momentum),
                               running_mean)
        new_var = torch.where(finite, torch.lerp(running_var, unbiased.to(running_var.dtype), momentum),
                              running_var)
    return BatchNormOutput(y, new_mean, new_var, mean, var, finite)


def batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    r"""Batch normalization with the meaning of :func:`torch.nn.functional.batch_norm`.

    Args:
        x: input of shape ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        running_mean, running_var: ``(C,)`` population estimates; updated in place in training
            (skipped for a batch whose statistics are not finite). May be ``None`` in training.
        weight, bias: ``(C,)`` scale γ and shift β, or ``None``.
        training: use (and update with) this batch's statistics, else the running ones.
        momentum: EMA factor, ``new = (1 − momentum)·old + momentum·batch``.
        eps: added to the variance inside the square root.
        backend: ``"auto"`` (fused Triton kernels on CUDA when available), ``"triton"`` or ``"torch"``.

    Shape:
        output has the shape, dtype and memory format of ``x``.
    """
    out = batch_norm_stats(x, running_mean, running_var, weight, bias, training, momentum, eps, backend)
    if training and running_mean is not None and out.running_mean is not running_mean:
        with torch.no_grad():
            running_mean.copy_(out.running_mean)
            running_var.copy_(out.running_var)
    return out.output
