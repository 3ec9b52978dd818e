"""Operations on a model's batch-norm layers, for :mod:`bnlab.nn` and ``torch.nn`` layers alike.

=====================  ==========================================================================
:mod:`.freeze`         freeze or unfreeze statistics (``freeze_stats``, ``set_bn_switches``), ``freeze_bn``
                       and ``FrozenBatchNorm1d/2d/3d`` (γ/β as buffers)
:mod:`.fold`           :func:`fold_bn`: batch norm folded into the preceding conv/linear layer
:mod:`.recalibrate`    :func:`recalibrate_bn`: population statistics recomputed from data (precise BN)
:mod:`.accumulate`     :class:`accumulate_bn_stats`: one running-statistics update per optimizer step
:mod:`.amp`            :class:`BNStatsGuard`: overflowing mixed-precision steps kept out of the statistics
:mod:`.doctor`         :func:`diagnose`: a health report of every batch-norm layer (``bnlab doctor``)
=====================  ==========================================================================
"""

from bnlab.tools.freeze import (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze_bn, freeze_stats,
                                set_bn_switches, unfreeze_bn, unfreeze_stats)
from bnlab.tools.fold import FoldReport, fold_bn
from bnlab.tools.recalibrate import recalibrate_bn
from bnlab.tools.accumulate import accumulate_bn_stats
from bnlab.tools.amp import BNStatsGuard
from bnlab.tools.doctor import DoctorReport, diagnose

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_bn", "freeze_stats",
           "set_bn_switches", "unfreeze_bn", "unfreeze_stats", "FoldReport", "fold_bn", "recalibrate_bn",
           "accumulate_bn_stats", "BNStatsGuard", "DoctorReport", "diagnose"]
