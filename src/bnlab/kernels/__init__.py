"""Fused Triton kernels for batch normalization: training and evaluation, plain, +ReLU and +add+ReLU.

Three tiers, as in the Triton layer-norm tutorial: :mod:`~bnlab.kernels.bn_kernels` holds the
``@triton.jit`` kernels, :mod:`~bnlab.kernels.launch` the launchers (layout, grid, block sizes), and
:mod:`~bnlab.kernels.ops` thin ``torch.autograd.Function`` wrappers and the public functions
(``batch_norm_train``, ``batch_norm_eval``, ``batch_norm_train_relu``, ``batch_norm_train_add_relu``,
``update_running_stats``), which this package exposes as its own. :mod:`bnlab.functional` dispatches here
when :func:`supports` says yes; Triton is imported only when a kernel is first used, so
``import bnlab.kernels`` works without it.

Batch norm is memory-bound, so the kernels are judged by passes over the tensor: training forward reads
x twice and writes y once (3 passes), backward reads x and dy twice and writes dx (5 passes); small
tensors whose channels fit in registers read x once per direction.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from bnlab.dtypes import FLOAT_DTYPES

#: the kernels and their autograd wrappers, in :mod:`~bnlab.kernels.ops` (imported on first use: it imports Triton)
_OPS = ("batch_norm_train", "batch_norm_eval", "batch_norm_train_relu", "batch_norm_train_add_relu",
        "update_running_stats")

__all__ = ["supports", "preferred", "available", *_OPS]


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
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES or not 2 <= x.dim() <= 5:
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


def __getattr__(name: str):
    if name in _OPS:
        from bnlab.kernels import ops
        return getattr(ops, name)
    raise AttributeError(f"module 'bnlab.kernels' has no attribute {name!r}")
