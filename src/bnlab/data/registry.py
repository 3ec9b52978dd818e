"""The datasets bnlab knows, one entry each, and :func:`load`, which turns any of them into a :class:`Dataset`.

Adding a dataset is one source module returning ``(arrays, source)`` and one entry in ``_ENTRIES``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Union

import numpy as np
import torch

from bnlab.data import cifar, fashion_mnist, generated
from bnlab.data.dataset import Dataset, balanced_subset
from bnlab.data.dirs import DatasetNotFoundError, PathLike, explicit_data_dir
from bnlab.errors import UserError

__all__ = ["canonical_name", "from_files", "available", "locate", "example_shape", "split_sizes", "num_classes",
           "is_image", "load", "check_data_dir"]

Arrays = tuple[dict, str]  # ({"train_x", "train_y", "test_x", "test_y"}: NumPy arrays, where they came from)


class _Entry(NamedTuple):
    read: Callable[[Optional[PathLike], bool], Arrays]          # (data_dir, download) -> arrays, source
    locate: Optional[Callable[[Optional[PathLike]], Optional[Path]]]  # its files on disk; None when generated
    classes: int
    augment: bool             # whether random crops and horizontal flips make sense
    crop_padding: int         # zero padding of the random crop, pixels
    description: str
    shape: tuple[int, ...]    # one example: (C, H, W) for images, (C, L) for sequences
    sizes: tuple[int, int]    # training and test examples


def _generated(make: Callable[[], Arrays]) -> Callable[[Optional[PathLike], bool], Arrays]:
    """A generator as an entry's ``read``: it needs no directory and downloads nothing."""
    return lambda data_dir, download: make()


_ENTRIES = {
    "fashion-mnist": _Entry(fashion_mnist.load_arrays, fashion_mnist.locate, 10, True, 2,
                            "Fashion-MNIST, 60k/10k 28x28 grey images, 10 classes", (1, 28, 28), (60000, 10000)),
    "mnist1d": _Entry(_generated(generated.make_mnist1d), None, 10, False, 2,
                      "MNIST-1D, 4k/1k sequences of length 40, 10 classes", (1, 40), (4000, 1000)),
    "digits": _Entry(_generated(generated.make_digits), None, 10, False, 2,
                     "scikit-learn digits, 1437/360 8x8 images, 10 classes", (1, 8, 8), (1437, 360)),
    "synthetic": _Entry(_generated(generated.make_synthetic), None, 4, False, 2,
                        "synthetic templates + noise, 512/256 8x8, 4 classes (tests)", (1, 8, 8), (512, 256)),
    "cifar10": _Entry(partial(cifar.load_arrays, "cifar10"), partial(cifar.locate, "cifar10"), 10, True,
                      cifar.CROP_PADDING, "CIFAR-10, 50k/10k 32x32 colour images, 10 classes", (3, 32, 32),
                      (50000, 10000)),
    "cifar100": _Entry(partial(cifar.load_arrays, "cifar100"), partial(cifar.locate, "cifar100"), 100, True,
                       cifar.CROP_PADDING, "CIFAR-100, 50k/10k 32x32 colour images, 100 fine classes", (3, 32, 32),
                       (50000, 10000)),
}

_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def canonical_name(name: str) -> str:
    """The registry's name for ``name`` (case, ``_``/``-`` and the aliases ``fashionmnist``, ``cifar-10``,
    ``cifar-100`` forgiven); raises :class:`UserError` for a dataset bnlab does not know."""
    key = str(name).lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _ENTRIES:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(_ENTRIES)}")
    return key


def from_files(name: str) -> bool:
    """Whether the dataset is read from files (and may be downloaded) rather than generated."""
    return _ENTRIES[canonical_name(name)].locate is not None


def available() -> dict[str, str]:
    """``{name: description}`` of the datasets :func:`load` knows."""
    return {name: entry.description for name, entry in _ENTRIES.items()}


def locate(name: str = "fashion-mnist", data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where a dataset read from files is (:func:`from_files`): Fashion-MNIST's directory holding all four
    files, or a CIFAR archive; ``None`` when there is no copy. With ``data_dir`` or ``$BNLAB_DATA`` only that
    directory is searched."""
    key = canonical_name(name)
    find = _ENTRIES[key].locate
    if find is None:
        raise ValueError(f"locate: {key} is generated, not read from files")
    return find(data_dir)


def example_shape(name: str) -> tuple[int, ...]:
    """One example's shape as :func:`load` returns it: ``(C, H, W)`` for images, ``(C, L)`` for sequences."""
    return _ENTRIES[canonical_name(name)].shape


def split_sizes(name: str) -> tuple[int, int]:
    """How many training and test examples :func:`load` returns (no subset)."""
    return _ENTRIES[canonical_name(name)].sizes


def num_classes(name: str) -> int:
    """How many classes the dataset's labels take (0 … ``num_classes - 1``)."""
    return _ENTRIES[canonical_name(name)].classes


def is_image(name: str) -> bool:
    """Whether the dataset holds images ``(N, C, H, W)`` (every one but MNIST-1D's sequences)."""
    return len(example_shape(name)) == 3


def load(name: str, data_dir: Optional[PathLike] = None, subset: Optional[int] = None, seed: int = 0,
         device: Union[str, torch.device] = "cpu", download: bool = True) -> Dataset:
    """Load dataset ``name`` (see :func:`available`) onto ``device``.

    Args:
        name: ``"fashion-mnist"``, ``"mnist1d"``, ``"digits"``, ``"synthetic"``, ``"cifar10"`` or ``"cifar100"``.
        data_dir: a directory searched first for dataset files.
        subset: keep a seeded, class-balanced subset of this many training examples (test set intact).
        seed: seed of the subset.
        device: where the tensors live.
        download: allow downloading Fashion-MNIST or a CIFAR archive when no copy is found.
    """
    key = canonical_name(name)
    entry = _ENTRIES[key]
    try:
        arrays, source = entry.read(data_dir, download)
    except DatasetNotFoundError:
        raise   # it names the directory already
    except UserError as error:   # a damaged copy: say which setting pointed at it
        explicit = explicit_data_dir(data_dir)
        if explicit is None or entry.locate is None or str(error).startswith(explicit[1]):
            raise
        raise UserError(f"{explicit[1]} {explicit[0]}: {error}") from error
    train_x = torch.from_numpy(np.ascontiguousarray(arrays["train_x"])).float()
    test_x = torch.from_numpy(np.ascontiguousarray(arrays["test_x"])).float()
    train_y = torch.from_numpy(np.asarray(arrays["train_y"]).astype(np.int64))
    test_y = torch.from_numpy(np.asarray(arrays["test_y"]).astype(np.int64))
    if subset is not None:
        idx = balanced_subset(train_y, int(subset), entry.classes, seed)
        train_x, train_y = train_x[idx], train_y[idx]
    # normalize with the statistics of the (full) training images, per channel
    dims = [0] + list(range(2, train_x.dim()))
    full_x = torch.from_numpy(np.ascontiguousarray(arrays["train_x"])).float()
    mean, std = full_x.mean(dims, keepdim=True)[:1], full_x.std(dims, keepdim=True)[:1]
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    ds = Dataset(key, train_x, train_y, test_x, test_y, entry.classes, train_x.shape[1], source, entry.augment,
                 entry.crop_padding)
    return ds.to(device)


def check_data_dir(names: Iterable[str], data_dir: Optional[PathLike] = None) -> None:
    """Read and verify, before any work starts, each dataset of ``names`` that comes from files, in the
    directory named explicitly: ``data_dir`` (``--data-dir``) or else ``$BNLAB_DATA``.

    In ``data_dir`` every such dataset must be present and intact. ``$BNLAB_DATA`` is also the cache, so a
    copy missing there is left to be downloaded on first use as usual, but a copy that is there must be
    intact. Nothing happens without an explicit directory. Raises :class:`UserError` naming the setting,
    the directory and the file (a missing, truncated or corrupt one), so that a study refuses up front
    instead of failing every run.
    """
    explicit = explicit_data_dir(data_dir)
    if explicit is None:
        return
    for name in names:
        if not from_files(name):
            continue
        if explicit[1] == "$BNLAB_DATA" and locate(name, data_dir) is None:
            continue   # not there yet: downloaded into the cache when first loaded
        load(name, data_dir=data_dir, download=False)
