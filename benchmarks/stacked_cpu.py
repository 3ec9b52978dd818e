"""CPU benchmark: K seeds of a small ResNet trained as one stacked network (bnlab.models.stack) vs each
alone, measured in the same run, on one thread (as every study run is).

Two tables:

1. the training step (forward, backward, Nesterov SGD) of the study's networks — the 1-D ResNet-8 at
   width 0.5 on MNIST-1D's shape (1 × 40) and the 2-D one on 14 × 14 images — with BN and without
   normalization: ms per seed-step alone and stacked, and the throughput ratio (alone / stacked per seed,
   higher is better). Best of ``--repeat`` alternating measurements of ``--steps`` steps;
2. whole study runs: ``bnlab.study.runs.run_train`` for each of six seeds vs one
   ``run_train_stack`` of the six (quick's claim-4 run: 3 epochs at lr 0.1, evaluated every 16 steps), the
   wall-time ratio;
3. a learning-rate grid: quick's claim-5 tuning runs of one cell (ResNet-14, 5 rates × 2 tuning seeds), one
   stack per rate (the seeds of a rate together) vs the runner's stacks (``bnlab.study.runner.stacks``: the
   grid in stacks of seeds and rates, each member at its rate, a member leaving its stack when it ends).

Exits with status 1 when the stacked throughput of six seeds of the 1-D network (quick's) with BN is below
``--target`` (1.3×). The 2-D network's convolutions do more arithmetic per call, so stacking gains less there.

    python benchmarks/stacked_cpu.py
    python benchmarks/stacked_cpu.py --members 2 4 6 8 --repeat 5
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F

import bnlab
import bnlab.models as models
from bnlab.train import param_groups


def _step_fn(net, x, y, stacked: bool):
    opt = torch.optim.SGD(param_groups(net, 0.0, 0.0), lr=0.01, momentum=0.9, nesterov=True)

    def step():
        out = net(x)
        if stacked:
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            loss = loss.view(out.shape[0], -1).mean(1).sum()
        else:
            loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def _seconds(fn, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - started) / steps


def step_table(members: list[int], steps: int, repeat: int) -> list[tuple]:
    rows = []
    for dims, shape in ((1, (1, 40)), (2, (1, 14, 14))):
        name = "resnet1d" if dims == 1 else "resnet"
        for norm in ("bn", "none"):
            def net(seed):
                return models.create(name, depth=8, width=0.5, in_channels=1, num_classes=10, norm=norm,
                                     init_seed=seed, fused=False)
            g = torch.Generator().manual_seed(0)
            for k in members:
                nets = [net(s) for s in range(k)]
                x = torch.randn(k, 64, *shape, generator=g)
                y = torch.randint(0, 10, (k, 64), generator=g)
                alone = [_step_fn(n, x[i], y[i], False) for i, n in enumerate(nets)]
                stacked = _step_fn(models.stack([net(s) for s in range(k)]), x, y, True)
                for fn in alone + [stacked]:
                    _seconds(fn, 3)   # warm-up
                best_alone, best_stacked = float("inf"), float("inf")
                for _ in range(repeat):
                    best_alone = min(best_alone, sum(_seconds(fn, steps) for fn in alone) / k)
                    best_stacked = min(best_stacked, _seconds(stacked, steps) / k)
                rows.append((f"{dims}-D {'×'.join(map(str, shape))}", norm, k, 1e3 * best_alone,
                             1e3 * best_stacked, best_alone / best_stacked))
    return rows


def run_table() -> list[tuple]:
    from bnlab.study import get_profile
    from bnlab.study.common import train_spec
    from bnlab.study.runs import load_data, run_train, run_train_stack
    profile = get_profile("quick")
    rows = []
    for norm in ("bn", "none"):
        specs = [train_spec(profile, norm=norm, lr=0.1, batch_size=64, epochs=3, seed=s) for s in range(6)]
        load_data(specs[0])
        run_train(specs[0])   # warm-up
        started = time.perf_counter()
        for s in specs:
            run_train(s)
        alone = time.perf_counter() - started
        started = time.perf_counter()
        run_train_stack(specs)
        stacked = time.perf_counter() - started
        rows.append((norm, alone, stacked, alone / stacked))
    return rows


def grid_table(repeat: int) -> list[tuple]:
    from bnlab.study import claim_residual, get_profile
    from bnlab.study.runner import stacks
    from bnlab.study.runs import load_data, run_train_stack
    from bnlab.study.specs import spec_key
    profile = get_profile("quick")
    rows = []
    for norm, plain in (("bn", False), ("none", False), ("none", True)):
        specs = claim_residual._tuned(profile, None, 14, norm, plain)[0]
        load_data(specs[0])
        by_rate = {}
        for s in specs:
            by_rate.setdefault(s["lr"], []).append(s)
        grid = [[s for _, s in job] for job in stacks([(spec_key(s), s) for s in specs], int(profile["stack"]))]
        times = {"per rate": [], "grid": []}
        for _ in range(repeat):
            for name, jobs in (("per rate", list(by_rate.values())), ("grid", grid)):
                started = time.perf_counter()
                for job in jobs:
                    run_train_stack(job)
                times[name].append(time.perf_counter() - started)
        a, g = min(times["per rate"]), min(times["grid"])
        rows.append((f"{norm}{' plain' if plain else ''}", len(specs), len(by_rate), len(grid), a, g, a / g))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.3)
    parser.add_argument("--no-runs", action="store_true", help="skip the whole-run and grid tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{platform.processor() or 'cpu'}, 1 thread")
    rows = step_table(args.members, args.steps, args.repeat)
    print("\n| network | norm | seeds | alone ms/seed-step | stacked ms/seed-step | throughput × |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, norm, k, a, s, r in rows:
        print(f"| {shape} | {norm} | {k} | {a:.2f} | {s:.2f} | {r:.2f} |")
    if not args.no_runs:
        print("\n| quick's claim-4 run, 6 seeds | alone s | stacked s | × |")
        print("|---|---:|---:|---:|")
        for norm, a, s, r in run_table():
            print(f"| {norm} | {a:.1f} | {s:.1f} | {r:.2f} |")
        print("\n| quick's claim-5 grid at depth 14 | runs | stacks per rate | grid stacks | per rate s | grid s | × |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for cell, n, kr, kg, a, g, r in grid_table(args.repeat):
            print(f"| {cell} | {n} | {kr} | {kg} | {a:.1f} | {g:.1f} | {r:.2f} |")
    six = [r for shape, norm, k, a, s, r in rows if norm == "bn" and k == 6 and shape.startswith("1-D")]
    if six and min(six) < args.target:
        print(f"\nstacked throughput of 6 seeds of the 1-D network with BN {min(six):.2f}× is below the target "
              f"{args.target}×")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
