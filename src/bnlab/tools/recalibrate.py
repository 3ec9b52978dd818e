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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab import protocol

__all__ = ["recalibrate_bn", "LayerShift", "batch_inputs", "model_inputs"]


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


INPUT_KEYS = ("x", "input", "inputs", "image")   # a mapping holding one of these: that value is the input
TARGET_KEYS = ("labels", "label", "label_ids")    # left out of a keyword call: targets never reach a batch norm


def batch_inputs(batch) -> tuple[tuple, dict]:
    """How the model is called on one loader item, as ``(args, kwargs)``:

    * a tensor ``x``: ``model(x)``;
    * a tuple or list ``(x, y, ...)``: its first element, read by these rules (as
      ``torch.optim.swa_utils.update_bn`` does; a first element that is a list of tensors is passed as is);
    * a mapping with an ``"x"``, ``"input"``, ``"inputs"`` or ``"image"`` key: ``model(that value)``;
    * any other mapping, such as a Hugging Face batch ``{"pixel_values": ..., "labels": ...}``:
      ``model(**batch)`` without the target keys ``labels``, ``label`` and ``label_ids`` (a model that takes
      them would only compute a loss; one that does not would fail).

    Raises ``TypeError`` for anything else.
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return (batch[key],), {}
        kwargs = {key: value for key, value in batch.items() if key not in TARGET_KEYS}
        if not kwargs:
            raise TypeError(f"cannot find the input in a mapping batch that holds only targets (keys "
                            f"{sorted(map(str, batch))}); pass a custom forward=")
        return (), kwargs
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, (Tensor, Mapping)):
            return batch_inputs(first)
        if isinstance(first, (list, tuple)) and first and all(isinstance(t, Tensor) for t in first):
            return (first,), {}
    raise TypeError(f"cannot find the input in a batch of type {type(batch).__name__}; pass a loader of tensors, "
                    f"(input, target) pairs or mappings (a Hugging Face batch is called as model(**batch)), or a "
                    f"custom forward=")


def model_inputs(batch) -> tuple:
    """The positional model inputs of one loader item (see :func:`batch_inputs`, which also gives the keyword
    inputs of a mapping such as ``{"pixel_values": ...}``)."""
    args, kwargs = batch_inputs(batch)
    if kwargs:
        raise TypeError(f"this batch is passed as keyword arguments ({', '.join(kwargs)}); use batch_inputs")
    return args


def _to(value, device):
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


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
        loader: an iterable of batches: tensors, ``(input, target, ...)`` tuples, dicts with ``"x"`` or
            Hugging Face style mappings (``model(**batch)`` without ``labels``); see :func:`batch_inputs`.
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
                args, kwargs = batch_inputs(batch)
                model(*(_to(a, device) for a in args), **{k: _to(v, device) for k, v in kwargs.items()})
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
