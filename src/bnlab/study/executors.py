"""Executors: where a study's runs execute — in this process, in a pool of local processes, or on a Ray
cluster. :func:`bnlab.study.runner.run_specs` drives all three through one small interface, so the claims
never know which one ran them.

The driver owns the store. A worker only computes: :func:`run_job` returns a :class:`RunOutcome`
``(status, result, error, seconds, versions, hardware)`` and the driver writes it to ``study.sqlite`` in
one transaction as soon as it arrives, so SQLite never sees two writers and a run the driver has not
received has no row (it is redone on resume). A job is one run or a stack of runs that differ
only in their seed, trained together as one network (:func:`bnlab.study.runs.run_train_stack`,
:func:`bnlab.study.ics_loop.run_ics_stack`); its runs
come back, and are stored, together.

* :class:`InlineExecutor` — one run at a time in this process (``--jobs 1``);
* :class:`ProcessExecutor` — ``jobs`` spawned worker processes that ignore SIGINT and die with the
  driver (a parent-death signal on Linux, a watchdog thread elsewhere);
* :class:`RayExecutor` — one Ray task per run (``num_cpus=1`` each, a fraction of a GPU when the runs use
  CUDA) on a local Ray instance or an existing cluster. A task whose worker or node dies is submitted
  again, at most ``max_retries`` times, and the stored result says how many attempts it took
  (``result["attempts"]``); a run that fails inside :func:`bnlab.study.kinds.execute` returns status
  ``failed`` with its traceback like any other result, and is stored once, not retried.

Every executor is fed lazily (at most :attr:`Executor.capacity` runs in flight), so stopping leaves no
queue behind: :meth:`Executor.cancel_all` abandons the runs in flight, which leave no row.

A driver killed outright (SIGKILL, the OOM killer) takes its local workers with it. The local Ray instance
a :class:`RayExecutor` starts has a reaper beside it (a small process of its own, :data:`_REAPER`, on Linux):
when the driver's end of its pipe closes without a clean shutdown it kills the instance's processes, whose
agents would otherwise outlive the driver by a minute. A run's ``.pid`` file (:data:`PID_DIR_ENV`) left by
a killed worker is removed when an executor starts and when the run is retried
(:func:`remove_stale_pid_files`).
"""

from __future__ import annotations

import concurrent.futures as futures
import ctypes
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional

from bnlab.errors import UserError

__all__ = ["RunOutcome", "run_job", "Executor", "InlineExecutor", "ProcessExecutor", "RayExecutor",
           "make_executor", "check_gpus_per_run", "EXECUTORS", "PID_DIR_ENV", "remove_stale_pid_files"]

EXECUTORS = ("process", "ray")  # the names `bnlab study --executor` accepts
PID_DIR_ENV = "BNLAB_RUN_PID_DIR"  # if set, each run in flight has a file KEY-ATTEMPT.pid there naming its process


class RunOutcome(NamedTuple):
    """What a worker sends back for one run: exactly the columns :meth:`Store.put` takes after the spec."""
    status: str
    result: dict
    error: Optional[str]
    seconds: float
    versions: dict
    hardware: dict


FORWARDED_ENV = ("BNLAB_DATA",)  # the driver's settings a remote worker needs (--data-dir sets BNLAB_DATA)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_pid_files(directory=None, key: Optional[str] = None, wait_s: float = 0.0) -> list[Path]:
    """Remove the ``.pid`` files in ``directory`` (default ``$BNLAB_RUN_PID_DIR``; nothing without one) whose
    process no longer runs here: a worker killed mid-run cannot remove its own. ``key``: only that run's.
    ``wait_s``: how long to wait for a process known to be dying to finish exiting (Ray reports a killed
    worker as soon as its sockets close, which is before the kernel has ended the process). Returns the
    files removed."""
    directory = directory or os.environ.get(PID_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return []
    removed = []
    for path in Path(directory).glob(f"{key}-*.pid" if key else "*.pid"):
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue   # being written, or not ours
        deadline = time.monotonic() + wait_s
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _running(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def run_job(items: list[tuple[str, dict]], attempt: int = 1,
            env: Optional[dict] = None) -> list[tuple[str, RunOutcome]]:
    """Execute one job — a run, or a stack of runs trained together (:func:`bnlab.study.kinds.execute_stack`)
    — and describe where it ran; writes nothing to the store (the driver does). ``env``: environment
    variables to set first (a Ray worker on another machine has its own). A stack's seconds are shared out
    evenly among its runs."""
    from bnlab.study.kinds import execute, execute_stack
    from bnlab.study.store import environment

    previous = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    first = items[0][0]
    pid_file = Path(os.environ[PID_DIR_ENV]) / f"{first}-{attempt}.pid" if os.environ.get(PID_DIR_ENV) else None
    if pid_file is not None:
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        started = time.perf_counter()
        outcomes = [execute(items[0][1])] if len(items) == 1 else execute_stack([spec for _, spec in items])
        seconds = (time.perf_counter() - started) / len(items)
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        for name, value in previous.items():  # a worker serves many runs: leave its environment as found
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    versions, hardware = environment()
    hardware["threads_per_run"] = 1  # execute() runs every spec on one thread
    hardware["host"] = socket.gethostname()
    return [(key, RunOutcome(status, {**result, "attempts": attempt}, error, seconds, versions, hardware))
            for (key, _), (status, result, error) in zip(items, outcomes)]


class Executor:
    """Runs jobs somewhere: a job is ``[(key, spec), ...]``, one run or a stack (:func:`run_job`).
    ``submit`` starts one (never more than :attr:`capacity` in flight), ``wait`` blocks until at least one
    ends and returns ``[(key, RunOutcome), ...]`` for its runs, ``cancel_all`` abandons every
    run in flight now, ``close`` releases the workers. Usable as a context manager (``close`` on exit)."""

    capacity: int = 1

    def submit(self, items: list[tuple[str, dict]]) -> None:
        raise NotImplementedError

    def in_flight(self) -> int:
        raise NotImplementedError

    def wait(self) -> list[tuple[str, RunOutcome]]:
        raise NotImplementedError

    def cancel_all(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        """A short phrase for messages: where the runs go."""
        return type(self).__name__

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InlineExecutor(Executor):
    """One run at a time, in this process (the run executes inside :meth:`wait`)."""

    capacity = 1

    def __init__(self) -> None:
        self._queued: list[list[tuple[str, dict]]] = []

    def submit(self, items: list[tuple[str, dict]]) -> None:
        self._queued.append(items)

    def in_flight(self) -> int:
        return len(self._queued)

    def wait(self) -> list[tuple[str, RunOutcome]]:
        return run_job(self._queued.pop(0))

    def cancel_all(self) -> None:
        self._queued.clear()

    def describe(self) -> str:
        return "this process"


# ------------------------------------------------------------------------------------------ processes
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Worker initializer: ignore SIGINT (the parent stops the pool) and exit when the parent dies.

    On Linux the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); a daemon thread
    polling the parent id covers other systems and the race where the parent died before the prctl."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="bnlab-parent-watchdog", daemon=True).start()


class ProcessExecutor(Executor):
    """``jobs`` spawned worker processes on this machine (spawn: fork after torch's thread pools can
    deadlock). The pool starts on the first :meth:`submit`."""

    def __init__(self, jobs: int) -> None:
        self.capacity = jobs
        self._pool: Optional[futures.ProcessPoolExecutor] = None
        self._running: dict[futures.Future, str] = {}
        remove_stale_pid_files()

    def submit(self, items: list[tuple[str, dict]]) -> None:
        if self._pool is None:
            self._pool = futures.ProcessPoolExecutor(
                max_workers=self.capacity, mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent, initargs=(os.getpid(),))
        self._running[self._pool.submit(run_job, items)] = items[0][0]

    def in_flight(self) -> int:
        return len(self._running)

    def wait(self) -> list[tuple[str, RunOutcome]]:
        finished, _ = futures.wait(self._running, return_when=futures.FIRST_COMPLETED)
        outcomes = []
        for job in finished:
            self._running.pop(job)
            outcomes += [(key, RunOutcome(*outcome)) for key, outcome in job.result()]
        return outcomes

    def cancel_all(self) -> None:
        """Stop every worker now (their runs in flight are abandoned: they leave no row)."""
        pool, self._pool = self._pool, None
        self._running.clear()
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API before 3.14
        for process in processes:
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def describe(self) -> str:
        return f"{self.capacity} local processes"


# ------------------------------------------------------------------------------------------ Ray
def import_ray():
    """Ray, imported on first use (it is an optional extra and slow to import)."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'bnlab[ray]'") from None
    return ray


def check_gpus_per_run(value: float) -> float:
    """A GPU share Ray accepts: at least 0, and a whole number above 1."""
    if not value >= 0:
        raise UserError(f"--gpus-per-run must be at least 0 (got {value!r})")
    if value > 1 and value != int(value):
        raise UserError(f"--gpus-per-run above 1 must be a whole number of GPUs (got {value!r})")
    return value


class RayExecutor(Executor):
    """Each run a Ray task on a local Ray instance (``address=None``: started here with ``jobs`` CPUs and
    shut down by :meth:`close`) or on a running cluster (``address="auto"`` or ``"HOST:PORT"``; left
    running; a process that has called ``ray.init`` already keeps its instance). Every task declares ``num_cpus`` and ``num_gpus`` (fractions share a GPU: 0.25 puts four
    runs on each). ``jobs`` bounds the tasks in flight (default: the cluster's CPUs / ``num_cpus``).

    A task whose worker process or node dies is submitted again up to ``max_retries`` times (the driver
    resubmits, so it knows each run's attempt count); after that the run is stored as failed, and a
    later ``bnlab study`` retries it like any failed run.
    """

    def __init__(self, address: Optional[str] = None, jobs: Optional[int] = None, num_cpus: float = 1,
                 num_gpus: float = 0, max_retries: int = 2) -> None:
        if not num_cpus > 0:
            raise UserError(f"RayExecutor: num_cpus must be positive (got {num_cpus!r})")
        check_gpus_per_run(num_gpus)
        if max_retries < 0:
            raise UserError(f"RayExecutor: max_retries must be at least 0 (got {max_retries!r})")
        ray = import_ray()
        self._ray = ray
        self.address, self.max_retries = address, max_retries
        self._started = False
        self._reaper: Optional[subprocess.Popen] = None
        remove_stale_pid_files()
        if not ray.is_initialized():
            try:
                if address is None:
                    self._reaper = _start_reaper()
                    ray.init(num_cpus=jobs or os.cpu_count() or 1, include_dashboard=False,
                             logging_level="ERROR")  # ERROR: Ctrl-C leaves one line on stderr
                else:
                    _check_reachable(address)
                    ray.init(address=address, logging_level="ERROR")
            except ConnectionError as error:
                self._stop_reaper()
                raise UserError(f"--address {address}: no Ray cluster reachable ({error}); start one with "
                                f"`ray start --head` or leave out --address for a local instance") from None
            except BaseException:
                self._stop_reaper()
                raise
            self._started = True
        cpus = ray.cluster_resources().get("CPU", 1)
        self.capacity = jobs or max(1, int(cpus // num_cpus))
        self._task = ray.remote(run_job)
        # max_retries=0: this driver resubmits a run whose worker died, so it knows each run's attempts
        self._resources = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        self._env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        self._running: dict = {}  # ObjectRef → (items, attempt)

    def submit(self, items: list[tuple[str, dict]], attempt: int = 1) -> None:
        from bnlab.study.specs import spec_label
        label = spec_label(items[0][1]) + (f" ×{len(items)} seeds" if len(items) > 1 else "")
        task = self._task.options(**self._resources, name=f"bnlab {label}"[:100])
        ref = task.remote(items, attempt, self._env)
        self._running[ref] = (items, attempt)

    def in_flight(self) -> int:
        return len(self._running)

    def wait(self) -> list[tuple[str, RunOutcome]]:
        ray = self._ray
        outcomes: list[tuple[str, RunOutcome]] = []
        while not outcomes and self._running:
            ray.wait(list(self._running), num_returns=1)  # blocks until one ends; then take all that have
            ready, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
            for ref in ready:
                items, attempt = self._running.pop(ref)
                try:
                    outcomes += [(key, RunOutcome(*outcome)) for key, outcome in ray.get(ref)]
                except ray.exceptions.RayTaskError as error:  # raised inside the task, outside execute()
                    outcomes += [(key, _failed(str(error), attempt)) for key, _ in items]
                except ray.exceptions.RayError as error:  # the worker or its node died: not the run's fault
                    remove_stale_pid_files(key=items[0][0], wait_s=5.0)   # a killed worker cannot remove its own
                    if attempt <= self.max_retries:
                        self.submit(items, attempt + 1)
                    else:
                        outcomes += [(key, _failed(f"the run's Ray worker died on each of {attempt} "
                                                   f"attempts; the last: {error}", attempt)) for key, _ in items]
        return outcomes

    def cancel_all(self) -> None:
        for ref in list(self._running):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 — already finished, or the cluster went away: nothing to stop
                pass
        self._running.clear()

    def close(self) -> None:
        try:
            if self._started and self._ray.is_initialized():
                self._ray.shutdown()
        finally:
            self._started = False
            self._stop_reaper()

    def _stop_reaper(self) -> None:
        """Tell the reaper the instance was shut down cleanly, and let it go."""
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        try:
            reaper.stdin.write(b"shutdown\n")
            reaper.stdin.close()
            reaper.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            reaper.kill()

    def describe(self) -> str:
        return f"Ray at {self.address}" if self.address else "a local Ray instance"


# The reaper of a local Ray instance: a process of its own (its own session: a Ctrl-C or a closed terminal
# reaches the driver, not it) that every half second records the driver's Ray processes — Ray's own
# (gcs_server, raylet, their agents, the dashboard, monitors: a path under ray/) or its workers (ray::…)
# and everything below them — and, when its stdin reaches end of file without "shutdown" (the driver died
# before ray.shutdown), SIGKILLs the ones still running that it recorded (the same process: its start time).
# Ray's raylet dies with the driver, but its dashboard and runtime-env agents then try to report to the dead
# GCS for 60 s before they exit.
_REAPER = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
driver, me = int(sys.argv[1]), os.getpid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]   # parent, start time
    except (OSError, IndexError, ValueError):
        return None

def ray_process(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return cmdline.startswith(b"ray::") or b"/ray/" in cmdline

def snapshot():
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            found = stat(int(name))
            if found:
                table[int(name)] = found
    roots = {pid for pid, (parent, _) in table.items() if parent == driver and ray_process(pid)}
    tree, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - tree
        tree |= frontier
    return {pid: table[pid][1] for pid in tree}

known, said = {}, b""
while True:
    if select.select([0], [], [], 0.5)[0]:
        chunk = os.read(0, 64)
        said += chunk
        if not chunk:
            break
    if stat(driver) is None:
        break
    known.update(snapshot())
if b"shutdown" not in said:
    for pid, started in known.items():
        now = stat(pid)
        if now is not None and now[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
"""


def _start_reaper() -> Optional[subprocess.Popen]:
    """The reaper of the local Ray instance about to start (Linux: it reads /proc); ``None`` elsewhere."""
    if not Path("/proc/self/stat").is_file():
        return None
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """A HOST:PORT address answers (Ray itself retries an unreachable one for minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except (OSError, ValueError) as error:
        raise UserError(f"--address {address}: nothing answers there ({error}); expected the HOST:PORT "
                        f"of a Ray head started with `ray start --head --port=PORT`") from None


def _failed(error: str, attempt: int) -> RunOutcome:
    """The outcome of a run that produced no result of its own (its task raised, or its worker died)."""
    from bnlab.study.store import environment
    versions, hardware = environment()
    return RunOutcome("failed", {"attempts": attempt}, error, 0.0, versions, hardware)


def make_executor(name: str = "process", jobs: Optional[int] = 1, address: Optional[str] = None,
                  gpus_per_run: float = 0) -> Executor:
    """The executor ``bnlab study --executor NAME`` uses: ``process`` (in this process for one job, else a
    pool of ``jobs`` processes) or ``ray`` (``address``: a running cluster; none: a local instance)."""
    if name == "process":
        if address is not None:
            raise UserError("--address is for --executor ray (the process executor runs on this machine)")
        return InlineExecutor() if jobs == 1 else ProcessExecutor(jobs)
    if name == "ray":
        return RayExecutor(address=address, jobs=jobs, num_gpus=gpus_per_run)
    raise UserError(f"--executor must be one of {', '.join(EXECUTORS)} (got {name!r})")
