"""The training engine: ``train(model, data, config) -> History``.

One loop for every experiment in the project: SGD (Nesterov momentum) or AdamW; one-cycle, cosine or
constant learning-rate schedules with linear warm-up; label smoothing; weight decay with norm parameters
and biases exempt (``norm_weight_decay``, default 0); on CUDA bf16 autocast, ``channels_last`` and
``torch.compile``. The data stay on the device (:class:`bnlab.data.Loader`).

A diverging run (non-finite loss, or a loss above ``divergence_loss``) stops with ``status="diverged"``
and keeps its history: divergence is a result, not a crash. A run is repeatable bit for bit on CPU
for a given seed. With ``checkpoint`` set, the full state is written atomically after every epoch (and
on Ctrl-C), and ``resume=True`` continues from it exactly, mid-epoch included (:mod:`bnlab.checkpoint`).
More ``epochs`` extend a run: an unfinished one's schedule is stretched to the new length; a finished
one gets a new cycle over the added epochs (onecycle and cosine warm up again from 0, where they
ended, and decay back to 0; constant stays at the peak): a new run of the added epochs that starts
from the finished one's weights and optimizer state.

Read top to bottom: the configuration and results, helpers, where a run stands (:class:`Position`,
:class:`EpochSums`), one run — :meth:`_Run.step` is the whole algorithm (schedule, forward, loss,
zero_grad, backward, step), the bookkeeping follows under its own heading — and the loop, :func:`train`.

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
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.checkpoint import (atomic_write_text, check_resumable, is_finished, load_checkpoint, read_torch_file,
                              save_checkpoint)
from bnlab.data import Dataset, Loader
from bnlab.errors import UserError

# read_torch_file and load_checkpoint live in bnlab.checkpoint; they stay importable from here
__all__ = ["divergence", "TrainConfig", "History", "EpochResult", "Position", "EpochSums", "train", "evaluate", "set_seed",
           "lr_factor", "param_groups", "resolve_device", "load_checkpoint", "read_torch_file"]


# --------------------------------------------------------------------------------------------------
# configuration and results
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that decides a training run (saved with its :class:`History`)."""

    epochs: int = 10                 # with resume, more than a finished run's add a new schedule cycle
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
    eval_every: Optional[int] = 1    # evaluate on the test set every this many epochs; 0 or None: after the last only
    checkpoint: Optional[str] = None  # path of the checkpoint file, written atomically after each epoch
    resume: bool = False             # continue from `checkpoint` if it exists
    amp: bool = False                # bf16 autocast (CUDA only)
    channels_last: bool = False      # NHWC memory format for 4-D inputs
    compile: bool = False            # torch.compile the model
    compile_mode: Optional[str] = None  # torch.compile mode: "reduce-overhead" captures CUDA graphs
    tta: bool = False                # evaluate with horizontal-flip test-time augmentation
    crop_padding: Optional[int] = None  # padding of the random crop, pixels; None: the dataset's (CIFAR 4, else 2)

    def __post_init__(self) -> None:
        def number(value, low, high=math.inf, low_open=False, high_open=False) -> bool:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
            return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)

        def whole(value, low) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        checks = [
            (whole(self.epochs, 1), "epochs must be an int >= 1", self.epochs),
            (whole(self.batch_size, 2), "batch_size must be an int >= 2", self.batch_size),
            (number(self.lr, 0, low_open=True), "lr must be a finite number > 0", self.lr),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be 'sgd' or 'adamw'", self.optimizer),
            (number(self.momentum, 0, 1, high_open=True), "momentum must be in [0, 1)", self.momentum),
            (self.schedule in ("onecycle", "cosine", "constant"),
             "schedule must be 'onecycle', 'cosine' or 'constant'", self.schedule),
            (number(self.warmup_fraction, 0, 1, high_open=True), "warmup_fraction must be in [0, 1)",
             self.warmup_fraction),
            (number(self.label_smoothing, 0, 1, high_open=True), "label_smoothing must be in [0, 1)",
             self.label_smoothing),
            (self.max_steps is None or whole(self.max_steps, 1), "max_steps must be None or an int >= 1",
             self.max_steps),
            (self.eval_every is None or whole(self.eval_every, 0),
             "eval_every must be an int >= 1, or 0 / None for the end only", self.eval_every),
            (number(self.weight_decay, 0), "weight_decay must be a finite number >= 0", self.weight_decay),
            (number(self.norm_weight_decay, 0), "norm_weight_decay must be a finite number >= 0",
             self.norm_weight_decay),
            (number(self.divergence_loss, 0, low_open=True), "divergence_loss must be a finite number > 0",
             self.divergence_loss),
            (self.crop_padding is None or whole(self.crop_padding, 0), "crop_padding must be None or an int >= 0",
             self.crop_padding),
            (isinstance(self.seed, int), "seed must be an int", self.seed),
            (not self.resume or self.checkpoint, "resume=True needs a checkpoint path", self.checkpoint),
        ]
        problems = [f"{message} (got {value!r})" for ok, message, value in checks if not ok]
        if problems:
            raise UserError(f"TrainConfig: {'; '.join(problems)}")

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
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

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


def resolve_device(device) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU) or a device string; raises :class:`UserError` for a
    device that does not exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a device: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available here; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"device {device!r} is not supported: expected auto, cpu, cuda or cuda:N")
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


def divergence(loss: float, step: int, limit: float) -> Optional[str]:
    """Why a run whose training loss at ``step`` is ``loss`` has diverged (non-finite, or above ``limit``,
    :attr:`TrainConfig.divergence_loss`), or ``None``."""
    if not math.isfinite(loss):
        return f"training loss {loss:.4g} at step {step} is not finite"
    if loss > limit:
        return f"training loss {loss:.4g} at step {step} > divergence_loss {limit:g}"
    return None


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights of convolutions and linear layers (``weight_decay``) and every
    parameter with at most one dimension — norm γ/β, biases, SkipInit/Fixup scalars (``norm_weight_decay``).
    Frozen parameters are left out. For a :class:`bnlab.models.Stacked` network the dimensions are its
    members' (a stacked classifier bias is ``(K, out)`` but a bias)."""
    decay, exempt = [], []
    ndim = getattr(model, "member_ndim", None)
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if (p.ndim if ndim is None else ndim[name]) <= 1 else decay).append(p)
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



# --------------------------------------------------------------------------------------------------
# where a run stands between two steps (what a checkpoint's "state" holds)
# --------------------------------------------------------------------------------------------------

@dataclass
class EpochSums:
    """Running sums over the training batches of one epoch, kept on the device: adding to them needs no
    host synchronisation, so a GPU never waits for the bookkeeping."""

    loss: Tensor     # Σ loss · batch size, float64
    correct: Tensor  # Σ correct predictions, int64
    examples: int    # Σ batch size

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochSums":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device), 0)

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Book one batch: its mean ``loss`` and ``logits`` (both detached) for labels ``y``."""
        self.loss += loss.double() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.examples += len(y)

    def means(self) -> tuple[float, float]:
        """(mean training loss, training accuracy) over the batches booked so far."""
        count = max(1, self.examples)
        return float(self.loss) / count, float(self.correct) / count

    def to_state(self) -> list:
        return [float(self.loss), int(self.correct), int(self.examples)]

    @classmethod
    def from_state(cls, state: list, device: torch.device) -> "EpochSums":
        return cls(torch.tensor(float(state[0]), dtype=torch.float64, device=device),
                   torch.tensor(int(state[1]), dtype=torch.int64, device=device), int(state[2]))


@dataclass
class Position:
    """Where a run stands between two steps."""

    epoch: int = 0                      # the epoch in progress, 0-based: every epoch before it is complete
    batch: int = 0                      # the next batch of that epoch
    step: int = 0                       # optimizer steps taken
    seconds: float = 0.0                # training seconds so far, evaluation excluded
    sums: Optional[EpochSums] = None    # the unfinished epoch's running sums (None between epochs)
    schedule_start: int = 0             # the epoch the lr schedule began at: > 0 once a finished run is extended

    def to_state(self) -> dict:
        """Plain types, for a checkpoint that loads with ``weights_only=True``."""
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "seconds": self.seconds,
                "sums": None if self.sums is None else self.sums.to_state(), "schedule_start": self.schedule_start}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "Position":
        sums = None if state["sums"] is None else EpochSums.from_state(state["sums"], device)
        return cls(epoch=state["epoch"], batch=state["batch"], step=state["step"], seconds=state["seconds"],
                   sums=sums, schedule_start=state.get("schedule_start", 0))


@dataclass
class EpochResult:
    """What one epoch (or the part of it up to ``max_steps``, divergence or the run's end) produced."""

    record: dict                    # the epoch's row of History.epochs
    complete: bool                  # every batch of the epoch was trained
    diverged: Optional[str] = None  # why the run diverged, if it did
    max_steps_reached: bool = False


# --------------------------------------------------------------------------------------------------
# one run: set up → the step → bookkeeping → checkpoints → the end
# --------------------------------------------------------------------------------------------------

class _Run:
    """The state of one training run: the model, its optimizer and loader, the :class:`History` so far
    and the :class:`Position` (what a checkpoint holds, and what the loop needs to continue)."""

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        world_size = torch.distributed.get_world_size() if distributed else 1
        set_seed(config.seed)
        self.data = data if data.train_x.device == self.device else data.to(self.device)
        model.to(self.device)
        if config.channels_last and self.data.train_x.dim() == 4:  # NHWC exists for images only
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.raw_model = model.module if hasattr(model, "module") else model
        self.forward = torch.compile(model, mode=config.compile_mode) if config.compile else model
        augment = self.data.augment if config.augment is None else config.augment
        self.loader = Loader(self.data.train_x, self.data.train_y, config.batch_size, shuffle=True,
                             drop_last=config.drop_last, augment=augment, seed=config.seed,
                             crop_padding=(self.data.crop_padding if config.crop_padding is None else config.crop_padding),
                             rank=self.rank, world_size=world_size)
        self.steps_per_epoch = len(self.loader)
        self.optimizer = _make_optimizer(self.raw_model, config)
        self.history = History(config=config.to_dict(), meta={
            "model": type(self.raw_model).__name__,
            "parameters": sum(p.numel() for p in self.raw_model.parameters()),
            "dataset": self.data.name, "train_size": len(self.data.train_x), "device": str(self.device),
            "torch": str(torch.__version__), "world_size": world_size})
        self.position = Position()
        self.path = Path(config.checkpoint) if config.checkpoint else None

    # ---------------------------------------------------------------- the step
    def learning_rate(self, step: int) -> float:
        """The rate of optimizer step ``step`` (0-based): the peak times the schedule, which spans the
        epochs from ``schedule_start`` to ``config.epochs``. Extending a finished run starts a new cycle
        there: onecycle and cosine warm up again from 0, where they ended; constant stays at the peak."""
        c, start = self.config, self.position.schedule_start
        warmup = c.warmup_fraction if start == 0 or c.schedule != "constant" else 0.0
        return c.lr * lr_factor(step - start * self.steps_per_epoch, (c.epochs - start) * self.steps_per_epoch,
                                c.schedule, warmup)

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """One optimizer step on the batch ``(x, y)``; returns the loss, the logits (both detached) and the
        learning rate. The whole algorithm is here; the bookkeeping is the caller's."""
        lr = self.learning_rate(self.position.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(self.device, self.config.amp):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach(), lr

    # ---------------------------------------------------------------- one epoch
    def train_epoch(self, epoch: int, stop: _StopRequest, on_step: list, progress: Optional[bool]) -> EpochResult:
        """Every remaining batch of ``epoch`` through :meth:`step`, each booked as soon as it is taken;
        stops early at divergence or ``max_steps``. Ctrl-C is taken between two steps (see :class:`_StopRequest`)."""
        position = self.position
        self.loader.epoch = epoch
        position.sums = sums = position.sums or EpochSums.zeros(self.device)
        skip = position.batch
        # a host synchronisation per step costs GPU time; on CPU it is free, so check every step there
        check_every = 1 if (self.device.type == "cpu" or on_step or self.config.log_steps) else 50
        bar = _progress(progress, self.steps_per_epoch - skip, f"epoch {epoch + 1}/{self.config.epochs}")
        timer = _Timer(self.device)
        diverged, seconds_before, at_boundary = None, position.seconds, True
        try:
            for batch_index, (x, y) in enumerate(self.loader):
                if batch_index < skip:
                    continue  # resumed mid-epoch: the loader replays the epoch's randomness up to here
                at_boundary = False  # from here until the step is booked, the state is half a step
                x = _prepare(x, self.config.channels_last)
                loss, logits, lr = self.step(x, y)
                sums.add(loss, logits, y)
                position.step, position.batch = position.step + 1, batch_index + 1
                at_boundary = True
                if bar is not None:
                    bar.update(1)
                if position.step % check_every == 0:
                    diverged = self._after_step(loss, logits, lr, (x, y), on_step)
                if diverged or self._max_steps_reached():
                    break
                stop.check()
        except KeyboardInterrupt:
            position.seconds = seconds_before + timer.seconds()
            self.history.status, self.history.reason = "stopped", f"interrupted in epoch {epoch + 1}"
            if at_boundary:
                self.save()  # between two steps; an interrupted step is discarded, never saved half done
            raise
        finally:
            if bar is not None:
                bar.close()
        epoch_time = timer.seconds()
        position.seconds = seconds_before + epoch_time
        return self._end_epoch(epoch, epoch_time, diverged)

    # ---------------------------------------------------------------- bookkeeping: logging, divergence, evaluation
    def _after_step(self, loss: Tensor, logits: Tensor, lr: float, batch: tuple, on_step: list) -> Optional[str]:
        """Log the step just taken and hand it to the callbacks; returns why the run diverged, or ``None``."""
        step, value = self.position.step, float(loss)
        if self.config.log_steps:
            acc = float((logits.argmax(1) == batch[1]).float().mean())
            self.history.steps.append({"step": step, "loss": value, "lr": lr, "acc": acc})
        for fn in on_step:
            fn(step, self.raw_model, value, batch)
        return divergence(value, step, self.config.divergence_loss)

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.position.step >= self.config.max_steps

    def _end_epoch(self, epoch: int, epoch_time: float, diverged: Optional[str]) -> EpochResult:
        """The epoch's record (evaluated when due), added to the history once the epoch is complete or the
        run ends; the position moves to the next epoch when this one is complete."""
        config, position = self.config, self.position
        train_loss, train_acc = position.sums.means()
        if diverged is None and not (math.isfinite(train_loss) and train_loss <= config.divergence_loss):
            diverged = f"mean training loss {train_loss:.4g} in epoch {epoch + 1} is not finite or > {config.divergence_loss:g}"
        complete = position.batch >= self.steps_per_epoch
        max_steps_reached = self._max_steps_reached()
        record = {"epoch": epoch + 1, "step": position.step, "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": None, "test_acc": None, "lr": self.optimizer.param_groups[0]["lr"],
                  "time": position.seconds, "epoch_time": epoch_time}
        last = epoch + 1 == config.epochs or max_steps_reached or diverged is not None
        if diverged is None and ((config.eval_every and (epoch + 1) % config.eval_every == 0) or last):
            record["test_loss"], record["test_acc"] = self.evaluate()
        if complete or last:
            self.history.epochs.append(record)
        if complete:
            position.epoch, position.batch, position.sums = epoch + 1, 0, None
        return EpochResult(record, complete, diverged, max_steps_reached)

    def evaluate(self) -> tuple[float, float]:
        c = self.config
        return evaluate(self.raw_model, self.data.test_x, self.data.test_y, tta=c.tta, amp=c.amp,
                        channels_last=c.channels_last)

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Write the checkpoint (rank 0 only), in plain types: it loads with ``weights_only=True``."""
        if self.path is None or self.rank != 0:
            return
        save_checkpoint(self.path, {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                    "history": self.history.to_dict(), "state": self.position.to_state(),
                                    "config": self.config.to_dict(), "rng_cpu": torch.get_rng_state()})

    def resume(self) -> bool:
        """Continue from the checkpoint if ``config.resume`` and it exists; returns whether it did.

        The saved config must match, except ``epochs`` and ``max_steps`` (more of either extend a run,
        also a finished one; fewer epochs than it trained are an error) and where the checkpoint lives.
        A finished run that trained all its epochs and is given more gets a new cycle of its schedule
        over the added epochs (:meth:`learning_rate`)."""
        if not (self.config.resume and self.path is not None and self.path.is_file()):
            return False
        saved = load_checkpoint(self.path)
        now = self.config.to_dict()
        check_resumable(saved, now, self.path)
        self.raw_model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.history = History.from_dict(saved["history"])
        self.history.config = now
        self.position = Position.from_state(saved["state"], self.device)
        torch.set_rng_state(saved["rng_cpu"])
        if self.history.status == "done" and not is_finished(saved, self.config.epochs, self.config.max_steps):
            self.history.status, self.history.reason, self.history.final = "running", "", {}
            if self.position.epoch == saved["config"]["epochs"] and self.position.batch == 0:
                self.position.schedule_start = self.position.epoch  # its schedule ran to the end
        return True

    # ---------------------------------------------------------------- the end
    def finish(self, status: str, reason: str) -> History:
        history = self.history
        history.status, history.reason = status, reason
        test_loss, test_acc = self.evaluate()
        last = history.epochs[-1] if history.epochs else {}
        tested = [e["test_acc"] for e in history.epochs if e.get("test_acc") is not None] + [test_acc]
        history.final = {"test_acc": test_acc, "test_loss": test_loss, "train_acc": last.get("train_acc"),
                         "train_loss": last.get("train_loss"), "best_test_acc": max(tested),
                         "steps": self.position.step, "seconds": self.position.seconds}
        self.save()
        return history


# --------------------------------------------------------------------------------------------------
# the loop: set up → resume → one epoch at a time → finish
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

    Ctrl-C (in the main thread) ends the step in flight, writes the checkpoint and raises
    ``KeyboardInterrupt``; resuming from that checkpoint gives the same run as one never interrupted.
    Under ``torchrun`` (an initialised process group) each rank trains on its shard of every epoch's
    permutation; pass a ``DistributedDataParallel`` model. Only rank 0 writes the checkpoint.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    callbacks = list(callbacks or [])
    on_step = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    on_epoch = [cb.on_epoch for cb in callbacks if hasattr(cb, "on_epoch")]
    with _StopRequest() as stop:  # from here on, Ctrl-C is taken between steps (imports included)
        run = _Run(model, data, config)
        if not run.resume() and hasattr(run.raw_model, "init_from_data"):
            run.raw_model.init_from_data(run.data.train_x)  # a data-dependent initialisation (airbench's whitening)
        if run.history.status in ("done", "diverged"):
            return run.history  # a finished run resumed: nothing left to do
        model.train()
        stop.check()
        for epoch in range(run.position.epoch, config.epochs):
            result = run.train_epoch(epoch, stop, on_step, progress)
            for fn in on_epoch:
                fn(epoch + 1, run.raw_model, result.record)
            if result.diverged is not None:
                return run.finish("diverged", result.diverged)
            if result.max_steps_reached:
                return run.finish("done", f"max_steps={config.max_steps} reached")
            run.save()
            stop.check()
        return run.finish("done", f"{config.epochs} epochs")


# --------------------------------------------------------------------------------------------------
# plumbing: Ctrl-C between steps, timing, the progress bar
# --------------------------------------------------------------------------------------------------

class _StopRequest:
    """Ctrl-C during training, taken at a step boundary.

    While active (main thread, default SIGINT handling), the first SIGINT only sets :attr:`requested`;
    the loop finishes the step in flight, checkpoints, and raises ``KeyboardInterrupt`` itself, so a
    checkpoint always holds the state between two steps. A second SIGINT raises at once (the step in
    flight is then discarded, not saved). Elsewhere (a worker thread, SIGINT ignored) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C stops at once

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


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


def _progress(enabled: Optional[bool], total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
