"""Moved: the layers to :mod:`bnlab.nn.variants`, the frozen-statistics tools to :mod:`bnlab.tools.freeze`.
This name re-exports both until bnlab 0.3 (it warns)."""
import warnings

from bnlab._moved import REMOVED_IN
from bnlab.nn.variants import *  # noqa: F401,F403
from bnlab.nn.variants import __all__ as _layers
from bnlab.tools.freeze import *  # noqa: F401,F403
from bnlab.tools.freeze import __all__ as _tools

warnings.warn(f"bnlab.variants is now bnlab.nn.variants (layers) and bnlab.tools.freeze (frozen statistics); "
              f"the old name works until bnlab {REMOVED_IN}", FutureWarning, stacklevel=2)
__all__ = list(_layers) + list(_tools)
