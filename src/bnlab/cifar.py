"""Moved to :mod:`bnlab.data.cifar`; this name works until bnlab 0.3."""
from bnlab._moved import alias
alias(__name__, "bnlab.data.cifar")
