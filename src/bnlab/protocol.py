"""The batch-norm layer protocol: what the tools of :mod:`bnlab` ask of a layer, in one place.

Every tool (:mod:`~bnlab.nn.fused`, :mod:`~bnlab.tools.freeze`, :mod:`~bnlab.nn.sync`, :mod:`~bnlab.tools.accumulate`,
:mod:`~bnlab.tools.amp`, :mod:`~bnlab.tools.recalibrate`, :mod:`~bnlab.tools.doctor`, :mod:`~bnlab.tools.fold`) asks its questions
through these functions, which work for ``torch.nn.BatchNorm*`` and for this project's layers alike:

* :func:`is_batch_norm` — a batch-norm layer (``torch.nn.modules.batchnorm._BatchNorm`` and its subclasses,
  which include every :mod:`bnlab.nn` / :mod:`bnlab.nn.variants` layer, or a ``FrozenBatchNorm*``);
* :func:`uses_batch_stats` / :func:`updates_running_stats` — what the layer's next forward call does, with
  the ``use_batch_stats`` / ``update_running_stats`` switches of :func:`bnlab.tools.freeze.set_bn_switches`;
* :func:`snapshot` / :func:`restore` — the running buffers (and ``skipped_updates``), to undo a forward;
* :func:`replace_layers` — the one walker that swaps layers of a model;
* :func:`capability` — what a layer class declares about itself, as class attributes:

  ``bn_plain_training``
      its training forward is plain batch norm, so :mod:`bnlab.nn.fused` may run the fused kernels instead;
  ``bn_plain_inference``
      its eval forward is plain batch norm with the running statistics (:func:`bnlab.tools.fold.fold_bn`,
      :func:`bnlab.tools.freeze.freeze_bn` may replace it by an affine map);
  ``bn_sync``
      how :func:`bnlab.nn.sync.convert_sync_batchnorm` treats it: ``"plain"`` (becomes
      ``SyncBatchNorm``), ``"renorm"`` (becomes ``SyncBatchRenorm``), ``"keep"`` (left as it is) or
      ``None`` (refused: it would lose its behaviour).

A declaration holds only for the ``forward`` it was declared with: a subclass that overrides ``forward``
without declaring again gets the conservative answer (``False`` / ``None``), so a layer that does more
than batch norm is never bypassed, folded or converted by mistake.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["is_batch_norm", "uses_batch_stats", "updates_running_stats", "capability", "snapshot", "restore",
           "replace_layers", "carry_over", "name_layers", "layer_label", "first_tensor", "RunningState"]

_TorchBN = nn.modules.batchnorm._BatchNorm

# torch's own classes cannot carry our attributes: their declarations live here, keyed by forward's owner
_TORCH_CAPABILITIES: dict[type, dict[str, object]] = {
    _TorchBN: {"bn_plain_training": True, "bn_plain_inference": True, "bn_sync": "plain"},
    nn.SyncBatchNorm: {"bn_plain_training": False, "bn_plain_inference": True, "bn_sync": "keep"},
}
_CONSERVATIVE = {"bn_plain_training": False, "bn_plain_inference": False, "bn_sync": None}


def is_batch_norm(module: nn.Module) -> bool:
    """True for ``torch.nn.BatchNorm*`` (incl. ``SyncBatchNorm``), every :mod:`bnlab` batch-norm layer and
    ``FrozenBatchNorm*`` (a class that sets ``is_batch_norm_layer = True``)."""
    return isinstance(module, _TorchBN) or bool(getattr(type(module), "is_batch_norm_layer", False))


def _owner(cls: type, attr: str, table: Optional[dict] = None) -> Optional[type]:
    for klass in cls.__mro__:
        if attr in klass.__dict__ or (table is not None and attr in table.get(klass, {})):
            return klass
    return None


def capability(module: nn.Module, name: str):
    """The class-level declaration ``name`` of ``module`` (see the module docstring), conservative for a
    subclass that overrides ``forward`` after the declaration, or for a layer that declares nothing."""
    if name not in _CONSERVATIVE:
        raise ValueError(f"capability: unknown capability {name!r} (expected one of {', '.join(_CONSERVATIVE)})")
    cls = type(module)
    declared = _owner(cls, name, _TORCH_CAPABILITIES)
    if declared is None:
        return _CONSERVATIVE[name]
    forward_owner = _owner(cls, "forward")
    if forward_owner is not None and forward_owner is not declared and issubclass(forward_owner, declared):
        return _CONSERVATIVE[name]   # forward changed below the declaration
    return declared.__dict__[name] if name in declared.__dict__ else _TORCH_CAPABILITIES[declared][name]


def uses_batch_stats(module: nn.Module) -> bool:
    """Whether ``module``'s next forward normalizes with the batch's statistics: its ``use_batch_stats``
    switch when set, else its mode; always when it keeps no running statistics."""
    if getattr(module, "running_mean", None) is None:
        return True
    switch = getattr(module, "use_batch_stats", None)
    return module.training if switch is None else bool(switch)


def updates_running_stats(module: nn.Module) -> bool:
    """Whether ``module``'s next forward updates its running statistics (training, tracking them, the
    ``update_running_stats`` switch on, and normalizing with batch statistics)."""
    return (module.training and bool(getattr(module, "track_running_stats", False))
            and getattr(module, "running_mean", None) is not None
            and bool(getattr(module, "update_running_stats", True)) and uses_batch_stats(module))


RunningState = tuple  # (running_mean, running_var, num_batches_tracked, skipped_updates)


def snapshot(module: nn.Module) -> RunningState:
    """Copies of the running buffers and the ``skipped_updates`` count, for :func:`restore`."""
    return (module.running_mean.detach().clone(), module.running_var.detach().clone(),
            module.num_batches_tracked.detach().clone(), getattr(module, "skipped_updates", 0))


@torch.no_grad()
def restore(module: nn.Module, state: RunningState, *, skipped_updates: Optional[int] = None) -> None:
    """Put back a :func:`snapshot` (``skipped_updates`` overrides the saved count when given)."""
    mean, var, count, skipped = state
    module.running_mean.copy_(mean)
    module.running_var.copy_(var)
    module.num_batches_tracked.copy_(count)
    skipped = skipped if skipped_updates is None else skipped_updates
    if skipped or hasattr(module, "skipped_updates"):
        module.skipped_updates = skipped


def replace_layers(model: nn.Module, make: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Walk ``model`` top-down and replace each module for which ``make(qualified_name, module)`` returns a
    module (its children are then not visited); ``None`` keeps it and descends. In place; returns
    ``model``, or its replacement when ``make`` replaces ``model`` itself (name ``""``)."""
    def walk(module: nn.Module, prefix: str) -> nn.Module:
        replaced = make(prefix, module)
        if replaced is not None:
            return replaced
        for name, child in list(module.named_children()):
            new = walk(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(module, name, new)
        return module

    return walk(model, "")


def carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` (a replacement layer) ``old``'s state: its ``state_dict``, train/eval mode,
    ``requires_grad`` of each parameter, and the per-layer settings kept in the instance (the switches of
    :func:`bnlab.tools.freeze.set_bn_switches`, when ``new``'s class reads them; ``warn_nonfinite``,
    ``skipped_updates``, ``layer_path``). Returns ``new``."""
    new.load_state_dict(old.state_dict())
    new.train(old.training)
    for name, p in old.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(p.requires_grad)
    reads_switches = hasattr(type(new), "use_batch_stats")   # torch's layers need hooks for them
    for attr in ("use_batch_stats", "update_running_stats", "warn_nonfinite", "skipped_updates", "layer_path"):
        if attr in old.__dict__ and (reads_switches or attr not in ("use_batch_stats", "update_running_stats")):
            setattr(new, attr, old.__dict__[attr])
    return new


def name_layers(model: nn.Module) -> nn.Module:
    """Record each batch-norm layer's path in ``model`` (``layer2.0.bn1``) as its ``layer_path``, so its
    warnings and errors say where it is. Models of :mod:`bnlab.models` and :func:`bnlab.nn.convert` call it;
    call it again after moving layers around. Returns ``model``."""
    for name, module in model.named_modules():
        if is_batch_norm(module) and name:
            module.layer_path = name
    return model


def layer_label(module: nn.Module, name: str = "") -> str:
    """How messages name a layer: ``layer2.0.bn1 (BatchNorm2d(16))``, or ``BatchNorm2d(16)`` without a path."""
    kind = f"{type(module).__name__}({getattr(module, 'num_features', '?')})"
    path = name or getattr(module, "layer_path", "")
    return f"{path} ({kind})" if path else kind


def first_tensor(module: nn.Module) -> Optional[Tensor]:
    """A parameter or buffer of ``module`` (for its device and dtype), or ``None``."""
    for t in (getattr(module, "weight", None), getattr(module, "running_mean", None)):
        if t is not None:
            return t
    return None
