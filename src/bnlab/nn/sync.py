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
the :mod:`bnlab.nn.variants` switches; it refuses layers whose behaviour it would lose.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab import functional as F
from bnlab.nn import batchnorm as bnn
from bnlab import protocol
from bnlab.nn import variants

__all__ = ["SyncBatchNorm", "SyncBatchRenorm", "convert_sync_batchnorm", "gather_batch_stats",
           "merge_across_processes", "sync_group"]


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def merge_across_processes(local: F.Moments, group=None) -> F.Moments:
    """The :class:`bnlab.functional.Moments` of the union of every process's values: one ``all_gather`` of
    each process's ``(count, mean, m2)``, then :func:`bnlab.functional.merge_moments` in float64. Every
    process gets the same answer (float64 tensors, exact counts)."""
    channels = local.mean.shape[0]
    packed = torch.cat([torch.tensor([float(local.count)], dtype=torch.float64, device=local.mean.device),
                        local.mean.double(), local.m2.double()])                      # (2C + 1,)
    gathered = [torch.empty_like(packed) for _ in range(_world(group))]
    dist.all_gather(gathered, packed, group=group)
    total = F.merge_moments(*(F.Moments(int(p[0]), p[1:channels + 1], p[channels + 1:]) for p in gathered))
    if total.count == 0:
        zeros = torch.zeros_like(packed[1:channels + 1])
        return F.Moments(0, zeros, zeros.clone())
    return total


def merge_moments(count: int, mean: Tensor, sq_dev: Tensor, group=None) -> tuple[int, Tensor, Tensor]:
    """Deprecated (until bnlab 0.3): :func:`merge_across_processes`, which takes and returns
    :class:`bnlab.functional.Moments` (this name clashed with :func:`bnlab.functional.merge_moments`)."""
    import warnings
    warnings.warn("bnlab.nn.sync.merge_moments(count, mean, sq_dev, group) is now "
                  "merge_across_processes(Moments, group); the old name works until bnlab 0.3",
                  FutureWarning, stacklevel=2)
    return tuple(merge_across_processes(F.Moments(count, mean, sq_dev), group))


def gather_batch_stats(x: Tensor, group=None) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of the union of ``x`` over all processes of ``group``, and the
    number of values per channel ``n``. Float64 merge (exact counts); every process gets the same answer."""
    cdt = F.compute_dtype(x)
    total = merge_across_processes(F.moments(x.detach()), group)
    if total.count == 0:
        ones = torch.ones(x.shape[1], dtype=cdt, device=x.device)
        return torch.zeros_like(ones), ones, 0
    return total.mean.to(cdt), (total.m2 / total.count).clamp_min(0).to(cdt), total.count


def sync_group(layer: nn.Module):
    """``(True, process_group)`` when ``layer`` synchronizes its statistics across several processes right
    now (this module's layers or ``torch.nn.SyncBatchNorm``), else ``(False, None)``."""
    if isinstance(layer, (_SyncMixin, nn.SyncBatchNorm)) and _world(layer.process_group) > 1:
        return True, layer.process_group
    return False, None


class _SyncNormalize(torch.autograd.Function):
    """y = (x − μ)·(γ/σ) + β with the global μ, σ given; the backward is
    :func:`bnlab.functional.batch_norm_backward` with the global count and its sums all-reduced."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, count, group):
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        ctx.has_bias = bias is not None
        return F.normalize(x, mean, var, weight, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, var = ctx.saved_tensors

        def all_processes(sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
            total = torch.cat([sum_dy, sum_dy_xhat])                       # (2C,): one all_reduce
            dist.all_reduce(total, group=ctx.group)
            return total[:sum_dy.shape[0]], total[sum_dy.shape[0]:]

        dx, dweight, dbias = F.batch_norm_backward(dy, x, mean, var, weight, ctx.eps, has_bias=ctx.has_bias,
                                                   needs_input_grad=ctx.needs_input_grad[:3], count=ctx.count,
                                                   reduce=all_processes)
        if dx is not None:
            dx = dx.to(x.dtype)
        return dx, dweight, dbias, None, None, None, None, None


class _SyncMixin:
    """The forward shared by :class:`SyncBatchNorm` and :class:`SyncBatchRenorm`."""

    process_group = None
    bn_plain_training = False   # statistics across processes: the fused kernels must not replace it
    bn_plain_inference = True
    bn_sync = "keep"            # already synchronized

    def _sync_active(self) -> bool:
        return protocol.uses_batch_stats(self) and _world(self.process_group) > 1

    def forward(self, x: Tensor) -> Tensor:
        if not self._sync_active():
            return super().forward(x)
        # the single-value check is on the global count below, not on this process's share
        F.check_input(x, self.num_features, False, self.layer_name, self._expected_dims)
        momentum = self.momentum_for_step()
        mean, var, count = gather_batch_stats(x, self.process_group)
        if count == 0:   # every shard empty: nothing to normalize, no backward collective either
            return F.empty_output(x, self.weight, self.bias)
        if count == 1:
            raise ValueError(f"{self.layer_name}: expected more than 1 value per channel when training, got 1 "
                             f"across all processes (input shape here {tuple(x.shape)})")
        weight, bias = self.batch_affine(mean, var)   # batch renorm folds its r and d in
        # an empty shard goes through the same Function: its backward must join the all_reduce
        y = _SyncNormalize.apply(x, weight, bias, mean, var, self.eps, count, self.process_group)
        if protocol.updates_running_stats(self):
            self.update_from_batch(mean, var, count, momentum)
        return y


class SyncBatchNorm(_SyncMixin, bnn.BatchNorm):
    r"""Batch norm whose training statistics are those of the union of all processes' batches.

    Same constructor as ``torch.nn.SyncBatchNorm``: ``(num_features, eps, momentum, affine,
    track_running_stats, process_group, device, dtype)`` plus ``bias`` and ``backend`` (keyword-only);
    same ``state_dict`` as ``torch.nn.BatchNorm*``. Accepts 2D–5D input. The running statistics are
    updated from the global batch (mean and unbiased variance), identically on every process.
    Honours ``use_batch_stats`` / ``update_running_stats`` (see :func:`bnlab.tools.freeze.set_bn_switches`).

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


class SyncBatchRenorm(_SyncMixin, variants.BatchRenorm):
    r"""Batch renormalization (:class:`bnlab.nn.variants.BatchRenorm2d`) with μ_B and σ_B of the union of all
    processes' batches; r and d then follow from the global statistics and are constants for the gradient.
    Constructor as :class:`~bnlab.nn.variants.BatchRenorm2d` plus ``process_group`` (keyword-only)."""

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------

def _convert_layer(layer: nn.Module, policy: str, process_group) -> nn.Module:
    ref = protocol.first_tensor(layer)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    common = dict(eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                  track_running_stats=layer.track_running_stats, bias=layer.bias is not None,
                  backend=getattr(layer, "backend", "auto"), **factory)
    if policy == "renorm":
        new = SyncBatchRenorm(layer.num_features, process_group=process_group, rmax=layer.rmax, dmax=layer.dmax,
                              warmup_steps=layer.warmup_steps, ramp_steps=layer.ramp_steps, **common)
    else:
        new = SyncBatchNorm(layer.num_features, process_group=process_group, **common)
    return protocol.carry_over(layer, new)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a synchronized one, in place; returns ``model`` (or
    the replacement when ``model`` itself is a batch-norm layer).

    * ``torch.nn.BatchNorm1d/2d/3d`` and :mod:`bnlab.nn` ``BatchNorm1d/2d/3d`` → :class:`SyncBatchNorm`;
    * :mod:`bnlab.nn.variants` ``BatchRenorm*`` → :class:`SyncBatchRenorm` (same limits and schedule);
    * kept as they are: ``torch.nn.SyncBatchNorm`` and ours (already synchronized), ``FrozenBatchNorm*``
      (no batch statistics), ``GhostBatchNorm*`` (ghost batches are sub-batches of each process's batch);
    * state, train/eval mode, ``requires_grad`` and the ``use_batch_stats`` / ``update_running_stats``
      switches carry over;
    * any other batch-norm subclass raises ``TypeError``: its custom behaviour would be lost.

    Call it before wrapping the model in ``DistributedDataParallel``. ``process_group`` defaults to the
    whole world.
    """
    def convert(name: str, module: nn.Module) -> Optional[nn.Module]:
        if not protocol.is_batch_norm(module):
            return None
        policy = protocol.capability(module, "bn_sync")
        if policy == "keep":
            return module
        if policy in ("plain", "renorm"):
            return _convert_layer(module, policy, process_group)
        raise TypeError(f"convert_sync_batchnorm: layer {name or '<model>'} is a {type(module).__name__}, a "
                        f"batch-norm subclass this function does not know how to synchronize without losing "
                        f"its behaviour; synchronize it yourself or replace it by a known layer")

    return protocol.replace_layers(model, convert)
