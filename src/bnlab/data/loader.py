"""Shuffled, augmented mini-batches of tensors that never leave their device.

:class:`Loader` shuffles, batches and augments (random crop with zero padding, horizontal flip) with tensor
operations on the data's device: no per-sample Python, no worker processes.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Union

import torch
from torch import Tensor

__all__ = ["Loader", "random_crop", "random_flip"]


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset per example: ``(N, C, H, W)`` or
    ``(N, C, L)``, one gather, no Python loop over examples."""
    if padding <= 0:
        return x
    n, spatial = x.shape[0], x.shape[2:]
    padded = torch.nn.functional.pad(x, [padding] * 2 * len(spatial))
    offsets = torch.randint(0, 2 * padding + 1, (len(spatial), n), generator=generator, device=x.device)
    if len(spatial) == 1:
        idx = offsets[0][:, None] + torch.arange(spatial[0], device=x.device)         # (N, L)
        return torch.gather(padded, 2, idx[:, None, :].expand(-1, x.shape[1], -1))
    rows = offsets[0][:, None] + torch.arange(spatial[0], device=x.device)             # (N, H)
    cols = offsets[1][:, None] + torch.arange(spatial[1], device=x.device)             # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]       # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each example left-right with probability 1/2 (the last dimension)."""
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


class Loader:
    """Shuffled mini-batches of tensors already on the training device.

    Each epoch's permutation comes from ``(seed, epoch)`` alone, so epoch ``e`` is the same whether or
    not the run was interrupted before it (set :attr:`epoch` to resume). Augmentation draws from the same
    generator.

    Args:
        x, y: the whole split, ``(N, ...)`` and ``(N,)``, on one device.
        batch_size: examples per batch.
        shuffle: a new permutation each epoch.
        drop_last: drop the last incomplete batch; if ``False`` it is kept, except a remainder of one
            example, which is dropped with a warning (batch norm cannot train on a batch of one).
        augment: ``False``, ``True``/``"crop+flip"``, ``"crop"`` or ``"flip"``.
        seed: seed of the shuffling and augmentation.
        crop_padding: zero padding of the random crop, in pixels.
        rank, world_size: take every ``world_size``-th example of each permutation from ``rank`` on
            (distributed data parallel); every rank gets the same number of batches.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 augment: Union[bool, str] = False, seed: int = 0, crop_padding: int = 2, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(x) != len(y):
            raise ValueError(f"Loader: x and y differ in length ({len(x)} vs {len(y)})")
        if x.device != y.device:
            raise ValueError(f"Loader: x and y are on different devices ({x.device} vs {y.device})")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Loader: batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        modes = {False: (), None: (), True: ("crop", "flip"), "crop+flip": ("crop", "flip"), "crop": ("crop",),
                 "flip": ("flip",), "none": ()}
        if augment not in modes:
            raise ValueError(f"Loader: augment must be True, False, 'crop', 'flip' or 'crop+flip', got {augment!r}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.seed, self.crop_padding = modes[augment], seed, crop_padding
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = len(x) // world_size
        if self.per_rank < batch_size and drop_last:
            raise ValueError(f"Loader: batch_size {batch_size} exceeds the {self.per_rank} examples per "
                             f"{'rank' if world_size > 1 else 'epoch'}, and drop_last=True leaves no batch")

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest > 1 and not self.drop_last else 0)

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.x.device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return g

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = self._generator()
        n = len(self.x)
        order = torch.randperm(n, generator=g, device=self.x.device) if self.shuffle else \
            torch.arange(n, device=self.x.device)
        order = order[self.rank::self.world_size][:self.per_rank]
        rest = self.per_rank % self.batch_size
        if rest == 1 and not self.drop_last:
            warnings.warn(f"Loader: dropping the last batch of 1 example ({self.per_rank} examples, batch_size "
                          f"{self.batch_size}); batch norm cannot train on a single example", RuntimeWarning)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if "crop" in self.augment:
                x = random_crop(x, self.crop_padding, g)
            if "flip" in self.augment:
                x = random_flip(x, g)
            yield x, self.y[idx]
