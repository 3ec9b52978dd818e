"""An airbench-style network: a whitening stem, then conv → max-pool → norm → GELU groups.

After Keller Jordan's airbench (https://github.com/KellerJordan/cifar10-airbench, "94% on CIFAR-10 in
3.29 seconds", https://arxiv.org/abs/2404.00498): a 2×2 convolution initialised to whiten the input
patches (:meth:`AirbenchNet.init_whitening`, run by ``bnlab.train.train`` through ``init_from_data``), three groups ``conv3×3 → max-pool 2 → norm → GELU →
conv3×3 → norm → GELU`` of widths 96/192/384 (× ``width``), a final max-pool, a bias-free linear layer and a
fixed 1/9 output scale. Batch norm uses momentum 0.4 (airbench's 0.6 in the other convention) and a
frozen γ = 1 (``freeze_gamma``). Convolutions start as partial identities (Dirac init) so the early
network passes the whitened input through.

Shape:
    input ``(N, C, H, W)`` with H, W ≥ 23 (28×28 and 32×32 end at 1×1 after the last pool);
    output ``(N, num_classes)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from bnlab.models.norms import get_norm_layer, is_batch_norm

__all__ = ["AirbenchNet"]


class _ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm, freeze_gamma: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            w = conv.weight.data
            nn.init.dirac_(w[:w.size(1)])  # the first in_channels filters start as the identity
        for n in (self.norm1, self.norm2):
            if is_batch_norm(n):
                n.momentum, n.eps = 0.4, 1e-12
            if freeze_gamma and getattr(n, "weight", None) is not None:
                n.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """See the module docstring.

    Args:
        norm: norm name, class or partial (default ``"bn"``); SkipInit/Fixup do not apply (no residuals).
        in_channels, num_classes: input channels and classes.
        width: multiplier of the widths 96/192/384.
        freeze_gamma: keep the norm layers' γ at 1 (airbench's choice).
    """

    def __init__(self, norm="bn", in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 freeze_gamma: bool = True, widths: Optional[tuple[int, int, int]] = None) -> None:
        super().__init__()
        factory = get_norm_layer(norm)
        if factory.scheme != "norm":
            raise ValueError(f"AirbenchNet: norm {factory.name!r} needs residual blocks; airbench has none")
        widths = widths or tuple(max(1, int(round(w * width))) for w in (96, 192, 384))
        whiten_width = 2 * in_channels * 2 * 2  # ± each whitening direction of a 2×2 patch
        self.whiten = nn.Conv2d(in_channels, whiten_width, 2, padding=0, bias=True)
        self.act = nn.GELU()
        self.groups = nn.Sequential(_ConvGroup(whiten_width, widths[0], factory, freeze_gamma),
                                    _ConvGroup(widths[0], widths[1], factory, freeze_gamma),
                                    _ConvGroup(widths[1], widths[2], factory, freeze_gamma))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = 1 / 9

    @torch.no_grad()
    def init_whitening(self, x: Tensor, eps: float = 5e-4) -> None:
        """Set the stem to the whitening transform of the 2×2 patches of ``x`` (N, C, H, W): the
        eigenvectors of their covariance divided by √(eigenvalue + eps), and their negatives."""
        c, k = x.shape[1], self.whiten.kernel_size[0]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c, k, k).double()
        flat = patches.reshape(len(patches), -1)
        flat = flat - flat.mean(0)
        cov = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def init_from_data(self, train_x: Tensor) -> None:
        """The data-dependent initialisation :func:`bnlab.train.train` runs at the start of a fresh run:
        whiten the stem on the first 5000 training images."""
        self.init_whitening(train_x[:5000])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"AirbenchNet: expected 4D input (N, C, H, W) (got {x.dim()}D input)")
        x = self.groups(self.act(self.whiten(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.scale
