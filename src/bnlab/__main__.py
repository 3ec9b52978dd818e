"""``python -m bnlab``: the same as the ``bnlab`` command (see :mod:`bnlab.cli`)."""

from bnlab.cli import console_main

if __name__ == "__main__":
    console_main()
