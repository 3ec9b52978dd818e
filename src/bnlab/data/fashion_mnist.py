"""Fashion-MNIST, read from the four IDX files (gzip or raw) and checked against published sums.

Xiao, Rasul and Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", https://arxiv.org/abs/1708.07747. 60k training and 10k test 28×28 grey images, 10 classes.

The files are looked for as :mod:`bnlab.data.dirs` says, in each root directly, in ``fashion-mnist/`` or in
torchvision's ``FashionMNIST/raw/``; without an explicit directory, Debian's ``/usr/share/datasets/fashion-mnist/``
(package ``dataset-fashion-mnist``) comes after the user cache. A directory named explicitly must hold all
four files, and a missing one is an error naming the directory and the file. Otherwise the files are
downloaded from the official address into ``<cache>/fashion-mnist/`` with their published MD5 checked. Every
copy's decompressed content is checked against SHA-256 sums, so a corrupt file is named rather than trained on.

Example::

    >>> from bnlab.data import fashion_mnist
    >>> arrays, source = fashion_mnist.load_arrays()     # uint8 (N, 1, 28, 28) images, uint8 labels
    >>> arrays["test_x"].shape
    (10000, 1, 28, 28)

:func:`bnlab.data.load` (``"fashion-mnist"``) turns these into normalized tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np

from bnlab.data import dirs
from bnlab.data.dirs import DatasetNotFoundError, PathLike, cache_path, explicit_data_dir, within
from bnlab.errors import UserError

__all__ = ["URL", "DEBIAN_DIR", "CACHE_FOLDER", "SUBDIRS", "FILES", "read_idx", "find_file", "search_dirs",
           "locate", "download_files", "load_arrays"]

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_FOLDER = "fashion-mnist"                          # <cache>/fashion-mnist: where downloads go
SUBDIRS = (CACHE_FOLDER, "FashionMNIST/raw", "")        # where the files may lie in a root (torchvision's too)

# name -> (MD5 of the official .gz, published in github.com/zalandoresearch/fashion-mnist; SHA-256 of the
# decompressed IDX content, identical in every faithful copy whatever its compression)
FILES = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe",
                                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79",
                               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310",
                               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return ("get Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download "
                f"the four files from {URL} into {cache_path(CACHE_FOLDER)}, or point "
                "--data-dir / $BNLAB_DATA at a directory holding them")
    return f"see `bnlab datasets` for where {name} is looked for"


# --------------------------------------------------------------------------------------------------
# IDX files (http://yann.lecun.com/exdb/mnist/, "file formats")
# --------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_TYPE_NAMES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "big-endian int16", 0x0C: "big-endian int32",
                   0x0D: "big-endian float32", 0x0E: "big-endian float64"}
FASHION_TYPE_CODE = 0x08   # every Fashion-MNIST file holds unsigned bytes (pixels 0-255, labels 0-9)


def _type_name(code: int) -> str:
    return f"0x{code:02x} ({_IDX_TYPE_NAMES.get(code, 'not an IDX type')})"


def read_idx(path: PathLike, expected_sha256: Optional[str] = None, dataset: str = "fashion-mnist",
             type_code: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a NumPy array.

    The header is two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
    int32 sizes; the data follow. Raises ``ValueError`` naming the file for a wrong magic number, a type
    code other than ``type_code`` (when given), a truncated file or a checksum mismatch.
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
    if len(raw) >= 4 and raw[0] == 0 and raw[1] == 0 and type_code is not None and raw[2] != type_code:
        # checked before the size: a changed type byte changes the size the header implies
        raise UserError(f"{path}: wrong IDX type byte (offset 2): {_type_name(raw[2])}, expected "
                         f"{_type_name(type_code)}; the file is corrupt or not a {dataset} file. Delete it and "
                         f"{_how_to_get(dataset)}")
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
        fits = [code for code, other in _IDX_DTYPES.items()
                if header + math.prod(shape) * np.dtype(other).itemsize == len(raw)]
        hint = (f" (the size fits type byte {_type_name(fits[0])}: the type byte {_type_name(raw[2])} may be what "
                f"is damaged)" if fits else "")
        raise UserError(f"{path}: {'truncated' if len(raw) < expected else 'trailing data'}: header says shape "
                         f"{shape} ({expected} bytes), file holds {len(raw)} bytes{hint}. {_how_to_get(dataset)}")
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise UserError(f"{path}: checksum mismatch (SHA-256 of the IDX content {digest[:16]}…, expected "
                             f"{expected_sha256[:16]}…); the file is corrupt. Delete it and {_how_to_get(dataset)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------------
# where the files live
# --------------------------------------------------------------------------------------------------

def find_file(directory: Path, stem: str) -> Optional[Path]:
    """``directory/stem.gz`` or else ``directory/stem``, whichever exists first; ``None`` for neither."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def search_dirs(data_dir: Optional[PathLike] = None) -> list[Path]:
    """The directories searched for the four files, in order (only ``data_dir``'s, or else ``$BNLAB_DATA``'s,
    when one is given)."""
    return dirs.search_dirs(data_dir, SUBDIRS, system=[DEBIAN_DIR])


def locate(data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The first directory of :func:`search_dirs` holding all four files, or ``None``."""
    for directory in search_dirs(data_dir):
        if all(find_file(directory, stem) for stem in FILES):
            return directory
    return None


def _missing_in_explicit_dir(root: Path, named_by: str) -> DatasetNotFoundError:
    """The error for an explicit directory without all four files: which directory, which file."""
    if not root.is_dir():
        return DatasetNotFoundError(f"{named_by} {root}: no such directory; {_how_to_get('fashion-mnist')}")
    # the layout holding most of the files is the one the user meant
    best = max(within(root, SUBDIRS), key=lambda d: sum(find_file(d, stem) is not None for stem in FILES))
    missing = [stem for stem in FILES if find_file(best, stem) is None]
    return DatasetNotFoundError(
        f"{named_by} {root}: fashion-mnist file {missing[0]}(.gz) is missing from {best}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + f"; {_how_to_get('fashion-mnist')}")


def download_files(target: Optional[PathLike] = None) -> Path:
    """Download the four ``.gz`` files missing from ``target`` (default ``<cache>/fashion-mnist``) and return it.

    Each file's MD5 is checked before it is saved, under a temporary name then renamed: never half a file.
    Raises ``OSError`` if the server cannot be reached, ``UserError`` if what arrives has the wrong MD5.
    """
    target = Path(target) if target is not None else cache_path(CACHE_FOLDER)
    target.mkdir(parents=True, exist_ok=True)
    for stem, (md5, _) in FILES.items():
        dest = target / f"{stem}.gz"
        if dest.is_file():
            continue
        url = URL + dest.name
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


# --------------------------------------------------------------------------------------------------
# reading the files
# --------------------------------------------------------------------------------------------------

_PARSED: dict = {}  # ((path, size, mtime) of each file) -> arrays: verify and parse once per process


def load_arrays(data_dir: Optional[PathLike] = None, download: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """Find (or download) the four files and read them: ``(arrays, the directory holding them)``.

    ``arrays`` holds ``train_x``/``test_x`` uint8 ``(N, 1, 28, 28)`` and ``train_y``/``test_y`` uint8 ``(N,)``.
    Raises :class:`bnlab.data.DatasetNotFoundError` with where it looked and how to get the files when there
    is no copy and none can be downloaded.
    """
    directory = locate(data_dir)
    explicit = explicit_data_dir(data_dir)
    if directory is None and explicit is not None and (explicit[1] == "--data-dir" or not download):
        raise _missing_in_explicit_dir(*explicit)  # $BNLAB_DATA is also the cache: downloads go there
    if directory is None:
        looked = ", ".join(map(str, search_dirs(data_dir)))
        if not download:
            raise DatasetNotFoundError(f"fashion-mnist: not found in {looked}; {_how_to_get('fashion-mnist')}")
        try:
            directory = download_files(cache_path(CACHE_FOLDER))
        except OSError as err:
            raise DatasetNotFoundError(
                f"fashion-mnist: not found in {looked} and the download from {URL} failed ({err}); "
                f"{_how_to_get('fashion-mnist')}") from err
    files = [find_file(directory, stem) for stem in FILES]
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _PARSED:  # parse and verify once per process; a changed file is read again
        _PARSED.clear()
        _PARSED[key] = {stem: read_idx(f, sha, type_code=FASHION_TYPE_CODE)
                        for f, (stem, (_, sha)) in zip(files, FILES.items())}
    arrays = _PARSED[key]
    return {"train_x": arrays["train-images-idx3-ubyte"][:, None], "train_y": arrays["train-labels-idx1-ubyte"],
            "test_x": arrays["t10k-images-idx3-ubyte"][:, None], "test_y": arrays["t10k-labels-idx1-ubyte"]}, str(directory)
