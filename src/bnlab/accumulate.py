r"""Gradient-accumulation-aware running statistics: one update per optimizer step, not one per micro-batch.

When one optimizer step spans k micro-batches, batch norm normally updates its running statistics k
times, each from a small batch: the estimate then follows the micro-batches (momentum effectively k
times larger, variance of small batches). Inside :class:`accumulate_bn_stats` each layer still
normalizes every micro-batch with that micro-batch's statistics (the forward is unchanged), but its
running statistics stay put while the sufficient statistics — count :math:`n`, mean, and sum of squared
deviations :math:`M_2` — are merged across micro-batches (Chan et al. 1979); on exit each layer takes
one step

.. math::
    \hat\mu \leftarrow (1-m)\hat\mu + m\,\mu, \qquad \hat\sigma^2 \leftarrow (1-m)\hat\sigma^2 + m\,\frac{M_2}{n-1}

exactly what batch norm does for one batch of all k micro-batches together.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from bnlab.nn import _BatchNorm
from bnlab.variants import _FrozenBatchNorm, is_batch_norm

__all__ = ["accumulate_bn_stats"]


def _would_update(m: nn.Module) -> bool:
    """Whether ``m`` updates its running statistics in a forward call right now."""
    if isinstance(m, _BatchNorm):
        return m._updates_running_stats()
    use_batch = m.__dict__.get("use_batch_stats")   # bnlab.variants switches on torch layers
    uses_batch = m.training if use_batch is None else use_batch
    return (m.training and m.track_running_stats and m.running_mean is not None and uses_batch
            and m.__dict__.get("update_running_stats", True))


class _Sufficient:
    """Count, mean and M2 per channel in float64, merged batch by batch."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().double(), dim=[0] + list(range(2, x.dim())), correction=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + var * n + delta ** 2 * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total


class accumulate_bn_stats:
    """Context manager: batch-norm running statistics updated once, from all micro-batches run inside it.

    Example::

        for step, batch in enumerate(steps):              # each step = k micro-batches
            with accumulate_bn_stats(model):
                for x, y in micro_batches(batch, k):
                    (loss_fn(model(x), y) / k).backward()
            optimizer.step(); optimizer.zero_grad()

    Works with :mod:`bnlab` layers (including ghost batch norm and batch renorm, whose running estimates
    are full-batch statistics too) and ``torch.nn.BatchNorm*``; layers that would not update (eval mode,
    frozen statistics) are left alone. A layer whose merged statistics are not finite is not updated and
    its ``skipped_updates`` grows. If the block raises, nothing is committed. Synchronized layers
    (:class:`bnlab.distributed.SyncBatchNorm`, ``torch.nn.SyncBatchNorm``) merge the accumulated statistics
    across their process group on exit, so every process must leave the block together.

    Args:
        model: the network (or a single batch-norm layer).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = {name: m for name, m in model.named_modules()
                       if is_batch_norm(m) and not isinstance(m, _FrozenBatchNorm)}
        if not self.layers:
            raise ValueError(f"accumulate_bn_stats: {type(model).__name__} contains no batch-norm layer")
        self._stats: dict[str, _Sufficient] = {}
        self._hooks: list = []
        self._snapshots: dict[str, Optional[tuple]] = {}

    def __enter__(self) -> "accumulate_bn_stats":
        if self._hooks:
            raise RuntimeError("accumulate_bn_stats: this context is already active (it is not re-entrant)")
        self._stats = {name: _Sufficient() for name in self.layers}
        for name, m in self.layers.items():
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: self._before(name, mod, args)))
            self._hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: self._after(name, mod)))
        return self

    def _before(self, name: str, m: nn.Module, args) -> None:
        if not _would_update(m):
            self._snapshots[name] = None
            return
        self._stats[name].add(args[0])
        # the layer's own update of this call is undone in _after
        self._snapshots[name] = (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
                                 getattr(m, "skipped_updates", 0))

    @torch.no_grad()
    def _after(self, name: str, m: nn.Module) -> None:
        snapshot = self._snapshots.pop(name, None)
        if snapshot is not None:
            m.running_mean.copy_(snapshot[0])
            m.running_var.copy_(snapshot[1])
            m.num_batches_tracked.copy_(snapshot[2])
            if hasattr(m, "skipped_updates"):
                m.skipped_updates = snapshot[3]

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if exc_type is None:
            self.commit()
        self._stats = {}

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the accumulated statistics (called on a normal exit)."""
        from bnlab.distributed import merge_moments, sync_group
        for name, m in self.layers.items():
            acc = self._stats.get(name)
            if acc is None:
                continue
            synced, group = sync_group(m)
            if synced:   # every process joins, even one whose shards were all empty
                zeros = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
                local_mean, local_m2 = (acc.mean, acc.m2) if acc.count else (zeros, zeros)
                acc.count, acc.mean, acc.m2 = merge_moments(acc.count, local_mean, local_m2, group)
            if acc.count == 0:
                continue
            mean, m2, n = acc.mean, acc.m2, acc.count
            var = m2 / (n - 1) if n > 1 else m2
            if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                m.skipped_updates = getattr(m, "skipped_updates", 0) + 1
                continue
            m.num_batches_tracked.add_(1)
            momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            m.running_mean.lerp_(mean.to(m.running_mean.dtype), momentum)
            m.running_var.lerp_(var.to(m.running_var.dtype), momentum)
            acc.count = 0
