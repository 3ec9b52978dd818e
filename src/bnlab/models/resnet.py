r"""Residual networks whose blocks take the normalization as an argument.

* CIFAR-style ResNet of depth :math:`6n+2` (ResNet-8/14/20/32/44/56/110): a 3×3 stem, three stages of
  :math:`n` basic blocks with widths 16/32/64 (× ``width``), global average pooling and a linear layer;
  He et al. 2016, https://arxiv.org/abs/1512.03385, Sec. 4.2. The default shortcut is the paper's option A
  (identity; a stride-2 subsample zero-padded in channels where the shape changes), so the parameter
  counts match its Table 6 (ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M).
* The pre-activation variant (norm → ReLU → conv inside the branch, nothing after the addition);
  He et al. 2016b, https://arxiv.org/abs/1603.05027.
* ResNet-18/34/50 (torchvision's stages, projection shortcuts) with a 3×3 stride-1 stem without
  max-pool, which suits 28×28 and 32×32 images (``stem="imagenet"`` gives the 7×7/2 stem + max-pool).
* The same CIFAR network in 1-D (``dims=1``: ``Conv1d``, ``BatchNorm1d``) for sequence data.
* ``plain=True``: the *plain twin*, the same layers without the identity shortcuts (``shortcut=None``;
  the projection of a downsampling block is dropped too, as in the paper's plain nets).

Every block has ``branch`` (the residual branch: its output is what is added to the stream, SkipInit α
and Fixup scalars included) and ``shortcut`` (``nn.Identity``, a projection, or ``None`` in the plain
twin), and computes ``act(branch(x) + shortcut(x))`` (pre-activation: ``branch(x) + shortcut(x)``).
The branch's parts have torchvision's names — ``conv1``, ``bn1``, ``relu``, ``conv2``, ``bn2`` (a
bottleneck adds ``conv3``/``bn3``; the norm is named ``bn`` whichever it is; SkipInit's scalar is
``alpha``; Fixup's are ``bias1a``, ``bias1b``, …, ``scale``) — and the block reaches them directly:
``block.bn2`` is ``block.branch.bn2`` (state_dict key ``blocks.0.branch.bn2.weight``). A state_dict saved
with the earlier numbered keys (``branch.4.weight``) still loads. The network's blocks are
``model.blocks``, in order.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Optional, Union

import torch
from torch import Tensor, nn

import bnlab.nn
from bnlab.models.norms import NormFactory, choose_norm, get_norm_layer
from bnlab.protocol import name_layers

__all__ = ["Scale", "Bias", "ZeroPadShortcut", "BasicBlock", "PreActBlock", "Bottleneck", "ResNet",
           "cifar_resnet", "imagenet_resnet"]


# ReLUs are never in place, so forward hooks on norm layers, branches and blocks see the values those
# modules returned, not values a later activation overwrote.

# --------------------------------------------------------------------------------------------------
# small parts
# --------------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """A learnable scalar multiplier: SkipInit's α (init 0) and Fixup's multiplier (init 1)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight

    def extra_repr(self) -> str:
        return f"value={float(self.weight.detach()):g}"


class Bias(nn.Module):
    """A learnable scalar bias (Fixup), initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut: out_channels ({out_channels}) < in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        extra = self.out_channels - self.in_channels
        pad = [0, 0] * (x.dim() - 2) + [extra // 2, extra - extra // 2]  # (N, C, *): pad C on both sides
        return nn.functional.pad(x, pad)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _conv(dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
          bias: bool = False) -> nn.Module:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias)


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: str, norm: NormFactory,
              dims: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if kind == "B":
        layers = [_conv(dims, in_channels, out_channels, 1, stride, bias=not norm.has_shift)]
        if norm.scheme == "norm":
            layers.append(norm(out_channels, dims))
        return nn.Sequential(*layers)
    raise ValueError(f"shortcut must be 'A' (zero-pad) or 'B' (projection), got {kind!r}")


def _fused_allowed(fused: Optional[bool], last: nn.Module, where: str) -> Optional[bool]:
    if fused and not isinstance(last, bnlab.nn.BatchNorm):
        raise ValueError(f"{where}: fused=True needs norm='bn' (bnlab batch norm at the end of each branch), "
                         f"got {type(last).__name__}; use fused=None or False")
    return fused


def _accept_numbered_branch_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                 unexpected_keys, error_msgs) -> None:
    """Load a state_dict saved before the branch parts had names: ``branch.3.weight`` becomes the name of
    the branch's fourth part (``branch.conv2.weight``). Keys that already use names pass unchanged."""
    names = list(module.branch._modules)
    numbered = re.compile(re.escape(prefix) + r"branch\.(\d+)\.(.+)")
    for key in [k for k in state_dict if k.startswith(prefix + "branch.")]:
        match = numbered.fullmatch(key)
        if match and int(match.group(1)) < len(names):
            state_dict[f"{prefix}branch.{names[int(match.group(1))]}.{match.group(2)}"] = state_dict.pop(key)


# --------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """Shared parts: ``branch``, ``shortcut``, Fixup/SkipInit bookkeeping, ``zero_init_last()``."""

    expansion = 1
    branch_layers = 2  # m in Fixup's L^(-1/(2m-2))

    def _finish(self, layers: list[tuple[str, nn.Module]], norm: NormFactory, shortcut: Optional[nn.Module]) -> None:
        layers = [(name, m) for name, m in layers if not isinstance(m, nn.Identity)]   # norm="none" adds none
        if norm.scheme == "skipinit":
            layers.append(("alpha", Scale(0.0)))      # α = 0: the block starts as the identity
        elif norm.scheme == "fixup":
            last = sum(name.startswith("conv") for name, _ in layers)
            layers += [("scale", Scale(1.0)), (f"bias{last}b", Bias())]   # Fixup's scalar multiplier and bias
        self.branch = nn.Sequential(OrderedDict(layers))
        self.shortcut = shortcut
        self.scheme = norm.scheme
        self.register_load_state_dict_pre_hook(_accept_numbered_branch_keys)

    def __getattr__(self, name: str):
        """The branch's parts by name on the block too, as torchvision's blocks have them: ``block.bn2`` is
        ``block.branch.bn2``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            branch = self.__dict__["_modules"].get("branch")
            if branch is not None and name in branch._modules:
                return branch._modules[name]
            raise

    def branch_convs(self) -> list[nn.Module]:
        return [m for m in self.branch if isinstance(m, (nn.Conv1d, nn.Conv2d))]

    def zero_init_last(self) -> None:
        """Zero γ of the branch's last norm layer (Goyal et al. 2017, https://arxiv.org/abs/1706.02677,
        Sec. 5.1): every block then starts as the identity, which eases early training."""
        norms = [m for m in self.branch if getattr(m, "weight", None) is not None
                 and not isinstance(m, (nn.Conv1d, nn.Conv2d, Scale))]
        if norms:
            nn.init.zeros_(norms[-1].weight)

    def fixup_init(self, num_branches: int, generator: Optional[torch.Generator] = None) -> None:
        """Fixup (Zhang et al. 2019, Sec. 3): He-init convs scaled by L^(−1/(2m−2)), the last one zero."""
        convs = self.branch_convs()
        factor = num_branches ** (-1.0 / (2 * self.branch_layers - 2))
        for conv in convs[:-1]:
            fan_out = conv.weight.shape[0] * math.prod(conv.weight.shape[2:])
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out) * factor, generator=generator)
        nn.init.zeros_(convs[-1].weight)


class BasicBlock(_Block):
    """Two 3×3 convolutions; ``relu(branch(x) + shortcut(x))`` (He et al. 2016, Fig. 2).

    Args:
        in_channels, out_channels: channels in and out.
        stride: stride of the first convolution (2 halves the resolution).
        norm: a :class:`~bnlab.models.norms.NormFactory` (or anything :func:`get_norm_layer` accepts).
        dims: 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``.
        shortcut: ``"A"`` (zero-pad), ``"B"`` (1×1 projection + norm) or ``None`` (plain twin).
        fused: ``None`` fuses the last BN, the addition and the ReLU via :mod:`bnlab.nn.fused` on CUDA only;
            ``True`` everywhere; ``False`` never.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm="bn", dims: int = 2,
                 shortcut: Optional[str] = "A", fused: Optional[bool] = None, *, norm_layer=None) -> None:
        super().__init__()
        norm = get_norm_layer(choose_norm(norm, norm_layer, type(self).__name__))
        bias = not norm.has_shift
        if norm.scheme == "fixup":
            layers = [("bias1a", Bias()), ("conv1", _conv(dims, in_channels, out_channels, 3, stride)),
                      ("bias1b", Bias()), ("relu", nn.ReLU()), ("bias2a", Bias()),
                      ("conv2", _conv(dims, out_channels, out_channels, 3))]
        else:
            layers = [("conv1", _conv(dims, in_channels, out_channels, 3, stride, bias)),
                      ("bn1", norm(out_channels, dims)), ("relu", nn.ReLU()),
                      ("conv2", _conv(dims, out_channels, out_channels, 3, bias=bias)),
                      ("bn2", norm(out_channels, dims))]
        sc = None if shortcut is None else _shortcut(in_channels, out_channels, stride, shortcut, norm, dims)
        self._finish(layers, norm, sc)
        self.fused = _fused_allowed(fused, self.branch[-1], type(self).__name__)

    def _use_fused(self, x: Tensor) -> bool:
        if self.fused is False or not isinstance(self.branch[-1], bnlab.nn.BatchNorm):
            return False
        return bool(self.fused) or x.is_cuda

    def forward(self, x: Tensor) -> Tensor:
        if self._use_fused(x):
            from bnlab.nn import fused
            h = self.branch[:-1](x)
            if self.shortcut is None:
                return fused.batch_norm_relu(self.branch[-1], h)
            return fused.batch_norm_add_relu(self.branch[-1], h, self.shortcut(x))
        out = self.branch(x)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return torch.relu(out)


class PreActBlock(_Block):
    """Pre-activation block: ``branch(x) + shortcut(x)`` with branch = norm → ReLU → conv → norm → ReLU →
    conv (He et al. 2016b, Fig. 4e). Arguments as :class:`BasicBlock` (``fused`` is ignored: there is no
    BN+add+ReLU tail to fuse)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm="bn", dims: int = 2,
                 shortcut: Optional[str] = "A", fused: Optional[bool] = None, *, norm_layer=None) -> None:
        super().__init__()
        norm = get_norm_layer(choose_norm(norm, norm_layer, type(self).__name__))
        bias = not norm.has_shift
        if norm.scheme == "fixup":
            layers = [("bias1a", Bias()), ("relu1", nn.ReLU()),
                      ("conv1", _conv(dims, in_channels, out_channels, 3, stride)), ("bias1b", Bias()),
                      ("relu2", nn.ReLU()), ("bias2a", Bias()), ("conv2", _conv(dims, out_channels, out_channels, 3))]
        else:
            layers = [("bn1", norm(in_channels, dims)), ("relu1", nn.ReLU()),
                      ("conv1", _conv(dims, in_channels, out_channels, 3, stride, bias)),
                      ("bn2", norm(out_channels, dims)), ("relu2", nn.ReLU()),
                      ("conv2", _conv(dims, out_channels, out_channels, 3, bias=bias))]
        sc = None if shortcut is None else _shortcut(in_channels, out_channels, stride, shortcut, norm, dims)
        self._finish(layers, norm, sc)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class Bottleneck(_Block):
    """1×1 → 3×3 → 1×1 convolutions, 4× expansion (He et al. 2016, Fig. 5; stride on the 3×3 as in
    torchvision). Arguments as :class:`BasicBlock`, ``out_channels`` being the inner width."""

    expansion = 4
    branch_layers = 3

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm="bn", dims: int = 2,
                 shortcut: Optional[str] = "B", fused: Optional[bool] = None, *, norm_layer=None) -> None:
        super().__init__()
        norm = get_norm_layer(choose_norm(norm, norm_layer, type(self).__name__))
        bias, outer = not norm.has_shift, out_channels * self.expansion
        if norm.scheme == "fixup":
            layers = [("bias1a", Bias()), ("conv1", _conv(dims, in_channels, out_channels, 1)), ("bias1b", Bias()),
                      ("relu1", nn.ReLU()), ("bias2a", Bias()),
                      ("conv2", _conv(dims, out_channels, out_channels, 3, stride)), ("bias2b", Bias()),
                      ("relu2", nn.ReLU()), ("bias3a", Bias()), ("conv3", _conv(dims, out_channels, outer, 1))]
        else:
            layers = [("conv1", _conv(dims, in_channels, out_channels, 1, bias=bias)),
                      ("bn1", norm(out_channels, dims)), ("relu1", nn.ReLU()),
                      ("conv2", _conv(dims, out_channels, out_channels, 3, stride, bias)),
                      ("bn2", norm(out_channels, dims)), ("relu2", nn.ReLU()),
                      ("conv3", _conv(dims, out_channels, outer, 1, bias=bias)), ("bn3", norm(outer, dims))]
        sc = None if shortcut is None else _shortcut(in_channels, outer, stride, shortcut, norm, dims)
        self._finish(layers, norm, sc)
        self.fused = _fused_allowed(fused, self.branch[-1], type(self).__name__)

    _use_fused = BasicBlock._use_fused
    forward = BasicBlock.forward


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------

class ResNet(nn.Module):
    """A stem, ``blocks`` (all residual blocks in order, stage after stage), pooling and a linear head.

    Args:
        block: :class:`BasicBlock`, :class:`PreActBlock` or :class:`Bottleneck`.
        stage_blocks: blocks per stage, e.g. ``[3, 3, 3]`` for ResNet-20.
        stage_widths: branch widths per stage, e.g. ``[16, 32, 64]``; every stage after the first halves
            the resolution in its first block.
        norm: a norm name, class or partial (see :mod:`bnlab.models.norms`).
        in_channels, num_classes: input channels and classes.
        dims: 1 for sequences ``(N, C, L)``, 2 for images ``(N, C, H, W)``.
        plain: build the plain twin (no shortcuts).
        shortcut: ``"A"`` (zero-pad) or ``"B"`` (projection) where the shape changes.
        stem: ``"cifar"`` (3×3 conv, stride 1) or ``"imagenet"`` (7×7/2 conv + 3×3/2 max-pool).
        zero_init_residual: zero the last norm γ of every branch (Goyal et al. 2017).
        fused: see :class:`BasicBlock`.
        init_seed: draw the weights from a generator with this seed instead of the global one, so that
            networks differing only in their norm (BN, none, GroupNorm, SkipInit) share their initial
            convolution and classifier weights.

    Shape:
        input ``(N, in_channels, H, W)`` (or ``(N, in_channels, L)``), output ``(N, num_classes)``.
    """

    def __init__(self, block: type, stage_blocks: list[int], stage_widths: list[int], norm="bn",
                 in_channels: int = 3, num_classes: int = 10, dims: int = 2, plain: bool = False,
                 shortcut: str = "A", stem: str = "cifar", zero_init_residual: bool = False,
                 fused: Optional[bool] = None, *, norm_layer=None, init_seed: Optional[int] = None) -> None:
        super().__init__()
        norm = choose_norm(norm, norm_layer, "ResNet")
        if dims not in (1, 2):
            raise ValueError(f"ResNet: dims must be 1 or 2, got {dims}")
        if not isinstance(in_channels, int) or in_channels < 1 or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ResNet: in_channels and num_classes must be positive ints "
                             f"(got {in_channels!r}, {num_classes!r})")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        norm = get_norm_layer(norm)
        self.norm_name, self.plain, self.dims = norm.name, plain, dims
        preact = block is PreActBlock
        width0 = stage_widths[0]
        stem_layers: list[nn.Module] = []
        if stem == "cifar":
            stem_layers.append(_conv(dims, in_channels, width0, 3, bias=not norm.has_shift))
        else:
            stem_layers.append((nn.Conv1d if dims == 1 else nn.Conv2d)(
                in_channels, width0, 7, 2, 3, bias=not norm.has_shift))
        if not preact:  # a pre-activation network normalizes inside the first block instead
            stem_layers += [norm(width0, dims), nn.ReLU()]
        if stem == "imagenet":
            stem_layers.append((nn.MaxPool1d if dims == 1 else nn.MaxPool2d)(3, 2, 1))
        self.stem = nn.Sequential(*[m for m in stem_layers if not isinstance(m, nn.Identity)])

        blocks, channels = [], width0
        for stage, (count, width) in enumerate(zip(stage_blocks, stage_widths)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(channels, width, stride, norm, dims, None if plain else shortcut, fused))
                channels = width * block.expansion
        self.blocks = nn.Sequential(*blocks)

        head: list[nn.Module] = [norm(channels, dims), nn.ReLU()] if preact else []
        self.head = nn.Sequential(*[m for m in head if not isinstance(m, nn.Identity)])
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init(norm, zero_init_residual, init_seed)
        name_layers(self)   # warnings name a layer by its path, e.g. blocks.3.branch.bn1

    def _init(self, norm: NormFactory, zero_init_residual: bool, init_seed: Optional[int]) -> None:
        # With init_seed, every weight is drawn from one generator in module order, so networks that differ
        # only in their norm layers start from the same weights: without it the unnormalized net's conv
        # biases (created, then zeroed) consume global random draws first and every later weight differs.
        gen = None if init_seed is None else torch.Generator().manual_seed(int(init_seed))
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if gen is not None:   # the classifier as nn.Linear initializes itself, from the same generator
            nn.init.kaiming_uniform_(self.fc.weight, a=math.sqrt(5), generator=gen)
            bound = 1 / math.sqrt(self.fc.in_features)
            nn.init.uniform_(self.fc.bias, -bound, bound, generator=gen)
        if norm.scheme == "fixup":
            for b in self.blocks:
                b.fixup_init(len(self.blocks), gen)
            nn.init.zeros_(self.fc.weight)  # Fixup: the classification layer starts at zero too
            nn.init.zeros_(self.fc.bias)
        if zero_init_residual:
            for b in self.blocks:
                b.zero_init_last()

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1)  # (N, C)

    def forward(self, x: Tensor) -> Tensor:
        expected = 3 if self.dims == 1 else 4
        if x.dim() != expected:
            raise ValueError(f"{type(self).__name__}: expected {expected}D input "
                             f"({'N, C, L' if self.dims == 1 else 'N, C, H, W'}) (got {x.dim()}D input)")
        return self.fc(self.features(x))


def cifar_resnet(depth: int, norm="bn", in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 plain: bool = False, preact: bool = False, dims: int = 2, **kw) -> ResNet:
    """CIFAR ResNet of depth 6n+2, base widths 16/32/64 × ``width`` (He et al. 2016, Sec. 4.2)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                         f"got {depth!r}")
    n = (depth - 2) // 6
    widths = [_scaled(w, width) for w in (16, 32, 64)]
    return ResNet(PreActBlock if preact else BasicBlock, [n] * 3, widths, norm, in_channels, num_classes,
                  dims=dims, plain=plain, **kw)


_IMAGENET_STAGES = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}


def imagenet_resnet(depth: int, norm="bn", in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                    plain: bool = False, preact: bool = False, **kw) -> ResNet:
    """ResNet-18/34/50 (widths 64/128/256/512 × ``width``, projection shortcuts), small-image stem."""
    if depth not in _IMAGENET_STAGES:
        raise ValueError(f"ResNet: depth must be one of 18, 34, 50 for the ImageNet layout, got {depth!r}")
    block, stages = _IMAGENET_STAGES[depth]
    if preact:
        if block is not BasicBlock:
            raise ValueError(f"pre-activation is available for ResNet-18/34, not ResNet-{depth}")
        block = PreActBlock
    kw.setdefault("shortcut", "B")
    widths = [_scaled(w, width) for w in (64, 128, 256, 512)]
    return ResNet(block, stages, widths, norm, in_channels, num_classes, plain=plain, **kw)


def _scaled(base: int, width: Union[int, float]) -> int:
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, int(round(base * width)))
