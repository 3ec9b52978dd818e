"""Autograd wrappers over the launchers, and the public kernel functions :mod:`bnlab.kernels` exposes:
training and evaluation batch norm, optionally fused with an addition and a ReLU.

The ReLU's mask is not stored: the backward reads it back from the output (``y > 0``), which autograd
keeps alive anyway when the next layer needs it. Double backward (``create_graph=True``) recomputes the
forward with PyTorch's differentiable batch norm.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.dtypes import FLOAT_DTYPES
from bnlab.kernels import launch


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
           name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a Tensor (got {type(x).__name__})")
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(f"{name}: expected 2D to 5D input (N, C, *) (got {x.dim()}D input)")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be float16, bfloat16, float32 or float64 (got {x.dtype})")
    if x.numel() == 0:
        raise ValueError(f"{name}: x is empty (shape {tuple(x.shape)})")
    C = x.shape[1]
    if x.numel() // C >= 2**31:
        raise ValueError(f"{name}: at most 2**31 - 1 values per channel (got {x.numel() // C}); "
                         f"use bnlab.functional.batch_norm(..., backend='torch')")
    for label, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != C):
            raise ValueError(f"{name}: {label} must have shape ({C},) (got {tuple(p.shape)})")
        if p is not None and p.device != x.device:
            raise ValueError(f"{name}: {label} is on {p.device}, x on {x.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{name}: residual must have x's shape {tuple(x.shape)} (got {tuple(residual.shape)})")
        if residual.dtype != x.dtype:
            raise TypeError(f"{name}: residual must have x's dtype {x.dtype} (got {residual.dtype})")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device}, x on {x.device}")


def _torch_composition(x, weight, bias, running_mean, running_var, eps, training):
    # ATen's batch norm: differentiable twice, and no import of bnlab.functional (which dispatches here)
    return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=training, eps=eps)


def _double_backward(ctx, dy: Tensor, needs: tuple[bool, bool, bool], running_mean=None, running_var=None):
    """Gradients as a differentiable function of (x, γ, β, dy): recompute the forward with PyTorch ops."""
    x, weight, bias, y = ctx.saved_tensors[:4]
    g = torch.where(y > 0, dy, torch.zeros_like(dy)) if ctx.relu else dy
    wanted = [(i, t) for i, t in enumerate((x, weight, bias)) if needs[i] and t is not None]
    grads = [None, None, None]
    if wanted:
        with torch.enable_grad():
            inputs = [t for _, t in wanted]
            out = _torch_composition(x, weight, bias, running_mean, running_var, ctx.eps, ctx.training)
            for (i, _), g_i in zip(wanted, torch.autograd.grad(out, inputs, g, create_graph=True,
                                                               allow_unused=True)):
                grads[i] = g_i
    return grads[0], grads[1], grads[2], (g if ctx.has_residual else None)


class _BatchNormTrain(torch.autograd.Function):
    """Training mode: batch statistics; returns ``(y, mean, biased_var)``."""

    @staticmethod
    def forward(ctx, x_in, weight, bias, residual, eps, relu):
        x = launch.canonical(x_in)
        if residual is not None:
            residual = launch.like(residual, x)
        y, mean, var = launch.forward_train(x, weight, bias, eps, residual, relu)
        ctx.eps, ctx.relu, ctx.training = eps, relu, True
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        # the input itself, not a canonical copy: double backward must reach the caller's tensor
        ctx.save_for_backward(x_in, weight, bias, y if relu else None, mean, var)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if torch.is_grad_enabled():
            dx, dw, db, dres = _double_backward(ctx, dy, ctx.needs_input_grad[:3])
            return dx, dw, db, dres, None, None
        x, weight, bias, y, mean, var = ctx.saved_tensors
        x = launch.canonical(x)
        need = ctx.needs_input_grad
        dx, dw, db, dres = launch.backward(
            launch.like(dy, x), x, y, weight, mean, var, ctx.eps, training=True, relu=ctx.relu,
            need_dx=need[0], need_dw=weight is not None and need[1], need_db=bias is not None and need[2],
            need_dres=ctx.has_residual and need[3], bias_dtype=ctx.bias_dtype)
        return dx, dw, db, dres, None, None


class _BatchNormEval(torch.autograd.Function):
    """Evaluation mode: fixed (running) statistics; one elementwise pass forward."""

    @staticmethod
    def forward(ctx, x_in, running_mean, running_var, weight, bias, residual, eps, relu):
        x = launch.canonical(x_in)
        if residual is not None:
            residual = launch.like(residual, x)
        y = launch.forward_eval(x, running_mean, running_var, weight, bias, eps, residual, relu)
        ctx.eps, ctx.relu, ctx.training = eps, relu, False
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x_in, weight, bias, y if relu else None, running_mean, running_var)
        return y

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        x, weight, bias, y, running_mean, running_var = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db, dres = _double_backward(ctx, dy, (need[0], need[3], need[4]), running_mean, running_var)
            return dx, None, None, dw, db, dres, None, None
        x = launch.canonical(x)
        dx, dw, db, dres = launch.backward(
            launch.like(dy, x), x, y, weight, running_mean, running_var, ctx.eps, training=False,
            relu=ctx.relu, need_dx=need[0], need_dw=weight is not None and need[3],
            need_db=bias is not None and need[4], need_dres=ctx.has_residual and need[5],
            bias_dtype=ctx.bias_dtype)
        return dx, None, None, dw, db, dres, None, None


def batch_norm_train(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     eps: float = 1e-5, residual: Optional[Tensor] = None,
                     relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm with the fused kernels: ``y = [relu](bn(x) [+ residual])``.

    Args:
        x: ``(N, C, *)`` with 0 to 3 spatial dims, contiguous or channels-last (other strides are copied
            first); float16, bfloat16, float32 (accumulated in float32) or float64.
        weight, bias: ``(C,)`` γ and β, or ``None``.
        eps: added to the variance inside the square root.
        residual: a tensor of x's shape and dtype added after the affine step (only with ``relu=True``).
        relu: apply a ReLU last; its mask is recovered from the output in the backward.

    Returns:
        ``(y, mean, biased_var)``: ``y`` with x's dtype and memory format, differentiable w.r.t. x, weight,
        bias and residual; the batch mean and biased variance ``(C,)``, float32 (float64 for float64
        input), not differentiable.
    """
    _check(x, weight, bias, residual, "batch_norm_train")
    if residual is not None and not relu:
        raise ValueError("batch_norm_train: residual is only fused together with relu=True "
                         "(relu(bn(x) + residual)); add it outside otherwise")
    return _BatchNormTrain.apply(x, weight, bias, residual, float(eps), bool(relu))


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None,
                    relu: bool = False) -> Tensor:
    """Evaluation-mode batch norm with fixed statistics, ``[relu](bn(x) [+ residual])``, in one
    elementwise pass. Arguments as :func:`batch_norm_train`, plus the ``(C,)`` statistics to use;
    differentiable w.r.t. x, weight, bias and residual (the statistics are constants)."""
    _check(x, weight, bias, residual, "batch_norm_eval")
    if residual is not None and not relu:
        raise ValueError("batch_norm_eval: residual is only fused together with relu=True "
                         "(relu(bn(x) + residual)); add it outside otherwise")
    C = x.shape[1]
    for label, s in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(s, Tensor) or s.shape != (C,):
            raise ValueError(f"batch_norm_eval: {label} must be a ({C},) tensor "
                             f"(got {None if not isinstance(s, Tensor) else tuple(s.shape)})")
    return _BatchNormEval.apply(x, running_mean, running_var, weight, bias, residual, float(eps), bool(relu))


def batch_norm_train_relu(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                          eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(bn(x))`` in training mode; returns ``(y, mean, biased_var)`` like :func:`batch_norm_train`."""
    return batch_norm_train(x, weight, bias, eps, relu=True)


def batch_norm_train_add_relu(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                              bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``relu(bn(x) + residual)`` in training mode, the residual block's tail; returns
    ``(y, mean, biased_var)`` like :func:`batch_norm_train`."""
    return batch_norm_train(x, weight, bias, eps, residual=residual, relu=True)


def update_running_stats(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, count: int,
                         momentum: float) -> Tensor:
    """Update the running statistics in place from a batch's ``mean`` and biased ``var`` (``count`` values
    per channel), as :func:`bnlab.functional.batch_norm_stats` does — EMA with the unbiased variance,
    skipped when a batch statistic is not finite — in one kernel launch instead of ten-odd small ops.

    Returns a 0-dim bool tensor: whether the update happened (no host synchronisation).
    """
    for label, t in (("mean", mean), ("var", var), ("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape != mean.shape or t.device != mean.device:
            raise ValueError(f"update_running_stats: {label} must be a (C,) tensor on mean's device "
                             f"(got {getattr(t, 'shape', type(t).__name__)})")
    if not running_mean.is_contiguous() or not running_var.is_contiguous():
        raise ValueError("update_running_stats: running_mean and running_var must be contiguous")
    if count < 2:
        raise ValueError(f"update_running_stats: count must be at least 2 (got {count})")
    return launch.update_running_stats(mean.contiguous(), var.contiguous(), running_mean, running_var, count,
                                       momentum)
