"""Check the health of every batch-norm layer of a model on a few batches.

Examples:
  bnlab doctor resnet20 --data digits                     # a bnlab model, inputs from a dataset
  bnlab doctor resnet20 --data digits --checkpoint run/model.pt --json
  bnlab doctor mypkg.models:build --shape 8,3,32,32       # your factory, random inputs of that shape
  bnlab doctor mypkg.models:build --arg width=2 --arg depth=18 --checkpoint ckpt.pt --data fashion-mnist
  bnlab doctor resnet8 --shape 16,3,32,32 --training      # the model is for training: skip the mode check

MODEL is a name `bnlab.models.create` knows (resnet20, resnet18, …) or an import path `package.module:factory`
whose factory returns a torch.nn.Module (called with the --arg values as keyword arguments). With
--checkpoint the saved state dict (a bare state dict, or a dict holding it under "model", "state_dict" or
"model_state_dict") is loaded into the built model. Inputs come from a dataset's training split
(--data, see `bnlab.data`) or are random normal tensors of --shape.

Findings (each names the layer, the evidence and the fix): train_mode, train_eval_gap,
stale_statistics, initial_statistics, few_values, dead_channels, redundant_bias, momentum_convention,
nonfinite_stats. Exit status 0, or 1 with --strict when any warning or error was found.
"""

from __future__ import annotations

import ast
import importlib

NAME = "doctor"
HELP = "report batch-norm health per layer: train/eval gap, stale statistics, dead channels, …"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a bnlab.models name (e.g. resnet20) or an import path package.module:factory")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the factory (Python literal or string); repeatable")
    parser.add_argument("--checkpoint", help="a state dict saved with torch.save, loaded into the built model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="dataset name for the input batches (fashion-mnist, mnist1d, digits, synthetic)")
    source.add_argument("--shape", help="random normal input batches of this shape, e.g. 8,3,32,32")
    parser.add_argument("--batches", type=int, default=4, help="number of input batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size with --data (default 64)")
    parser.add_argument("--norm", default="bn", help="norm for bnlab model names (default bn)")
    parser.add_argument("--training", action="store_true",
                        help="the model is used for training as built: do not flag layers in training mode")
    parser.add_argument("--eval", action="store_true", help="call model.eval() before checking (as for inference)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a warning or error was found")
    parser.add_argument("--seed", type=int, default=0)


def _parse_kwargs(items: list[str]) -> dict:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"bnlab doctor: --arg expects KEY=VALUE with KEY a Python name (got {item!r})")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _build(args, dataset):
    kwargs = _parse_kwargs(args.arg)
    if ":" in args.model:
        module_name, _, attr = args.model.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"bnlab doctor: cannot import {args.model!r}: {error}") from None
        model = factory(**kwargs)
    else:
        from bnlab import models
        if dataset is not None:
            kwargs.setdefault("in_channels", dataset.in_channels)
            kwargs.setdefault("num_classes", dataset.num_classes)
        try:
            model = models.create(args.model, norm=args.norm, **kwargs)
        except ValueError as error:
            raise SystemExit(f"bnlab doctor: {error}") from None
    import torch
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"bnlab doctor: {args.model} returned a {type(model).__name__}, expected a torch.nn.Module")
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise SystemExit(f"bnlab doctor: the checkpoint does not fit the model: {error}") from None
    return model


def run(args) -> int:
    import torch

    from bnlab.doctor import diagnose

    torch.manual_seed(args.seed)
    dataset, batches = None, None
    if args.data:
        from bnlab import data
        try:
            dataset = data.load(args.data)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"bnlab doctor: {error}") from None
        perm = torch.randperm(len(dataset.train_x))[:args.batches * args.batch_size]
        batches = list(dataset.train_x[perm].split(args.batch_size))
    elif args.shape:
        try:
            shape = tuple(int(s) for s in args.shape.replace("x", ",").split(",") if s)
        except ValueError:
            raise SystemExit(f"bnlab doctor: --shape expects integers like 8,3,32,32 (got {args.shape!r})") from None
        batches = [torch.randn(shape) for _ in range(args.batches)]
    model = _build(args, dataset)
    if args.eval:
        model.eval()
    try:
        report = diagnose(model, batches, for_inference=not args.training)
    except ValueError as error:
        raise SystemExit(f"bnlab doctor: {error}") from None
    print(report.to_json() if args.json else report.format())
    return 1 if args.strict and not report.healthy else 0
