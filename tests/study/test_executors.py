"""Study runs on Ray (`bnlab study --executor ray`): the same results as local processes, the driver as
the store's only writer, a killed worker retried, a deterministic failure stored once, Ctrl-C.

One local Ray instance (2 CPUs) serves the module; the process executor is the reference."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bnlab.errors import UserError
from bnlab.study.executors import PID_DIR_ENV, ProcessExecutor, RayExecutor, make_executor
from bnlab.study.runner import run_specs
from bnlab.study.specs import make_spec, unique_specs
from bnlab.study.store import Store
from helpers import comparable, interruptible

SRC = Path(__file__).resolve().parents[2] / "src"
SMALL = dict(dataset="synthetic", depth=8, width=0.25, norm="bn", batch_size=32)


def _train(seed, steps, **extra):
    return make_spec("train", **SMALL, seed=seed, lr=0.05, max_steps=steps, epochs=40, eval_every=max(2, steps // 3),
                     **extra)


def hand_made_specs() -> dict[str, dict]:
    """Two kinds of run, two seeds each, and one that fails inside execute() (an unknown dataset)."""
    specs = [make_spec("signal", **SMALL, seed=s) for s in (0, 1)] + [_train(s, 6) for s in (0, 1)]
    specs.append(make_spec("signal", **{**SMALL, "dataset": "no-such-dataset"}, seed=0))
    return unique_specs(specs)


class CountingStore(Store):
    """A store that counts the rows written through this object (in this process)."""

    def __init__(self, path):
        super().__init__(path)
        self.puts = 0

    def put_many(self, rows):
        self.puts += len(rows)
        super().put_many(rows)


# ------------------------------------------------------------------------------------------ no Ray needed
def test_ray_executor_without_ray_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'bnlab\[ray\]'"):
        make_executor("ray", 2)


@pytest.mark.parametrize("flags, message", [
    (["--address", "auto"], "--address is for --executor ray"),
    (["--gpus-per-run", "0.5"], "--gpus-per-run is for --executor ray"),
    (["--executor", "ray", "--gpus-per-run", "0.5", "--device", "cpu"], "give --device cuda"),
    (["--executor", "ray", "--gpus-per-run", "1.5", "--device", "cuda"], "a whole number of GPUs"),
    (["--executor", "ray", "--gpus-per-run", "-1", "--device", "cuda"], "must be at least 0"),
    (["--executor", "dask"], "invalid choice: 'dask'"),
])
def test_executor_flags_that_do_not_fit_are_one_line_errors(tmp_path, capsys, flags, message):
    from bnlab.cli import main
    code = main(["study", "--profile", "tiny", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_importing_the_executors_does_not_import_ray():
    code = "import sys, bnlab.study.executors, bnlab.study.runner; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_an_address_where_nothing_answers_is_a_user_error_at_once():
    """Before, ray.init retried an unreachable HOST:PORT for minutes; in a fresh process (no Ray yet)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnlab[ray]')")
    code = textwrap.dedent("""
        import socket
        from bnlab.errors import UserError
        from bnlab.study.executors import RayExecutor
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            RayExecutor(address=f"127.0.0.1:{port}")
        except UserError as error:
            print(error)
    """)
    started = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert "nothing answers there" in out.stdout and "ray start --head" in out.stdout, out.stderr[-2000:]
    assert time.time() - started < 30


def test_pid_files_of_dead_workers_are_removed_when_an_executor_starts(tmp_path, monkeypatch):
    """Issue 21 item 8: a SIGKILLed worker's KEY-ATTEMPT.pid file stayed in BNLAB_RUN_PID_DIR."""
    from bnlab.study.executors import remove_stale_pid_files
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()   # a process that ran and is gone (reaped)
    (tmp_path / "dead-1.pid").write_text(f"{done.pid}\n")
    (tmp_path / "alive-1.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "being-written-1.pid").write_text("")
    monkeypatch.setenv(PID_DIR_ENV, str(tmp_path))
    ProcessExecutor(2).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alive-1.pid", "being-written-1.pid"]
    assert remove_stale_pid_files(tmp_path) == []


def test_an_address_where_nothing_answers_leaves_no_out_directory(tmp_path):
    """Issue 21 item 8: the study created OUT before connecting, leaving it empty (in a fresh process: no Ray)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnlab[ray]')")
    import socket
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "deep" / "out"
    done = subprocess.run([sys.executable, "-m", "bnlab.cli", "study", "--profile", "tiny", "--executor", "ray",
                           "--address", f"127.0.0.1:{port}", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert done.returncode == 2 and "nothing answers there" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "deep").exists()


# ------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """One local Ray instance for the module; its workers write their PID files under ``pids``."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnlab[ray]')")
    pids = tmp_path_factory.mktemp("pids")
    previous = os.environ.get(PID_DIR_ENV)
    os.environ[PID_DIR_ENV] = str(pids)  # inherited by the workers Ray starts
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield pids
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(PID_DIR_ENV, None)
        else:
            os.environ[PID_DIR_ENV] = previous


@pytest.fixture(scope="module")
def both_stores(ray_instance, tmp_path_factory):
    """The hand-made specs run once through local processes and once through Ray, each into its store."""
    root = tmp_path_factory.mktemp("stores")
    specs = hand_made_specs()
    stores = {}
    for name, executor in (("process", ProcessExecutor(2)), ("ray", RayExecutor(jobs=2))):
        store = CountingStore(root / f"{name}.sqlite")
        with executor:
            statuses = run_specs(specs, store, jobs=executor.capacity, progress=False, executor=executor)
        stores[name] = (store, statuses)
    return specs, stores


def test_ray_gives_the_same_results_as_local_processes_run_by_run(both_stores):
    specs, stores = both_stores
    process, ray_rows = stores["process"][0].results(), stores["ray"][0].results()
    assert set(process) == set(ray_rows) == set(specs)
    for key, spec in specs.items():
        mine, reference = ray_rows[key], process[key]
        assert mine["spec"] == reference["spec"] == json.loads(json.dumps(spec, sort_keys=True))
        assert mine["status"] == reference["status"], spec
        assert comparable(mine["result"]) == comparable(reference["result"]), spec
        assert mine["result"]["attempts"] == 1 and mine["attempts"] == 1
        assert mine["hardware"]["host"] and mine["versions"]["torch"] == reference["versions"]["torch"]
    assert sum(r["status"] == "done" for r in ray_rows.values()) == len(specs) - 1


def test_only_the_driver_writes_the_store(both_stores):
    """Before, each worker wrote its own row: the driver's store object saw none of the writes."""
    specs, stores = both_stores
    for name, (store, statuses) in stores.items():
        assert store.puts == store.count() == len(specs) == len(statuses), name


def test_a_deterministic_failure_is_stored_once_with_its_traceback(both_stores):
    specs, stores = both_stores
    (key,) = [k for k, s in specs.items() if s["dataset"] == "no-such-dataset"]
    for name, (store, statuses) in stores.items():
        row = store.get(key)
        assert statuses[key] == row["status"] == "failed", name
        assert "Traceback" in row["error"] and "unknown dataset 'no-such-dataset'" in row["error"], name
        assert row["attempts"] == 1 and row["result"] == {"attempts": 1}, name  # not retried


def _kill_first_attempt(pids: Path, key: str, seen: list, delay: float = 0.5, timeout: float = 120) -> None:
    """SIGKILL the process running ``key``'s first attempt once it has run ``delay`` seconds."""
    deadline = time.time() + timeout
    first = pids / f"{key}-1.pid"
    while time.time() < deadline:
        try:
            pid = int(first.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        first.unlink()  # a killed run cannot remove its own file
        seen.append(pid)
        break
    while time.time() < deadline:  # record the retry's process, if there is one
        retries = list(pids.glob(f"{key}-2.pid"))
        if retries:
            seen.append(int(retries[0].read_text()))
            return
        time.sleep(0.05)


@pytest.mark.parametrize("max_retries", [2, 0])
def test_a_worker_killed_mid_run_is_retried_or_stored_as_failed(ray_instance, tmp_path, max_retries):
    long = _train(10 + max_retries, 300)  # several seconds: killed mid-run
    specs = unique_specs([long, make_spec("signal", **SMALL, seed=3), _train(1, 6)])
    key = next(k for k, s in specs.items() if s == long)
    store, seen = CountingStore(tmp_path / "study.sqlite"), []
    killer = threading.Thread(target=_kill_first_attempt, args=(ray_instance, key, seen), daemon=True)
    killer.start()
    with RayExecutor(jobs=2, max_retries=max_retries) as executor:
        statuses = run_specs(specs, store, jobs=2, progress=False, executor=executor)
    killer.join(timeout=1)
    assert seen, "the long run was never seen running"
    rows = store.results()
    assert set(rows) == set(specs) and store.puts == len(specs)  # no duplicate, no missing row
    assert all(r["attempts"] == 1 for r in rows.values())
    assert all(rows[k]["status"] == "done" for k in specs if k != key)
    if max_retries:
        assert statuses[key] == rows[key]["status"] == "done"
        assert rows[key]["result"]["attempts"] == 2 and rows[key]["result"]["steps"] == 300
        assert len(seen) == 2 and seen[0] != seen[1]  # the retry ran in a new worker
    else:
        assert statuses[key] == rows[key]["status"] == "failed"
        assert rows[key]["result"] == {"attempts": 1} and "worker died" in rows[key]["error"]


def test_a_killed_workers_pid_file_is_removed_when_its_run_is_retried(ray_instance, tmp_path):
    """The killer here leaves the killed run's file in place, as SIGKILL does; the driver removes it."""
    long = _train(20, 300)
    specs = unique_specs([long, _train(2, 6)])
    key = next(k for k, s in specs.items() if s["max_steps"] == 300)
    seen: list = []

    def kill_only():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                pid = int((ray_instance / f"{key}-1.pid").read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            seen.append(pid)
            return
    killer = threading.Thread(target=kill_only, daemon=True)
    killer.start()
    store = Store(tmp_path / "s.sqlite")
    with RayExecutor(jobs=2, max_retries=1) as executor:
        run_specs(specs, store, jobs=2, progress=False, executor=executor)
    killer.join(timeout=1)
    assert seen and store.get(key)["result"]["attempts"] == 2
    assert not (ray_instance / f"{key}-1.pid").exists() and not (ray_instance / f"{key}-2.pid").exists()


_DRIVER = """
import os, sys, time
from bnlab.study.executors import RayExecutor
executor = RayExecutor(jobs=1)
print(os.getpid(), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_a_killed_driver_takes_the_local_ray_instance_with_it(tmp_path):
    """Issue 21 item 8: two Ray agents (≈165 MB) outlived a SIGKILLed driver by more than 10 s (a minute)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnlab[ray]')")
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_DRIVER)], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(SRC)},
                              start_new_session=True)
    try:
        assert int(driver.stdout.readline()) == driver.pid
        deadline = time.time() + 30
        while time.time() < deadline:   # the agents come up after ray.init returns
            family = _descendants(driver.pid)
            names = {_name(pid) for pid in family}
            if {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names:
                break
            time.sleep(0.2)
        time.sleep(1)   # the reaper records every half second
        ray_family = _descendants(driver.pid)   # gcs_server, raylet, its agents, the dashboard, monitors, the reaper
        assert len(ray_family) >= 5, names
        driver.kill()
        driver.wait()
        deadline = time.time() + 10
        while _alive(ray_family) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(ray_family), {pid: _name(pid) for pid in _alive(ray_family)}
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _alive(_descendants(driver.pid)):   # whatever this test started, should it fail
            os.kill(pid, signal.SIGKILL)


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


_INTERRUPTED_STUDY = """
import sys
from bnlab.study.executors import RayExecutor
from bnlab.study.runner import Interrupted, run_specs
from bnlab.study.specs import make_spec, unique_specs
from bnlab.study.store import Store
small = dict(dataset="synthetic", depth=8, width=0.25, norm="bn", batch_size=32, lr=0.05, epochs=80, eval_every=50)
specs = unique_specs([make_spec("train", **small, seed=s, max_steps=600) for s in range(4)]
                     + [make_spec("signal", dataset="synthetic", depth=8, width=0.25, norm="bn", batch_size=32,
                                  seed=0)])
try:
    with RayExecutor(jobs=2) as executor:
        run_specs(specs, Store(sys.argv[1]), jobs=2, progress=False, executor=executor)
except Interrupted as stop:
    print(stop, file=sys.stderr)
    sys.exit(130)
"""


def _alive(pids) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                left.add(pid)
        except OSError:
            pass
    return left


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_ctrl_c_cancels_the_ray_tasks_and_shuts_down_the_instance_it_started(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnlab[ray]')")
    store_path = tmp_path / "study.sqlite"
    env = {**os.environ, "PYTHONPATH": str(SRC), PID_DIR_ENV: str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_INTERRUPTED_STUDY), str(store_path)],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=interruptible)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("*.pid")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert process.poll() is None and list(tmp_path.glob("*.pid")), process.communicate()
        time.sleep(0.5)
        family = _descendants(process.pid)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err[-2000:]
    finished = Store(store_path).finished_keys()
    assert err.strip() == f"interrupted: {len(finished)} of 5 runs finished; rerun the same command to resume", err
    deadline = time.time() + 20
    while _alive(family) and time.time() < deadline:
        time.sleep(0.2)
    assert family and not _alive(family), f"left running after the study stopped: {_alive(family)}"
    assert len(finished) < 5


def test_the_tiny_study_on_ray_matches_local_processes(ray_instance, tmp_path):
    """End to end through run_study (the claims' specs, every round)."""
    try:
        from bnlab.study import CLAIMS, get_profile  # noqa: F401 — the claim modules must import
    except ImportError as error:
        pytest.skip(f"the claim modules do not import here ({error})")
    from bnlab.study.runner import STORE_NAME, run_study
    profile = get_profile("tiny")
    with ProcessExecutor(2) as executor:
        run_study(profile, tmp_path / "process", jobs=2, progress=False, executor=executor)
    with RayExecutor(jobs=2) as executor:
        run_study(profile, tmp_path / "ray", jobs=2, progress=False, executor=executor)
    reference, mine = Store(tmp_path / "process" / STORE_NAME), Store(tmp_path / "ray" / STORE_NAME)
    reference_rows, rows = reference.results(), mine.results()
    assert set(rows) == set(reference_rows) and len(rows) > 10
    for key, row in rows.items():
        assert row["status"] == reference_rows[key]["status"], row["spec"]
        assert comparable(row["result"]) == comparable(reference_rows[key]["result"]), row["spec"]


def test_the_data_directory_set_here_reaches_the_ray_workers(ray_instance, tmp_path, monkeypatch):
    """Workers on other machines do not inherit this process's environment: --data-dir (BNLAB_DATA) must
    travel with each task. Set after Ray started, an empty directory must be the one the run reads."""
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    monkeypatch.setenv("BNLAB_DATA", str(empty))
    spec = make_spec("signal", **{**SMALL, "dataset": "fashion-mnist"}, seed=0)
    store = Store(tmp_path / "study.sqlite")
    with RayExecutor(jobs=1) as executor:
        run_specs(unique_specs([spec]), store, jobs=1, progress=False, executor=executor)
    (row,) = store.rows()
    assert row["status"] == "failed" and f"not found in {empty}" in row["error"], row["error"]


def test_a_dying_workers_pid_file_is_removed_once_it_has_exited(tmp_path):
    """Ray reports a killed worker once its sockets close, a moment before the process has ended: the file
    of a process still exiting stayed (a flaky leftover). Given time, the driver waits for it to end."""
    import subprocess
    import sys
    from bnlab.study.executors import remove_stale_pid_files
    dying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        (tmp_path / "k-1.pid").write_text(f"{dying.pid}\n")
        assert remove_stale_pid_files(tmp_path, key="k") == [] and (tmp_path / "k-1.pid").exists()  # still running
        reaper = threading.Thread(target=dying.wait)   # reaped as Ray reaps its workers
        reaper.start()
        assert remove_stale_pid_files(tmp_path, key="k", wait_s=10) == [tmp_path / "k-1.pid"]
        assert not (tmp_path / "k-1.pid").exists()
        reaper.join()
    finally:
        dying.kill()
        dying.wait()
