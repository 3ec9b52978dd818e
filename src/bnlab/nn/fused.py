"""Fused batch-norm tails of residual blocks: BN+ReLU and BN+add+ReLU.

``batch_norm_relu(bn, x)`` = ``relu(bn(x))`` and ``batch_norm_add_relu(bn, x, residual)`` =
``relu(bn(x) + residual)`` for a :mod:`bnlab.nn` batch-norm module ``bn``, whose parameters, running
statistics, momentum, ε, mode and ``backend`` they use. When the module's backend resolves to Triton
(:func:`bnlab.functional.backend_for`: CUDA tensors under ``"auto"``) they run as one fused kernel per pass
(:mod:`bnlab.kernels`), which saves the separate passes of the addition and the ReLU and does not store the
ReLU mask; elsewhere they are the plain composition. The running statistics are updated exactly as
``bn(x)`` would.

Example::

    bn = bnlab.nn.BatchNorm2d(64).cuda()
    out = bnlab.nn.fused.batch_norm_add_relu(bn, conv(x), shortcut)   # relu(bn(conv(x)) + shortcut)

    block_tail = bnlab.nn.fused.BatchNormReLU2d(64)                   # a BatchNorm2d with a fused tail
    out = block_tail(h, residual=shortcut)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab.nn import batchnorm as bnn
from bnlab import protocol

__all__ = ["batch_norm_relu", "batch_norm_add_relu", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d"]


def batch_norm_relu(bn: torch.nn.Module, x: Tensor) -> Tensor:
    """``relu(bn(x))``, fused when ``bn``'s backend resolves to Triton for ``x``."""
    return _fused_tail(bn, x, None)


def batch_norm_add_relu(bn: torch.nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """``relu(bn(x) + residual)``, fused when ``bn``'s backend resolves to Triton for ``x`` and ``residual``
    has x's shape, dtype and device (a broadcast residual takes the plain composition)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"batch_norm_add_relu: residual must be a Tensor (got {type(residual).__name__})")
    return _fused_tail(bn, x, residual)


def _composition(bn: torch.nn.Module, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    # the fused modules' own forward would come back here: call the plain layer's
    y = bnn.BatchNorm.forward(bn, x) if isinstance(bn, _BatchNormReLU) else bn(x)
    return torch.relu(y if residual is None else y + residual)


def _uses_kernels(bn: bnn.BatchNorm, x: Tensor, residual: Optional[Tensor]) -> bool:
    own_tail = type(bn).forward is _BatchNormReLU.forward
    plain = protocol.capability(bn, "bn_plain_training" if protocol.uses_batch_stats(bn) else "bn_plain_inference")
    if not (own_tail or plain):
        return False  # a layer whose forward does more (ghost, renorm, sync, a subclass): never bypass it
    if x.numel() == 0:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return False
    return F.backend_for(x, getattr(bn, "backend", "auto")) == "triton"


def _fused_tail(bn: torch.nn.Module, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    if not isinstance(bn, bnn.BatchNorm):  # torch.nn.BatchNorm*, or any other norm: compose
        return _composition(bn, x, residual)
    bn._check_input_dim(x)
    if not _uses_kernels(bn, x, residual):
        return _composition(bn, x, residual)
    from bnlab import kernels

    momentum = bn.momentum_for_step()
    if not protocol.uses_batch_stats(bn):
        return kernels.batch_norm_eval(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                                       residual, relu=True)
    y, mean, var = kernels.batch_norm_train(x, bn.weight, bn.bias, bn.eps, residual, relu=True)
    if protocol.updates_running_stats(bn):
        # the update as bnlab.functional.update_running_stats defines it, in place and in one kernel; the
        # module's own commit step then only does its bookkeeping (its copies are onto themselves)
        finite = kernels.update_running_stats(mean, var, bn.running_mean, bn.running_var,
                                              x.numel() // x.shape[1], momentum)
        bn.commit_running_stats(bn.running_mean, bn.running_var, finite)
    return y


class _BatchNormReLU:
    """``forward(x, residual=None)`` = ``relu(bn(x) [+ residual])`` on top of a :mod:`bnlab.nn` batch norm:
    same constructor, parameters, buffers and ``state_dict`` as the plain layer."""

    # its batch norm is plain (the fused kernels compute it), but its output is not batch norm's alone
    bn_plain_training = True
    bn_plain_inference = False
    bn_sync = None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _fused_tail(self, x, residual)


class BatchNormReLU1d(_BatchNormReLU, bnn.BatchNorm1d):
    """:class:`bnlab.nn.BatchNorm1d` followed by an optional residual addition and a ReLU, fused."""


class BatchNormReLU2d(_BatchNormReLU, bnn.BatchNorm2d):
    """:class:`bnlab.nn.BatchNorm2d` followed by an optional residual addition and a ReLU, fused."""


class BatchNormReLU3d(_BatchNormReLU, bnn.BatchNorm3d):
    """:class:`bnlab.nn.BatchNorm3d` followed by an optional residual addition and a ReLU, fused."""
