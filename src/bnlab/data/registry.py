"""Datasets as whole tensors on the training device, and a loader that never leaves that device.

``load(name)`` returns a :class:`Dataset` whose ``train_x``/``test_x`` are float32 tensors normalized with
the training set's per-channel mean and standard deviation, and whose labels are int64:

=================  ===========================  ==================================================
``fashion-mnist``  60k/10k, (1, 28, 28), 10      Xiao et al. 2017, https://arxiv.org/abs/1708.07747
``mnist1d``        4k/1k, (1, 40), 10            Greydanus 2020, https://arxiv.org/abs/2011.14439
``digits``         1437/360, (1, 8, 8), 10       scikit-learn's copy of the UCI handwritten digits
``synthetic``      512/256, (1, 8, 8), 4         class templates plus noise, for tests
``cifar10``        50k/10k, (3, 32, 32), 10      Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html
``cifar100``       50k/10k, (3, 32, 32), 100     the same, fine labels (:mod:`bnlab.cifar` reads both)
=================  ===========================  ==================================================

Fashion-MNIST is read from IDX files (gzip or raw). A directory named explicitly, ``data_dir`` or else
``$BNLAB_DATA``, is authoritative: no other copy is used. The files must be in ``data_dir`` (in it, or
in its ``fashion-mnist/`` or ``FashionMNIST/raw/``), and a missing one is an error naming the directory
and the file; ``$BNLAB_DATA`` is also the cache, so there a missing copy is downloaded unless
``download=False``. Without either, the files are looked for in the user cache
(``$XDG_CACHE_HOME/bnlab``, default ``~/.cache/bnlab``) and in Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``), and otherwise downloaded
from the official address into the cache with its published MD5 checked. Every copy's decompressed
content is checked against SHA-256 sums, so a corrupt file is named rather than trained on.

:class:`Loader` shuffles, batches and augments (random crop with zero padding, horizontal flip) with
tensor operations on the data's device: no per-sample Python, no worker processes.

Example::

    >>> from bnlab import data
    >>> ds = data.load("fashion-mnist", subset=5000)       # seeded, class-balanced 5k training subset
    >>> for x, y in data.Loader(ds.train_x, ds.train_y, batch_size=256, augment=ds.augment):
    ...     pass
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from bnlab.datadirs import DatasetNotFoundError, cache_dir, explicit_data_dir
from bnlab.errors import UserError

__all__ = ["Dataset", "Loader", "load", "available", "locate", "read_idx", "cache_dir", "balanced_subset",
           "DatasetNotFoundError", "explicit_data_dir", "split_validation", "canonical_name", "from_files",
           "example_shape", "split_sizes", "is_image", "downsample"]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# the dataset record
# --------------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """A dataset held as tensors (see the module docstring for the fields' meaning)."""

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


# --------------------------------------------------------------------------------------------------
# IDX files (http://yann.lecun.com/exdb/mnist/, "file formats")
# --------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return ("get Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download "
                f"the four files from {FASHION_MNIST_URL} into {cache_dir() / 'fashion-mnist'}, or point "
                "--data-dir / $BNLAB_DATA at a directory holding them")
    return f"see `bnlab datasets` for where {name} is looked for"


def read_idx(path: PathLike, expected_sha256: Optional[str] = None, dataset: str = "fashion-mnist") -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a NumPy array.

    The header is two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
    int32 sizes; the data follow. Raises ``ValueError`` naming the file for a wrong magic number, a
    truncated file or a checksum mismatch.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise DatasetNotFoundError(f"{path}: no such file; {_how_to_get(dataset)}") from err
        raise UserError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt. Delete it and "
                         f"{_how_to_get(dataset)}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected 0000 then a "
                         f"type code 08/09/0b/0c/0d/0e and the number of dimensions). {_how_to_get(dataset)}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header}). {_how_to_get(dataset)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: {'truncated' if len(raw) < expected else 'trailing data'}: header says shape "
                         f"{shape} ({expected} bytes), file holds {len(raw)} bytes. {_how_to_get(dataset)}")
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise UserError(f"{path}: checksum mismatch (SHA-256 of the IDX content {digest[:16]}…, expected "
                             f"{expected_sha256[:16]}…); the file is corrupt. Delete it and {_how_to_get(dataset)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------------
# where data lives
# --------------------------------------------------------------------------------------------------

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# name -> (MD5 of the official .gz, published in github.com/zalandoresearch/fashion-mnist; SHA-256 of the
# decompressed IDX content, identical in every faithful copy whatever its compression)
_FASHION_FILES = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe",
                                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79",
                               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310",
                               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


_FASHION_CACHE: dict = {}


def _layouts(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root]


def _search_dirs(data_dir: Optional[PathLike]) -> list[Path]:
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:
        return _layouts(explicit[0])
    return _layouts(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnlab") + [DEBIAN_FASHION_MNIST]


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def locate(name: str = "fashion-mnist", data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where a dataset read from files is (:func:`from_files`): Fashion-MNIST's directory holding all four
    files, or a CIFAR archive; ``None`` when there is no copy. With ``data_dir`` or ``$BNLAB_DATA`` only that
    directory is searched."""
    key = canonical_name(name)
    if not from_files(key):
        raise ValueError(f"locate: {key} is generated, not read from files")
    if key != "fashion-mnist":
        from bnlab import cifar
        return cifar.locate(key, data_dir)
    for directory in _search_dirs(data_dir):
        if all(_find_file(directory, stem) for stem in _FASHION_FILES):
            return directory
    return None


def _missing_in_explicit_dir(root: Path, named_by: str) -> DatasetNotFoundError:
    """The error for an explicit directory without all four files: which directory, which file."""
    if not root.is_dir():
        return DatasetNotFoundError(f"{named_by} {root}: no such directory; {_how_to_get('fashion-mnist')}")
    # the layout holding most of the files is the one the user meant
    best = max(_layouts(root), key=lambda d: sum(_find_file(d, stem) is not None for stem in _FASHION_FILES))
    missing = [stem for stem in _FASHION_FILES if _find_file(best, stem) is None]
    return DatasetNotFoundError(
        f"{named_by} {root}: fashion-mnist file {missing[0]}(.gz) is missing from {best}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + f"; {_how_to_get('fashion-mnist')}")


def _download_fashion_mnist(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for stem, (md5, _) in _FASHION_FILES.items():
        dest = target / f"{stem}.gz"
        if dest.is_file():
            continue
        url = FASHION_MNIST_URL + dest.name
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
        digest = hashlib.md5(payload).hexdigest()
        if digest != md5:
            raise UserError(f"{url}: checksum mismatch (MD5 {digest}, expected {md5}); not saved. "
                             f"{_how_to_get('fashion-mnist')}")
        with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:  # atomic: never half a file
            tmp.write(payload)
        os.replace(tmp.name, dest)
    return target


def _load_fashion_mnist(data_dir: Optional[PathLike], download: bool) -> tuple[dict, str]:
    directory = locate("fashion-mnist", data_dir)
    explicit = explicit_data_dir(data_dir)
    if directory is None and explicit is not None and (explicit[1] == "--data-dir" or not download):
        raise _missing_in_explicit_dir(*explicit)  # $BNLAB_DATA is also the cache: downloads go there
    if directory is None:
        if not download:
            raise DatasetNotFoundError(f"fashion-mnist: not found in {', '.join(map(str, _search_dirs(data_dir)))}; "
                                       f"{_how_to_get('fashion-mnist')}")
        try:
            directory = _download_fashion_mnist(cache_dir() / "fashion-mnist")
        except OSError as err:
            raise DatasetNotFoundError(
                f"fashion-mnist: not found in {', '.join(map(str, _search_dirs(data_dir)))} and the download from "
                f"{FASHION_MNIST_URL} failed ({err}); {_how_to_get('fashion-mnist')}") from err
    files = [_find_file(directory, stem) for stem in _FASHION_FILES]
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FASHION_CACHE:  # parse and verify once per process; a changed file is read again
        _FASHION_CACHE.clear()
        _FASHION_CACHE[key] = {stem: read_idx(f, sha) for f, (stem, (_, sha)) in zip(files, _FASHION_FILES.items())}
    arrays = _FASHION_CACHE[key]
    return {"train_x": arrays["train-images-idx3-ubyte"][:, None], "train_y": arrays["train-labels-idx1-ubyte"],
            "test_x": arrays["t10k-images-idx3-ubyte"][:, None], "test_y": arrays["t10k-labels-idx1-ubyte"]}, str(directory)


# --------------------------------------------------------------------------------------------------
# generated datasets
# --------------------------------------------------------------------------------------------------

def _load_mnist1d() -> tuple[dict, str]:
    """MNIST-1D from the ``mnist1d`` package's generator with its default arguments (seed 42), cached."""
    path = cache_dir() / "mnist1d" / "mnist1d-seed42.npz"
    if path.is_file():
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        return arrays, str(path)
    from mnist1d.data import get_dataset_args, make_dataset
    made = make_dataset(get_dataset_args())
    arrays = {"train_x": made["x"][:, None], "train_y": made["y"], "test_x": made["x_test"][:, None],
              "test_y": made["y_test"]}
    try:  # the cache is a convenience: a read-only home still gets the data
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, path)
    except OSError:
        pass
    return arrays, "generated by mnist1d (seed 42)"


def _load_digits() -> tuple[dict, str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    train_x, test_x, train_y, test_y = train_test_split(x, digits.target, test_size=360, random_state=0,
                                                        stratify=digits.target)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}, "sklearn.datasets.load_digits"


def _load_synthetic(num_classes: int = 4, train: int = 512, test: int = 256, size: int = 8) -> tuple[dict, str]:
    """Each class a fixed random 8×8 template; examples are the template plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(1234)
    templates = 1.5 * torch.randn(num_classes, 1, size, size, generator=g)
    out = {}
    for split, n in (("train", train), ("test", test)):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        out[f"{split}_x"] = (templates[y] + torch.randn(n, 1, size, size, generator=g)).numpy()
        out[f"{split}_y"] = y.numpy()
    return out, "synthetic (seed 1234)"


class _Entry(NamedTuple):
    make: Optional[Callable[[], tuple[dict, str]]]  # the generator, or None when read from files
    classes: int
    augment: bool             # whether random crops and horizontal flips make sense
    description: str
    shape: tuple[int, ...]    # one example: (C, H, W) for images, (C, L) for sequences
    sizes: tuple[int, int]    # training and test examples


_SPECS = {
    "fashion-mnist": _Entry(None, 10, True, "Fashion-MNIST, 60k/10k 28x28 grey images, 10 classes", (1, 28, 28),
                            (60000, 10000)),
    "mnist1d": _Entry(_load_mnist1d, 10, False, "MNIST-1D, 4k/1k sequences of length 40, 10 classes", (1, 40),
                      (4000, 1000)),
    "digits": _Entry(_load_digits, 10, False, "scikit-learn digits, 1437/360 8x8 images, 10 classes", (1, 8, 8),
                     (1437, 360)),
    "synthetic": _Entry(_load_synthetic, 4, False, "synthetic templates + noise, 512/256 8x8, 4 classes (tests)",
                        (1, 8, 8), (512, 256)),
    "cifar10": _Entry(None, 10, True, "CIFAR-10, 50k/10k 32x32 colour images, 10 classes", (3, 32, 32),
                      (50000, 10000)),
    "cifar100": _Entry(None, 100, True, "CIFAR-100, 50k/10k 32x32 colour images, 100 fine classes", (3, 32, 32),
                       (50000, 10000)),
}


_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def canonical_name(name: str) -> str:
    """The registry's name for ``name`` (case, ``_``/``-`` and the aliases ``fashionmnist``, ``cifar-10``,
    ``cifar-100`` forgiven); raises :class:`UserError` for a dataset bnlab does not know."""
    key = str(name).lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(_SPECS)}")
    return key


def from_files(name: str) -> bool:
    """Whether the dataset is read from files (and may be downloaded) rather than generated."""
    return _SPECS[canonical_name(name)].make is None


def available() -> dict[str, str]:
    """``{name: description}`` of the datasets :func:`load` knows."""
    return {name: spec.description for name, spec in _SPECS.items()}


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


def example_shape(name: str) -> tuple[int, ...]:
    """One example's shape as :func:`load` returns it: ``(C, H, W)`` for images, ``(C, L)`` for sequences."""
    return _SPECS[canonical_name(name)].shape


def split_sizes(name: str) -> tuple[int, int]:
    """How many training and test examples :func:`load` returns (no subset)."""
    return _SPECS[canonical_name(name)].sizes


def is_image(name: str) -> bool:
    """Whether the dataset holds images ``(N, C, H, W)`` (every one but MNIST-1D's sequences)."""
    return len(example_shape(name)) == 3


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
    make, num_classes, augment = _SPECS[key][:3]
    crop_padding = 2  # pixels of zero padding around the random crop
    if make is not None:
        arrays, source = make()
    elif key == "fashion-mnist":
        arrays, source = _load_fashion_mnist(data_dir, download)
    else:
        from bnlab import cifar  # imported here: it uses this module's cache_dir and DatasetNotFoundError
        arrays, source = cifar.load_arrays(key, data_dir, download)
        crop_padding = cifar.CROP_PADDING
    train_x = torch.from_numpy(np.ascontiguousarray(arrays["train_x"])).float()
    test_x = torch.from_numpy(np.ascontiguousarray(arrays["test_x"])).float()
    train_y = torch.from_numpy(np.asarray(arrays["train_y"]).astype(np.int64))
    test_y = torch.from_numpy(np.asarray(arrays["test_y"]).astype(np.int64))
    if subset is not None:
        idx = balanced_subset(train_y, int(subset), num_classes, seed)
        train_x, train_y = train_x[idx], train_y[idx]
    # normalize with the statistics of the (full) training images, per channel
    dims = [0] + list(range(2, train_x.dim()))
    full_x = torch.from_numpy(np.ascontiguousarray(arrays["train_x"])).float()
    mean, std = full_x.mean(dims, keepdim=True)[:1], full_x.std(dims, keepdim=True)[:1]
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    ds = Dataset(key, train_x, train_y, test_x, test_y, num_classes, train_x.shape[1], source, augment, crop_padding)
    return ds.to(device)


# --------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------

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
