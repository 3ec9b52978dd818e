"""CIFAR-10 and CIFAR-100, read straight from the official python archives.

Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images",
https://www.cs.toronto.edu/~kriz/cifar.html. 50k training and 10k test 32×32 colour images;
CIFAR-100's images carry a fine label (100 classes, used here) and a coarse one (20 superclasses).

The archive (``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``) is looked for where
:mod:`bnlab.data.dirs` says (``data_dir``, else ``$BNLAB_DATA``, else the user cache
``$XDG_CACHE_HOME/bnlab``, default ``~/.cache/bnlab``), in each directly and in a ``cifar/`` subdirectory;
otherwise it is downloaded into ``<cache>/cifar/`` from ``https://www.cs.toronto.edu/~kriz/`` (or
``$BNLAB_CIFAR_URL``). Every copy's MD5 is checked against the published sum before anything is read, so a
corrupt or substituted archive is named rather than trained on.

Nothing is extracted to disk: the batches are read from the tar stream. Each batch is a Python 2 pickle, a
``dict`` with ``b"data"`` (uint8, ``(N, 3072)``: the red, then green, then blue 32×32 plane of each image, row
by row) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). Pickles can run code, so they are read
by an unpickler that builds only dicts, lists, strings, numbers and NumPy arrays.

Example::

    >>> from bnlab.data import cifar
    >>> arrays, source = cifar.load_arrays("cifar10")   # uint8 (N, 3, 32, 32) images, int64 labels
    >>> arrays["train_x"].shape
    (50000, 3, 32, 32)

:func:`bnlab.data.load` (``"cifar10"``, ``"cifar100"``) turns these into normalized tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from bnlab.data import dirs
from bnlab.data.dirs import DatasetNotFoundError, PathLike, cache_path, explicit_data_dir
from bnlab.errors import UserError

__all__ = ["Archive", "ARCHIVES", "DEFAULT_URL", "CROP_PADDING", "CACHE_FOLDER", "SUBDIRS", "base_url",
           "search_dirs", "locate", "download_archive", "read_archive", "load_arrays"]

DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/"
CROP_PADDING = 4            # the standard CIFAR augmentation: 4 px zero padding, random 32×32 crop, flip
IMAGE_SHAPE = (3, 32, 32)   # channels (R, G, B), rows, columns
CACHE_FOLDER = "cifar"      # <cache>/cifar: where downloads go
SUBDIRS = ("", CACHE_FOLDER)  # where an archive may lie in a root
_MAX_MEMBER_BYTES = 256 << 20  # the largest official member (CIFAR-100 train) is about 155 MB


@dataclass(frozen=True)
class Archive:
    """One official archive: its file name, published MD5 and the members holding each split."""

    filename: str
    md5: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int


# MD5 sums published on https://www.cs.toronto.edu/~kriz/cifar.html
ARCHIVES = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                       tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                       ("cifar-10-batches-py/test_batch",), b"labels", 10),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                        ("cifar-100-python/train",), ("cifar-100-python/test",), b"fine_labels", 100),
}


def _archive(name: str) -> Archive:
    if name not in ARCHIVES:
        raise UserError(f"cifar: unknown dataset {name!r}: expected one of {', '.join(ARCHIVES)}")
    return ARCHIVES[name]


def _how_to_get(name: str) -> str:
    archive = _archive(name)
    return (f"download {DEFAULT_URL}{archive.filename} (MD5 {archive.md5}) and put it in "
            f"{cache_path(CACHE_FOLDER)}, or point --data-dir / $BNLAB_DATA at the directory holding it")


# --------------------------------------------------------------------------------------------------
# where the archives live
# --------------------------------------------------------------------------------------------------

def base_url(url: Optional[str] = None) -> str:
    """Where archives are downloaded from: ``url``, else ``$BNLAB_CIFAR_URL`` (a mirror), else the official
    address; always ending in ``/``."""
    url = url or os.environ.get("BNLAB_CIFAR_URL") or DEFAULT_URL
    return url if url.endswith("/") else url + "/"


def search_dirs(data_dir: Optional[PathLike] = None) -> list[Path]:
    """The directories searched for an archive, in order: only ``data_dir``'s (or else ``$BNLAB_DATA``'s)
    when one is given, as for every dataset (:func:`bnlab.data.dirs.search_dirs`)."""
    return dirs.search_dirs(data_dir, SUBDIRS)


def locate(name: str, data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The first copy of ``name``'s archive (``"cifar10"`` or ``"cifar100"``), or ``None``."""
    filename = _archive(name).filename
    for directory in search_dirs(data_dir):
        if (directory / filename).is_file():
            return directory / filename
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_archive(name: str, target: Optional[PathLike] = None, url: Optional[str] = None) -> Path:
    """Download ``name``'s archive into ``target`` (default ``<cache>/cifar``) and return its path.

    The file is written under a temporary name, its MD5 checked, then renamed: a failed or interrupted
    download leaves nothing behind. Processes downloading at once (ranks of one job) take turns, and the
    later ones find the finished file. Raises ``OSError`` if the server cannot be reached, ``UserError`` if
    what arrives has the wrong MD5.
    """
    from filelock import FileLock

    archive = _archive(name)
    target = Path(target) if target is not None else cache_path(CACHE_FOLDER)
    target.mkdir(parents=True, exist_ok=True)
    dest = target / archive.filename
    source = base_url(url) + archive.filename
    with FileLock(str(dest) + ".lock"):
        if dest.is_file():
            return dest
        digest = hashlib.md5()
        with tempfile.NamedTemporaryFile(dir=target, prefix=f".{archive.filename}.", delete=False) as tmp:
            try:
                with urllib.request.urlopen(source, timeout=60) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        tmp.write(chunk)
            except BaseException:
                os.unlink(tmp.name)
                raise
        if digest.hexdigest() != archive.md5:
            os.unlink(tmp.name)
            raise UserError(f"{source}: checksum mismatch (MD5 {digest.hexdigest()}, expected {archive.md5}); "
                            f"not saved. {_how_to_get(name)}")
        os.replace(tmp.name, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# reading an archive
# --------------------------------------------------------------------------------------------------

class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings, numbers and NumPy arrays, and refuses every other global
    (a pickle can name any importable callable and have it called)."""

    # a NumPy array pickles as _reconstruct(ndarray, (0,), b"b") + ndarray.__setstate__, its dtype as
    # dtype(str, 0, 1) + dtype.__setstate__; files from NumPy 1 name numpy.core, NumPy 2 numpy._core
    _reconstruct = np.zeros(0).__reduce__()[0]
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (a CIFAR batch holds only "
                                         "dicts, lists and NumPy arrays)") from None


def _parse_batch(raw: bytes, where: str, archive: Archive) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` from one pickled batch."""
    try:
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a malformed pickle can raise almost anything
        raise UserError(f"{where}: not a CIFAR batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or archive.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(f"{where}: not a CIFAR batch: expected a dict with keys b'data' and "
                        f"{archive.label_key!r}, got {keys}")
    images = batch[b"data"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == np.prod(IMAGE_SHAPE)):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise UserError(f"{where}: b'data' must be a uint8 array of shape (N, 3072), got {got}")
    labels = batch[archive.label_key]
    if not (isinstance(labels, (list, np.ndarray))
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)):
        raise UserError(f"{where}: {archive.label_key!r} must be a list of ints")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(images):
        raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < archive.num_classes):
        raise UserError(f"{where}: labels must lie in [0, {archive.num_classes}), got {labels.min()}..{labels.max()}")
    return images.reshape(-1, *IMAGE_SHAPE), labels  # (N, 3072) -> (N, C, H, W): R, G, B planes, row-major


def read_archive(path: PathLike, name: str, md5: Optional[str] = None) -> dict[str, np.ndarray]:
    """Check the archive's MD5 (``md5``, default the published one for ``name``), then read its batches:
    ``{"train_x", "test_x"}`` uint8 ``(N, 3, 32, 32)``, ``{"train_y", "test_y"}`` int64 ``(N,)``.

    Raises ``UserError`` naming the file for a checksum mismatch, a truncated or corrupt archive, a missing
    member or a batch that is not what CIFAR's are.
    """
    path, archive = Path(path), _archive(name)
    expected = md5 or archive.md5
    digest = _md5(path)
    if digest != expected:
        raise UserError(f"{path}: checksum mismatch (MD5 {digest}, expected {expected}); the archive is corrupt "
                        f"or not the official {name}. Delete it and {_how_to_get(name)}")
    wanted = set(archive.train + archive.test)
    raw: dict[str, bytes] = {}
    try:  # one pass over the stream, nothing written to disk
        with gzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    if member.size > _MAX_MEMBER_BYTES:
                        raise UserError(f"{path}: member {member.name} is {member.size} bytes, more than any "
                                        f"official batch; {_how_to_get(name)}")
                    raw[member.name] = tar.extractfile(member).read()
            while stream.read(1 << 20):  # to the end: tar stops quietly at a cut, gzip's length and CRC do not
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise UserError(f"{path}: cannot read the archive ({type(err).__name__}: {err}); it is truncated or "
                        f"corrupt. Delete it and {_how_to_get(name)}") from err
    missing = sorted(wanted - set(raw))
    if missing:
        raise UserError(f"{path}: not the {name} python archive: missing {', '.join(missing)}. {_how_to_get(name)}")
    out = {}
    for split, members in (("train", archive.train), ("test", archive.test)):
        parts = [_parse_batch(raw.pop(m), f"{path}:{m}", archive) for m in members]
        out[f"{split}_x"] = np.concatenate([x for x, _ in parts])
        out[f"{split}_y"] = np.concatenate([y for _, y in parts])
    return out


_PARSED: dict = {}  # name -> ((path, size, mtime), arrays): verify and parse once per process


def load_arrays(name: str, data_dir: Optional[PathLike] = None, download: bool = True
                ) -> tuple[dict[str, np.ndarray], str]:
    """Find (or download) ``name``'s archive and read it: ``(arrays, path of the archive)``.

    ``arrays`` as :func:`read_archive` returns them. Raises :class:`bnlab.data.DatasetNotFoundError` with
    where it looked and how to get the archive when there is no copy and none can be downloaded.
    """
    path = locate(name, data_dir)
    explicit = explicit_data_dir(data_dir)
    if path is None:
        looked = ", ".join(map(str, search_dirs(data_dir)))
        # an explicit directory is authoritative: no other copy; $BNLAB_DATA is also the cache (downloads go
        # there), --data-dir never gets a download
        if explicit is not None and explicit[1] == "--data-dir":
            missing = "" if explicit[0].is_dir() else " (no such directory)"
            raise DatasetNotFoundError(f"--data-dir {explicit[0]}{missing}: {name}: {_archive(name).filename} "
                                            f"not found in {looked}; {_how_to_get(name)}")
        if not download:
            raise DatasetNotFoundError(f"{name}: {_archive(name).filename} not found in {looked}; "
                                            f"{_how_to_get(name)}")
        try:
            path = download_archive(name)
        except OSError as err:  # unreachable server, HTTP errors (URLError is an OSError)
            raise DatasetNotFoundError(f"{name}: {_archive(name).filename} not found in {looked} and the "
                                            f"download from {base_url()} failed ({err}); {_how_to_get(name)}") from err
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if _PARSED.get(name, (None,))[0] != key:  # a changed file is read (and checked) again
        _PARSED.pop(name, None)
        _PARSED[name] = (key, read_archive(path, name))
    return _PARSED[name][1], str(path)
