"""Triton kernels for batch normalization, and nothing else (launchers: :mod:`bnlab.kernels.launch`).

Every kernel sees its tensor as a 3-D view ``(B, C, S)`` given by three strides, which covers the two
dense layouts without copies:

* contiguous ``(N, C, *spatial)``: ``B = N``, ``S = prod(spatial)``, strides ``(C·S, S, 1)``;
* channels-last / ``(N, C)``: ``B = 1``, ``S = N·prod(spatial)``, strides ``(0, 1, C)``.

A program owns ``BLOCK_C`` channels and a run of *tiles*: tile ``t`` is batch entry ``t // n_s_chunks`` and
the ``BLOCK_S`` positions starting at ``(t % n_s_chunks)·BLOCK_S``. Splitting a channel block's tiles across
programs (grid axis 1) keeps the GPU busy when there are few channels; the partial results are combined
by the small ``*_finalize`` kernels. All arithmetic is in ``ACC`` (float32, or float64 for float64 data).
Tensors that share the input's shape (``Y``, ``RES``, ``DY``, ``DZ``, ``DX``) share its strides.

Loop bounds and counts that change with the batch size are not specialized on (``do_not_specialize``), so
a new batch size does not recompile; strides and sizes are, since knowing a stride is 1 or a multiple of 16
is what lets Triton emit wide, coalesced loads.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_offsets(t, c, s_range, stride_b, stride_c, stride_s, S, n_s_chunks, BLOCK_S: tl.constexpr):
    """Offsets (BLOCK_C, BLOCK_S) and the in-range mask along S of tile ``t`` for channels ``c``."""
    b = t // n_s_chunks
    s = (t % n_s_chunks) * BLOCK_S + s_range
    offsets = (b.to(tl.int64) * stride_b + c[:, None].to(tl.int64) * stride_c
               + s[None, :].to(tl.int64) * stride_s)
    return offsets, s < S


@triton.jit(do_not_specialize=["n_tiles", "tiles_per_program"])
def _stats_partial_kernel(
    X,           # (B, C, S) input
    PART,        # (3, SPLIT, C) ACC out: per program and channel, the mean of the values it saw, the sum
                 #   of squared deviations from that mean (M2), and how many values
    stride_b, stride_c, stride_s,
    C, S, n_s_chunks, n_tiles, tiles_per_program,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per-program shifted sums, turned into (count, mean, M2) for Chan's combination.

    Sums are of ``d = x − K`` with ``K`` the channel's first value in this program's range: d is of the
    order of σ, so ``Σd² − (Σd)²/n`` does not cancel even when |μ| ≫ σ (Chan, Golub & LeVeque 1983).
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    s_range = tl.arange(0, BLOCK_S)
    t_start = pid_t * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, n_tiles)

    first = ((t_start // n_s_chunks).to(tl.int64) * stride_b + c.to(tl.int64) * stride_c
             + ((t_start % n_s_chunks) * BLOCK_S).to(tl.int64) * stride_s)
    shift = tl.load(X + first, mask=c_mask, other=0.0).to(ACC)                   # (BLOCK_C,)

    sum_d = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    sum_d2 = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    count = tl.zeros((BLOCK_S,), dtype=ACC)
    for t in range(t_start, t_end):
        offsets, s_mask = _tile_offsets(t, c, s_range, stride_b, stride_c, stride_s, S, n_s_chunks, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - shift[:, None], 0.0)
        sum_d += d
        sum_d2 += d * d
        count += s_mask.to(ACC)

    n = tl.sum(count, axis=0)
    s1 = tl.sum(sum_d, axis=1)
    s2 = tl.sum(sum_d2, axis=1)
    mean = shift + s1 / n
    m2 = tl.maximum(s2 - s1 * (s1 / n), 0.0)
    out = pid_t * C + c
    part_size = tl.num_programs(1) * C
    tl.store(PART + out, mean, mask=c_mask)
    tl.store(PART + part_size + out, m2, mask=c_mask)
    tl.store(PART + 2 * part_size + out, tl.zeros((BLOCK_C,), dtype=ACC) + n, mask=c_mask)


@triton.jit(do_not_specialize=["n_splits"])
def _stats_finalize_kernel(
    PART,        # (3, SPLIT, C) ACC: mean, M2 and count per program, from _stats_partial_kernel
    MEAN,        # (C,) ACC out: batch mean
    VAR,         # (C,) ACC out: biased batch variance
    C, n_splits,
    BLOCK_C: tl.constexpr,
):
    """Chan's pairwise formula over the programs' partials: exact for any split, no cancellation."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    part_size = n_splits * C
    mean = tl.load(PART + c, mask=c_mask, other=0.0)
    m2 = tl.load(PART + part_size + c, mask=c_mask, other=0.0)
    n = tl.load(PART + 2 * part_size + c, mask=c_mask, other=1.0)
    for p in range(1, n_splits):
        mean_b = tl.load(PART + p * C + c, mask=c_mask, other=0.0)
        m2_b = tl.load(PART + part_size + p * C + c, mask=c_mask, other=0.0)
        n_b = tl.load(PART + 2 * part_size + p * C + c, mask=c_mask, other=1.0)
        total = n + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (n * (n_b / total))
        n = total
    tl.store(MEAN + c, mean, mask=c_mask)
    tl.store(VAR + c, m2 / n, mask=c_mask)


@triton.jit(do_not_specialize=["n_tiles", "tiles_per_program"])
def _normalize_kernel(
    X,           # (B, C, S) input
    Y,           # (B, C, S) output
    RES,         # (B, C, S) residual added before the ReLU (read when HAS_RESIDUAL)
    MEAN,        # (C,) mean to subtract: the batch's (training) or the running one (evaluation)
    VAR,         # (C,) biased variance to divide by, as above
    W,           # (C,) γ (read when HAS_WEIGHT)
    BIAS,        # (C,) β (read when HAS_BIAS)
    stride_b, stride_c, stride_s,
    C, S, n_s_chunks, n_tiles, tiles_per_program,
    eps,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """``y = [relu]((x − μ)·γ/σ + β [+ res])``: one elementwise pass, the training and the eval forward."""
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    s_range = tl.arange(0, BLOCK_S)
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
    var = tl.load(VAR + c, mask=c_mask, other=1.0).to(ACC)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        scale *= tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
    if HAS_BIAS:
        beta = tl.load(BIAS + c, mask=c_mask, other=0.0).to(ACC)
    else:
        beta = tl.zeros((BLOCK_C,), dtype=ACC)

    t_start = pid_t * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, n_tiles)
    for t in range(t_start, t_end):
        offsets, s_mask = _tile_offsets(t, c, s_range, stride_b, stride_c, stride_s, S, n_s_chunks, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        # centred before scaling, so a large mean does not cancel
        y = (x - mean[:, None]) * scale[:, None] + beta[:, None]
        if HAS_RESIDUAL:
            y += tl.load(RES + offsets, mask=mask, other=0.0).to(ACC)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _relu_masked_grad(DY, Y, DZ, offsets, mask, ACC: tl.constexpr, RELU: tl.constexpr,
                      STORE_DZ: tl.constexpr):
    """dy, zeroed where a fused ReLU's output is 0 (the mask recovered from y); with STORE_DZ also written
    out, as the residual's gradient of BN+add+ReLU."""
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.load(Y + offsets, mask=mask, other=0.0).to(ACC)
        dy = tl.where(y > 0.0, dy, 0.0)
        if STORE_DZ:
            tl.store(DZ + offsets, dy.to(DZ.dtype.element_ty), mask=mask)
    return dy


@triton.jit(do_not_specialize=["n_tiles", "tiles_per_program"])
def _backward_partial_kernel(
    X,           # (B, C, S) input of the forward
    DY,          # (B, C, S) gradient of the output
    Y,           # (B, C, S) output of the forward: its sign is the ReLU mask (read when RELU)
    DZ,          # (B, C, S) out: masked gradient dz = dy·[y > 0] (written when STORE_DZ)
    MEAN,        # (C,) mean the forward subtracted
    PART,        # (2, SPLIT, C) ACC out: per program and channel, Σ dz and Σ dz·(x − μ)
    stride_b, stride_c, stride_s,
    C, S, n_s_chunks, n_tiles, tiles_per_program,
    ACC: tl.constexpr, RELU: tl.constexpr, STORE_DZ: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The backward's two reductions, per program. With BN+add+ReLU the masked gradient is also the
    residual's gradient, so it is written here once and read back instead of dy and y."""
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    s_range = tl.arange(0, BLOCK_S)
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
    sum_dy = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    sum_dy_xc = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    t_start = pid_t * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, n_tiles)
    for t in range(t_start, t_end):
        offsets, s_mask = _tile_offsets(t, c, s_range, stride_b, stride_c, stride_s, S, n_s_chunks, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        dy = _relu_masked_grad(DY, Y, DZ, offsets, mask, ACC, RELU, STORE_DZ)
        sum_dy += dy
        sum_dy_xc += dy * (x - mean[:, None])
    out = pid_t * C + c
    tl.store(PART + out, tl.sum(sum_dy, axis=1), mask=c_mask)
    tl.store(PART + tl.num_programs(1) * C + out, tl.sum(sum_dy_xc, axis=1), mask=c_mask)


@triton.jit(do_not_specialize=["n_splits", "count"])
def _backward_finalize_kernel(
    PART,        # (2, SPLIT, C) ACC: Σ dz and Σ dz·(x − μ) per program, from _backward_partial_kernel
    VAR,         # (C,) variance the forward divided by
    W,           # (C,) γ (read when HAS_WEIGHT)
    DW,          # (C,) out: dγ = Σ dz·x̂ (written when STORE_DW)
    DB,          # (C,) out: dβ = Σ dz (written when STORE_DB)
    COEF,        # (3, C) ACC out: a, b, k of dx = a·dz + b·(x − μ) + k
    C, n_splits, count,
    eps,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
    TRAINING: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the partials; turn them into dγ, dβ and dx's per-channel coefficients.

    Training: dx = γ/σ·(dz − Σdz/m − x̂·Σdz·x̂/m). Evaluation (fixed statistics): dx = γ/σ·dz.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_dy = tl.zeros((BLOCK_C,), dtype=ACC)
    sum_dy_xc = tl.zeros((BLOCK_C,), dtype=ACC)
    for p in range(0, n_splits):
        sum_dy += tl.load(PART + p * C + c, mask=c_mask, other=0.0)
        sum_dy_xc += tl.load(PART + (n_splits + p) * C + c, mask=c_mask, other=0.0)
    inv_std = 1.0 / tl.sqrt(tl.load(VAR + c, mask=c_mask, other=1.0).to(ACC) + eps)
    gain = inv_std
    if HAS_WEIGHT:
        gain *= tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
    if STORE_DW:
        tl.store(DW + c, (sum_dy_xc * inv_std).to(DW.dtype.element_ty), mask=c_mask)
    if STORE_DB:
        tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=c_mask)
    if TRAINING:
        coef_xc = -gain * inv_std * inv_std * sum_dy_xc / count
        coef_one = -gain * sum_dy / count
    else:
        coef_xc = tl.zeros((BLOCK_C,), dtype=ACC)
        coef_one = tl.zeros((BLOCK_C,), dtype=ACC)
    tl.store(COEF + c, gain, mask=c_mask)
    tl.store(COEF + C + c, coef_xc, mask=c_mask)
    tl.store(COEF + 2 * C + c, coef_one, mask=c_mask)


@triton.jit(do_not_specialize=["n_tiles", "tiles_per_program"])
def _backward_dx_kernel(
    X,           # (B, C, S) input of the forward (read when TRAINING)
    DY,          # (B, C, S) gradient of the output (or the already-masked dz)
    Y,           # (B, C, S) output of the forward, for the ReLU mask (read when RELU)
    DX,          # (B, C, S) out
    MEAN,        # (C,) mean the forward subtracted
    COEF,        # (3, C) ACC: a, b, k from _backward_finalize_kernel
    stride_b, stride_c, stride_s,
    C, S, n_s_chunks, n_tiles, tiles_per_program,
    ACC: tl.constexpr, RELU: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = a·dz + b·(x − μ) + k, elementwise (only a·dz with fixed statistics: x is not read)."""
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    s_range = tl.arange(0, BLOCK_S)
    gain = tl.load(COEF + c, mask=c_mask, other=0.0)
    if TRAINING:
        mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
        coef_xc = tl.load(COEF + C + c, mask=c_mask, other=0.0)
        coef_one = tl.load(COEF + 2 * C + c, mask=c_mask, other=0.0)
    t_start = pid_t * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, n_tiles)
    for t in range(t_start, t_end):
        offsets, s_mask = _tile_offsets(t, c, s_range, stride_b, stride_c, stride_s, S, n_s_chunks, BLOCK_S)
        mask = c_mask[:, None] & s_mask[None, :]
        dy = _relu_masked_grad(DY, Y, DY, offsets, mask, ACC, RELU, False)
        dx = dy * gain[:, None]
        if TRAINING:
            x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
            dx += (x - mean[:, None]) * coef_xc[:, None] + coef_one[:, None]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# single-read path: a channel block's values all fit in one program's registers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _whole_channel_offsets(c, r, stride_b, stride_c, stride_s, S):
    """Offsets (BLOCK_C, BLOCK_R) of flat positions ``r = b·S + s`` of channels ``c``."""
    return (c[:, None].to(tl.int64) * stride_c
            + ((r // S).to(tl.int64) * stride_b + (r % S).to(tl.int64) * stride_s)[None, :])


@triton.jit(do_not_specialize=["count"])
def _small_forward_kernel(
    X,           # (B, C, S) input
    Y,           # (B, C, S) output
    RES,         # (B, C, S) residual (read when HAS_RESIDUAL)
    W,           # (C,) γ (read when HAS_WEIGHT)
    BIAS,        # (C,) β (read when HAS_BIAS)
    MEAN,        # (C,) ACC out: batch mean
    VAR,         # (C,) ACC out: biased batch variance
    stride_b, stride_c, stride_s,
    C, S, count,
    eps,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Statistics and normalization from one read of x: the exact two-pass variance, in registers."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_R)
    mask = c_mask[:, None] & (r < count)[None, :]
    offsets = _whole_channel_offsets(c, r, stride_b, stride_c, stride_s, S)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=1) / count
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / count
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        scale *= tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
    y = xc * scale[:, None]
    if HAS_BIAS:
        y += tl.load(BIAS + c, mask=c_mask, other=0.0).to(ACC)[:, None]
    if HAS_RESIDUAL:
        y += tl.load(RES + offsets, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + c, mean, mask=c_mask)
    tl.store(VAR + c, var, mask=c_mask)


@triton.jit(do_not_specialize=["count"])
def _small_backward_kernel(
    X,           # (B, C, S) input of the forward
    DY,          # (B, C, S) gradient of the output
    Y,           # (B, C, S) output of the forward, for the ReLU mask (read when RELU)
    DX,          # (B, C, S) out (written when STORE_DX)
    DZ,          # (B, C, S) out: residual gradient dy·[y > 0] (written when STORE_DZ)
    MEAN,        # (C,) batch mean
    VAR,         # (C,) biased batch variance
    W,           # (C,) γ (read when HAS_WEIGHT)
    DW,          # (C,) out: dγ (written when STORE_DW)
    DB,          # (C,) out: dβ (written when STORE_DB)
    stride_b, stride_c, stride_s,
    C, S, count,
    eps,
    ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DZ: tl.constexpr, STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The whole training backward from one read of x, dy (and y)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_R)
    mask = c_mask[:, None] & (r < count)[None, :]
    offsets = _whole_channel_offsets(c, r, stride_b, stride_c, stride_s, S)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    dy = _relu_masked_grad(DY, Y, DZ, offsets, mask, ACC, RELU, STORE_DZ)
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
    inv_std = 1.0 / tl.sqrt(tl.load(VAR + c, mask=c_mask, other=1.0).to(ACC) + eps)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    sum_dy = tl.sum(dy, axis=1)
    sum_dy_xc = tl.sum(dy * xc, axis=1)
    if STORE_DW:
        tl.store(DW + c, (sum_dy_xc * inv_std).to(DW.dtype.element_ty), mask=c_mask)
    if STORE_DB:
        tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=c_mask)
    if STORE_DX:
        gain = inv_std
        if HAS_WEIGHT:
            gain *= tl.load(W + c, mask=c_mask, other=1.0).to(ACC)
        coef_xc = -gain * inv_std * inv_std * sum_dy_xc / count
        coef_one = -gain * sum_dy / count
        dx = dy * gain[:, None] + xc * coef_xc[:, None] + coef_one[:, None]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["count"])
def _running_stats_kernel(
    MEAN,          # (C,) batch mean
    VAR,           # (C,) biased batch variance
    RUNNING_MEAN,  # (C,) updated in place
    RUNNING_VAR,   # (C,) updated in place
    FINITE,        # (1,) uint8 out: 1 when all the batch statistics were finite, else 0
    C, count,
    momentum,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """EMA of the running statistics with the unbiased batch variance, skipped entirely when any batch
    statistic is not finite: one program, so that the decision covers every channel. Replaces the ten-odd
    small PyTorch ops of the same update."""
    offs = tl.arange(0, BLOCK_C)
    bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs
        c_mask = c < C
        mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(VAR + c, mask=c_mask, other=0.0).to(ACC)
        # x − x is 0 for finite x, NaN for ±inf and NaN
        bad += ((mean - mean != 0.0) | (var - var != 0.0)).to(tl.int32)
    n_bad = tl.sum(bad, axis=0)
    keep = tl.zeros((BLOCK_C,), dtype=tl.int32) + n_bad > 0    # (BLOCK_C,) the same flag in every lane
    unbias = count / (count - 1.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs
        c_mask = c < C
        mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(VAR + c, mask=c_mask, other=0.0).to(ACC)
        old_mean = tl.load(RUNNING_MEAN + c, mask=c_mask, other=0.0).to(ACC)
        old_var = tl.load(RUNNING_VAR + c, mask=c_mask, other=0.0).to(ACC)
        new_mean = tl.where(keep, old_mean, old_mean + momentum * (mean - old_mean))
        new_var = tl.where(keep, old_var, old_var + momentum * (var * unbias - old_var))
        tl.store(RUNNING_MEAN + c, new_mean.to(RUNNING_MEAN.dtype.element_ty), mask=c_mask)
        tl.store(RUNNING_VAR + c, new_var.to(RUNNING_VAR.dtype.element_ty), mask=c_mask)
    tl.store(FINITE + offs, tl.where(keep, 0, 1).to(tl.uint8), mask=offs < 1)
