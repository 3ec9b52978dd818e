"""Checkpoints: atomic writing, reading with weights_only=True, the checks before a resume."""

import pytest
import torch

from bnlab.checkpoint import (RESUMABLE_CHANGES, atomic_write_text, check_resumable, load_checkpoint,
                              read_torch_file, save_checkpoint)
from bnlab.errors import UserError
from bnlab.train import TrainConfig


def test_atomic_writes_replace_the_file_and_leave_no_debris(tmp_path):
    target = tmp_path / "deep" / "history.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(3.0)})
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.tensor([0.0, 1.0, 2.0]))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.pt", "history.json"]


class _Note:
    pass


class _RaisesWhenPickled:
    def __reduce__(self):
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of torch.save


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "bad": _RaisesWhenPickled()})
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_reading_refuses_missing_foreign_and_unsafe_files_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .*none\.pt: no such file"):
        read_torch_file(tmp_path / "none.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="weights file .*garbage.pt: not a PyTorch file saved with plain types"):
        read_torch_file(garbage, what="weights file")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"note": _Note()}, unsafe)  # a class of its own: weights_only=True refuses to build it
    with pytest.raises(UserError, match="not a PyTorch file saved with plain types") as error:
        read_torch_file(unsafe)
    assert "\n" not in str(error.value)


def test_load_checkpoint_names_what_a_file_lacks(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)  # a bare state dict, as model.pt is
    with pytest.raises(UserError, match="not a training checkpoint .missing config, history, model, optimizer, "
                                        "rng_cpu, state.; resuming needs the checkpoint.pt"):
        load_checkpoint(path)


def test_check_resumable_allows_only_more_epochs_steps_and_a_moved_file():
    saved = {"config": TrainConfig(epochs=2, lr=0.1, checkpoint="a/c.pt").to_dict(), "state": {"epoch": 1, "batch": 3}}
    for change in (dict(epochs=5), dict(max_steps=7), dict(checkpoint="b/c.pt", resume=True)):
        assert set(change) <= set(RESUMABLE_CHANGES)
        check_resumable(saved, TrainConfig(**{"epochs": 2, "lr": 0.1, "checkpoint": "a/c.pt", **change}).to_dict(),
                        "c.pt")
    with pytest.raises(UserError, match=r"c\.pt was written with a different config; .*'lr': \(0\.1, 0\.2\)"):
        check_resumable(saved, TrainConfig(epochs=2, lr=0.2).to_dict(), "c.pt")
    # one epoch and 3 batches of another trained: 2 epochs may continue it, 1 would shorten it
    with pytest.raises(UserError, match=r"c\.pt holds 1 trained epoch and part of another; epochs=1 would shorten"):
        check_resumable(saved, TrainConfig(epochs=1, lr=0.1, checkpoint="a/c.pt").to_dict(), "c.pt")
