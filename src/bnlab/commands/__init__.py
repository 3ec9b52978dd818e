"""Subcommands of the `bnlab` CLI, one module each (see :mod:`bnlab.cli`)."""
