"""The numbers the study measures, as small pure functions (NumPy/torch in, floats out).

Each is simple enough to check by hand, which is what ``tests/study/test_metrics.py`` does; the claim
modules only combine them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from bnlab.study.verdict import t_interval

__all__ = ["mean_ci", "log_mean_ci", "percentiles", "step_changes", "gradient_ics", "channel_stats",
           "variance_ratio", "loss_curve_area", "steps_to_target", "first_index_at_or_below",
           "max_stable_lr", "is_stable", "smoothness"]


def mean_ci(values: Sequence[float], bounds: Optional[tuple[float, float]] = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and its 95% Student-t interval (:func:`verdict.t_interval`,
    from ``scipy.stats``), clipped to ``bounds`` for a bounded quantity (an accuracy: ``(0, 100)``).

    Non-finite values are dropped; one value gives a zero-width interval; none gives NaNs.
    """
    return t_interval(values, bounds)


def log_mean_ci(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of positive ratios with its 95% interval (the t-interval of their logarithms)."""
    logs = [math.log(r) for r in ratios if r is not None and math.isfinite(r) and r > 0]
    mean, low, high = mean_ci(logs)
    return tuple(math.exp(v) if math.isfinite(v) else math.nan for v in (mean, low, high))


def percentiles(x: Tensor | np.ndarray, qs: Sequence[float] = (15, 50, 85)) -> list[float]:
    """The ``qs`` percentiles (0–100, linear interpolation like ``numpy.percentile``) of all of ``x``."""
    values = x.detach().double().flatten().cpu().numpy() if isinstance(x, Tensor) else np.ravel(x)
    return [float(v) for v in np.percentile(values, list(qs))]


def step_changes(values: Sequence[float]) -> list[float]:
    """|v[t+1] − v[t]|: how much a statistic moves from one step to the next."""
    v = np.asarray(values, dtype=np.float64)
    return np.abs(np.diff(v)).tolist()


def gradient_ics(grad: Tensor, grad_after: Tensor) -> tuple[float, float]:
    """Santurkar et al. 2018's gradient ICS for one layer: (‖G − G′‖₂, cos(G, G′)).

    ``grad`` is G, the layer's gradient on a batch; ``grad_after`` is G′, the same layer's gradient on the
    same batch after every earlier layer took its step (https://arxiv.org/abs/1805.11604, Def. 2.1).
    A zero gradient has cosine 0 by convention.
    """
    g, h = grad.detach().double().flatten(), grad_after.detach().double().flatten()
    if g.shape != h.shape:
        raise ValueError(f"gradient_ics: grad and grad_after must have the same shape "
                         f"(got {tuple(grad.shape)} and {tuple(grad_after.shape)})")
    distance = float(torch.linalg.vector_norm(g - h))
    denom = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(h))
    cosine = float(g @ h) / denom if denom > 0 else 0.0
    return distance, cosine


def channel_stats(x: Tensor) -> tuple[float, float]:
    """(average channel squared mean, average channel variance) of ``x`` shaped (N, C, *).

    Per channel c, over the batch and positions: μ_c and σ²_c (population variance); then the averages
    of μ_c² and σ²_c over channels — the two signal-propagation curves of Brock et al. 2021
    (https://arxiv.org/abs/2101.08692).
    """
    if x.dim() < 2:
        raise ValueError(f"channel_stats: expected (N, C, *) input (got {x.dim()}D input)")
    per_channel = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, N·positions)
    mean = per_channel.mean(dim=1)
    var = per_channel.var(dim=1, unbiased=False)
    return float((mean ** 2).mean()), float(var.mean())


def variance_ratio(branch: Tensor, skip: Tensor) -> float:
    """Var(branch output) / Var(skip path) over all values: De & Smith 2020's measure of how far a
    residual block is biased toward the identity (https://arxiv.org/abs/2002.10444)."""
    skip_var = float(skip.detach().double().var(unbiased=False))
    branch_var = float(branch.detach().double().var(unbiased=False))
    return branch_var / skip_var if skip_var > 0 else math.inf


def loss_curve_area(steps: Sequence[float], losses: Sequence[float]) -> float:
    """Mean training loss over the run: the trapezoid area under loss(step) divided by the step span.

    Dividing by the span makes runs of different lengths comparable; lower means faster training.
    """
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if s.size == 0:
        return math.nan
    if s.size == 1 or s[-1] == s[0]:
        return float(v.mean())
    return float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(s)) / (s[-1] - s[0]))


def steps_to_target(steps: Sequence[float], accuracies: Sequence[float], target: float) -> Optional[float]:
    """The first step at which accuracy reached ``target`` (``None`` if it never did)."""
    for step, acc in zip(steps, accuracies):
        if acc is not None and acc >= target:
            return step
    return None


def first_index_at_or_below(values: Sequence[float], level: float) -> Optional[int]:
    """Index of the first value ≤ ``level`` (``None`` if none): where a run reaches a matched loss."""
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v) and v <= level:
            return i
    return None


LOSS_DROP = 0.5        # a stable run ends at ≤ half its initial training loss …
ABOVE_CHANCE = 0.10    # … with validation accuracy ≥ chance + 10 points


def is_stable(status: str, initial_loss: Optional[float], final_loss: Optional[float],
              val_acc: Optional[float], chance: float) -> bool:
    """The study's stability rule (claims 2, 4, 5): the run did not diverge, its final training loss is at
    most :data:`LOSS_DROP` × its initial loss, and its validation accuracy (a fraction) is at least
    ``chance`` + :data:`ABOVE_CHANCE`. A run stuck at chance level is not stable, however its loss moved."""
    values = (initial_loss, final_loss, val_acc)
    if status != "done" or any(v is None or not math.isfinite(v) for v in values):
        return False
    return final_loss <= LOSS_DROP * initial_loss and val_acc >= chance + ABOVE_CHANCE


def max_stable_lr(lrs: Sequence[float], stable: Sequence[bool]) -> Optional[float]:
    """The largest learning rate whose run was stable (``None`` if none was)."""
    ok = [lr for lr, s in zip(lrs, stable) if s]
    return max(ok) if ok else None


def smoothness(loss_at: Sequence[float], grad_change: Sequence[float], step_sizes: Sequence[float],
               grad_norm: float) -> dict:
    """Summaries of the loss landscape along −g (Santurkar et al. 2018, Sec. 3.1).

    Args:
        loss_at: L(θ − η·g) for each η in ``step_sizes``.
        grad_change: ‖∇L(θ) − ∇L(θ − η·g)‖ for each η.
        grad_norm: ‖g‖.

    Returns ``loss_range`` (max − min of the loss over the steps: its variation), ``grad_change`` (the
    largest gradient change) and ``beta`` (the largest ‖Δ∇L‖ / ‖η·g‖, an effective β-smoothness).
    """
    betas = [c / (eta * grad_norm) for c, eta in zip(grad_change, step_sizes) if eta * grad_norm > 0]
    finite = [v for v in loss_at if math.isfinite(v)]
    return {"loss_range": (max(finite) - min(finite)) if finite else math.nan,
            "grad_change": max(grad_change) if grad_change else math.nan,
            "beta": max(betas) if betas else math.nan}
