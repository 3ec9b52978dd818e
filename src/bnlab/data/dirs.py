"""Where dataset files live: the one place that knows the cache, an explicit data directory and the search order.

Every dataset read from files is looked for in this order:

1. ``data_dir`` (``--data-dir``), when given;
2. else ``$BNLAB_DATA``, when set;
3. else the user cache, ``$XDG_CACHE_HOME/bnlab`` (default ``~/.cache/bnlab``), then the directories a
   system package installs (Debian's ``/usr/share/datasets/...``).

A directory named explicitly (1 or 2) is authoritative: nothing else is searched. ``$BNLAB_DATA`` is also
the cache (:func:`cache_dir`), so a missing copy is downloaded into it; ``--data-dir`` never is. Each source
keeps its files in one folder of the cache (:func:`cache_path`) and may accept other layouts inside a root
(:func:`search_dirs`' ``subdirs``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from bnlab.errors import UserError

__all__ = ["DatasetNotFoundError", "PathLike", "cache_dir", "cache_path", "explicit_data_dir", "within",
           "search_dirs"]

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


def cache_path(source: str) -> Path:
    """The folder of the cache where ``source`` (``"fashion-mnist"``, ``"cifar"``, ``"mnist1d"``) is kept and
    downloaded to: ``cache_dir() / source``."""
    return cache_dir() / source


def explicit_data_dir(data_dir: Optional[PathLike] = None) -> Optional[tuple[Path, str]]:
    """(directory, what named it) for ``data_dir`` or else ``$BNLAB_DATA``; ``None`` when neither is set."""
    if data_dir:
        return Path(data_dir).expanduser(), "--data-dir"
    if os.environ.get("BNLAB_DATA"):
        return Path(os.environ["BNLAB_DATA"]).expanduser(), "$BNLAB_DATA"
    return None


def within(root: Path, subdirs: Sequence[str]) -> list[Path]:
    """The directories ``subdirs`` of ``root``, in order (``""`` is ``root`` itself), each once."""
    dirs: list[Path] = []
    for sub in subdirs:
        if root / sub not in dirs:
            dirs.append(root / sub)
    return dirs


def search_dirs(data_dir: Optional[PathLike], subdirs: Sequence[str], system: Sequence[Path] = ()) -> list[Path]:
    """The directories searched for a source's files, in the order of the module docstring.

    Args:
        data_dir: a directory named by the caller (``--data-dir``); with it, or with ``$BNLAB_DATA``, only
            that root is searched.
        subdirs: where the files may lie inside a root, in order (``""`` for the root itself).
        system: directories a system package installs the files in, searched after the user cache.
    """
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:
        return within(explicit[0], subdirs)
    return within(cache_dir(), subdirs) + list(system)
