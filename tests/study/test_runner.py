"""The whole study on the `tiny` profile: specs → runs → store → verdicts → report, and resume after a
real kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.cli import build_parser, main
from bnlab.commands import report as report_command
from bnlab.errors import UserError
from bnlab.study import CLAIMS, get_profile
from bnlab.study.report import build_report
from bnlab.study.runner import STORE_NAME, collect_specs, run_study
from bnlab.study.store import Store
from bnlab.study.verdict import VERDICTS
from helpers import comparable


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One uninterrupted tiny study, shared by every test (and every pytest-xdist worker) that reads it."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, the same for all xdist workers (never an older session's)
    out = root / "tiny-study"
    with FileLock(str(root / "tiny-study.lock")):
        if not (out / "verdicts.json").is_file():
            build_report(run_study(get_profile("tiny"), out, jobs=1, progress=False).parent)
    return out


def test_tiny_study_writes_every_claim_and_verdict(tiny_study):
    store = Store(tiny_study / STORE_NAME)
    rows = store.results()
    specs = collect_specs(get_profile("tiny"), sorted(CLAIMS), rows)  # every round's runs, given the results
    assert set(rows) == set(specs)
    assert len(specs) > len(collect_specs(get_profile("tiny"), sorted(CLAIMS)))  # later rounds added runs
    assert all(r["status"] in ("done", "diverged") for r in rows.values()), [r["error"] for r in rows.values()]
    assert all(r["versions"]["torch"] and r["hardware"]["cpus"] for r in rows.values())
    md = (tiny_study / "report.md").read_text()
    html = (tiny_study / "report.html").read_text()
    verdicts = json.loads((tiny_study / "verdicts.json").read_text())["claims"]
    assert sorted(int(n) for n in verdicts) == sorted(CLAIMS)
    for number, module in CLAIMS.items():
        verdict = verdicts[str(number)]["verdict"]
        assert verdict in VERDICTS
        assert verdicts[str(number)]["failed_runs"] == 0
        for text in (md, html):
            assert module.TITLE in text
            assert f"Claim {number}" in text
        assert f"| {number} | {module.TITLE} | **{verdict}** |" in md
        assert "could not be analyzed" not in md
    pngs = sorted(p.name for p in (tiny_study / "figures").glob("*.png"))
    assert len(pngs) >= 5
    assert html.count("data:image/png;base64,") == len(pngs)  # self-contained: every figure embedded
    assert "<img src=\"figures" not in html
    assert "Appendix" in md and "torch" in md


def test_report_command_rebuilds_without_training(tiny_study, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study, copy)
    (copy / "report.html").unlink()
    count = Store(copy / STORE_NAME).count()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").is_file()
    assert Store(copy / STORE_NAME).count() == count
    assert (copy / "verdicts.json").read_text() == (tiny_study / "verdicts.json").read_text()
    json.loads((copy / "verdicts.json").read_text(), parse_constant=pytest.fail)  # no NaN
    with pytest.raises(UserError, match="no study store"):
        report_command.run(build_parser().parse_args(["report", str(tmp_path)]))


def test_rerunning_reuses_every_finished_run(tiny_study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study, copy)
    before = {k: r["finished"] for k, r in Store(copy / STORE_NAME).results().items()}
    ran = Store(tiny_study / STORE_NAME).get_meta("last_run_count")
    assert ran == len(before)  # the uninterrupted study ran every run itself
    assert f"the last `bnlab study` ran {ran} of them in" in (tiny_study / "report.md").read_text()
    run_study(get_profile("tiny"), copy, jobs=1, progress=False)
    after = {k: r["finished"] for k, r in Store(copy / STORE_NAME).results().items()}
    assert after == before
    assert Store(copy / STORE_NAME).get_meta("last_run_count") == 0
    build_report(copy)
    assert "the last `bnlab study` found every run finished and ran none" in (copy / "report.md").read_text()


def test_resume_after_a_killed_process_finishes_with_the_same_results(tiny_study, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "bnlab.cli", "study", "--profile", "tiny", "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command + ["--jobs", "1"], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = Store(tiny_study / STORE_NAME).count()  # every round of the uninterrupted study
    deadline = time.time() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the study finished (rc {process.returncode}) before it could be killed")
            if (out / STORE_NAME).is_file() and Store(out / STORE_NAME).count() >= 8:
                break
            if time.time() > deadline:
                pytest.fail("no runs were stored within 180 s")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the whole process group, mid-study
        process.wait()
    survived = {k: r["finished"] for k, r in Store(out / STORE_NAME).results().items()}
    assert 8 <= len(survived) < total

    resumed = subprocess.run(command + ["--jobs", "2"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = Store(out / STORE_NAME).results()
    assert len(rows) == total  # every spec once: no duplicates
    assert all(r["attempts"] == 1 for r in rows.values())  # nothing finished was run again
    assert all(rows[k]["finished"] == t for k, t in survived.items())
    assert Store(out / STORE_NAME).get_meta("last_run_count") == total - len(survived)  # only what was left
    reference = Store(tiny_study / STORE_NAME).results()
    for key, row in rows.items():
        assert row["status"] == reference[key]["status"], row["spec"]
        assert comparable(row["result"]) == comparable(reference[key]["result"]), row["spec"]
    mine = json.loads((out / "verdicts.json").read_text())["claims"]
    theirs = json.loads((tiny_study / "verdicts.json").read_text())["claims"]
    assert {n: v["verdict"] for n, v in mine.items()} == {n: v["verdict"] for n, v in theirs.items()}


def test_show_profile_prints_json(capsys):
    assert main(["study", "--profile", "tiny", "--show-profile"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"


# ------------------------------------------------------------------------------------------ a full disk (issue 21)
def _small_specs():
    from bnlab.study.specs import make_spec, unique_specs
    small = dict(dataset="synthetic", depth=8, width=0.25, norm="bn", batch_size=32)
    return unique_specs([make_spec("signal", **small, seed=s) for s in range(4)]
                        + [make_spec("train", **small, seed=s, lr=0.05, max_steps=4, epochs=4, eval_every=2)
                           for s in range(4)])


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_full_disk_stops_the_workers_and_leaves_the_store_intact_to_resume(tmp_path, monkeypatch):
    """SQLite's `database or disk is full` at the commit holding the third run (as on a 300 KB tmpfs): the worker
    processes are stopped, the runs stored before are whole, and the same call resumes once space is free."""
    import multiprocessing
    import sqlite3

    from bnlab.study.executors import ProcessExecutor
    from bnlab.study.runner import run_specs
    from bnlab.study.store import StoreFull
    connect = sqlite3.connect
    seen = {"rows": 0, "workers": []}
    earlier = set(multiprocessing.active_children())   # another test's pool may still be exiting (pytest -n)

    class FullAfterTwo:   # a transaction that writes a third row cannot commit; reading needs no space
        def __init__(self, db):
            self._db, self._writes = db, False

        def execute(self, sql, *args):
            if sql.startswith("INSERT OR REPLACE INTO runs"):
                seen["rows"] += 1
                self._writes = True
            if sql == "COMMIT" and self._writes and seen["rows"] > 2:
                seen["workers"] = [p for p in multiprocessing.active_children()
                                   if p.is_alive() and p not in earlier]
                self._db.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
            return self._db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._db, name)

    specs = _small_specs()
    store = Store(tmp_path / STORE_NAME)
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: FullAfterTwo(connect(*a, **k)))
    with ProcessExecutor(2) as executor:
        with pytest.raises(StoreFull) as info:
            run_specs(specs, store, jobs=2, progress=False, executor=executor)
    monkeypatch.setattr(sqlite3, "connect", connect)
    stored = connect(store.path).execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert stored in (1, 2)   # 2, or 1 when the second and third runs came back together (stored all or none)
    assert f"with {stored} of {len(specs)} runs stored; the workers were stopped" in str(info.value)
    # stopped, not left running — asked of the OS: the pool's own thread may have reaped a worker first, and
    # then its Process object cannot tell that it is gone
    assert seen["workers"] and not any(_running(p.pid) for p in seen["workers"])
    assert connect(store.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok" and store.count() == stored
    first = store.results()
    statuses = run_specs(specs, store, jobs=1, progress=False)
    assert set(statuses) == set(specs) - set(first)   # the two stored runs are reused, the rest run once
    assert store.count() == len(specs) and all(r["attempts"] == 1 for r in store.results().values())


def test_a_damaged_store_is_moved_aside_before_the_study_runs(tmp_path, capsys):
    from bnlab.study.runner import open_store
    path = tmp_path / STORE_NAME
    path.write_bytes(os.urandom(20000))
    store = open_store(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was damaged (SQLite: file is not a database" in err[0] and "0 runs" in err[0], err
    assert store.count() == 0 and len([p for p in tmp_path.iterdir() if ".damaged-" in p.name]) >= 1


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounts a 150 KB tmpfs (root)")
def test_the_tiny_study_on_a_real_full_disk_resumes_once_space_is_freed(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        command = [sys.executable, "-m", "bnlab.cli", "study", "--profile", "tiny", "--jobs", "2", "--out", str(disk / "s")]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        full = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 2 and len(lines) == 1 and "is full" in lines[0], full.stderr[-3000:]
        assert "rerun the same command" in lines[0] or "bnlab report" in lines[0]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert all(r["attempts"] == 1 for r in Store(disk / "s" / STORE_NAME).results().values())
    finally:
        subprocess.run(["umount", str(disk)])
