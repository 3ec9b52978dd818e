"""The runner: collect the claims' specs, run each distinct one once, resume from the store.

Finished runs (done or diverged) are read back from the store and never rerun; failed and interrupted
ones are (an interrupted run left no row, see :mod:`bnlab.study.store`). Runs execute wherever the
executor puts them (:mod:`bnlab.study.executors`: this process, ``jobs`` spawned processes, or a Ray
cluster), at most ``jobs`` at a time; the workers only compute, and this process writes each run's row in
one transaction as soon as the run comes back, so SQLite has one writer and no run is half-stored.

Stopping: Ctrl-C (SIGINT) or SIGTERM in the parent cancels the queue, abandons the runs in flight (they
leave no row) and raises :class:`Interrupted`, which says how many runs are in the store. Local workers
ignore SIGINT (the parent decides) and die with the parent even when it is killed outright. A full disk
stops the workers the same way and raises :class:`bnlab.study.store.StoreFull` (the store stays intact;
the same command resumes once space is freed). :func:`run_study` locks the output directory, so two
studies never run the same specs twice, and checks the store first: a damaged one is moved aside and its
readable runs carried into a new store (:func:`bnlab.study.store.recover`), which it says on stderr.

The runner does not build the report (:mod:`bnlab.study.report` reads the store; ``bnlab study`` calls
it after :func:`run_study`), so the two modules do not import each other.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from bnlab.errors import UserError
from bnlab.study.claims import parse_claims
from bnlab.study.executors import Executor, make_executor
from bnlab.study.kinds import kind_of, stack_group
from bnlab.study.scope import collect as collect_specs
from bnlab.study.specs import spec_label
from bnlab.study.store import STORE_NAME, Store, StoreDamaged, StoreError, StoreFull, recover

__all__ = ["STORE_NAME", "LOCK_NAME", "Interrupted", "collect_specs", "run_specs", "run_rounds", "run_study",
           "estimated_cost", "StudyLock", "check_jobs", "check_out", "open_store"]

LOCK_NAME = ".study.lock"  # beside it, .study.lock.owner names the process holding it


class Interrupted(KeyboardInterrupt):
    """The study stopped on Ctrl-C or SIGTERM; the message says what the store holds."""


def estimated_cost(spec: dict) -> float:
    """A rough relative cost (steps × depth × the kind's per-step cost, doubled for a batch norm), to start
    the longest runs first so the worker pool ends together."""
    steps = spec.get("max_steps") or spec.get("steps") or 100 * spec.get("epochs", 1)
    factor = kind_of(spec).cost
    norm = str(spec.get("norm", ""))
    factor *= 2.0 if ("bn" in norm or norm.startswith("ghost")) else 1.0
    return steps * spec.get("depth", 8) * factor


def stacks(pending: list[tuple[str, dict]], most: int) -> list[list[tuple[str, dict]]]:
    """``pending`` as jobs: runs of one stack group (:func:`bnlab.study.kinds.stack_group`: ``train`` or ``ics`` runs
    differing only in their seed and learning rate) in as few stacks of at most ``most`` as hold them, of
    sizes differing by at most one, in (learning rate, seed) order — runs at one rate, which tend to end
    together, share a stack; every other run alone. The stacks depend only on ``pending`` and ``most``, so a
    rerun (with any ``--jobs``) stacks the same runs together. Longest jobs first (the summed
    :func:`estimated_cost`), so the worker pool ends together."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    jobs: list[list[tuple[str, dict]]] = []
    for key, spec in pending:
        group = stack_group(spec) if most > 1 else None
        if group is None:
            jobs.append([(key, spec)])
        else:
            groups.setdefault(group, []).append((key, spec))
    for members in groups.values():
        members.sort(key=lambda ks: (ks[1].get("lr", 0.0), ks[1].get("seed", 0), ks[0]))
        count = -(-len(members) // most)
        size, extra = divmod(len(members), count)
        start = 0
        for i in range(count):
            end = start + size + (i < extra)
            jobs.append(members[start:end])
            start = end
    return sorted(jobs, key=lambda job: -sum(estimated_cost(spec) for _, spec in job))


def check_jobs(jobs) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be a positive integer (got {jobs!r})")
    return jobs


class _StopOnSignal:
    """SIGTERM in the parent raises KeyboardInterrupt like Ctrl-C, so both stop the study the same way."""

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_specs(specs: dict[str, dict], store: Store, jobs: int = 1, progress: Optional[bool] = True,
              executor: Optional[Executor] = None, stack: int = 1) -> dict[str, str]:
    """Run every spec the store does not already hold as finished; returns key → status of those run.

    ``executor``: where the runs go (:mod:`bnlab.study.executors`; it is left open for the caller to
    close); none: this process for ``jobs == 1``, else ``jobs`` local processes, closed on return.
    ``progress``: a bar on stderr (``None``: only when stderr is a terminal). ``stack``: runs
    differing only in their seed and learning rate go in stacks of at most this many (:func:`stacks`, cut from every
    spec given, finished or not; 1: each alone). Raises :class:`Interrupted`
    on Ctrl-C / SIGTERM after stopping every run in flight."""
    check_jobs(jobs)
    if progress is None:
        progress = sys.stderr.isatty()
    done = store.finished_keys()
    # stacks are cut from every spec given, then the finished runs left out: a resumed round stacks its
    # remaining runs as the uninterrupted round did (a stack's runs are stored together), so it rounds alike
    pending = [job for job in ([(k, s) for k, s in job if k not in done] for job in stacks(list(specs.items()), stack))
               if job]
    bar = tqdm(total=len(specs), initial=len(specs) - sum(map(len, pending)), desc="runs", unit="run",
               disable=not progress, dynamic_ncols=True)
    statuses: dict[str, str] = {}
    owned = executor is None
    if owned:
        executor = make_executor("process", jobs)
    try:
        with _StopOnSignal():
            queue = iter(pending)
            while True:
                # at most `capacity` runs submitted at a time, so stopping leaves no queue behind
                for job in queue:
                    executor.submit(job)
                    bar.set_postfix_str(spec_label(job[0][1])[:40])
                    if executor.in_flight() >= executor.capacity:
                        break
                if not executor.in_flight():
                    break
                finished = executor.wait()   # whole jobs: a stack's runs are stored together, or none of them
                store.put_many([(key, specs[key], *outcome) for key, outcome in finished])  # the only writer
                for key, outcome in finished:
                    statuses[key] = outcome.status
                    bar.update()
    except StoreFull as full:
        executor.cancel_all()
        bar.close()
        try:
            stored = (len(store.finished_keys() & set(specs)), len(specs))  # reading takes no space
        except StoreError:
            stored = None
        raise StoreFull(full.path, full.reason, stored, workers_stopped=True) from None
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup
        try:
            executor.cancel_all()
        finally:
            signal.signal(signal.SIGINT, previous)
        bar.close()
        finished = len(store.finished_keys() & set(specs))
        raise Interrupted(f"interrupted: {finished} of {len(specs)} runs finished; "
                          f"rerun the same command to resume") from None
    except BaseException:
        executor.cancel_all()
        raise
    finally:
        bar.close()
        if owned:
            executor.close()
    return statuses


def run_rounds(collect: Callable[[dict], dict], run: Callable[[dict], dict], results: Callable[[], dict],
               specs: dict) -> dict[str, str]:
    """The study's rounds: ``collect(seen)`` (key → spec the claims ask for, given the results of the runs
    this invocation's earlier rounds asked for), ``run(fresh)`` the specs not asked for before, until a
    round asks for nothing new. ``specs`` (empty at first) gathers every spec asked for, in place, so it
    says what was asked for when ``run`` raises; returns key → status of the runs ``run`` reported.

    A claim sees the runs of every earlier round of this invocation, also those it no longer asks for (a
    later look's runs need not include an earlier look's): a resumed study replays the rounds of an
    uninterrupted one, and the set of runs asked for only grows, so the rounds end. (Seeing only the last
    round's runs let a claim go back and forth between two looks, never ending.)"""
    statuses: dict[str, str] = {}
    while True:
        known = results()
        new = collect({k: v for k, v in known.items() if k in specs})
        fresh = {k: v for k, v in new.items() if k not in specs}   # each spec is tried once per invocation
        if not fresh:
            return statuses
        specs.update(fresh)
        statuses.update(run(fresh))


# ------------------------------------------------------------------------------------------ the study
class StudyLock:
    """An exclusive lock on a study directory (``filelock``, released by the OS if the process dies).

    The holder writes its PID, host and start time beside the lock; a second study on the same
    directory gets a :class:`UserError` naming that process instead of running every spec again."""

    def __init__(self, directory: Path) -> None:
        from filelock import FileLock
        self.directory = Path(directory)
        self.lock = FileLock(str(self.directory / LOCK_NAME))
        self.owner = self.directory / (LOCK_NAME + ".owner")

    def __enter__(self) -> "StudyLock":
        from filelock import Timeout
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = self.owner.read_text().strip()
            except OSError:
                holder = "another process"
            raise UserError(f"--out {self.directory} is in use by another `bnlab study` ({holder}); wait for it "
                            f"to finish or stop it, or use another --out") from None
        try:
            self.owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError as error:
            self.lock.release()
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(self.directory / STORE_NAME, f"{error.strerror} (errno {error.errno})") from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.owner.unlink(missing_ok=True)
        finally:
            self.lock.release()


def check_out(out) -> Path:
    """``--out`` is a directory (or can become one) that takes files; raises :class:`UserError` if not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    return out


def open_store(path: Path) -> Store:
    """The study's store at ``path``, checked (SQLite's quick check); a damaged one is moved aside and a new one
    started with every run still readable from it (:func:`bnlab.study.store.recover`), saying so on stderr."""
    try:
        store = Store(path)
        store.check()
        return store
    except StoreDamaged as damaged:
        recovery = recover(path, damaged.reason)
        print(f"{path} was damaged (SQLite: {damaged.reason}; its integrity check: {damaged.inspection.integrity}): "
              f"moved it aside to {recovery.moved_to} (kept as it was) and started a new store with the "
              f"{recovery.kept} runs still readable in it; the others are redone", file=sys.stderr)
        return Store(path)


def run_study(profile: dict, out: str | Path, claims=None, jobs: int = 1, progress: Optional[bool] = True,
              executor: Optional[Executor] = None) -> Path:
    """Run (or resume) the study for ``profile`` into directory ``out``; returns the store's path.

    Every argument is checked before anything is created; the directory is locked while the study runs.
    Build the report from the store with :func:`bnlab.study.report.build_report` (``bnlab study`` does).
    ``executor``: where the runs go (see :func:`run_specs`); the caller closes it.
    """
    numbers = parse_claims(claims)
    check_jobs(jobs)
    out = check_out(out)
    with StudyLock(out):
        store = open_store(out / STORE_NAME)
        specs: dict[str, dict] = {}   # every spec asked for (run_rounds fills it)
        try:
            store.set_meta("profile", profile)
            store.set_meta("claims", numbers)
            started = time.perf_counter()
            # rounds: a claim may ask for more runs once it sees results (bnlab.study.claims), and a claim
            # with an undecided part the next look's seeds (bnlab.study.scope)
            statuses = run_rounds(lambda seen: collect_specs(profile, numbers, seen),
                                  lambda fresh: run_specs(fresh, store, jobs=jobs, progress=progress,
                                                          executor=executor, stack=int(profile.get("stack", 1))),
                                  store.results, specs)
            store.set_meta("last_run_seconds", time.perf_counter() - started)
            store.set_meta("last_run_count", len(statuses))  # runs this invocation executed (0: all were finished)
        except StoreFull as full:
            if full.stored is not None or not specs:
                raise
            raise StoreFull(full.path, full.reason, (len(store.finished_keys() & set(specs)), len(specs))) from None
    failed = [k for k, s in statuses.items() if s == "failed"]
    if failed:
        first = store.get(failed[0])
        print(f"{len(failed)} run(s) failed; they are recorded in {store.path} and retried on the next "
              f"invocation. First error ({spec_label(first['spec'])}):\n{first['error']}", file=sys.stderr)
    return store.path
