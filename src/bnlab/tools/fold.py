r"""Fold batch norm into the preceding convolution or linear layer, for inference.

In eval mode batch norm is a fixed per-channel affine map, so after a conv/linear layer ``z = W x + b``

.. math::
    y = \gamma\,\frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta
      = (s \odot W)\,x + s\,(b - \mu) + \beta, \qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}

and the pair becomes one layer with weight ``s ⊙ W`` (scaled along output channels) and bias
``s (b − μ) + β``; the batch norm is replaced by ``nn.Identity``. Computed in float64, then cast back.

A pair is a conv/linear layer whose output feeds a batch norm and nothing else. Pairs are found with
:mod:`torch.fx` symbolic tracing. Where a module cannot be traced (data-dependent control flow, or padding
computed from the input's size in ``forward`` as in Hugging Face's ``tf_padding`` convolutions), its
submodules are traced one by one, the children of an untraceable ``nn.Sequential`` are paired by adjacency,
and the batch norms left over are matched by running the model once on the ``probe`` batch with hooks:
a batch norm is paired with the layer whose output tensor *is* its input, when every operation on that
tensor outside the batch norm is a shape query. ``pairs=`` names the pairs instead of finding them.
Everything not folded is listed with the reason.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

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
    pair-finding ``method`` (``"fx"``: the whole model traced; ``"fx+sequential"``: parts could not be
    traced, their submodules were; ``"fx+hooks"``: the rest matched on the probe batch; ``"pairs"`` or
    ``"pairs+hooks"``: the pairs given, checked on the probe batch), the first tracing error (for reference;
    it is not an error of the fold) and, with a probe batch, the largest absolute and relative (to the
    largest reference output) difference between the folded and original model."""

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


def _pairs_fx(model: nn.Module, whole_model: bool = True):
    """``(pairs, skipped, open)`` from one trace; ``open`` lists the batch norms whose input is the traced
    module's own input when that module is part of a larger one (the producer lies outside the trace)."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, skipped, open_ = [], [], []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(modules[node.target]):
            continue
        bn_name, prev = node.target, node.args[0] if node.args else None
        if calls[bn_name] > 1:
            skipped.append((bn_name, f"the layer is called {calls[bn_name]} times; folding it into one "
                                     f"preceding layer would change the other calls"))
        elif (not whole_model and isinstance(prev, torch.fx.Node) and prev.op == "placeholder"
              and calls[bn_name] == 1):
            open_.append(bn_name)
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
    return pairs, skipped, open_


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _pairs_by_submodule(module: nn.Module, prefix: str, errors: list[str], open_: list[tuple[str, str]]):
    """Trace ``module``; where that fails, pair adjacent children of an ``nn.Sequential`` and recurse into
    the children, so one untraceable block does not hide the foldable pairs elsewhere. The batch norms
    neither way settles go to ``open_`` as ``(bn, why)``, for :func:`_pairs_by_hooks`."""
    try:
        pairs, skipped, unsettled = _pairs_fx(module, whole_model=not prefix)
        open_ += [(_join(prefix, b), f"its input is the input of {prefix!r}, which was traced on its own (the "
                                     f"model as a whole cannot be), so what produces it is not known")
                  for b in unsettled]
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
                open_.append((_join(prefix, name), f"{prefix or 'the model'} cannot be traced by torch.fx and the "
                                                   f"layer does not directly follow a conv/linear layer inside an "
                                                   f"nn.Sequential"))
        elif not isinstance(child, _FOLDABLE):
            sub_pairs, sub_skipped = _pairs_by_submodule(child, _join(prefix, name), errors, open_)
            pairs += sub_pairs
            skipped += sub_skipped
    return pairs, skipped


# ops that read a tensor's metadata, not its values: using a conv's output for these does not stop a fold
_SHAPE_QUERIES = {"__get__", "size", "dim", "ndimension", "numel", "nelement", "is_contiguous", "stride",
                  "element_size", "storage_offset", "data_ptr", "get_device", "is_floating_point", "is_complex",
                  "__len__", "__format__", "__repr__"}


def _call(model: nn.Module, probe):
    """``model`` on the probe batch: a tensor, a tuple/list of positional inputs, or a mapping of keyword
    inputs (a Hugging Face batch)."""
    if isinstance(probe, Mapping):
        return model(**probe)
    return model(*probe) if isinstance(probe, (tuple, list)) else model(probe)


class _DataFlow(TorchFunctionMode):
    """One forward pass, watched: which tensor each batch norm got, which conv/linear layer produced which
    tensor, and every other operation that used a produced tensor (outside a batch norm's own forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {}
        for name, m in model.named_modules():
            self.names.setdefault(m, name)
        self.calls: Counter = Counter()
        self.bn_inputs: dict[str, list[Tensor]] = {}
        self.producer: dict[int, str] = {}        # id(output) -> the foldable layer that returned it
        self.origin: dict[int, str] = {}          # id(output) -> the innermost module that returned it
        self.uses: dict[int, list[str]] = {}      # id(produced tensor) -> the other operations on it
        self.kept: list[Tensor] = []              # references, so that no id is reused during the pass
        self.inside_bn = 0
        self.hooks = []
        for m, name in self.names.items():
            if _is_norm(m):
                self.hooks += [m.register_forward_pre_hook(self._bn_enter), m.register_forward_hook(self._bn_exit)]
            else:
                self.hooks.append(m.register_forward_hook(self._returned))

    def _bn_enter(self, module, args):
        name = self.names[module]
        self.calls[name] += 1
        if args and isinstance(args[0], Tensor):
            self.bn_inputs.setdefault(name, []).append(args[0])
            self.kept.append(args[0])
        self.inside_bn += 1

    def _bn_exit(self, module, args, output):
        self.inside_bn -= 1

    def _returned(self, module, args, output):
        name = self.names[module]
        self.calls[name] += 1
        if isinstance(output, Tensor):
            self.origin.setdefault(id(output), name)    # the innermost module's forward hook runs first
            if isinstance(module, _FOLDABLE) and id(output) not in self.producer:
                self.producer[id(output)] = name
                self.uses[id(output)] = []
            self.kept.append(output)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_bn and self.producer and getattr(func, "__name__", "") not in _SHAPE_QUERIES:
            for value in (*args, *kwargs.values()):
                for t in (value if isinstance(value, (list, tuple)) else (value,)):
                    if isinstance(t, Tensor) and id(t) in self.uses:
                        self.uses[id(t)].append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def _pairs_by_hooks(model: nn.Module, probe, bn_names: Iterable[str]):
    """``(pairs, skipped)`` for ``bn_names`` from one eval-mode pass on ``probe`` (see :class:`_DataFlow`);
    the model is left as it was."""
    bn_names = list(bn_names)
    modes = {m: m.training for m in model.modules()}
    flow = _DataFlow(model)
    try:
        model.eval()
        with flow:
            _call(model, probe)
    except Exception as exc:   # the probe does not fit the model: nothing can be matched this way
        first_line = (str(exc).splitlines() or [""])[0][:200]
        return [], [(bn, f"running the model on the probe batch failed ({type(exc).__name__}: {first_line})")
                    for bn in bn_names]
    finally:
        flow.remove()
        for m, was_training in modes.items():
            m.training = was_training
    fed: Counter = Counter(id(x) for xs in flow.bn_inputs.values() for x in xs)
    pairs, skipped = [], []
    for bn in bn_names:
        inputs = flow.bn_inputs.get(bn, [])
        if not inputs:
            skipped.append((bn, "it was not called when the model ran on the probe batch"))
            continue
        if len(inputs) > 1:
            skipped.append((bn, f"the layer is called {len(inputs)} times; folding it into one preceding layer "
                                f"would change the other calls"))
            continue
        x = inputs[0]
        layer = flow.producer.get(id(x))
        if layer is None:
            source = flow.origin.get(id(x))
            where = f"module {source!r}" if source else "an operation"
            skipped.append((bn, f"on the probe batch its input comes from {where}, not from a conv/linear layer"))
        elif flow.calls[layer] > 1:
            skipped.append((bn, f"the preceding layer {layer!r} is called {flow.calls[layer]} times; folding "
                                f"would change its other calls"))
        elif flow.uses[id(x)] or fed[id(x)] > 1:
            others = sorted(set(flow.uses[id(x)])) + (["another batch norm"] if fed[id(x)] > 1 else [])
            skipped.append((bn, f"the output of {layer!r} is also used by {', '.join(others)}; folding would "
                                f"change that use"))
        else:
            pairs.append((layer, bn))
    return pairs, skipped


def _in_module_order(model: nn.Module, items: list, key) -> list:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(items, key=lambda item: order.get(key(item), len(order)))


def find_conv_bn_pairs(model: nn.Module, probe=None) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str,
                                                               Optional[str]]:
    """``(pairs, not_paired, method, trace_error)``: ``(conv, bn)`` qualified names where the batch norm
    directly and only follows the conv/linear layer, ``(bn, reason)`` for the others, how they were found
    (see :class:`FoldReport`) and the first tracing error. With ``probe`` (an input batch: a tensor, a tuple
    of inputs or a mapping of keyword inputs), the batch norms tracing does not settle are matched by
    running the model on it once in eval mode (see the module docstring); the model is not changed."""
    errors: list[str] = []
    open_: list[tuple[str, str]] = []
    pairs, skipped = _pairs_by_submodule(model, "", errors, open_)
    method = "fx+sequential" if errors else "fx"
    if open_ and probe is not None:
        found, refused = _pairs_by_hooks(model, probe, [bn for bn, _ in open_])
        pairs, skipped, method = pairs + found, skipped + refused, "fx+hooks"
    elif open_:
        skipped += [(bn, f"{why}; pass probe= (an input batch) to match it by running the model, or pairs=")
                    for bn, why in open_]
    return (_in_module_order(model, pairs, lambda p: p[1]), _in_module_order(model, skipped, lambda s: s[0]),
            method, errors[0] if errors else None)


def _given_pairs(model: nn.Module, pairs, probe):
    """The ``pairs=`` of :func:`fold_bn`, checked: names of a conv/linear layer and a batch norm each, none
    twice; with a probe batch, each confirmed by running the model (:func:`_pairs_by_hooks`)."""
    modules = dict(model.named_modules())
    checked, seen = [], set()
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(n, str) for n in item)):
            raise ValueError(f"fold_bn: pairs must hold (layer name, batch-norm name) tuples (got {item!r})")
        layer, bn = item
        for name, want, ok in ((layer, "a conv/linear layer", lambda m: isinstance(m, _FOLDABLE)),
                               (bn, "a batch-norm layer", _is_norm)):
            if name not in modules:
                raise ValueError(f"fold_bn: pairs: the model has no submodule {name!r}")
            if not ok(modules[name]):
                raise ValueError(f"fold_bn: pairs: {name!r} is a {type(modules[name]).__name__}, expected {want}")
            if name in seen:
                raise ValueError(f"fold_bn: pairs: {name!r} appears in more than one pair")
            seen.add(name)
        checked.append((layer, bn))
    skipped = [(name, "not in the given pairs") for name, m in model.named_modules()
               if _is_norm(m) and name not in seen]
    if probe is None:
        return checked, skipped, "pairs"
    found, refused = _pairs_by_hooks(model, probe, [bn for _, bn in checked])
    confirmed = set(found)
    why = dict(refused)
    for layer, bn in checked:
        if (layer, bn) not in confirmed:
            other = next((c for c, b in found if b == bn), None)
            skipped.append((bn, why.get(bn) or f"on the probe batch its input is the output of {other!r}, not of "
                                               f"{layer!r}"))
    return [p for p in checked if p in confirmed], _in_module_order(model, skipped, lambda s: s[0]), "pairs+hooks"


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
    modes = {m: m.training for m in model.modules()}   # each module's own mode comes back, mixed ones too
    model.eval()
    try:
        out = output_tensors(_call(model, probe))
    finally:
        for m, was_training in modes.items():
            m.training = was_training
    if not out:
        raise TypeError("fold_bn: the model's output on the probe batch holds no tensor to compare")
    return [t.detach().clone() for t in out]


def _errors(ref: list[Tensor], new: list[Tensor]) -> tuple[float, float]:
    abs_err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ref, new))
    scale = max(float(a.double().abs().max()) for a in ref)
    return abs_err, abs_err / max(scale, 1e-30)


def fold_bn(model: nn.Module, probe: Union[Tensor, Sequence[Tensor], Mapping, None] = None, *,
            pairs: Optional[Iterable[tuple[str, str]]] = None, inplace: bool = False, strict: bool = False,
            rtol: Optional[float] = None) -> tuple[nn.Module, FoldReport]:
    """Fold every batch norm that directly follows a conv / transposed conv / linear layer into its weights.

    Works with :mod:`bnlab.nn`, :mod:`bnlab.nn.variants` and ``torch.nn`` batch-norm layers, convolutions of
    any ``groups``, with or without bias. The result is for inference: it is returned in eval mode and
    matches ``model.eval()``, and folding a model whose batch norms use batch statistics (training mode)
    warns, since its output as called differs. A linear layer is folded as feeding batch norm on ``(N, C)`` features (its
    output features are the channels); pass ``probe`` to have every fold verified.

    Pairs are found by tracing, and where a module cannot be traced (e.g. Hugging Face's ``tf_padding``
    convolutions, whose padding depends on the input's size) by running the model once on ``probe``; see the
    module docstring. Without a probe such batch norms are kept, with the reason.

    Args:
        model: the network; not modified unless ``inplace``.
        probe: an input batch (a tensor, a tuple of positional inputs, or a mapping of keyword inputs such
            as ``{"pixel_values": x}``) on which the pairs tracing cannot settle are matched, and the folded
            model is checked against the original in eval mode; the largest error goes into the report.
        pairs: ``(layer name, batch-norm name)`` pairs to fold instead of finding them (names as in
            ``model.named_modules()``); every other batch norm is kept. With ``probe`` each pair is first
            confirmed: the batch norm's input must be that layer's output and nothing else's input.
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
    if pairs is not None:
        found, skipped, method = _given_pairs(folded_model, list(pairs), probe)
        trace_error = None
    else:
        found, skipped, method, trace_error = find_conv_bn_pairs(folded_model, probe)
    report = FoldReport(skipped=list(skipped), method=method, trace_error=trace_error)
    for layer_name, bn_name in found:
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
