"""CPU benchmark: eval-mode inference time of a ResNet before and after folding batch norm into the convolutions.

Both models are timed in the same run on the same input (float32, inference mode), alternating one call of
each so that changes in machine load hit both alike; the ratio is folded / unfolded of the best times
(lower is better), with the medians beside them. The folded model is checked against the original first.

    python benchmarks/fold_cpu.py                                  # resnet20, batch 64, 32x32
    python benchmarks/fold_cpu.py --model resnet18 --batch 16      # any name bnlab.models.create knows
    python benchmarks/fold_cpu.py --norm torch_bn --threads 1     # one thread: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import bnlab
from bnlab.tools.fold import fold_bn


def _alternating_ms(fns, repeat: int, warmup: int = 3) -> list[list[float]]:
    """Milliseconds per call of each function, calling them in turn ``repeat`` times."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(1e3 * (time.perf_counter() - start))
    return times


def _build(name: str, norm: str) -> torch.nn.Module:
    try:
        from bnlab import models
    except ImportError:  # the model zoo is optional here: a small ResNet-like stack of conv-BN-ReLU
        layers, c = [], 3
        for width in (16, 16, 32, 32, 64, 64):
            layers += [torch.nn.Conv2d(c, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
                       torch.nn.ReLU()]
            c = width
        return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 10))
    return models.create(name, norm=norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--norm", default="bn", help="bn (bnlab) or torch_bn (torch.nn)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = _build(args.model, args.norm).eval()
    with torch.no_grad():   # a few training-mode passes give the running statistics realistic values
        model.train()
        for _ in range(3):
            model(torch.randn(args.batch, 3, args.size, args.size))
        model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    folded, report = fold_bn(model, probe=x)

    def run(net):
        def fn():
            with torch.inference_mode():
                net(x)
        return fn

    before, after = _alternating_ms([run(model), run(folded)], args.repeat)
    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"model {args.model} (norm={args.norm}), input {tuple(x.shape)} float32, eval mode, inference_mode")
    print(f"folded {len(report.folded)} BN layers, kept {len(report.skipped)}; "
          f"max relative error on the probe {report.max_rel_error:.2e}")
    print(f"{'':12s}{'best ms':>10s}{'median ms':>11s}")
    for label, times in (("unfolded", before), ("folded", after)):
        print(f"{label:12s}{min(times):10.2f}{statistics.median(times):11.2f}")
    t0, t1 = min(before), min(after)
    print(f"ratio folded/unfolded (best): {t1 / t0:.3f}  (speed-up {t0 / t1:.2f}x); "
          f"median ratio {statistics.median(after) / statistics.median(before):.3f}")


if __name__ == "__main__":
    main()
