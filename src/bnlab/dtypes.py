"""The one table of dtypes batch norm accepts, and the dtype its statistics are reduced in.

Used by :mod:`bnlab.functional` (the PyTorch implementation) and :mod:`bnlab.kernels` (the Triton kernels),
which must agree: float64 stays float64; float32, float16 and bfloat16 are reduced (accumulated) in float32.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "compute_dtype"]

#: storage dtypes of inputs, parameters and statistics
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(x: Union[Tensor, torch.dtype]) -> torch.dtype:
    """The dtype statistics of ``x`` (a tensor or a dtype) are reduced in: float64 stays float64;
    float32, float16 and bfloat16 are reduced in float32."""
    dtype = x.dtype if isinstance(x, Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32
