"""CPU benchmark: a training step of a small conv net with bnlab's batch norm, eager vs
``torch.compile(fullgraph=True)``, next to the same net with ``torch.nn.BatchNorm2d``, in the same run.

Rows: forward+backward time of one step (best of ``--repeat`` after warm-up), the first compiled call
(tracing + code generation), and the ratios compiled / eager and ours / torch's. ``fullgraph=True`` fails
loudly if any layer breaks the graph, so a row at all is the check that bnlab's training path traces.

    python benchmarks/compile_cpu.py                 # inductor (needs a C++ compiler)
    python benchmarks/compile_cpu.py --backend eager # tracing only: no code generation
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from torch import nn

import bnlab
from bnlab import nn as bnn
from bn_cpu import _best_ms  # the same timing as the layer benchmark (run as a script from benchmarks/)


def _net(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def _step(model: nn.Module, x: torch.Tensor):
    def run():
        model(x).square().mean().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height = width")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    torch_net = _net(args.channels).train()
    models = {"torch.nn.BatchNorm2d": torch_net, "bnlab.nn.BatchNorm2d": bnn.convert(copy.deepcopy(torch_net))}

    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s); batch {tuple(x.shape)}, {args.channels} channels, "
          f"backend {args.backend!r}")
    print(f"{'batch norm':22s} {'eager ms':>9s} {'compiled ms':>12s} {'first call s':>13s} {'compiled/eager':>15s}")
    rows = {}
    for name, model in models.items():
        compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend=args.backend)
        start = time.perf_counter()
        _step(compiled, x)()
        first = time.perf_counter() - start
        eager_ms, compiled_ms = _best_ms([_step(model, x), _step(compiled, x)], args.repeat)
        rows[name] = (eager_ms, compiled_ms)
        print(f"{name:22s} {eager_ms:9.2f} {compiled_ms:12.2f} {first:13.2f} {compiled_ms / eager_ms:15.2f}")
    (te, tc), (be, bc) = rows["torch.nn.BatchNorm2d"], rows["bnlab.nn.BatchNorm2d"]
    print(f"bnlab / torch: eager {be / te:.2f}, compiled {bc / tc:.2f}")


if __name__ == "__main__":
    main()
