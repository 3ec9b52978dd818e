"""List the models `bnlab train --model` accepts, their sizes, and the normalization options.

Examples:
  bnlab models
  bnlab models --in-channels 1 --num-classes 10      # parameter counts for Fashion-MNIST
  bnlab models --json

Any CIFAR depth 6n+2 is also available as `--model resnet --depth D` (and preact_resnet, resnet1d).
Parameter counts are for width 1 with the given input channels and classes (default 3 and 10, the
setting of He et al. 2016, Table 6).
"""

from __future__ import annotations

import json

NAME = "models"
HELP = "list the available models and normalization layers"


def add_arguments(parser) -> None:
    parser.add_argument("--in-channels", type=int, default=3, help="input channels for the counts (default 3)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes for the counts (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON: models with parameters, and norms")


def run(args) -> int:
    import torch

    from bnlab import models

    rows = []
    for name, description in models.describe().items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = models.create(name, in_channels=args.in_channels, num_classes=args.num_classes)
        rows.append({"name": name, "parameters": sum(p.numel() for p in model.parameters()),
                     "description": description})
    if args.json:
        print(json.dumps({"models": rows, "norms": models.norms.available()}, indent=1))
        return 0
    print(f"{'model':<18}{'params':>10}  description")
    for row in rows:
        print(f"{row['name']:<18}{row['parameters'] / 1e6:>9.3f}M  {row['description']}")
    print(f"\nnorms (--norm): {', '.join(models.norms.available())}")
    return 0
