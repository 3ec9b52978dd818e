"""Moved to :mod:`bnlab.tools.amp`; this name works until bnlab 0.3 (it warns)."""
from bnlab._moved import alias

alias(__name__, "bnlab.tools.amp")
