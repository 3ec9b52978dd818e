r"""Fold batch norm into the preceding convolution or linear layer, for inference.

In eval mode batch norm is a fixed per-channel affine map, so after a conv/linear layer ``z = W x + b``

.. math::
    y = \gamma\,\frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta
      = (s \odot W)\,x + s\,(b - \mu) + \beta, \qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}

and the pair becomes one layer with weight ``s ⊙ W`` (scaled along output channels) and bias
``s (b − μ) + β``; the batch norm is replaced by ``nn.Identity``. Computed in float64, then cast back.

Pairs are found with :mod:`torch.fx` symbolic tracing (the batch norm's input must be the conv's output and
nothing else may use that output). Where a module cannot be traced (data-dependent control flow), its
submodules are traced one by one, and the children of an untraceable ``nn.Sequential`` are paired by
adjacency.
Everything not folded is listed with the reason.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from bnlab import protocol

__all__ = ["fold_bn", "FoldReport", "find_conv_bn_pairs", "output_tensors"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _CONVS + _TRANSPOSED + (nn.Linear,)


def _is_norm(m: nn.Module) -> bool:
    return protocol.is_batch_norm(m)


@dataclass
class FoldReport:
    """What :func:`fold_bn` did: ``folded`` as ``(bn, into)`` names, ``skipped`` as ``(bn, reason)``, the
    pair-finding ``method`` (``"fx"`` or ``"fx+sequential"``) and, with a probe batch, the largest absolute
    and relative (to the largest reference output) difference between the folded and original model."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    method: str = "fx"
    trace_error: Optional[str] = None
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch-norm layer(s), left {len(self.skipped)} (found by {self.method})"]
        lines += [f"  folded  {bn} -> {into}" for bn, into in self.folded]
        lines += [f"  kept    {bn}: {reason}" for bn, reason in self.skipped]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace {self.trace_error}; its submodules were traced instead")
        if self.max_abs_error is not None:
            lines.append(f"  probe: max |folded - original| = {self.max_abs_error:.3g} "
                         f"(relative {self.max_rel_error:.3g})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# finding conv → BN pairs
# --------------------------------------------------------------------------------------------------

class _Tracer(torch.fx.Tracer):
    """Keeps batch-norm layers (ours have Python control flow) and foldable layers as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_norm(m) or isinstance(m, _FOLDABLE) or super().is_leaf_module(m, qualname)


def _describe(node) -> str:
    if not isinstance(node, torch.fx.Node):
        return f"a constant ({node!r})"
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "placeholder":
        return "the model input"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _pairs_fx(model: nn.Module):
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, skipped = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(modules[node.target]):
            continue
        bn_name, prev = node.target, node.args[0] if node.args else None
        if calls[bn_name] > 1:
            skipped.append((bn_name, f"the layer is called {calls[bn_name]} times; folding it into one "
                                     f"preceding layer would change the other calls"))
        elif not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                  and isinstance(modules[prev.target], _FOLDABLE)):
            skipped.append((bn_name, f"its input comes from {_describe(prev)}, not from a conv/linear layer"))
        elif calls[prev.target] > 1:
            skipped.append((bn_name, f"the preceding layer {prev.target!r} is called {calls[prev.target]} "
                                     f"times; folding would change its other calls"))
        elif len(prev.users) > 1:
            others = ", ".join(_describe(u) for u in prev.users if u is not node)
            skipped.append((bn_name, f"the output of {prev.target!r} is also used by {others}; folding "
                                     f"would change that use"))
        else:
            pairs.append((prev.target, bn_name))
    return pairs, skipped


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _pairs_by_submodule(module: nn.Module, prefix: str, errors: list[str]):
    """Trace ``module``; where that fails, pair adjacent children of an ``nn.Sequential`` and recurse into
    the children, so one untraceable block does not hide the foldable pairs elsewhere."""
    try:
        pairs, skipped = _pairs_fx(module)
        return ([(_join(prefix, c), _join(prefix, b)) for c, b in pairs],
                [(_join(prefix, b), why) for b, why in skipped])
    except Exception as exc:  # tracing fails on data-dependent control flow and the like
        errors.append(f"{prefix or '<model>'}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    pairs, skipped, paired = [], [], set()
    children = list(module.named_children())
    if isinstance(module, nn.Sequential):
        for (n1, c1), (n2, c2) in zip(children, children[1:]):
            if isinstance(c1, _FOLDABLE) and _is_norm(c2):
                pairs.append((_join(prefix, n1), _join(prefix, n2)))
                paired.add(n2)
    for name, child in children:
        if _is_norm(child):
            if name not in paired:
                skipped.append((_join(prefix, name), f"{prefix or 'the model'} cannot be traced by torch.fx and "
                                                     f"the layer does not directly follow a conv/linear layer "
                                                     f"inside an nn.Sequential"))
        elif not isinstance(child, _FOLDABLE):
            sub_pairs, sub_skipped = _pairs_by_submodule(child, _join(prefix, name), errors)
            pairs += sub_pairs
            skipped += sub_skipped
    return pairs, skipped


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str, Optional[str]]:
    """``(pairs, not_paired, method, trace_error)``: ``(conv, bn)`` qualified names where the batch norm
    directly and only follows the conv/linear layer, ``(bn, reason)`` for the others, how they were found
    (``"fx"`` for the whole model, ``"fx+sequential"`` when parts could not be traced) and the first
    tracing error."""
    errors: list[str] = []
    pairs, skipped = _pairs_by_submodule(model, "", errors)
    return pairs, skipped, "fx+sequential" if errors else "fx", errors[0] if errors else None


# --------------------------------------------------------------------------------------------------
# the arithmetic
# --------------------------------------------------------------------------------------------------

def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of the eval-mode batch norm, in float64."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _why_not(layer: nn.Module, bn: nn.Module) -> Optional[str]:
    if not protocol.capability(bn, "bn_plain_inference"):
        return (f"{type(bn).__name__} overrides forward (it may do more than batch norm, e.g. a fused ReLU); "
                f"folding would drop that")
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"the preceding layer has {out} outputs but the batch norm {bn.num_features} channels"
    if bn.running_mean is None:
        return "the batch norm has no running statistics (track_running_stats=False): it always uses batch statistics"
    if getattr(bn, "use_batch_stats", None) is True:
        return "the batch norm is switched to batch statistics (use_batch_stats=True) in eval mode too"
    if not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()):
        return "the running statistics are not finite"
    return None


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    scale, shift = _bn_affine(bn)
    w = layer.weight.double()
    if isinstance(layer, _TRANSPOSED):
        # weight (C_in, C_out/groups, *k): output channel g·(C_out/groups) + j lives at [g-th block of C_in, j]
        g = layer.groups
        view = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        folded = (view * scale.reshape(g, 1, -1, *[1] * (w.dim() - 2))).reshape(w.shape)
    else:
        folded = w * scale.reshape(-1, *[1] * (w.dim() - 1))   # (C_out, ...) for conv and linear
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_bias = bias * scale + shift
    layer.weight.copy_(folded.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def output_tensors(out) -> list[Tensor]:
    """The tensors of a model's output (a tensor, or tensors nested in tuples, lists and dicts), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


@torch.no_grad()
def _eval_outputs(model: nn.Module, probe) -> list[Tensor]:
    args = probe if isinstance(probe, (tuple, list)) else (probe,)
    was_training = model.training
    model.eval()
    try:
        out = output_tensors(model(*args))
    finally:
        model.train(was_training)
    if not out:
        raise TypeError("fold_bn: the model's output on the probe batch holds no tensor to compare")
    return [t.detach().clone() for t in out]


def _errors(ref: list[Tensor], new: list[Tensor]) -> tuple[float, float]:
    abs_err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ref, new))
    scale = max(float(a.double().abs().max()) for a in ref)
    return abs_err, abs_err / max(scale, 1e-30)


def fold_bn(model: nn.Module, probe: Union[Tensor, Sequence[Tensor], None] = None, *, inplace: bool = False,
            strict: bool = False, rtol: Optional[float] = None) -> tuple[nn.Module, FoldReport]:
    """Fold every batch norm that directly follows a conv / transposed conv / linear layer into its weights.

    Works with :mod:`bnlab.nn`, :mod:`bnlab.nn.variants` and ``torch.nn`` batch-norm layers, convolutions of
    any ``groups``, with or without bias. The result is for inference: it is returned in eval mode and
    matches ``model.eval()``, and folding a model whose batch norms use batch statistics (training mode)
    warns, since its output as called differs. A linear layer is folded as feeding batch norm on ``(N, C)`` features (its
    output features are the channels); pass ``probe`` to have every fold verified.

    Args:
        model: the network; not modified unless ``inplace``.
        probe: an input batch (or tuple of inputs) on which the folded model is checked against the
            original in eval mode; the largest error goes into the report.
        inplace: fold ``model`` itself instead of a copy.
        strict: raise ``ValueError`` if any batch-norm layer could not be folded (with the reasons).
        rtol: with ``probe``, raise ``RuntimeError`` when the relative error exceeds it.

    Returns:
        ``(folded_model, report)``, see :class:`FoldReport`.
    """
    in_training = [name for name, m in model.named_modules()   # (layers without running statistics: skipped)
                   if protocol.is_batch_norm(m) and m.running_mean is not None and protocol.uses_batch_stats(m)]
    if in_training:
        shown = ", ".join(in_training[:4]) + (f" and {len(in_training) - 4} more" if len(in_training) > 4 else "")
        warnings.warn(f"fold_bn: {len(in_training)} batch-norm layer(s) of the model normalize with batch "
                      f"statistics as it is ({shown}: training mode or use_batch_stats=True); folding uses their "
                      f"running statistics, so the folded model matches model.eval(), not the model as it was "
                      f"called. Call model.eval() before fold_bn", UserWarning, stacklevel=2)
    reference = _eval_outputs(model, probe) if probe is not None else None
    folded_model = model if inplace else copy.deepcopy(model)
    pairs, skipped, method, trace_error = find_conv_bn_pairs(folded_model)
    report = FoldReport(skipped=list(skipped), method=method, trace_error=trace_error)
    for layer_name, bn_name in pairs:
        layer, bn = folded_model.get_submodule(layer_name), folded_model.get_submodule(bn_name)
        reason = _why_not(layer, bn)
        if reason:
            report.skipped.append((bn_name, reason))
            continue
        _fold_pair(layer, bn)
        _set_module(folded_model, bn_name, nn.Identity())
        report.folded.append((bn_name, layer_name))
    if strict and report.skipped:
        raise ValueError("fold_bn: could not fold " + "; ".join(f"{bn}: {why}" for bn, why in report.skipped))
    folded_model.eval()
    if probe is not None:
        report.max_abs_error, report.max_rel_error = _errors(reference, _eval_outputs(folded_model, probe))
        if rtol is not None and report.max_rel_error is not None and report.max_rel_error > rtol:
            raise RuntimeError(f"fold_bn: the folded model differs from the original by {report.max_rel_error:.3g} "
                               f"(relative) on the probe batch, more than rtol={rtol}")
    return folded_model, report
