"""`bnlab doctor`: a health report of every batch-norm layer of a model, on a few input batches.

Each finding names the layer, the evidence and the fix. The checks:

=====================  ============================================================================
``train_mode``         a BN layer would use batch statistics at inference (``.train()`` mode or
                       ``use_batch_stats=True``): outputs depend on the batch, batch size 1 fails
``train_eval_gap``     the layer's (or the model's) output with batch statistics differs from the
                       output with running statistics by more than ``gap_tol`` (relative RMS)
``stale_statistics``   the running mean/var are far from the statistics of the given batches
                       (mean in units of the running std, variance as a ratio)
``initial_statistics`` the running statistics were never updated (mean 0, variance 1, no batches)
``few_values``         batch statistics estimated from fewer than ``min_values`` values per channel
``dead_channels``      channels with ``|γ| < dead_gamma``: their output is the constant β
``redundant_bias``     a conv/linear bias right before BN: the mean subtraction cancels it
``momentum_convention`` ``momentum > 0.5``: probably Keras/TF's convention (0.99) given to PyTorch's
                       (0.1), which makes the running statistics follow only the last batch
``nonfinite_stats``    NaN/Inf (or negative variance) in the running statistics or batch statistics
=====================  ============================================================================

Works on :mod:`bnlab` and ``torch.nn`` batch-norm layers; the model is never modified (the data passes run
on a copy).

Example::

    >>> from bnlab.tools.doctor import diagnose
    >>> report = diagnose(model, [x1, x2])           # tensors, (x, y) pairs or a loader
    >>> print(report.format())                       # the table and the findings
    >>> report.to_dict()                             # the same as JSON-ready data
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from bnlab import functional as F
from bnlab import protocol
from bnlab.tools.fold import find_conv_bn_pairs, output_tensors
from bnlab.tools.recalibrate import batch_inputs

__all__ = ["diagnose", "DoctorReport", "Finding", "LayerHealth"]

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """One problem: which check, where, how bad, what was seen and what to do."""

    check: str
    layer: str
    severity: str
    evidence: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.layer}: {self.check} — {self.evidence}\n    fix: {self.fix}"


@dataclass
class LayerHealth:
    """Per-layer measurements (``None`` where a measurement did not apply or no data was given)."""

    layer: str
    kind: str
    num_features: int
    mode: str                                   # "batch stats" or "running stats" at inference
    momentum: Optional[float]
    values_per_channel: Optional[int] = None    # smallest over the given batches
    train_eval_gap: Optional[float] = None      # relative RMS difference of the layer output, largest over batches
    mean_distance: Optional[float] = None       # max over channels |μ_data − μ_run| / σ_run
    var_ratio: Optional[float] = None           # max over channels of max(v/v_run, v_run/v)
    dead_channels: int = 0


@dataclass
class DoctorReport:
    """The layers' measurements, the findings and the whole model's train-vs-eval output gap."""

    layers: list[LayerHealth] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    model_gap: Optional[float] = None
    batches: int = 0

    @property
    def healthy(self) -> bool:
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def to_dict(self) -> dict:
        return {"healthy": self.healthy, "batches": self.batches, "model_train_eval_gap": self.model_gap,
                "layers": [asdict(layer) for layer in self.layers],
                "findings": [asdict(f) for f in self.findings]}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    def format(self) -> str:
        """A fixed-column table of the layers, then the findings."""
        def num(v, fmt="{:.3g}"):
            return "-" if v is None else fmt.format(v)
        name_width = max([5] + [len(layer.layer) for layer in self.layers])
        head = (f"{'layer':{name_width}s}  {'kind':14s} {'C':>5s} {'values/ch':>9s} {'gap':>9s} "
                f"{'mean dist':>9s} {'var ratio':>9s} {'dead':>4s}  at inference")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.layer:{name_width}s}  {r.kind[:14]:14s} {r.num_features:5d} "
                         f"{num(r.values_per_channel, '{:d}'):>9s} {num(r.train_eval_gap):>9s} "
                         f"{num(r.mean_distance):>9s} {num(r.var_ratio):>9s} {r.dead_channels:4d}  {r.mode}")
        lines.append("")
        if self.model_gap is not None:
            lines.append(f"model output, batch statistics vs running statistics: relative gap {self.model_gap:.3g} "
                         f"over {self.batches} batch(es)")
        if not self.findings:
            lines.append("no findings: every batch-norm layer looks healthy")
        else:
            counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
            groups = self.grouped()
            lines.append(f"{len(self.findings)} finding(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                         + (f" (in {len(groups)} groups of identical findings)" if len(groups) < len(self.findings)
                            else ""))
            lines += [_format_group(group) for group in groups]
        return "\n".join(lines)

    def grouped(self) -> list[list[Finding]]:
        """The findings with the same check, severity, evidence and fix (differing only in the layer, e.g.
        every layer of a model built with Keras's momentum) as one group each, in the order of their first
        member; :meth:`format` prints a group as one finding with its count and layers."""
        groups: dict[tuple, list[Finding]] = {}
        for f in self.findings:
            groups.setdefault((f.check, f.severity, f.evidence, f.fix), []).append(f)
        return list(groups.values())

    def __str__(self) -> str:
        return self.format()


SHOWN_LAYERS = 4   # layers named in a group's line; the rest are counted


def _format_group(group: list[Finding]) -> str:
    first = group[0]
    if len(group) == 1:
        return str(first)
    names = [f.layer for f in group]
    shown = ", ".join(names[:SHOWN_LAYERS]) + (f" and {len(names) - SHOWN_LAYERS} more"
                                               if len(names) > SHOWN_LAYERS else "")
    return (f"[{first.severity}] {len(group)} layers ({shown}): {first.check} — {first.evidence}\n"
            f"    fix: {first.fix}")


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------

def _static_findings(name: str, m: nn.Module, health: LayerHealth, for_inference: bool,
                     dead_gamma: float) -> list[Finding]:
    found = []
    if for_inference and protocol.uses_batch_stats(m):
        why = ("it has no running statistics (track_running_stats=False)" if m.running_mean is None else
               "use_batch_stats=True" if getattr(m, "use_batch_stats", None) else "the layer is in training mode")
        found.append(Finding("train_mode", name, "error",
                             f"{why}: at inference it normalizes with the statistics of whatever batch it gets "
                             f"(outputs depend on the other samples; a batch of 1 fails)",
                             "call model.eval() before inference" if m.training and m.running_mean is not None
                             else "use running statistics at inference (track_running_stats=True, "
                                  "use_batch_stats=None) or a batch-independent norm"))
    if (for_inference and m.running_mean is not None and int(m.num_batches_tracked) == 0
            and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())):
        found.append(Finding("initial_statistics", name, "warning",
                             "the running statistics are still at their initial values (mean 0, variance 1, "
                             "num_batches_tracked 0): the layer never ran in training mode, or a checkpoint "
                             "was loaded without its buffers",
                             "train the model, or compute the statistics with bnlab.tools.recalibrate.recalibrate_bn; "
                             "load checkpoints with their buffers (load_state_dict(strict=True))"))
    momentum = getattr(m, "momentum", None)
    if momentum is not None and momentum > 0.5:
        found.append(Finding("momentum_convention", name, "warning",
                             f"momentum={momentum}: PyTorch's convention is "
                             f"new = (1 − momentum)·old + momentum·batch, "
                             f"so the running statistics keep only {1 - momentum:.2g} of their history per step; "
                             f"{momentum} looks like Keras/TF's convention (which weights the old value)",
                             f"use momentum={1 - momentum:.3g} (= 1 − {momentum})"))
    if m.running_mean is not None:
        bad = ~torch.isfinite(m.running_mean) | ~torch.isfinite(m.running_var) | (m.running_var < 0)
        if bad.any():
            channels = bad.nonzero().flatten().tolist()
            found.append(Finding("nonfinite_stats", name, "error",
                                 f"running statistics not finite (or negative variance) in {len(channels)} channel(s) "
                                 f"{channels[:8]}{'…' if len(channels) > 8 else ''}",
                                 "recompute them with bnlab.tools.recalibrate.recalibrate_bn; under AMP wrap steps in "
                                 "bnlab.tools.amp.BNStatsGuard so overflowing steps do not reach them"))
    weight = m.weight
    if weight is not None:
        dead = (weight.detach().abs() < dead_gamma).nonzero().flatten().tolist()
        health.dead_channels = len(dead)
        if dead:
            all_dead = len(dead) == m.num_features
            found.append(Finding("dead_channels", name, "info" if all_dead else "warning",
                                 f"{len(dead)} of {m.num_features} channels have |γ| < {dead_gamma:g} "
                                 f"{dead[:8]}{'…' if len(dead) > 8 else ''}: their output is the constant β",
                                 "all γ = 0 is expected at initialization with zero_init_residual; after training, "
                                 "prune these channels or check weight decay on γ" if all_dead else
                                 "prune these channels, or lower the weight decay on γ/β"))
    return found


def _bias_findings(model: nn.Module, layers: dict[str, nn.Module]) -> list[Finding]:
    pairs, _, _, _ = find_conv_bn_pairs(model)
    found = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), layers.get(bn_name)
        if bn is None or conv.bias is None or getattr(bn, "use_batch_stats", None) is False:
            continue
        found.append(Finding("redundant_bias", bn_name, "info",
                             f"{conv_name} ({type(conv).__name__}) has a bias and feeds this layer directly; the "
                             f"batch mean subtraction cancels it ({conv.bias.numel()} wasted parameters)",
                             f"build {conv_name} with bias=False (BN's β plays its part)"))
    return found


def _layer_gap(x: Tensor, m: nn.Module) -> float:
    """Relative RMS difference between the layer's output with batch and with running statistics."""
    x = x.detach().double()
    w = None if m.weight is None else m.weight.detach().double()
    b = None if m.bias is None else m.bias.detach().double()
    with_batch = TF.batch_norm(x, None, None, w, b, True, 0.0, m.eps)
    with_running = TF.batch_norm(x, m.running_mean.double(), m.running_var.double(), w, b, False, 0.0, m.eps)
    return float((with_batch - with_running).norm() / with_running.norm().clamp_min(1e-12))


def _relative_gap(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b))
    den = sum(float(x.double().norm() ** 2) for x in b)
    return math.sqrt(num / max(den, 1e-24))


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------

def diagnose(model: nn.Module, batches: Union[Tensor, Iterable, None] = None, *, num_batches: int = 8,
             for_inference: bool = True, gap_tol: float = 0.1, mean_tol: float = 0.5, var_tol: float = 2.0,
             min_values: int = 16, dead_gamma: float = 1e-3) -> DoctorReport:
    """Check every batch-norm layer of ``model``; returns a :class:`DoctorReport`.

    Args:
        model: the network, in the state it is used in (its mode matters for ``train_mode``).
        batches: one input tensor or mapping, a list of tensors, ``(input, target)`` pairs or mappings
            (``{"pixel_values": ...}`` is called as ``model(**batch)``; see
            :func:`bnlab.tools.recalibrate.batch_inputs`), or a loader; without them only the checks that need
            no data run.
        num_batches: use at most this many batches.
        for_inference: the model is meant for inference as it is (``False`` skips ``train_mode``).
        gap_tol: relative RMS output gap (batch vs running statistics) above which to report.
        mean_tol: running mean off by more than this many running standard deviations.
        var_tol: running variance off by more than this factor (either way).
        min_values: fewest values per channel for trustworthy batch statistics.
        dead_gamma: ``|γ|`` below which a channel counts as dead.
    """
    layers = {name: m for name, m in model.named_modules() if protocol.is_batch_norm(m)}
    report = DoctorReport()
    if not layers:
        raise ValueError(f"doctor: {type(model).__name__} contains no batch-norm layer to check")
    for name, m in layers.items():
        health = LayerHealth(name, type(m).__name__, m.num_features,
                             "batch stats" if protocol.uses_batch_stats(m) else "running stats",
                             getattr(m, "momentum", None))
        report.layers.append(health)
        report.findings += _static_findings(name, m, health, for_inference, dead_gamma)
    report.findings += _bias_findings(model, layers)
    if batches is not None:
        _data_checks(model, layers, batches, num_batches, report, gap_tol, mean_tol, var_tol, min_values)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    names = list(layers) + ["<model>"]
    report.findings.sort(key=lambda f: (order[f.severity], names.index(f.layer) if f.layer in names else 0))
    return report


@torch.no_grad()
def _data_checks(model, layers, batches, num_batches, report, gap_tol, mean_tol, var_tol, min_values) -> None:
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    inputs = []
    for batch in batches:
        if len(inputs) >= num_batches:
            break
        inputs.append(batch_inputs(batch))
    if not inputs:
        raise ValueError("doctor: the batches gave no input")
    report.batches = len(inputs)

    probe = copy.deepcopy(model).eval()            # the user's model is never touched
    probe_layers = dict(probe.named_modules())
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}
    def record(name):
        return lambda module, args: seen[name].append(args[0].detach())
    hooks = [probe_layers[name].register_forward_pre_hook(record(name)) for name in layers]
    eval_out = [output_tensors(probe(*args, **kwargs)) for args, kwargs in inputs]
    for h in hooks:
        h.remove()
    # the same batches with every BN normalizing by batch statistics (as in training), the rest in eval mode
    for name in layers:
        layer = probe_layers[name]
        if getattr(type(layer), "use_batch_stats", None) is not False and layer.running_mean is not None:
            layer.train()
            if "use_batch_stats" in layer.__dict__ or hasattr(type(layer), "use_batch_stats"):
                layer.use_batch_stats = None
    train_out = [output_tensors(probe(*args, **kwargs)) for args, kwargs in inputs]
    if all(eval_out) and all(train_out):
        report.model_gap = _relative_gap([t for ts in train_out for t in ts], [t for ts in eval_out for t in ts])
        if report.model_gap > gap_tol:
            report.findings.append(Finding(
                "train_eval_gap", "<model>", "warning",
                f"the model's output with batch statistics differs from its output with running statistics by "
                f"{report.model_gap:.3g} (relative RMS) on the given batches",
                "recalibrate the running statistics on training data (bnlab.tools.recalibrate.recalibrate_bn), check "
                "the layers flagged stale_statistics, or freeze statistics when fine-tuning with small batches"))

    for health in report.layers:
        name, m = health.layer, layers[health.layer]
        xs = [x for x in seen[name] if x.numel() > 0]
        if not xs:
            continue
        health.values_per_channel = min(x.numel() // x.shape[1] for x in xs)
        if health.values_per_channel < min_values:
            shape = tuple(min(xs, key=lambda x: x.numel()).shape)
            report.findings.append(Finding(
                "few_values", name, "warning",
                f"batch statistics from only {health.values_per_channel} value(s) per channel (input {shape}); "
                f"they are noisy estimates and training/inference behaviour diverge",
                "use larger batches, BatchRenorm (bnlab.nn.variants.BatchRenorm*), frozen statistics when fine-tuning "
                "(bnlab.tools.freeze.freeze_stats), or a batch-independent norm (GroupNorm/LayerNorm)"))
        finite = all(bool(torch.isfinite(x).all()) for x in xs)
        if not finite:
            report.findings.append(Finding(
                "nonfinite_stats", name, "error", "NaN/Inf in this layer's input on the given batches, so its "
                "batch statistics are not finite", "find the layer that overflows upstream; under AMP use "
                "GradScaler and bnlab.tools.amp.BNStatsGuard"))
            continue
        if m.running_mean is None or not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
            continue
        health.train_eval_gap = max(_layer_gap(x, m) for x in xs)
        stats = F.merge_moments(*(F.moments(x.double()) for x in xs))
        mean, var = stats.mean, stats.m2 / max(stats.count - 1, 1)                 # unbiased, as Tensor.var
        run_mean, run_var = m.running_mean.double(), m.running_var.double().clamp_min(0)
        health.mean_distance = float(((mean - run_mean).abs() / (run_var + m.eps).sqrt()).max())
        ratio = (var + m.eps) / (run_var + m.eps)
        health.var_ratio = float(torch.maximum(ratio, 1 / ratio).max())
        if health.mean_distance > mean_tol or health.var_ratio > var_tol:
            worst = int(((mean - run_mean).abs() / (run_var + m.eps).sqrt()).argmax())
            report.findings.append(Finding(
                "stale_statistics", name, "warning",
                f"on the given batches the channel means are up to {health.mean_distance:.3g} running std away from "
                f"running_mean (channel {worst}: {float(mean[worst]):.3g} vs {float(run_mean[worst]):.3g}) and the "
                f"variances differ by up to x{health.var_ratio:.3g}",
                "recompute the statistics on training data (bnlab.tools.recalibrate.recalibrate_bn), e.g. after weight "
                "averaging or a change of data; if the batches are not from the training distribution, "
                "this may be a domain shift"))
        if health.train_eval_gap > gap_tol:
            report.findings.append(Finding(
                "train_eval_gap", name, "warning",
                f"output with batch statistics differs from output with running statistics by "
                f"{health.train_eval_gap:.3g} (relative RMS)",
                "recalibrate the running statistics (bnlab.tools.recalibrate.recalibrate_bn) or use larger batches"))
