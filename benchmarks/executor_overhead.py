"""Study executors: what running a study's runs as Ray tasks costs against the local process pool.

The same specs (short ``signal`` runs on the synthetic dataset, where the executor's own cost is a large
part of each run) go through :func:`bnlab.study.runner.run_specs` with each executor into a fresh store,
``--jobs`` in flight, in alternating rounds. Printed per executor: start-up (the pool or the local Ray
instance, and a first batch of runs that imports torch in every worker, not counted in the per-run
figure), wall seconds per run in steady state (best round), the runs' own compute seconds per run, and
the ratio Ray / processes (lower is better).

    python benchmarks/executor_overhead.py                 # 40 runs, 2 jobs, 2 rounds
    python benchmarks/executor_overhead.py --runs 80 --jobs 2 --rounds 3 --kind train
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import bnlab
from bnlab.study.executors import ProcessExecutor, RayExecutor
from bnlab.study.runner import run_specs
from bnlab.study.specs import make_spec, unique_specs
from bnlab.study.store import Store


def make_specs(kind: str, count: int, offset: int) -> dict[str, dict]:
    """``count`` distinct cheap runs (distinct seeds), so none is reused from the store."""
    small = dict(dataset="synthetic", depth=8, width=0.25, norm="bn", batch_size=32)
    if kind == "signal":
        return unique_specs(make_spec("signal", **small, seed=offset + i) for i in range(count))
    return unique_specs(make_spec("train", **small, seed=offset + i, lr=0.05, max_steps=10, epochs=1,
                                  eval_every=5) for i in range(count))


def timed(executor, specs: dict, directory: Path, name: str) -> tuple[float, float]:
    """(wall seconds, summed compute seconds) of running ``specs`` through ``executor``."""
    store = Store(directory / f"{name}.sqlite")
    started = time.perf_counter()
    run_specs(specs, store, jobs=executor.capacity, progress=False, executor=executor)
    wall = time.perf_counter() - started
    return wall, sum(row["seconds"] for row in store.rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per round and executor")
    parser.add_argument("--jobs", type=int, default=2, help="runs in flight")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is reported")
    parser.add_argument("--kind", choices=["signal", "train"], default="signal")
    args = parser.parse_args()

    print(f"bnlab {bnlab.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        startup, executors = {}, {}
        for name, make in (("processes", lambda: ProcessExecutor(args.jobs)),
                           ("ray", lambda: RayExecutor(jobs=args.jobs))):
            started = time.perf_counter()
            executors[name] = make()
            timed(executors[name], make_specs(args.kind, args.jobs, 10_000 + len(startup) * 100),
                  directory, f"warm-{name}")  # every worker has imported torch
            startup[name] = time.perf_counter() - started
        best = {name: (float("inf"), 0.0) for name in executors}
        offset = 0
        for round_ in range(args.rounds):
            for name, executor in executors.items():
                specs = make_specs(args.kind, args.runs, offset)
                offset += args.runs
                wall, compute = timed(executor, specs, directory, f"{name}-{round_}")
                if wall < best[name][0]:
                    best[name] = (wall, compute)
        for executor in executors.values():
            executor.close()
    print(f"{args.runs} {args.kind} runs per round, {args.jobs} in flight, best of {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'executor':<10} {'start-up s':>10} {'wall s/run':>11} {'compute s/run':>14}")
    for name, (wall, compute) in best.items():
        print(f"{name:<10} {startup[name]:>10.2f} {wall / args.runs:>11.4f} {compute / args.runs:>14.4f}")
    ratio = best["ray"][0] / best["processes"][0]
    print(f"ratio ray / processes, wall per run: {ratio:.2f}")


if __name__ == "__main__":
    main()
