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
from torch import nn

from bnlab import functional as F
from bnlab import protocol

__all__ = ["accumulate_bn_stats"]


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
    (:class:`bnlab.nn.sync.SyncBatchNorm`, ``torch.nn.SyncBatchNorm``) merge the accumulated statistics
    across their process group on exit, so every process must leave the block together.

    Args:
        model: the network (or a single batch-norm layer).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = {name: m for name, m in model.named_modules()
                       if protocol.is_batch_norm(m) and getattr(type(m), "update_running_stats", True) is not False}
        if not self.layers:
            raise ValueError(f"accumulate_bn_stats: {type(model).__name__} contains no batch-norm layer")
        self._stats: dict[str, F.Moments] = {}
        self._hooks: list = []
        self._snapshots: dict[str, Optional[tuple]] = {}

    def __enter__(self) -> "accumulate_bn_stats":
        if self._hooks:
            raise RuntimeError("accumulate_bn_stats: this context is already active (it is not re-entrant)")
        self._stats = {}
        for name, m in self.layers.items():
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: self._before(name, mod, args)))
            self._hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: self._after(name, mod)))
        return self

    def _before(self, name: str, m: nn.Module, args) -> None:
        if not protocol.updates_running_stats(m):
            self._snapshots[name] = None
            return
        batch = F.moments(args[0].detach().double())
        self._stats[name] = F.merge_moments(self._stats[name], batch) if name in self._stats else batch
        # the layer's own update of this call is undone in _after
        self._snapshots[name] = protocol.snapshot(m)

    def _after(self, name: str, m: nn.Module) -> None:
        snapshot = self._snapshots.pop(name, None)
        if snapshot is not None:
            protocol.restore(m, snapshot)

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
        from bnlab.nn.sync import merge_across_processes, sync_group   # torch.distributed only when needed
        for name, m in self.layers.items():
            acc = self._stats.get(name)
            synced, group = sync_group(m)
            if synced:   # every process joins, even one whose shards were all empty
                if acc is None:
                    zeros = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
                    acc = F.Moments(0, zeros, zeros)
                acc = merge_across_processes(acc, group)
            if acc is None or acc.count == 0:
                continue
            m.num_batches_tracked.add_(1)
            momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            mean, var, finite = F.update_running_stats(m.running_mean, m.running_var, acc.mean, acc.var, acc.count,
                                                       momentum)
            if not bool(finite):
                m.num_batches_tracked.sub_(1)
                m.skipped_updates = getattr(m, "skipped_updates", 0) + 1
                continue
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        self._stats = {}
