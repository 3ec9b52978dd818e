"""Fused Triton kernels for batch normalization: training and evaluation, plain, +ReLU and +add+ReLU.

Three tiers, as in the Triton layer-norm tutorial: :mod:`~bnlab.kernels.bn_kernels` holds the
``@triton.jit`` kernels, :mod:`~bnlab.kernels.launch` the launchers (layout, grid, block sizes), and
:mod:`~bnlab.kernels.ops` thin ``torch.autograd.Function`` wrappers. :mod:`bnlab.functional` dispatches
here when :func:`supports` says yes; Triton is imported only when a kernel is first used, so
``import bnlab.kernels`` works without it.

Batch norm is memory-bound, so the kernels are judged by passes over the tensor: training forward reads
x twice and writes y once (3 passes), backward reads x and dy twice and writes dx (5 passes); small
tensors whose channels fit in registers read x once per direction.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

__all__ = ["supports", "preferred", "batch_norm_train", "batch_norm_eval", "batch_norm_relu",
           "batch_norm_add_relu", "update_running_stats", "available"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def _interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    try:
        from bnlab.kernels import launch
    except ImportError:
        return False
    return launch.INTERPRETED


def supports(x: Tensor) -> bool:
    """Whether the kernels can run on ``x``: Triton is installed, ``x`` is a non-empty 2-D to 5-D float
    tensor, and it is a CUDA tensor — or a CPU tensor with the kernels compiled for Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the first import of Triton)."""
    if not isinstance(x, Tensor) or x.dtype not in _SUPPORTED_DTYPES or not 2 <= x.dim() <= 5:
        return False
    if x.numel() == 0 or x.numel() // x.shape[1] >= 2**31 or not available():
        return False  # empty, or more values per channel than the kernels' 32-bit position index
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and _interpreted()


#: ``backend="auto"`` keeps tensors with fewer elements than this on PyTorch. Tiny tensors are all launch
#: overhead, where one or three kernel launches still beat PyTorch's ten-odd ops, so none is kept by
#: default; ``benchmarks/bn_gpu.py`` measures the crossover on the device at hand ("dispatch" section).
AUTO_MIN_NUMEL = 0


def preferred(x: Tensor) -> bool:
    """Whether ``backend="auto"`` should use the kernels for ``x`` (given :func:`supports`): the shape
    heuristic that keeps ``auto`` from being slower than the PyTorch implementation."""
    return x.numel() >= AUTO_MIN_NUMEL


def batch_norm_train(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     eps: float = 1e-5, residual: Optional[Tensor] = None,
                     relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    r"""Training-mode batch norm with the fused kernels: ``y = [relu](bn(x) [+ residual])``.

    Args:
        x: ``(N, C, *)`` with 0 to 3 spatial dims, contiguous or channels-last (other strides are copied
            first); float16, bfloat16, float32 (accumulated in float32) or float64.
        weight, bias: ``(C,)`` γ and β, or ``None``.
        eps: added to the variance inside the square root.
        residual: a tensor of x's shape and dtype added after the affine step (only with ``relu=True``).
        relu: apply a ReLU last; its mask is recovered from the output in the backward.

    Returns:
        ``(y, mean, biased_var)``: ``y`` with x's dtype and memory format, differentiable w.r.t. x, weight,
        bias and residual; the batch mean and biased variance ``(C,)``, float32 (float64 for float64
        input), not differentiable.
    """
    from bnlab.kernels import ops
    return ops.batch_norm_train(x, weight, bias, eps, residual, relu)


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None,
                    relu: bool = False) -> Tensor:
    """Evaluation-mode batch norm with fixed statistics, ``[relu](bn(x) [+ residual])``, in one
    elementwise pass. Arguments as :func:`batch_norm_train`, plus the ``(C,)`` statistics to use;
    differentiable w.r.t. x, weight, bias and residual (the statistics are constants)."""
    from bnlab.kernels import ops
    return ops.batch_norm_eval(x, running_mean, running_var, weight, bias, eps, residual, relu)


def batch_norm_relu(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(bn(x))`` in training mode; returns ``(y, mean, biased_var)`` like :func:`batch_norm_train`."""
    return batch_norm_train(x, weight, bias, eps, relu=True)


def batch_norm_add_relu(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(bn(x) + residual)`` in training mode, the residual block's tail; returns
    ``(y, mean, biased_var)`` like :func:`batch_norm_train`."""
    return batch_norm_train(x, weight, bias, eps, residual=residual, relu=True)


def update_running_stats(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, count: int,
                         momentum: float) -> Tensor:
    """Update the running statistics in place from a batch's ``mean`` and biased ``var`` (``count`` values
    per channel), as :func:`bnlab.functional.batch_norm_stats` does — EMA with the unbiased variance,
    skipped when a batch statistic is not finite — in one kernel launch instead of ten-odd small ops.

    Returns a 0-dim bool tensor: whether the update happened (no host synchronisation).
    """
    for label, t in (("mean", mean), ("var", var), ("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape != mean.shape or t.device != mean.device:
            raise ValueError(f"update_running_stats: {label} must be a (C,) tensor on mean's device "
                             f"(got {getattr(t, 'shape', type(t).__name__)})")
    if not running_mean.is_contiguous() or not running_var.is_contiguous():
        raise ValueError("update_running_stats: running_mean and running_var must be contiguous")
    if count < 2:
        raise ValueError(f"update_running_stats: count must be at least 2 (got {count})")
    from bnlab.kernels import launch
    return launch.update_running_stats(mean.contiguous(), var.contiguous(), running_mean, running_var, count,
                                       momentum)
