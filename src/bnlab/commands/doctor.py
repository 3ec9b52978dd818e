"""Check the health of every batch-norm layer of a model on a few batches.

Examples:
  bnlab doctor resnet20 --dataset digits                  # a bnlab model, inputs from a dataset
  bnlab doctor resnet20 --dataset digits --checkpoint runs/r20/model.pt --json
  bnlab doctor resnet20 --dataset digits --checkpoint runs/r20/checkpoint.pt
  bnlab doctor mypkg.models:build --shape 8,3,32,32       # your factory, random inputs of that shape
  bnlab doctor mypkg.models:build --arg width=2 --arg depth=18 --checkpoint ckpt.pt --dataset fashion-mnist
  bnlab doctor resnet8 --shape 16,3,32,32 --training      # the model is for training: skip the mode check

MODEL is a name `bnlab.models.create` knows (resnet20, resnet18, …) or an import path `package.module:factory`
whose factory returns a torch.nn.Module (called with the --arg values as keyword arguments). With
--checkpoint the saved state dict (a bare state dict such as `bnlab train`'s model.pt, or a dict holding
it under "model", "state_dict" or "model_state_dict" such as its checkpoint.pt) is loaded into the built
model; it is read with torch.load(weights_only=True), so it never runs code. Inputs come from a
dataset's training split (--dataset, see `bnlab.data`; --data is an older name) or are random normal
tensors of --shape.

Findings (each names the layer, the evidence and the fix): train_mode, train_eval_gap,
stale_statistics, initial_statistics, few_values, dead_channels, redundant_bias, momentum_convention,
nonfinite_stats. Exit status 0, or 1 with --strict when any warning or error was found.
"""

from __future__ import annotations

import ast
import importlib

from bnlab.errors import UserError

NAME = "doctor"
HELP = "report batch-norm health per layer: train/eval gap, stale statistics, dead channels, …"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a bnlab.models name (e.g. resnet20) or an import path package.module:factory")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the factory (Python literal or string); repeatable")
    parser.add_argument("--checkpoint", help="a state dict saved with torch.save, loaded into the built model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", "--data", dest="dataset",
                        help="dataset name for the input batches (fashion-mnist, mnist1d, digits, synthetic); "
                             "--data is a deprecated alias")
    source.add_argument("--shape", help="random normal input batches of this shape, e.g. 8,3,32,32")
    parser.add_argument("--data-dir", help="directory holding the dataset files (authoritative, as $BNLAB_DATA)")
    parser.add_argument("--batches", type=int, default=4, help="number of input batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size with --data (default 64)")
    parser.add_argument("--norm", default="bn", help="norm for bnlab model names (default bn)")
    parser.add_argument("--training", action="store_true",
                        help="the model is used for training as built: do not flag layers in training mode")
    parser.add_argument("--eval", action="store_true", help="call model.eval() before checking (as for inference)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a warning or error was found")
    parser.add_argument("--seed", type=int, default=0)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise UserError(f"--shape expects at least two positive integers separated by commas, like 8,3,32,32 "
                        f"(got {text!r})")
    return shape


def _parse_kwargs(items: list[str]) -> dict:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--arg expects KEY=VALUE with KEY a Python name (got {item!r})")
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
            raise UserError(f"cannot import {args.model!r}: {error}") from None
        try:
            model = factory(**kwargs)
        except TypeError as error:  # the factory's signature does not take the --arg values
            raise UserError(f"{args.model}: {error}") from None
    else:
        from bnlab import models
        if dataset is not None:
            kwargs.setdefault("in_channels", dataset.in_channels)
            kwargs.setdefault("num_classes", dataset.num_classes)
        try:
            model = models.create(args.model, norm=args.norm, **kwargs)
        except ValueError as error:
            raise UserError(str(error)) from None
    import torch
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{args.model} returned a {type(model).__name__}, expected a torch.nn.Module")
    if args.checkpoint:
        from bnlab.train import read_torch_file
        state = read_torch_file(args.checkpoint)
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"--checkpoint {args.checkpoint}: holds no state dict (expected tensors by name, "
                            f"bare or under 'model', 'state_dict' or 'model_state_dict')")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise UserError(f"--checkpoint {args.checkpoint} does not fit the model: "
                            f"{' '.join(str(error).split())[:500]}") from None
    return model


def run(args) -> int:
    import torch

    from bnlab.tools.doctor import diagnose

    torch.manual_seed(args.seed)
    dataset, batches = None, None
    if args.dataset:
        from bnlab import data
        dataset = data.load(args.dataset, data_dir=args.data_dir)
        perm = torch.randperm(len(dataset.train_x))[:args.batches * args.batch_size]
        batches = list(dataset.train_x[perm].split(args.batch_size))
    elif args.shape:
        shape = _parse_shape(args.shape)
        batches = [torch.randn(shape) for _ in range(args.batches)]
    model = _build(args, dataset)
    if args.eval:
        model.eval()
    try:
        report = diagnose(model, batches, for_inference=not args.training)
    except ValueError as error:  # the model has no batch-norm layer, or the inputs do not fit it
        raise UserError(str(error)) from None
    print(report.to_json() if args.json else report.format())
    return 1 if args.strict and not report.healthy else 0
