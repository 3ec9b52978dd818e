"""Batch norm modules with the exact contract of ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor (``num_features, eps, momentum, affine, track_running_stats, device, dtype, *, bias``),
the same parameters and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so a ``state_dict`` loads into and from PyTorch's layers both ways. The math is
:mod:`bnlab.functional`; these classes only hold state and check the input's dimensions.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from bnlab import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _BatchNorm(nn.Module):
    """Shared state and forward of :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`.

    Subclasses set ``_expected_dims``. A batch whose statistics are not finite never reaches the running
    statistics (decided on the device). ``warn_nonfinite`` says whether the host also checks, warns and
    counts it in ``skipped_updates``: ``None`` (default) on CPU tensors only, where the check is free;
    ``True`` everywhere (one host synchronisation per layer and step on a GPU); ``False`` never.
    """

    _version = 2
    _expected_dims: tuple[int, ...] = ()
    warn_nonfinite: Optional[bool] = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int (got {num_features!r})")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}({num_features}): momentum must be in [0, 1] or None "
                             f"(got {momentum}); PyTorch's convention is new = (1 - momentum)·old + "
                             f"momentum·batch, so Keras' 0.99 is 0.01 here")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.skipped_updates = 0  # batches kept out of the running statistics (non-finite statistics)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- the torch.nn.BatchNorm contract -----------------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)  # saved before the buffer existed
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def layer_name(self) -> str:
        """How errors and warnings name this layer, e.g. ``BatchNorm2d(64)``."""
        return f"{type(self).__name__}({self.num_features})"

    def _check_input(self, x: Tensor) -> None:
        F.check_input(x, self.num_features, self._uses_batch_stats(), self.layer_name, self._expected_dims)

    # -- switches that survive .train()/.eval() (see bnlab.variants.freeze_stats) ---------------------
    #: ``None`` follows the mode (batch statistics in training); ``True``/``False`` force it.
    use_batch_stats: Optional[bool] = None
    #: ``False`` keeps the running statistics fixed even in training.
    update_running_stats: bool = True

    def _uses_batch_stats(self) -> bool:
        if self.use_batch_stats is not None:
            return self.use_batch_stats or self.running_mean is None
        return self.training or self.running_mean is None

    def _updates_running_stats(self) -> bool:
        return (self.training and self.track_running_stats and self.update_running_stats
                and self._uses_batch_stats())

    def _momentum_for_step(self) -> float:
        """PyTorch's rule: count the batch, then EMA factor ``momentum`` or ``1/num_batches_tracked``."""
        if self._updates_running_stats():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        momentum = self._momentum_for_step()
        use_batch_stats, update = self._uses_batch_stats(), self._updates_running_stats()
        stats = update or not use_batch_stats
        out = F.batch_norm_stats(x, self.running_mean if stats else None, self.running_var if stats else None,
                                 self.weight, self.bias, use_batch_stats, momentum, self.eps, self.backend)
        if update and out.finite is not None:
            self._commit_running_stats(out)
        return out.output

    def _commit_running_stats(self, out: F.BatchNormOutput) -> None:
        with torch.no_grad():
            self.running_mean.copy_(out.running_mean)
            self.running_var.copy_(out.running_var)
        check = self.warn_nonfinite if self.warn_nonfinite is not None else out.finite.device.type == "cpu"
        if check and not bool(out.finite):
            self.skipped_updates += 1
            self.num_batches_tracked.sub_(1)
            warnings.warn(f"{self.layer_name}: the batch statistics are not finite (NaN or Inf in the input); "
                          f"the running statistics were not updated for this batch "
                          f"({self.skipped_updates} skipped so far)", RuntimeWarning, stacklevel=3)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    :math:`y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta`, statistics per
    channel over the batch (and length); Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: running-statistics factor, ``new = (1 − momentum)·old + momentum·batch``; ``None`` for a
            cumulative average. Default: 0.1.
        affine: learn γ (and β). Default: True.
        track_running_stats: keep running estimates for evaluation; without them the batch statistics are
            used in both modes. Default: True.
        bias: learn β (keyword-only). Default: True.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`bnlab.functional.batch_norm`).

    Shape:
        input ``(N, C)`` or ``(N, C, L)``; output the same shape, dtype and memory format.
    """

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D ``(N, C, H, W)`` input; arguments as :class:`BatchNorm1d`.

    Shape:
        input ``(N, C, H, W)``, contiguous or ``channels_last``; output the same shape, dtype and layout.
    """

    _expected_dims = (4,)


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D ``(N, C, D, H, W)`` input; arguments as :class:`BatchNorm1d`."""

    _expected_dims = (5,)


_TORCH_TO_BNLAB = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_BNLAB_TO_TORCH = {v: k for k, v in _TORCH_TO_BNLAB.items()}


def _swap(layer: nn.Module, cls: type) -> nn.Module:
    ref = layer.weight if layer.weight is not None else layer.running_mean
    new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
              bias=layer.bias is not None,
              **({} if ref is None else {"device": ref.device, "dtype": ref.dtype}))
    new.load_state_dict(layer.state_dict())
    new.train(layer.training)
    for name, p in layer.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)
    return new


def convert(model: nn.Module, to: str = "bnlab") -> nn.Module:
    """Swap every batch-norm layer of ``model`` for the other implementation, in place, keeping state.

    ``to="bnlab"`` replaces ``torch.nn.BatchNorm1d/2d/3d`` by this module's classes; ``to="torch"`` the
    reverse. Parameters, buffers, train/eval mode and ``requires_grad`` carry over. Returns ``model``
    (a bare batch-norm layer passed as ``model`` is returned converted).
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch' (got {to!r})")
    table = _TORCH_TO_BNLAB if to == "bnlab" else _BNLAB_TO_TORCH
    if type(model) in table:
        return _swap(model, table[type(model)])
    for name, child in list(model.named_children()):
        if type(child) in table:
            setattr(model, name, _swap(child, table[type(child)]))
        else:
            convert(child, to)
    return model
