"""The layers: batch norm with the exact contract of ``torch.nn.BatchNorm1d/2d/3d``, its variants, the
synchronized layers and the fused BN(+add)+ReLU tails.

=====================  ==========================================================================
:mod:`.batchnorm`      ``BatchNorm1d/2d/3d`` and :func:`convert` (to and from ``torch.nn``)
:mod:`.variants`       ``GhostBatchNorm1d/2d/3d`` (Hoffer et al. 2017), ``BatchRenorm1d/2d/3d`` (Ioffe 2017)
:mod:`.sync`           ``SyncBatchNorm``, ``SyncBatchRenorm``, :func:`convert_sync_batchnorm` (torch.distributed)
:mod:`.fused`          ``BatchNormReLU1d/2d/3d``, :func:`batch_norm_relu`, :func:`batch_norm_add_relu`
=====================  ==========================================================================

The math of all of them is :mod:`bnlab.functional`; these classes hold state and check their input.
"""

from bnlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, fx_batch_norm
from bnlab.nn.variants import (BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, GhostBatchNorm,
                               GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm)
from bnlab.nn.sync import SyncBatchNorm, SyncBatchRenorm, convert_sync_batchnorm
from bnlab.nn.fused import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, batch_norm_add_relu, batch_norm_relu

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "fx_batch_norm",
           "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
           "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "SyncBatchNorm", "SyncBatchRenorm", "convert_sync_batchnorm",
           "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "batch_norm_relu", "batch_norm_add_relu"]
