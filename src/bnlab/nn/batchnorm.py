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
from bnlab import protocol

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "fx_batch_norm"]


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """The base of every bnlab batch-norm layer: the state and forward of :class:`BatchNorm1d`,
    :class:`BatchNorm2d` and :class:`BatchNorm3d`, which the variants extend.

    A subclass of ``torch.nn.modules.batchnorm._BatchNorm`` with its own ``forward``, so code that finds
    batch norms by type (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, weight-decay exclusion,
    freezing, fusion) treats these layers as what they are. Subclasses set ``_expected_dims``.

    A batch whose statistics are not finite never reaches the running statistics (decided on the device,
    so the training forward traces with ``torch.compile(fullgraph=True)``). ``warn_nonfinite`` says whether
    the host also checks, warns and counts it in ``skipped_updates`` (eager mode only): ``None`` (default)
    on CPU tensors, where the check is free; ``True`` everywhere (one host synchronisation per layer and
    step on a GPU); ``False`` never. With ``per_channel_finite`` the choice is made per channel instead of
    per layer: a channel whose statistics are not finite keeps its old values, the others update, and
    nothing is warned or counted — for a layer holding the channels of several networks at once
    (:func:`bnlab.models.stack`), where one network's divergence must not stop the others' statistics.
    """

    _expected_dims: tuple[int, ...] = ()
    warn_nonfinite: Optional[bool] = None
    per_channel_finite: bool = False
    #: the layer's path in its model (``layer2.0.bn1``), set by :func:`bnlab.protocol.name_layers`
    layer_path: str = ""
    # -- switches that survive .train()/.eval() (see bnlab.tools.freeze.set_bn_switches) --------------------
    #: ``None`` follows the mode (batch statistics in training); ``True``/``False`` force it.
    use_batch_stats: Optional[bool] = None
    #: ``False`` keeps the running statistics fixed even in training.
    update_running_stats: bool = True
    # -- capabilities (see bnlab.protocol) ------------------------------------------------------------
    bn_plain_training = True
    bn_plain_inference = True
    bn_sync = "plain"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, backend: str = "auto") -> None:
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int (got {num_features!r})")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}({num_features}): momentum must be in [0, 1] or None "
                             f"(got {momentum}); PyTorch's convention is new = (1 - momentum)·old + "
                             f"momentum·batch, so Keras' 0.99 is 0.01 here")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:   # (torch's own `bias=` keyword is recent: not relied upon)
            self.register_parameter("bias", None)
        self.backend = backend
        self.skipped_updates = 0  # batches kept out of the running statistics (non-finite statistics)

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
            state_dict[key] = torch.tensor(0, dtype=torch.long)  # saved before the buffer existed: count 0
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def layer_name(self) -> str:
        """How errors and warnings name this layer: ``layer2.0.bn1 (BatchNorm2d(64))``, or
        ``BatchNorm2d(64)`` for a layer whose path was not recorded."""
        return protocol.layer_label(self)

    def _check_input_dim(self, x: Tensor) -> None:
        F.check_input(x, self.num_features, protocol.uses_batch_stats(self), self.layer_name, self._expected_dims)

    def momentum_for_step(self) -> float:
        """PyTorch's rule, for a forward about to run: count the batch when it updates the running
        statistics, then the EMA factor ``momentum`` (or ``1/num_batches_tracked`` for ``momentum=None``)."""
        if protocol.updates_running_stats(self):
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return self._traced_forward(x)
        self._check_input_dim(x)
        momentum = self.momentum_for_step()
        use_batch_stats, update = protocol.uses_batch_stats(self), protocol.updates_running_stats(self)
        stats = update or not use_batch_stats
        out = F.batch_norm_stats(x, self.running_mean if stats else None, self.running_var if stats else None,
                                 self.weight, self.bias, use_batch_stats, momentum, self.eps, self.backend,
                                 host_checks_finite=update and (self.per_channel_finite
                                                                or self._checks_on_host(x.device)))
        if update and out.finite is not None:
            self.commit_running_stats(out.running_mean, out.running_var, out.finite)
        return out.output

    def _traced_forward(self, x) -> Tensor:
        """What ``torch.fx.symbolic_trace`` records: one :func:`fx_batch_norm` call with this mode's
        arguments; buffers and parameters become graph attributes."""
        use_batch_stats, update = protocol.uses_batch_stats(self), protocol.updates_running_stats(self)
        stats = update or not use_batch_stats
        return fx_batch_norm(x, self.running_mean if stats else None, self.running_var if stats else None,
                             self.num_batches_tracked if update else None, self.weight, self.bias,
                             use_batch_stats, self.momentum, self.eps)

    def batch_affine(self, mean: Tensor, var: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The γ and β applied after normalizing with a batch's ``mean`` and biased ``var``: the layer's
        own for batch norm; batch renormalization folds its corrections in."""
        return self.weight, self.bias

    def update_from_batch(self, mean: Tensor, var: Tensor, count: int, momentum: float) -> None:
        """Fold a batch's ``mean`` and biased ``var`` over ``count`` values per channel into the running
        statistics (:func:`bnlab.functional.update_running_stats`), for layers with their own forward."""
        update = F._updated_running_stats if self.per_channel_finite else F.update_running_stats
        self.commit_running_stats(*update(self.running_mean, self.running_var, mean.detach(), var.detach(),
                                          count, momentum))

    def _checks_on_host(self, device: torch.device) -> bool:
        """Whether this forward reads the batch's finiteness on the host (``warn_nonfinite``; never while
        ``torch.compile`` traces: the decision then stays on the device, a host check would break the graph)."""
        if torch.compiler.is_compiling():
            return False
        return self.warn_nonfinite if self.warn_nonfinite is not None else device.type == "cpu"

    def commit_running_stats(self, mean: Tensor, var: Tensor, finite: Tensor) -> None:
        """Store the new running statistics; where the host checks (:meth:`_checks_on_host`), only for a
        finite batch, warning about (and counting) a non-finite one. Elsewhere ``mean`` and ``var`` must
        already be the old values for a non-finite batch (:func:`bnlab.functional.update_running_stats`).
        With ``per_channel_finite``, ``mean`` and ``var`` are the new values as computed, and each channel
        keeps its old ones where they are not finite."""
        if self.per_channel_finite:
            with torch.no_grad():
                if not bool(finite):
                    keep = torch.isfinite(mean) & torch.isfinite(var)
                    mean, var = torch.where(keep, mean, self.running_mean), torch.where(keep, var, self.running_var)
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
            return
        if self._checks_on_host(finite.device) and not bool(finite):
            self.skipped_updates += 1
            self.num_batches_tracked.sub_(1)
            warnings.warn(f"{self.layer_name}: the batch statistics are not finite (NaN or Inf in the input, or "
                          f"an overflow of the {self.running_var.dtype} running statistics); the running "
                          f"statistics were not updated for this batch ({self.skipped_updates} skipped so far)",
                          RuntimeWarning, stacklevel=3)
            return
        with torch.no_grad():
            if mean is not self.running_mean:
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)


def fx_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  training: bool, momentum: Optional[float], eps: float) -> Tensor:
    """One bnlab batch-norm layer's forward as a single node of a ``torch.fx`` graph (the layers' forward
    has Python control flow that symbolic tracing cannot follow): :func:`bnlab.functional.batch_norm`,
    counting the batch in ``num_batches_tracked`` when one is given (the running statistics update)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training,
                        0.0 if momentum is None else momentum, eps)


torch.fx.wrap("fx_batch_norm")

_BatchNorm = BatchNorm   # the name before the base became public


class BatchNorm1d(BatchNorm):
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


class BatchNorm2d(BatchNorm):
    r"""Batch normalization over a 4D ``(N, C, H, W)`` input; arguments as :class:`BatchNorm1d`.

    Shape:
        input ``(N, C, H, W)``, contiguous or ``channels_last``; output the same shape, dtype and layout.
    """

    _expected_dims = (4,)


class BatchNorm3d(BatchNorm):
    r"""Batch normalization over a 5D ``(N, C, D, H, W)`` input; arguments as :class:`BatchNorm1d`."""

    _expected_dims = (5,)


_TORCH_TO_BNLAB = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_BNLAB_TO_TORCH = {v: k for k, v in _TORCH_TO_BNLAB.items()}


def _swap(layer: nn.Module, cls: type) -> nn.Module:
    ref = protocol.first_tensor(layer)
    new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
              bias=layer.bias is not None,
              **({} if ref is None else {"device": ref.device, "dtype": ref.dtype}))
    return protocol.carry_over(layer, new)


def convert(model: nn.Module, to: str = "bnlab") -> nn.Module:
    """Swap every batch-norm layer of ``model`` for the other implementation, in place, keeping state.

    ``to="bnlab"`` replaces ``torch.nn.BatchNorm1d/2d/3d`` by this module's classes; ``to="torch"`` the
    reverse. Parameters, buffers, train/eval mode and ``requires_grad`` carry over, and the new layers
    know their path in ``model`` (:func:`bnlab.protocol.name_layers`). Returns ``model`` (a bare batch-norm
    layer passed as ``model`` is returned converted).
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch' (got {to!r})")
    table = _TORCH_TO_BNLAB if to == "bnlab" else _BNLAB_TO_TORCH
    model = protocol.replace_layers(model, lambda name, m: _swap(m, table[type(m)]) if type(m) in table else None)
    return protocol.name_layers(model)
