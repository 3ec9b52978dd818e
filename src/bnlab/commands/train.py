"""Train a model on a dataset; print a table per epoch; save the history, final metrics and weights.

Examples:
  bnlab train --model resnet20 --norm bn --dataset fashion-mnist --epochs 10 --lr 0.2
  bnlab train --model resnet8 --dataset fashion-mnist --subset 5000 --epochs 4 --out runs/quick
  bnlab train --model resnet20 --norm fixup --lr 0.05 --label-smoothing 0.1 --out runs/fixup
  bnlab train --model resnet20 --plain --norm torch_bn --schedule cosine --optimizer adamw --lr 2e-3
  bnlab train --model resnet1d --dataset mnist1d --epochs 20 --batch-size 64
  bnlab train --model resnet20 --out runs/r20 --resume            # continue an interrupted run exactly
  bnlab train --out runs/r20 --resume --epochs 20                  # 10 epochs more: a new cycle of the schedule
  torchrun --nproc-per-node 2 -m bnlab.cli train --model resnet20  # data parallel, synchronized BN

Writes into --out (default runs/MODEL-NORM-DATASET-sSEED): command.json (the run's settings),
history.json (config, per-epoch metrics, status), final.json (final metrics), model.pt (the trained
state dict) and checkpoint.pt (written atomically after every epoch and on Ctrl-C, always between two
steps; --resume continues from it with the saved settings, except flags given explicitly: a different
--lr is an error, a larger --epochs extends the run). Extending a finished run gives the added epochs a
new cycle of the schedule: onecycle and cosine warm up again from 0 (where they ended) and decay back
to 0, constant stays at the peak; an unfinished run's schedule is stretched to the new --epochs.
--resume on a finished run with no more epochs trains nothing and says so (exit status 0); fewer
--epochs than it trained, or an --out that holds no run, is an error. Every argument and --out are
checked before training starts. Ctrl-C finishes the step in flight, saves and exits with status 130.
A diverging run (non-finite loss or a loss above --divergence-loss) is a result: it ends with status
"diverged" and exit status 0.

Under torchrun (WORLD_SIZE > 1) the process group is initialised (gloo on CPU, NCCL on CUDA), batch-norm
layers become synchronized (bnlab.nn.sync.convert_sync_batchnorm), the model is wrapped in
DistributedDataParallel and every rank trains on its shard of each epoch; --batch-size is per rank.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from bnlab.errors import UserError

NAME = "train"
HELP = "train a model (ResNet, airbench) on a dataset and save its history"

# (name, width, format): the per-epoch table has fixed columns so runs can be compared by eye
_COLUMNS = [("epoch", 5, "d"), ("step", 7, "d"), ("train_loss", 10, ".4f"), ("train_acc", 9, ".4f"),
            ("test_loss", 9, ".4f"), ("test_acc", 8, ".4f"), ("lr", 9, ".4g"), ("time", 8, ".1f")]


# Defaults of the model and data flags; the optimization and run flags default to TrainConfig's fields.
_MODEL_DEFAULTS = {"model": "resnet20", "norm": "bn", "depth": None, "width": 1.0, "plain": False,
                   "zero_init_residual": False, "fused": None, "dataset": "fashion-mnist", "subset": None}
# flags that are not settings of the run (never saved, never compared on --resume)
_NOT_SAVED = ("data_dir", "out", "resume", "progress", "json")
# settings a resumed run may change: more epochs or steps extend it
_EXTENDABLE = ("epochs", "max_steps")
SETTINGS_FILE = "command.json"
CHECKPOINT_FILE = "checkpoint.pt"
# the largest --lr (as a study profile's, bnlab.study.profiles.MAX_LR): a larger rate only diverges, and past
# float32's 3.4e38 the parameter update itself overflows
MAX_LR = 1e4


def _defaults() -> dict:
    from bnlab.train import TrainConfig
    config = TrainConfig().to_dict()
    return {**_MODEL_DEFAULTS, **{k: v for k, v in config.items() if k not in ("checkpoint", "resume")}}


def add_arguments(parser) -> None:
    import argparse

    default = _defaults()

    def arg(group, *flags, help="", **kw):
        """A flag whose absence leaves no attribute (default SUPPRESS): --resume can tell which were given."""
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        shown = default.get(dest, None)
        if kw.get("action") in ("store_true", "store_false") or shown is None:
            text = help
        else:
            text = f"{help} (default {shown})" if help else f"(default {shown})"
        group.add_argument(*flags, default=argparse.SUPPRESS, help=text, **kw)

    m = parser.add_argument_group("model")
    arg(m, "--model", help="a name from `bnlab models`")
    arg(m, "--norm", help="bn, torch_bn, none, groupnorm, layernorm, skipinit, fixup")
    arg(m, "--depth", type=int, help="depth 6n+2 for --model resnet / preact_resnet / resnet1d")
    arg(m, "--width", type=float, help="width multiplier")
    arg(m, "--plain", action="store_true", help="the plain twin: no identity shortcuts")
    arg(m, "--zero-init-residual", action="store_true", help="zero the last BN γ of every branch")
    arg(m, "--no-fused", dest="fused", action="store_false", help="never use the fused BN+add+ReLU path")
    d = parser.add_argument_group("data")
    arg(d, "--dataset", help="fashion-mnist, mnist1d, digits, synthetic")
    d.add_argument("--data-dir", help="directory holding the dataset files (authoritative: nothing else is searched)")
    arg(d, "--subset", type=int, help="train on a seeded class-balanced subset of this many examples")
    arg(d, "--augment", action=argparse.BooleanOptionalAction,
        help="random crop + flip (--no-augment to disable; default: where it makes sense)")
    arg(d, "--keep-last", dest="drop_last", action="store_false",
        help="keep the last incomplete batch (default: drop it)")
    o = parser.add_argument_group("optimization")
    arg(o, "--epochs", type=int, help="epochs; with --resume, more than the saved run's extend it (a finished "
                                        "run's added epochs get a new cycle of the schedule)")
    arg(o, "--batch-size", type=int, help="examples per step (per rank)")
    arg(o, "--lr", type=float, help="peak learning rate")
    arg(o, "--optimizer", choices=["sgd", "adamw"])
    arg(o, "--momentum", type=float, help="SGD momentum / AdamW β1")
    arg(o, "--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    arg(o, "--weight-decay", type=float)
    arg(o, "--norm-weight-decay", type=float, help="weight decay of norm parameters and biases")
    arg(o, "--schedule", choices=["onecycle", "cosine", "constant"])
    arg(o, "--warmup", dest="warmup_fraction", type=float, help="fraction of steps in linear warm-up")
    arg(o, "--label-smoothing", type=float)
    arg(o, "--max-steps", type=int, help="stop after this many steps")
    arg(o, "--divergence-loss", type=float, help="a loss above this ends the run as diverged")
    r = parser.add_argument_group("run")
    arg(r, "--seed", type=int)
    arg(r, "--device", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    arg(r, "--amp", action="store_true", help="bf16 autocast (CUDA)")
    arg(r, "--channels-last", action="store_true")
    arg(r, "--compile", action="store_true", help="torch.compile the model")
    arg(r, "--tta", action="store_true", help="evaluate with horizontal-flip test-time augmentation")
    arg(r, "--eval-every", type=int, help="evaluate every this many epochs; 0: after the last epoch only")
    arg(r, "--log-steps", action="store_true", help="record every step's loss in the history")
    r.add_argument("--out", help="output directory (default runs/MODEL-NORM-DATASET-sSEED)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT (an error if OUT holds none): its settings apply, "
                        "except the flags given")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar (default: when stderr is a terminal)")
    r.add_argument("--json", action="store_true", help="print the final metrics as JSON instead of a summary")


def _settings(args) -> tuple[dict, Path]:
    """The run's settings and output directory: defaults, then (with --resume) the saved run's, then the
    flags given. A given flag that contradicts the saved run (other than extending it) is an error."""
    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", *_NOT_SAVED)}
    settings = {**_defaults(), **given}
    out = Path(args.out or f"runs/{settings['model']}-{settings['norm']}-{settings['dataset']}-s{settings['seed']}")
    saved_file = out / SETTINGS_FILE
    if args.resume and not saved_file.is_file() and not (out / CHECKPOINT_FILE).is_file():
        raise UserError(f"--resume: {out} holds no run to resume (no {SETTINGS_FILE} or {CHECKPOINT_FILE}); "
                        f"drop --resume to start a new run there, or give the --out of the run to continue")
    if args.resume and saved_file.is_file():
        try:
            saved = json.loads(saved_file.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"--resume: cannot read {saved_file} ({error}); delete {out} to start afresh") from None
        conflicts = [f"--{k.replace('_', '-')} {given[k]!r} (saved: {saved[k]!r})" for k in given
                     if k in saved and saved[k] != given[k] and k not in _EXTENDABLE]
        if conflicts:
            raise UserError(f"--resume: {', '.join(conflicts)} contradicts the run saved in {out}; drop the "
                            f"flag to continue it as saved, or train into another --out")
        settings = {**_defaults(), **saved, **given}
    return settings, out


def _check_out(out: Path) -> None:
    """The output directory exists (or can be made) and takes files; before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise UserError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def _nothing_to_train(out: Path, config) -> Optional[dict]:
    """With --resume, before anything is written: raise :class:`UserError` when the run saved in ``out``
    cannot continue as asked; return its history when it has nothing left to train, else ``None``."""
    from bnlab.checkpoint import check_resumable, is_finished, load_checkpoint

    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return None  # stopped before its first checkpoint: it starts again from the first step
    saved = load_checkpoint(path)
    history, trained, partial = saved["history"], saved["state"]["epoch"], saved["state"]["batch"] > 0
    if config.epochs < trained + partial:
        raise UserError(f"--epochs {config.epochs}: the run in {out} has trained {trained} epoch{'s' * (trained != 1)}"
                        f"{' and part of another' if partial else ''}, and a run is extended, never shortened: "
                        f"nothing was trained (give --epochs above {trained} to extend it, or another --out)")
    check_resumable(saved, config.to_dict(), path)
    if history["status"] == "diverged" and config.epochs > saved["config"]["epochs"]:
        raise UserError(f"--epochs {config.epochs}: the run in {out} diverged ({history['reason']}) and a diverged "
                        f"run is not continued: nothing was trained (start a new run with another --out)")
    return history if is_finished(saved, config.epochs, config.max_steps) else None


def _print_header() -> None:
    print("  ".join(f"{name:>{width}}" for name, width, _ in _COLUMNS), flush=True)


def _format_row(record: dict) -> str:
    return "  ".join(f"{'-':>{width}}" if record.get(name) is None else f"{record[name]:>{width}{spec}}"
                     for name, width, spec in _COLUMNS)


class _TablePrinter:
    def on_epoch(self, epoch, model, record) -> None:
        print(_format_row(record), flush=True)


def _init_distributed():
    """(rank, world_size, device) under torchrun; (0, 1, None) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), world_size, device


def _sync_batchnorm(model):
    try:
        from bnlab.nn.sync import convert_sync_batchnorm
    except ImportError as error:
        raise UserError(f"WORLD_SIZE > 1 needs bnlab.nn.sync.convert_sync_batchnorm, which is "
                        f"not available in this installation ({error})") from None
    return convert_sync_batchnorm(model)


def _build(settings: dict, args):
    """(config, dataset, model), every argument checked before any training starts."""
    from bnlab import data, models
    from bnlab.train import TrainConfig, resolve_device, set_seed

    config_fields = {k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**config_fields)  # checks every number
    if config.lr > MAX_LR:
        raise UserError(f"--lr must be at most {MAX_LR:g} (got {config.lr:g}): a larger learning rate only diverges")
    resolve_device(config.device)
    dataset = data.load(settings["dataset"], data_dir=args.data_dir, subset=settings["subset"], seed=config.seed)
    per_epoch = len(dataset.train_x) // int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size > per_epoch and config.drop_last:
        raise UserError(f"--batch-size {config.batch_size} is larger than the {per_epoch} training examples "
                        f"of {dataset.name}{' per rank' if per_epoch < len(dataset.train_x) else ''}; "
                        f"use at most {per_epoch}")
    set_seed(config.seed)
    kw = {"depth": settings["depth"]} if settings["depth"] else {}
    try:
        model = models.create(settings["model"], norm=settings["norm"], in_channels=dataset.in_channels,
                              num_classes=dataset.num_classes, width=settings["width"], plain=settings["plain"],
                              zero_init_residual=settings["zero_init_residual"], fused=settings["fused"], **kw)
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None
    data_dims, model_dims = dataset.train_x.dim() - 2, getattr(model, "dims", 2)
    if model_dims != data_dims:
        raise UserError(f"--model {settings['model']} takes {'sequences (N, C, L)' if model_dims == 1 else 'images'}, "
                        f"but --dataset {settings['dataset']} holds {tuple(dataset.train_x.shape[1:])} examples; "
                        f"use {'resnet1d' if data_dims == 1 else 'an image model such as resnet20'}")
    return config, dataset, model


def _train(model, dataset, config, settings: dict, out: Path, args, rank: int, world_size: int):
    import torch

    from bnlab.train import train

    main_process = rank == 0
    if world_size > 1:
        model = _sync_batchnorm(model).to(config.device)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(config.device).index] if config.device.startswith("cuda") else None)

    if main_process and not args.json:
        params = sum(p.numel() for p in model.parameters())
        print(f"# {settings['model']} (norm={settings['norm']}, {params / 1e6:.3f}M parameters) on {dataset.name} "
              f"({len(dataset.train_x)} train / {len(dataset.test_x)} test, from {dataset.source}); "
              f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, seed {config.seed}; out {out}",
              flush=True)
        _print_header()
    callbacks = [_TablePrinter()] if main_process and not args.json else []
    return train(model, dataset, config, callbacks=callbacks, progress=args.progress if main_process else False)


def _final(status: str, reason: str, metrics: dict, settings: dict, dataset, config) -> dict:
    """What final.json holds (and --json prints)."""
    return {"status": status, "reason": reason, **metrics, "model": settings["model"], "norm": settings["norm"],
            "dataset": dataset.name, "seed": config.seed}


def _say_nothing_trained(out: Path, history: dict, settings: dict, dataset, config, args) -> None:
    """One line on stderr (and, with --json, the saved run's final metrics on stdout)."""
    final = history["final"]
    if history["status"] == "diverged":
        how = "a diverged run is not continued"
    elif history["reason"].startswith("max_steps="):
        how = "a larger --max-steps continues it"
    else:
        how = f"--epochs above {config.epochs} extends it"
    print(f"bnlab train: nothing trained: the run in {out} already ended ({history['status']}: {history['reason']}; "
          f"{final['steps']} steps, test_acc {final['test_acc']:.4f}); {how}", file=sys.stderr)
    if args.json:
        print(json.dumps(_final(history["status"], history["reason"], final, settings, dataset, config), indent=1))


def run(args) -> int:
    rank, world_size, dist_device = _init_distributed()
    settings, out = _settings(args)
    if dist_device:
        settings["device"] = dist_device
    config, dataset, model = _build(settings, args)
    config.checkpoint, config.resume = str(out / CHECKPOINT_FILE), args.resume
    main_process = rank == 0
    finished = _nothing_to_train(out, config) if args.resume else None
    if finished is not None:
        if main_process:
            _say_nothing_trained(out, finished, settings, dataset, config, args)
    else:
        if main_process:
            _check_out(out)
        try:
            if main_process:
                (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
            history = _train(model, dataset, config, settings, out, args, rank, world_size)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted; {out / CHECKPOINT_FILE} holds the run up to the last finished "
                                    f"step: rerun the same command with --resume to continue") from None
        if main_process:
            _save_results(out, history, settings, dataset, config, model, args)
    if world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def _save_results(out: Path, history, settings: dict, dataset, config, model, args) -> None:
    import torch

    history.meta.update(model_name=settings["model"], norm=settings["norm"], width=settings["width"],
                        plain=settings["plain"])
    history.save_json(out / "history.json")
    final = _final(history.status, history.reason, history.final, settings, dataset, config)
    (out / "final.json").write_text(json.dumps(final, indent=1))
    raw = model.module if hasattr(model, "module") else model
    torch.save(raw.state_dict(), out / "model.pt")
    if args.json:
        print(json.dumps(final, indent=1))
    else:
        f = history.final
        print(f"# {history.status} ({history.reason}): test_acc {f['test_acc']:.4f}, best {f['best_test_acc']:.4f}, "
              f"{f['steps']} steps in {f['seconds']:.1f} s of training; wrote {out}/history.json")
