"""The one registry of normalization layers: a name, a class or a ``functools.partial`` → a factory.

``get_norm_layer(norm)`` returns a :class:`NormFactory`; calling it as ``factory(num_channels, dims=2)``
builds the layer for a ``(N, C, L)`` (``dims=1``) or ``(N, C, H, W)`` (``dims=2``) input. Every model in
:mod:`bnlab.models` takes ``norm`` and passes it through here, so nothing is hard-coded to one norm.

Names:

==============  ====================================================================================
``bn``          :class:`bnlab.nn.BatchNorm1d` / ``BatchNorm2d`` (this project's batch norm)
``torch_bn``    :class:`torch.nn.BatchNorm1d` / ``BatchNorm2d`` (PyTorch's native, for comparison)
``none``        :class:`torch.nn.Identity` (no normalization; convolutions get biases)
``groupnorm``   :class:`torch.nn.GroupNorm` with 32 groups, or the largest divisor of C below 32
                (Wu & He 2018, https://arxiv.org/abs/1803.08494)
``groupnorm:K`` GroupNorm with at least K channels per group: the most groups (at most 32) dividing C
                that leave K or more channels each — in a narrow net, plain ``groupnorm`` would give one
                channel per group (InstanceNorm)
``layernorm``   per-sample over (C, H, W): ``GroupNorm(1, C)``, with a per-channel γ and β
                (Ba et al. 2016, https://arxiv.org/abs/1607.06450)
``skipinit``    no normalization; each residual branch ends in a learnable scalar α = 0
                (De & Smith 2020, https://arxiv.org/abs/2002.10444)
``fixup``       no normalization; branch weights scaled by L^(−1/(2m−2)), the last layer of each branch
                zero-initialised, scalar biases and a scalar multiplier (Zhang et al. 2019,
                https://arxiv.org/abs/1901.09321)
==============  ====================================================================================

SkipInit and Fixup need the residual block's cooperation: the factory's ``scheme`` tells the block
(see :mod:`bnlab.models.resnet`) which scalars to add; the norm layers themselves are identities.

Example::

    >>> from bnlab.models.norms import get_norm_layer
    >>> get_norm_layer("groupnorm")(64)
    GroupNorm(32, 64, eps=1e-05, affine=True)
    >>> get_norm_layer("bn")(16, dims=1)
    BatchNorm1d(16, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
"""

from __future__ import annotations

import functools
from typing import Callable, Union

from torch import nn

import bnlab.nn
from bnlab.errors import UserError
from bnlab.protocol import is_batch_norm

__all__ = ["NormFactory", "get_norm_layer", "choose_norm", "available", "group_count", "group_channels_count",
           "is_batch_norm"]


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``max_groups`` (GroupNorm needs C % G == 0)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def _batch_norm(classes: tuple[type, type]) -> Callable[..., nn.Module]:
    def make(num_channels: int, dims: int = 2) -> nn.Module:
        return classes[dims - 1](num_channels)
    return make


def _identity(num_channels: int, dims: int = 2) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "bn": (_batch_norm((bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm2d)), "norm"),
    "torch_bn": (_batch_norm((nn.BatchNorm1d, nn.BatchNorm2d)), "norm"),
    "none": (_identity, "norm"),
    "groupnorm": (lambda c, dims=2: nn.GroupNorm(group_count(c), c), "norm"),
    "layernorm": (lambda c, dims=2: nn.GroupNorm(1, c), "norm"),
    "skipinit": (_identity, "skipinit"),
    "fixup": (_identity, "fixup"),
}

# A BatchNorm2d class passed for a 1-D model means "the same thing for (N, C, L)".
_DIMS_TWIN = {nn.BatchNorm2d: nn.BatchNorm1d, nn.BatchNorm1d: nn.BatchNorm2d,
              bnlab.nn.BatchNorm2d: bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm1d: bnlab.nn.BatchNorm2d}
_DIMS_OF = {nn.BatchNorm1d: 1, bnlab.nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, bnlab.nn.BatchNorm2d: 2}


def available() -> list[str]:
    """Names :func:`get_norm_layer` accepts."""
    return list(_REGISTRY)


class NormFactory:
    """``factory(num_channels, dims=2) -> nn.Module``, plus what a residual block needs to know.

    Attributes:
        name: the registry name, or the class name for a class / partial.
        scheme: ``"norm"`` (an ordinary layer), ``"skipinit"`` or ``"fixup"`` (the block adds scalars).
        has_shift: whether the layer has its own bias β (if not, the convolution before it gets one).
    """

    def __init__(self, make: Callable[..., nn.Module], name: str, scheme: str = "norm",
                 has_shift: bool = True) -> None:
        self._make, self.name, self.scheme, self.has_shift = make, name, scheme, has_shift

    def __call__(self, num_channels: int, dims: int = 2) -> nn.Module:
        if dims not in (1, 2):
            raise ValueError(f"norm layer {self.name!r}: dims must be 1 (N, C, L) or 2 (N, C, H, W), got {dims}")
        return self._make(num_channels, dims)

    def __repr__(self) -> str:
        return f"NormFactory({self.name!r}, scheme={self.scheme!r})"


def _from_callable(norm: Union[type, functools.partial]) -> NormFactory:
    cls = norm.func if isinstance(norm, functools.partial) else norm
    name = getattr(cls, "__name__", repr(cls))

    def make(num_channels: int, dims: int = 2) -> nn.Module:
        target = cls
        if cls in _DIMS_OF and _DIMS_OF[cls] != dims:
            target = _DIMS_TWIN[cls]
        if isinstance(norm, functools.partial):
            return target(num_channels, *norm.args, **norm.keywords)
        return target(num_channels)

    return NormFactory(make, name, "norm", has_shift=True)


def group_channels_count(num_channels: int, channels_per_group: int) -> int:
    """The number of groups ``groupnorm:K`` uses for ``num_channels``: the largest divisor of C, at most 32
    and at most C // K (one group when C < K), so every group holds at least K channels where C allows."""
    return group_count(num_channels, max(1, min(32, num_channels // channels_per_group)))


def _group_norm(key: str, given: str) -> NormFactory:
    size = key.partition(":")[2]
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"unknown norm {given!r}: groupnorm:K needs K, the channels per group, a positive "
                         f"integer (e.g. groupnorm:4)")
    k = int(size)
    return NormFactory(lambda c, dims=2: nn.GroupNorm(group_channels_count(c, k), c), key, "norm", has_shift=True)


def get_norm_layer(norm: Union[str, type, functools.partial, NormFactory]) -> NormFactory:
    """A :class:`NormFactory` for ``norm``: a registry name, a class, or a ``functools.partial`` of a class
    that takes ``num_features`` as its first argument (e.g. ``partial(nn.BatchNorm2d, momentum=0.01)``).

    Raises:
        ValueError: an unknown name.
        TypeError: something that is neither a name nor a callable.
    """
    if isinstance(norm, NormFactory):
        return norm
    if isinstance(norm, str):
        key = norm.lower().replace("-", "_")
        if key.startswith("groupnorm:"):
            return _group_norm(key, norm)
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm {norm!r}: expected one of {', '.join(available())}, "
                             f"a class, or a functools.partial of a class taking num_features first")
        make, scheme = _REGISTRY[key]
        return NormFactory(make, key, scheme, has_shift=key not in ("none", "skipinit", "fixup"))
    if isinstance(norm, (type, functools.partial)):
        return _from_callable(norm)
    raise TypeError(f"norm must be a name ({', '.join(available())}), a class or a functools.partial "
                    f"(got {type(norm).__name__}: {norm!r})")


def choose_norm(norm, norm_layer, where: str):
    """``norm_layer`` (torchvision's and timm's keyword) when given, else ``norm``: every model and block
    accepts both. Giving both, with ``norm`` other than its default ``"bn"``, is an error."""
    if norm_layer is None:
        return norm
    if not (isinstance(norm, str) and norm == "bn") and norm is not norm_layer:
        raise UserError(f"{where}: got both norm={norm!r} and norm_layer={norm_layer!r}; give one of them")
    return norm_layer
