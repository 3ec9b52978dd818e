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

The statistics core, public and used by every layer and tool of bnlab (the variants, SyncBN,
accumulation, recalibration, doctor):

* :func:`moments` — per-channel ``Moments(count, mean, m2)`` (``m2`` = sum of squared deviations);
* :func:`merge_moments` — Chan, Golub & LeVeque's merge of several ``Moments`` (sub-batches, processes,
  micro-batches);
* :func:`normalize` — ``(x − μ)/√(σ² + ε)·γ + β`` for given statistics, in x's dtype and memory format;
* :func:`update_running_stats` — the momentum update with the unbiased variance, returning
  ``(mean, var, finite)`` and leaving the statistics unchanged when the batch (or the update, e.g. a
  float16 overflow) is not finite;
* :func:`batch_norm_backward` — the closed-form backward for given statistics, whose ``count`` and
  ``reduce`` arguments make it the backward of a batch spread over several processes (SyncBN).

Numerics: statistics are reduced in float32 (float64 stays float64) whatever the storage dtype, over
shifted data ``x − shift`` (a per-channel value near the mean, see :func:`_shift`) so a large mean does not
cancel the variance; the variance is clipped at 0; ε sits inside the square root; the output keeps the
input's dtype and memory format. Neither ``torch.batch_norm`` nor cuDNN is called.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

from bnlab.dtypes import compute_dtype
from bnlab.kernels import cpu as _cpu_kernel

__all__ = ["batch_norm", "batch_norm_stats", "batch_norm_backward", "BatchNormOutput", "check_input", "backend_for",
           "Moments", "moments", "merge_moments", "normalize", "update_running_stats", "compute_dtype",
           "memory_format", "empty_output"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) vector shaped (1, C, 1, ...) to broadcast against x."""
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def memory_format(x: Tensor) -> torch.memory_format:
    """``x``'s memory format: ``channels_last`` / ``channels_last_3d`` when x is stored so (and not also
    contiguous), else ``contiguous_format``; outputs are made to match it."""
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
    ``"torch"`` (this module's PyTorch implementation, also what ``"auto"`` means inside ``torch.compile``,
    whose compiler fuses the traced math itself)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"batch_norm: backend must be 'auto', 'triton' or 'torch' (got {backend!r})")
    if backend == "torch" or (backend == "auto" and (not x.is_cuda or torch.compiler.is_compiling())):
        return "torch"   # (under torch.compile, "auto" leaves fusion to the compiler: the math traces)
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
    rows = max(1, _CHUNK_VALUES // max(1, a.numel() // max(1, a.shape[0])))   # values per sample (an empty batch has none)
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
    first = x[:1].detach().to(compute_dtype(x))
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
        # the three statistics never carry a gradient: no zeros are made for them (dy is made when absent)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy: Optional[Tensor], _dshift, _ddelta, _dvar):
        x, weight, shift, delta, var = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
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


# torch.autograd.Function.apply binds the arguments to forward's signature (inspect.signature, tens of µs)
# before calling the C apply; _BatchNormTrain.forward takes exactly the four positional arguments given, so
# outside functorch transforms and torch.compile tracing (which need Function.apply itself) the C apply is
# called directly, after the same unwrapping of dead functorch wrappers.
_c_apply = super(torch.autograd.Function, _BatchNormTrain).apply


def _train_apply(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """``_BatchNormTrain.apply(x, weight, bias, eps)``, without its per-call signature binding."""
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return _BatchNormTrain.apply(x, weight, bias, eps)
    return _c_apply(*_unwrap_dead_wrappers((x, weight, bias, eps)))


def _backward(dy, d, weight, delta, inv_std, needs_grad, has_weight, has_bias, count=None, reduce=None):
    """dx, dγ, dβ from the closed form, given the shifted input ``d = x − shift`` (x̂ = (d − δ)/σ).

    The two reductions are Σdy and Σdy·d; then per channel
    ``dx = A·dy + B·d + C`` with ``A = γ/σ``, ``B = −A/σ · Σdy·x̂/m``, ``C = −A·Σdy/m − B·δ``.
    ``count`` (m) and ``reduce`` are :func:`batch_norm_backward`'s; dγ and dβ come from the local sums.
    Writes into ``d`` when autograd is not recording (single backward).
    """
    count = d.numel() // d.shape[1] if count is None else count
    dy_c = dy.to(inv_std.dtype)
    sum_dy, sum_dy_d = _channel_sums(dy_c, d)                  # Σ dy, Σ dy·d   (C,)
    sum_dy_xhat = (sum_dy_d - delta * sum_dy) * inv_std         # Σ dy·x̂         (C,)

    dx = dweight = dbias = None
    if has_weight and needs_grad[1]:
        dweight = sum_dy_xhat.to(weight.dtype)
    if has_bias and needs_grad[2]:
        dbias = sum_dy.to(dy.dtype if weight is None else weight.dtype)
    if needs_grad[0]:
        if reduce is not None:      # the batch spans other processes: the sums over all of them
            sum_dy, sum_dy_xhat = reduce(sum_dy, sum_dy_xhat)
        coef_dy = inv_std if weight is None else weight.to(inv_std.dtype) * inv_std
        coef_d = -coef_dy * inv_std * sum_dy_xhat / count
        const = -coef_dy * sum_dy / count - coef_d * delta
        if torch.is_grad_enabled():
            dx = d * _per_channel(coef_d, d) + dy_c * _per_channel(coef_dy, d) + _per_channel(const, d)
        else:
            dx = d.mul_(_per_channel(coef_d, d)).add_(_per_channel(const, d))
            dx = dx.addcmul_(dy_c, _per_channel(coef_dy, d))
        dx = dx.to(dy.dtype)
    return dx, dweight, dbias


def batch_norm_backward(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
                        eps: float = 1e-5, *, has_bias: bool = True, needs_input_grad=(True, True, True),
                        count: Optional[int] = None, reduce=None) -> tuple[Optional[Tensor], ...]:
    r"""The closed-form backward of training-mode batch norm (the module docstring's formulas), given the
    statistics the forward normalized with: ``(dx, dγ, dβ)``.

    The distributed case is an argument, not a second derivation: when the batch is the union of several
    processes' shards, ``count`` is the number of values per channel over all of them (m in the formulas)
    and ``reduce(sum_dy, sum_dy_xhat)`` returns those two ``(C,)`` sums over every process (one
    ``all_reduce``); dγ and dβ stay the local sums, as for any parameter under ``DistributedDataParallel``
    (which reduces them). :class:`bnlab.nn.SyncBatchNorm` uses exactly this.

    Args:
        dy: gradient of the output, shaped as ``x``.
        x: the forward's input; ``mean``, ``var``: the ``(C,)`` mean and biased variance it was normalized
            with. ``weight``: γ or ``None``. ``has_bias``: whether there is a β to return a gradient for.
        needs_input_grad: which of ``(dx, dγ, dβ)`` to compute (the others come back ``None``).

    Shape:
        ``dx`` has x's shape, dy's dtype and x's memory format; ``dγ``, ``dβ`` are ``(C,)``.
    """
    cdt = compute_dtype(x)
    d = x.to(cdt) - _per_channel(mean.to(cdt), x)       # shift = μ, so δ = 0
    dx, dweight, dbias = _backward(dy, d, weight, torch.zeros_like(mean, dtype=cdt),
                                   torch.rsqrt(var.to(cdt) + eps), needs_input_grad, weight is not None, has_bias,
                                   count, reduce)
    if dx is not None and dx.dim() >= 4:
        dx = dx.contiguous(memory_format=memory_format(x))
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------------
# the statistics core
# --------------------------------------------------------------------------------------------------

class Moments(NamedTuple):
    """Per-channel sufficient statistics: ``count`` values per channel, their ``mean`` and ``m2``, the sum
    of squared deviations from the mean (so the biased variance is ``m2 / count``)."""
    count: int
    mean: Tensor    # (C,)
    m2: Tensor      # (C,)

    @property
    def var(self) -> Tensor:
        """The biased variance ``m2 / count`` (zeros for no values)."""
        return self.m2 / max(self.count, 1)


def moments(x: Tensor) -> Moments:
    """``Moments`` of ``x`` of shape ``(N, C, *)`` per channel (over every dimension but 1), reduced in
    :func:`compute_dtype` over shifted data, so a mean far larger than the spread does not cancel the
    variance. Differentiable; detach ``x`` first when only the numbers are wanted."""
    channels, count = x.shape[1], x.numel() // max(x.shape[1], 1)
    if count == 0:
        zeros = torch.zeros(channels, dtype=compute_dtype(x), device=x.device)
        return Moments(0, zeros, zeros.clone())
    shift = _shift(x)
    _, delta, var = _shifted_moments(x, shift)
    return Moments(count, shift + delta, var * count)


def merge_moments(*parts: Moments) -> Moments:
    """The ``Moments`` of the union of several sets of values, from theirs (Chan, Golub & LeVeque 1979):
    ``n = n_a + n_b``, ``μ = μ_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n`` with ``δ = μ_b − μ_a``.
    Parts with no values are skipped; the result is in the widest dtype of the parts."""
    total = None
    for part in parts:
        if part.count == 0:
            continue
        if total is None:
            total = part
            continue
        n = total.count + part.count
        delta = part.mean - total.mean
        total = Moments(n, total.mean + delta * (part.count / n),
                        total.m2 + part.m2 + delta * delta * (total.count * part.count / n))
    return total if total is not None else parts[0]


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``(x − mean)/√(var + ε)·γ + β`` with the given ``(C,)`` statistics (constants or not: plain
    differentiable ops), computed in :func:`compute_dtype` and centred before scaling; the output has x's
    dtype and memory format."""
    cdt = compute_dtype(x)
    scale = torch.rsqrt(var.to(cdt) + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = (x.to(cdt) - _per_channel(mean.to(cdt), x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(cdt), x)
    y = y.to(x.dtype)
    return y.contiguous(memory_format=memory_format(x)) if y.dim() >= 4 else y


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                         momentum: float) -> tuple[Tensor, Tensor, Tensor]:
    """The new running statistics after a batch of ``count`` values per channel with ``mean`` and biased
    ``var``: ``new = (1 − momentum)·old + momentum·batch`` with the variance taken unbiased
    (``count/(count − 1)``), as PyTorch. Returns ``(mean, var, finite)``; when the batch statistics or the
    updated values are not finite in the running statistics' dtype (NaN/Inf input, or a float16 buffer
    that would overflow) the old values come back and ``finite`` is a ``False`` 0-dim tensor, decided on
    the device with no host synchronisation."""
    new_mean, new_var, finite = _updated_running_stats(running_mean, running_var, mean, var, count, momentum)
    return torch.where(finite, new_mean, running_mean), torch.where(finite, new_var, running_var), finite


def _updated_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                           momentum: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`update_running_stats` before the choice between old and new: the new values (whether finite
    or not) and ``finite``, for a caller that reads ``finite`` on the host and keeps the old values itself."""
    unbiased = var * (count / (count - 1)) if count > 1 else var
    if mean.dtype != running_mean.dtype:   # (a same-dtype .to() is a no-op that still costs a dispatch)
        mean = mean.to(running_mean.dtype)
    if unbiased.dtype != running_var.dtype:
        unbiased = unbiased.to(running_var.dtype)
    new_mean = torch.lerp(running_mean, mean, momentum)
    new_var = torch.lerp(running_var, unbiased, momentum)
    # a non-finite batch statistic makes its lerp non-finite (even at momentum 0: 0·inf is NaN), and so does
    # an update that overflows the buffers' dtype: one check of the sum covers all four
    return new_mean, new_var, torch.isfinite(new_mean + new_var).all()


def empty_output(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """The training output for an empty batch, as PyTorch's: ``x`` itself, with γ and β kept in the graph
    (a backward through it still reaches them, with zero gradients)."""
    y = x.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return y


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
                     backend: str = "auto", *, host_checks_finite: bool = False) -> BatchNormOutput:
    """Batch norm that returns the new running statistics instead of writing them.

    The pure form of :func:`batch_norm`, for ``torch.func`` transforms. ``momentum`` follows PyTorch:
    ``new = (1 − momentum)·old + momentum·batch`` with the batch variance taken unbiased (``m/(m−1)``).
    When the batch statistics are not finite the running statistics come back unchanged and
    ``finite`` is ``False`` (no host synchronisation is needed to decide this).

    ``host_checks_finite=True`` is for a caller that reads ``finite`` on the host and stores the new
    running statistics only when it is true (as the layers of :mod:`bnlab.nn` do on CPU): the updated
    values then come back as they are, finite or not, saving the device-side choice.
    """
    check_input(x, None if weight is None else weight.shape[0], training)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: running_mean and running_var are required when training=False")
        if x.numel() > 0 and backend_for(x, backend) == "triton":
            from bnlab.kernels import batch_norm_eval as _triton_eval
            y = _triton_eval(x, running_mean, running_var, weight, bias, eps)
        else:
            y = normalize(x, running_mean, running_var, weight, bias, eps)
        return BatchNormOutput(y, running_mean, running_var, None, None, None)

    if x.numel() == 0:  # as PyTorch: an empty batch leaves the statistics alone and keeps the graph
        return BatchNormOutput(empty_output(x, weight, bias), running_mean, running_var, None, None, None)

    if backend_for(x, backend) == "triton":
        from bnlab.kernels import batch_norm_train as _triton_train
        y, mean, var = _triton_train(x, weight, bias, eps)
    else:
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        # without a graph to record, call the forward itself: apply()'s bookkeeping costs tens of µs per call
        train = _train_apply if needs_graph else _BatchNormTrain.forward
        y, shift, delta, var = train(x, weight, bias, eps)
        mean = shift + delta
    if running_mean is None or running_var is None:
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        new_mean, new_var = running_mean, running_var
    else:
        update = _updated_running_stats if host_checks_finite else update_running_stats
        new_mean, new_var, finite = update(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
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
