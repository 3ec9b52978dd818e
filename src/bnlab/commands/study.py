"""Measure each claimed effect of batch normalization in residual networks; write a report.

Examples:
  bnlab study                               # quick profile (≤ 5 min on 2 CPU cores) into study-out/
  bnlab study --jobs 2 --out study-out      # two runs at a time; rerun the same command to resume
  bnlab study --claims 1,4 --profile standard
  bnlab study --profile full --device cuda --out study-full
  bnlab study --profile quick --show-profile > my.json && bnlab study --profile my.json
  bnlab report study-out                    # rebuild report.html / report.md without training

Five claims, one verdict each (supported / partly supported / not supported / inconclusive / no
verdict), computed from your own runs with paired 95% intervals over seeds by rules fixed in code
before the data (fewer than 3 seeds, or failed runs: no verdict, and failed runs exit non-zero):
  1  BN reduces internal covariate shift, and that is why it helps
  2  BN accelerates training
  3  BN regularizes
  4  BN allows higher learning rates, and hence better models
  5  BN complements residual connections

Every run (spec, history, metrics, status, versions, hardware) goes into OUT/study.sqlite. Finished
runs are reused when the command is rerun; interrupted or failed ones are redone. The report is
OUT/report.html (self-contained) and OUT/report.md with OUT/figures/*.png; OUT/verdicts.json holds
the verdicts for scripts.
"""

from __future__ import annotations

import json
import os
import sys
import time

NAME = "study"
HELP = "measure BN's claimed effects (ICS, speed, regularization, learning rate, residuals) and report"


def add_arguments(parser) -> None:
    parser.add_argument("--profile", default="quick",
                        help="tiny | quick (default) | standard | full, or a JSON file with the same sections")
    parser.add_argument("--claims", default="all", help="comma-separated claim numbers, e.g. 1,4 (default: all)")
    parser.add_argument("--dataset", default=None,
                        help="override the profile's dataset: mnist1d, fashion-mnist, digits, synthetic")
    parser.add_argument("--out", default="study-out", help="output directory (store, report, figures)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs in parallel processes (default: the number of CPU cores, at most 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the profile's, cpu)")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds (below 3 every "
                                                                "claim gets 'no verdict')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--show-profile", action="store_true", help="print the profile as JSON and exit")


def _check_dataset_and_device(profile: dict) -> None:
    import bnlab.data
    import torch

    known = bnlab.data.available()
    for name in {profile["dataset"], profile["regularize"].get("dataset") or profile["dataset"]}:
        if name.lower().replace("_", "-") not in known:
            raise ValueError(f"--dataset {name!r} is unknown: expected one of {', '.join(known)}")
    device = str(profile.get("device", "cpu"))
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device must be cpu or cuda[:N] (got {device!r})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")


def run(args) -> int:
    from bnlab.study import get_profile, parse_claims, with_overrides
    from bnlab.study.runner import run_study

    profile = with_overrides(get_profile(args.profile), dataset=args.dataset, device=args.device, seeds=args.seeds)
    if args.show_profile:
        print(json.dumps(profile, indent=2))
        return 0
    claims = parse_claims(args.claims)
    _check_dataset_and_device(profile)
    jobs = args.jobs if args.jobs is not None else max(1, min(4, os.cpu_count() or 1))
    if str(profile.get("device", "cpu")).startswith("cuda"):
        jobs = 1 if args.jobs is None else jobs  # one GPU: parallel processes would only contend for it
    started = time.perf_counter()
    report = run_study(profile, args.out, claims=claims, jobs=jobs, progress=not args.no_progress)
    verdicts = json.loads((report.parent / "verdicts.json").read_text())
    print(f"\n{'claim':<62} verdict")
    for number, v in verdicts.items():
        print(f"{number}. {v['title']:<59} {v['verdict']}")
    print(f"\nreport: {report}  (and {report.with_suffix('.md')})  in {time.perf_counter() - started:.0f} s")
    failed = {n: v for n, v in verdicts.items() if v.get("failed_runs")}
    for number, v in failed.items():
        print(f"claim {number} ({v['title']}): no verdict because {v['failed_runs']} of its runs failed; "
              f"rerun the same command to retry them", file=sys.stderr)
    return 1 if failed else 0
