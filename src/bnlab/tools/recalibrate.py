r"""Precise-BN recalibration: recompute every batch-norm layer's population statistics from data.

Running statistics are an exponential average over the last few hundred training batches, taken while
the weights were still changing; after weight averaging (SWA, EMA) they belong to no model at all.
Recalibration runs ``num_batches`` batches through the model, with each batch-norm layer normalizing by
its batch statistics as in training, and sets the running statistics to

.. math::
    \mu = \frac1K \sum_{k=1}^K \mu_k, \qquad \sigma^2 = \frac1K \sum_{k=1}^K s_k^2

(``mode="batch_average"``: equal-weighted over batches, :math:`s_k^2` the unbiased batch variance; as
fvcore's precise BN, Wu & Johnson 2021, https://arxiv.org/abs/2105.07576) or to the exact mean and unbiased
variance of all values seen (``mode="population"``, which also counts the spread between batch means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab import protocol

__all__ = ["recalibrate_bn", "LayerShift", "model_inputs"]


@dataclass
class LayerShift:
    """How far recalibration moved one layer's statistics: the largest change of the mean in units of the
    old standard deviation, and the largest ``|log(new_var / old_var)|`` over channels."""

    layer: str
    mean_shift: float
    log_var_ratio: float

    def __str__(self) -> str:
        return (f"{self.layer}: mean moved up to {self.mean_shift:.3g} old std, "
                f"variance changed up to x{torch.tensor(self.log_var_ratio).exp().item():.3g}")


class _Moments:
    """Sufficient statistics of one layer's inputs, in float64: the sums of the batch means and unbiased
    variances, and the moments of all values seen (:func:`bnlab.functional.merge_moments`)."""

    def __init__(self) -> None:
        self.batches = 0
        self.mean_sum = self.var_sum = 0.0   # Σ_k μ_k, Σ_k s_k²
        self.total: Optional[F.Moments] = None

    def add(self, x: Tensor) -> None:
        batch = F.moments(x.detach().double())
        if batch.count < 2:
            raise ValueError(f"recalibrate_bn: a batch gave {batch.count} value per channel to a batch-norm layer; "
                             f"use batches with more than one value per channel")
        self.mean_sum = self.mean_sum + batch.mean
        self.var_sum = self.var_sum + batch.m2 / (batch.count - 1)
        self.total = batch if self.total is None else F.merge_moments(self.total, batch)
        self.batches += 1

    def result(self, mode: str) -> tuple[Tensor, Tensor]:
        if mode == "batch_average":
            return self.mean_sum / self.batches, self.var_sum / self.batches
        return self.total.mean, self.total.m2 / (self.total.count - 1)


def model_inputs(batch) -> tuple:
    """The model inputs of one loader item: ``x``, ``(x, y)`` → ``x``, a dict → its ``"x"``/``"input"``."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image"):
            if key in batch:
                return (batch[key],)
        raise TypeError(f"recalibrate_bn: a dict batch needs an 'x' or 'input' key (got keys {sorted(batch)})")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return (batch[0],)
    raise TypeError(f"recalibrate_bn: cannot find the input in a batch of type {type(batch).__name__}; "
                    f"pass a loader of tensors or (input, target) pairs, or a custom forward=")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: Optional[int] = 200, *,
                   mode: str = "batch_average", forward=None, device=None) -> dict[str, LayerShift]:
    """Recompute the running statistics of every batch-norm layer of ``model`` from ``loader``, in place.

    Only the batch-norm layers run in training mode (batch statistics, as during training); everything
    else (dropout, …) runs in eval mode. Modes, momenta, switches and ``requires_grad`` are restored;
    ``num_batches_tracked`` becomes the number of batches used. Works with :mod:`bnlab` and ``torch.nn``
    layers; ``FrozenBatchNorm*`` and layers without running statistics are left alone.

    Args:
        model: the network (e.g. after SWA/EMA weight averaging).
        loader: an iterable of batches: tensors, ``(input, target, ...)`` tuples or dicts with ``"x"``.
        num_batches: how many batches to use (``None``: the whole loader).
        mode: ``"batch_average"`` (fvcore's precise BN) or ``"population"`` (exact statistics of all values).
        forward: ``forward(model, batch)`` to call instead of ``model(input)``.
        device: move tensor inputs there first.

    Returns:
        ``{layer name: LayerShift}``: how much each layer's statistics moved.
    """
    if mode not in ("batch_average", "population"):
        raise ValueError(f"recalibrate_bn: mode must be 'batch_average' or 'population' (got {mode!r})")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"recalibrate_bn: num_batches must be >= 1 or None (got {num_batches})")
    layers = {name: m for name, m in model.named_modules()
              if protocol.is_batch_norm(m) and getattr(type(m), "update_running_stats", True) is not False
              and m.running_mean is not None}
    if not layers:
        raise ValueError(f"recalibrate_bn: {type(model).__name__} has no batch-norm layer with running statistics")

    modes = {m: m.training for m in model.modules()}
    saved = {m: {k: m.__dict__[k] for k in ("use_batch_stats", "update_running_stats") if k in m.__dict__}
             for m in layers.values()}
    old = {name: protocol.snapshot(m) for name, m in layers.items()}
    moments = {name: _Moments() for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: moments[name].add(args[0]))
             for name, m in layers.items()]
    seen = 0
    try:
        model.eval()
        for m in layers.values():
            m.train()
            m.use_batch_stats = None   # batch statistics, whatever the switches of bnlab.tools.freeze say
        for batch in loader:
            if num_batches is not None and seen >= num_batches:
                break
            if forward is not None:
                forward(model, batch)
            else:
                inputs = model_inputs(batch)
                model(*(t.to(device) if device is not None else t for t in inputs))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        for m, was_training in modes.items():
            m.training = was_training
        for m, attrs in saved.items():
            for k in ("use_batch_stats", "update_running_stats"):
                if k in attrs:
                    setattr(m, k, attrs[k])
                elif k in m.__dict__:
                    del m.__dict__[k]
    if seen == 0:
        for name, m in layers.items():   # nothing seen: put the statistics back as they were
            protocol.restore(m, old[name])
        raise ValueError("recalibrate_bn: the loader gave no batches")

    report = {}
    for name, m in layers.items():
        if moments[name].batches == 0:
            raise RuntimeError(f"recalibrate_bn: layer {name} was not called during {seen} batches; "
                               f"it cannot be recalibrated (is it used in forward?)")
        mean, var = moments[name].result(mode)
        old_mean, old_var = old[name][:2]
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        m.num_batches_tracked.fill_(moments[name].batches)
        old_std = (old_var.double() + m.eps).sqrt()
        report[name] = LayerShift(name, float(((mean - old_mean.double()).abs() / old_std).max()),
                                  float(((var + m.eps) / (old_var.double() + m.eps)).log().abs().max()))
    return report
