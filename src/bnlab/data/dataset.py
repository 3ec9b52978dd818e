"""The dataset record, and the new records made from one: a class-balanced subset, a validation split, smaller images.

A :class:`Dataset` holds its splits as whole tensors on one device; :func:`bnlab.data.load` makes one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch
from torch import Tensor

from bnlab.errors import UserError

__all__ = ["Dataset", "balanced_subset", "split_validation", "downsample"]


@dataclass
class Dataset:
    """A dataset held as tensors: float32 examples normalized with the training set's per-channel mean and
    standard deviation, int64 labels (see :mod:`bnlab.data`)."""

    name: str
    train_x: Tensor        # (N, C, H, W) or (N, C, L), float32, normalized
    train_y: Tensor        # (N,), int64
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    source: str            # where it was found (a directory, or what generated it)
    augment: bool          # whether random crops and horizontal flips make sense for it
    crop_padding: int = 2  # zero padding of its random crop, pixels (CIFAR's standard: 4)

    def to(self, device: Union[str, torch.device]) -> "Dataset":
        return replace(self, **{k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")})

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
                f"classes={self.num_classes}, device={self.train_x.device}, source={self.source!r})")


def balanced_subset(y: Tensor, size: int, num_classes: int, seed: int = 0) -> Tensor:
    """Indices of a seeded subset of ``size`` examples with classes as equal as possible (sorted)."""
    if not 0 < size <= len(y):
        raise UserError(f"subset must be between 1 and the training-set size {len(y)}, got {size}")
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    per_class = [size // num_classes + (c < size % num_classes) for c in range(num_classes)]
    chosen = []
    for c, k in enumerate(per_class):
        members = torch.nonzero(y == c).flatten()
        if len(members) < k:
            raise UserError(f"subset={size}: class {c} has only {len(members)} training examples, need {k}")
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def split_validation(ds: Dataset, size: int, seed: int = 0) -> Dataset:
    """``ds`` with a stratified validation split of ``size`` examples carved from its *training* data.

    The result's ``train_x/train_y`` are the remaining training examples and its ``val_x/val_y`` the
    held-out ones (class-balanced, seeded); ``test_x/test_y`` are untouched, so choices made on the
    validation split never see the test set.
    """
    if not 0 < size < len(ds.train_y):
        raise ValueError(f"validation size must be between 1 and {len(ds.train_y) - 1} "
                         f"(the {ds.name} training set has {len(ds.train_y)} examples), got {size}")
    held = balanced_subset(ds.train_y, size, ds.num_classes, seed)
    keep = torch.ones(len(ds.train_y), dtype=torch.bool)
    keep[held] = False
    keep = keep.to(ds.train_y.device)
    held = held.to(ds.train_y.device)
    out = replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
    out.val_x, out.val_y = ds.train_x[held], ds.train_y[held]
    return out


def downsample(ds: Dataset, size: int) -> Dataset:
    """``ds`` with its images average-pooled to at most ``size`` × ``size`` (each output pixel the mean of
    its block of input pixels: ``adaptive_avg_pool2d``), then standardized again with the pooled training
    images' per-channel mean and standard deviation. Images already no larger are returned unchanged
    (never upsampled); a validation split made before (``val_x``) is pooled too."""
    if ds.train_x.dim() != 4:
        raise ValueError(f"downsample: {ds.name} holds {ds.train_x.dim() - 2}-D examples "
                         f"{tuple(ds.train_x.shape[1:])}, expected images (N, C, H, W)")
    if int(size) < 1:
        raise ValueError(f"downsample: size must be a positive number of pixels, got {size}")
    height, width = ds.train_x.shape[-2:]
    if height <= size and width <= size:
        return ds
    out_size = (min(int(size), height), min(int(size), width))

    def pool(x: Tensor) -> Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, out_size)

    train_x = pool(ds.train_x)
    mean, std = train_x.mean((0, 2, 3), keepdim=True), train_x.std((0, 2, 3), keepdim=True)
    out = replace(ds, train_x=(train_x - mean) / std, test_x=(pool(ds.test_x) - mean) / std)
    if hasattr(ds, "val_x"):
        out.val_x, out.val_y = (pool(ds.val_x) - mean) / std, ds.val_y
    return out
