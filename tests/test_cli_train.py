"""`bnlab train`, `bnlab models`, `bnlab datasets`, run in-process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bnlab import cli, data
from bnlab.errors import UserError


def test_train_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet8", "--width", "0.5", "--dataset", "synthetic", "--epochs", "2",
            "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["epoch", "step"])
    assert header.split() == ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time"]
    rows = [line for line in lines if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 2 and len({len(r) for r in rows + [header]}) == 1       # fixed columns
    history = json.loads((out / "history.json").read_text())
    final = json.loads((out / "final.json").read_text())
    assert history["status"] == final["status"] == "done"
    assert len(history["epochs"]) == 2 and history["config"]["lr"] == 0.05
    assert final["steps"] == 2 * (512 // 64) and 0 <= final["test_acc"] <= 1
    assert float(rows[-1].split()[5]) == pytest.approx(history["epochs"][-1]["test_acc"], abs=1e-4)
    state = torch.load(out / "model.pt")
    assert "fc.weight" in state
    # resuming a finished run changes nothing
    assert cli.main(args + ["--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == final["steps"]


def test_train_reports_bad_arguments(tmp_path, capsys):
    assert cli.main(["train", "--model", "resnet8", "--norm", "batchnorm", "--dataset", "synthetic",
                     "--out", str(tmp_path)]) == 2
    assert "unknown norm 'batchnorm'" in capsys.readouterr().err


def test_train_divergence_exits_zero_with_status(tmp_path, capsys):
    out = tmp_path / "div"
    assert cli.main(["train", "--model", "resnet8", "--width", "0.25", "--norm", "none", "--dataset", "synthetic",
                     "--epochs", "2", "--lr", "1e4", "--schedule", "constant", "--warmup", "0", "--device", "cpu",
                     "--out", str(out), "--json"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["status"] == "diverged" and json.loads((out / "final.json").read_text())["status"] == "diverged"


def test_models_lists_names_and_paper_sizes(capsys):
    assert cli.main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    sizes = {row["name"]: row["parameters"] for row in listing["models"]}
    assert round(sizes["resnet20"] / 1e6, 2) == 0.27 and round(sizes["resnet110"] / 1e6, 1) == 1.7  # He et al.
    assert {"resnet1d", "airbench", "preact_resnet56"} <= set(sizes)
    assert "fixup" in listing["norms"]
    assert cli.main(["models"]) == 0 and "resnet56" in capsys.readouterr().out


def test_datasets_says_where_each_was_found(capsys, tmp_path):
    assert cli.main(["datasets", "--json", "--data-dir", str(tmp_path)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"fashion-mnist", "mnist1d", "digits", "synthetic", "cifar10", "cifar100"}
    found = data.locate("fashion-mnist", tmp_path)
    source = rows["fashion-mnist"]["source"]
    assert found is None  # an explicit --data-dir is the only place looked in, and tmp_path is empty
    assert source == f"not in {tmp_path} (--data-dir, the only place looked in)"


def test_distributed_without_bnlab_distributed_is_a_clear_error(monkeypatch):
    from bnlab.commands import train as train_command
    monkeypatch.setitem(sys.modules, "bnlab.nn.sync", None)   # as if the module did not exist
    with pytest.raises(UserError, match="bnlab.nn.sync.convert_sync_batchnorm"):
        train_command._sync_batchnorm(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "bnlab.cli", "train", "--model", "resnet8", "--width", "0.25", "--dataset", "synthetic",
           "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    history = json.loads((out / "history.json").read_text())
    assert history["meta"]["world_size"] == 2 and history["final"]["steps"] == 512 // 2 // 32


def test_train_refuses_a_model_for_the_wrong_kind_of_data(tmp_path, capsys):
    assert cli.main(["train", "--model", "resnet8", "--dataset", "mnist1d", "--out", str(tmp_path)]) == 2
    assert "use resnet1d" in capsys.readouterr().err


_SMALL = ["--model", "resnet8", "--width", "0.25", "--dataset", "synthetic", "--batch-size", "64", "--device", "cpu",
          "--no-progress"]


def test_resume_with_nothing_to_resume_is_an_error_naming_the_directory(tmp_path, capsys):
    """Issue "the edges a user hits", item 4: `--out NEWDIR --resume` started a new run without a word."""
    new = tmp_path / "new"
    assert cli.main(["train", "--out", str(new), "--resume", "--epochs", "1", *_SMALL]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"bnlab train: error: --resume: {new} holds no run to resume (no command.json "
                                         f"or checkpoint.pt); drop --resume to start a new run there, or give the "
                                         f"--out of the run to continue"]
    assert captured.out == "" and not new.exists()


def test_resume_of_a_finished_run_without_more_epochs_trains_nothing_and_says_so(tmp_path, capsys):
    """Item 15: `--resume --epochs 2` on a finished 3-epoch run did nothing, said nothing, exited 0, and
    saved epochs=2 into command.json (a later plain --resume then used it)."""
    out = tmp_path / "r"
    assert cli.main(["train", "--out", str(out), "--epochs", "3", *_SMALL]) == 0
    capsys.readouterr()
    files = {name: (out / name).read_bytes() for name in ("command.json", "history.json", "final.json", "model.pt")}
    steps = json.loads(files["final.json"])["steps"]

    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"bnlab train: error: --epochs 2: the run in {out} has trained 3 epochs, and "
                                         f"a run is extended, never shortened: nothing was trained (give --epochs "
                                         f"above 3 to extend it, or another --out)"] and captured.out == ""

    for extra in ([], ["--epochs", "3"]):
        assert cli.main(["train", "--out", str(out), "--resume", *extra]) == 0
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
        assert captured.err.startswith(f"bnlab train: nothing trained: the run in {out} already ended (done: 3 epochs; "
                                       f"{steps} steps, test_acc ")
        assert captured.err.rstrip().endswith("--epochs above 3 extends it")
    assert {name: (out / name).read_bytes() for name in files} == files  # nothing rewritten
