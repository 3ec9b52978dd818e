r"""Batch-norm variants for the edges of practice: ghost batches, batch renormalization, frozen statistics.

* :class:`GhostBatchNorm1d/2d/3d` — statistics over sub-batches ("ghost" or virtual batches) of a fixed
  size in training, population estimates at inference (Hoffer et al. 2017, https://arxiv.org/abs/1705.08741).
* :class:`BatchRenorm1d/2d/3d` — batch renormalization with clipped r/d corrections and a warm-up
  (Ioffe 2017, https://arxiv.org/abs/1702.03275).
* :func:`freeze_stats` / :func:`unfreeze_stats` / :func:`set_bn_switches` — running statistics used and not
  updated while γ/β still train, surviving ``model.train()``; :func:`freeze_bn` replaces layers by
  :class:`FrozenBatchNorm2d` (γ/β as buffers) for detection-style fine-tuning. These live in
  :mod:`bnlab.frozen` and are re-exported here.

All layers keep the ``torch.nn.BatchNorm`` contract (constructor arguments, parameters and buffers), so a
``state_dict`` loads both ways between them, :mod:`bnlab.nn` and :mod:`torch.nn`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab.frozen import (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm,  # noqa: F401
                          freeze_bn, freeze_stats, is_batch_norm, set_bn_switches, unfreeze_bn, unfreeze_stats)
from bnlab.functional import _compute_dtype, _memory_format, _per_channel, _reduce_dims
from bnlab.nn import _BatchNorm

__all__ = [
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "is_batch_norm", "set_bn_switches", "freeze_stats", "unfreeze_stats", "freeze_bn", "unfreeze_bn",
]


def _shape_channel(v: Tensor, ndim: int, channel_dim: int = 1) -> Tensor:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return v.reshape(shape)


def _merge_running(module: _BatchNorm, mean: Tensor, var: Tensor, count: int, momentum: float,
                   output: Tensor) -> F.BatchNormOutput:
    """The new running statistics from a batch's mean and biased variance over ``count`` values, as
    :func:`bnlab.functional.batch_norm_stats` computes them (unbiased variance, non-finite batches skipped)."""
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    unbiased = var * (count / (count - 1)) if count > 1 else var
    rm, rv = module.running_mean, module.running_var
    new_mean = torch.where(finite, torch.lerp(rm, mean.to(rm.dtype), momentum), rm)
    new_var = torch.where(finite, torch.lerp(rv, unbiased.to(rv.dtype), momentum), rv)
    return F.BatchNormOutput(output, new_mean, new_var, mean, var, finite)


class _OwnTrainingForward:
    """For layers whose batch-statistics forward is their own (ghost, renorm, synchronized).

    :mod:`bnlab.fused` runs the plain batch-norm kernels for any :mod:`bnlab.nn` layer whose ``backend``
    resolves to Triton, without calling the layer's ``forward``. While these layers normalize with batch
    statistics they therefore report ``backend == "torch"``, which makes the fused path call the layer
    itself; with running statistics (plain batch norm) the configured backend is reported and used.
    """

    @property
    def backend(self) -> str:
        configured = self.__dict__.get("_backend", "auto")
        return "torch" if self._uses_batch_stats() else configured

    @backend.setter
    def backend(self, value: str) -> None:
        self.__dict__["_backend"] = value


# --------------------------------------------------------------------------------------------------
# ghost batch norm
# --------------------------------------------------------------------------------------------------

def _group_norm_stats(xg: Tensor, weight, bias, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``xg`` of shape (G, V, C, *) per group and channel; returns y, means (G, C), vars (G, C)."""
    cdt = _compute_dtype(xg)
    dims = [1] + list(range(3, xg.dim()))
    var, mean = torch.var_mean(xg.to(cdt), dim=dims, correction=0)          # (G, C)
    var = var.clamp_min(0)
    inv_std = torch.rsqrt(var + eps)
    view = [xg.shape[0], 1, xg.shape[2]] + [1] * (xg.dim() - 3)               # (G, 1, C, 1, ...)
    y = (xg.to(cdt) - mean.reshape(view)) * inv_std.reshape(view)
    if weight is not None:
        y = y * _shape_channel(weight.to(cdt), xg.dim(), 2)
    if bias is not None:
        y = y + _shape_channel(bias.to(cdt), xg.dim(), 2)
    return y.to(xg.dtype), mean, var


def ghost_batch_norm(x: Tensor, virtual_batch_size: int, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-5,
                     name: str = "ghost_batch_norm") -> tuple[Tensor, Tensor, Tensor]:
    r"""Training-mode batch norm with statistics per consecutive sub-batch of ``virtual_batch_size`` samples.

    The batch is viewed as ``(G, V, C, *)`` and normalized in one vectorized pass; a last, smaller
    sub-batch (when ``N`` is not a multiple of ``V``) is normalized on its own. Gradients flow through
    the sub-batch statistics exactly as in batch norm applied to each sub-batch.

    Returns:
        ``(y, mean, var)``: the output (shape, dtype and memory format of ``x``) and the whole batch's
        per-channel mean and biased variance (merged from the sub-batch statistics, for running estimates).
    """
    if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"{name}: virtual_batch_size must be a positive int (got {virtual_batch_size!r})")
    n = x.shape[0]
    per_sample = x[0].numel() // x.shape[1] if n else 0
    vbs = min(virtual_batch_size, n)
    full = (n // vbs) * vbs
    rest = n - full
    if rest and rest * per_sample <= 1:
        raise ValueError(
            f"{name}: the last ghost batch has {rest} sample(s) = {rest * per_sample} value per channel "
            f"(batch {n}, virtual_batch_size {virtual_batch_size}); a single value has no variance. "
            f"Use a batch size that is a multiple of virtual_batch_size or DataLoader(drop_last=True)")
    pieces, means, vars_, counts = [], [], [], []
    for start, stop, groups in ((0, full, full // vbs), (full, n, 1)):
        if stop == start:
            continue
        xg = x[start:stop].reshape(groups, (stop - start) // groups, *x.shape[1:])  # (G, V, C, *)
        y, m, v = _group_norm_stats(xg, weight, bias, eps)
        pieces.append(y.reshape(stop - start, *x.shape[1:]))
        means.append(m)
        vars_.append(v)
        counts.append(torch.full((groups,), (stop - start) // groups * per_sample, dtype=m.dtype, device=m.device))
    y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if y.dim() >= 4:
        y = y.contiguous(memory_format=_memory_format(x))
    # Chan et al.'s merge of the sub-batch moments: the whole batch's mean and biased variance.
    mean_g, var_g, count_g = (torch.cat(t).detach() for t in (means, vars_, counts))  # (G, C), (G, C), (G,)
    weights = (count_g / count_g.sum())[:, None]
    mean = (weights * mean_g).sum(0)
    var = (weights * (var_g + (mean_g - mean) ** 2)).sum(0)
    return y, mean, var


class _GhostBatchNorm(_OwnTrainingForward, _BatchNorm):
    """Ghost batch norm; see :class:`GhostBatchNorm2d`."""

    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, bias: bool = True, backend: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"{type(self).__name__}({num_features}): virtual_batch_size must be a positive "
                             f"int (got {virtual_batch_size!r})")
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: Tensor) -> Tensor:
        if not self._uses_batch_stats() or x.numel() == 0:
            return super().forward(x)   # inference: the population estimates, exactly as BatchNorm
        self._check_input(x)
        momentum = self._momentum_for_step()
        y, mean, var = ghost_batch_norm(x, self.virtual_batch_size, self.weight, self.bias, self.eps,
                                        self.layer_name)
        if self._updates_running_stats():
            self._commit_running_stats(_merge_running(self, mean, var, x.numel() // x.shape[1], momentum, y))
        return y


_GHOST_DOC = r"""Ghost (virtual) batch normalization over a {dims} input.

    In training each consecutive sub-batch of ``virtual_batch_size`` samples is normalized with its own
    statistics (a last smaller sub-batch on its own), which keeps BN's regularizing noise of a small batch
    while computing on a large one (Hoffer, Hubara & Soudry 2017, https://arxiv.org/abs/1705.08741).
    The running estimates are updated once per forward from the whole batch (its mean and unbiased
    variance, merged from the sub-batch moments), so they estimate the population statistics, and
    inference uses them exactly as :class:`bnlab.nn.BatchNorm{d}` does; ``virtual_batch_size`` has no
    effect in eval mode. No Python loop runs over sub-batches.

    Args:
        num_features: ``C``.
        virtual_batch_size: samples per ghost batch. Default: 32.
        eps, momentum, affine, track_running_stats, device, dtype, bias, backend: as
            :class:`bnlab.nn.BatchNorm1d`.

    Shape:
        input {shape}; output the same shape, dtype and memory format.
"""


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(dims="2D or 3D", d="1d", shape="``(N, C)`` or ``(N, C, L)``")
    _expected_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(dims="4D", d="2d", shape="``(N, C, H, W)``")
    _expected_dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(dims="5D", d="3d", shape="``(N, C, D, H, W)``")
    _expected_dims = (5,)


# --------------------------------------------------------------------------------------------------
# batch renormalization
# --------------------------------------------------------------------------------------------------

class _BatchRenorm(_OwnTrainingForward, _BatchNorm):
    """Batch renormalization; see :class:`BatchRenorm2d`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, backend: str = "auto", rmax: float = 3.0, dmax: float = 5.0,
                 warmup_steps: int = 5000, ramp_steps: int = 20000) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        name = f"{type(self).__name__}({num_features})"
        if not track_running_stats:
            raise ValueError(f"{name}: batch renormalization corrects towards the running statistics, so it "
                             f"needs track_running_stats=True")
        if rmax < 1 or dmax < 0:
            raise ValueError(f"{name}: expected rmax >= 1 and dmax >= 0 (got rmax={rmax}, dmax={dmax})")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"{name}: warmup_steps and ramp_steps must be >= 0 "
                             f"(got {warmup_steps}, {ramp_steps})")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.ramp_steps = int(warmup_steps), int(ramp_steps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}")

    def current_limits(self, step: Optional[int] = None) -> tuple[float, float]:
        """``(rmax, dmax)`` at training step ``step`` (default: ``num_batches_tracked``): 1 and 0 (plain BN)
        during the warm-up, then a linear ramp to the configured limits over ``ramp_steps`` steps."""
        step = int(self.num_batches_tracked) if step is None else step
        if step <= self.warmup_steps:
            return 1.0, 0.0
        t = 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + t * (self.rmax - 1.0), t * self.dmax

    def forward(self, x: Tensor) -> Tensor:
        if not self._uses_batch_stats() or x.numel() == 0:
            return super().forward(x)
        self._check_input(x)
        momentum = self._momentum_for_step()   # counts this step first, as num_batches_tracked does
        rmax, dmax = self.current_limits()
        cdt = _compute_dtype(x)
        dims = _reduce_dims(x)
        var, mean = torch.var_mean(x.to(cdt), dim=dims, correction=0)
        var = var.clamp_min(0)
        std = torch.sqrt(var + self.eps)
        running_std = torch.sqrt(self.running_var.to(cdt) + self.eps)
        # r and d are treated as constants for the gradient (the paper's stop_gradient)
        r = (std.detach() / running_std).clamp(1.0 / rmax, rmax)
        d = ((mean.detach() - self.running_mean.to(cdt)) / running_std).clamp(-dmax, dmax)
        scale = r / std
        shift = d - mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight.to(cdt), shift * self.weight.to(cdt)
        if self.bias is not None:
            shift = shift + self.bias.to(cdt)
        y = (x.to(cdt) * _per_channel(scale, x) + _per_channel(shift, x)).to(x.dtype)
        if y.dim() >= 4:
            y = y.contiguous(memory_format=_memory_format(x))
        if self._updates_running_stats():
            self._commit_running_stats(_merge_running(self, mean.detach(), var.detach(),
                                                      x.numel() // x.shape[1], momentum, y))
        return y


_RENORM_DOC = r"""Batch renormalization over a <dims> input (Ioffe 2017, https://arxiv.org/abs/1702.03275).

    .. math::
        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d, \quad
        r = \operatorname{clip}_{[1/r_{max}, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
        d = \operatorname{clip}_{[-d_{max}, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \quad
        y = \gamma \hat x + \beta

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}`, :math:`\sigma = \sqrt{\text{running\_var}} +
    \epsilon}` and no gradient through r and d. Training then sees the same normalization as inference
    wherever the clipping is inactive, which helps small or non-i.i.d. batches. The first
    ``warmup_steps`` steps are plain batch norm (r = 1, d = 0); the limits then grow linearly to ``rmax``
    and ``dmax`` over ``ramp_steps`` steps (the paper: 5k steps of BN, rmax → 3, dmax → 5). The step is
    ``num_batches_tracked``, so the schedule is saved in the ``state_dict`` with no new keys. Inference is
    plain batch norm with the running statistics.

    Args:
        num_features: ``C``.
        eps, affine, device, dtype, bias, backend: as :class:`bnlab.nn.BatchNorm1d`.
        momentum: running-statistics factor (PyTorch convention). Default: 0.01, the paper's α.
        track_running_stats: must be True (r and d need running statistics).
        rmax, dmax: final clipping limits (keyword-only). Default: 3 and 5.
        warmup_steps: steps of plain batch norm. Default: 5000.
        ramp_steps: steps of linear relaxation after the warm-up. Default: 20000.

    Shape:
        input <shape>; output the same shape, dtype and memory format.
"""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _RENORM_DOC.replace("<dims>", "2D or 3D").replace("<shape>", "``(N, C)`` or ``(N, C, L)``")
    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _RENORM_DOC.replace("<dims>", "4D").replace("<shape>", "``(N, C, H, W)``")
    _expected_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _RENORM_DOC.replace("<dims>", "5D").replace("<shape>", "``(N, C, D, H, W)``")
    _expected_dims = (5,)
