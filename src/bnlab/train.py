"""The training engine: ``train(model, data, config) -> History``.

One loop for every experiment in the project: SGD (Nesterov momentum) or AdamW; one-cycle, cosine or
constant learning-rate schedules with linear warm-up; label smoothing; weight decay with norm parameters
and biases exempt (``norm_weight_decay``, default 0); on CUDA bf16 autocast, ``channels_last`` and
``torch.compile``. The data stay on the device (:class:`bnlab.data.Loader`).

A diverging run (non-finite loss, or a loss above ``divergence_loss``) stops with ``status="diverged"``
and keeps its history: divergence is a result, not a crash. A run is repeatable bit for bit on CPU
for a given seed. With ``checkpoint`` set, the full state is written atomically after every epoch (and
on Ctrl-C), and ``resume=True`` continues from it exactly, mid-epoch included.

Example::

    >>> from bnlab import data, models, train
    >>> ds = data.load("fashion-mnist", subset=5000)
    >>> train.set_seed(0)
    >>> net = models.create("resnet8", in_channels=1)
    >>> history = train.train(net, ds, train.TrainConfig(epochs=3, batch_size=128, lr=0.2))
    >>> history.final["test_acc"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.data import Dataset, Loader

__all__ = ["TrainConfig", "History", "train", "evaluate", "set_seed", "lr_factor", "param_groups",
           "resolve_device"]


# --------------------------------------------------------------------------------------------------
# configuration and results
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that decides a training run (saved with its :class:`History`)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1                  # peak learning rate
    optimizer: str = "sgd"           # "sgd" (momentum, optionally Nesterov) or "adamw"
    momentum: float = 0.9            # SGD momentum; AdamW's β1
    nesterov: bool = True
    weight_decay: float = 5e-4       # for conv/linear weights
    norm_weight_decay: float = 0.0   # for norm parameters, biases and scalars (every parameter with ndim <= 1)
    schedule: str = "onecycle"       # "onecycle" (linear up, linear down to 0), "cosine", "constant"
    warmup_fraction: float = 0.2     # fraction of all steps spent in linear warm-up from 0
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"             # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
    augment: Optional[bool] = None   # crop+flip; None: whatever the dataset says makes sense
    drop_last: bool = True           # drop the last incomplete training batch
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule still spans `epochs`)
    divergence_loss: float = 1e3     # a training loss above this (or non-finite) ends the run as diverged
    log_steps: bool = False          # record loss/acc/lr of every step in History.steps
    eval_every: int = 1              # evaluate on the test set every this many epochs (and after the last)
    checkpoint: Optional[str] = None  # path of the checkpoint file, written atomically after each epoch
    resume: bool = False             # continue from `checkpoint` if it exists
    amp: bool = False                # bf16 autocast (CUDA only)
    channels_last: bool = False      # NHWC memory format for 4-D inputs
    compile: bool = False            # torch.compile the model
    compile_mode: Optional[str] = None  # torch.compile mode: "reduce-overhead" captures CUDA graphs
    tta: bool = False                # evaluate with horizontal-flip test-time augmentation
    crop_padding: int = 2            # padding of the random crop, pixels

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an int >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 2, "batch_size must be an int >= 2"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be 'sgd' or 'adamw'"),
            (self.schedule in ("onecycle", "cosine", "constant"),
             "schedule must be 'onecycle', 'cosine' or 'constant'"),
            (0.0 <= self.warmup_fraction < 1.0, "warmup_fraction must be in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be None or >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.weight_decay >= 0 and self.norm_weight_decay >= 0, "weight decays must be >= 0"),
            (not self.resume or self.checkpoint, "resume=True needs a checkpoint path"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message} (got {self.to_dict()})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)


@dataclass
class History:
    """What a run produced.

    ``epochs``: one dict per epoch — epoch, step, train_loss, train_acc, test_loss, test_acc (``None`` when
    not evaluated that epoch), lr (at the epoch's end), time (cumulative training seconds, evaluation
    excluded), epoch_time. ``steps``: per-step dicts (step, loss, acc, lr) when ``log_steps``.
    ``status``: ``"done"`` or ``"diverged"`` (``"stopped"`` while a run is interrupted); ``reason`` says why.
    ``final``: test_acc, test_loss, train_acc, train_loss, best_test_acc, steps, seconds.
    """

    config: dict
    epochs: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    status: str = "running"
    reason: str = ""
    final: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})

    def save_json(self, path) -> None:
        _atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load_json(cls, path) -> "History":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={device!r}, but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def lr_factor(step: int, total_steps: int, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    Linear warm-up from 0 over ``warmup_fraction`` of the steps, then: ``onecycle`` linear decay to 0
    (the triangular one-cycle of Smith & Topin 2017, https://arxiv.org/abs/1708.07120), ``cosine`` half
    cosine to 0 (Loshchilov & Hutter 2016, https://arxiv.org/abs/1608.03983), ``constant`` 1.
    """
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
    if schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights of convolutions and linear layers (``weight_decay``) and every
    parameter with at most one dimension — norm γ/β, biases, SkipInit/Fixup scalars (``norm_weight_decay``).
    Frozen parameters are left out."""
    decay, exempt = [], []
    for p in model.parameters():
        if p.requires_grad:
            (exempt if p.ndim <= 1 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": exempt, "weight_decay": norm_weight_decay}) if g["params"]]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, config.norm_weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def _prepare(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024, tta: bool = False,
             amp: bool = False, channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode on ``(x, y)`` (the model's mode is
    restored). ``tta`` averages the logits of each input and its horizontal flip."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with _autocast(x.device, amp):
        for i in range(0, len(x), batch_size):
            xb, yb = _prepare(x[i:i + batch_size], channels_last), y[i:i + batch_size]
            logits = model(xb).float()
            if tta:
                logits = 0.5 * (logits + model(xb.flip(-1)).float())
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, len(x))
    return float(loss_sum) / n, float(correct) / n


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save(state, tmp)
    os.replace(tmp.name, path)


def _progress(enabled: Optional[bool], total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------

def train(model: nn.Module, data: Dataset, config: TrainConfig, callbacks: Optional[Sequence[Any]] = None,
          progress: Optional[bool] = None) -> History:
    """Train ``model`` on ``data`` as ``config`` says and return the :class:`History`.

    Args:
        model: any ``nn.Module`` mapping a batch of ``data.train_x`` to logits; moved to the device in place.
        data: a :class:`bnlab.data.Dataset` (moved to the device if it is not there).
        config: a :class:`TrainConfig`.
        callbacks: objects with optional ``on_step(step, model, loss, batch)`` (``loss`` a float, ``step``
            1-based) and ``on_epoch(epoch, model, record)`` methods.
        progress: a tqdm bar over each epoch's batches; ``None`` shows it only when stderr is a terminal.

    Under ``torchrun`` (an initialised process group) each rank trains on its shard of every epoch's
    permutation; pass a ``DistributedDataParallel`` model. Only rank 0 writes the checkpoint.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    callbacks = list(callbacks or [])
    device = resolve_device(config.device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    set_seed(config.seed)

    if data.train_x.device != device:
        data = data.to(device)
    model.to(device)
    if config.channels_last and data.train_x.dim() == 4:  # NHWC exists for images only
        model.to(memory_format=torch.channels_last)
    raw_model = model.module if hasattr(model, "module") else model
    forward = torch.compile(model, mode=config.compile_mode) if config.compile else model

    augment = data.augment if config.augment is None else config.augment
    loader = Loader(data.train_x, data.train_y, config.batch_size, shuffle=True, drop_last=config.drop_last,
                    augment=augment, seed=config.seed, crop_padding=config.crop_padding, rank=rank,
                    world_size=world_size)
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    optimizer = _make_optimizer(raw_model, config)
    history = History(config=config.to_dict(), meta={
        "model": type(raw_model).__name__, "parameters": sum(p.numel() for p in raw_model.parameters()),
        "dataset": data.name, "train_size": len(data.train_x), "device": str(device),
        "torch": torch.__version__, "world_size": world_size})

    state = {"epoch": 0, "batch": 0, "step": 0, "seconds": 0.0, "sums": None}
    ckpt_path = Path(config.checkpoint) if config.checkpoint else None
    if config.resume and ckpt_path is not None and ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if saved["config"] != config.to_dict():
            diff = {k: (saved["config"].get(k), v) for k, v in config.to_dict().items()
                    if saved["config"].get(k) != v and k not in ("resume", "checkpoint", "epochs", "max_steps")}
            if diff:
                raise ValueError(f"resume: {ckpt_path} was written with a different config; (saved, now): {diff}")
        raw_model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history = History.from_dict(saved["history"])
        history.config = config.to_dict()
        state = saved["state"]
        if state["sums"] is not None:
            state["sums"] = [state["sums"][0].to(device), state["sums"][1].to(device), state["sums"][2]]
        torch.set_rng_state(saved["rng_cpu"])

    def checkpoint() -> None:
        if ckpt_path is not None and rank == 0:
            _save_checkpoint(ckpt_path, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "history": history.to_dict(), "state": state,
                                         "config": config.to_dict(), "rng_cpu": torch.get_rng_state()})

    def finish(status: str, reason: str = "") -> History:
        history.status, history.reason = status, reason
        test_loss, test_acc = evaluate(raw_model, data.test_x, data.test_y, tta=config.tta, amp=config.amp,
                                       channels_last=config.channels_last)
        last = history.epochs[-1] if history.epochs else {}
        tested = [e["test_acc"] for e in history.epochs if e.get("test_acc") is not None] + [test_acc]
        history.final = {"test_acc": test_acc, "test_loss": test_loss, "train_acc": last.get("train_acc"),
                         "train_loss": last.get("train_loss"), "best_test_acc": max(tested),
                         "steps": state["step"], "seconds": state["seconds"]}
        checkpoint()
        return history

    if history.status in ("done", "diverged"):
        return history  # a finished run resumed: nothing left to do
    on_step = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    on_epoch = [cb.on_epoch for cb in callbacks if hasattr(cb, "on_epoch")]
    # a host synchronisation per step costs GPU time; on CPU it is free, so check every step there
    check_every = 1 if (device.type == "cpu" or on_step or config.log_steps) else 50
    model.train()

    for epoch in range(state["epoch"], config.epochs):
        loader.epoch = epoch
        sums = state["sums"] or [torch.zeros((), dtype=torch.float64, device=device),
                                 torch.zeros((), dtype=torch.int64, device=device), 0]
        skip = state["batch"]
        bar = _progress(progress, steps_per_epoch - skip, f"epoch {epoch + 1}/{config.epochs}")
        timer = _Timer(device)
        diverged = None
        try:
            for batch_index, (x, y) in enumerate(loader):
                if batch_index < skip:
                    continue  # resumed mid-epoch: the loader replays the epoch's randomness up to here
                lr = config.lr * lr_factor(state["step"], total_steps, config.schedule, config.warmup_fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = _prepare(x, config.channels_last)
                with _autocast(device, config.amp):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["step"] += 1
                state["batch"] = batch_index + 1
                detached = loss.detach()
                sums[0] += detached.double() * len(y)
                sums[1] += (logits.detach().argmax(1) == y).sum()
                sums[2] += len(y)
                if bar is not None:
                    bar.update(1)
                if state["step"] % check_every == 0 or on_step or config.log_steps:
                    value = float(detached)
                    if config.log_steps:
                        history.steps.append({"step": state["step"], "loss": value, "lr": lr,
                                              "acc": float((logits.detach().argmax(1) == y).float().mean())})
                    for fn in on_step:
                        fn(state["step"], raw_model, value, (x, y))
                    if not math.isfinite(value) or value > config.divergence_loss:
                        diverged = f"training loss {value:.4g} at step {state['step']} " + (
                            "is not finite" if not math.isfinite(value) else f"> divergence_loss {config.divergence_loss:g}")
                if diverged is None and config.max_steps is not None and state["step"] >= config.max_steps:
                    break
                if diverged:
                    break
        except KeyboardInterrupt:
            state["seconds"] += timer.seconds()
            state["sums"] = sums
            history.status, history.reason = "stopped", f"interrupted in epoch {epoch + 1}"
            checkpoint()
            raise
        finally:
            if bar is not None:
                bar.close()
        epoch_time = timer.seconds()
        state["seconds"] += epoch_time
        count = max(1, sums[2])
        train_loss, train_acc = float(sums[0]) / count, float(sums[1]) / count
        if diverged is None and not (math.isfinite(train_loss) and train_loss <= config.divergence_loss):
            diverged = f"mean training loss {train_loss:.4g} in epoch {epoch + 1} is not finite or > {config.divergence_loss:g}"
        epoch_done = state["batch"] >= steps_per_epoch
        stop_steps = config.max_steps is not None and state["step"] >= config.max_steps
        last = epoch + 1 == config.epochs or stop_steps or diverged is not None
        record = {"epoch": epoch + 1, "step": state["step"], "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": None, "test_acc": None, "lr": optimizer.param_groups[0]["lr"],
                  "time": state["seconds"], "epoch_time": epoch_time}
        if diverged is None and ((epoch + 1) % config.eval_every == 0 or last):
            record["test_loss"], record["test_acc"] = evaluate(
                raw_model, data.test_x, data.test_y, tta=config.tta, amp=config.amp,
                channels_last=config.channels_last)
        if epoch_done or last:
            history.epochs.append(record)
        state.update(epoch=epoch + 1 if epoch_done else epoch, batch=0 if epoch_done else state["batch"],
                     sums=None if epoch_done else sums)
        for fn in on_epoch:
            fn(epoch + 1, raw_model, record)
        if diverged is not None:
            return finish("diverged", diverged)
        if stop_steps:
            return finish("done", f"max_steps={config.max_steps} reached")
        checkpoint()
    return finish("done", f"{config.epochs} epochs")


class _Timer:
    """Seconds since creation: CUDA events on a GPU (the device's own clock, no idle host time counted
    before the work is queued), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.started
