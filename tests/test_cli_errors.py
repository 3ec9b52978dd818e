"""One error path for the whole CLI (issue 10, items 5, 6, 8, 9, 10, 13, 14): a user error is one line on
stderr and exit status 2, before any work is done; a closed stdout ends quietly; only bugs show a
traceback. In-process through ``bnlab.cli.main`` where possible, as a subprocess where the interpreter's
own exit matters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab import cli

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}


def assert_one_line_error(capsys, argv, *fragments, command=None):
    """Run ``bnlab argv``; assert exit 2 and a single stderr line ``bnlab CMD: error: ...`` holding each
    fragment."""
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    prog = "bnlab" if command == "" else f"bnlab {command or argv[0]}"
    assert lines[0].startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


# ------------------------------------------------------------------------------------------ study
def test_study_rejects_bad_arguments_in_one_line_and_creates_nothing(tmp_path, capsys):
    """Moved from test_study_pipeline (was: a ValueError traceback per mistake); --jobs 0 used to leave an
    empty study.sqlite."""
    out = tmp_path / "x"
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--claims", "9", "--out", out], "--claims")
    assert_one_line_error(capsys, ["study", "--profile", "enormous", "--out", out], "--profile")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--dataset", "imagenet", "--out", out], "--dataset")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--device", "tpu", "--out", out], "(got 'tpu')")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--claims", "5", "--jobs", "0", "--out", out], "--jobs")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--jobs", "two", "--out", out], "--jobs")
    assert not out.exists()
    target = tmp_path / "file"
    target.write_text("")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--out", target], f"--out {target}", "not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_study_into_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(capsys, ["study", "--profile", "tiny", "--out", locked], f"--out {locked}", "cannot write")
    finally:
        locked.chmod(0o700)


def test_study_and_train_into_a_directory_nobody_can_create(capsys):
    unwritable = Path("/proc/self/bnlab-out")  # even root cannot make a directory in /proc
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--out", unwritable], f"--out {unwritable}", "cannot write")
    assert_one_line_error(capsys, ["train", "--model", "resnet8", "--dataset", "synthetic", "--out", unwritable],
                   f"--out {unwritable}", "cannot write")


def test_study_profile_that_is_not_there_says_so(tmp_path, capsys):
    """Issue 21 item 5: a missing --profile x.json said "must be one of ... or a .json file"."""
    missing = tmp_path / "x.json"
    line = assert_one_line_error(capsys, ["study", "--profile", missing, "--out", tmp_path / "o"],
                                 f"--profile {missing}: no such file")
    assert "must be one of" not in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("val_size", 1000000000, "val_size: must be less than 512"),
    ("width", 1e308, "width: must be at most 64"),
    ("depth", 6000000002, "depth: must be at most 2000"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_study_profile_values_no_run_survives_are_refused_up_front(tmp_path, capsys, field, value, fragment, dry_run):
    """Issue 21 item 2: these passed the schema, then failed every run (val_size), overflowed (width) or grew
    past 5 GB while building the model (depth) — in a dry run too."""
    profile = json.loads(json.dumps(__import__("bnlab.study", fromlist=["get_profile"]).get_profile("tiny")))
    profile[field] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    out = tmp_path / "o"
    assert_one_line_error(capsys, ["study", "--profile", path, "--out", out, *(["--dry-run"] if dry_run else [])],
                          f"--profile {path}: 1 problem(s): {fragment}")
    assert not out.exists()


def test_study_run_that_cannot_fit_the_memory_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    from bnlab.study import plan
    monkeypatch.setattr(plan, "_device_memory_mb", lambda device, free: 1.0)   # a machine with 1 MB
    out = tmp_path / "o"
    line = assert_one_line_error(capsys, ["study", "--profile", "tiny", "--out", out],
                                 "(estimated before building it), more than the 1 MB of memory on this machine")
    # the largest run, and the profile's fields that set its size (its depth 14 is in both depth grids)
    assert "one signal run of depth 14, width 0.25, batch 64 on synthetic (claim 5) needs ≈" in line, line
    assert line.endswith("lower width, residual.signal_depths, residual.train_depths, residual.signal_batch")
    assert not out.exists()


def _store_with_runs(directory: Path, runs: int = 40) -> list:
    """A study directory whose store holds ``runs`` hand-made finished rows (about 2 KB each, so they span pages)
    and tiny's profile; returns the rows' keys in the order written."""
    from bnlab.study import get_profile
    from bnlab.study.store import Store
    directory.mkdir(parents=True, exist_ok=True)
    store = Store(directory / "study.sqlite")
    store.set_meta("profile", get_profile("tiny"))
    keys = [f"run{i:03d}" for i in range(runs)]
    for i, key in enumerate(keys):
        store.put(key, {"kind": "train", "seed": i, "pad": "x" * 2000}, "done", {"losses": [1.0]},
                  versions={}, hardware={})
    import sqlite3
    db = sqlite3.connect(directory / "study.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # every row in the main file, as after the study ended
    db.close()
    return keys


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_report_on_a_damaged_store_is_one_line_saying_what_is_left(tmp_path, capsys, damage):
    """Issue 21 item 6: `database disk image is malformed` / `file is not a database` were bug tracebacks."""
    study = tmp_path / "s"
    _store_with_runs(study)
    path = study / "study.sqlite"
    for extra in ("study.sqlite-wal", "study.sqlite-shm"):
        (study / extra).unlink(missing_ok=True)
    if damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(os.urandom(100000))
    line = assert_one_line_error(capsys, ["report", study], f"{path} is damaged", "integrity check",
                                 "runs are still readable", "study.sqlite.damaged-<time>")
    readable = int(line.split(" of its runs are still readable")[0].rsplit(" ", 1)[1])
    assert (0 < readable < 40) if damage == "truncated" else readable == 0, line


def test_report_on_an_empty_store_file_says_it_holds_no_study(tmp_path, capsys):
    (tmp_path / "study.sqlite").write_bytes(b"")
    assert_one_line_error(capsys, ["report", tmp_path], "holds no study")


def test_study_on_a_damaged_store_moves_it_aside_and_keeps_the_readable_runs(tmp_path, capsys, monkeypatch):
    """`bnlab study --out` on a damaged store: it is moved aside (byte for byte, never overwritten), the runs
    still readable go into a new store, the rest would be redone (no runs are asked for here)."""
    from bnlab.study import runner
    from bnlab.study.store import Store
    study = tmp_path / "s"
    keys = _store_with_runs(study)
    path = study / "study.sqlite"
    os.truncate(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    monkeypatch.setattr(runner, "collect_specs", lambda profile, numbers, results: {})  # train nothing
    assert cli.main(["study", "--profile", "tiny", "--out", str(study)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    (moved,) = [p for p in study.iterdir() if p.name.startswith("study.sqlite.damaged-") and p.suffix != ".sqlite"
                and not p.name.endswith(("-wal", "-shm"))]
    assert len(err) == 1 and f"{path} was damaged" in err[0] and f"moved it aside to {moved}" in err[0], err
    assert moved.read_bytes() == damaged
    kept = Store(path).results()
    kept_count = int(err[0].split("started a new store with the ")[1].split(" ")[0])
    assert len(kept) == kept_count and 0 < kept_count < len(keys)
    assert list(kept) == keys[:len(kept)]   # the first pages survive a truncation: the oldest runs
    assert all(row["spec"]["pad"] == "x" * 2000 and row["status"] == "done" for row in kept.values())


class _FullDisk:
    """A sqlite3 connection whose disk fills once ``allowed`` run rows are written: the next commit fails as
    SQLite's does on a full disk (the transaction rolled back)."""

    state = {"rows": 0, "allowed": 0}

    def __init__(self, db):
        self._db, self._writes = db, False

    def execute(self, sql, *args):
        if sql.startswith("INSERT OR REPLACE INTO runs"):
            _FullDisk.state["rows"] += 1
            self._writes = True
        if sql == "COMMIT" and self._writes and _FullDisk.state["rows"] > _FullDisk.state["allowed"]:
            self._db.execute("ROLLBACK")
            raise __import__("sqlite3").OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_study_on_a_full_disk_is_one_line_and_resumes_once_there_is_space(tmp_path, capsys, monkeypatch):
    """Issue 21 item 7: a bug traceback `database or disk is full` after 14 s."""
    import sqlite3

    from bnlab.study.store import Store
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: _FullDisk(connect(*a, **k)))
    _FullDisk.state.update(rows=0, allowed=3)
    out = tmp_path / "s"
    line = assert_one_line_error(capsys, ["study", "--profile", "tiny", "--claims", "4", "--out", out],
                                 f"the disk holding {out / 'study.sqlite'} is full (database or disk is full) with ",
                                 "the workers were stopped and the store is intact",
                                 "free space there and rerun the same command to resume")
    monkeypatch.setattr(sqlite3, "connect", connect)   # space freed
    assert connect(out / "study.sqlite").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = Store(out / "study.sqlite").count()   # whole stacks only: at most the 3 rows that fitted
    assert stored <= 3 and f"with {stored} of" in line, line
    assert cli.main(["study", "--profile", "tiny", "--claims", "4", "--out", str(out)]) == 0
    rows = Store(out / "study.sqlite").results()
    assert len(rows) > 3 and all(row["attempts"] == 1 for row in rows.values())   # the 3 reused, none twice


def test_study_data_dir_is_authoritative(tmp_path, capsys):
    """Item 6: `bnlab study` had no --data-dir; now a directory without the profile's dataset fails at once."""
    missing = tmp_path / "nonexistent"
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--dataset", "fashion-mnist", "--data-dir", missing,
                            "--out", tmp_path / "x"], f"--data-dir {missing}: no such directory")
    assert not (tmp_path / "x" / "study.sqlite").exists()


def test_study_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--device", "cuda", "--out", tmp_path / "x"],
                   "CUDA is not available")


def test_usage_errors_are_one_line_too(capsys):
    assert_one_line_error(capsys, ["train", "--lr", "abc"], "argument --lr: invalid float value: 'abc'")
    assert_one_line_error(capsys, ["nosuch"], "invalid choice: 'nosuch'", command="")


# ------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize("flags,fragment", [
    (["--lr", "inf"], "lr must be a finite number > 0 (got inf)"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--momentum", "-1"], "momentum must be in [0, 1) (got -1.0)"),
    (["--epochs", "0"], "epochs must be an int >= 1"),
    (["--eval-every", "-1"], "eval_every must be"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the 512 training examples of synthetic"),
    (["--subset", "100000"], "subset must be between 1 and the training-set size 512"),
    (["--device", "nosuch"], "device 'nosuch' is not a device"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--lr", "1e308"], "--lr must be at most 10000 (got 1e+308)"),  # issue 21: an overflow after the header
])
def test_train_checks_every_argument_before_training(tmp_path, capsys, flags, fragment):
    out = tmp_path / "run"
    assert_one_line_error(capsys, ["train", "--model", "resnet8", "--dataset", "synthetic", "--epochs", "1",
                            "--out", out, *flags], fragment)
    assert not (out / "checkpoint.pt").exists() and not (out / "history.json").exists()


def test_train_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_one_line_error(capsys, ["train", "--model", "resnet8", "--dataset", "synthetic", "--device", "cuda",
                            "--out", tmp_path / "r"], "CUDA is not available")


def test_train_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    """Item 5: before, a whole epoch was trained, then a traceback."""
    target = tmp_path / "file"
    target.write_text("")
    assert_one_line_error(capsys, ["train", "--model", "resnet8", "--dataset", "synthetic", "--out", target],
                   f"--out {target} exists and is not a directory")
    assert capsys.readouterr().out == ""  # not even the header: nothing started


def test_train_data_dir_is_authoritative(tmp_path, capsys):
    """Item 6: before, a missing --data-dir was silently ignored."""
    assert_one_line_error(capsys, ["train", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "nonexistent",
                            "--out", tmp_path / "r"], f"--data-dir {tmp_path / 'nonexistent'}: no such directory")


def _train(out, *extra):
    return ["train", "--model", "resnet8", "--width", "0.25", "--dataset", "synthetic", "--batch-size", "64",
            "--lr", "0.05", "--device", "cpu", "--out", str(out), "--no-progress", "--json", *extra]


def test_resume_takes_the_saved_settings_and_extends_with_more_epochs(tmp_path, capsys):
    """Item 10: before, `--resume` with the README's short command refused (defaults differ from the saved
    run) and `--resume --epochs 5` on a finished 3-epoch run did nothing."""
    out = tmp_path / "r"
    assert cli.main(_train(out, "--epochs", "1", "--seed", "3")) == 0
    first = json.loads(capsys.readouterr().out)
    # the short form: every setting comes from the saved run (the model flags too)
    assert cli.main(["train", "--out", str(out), "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == first["steps"] == 512 // 64
    assert cli.main(["train", "--out", str(out), "--resume", "--json", "--epochs", "3"]) == 0
    extended = json.loads(capsys.readouterr().out)
    assert extended["status"] == "done" and extended["steps"] == 3 * (512 // 64)
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3] and history["config"]["seed"] == 3
    # a flag that contradicts the saved run is one line naming it
    assert_one_line_error(capsys, ["train", "--out", out, "--resume", "--lr", "0.5"], "--lr 0.5", "(saved: 0.05)")


def test_doctor_reads_both_files_train_writes(tmp_path, capsys):
    """Item 9: before, checkpoint.pt failed with UnpicklingError (a TorchVersion in it)."""
    out = tmp_path / "r"
    assert cli.main(_train(out, "--epochs", "1")) == 0
    capsys.readouterr()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 512 // 64
    reports = {}
    for name in ("model.pt", "checkpoint.pt", None):
        status = cli.main(["doctor", "resnet8", "--arg", "width=0.25", "--dataset", "synthetic", "--batches", "1",
                           "--batch-size", "16", "--eval", "--json"] + (["--checkpoint", str(out / name)] if name else []))
        reports[name] = json.loads(capsys.readouterr().out)
        assert status == 0 and reports[name]["layers"], name
    # both files hold the trained weights: the same report, and not the untrained model's
    assert reports["model.pt"] == reports["checkpoint.pt"] != reports[None]
    assert any(f["check"] == "initial_statistics" for f in reports[None]["findings"])
    assert not any(f["check"] == "initial_statistics" for f in reports["model.pt"]["findings"])


def test_doctor_bad_input_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(capsys, ["doctor", "resnet8", "--shape", "4,3,8,8", "--checkpoint", garbage],
                   f"{garbage}: not a PyTorch file")
    assert_one_line_error(capsys, ["doctor", "resnet8", "--shape", "4,3,8,8", "--checkpoint", tmp_path / "none.pt"],
                   "no such file")
    assert_one_line_error(capsys, ["doctor", "resnet8", "--shape", "4,x,8"], "--shape expects", "'4,x,8'")
    assert_one_line_error(capsys, ["doctor", "resnet8", "--data", "imagenet"], "unknown dataset 'imagenet'")
    assert_one_line_error(capsys, ["doctor", "resnet8", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "no"],
                   f"--data-dir {tmp_path / 'no'}: no such directory")


def test_doctor_input_that_does_not_fit_the_model_is_one_line(capsys):
    """Issue 21 item 1: a shape the model does not take was a RuntimeError traceback from conv2d."""
    assert_one_line_error(capsys, ["doctor", "resnet8", "--shape", "8,5,32,32"], "--shape 8,5,32,32",
                          "does not take inputs of shape (8, 5, 32, 32)", "takes 3 input channels",
                          "--shape 8,3,32,32")
    assert_one_line_error(capsys, ["doctor", "resnet8", "--shape", "8,3,32"], "--shape 8,3,32",
                          "expected 4D input")


def _small_net():
    """conv 3→4 (3x3, padding 1), BN(4), ReLU, conv 4→2 (1x1), BN(2): at 8x8 a BN input per example is
    4·64·4 = 1024 bytes and 2·64·4 = 512 bytes."""
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         nn.BatchNorm2d(2))


def test_doctor_refuses_inputs_larger_than_the_memory_before_allocating(capsys, monkeypatch):
    """Issue 21 item 1: --shape 100000,3,1000,1000 was an allocation traceback (1.2 TB per batch)."""
    assert_one_line_error(capsys, ["doctor", "resnet8", "--shape", "100000,3,1000,1000"],
                          "--shape 100000,3,1000,1000", "4.8 TB of memory", "available")
    from bnlab.commands import doctor
    # what the doctor keeps, derived by hand for _small_net on 2 batches of (5, 3, 8, 8), 10 examples:
    # the BN inputs, 1024 + 512 bytes per example, plus a float64 copy of the largest, 2 · 1024
    kept = 10 * (1024 + 512 + 2 * 1024)
    argv = ["doctor", "test_cli_errors:_small_net", "--shape", "5,3,8,8", "--batches", "2", "--json"]
    monkeypatch.setattr(doctor, "available_memory", lambda: kept)
    assert cli.main(argv) == 0 and json.loads(capsys.readouterr().out)["batches"] == 2
    monkeypatch.setattr(doctor, "available_memory", lambda: kept - 1)
    assert_one_line_error(capsys, argv, "--shape 5,3,8,8", "batch-norm inputs of 2 batch(es)", "35.8 KB")
    inputs = 2 * 5 * 3 * 8 * 8 * 4             # float32 random inputs, refused before they are made
    monkeypatch.setattr(doctor, "available_memory", lambda: inputs - 1)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("allocated before checking"))
    assert_one_line_error(capsys, argv, "--shape 5,3,8,8", "2 random batch(es) of shape (5, 3, 8, 8)", "7.68 KB")


def _fake_fashion_copy(directory: Path) -> Path:
    """The four Fashion-MNIST file names, the first one a gzip file whose CRC does not match its content."""
    import gzip
    from bnlab.data import fashion_mnist
    directory.mkdir(parents=True)
    for stem in fashion_mnist.FILES:
        (directory / f"{stem}.gz").write_bytes(gzip.compress(b"\0" * 64))
    first = directory / f"{next(iter(fashion_mnist.FILES))}.gz"
    damaged = bytearray(first.read_bytes())
    damaged[-8] ^= 0xFF   # the CRC-32 field of the gzip trailer
    first.write_bytes(bytes(damaged))
    return first


def test_a_damaged_copy_in_bnlab_data_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """Issue 21 item 3: with BNLAB_DATA pointing at a corrupt .gz, `bnlab study` started and all 24 runs failed
    (CRC check failed); the same directory as --data-dir was refused at once. Now both are, naming the setting."""
    damaged = _fake_fashion_copy(tmp_path / "data")
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "data"))
    out = tmp_path / "study"
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--dataset", "fashion-mnist", "--out", out],
                          f"$BNLAB_DATA {tmp_path / 'data'}: {damaged}", "CRC check failed")
    assert not out.exists()
    for argv in (["train", "--model", "resnet8", "--dataset", "fashion-mnist", "--out", tmp_path / "run"],
                 ["doctor", "resnet8", "--dataset", "fashion-mnist"]):
        assert_one_line_error(capsys, argv, f"$BNLAB_DATA {tmp_path / 'data'}: {damaged}", "cannot decompress")
    monkeypatch.delenv("BNLAB_DATA")
    assert_one_line_error(capsys, ["study", "--profile", "tiny", "--dataset", "fashion-mnist", "--out", out,
                                   "--data-dir", tmp_path / "data"], f"--data-dir {tmp_path / 'data'}: {damaged}")


def test_a_stdout_that_cannot_be_written_is_one_line(capsys, monkeypatch):
    """Issue 21 item 5: `bnlab datasets >/dev/full` was a bug traceback (No space left on device)."""
    import errno

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", Full())
    status = cli.main(["datasets"])
    err = capsys.readouterr().err
    assert status == 1 and err.splitlines() == [
        "bnlab datasets: error: cannot write to standard output: No space left on device (errno 28)"], err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("argv", [["datasets"], ["models", "--json"], ["--help"]])
def test_a_full_stdout_ends_in_one_line_and_a_non_zero_status(argv):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "bnlab.cli", *argv], env=ENV, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{'bnlab ' + argv[0] if argv[0] != '--help' else 'bnlab'}: error: cannot write to standard output: "
        f"No space left on device (errno 28)"]


def test_python_dash_m_bnlab_is_the_bnlab_command():
    """Issue 21 item 12: `python -m bnlab` said "No module named bnlab.__main__"."""
    result = subprocess.run([sys.executable, "-m", "bnlab", "--version"], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip().startswith("bnlab "), result.stderr
    result = subprocess.run([sys.executable, "-m", "bnlab", "doctor", "resnet8", "--shape", "x"], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("bnlab doctor: error: --shape expects"), result.stderr


# ------------------------------------------------------------------------------------------ process level
@pytest.mark.parametrize("argv", [["datasets"], ["models", "--json"]])
def test_a_closed_stdout_ends_quietly(argv):
    """Item 13: `bnlab datasets | head -2` ended in a BrokenPipeError traceback."""
    command = f"{sys.executable} -m bnlab.cli {' '.join(argv)} | head -c 20"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.stderr == "" and len(result.stdout) == 20


def test_a_bug_keeps_its_traceback_and_says_how_to_report_it(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import sys; import bnlab.commands.models as m; "
                             "m.run = lambda args: 1 / 0; sys.argv = ['bnlab', 'models']; "
                             "from bnlab.cli import console_main; console_main()"],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bnlab: this is a bug in bnlab")


def test_progress_and_device_flags_agree_across_commands():
    """Item 14: --data (doctor) vs --dataset, --device auto in train but cpu in study, --progress only
    in train."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "study"):
        flags = {s: a for a in sub[name]._actions for s in a.option_strings}
        assert {"--progress", "--no-progress", "--device", "--dataset", "--data-dir"} <= set(flags), name
        assert flags["--progress"].default is None, name  # auto: a bar only on a terminal
    study = cli.build_parser().parse_args(["study"])
    assert study.device == "auto"
    doctor = {s for a in sub["doctor"]._actions for s in a.option_strings}
    assert {"--dataset", "--data", "--data-dir"} <= doctor
    assert "--data-dir" in {s for a in sub["datasets"]._actions for s in a.option_strings}
