"""Batch normalization in float64 NumPy, written to be read: the oracle for every test.

For an input ``x`` of shape ``(N, C, *)`` and each channel ``c``, over the ``m = N * prod(*)`` values of
that channel (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167, Algorithm 1):

1. statistics   μ = (1/m) Σ x,        σ² = (1/m) Σ (x − μ)²
2. normalize    x̂ = (x − μ) / √(σ² + ε)
3. scale/shift  y = γ x̂ + β
4. output       y, and the running estimates  r_μ ← (1 − α) r_μ + α μ,  r_σ² ← (1 − α) r_σ² + α σ² m/(m − 1)

The backward (chain rule through the four steps, summed per channel):

    dβ = Σ dy
    dγ = Σ dy · x̂
    dx = γ / (m √(σ² + ε)) · (m dy − Σ dy − x̂ Σ dy · x̂)

Everything is computed in float64 regardless of the input dtype; nothing here is meant to be fast.
"""

from __future__ import annotations

import numpy as np


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis (1): the axes a channel's statistics are taken over."""
    if x.ndim < 2:
        raise ValueError(f"reference batch norm: expected at least 2D input (N, C, *) (got {x.ndim}D input)")
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector to broadcast against an (N, C, *) array."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def forward(x, weight=None, bias=None, eps: float = 1e-5, training: bool = True,
            running_mean=None, running_var=None):
    """Batch norm forward in float64.

    In training the batch statistics are used; in evaluation ``running_mean``/``running_var``.
    Returns ``(y, cache)``; ``cache`` holds what :func:`backward` needs and the batch statistics
    (``mean``, biased ``var``, unbiased ``var_unbiased``, ``count``).
    """
    x = np.asarray(x, dtype=np.float64)
    axes = _channel_axes(x)
    channels = x.shape[1]
    gamma = np.ones(channels) if weight is None else np.asarray(weight, dtype=np.float64)
    beta = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    count = x.size // channels                                        # m values per channel

    if training:
        mean = x.mean(axis=axes)                                      # 1. μ
        var = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)  # 1. σ² (biased, two-pass)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - _per_channel(mean, x.ndim)) * _per_channel(inv_std, x.ndim)   # 2. x̂
    y = _per_channel(gamma, x.ndim) * x_hat + _per_channel(beta, x.ndim)       # 3.-4. y

    var_unbiased = var * count / (count - 1) if count > 1 else np.full_like(var, np.nan)
    cache = dict(x_hat=x_hat, inv_std=inv_std, gamma=gamma, count=count, training=training,
                 mean=mean, var=var, var_unbiased=var_unbiased)
    return y, cache


def backward(dy, cache):
    """Gradients ``(dx, dgamma, dbeta)`` of batch norm, from the closed form in the module docstring."""
    dy = np.asarray(dy, dtype=np.float64)
    axes = _channel_axes(dy)
    x_hat, inv_std, gamma, m = cache["x_hat"], cache["inv_std"], cache["gamma"], cache["count"]

    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    if cache["training"]:
        scale = _per_channel(gamma * inv_std / m, dy.ndim)
        dx = scale * (m * dy - _per_channel(dbeta, dy.ndim) - x_hat * _per_channel(dgamma, dy.ndim))
    else:  # evaluation: μ and σ² are constants, so the map is affine per channel
        dx = dy * _per_channel(gamma * inv_std, dy.ndim)
    return dx, dgamma, dbeta


def update_running(running_mean, running_var, cache, momentum: float):
    """New running statistics: exponential moving average with PyTorch's convention
    (``new = (1 − momentum) · old + momentum · batch``), the batch variance taken unbiased."""
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * cache["mean"]
    new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * cache["var_unbiased"]
    return new_mean, new_var
