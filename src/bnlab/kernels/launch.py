"""Launchers for :mod:`bnlab.kernels.bn_kernels`: layout, grid and block sizes, output allocation.

Each public launcher takes and returns plain tensors (no autograd); :mod:`bnlab.kernels.ops` wraps them.

Grid. A program owns ``block_c`` channels and a run of tiles of ``block_s`` positions; a channel block's
tiles are split across ``splits`` programs so that there are a few programs per streaming multiprocessor
whether the tensor has many channels and small images (256×14×14) or few channels and large ones
(16×32×32 with N = 512). Tensors whose channels fit in registers (``count`` values per channel, small) take
the single-read path: one kernel per direction, x read once.

Poisoning. With ``BNLAB_POISON_OUTPUTS=1`` in the environment (or ``launch.POISON = True``) every buffer
the kernels write is filled with NaN first, so an element a kernel forgot to write shows up in tests.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from bnlab.dtypes import compute_dtype
from bnlab.kernels import bn_kernels as K

#: fill every kernel output with NaN before the launch (tests: unwritten elements then fail)
POISON = os.environ.get("BNLAB_POISON_OUTPUTS", "") == "1"

#: whether the kernels were compiled for the interpreter (they then run on CPU tensors)
INTERPRETED = type(K._normalize_kernel).__name__ == "InterpretedFunction"

# single-read path: at most this many values of a channel block in one program's registers (with 8
# warps, 16 per thread: the backward then needs ≤ 175 registers and does not spill on sm_90)
_SMALL_TILE = 4096
# elements per tile of the tiled kernels
_TILE = 4096


def _alloc(shape, dtype, device) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def _alloc_like(ref: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    out = torch.empty_like(ref, dtype=dtype)  # keeps ref's strides (ref is dense)
    return out.fill_(float("nan")) if POISON else out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of 2 ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# --------------------------------------------------------------------------------------------------
# layout: a (B, C, S) view by strides
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """``x`` as ``(B, C, S)`` with strides; ``channels_last`` when channels are the fastest axis."""
    B: int
    C: int
    S: int
    stride_b: int
    stride_c: int
    stride_s: int

    @property
    def channels_last(self) -> bool:
        return self.stride_c == 1 and self.C > 1

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.B * self.S


def layout_of(x: Tensor) -> Optional[Layout]:
    """The ``(B, C, S)`` view of ``x`` without a copy, or ``None`` when its strides fit neither layout."""
    return _layout_from(tuple(x.shape), x.stride())


def _dense_in_order(shape: tuple[int, ...], stride: tuple[int, ...], order) -> bool:
    """Whether dims ``order`` (innermost first) are packed without gaps; size-1 dims have any stride."""
    expected = 1
    for d in order:
        if shape[d] != 1 and stride[d] != expected:
            return False
        expected *= shape[d]
    return True


@functools.lru_cache(maxsize=4096)
def _layout_from(shape: tuple[int, ...], stride: tuple[int, ...]) -> Optional[Layout]:
    # cached: the launchers run once per layer per step, and this is pure Python on two tuples
    N, C = shape[0], shape[1]
    spatial = math.prod(shape[2:])
    ndim = len(shape)
    contiguous = _dense_in_order(shape, stride, range(ndim - 1, -1, -1))
    if contiguous and spatial > 1:
        return Layout(N, C, spatial, C * spatial, spatial, 1)
    # channels-last, or (N, C) / (N, C, 1, …) contiguous
    if _dense_in_order(shape, stride, [1, *range(ndim - 1, 1, -1), 0]):
        return Layout(1, C, N * spatial, 0, 1, C)
    return None


def canonical(x: Tensor) -> Tensor:
    """``x`` itself when :func:`layout_of` can view it, else a contiguous copy."""
    return x if layout_of(x) is not None else x.contiguous()


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with ``ref``'s strides (copied only when they differ, e.g. an expanded or permuted gradient)."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out


# --------------------------------------------------------------------------------------------------
# plans: block sizes and the split of each channel block's tiles
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How a ``(B, C, S)`` tensor is cut into programs (tests pass their own to reach every path)."""
    block_c: int
    block_s: int
    reduce_splits: int = 0      # programs per channel block in the reductions (0: chosen)
    elementwise_splits: int = 0  # programs per channel block in the elementwise passes (0: chosen)
    single_read: bool = False    # one program per channel block, whole channels in registers
    num_warps: int = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few programs, so the split-and-combine path is exercised


@functools.lru_cache(maxsize=4096)
def choose_plan(layout: Layout, device: torch.device) -> Plan:
    """Block sizes from the layout (the splits are chosen per launch by :func:`_grid` from the device size).

    Channels-last: channels are the contiguous axis, so a tile spans up to 128 channels (whole 32-byte
    sectors) and as many positions as fill 4096 elements. Contiguous: positions are the contiguous axis,
    so a tile spans up to 1024 of them and as many channels as fill the rest. Single-read when a block of
    channels has at most 4096 values in all. Tiles hold 16 values per thread (70–90 registers in the tiled
    kernels on sm_90, no spills).
    """
    C, S, count = layout.C, layout.S, layout.count
    c_pow2 = _pow2(C)
    r_pow2 = _pow2(count)
    if layout.channels_last:
        # channels are contiguous: even a whole-channel block spans up to 16 of them (a 32-byte sector in
        # half precision), so loads stay coalesced
        small_c = min(c_pow2, 16)
        if small_c * r_pow2 <= _SMALL_TILE:
            return Plan(small_c, r_pow2, single_read=True, num_warps=4 if small_c * r_pow2 <= 2048 else 8)
        block_c = min(c_pow2, 128)
        block_s = max(1, min(_pow2(S), _TILE // block_c))
    else:
        if r_pow2 <= _SMALL_TILE:
            block_c = max(1, min(c_pow2, _SMALL_TILE // r_pow2, 16))
            return Plan(block_c, r_pow2, single_read=True, num_warps=4 if block_c * r_pow2 <= 2048 else 8)
        block_s = min(_pow2(S), 1024)
        block_c = max(1, min(c_pow2, _TILE // block_s))
    return Plan(block_c, block_s, num_warps=8 if block_c * block_s >= 4096 else 4)


@dataclass(frozen=True)
class _Grid:
    n_s_chunks: int
    n_tiles: int
    tiles_per_program: int
    splits: int
    c_blocks: int


@functools.lru_cache(maxsize=4096)
def _grid(layout: Layout, plan: Plan, splits: int, device: torch.device, per_sm: int) -> _Grid:
    n_s_chunks = _cdiv(layout.S, plan.block_s)
    n_tiles = layout.B * n_s_chunks
    c_blocks = _cdiv(layout.C, plan.block_c)
    if splits <= 0:
        splits = _cdiv(_target_programs(device, per_sm), c_blocks)
    splits = max(1, min(splits, n_tiles))
    tiles_per_program = _cdiv(n_tiles, splits)
    splits = _cdiv(n_tiles, tiles_per_program)  # every program gets at least one tile
    return _Grid(n_s_chunks, n_tiles, tiles_per_program, splits, c_blocks)


def _strides(layout: Layout) -> tuple[int, int, int]:
    return layout.stride_b, layout.stride_c, layout.stride_s


def _geometry(layout: Layout, grid: _Grid) -> tuple[int, ...]:
    return layout.C, layout.S, grid.n_s_chunks, grid.n_tiles, grid.tiles_per_program


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------

def forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  residual: Optional[Tensor] = None, relu: bool = False,
                  plan: Optional[Plan] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward ``y = [relu](bn(x) [+ residual])`` with batch statistics.

    ``x`` must be viewable by :func:`layout_of` and ``residual`` must share its strides. Returns ``y`` (x's
    dtype and strides), the batch mean and the biased batch variance (``(C,)``, float32; float64 for
    float64 input).
    """
    layout = layout_of(x)
    assert layout is not None, "launcher called with an unsupported layout"
    plan = plan or choose_plan(layout, x.device)
    acc = compute_dtype(x)
    y = _alloc_like(x)
    mean = _alloc((layout.C,), acc, x.device)
    var = _alloc((layout.C,), acc, x.device)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 RELU=relu)
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    res = residual if residual is not None else x

    if plan.single_read:
        K._small_forward_kernel[(_cdiv(layout.C, plan.block_c),)](
            x, y, res, w, b, mean, var, *_strides(layout), layout.C, layout.S, layout.count, eps,
            ACC=_tl_acc(x.dtype), **flags, BLOCK_C=plan.block_c, BLOCK_R=plan.block_s,
            num_warps=plan.num_warps)
        return y, mean, var

    grid = _grid(layout, plan, plan.reduce_splits, x.device, per_sm=4)
    part = _alloc((3, grid.splits, layout.C), acc, x.device)
    K._stats_partial_kernel[(grid.c_blocks, grid.splits)](
        x, part, *_strides(layout), *_geometry(layout, grid),
        ACC=_tl_acc(x.dtype), BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    finalize_block = min(_pow2(layout.C), 256)
    K._stats_finalize_kernel[(_cdiv(layout.C, finalize_block),)](
        part, mean, var, layout.C, grid.splits, BLOCK_C=finalize_block)
    _normalize(x, y, res, mean, var, w, b, eps, layout, plan, flags)
    return y, mean, var


def forward_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, residual: Optional[Tensor] = None, relu: bool = False,
                 plan: Optional[Plan] = None) -> Tensor:
    """Evaluation forward with fixed statistics: one elementwise pass."""
    layout = layout_of(x)
    assert layout is not None, "launcher called with an unsupported layout"
    plan = plan or choose_plan(layout, x.device)
    if plan.single_read:  # the elementwise pass wants tiles, not whole channels
        plan = _tiled_plan(layout, plan)
    y = _alloc_like(x)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 RELU=relu)
    _normalize(x, y, residual if residual is not None else x, running_mean, running_var,
               weight if weight is not None else running_mean, bias if bias is not None else running_mean,
               eps, layout, plan, flags)
    return y


def _tiled_plan(layout: Layout, plan: Plan) -> Plan:
    """A tiled plan with the single-read plan's channel block."""
    block_s = max(1, min(_pow2(layout.S), max(1, _TILE // plan.block_c)))
    return Plan(plan.block_c, block_s, plan.reduce_splits, plan.elementwise_splits, False, plan.num_warps)


def _normalize(x, y, res, mean, var, w, b, eps, layout: Layout, plan: Plan, flags: dict) -> None:
    grid = _grid(layout, plan, plan.elementwise_splits, x.device, per_sm=8)
    K._normalize_kernel[(grid.c_blocks, grid.splits)](
        x, y, res, mean, var, w, b, *_strides(layout), *_geometry(layout, grid), eps,
        ACC=_tl_acc(x.dtype), **flags, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------

def backward(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], mean: Tensor, var: Tensor,
             eps: float, *, training: bool, relu: bool, need_dx: bool, need_dw: bool, need_db: bool,
             need_dres: bool, bias_dtype: Optional[torch.dtype] = None, plan: Optional[Plan] = None,
             ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dx, dγ, dβ, dresidual)`` of ``y = [relu](bn(x) [+ residual])``.

    ``dy`` must share ``x``'s strides; ``y`` (the forward's output) is needed when ``relu``. ``mean``/``var``
    are the statistics the forward used (the batch's in training, the running ones in evaluation).
    ``need_dres`` asks for the residual's gradient, ``dy·[y > 0]``.
    """
    layout = layout_of(x)
    assert layout is not None, "launcher called with an unsupported layout"
    plan = plan or choose_plan(layout, x.device)
    acc = compute_dtype(x)
    device = x.device
    dx = _alloc_like(x) if need_dx else None
    dres = _alloc_like(x) if (relu and need_dres) else None
    dw = _alloc((layout.C,), weight.dtype, device) if need_dw else None
    db = _alloc((layout.C,), bias_dtype or acc, device) if need_db else None
    y_arg = y if y is not None else x
    w_arg = weight if weight is not None else var

    if plan.single_read and training:
        K._small_backward_kernel[(_cdiv(layout.C, plan.block_c),)](
            x, dy, y_arg, dx if dx is not None else x, dres if dres is not None else x, mean, var, w_arg,
            dw if dw is not None else var, db if db is not None else var,
            *_strides(layout), layout.C, layout.S, layout.count, eps,
            ACC=_tl_acc(x.dtype), HAS_WEIGHT=weight is not None, RELU=relu, STORE_DX=need_dx,
            STORE_DZ=dres is not None, STORE_DW=need_dw, STORE_DB=need_db,
            BLOCK_C=plan.block_c, BLOCK_R=plan.block_s, num_warps=plan.num_warps)
        return dx, dw, db, (dres if relu else dy) if need_dres else None
    if plan.single_read:
        plan = _tiled_plan(layout, plan)

    need_sums = need_dw or need_db or (need_dx and training)
    if not need_sums:  # fixed statistics and no affine gradients (or only the residual's): elementwise
        if dres is not None:
            dres.copy_(torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype, device=device)))
        if need_dx:
            coef = _alloc((3, layout.C), acc, device)
            coef[0] = torch.rsqrt(var.to(acc) + eps) * (weight.to(acc) if weight is not None else 1.0)
            _dx(x, dy, y_arg, dx, mean, coef, layout, plan, relu=relu, training=False)
        return dx, None, None, (dres if relu else dy) if need_dres else None

    grid = _grid(layout, plan, plan.reduce_splits, device, per_sm=4)
    part = _alloc((2, grid.splits, layout.C), acc, device)
    K._backward_partial_kernel[(grid.c_blocks, grid.splits)](
        x, dy, y_arg, dres if dres is not None else x, mean, part,
        *_strides(layout), *_geometry(layout, grid),
        ACC=_tl_acc(x.dtype), RELU=relu, STORE_DZ=dres is not None,
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    coef = _alloc((3, layout.C), acc, device)
    finalize_block = min(_pow2(layout.C), 256)
    K._backward_finalize_kernel[(_cdiv(layout.C, finalize_block),)](
        part, var, w_arg, dw if dw is not None else coef, db if db is not None else coef, coef,
        layout.C, grid.splits, layout.count, eps,
        ACC=_tl_acc(x.dtype), HAS_WEIGHT=weight is not None, STORE_DW=need_dw, STORE_DB=need_db,
        TRAINING=training, BLOCK_C=finalize_block)
    if need_dx:
        if dres is not None:  # the masked gradient is already in memory: read it instead of dy and y
            _dx(x, dres, x, dx, mean, coef, layout, plan, relu=False, training=training)
        else:
            _dx(x, dy, y_arg, dx, mean, coef, layout, plan, relu=relu, training=training)
    return dx, dw, db, (dres if relu else dy) if need_dres else None


def _dx(x, dy, y, dx, mean, coef, layout: Layout, plan: Plan, *, relu: bool, training: bool) -> None:
    grid = _grid(layout, plan, plan.elementwise_splits, x.device, per_sm=8)
    K._backward_dx_kernel[(grid.c_blocks, grid.splits)](
        x, dy, y, dx, mean, coef, *_strides(layout), *_geometry(layout, grid),
        ACC=_tl_acc(x.dtype), RELU=relu, TRAINING=training,
        BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)


# --------------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------------

def update_running_stats(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, count: int,
                         momentum: float) -> Tensor:
    """``running ← (1 − momentum)·running + momentum·batch`` in place (variance unbiased by
    ``count/(count − 1)``), unless a batch statistic is not finite. Returns that flag as a 0-dim bool
    tensor, without a host synchronisation."""
    C = mean.shape[0]
    finite = torch.empty(1, dtype=torch.uint8, device=mean.device)
    if POISON:
        finite.fill_(2)  # neither answer: an unwritten flag shows up
    K._running_stats_kernel[(1,)](
        mean, var, running_mean, running_var, finite, C, count, float(momentum),
        ACC=_tl_acc(running_mean.dtype), BLOCK_C=min(_pow2(C), 1024))
    return finite.view(torch.bool)[0]
