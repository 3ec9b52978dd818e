r"""Batch-norm variants for the edges of practice: ghost batches and batch renormalization.

* :class:`GhostBatchNorm1d/2d/3d` — statistics over sub-batches ("ghost" or virtual batches) of a fixed
  size in training, population estimates at inference (Hoffer et al. 2017, https://arxiv.org/abs/1705.08741).
* :class:`BatchRenorm1d/2d/3d` — batch renormalization with clipped r/d corrections and a warm-up
  (Ioffe 2017, https://arxiv.org/abs/1702.03275).

Frozen statistics (``freeze_stats``, ``set_bn_switches``, ``freeze_bn`` and ``FrozenBatchNorm*``) are operations
on a model: :mod:`bnlab.tools.freeze`.

All layers keep the ``torch.nn.BatchNorm`` contract (constructor arguments, parameters and buffers), so a
``state_dict`` loads both ways between them, :mod:`bnlab.nn` and :mod:`torch.nn`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab import protocol
from bnlab.nn.batchnorm import BatchNorm

__all__ = [
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
    "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
]


# --------------------------------------------------------------------------------------------------
# ghost batch norm
# --------------------------------------------------------------------------------------------------

def _ghost_groups(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  backend: str) -> tuple[Tensor, F.Moments]:
    """Batch norm of ``x`` (G·V, C, *) per group of V consecutive samples, as one batch norm of the
    (V, G·C, *) view (group g's channel c is channel g·C + c), so the statistics, the closed-form
    backward and the fused kernels are :mod:`bnlab.functional`'s. Returns y and the whole slice's moments."""
    n, channels, rest = x.shape[0], x.shape[1], x.shape[2:]
    size = n // groups
    xr = x.reshape(groups, size, channels, *rest).transpose(0, 1).reshape(size, groups * channels, *rest)
    out = F.batch_norm_stats(xr, None, None, None if weight is None else weight.repeat(groups),
                             None if bias is None else bias.repeat(groups), True, 0.0, eps, backend)
    y = out.output.reshape(size, groups, channels, *rest).transpose(0, 1).reshape(x.shape)
    count = size * (x[0].numel() // channels)
    means, variances = out.batch_mean.reshape(groups, channels), out.batch_var.reshape(groups, channels)
    mean = means.mean(0)  # groups of equal size: the law of total variance, vectorized over the groups
    var = variances.mean(0) + (means - mean).pow(2).mean(0)
    return y, F.Moments(count * groups, mean, var * (count * groups))


def ghost_batch_norm(x: Tensor, virtual_batch_size: int, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-5,
                     name: str = "ghost_batch_norm", backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
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
    for size, which in ((vbs, "each ghost batch"), (rest, "the last ghost batch")):
        if size and size * per_sample <= 1:
            raise ValueError(
                f"{name}: {which} has {size} sample(s) = {size * per_sample} value per channel "
                f"(batch {n}, virtual_batch_size {virtual_batch_size}); a single value has no variance. "
                f"Use a batch size that is a multiple of a larger virtual_batch_size or DataLoader(drop_last=True)")
    y, stats = _ghost_groups(x[:full], full // vbs, weight, bias, eps, backend)
    if rest:
        y_rest, stats_rest = _ghost_groups(x[full:], 1, weight, bias, eps, backend)
        y, stats = torch.cat([y, y_rest]), F.merge_moments(stats, stats_rest)
    if y.dim() >= 4:
        y = y.contiguous(memory_format=F.memory_format(x))
    return y, stats.mean.detach(), stats.var.detach()


class GhostBatchNorm(BatchNorm):
    """Ghost batch norm, the base of :class:`GhostBatchNorm1d/2d/3d` (see :class:`GhostBatchNorm2d`)."""

    bn_plain_training = False   # its own statistics: the fused kernels must not replace its forward
    bn_plain_inference = True
    bn_sync = "keep"            # ghost batches are sub-batches of each process's batch

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
        if not protocol.uses_batch_stats(self) or x.numel() == 0:
            return super().forward(x)   # inference: the population estimates, exactly as BatchNorm
        self._check_input_dim(x)
        momentum = self.momentum_for_step()
        y, mean, var = ghost_batch_norm(x, self.virtual_batch_size, self.weight, self.bias, self.eps,
                                        self.layer_name, self.backend)
        if protocol.updates_running_stats(self):
            self.update_from_batch(mean, var, x.numel() // x.shape[1], momentum)
        return y


_GHOST_DOC = r"""Ghost (virtual) batch normalization over a {dims} input.

    In training each consecutive sub-batch of ``virtual_batch_size`` samples is normalized with its own
    statistics (a last smaller sub-batch on its own), which keeps BN's regularizing noise of a small batch
    while computing on a large one (Hoffer, Hubara & Soudry 2017, https://arxiv.org/abs/1705.08741).
    The running estimates are updated once per forward from the whole batch (its mean and unbiased
    variance, merged from the sub-batch moments), so they estimate the population statistics, and
    inference uses them exactly as :class:`bnlab.nn.BatchNorm{d}` does; ``virtual_batch_size`` has no
    effect in eval mode. The sub-batches are normalized as one batch norm of a reshaped view: no Python
    loop runs over their values.

    Args:
        num_features: ``C``.
        virtual_batch_size: samples per ghost batch. Default: 32.
        eps, momentum, affine, track_running_stats, device, dtype, bias, backend: as
            :class:`bnlab.nn.BatchNorm1d`.

    Shape:
        input {shape}; output the same shape, dtype and memory format.
"""


class GhostBatchNorm1d(GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(dims="2D or 3D", d="1d", shape="``(N, C)`` or ``(N, C, L)``")
    _expected_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(dims="4D", d="2d", shape="``(N, C, H, W)``")
    _expected_dims = (4,)


class GhostBatchNorm3d(GhostBatchNorm):
    __doc__ = _GHOST_DOC.format(dims="5D", d="3d", shape="``(N, C, D, H, W)``")
    _expected_dims = (5,)


# --------------------------------------------------------------------------------------------------
# batch renormalization
# --------------------------------------------------------------------------------------------------

class BatchRenorm(BatchNorm):
    """Batch renormalization, the base of :class:`BatchRenorm1d/2d/3d` (see :class:`BatchRenorm2d`)."""

    bn_plain_training = False
    bn_plain_inference = True
    bn_sync = "renorm"

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

    def batch_affine(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """γ·r and γ·d + β: the renormalized output ``γ(x̂·r + d) + β`` as batch norm with this affine map,
        r and d from the batch's ``mean`` and biased ``var`` (constants for the gradient)."""
        rmax, dmax = self.current_limits()
        running_std = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
        r = (torch.sqrt(var.detach() + self.eps) / running_std).clamp(1.0 / rmax, rmax)
        d = ((mean.detach() - self.running_mean.to(mean.dtype)) / running_std).clamp(-dmax, dmax)
        if self.weight is None:
            return r, d if self.bias is None else d + self.bias.to(d.dtype)
        weight = self.weight * r.to(self.weight.dtype)
        bias = self.weight * d.to(self.weight.dtype)
        return weight, bias if self.bias is None else bias + self.bias

    def forward(self, x: Tensor) -> Tensor:
        if not protocol.uses_batch_stats(self) or x.numel() == 0:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = self.momentum_for_step()   # counts this step first, as num_batches_tracked does
        stats = F.moments(x.detach())
        weight, bias = self.batch_affine(stats.mean, stats.var)
        out = F.batch_norm_stats(x, None, None, weight, bias, True, 0.0, self.eps, self.backend)
        if protocol.updates_running_stats(self):
            self.update_from_batch(out.batch_mean, out.batch_var, stats.count, momentum)
        return out.output


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


class BatchRenorm1d(BatchRenorm):
    __doc__ = _RENORM_DOC.replace("<dims>", "2D or 3D").replace("<shape>", "``(N, C)`` or ``(N, C, L)``")
    _expected_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    __doc__ = _RENORM_DOC.replace("<dims>", "4D").replace("<shape>", "``(N, C, H, W)``")
    _expected_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    __doc__ = _RENORM_DOC.replace("<dims>", "5D").replace("<shape>", "``(N, C, D, H, W)``")
    _expected_dims = (5,)
