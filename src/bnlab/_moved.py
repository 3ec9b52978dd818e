"""One-release aliases for modules that moved: the old name warns once and is the new module."""
from __future__ import annotations
import importlib, sys, warnings
REMOVED_IN = "0.3"
def alias(old: str, new: str):
    warnings.warn(f"{old} is now {new}; the old name works until bnlab {REMOVED_IN}", FutureWarning,
                  stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
