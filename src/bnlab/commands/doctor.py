"""Check the health of every batch-norm layer of a model on a few batches.

Examples:
  bnlab doctor resnet20 --dataset digits                  # a bnlab model, inputs from a dataset
  bnlab doctor resnet20 --dataset digits --checkpoint runs/r20/model.pt --json
  bnlab doctor resnet20 --dataset digits --checkpoint runs/r20/checkpoint.pt
  bnlab doctor mypkg.models:build --shape 8,3,32,32       # your factory, random inputs of that shape
  bnlab doctor mypkg.models:build --arg width=2 --arg depth=18 --checkpoint ckpt.pt --dataset fashion-mnist
  bnlab doctor resnet8 --shape 16,3,32,32 --training      # the model is for training: skip the mode check

MODEL is a name `bnlab.models.create` knows (resnet20, resnet18, …) or an import path `package.module:factory`
whose factory returns a torch.nn.Module (called with the --arg values as keyword arguments); the current
directory is searched first, as `python -m` does. With
--checkpoint the saved state dict (a bare state dict such as `bnlab train`'s model.pt, or a dict holding
it under "model", "state_dict" or "model_state_dict" such as its checkpoint.pt) is loaded into the built
model; it is read with torch.load(weights_only=True), so it never runs code. Inputs come from a
dataset's training split (--dataset, see `bnlab.data`; --data is an older name) or are random normal
tensors of --shape. Inputs the model does not take, or too large for the memory available, are refused
before the checks run.

Findings (each names the layer, the evidence and the fix): train_mode, train_eval_gap,
stale_statistics, initial_statistics, few_values, dead_channels, redundant_bias, momentum_convention,
nonfinite_stats. Findings identical but for the layer print as one line with the count and the layers
(--json lists each). Exit status 0, or 1 with --strict when any warning or error was found.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import sys
from pathlib import Path
from typing import Optional

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


def _import_factory(spec: str):
    """``package.module:factory`` → the factory, the current directory searched first (as ``python -m`` and
    uvicorn do: the ``bnlab`` script's own directory is what Python puts on the path, not the user's)."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as error:
        if error.name and module_name.split(".")[0] == error.name.split(".")[0]:
            raise UserError(f"cannot import {spec!r}: {error} (looked in the current directory {cwd} and "
                            f"the installed packages)") from None
        raise UserError(f"cannot import {spec!r}: {error}") from None
    except (ImportError, AttributeError, ValueError) as error:   # ValueError: an empty module name
        raise UserError(f"cannot import {spec!r}: {error}") from None


def _build(args, dataset):
    kwargs = _parse_kwargs(args.arg)
    if ":" in args.model:
        factory = _import_factory(args.model)
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


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate, or ``None`` when the system does not say: ``MemAvailable``
    of /proc/meminfo (free memory plus the cache the kernel can reclaim), else the free pages ``sysconf``
    reports, lowered to what a cgroup v2 memory limit leaves (containers)."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _check_memory(source: str, what: str, needed: int) -> None:
    """Refuse ``needed`` bytes when more than the memory available (the check is skipped where unknown)."""
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(f"{source}: {what} need about {_size(needed)} of memory, more than the "
                        f"{_size(available)} available; use a smaller batch or fewer --batches")


def _first_layer(model):
    """(name, module) of the first conv/linear layer in module order: the one that sees the input."""
    for name, module in model.named_modules():
        if hasattr(module, "in_channels") or hasattr(module, "in_features"):
            return name, module
    return None, None


def _what_it_takes(model, shape: tuple[int, ...]) -> str:
    name, layer = _first_layer(model)
    if layer is None:
        return ""
    if hasattr(layer, "in_channels") and len(shape) > 1 and shape[1] != layer.in_channels:
        fixed = ",".join(str(n) for n in (shape[0], layer.in_channels, *shape[2:]))
        return (f"its first layer {name or '<model>'} ({type(layer).__name__}) takes {layer.in_channels} input "
                f"channels (dimension 1), e.g. --shape {fixed}")
    if hasattr(layer, "in_features") and shape[-1] != layer.in_features:
        return (f"its first layer {name or '<model>'} ({type(layer).__name__}) takes {layer.in_features} "
                f"features (the last dimension)")
    return ""


def _trial(model, x, source: str, shape: tuple[int, ...]):
    """Run a copy of the model in eval mode on ``x`` (two examples); returns the bytes per example of every
    batch-norm layer's input (what the doctor keeps) and of the largest one. A model that fails on inputs
    of this shape is a :class:`UserError` naming ``source``."""
    import copy

    import torch

    from bnlab import protocol
    probe = copy.deepcopy(model).eval()
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.append(a[0].numel() * a[0].element_size()))
             for m in probe.modules() if protocol.is_batch_norm(m)]
    try:
        with torch.no_grad():
            probe(x)
    except (RuntimeError, ValueError) as error:   # shapes and dtypes that do not fit the model
        takes = _what_it_takes(model, shape)
        said = " ".join(str(error).split())[:300]
        raise UserError(f"{source}: the model does not take inputs of shape {shape}: "
                        + (takes if takes else f"{said} (on a trial batch of {len(x)})")) from None
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes) / len(x), max(sizes, default=0) / len(x)


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
        source = f"--dataset {args.dataset}"
    elif args.shape:
        shape = _parse_shape(args.shape)
        source = f"--shape {args.shape}"
        # float32 inputs, all made before the checks run: refuse what cannot be allocated, before allocating
        _check_memory(source, f"{args.batches} random batch(es) of shape {shape}",
                      args.batches * math.prod(shape) * 4)
        batches = [torch.randn(shape) for _ in range(args.batches)]
    model = _build(args, dataset)
    if batches:
        shape, examples = tuple(batches[0].shape), sum(len(b) for b in batches)
        per_example, largest = _trial(model, batches[0][:2], source, shape)
        # the doctor keeps every batch-norm layer's input of every batch, then reads each layer's in float64
        _check_memory(source, f"the batch-norm inputs of {len(batches)} batch(es) of shape {shape} (measured on "
                      f"2 examples) and a float64 copy of the largest", int(examples * (per_example + 2 * largest)))
    if args.eval:
        model.eval()
    try:
        report = diagnose(model, batches, for_inference=not args.training)
    except ValueError as error:  # the model has no batch-norm layer, or the inputs do not fit it
        raise UserError(str(error)) from None
    print(report.to_json() if args.json else report.format())
    return 1 if args.strict and not report.healthy else 0
