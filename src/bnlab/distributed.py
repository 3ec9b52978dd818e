r"""Synchronized batch norm on :mod:`torch.distributed`: statistics over the union of every process's batch.

Forward: each process computes its count :math:`n_p`, mean :math:`\mu_p` and sum of squared deviations
:math:`M_p`; one ``all_gather`` and Chan et al.'s merge give the global

.. math::
    n = \textstyle\sum_p n_p, \quad \mu = \frac1n \sum_p n_p \mu_p, \quad
    \sigma^2 = \frac1n \Big(\sum_p M_p + \sum_p n_p (\mu_p - \mu)^2\Big)

so processes may hold different batch sizes, including none. Backward: the input gradient of batch norm
needs the global :math:`\sum dy` and :math:`\sum dy\,(x - \mu)`, reduced with one ``all_reduce``:

.. math::
    dx = \frac{\gamma}{\sigma}\Big(dy - \frac{\sum dy}{n} - \frac{(x-\mu)}{\sigma^2}\,\frac{\sum dy\,(x-\mu)}{n}\Big)

γ/β gradients stay per process, as for any parameter under ``DistributedDataParallel`` (which reduces
them). Works with gloo (CPU tensors) and NCCL (CUDA tensors). Without an initialized process group, or
with one process, the layers are plain batch norm.

:func:`convert_sync_batchnorm` swaps the batch-norm layers of a model for these, keeping state, mode and
the :mod:`bnlab.variants` switches; it refuses layers whose behaviour it would lose.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab import functional as F
from bnlab import nn as bnn
from bnlab import variants
from bnlab.functional import _compute_dtype, _memory_format, _normalize, _per_channel, _reduce_dims

__all__ = ["SyncBatchNorm", "SyncBatchRenorm", "convert_sync_batchnorm", "gather_batch_stats", "merge_moments",
           "sync_group"]


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def merge_moments(count: int, mean: Tensor, sq_dev: Tensor, group=None) -> tuple[int, Tensor, Tensor]:
    """Merge per-process ``(count, mean, sum of squared deviations)`` over ``group`` (Chan et al.'s pairwise
    formula, float64): returns the global ``(count, mean, sum of squared deviations)`` on every process."""
    channels = mean.shape[0]
    packed = torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=mean.device),
                        mean.double(), sq_dev.double()])                             # (2C + 1,)
    gathered = [torch.empty_like(packed) for _ in range(_world(group))]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)                                                    # (P, 2C + 1)
    counts, means, sq_devs = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
    n = counts.sum()
    if n == 0:
        return 0, torch.zeros_like(packed[1:channels + 1]), torch.zeros_like(packed[1:channels + 1])
    total_mean = (counts * means).sum(0) / n
    total_sq_dev = sq_devs.sum(0) + (counts * (means - total_mean) ** 2).sum(0)
    return int(n), total_mean, total_sq_dev


def gather_batch_stats(x: Tensor, group=None) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of the union of ``x`` over all processes of ``group``, and the
    number of values per channel ``n``. Float64 merge (exact counts); every process gets the same answer."""
    channels = x.shape[1]
    cdt = _compute_dtype(x)
    local_n = x.numel() // channels if x.numel() else 0
    if local_n:
        var, mean = torch.var_mean(x.detach().to(cdt), dim=_reduce_dims(x), correction=0)
    else:
        var = mean = torch.zeros(channels, dtype=cdt, device=x.device)
    n, mean, sq_dev = merge_moments(local_n, mean, var.double() * local_n, group)
    if n == 0:
        return torch.zeros(channels, dtype=cdt, device=x.device), torch.ones(channels, dtype=cdt, device=x.device), 0
    return mean.to(cdt), (sq_dev / n).clamp_min(0).to(cdt), n


def sync_group(layer: nn.Module):
    """``(True, process_group)`` when ``layer`` synchronizes its statistics across several processes right
    now (this module's layers or ``torch.nn.SyncBatchNorm``), else ``(False, None)``."""
    if isinstance(layer, (_SyncMixin, nn.SyncBatchNorm)) and _world(layer.process_group) > 1:
        return True, layer.process_group
    return False, None


class _SyncNormalize(torch.autograd.Function):
    """y = (x − μ)·(γ/σ) + β with global μ, σ given; the backward all-reduces Σdy and Σdy·(x − μ)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, inv_std, count, group):
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.count, ctx.group = count, group
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return _normalize(x, mean, inv_std, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, inv_std = ctx.saved_tensors
        cdt = inv_std.dtype
        dims = _reduce_dims(x)
        dy_c = dy.to(cdt)
        centred = x.to(cdt) - _per_channel(mean, x)
        local = torch.cat([dy_c.sum(dims), (dy_c * centred).sum(dims)])            # (2C,)  Σdy, Σdy·(x−μ)
        channels = mean.shape[0]
        dx = dweight = dbias = None
        if ctx.has_weight and ctx.needs_input_grad[1]:
            dweight = (local[channels:] * inv_std).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = local[:channels].to(weight.dtype if weight is not None else dy.dtype)
        if ctx.needs_input_grad[0]:
            total = local.clone()
            dist.all_reduce(total, group=ctx.group)
            sum_dy, sum_dy_xmu = total[:channels], total[channels:]
            gamma_inv_std = inv_std if weight is None else weight.to(cdt) * inv_std
            n = ctx.count
            coef_x = _per_channel(-gamma_inv_std * inv_std * inv_std * sum_dy_xmu / n, x)
            shift = _per_channel(-gamma_inv_std * sum_dy / n, x)
            dx = torch.addcmul(torch.addcmul(shift, centred, coef_x), dy_c, _per_channel(gamma_inv_std, x))
            dx = dx.to(x.dtype)
            if dx.dim() >= 4:
                dx = dx.contiguous(memory_format=_memory_format(x))
        return dx, dweight, dbias, None, None, None, None


def _empty_output(x: Tensor, weight, bias) -> Tensor:
    # keep γ/β in the graph so the backward still runs on a process with an empty shard
    y = x.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return y


class _SyncMixin(variants._OwnTrainingForward):
    """The forward shared by :class:`SyncBatchNorm` and :class:`SyncBatchRenorm`."""

    process_group = None

    def _sync_active(self) -> bool:
        return self._uses_batch_stats() and _world(self.process_group) > 1

    def _corrections(self, mean: Tensor, var: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        return None   # batch renorm's (r, d)

    def forward(self, x: Tensor) -> Tensor:
        if not self._sync_active():
            return super().forward(x)
        # the single-value check is on the global count below, not on this process's share
        F.check_input(x, self.num_features, False, self.layer_name, self._expected_dims)
        momentum = self._momentum_for_step()
        mean, var, count = gather_batch_stats(x, self.process_group)
        if count == 0:   # every shard empty: nothing to normalize, no backward collective either
            return _empty_output(x, self.weight, self.bias)
        if count == 1:
            raise ValueError(f"{self.layer_name}: expected more than 1 value per channel when training, got 1 "
                             f"across all processes (input shape here {tuple(x.shape)})")
        inv_std = torch.rsqrt(var + self.eps)
        weight, bias = self.weight, self.bias
        corrections = self._corrections(mean, var)
        if corrections is not None:   # y = γ(x̂·r + d) + β = (γr)·x̂ + (γd + β), r and d constants
            r, d = corrections
            weight_eff = r if weight is None else weight * r.to(weight.dtype)
            bias_eff = (d if weight is None else weight * d.to(weight.dtype)) + (0 if bias is None else bias)
            weight, bias = weight_eff, bias_eff
        # an empty shard goes through the same Function: its backward must join the all_reduce
        y = _SyncNormalize.apply(x, weight, bias, mean, inv_std, count, self.process_group)
        if self._updates_running_stats():
            self._commit_running_stats(variants._merge_running(self, mean, var, count, momentum, y))
        return y


class SyncBatchNorm(_SyncMixin, bnn._BatchNorm):
    r"""Batch norm whose training statistics are those of the union of all processes' batches.

    Same constructor as ``torch.nn.SyncBatchNorm``: ``(num_features, eps, momentum, affine,
    track_running_stats, process_group, device, dtype)`` plus ``bias`` and ``backend`` (keyword-only);
    same ``state_dict`` as ``torch.nn.BatchNorm*``. Accepts 2D–5D input. The running statistics are
    updated from the global batch (mean and unbiased variance), identically on every process.
    Honours ``use_batch_stats`` / ``update_running_stats`` (see :func:`bnlab.variants.set_bn_switches`).

    Shape:
        input ``(N, C, *)`` with ``N`` possibly different on each process, including 0; output the same.
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None, device=None,
                 dtype=None, *, bias: bool = True, backend: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, backend=backend)
        self.process_group = process_group


class SyncBatchRenorm(_SyncMixin, variants._BatchRenorm):
    r"""Batch renormalization (:class:`bnlab.variants.BatchRenorm2d`) with μ_B and σ_B of the union of all
    processes' batches; r and d then follow from the global statistics and are constants for the gradient.
    Constructor as :class:`~bnlab.variants.BatchRenorm2d` plus ``process_group`` (keyword-only)."""

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _corrections(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        rmax, dmax = self.current_limits()
        running_std = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
        r = (torch.sqrt(var + self.eps) / running_std).clamp(1.0 / rmax, rmax)
        d = ((mean - self.running_mean.to(mean.dtype)) / running_std).clamp(-dmax, dmax)
        return r, d


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d)
_RENORM = (variants.BatchRenorm1d, variants.BatchRenorm2d, variants.BatchRenorm3d)
_KEPT = (nn.SyncBatchNorm, SyncBatchNorm, SyncBatchRenorm, variants._FrozenBatchNorm, variants._GhostBatchNorm)


def _convert_layer(name: str, layer: nn.Module, process_group) -> nn.Module:
    ref = layer.weight if layer.weight is not None else layer.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    common = dict(eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                  track_running_stats=layer.track_running_stats, bias=layer.bias is not None, **factory)
    if type(layer) in _RENORM:
        new = SyncBatchRenorm(layer.num_features, process_group=process_group, rmax=layer.rmax, dmax=layer.dmax,
                              warmup_steps=layer.warmup_steps, ramp_steps=layer.ramp_steps,
                              backend=layer.__dict__.get("_backend", "auto"), **common)
    else:
        new = SyncBatchNorm(layer.num_features, process_group=process_group,
                            backend=layer.__dict__.get("_backend", getattr(layer, "backend", "auto")), **common)
    new.load_state_dict(layer.state_dict())
    new.train(layer.training)
    for pname, p in layer.named_parameters(recurse=False):
        getattr(new, pname).requires_grad_(p.requires_grad)
    # the switches of bnlab.variants (on torch layers they live in the instance dict)
    for attr in ("use_batch_stats", "update_running_stats", "warn_nonfinite", "skipped_updates"):
        if attr in layer.__dict__:
            setattr(new, attr, layer.__dict__[attr])
    return new


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a synchronized one, in place; returns ``model`` (or
    the replacement when ``model`` itself is a batch-norm layer).

    * ``torch.nn.BatchNorm1d/2d/3d`` and :mod:`bnlab.nn` ``BatchNorm1d/2d/3d`` → :class:`SyncBatchNorm`;
    * :mod:`bnlab.variants` ``BatchRenorm*`` → :class:`SyncBatchRenorm` (same limits and schedule);
    * kept as they are: ``torch.nn.SyncBatchNorm`` and ours (already synchronized), ``FrozenBatchNorm*``
      (no batch statistics), ``GhostBatchNorm*`` (ghost batches are sub-batches of each process's batch);
    * state, train/eval mode, ``requires_grad`` and the ``use_batch_stats`` / ``update_running_stats``
      switches carry over;
    * any other batch-norm subclass raises ``TypeError``: its custom behaviour would be lost.

    Call it before wrapping the model in ``DistributedDataParallel``. ``process_group`` defaults to the
    whole world.
    """
    def convert(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, _KEPT):
            return module
        if type(module) in _PLAIN or type(module) in _RENORM:
            return _convert_layer(name, module, process_group)
        if variants.is_batch_norm(module):
            raise TypeError(f"convert_sync_batchnorm: layer {name or '<model>'} is a {type(module).__name__}, a "
                            f"batch-norm subclass this function does not know how to synchronize without losing "
                            f"its behaviour; synchronize it yourself or replace it by a known layer")
        for child_name, child in list(module.named_children()):
            setattr(module, child_name, convert(f"{name}.{child_name}" if name else child_name, child))
        return module

    return convert("", model)
