"""Train a model on a dataset; print a table per epoch; save the history, final metrics and weights.

Examples:
  bnlab train --model resnet20 --norm bn --dataset fashion-mnist --epochs 10 --lr 0.2
  bnlab train --model resnet8 --dataset fashion-mnist --subset 5000 --epochs 4 --out runs/quick
  bnlab train --model resnet20 --norm fixup --lr 0.05 --label-smoothing 0.1 --out runs/fixup
  bnlab train --model resnet20 --plain --norm torch_bn --schedule cosine --optimizer adamw --lr 2e-3
  bnlab train --model resnet1d --dataset mnist1d --epochs 20 --batch-size 64
  bnlab train --model resnet20 --out runs/r20 --resume            # continue an interrupted run exactly
  torchrun --nproc-per-node 2 -m bnlab.cli train --model resnet20  # data parallel, synchronized BN

Writes into --out (default runs/MODEL-NORM-DATASET-sSEED): history.json (config, per-epoch metrics,
status), final.json (final metrics), model.pt (the trained state dict) and checkpoint.pt (written
atomically after every epoch and on Ctrl-C; --resume continues from it). A diverging run (non-finite loss
or a loss above --divergence-loss) is a result: it ends with status "diverged" and exit status 0.

Under torchrun (WORLD_SIZE > 1) the process group is initialised (gloo on CPU, NCCL on CUDA), batch-norm
layers become synchronized (bnlab.distributed.convert_sync_batchnorm), the model is wrapped in
DistributedDataParallel and every rank trains on its shard of each epoch; --batch-size is per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

NAME = "train"
HELP = "train a model (ResNet, airbench) on a dataset and save its history"

# (name, width, format): the per-epoch table has fixed columns so runs can be compared by eye
_COLUMNS = [("epoch", 5, "d"), ("step", 7, "d"), ("train_loss", 10, ".4f"), ("train_acc", 9, ".4f"),
            ("test_loss", 9, ".4f"), ("test_acc", 8, ".4f"), ("lr", 9, ".4g"), ("time", 8, ".1f")]


def add_arguments(parser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="resnet20", help="a name from `bnlab models` (default resnet20)")
    m.add_argument("--norm", default="bn", help="bn, torch_bn, none, groupnorm, layernorm, skipinit, fixup (default bn)")
    m.add_argument("--depth", type=int, help="depth 6n+2 for --model resnet / preact_resnet / resnet1d")
    m.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1)")
    m.add_argument("--plain", action="store_true", help="the plain twin: no identity shortcuts")
    m.add_argument("--zero-init-residual", action="store_true", help="zero the last BN γ of every branch")
    m.add_argument("--no-fused", action="store_true", help="never use the fused BN+add+ReLU path")
    d = parser.add_argument_group("data")
    d.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist1d, digits, synthetic")
    d.add_argument("--data-dir", help="directory searched first for dataset files")
    d.add_argument("--subset", type=int, help="train on a seeded class-balanced subset of this many examples")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (--no-augment to disable; default: where it makes sense)")
    d.add_argument("--keep-last", action="store_true", help="keep the last incomplete batch (default: drop it)")
    o = parser.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=128, help="examples per step (per rank)")
    o.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    o.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum / AdamW β1")
    o.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov")
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--norm-weight-decay", type=float, default=0.0, help="weight decay of norm parameters and biases")
    o.add_argument("--schedule", choices=["onecycle", "cosine", "constant"], default="onecycle")
    o.add_argument("--warmup", type=float, default=0.2, help="fraction of steps in linear warm-up (default 0.2)")
    o.add_argument("--label-smoothing", type=float, default=0.0)
    o.add_argument("--max-steps", type=int, help="stop after this many steps")
    o.add_argument("--divergence-loss", type=float, default=1e3, help="a loss above this ends the run as diverged")
    r = parser.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    r.add_argument("--channels-last", action="store_true")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--tta", action="store_true", help="evaluate with horizontal-flip test-time augmentation")
    r.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs")
    r.add_argument("--log-steps", action="store_true", help="record every step's loss in the history")
    r.add_argument("--out", help="output directory (default runs/MODEL-NORM-DATASET-sSEED)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bar (default: on a terminal)")
    r.add_argument("--json", action="store_true", help="print the final metrics as JSON instead of a summary")


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
        from bnlab.distributed import convert_sync_batchnorm
    except ImportError as error:
        raise SystemExit(f"bnlab train: WORLD_SIZE > 1 needs bnlab.distributed.convert_sync_batchnorm, which is "
                         f"not available in this installation ({error})") from None
    return convert_sync_batchnorm(model)


def run(args) -> int:
    import torch

    from bnlab import data, models
    from bnlab.train import TrainConfig, set_seed, train

    rank, world_size, dist_device = _init_distributed()
    out = Path(args.out or f"runs/{args.model}-{args.norm}-{args.dataset}-s{args.seed}")
    try:
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
            momentum=args.momentum, nesterov=not args.no_nesterov, weight_decay=args.weight_decay,
            norm_weight_decay=args.norm_weight_decay, schedule=args.schedule, warmup_fraction=args.warmup,
            label_smoothing=args.label_smoothing, seed=args.seed, device=dist_device or args.device,
            augment=args.augment, drop_last=not args.keep_last, max_steps=args.max_steps,
            divergence_loss=args.divergence_loss, log_steps=args.log_steps, eval_every=args.eval_every,
            checkpoint=str(out / "checkpoint.pt"), resume=args.resume, amp=args.amp,
            channels_last=args.channels_last, compile=args.compile, tta=args.tta)
        dataset = data.load(args.dataset, data_dir=args.data_dir, subset=args.subset, seed=args.seed)
        set_seed(args.seed)
        kw = {"depth": args.depth} if args.depth else {}
        model = models.create(args.model, norm=args.norm, in_channels=dataset.in_channels,
                              num_classes=dataset.num_classes, width=args.width, plain=args.plain,
                              zero_init_residual=args.zero_init_residual,
                              fused=False if args.no_fused else None, **kw)
        data_dims, model_dims = dataset.train_x.dim() - 2, getattr(model, "dims", 2)
        if model_dims != data_dims:
            raise ValueError(f"--model {args.model} takes {'sequences (N, C, L)' if model_dims == 1 else 'images'}, "
                             f"but --dataset {args.dataset} holds {tuple(dataset.train_x.shape[1:])} examples; "
                             f"use {'resnet1d' if data_dims == 1 else 'an image model such as resnet20'}")
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"bnlab train: {error}", file=sys.stderr)
        return 2
    if hasattr(model, "init_whitening") and not args.resume:  # airbench: fit the stem to the data
        model.init_whitening(dataset.train_x[:5000])
    if world_size > 1:
        model = _sync_batchnorm(model).to(config.device)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(config.device).index] if config.device.startswith("cuda") else None)

    main_process = rank == 0
    if main_process and not args.json:
        params = sum(p.numel() for p in model.parameters())
        print(f"# {args.model} (norm={args.norm}, {params / 1e6:.3f}M parameters) on {dataset.name} "
              f"({len(dataset.train_x)} train / {len(dataset.test_x)} test, from {dataset.source}); "
              f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}; out {out}", flush=True)
        _print_header()
    callbacks = [_TablePrinter()] if main_process and not args.json else []
    history = train(model, dataset, config, callbacks=callbacks, progress=args.progress if main_process else False)
    if main_process:
        history.meta.update(model_name=args.model, norm=args.norm, width=args.width, plain=args.plain)
        out.mkdir(parents=True, exist_ok=True)
        history.save_json(out / "history.json")
        final = {"status": history.status, "reason": history.reason, **history.final,
                 "model": args.model, "norm": args.norm, "dataset": dataset.name, "seed": args.seed}
        (out / "final.json").write_text(json.dumps(final, indent=1))
        raw = model.module if hasattr(model, "module") else model
        torch.save(raw.state_dict(), out / "model.pt")
        if args.json:
            print(json.dumps(final, indent=1))
        else:
            f = history.final
            print(f"# {history.status} ({history.reason}): test_acc {f['test_acc']:.4f}, best {f['best_test_acc']:.4f}, "
                  f"{f['steps']} steps in {f['seconds']:.1f} s of training; wrote {out}/history.json")
    if world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0
