"""Moved to :mod:`bnlab.tools.doctor`; this name works until bnlab 0.3 (it warns)."""
from bnlab._moved import alias

alias(__name__, "bnlab.tools.doctor")
