"""Where dataset files live: the cache directory, an explicit data directory, and the error for a missing copy.

Shared by :mod:`bnlab.data` and :mod:`bnlab.cifar` (so neither imports the other for these).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from bnlab.errors import UserError

__all__ = ["DatasetNotFoundError", "cache_dir", "explicit_data_dir"]

PathLike = Union[str, os.PathLike]


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded, or a directory named explicitly
    (``data_dir``, ``$BNLAB_DATA``) lacks it; the message names the directory and file and says how to
    get it."""


def cache_dir() -> Path:
    """``$BNLAB_DATA``, else ``$XDG_CACHE_HOME/bnlab``, else ``~/.cache/bnlab``."""
    if os.environ.get("BNLAB_DATA"):
        return Path(os.environ["BNLAB_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnlab"


def explicit_data_dir(data_dir: Optional[PathLike] = None) -> Optional[tuple[Path, str]]:
    """(directory, what named it) for ``data_dir`` or else ``$BNLAB_DATA``; ``None`` when neither is set."""
    if data_dir:
        return Path(data_dir).expanduser(), "--data-dir"
    if os.environ.get("BNLAB_DATA"):
        return Path(os.environ["BNLAB_DATA"]).expanduser(), "$BNLAB_DATA"
    return None
