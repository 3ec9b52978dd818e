"""The runner: collect the claims' specs, run each distinct one once, resume from the store.

Finished runs (done or diverged) are read back from the store and never rerun; failed and interrupted
ones are (an interrupted run left no row, see :mod:`bnlab.study.store`). With ``jobs > 1`` runs go to a
pool of spawned worker processes, each writing its own row in its own transaction, so the parent never
holds results the store has not got.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from bnlab.study.claims import collect_specs, parse_claims
from bnlab.study.specs import spec_label
from bnlab.study.store import Store, environment

__all__ = ["STORE_NAME", "collect_specs", "run_specs", "run_study", "estimated_cost"]

STORE_NAME = "study.sqlite"


def estimated_cost(spec: dict) -> float:
    """A rough relative cost (steps × depth × per-step factor), to start the longest runs first so the
    worker pool ends together."""
    steps = spec.get("max_steps") or spec.get("steps") or 100 * spec.get("epochs", 1)
    factor = {"ics": 3.0, "signal": 0.02}.get(spec["kind"], 1.0)
    norm = str(spec.get("norm", ""))
    factor *= 2.0 if ("bn" in norm or norm.startswith("ghost")) else 1.0
    return steps * spec.get("depth", 8) * factor


def _work(store_path: str, key: str, spec: dict) -> tuple[str, str, Optional[str]]:
    """Run one spec and record it (executed in a worker process, or inline when jobs == 1)."""
    from bnlab.study.runs import execute
    started = time.perf_counter()
    status, result, error = execute(spec)
    versions, hardware = environment()
    hardware["threads_per_run"] = 1  # execute() runs every spec on one thread
    Store(store_path).put(key, spec, status, result, error, time.perf_counter() - started, versions, hardware)
    return key, status, error


def run_specs(specs: dict[str, dict], store: Store, jobs: int = 1, progress: bool = True) -> dict[str, str]:
    """Run every spec the store does not already hold as finished; returns key → status of those run."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive integer (got {jobs!r})")
    done = store.finished_keys()
    pending = sorted(((k, s) for k, s in specs.items() if k not in done), key=lambda ks: -estimated_cost(ks[1]))
    bar = tqdm(total=len(specs), initial=len(specs) - len(pending), desc="runs", unit="run",
               disable=not progress, dynamic_ncols=True)
    statuses: dict[str, str] = {}
    try:
        if jobs == 1:
            for key, spec in pending:
                bar.set_postfix_str(spec_label(spec)[:40])
                statuses[key] = _work(str(store.path), key, spec)[1]
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")  # fork after torch's thread pools can deadlock
            with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                jobs_ = [pool.submit(_work, str(store.path), key, spec) for key, spec in pending]
                for job in futures.as_completed(jobs_):
                    key, status, _ = job.result()
                    statuses[key] = status
                    bar.update()
    finally:
        bar.close()
    return statuses


def run_study(profile: dict, out: str | Path, claims=None, jobs: int = 1, progress: bool = True,
              report: bool = True) -> Path:
    """Run (or resume) the study for ``profile`` into directory ``out`` and write the report there.

    Returns the path of ``report.html`` (or of the store when ``report=False``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    numbers = parse_claims(claims)
    store = Store(out / STORE_NAME)
    store.set_meta("profile", profile)
    store.set_meta("claims", numbers)
    started = time.perf_counter()
    statuses: dict[str, str] = {}
    specs: dict[str, dict] = {}
    while True:  # rounds: a claim may ask for more runs once it sees results (see bnlab.study.claims)
        new = collect_specs(profile, numbers, store.results())
        if set(new) <= set(specs):
            break
        fresh = {k: v for k, v in new.items() if k not in specs}  # each spec is tried once per invocation
        specs = new
        statuses.update(run_specs(fresh, store, jobs=jobs, progress=progress))
    store.set_meta("last_run_seconds", time.perf_counter() - started)
    failed = [k for k, s in statuses.items() if s == "failed"]
    if failed and progress:
        first = store.get(failed[0])
        print(f"{len(failed)} run(s) failed; they are recorded in {store.path} and retried on the next "
              f"invocation. First error ({spec_label(first['spec'])}):\n{first['error']}")
    if not report:
        return store.path
    from bnlab.study.report import build_report
    return build_report(out)
