"""bnlab: batch normalization from first principles, in residual networks, measured."""

__version__ = "0.1.0"
