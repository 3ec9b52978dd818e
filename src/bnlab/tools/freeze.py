"""Frozen batch-norm statistics: switches that survive ``train()``/``eval()``, and fully frozen layers.

* :func:`set_bn_switches` — three independent switches per layer: use batch statistics, update the running
  statistics, train γ/β;
* :func:`freeze_stats` / :func:`unfreeze_stats` — running statistics used and never updated while γ/β still
  train (the usual setting for fine-tuning with small batches);
* :func:`freeze_bn` / :func:`unfreeze_bn` — :class:`FrozenBatchNorm2d` with γ/β as buffers, for
  detection-style fine-tuning where nothing of the normalization trains.

All of it works on :mod:`bnlab` layers and on ``torch.nn.BatchNorm*``. (Re-exported by :mod:`bnlab.nn.variants`.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab import nn as bnn
from bnlab import protocol
from bnlab.protocol import is_batch_norm

__all__ = ["is_batch_norm", "eval_is_plain_batch_norm", "set_bn_switches", "freeze_stats", "unfreeze_stats",
           "freeze_bn", "unfreeze_bn", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


def eval_is_plain_batch_norm(module: nn.Module) -> bool:
    """Whether ``module``'s eval-mode forward is exactly batch norm with its running statistics (its class
    declares ``bn_plain_inference``, see :mod:`bnlab.protocol`): not a subclass that overrides ``forward``
    to do more (a fused ReLU, …)."""
    return bool(protocol.capability(module, "bn_plain_inference"))


def _has_own_switches(module: nn.Module) -> bool:
    """bnlab layers read the switches in their forward; torch.nn layers need the hooks below."""
    return hasattr(type(module), "use_batch_stats")


# --------------------------------------------------------------------------------------------------
# switches: use batch statistics / update running statistics / train affine
# --------------------------------------------------------------------------------------------------
# bnlab layers read `use_batch_stats` and `update_running_stats` in their forward. torch.nn layers have no
# such switches, so we give them the same two attributes and a pair of forward hooks that apply them for
# the duration of each call: the settings survive model.train() because they are re-read on every call.

_KEEP = object()


def _torch_bn_pre_hook(module: nn.Module, args):
    was_training = module.training
    uses_batch = protocol.uses_batch_stats(module)
    # torch's layer updates whenever it trains with batch statistics: undo it when the switch says no
    undo = uses_batch and module.track_running_stats and not protocol.updates_running_stats(module)
    module.__dict__["_bnlab_call_state"] = (was_training, protocol.snapshot(module) if undo else None)
    module.training = uses_batch


def _torch_bn_post_hook(module: nn.Module, args, output):
    was_training, snapshot = module.__dict__.pop("_bnlab_call_state")
    if snapshot is not None:
        protocol.restore(module, snapshot)
    module.training = was_training


def _install_torch_hooks(module: nn.Module) -> None:
    if "_bnlab_switch_hooks" not in module.__dict__:
        module._bnlab_switch_hooks = (module.register_forward_pre_hook(_torch_bn_pre_hook),
                                      module.register_forward_hook(_torch_bn_post_hook))


def _remove_torch_hooks(module: nn.Module) -> None:
    for handle in module.__dict__.pop("_bnlab_switch_hooks", ()):
        handle.remove()
    for attr in ("use_batch_stats", "update_running_stats"):
        module.__dict__.pop(attr, None)


def set_bn_switches(model: nn.Module, *, use_batch_stats=_KEEP, update_running_stats=_KEEP,
                    train_affine=_KEEP) -> nn.Module:
    """Set the three independent batch-norm switches on every BN layer of ``model`` (or ``model`` itself).

    Args:
        use_batch_stats: ``None`` follows train/eval (the default behaviour); ``True`` always normalizes
            with the batch statistics; ``False`` always with the running statistics.
        update_running_stats: ``False`` keeps the running statistics fixed even in training.
        train_affine: ``requires_grad`` of γ and β.

    Switches left out are not changed. They survive ``model.train()``/``model.eval()``; they work on
    :mod:`bnlab` layers and on ``torch.nn.BatchNorm*`` (through forward hooks). Returns ``model``.
    """
    if use_batch_stats is not _KEEP and use_batch_stats not in (None, True, False):
        raise TypeError(f"set_bn_switches: use_batch_stats must be None, True or False (got {use_batch_stats!r})")
    found = False
    for name, m in model.named_modules():
        if isinstance(m, _FrozenBatchNorm) or not is_batch_norm(m):
            continue
        found = True
        if use_batch_stats is False and m.running_mean is None:
            raise ValueError(f"set_bn_switches: layer {protocol.layer_label(m, name or '<model>')} has no running statistics "
                             f"(track_running_stats=False), so it cannot normalize with them; "
                             f"use_batch_stats=False needs running statistics")
        if not _has_own_switches(m) and (use_batch_stats is not _KEEP or update_running_stats is not _KEEP):
            _install_torch_hooks(m)
        if use_batch_stats is not _KEEP:
            m.use_batch_stats = use_batch_stats
        if update_running_stats is not _KEEP:
            m.update_running_stats = bool(update_running_stats)
        if train_affine is not _KEEP:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(bool(train_affine))
    if not found:
        raise ValueError(f"set_bn_switches: {type(model).__name__} contains no batch-norm layer")
    return model


def freeze_stats(model: nn.Module) -> nn.Module:
    """Normalize with the running statistics and never update them, in train and eval mode alike; γ and β
    still train. The usual setting for fine-tuning with small batches. Undo with :func:`unfreeze_stats`."""
    return set_bn_switches(model, use_batch_stats=False, update_running_stats=False)


def unfreeze_stats(model: nn.Module) -> nn.Module:
    """Back to batch norm's default: batch statistics (and updates) in training, running ones in eval."""
    set_bn_switches(model, use_batch_stats=None, update_running_stats=True)
    for m in model.modules():
        if is_batch_norm(m) and not _has_own_switches(m):
            _remove_torch_hooks(m)
    return model


# --------------------------------------------------------------------------------------------------
# fully frozen: γ/β as buffers
# --------------------------------------------------------------------------------------------------

class _FrozenBatchNorm(nn.Module):
    """Batch norm reduced to a fixed per-channel affine map; see :class:`FrozenBatchNorm2d`."""

    _expected_dims: tuple[int, ...] = ()
    # the protocol (bnlab.protocol): a batch norm that never uses or updates batch statistics
    is_batch_norm_layer = True
    use_batch_stats = False
    update_running_stats = False
    track_running_stats = True
    bn_plain_training = False
    bn_plain_inference = True
    bn_sync = "keep"

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        F.check_input(x, self.num_features, False, f"{type(self).__name__}({self.num_features})",
                      self._expected_dims)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    r"""Batch norm with everything fixed: γ, β and the running statistics are buffers, so no optimizer
    touches them and ``train()`` changes nothing; the detection-style setting for fine-tuning.
    Same ``state_dict`` keys as ``torch.nn.BatchNorm1d``. Made by :func:`freeze_bn`.

    Shape:
        input ``(N, C)`` or ``(N, C, L)``; output the same.
    """
    _expected_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = FrozenBatchNorm1d.__doc__.replace("BatchNorm1d", "BatchNorm2d").replace(
        "``(N, C)`` or ``(N, C, L)``", "``(N, C, H, W)``")
    _expected_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = FrozenBatchNorm1d.__doc__.replace("BatchNorm1d", "BatchNorm3d").replace(
        "``(N, C)`` or ``(N, C, L)``", "``(N, C, D, H, W)``")
    _expected_dims = (5,)


def _dims_of(m: nn.Module) -> int:
    dims = getattr(type(m), "_expected_dims", None)
    if dims in ((2, 3), (4,), (5,)):
        return {(2, 3): 1, (4,): 2, (5,): 3}[dims]
    for d, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(m, cls):
            return d
    raise TypeError(f"cannot tell the input rank of {type(m).__name__}")


def freeze_bn(model: nn.Module) -> nn.Module:
    """Replace every batch-norm layer by a :class:`FrozenBatchNorm1d/2d/3d` holding its γ, β and running
    statistics as buffers. In place; returns ``model`` (or the replacement when ``model`` is a BN layer).
    Refuses layers without running statistics."""
    classes = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}

    def make(name, m):
        if not is_batch_norm(m) or isinstance(m, _FrozenBatchNorm):
            return None
        if not eval_is_plain_batch_norm(m):
            raise TypeError(f"freeze_bn: layer {protocol.layer_label(m, name or '<model>')} overrides forward, so a FrozenBatchNorm "
                            f"would drop what it adds; freeze it with freeze_stats() instead")
        if m.running_mean is None:
            raise ValueError(f"freeze_bn: layer {protocol.layer_label(m, name or '<model>')} has no running statistics "
                             f"(track_running_stats=False); there is nothing to freeze it to")
        ref = m.running_mean
        frozen = classes[_dims_of(m)](m.num_features, m.eps, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if m.weight is not None:
                frozen.weight.copy_(m.weight)
            if m.bias is not None:
                frozen.bias.copy_(m.bias)
            frozen.running_mean.copy_(m.running_mean)
            frozen.running_var.copy_(m.running_var)
            frozen.num_batches_tracked.copy_(m.num_batches_tracked)
        return frozen

    return protocol.replace_layers(model, make)


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn`: each :class:`FrozenBatchNorm*` becomes a trainable :mod:`bnlab.nn` layer."""
    classes = {1: bnn.BatchNorm1d, 2: bnn.BatchNorm2d, 3: bnn.BatchNorm3d}

    def make(name, m):
        if not isinstance(m, _FrozenBatchNorm):
            return None
        layer = classes[_dims_of(m)](m.num_features, m.eps, device=m.weight.device, dtype=m.weight.dtype)
        layer.load_state_dict(m.state_dict())
        return layer

    return protocol.replace_layers(model, make)
