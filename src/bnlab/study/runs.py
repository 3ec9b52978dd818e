"""Executing one spec: build the data and model it names, run it, return (status, result).

Three kinds of run (see :mod:`bnlab.study.specs`):

* ``train`` — :func:`bnlab.train.train` with a :class:`Probe` callback that records the loss every step
  and test/train accuracy every ``eval_every`` steps (the curves claims 2–5 need);
* ``ics`` — claim 1's own SGD loop, which also measures distribution shift, gradient ICS and smoothness
  (:mod:`bnlab.study.ics_loop`);
* ``signal`` — one forward/backward at initialization recording per-block statistics
  (:mod:`bnlab.study.signal`).

Everything is built from the same public pieces a user would call: :func:`bnlab.models.create`,
:func:`bnlab.data.load`, :func:`bnlab.train.train`.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from typing import Optional

import torch
from torch import nn

__all__ = ["execute", "load_data", "build_model", "Probe", "model_dims"]


@functools.lru_cache(maxsize=8)
def _load(name: str, subset: Optional[int], device: str):
    import bnlab.data
    return bnlab.data.load(name, subset=subset, seed=0, device=device)


@functools.lru_cache(maxsize=8)
def _split(name: str, subset: Optional[int], device: str, val_size: int):
    import copy
    from bnlab.data import balanced_subset
    ds = copy.copy(_load(name, subset, device))
    val = balanced_subset(ds.train_y, val_size, ds.num_classes, seed=0).to(ds.train_y.device)
    keep = torch.ones(len(ds.train_y), dtype=torch.bool, device=ds.train_y.device)
    keep[val] = False
    ds.val_x, ds.val_y = ds.train_x[val], ds.train_y[val]
    ds.train_x, ds.train_y = ds.train_x[keep], ds.train_y[keep]
    return ds


def load_data(spec: dict):
    """The spec's dataset (cached per process; the split and subset use seed 0 so every run sees the
    same examples and only the run's own seed varies). With ``val_size``, a stratified validation split
    (``val_x``/``val_y``) is carved from the training data and removed from ``train_x``/``train_y``."""
    if spec.get("val_size"):
        return _split(spec["dataset"], spec.get("subset"), spec.get("device", "cpu"), int(spec["val_size"]))
    return _load(spec["dataset"], spec.get("subset"), spec.get("device", "cpu"))


def model_dims(data) -> int:
    """1 for sequence data (N, C, L), 2 for images (N, C, H, W)."""
    return 1 if data.train_x.dim() == 3 else 2


def _norm(spec: dict, dims: int):
    """The ``norm`` argument for :func:`bnlab.models.create`: ``ghost:K`` becomes a GhostBatchNorm
    partial; ``noisy_bn`` and ``frozen_bn`` are ordinary BN (their difference is applied while training)."""
    norm = spec.get("norm", "bn")
    if norm.startswith("ghost:"):
        from bnlab.variants import GhostBatchNorm1d, GhostBatchNorm2d
        cls = GhostBatchNorm1d if dims == 1 else GhostBatchNorm2d
        return functools.partial(cls, virtual_batch_size=int(norm.split(":", 1)[1]))
    if norm in ("noisy_bn", "frozen_bn"):
        return "bn"
    return norm


def build_model(spec: dict, data) -> nn.Module:
    """The spec's network: a CIFAR-style ResNet of ``depth`` (1-D when the data are sequences)."""
    import bnlab.models
    dims = model_dims(data)
    name = "resnet1d" if dims == 1 else "resnet"
    model = bnlab.models.create(name, norm=_norm(spec, dims), in_channels=data.in_channels,
                                num_classes=data.num_classes, width=spec.get("width", 1.0),
                                plain=spec.get("plain", False), depth=spec.get("depth", 8), fused=False)
    return model.to(spec.get("device", "cpu"))


class Probe:
    """A :func:`bnlab.train.train` callback: the loss at every step, and every ``eval_every`` steps the
    test accuracy/loss and the accuracy/loss on the first ``train_eval_size`` training examples, with the
    training wall time spent so far (evaluation time excluded). Optionally freezes BN statistics after
    ``freeze_after`` steps (the "frozen" arm of claim 3)."""

    def __init__(self, data, eval_every: int, train_eval_size: int = 0,
                 freeze_after: Optional[int] = None, test_eval_size: Optional[int] = None) -> None:
        self.data, self.eval_every, self.freeze_after = data, max(1, int(eval_every)), freeze_after
        self.test_x, self.test_y = data.test_x[:test_eval_size], data.test_y[:test_eval_size]
        self.train_x, self.train_y = data.train_x[:train_eval_size], data.train_y[:train_eval_size]
        self.losses: list[float] = []
        self.curve: dict[str, list] = {"step": [], "seconds": [], "test_acc": [], "test_loss": [],
                                       "train_acc": [], "train_loss": []}
        self._start = time.perf_counter()
        self._eval_seconds = 0.0

    def on_step(self, step, model, loss, batch) -> None:
        self.losses.append(float(loss))
        count = len(self.losses)
        if self.freeze_after is not None and count == self.freeze_after:
            from bnlab.variants import freeze_stats
            freeze_stats(model)
        if count % self.eval_every == 0:
            self.evaluate(model, count)

    def evaluate(self, model, step: int) -> None:
        from bnlab.train import evaluate
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        test_loss, test_acc = evaluate(model, self.test_x, self.test_y)
        train_loss, train_acc = (evaluate(model, self.train_x, self.train_y) if len(self.train_x)
                                 else (math.nan, math.nan))
        model.train(was_training)
        c = self.curve
        c["step"].append(step)
        c["seconds"].append(started - self._start - self._eval_seconds)
        for name, value in (("test_acc", test_acc), ("test_loss", test_loss),
                            ("train_acc", train_acc), ("train_loss", train_loss)):
            c[name].append(_finite_or_none(value))
        self._eval_seconds += time.perf_counter() - started


def _finite_or_none(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def _run_train(spec: dict) -> tuple[str, dict]:
    from bnlab.train import TrainConfig, set_seed, train
    set_seed(spec["seed"])
    data = load_data(spec)
    model = build_model(spec, data)
    max_steps = spec.get("max_steps")
    epochs = spec.get("epochs", 1)
    if max_steps is not None:  # the schedule spans whole epochs: make them just cover max_steps
        steps_per_epoch = max(1, len(data.train_x) // spec["batch_size"])
        epochs = min(epochs, math.ceil(max_steps / steps_per_epoch))
    config = TrainConfig(epochs=epochs, batch_size=spec["batch_size"], lr=spec["lr"], optimizer="sgd",
                         momentum=spec.get("momentum", 0.9), nesterov=True,
                         weight_decay=spec.get("weight_decay", 0.0), norm_weight_decay=0.0,
                         schedule=spec.get("schedule", "onecycle"), seed=spec["seed"],
                         device=spec.get("device", "cpu"), augment=False, max_steps=max_steps,
                         eval_every=10 ** 6, log_steps=False)
    freeze_after = spec.get("freeze_after") if spec.get("norm") == "frozen_bn" else None
    probe = Probe(data, spec.get("eval_every", 10), freeze_after=freeze_after,
                  test_eval_size=spec.get("test_eval_size"), train_eval_size=spec.get("train_eval_size", 0))
    history = train(model, data, config, callbacks=[probe], progress=False)
    if not probe.curve["step"] or probe.curve["step"][-1] != len(probe.losses):
        probe.evaluate(model, len(probe.losses))  # always end with an evaluation of the final model
    losses = [_finite_or_none(v) for v in probe.losses]
    result = {"losses": losses, "curve": probe.curve, "initial_loss": losses[0] if losses else None,
              "final": history.final, "reason": history.reason, "steps": len(losses), "epochs": history.epochs,
              "chance": 1.0 / data.num_classes}
    return history.status, result


def execute(spec: dict) -> tuple[str, dict, Optional[str]]:
    """Run ``spec``; returns (status, result, error). Exceptions become status ``failed`` with the
    traceback as the error, so one broken run never stops a study."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per run: --jobs N runs use N cores, and results are reproducible
    try:
        if spec["kind"] == "train":
            status, result = _run_train(spec)
        elif spec["kind"] == "ics":
            from bnlab.study.ics_loop import run_ics
            status, result = run_ics(spec, load_data(spec), build_model)
        elif spec["kind"] == "signal":
            from bnlab.study.signal import run_signal
            status, result = run_signal(spec, load_data(spec), build_model)
        else:
            raise ValueError(f"unknown spec kind {spec['kind']!r}")
        return status, result, None
    except Exception:  # noqa: BLE001 — recorded in the store with its traceback
        return "failed", {}, traceback.format_exc()
    finally:
        torch.set_num_threads(previous_threads)
