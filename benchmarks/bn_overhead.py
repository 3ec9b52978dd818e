"""CPU benchmark: the per-call cost of bnlab's batch norm in a small training step, against PyTorch's
native layer and against no normalization, measured in the same run.

The model is the study's quick-profile network: ``resnet1d`` of depth 8 at width 0.5 (seven batch-norm
layers, tensors of (64, 8, 40) down to (64, 32, 10)) on a (64, 1, 40) float32 batch, one intra-op thread.
One step is forward + cross-entropy + backward + SGD step. The three models (``bn``: bnlab's layers,
``torch_bn``: ``torch.nn.BatchNorm1d``, ``none``: no normalization) start from the same weights and are
stepped in alternation, so all three see the same load on a shared machine. Printed: the median step time
of each (and the fastest, the figure least disturbed by other work), and the ratios bn / torch_bn and
bn / none of the medians (lower is better).

    python benchmarks/bn_overhead.py                      # 300 rounds after 30 warm-up rounds
    python benchmarks/bn_overhead.py --repeat 1000 --batch 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import bnlab
from bnlab import models

NORMS = ("bn", "torch_bn", "none")


def _stepper(norm: str, batch: int, length: int):
    torch.manual_seed(0)
    model = models.create("resnet1d", norm=norm, in_channels=1, num_classes=10, width=0.5, depth=8, fused=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, length, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def measure(repeat: int, warmup: int, batch: int, length: int) -> dict[str, list[float]]:
    """Seconds per step of each norm, stepping the models in alternation."""
    steps = {norm: _stepper(norm, batch, length) for norm in NORMS}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {norm: [] for norm in NORMS}
    for _ in range(repeat):
        for norm, step in steps.items():
            start = time.perf_counter()
            step()
            times[norm].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=300, help="timed rounds (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first (default 30)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--length", type=int, default=40, help="input length (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s); resnet1d depth 8 width 0.5, batch ({args.batch}, 1, {args.length}), "
          f"{args.repeat} rounds")
    times = measure(args.repeat, args.warmup, args.batch, args.length)
    median = {norm: statistics.median(t) for norm, t in times.items()}
    print(f"{'norm':<10}{'median ms':>12}{'best ms':>10}")
    for norm in NORMS:
        print(f"{norm:<10}{1e3 * median[norm]:>12.3f}{1e3 * min(times[norm]):>10.3f}")
    print(f"bn / torch_bn: {median['bn'] / median['torch_bn']:.2f}   bn / none: {median['bn'] / median['none']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
