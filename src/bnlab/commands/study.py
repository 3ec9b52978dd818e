"""Measure each claimed effect of batch normalization in residual networks; write a report that answers.

Examples:
  bnlab study                               # the quick profile into study-out/ (time: see Profiles below)
  bnlab study --profile tiny --out /tmp/t   # a check of the whole pipeline (every verdict: no verdict)
  bnlab study --jobs 2 --out study-out      # two runs at a time; rerun the same command to resume
  bnlab study --claims 1,4 --profile standard
  bnlab study --profile full --device cuda --out study-full
  bnlab study --profile quick --show-profile > my.json && bnlab study --profile my.json
  bnlab report study-out                    # rebuild report.html / report.md without training
  bnlab study --executor ray --address auto # each run a task on a running Ray cluster (`ray start`)
  bnlab study --profile full --dry-run      # the plan: runs per claim, estimated hours, memory; trains nothing

Profiles (--profile), each with the time its description states (the README and the report quote it):
<profiles>

Five claims, one verdict each (supported / partly supported / not supported / inconclusive / no
verdict), computed from your own runs with paired 95% intervals over seeds by rules fixed in code
before the data (fewer than 3 seeds, or failed runs: no verdict, and failed runs exit non-zero):
  1  BN reduces internal covariate shift, and that is why it helps
  2  BN accelerates training
  3  BN regularizes
  4  BN allows higher learning rates, and hence better models
  5  BN complements residual connections

The report, OUT/report.html (self-contained; OUT/report.md with OUT/figures/ has the same content),
opens with one plain sentence per claim, shows BN's four steps on a channel of a network the study
trained, then each claim's evidence; OUT/verdicts.json holds the verdicts and answers for scripts.

Every run (spec, history, metrics, status, versions, hardware) goes into OUT/study.sqlite. Finished
runs are reused when the command is rerun; interrupted or failed ones are redone. Ctrl-C stops the
workers within seconds (runs in flight are abandoned, never half-stored) and exits with status 130;
rerun the same command to resume. OUT is locked while a study runs in it. Only this process writes
OUT/study.sqlite: workers (local processes, or Ray tasks with --executor ray) send each run back, and
a Ray task whose worker or node dies is retried up to twice (result["attempts"] counts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bnlab.errors import UserError
from bnlab.study.executors import EXECUTORS, check_gpus_per_run

NAME = "study"
HELP = "measure BN's claimed effects (ICS, speed, regularization, learning rate, residuals) and report"


PROFILES_MARK = "<profiles>"


def summary_verdict(claim: dict) -> str:
    """A claim's line in the printed summary: its verdict, or with several settings its answer across them
    ("depends on the setting: supported in …; inconclusive in …"), as the report's first screen gives it."""
    from bnlab.study.scope import DEPENDS  # the summary only: it imports the claims
    robust = claim.get("robust")  # one setting: its verdict
    if not robust:
        return claim["verdict"]
    return f"{DEPENDS}: {robust['text']}" if robust["answer"] == DEPENDS else robust["answer"]


def profile_lines() -> str:
    """One line per profile for the help: its name and the time its description states (the description's
    text before ": ", :func:`bnlab.study.templates.profile_time`)."""
    from bnlab.study.profiles import PROFILES  # only when the help is shown: it imports the claims
    from bnlab.study.templates import profile_time
    return "\n".join(f"  {name:<9} {profile_time(p['description'])}" for name, p in PROFILES.items())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command's help with the profiles' own descriptions filled in when the help is shown."""

    def _fill_text(self, text, width, indent):
        if PROFILES_MARK in text:
            text = text.replace(PROFILES_MARK, profile_lines())
        return super()._fill_text(text, width, indent)


def add_arguments(parser) -> None:
    parser.formatter_class = _HelpFormatter
    parser.add_argument("--profile", default="quick",
                        help="tiny | quick (default) | standard | full (see Profiles above), or a JSON file with "
                             "the same sections")
    parser.add_argument("--claims", default="all", help="comma-separated claim numbers, e.g. 1,4 (default: all)")
    parser.add_argument("--dataset", default=None,
                        help="override the profile's dataset: mnist1d, fashion-mnist, digits, synthetic")
    parser.add_argument("--data-dir", help="directory holding the dataset files (authoritative, as $BNLAB_DATA)")
    parser.add_argument("--out", default="study-out", help="output directory (store, report, figures)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs in flight at once (default: the number of CPU cores, at most 4; with "
                             "--executor ray --address: the cluster's CPUs)")
    parser.add_argument("--executor", default="process", choices=EXECUTORS,
                        help="process (default): local worker processes; ray: one Ray task per run "
                             "(pip install 'bnlab[ray]')")
    parser.add_argument("--address", default=None,
                        help="with --executor ray: a running cluster, auto or HOST:PORT (default: start a "
                             "local Ray instance with --jobs CPUs)")
    parser.add_argument("--gpus-per-run", type=float, default=None,
                        help="with --executor ray and a CUDA device: the GPU share each run reserves, e.g. "
                             "0.25 for four runs per GPU (default 1)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA if available, else the profile's), cpu, cuda or cuda:N")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds, all in one look "
                                                                "(no sequential seeds; below 3 every claim gets "
                                                                "'no verdict')")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("--show-profile", action="store_true", help="print the profile as JSON and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (runs per claim and kind, estimated CPU/GPU-hours and wall time at "
                             "--jobs, peak memory per run, from a few timed steps per class of run) and exit; "
                             "trains nothing and creates nothing")
    parser.add_argument("--no-calibrate", action="store_true", help="with --dry-run: run counts only, no timing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")


def _gpus_per_run(args, profile: dict) -> float:
    """The GPU share a Ray task reserves: --gpus-per-run (default 1) on CUDA, none on CPU."""
    cuda = str(profile.get("device", "cpu")).startswith("cuda")
    if args.gpus_per_run is None:
        return 1.0 if cuda and args.executor == "ray" else 0.0
    if args.executor != "ray":
        raise UserError("--gpus-per-run is for --executor ray (the process executor shares the local GPU)")
    if not cuda:
        raise UserError(f"--gpus-per-run {args.gpus_per_run:g}: the runs use device "
                        f"{profile.get('device', 'cpu')!r}; give --device cuda to run them on GPUs")
    return check_gpus_per_run(args.gpus_per_run)


def _datasets(profile: dict) -> set[str]:
    """The datasets a profile's runs read (a claim may name its own, e.g. claim 3's ``regularize.dataset``)."""
    from bnlab.study.profiles import datasets
    return datasets(profile)


def _check_dataset_and_device(profile: dict, on_this_machine: bool = True) -> None:
    import bnlab.data
    from bnlab.train import resolve_device

    for name in _datasets(profile):
        try:
            bnlab.data.canonical_name(name)
        except UserError as error:
            raise UserError(f"--dataset: {error}") from None
    if on_this_machine:  # on a Ray cluster the runs' device is the workers' (a CPU-only head is fine)
        import torch
        if profile.get("requires_cuda") and not torch.cuda.is_available():
            raise UserError(f"profile {profile.get('name', '')!r} needs a CUDA GPU and none is available here; run it "
                            f"on a GPU machine (or a Ray cluster with GPUs: --executor ray --address ...), or plan "
                            f"it here with --dry-run")
        resolve_device(str(profile.get("device", "cpu")))


def _check_data_dir(profile: dict, data_dir) -> None:
    """Every dataset the study reads from files is in --data-dir (nothing is downloaded into it)."""
    import bnlab.data
    for name in _datasets(profile):
        if bnlab.data.from_files(name):
            bnlab.data.load(name, data_dir=data_dir, download=False)  # raises naming the directory and file


def _profile(args) -> dict:
    import torch

    from bnlab.study import get_profile, with_overrides

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None  # None: the profile's device
    try:
        return with_overrides(get_profile(args.profile), dataset=args.dataset, device=device, seeds=args.seeds)
    except ValueError as error:  # a profile or an override the user gave
        raise UserError(str(error)) from None


def _dry_run(args, profile: dict, claims: list, jobs: int) -> int:
    """Print the plan (:mod:`bnlab.study.plan`); nothing is trained and --out is not created."""
    from bnlab.study.plan import format_plan, make_plan
    if args.data_dir:
        _check_data_dir(profile, args.data_dir)
        os.environ["BNLAB_DATA"] = str(args.data_dir)
    plan = make_plan(profile, claims, jobs, executor=args.executor, calibration=not args.no_calibrate,
                     gpus_per_run=args.gpus_per_run, log=lambda text: print(text, file=sys.stderr))
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _report(store):
    """The report of the study whose store is ``store``; a full disk is one line saying the runs are safe."""
    import errno

    from bnlab.study.report import build_report
    try:
        return build_report(store.parent)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"cannot write the report into {store.parent}: {error.strerror} (errno {error.errno}); "
                        f"every run is in {store}, intact: free space there and run `bnlab report "
                        f"{store.parent}`") from None


def run(args) -> int:
    from bnlab.study.executors import make_executor
    from bnlab.study.runner import check_jobs, check_out, run_study

    profile = _profile(args)
    if args.show_profile:
        print(json.dumps(profile, indent=2))
        return 0
    if args.address is not None and args.executor != "ray":
        raise UserError("--address is for --executor ray (the process executor runs on this machine)")
    gpus_per_run = _gpus_per_run(args, profile)
    from bnlab.study import parse_claims  # the claim registry: imported once the arguments above are checked
    try:
        claims = parse_claims(args.claims)
    except ValueError as error:
        raise UserError(str(error)) from None
    if (args.no_calibrate or args.json) and not args.dry_run:
        raise UserError(f"{'--no-calibrate' if args.no_calibrate else '--json'} is for --dry-run")
    # a dry run plans a CUDA profile on a machine without one (it calibrates on the CPU and says so)
    _check_dataset_and_device(profile, on_this_machine=args.address is None and not args.dry_run)
    jobs = args.jobs if args.jobs is not None else max(1, min(4, os.cpu_count() or 1))
    if str(profile.get("device", "cpu")).startswith("cuda") and args.executor == "process":
        jobs = 1 if args.jobs is None else jobs  # one GPU: parallel processes would only contend for it
    check_jobs(jobs)
    if args.dry_run:
        return _dry_run(args, profile, claims, jobs)  # --gpus-per-run was checked above
    if args.executor == "ray" and args.address is not None and args.jobs is None:
        jobs = None  # the cluster's CPUs, known once connected
    from bnlab.data import check_data_dir  # --data-dir or $BNLAB_DATA: the copies there verified before any run
    check_data_dir(_datasets(profile), args.data_dir)
    if args.address is None:  # a run that cannot fit this machine's memory is refused before anything is built
        from bnlab.study.plan import check_memory
        check_memory(profile, claims)
    if args.data_dir:
        _check_data_dir(profile, args.data_dir)
        os.environ["BNLAB_DATA"] = str(args.data_dir)  # the workers' data.load reads it from the environment
    started = time.perf_counter()
    # the executor first: a Ray cluster that does not answer leaves no --out behind
    with make_executor(args.executor, jobs, address=args.address, gpus_per_run=gpus_per_run) as executor:
        check_out(args.out)
        store = run_study(profile, args.out, claims=claims, jobs=executor.capacity, progress=args.progress,
                          executor=executor)
    report = _report(store)
    verdicts = json.loads((report.parent / "verdicts.json").read_text())["claims"]
    print(f"\n{'claim':<62} verdict")
    for number, v in verdicts.items():
        print(f"{number}. {v['title']:<59} {summary_verdict(v)}")
    print(f"\nreport: {report}  (and {report.with_suffix('.md')})  in {time.perf_counter() - started:.0f} s")
    failed = {n: v for n, v in verdicts.items() if v.get("failed_runs")}
    for number, v in failed.items():
        print(f"claim {number} ({v['title']}): no verdict because {v['failed_runs']} of its runs failed; "
              f"rerun the same command to retry them", file=sys.stderr)
    return 1 if failed else 0
