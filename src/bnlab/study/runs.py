"""What every run is built from — its data and its network — and the training run itself.

:func:`load_data` and :func:`build_model` serve every kind of run (:mod:`bnlab.study.kinds`);
:func:`run_train` is the ``train`` kind: :func:`bnlab.train.train` with a :class:`Probe` callback that
records the loss every step and, every ``eval_every`` steps, the accuracy/loss on a fixed validation
subset and on a training subset (the curves claims 2–5 choose on); the test set is evaluated once, on the
final model. A run of plain BN (``norm: "bn"``) ends with a :func:`bn_snapshot` of one channel of its
first residual block's first BN, which the report draws as BN's four steps.

Everything is built from the same public pieces a user would call: :func:`bnlab.models.create`,
:func:`bnlab.data.load`, :func:`bnlab.train.train`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Optional

import torch
from torch import nn

__all__ = ["run_train", "run_train_stack", "stack_group", "load_data", "data_key", "build_model", "Probe", "model_dims", "bn_snapshot",
           "SNAPSHOT_LAYER", "SNAPSHOT_EXAMPLES", "SNAPSHOT_VALUES"]


@functools.lru_cache(maxsize=8)
def _load(name: str, val_size: int, subset: Optional[int], device: str, train_size: Optional[int] = None,
          image_size: Optional[int] = None):
    import bnlab.data
    data = bnlab.data.load(name, seed=0, device=device)
    if image_size is not None:
        data = bnlab.data.downsample(data, int(image_size))
    if val_size:
        data = bnlab.data.split_validation(data, val_size, seed=0)
    else:
        data.val_x, data.val_y = data.train_x[:0], data.train_y[:0]
    if train_size is not None and int(train_size) >= len(data.train_y):
        train_size = None  # at most what is left: all of it
    for size in (train_size, subset):  # the profile's training subset, then a claim's smaller one within it
        if size is not None:
            index = bnlab.data.balanced_subset(data.train_y, int(size), data.num_classes, seed=0)
            index = index.to(data.train_y.device)
            val_x, val_y = data.val_x, data.val_y
            data = dataclasses.replace(data, train_x=data.train_x[index], train_y=data.train_y[index])
            data.val_x, data.val_y = val_x, val_y
    return data


def data_key(spec: dict) -> tuple:
    """What identifies a spec's data (:func:`load_data`'s cache key): runs with equal keys see the same
    examples."""
    return (spec["dataset"], int(spec.get("val_size") or 0), spec.get("subset"), spec.get("device", "cpu"),
            spec.get("train_size"), spec.get("image_size"))


def load_data(spec: dict):
    """The spec's dataset, cached per process: on an image dataset first average-pooled to ``image_size``
    (:func:`bnlab.data.downsample`) when the spec sets it; ``train_x/train_y`` are the training examples
    minus a stratified validation split of ``spec["val_size"]`` (``val_x/val_y``, carved with seed 0 from
    the whole training set), then the class-balanced ``train_size`` subset of what remains (at most all of
    it), then the optional class-balanced ``subset`` of that; ``test_x/test_y`` are the whole test set,
    which no choice may use (it is only reported). Every run sees the same examples; only its seed varies.
    """
    return _load(*data_key(spec))


def model_dims(data) -> int:
    """1 for sequence data (N, C, L), 2 for images (N, C, H, W)."""
    return 1 if data.train_x.dim() == 3 else 2


def _norm(spec: dict, dims: int):
    """The ``norm`` argument for :func:`bnlab.models.create`: ``ghost:K`` becomes a GhostBatchNorm
    partial; ``noisy_bn`` is ordinary BN (claim 1's loop adds its noise while training)."""
    norm = spec.get("norm", "bn")
    if norm.startswith("ghost:"):
        from bnlab.nn.variants import GhostBatchNorm1d, GhostBatchNorm2d
        cls = GhostBatchNorm1d if dims == 1 else GhostBatchNorm2d
        return functools.partial(cls, virtual_batch_size=int(norm.split(":", 1)[1]))
    if norm == "noisy_bn":
        return "bn"
    return norm


def build_model(spec: dict, data) -> nn.Module:
    """The spec's network: a CIFAR-style ResNet of ``depth`` (1-D when the data are sequences)."""
    import bnlab.models
    dims = model_dims(data)
    name = "resnet1d" if dims == 1 else "resnet"
    model = bnlab.models.create(name, norm=_norm(spec, dims), in_channels=data.in_channels,
                                num_classes=data.num_classes, width=spec.get("width", 1.0),
                                plain=spec.get("plain", False), depth=spec.get("depth", 8), fused=False,
                                init_seed=spec["seed"] if spec.get("init") == "paired" else None)
    return model.to(spec.get("device", "cpu"))


class Fitted(Exception):
    """Raised by :class:`Probe` to end a run whose training accuracy reached ``stop_at_train_acc``."""


class Probe:
    """A :func:`bnlab.train.train` callback: the loss at every step, and every ``eval_every`` steps (never,
    when 0: the run then records only its final evaluation) the accuracy/loss on the first
    ``val_eval_size`` validation examples (a fixed subset) and on the first ``train_eval_size`` training
    examples, with the training wall time spent so far (evaluation time
    excluded). It never sees the test set. With ``stop_at_train_acc`` it ends training (raising
    :class:`Fitted`) at the first evaluation whose training accuracy reaches it."""

    def __init__(self, data, eval_every: int, train_eval_size: int = 0, val_eval_size: Optional[int] = None,
                 stop_at_train_acc: Optional[float] = None) -> None:
        self.eval_every = int(eval_every)
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {eval_every}")
        self.val_x, self.val_y = data.val_x[:val_eval_size], data.val_y[:val_eval_size]
        self.train_x, self.train_y = data.train_x[:train_eval_size], data.train_y[:train_eval_size]
        self.losses: list[float] = []
        self.stop_at_train_acc = stop_at_train_acc
        self.curve: dict[str, list] = {"step": [], "seconds": [], "val_acc": [], "val_loss": [],
                                       "train_acc": [], "train_loss": []}
        self._start = time.perf_counter()
        self._eval_seconds = 0.0

    def on_step(self, step, model, loss, batch) -> None:
        self.losses.append(float(loss))
        if self.eval_every and len(self.losses) % self.eval_every == 0:
            self.evaluate(model, len(self.losses))
            fitted = self.curve["train_acc"][-1]
            if self.stop_at_train_acc is not None and fitted is not None and fitted >= self.stop_at_train_acc:
                raise Fitted(f"training accuracy {100 * fitted:.1f}% at step {len(self.losses)}")

    def evaluate(self, model, step: int) -> None:
        started = time.perf_counter()
        val_loss, val_acc = _evaluate(model, self.val_x, self.val_y)
        train_loss, train_acc = _evaluate(model, self.train_x, self.train_y)
        c = self.curve
        c["step"].append(step)
        c["seconds"].append(started - self._start - self._eval_seconds)
        for name, value in (("val_acc", val_acc), ("val_loss", val_loss),
                            ("train_acc", train_acc), ("train_loss", train_loss)):
            c[name].append(_finite_or_none(value))
        self._eval_seconds += time.perf_counter() - started


def _evaluate(model, x, y) -> tuple[float, float]:
    """(loss, accuracy) in eval mode, or NaNs for no examples; leaves the model's mode as it was."""
    from bnlab.train import evaluate
    if not len(x):
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    try:
        return evaluate(model, x, y)
    finally:
        model.train(was_training)


def weight_norm(model: nn.Module) -> float:
    """‖W‖₂ over every convolution and linear weight (what weight decay shrinks)."""
    from bnlab.study.signal import weight_layers
    return float(torch.sqrt(sum(m.weight.detach().double().pow(2).sum() for _, m in weight_layers(model))))


SNAPSHOT_LAYER = "blocks.0.branch.bn1"  # the first BN inside a residual branch: the report's diagram shows it
SNAPSHOT_EXAMPLES = 256                 # one fixed batch: the first training examples
SNAPSHOT_VALUES = 512                   # values of the channel kept for the histograms (evenly spaced)


def bn_snapshot(model: nn.Module, x: torch.Tensor, layer: str = SNAPSHOT_LAYER, channel: int = 0,
                max_values: int = SNAPSHOT_VALUES) -> Optional[dict]:
    """One channel of one BN layer of a trained ``model`` on the batch ``x``: what BN's four steps do to it.

    The model runs in eval mode on ``x`` with a hook on ``layer``; its input ``x_c`` (channel ``channel``,
    every example and position) gives the batch statistics μ_B and σ²_B (biased, as BN normalizes with),
    and the layer's own output is taken twice on that input: in eval mode with the running statistics (as at
    inference) and, by a copy in training mode, with the batch statistics (as during training). At most
    ``max_values`` evenly spaced values of each are kept, to 6 significant digits. ``None`` when the model
    has no such layer (or a non-finite input). Leaves the model's mode and statistics as they were.
    """
    import copy

    module = dict(model.named_modules()).get(layer)
    if (module is None or not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine
            or not module.track_running_stats):
        return None
    seen = {}
    hook = module.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0].detach(),
                                                                                y_eval=output.detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
        model.train(was_training)
    with torch.no_grad():
        y_batch = copy.deepcopy(module).train()(seen["x"])  # a copy: the layer's running statistics stay

    def channel_values(t):  # (N, C, *) → channel c over every example and position
        return t.transpose(0, 1)[channel].reshape(-1)
    values = channel_values(seen["x"]).double()
    if not torch.isfinite(values).all():
        return None
    keep = torch.linspace(0, values.numel() - 1, min(max_values, values.numel())).round().long()

    def kept(t):  # 6 significant digits: what a histogram needs, a third of the JSON
        return [float(f"{v:.6g}") for v in channel_values(t).float()[keep].tolist()]
    return {"layer": layer, "channel": channel, "examples": int(x.shape[0]), "values": int(values.numel()),
            "x": kept(seen["x"]), "y_batch": kept(y_batch), "y_eval": kept(seen["y_eval"]),
            "batch_mean": float(values.mean()), "batch_var": float(values.var(unbiased=False)),
            "weight": float(module.weight[channel].detach()), "bias": float(module.bias[channel].detach()),
            "running_mean": float(module.running_mean[channel]), "running_var": float(module.running_var[channel]),
            "eps": float(module.eps)}


def _finite_or_none(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def _config(spec: dict, data):
    """The :class:`bnlab.train.TrainConfig` of a ``train`` spec."""
    from bnlab.train import TrainConfig
    max_steps = spec.get("max_steps")
    epochs = spec.get("epochs", 1)
    if max_steps is not None:  # the schedule spans whole epochs: make them just cover max_steps
        steps_per_epoch = max(1, len(data.train_x) // spec["batch_size"])
        epochs = min(epochs, math.ceil(max_steps / steps_per_epoch))
    return TrainConfig(epochs=epochs, batch_size=spec["batch_size"], lr=spec["lr"], optimizer="sgd",
                       momentum=spec.get("momentum", 0.9), nesterov=True,
                       weight_decay=spec.get("weight_decay", 0.0), norm_weight_decay=0.0,
                       schedule=spec.get("schedule", "onecycle"),
                       warmup_fraction=spec.get("warmup_fraction", 0.2), seed=spec["seed"],
                       device=spec.get("device", "cpu"), augment=False, max_steps=max_steps,
                       eval_every=0, log_steps=False)  # end only; the probe evaluates during training


def _start(spec: dict, data):
    """A ``train`` run before its first step: (model, config, probe, initial weight norm)."""
    from bnlab.train import set_seed
    set_seed(spec["seed"])
    model = build_model(spec, data)
    probe = Probe(data, spec.get("eval_every", 10), train_eval_size=spec.get("train_eval_size", 0),
                  val_eval_size=spec.get("val_eval_size"), stop_at_train_acc=spec.get("stop_at_train_acc"))
    return model, _config(spec, data), probe, weight_norm(model)


def _result(spec: dict, data, model: nn.Module, probe: Probe, initial_norm: float, status: str,
            reason: str) -> tuple[str, dict]:
    """A ``train`` run after its last step: (status, result) from the final model and the probe."""
    if not probe.curve["step"] or probe.curve["step"][-1] != len(probe.losses):
        probe.evaluate(model, len(probe.losses))  # always end with an evaluation of the final model
    losses = [_finite_or_none(v) for v in probe.losses]
    val_loss, val_acc = _evaluate(model, data.val_x, data.val_y)
    test_loss, test_acc = _evaluate(model, data.test_x[:spec.get("test_eval_size")],
                                    data.test_y[:spec.get("test_eval_size")])
    final = {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss,
             "train_acc": probe.curve["train_acc"][-1], "train_loss": probe.curve["train_loss"][-1]}
    result = {"losses": losses, "curve": probe.curve, "initial_loss": losses[0] if losses else None,
              "final": {k: _finite_or_none(v) if v is not None else None for k, v in final.items()},
              "weight_norm": {"initial": initial_norm, "final": _finite_or_none(weight_norm(model))},
              "reason": reason, "steps": len(losses), "chance": 1.0 / data.num_classes}
    if spec.get("norm", "bn") == "bn" and status == "done":
        snapshot = bn_snapshot(model, data.train_x[:SNAPSHOT_EXAMPLES])
        if snapshot is not None:
            result["bn_snapshot"] = snapshot
    return status, result


def run_train(spec: dict) -> tuple[str, dict]:
    """One ``train`` run: (status, result) with the loss per step, the probe's curves and the final model's
    validation, test and training accuracy."""
    from bnlab.train import train
    data = load_data(spec)
    model, config, probe, initial_norm = _start(spec, data)
    # train() evaluates its "test" split after the last epoch: hand it the validation subset, so the
    # test set is touched exactly once, below, on the final model
    seen = dataclasses.replace(data, test_x=probe.val_x, test_y=probe.val_y)
    try:
        history = train(model, seen, config, callbacks=[probe], progress=False)
        status, reason = history.status, history.reason
    except Fitted as fitted:   # stopped where it fits its training examples (the model is as it was then)
        status, reason = "done", f"fitted: {fitted}"
    return _result(spec, data, model, probe, initial_norm, status, reason)


STACK_FREE = ("seed", "lr")   # what the members of one stack may differ in


def stack_group(spec: dict) -> str:
    """What ``train`` (and ``ics``) specs must share to run as one stack (:func:`run_train_stack`): all but
    the seed and the learning rate (:class:`bnlab.models.StackedSGD` steps each member at its own)."""
    import json
    return json.dumps({k: v for k, v in spec.items() if k not in STACK_FREE}, sort_keys=True)


def run_train_stack(specs: list[dict]) -> list[tuple[str, dict]]:
    """Several ``train`` runs differing only in their seed and learning rate, trained as one
    :func:`bnlab.models.stack`: the same (status, result) as :func:`run_train` gives each, up to float rounding.

    Member ``k`` starts from the network :func:`run_train` would build for its seed, sees its seed's
    batches in its seed's order, and is stepped by SGD exactly as :func:`bnlab.train.train` steps a lone
    network at its own rate (:class:`bnlab.models.StackedSGD`: same schedule, momentum, weight-decay groups); its probe evaluates it as a network of its own
    (its weights copied out of the stack). A member that ends early — it fitted its training examples, or
    diverged — is finished then, as a lone run would be, and the others go on in a stack without it
    (:meth:`bnlab.models.Stacked.narrowed`, their momentum carried over): no step is spent on a finished
    member. Every result records ``stack``: how many seeds were trained together, and this one's place.
    """
    import bnlab.models
    from bnlab.data.loader import Loader
    from bnlab.train import divergence, lr_factor, param_groups

    groups = {stack_group(s) for s in specs}
    if len(groups) != 1:
        raise ValueError(f"run_train_stack: the specs must differ only in their seed and lr ({len(groups)} groups)")
    first = specs[0]
    data = load_data(first)
    started = [_start(spec, data) for spec in specs]
    models = [s[0] for s in started]
    config, probes = started[0][1], [s[2] for s in started]
    rates = [s[1].lr for s in started]
    k = len(specs)

    def sgd(stack):
        return bnlab.models.StackedSGD(stack, [rates[i] for i in live],
                                       param_groups(stack, config.weight_decay, config.norm_weight_decay),
                                       momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)

    live = list(range(k))   # the members still training: the stack's members, in its order
    stacked = bnlab.models.stack(models)
    stacked.train()
    optimizer = sgd(stacked)
    loaders = [Loader(data.train_x, data.train_y, config.batch_size, shuffle=True, drop_last=config.drop_last,
                      augment=False, seed=spec["seed"], crop_padding=data.crop_padding) for spec in specs]
    steps_per_epoch, total = len(loaders[0]), config.epochs * len(loaders[0])
    outcomes: list[Optional[tuple[str, dict]]] = [None] * k

    def finish(i: int, status: str, reason: str) -> None:
        stacked.write_to([models[j] for j in live], [live.index(i)])
        outcomes[i] = _result(specs[i], data, models[i], probes[i], started[i][3], status, reason)
        outcomes[i][1]["stack"] = {"members": k, "index": i}

    def narrow(ended: list[int]) -> None:
        """The stack without the members that ended this step (with their momentum buffers)."""
        nonlocal stacked, optimizer
        keep = [p for p, j in enumerate(live) if j not in ended]
        narrower = stacked.narrowed([models[j] for j in live], keep)
        old_live = list(live)
        live[:] = [old_live[p] for p in keep]
        narrower_optimizer = sgd(narrower)
        stacked.carry_optimizer_state(optimizer, narrower, narrower_optimizer, keep)
        stacked, optimizer = narrower, narrower_optimizer

    step = 0
    for epoch in range(config.epochs):
        for loader in loaders:
            loader.epoch = epoch
        for batches in zip(*loaders):
            if not live:
                break
            x = torch.stack([batches[i][0] for i in live])
            y = torch.stack([batches[i][1] for i in live])
            factor = lr_factor(step, total, config.schedule, config.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = factor
            losses = stacked.member_losses(stacked(x), y)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            step += 1
            values = dict(zip(live, losses.detach().tolist()))
            due = [p for p, i in enumerate(live)
                   if probes[i].eval_every and (len(probes[i].losses) + 1) % probes[i].eval_every == 0]
            if due:
                stacked.write_to([models[j] for j in live], due)
            ended = []
            for i in live:
                try:
                    probes[i].on_step(step, models[i], values[i], None)
                except Fitted as fitted:
                    finish(i, "done", f"fitted: {fitted}")
                    ended.append(i)
                    continue
                diverged = divergence(values[i], step, config.divergence_loss)
                if diverged is not None:
                    finish(i, "diverged", diverged)
                    ended.append(i)
            if config.max_steps is not None and step >= config.max_steps:
                for i in live:
                    if i not in ended:
                        finish(i, "done", f"max_steps={config.max_steps} reached")
                        ended.append(i)
            if ended:
                if len(ended) == len(live):
                    live.clear()
                else:
                    narrow(ended)
        if not live:
            break
    for i in list(live):
        finish(i, "done", f"{config.epochs} epochs")
    return outcomes
