"""Keep mixed-precision overflow out of the batch-norm running statistics.

Under AMP a step can overflow: the :class:`torch.amp.GradScaler` notices the infinite gradients and skips
the optimizer step, but the forward has already folded that batch's statistics into every batch-norm
layer's running estimates, which may now hold Inf or NaN (or simply statistics of a batch the model never
learned from). :class:`BNStatsGuard` snapshots the running statistics when a step starts and rolls them
back when the scaler skipped the step or a layer's statistics are no longer finite, counting each
rollback in the layer's ``skipped_updates``. (:mod:`bnlab.nn` layers already keep a non-finite batch out
of their statistics; the guard adds the skipped-step case and covers ``torch.nn`` layers.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bnlab import protocol

__all__ = ["BNStatsGuard"]


class BNStatsGuard:
    """Context manager around one training step that rolls back batch-norm running statistics of a skipped step.

    Example::

        scaler = torch.amp.GradScaler("cuda")
        guard = BNStatsGuard(model, scaler)
        for x, y in loader:
            with guard:
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()            # inside the block: a lower scale afterwards = a skipped step
                optimizer.zero_grad()

    A step counts as skipped when ``scaler.update()`` lowered the scale (GradScaler lowers it exactly
    when it found Inf/NaN gradients and skipped ``step``). Each layer whose running statistics are not
    finite at the end of the block is rolled back too, whatever the scaler says.

    Args:
        model: the network.
        scaler: a ``torch.amp.GradScaler`` (or ``None`` to only guard against non-finite statistics).
        rollback: ``False`` only counts skipped steps (:attr:`skipped_steps`)
            without restoring anything for the scaler case; non-finite statistics are always restored.
    """

    def __init__(self, model: nn.Module, scaler=None, rollback: bool = True) -> None:
        self.layers = {name: m for name, m in model.named_modules()
                       if protocol.is_batch_norm(m) and m.running_mean is not None}
        if not self.layers:
            raise ValueError(f"BNStatsGuard: {type(model).__name__} has no batch-norm layer with running statistics")
        self.scaler, self.rollback = scaler, rollback
        self.skipped_steps = 0        # steps the scaler skipped
        self._snapshot: Optional[dict] = None
        self._scale: Optional[float] = None

    def __enter__(self) -> "BNStatsGuard":
        self._snapshot = {name: protocol.snapshot(m) for name, m in self.layers.items()}
        self._scale = self._current_scale()
        return self

    def _current_scale(self) -> Optional[float]:
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        return float(self.scaler.get_scale())

    def step_was_skipped(self) -> bool:
        """Whether the scaler lowered its scale since the block started (it skipped the step)."""
        now = self._current_scale()
        return self._scale is not None and now is not None and now < self._scale

    def _restore(self, name: str, m: nn.Module) -> None:
        protocol.restore(m, self._snapshot[name], skipped_updates=getattr(m, "skipped_updates", 0) + 1)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._snapshot is None:
            return
        skipped = exc_type is None and self.step_was_skipped()
        if skipped:
            self.skipped_steps += 1
        for name, m in self.layers.items():
            finite = bool(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())
            if (skipped and self.rollback) or not finite:
                self._restore(name, m)
        self._snapshot = None
