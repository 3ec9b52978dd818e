"""CPU benchmark: bnlab.functional.batch_norm vs torch.nn.functional.batch_norm, measured in the same run.

For ResNet-typical shapes, float32, contiguous and channels_last, training mode: forward time and
forward+backward time of ours and of PyTorch's native op, and the ratio ours / native (lower is better;
the target is ≤ 1.25). Timing is the best of repeated runs after warm-up (the minimum is the figure least
disturbed by other work on a shared machine); ours and native alternate so both see the same conditions.

    python benchmarks/bn_cpu.py            # the full table
    python benchmarks/bn_cpu.py --repeat 5 # fewer repetitions
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as torch_F

import bnlab
from bnlab import functional as bn_F

SHAPES = [(128, 16, 32, 32), (128, 64, 16, 16), (64, 256, 8, 8)]


def _best_ms(fns, repeat: int, warmup: int = 3) -> list[float]:
    """Best wall time in ms of each function, calling them in alternation."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [1e3 * b for b in best]


def _cases(impl, x, weight, bias):
    channels = x.shape[1]
    rm, rv = torch.zeros(channels), torch.ones(channels)
    grad = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            impl(x, rm, rv, weight, bias, training=True, momentum=0.1, eps=1e-5)

    def forward_backward():
        xg = x.detach().requires_grad_(True)
        y = impl(xg, rm, rv, weight, bias, training=True, momentum=0.1, eps=1e-5)
        torch.autograd.grad(y, (xg, weight, bias), grad)

    return forward, forward_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    header = f"{'shape (N,C,H,W)':<20}{'layout':<15}{'pass':<10}{'ours ms':>9}{'native ms':>11}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for shape in SHAPES:
        for layout in ("contiguous", "channels_last"):
            x = torch.randn(shape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            weight = torch.randn(shape[1], requires_grad=True)
            bias = torch.randn(shape[1], requires_grad=True)
            ours = _cases(bn_F.batch_norm, x, weight, bias)
            native = _cases(torch_F.batch_norm, x, weight, bias)
            for name, ours_fn, native_fn in zip(("fwd", "fwd+bwd"), ours, native):
                t_ours, t_native = _best_ms([ours_fn, native_fn], args.repeat)
                worst = max(worst, t_ours / t_native)
                print(f"{str(shape):<20}{layout:<15}{name:<10}{t_ours:>9.2f}{t_native:>11.2f}"
                      f"{t_ours / t_native:>7.2f}")
    print(f"worst ratio ours/native: {worst:.2f} (target ≤ 1.25)")


if __name__ == "__main__":
    main()
