"""Models: residual networks with pluggable normalization, and an airbench-style net.

Example::

    >>> import bnlab.models as models
    >>> net = models.create("resnet20", norm="bn", in_channels=1, num_classes=10)
    >>> net = models.create("resnet", depth=26, norm="groupnorm", plain=True)   # any 6n+2
    >>> models.available()[:3]
    ['resnet8', 'resnet14', 'resnet20']
"""

from __future__ import annotations

import re

from torch import nn

from bnlab.models import norms
from bnlab.protocol import name_layers
from bnlab.models.airbench import AirbenchNet
from bnlab.models.resnet import ResNet, cifar_resnet, imagenet_resnet
from bnlab.models.stacked import Stacked, StackedSGD, stack

__all__ = ["create", "available", "describe", "norms", "ResNet", "AirbenchNet", "stack", "Stacked", "StackedSGD"]

_CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
_IMAGENET_DEPTHS = (18, 34, 50)

_DESCRIPTIONS = {
    **{f"resnet{d}": f"CIFAR ResNet-{d} (6n+2, widths 16/32/64, He et al. 2016)" for d in _CIFAR_DEPTHS},
    **{f"resnet{d}": f"ResNet-{d} (widths 64..512, projection shortcuts, 3x3 stem for small images)"
       for d in _IMAGENET_DEPTHS},
    **{f"preact_resnet{d}": f"pre-activation CIFAR ResNet-{d} (He et al. 2016b)" for d in _CIFAR_DEPTHS},
    "preact_resnet18": "pre-activation ResNet-18",
    "resnet1d": "1-D CIFAR-style ResNet for sequences (Conv1d, BatchNorm1d), depth=20 by default",
    "airbench": "airbench-style net: whitening stem, conv-pool-norm-GELU groups 96/192/384",
}


def available() -> list[str]:
    """Model names :func:`create` accepts (also ``"resnet"`` / ``"preact_resnet"`` with ``depth=``)."""
    return list(_DESCRIPTIONS)


def describe() -> dict[str, str]:
    """``{name: one-line description}`` for every name in :func:`available`."""
    return dict(_DESCRIPTIONS)


def create(name: str, norm="bn", in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
           plain: bool = False, **kw) -> nn.Module:
    """Build model ``name`` (see :func:`available`).

    Args:
        name: e.g. ``"resnet20"``, ``"preact_resnet56"``, ``"resnet18"``, ``"resnet1d"``, ``"airbench"``;
            or ``"resnet"`` / ``"preact_resnet"`` / ``"resnet1d"`` with ``depth=D`` for any depth 6n+2.
        norm: a name from :func:`bnlab.models.norms.available`, a class or a ``functools.partial``;
            ``norm_layer=`` (torchvision's and timm's keyword) is accepted too.
        in_channels, num_classes: input channels and classes.
        width: width multiplier.
        plain: the plain twin (no shortcuts) of a residual network.
        **kw: ``zero_init_residual`` (zero the last norm γ of each branch, Goyal et al. 2017),
            ``fused`` (``None``: fused BN+add+ReLU on CUDA only; ``False`` disables), ``shortcut``
            (``"A"``/``"B"``), ``stem`` (``"cifar"``/``"imagenet"``), ``depth``; for airbench
            ``freeze_gamma``.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    norm = norms.choose_norm(norm, kw.pop("norm_layer", None), f"create({name!r})")
    common = dict(norm=norm, in_channels=in_channels, num_classes=num_classes, width=width)
    if key == "airbench":
        if plain:
            raise ValueError("airbench has no shortcuts, so it has no plain twin (plain=True)")
        for unused in ("zero_init_residual", "fused"):
            kw.pop(unused, None)
        return name_layers(AirbenchNet(**common, **kw))
    if key == "resnet1d":
        return cifar_resnet(kw.pop("depth", 20), plain=plain, dims=1, **common, **kw)
    match = re.fullmatch(r"(preact_)?resnet(\d+)?", key)
    if match is None:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(available())}, "
                         f"or 'resnet'/'preact_resnet' with depth=6n+2")
    preact = match.group(1) is not None
    depth = int(match.group(2)) if match.group(2) else kw.pop("depth", None)
    if match.group(2) and "depth" in kw and kw.pop("depth") != depth:
        raise ValueError(f"create({name!r}): depth= contradicts the name")
    if depth is None:
        raise ValueError(f"create({name!r}) needs depth=, e.g. create('resnet', depth=26)")
    if depth in _IMAGENET_DEPTHS:
        return imagenet_resnet(depth, plain=plain, preact=preact, **common, **kw)
    return cifar_resnet(depth, plain=plain, preact=preact, **common, **kw)
